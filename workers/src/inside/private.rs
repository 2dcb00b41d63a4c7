//! How the workers make dirs and files under the data dir: private to the owner (dirs 0700,
//! files 0600), whatever the process's umask. Job dirs hold users' inputs and logs, and
//! artifacts are users' outputs; another account on the host has no business reading them.
//! It sits inside the worker's side of the crate because workers create them too; the
//! server's side imports it from here.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The mode of every dir the workers make under the data dir.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file the workers make under the data dir.
pub const FILE_MODE: u32 = 0o600;

/// `create_dir_all` with each dir it makes given [`DIR_MODE`].
pub fn create_dir_all(path: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)
}

/// `File::create` with a new file given [`FILE_MODE`].
///
/// Never through a symlink (`O_NOFOLLOW`): a job's dir is the worker's to fill, and a link it
/// planted where the server writes the job's logs (`stdout.log -> ../../store/db`) would have
/// the server truncate and overwrite its target.
pub fn create_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn dirs_and_files_are_private_whatever_the_umask() {
        let scratch = tempfile::Builder::new().prefix("atelier-private-").tempdir().unwrap();
        let dir = scratch.path().join("a/b");
        create_dir_all(&dir).unwrap();
        create_file(&dir.join("f")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&scratch.path().join("a")), DIR_MODE);
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(&dir.join("f")), FILE_MODE);
    }
}
