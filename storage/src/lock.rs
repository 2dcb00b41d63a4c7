//! The data dir's lock: one process at a time may use a data dir, and the lock file names it,
//! so that a second one can say who holds the dir. The sled store holds it while open; a
//! server whose log is in PostgreSQL holds it too, for the secret and the jobs' dirs.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{io, StorageError};

/// An exclusive lock on the data dir, naming its holder in the lock file.
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(dir: &Path) -> Result<DataDirLock, StorageError> {
        let path = dir.join("LOCK");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(format!("open {}", path.display())))?;
        // SAFETY: flock on a valid, owned fd; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = if holder.trim().is_empty() {
                "another process".to_string()
            } else {
                holder.trim().to_string()
            };
            return Err(StorageError::Locked { path: dir.to_path_buf(), holder });
        }
        let me = format!(
            "pid {} ({})",
            std::process::id(),
            std::env::args().next().unwrap_or_else(|| "atelier".into())
        );
        file.set_len(0).map_err(io("truncate LOCK"))?;
        file.write_all(me.as_bytes()).map_err(io("write LOCK"))?;
        Ok(DataDirLock { _file: file })
    }
}
