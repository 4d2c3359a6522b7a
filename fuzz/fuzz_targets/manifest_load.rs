//! Manifest YAML text (up to four files, NUL-separated) to a validated ManifestSet or errors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sidenet_controller::fuzzing::manifest_load(data);
});
