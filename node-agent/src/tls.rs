//! TLS to the broker (`mqtts://`), pinned to a CA bundle: the broker's certificate must chain to
//! one of the certificates the agent was given (`--ca FILE` or `brokerCa` in the bootstrap
//! config). The system's roots are never consulted, so a certificate from any other CA — public
//! or private — is refused. The host name in the broker URL must match the certificate
//! (DNS name or IP address), as usual. rustls with the ring provider; TLS 1.2 and 1.3.
//!
//! Built only with the cargo feature `tls`.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::ca::BrokerCa;

/// The trust store of `ca`: every certificate in its PEM text. Errors name where the bundle
/// came from and what is wrong with it.
pub fn roots(ca: &BrokerCa) -> Result<rustls::RootCertStore, String> {
    let origin = &ca.origin;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&ca.pem).enumerate() {
        let cert = cert.map_err(|e| format!("{origin}: not a PEM certificate bundle: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{origin}: certificate {} is not usable as a CA: {e}", i + 1))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{origin}: no certificate in it (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")"
        ));
    }
    Ok(roots)
}

/// The agent holds no TLS private key (no client certificates: it logs in to the broker with a
/// password), so its provider loads none. Without ring's key loading the RSA and ECDSA signing
/// code is left out of the binary.
#[derive(Debug)]
struct NoKeys;

impl rustls::crypto::KeyProvider for NoKeys {
    fn load_private_key(
        &self,
        _: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        Err(rustls::Error::General(
            "the agent uses no TLS client key".into(),
        ))
    }
}

/// The rustls client settings for a broker whose certificate must chain to `ca`.
pub fn client_config(ca: &BrokerCa) -> Result<rumqttc::TlsConfiguration, String> {
    let roots = roots(ca)?;
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        key_provider: &NoKeys,
        ..rustls::crypto::ring::default_provider()
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ca(pem: &str) -> BrokerCa {
        BrokerCa {
            origin: "--ca /x/ca.pem".into(),
            pem: pem.as_bytes().to_vec(),
        }
    }

    #[test]
    fn bad_bundles_are_refused_with_the_file_named() {
        let e = roots(&ca("")).unwrap_err();
        assert!(e.starts_with("--ca /x/ca.pem: no certificate"), "{e}");
        // A private key alone is no CA.
        let key =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        let e = roots(&ca(key)).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        // Base64 that is not DER.
        let junk = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let e = roots(&ca(junk)).unwrap_err();
        assert!(e.starts_with("--ca /x/ca.pem: certificate 1"), "{e}");
        // Broken base64.
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = roots(&ca(broken)).unwrap_err();
        assert!(e.starts_with("--ca /x/ca.pem: not a PEM"), "{e}");
    }
}
