//! TLS listeners: the server settings from a certificate chain and a private key (PEM files),
//! rustls with the ring provider. The handshake runs in each connection's own task, bounded by
//! [`crate::Config::tls_handshake_timeout`], so a client that opens a socket and sends nothing
//! holds only its own task.

use std::path::Path;
use std::sync::Arc;

pub use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Server settings for `cert` (PEM: the server certificate first, then any intermediates) and
/// `key` (PEM: PKCS#8, PKCS#1 or SEC1 private key). Errors name the file and what is wrong.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let cert_pem =
        std::fs::read(cert).map_err(|e| format!("{}: cannot read: {e}", cert.display()))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("{}: cannot read: {e}", key.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: no usable PEM private key in it: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "{} and {}: the key does not fit the certificate or is not supported: {e}",
                cert.display(),
                key.display()
            )
        })?;
    Ok(Arc::new(config))
}
