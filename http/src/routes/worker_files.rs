//! Reading files that workers write (job logs, artifacts): the job code that fills them is not
//! ours, so a file there may be a symlink to a secret, a FIFO that never ends, or far larger than
//! anything worth holding in memory. One policy for all of them, here.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// At most `max` bytes of the regular file at `path`, from its start; `None` when it is missing,
/// a symlink (`O_NOFOLLOW`), or anything but a regular file (opened `O_NONBLOCK`, so a FIFO
/// does not hold the thread). `Some(bytes)` with `max + 1` bytes read means "longer than
/// `max`" (the caller asks for one byte more when it must tell).
pub(super) fn read_capped(path: &Path, max: u64) -> Option<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_fifos_and_missing_files_are_not_read_and_reads_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read_capped(&file, 4).as_deref(), Some(&b"0123"[..]));
        assert_eq!(read_capped(&file, 100).as_deref(), Some(&b"0123456789"[..]));
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_capped(&link, 100), None);
        let fifo = dir.path().join("p");
        nix_mkfifo(&fifo);
        assert_eq!(read_capped(&fifo, 100), None);
        assert_eq!(read_capped(&dir.path().join("missing"), 100), None);
        assert_eq!(read_capped(dir.path(), 100), None, "a dir");
    }

    fn nix_mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
