//! OpenWrt routers: sidenet is a guest on someone's household router.
//!
//! What the controller renders for an OpenWrt node touches only sidenet's own `sidenet_*` UCI
//! sections (templates/openwrt, one sidenet batch per package: docs/dataplane.md, "A guest on
//! the household router"). This module holds the rules that follow from that and that the
//! controller checks or applies before rendering:
//!
//! - **The radio rule.** sidenet never writes a `wifi-device` section: the mesh point is a
//!   `wifi-iface` on the owner's radio and shares its channel, width and country with the owner's
//!   access point. The wireless batch states with `require` lines what the radio must be set to
//!   (switched on, the Mesh's band, channel, a mode of the Mesh's width, the Mesh's country), and
//!   the agent refuses a config whose requirements the owner's radio does not meet, before it
//!   changes anything. Hence a MeshNode on an OpenWrt profile may not ask for a transmit power
//!   (OpenWrt keeps it on the radio) nor for a channel other than the Mesh's ([`check_node`]):
//!   the owner's radio would have to be moved off the channel every other node meets on.
//! - **Interface names.** netifd names a WireGuard device after its network section, and a Linux
//!   interface name has at most 15 characters: each neighbour's link is `sidenet_` and 7
//!   characters of its node id ([`crate::reconcile::peers::name_openwrt_ifaces`]), used alike by the network, firewall and babeld
//!   batches and by the probe plan (through which the agent maps babel neighbours to node ids).
//! - **Quoting.** Every free-text value (names that nodes report) goes through [`uci_quote`].
//!
//! What sidenet needs from a HardwareProfile on OpenWrt is its radios (name as OpenWrt's `wifi
//! config` names them, bands, channels, modes), its board names and CPU: never its ethernet
//! ports, which stay the owner's (DSA or swconfig alike).

use sidenet_crds::{Band, FirmwareFamily, HardwareProfile, Mesh, MeshNode};

/// The prefix of every UCI section sidenet owns.
pub const PREFIX: &str = "sidenet_";
/// Longest Linux interface name (IFNAMSIZ - 1).
pub const IFNAMSIZ: usize = 15;

/// A value in single quotes as uci writes it (`'` becomes `'\''`); control characters (a
/// newline would start a new batch line) become spaces.
pub fn uci_quote(value: &str) -> String {
    let clean: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("'{}'", clean.replace('\'', "'\\''"))
}

/// The width in MHz of an OpenWrt `htmode` (`VHT80` → 80), `None` for `NOHT` and the unknown.
pub fn htmode_width(htmode: &str) -> Option<u32> {
    let digits: String = htmode.chars().filter(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The modes of `supported` (a radio's `htmodes`) that run `band` at `width` MHz: what the
/// owner's radio may be set to for the mesh point to share it.
pub fn htmodes_for(band: Band, width: u32, supported: &[String]) -> Vec<String> {
    supported
        .iter()
        .filter(|m| htmode_width(m) == Some(width))
        .filter(|m| {
            let family = m.trim_end_matches(|c: char| c.is_ascii_digit());
            match family {
                "HT" => matches!(band, Band::TwoG | Band::FiveG),
                "VHT" => band == Band::FiveG,
                "HE" | "EHT" => true,
                _ => false,
            }
        })
        .cloned()
        .collect()
}

/// The radio rule for a MeshNode (see the module docs): problems as (field, message).
pub fn check_node(
    mesh: &Mesh,
    profile: &HardwareProfile,
    node: &MeshNode,
) -> Vec<(&'static str, String)> {
    radio_rule(
        mesh,
        profile,
        node.spec.overrides.channel,
        node.spec.overrides.tx_power,
    )
}

/// The radio rule for a node of `mesh` on `profile` with these overrides (empty unless the
/// profile runs OpenWrt): problems as (MeshNode field, message).
pub fn radio_rule(
    mesh: &Mesh,
    profile: &HardwareProfile,
    channel: Option<u32>,
    tx_power: Option<u32>,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if profile.spec.firmware != FirmwareFamily::Openwrt {
        return out;
    }
    let pname = profile.metadata.name.clone().unwrap_or_default();
    let band = mesh.spec.radio.mesh_band;
    let radio = profile
        .spec
        .mesh_radio(band)
        .map(|r| r.name.clone())
        .unwrap_or_else(|| "the mesh radio".into());
    let mesh_name = mesh.metadata.name.clone().unwrap_or_default();
    if tx_power.is_some() {
        out.push((
            "spec.overrides.txPower",
            format!(
                "HardwareProfile/{pname} runs OpenWrt, where the mesh point shares {radio} with the router owner's access point and sidenet never changes the owner's radio (its wifi-device section), which is where OpenWrt keeps the transmit power; leave txPower out (the owner sets it on the radio)"
            ),
        ));
    }
    if let (Some(ch), Some(mesh_ch)) = (
        channel,
        mesh.spec.radio.channels.get(band).map(|c| c.channel),
    ) && ch != mesh_ch
    {
        out.push((
            "spec.overrides.channel",
            format!(
                "HardwareProfile/{pname} runs OpenWrt, where the mesh point runs on the channel of the owner's radio {radio}, which sidenet never changes; every node of Mesh/{mesh_name} meets on channel {mesh_ch} (spec.radio.channels.{}), so this node's radio would have to leave it and would reach none of them: leave the override out and have the owner set {radio} to channel {mesh_ch}",
                band.as_str()
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_as_uci_does_and_keeps_one_line() {
        assert_eq!(uci_quote("kitchen"), "'kitchen'");
        assert_eq!(uci_quote("it's"), "'it'\\''s'");
        assert_eq!(
            uci_quote("a\nset network.lan.proto=x"),
            "'a set network.lan.proto=x'"
        );
    }

    #[test]
    fn modes_of_a_width() {
        let all: Vec<String> = [
            "HT20", "HT40", "VHT20", "VHT40", "VHT80", "HE20", "HE80", "HE160",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(htmodes_for(Band::FiveG, 80, &all), ["VHT80", "HE80"]);
        assert_eq!(htmodes_for(Band::TwoG, 20, &all), ["HT20", "HE20"]);
        assert_eq!(htmode_width("NOHT"), None);
    }
}
