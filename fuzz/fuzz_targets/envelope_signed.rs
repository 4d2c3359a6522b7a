//! Structure-aware: header and body are signed inside the target with a fixed test key, so the
//! header and body parsers behind the signature check are reached.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sidenet_wire::fuzzing::envelope_signed(data);
});
