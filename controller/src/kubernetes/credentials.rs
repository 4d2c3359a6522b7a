//! Where node broker credentials go: the embedded broker's credential book, Mosquitto's
//! dynamic security plugin, or nowhere.

use rumqttc::{AsyncClient, QoS};
use serde_json::Value;

use crate::reconcile::core::Controller;
use crate::spec::manifest::network_name;

/// Where node broker credentials go: the embedded broker's [`crate::transport::acl::CredentialBook`], or
/// nowhere when an external broker is used without a user store the controller drives.
pub trait BrokerCredentials: Send + Sync {
    /// Applies credential changes from the core ([`Controller::take_credentials`]).
    fn apply(&self, changes: &[crate::reconcile::credentials::Credential]) -> Result<(), String>;

    /// The controller (re)connected to the broker: bring the broker's user store up to date.
    fn on_connected(&self, _ctl: &mut Controller) -> Result<(), String> {
        Ok(())
    }

    /// An answer of the broker's user store.
    fn on_response(&self, _payload: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// Revokes the credentials of node `node` of mesh `mesh` (network name). Idempotent.
    fn revoke(&self, mesh: &str, node: &str) -> Result<(), String> {
        self.apply(&[crate::reconcile::credentials::Credential::Revoke {
            mesh: mesh.to_string(),
            node: node.to_string(),
        }])
    }
}

/// An external broker whose users the controller does not manage: nothing to do.
#[derive(Debug, Default)]
pub struct NoBrokerCredentials;

impl BrokerCredentials for NoBrokerCredentials {
    fn apply(&self, _changes: &[crate::reconcile::credentials::Credential]) -> Result<(), String> {
        Ok(())
    }
}

/// Node credentials on an external Mosquitto, through its dynamic security plugin
/// ([`crate::transport::dynsec`]), over the controller's own MQTT connection.
pub struct DynsecCredentials {
    /// The controller's connection.
    pub mqtt: AsyncClient,
    /// The controller's broker user (given the controller role at setup).
    pub user: String,
}

impl DynsecCredentials {
    fn send(&self, commands: Vec<Value>) -> Result<(), String> {
        for payload in crate::transport::dynsec::messages(commands, 200) {
            self.mqtt
                .try_publish(
                    crate::transport::dynsec::CONTROL_TOPIC,
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .map_err(|e| format!("dynamic security command: {e}"))?;
        }
        Ok(())
    }
}

impl BrokerCredentials for DynsecCredentials {
    fn apply(&self, changes: &[crate::reconcile::credentials::Credential]) -> Result<(), String> {
        self.send(crate::transport::dynsec::commands(changes))
    }

    fn on_connected(&self, ctl: &mut Controller) -> Result<(), String> {
        let meshes: Vec<String> = ctl
            .set
            .meshes
            .values()
            .map(|m| network_name(m).to_string())
            .collect();
        self.mqtt
            .try_subscribe(crate::transport::dynsec::RESPONSE_TOPIC, QoS::AtLeastOnce)
            .map_err(|e| format!("subscribe: {e}"))?;
        let mut cmds = crate::transport::dynsec::setup(&self.user, &meshes);
        cmds.extend(crate::transport::dynsec::commands(
            &ctl.credential_snapshot(),
        ));
        self.send(cmds)
    }

    fn on_response(&self, payload: &[u8]) -> Result<(), String> {
        match crate::transport::dynsec::controller_role_missing(payload, &self.user) {
            Some(cmd) => {
                tracing::info!(
                    "giving broker user {} the sidenet-controller role (Mosquitto reconnects it)",
                    self.user
                );
                self.send(vec![cmd])
            }
            None => Ok(()),
        }
    }
}

impl BrokerCredentials for crate::transport::acl::CredentialBook {
    fn apply(&self, changes: &[crate::reconcile::credentials::Credential]) -> Result<(), String> {
        crate::transport::acl::CredentialBook::apply(self, changes);
        Ok(())
    }
}
