//! A chunked HTTP body read as it arrives: a long answer (a backup of the whole log, a stream
//! through a proxy that re-frames it) is never held whole in memory, and a body cut short
//! before its last chunk is an error, not a quiet end, so a truncated backup is never taken
//! for a whole one.

use std::io::{self, BufRead, Read};

/// A chunk-size line longer than this is not HTTP (a size is at most 16 hex digits, plus
/// extensions nobody sends us).
const CHUNK_LINE_BYTES_MAX: u64 = 1024;

/// The payload of a chunked body on `inner`, which is positioned just after the head.
pub struct Dechunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    /// The last chunk was read: the body is over.
    done: bool,
}

impl<R: BufRead> Dechunked<R> {
    pub fn new(inner: R) -> Dechunked<R> {
        Dechunked { inner, left: 0, done: false }
    }

    /// Whether the body's last chunk has arrived (a body read to the end without one was cut).
    pub fn is_complete(&self) -> bool {
        self.done
    }

    /// Reads a chunk's size line; 0 is the last chunk (its trailer is read too).
    fn next_size(&mut self) -> io::Result<u64> {
        let line = self.line()?;
        let hex = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(hex, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // The trailer: header lines up to an empty one.
            while !self.line()?.is_empty() {}
        }
        Ok(size)
    }

    /// One CRLF-ended line, without its end; the body ending first is `UnexpectedEof`.
    fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        let n = (&mut self.inner).take(CHUNK_LINE_BYTES_MAX).read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            return Err(cut());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

fn cut() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended before its last chunk")
}

impl<R: BufRead> Read for Dechunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            self.left = self.next_size()?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = usize::try_from(self.left).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(cut());
        }
        self.left -= n as u64;
        if self.left == 0 {
            // Each chunk's data ends with CRLF.
            if !self.line()?.is_empty() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a chunk longer than its size"));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(wire: &[u8]) -> (io::Result<Vec<u8>>, bool) {
        let mut d = Dechunked::new(wire);
        let mut out = Vec::new();
        let r = d.read_to_end(&mut out).map(|_| out);
        (r, d.is_complete())
    }

    #[test]
    fn a_whole_body_reads_whole_and_a_cut_one_fails() {
        let (body, complete) = read_all(b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n");
        assert_eq!(body.unwrap(), b"hello, world");
        assert!(complete);
        for cut in [&b"5\r\nhello\r\n"[..], b"5\r\nhel", b"5\r\nhello", b"", b"5"] {
            let (body, complete) = read_all(cut);
            assert_eq!(body.unwrap_err().kind(), io::ErrorKind::UnexpectedEof, "{cut:?}");
            assert!(!complete);
        }
        for bad in [&b"zz\r\nhello\r\n0\r\n\r\n"[..], b"2\r\nhello\r\n0\r\n\r\n"] {
            assert_eq!(read_all(bad).0.unwrap_err().kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
    }
}
