//! A certificate authority generated at test time.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::net::other_error;

/// A throwaway CA. Its certificate goes into the engine's `tls.ca_file` and
/// into swaks' `--tls-ca-path`, and it signs the certificates of Postfix and of
/// the scripted receiver.
pub struct TestCa {
    certificate: rcgen::Certificate,
    key_pair: KeyPair,
}

impl TestCa {
    /// Generates a new CA key and self-signed certificate.
    pub fn new() -> io::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Caduceus test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key_pair = KeyPair::generate().map_err(rcgen_error)?;
        let certificate = params.self_signed(&key_pair).map_err(rcgen_error)?;
        Ok(TestCa {
            certificate,
            key_pair,
        })
    }

    /// Returns the CA certificate in PEM.
    pub fn ca_pem(&self) -> String {
        self.certificate.pem()
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses) and
    /// returns `(cert_pem, key_pem)`.
    ///
    /// # Panics
    ///
    /// Panics when a name is neither a valid DNS name nor an IP address, which
    /// is a mistake in the test, not a runtime condition.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let (certificate, key_pair) = self.issue_certificate(names);
        (certificate.pem(), key_pair.serialize_pem())
    }

    /// Writes the CA certificate to `dir/ca.pem` and returns the path.
    pub fn write_ca(&self, dir: &Path) -> io::Result<PathBuf> {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca_pem())?;
        Ok(path)
    }

    /// Issues a certificate for `names` and writes it to `dir/<stem>.crt` and
    /// the key to `dir/<stem>.key`, returning both paths.
    pub fn write_issued(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
    ) -> io::Result<(PathBuf, PathBuf)> {
        let (cert_pem, key_pem) = self.issue(names);
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert_pem)?;
        std::fs::write(&key_path, key_pem)?;
        Ok((cert_path, key_path))
    }

    /// Builds a rustls server configuration with a certificate for `names`
    /// chained to this CA, for the scripted receiver's STARTTLS.
    pub fn server_config(&self, names: &[&str]) -> io::Result<Arc<rustls::ServerConfig>> {
        let (certificate, key_pair) = self.issue_certificate(names);
        let chain = vec![
            certificate.der().clone(),
            CertificateDer::from(self.certificate.der().to_vec()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        // The workspace builds rustls with ring only. rustls 0.23.48 deprecates
        // ring's provider because it lacks post-quantum key exchange, which a
        // loopback test peer does not need.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| other_error(format!("rustls protocol versions: {error}")))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|error| other_error(format!("rustls server certificate: {error}")))?;
        Ok(Arc::new(config))
    }

    fn issue_certificate(&self, names: &[&str]) -> (rcgen::Certificate, KeyPair) {
        let owned: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let mut params = CertificateParams::new(owned)
            .unwrap_or_else(|error| panic!("invalid certificate names {names:?}: {error}"));
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // Key generation and signing fail only when the crypto provider is
        // broken, which no test can recover from.
        let key_pair = KeyPair::generate().expect("ECDSA P-256 key generation failed");
        let certificate = params
            .signed_by(&key_pair, &self.certificate, &self.key_pair)
            .expect("signing a certificate with the test CA failed");
        (certificate, key_pair)
    }
}

fn rcgen_error(error: rcgen::Error) -> io::Error {
    other_error(format!("test CA generation failed: {error}"))
}
