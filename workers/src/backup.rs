//! Restoring a backup of a running server into a fresh data dir (`atelier backup DIR`): the
//! log's events (`GET /api/admin/backup`, `atelier export`'s format) imported into a new sled
//! store, checked against the state machine as every import is, then each artifact a
//! commission in it refers to, fetched and checked against its hash. It lives here because the
//! data dir's layout does (`DataDir`), and the artifacts' references are the janitor's to find.
//!
//! The token secret is deliberately not part of a backup: an admin token reads the log, but
//! must not be able to carry away the key that signs every user's tokens. The operator copies
//! the secret file (or sets `ATELIER_SECRET`) for the copy to accept the same tokens.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use atelier_storage::{check, SledStore, StorageError, StoreConfig};
use sha2::{Digest, Sha256};

use crate::inside::pipeline::hex;
use crate::inside::private;
use crate::janitor::referenced_artifacts;
use crate::paths::DataDir;

/// Why a backup could not be restored.
#[derive(Debug)]
pub enum BackupError {
    /// The target dir holds something already: a backup never mixes with other data.
    NotEmpty(PathBuf),
    Io {
        what: String,
        source: std::io::Error,
    },
    Storage(StorageError),
    /// An artifact could not be fetched.
    Artifact {
        hash: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An artifact's bytes do not hash to its name.
    ArtifactMismatch {
        hash: String,
    },
}

impl std::fmt::Display for BackupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackupError::NotEmpty(dir) => {
                write!(f, "{} exists and is not empty: a backup goes into a new or empty dir", dir.display())
            }
            BackupError::Io { what, .. } => f.write_str(what),
            BackupError::Storage(_) => f.write_str("the backup could not be stored"),
            BackupError::Artifact { hash, .. } => write!(f, "cannot fetch the artifact {hash}"),
            BackupError::ArtifactMismatch { hash } => {
                write!(f, "the artifact {hash} arrived with other content than its hash names")
            }
        }
    }
}

impl std::error::Error for BackupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BackupError::Io { source, .. } => Some(source),
            BackupError::Storage(e) => Some(e),
            BackupError::Artifact { source, .. } => Some(source.as_ref()),
            BackupError::NotEmpty(_) | BackupError::ArtifactMismatch { .. } => None,
        }
    }
}

impl From<StorageError> for BackupError {
    fn from(e: StorageError) -> BackupError {
        BackupError::Storage(e)
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> BackupError {
    move |source| BackupError::Io { what, source }
}

/// What a restore put in the new data dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub events: u64,
    pub artifacts: usize,
    /// Artifacts a commission refers to that the server no longer had (answered "not found").
    pub artifacts_missing: Vec<String>,
}

/// An artifact from the server: its bytes, or `None` when the server has no such file.
pub type FetchArtifact<'a> =
    dyn FnMut(&str) -> Result<Option<Vec<u8>>, Box<dyn std::error::Error + Send + Sync>> + 'a;

/// Whether `dir` can take a backup: absent, or an empty dir. Checked before the server is
/// asked for anything.
pub fn check_target(dir: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_none()) {
        Ok(false) => Err(BackupError::NotEmpty(dir.to_path_buf())),
        Ok(true) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackupError::Io { what: format!("cannot read {}", dir.display()), source: e }),
    }
}

/// Imports `events` into a new sled store at `config.dir` (absent or empty: see
/// [`check_target`]), then fetches the artifacts its commissions refer to into its artifacts
/// dir. On failure, what it wrote there is removed again: a half copy is never left to be
/// taken for a backup.
pub fn restore(
    config: StoreConfig,
    events: &mut dyn BufRead,
    fetch: &mut FetchArtifact<'_>,
) -> Result<Restored, BackupError> {
    let dir = config.dir.clone();
    check_target(&dir)?;
    let existed = dir.exists();
    private::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let restored = restore_into(config, events, fetch);
    if restored.is_err() {
        remove_written(&dir, existed);
    }
    restored
}

/// Removes what a failed restore wrote: the dir if it made it, else the dir's entries.
fn remove_written(dir: &Path, existed: bool) {
    if !existed {
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
}

fn restore_into(
    config: StoreConfig,
    events: &mut dyn BufRead,
    fetch: &mut FetchArtifact<'_>,
) -> Result<Restored, BackupError> {
    let data_dir = DataDir::new(config.dir.clone());
    let store = SledStore::open(config)?;
    let imported = check::import(&*store, events).and_then(|n| store.flush_projections().map(|()| n));
    let refs = imported.and_then(|n| Ok((n, referenced_artifacts(&*store)?)));
    store.close();
    let (events, refs) = refs?;
    let mut refs: Vec<String> = refs.into_iter().collect();
    refs.sort();
    let dir = data_dir.artifacts();
    private::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let mut restored = Restored { events, artifacts: 0, artifacts_missing: Vec::new() };
    for hash in refs {
        let Some(bytes) =
            fetch(&hash).map_err(|source| BackupError::Artifact { hash: hash.clone(), source })?
        else {
            restored.artifacts_missing.push(hash);
            continue;
        };
        if hex(&Sha256::digest(&bytes)) != hash {
            return Err(BackupError::ArtifactMismatch { hash });
        }
        let path = dir.join(format!("{hash}.png"));
        let mut f = private::create_file(&path).map_err(io(format!("cannot create {}", path.display())))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io(format!("cannot write {}", path.display())))?;
        restored.artifacts += 1;
    }
    Ok(restored)
}
