//! The process's open-file limit and the connection cap derived from it.
//!
//! Every client socket is an open file. A broker embedded in a larger process (the sidenet
//! controller) shares that process's open-file limit with everything else the process opens:
//! manifests, its database, an admin socket. A broker allowed as many connections as the limit
//! lets a flood of TCP connects take the last descriptors, and the host process then cannot
//! open a file. So the host raises the soft limit to the hard limit at start
//! ([`raise_open_files`]) and caps the broker's connections below it, keeping a reserve
//! ([`connection_cap`], [`Config::max_connections`](crate::Config::max_connections)).

use std::io;

/// Open files kept for the host process on top of those open when the cap is computed: files
/// and sockets it opens later (manifest reads, database, admin connections, its own MQTT
/// client, outgoing SSH or HTTP connections).
pub const RESERVED_FILES: u64 = 256;

/// The open-file limit (`RLIMIT_NOFILE`) before and after [`raise_open_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// Soft limit found at start.
    pub before: u64,
    /// Soft limit now in force.
    pub soft: u64,
    /// Hard limit (`u64::MAX` for unlimited).
    pub hard: u64,
}

impl OpenFiles {
    /// Whether the soft limit was raised.
    pub fn raised(&self) -> bool {
        self.soft > self.before
    }
}

/// Raises the soft open-file limit of this process to its hard limit. An unlimited hard limit
/// means the kernel's per-process maximum (`/proc/sys/fs/nr_open` on Linux; 1,048,576 if that
/// cannot be read). Fails only if the limit cannot be read; if raising fails, the limit stays
/// as it was (see [`OpenFiles::raised`]).
pub fn raise_open_files() -> io::Result<OpenFiles> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    let target = if hard == rlimit::INFINITY {
        kernel_max_open()
    } else {
        hard
    };
    if soft >= target {
        return Ok(OpenFiles {
            before: soft,
            soft,
            hard,
        });
    }
    let now = match rlimit::Resource::NOFILE.set(target, hard) {
        Ok(()) => target,
        Err(_) => soft,
    };
    Ok(OpenFiles {
        before: soft,
        soft: now,
        hard,
    })
}

fn kernel_max_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// Files this process has open now (entries of `/proc/self/fd`), or `None` where that cannot be
/// read.
pub fn open_files_now() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    // The directory handle being read is one of the entries.
    Some((n as u64).saturating_sub(1))
}

/// The connections a broker may hold: `requested`, or fewer if the soft limit `soft_limit`
/// minus the files already open (`open_now`) minus [`RESERVED_FILES`] is smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCap {
    /// Connections asked for.
    pub requested: usize,
    /// Connections allowed: at most `requested`, at most `soft_limit - open_now - RESERVED_FILES`.
    pub allowed: usize,
    /// The soft open-file limit it was computed from.
    pub soft_limit: u64,
    /// Files open when it was computed.
    pub open_now: u64,
}

impl ConnectionCap {
    /// Whether fewer connections than requested are allowed.
    pub fn clamped(&self) -> bool {
        self.allowed < self.requested
    }
}

/// The cap for `requested` connections under `soft_limit` with `open_now` files open. `Err`
/// with the room there is (0) when the limit leaves no connection at all.
pub fn connection_cap(
    requested: usize,
    soft_limit: u64,
    open_now: u64,
) -> Result<ConnectionCap, ConnectionCap> {
    let room = soft_limit
        .saturating_sub(open_now)
        .saturating_sub(RESERVED_FILES);
    let allowed = usize::try_from(room).unwrap_or(usize::MAX).min(requested);
    let cap = ConnectionCap {
        requested,
        allowed,
        soft_limit,
        open_now,
    };
    if allowed == 0 { Err(cap) } else { Ok(cap) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cap_keeps_the_reserve_and_the_open_files() {
        let c = connection_cap(20_000, 1024, 20).unwrap();
        assert_eq!(c.allowed, 1024 - 20 - 256);
        assert!(c.clamped());
        let c = connection_cap(20_000, 1 << 20, 20).unwrap();
        assert_eq!(c.allowed, 20_000);
        assert!(!c.clamped());
        let c = connection_cap(100, 1024, 20).unwrap();
        assert_eq!(c.allowed, 100);
        assert_eq!(connection_cap(100, 250, 3).unwrap_err().allowed, 0);
        assert_eq!(connection_cap(100, 276, 20).unwrap_err().allowed, 0);
        assert_eq!(connection_cap(100, 277, 20).unwrap().allowed, 1);
        assert_eq!(connection_cap(0, 1 << 20, 20).unwrap_err().allowed, 0);
    }

    #[test]
    fn soft_limit_is_raised_to_the_hard_limit() {
        let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
        let low = hard.min(512);
        rlimit::Resource::NOFILE.set(low, hard).unwrap();
        let f = raise_open_files().unwrap();
        assert_eq!(f.before, low);
        let want = if hard == rlimit::INFINITY {
            kernel_max_open()
        } else {
            hard
        };
        assert_eq!((f.soft, f.hard), (want, hard));
        assert_eq!(rlimit::Resource::NOFILE.get().unwrap(), (want, hard));
        assert_eq!(f.raised(), want > low);
        // Already there: nothing changes.
        let again = raise_open_files().unwrap();
        assert_eq!((again.before, again.soft), (want, want));
        assert!(!again.raised());
        assert!(open_files_now().unwrap() >= 3);
    }
}
