//! Manifest YAML text (up to four files, NUL-separated) to a validated ManifestSet or errors
//! naming file and field; a valid set is then handed to a fixture controller as a reload would.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod fixture;

fuzz_target!(|data: &[u8]| {
    fixture::with_fixture(|f| {
        let _ = f.manifest_load(data);
    });
});
