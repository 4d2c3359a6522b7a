//! TLS to an external `mqtts://` broker, for both adapters.

use std::sync::Arc;

/// The TLS client configuration for an `mqtts://` broker: the CA bundle at `ca` (PEM), or the
/// system roots without one. Errors name the option `option` (`SIDENET_BROKER_CA`,
/// `--broker-ca`).
pub fn client_config(
    ca: Option<&std::path::Path>,
    option: &str,
) -> Result<rumqttc::TlsConfiguration, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let err = |e: String| format!("{option} {}: {e}", path.display());
            let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| err(format!("not a PEM certificate bundle: {e}")))?;
                roots.add(cert).map_err(|e| err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(err("no certificate in the file".into()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(format!(
                    "mqtts:// broker: no system CA certificates found; set {option}"
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}
