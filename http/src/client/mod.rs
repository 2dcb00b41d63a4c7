//! A small blocking client for Atelier's own API: JSON requests and SSE streams over plain
//! HTTP/1.1. Used by the `atelier submit | watch | status | list` commands; [`watch`] is the
//! terminal view that follows one commission over it.

mod chunked;
pub mod printable;
pub mod watch;

pub use chunked::Dechunked;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

/// How long a request may take before the client gives up on it.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// How long connecting may take before the client gives up.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Longest response the client accepts.
pub const RESPONSE_BYTES_MAX: u64 = 16 * 1024 * 1024;

#[derive(Debug)]
pub enum ClientError {
    BadUrl(String),
    /// No connection to `host`.
    Connect {
        host: String,
        source: std::io::Error,
    },
    /// The connection broke or timed out.
    Io(std::io::Error),
    Protocol(String),
    /// The server answered with an error body.
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::BadUrl(u) => write!(f, "'{u}' is not a server URL like http://127.0.0.1:8080"),
            ClientError::Connect { host, .. } => write!(f, "cannot reach the server at {host}"),
            ClientError::Io(_) => write!(f, "the connection to the server failed"),
            ClientError::Protocol(e) => write!(f, "unexpected answer: {e}"),
            ClientError::Api { status, code, message } => write!(f, "{message} ({status} {code})"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } | ClientError::Io(source) => Some(source),
            ClientError::BadUrl(_) | ClientError::Protocol(_) | ClientError::Api { .. } => None,
        }
    }
}

pub struct Client {
    host: String,
    token: String,
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Client {
    pub fn new(url: &str, token: &str) -> Result<Client, ClientError> {
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| ClientError::BadUrl(url.to_string()))?
            .trim_end_matches('/')
            .to_string();
        if host.is_empty() || host.contains('/') {
            return Err(ClientError::BadUrl(url.to_string()));
        }
        Ok(Client { host, token: token.to_string() })
    }

    fn connect(&self) -> Result<TcpStream, ClientError> {
        let addr =
            self.host.to_socket_addrs().map_err(|source| self.connect_error(source))?.next().ok_or_else(
                || self.connect_error(std::io::Error::new(std::io::ErrorKind::NotFound, "no address")),
            )?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(CONNECT_TIMEOUT_MS))
            .map_err(|source| self.connect_error(source))?;
        s.set_read_timeout(Some(Duration::from_millis(REQUEST_TIMEOUT_MS))).map_err(ClientError::Io)?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    fn connect_error(&self, source: std::io::Error) -> ClientError {
        ClientError::Connect { host: self.host.clone(), source }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        extra: &[(&str, String)],
    ) -> Result<TcpStream, ClientError> {
        let mut s = self.connect()?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n",
            self.host, self.token
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(head.as_bytes()).map_err(ClientError::Io)?;
        Ok(s)
    }

    /// A JSON request; an error status becomes [`ClientError::Api`].
    pub fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), ClientError> {
        let (status, body) = self.raw(method, path, body)?;
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(format!("not JSON: {e}")))?
        };
        if status >= 400 {
            return Err(api_error(status, &value));
        }
        Ok((status, value))
    }

    /// A GET whose body is not JSON (an artifact); an error status becomes
    /// [`ClientError::Api`].
    pub fn bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let (status, body) = self.raw("GET", path, None)?;
        if status != 200 {
            return Err(api_error(status, &serde_json::from_slice(&body).unwrap_or(Value::Null)));
        }
        Ok(body)
    }

    /// A request's status and whole body (at most [`RESPONSE_BYTES_MAX`]).
    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Vec<u8>), ClientError> {
        let s = self.send(method, path, body, &[])?;
        let mut raw = Vec::new();
        s.take(RESPONSE_BYTES_MAX).read_to_end(&mut raw).map_err(ClientError::Io)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| ClientError::Protocol("no HTTP head".into()))?;
        let head = String::from_utf8_lossy(&raw[..split]);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ClientError::Protocol("no status".into()))?;
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        let mut body = raw[split + 4..].to_vec();
        if chunked {
            body = dechunk(&body);
        }
        Ok((status, body))
    }

    /// A backup of the server's log (`GET /api/admin/backup`, an admin's): the seq it runs
    /// through, and its JSON lines as they arrive. Reading past a body that was cut short
    /// fails (`UnexpectedEof`), never ends quietly.
    pub fn backup(&self) -> Result<BackupBody, ClientError> {
        let s = self.send("GET", "/api/admin/backup", None, &[])?;
        let mut reader = BufReader::new(s);
        let (status, headers) = read_head(&mut reader)?;
        if status != 200 {
            let mut body = Vec::new();
            let _ = reader.take(RESPONSE_BYTES_MAX).read_to_end(&mut body);
            return Err(api_error(status, &serde_json::from_slice(&body).unwrap_or(Value::Null)));
        }
        let header = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
        let through = header(crate::backup::BACKUP_SEQ_HEADER)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ClientError::Protocol("a backup without its seq header".into()))?;
        if !header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            return Err(ClientError::Protocol("a backup that is not chunked".into()));
        }
        Ok(BackupBody { through, lines: BufReader::new(Dechunked::new(reader)) })
    }

    /// Opens an SSE stream, resuming after `last_event_id`. `Ok(None)` on 204 (nothing more).
    pub fn stream(&self, path: &str, last_event_id: Option<u64>) -> Result<Option<EventStream>, ClientError> {
        let mut extra = vec![("Accept", "text/event-stream".to_string())];
        if let Some(id) = last_event_id {
            extra.push(("Last-Event-ID", id.to_string()));
        }
        let s = self.send("GET", path, None, &extra)?;
        let mut reader = BufReader::new(s);
        let (status, _) = read_head(&mut reader)?;
        match status {
            200 => Ok(Some(EventStream { reader })),
            204 => Ok(None),
            _ => {
                let mut body = Vec::new();
                let _ = reader.take(RESPONSE_BYTES_MAX).read_to_end(&mut body);
                Err(api_error(status, &serde_json::from_slice(&body).unwrap_or(Value::Null)))
            }
        }
    }
}

/// A backup as it arrives: see [`Client::backup`].
pub struct BackupBody {
    /// The log's seq the backup runs through.
    pub through: u64,
    /// The events, one JSON line each.
    pub lines: BufReader<Dechunked<BufReader<TcpStream>>>,
}

impl BackupBody {
    /// Whether the body arrived whole (its last chunk came).
    pub fn is_complete(&self) -> bool {
        self.lines.get_ref().is_complete()
    }
}

fn api_error(status: u16, value: &Value) -> ClientError {
    ClientError::Api {
        status,
        code: value["error"]["code"].as_str().unwrap_or("").to_string(),
        message: value["error"]["message"].as_str().unwrap_or("the server refused").to_string(),
    }
}

/// Reads a response head: the status and the header lines.
fn read_head(reader: &mut BufReader<TcpStream>) -> Result<(u16, Vec<(String, String)>), ClientError> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(ClientError::Io)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(ClientError::Io)? == 0 || line == "\r\n" {
            return Ok((status, headers));
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
}

/// The payload of a chunked body; stops at the last chunk or at the first malformed one.
pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < nl + 2 + size {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = b.get(nl + 4 + size..).unwrap_or_default();
    }
    out
}

/// One SSE message as the client sees it.
#[derive(Clone, Debug)]
pub struct StreamEvent {
    pub id: Option<u64>,
    pub event: String,
    pub data: Value,
}

pub struct EventStream {
    reader: BufReader<TcpStream>,
}

impl EventStream {
    /// The next event; `Ok(None)` when the server ends the stream.
    // Not an `Iterator`: the stream is fallible and ends with `Ok(None)`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<StreamEvent>, ClientError> {
        let (mut id, mut event, mut data) = (None, String::new(), String::new());
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).map_err(ClientError::Io)?;
            if n == 0 {
                return Ok(None);
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data)
                    .map_err(|e| ClientError::Protocol(format!("event data is not JSON: {e}")))?;
                return Ok(Some(StreamEvent { id, event, data }));
            }
            if let Some(v) = l.strip_prefix("id:") {
                id = v.trim().parse().ok();
            } else if let Some(v) = l.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = l.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
    }
}
