//! A STARTTLS configuration for the receiver with a freshly generated
//! self-signed certificate, for the demo and the benchmarks. The engine's
//! default `opportunistic` mode does not verify certificates, so the sender
//! accepts it.

use std::io;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::ServerSessionMemoryCache;

/// Server-side sessions kept for stateful resumption (TLS 1.2 session ids).
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Builds a server configuration for `hostname` with a new self-signed
/// certificate. With `session_tickets`, the server issues stateless TLS 1.3
/// tickets (RFC 8446 §4.6.1) and TLS 1.2 tickets (RFC 5077), so a client can
/// resume. Without it, the server neither issues tickets nor caches
/// sessions, so every handshake is a full one.
pub fn self_signed_config(hostname: &str, session_tickets: bool) -> io::Result<Arc<ServerConfig>> {
    let generated =
        rcgen::generate_simple_self_signed(vec![hostname.to_string()]).map_err(io::Error::other)?;
    let cert = CertificateDer::from(generated.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.key_pair.serialize_der()));
    // rustls 0.23.48 deprecates the ring provider for lacking post-quantum
    // key exchange; the workspace builds rustls with ring only.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(io::Error::other)?;
    if session_tickets {
        #[allow(deprecated)]
        let ticketer = rustls::crypto::ring::Ticketer::new().map_err(io::Error::other)?;
        config.ticketer = ticketer;
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
        config.send_tls13_tickets = 2;
    } else {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}
