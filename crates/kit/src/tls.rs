//! TLS on every server's port (SPEC G1): a certificate chain and key from PEM files, reloaded
//! when the files change (a renewed certificate takes effect without a restart: cert-manager
//! and Kubernetes Secrets replace the files in place), ALPN for HTTP/2 and HTTP/1.1.
//!
//! A connection's first byte tells TLS (a handshake record, 0x16) from plaintext h2c or
//! HTTP/1.1, so one port serves both: callers inside the cluster (and the kubelet's gRPC probes)
//! may keep plaintext while clients outside use TLS; `--tls-only` refuses plaintext but from
//! loopback (the process's own roles, a sidecar in the pod). Calls to other roles go over TLS
//! with `--peers-tls-ca` ([`PeerTls`]).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The first byte of a TLS handshake record.
const HANDSHAKE: u8 = 0x16;

/// TLS settings (every process).
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "TLS")]
pub struct TlsArgs {
    /// PEM certificate chain (the server's certificate first) to serve TLS with, beside
    /// plaintext on the same port; reloaded when the file changes.
    #[arg(long = "tls-cert", value_name = "FILE", env = "CRM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long = "tls-key", value_name = "FILE", env = "CRM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Refuse connections that do not start TLS, but from loopback (by default both are served
    /// on one port). Callers in other pods must then use TLS: other roles with --peers-tls-ca,
    /// Kubernetes probes as exec or TCP probes.
    #[arg(long = "tls-only", env = "CRM_TLS_ONLY", requires = "tls_cert")]
    pub tls_only: bool,
    /// How often the certificate and key files are checked for a change.
    #[arg(
        long = "tls-reload-interval",
        value_name = "DURATION",
        env = "CRM_TLS_RELOAD_INTERVAL",
        default_value = "30s",
        value_parser = crate::config::parse_duration
    )]
    pub tls_reload_interval: Duration,
    /// Call the other roles over TLS, trusting the CA certificates in this PEM file; each
    /// replica's certificate must name the host given in its --<role>-addr.
    #[arg(long = "peers-tls-ca", value_name = "FILE", env = "CRM_PEERS_TLS_CA")]
    pub peers_tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS a server serves, loaded and checked; `None` without a certificate.
    pub fn tls(&self) -> Result<Option<Tls>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                if self.tls_reload_interval < Duration::from_millis(10) {
                    return Err("--tls-reload-interval must be at least 10ms".into());
                }
                Tls::load(cert, key, self.tls_only, self.tls_reload_interval).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The TLS of calls to other roles; `None`: plaintext.
    pub fn peers(&self) -> Result<Option<PeerTls>, String> {
        self.peers_tls_ca.as_deref().map(PeerTls::load).transpose()
    }
}

/// A server's TLS: the current certificate (swapped on reload) and whether plaintext is served
/// too. Clones share the certificate.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    certificate: Arc<Reloading>,
    only: bool,
    reload_every: Duration,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cert", &self.certificate.cert).field("only", &self.only).finish_non_exhaustive()
    }
}

impl Tls {
    /// TLS with the chain in `cert` and the key in `key` (PEM), checked to belong together.
    pub fn load(cert: &Path, key: &Path, only: bool, reload_every: Duration) -> Result<Tls, String> {
        let loaded = load_pair(cert, key)?;
        let certificate = Arc::new(Reloading {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(loaded)),
            stamp: Mutex::new(stamp(cert, key)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Ok(Tls { acceptor, certificate, only, reload_every })
    }

    /// Whether plaintext connections are refused.
    pub fn only(&self) -> bool {
        self.only
    }

    /// Checks the files every reload interval until `stop` resolves; a changed pair that loads
    /// replaces the served one (connections made before keep theirs), one that does not is
    /// logged and the old one kept.
    pub async fn watch(&self, stop: impl std::future::Future<Output = ()>) {
        let watching = async {
            loop {
                tokio::time::sleep(self.reload_every).await;
                self.certificate.reload_if_changed();
            }
        };
        tokio::select! {
            () = watching => {}
            () = stop => {}
        }
    }

    /// Completes the TLS handshake of an accepted connection.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<Conn> {
        Ok(Conn::Tls(Box::new(self.acceptor.accept(stream).await?)))
    }

    /// Whether a connection whose first byte is `first` starts TLS.
    pub fn starts_tls(first: u8) -> bool {
        first == HANDSHAKE
    }
}

/// The cryptography of every TLS connection: ring's provider (the one already in the build),
/// classical key exchange only, which rustls now marks as lacking post-quantum groups;
/// aws-lc-rs would add them at the cost of a C toolchain build.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS for calls to other roles: their certificates verified against given authorities, each
/// replica by the host name it was configured with (`--<role>-addr`).
#[derive(Clone)]
pub struct PeerTls {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Trusting the CA certificates in the PEM file `ca`.
    pub fn load(ca: &Path) -> Result<PeerTls, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("--peers-tls-ca {}: {e}", ca.display()))? {
            let cert = cert.map_err(|e| format!("--peers-tls-ca {}: {e}", ca.display()))?;
            roots.add(cert).map_err(|e| format!("--peers-tls-ca {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("--peers-tls-ca {}: no certificate in the file", ca.display()));
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(PeerTls { connector: tokio_rustls::TlsConnector::from(Arc::new(config)) })
    }

    /// Starts TLS on a connection to the replica named `host` (a DNS name or an IP address).
    pub async fn connect(
        &self,
        host: &str,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))?;
        self.connector.connect(name, stream).await
    }
}

/// Reads a certificate chain and its key, checked to belong together.
fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("--tls-cert {}: no certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("--tls-key {} does not belong to --tls-cert {}: {e}", key.display(), cert.display()))?;
    Ok(certified)
}

/// When the files last changed (`None` for a file that cannot be read now).
fn stamp(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (modified(cert), modified(key))
}

/// The served certificate, replaced when its files change.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' modification times when last loaded (or tried).
    stamp: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl Reloading {
    fn reload_if_changed(&self) {
        let now = stamp(&self.cert, &self.key);
        {
            // Several servers of one process may share the certificate: one reloads it.
            let mut last = self.stamp.lock().unwrap_or_else(PoisonError::into_inner);
            if *last == now || now.0.is_none() || now.1.is_none() {
                return;
            }
            *last = now;
        }
        match load_pair(&self.cert, &self.key) {
            Ok(loaded) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            // Half-written files (the certificate replaced, the key not yet): the next change
            // tries again; until then the old pair serves.
            Err(error) => tracing::warn!(%error, "TLS certificate not reloaded; the previous one is served"),
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// An accepted connection: plaintext, or TLS over TCP.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(stream) => stream.connect_info(),
            Conn::Tls(stream) => stream.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_that_are_not_a_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let err = Tls::load(&cert, &key, false, Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("--tls-cert") && err.contains("no certificate"), "{err}");
        let missing = Tls::load(&dir.path().join("nope.pem"), &key, false, Duration::from_secs(1)).unwrap_err();
        assert!(missing.contains("nope.pem"), "{missing}");
        assert!(Tls::starts_tls(0x16) && !Tls::starts_tls(b'P'));
    }
}
