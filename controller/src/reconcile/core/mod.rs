//! The reconcile core: manifests + enrolments + state → signed configs to publish.
//!
//! [`Controller`] is free of I/O except through its [`Store`] (the embedded database) and the
//! [`Secrets`] it is given; MQTT, files and sockets belong to the adapters (`standalone`). Every
//! method takes the current time and returns the messages to publish, so it is tested without a
//! broker or a clock.
//!
//! Reconcile is level-triggered: for each node, compute the inputs' fingerprint; if it equals the
//! one last published, nothing is rendered. Otherwise render, hash the body, and publish a new
//! revision only if the body changed (or the signature is due for renewal).

mod dryrun;
mod enrol;
mod keys;
mod messages;
mod plan;
mod staged;
mod state;
mod status;

pub use enrol::{Approval, pending_reason};
pub use plan::{build_config, build_config_with, config_body};
pub use staged::RolloutAction;
pub use state::{Controller, CoreError, NODE_MESSAGE_CAP};
