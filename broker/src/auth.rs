//! The access-control hook: who may connect, publish to a topic, subscribe to a filter.

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong password: CONNACK return code 4.
    BadCredentials,
    /// Known, but not allowed to connect (for example with this client id): CONNACK code 5.
    NotAuthorized,
}

impl Refusal {
    /// The CONNACK return code of MQTT 3.1.1.
    pub fn connack_code(self) -> u8 {
        match self {
            Refusal::BadCredentials => 4,
            Refusal::NotAuthorized => 5,
        }
    }
}

/// Limits of one client's outgoing queue (messages the broker holds for it while its socket is
/// busy). Beyond either limit, QoS 0 messages for it are dropped and a QoS 1 message disconnects
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Messages.
    pub messages: usize,
    /// Topic + payload bytes.
    pub bytes: usize,
}

/// Decides who may connect and what each connection may publish and subscribe to.
///
/// Every method runs on the connection's task, in line with the packet: keep them fast and
/// non-blocking (look up an in-memory table; refresh it elsewhere).
pub trait Authorizer: Send + Sync + 'static {
    /// What the broker remembers about an accepted connection (a user name and role, ...).
    type Principal: Send + Sync + 'static;

    /// Called on CONNECT, after the broker's own client-id checks.
    fn connect(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Self::Principal, Refusal>;

    /// May this connection publish to `topic` (also checked for its will when it fires)? A
    /// refused publish is acknowledged as usual and dropped: MQTT 3.1.1 cannot say no.
    fn may_publish(&self, who: &Self::Principal, topic: &str) -> bool;

    /// May this connection subscribe to `filter`? Refused filters get SUBACK code 0x80.
    fn may_subscribe(&self, who: &Self::Principal, filter: &str) -> bool;

    /// Outgoing queue limits for this connection; `None` uses the broker's configuration
    /// (give a controller that receives every node's reports a bigger queue than a node).
    fn queue_limits(&self, _who: &Self::Principal) -> Option<QueueLimits> {
        None
    }
}

/// Lets every client connect, publish and subscribe (the client-id checks of
/// [`crate::Config::strict_client_ids`] still apply).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    type Principal = ();

    fn connect(&self, _: &str, _: Option<&str>, _: Option<&[u8]>) -> Result<(), Refusal> {
        Ok(())
    }

    fn may_publish(&self, _: &(), _: &str) -> bool {
        true
    }

    fn may_subscribe(&self, _: &(), _: &str) -> bool {
        true
    }
}
