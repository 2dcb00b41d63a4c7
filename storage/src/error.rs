//! Storage failures: things that are broken, as opposed to expected outcomes such as a
//! version conflict (see `AppendOutcome`).

use std::path::PathBuf;

#[derive(Debug)]
pub enum StorageError {
    Io {
        context: String,
        source: std::io::Error,
    },
    Sled(String),
    /// A stored record fails its checksum or hash chain, or cannot be decoded.
    Corruption {
        seq: u64,
        detail: String,
    },
    /// A projection record cannot be decoded (it can be rebuilt from the log).
    BadProjection {
        tree: &'static str,
        detail: String,
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
    /// The store stopped accepting writes after a failed commit; restart to recover.
    Poisoned(String),
    /// The store is shut down.
    Closed,
    /// A command lost the version race too many times in a row.
    Contention {
        commission: u64,
    },
    /// `import` needs an empty data dir; the input must be a valid log.
    Import {
        line: usize,
        detail: String,
    },
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Io { context, source } => write!(f, "{context}: {source}"),
            StorageError::Sled(e) => write!(f, "sled: {e}"),
            StorageError::Corruption { seq, detail } => {
                write!(f, "corrupted log record at seq {seq}: {detail}")
            }
            StorageError::BadProjection { tree, detail } => {
                write!(f, "bad record in projection '{tree}': {detail} (rebuild with `atelier replay --rebuild`)")
            }
            StorageError::NewerSchema { found, supported } => write!(
                f,
                "the data dir has schema version {found}, newer than this build supports ({supported}); upgrade Atelier"
            ),
            StorageError::Locked { path, holder } => {
                write!(f, "the data dir {} is in use by {holder}", path.display())
            }
            StorageError::Poisoned(e) => write!(f, "the store stopped after a failed commit: {e}"),
            StorageError::Closed => write!(f, "the store is closed"),
            StorageError::Contention { commission } => {
                write!(f, "commission {commission} is changing too fast to apply the command; try again")
            }
            StorageError::Import { line, detail } => write!(f, "import, line {line}: {detail}"),
        }
    }
}

impl std::error::Error for StorageError {}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Sled(e.to_string())
    }
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
    let context = context.into();
    move |source| StorageError::Io { context, source }
}
