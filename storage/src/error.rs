//! Storage failures: things that are broken, as opposed to expected outcomes such as a
//! version conflict (see `AppendOutcome`).
//!
//! A failure that comes from another layer (sled, the file system, the codec, JSON) keeps
//! that error as its [`source`](std::error::Error::source), so that a caller can tell a full
//! disk from a bad checksum; the message still says what storage was doing.

use std::path::PathBuf;
use std::sync::Arc;

use crate::codec::CodecError;

#[derive(Debug)]
pub enum StorageError {
    Io {
        context: String,
        source: std::io::Error,
    },
    Sled(sled::Error),
    /// A stored record fails its checksum or hash chain, or cannot be decoded.
    Corruption {
        seq: u64,
        detail: String,
        /// Why, when another layer said so: the codec refused the record's bytes
        /// ([`CodecError`]), or the state machine refused its event (`Rejection`).
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A projection record cannot be decoded (it can be rebuilt from the log).
    BadProjection {
        tree: &'static str,
        detail: String,
        /// The codec's verdict, when the value's bytes did not decode.
        source: Option<CodecError>,
    },
    /// The data dir was written by a newer Atelier.
    NewerSchema {
        found: u32,
        supported: u32,
    },
    /// Another process holds the data dir.
    Locked {
        path: PathBuf,
        holder: String,
    },
    /// The store stopped accepting writes after a failed commit (the failure, shared by
    /// every request refused since); restart to recover.
    Poisoned(Arc<StorageError>),
    /// The data dir's disk has less free space than a group commit may need: the append was
    /// refused with nothing written, and appends resume once space returns.
    DiskFull {
        free: u64,
        needed: u64,
    },
    /// The store is shut down.
    Closed,
    /// A command lost the version race too many times in a row.
    Contention {
        commission: u64,
    },
    /// PostgreSQL refused a statement (the backend chosen by `ATELIER_DATABASE_URL`).
    Postgres {
        context: String,
        /// Shared, so that every append of a failed group commit can carry it.
        source: Arc<postgres::Error>,
    },
    /// PostgreSQL cannot be reached: connecting failed, the connection broke, or no pooled
    /// connection came free in time. Nothing was acknowledged; the store reconnects by itself.
    Unavailable {
        context: String,
        source: Option<Arc<postgres::Error>>,
    },
    /// TLS to PostgreSQL cannot be set up as configured (`ATELIER_DATABASE_CA`, `sslmode`).
    DatabaseTls(String),
    /// Another server holds the database (`pg_store::guard`): its connection's name.
    DatabaseInUse {
        holder: String,
    },
    /// This node lost its lease (`pg_store::nodes`): it appends nothing until it has
    /// stopped its jobs and taken a new one.
    LeaseLost {
        node: String,
        reason: String,
    },
    /// Another live server runs as this node id.
    NodeInUse {
        node: String,
        holder: String,
    },
    /// The database's schema was migrated by a newer Atelier.
    NewerDatabaseSchema {
        found: i32,
        supported: i32,
    },
    /// `import` needs an empty data dir; the input must be a valid log.
    Import {
        line: usize,
        detail: String,
        /// Why, when another layer said so: the line is not JSON of an event
        /// (`serde_json::Error`), or the state machine refused the event (`Rejection`).
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl StorageError {
    /// A log record that is broken in a way the codec did not see (chain, seq, a gap).
    pub(crate) fn corruption(seq: u64, detail: impl Into<String>) -> StorageError {
        StorageError::Corruption { seq, detail: detail.into(), source: None }
    }

    /// A log record that another layer refused, `source` saying why.
    pub(crate) fn corruption_from(
        seq: u64,
        detail: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StorageError {
        StorageError::Corruption { seq, detail: detail.into(), source: Some(Box::new(source)) }
    }

    /// A log record whose bytes the codec refused.
    pub(crate) fn undecodable(seq: u64, source: CodecError) -> StorageError {
        StorageError::corruption_from(seq, source.to_string(), source)
    }

    /// A projection value that is inconsistent in a way the codec did not see.
    pub(crate) fn bad_projection(tree: &'static str, detail: impl Into<String>) -> StorageError {
        StorageError::BadProjection { tree, detail: detail.into(), source: None }
    }

    /// A projection value whose bytes the codec refused.
    pub(crate) fn undecodable_projection(tree: &'static str, source: CodecError) -> StorageError {
        StorageError::BadProjection { tree, detail: source.to_string(), source: Some(source) }
    }

    /// The same failure again, for the next of several appends it refuses (a failed group
    /// commit); what cannot be copied is said in words, keeping `Unavailable` a 503.
    pub(crate) fn for_each_refused(&self) -> StorageError {
        match self {
            StorageError::Postgres { context, source } => {
                StorageError::Postgres { context: context.clone(), source: source.clone() }
            }
            StorageError::Unavailable { context, source } => {
                StorageError::Unavailable { context: context.clone(), source: source.clone() }
            }
            StorageError::Closed => StorageError::Closed,
            other => StorageError::Unavailable { context: other.to_string(), source: None },
        }
    }

    /// An import line that cannot be loaded.
    pub(crate) fn import(line: usize, detail: impl Into<String>) -> StorageError {
        StorageError::Import { line, detail: detail.into(), source: None }
    }

    /// An import line that another layer refused, `source` saying why.
    pub(crate) fn import_from(
        line: usize,
        detail: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StorageError {
        StorageError::Import { line, detail: detail.into(), source: Some(Box::new(source)) }
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Io { context, source } => write!(f, "{context}: {source}"),
            StorageError::Sled(e) => write!(f, "sled: {e}"),
            StorageError::Corruption { seq, detail, .. } => {
                write!(f, "corrupted log record at seq {seq}: {detail}")
            }
            StorageError::BadProjection { tree, detail, .. } => {
                write!(f, "bad record in projection '{tree}': {detail}")
            }
            StorageError::NewerSchema { found, supported } => write!(
                f,
                "the data dir has schema version {found}, newer than this build supports ({supported}); upgrade Atelier"
            ),
            StorageError::Locked { path, holder } => {
                write!(f, "the data dir {} is in use by {holder}", path.display())
            }
            StorageError::Poisoned(e) => write!(f, "the store stopped after a failed commit: {e}"),
            StorageError::DiskFull { free, needed } => write!(
                f,
                "the disk is full: {free} bytes free, appends need {needed}; free some space on the data dir's disk (appends resume by themselves)"
            ),
            StorageError::Closed => write!(f, "the store is closed"),
            StorageError::Contention { commission } => {
                write!(f, "commission {commission} is changing too fast to apply the command; try again")
            }
            StorageError::Import { line, detail, .. } => write!(f, "import, line {line}: {detail}"),
            StorageError::Postgres { context, source } => write!(f, "{context}: postgres: {source}"),
            StorageError::Unavailable { context, source: Some(e) } => {
                write!(f, "the database is unavailable ({context}): {e}")
            }
            StorageError::Unavailable { context, source: None } => {
                write!(f, "the database is unavailable ({context})")
            }
            StorageError::DatabaseTls(detail) => write!(f, "TLS to the database: {detail}"),
            StorageError::DatabaseInUse { holder } => write!(
                f,
                "the database is in use by another Atelier server: {holder}; one server per database"
            ),
            StorageError::LeaseLost { node, reason } => write!(
                f,
                "node {node} lost its lease ({reason}); it appends nothing until it has stopped its jobs and taken a new one"
            ),
            StorageError::NodeInUse { node, holder } => write!(
                f,
                "node id {node} is in use by a live server ({holder}); give each server its own ATELIER_NODE_ID"
            ),
            StorageError::NewerDatabaseSchema { found, supported } => write!(
                f,
                "the database has schema version {found}, newer than this build supports ({supported}); upgrade Atelier"
            ),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io { source, .. } => Some(source),
            StorageError::Sled(e) => Some(e),
            StorageError::Corruption { source, .. } | StorageError::Import { source, .. } => {
                source.as_ref().map(|e| &**e as _)
            }
            StorageError::BadProjection { source, .. } => source.as_ref().map(|e| e as _),
            StorageError::Poisoned(e) => Some(&**e),
            StorageError::Postgres { source, .. } => Some(&**source),
            StorageError::Unavailable { source, .. } => source.as_ref().map(|e| &**e as _),
            StorageError::NewerSchema { .. }
            | StorageError::Locked { .. }
            | StorageError::Closed
            | StorageError::DiskFull { .. }
            | StorageError::Contention { .. }
            | StorageError::DatabaseInUse { .. }
            | StorageError::LeaseLost { .. }
            | StorageError::NodeInUse { .. }
            | StorageError::DatabaseTls(_)
            | StorageError::NewerDatabaseSchema { .. } => None,
        }
    }
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Sled(e)
    }
}

/// A PostgreSQL failure, sorted: a broken or refused connection (or a server shutting down)
/// is `Unavailable` (the store will reconnect), anything else the database said is `Postgres`.
pub(crate) fn pg(context: impl Into<String>) -> impl FnOnce(postgres::Error) -> StorageError {
    let context = context.into();
    move |source| {
        let lost = source.is_closed()
            || match source.code() {
                // No SQLSTATE: the error came from the socket, not from the server.
                None => true,
                // Class 08 (connection exception); 57P01-57P03: the server is shutting down,
                // crashed, or cannot take connections yet.
                Some(code) => code.code().starts_with("08") || code.code().starts_with("57P"),
            };
        let source = Arc::new(source);
        if lost {
            StorageError::Unavailable { context, source: Some(source) }
        } else {
            StorageError::Postgres { context, source }
        }
    }
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
    let context = context.into();
    move |source| StorageError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_wrapped_failure_keeps_its_message_and_its_source() {
        let e = StorageError::undecodable(7, CodecError::Truncated);
        assert_eq!(e.to_string(), "corrupted log record at seq 7: truncated record");
        let source = e.source().expect("a codec source");
        assert_eq!(source.downcast_ref::<CodecError>(), Some(&CodecError::Truncated));

        let poisoned = StorageError::Poisoned(Arc::new(e));
        assert_eq!(
            poisoned.to_string(),
            "the store stopped after a failed commit: corrupted log record at seq 7: truncated record"
        );
        let inner = poisoned.source().expect("the failed commit").downcast_ref::<StorageError>();
        assert!(matches!(inner, Some(StorageError::Corruption { seq: 7, .. })));

        let refused =
            StorageError::corruption_from(3, "refused on replay", atelier_engine::Rejection::NotFound);
        let source = refused.source().and_then(|s| s.downcast_ref::<atelier_engine::Rejection>());
        assert!(matches!(source, Some(atelier_engine::Rejection::NotFound)));

        let io = io("fdatasync")(std::io::Error::from(std::io::ErrorKind::StorageFull));
        let kind = io.source().and_then(|s| s.downcast_ref::<std::io::Error>()).map(|e| e.kind());
        assert_eq!(kind, Some(std::io::ErrorKind::StorageFull));
    }
}
