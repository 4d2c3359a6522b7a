//! sidenet fleet provisioning: installs the agent on stock routers and Linux hosts over SSH and
//! waits until they enrol. `sidenetctl provision` (an inventory file) and the controller (a
//! `NodeProvision` resource) share this one implementation.
//!
//! Per host: connect and check the host key against the pins (a changed key aborts the host;
//! unknown keys are pinned only when trust on first use is allowed), log in (first with the SSH
//! `none` method, which a factory-fresh OpenWrt router accepts for root, then with a key or
//! password given by reference), detect the board, match a hardware profile, install the
//! packages the rendered configs need with the host's package manager (refused, with the list,
//! when it has no package source), upload the agent for its architecture and verify it on the
//! device, write the bootstrap config (mesh, broker, pinned mesh key, token), the keep list that
//! carries the install through a firmware upgrade, and the service of the firmware family, start
//! it, and wait until the controller sees the node online with the installed agent version.
//! Re-running changes nothing on a provisioned host; an interrupted run leaves no half-installed
//! agent. `--remove` takes the agent off again.
//!
//! # Layout
//!
//! - [`plan`]: targets from an inventory file or a `NodeProvision`, and the run's settings.
//! - [`knownhosts`]: pinned SSH host keys (OpenSSH known_hosts format).
//! - [`ssh`]: connect, verify, log in, run scripts (`ssh2`, blocking).
//! - [`detect`]: the board probe and profile matching (pure).
//! - [`install`]: per-family install descriptors (`templates/FAMILY/install.yaml`) and the
//!   bootstrap config.
//! - [`packages`]: the packages the rendered configs need, checked and installed with the
//!   host's package manager (opkg, apk, apt).
//! - [`context`]: what a run shares ([`context::Context`]), the [`context::ControlPlane`] it
//!   asks about enrolment, and the per-host steps, outcomes and reports.
//! - [`session`]: a host's SSH session: login, detection, what is installed, packages, staging,
//!   waiting until the node is online.
//! - [`host`]: provisioning one host, start to end.
//! - [`fleet`]: all hosts, `spawn_blocking` under a semaphore, progress events.
//! - [`report`]: progress bars or lines, the final table, JSON, `NodeProvision` status.
//! - [`resource`]: controller mode: a `NodeProvision` in, its status out.
//! - [`remove`]: `sidenetctl provision --remove`: the agent taken off a host again.

pub mod context;
pub mod detect;
pub mod fleet;
pub mod host;
pub mod install;
pub mod knownhosts;
pub mod packages;
pub mod plan;
pub mod remove;
pub mod report;
pub mod resource;
pub mod session;
pub mod ssh;

pub use fleet::{Progress, Silent, provision, remove};
pub use host::{Context, ControlPlane, HostReport, NodeSeen, Outcome, Step};
pub use plan::{Inventory, Settings, Target, targets_from_resource};
