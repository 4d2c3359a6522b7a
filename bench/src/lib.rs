//! sidenet benchmarks and the fleet simulator.
//!
//! # Layout
//!
//! - [`fleet`]: N simulated agents in one process (real MQTT connections, keys, verification),
//!   used by the benchmarks (`src/main.rs`, `sidenet-bench`) and by the chaos tests
//!   (`tests/chaos.rs`).

pub mod fleet;
