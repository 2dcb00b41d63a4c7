//! TLS to PostgreSQL, on rustls (0.23, ring: the same stack as the HTTPS front door). The URL's
//! `sslmode` decides, as libpq's does, except that TLS is always verified: the server's
//! certificate must chain to `ATELIER_DATABASE_CA` (a PEM file), or without it to the
//! system's roots, and name the URL's host. `sslmode=require` (or a CA given) means TLS or no
//! connection; `prefer` (the default) and `disable` connect in plain text, which over a Unix
//! socket is all there is.

use std::path::Path;
use std::sync::Arc;

use postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{io, StorageError};

/// Where Debian (and most distributions) keep the system's CA bundle.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The TLS connector `config` asks for (making `sslmode=require` of a `prefer` when a CA is
/// given), or `None` for plain connections.
pub(super) fn connector(
    config: &mut postgres::Config,
    ca: Option<&Path>,
) -> Result<Option<MakeRustlsConnect>, StorageError> {
    let mode = config.get_ssl_mode();
    let roots = match (ca, mode) {
        (Some(_), SslMode::Disable) => {
            return Err(StorageError::DatabaseTls(
                "ATELIER_DATABASE_CA is set but the database URL says sslmode=disable".into(),
            ))
        }
        (Some(ca), _) => {
            config.ssl_mode(SslMode::Require);
            load_roots(ca)?
        }
        (None, SslMode::Require) => load_roots(Path::new(SYSTEM_ROOTS))?,
        (None, _) => return Ok(None),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StorageError::DatabaseTls(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(tls)))
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, StorageError> {
    let pem = std::fs::read(path).map_err(io(format!("read the database CA file {}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(io(format!("read a certificate of {}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| StorageError::DatabaseTls(format!("a certificate of {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(StorageError::DatabaseTls(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(roots)
}
