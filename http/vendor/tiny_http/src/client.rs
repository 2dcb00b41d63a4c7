use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{HTTPVersion, Method};
use crate::util::Deadline;
use crate::util::RefinedTcpStream;
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // PATCH(atelier 4, 5): the connection's limits, its read deadline and what is left of the
    // current head's byte budget.
    limits: Arc<Limits>,
    deadline: Arc<Deadline>,
    head_budget: usize,
}

/// PATCH(atelier 4, 5, 6, 7): the limits of `Options` that each connection applies.
#[derive(Default)]
pub(crate) struct Limits {
    pub head_timeout: Option<Duration>,
    pub body_timeout: Option<Duration>,
    pub head_bytes_max: usize,
    pub body_bytes_max: usize,
    pub refusal_body: Option<fn(u16, &str) -> (&'static str, Vec<u8>)>,
}

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    WrongHeader(HTTPVersion),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    ReadIoError(IoError),
    // PATCH(atelier 5): the head is over `head_bytes_max`.
    HeadTooLarge,
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        limits: Arc<Limits>,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();
        let deadline = read_socket.deadline();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            limits,
            deadline,
            head_budget: 0,
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Reads the next line from self.next_header_source.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line.
    fn read_next_line(&mut self) -> IoResult<AsciiString> {
        let mut buf = Vec::new();
        let mut prev_byte_was_cr = false;

        loop {
            let byte = self.next_header_source.by_ref().bytes().next();

            let byte = match byte {
                Some(b) => b?,
                None => return Err(IoError::new(ErrorKind::ConnectionAborted, "Unexpected EOF")),
            };

            // PATCH(atelier 5, head limits): every byte of a head counts against its budget;
            // without one, a client that never ends a line grows this buffer for good.
            if self.limits.head_bytes_max != 0 {
                if self.head_budget == 0 {
                    return Err(IoError::new(ErrorKind::Other, HeadTooLarge));
                }
                self.head_budget -= 1;
            }

            if byte == b'\n' && prev_byte_was_cr {
                buf.pop(); // removing the '\r'
                return AsciiString::from_ascii(buf)
                    .map_err(|_| IoError::new(ErrorKind::InvalidInput, "Header is not in ASCII"));
            }

            prev_byte_was_cr = byte == b'\r';

            buf.push(byte);
        }
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    // PATCH(atelier 5): a line's read error, with a head over its budget and bytes that are
    // not ASCII told apart from the connection's own errors.
    fn line_error(e: IoError, version: Option<HTTPVersion>) -> ReadError {
        if e.get_ref().map_or(false, |inner| inner.is::<HeadTooLarge>()) {
            ReadError::HeadTooLarge
        } else if e.kind() == ErrorKind::InvalidInput {
            match version {
                Some(version) => ReadError::WrongHeader(version),
                None => ReadError::WrongRequestLine,
            }
        } else {
            ReadError::ReadIoError(e)
        }
    }

    fn read(&mut self) -> Result<Request, ReadError> {
        // PATCH(atelier 4, 5): a new head: its deadline and its byte budget start now.
        self.deadline.set(self.limits.head_timeout);
        self.head_budget = self.limits.head_bytes_max;
        let (method, path, version, headers) = {
            // reading the request line
            let (method, path, version) = {
                let line = self
                    .read_next_line()
                    .map_err(|e| Self::line_error(e, None))?;

                parse_request_line(
                    line.as_str().trim(), // TODO: remove this conversion
                )?
            };

            // getting all headers
            let headers = {
                let mut headers = Vec::new();
                loop {
                    let line = self
                        .read_next_line()
                        .map_err(|e| Self::line_error(e, Some(version.clone())))?;

                    if line.is_empty() {
                        break;
                    };
                    // PATCH(atelier 5): a line that starts with a space or tab continues
                    // the previous header (obsolete line folding) for some parsers and is a
                    // header of its own for others; RFC 9112 §5.2 lets a server refuse it.
                    if line.as_bytes()[0] == b' ' || line.as_bytes()[0] == b'\t' {
                        return Err(ReadError::WrongHeader(version));
                    }
                    headers.push(match FromStr::from_str(line.as_str().trim()) {
                        // TODO: remove this conversion
                        Ok(h) => h,
                        _ => return Err(ReadError::WrongHeader(version)),
                    });
                }

                headers
            };

            (method, path, version, headers)
        };

        // PATCH(atelier 4): the body (read here if small, or by whoever reads the request)
        // has a deadline of its own, from the end of the head.
        self.deadline.set(self.limits.body_timeout);

        // building the writer for the request
        let writer = self.sink.next().unwrap();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            // PATCH(atelier 9, gone clients): the peer's address is read when the
            // connection is accepted; a client that is gone by then (ENOTCONN) panicked
            // this thread here. It is a connection error like any other.
            match self.remote_addr.as_ref() {
                Ok(addr) => *addr,
                Err(e) => return Err(ReadError::ReadIoError(IoError::new(e.kind(), e.to_string()))),
            },
            data_source,
            writer,
            self.limits.body_bytes_max,
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
            }
        })?;

        // return the request
        Ok(request)
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {

        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        loop {
            let rq = match self.read() {
                Err(ReadError::WrongRequestLine) => {
                    let writer = self.sink.next().unwrap();
                    let response = self.refusal(400, "the request line is not METHOD TARGET HTTP/1.1");
                    response
                        .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                        .ok();
                    return None; // we don't know where the next request would start,
                                 // se we have to close
                }

                Err(ReadError::WrongHeader(ver)) => {
                    let writer = self.sink.next().unwrap();
                    let response = self.refusal(400, "a header line is malformed");
                    response.raw_print(writer, ver, &[], false, None).ok();
                    return None; // we don't know where the next request would start,
                                 // se we have to close
                }

                Err(ReadError::ReadIoError(ref err)) if err.kind() == ErrorKind::TimedOut => {
                    // request timeout
                    let writer = self.sink.next().unwrap();
                    let response = self.refusal(408, "the request did not arrive in time");
                    response
                        .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                        .ok();
                    return None; // closing the connection
                }

                Err(ReadError::ExpectationFailed(ver)) => {
                    let writer = self.sink.next().unwrap();
                    let response = self.refusal(417, "the only expectation served is 100-continue");
                    response.raw_print(writer, ver, &[], false, None).ok();
                    return None; // TODO: should be recoverable, but needs handling in case of body
                }

                // PATCH(atelier 5)
                Err(ReadError::HeadTooLarge) => {
                    let writer = self.sink.next().unwrap();
                    let response = self.refusal(431, "the request head is too large");
                    response
                        .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                        .ok();
                    return None;
                }

                Err(ReadError::ReadIoError(_)) => return None,

                Ok(rq) => rq,
            };

            // checking HTTP version
            if *rq.http_version() > (1, 1) {
                // PATCH(atelier 6): answered through the request's own writer. A writer
                // taken from the sink waits for this request's to finish, so the answer
                // never went out and the connection's thread waited for good.
                let response = self.refusal(505, "This server only supports HTTP versions 1.0 and 1.1");
                let mut writer = rq.into_writer();
                response
                    .raw_print(&mut writer, HTTPVersion(1, 1), &[], false, None)
                    .ok();
                writer.flush().ok();
                // PATCH(atelier 6): what follows is not HTTP/1 (an HTTP/2 preface, say), so
                // there is no next request to find in it.
                return None;
            }

            // updating the status of the connection
            let connection_header = rq
                .headers()
                .iter()
                .find(|h| h.field.equiv("Connection"))
                .map(|h| h.value.as_str());

            let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

            match lowercase {
                Some(ref val) if val.contains("close") => self.no_more_requests = true,
                Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
                Some(ref val)
                    if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
                {
                    self.no_more_requests = true
                }
                None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
                _ => (),
            };

            // returning the request
            return Some(rq);
        }
    }
}

/// PATCH(atelier 5): the inner error of a head over `head_bytes_max`.
#[derive(Debug)]
struct HeadTooLarge;

impl std::fmt::Display for HeadTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request head is too large")
    }
}

impl std::error::Error for HeadTooLarge {}

impl ClientConnection {
    /// PATCH(atelier 6, refusal bodies): an answer tiny_http gives itself, with the body the
    /// options ask for (and none otherwise, as before).
    fn refusal(&self, status: u16, message: &str) -> crate::ResponseBox {
        match self.limits.refusal_body {
            Some(body) => {
                let (content_type, bytes) = body(status, message);
                crate::Response::from_data(bytes)
                    .with_status_code(crate::StatusCode(status))
                    .with_header(
                        crate::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
                            .expect("invariant: a content type is a header value"),
                    )
                    .boxed()
            }
            None => crate::Response::empty(status).boxed(),
        }
    }
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
    }
}
