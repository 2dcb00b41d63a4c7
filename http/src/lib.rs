//! The HTTP side: a JSON API, Server-Sent Events from log subscriptions, the web page.
//!
//! `conn` serves HTTP/1.1 (and HTTPS) on the vendored tiny_http with a thread per
//! connection; a small pool of handler threads runs the routes. An SSE request keeps its
//! connection's thread (thread per stream) and writes each event straight to the socket.
//!
//! This file only names the modules and what the crate exports: every type lives in the
//! module of its subsystem, and modules import from that module, never from here, so that
//! files import one way.

mod assets;
pub mod auth;
mod backup;
pub mod client;
pub mod client_addr;
mod clock;
mod config;
mod conn;
pub mod cookie;
mod dispatch;
mod executors;
mod framing;
mod fuzz;
mod metrics;
mod pool;
pub mod render;
mod reply;
mod request;
mod routes;
pub mod secret;
mod server;
pub mod shares;
mod slot;
mod sse;
mod state;

pub use auth::{Identity, Keys, Role};
pub use backup::BACKUP_SEQ_HEADER;
pub use config::{
    BuildInfo, HttpConfig, Scheme, TlsFiles, BODY_TIMEOUT_MS_DEFAULT, CONNECTIONS_MAX_DEFAULT,
    CONNECTIONS_PER_IP_MAX_DEFAULT, HEADER_TIMEOUT_MS_DEFAULT, HEARTBEAT_MS_DEFAULT,
};
pub use conn::{BODY_BYTES_MAX, SEND_TIMEOUT_MS};
pub use executors::Executors;
#[doc(hidden)]
pub use fuzz::{fuzz_exchange, fuzz_request, fuzz_scratch_dir};
pub use pool::HANDLER_THREADS;
pub use routes::{openapi, Route, ROUTES};
pub use server::{HttpError, Server, LISTEN_BACKLOG, RESERVED_FDS};
