//! The controller fixture shared by the controller targets: built once per process.

use std::cell::RefCell;
use std::path::Path;

use sidenet_controller::fuzzing::Fixture;

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

/// Runs `f` on the process's fixture (built on first use from the repository).
pub fn with_fixture(f: impl FnOnce(&mut Fixture)) {
    FIXTURE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            match Fixture::new(&repo) {
                Ok(x) => *cell = Some(x),
                Err(e) => {
                    eprintln!("cannot build the controller fixture: {e}");
                    std::process::exit(2);
                }
            }
        }
        if let Some(x) = cell.as_mut() {
            f(x);
        }
    });
}
