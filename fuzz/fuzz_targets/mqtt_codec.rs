//! Bytes a client sends to the embedded MQTT broker: incremental decoding, re-encoding, and the
//! subscription and retained indexes built from what decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sidenet_broker::fuzzing::mqtt_codec(data);
});
