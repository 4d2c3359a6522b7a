//! Untrusted bytes off the broker: framing, signature, header, body hash, expectations, body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sidenet_wire::fuzzing::envelope_raw(data);
});
