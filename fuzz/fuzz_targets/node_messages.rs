//! Enrolment, status and presence messages through `Controller::on_message`, over a fixture
//! controller (one enrolled node, a token-mode mesh) that is reset after every input.
#![no_main]

use std::cell::RefCell;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sidenet_controller::fuzzing::NodeMessages;

thread_local! {
    static FIXTURE: RefCell<Option<NodeMessages>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    FIXTURE.with(|f| {
        let mut f = f.borrow_mut();
        if f.is_none() {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            match NodeMessages::new(&repo) {
                Ok(n) => *f = Some(n),
                Err(e) => {
                    eprintln!("cannot build the controller fixture: {e}");
                    std::process::exit(2);
                }
            }
        }
        if let Some(n) = f.as_mut() {
            let _ = n.run(data);
        }
    });
});
