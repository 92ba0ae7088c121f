//! One endpoint's HTTP client.
//!
//! The webhook worker is a plain blocking thread, not a glommio executor,
//! so it uses ureq, a maintained blocking HTTP/1.1 client with rustls for
//! `https`, rather than hyper, which would need an async runtime on this
//! thread. ureq is set to follow no redirect and to ignore the proxy
//! environment variables, so events go only to the configured URL.

use std::io::Read;
use std::time::Duration;

use ring::hmac;

/// The signature header: `sha256=` and the lowercase hex HMAC-SHA-256 of
/// the request body under the endpoint's secret.
pub const SIGNATURE_HEADER: &str = "X-Caduceus-Signature";

/// The maximum response body bytes read, so that the connection can be
/// reused; the body's content is ignored.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

/// The key that signs one endpoint's request bodies.
#[derive(Clone)]
pub struct WebhookSecret(hmac::Key);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    pub fn new(secret: &[u8]) -> WebhookSecret {
        WebhookSecret(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// Computes the value of [`SIGNATURE_HEADER`] for `body`.
    pub fn signature(&self, body: &[u8]) -> String {
        format!("sha256={}", hex::encode(hmac::sign(&self.0, body).as_ref()))
    }
}

/// The reason a batch was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The endpoint responded with a status other than 2xx.
    #[error("the endpoint answered HTTP {0}")]
    Status(u16),
    /// No response: connect, TLS, timeout or protocol failure.
    #[error("request failed: {0}")]
    Transport(#[from] ureq::Error),
}

pub struct Sender {
    agent: ureq::Agent,
    url: String,
    secret: WebhookSecret,
}

impl Sender {
    pub fn new(url: &str, secret: WebhookSecret, timeout: Duration) -> Sender {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_global(Some(timeout))
            .user_agent(concat!("caduceus/", env!("CARGO_PKG_VERSION")))
            .build();
        Sender {
            agent: config.into(),
            url: url.to_string(),
            secret,
        }
    }

    /// POSTs one batch body. `Ok` means the endpoint responded with 2xx, which
    /// acknowledges every event in the body.
    pub fn post(&self, body: &[u8]) -> Result<(), SendError> {
        let mut response = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header(SIGNATURE_HEADER, self.secret.signature(body))
            .send(body)?;
        let status = response.status().as_u16();
        // Draining a short body lets ureq reuse the connection. A failure
        // here changes nothing, because the status already arrived.
        let mut sink = Vec::new();
        let _ = response
            .body_mut()
            .as_reader()
            .take(MAX_RESPONSE_BYTES)
            .read_to_end(&mut sink);
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(SendError::Status(status))
        }
    }
}
