//! What a handler answers, for the connection to write: JSON, bytes, an empty status or an
//! opened stream; and the one shape of an error reply.

use serde_json::Value;

use crate::backup::Backup;
use crate::render;
use crate::sse::Opened;

/// What a handler answers.
pub(crate) enum Reply {
    Json(u16, Value),
    Bytes(u16, &'static str, Vec<u8>, Vec<(&'static str, String)>),
    Empty(u16),
    /// A stream, subscribed and with its first history read: the connection's thread runs it.
    /// Boxed: a subscription is large, and replies travel by value (and as `Err` in routes).
    Stream(Box<Opened>),
    /// A backup of the log: the connection's thread writes it, then closes.
    Backup(Backup),
}

pub(crate) fn error(status: u16, code: &str, message: impl AsRef<str>) -> Reply {
    Reply::Json(status, render::error(code, message.as_ref()))
}
