//! TLS on the listener (rustls): a PEM certificate chain and key, swapped when the files change
//! without dropping a connection, and optional client certificates verified against
//! `tls.client_ca`, whose subject common name names an identity. And TLS towards one remote
//! server ([`UpstreamTls`]): its own CAs, a client certificate, or (for development only) no
//! verification, with the HTTP client made from them.
//!
//! Invariants: a connection keeps the configuration it was accepted with (a swap affects only
//! new connections); an unreadable or mismatched new certificate leaves the old one in force;
//! the subject of a verified client certificate reaches the request path only through
//! [`ClientSubject`], set by the acceptor after verification (never from a client header). A
//! server's `tls:` that cannot be loaded is a config error, never a fallback to the default
//! trust; a client key is held only inside the HTTP client built from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// Where the listener's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to (None: no client certs).
    pub client_ca: Option<PathBuf>,
}

/// Marks a request that arrived over TLS.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Https;

/// The subject common name of a verified client certificate.
#[derive(Debug, Clone)]
pub(crate) struct ClientSubject(pub String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Why the listener's TLS configuration cannot be built: the operator's files are at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A PEM file that cannot be read or parsed.
    #[error("tls.{field} {}: {source}", path.display())]
    Pem {
        /// `cert`, `key` or `client_ca`.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What rustls' PEM reader said.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file with no certificate in it.
    #[error("tls.cert {}: no certificate in the file", .0.display())]
    NoCertificate(PathBuf),
    /// A client CA certificate or verifier that rustls refuses.
    #[error("tls.client_ca {}: {reason}", path.display())]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The certificate and key do not make a configuration (mismatched, unsupported).
    #[error("tls: {0}")]
    Config(#[from] rustls::Error),
}

/// Builds a rustls server configuration from the files.
pub(crate) fn server_config(s: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    fn pem<'a>(field: &'static str, path: &'a Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError + 'a {
        move |source| TlsError::Pem { field, path: path.to_owned(), source }
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&s.cert)
        .map_err(pem("cert", &s.cert))?
        .collect::<Result<_, _>>()
        .map_err(pem("cert", &s.cert))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(s.cert.clone()));
    }
    let key = PrivateKeyDer::from_pem_file(&s.key).map_err(pem("key", &s.key))?;
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &s.client_ca {
        Some(ca) => {
            let refused = |e: &dyn std::fmt::Display| TlsError::ClientCa { path: ca.clone(), reason: e.to_string() };
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(pem("client_ca", ca))? {
                let c = c.map_err(pem("client_ca", ca))?;
                roots.add(c).map_err(|e| refused(&e))?;
            }
            // Client certificates are optional: a request without one authenticates otherwise.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| refused(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The live TLS configuration, reloaded when its files change.
pub(crate) struct Tls {
    current: ArcSwap<ServerConfig>,
    settings: TlsSettings,
}

fn stamp(p: &Path) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

impl Tls {
    /// Loads the files (an error names the file).
    pub(crate) fn load(settings: TlsSettings) -> Result<Arc<Tls>, TlsError> {
        let config = server_config(&settings)?;
        Ok(Arc::new(Tls { current: ArcSwap::new(config), settings }))
    }

    /// Polls the files every second and swaps in a new configuration when they change and load,
    /// then calls `reloaded`.
    pub(crate) fn watch(self: &Arc<Self>, stop: CancellationToken, reloaded: impl Fn() + Send + 'static) {
        let this = self.clone();
        tokio::spawn(async move {
            let files = |s: &TlsSettings| {
                [Some(&s.cert), Some(&s.key), s.client_ca.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|p| stamp(p))
                    .collect::<Vec<_>>()
            };
            let mut last = files(&this.settings);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let now = files(&this.settings);
                if now == last || now.iter().any(Option::is_none) {
                    continue;
                }
                match server_config(&this.settings) {
                    Ok(c) => {
                        this.current.store(c);
                        last = now;
                        tracing::info!("TLS certificate reloaded");
                        reloaded();
                    }
                    // Mid-write, or a bad pair: keep serving the old one and try again.
                    Err(e) => tracing::warn!("TLS certificate not reloaded: {e}"),
                }
            }
        });
    }
}

impl Tls {
    /// Completes the TLS handshake of an accepted connection (10 s at most): the stream and the
    /// subject CN of the client certificate, if one was presented. None when the handshake
    /// fails, which concerns that client only.
    pub(crate) async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> Option<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Option<String>)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        let stream = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await.ok()?.ok()?;
        let subject = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| subject_cn(c));
        Some((stream, subject))
    }
}

/// The subject common name of a DER certificate (a minimal walk of the X.509 structure).
pub(crate) fn subject_cn(cert: &[u8]) -> Option<String> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)?;
        let (len, header) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | usize::from(*b.get(2 + i)?);
            }
            (len, 2 + n)
        };
        let body = b.get(header..header.checked_add(len)?)?;
        Some((tag, body, &b[header + len..]))
    }
    let (_, cert_body, _) = tlv(cert)?; // Certificate
    let (_, tbs, _) = tlv(cert_body)?; // TBSCertificate
    let mut rest = tbs;
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let (tag, body, next) = tlv(rest)?;
        fields.push((tag, body));
        rest = next;
    }
    // [0] version is optional; then serial, signature, issuer, validity, subject.
    let skip = usize::from(fields.first()?.0 == 0xa0);
    let subject = fields.get(skip + 4)?.1;
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (_, set, next) = tlv(rdns)?;
        let (_, atv, _) = tlv(set)?;
        let (oid_tag, oid, value_rest) = tlv(atv)?;
        if oid_tag == 0x06 && oid == [0x55, 0x04, 0x03] {
            let (_, value, _) = tlv(value_rest)?;
            return String::from_utf8(value.to_vec()).ok();
        }
        rdns = next;
    }
    None
}

/// The builder every HTTP client towards remote servers starts from: no redirects (a redirect
/// could take headers meant for one server to another), a 5 s connect timeout.
pub(crate) fn http_client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).connect_timeout(Duration::from_secs(5))
}

/// TLS towards one remote server (`tls:` on a `url` server), and the HTTP client made from it.
/// Two are equal when they were made from the same files' contents (a reload that changes a file
/// reconnects the server).
#[derive(Clone)]
pub struct UpstreamTls {
    /// The PEM bundle of the CAs trusted for this server, in place of the system's roots.
    ca: Option<Vec<u8>>,
    /// A digest of the client certificate chain and key (the key itself lives only in `client`).
    identity: Option<[u8; 32]>,
    /// Certificate verification off.
    insecure_skip_verify: bool,
    /// The client built from these.
    pub(crate) client: reqwest::Client,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        (&self.ca, &self.identity, self.insecure_skip_verify)
            == (&other.ca, &other.identity, other.insecure_skip_verify)
    }
}

impl Eq for UpstreamTls {}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca", &self.ca.as_ref().map(|c| format!("{} bytes", c.len())))
            .field("client_certificate", &self.identity.is_some())
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

/// Why a server's `tls:` cannot be used: the operator's files are at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamTlsError {
    /// A file that cannot be read.
    #[error("{field} {}: {source}", path.display())]
    Read {
        /// `ca`, `cert` or `key`.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CA file with no certificate in it, or one that cannot be parsed.
    #[error("ca {}: no PEM certificate in the file", .0.display())]
    NoCa(PathBuf),
    /// A client certificate and key that do not make an identity.
    #[error("cert and key: {0}")]
    Identity(String),
    /// The HTTP client refused the settings.
    #[error("the HTTP client refuses these settings: {0}")]
    Client(reqwest::Error),
}

/// A CA bundle: its PEM and the certificates in it (at least one).
pub(crate) fn read_ca(path: &Path) -> Result<(Vec<u8>, Vec<reqwest::Certificate>), UpstreamTlsError> {
    let pem =
        std::fs::read(path).map_err(|source| UpstreamTlsError::Read { field: "ca", path: path.to_owned(), source })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| UpstreamTlsError::NoCa(path.to_owned()))?;
    Ok((pem, certs))
}

impl UpstreamTls {
    /// Loads the files and builds the client. `ca` replaces the system's roots for this server;
    /// `cert_key` is a PEM certificate chain and its PEM key (mTLS).
    pub(crate) fn load(
        ca: Option<&Path>,
        cert_key: Option<(&Path, &Path)>,
        insecure_skip_verify: bool,
    ) -> Result<UpstreamTls, UpstreamTlsError> {
        let read = |field: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| UpstreamTlsError::Read { field, path: path.to_owned(), source })
        };
        let mut builder = http_client_builder();
        let ca = match ca {
            Some(path) => {
                let (pem, certs) = read_ca(path)?;
                builder = builder.tls_certs_only(certs);
                Some(pem)
            }
            None => None,
        };
        let identity = match cert_key {
            Some((cert, key)) => {
                let mut pem = read("cert", cert)?;
                pem.push(b'\n');
                pem.extend(read("key", key)?);
                let digest = crate::credentials::digest(&String::from_utf8_lossy(&pem));
                let id = reqwest::Identity::from_pem(&pem).map_err(|e| UpstreamTlsError::Identity(e.to_string()))?;
                builder = builder.identity(id);
                Some(digest)
            }
            None => None,
        };
        if insecure_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        // The certificates parsed; what the builder can still refuse is a key that does not
        // belong to its certificate.
        let client = builder.build().map_err(|e| match identity {
            Some(_) => UpstreamTlsError::Identity(format!("{e} (does the key belong to the certificate?)")),
            None => UpstreamTlsError::Client(e),
        })?;
        Ok(UpstreamTls { ca, identity, insecure_skip_verify, client })
    }

    /// Whether certificate verification is off.
    pub(crate) fn insecure(&self) -> bool {
        self.insecure_skip_verify
    }

    /// What `portcullis check` says of it: `own CA, client certificate`, `NOT VERIFIED`, ….
    pub(crate) fn summary(&self) -> String {
        let mut parts = Vec::new();
        if self.ca.is_some() {
            parts.push("own CA");
        }
        if self.identity.is_some() {
            parts.push("client certificate");
        }
        if self.insecure_skip_verify {
            parts.push("certificate NOT VERIFIED");
        }
        parts.join(", ")
    }
}
