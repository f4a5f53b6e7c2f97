//! Facts about this host for `NodeService`: name, kernel, capacity, cgroup layout.

use std::{path::Path, time::Instant};

use crate::cgroups::{CgroupLayout, detect_layout};

/// What the node reports about itself.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// Node name used in records.
    pub node: String,
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs.
    pub cpus: u32,
    /// `MemTotal` in bytes.
    pub memory_bytes: u64,
    /// The cgroup layout.
    pub cgroup_layout: CgroupLayout,
}

/// Reads the host's facts once at start-up.
pub fn probe(node: String) -> NodeFacts {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_memtotal(&t))
        .unwrap_or(0);
    let cgroup_layout = detect_layout(Path::new("/sys/fs/cgroup")).unwrap_or(CgroupLayout::None);
    NodeFacts {
        node,
        kernel,
        cpus,
        memory_bytes,
        cgroup_layout,
    }
}

/// `MemTotal:  24582940 kB` in bytes.
pub fn parse_memtotal(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// When the agent started, for uptime.
#[derive(Debug, Clone, Copy)]
pub struct StartedAt(pub Instant);

#[cfg(test)]
mod tests {
    #[test]
    fn memtotal() {
        assert_eq!(
            super::parse_memtotal("MemTotal:       1024 kB\nMemFree: 1 kB\n"),
            Some(1024 * 1024)
        );
        assert_eq!(super::parse_memtotal("nothing"), None);
    }
}
