//! Rendering node configs with minijinja.
//!
//! Templates live in one folder per firmware family (`templates/openwrt/`, `templates/linux/`),
//! each with a `files.yaml` that lists which template becomes which file, its mode and the
//! actions the agent runs after writing it. All templates are loaded and compiled at start-up;
//! undefined variables are errors (strict), nothing is auto-escaped.
//!
//! Precedence of settings, one order everywhere: hardware profile defaults, then the Mesh, then
//! the MeshNode's overrides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use sidenet_crds::{FirmwareFamily, HardwareProfile, Mesh, NodeRole, PolicyType};
use sidenet_wire::messages::FileSpec;

use crate::spec::manifest::network_name;
use crate::spec::regdb;

/// Rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A template folder or file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `files.yaml` is malformed.
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },
    /// A template does not compile or does not render.
    #[error("template {name}: {source:#}")]
    Template {
        name: String,
        #[source]
        source: minijinja::Error,
    },
    /// No template set for a firmware family.
    #[error("no templates for firmware family {0:?}")]
    NoFamily(String),
    /// The inputs cannot produce a config (no mesh radio, no mode for the width, ...).
    #[error("{0}")]
    Input(String),
}

/// One entry of a family's `files.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Template file name in the family folder.
    pub template: String,
    /// Destination, relative to the device root.
    pub path: String,
    /// Unix mode, decimal.
    pub mode: u32,
    /// Actions to run after writing.
    #[serde(default)]
    pub actions: Vec<String>,
    /// Left out of the config when it renders to nothing but whitespace (a file only some
    /// configs need, such as the second mesh point of a passphrase rotation).
    #[serde(default)]
    pub optional: bool,
}

/// All templates, compiled.
#[derive(Debug)]
pub struct Renderer {
    env: Environment<'static>,
    families: BTreeMap<String, Vec<FileEntry>>,
    /// Per family: the packages its configs need (`packages` of `FAMILY/install.yaml`).
    requires: BTreeMap<String, Vec<sidenet_wire::messages::Requirement>>,
    /// Per family: what configs with a shaping table need besides `requires`.
    shaping_requires: BTreeMap<String, Vec<sidenet_wire::messages::Requirement>>,
    /// SHA-256 over every template and index, so a template change re-renders everything.
    pub fingerprint: String,
}

impl Renderer {
    /// Loads every family folder under `dir`.
    pub fn load(dir: &Path) -> Result<Self, RenderError> {
        let io = |path: &Path, source| RenderError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()
            .map_err(|source| RenderError::Template {
                name: "(syntax)".into(),
                source,
            })?;
        env.set_syntax(syntax);
        // `{{ value | uci }}`: a value in uci's single quotes, on one line (OpenWrt batches).
        env.add_filter("uci", |v: String| crate::spec::openwrt::uci_quote(&v));
        let mut families = BTreeMap::new();
        let mut requires = BTreeMap::new();
        let mut shaping_requires = BTreeMap::new();
        let mut all = Vec::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for fam_dir in entries {
            let family = fam_dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let index_path = fam_dir.join("files.yaml");
            let index_text =
                std::fs::read_to_string(&index_path).map_err(|e| io(&index_path, e))?;
            all.extend_from_slice(index_text.as_bytes());
            let files: Vec<FileEntry> =
                sidenet_crds::yaml::from_str(&index_text).map_err(|e| RenderError::Index {
                    path: index_path.clone(),
                    message: e.to_string(),
                })?;
            for f in &files {
                let probe = FileSpec {
                    path: f.path.clone(),
                    mode: f.mode,
                    content: String::new(),
                };
                if !probe.path_is_safe() {
                    return Err(RenderError::Index {
                        path: index_path.clone(),
                        message: format!("path {:?} must be relative, without '..'", f.path),
                    });
                }
                let tpath = fam_dir.join(&f.template);
                let src = std::fs::read_to_string(&tpath).map_err(|e| io(&tpath, e))?;
                all.extend_from_slice(src.as_bytes());
                let name = format!("{family}/{}", f.template);
                env.add_template_owned(name.clone(), src)
                    .map_err(|source| RenderError::Template { name, source })?;
            }
            // What the agent checks before applying: the same list provisioning installs.
            let install = fam_dir.join(sidenet_provision::install::DESCRIPTOR);
            let packages = sidenet_provision::install::load_packages(&install).map_err(|e| {
                RenderError::Index {
                    path: install.clone(),
                    message: match e {
                        sidenet_provision::install::InstallError::Descriptor {
                            message, ..
                        } => message,
                        other => other.to_string(),
                    },
                }
            })?;
            if let Some(p) = packages {
                let reqs = p.requirements();
                all.extend_from_slice(&serde_json::to_vec(&reqs).unwrap_or_default());
                requires.insert(family.clone(), reqs);
                let shaping = p.shaping_requirements();
                all.extend_from_slice(&serde_json::to_vec(&shaping).unwrap_or_default());
                shaping_requires.insert(family.clone(), shaping);
            }
            families.insert(family, files);
        }
        Ok(Self {
            env,
            families,
            requires,
            shaping_requires,
            fingerprint: sidenet_wire::codec::sha256_hex(&all),
        })
    }

    /// The packages configs of `family` need (empty when its descriptor declares none).
    pub fn requirements(&self, family: &str) -> Vec<sidenet_wire::messages::Requirement> {
        self.requires.get(family).cloned().unwrap_or_default()
    }

    /// What configs of `family` with a policy shaping table need besides
    /// [`Self::requirements`] (`packages.shaping` of its install descriptor).
    pub fn shaping_requirements(&self, family: &str) -> Vec<sidenet_wire::messages::Requirement> {
        self.shaping_requires
            .get(family)
            .cloned()
            .unwrap_or_default()
    }

    /// Renders every file of `family` with `ctx`.
    pub fn render(&self, family: &str, ctx: &Context) -> Result<Vec<RenderedFile>, RenderError> {
        let files = self
            .families
            .get(family)
            .ok_or_else(|| RenderError::NoFamily(family.to_string()))?;
        // On OpenWrt each WireGuard link is named like the UCI sections sidenet owns.
        let adapted;
        let ctx = if family == FirmwareFamily::Openwrt.as_str() {
            let mut c = ctx.clone();
            crate::reconcile::peers::name_openwrt_ifaces(&mut c.dataplane.peers);
            adapted = c;
            &adapted
        } else {
            ctx
        };
        let value = minijinja::Value::from(minijinja::value::Serde(ctx));
        files
            .iter()
            .map(|f| {
                let name = format!("{family}/{}", f.template);
                let tmpl =
                    self.env
                        .get_template(&name)
                        .map_err(|source| RenderError::Template {
                            name: name.clone(),
                            source,
                        })?;
                let content = tmpl
                    .render(&value)
                    .map_err(|source| RenderError::Template { name, source })?;
                if f.optional && content.trim().is_empty() {
                    return Ok(None);
                }
                Ok(Some(RenderedFile {
                    file: FileSpec {
                        path: f.path.clone(),
                        mode: f.mode,
                        content,
                    },
                    actions: f.actions.clone(),
                }))
            })
            .filter_map(Result::transpose)
            .collect()
    }
}

/// A rendered file with the actions it triggers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// The file.
    pub file: FileSpec,
    /// Actions after writing it.
    pub actions: Vec<String>,
}

/// Everything templates can see.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Context {
    /// Mesh-wide settings.
    pub mesh: MeshCtx,
    /// This node.
    pub node: NodeCtx,
    /// The device.
    pub profile: ProfileCtx,
    /// The radio that carries the side-net.
    pub mesh_radio: RadioCtx,
    /// WireGuard neighbours, gateways and ports (see [`crate::reconcile::peers`]).
    pub dataplane: crate::reconcile::peers::Dataplane,
    /// The node's web cache, when it runs one (see [`crate::reconcile::cache`]).
    pub cache: Option<crate::reconcile::cache::CacheCtx>,
}

/// Mesh-wide settings as templates see them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MeshCtx {
    /// Mesh object name.
    pub name: String,
    /// Network name (802.11s mesh id).
    pub network_name: String,
    /// ULA /48.
    pub prefix: String,
    /// Country code.
    pub country: String,
    /// `babel` (the only routing protocol).
    pub routing: String,
    /// Babel hello interval, seconds.
    pub hello_interval: u32,
    /// SAE passphrase.
    pub passphrase: String,
    /// During a scheduled passphrase rotation's overlap, the next passphrase: templates bring
    /// up a second mesh point with it.
    pub passphrase_next: Option<String>,
    /// The node's budget for its own side-net egress, kbit/s: the smallest rate of the
    /// rateLimit policies without schedule, `toward` or `direction: ingress` and with scope own
    /// (the default) that apply to it ([`crate::spec::policy::compile::node_budget`]).
    pub rate_kbit: Option<u64>,
    /// Whether this node may forward side-net traffic to its uplink (an `allowInternet` policy
    /// names it): it is a gateway and announces a source-specific default route for the mesh
    /// prefix over babel (`docs/dataplane.md`, "Gateways that route").
    pub internet: bool,
    /// Whether the mesh has gateways (an `allowInternet` policy, and no `noInternet`): every
    /// node then accepts and relays the gateways' default route `::/0 from PREFIX`, and its
    /// agent lets the LAN use it when the node has no default route of its own. False for
    /// every mesh that did not opt in: nothing of it is rendered.
    pub internet_gateways: bool,
    /// The mesh's DNS zone, `MESH.sidenet.arpa` (`docs/dataplane.md`, "Names").
    pub dns_zone: String,
}

/// The node as templates see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeCtx {
    /// Node id.
    pub id: String,
    /// MeshNode name, else the node id.
    pub name: String,
    /// Hostname.
    pub hostname: String,
    /// Role.
    pub role: String,
    /// The node's /64.
    pub subnet: String,
    /// The node's address.
    pub address: String,
    /// Prefix length of `address`.
    pub prefix_len: u8,
    /// The internet uplink interfaces: `spec.overrides.uplinks`, else the profile's ethernet
    /// ports with role `wan` (the `linux` firewall forwards a gateway's side-net traffic only
    /// out of these).
    pub uplinks: Vec<String>,
}

/// The device as templates see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProfileCtx {
    /// Profile name.
    pub name: String,
    /// Vendor.
    pub vendor: String,
    /// Model.
    pub model: String,
    /// Firmware family.
    pub firmware: String,
    /// `uname -m`.
    pub cpu_arch: String,
}

/// A radio as templates see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RadioCtx {
    /// wifi-device name or Linux interface.
    pub name: String,
    /// OpenWrt device path.
    pub path: Option<String>,
    /// Linux phy.
    pub phy: Option<String>,
    /// Band.
    pub band: String,
    /// Channel.
    pub channel: u32,
    /// Width in MHz.
    pub width: u32,
    /// HT mode.
    pub htmode: String,
    /// Every mode of the radio for this band and width (on OpenWrt, what the owner's radio may
    /// be set to for the mesh point to share it).
    pub htmodes: Vec<String>,
    /// Transmit power in dBm, if set.
    pub tx_power: Option<u32>,
    /// Control frequency of `channel`, MHz.
    pub freq: u32,
    /// Centre frequency of the `width` block around `channel`, MHz (`iw`'s center1).
    pub center_freq: u32,
    /// Interface name to create for the mesh.
    pub iface: String,
    /// Interface name of the second mesh point during a passphrase rotation's overlap.
    pub iface_next: String,
}

/// Inputs for one node's context.
#[derive(Debug, Clone)]
pub struct NodeInputs<'a> {
    /// The mesh.
    pub mesh: &'a Mesh,
    /// The node's profile.
    pub profile: &'a HardwareProfile,
    /// Node id.
    pub id: &'a str,
    /// MeshNode name, if a manifest exists.
    pub name: Option<&'a str>,
    /// Hostname reported at enrolment.
    pub reported_hostname: Option<&'a str>,
    /// Role.
    pub role: NodeRole,
    /// Channel override.
    pub channel: Option<u32>,
    /// Tx power override.
    pub tx_power: Option<u32>,
    /// Hostname override.
    pub hostname: Option<&'a str>,
    /// Uplinks override (`spec.overrides.uplinks`); empty: the profile's `wan` ports.
    pub uplinks: &'a [String],
    /// Allocated subnet id.
    pub subnet_id: u16,
    /// Mesh passphrase.
    pub passphrase: &'a str,
    /// The next mesh passphrase, during a scheduled rotation's overlap.
    pub passphrase_next: Option<&'a str>,
    /// The MeshNode's labels (policies select nodes by them).
    pub labels: Option<&'a std::collections::BTreeMap<String, String>>,
}

fn sanitize_hostname(h: &str) -> Option<String> {
    let s: String = h
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let s = s.trim_matches('-').chars().take(63).collect::<String>();
    let s = s.trim_end_matches('-').to_string();
    (!s.is_empty()).then_some(s)
}

/// Builds the template context for one node (defaults → mesh → node overrides).
pub fn context(inp: &NodeInputs<'_>) -> Result<Context, RenderError> {
    let spec = &inp.mesh.spec;
    let base = crate::spec::manifest::parse_ula48(&spec.prefix).map_err(RenderError::Input)?;
    let band = spec.radio.mesh_band;
    let pname = inp.profile.metadata.name.clone().unwrap_or_default();
    let radio = inp.profile.spec.mesh_radio(band).ok_or_else(|| {
        RenderError::Input(format!(
            "HardwareProfile/{pname} has no 802.11s-capable radio on {}",
            band.as_str()
        ))
    })?;
    let chan =
        spec.radio.channels.get(band).ok_or_else(|| {
            RenderError::Input(format!("Mesh has no channel for {}", band.as_str()))
        })?;
    let channel = inp.channel.unwrap_or(chan.channel);
    if !radio.channels.contains(&channel) {
        return Err(RenderError::Input(format!(
            "channel {channel} is not supported by radio {} of HardwareProfile/{pname}",
            radio.name
        )));
    }
    let width = chan.width;
    let htmode = regdb::htmode(band, width, &radio.htmodes).ok_or_else(|| {
        RenderError::Input(format!(
            "radio {} of HardwareProfile/{pname} supports no mode for {width} MHz on {} (has {:?})",
            radio.name,
            band.as_str(),
            radio.htmodes
        ))
    })?;
    // The radio rule of OpenWrt routers (crate::spec::openwrt): the owner's radio is never changed.
    if let Some((field, message)) =
        crate::spec::openwrt::radio_rule(inp.mesh, inp.profile, inp.channel, inp.tx_power)
            .into_iter()
            .next()
    {
        return Err(RenderError::Input(format!(
            "MeshNode {}: {field}: {message}",
            inp.name.unwrap_or(inp.id)
        )));
    }
    let tx_power = inp.tx_power.map(|p| p.min(radio.max_tx_power));
    let mesh_radio = RadioCtx {
        name: radio.name.clone(),
        path: radio.path.clone(),
        phy: radio.phy.clone(),
        band: band.as_str().into(),
        channel,
        width,
        htmode,
        htmodes: crate::spec::openwrt::htmodes_for(band, width, &radio.htmodes),
        tx_power,
        freq: regdb::frequency_mhz(band, channel).unwrap_or(0),
        center_freq: regdb::block(band, channel, width).map_or(0, |b| b.center_mhz()),
        iface: "mesh0".into(),
        iface_next: "mesh1".into(),
    };
    let applies = |nodes: &[String]| {
        nodes.is_empty()
            || nodes
                .iter()
                .any(|n| n == inp.id || Some(n.as_str()) == inp.name)
    };
    let me = crate::spec::policy::eval::Member {
        id: inp.id.to_string(),
        name: inp.name.unwrap_or(inp.id).to_string(),
        labels: inp.labels.cloned().unwrap_or_default(),
    };
    let rate_kbit = crate::spec::policy::compile::node_budget(inp.mesh, &me);
    // Without the other nodes (a preview): only what this node's own policies say; the
    // reconciler replaces the data plane with one compiled against every node of the mesh.
    let mut dataplane = crate::reconcile::peers::Dataplane::for_node(inp.id);
    dataplane.policy = crate::spec::policy::compile::node_policy(
        inp.mesh,
        &[crate::spec::policy::compile::Located {
            member: me,
            subnet: format!("{}/64", crate::spec::ipam::subnet(base, inp.subnet_id)),
        }],
        inp.id,
    );
    let no_internet = |node_only: bool| {
        spec.policies
            .iter()
            .any(|p| p.type_ == PolicyType::NoInternet && (!node_only || applies(&p.nodes)))
    };
    let internet = spec
        .policies
        .iter()
        .any(|p| p.type_ == PolicyType::AllowInternet && applies(&p.nodes))
        && !no_internet(true);
    let internet_gateways = spec
        .policies
        .iter()
        .any(|p| p.type_ == PolicyType::AllowInternet)
        && !no_internet(false);
    let uplinks: Vec<String> = if inp.uplinks.is_empty() {
        inp.profile
            .spec
            .ethernet
            .iter()
            .filter(|p| p.role == sidenet_crds::PortRole::Wan)
            .map(|p| p.name.clone())
            .collect()
    } else {
        inp.uplinks.to_vec()
    };
    if internet
        && uplinks.is_empty()
        && inp.profile.spec.firmware == sidenet_crds::FirmwareFamily::Linux
    {
        return Err(RenderError::Input(format!(
            "an allowInternet policy makes node {} a gateway, but it has no uplink: \
             HardwareProfile/{pname} has no ethernet port with role wan and the MeshNode sets \
             no spec.overrides.uplinks",
            inp.name.unwrap_or(inp.id)
        )));
    }
    let hostname = inp
        .hostname
        .map(str::to_string)
        .or_else(|| inp.name.and_then(sanitize_hostname))
        .or_else(|| inp.reported_hostname.and_then(sanitize_hostname))
        .unwrap_or_else(|| format!("sn-{}", &inp.id[..inp.id.len().min(8)]));
    Ok(Context {
        mesh: MeshCtx {
            name: inp.mesh.metadata.name.clone().unwrap_or_default(),
            network_name: network_name(inp.mesh).to_string(),
            prefix: spec.prefix.clone(),
            country: spec.radio.country.clone(),
            routing: match spec.routing.protocol {
                sidenet_crds::RoutingProtocol::Babel => "babel".into(),
            },
            hello_interval: spec.routing.hello_interval,
            // The passphrase itself travels sealed to the node (`NodeConfig::sealed`); the agent
            // fills it in where the templates use it.
            passphrase: sidenet_wire::seal::placeholder(crate::reconcile::model::MESH_PASSPHRASE),
            passphrase_next: inp.passphrase_next.map(|_| {
                sidenet_wire::seal::placeholder(crate::reconcile::model::MESH_PASSPHRASE_NEXT)
            }),
            rate_kbit,
            internet,
            internet_gateways,
            dns_zone: crate::spec::names::zone(
                inp.mesh.metadata.name.as_deref().unwrap_or_default(),
            ),
        },
        node: NodeCtx {
            id: inp.id.to_string(),
            name: inp.name.unwrap_or(inp.id).to_string(),
            hostname,
            role: inp.role.as_str().into(),
            subnet: format!("{}/64", crate::spec::ipam::subnet(base, inp.subnet_id)),
            address: crate::spec::ipam::node_address(base, inp.subnet_id).to_string(),
            prefix_len: 64,
            uplinks,
        },
        profile: ProfileCtx {
            name: pname,
            vendor: inp.profile.spec.vendor.clone(),
            model: inp.profile.spec.model.clone(),
            firmware: inp.profile.spec.firmware.as_str().into(),
            cpu_arch: inp.profile.spec.cpu_arch.clone(),
        },
        mesh_radio,
        dataplane,
        cache: None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn repo_templates() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../templates")
    }

    #[test]
    fn every_config_carries_the_packages_of_its_family() {
        let r = Renderer::load(&repo_templates()).unwrap();
        let names =
            |f: &str| -> Vec<String> { r.requirements(f).into_iter().map(|q| q.package).collect() };
        assert_eq!(
            names("openwrt"),
            ["babeld", "wireguard-tools", "wpad-mesh-mbedtls", "iw"]
        );
        assert_eq!(
            names("linux"),
            [
                "iproute2",
                "nftables",
                "wpasupplicant",
                "iw",
                "wireguard-tools",
                "babeld"
            ]
        );
        let wpad = &r.requirements("openwrt")[2];
        assert_eq!(wpad.program, "wpa_supplicant");
        assert_eq!(wpad.args, ["-vmesh"]);
        assert!(r.requirements("files").is_empty());
    }

    #[test]
    fn a_package_change_re_renders_and_a_bad_list_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let copy = |from: &Path, to: &Path| {
            std::fs::create_dir_all(to).unwrap();
            for e in std::fs::read_dir(from).unwrap() {
                let p = e.unwrap().path();
                std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
            }
        };
        copy(&repo_templates().join("openwrt"), &d.path().join("openwrt"));
        let before = Renderer::load(d.path()).unwrap().fingerprint;
        let desc = d.path().join("openwrt/install.yaml");
        let text = std::fs::read_to_string(&desc).unwrap();
        std::fs::write(
            &desc,
            text.replace("package: iw, program: iw", "package: iw-full, program: iw"),
        )
        .unwrap();
        let after = Renderer::load(d.path()).unwrap();
        assert_ne!(after.fingerprint, before);
        assert_eq!(after.requirements("openwrt")[3].package, "iw-full");
        std::fs::write(
            &desc,
            text.replace("package: iw, program: iw", "package: iw, program: ../iw"),
        )
        .unwrap();
        let e = Renderer::load(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("openwrt/install.yaml: packages.require[3].program: \"../iw\" must be a program name or an absolute path"),
            "{e}"
        );
    }
}
