//! Transport security: TLS 1.3 with client certificates required, identities read from the
//! verified certificate, revoked serials refused at the handshake, and the accept loop that
//! bounds connections and handshakes and sets `TCP_NODELAY` on every accepted socket.

use crate::pki::{Role, serial_hex};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// The certificate files of a coordinator listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// The deployment CA: the only issuer whose client certificates are accepted.
    pub ca: PathBuf,
    /// The coordinator's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// A file of revoked serial numbers (hex, one a line, `#` comments), read at every
    /// handshake so that a revocation takes effect without a restart.
    pub revoked: Option<PathBuf>,
}

/// Who called: read from the verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The certificate's common name: the store's or administrator's name.
    pub name: String,
    /// The role its `OU` carries.
    pub role: Role,
    /// The serial number (hex).
    pub serial: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Setting up TLS failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), message: message.to_string() }
}

/// Reads the identity from a DER certificate (already verified by the handshake).
///
/// # Errors
///
/// A message saying what is missing: the caller maps it to `UNAUTHENTICATED`.
pub fn identity(der: &[u8]) -> Result<Identity, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable: {e}"))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or("the certificate has no common name")?;
    crate::pki::check_name(name).map_err(|e| e.to_string())?;
    let role = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .and_then(Role::parse)
        .ok_or("the certificate carries no fedretail role (OU)")?;
    Ok(Identity { name: name.to_string(), role, serial: serial_hex(cert.raw_serial()) })
}

/// The caller of a request, if the connection is mutually authenticated.
pub fn peer<T>(request: &tonic::Request<T>) -> Option<Result<Identity, String>> {
    let certs = request.peer_certs()?;
    Some(certs.first().ok_or_else(|| "no client certificate".to_string()).and_then(|c| identity(c)))
}

/// Reads a revocation file: one hex serial per line (colons allowed), `#` starts a comment.
///
/// # Errors
///
/// An unreadable file or a line that is not hex.
pub fn read_revoked(path: &Path) -> Result<std::collections::BTreeSet<String>, TlsError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    let mut serials = std::collections::BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let hex: String = line.chars().filter(|c| *c != ':').collect::<String>().to_lowercase();
        if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(file_error(path, format!("line {}: {line:?} is not a hex serial", n + 1)));
        }
        let trimmed = hex.trim_start_matches('0');
        serials.insert(if trimmed.is_empty() { "0".into() } else { trimmed.to_string() });
    }
    Ok(serials)
}

/// Web PKI verification against the deployment CA, then the revocation file.
#[derive(Debug)]
struct Verifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Option<PathBuf>,
}

impl ClientCertVerifier for Verifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if let Some(path) = &self.revoked {
            let (_, cert) = x509_parser::parse_x509_certificate(end_entity).map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
            })?;
            let serial = serial_hex(cert.raw_serial());
            match read_revoked(path) {
                Ok(revoked) if revoked.contains(&serial) => {
                    tracing::warn!(%serial, "refused a revoked certificate");
                    return Err(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::Revoked,
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    // Fail closed: without the list nobody can be shown not to be revoked.
                    tracing::error!(error = %e, "cannot read the revocation file; refusing the handshake");
                    return Err(rustls::Error::General("revocation list unavailable".into()));
                }
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A rustls server config: TLS 1.3 only, ring, client certificates from `files.ca` required,
/// revoked serials refused, ALPN h2.
///
/// # Errors
///
/// Unreadable or invalid files (a revocation file that is named must exist).
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.ca).map_err(|e| file_error(&files.ca, e))? {
        roots
            .add(ca.map_err(|e| file_error(&files.ca, e))?)
            .map_err(|e| file_error(&files.ca, e))?;
    }
    if let Some(revoked) = &files.revoked {
        read_revoked(revoked)?;
    }
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(Verifier { inner, revoked: files.revoked.clone() });
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_error(&files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&files.cert, e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Bounds on accepted connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections at once; more are closed at accept.
    pub max_connections: usize,
    /// Time a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
}

/// A connection that holds one of the listener's connection permits while it is open.
#[derive(Debug)]
pub struct Limited<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: Connected> Connected for Limited<T> {
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts connections on `listener` until `cancel`: sets `TCP_NODELAY` (without it every
/// small message waits for Nagle's delay), holds a permit per open connection, and completes
/// each TLS handshake on its own task within the handshake timeout, so a slow or silent client
/// never blocks the others.
pub fn incoming<IO, F, Fut>(
    listener: TcpListener,
    limits: ConnLimits,
    cancel: CancellationToken,
    handshake: F,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Limited<IO>>>
where
    IO: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let handshake = Arc::new(handshake);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                () = tx.closed() => break,
                a = listener.accept() => a,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::warn!(%addr, max = limits.max_connections, "connection limit reached; closing a new connection");
                continue;
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY");
            }
            let (tx, handshake) = (tx.clone(), handshake.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, handshake(tcp)).await {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(Limited { inner: io, _permit: permit })).await;
                    }
                    Ok(Err(e)) => tracing::info!(%addr, error = %e, "handshake refused"),
                    Err(_) => tracing::info!(%addr, "handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_files_parse_hex_serials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.txt");
        std::fs::write(&path, "# revoked\n0A:1b\n\n  ff00  # lost laptop\n").unwrap();
        let set = read_revoked(&path).unwrap();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec!["a1b".to_string(), "ff00".into()]);
        std::fs::write(&path, "zz\n").unwrap();
        assert!(read_revoked(&path).unwrap_err().to_string().contains("line 1"));
    }

    #[test]
    fn identities_come_from_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            crate::pki::ephemeral(dir.path(), &["store-a"], &[("ann", Role::Auditor)]).unwrap();
        let read = |path: PathBuf| {
            let der = CertificateDer::from_pem_file(path).unwrap();
            identity(&der).unwrap()
        };
        let store = read(pki.store("store-a").0);
        assert_eq!((store.name.as_str(), store.role), ("store-a", Role::Store));
        let admin = read(pki.admin("ann").0);
        assert_eq!((admin.name.as_str(), admin.role), ("ann", Role::Auditor));
        assert_ne!(store.serial, admin.serial);
        let issued = std::fs::read_to_string(pki.issued_log()).unwrap();
        assert!(issued.contains(&store.serial), "the log names the serial the handshake sees");
    }
}
