//! The token signing secret: `ATELIER_SECRET` when set, else a random secret kept in the data
//! dir (created on first use, readable by its owner only) so that tokens survive a restart.
//! A [`Secret`] can only be made from at least [`SECRET_BYTES_MIN`] bytes: an empty or short
//! HMAC key lets anyone who guesses it mint an admin token, so a short secret stops the start
//! instead of being used. It lives beside `auth`, which signs with it, so the server and
//! `atelier token` agree.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The file in the data dir that keeps the generated secret.
pub const SECRET_FILE: &str = "secret";
/// Where a new secret is written before it is renamed over [`SECRET_FILE`], so a crash or a
/// full disk never leaves a partial secret behind.
const SECRET_FILE_TMP: &str = ".secret.tmp";
/// Random bytes in a generated secret (kept as hex).
pub const SECRET_RANDOM_BYTES: usize = 32;
/// The fewest bytes a secret may have: 256 bits, the size of HS256's hash, so the key is no
/// weaker than the signature it makes.
pub const SECRET_BYTES_MIN: usize = 32;
/// How to make a good secret, named in every refusal.
const MAKE_ONE: &str = "head -c 32 /dev/urandom | base64";
/// Permission bits the secret file must not have: any access by group or others.
const MODE_GROUP_OTHER: u32 = 0o077;

/// Signing key bytes, at least [`SECRET_BYTES_MIN`] of them.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, ShortSecret> {
        let bytes = bytes.into();
        if bytes.len() < SECRET_BYTES_MIN {
            return Err(ShortSecret { bytes: bytes.len() });
        }
        Ok(Secret(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the bytes: a Debug print ends up in logs.
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// A secret with fewer than [`SECRET_BYTES_MIN`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShortSecret {
    pub bytes: usize,
}

impl std::fmt::Display for ShortSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "it has {} bytes; a token secret needs at least {SECRET_BYTES_MIN}", self.bytes)
    }
}

impl std::error::Error for ShortSecret {}

#[derive(Debug)]
pub enum SecretError {
    /// The data dir cannot be created.
    CreateDir { path: PathBuf, source: std::io::Error },
    /// No random bytes for a new secret.
    Random(std::io::Error),
    /// The new secret cannot be written (or made durable).
    Write { path: PathBuf, source: std::io::Error },
    /// The kept secret exists but cannot be read.
    Read { path: PathBuf, source: std::io::Error },
    /// `ATELIER_SECRET` is too short.
    ShortInEnvironment { source: ShortSecret },
    /// The kept secret is empty or too short (a write cut short, or written by hand).
    ShortInFile { path: PathBuf, source: ShortSecret },
    /// The kept secret may be read or written by group or others.
    OpenToOthers { path: PathBuf, mode: u32 },
    /// A rotation was asked while `ATELIER_SECRET` names the secret: a new file would not be
    /// used.
    SetInEnvironment,
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretError::CreateDir { path, .. } => write!(f, "cannot create {}", path.display()),
            SecretError::Random(_) => write!(f, "cannot read random bytes for a new token secret"),
            SecretError::Write { path, .. } => {
                write!(f, "cannot write the token secret to {}", path.display())
            }
            SecretError::Read { path, .. } => write!(f, "cannot read the token secret in {}", path.display()),
            SecretError::ShortInEnvironment { .. } => write!(
                f,
                "ATELIER_SECRET is too short to sign tokens; make one with `{MAKE_ONE}`"
            ),
            SecretError::ShortInFile { path, .. } => write!(
                f,
                "the token secret in {path} is too short to sign tokens; remove it to have a new one \
                 made, or write one with `(umask 077; {MAKE_ONE} > {path})`",
                path = path.display()
            ),
            SecretError::SetInEnvironment => write!(
                f,
                "ATELIER_SECRET is set, so the secret comes from the environment, not the data dir: \
                 to rotate it, change ATELIER_SECRET (`{MAKE_ONE}`) and restart the server"
            ),
            SecretError::OpenToOthers { path, mode } => write!(
                f,
                "the token secret {path} is open to group or others (mode {mode:04o}); run `chmod 600 {path}`",
                path = path.display()
            ),
        }
    }
}

impl std::error::Error for SecretError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SecretError::CreateDir { source, .. }
            | SecretError::Write { source, .. }
            | SecretError::Read { source, .. } => Some(source),
            SecretError::Random(source) => Some(source),
            SecretError::ShortInEnvironment { source } | SecretError::ShortInFile { source, .. } => {
                Some(source)
            }
            SecretError::OpenToOthers { .. } | SecretError::SetInEnvironment => None,
        }
    }
}

/// The secret: `from_env` (the value of `ATELIER_SECRET`) when non-empty, else the one kept
/// in `data_dir`, else a new random one written there with mode 0600 (and the data dir made
/// 0700 if it is missing). A refusal writes nothing.
pub fn load_or_create(from_env: Option<&str>, data_dir: &Path) -> Result<Secret, SecretError> {
    if let Some(secret) = from_env.filter(|s| !s.is_empty()) {
        return Secret::new(secret.as_bytes()).map_err(|source| SecretError::ShortInEnvironment { source });
    }
    let path = data_dir.join(SECRET_FILE);
    match std::fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & MODE_GROUP_OTHER != 0 {
                return Err(SecretError::OpenToOthers { path, mode });
            }
            let bytes =
                std::fs::read(&path).map_err(|source| SecretError::Read { path: path.clone(), source })?;
            Secret::new(bytes.trim_ascii()).map_err(|source| SecretError::ShortInFile { path, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(data_dir, path),
        Err(source) => Err(SecretError::Read { path, source }),
    }
}

/// Replaces the secret kept in `data_dir` with a new random one, written as safely as the
/// first (see [`create`]); a running server picks it up (see [`Stamp`]) and every token signed
/// with the old one stops working. Refused when `from_env` (`ATELIER_SECRET`) is set: the
/// file is not what signs then.
pub fn rotate(from_env: Option<&str>, data_dir: &Path) -> Result<Secret, SecretError> {
    if from_env.is_some_and(|s| !s.is_empty()) {
        return Err(SecretError::SetInEnvironment);
    }
    create(data_dir, data_dir.join(SECRET_FILE))
}

/// What identifies one version of the secret file: a rotation renames a new file into place,
/// so its inode changes (and its mtime with it). A server compares stamps to notice one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
}

impl Stamp {
    /// The secret file's stamp in `data_dir`, if there is one.
    pub fn of(data_dir: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(data_dir.join(SECRET_FILE)).ok()?;
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        Some(Stamp { dev: meta.dev(), ino: meta.ino(), mtime_ns })
    }
}

/// Writes a new random secret to `path` in `data_dir`: a temp file, fsynced, renamed into
/// place, then the dir fsynced, so after a crash the file is either absent or whole.
fn create(data_dir: &Path, path: PathBuf) -> Result<Secret, SecretError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|source| SecretError::CreateDir { path: data_dir.to_path_buf(), source })?;
    let mut bytes = [0u8; SECRET_RANDOM_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(SecretError::Random)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = data_dir.join(SECRET_FILE_TMP);
    let write = || -> std::io::Result<()> {
        // A temp file left by a crash may have any mode; a fresh one gets 0600.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(hex.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().map_err(|source| SecretError::Write { path: path.clone(), source })?;
    Ok(Secret::new(hex.into_bytes()).expect("invariant: a generated secret is long enough"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: &str = "0123456789abcdef0123456789abcdef";

    fn scratch() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("atelier-secret-").tempdir().unwrap()
    }

    #[test]
    fn the_environment_wins_else_one_secret_is_made_and_kept_private() {
        let scratch = scratch();
        let dir = scratch.path().join("data");
        assert_eq!(load_or_create(Some(LONG), &dir).unwrap().as_bytes(), LONG.as_bytes());
        assert!(!dir.exists(), "a secret from the environment writes nothing");
        let made = load_or_create(Some(""), &dir).unwrap();
        assert_eq!(made.as_bytes().len(), SECRET_RANDOM_BYTES * 2);
        assert_eq!(load_or_create(None, &dir).unwrap().as_bytes(), made.as_bytes(), "kept across starts");
        let mode = std::fs::metadata(dir.join(SECRET_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(!dir.join(SECRET_FILE_TMP).exists(), "the temp file was renamed");
    }

    #[test]
    fn a_short_secret_is_refused_with_the_way_to_make_one() {
        let scratch = scratch();
        let dir = scratch.path().join("data");
        let err = load_or_create(Some("s3cret"), &dir).unwrap_err();
        assert!(matches!(err, SecretError::ShortInEnvironment { source: ShortSecret { bytes: 6 } }));
        assert!(err.to_string().contains(MAKE_ONE), "{err}");
        assert!(!dir.exists(), "a refusal writes nothing");
        assert_eq!(Secret::new(vec![7; SECRET_BYTES_MIN - 1]).unwrap_err(), ShortSecret { bytes: 31 });

        std::fs::create_dir(&dir).unwrap();
        for short in ["", "\n", "0123456789"] {
            let path = dir.join(SECRET_FILE);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(short.as_bytes()))
                .unwrap();
            let err = load_or_create(None, &dir).unwrap_err();
            assert!(matches!(err, SecretError::ShortInFile { .. }), "{short:?}: {err:?}");
            assert!(err.to_string().contains(MAKE_ONE), "{err}");
            assert_eq!(std::fs::read(&path).unwrap(), short.as_bytes(), "left as it was");
        }
    }

    #[test]
    fn a_secret_file_others_may_read_is_refused_with_the_chmod() {
        let scratch = scratch();
        let path = scratch.path().join(SECRET_FILE);
        std::fs::write(&path, LONG).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load_or_create(None, scratch.path()).unwrap_err();
            assert!(matches!(err, SecretError::OpenToOthers { .. }), "{mode:o}: {err:?}");
            assert!(err.to_string().contains(&format!("run `chmod 600 {}`", path.display())), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_or_create(None, scratch.path()).unwrap().as_bytes(), LONG.as_bytes());
    }
}
