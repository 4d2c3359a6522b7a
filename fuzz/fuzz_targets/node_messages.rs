//! Enrolment, status and presence messages through `Controller::on_message`, over a fixture
//! controller (one enrolled node, a token-mode mesh) that is reset after every input.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod fixture;

fuzz_target!(|data: &[u8]| {
    fixture::with_fixture(|f| {
        let _ = f.node_message(data);
    });
});
