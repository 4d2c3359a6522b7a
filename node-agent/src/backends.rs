//! The backend of each kind, constructed: the one place that knows every implementation of
//! [`Backend`] (the trait's module knows none of them).

use std::path::Path;

use crate::backend::{Backend, BackendError, DataplaneArgs, FilesBackend, Kind, Runner};
use crate::linux::Linux;
use crate::openwrt::Openwrt;
use crate::wgkey::WgKey;

/// Opens the backend of `kind` for a device rooted at `root`, with its runtime files under
/// `state/run`.
pub fn open(
    kind: Kind,
    args: &DataplaneArgs,
    root: &Path,
    state: &Path,
    runner: Box<dyn Runner>,
) -> Result<Box<dyn Backend>, BackendError> {
    match kind {
        Kind::Files => Ok(Box::new(FilesBackend)),
        Kind::Linux | Kind::Openwrt => {
            let key = WgKey::load_or_create(&state.join("wg.key")).map_err(BackendError)?;
            let run = state.join("run");
            std::fs::create_dir_all(&run)
                .map_err(|e| BackendError(format!("cannot create {}: {e}", run.display())))?;
            if kind == Kind::Linux {
                Ok(Box::new(Linux::new(root, &run, key, args, runner)))
            } else {
                Ok(Box::new(Openwrt::new(root, state, key, args, runner)))
            }
        }
    }
}
