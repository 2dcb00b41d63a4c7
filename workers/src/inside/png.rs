//! PNG encoding of the image stage's pixels (8-bit RGB), through the `png` crate. The bytes
//! must be the same for the same pixels on every run and in both executors, since artifacts
//! are named by their hash: the compression level and filter are pinned here.

/// Encodes `rgb` (`width * height * 3` bytes, rows top to bottom) as a PNG file.
pub fn encode_rgb(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let row = usize::try_from(width).expect("invariant: u32 fits usize") * 3;
    let rows = usize::try_from(height).expect("invariant: u32 fits usize");
    assert_eq!(rgb.len(), row * rows, "invariant: the caller passes width*height*3 bytes");
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Default);
    encoder.set_filter(png::FilterType::NoFilter);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::NonAdaptive);
    // Writing to a Vec cannot fail, and the header and data sizes are checked above.
    let mut writer = encoder.write_header().expect("invariant: a valid RGB header writes to memory");
    writer.write_image_data(rgb).expect("invariant: width*height*3 bytes of RGB write to memory");
    writer.finish().expect("invariant: a PNG in memory finishes");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure() {
        let png = encode_rgb(2, 2, &[255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
    }

    /// Artifacts are content-addressed: the same pixels must give the same bytes, and the
    /// bytes must decode back to the pixels.
    #[test]
    fn deterministic_and_lossless() {
        let rgb: Vec<u8> = (0..64 * 48 * 3).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let a = encode_rgb(64, 48, &rgb);
        assert_eq!(a, encode_rgb(64, 48, &rgb));
        let mut reader = png::Decoder::new(a.as_slice()).read_info().unwrap();
        let mut back = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut back).unwrap();
        assert_eq!((info.width, info.height, info.color_type), (64, 48, png::ColorType::Rgb));
        assert_eq!(&back[..info.buffer_size()], rgb.as_slice());
    }
}
