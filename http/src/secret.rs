//! The token signing secret: `ATELIER_SECRET` when set, else a random secret kept in the data
//! dir (created on first use, readable by its owner only) so that tokens survive a restart.
//! It lives beside `auth`, which signs with it, so the server and `atelier token` agree.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The file in the data dir that keeps the generated secret.
pub const SECRET_FILE: &str = "secret";
/// Random bytes in a generated secret (kept as hex).
pub const SECRET_RANDOM_BYTES: usize = 32;

#[derive(Debug)]
pub enum SecretError {
    /// The data dir cannot be created.
    CreateDir { path: PathBuf, source: std::io::Error },
    /// No random bytes for a new secret.
    Random(std::io::Error),
    /// The new secret cannot be written.
    Write { path: PathBuf, source: std::io::Error },
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretError::CreateDir { path, .. } => write!(f, "cannot create {}", path.display()),
            SecretError::Random(_) => write!(f, "cannot read random bytes for a new token secret"),
            SecretError::Write { path, .. } => {
                write!(f, "cannot write the token secret to {}", path.display())
            }
        }
    }
}

impl std::error::Error for SecretError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SecretError::CreateDir { source, .. } | SecretError::Write { source, .. } => Some(source),
            SecretError::Random(source) => Some(source),
        }
    }
}

/// The secret's bytes: `from_env` (the value of `ATELIER_SECRET`) when non-empty, else the
/// one kept in `data_dir`, else a new random one written there with mode 0600.
pub fn load_or_create(from_env: Option<&str>, data_dir: &Path) -> Result<Vec<u8>, SecretError> {
    if let Some(secret) = from_env.filter(|s| !s.is_empty()) {
        return Ok(secret.as_bytes().to_vec());
    }
    let path = data_dir.join(SECRET_FILE);
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(s.trim().as_bytes().to_vec());
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|source| SecretError::CreateDir { path: data_dir.to_path_buf(), source })?;
    let mut bytes = [0u8; SECRET_RANDOM_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(SecretError::Random)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(hex.as_bytes()))
        .map_err(|source| SecretError::Write { path, source })?;
    Ok(hex.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_environment_wins_else_one_secret_is_made_and_kept_private() {
        let scratch = tempfile::Builder::new().prefix("atelier-secret-").tempdir().unwrap();
        let dir = scratch.path().join("data");
        assert_eq!(load_or_create(Some("s3cret"), &dir).unwrap(), b"s3cret");
        assert!(!dir.exists(), "a secret from the environment writes nothing");
        let made = load_or_create(Some(""), &dir).unwrap();
        assert_eq!(made.len(), SECRET_RANDOM_BYTES * 2);
        assert_eq!(load_or_create(None, &dir).unwrap(), made, "kept across starts");
        let mode = std::fs::metadata(dir.join(SECRET_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
