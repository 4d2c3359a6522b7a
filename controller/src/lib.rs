//! sidenet controller: turns manifests into one signed config per node and publishes them.
//!
//! # Layout, and the layer rule
//!
//! The modules form layers. A module may use modules of its own folder and of lower layers,
//! never of a higher layer, and two units of the same layer never use each other: imports run
//! one way, so there are no loops between files. `controller/tests/layers.rs` checks this on
//! every `use crate::…` and `crate::…` path of the sources, and the table below is the rule it
//! reads ([`LAYERS`]).
//!
//! 0. base: [`time`] (Unix time, RFC 3339 through jiff), [`random`] (randomness from the OS).
//! 1. [`spec`]: what the admin wrote. [`spec::manifest`] loads and validates `Mesh`, `MeshNode`,
//!    `HardwareProfile`, `NodeProvision` and `Secret` manifests ([`spec::loader`] reads the
//!    folder within limits, [`spec::parse`] checks each document against the JSON Schema from
//!    the CRD types, [`spec::checks`] the set as a whole); [`spec::regdb`] the regulatory checks of channels, widths, DFS and tx power
//!    (wireless-regdb);
//!    [`spec::ipam`] one /64 per node out of the mesh /48; [`spec::policy`] rate windows,
//!    allow/deny rules and policy tests (`docs/policies.md`); [`spec::openwrt`] the rules of a
//!    guest on an OpenWrt household router (`sidenet_*` sections only, the radio rule).
//! 2. [`reconcile`]: the pure reconcile core, no I/O but its state store. [`reconcile::model`]
//!    (the types the layer shares), [`reconcile::credentials`] (per-node broker passwords),
//!    [`reconcile::store`] (the state and its embedded database), [`reconcile::render`]
//!    (templates × hardware profiles → files), [`reconcile::peers`] (WireGuard neighbours),
//!    [`reconcile::health`] (acknowledgements, withheld revisions, link metrics),
//!    [`reconcile::topology`] (the mesh as a graph: the map, NetJSON), [`reconcile::alto`]
//!    (that graph as an ALTO service, RFC 7285: directory, network map, cost maps) and
//!    [`reconcile::core`] (enrolment, approval, revisions, signing, status).
//! 3. [`transport`]: what both adapters need to reach the broker: [`transport::inbox`] (the
//!    bounded queue between MQTT and the engine), [`transport::broker`] (the embedded broker),
//!    [`transport::acl`] (its topic rules and credentials), [`transport::dynsec`] (the same on
//!    Mosquitto), [`transport::tls`] (TLS to an external broker).
//! 4. [`admin`]: the admin protocol `sidenetctl` speaks to a running controller; [`web`]: the
//!    HTTP service of both modes (the mesh map, NetJSON, ALTO, `/metrics`, probes; docs/web.md).
//! 5. [`provisioning`]: running `NodeProvision` manifests (standalone mode).
//! 6. The two adapters, side by side: [`standalone`] (folder watch, embedded broker, MQTT,
//!    admin socket) and [`kubernetes`] (kube-runtime controllers, status, Secrets, Lease,
//!    metrics).
//! 7. [`cli`] (output, completions and default paths of the two programs), [`clusterctl`]
//!    (`sidenetctl --kubeconfig`: the admin commands against a cluster), [`selfcheck`] (the
//!    `check` subcommand the chart's `helm test` runs) and `fuzzing`
//!    (hidden: the fuzz targets' bodies, shared with the corpus replay tests).

/// The layer of each top-level module or folder of this crate, lowest first (see the crate
/// docs). `controller/tests/layers.rs` reads this table.
pub const LAYERS: &[(&str, u8)] = &[
    ("time", 0),
    ("random", 0),
    ("spec", 1),
    ("reconcile", 2),
    ("transport", 3),
    ("admin", 4),
    ("web", 4),
    ("provisioning", 5),
    ("standalone", 6),
    ("kubernetes", 6),
    ("cli", 7),
    ("clusterctl", 7),
    ("fuzzing", 7),
    ("selfcheck", 7),
];

pub mod admin;
pub mod cli;
pub mod clusterctl;
#[doc(hidden)]
pub mod fuzzing;
pub mod kubernetes;
pub mod provisioning;
pub mod random;
pub mod reconcile;
pub mod selfcheck;
pub mod spec;
pub mod standalone;
pub mod time;
pub mod transport;
pub mod web;

pub use time::{now, parse_rfc3339, rfc3339};
