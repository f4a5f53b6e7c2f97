//! What one reading of one cgroup says: the type the meter hands to the ledger.

/// Which cgroup a sample belongs to: a tenant (container `None`) or one of its containers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MeterKey {
    /// The tenant id.
    pub tenant: String,
    /// The container id, or `None` for the tenant's whole subtree.
    pub container: Option<String>,
}

/// Counters read from one cgroup at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Cumulative CPU time in nanoseconds (v2 `cpu.stat` usage_usec × 1000, v1 `cpuacct.usage`).
    pub cpu_ns: u64,
    /// Memory working set in bytes: usage minus inactive file cache.
    pub memory_working_set: u64,
    /// Peak memory usage in bytes since the cgroup was created (0 when the kernel has no peak file).
    pub memory_peak: u64,
    /// Cumulative OOM kills in the cgroup.
    pub oom_kills: u64,
    /// Current number of tasks.
    pub pids: u64,
    /// The tenant's cumulative network bytes, from its host-side link. `None` when there was no
    /// reading: a container (containers share their tenant's network namespace), a tenant
    /// without a network, or a link that could not be read this time. `None` is not a reading
    /// of 0: the ledger counts nothing for it and keeps its baseline.
    pub net: Option<NetBytes>,
}

/// Cumulative byte counters of a tenant's network link, from the tenant's side: what it
/// received and what it sent. Counted at L2 on the host-side veth (Ethernet headers included),
/// so the tenant's `tx_bytes` is the host link's `rx_bytes` and the other way round. Both
/// restart at 0 when the link is created again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetBytes {
    /// Bytes the tenant received (the host link's `tx_bytes`).
    pub rx_bytes: u64,
    /// Bytes the tenant sent (the host link's `rx_bytes`).
    pub tx_bytes: u64,
}

/// One reading: a cgroup's counters at a wall-clock second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The cgroup.
    pub key: MeterKey,
    /// The wall-clock second the sample belongs to (Unix seconds).
    pub at_unix_s: u64,
    /// The counters read.
    pub counters: Counters,
    /// When they were read, ns since the Unix epoch: what a rate is computed over (the CRI's
    /// stats give it as their timestamp).
    pub read_at_ns: i64,
    /// True for the last reading of a cgroup that is about to be removed (container or tenant
    /// ended); the ledger closes its open window with it.
    pub last: bool,
}
