//! Room on the data dir's disk: the free-space gate that keeps sled from ever running out of
//! space mid-write, and the disk reserve (a preallocated ballast file) that is given back when
//! the disk fills so that a clean shutdown and the next open have room.
//!
//! Why a gate and not only the error: sled treats a failed IO-buffer write as fatal for the
//! open `Db` (every later write fails until the process reopens it), and its recovery after
//! such a torn write is not guaranteed to bring every page back at the same age. So the writer
//! asks this module before each group commit and refuses the whole batch, with nothing
//! written, while the free space is under [`DISK_FREE_BYTES_MIN`]; appends resume by
//! themselves once space returns.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{io, StorageError};

/// The free space below which the writer refuses appends. sled rewrites whole tree nodes
/// (a leaf of snapshots with 30 KB contexts is a few hundred KB, written to its own blob file)
/// and opens 512 KiB log segments, so one group commit and its projection write-back can cost
/// a MiB or two on disk; this keeps twice that.
pub const DISK_FREE_BYTES_MIN: u64 = 4 * 1024 * 1024;
/// Free space beyond the reserve and the margin before a full disk resumes. Without it, a
/// few hundred KiB that sled gave back while the disk was full were enough to remake the
/// reserve and resume with the free space back at the margin's edge: appends (and the jobs
/// the scheduler started meanwhile) flapped between running and refused.
pub const DISK_RESUME_MARGIN_BYTES: u64 = DISK_FREE_BYTES_MIN;
/// The disk reserve's size by default. It must cover what a shutdown flush and the next open
/// write (a sled snapshot, the projection write-back, catch-up or a rebuild of the
/// projections) when the disk is otherwise full; 16 MiB is several times that for a log of a
/// few hundred thousand events, and a small share of even an edge box's disk.
pub const DISK_RESERVE_BYTES_DEFAULT: u64 = 16 * 1024 * 1024;
/// The reserve's file name in the data dir.
pub const DISK_RESERVE_FILE: &str = "disk-reserve";

/// The data dir's free-space state, kept by the writer.
pub(super) struct Disk {
    dir: PathBuf,
    reserve_bytes: u64,
    /// Whether the reserve file is in place (false once given back, until re-made).
    reserve_held: bool,
}

impl Disk {
    /// Makes (or keeps) the reserve; when there is no room for it the store still opens, with
    /// a warning, and the reserve is made later once there is.
    pub(super) fn open(dir: &Path, reserve_bytes: u64) -> Disk {
        let mut disk = Disk { dir: dir.to_path_buf(), reserve_bytes, reserve_held: false };
        if reserve_bytes == 0 {
            let _ = std::fs::remove_file(disk.reserve_path());
            return disk;
        }
        match disk.make_reserve() {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "no room for the disk reserve; the store opens without it"),
        }
        disk
    }

    fn reserve_path(&self) -> PathBuf {
        self.dir.join(DISK_RESERVE_FILE)
    }

    /// Free bytes for an unprivileged writer on the data dir's file system.
    pub(super) fn free_bytes(&self) -> Result<u64, StorageError> {
        free_bytes(&self.dir)
    }

    /// `Ok` when a group commit may write; else [`StorageError::DiskFull`], after giving the
    /// reserve back so that the shutdown and the next open have room. While the reserve is
    /// out, writes resume only once there is room to make it again (so that giving it back
    /// does not merely let the disk fill up a second time).
    pub(super) fn check(&mut self) -> Result<(), StorageError> {
        let free = self.free_bytes()?;
        let wanted = self.wanted_free();
        if free >= wanted {
            if !self.reserve_held && self.reserve_bytes > 0 {
                self.make_reserve()?;
                tracing::warn!(free, "space is back: the disk reserve is made again and appends resume");
            }
            return Ok(());
        }
        if self.reserve_held {
            self.release();
        }
        Err(StorageError::DiskFull { free, needed: self.wanted_free() })
    }

    /// The free space that lets appends go on: the margin, and while the reserve is out, room
    /// to make it again and a resume margin on top.
    fn wanted_free(&self) -> u64 {
        if self.reserve_held || self.reserve_bytes == 0 {
            return DISK_FREE_BYTES_MIN;
        }
        DISK_FREE_BYTES_MIN.saturating_add(self.reserve_bytes).saturating_add(DISK_RESUME_MARGIN_BYTES)
    }

    /// Gives the reserve back (the disk filled, or sled failed a write).
    pub(super) fn release(&mut self) {
        if !self.reserve_held {
            return;
        }
        match std::fs::remove_file(self.reserve_path()) {
            Ok(()) => {
                tracing::warn!(bytes = self.reserve_bytes, "the disk is full: the disk reserve is given back")
            }
            Err(e) => tracing::error!(error = %e, "cannot remove the disk reserve"),
        }
        self.reserve_held = false;
    }

    /// Preallocates the reserve beside its final name and renames it into place, so that a
    /// half-made reserve never stands for a whole one.
    fn make_reserve(&mut self) -> Result<(), StorageError> {
        let path = self.reserve_path();
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == self.reserve_bytes) {
            self.reserve_held = true;
            return Ok(());
        }
        let tmp = self.dir.join(format!("{DISK_RESERVE_FILE}.tmp"));
        let made = (|| {
            let f = File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
            let len = libc::off_t::try_from(self.reserve_bytes).unwrap_or(libc::off_t::MAX);
            // SAFETY: posix_fallocate on a valid, owned fd; no memory is involved.
            let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
            if rc != 0 {
                return Err(StorageError::Io {
                    context: format!("preallocate {} bytes for {}", self.reserve_bytes, tmp.display()),
                    source: std::io::Error::from_raw_os_error(rc),
                });
            }
            f.sync_all().map_err(io(format!("fsync {}", tmp.display())))?;
            std::fs::rename(&tmp, &path).map_err(io(format!("rename {}", tmp.display())))
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            self.reserve_held = true;
        }
        made
    }
}

/// Free bytes for an unprivileged writer on the file system that holds `dir`.
pub(super) fn free_bytes(dir: &Path) -> Result<u64, StorageError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| StorageError::Io {
        context: format!("statvfs {}", dir.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io(format!("statvfs {}", dir.display()))(std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether a failure is the disk running out of space, however deep it is wrapped.
pub(super) fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        // sled's error names no source: its IO variant is looked into here.
        let io = e.downcast_ref::<std::io::Error>().or(match e.downcast_ref::<sled::Error>() {
            Some(sled::Error::Io(io)) => Some(io),
            _ => None,
        });
        if io.is_some_and(|io| {
            io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(libc::ENOSPC)
        }) {
            return true;
        }
        if let Some(StorageError::DiskFull { .. }) = e.downcast_ref::<StorageError>() {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const RESERVE: u64 = 1024 * 1024;

    #[test]
    fn the_reserve_is_made_given_back_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DISK_RESERVE_FILE);
        let mut disk = Disk::open(dir.path(), RESERVE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RESERVE);
        disk.release();
        assert!(!path.exists());
        // A temp dir's disk has room: the check makes it again before letting writes through.
        disk.check().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RESERVE);
        assert!(!dir.path().join(format!("{DISK_RESERVE_FILE}.tmp")).exists());
        // A reopen keeps it; a reserve of 0 removes it.
        drop(Disk::open(dir.path(), RESERVE));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RESERVE);
        drop(Disk::open(dir.path(), 0));
        assert!(!path.exists());
    }

    /// Once the reserve is out, appends wait for room for it and a margin on top: a little
    /// space given back on a full disk does not flip it between full and not.
    #[test]
    fn a_full_disk_resumes_only_with_room_to_spare() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Disk::open(dir.path(), RESERVE);
        assert_eq!(disk.wanted_free(), DISK_FREE_BYTES_MIN);
        disk.release();
        assert_eq!(disk.wanted_free(), DISK_FREE_BYTES_MIN + RESERVE + DISK_RESUME_MARGIN_BYTES);
        assert_eq!(Disk::open(dir.path(), 0).wanted_free(), DISK_FREE_BYTES_MIN);
    }

    #[test]
    fn a_full_disk_is_told_apart_however_deep_it_is_wrapped() {
        let enospc = || std::io::Error::from_raw_os_error(libc::ENOSPC);
        let through_sled = StorageError::Sled(sled::Error::Io(enospc()));
        assert!(is_disk_full(&through_sled));
        assert!(is_disk_full(&StorageError::Poisoned(Arc::new(through_sled))));
        assert!(is_disk_full(&io("fdatasync")(enospc())));
        assert!(is_disk_full(&StorageError::DiskFull { free: 1, needed: 2 }));
        let eio = StorageError::Sled(sled::Error::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        assert!(!is_disk_full(&StorageError::Poisoned(Arc::new(eio))));
        assert!(!is_disk_full(&StorageError::Closed));
    }
}
