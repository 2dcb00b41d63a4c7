//! PATCH(atelier 7, strict chunks): a chunked body decoder that reads only what RFC 9112
//! §7.1 allows.
//!
//! `chunked_transfer::Decoder` takes a chunk size through `trim()` and `from_str_radix`, so
//! ` 5`, `5 ` and `+5` are sizes, and reads up to a bare CR as the end of a size line. A
//! proxy in front that reads those bytes differently sees another request boundary than we
//! do (request smuggling). This decoder takes a size of hex digits only, an extension
//! after `;`, a CR LF after every line and chunk, trailer fields bounded in size, and a
//! total under a limit; anything else is an `InvalidData` error.

use std::fmt;
use std::convert::TryFrom;
use std::io::{self, Read};

/// A chunk-size line (size and extensions) or a trailer line; longer is refused.
const LINE_BYTES_MAX: usize = 4096;
/// The trailer section after the last chunk, all lines together.
const TRAILER_BYTES_MAX: usize = 16 * 1024;
/// Hex digits of a chunk size: more than 16 cannot fit in 64 bits.
const SIZE_DIGITS_MAX: usize = 16;

/// The inner error of a read that went past a body limit (see
/// `Options::body_bytes_max`), so that a caller can answer 413 rather than 400.
#[derive(Debug)]
pub struct BodyTooLarge {
    pub limit: usize,
}

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the body is over {} bytes", self.limit)
    }
}

impl std::error::Error for BodyTooLarge {}

pub struct StrictChunked<R> {
    source: R,
    /// Bytes left of the current chunk; `None` before a size line.
    left: Option<usize>,
    /// Data bytes so far, against `limit`.
    total: usize,
    /// 0: no limit.
    limit: usize,
    done: bool,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("chunked body: {}", what))
}

impl<R: Read> StrictChunked<R> {
    pub fn new(source: R, limit: usize) -> StrictChunked<R> {
        StrictChunked { source, left: None, total: 0, limit, done: false }
    }

    fn byte(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        match self.source.read(&mut b)? {
            0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunked body: closed early")),
            _ => Ok(b[0]),
        }
    }

    /// One line without its CR LF; a CR must be followed by LF, and a bare LF is refused.
    fn line(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            match self.byte()? {
                b'\r' => {
                    return match self.byte()? {
                        b'\n' => Ok(line),
                        _ => Err(invalid("a CR without LF")),
                    }
                }
                b'\n' => return Err(invalid("a line that ends in LF without CR")),
                b => {
                    if line.len() >= max {
                        return Err(invalid("a line that is too long"));
                    }
                    line.push(b)
                }
            }
        }
    }

    fn crlf(&mut self) -> io::Result<()> {
        match (self.byte()?, self.byte()?) {
            (b'\r', b'\n') => Ok(()),
            _ => Err(invalid("a chunk that is not followed by CR LF")),
        }
    }

    fn size_line(&mut self) -> io::Result<usize> {
        let line = self.line(LINE_BYTES_MAX)?;
        let digits = match line.iter().position(|b| *b == b';') {
            Some(i) => &line[..i],
            None => &line[..],
        };
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(invalid("a chunk size that is not hex digits"));
        }
        // A size that does not fit is over any limit: with one, it is refused as too large.
        let overflow = || match self.limit {
            0 => invalid("a chunk size that overflows"),
            limit => io::Error::new(io::ErrorKind::InvalidData, BodyTooLarge { limit }),
        };
        if digits.len() > SIZE_DIGITS_MAX {
            return Err(overflow());
        }
        let text = std::str::from_utf8(digits).map_err(|_| invalid("a chunk size that is not hex digits"))?;
        let size = u64::from_str_radix(text, 16).map_err(|_| overflow())?;
        let size = usize::try_from(size).map_err(|_| overflow())?;
        let total = self.total.checked_add(size).ok_or_else(overflow)?;
        if self.limit != 0 && total > self.limit {
            return Err(overflow());
        }
        Ok(size)
    }

    fn trailers(&mut self) -> io::Result<()> {
        let mut budget = TRAILER_BYTES_MAX;
        loop {
            let line = self.line(LINE_BYTES_MAX)?;
            if line.is_empty() {
                return Ok(());
            }
            budget = budget.checked_sub(line.len() + 2).ok_or_else(|| invalid("trailers that are too long"))?;
        }
    }
}

impl<R: Read> Read for StrictChunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let left = match self.left {
            Some(n) => n,
            None => {
                let size = self.size_line()?;
                if size == 0 {
                    self.trailers()?;
                    self.done = true;
                    return Ok(0);
                }
                size
            }
        };
        let want = buf.len().min(left);
        let n = self.source.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunked body: closed early"));
        }
        self.total += n;
        if n == left {
            self.crlf()?;
            self.left = None;
        } else {
            self.left = Some(left - n);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8], limit: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        StrictChunked::new(input, limit).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn well_formed_bodies_decode() {
        assert_eq!(decode(b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nX-T: 1\r\n\r\n", 0).unwrap(), b"hello!");
        assert_eq!(decode(b"A\r\n0123456789\r\n0\r\n\r\n", 10).unwrap(), b"0123456789");
    }

    /// The regression test of the patch: every one of these was read as a body before.
    #[test]
    fn sizes_and_line_ends_other_parsers_read_differently_are_refused() {
        for bad in [
            &b" 5\r\nhello\r\n0\r\n\r\n"[..],
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXY0\r\n\r\n",
            b"5\rhello\r\n0\r\n\r\n",
            b"FFFFFFFFFFFFFFFFF\r\n",
            b"1\r\na\r\nFFFFFFFFFFFFFFFF\r\n",
            b"1\r\na\r\n1 ;x\r\nb\r\n0\r\n\r\n",
        ] {
            let e = decode(bad, 0).expect_err(&String::from_utf8_lossy(bad));
            assert!(matches!(e.kind(), io::ErrorKind::InvalidData), "{:?}: {}", String::from_utf8_lossy(bad), e);
        }
    }

    #[test]
    fn a_body_over_the_limit_is_refused_at_its_size_line() {
        let e = decode(b"8\r\n", 4).unwrap_err();
        assert!(e.get_ref().map_or(false, |inner| inner.is::<BodyTooLarge>()));
        let e = decode(b"3\r\nabc\r\n3\r\n", 4).unwrap_err();
        assert!(e.get_ref().map_or(false, |inner| inner.is::<BodyTooLarge>()));
        // A size that wraps the total, or does not fit 64 bits, is over the limit too.
        for wraps in [&b"1\r\na\r\nFFFFFFFFFFFFFFFF\r\n"[..], b"FFFFFFFFFFFFFFFFFFFFFFFF\r\n"] {
            let e = decode(wraps, 4).unwrap_err();
            assert!(e.get_ref().map_or(false, |inner| inner.is::<BodyTooLarge>()));
        }
    }
}
