//! The CA bundle an agent pins for an `mqtts://` broker.

/// A CA bundle (PEM text) for an `mqtts://` broker, and where it came from (for messages).
#[derive(Clone)]
pub struct BrokerCa {
    /// Where it came from, e.g. `--ca /etc/sidenet/ca.pem` or `brokerCa in --config FILE`.
    pub origin: String,
    /// PEM text: one or more certificates.
    pub pem: Vec<u8>,
}

impl std::fmt::Debug for BrokerCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCa")
            .field("origin", &self.origin)
            .field("bytes", &self.pem.len())
            .finish()
    }
}
