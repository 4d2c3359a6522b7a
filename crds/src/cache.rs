//! The neighbourhood web cache (issue 22, `docs/content.md`): what a Mesh, a HardwareProfile and
//! a MeshNode say about it.
//!
//! A node runs the cache (Squid) when its Mesh enables it (`spec.cache.enabled`), its hardware
//! profile gives it storage (`spec.cache` of the HardwareProfile) and its MeshNode does not turn
//! it off (`spec.cache.enabled: false`). Its siblings are its side-net neighbours that run it too.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default largest object the cache keeps, MiB.
pub const DEFAULT_MAX_OBJECT_MB: u32 = 64;
/// Default memory the cache keeps hot objects in, MiB.
pub const DEFAULT_CACHE_MEMORY_MB: u32 = 16;

/// The mesh's neighbourhood web cache (`spec.cache` of a Mesh).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshCache {
    /// Run a web cache (Squid) on every node whose hardware profile gives it storage and whose
    /// MeshNode does not turn it off. Each cache asks its side-net neighbours' caches (its
    /// siblings) before it fetches a page, and serves them only what it already has.
    #[serde(default)]
    pub enabled: bool,
    /// Cache only public content on every node (a MeshNode may set it for itself): a request
    /// that carries a cookie or credentials (`Cookie`, `Authorization`) is never stored, never
    /// answered from the cache and never asked of a sibling, and a response that sets a cookie
    /// is never stored. Default false: Squid's own rules (private and authenticated responses
    /// are not shared).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public_only: bool,
    /// The largest object a cache keeps, in MiB (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_object_mb: Option<u32>,
}

/// The storage a device may give the cache (`spec.cache` of a HardwareProfile). A device without
/// it never runs the cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheStorage {
    /// Disk space for cached objects, in MiB (Squid's `cache_dir` size). 0: the cache keeps
    /// objects in memory only.
    #[schemars(range(max = 1048576))]
    pub disk_mb: u32,
    /// Memory for hot objects, in MiB (Squid's `cache_mem`, default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub memory_mb: Option<u32>,
    /// The folder of the cache on the device: an absolute path of letters, digits and `._-/`
    /// (default `/var/spool/sidenet-squid`). On a router, a folder on a USB disk (e.g.
    /// `/mnt/sda1/sidenet-squid`): on OpenWrt `/tmp` is memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 200))]
    pub dir: Option<String>,
}

/// A node's cache settings (`spec.cache` of a MeshNode).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCache {
    /// `false`: this node runs no cache and is no neighbour's sibling, whatever the Mesh says.
    /// Default true (the node runs the cache when its Mesh enables it and its profile gives it
    /// storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Cache only public content on this node (see the Mesh's `spec.cache.publicOnly`); when
    /// omitted, the Mesh's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_only: Option<bool>,
    /// The node's own addresses on the household LAN, with their prefix length (e.g.
    /// `192.168.1.1/24`, `fd12:3456:789a::1/64`): the cache listens on each address, and
    /// devices in those subnets may use it. Without any, the cache listens on the side-net
    /// only and serves its siblings alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lan: Vec<String>,
}
