//! Per-core TLS client configuration for STARTTLS (RFC 3207).
//!
//! Every session is TLS 1.2 or 1.3 with an AEAD cipher suite, whatever the
//! policy mode. The ring provider is restricted to the suites in
//! [`AEAD_CIPHER_SUITES`], so a server that offers only CBC suites, RC4 or
//! TLS 1.0/1.1 fails the handshake.

use std::cell::Cell;
use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The only cipher suites offered: AES-GCM and ChaCha20-Poly1305, with
/// ECDHE key exchange for TLS 1.2.
pub const AEAD_CIPHER_SUITES: &[rustls::SupportedCipherSuite] = &[
    ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ring::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// Sessions kept per core for resumption. Each entry is a few hundred bytes.
const SESSION_CACHE_ENTRIES: usize = 1024;

/// Errors while building the per-core TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("failed to read the extra CA file {path}: {source}")]
    CaFileRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the extra CA file {path} contains no PEM certificate")]
    CaFileEmpty { path: PathBuf },
    #[error("certificate in {path} was rejected as a trust anchor: {source}")]
    CaFileInvalid {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("rustls rejected the protocol versions or cipher suites: {0}")]
    Config(rustls::Error),
}

/// The TLS client state of one core: a configuration for `verified` mode and
/// one for the unverified modes, sharing one session cache.
///
/// Sharing the cache is safe because rustls 0.23 resumes a session only under
/// the verifier that established it, so a session from an unverified
/// handshake is never resumed by the verified configuration.
pub struct TlsContext {
    verified: Arc<ClientConfig>,
    unverified: Arc<ClientConfig>,
    full_handshakes: Cell<u64>,
    resumed_handshakes: Cell<u64>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("full_handshakes", &self.full_handshakes.get())
            .field("resumed_handshakes", &self.resumed_handshakes.get())
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// Builds the configurations of one core. Trust anchors for `verified`
    /// mode are the system store plus the certificates in `extra_ca_file`.
    pub fn new(
        extra_ca_file: Option<&Path>,
        session_resumption: bool,
    ) -> Result<TlsContext, TlsSetupError> {
        let provider = Arc::new(aead_only_provider());
        let resumption = if session_resumption {
            Resumption::store(Arc::new(ClientSessionMemoryCache::new(
                SESSION_CACHE_ENTRIES,
            )))
        } else {
            Resumption::disabled()
        };

        let roots = load_roots(extra_ca_file)?;
        let mut verified = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsSetupError::Config)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        verified.resumption = resumption.clone();

        let verifier = Arc::new(AnyCertificate {
            algorithms: provider.signature_verification_algorithms,
        });
        let mut unverified = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsSetupError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        unverified.resumption = resumption;

        Ok(TlsContext {
            verified: Arc::new(verified),
            unverified: Arc::new(unverified),
            full_handshakes: Cell::new(0),
            resumed_handshakes: Cell::new(0),
        })
    }

    /// Returns the number of full and of resumed handshakes on this core.
    pub fn handshake_counts(&self) -> (u64, u64) {
        (self.full_handshakes.get(), self.resumed_handshakes.get())
    }

    pub(crate) fn config(&self, verify: bool) -> Arc<ClientConfig> {
        if verify {
            self.verified.clone()
        } else {
            self.unverified.clone()
        }
    }

    pub(crate) fn count_handshake(&self, resumed: bool) {
        let counter = if resumed {
            &self.resumed_handshakes
        } else {
            &self.full_handshakes
        };
        counter.set(counter.get().saturating_add(1));
    }
}

/// Builds the ring provider restricted to [`AEAD_CIPHER_SUITES`].
///
/// rustls 0.23.48 deprecates the ring provider because it lacks the
/// post-quantum X25519MLKEM768 group. The workspace builds rustls with ring
/// only, so this provider is kept, with its classical key exchange groups.
#[allow(deprecated)]
fn aead_only_provider() -> CryptoProvider {
    let mut provider = ring::default_provider();
    provider.cipher_suites = AEAD_CIPHER_SUITES.to_vec();
    provider
}

fn load_roots(extra_ca_file: Option<&Path>) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "tls: failed to load part of the system trust store");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(added, ignored, "tls: system trust store loaded");
    }

    if let Some(path) = extra_ca_file {
        let read_error = |source| TlsSetupError::CaFileRead {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let mut found = 0usize;
        for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
            let cert = cert.map_err(read_error)?;
            roots
                .add(cert)
                .map_err(|source| TlsSetupError::CaFileInvalid {
                    path: path.to_path_buf(),
                    source,
                })?;
            found += 1;
        }
        if found == 0 {
            return Err(TlsSetupError::CaFileEmpty {
                path: path.to_path_buf(),
            });
        }
    }

    if roots.is_empty() {
        // Not fatal: the unverified modes need no anchors. Every `verified`
        // handshake fails until anchors are configured.
        tracing::warn!(
            "tls: no trust anchors found; verified delivery will fail until the system store or tls.ca_file provides some"
        );
    }
    Ok(roots)
}

/// A verifier for the `opportunistic` and `required` modes: it accepts any
/// certificate, but still checks that the server signed the handshake with
/// the key of the certificate it presented, so the session keys are bound to
/// that certificate.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
