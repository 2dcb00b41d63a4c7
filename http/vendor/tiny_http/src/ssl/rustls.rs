//! PATCH(atelier 8, rustls 0.23): TLS on rustls 0.23 (see Cargo.toml for why), with the
//! same shape as the 0.20 module it replaces: one `StreamOwned` behind a mutex, shared by a
//! connection's read and write halves. The handshake runs on the connection's first read,
//! on its own thread, never on the accept thread.
use crate::connection::Connection;
use crate::util::refined_tcp_stream::Stream as RefinedStream;
use std::error::Error;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeroize::Zeroizing;

/// A TLS session and the socket under it, shared by the read and the write half.
pub(crate) struct RustlsStream(
    Arc<Mutex<rustls::StreamOwned<rustls::ServerConnection, Connection>>>,
);

impl RustlsStream {
    fn lock(&self) -> std::sync::MutexGuard<'_, rustls::StreamOwned<rustls::ServerConnection, Connection>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn peer_addr(&mut self) -> std::io::Result<Option<SocketAddr>> {
        self.lock().sock.peer_addr()
    }

    pub(crate) fn shutdown(&mut self, how: Shutdown) -> std::io::Result<()> {
        self.lock().sock.shutdown(how)
    }

    // PATCH(atelier 4): the deadline's reads set the socket's timeout.
    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.lock().sock.set_read_timeout(timeout)
    }
}

impl Clone for RustlsStream {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl Read for RustlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.lock().read(buf)
    }
}

impl Write for RustlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lock().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.lock().flush()
    }
}

pub(crate) struct RustlsContext(Arc<rustls::ServerConfig>);

impl RustlsContext {
    pub(crate) fn from_pem(
        certificates: Vec<u8>,
        private_key: Zeroizing<Vec<u8>>,
    ) -> Result<Self, Box<dyn Error + Send + Sync>> {
        let certificate_chain = rustls_pemfile::certs(&mut certificates.as_slice())
            .collect::<Result<Vec<_>, _>>()?;
        if certificate_chain.is_empty() {
            return Err("no certificate found in the certificate PEM".into());
        }
        let private_key = rustls_pemfile::private_key(&mut private_key.as_slice())?
            .ok_or("no private key (PKCS#8, PKCS#1 or SEC1) found in the key PEM")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_conf = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certificate_chain, private_key)?;
        Ok(Self(Arc::new(tls_conf)))
    }

    pub(crate) fn accept(
        &self,
        stream: Connection,
    ) -> Result<RustlsStream, Box<dyn Error + Send + Sync + 'static>> {
        let connection = rustls::ServerConnection::new(self.0.clone())?;
        Ok(RustlsStream(Arc::new(Mutex::new(
            rustls::StreamOwned::new(connection, stream),
        ))))
    }
}

impl From<RustlsStream> for RefinedStream {
    fn from(stream: RustlsStream) -> Self {
        Self::Https(stream)
    }
}
