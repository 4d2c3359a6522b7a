//! Layer 3, what both adapters need to reach the broker: the bounded inbox between MQTT and
//! the engine, the embedded broker with its topic rules and credentials, Mosquitto's dynamic
//! security, and TLS to an external broker.

pub mod acl;
pub mod broker;
pub mod dynsec;
pub mod inbox;
pub mod tls;
