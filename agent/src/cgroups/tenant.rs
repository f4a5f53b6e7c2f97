//! A tenant's cgroup subtree: `caas.slice/tenant-<id>/` in the unified hierarchy (v2), or the same
//! path in each v1 controller hierarchy, holding the tenant's quotas. Containers and the tenant's
//! engine are children of it, so the kernel enforces the tenant's total on all of them.
//!
//! Setting up happens once per tenant, so plain file writes suffice here; the per-second reads
//! live in the meter. Every path is built from a validated tenant id under a root path, so tests
//! run against fixture trees.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use super::CgroupLayout;

/// The default slice every tenant subtree lives in (config `tenants.cgroup_slice`).
pub const SLICE: &str = "caas.slice";
/// CFS period used for CPU quotas (100 ms, the kernel default).
pub const CFS_PERIOD_US: u64 = 100_000;
/// v1 hierarchies that carry a tenant's quotas (and its CPU accounting).
const V1_LIMITED: &[&str] = &["cpu", "cpuacct", "memory", "pids"];

/// The limits a tenant subtree enforces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// CPUs of bandwidth.
    pub cpus: f64,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Pids limit.
    pub pids: u64,
}

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A directory or file could not be created or written.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The host has no usable cgroup hierarchy.
    #[error("no cgroup hierarchy found under {0}; mount cgroup v2 or the v1 controllers")]
    NoHierarchy(PathBuf),
    /// A cgroup still holds processes and cannot be removed.
    #[error("cgroup {0} still holds processes")]
    Busy(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Tenant subtrees on one host.
#[derive(Debug, Clone)]
pub struct TenantCgroups {
    root: PathBuf,
    layout: CgroupLayout,
    slice: String,
}

impl TenantCgroups {
    /// For the hierarchy mounted at `root` (normally `/sys/fs/cgroup`) with `layout`.
    pub fn new(root: impl Into<PathBuf>, layout: CgroupLayout) -> Self {
        Self::with_slice(root, layout, SLICE)
    }

    /// As [`TenantCgroups::new`], with tenants under `slice` instead of [`SLICE`].
    pub fn with_slice(root: impl Into<PathBuf>, layout: CgroupLayout, slice: &str) -> Self {
        Self {
            root: root.into(),
            layout,
            slice: slice.to_string(),
        }
    }

    /// The layout in use.
    pub fn layout(&self) -> CgroupLayout {
        self.layout
    }

    /// The tenant's cgroup path relative to a hierarchy root, e.g. `/caas.slice/tenant-a`. This is
    /// what an OCI `cgroupsPath` of a container of the tenant starts with.
    pub fn tenant_path(&self, tenant: &str) -> String {
        format!("/{}/tenant-{tenant}", self.slice)
    }

    /// Directories of `rel` in every hierarchy that carries tenant limits.
    fn limited_dirs(&self, rel: &str) -> Vec<PathBuf> {
        let rel = rel.trim_start_matches('/');
        match self.layout {
            CgroupLayout::V2 => vec![self.root.join(rel)],
            CgroupLayout::V1 | CgroupLayout::Hybrid => V1_LIMITED
                .iter()
                .map(|c| self.root.join(c).join(rel))
                .collect(),
            CgroupLayout::None => Vec::new(),
        }
    }

    /// Every v1 hierarchy (real directories, not the `cpu -> cpu,cpuacct` links), or the v2 root.
    pub fn all_hierarchies(&self) -> Vec<PathBuf> {
        match self.layout {
            CgroupLayout::V2 => vec![self.root.clone()],
            CgroupLayout::None => Vec::new(),
            CgroupLayout::V1 | CgroupLayout::Hybrid => fs::read_dir(&self.root)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        // The controller-less v2 mount of a hybrid host holds no tenant cgroups.
                        .filter(|e| e.file_name() != "unified")
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Creates the tenant's subtree and applies `limits`. Idempotent.
    pub fn create(&self, tenant: &str, limits: &Limits) -> Result<(), CgroupError> {
        let dirs = self.limited_dirs(&self.tenant_path(tenant));
        if dirs.is_empty() {
            return Err(CgroupError::NoHierarchy(self.root.clone()));
        }
        if self.layout == CgroupLayout::V2 {
            self.enable_v2_controllers(&self.tenant_path(tenant))?;
        }
        for d in &dirs {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        self.set_limits(tenant, limits)
    }

    /// Writes the tenant's limits (also used to change quotas on a live tenant).
    pub fn set_limits(&self, tenant: &str, l: &Limits) -> Result<(), CgroupError> {
        let rel = self.tenant_path(tenant);
        let rel = rel.trim_start_matches('/');
        let quota_us = cfs_quota_us(l.cpus);
        match self.layout {
            CgroupLayout::V2 => {
                let d = self.root.join(rel);
                write(&d.join("cpu.max"), &format!("{quota_us} {CFS_PERIOD_US}"))?;
                write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
                write(&d.join("pids.max"), &l.pids.to_string())?;
            }
            CgroupLayout::V1 | CgroupLayout::Hybrid => {
                let cpu = self.root.join("cpu").join(rel);
                write(&cpu.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
                let mem = self.root.join("memory").join(rel);
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &l.memory_bytes.to_string(),
                )?;
                write(
                    &self.root.join("pids").join(rel).join("pids.max"),
                    &l.pids.to_string(),
                )?;
            }
            CgroupLayout::None => return Err(CgroupError::NoHierarchy(self.root.clone())),
        }
        Ok(())
    }

    /// Sets the given limits of the cgroup `rel` (a path under the root, such as a container's
    /// under its tenant's); unset ones are left as they are.
    pub fn set_some_limits(
        &self,
        rel: &str,
        cpus: Option<f64>,
        memory_bytes: Option<u64>,
        pids: Option<u64>,
    ) -> Result<(), CgroupError> {
        let rel = rel.trim_start_matches('/');
        match self.layout {
            CgroupLayout::V2 => {
                let d = self.root.join(rel);
                if let Some(c) = cpus {
                    write(
                        &d.join("cpu.max"),
                        &format!("{} {CFS_PERIOD_US}", cfs_quota_us(c)),
                    )?;
                }
                if let Some(m) = memory_bytes {
                    write(&d.join("memory.max"), &m.to_string())?;
                }
                if let Some(p) = pids {
                    write(&d.join("pids.max"), &p.to_string())?;
                }
            }
            CgroupLayout::V1 | CgroupLayout::Hybrid => {
                if let Some(c) = cpus {
                    let cpu = self.root.join("cpu").join(rel);
                    write(&cpu.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    write(&cpu.join("cpu.cfs_quota_us"), &cfs_quota_us(c).to_string())?;
                }
                if let Some(m) = memory_bytes {
                    // With swap accounting, memory+swap must stay >= memory: a container made
                    // without swap has both equal, and keeps them so (raised memsw first when
                    // growing, after when shrinking).
                    let d = self.root.join("memory").join(rel);
                    let memsw = d.join("memory.memsw.limit_in_bytes");
                    let read = |p: &Path| {
                        std::fs::read_to_string(p)
                            .ok()
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    };
                    let (old_mem, old_sw) = (read(&d.join("memory.limit_in_bytes")), read(&memsw));
                    let tied = old_sw.is_some() && old_sw == old_mem;
                    if tied && old_sw.is_some_and(|sw| m > sw) {
                        write(&memsw, &m.to_string())?;
                    }
                    write(&d.join("memory.limit_in_bytes"), &m.to_string())?;
                    if tied && old_sw.is_some_and(|sw| m < sw) {
                        write(&memsw, &m.to_string())?;
                    }
                }
                if let Some(p) = pids {
                    write(
                        &self.root.join("pids").join(rel).join("pids.max"),
                        &p.to_string(),
                    )?;
                }
            }
            CgroupLayout::None => return Err(CgroupError::NoHierarchy(self.root.clone())),
        }
        Ok(())
    }

    /// Sets the relative CPU weight of the cgroup `rel`, given in v1 `cpu.shares` units (2 to
    /// 262144). On v2 it goes to `cpu.weight` through [`shares_to_weight`].
    pub fn set_cpu_shares(&self, rel: &str, shares: u64) -> Result<(), CgroupError> {
        let rel = rel.trim_start_matches('/');
        match self.layout {
            CgroupLayout::V2 => write(
                &self.root.join(rel).join("cpu.weight"),
                &shares_to_weight(shares).to_string(),
            ),
            CgroupLayout::V1 | CgroupLayout::Hybrid => write(
                &self.root.join("cpu").join(rel).join("cpu.shares"),
                &shares.to_string(),
            ),
            CgroupLayout::None => Err(CgroupError::NoHierarchy(self.root.clone())),
        }
    }

    /// Moves `pid` into `rel` (a path under the tenant's subtree) in every hierarchy it exists in.
    pub fn add_pid(&self, rel: &str, pid: u32) -> Result<(), CgroupError> {
        for procs in self.procs_files(rel)? {
            write(&procs, &pid.to_string())?;
        }
        Ok(())
    }

    /// CPU time (µs) and memory in use (bytes) of `rel`, a path under the slice; None where the
    /// cgroup or its counters are missing.
    pub fn usage(&self, rel: &str) -> (Option<u64>, Option<u64>) {
        let rel = rel.trim_start_matches('/');
        let num = |p: PathBuf| -> Option<u64> { fs::read_to_string(p).ok()?.trim().parse().ok() };
        match self.layout {
            CgroupLayout::V2 => {
                let d = self.root.join(rel);
                let cpu = fs::read_to_string(d.join("cpu.stat")).ok().and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse().ok())
                });
                (cpu, num(d.join("memory.current")))
            }
            CgroupLayout::V1 | CgroupLayout::Hybrid => (
                num(self.root.join("cpuacct").join(rel).join("cpuacct.usage")).map(|ns| ns / 1000),
                num(self
                    .root
                    .join("memory")
                    .join(rel)
                    .join("memory.usage_in_bytes")),
            ),
            CgroupLayout::None => (None, None),
        }
    }

    /// On cgroup v2, the anonymous memory of `rel` (`anon` in memory.stat): what no memory
    /// limit can reclaim without swap. v1 refuses a limit below what it cannot reclaim itself
    /// (EBUSY); v2 takes any limit and OOM-kills, so a caller checks first. None elsewhere.
    pub fn anon_bytes(&self, rel: &str) -> Option<u64> {
        if self.layout != CgroupLayout::V2 {
            return None;
        }
        let stat = fs::read_to_string(
            self.root
                .join(rel.trim_start_matches('/'))
                .join("memory.stat"),
        )
        .ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("anon "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The `cgroup.procs` files of `rel` (a path under a tenant's subtree) in every hierarchy
    /// [`TenantCgroups::add_pid`] would use, creating the directories: for a child that moves
    /// itself in (writing `0`) between fork and exec, so nothing it allocates is charged elsewhere.
    pub fn procs_files(&self, rel: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let mut v = Vec::new();
        for h in self.all_hierarchies() {
            let d = h.join(rel.trim_start_matches('/'));
            if self.layout != CgroupLayout::V2
                && !V1_LIMITED.iter().any(|c| h.ends_with(c))
                && !d.exists()
            {
                continue;
            }
            fs::create_dir_all(&d).map_err(io_err(&d))?;
            v.push(d.join("cgroup.procs"));
        }
        Ok(v)
    }

    /// Removes the tenant's subtree in every hierarchy, deepest first. Fails with
    /// [`CgroupError::Busy`] if a process is still inside. Missing directories are fine.
    pub fn remove(&self, tenant: &str) -> Result<(), CgroupError> {
        let rel = self.tenant_path(tenant);
        for h in self.all_hierarchies() {
            let d = h.join(rel.trim_start_matches('/'));
            if d.exists() {
                remove_tree(&d)?;
            }
        }
        Ok(())
    }

    fn enable_v2_controllers(&self, rel: &str) -> Result<(), CgroupError> {
        // Each ancestor must delegate the controllers to its children.
        let mut dir = self.root.clone();
        for part in rel.trim_start_matches('/').split('/') {
            write(&dir.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
            dir = dir.join(part);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        write(&dir.join("cgroup.subtree_control"), "+cpu +memory +pids")
    }
}

/// CFS quota for `cpus` over [`CFS_PERIOD_US`], rounded up and at least the kernel's 1 ms minimum.
/// `cpus` was validated (finite, 0.01..=4096), so the product fits easily.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn cfs_quota_us(cpus: f64) -> u64 {
    ((cpus * CFS_PERIOD_US as f64)
        .ceil()
        .clamp(0.0, u64::MAX as f64) as u64)
        .max(1000)
}

/// The cgroup v2 `cpu.weight` (1 to 10000) for v1 `cpu.shares` (2 to 262144): the linear map
/// of one range onto the other that runc, crun and libcontainer use, so 1024 shares (one CPU's
/// request in Kubernetes) is weight 39 and the v1 default and v2 default do not coincide.
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

/// rmdir a cgroup tree bottom-up. cgroup directories hold only kernel files, which rmdir takes
/// with them; a plain directory tree (fixtures) needs its files removed first.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Err(CgroupError::Busy(dir.to_path_buf()))
        }
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
            // Fixture trees: plain files sit beside the subdirectories.
            for f in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
                if f.file_type().is_ok_and(|t| t.is_file()) {
                    fs::remove_file(f.path()).map_err(io_err(&f.path()))?;
                }
            }
            fs::remove_dir(dir).map_err(io_err(dir))
        }
        Err(source) => Err(CgroupError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        cpus: 1.5,
        memory_bytes: 256 << 20,
        pids: 100,
    };

    #[test]
    fn cpu_shares_map_onto_the_v2_weight_range_as_runc_does() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        // Out of range values are clamped, never wrap.
        assert_eq!(shares_to_weight(0), 1);
        assert_eq!(shares_to_weight(1 << 40), 10_000);
    }

    #[test]
    fn cpu_shares_go_to_the_file_of_the_layout() {
        let d = tempfile::tempdir().unwrap();
        let v1 = d.path().join("v1");
        let v2 = d.path().join("v2");
        fs::create_dir_all(v1.join("cpu/t/c")).unwrap();
        fs::create_dir_all(v2.join("t/c")).unwrap();
        TenantCgroups::new(&v1, CgroupLayout::Hybrid)
            .set_cpu_shares("/t/c", 512)
            .unwrap();
        TenantCgroups::new(&v2, CgroupLayout::V2)
            .set_cpu_shares("/t/c", 512)
            .unwrap();
        assert_eq!(
            fs::read_to_string(v1.join("cpu/t/c/cpu.shares")).unwrap(),
            "512"
        );
        assert_eq!(fs::read_to_string(v2.join("t/c/cpu.weight")).unwrap(), "20");
    }

    #[test]
    fn anonymous_memory_is_read_on_v2_only() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("caas.slice/tenant-a/c-1");
        fs::create_dir_all(&c).unwrap();
        fs::write(c.join("memory.stat"), "anon_thp 0\nanon 12288\nfile 4096\n").unwrap();
        let v2 = TenantCgroups::new(d.path(), CgroupLayout::V2);
        assert_eq!(v2.anon_bytes("/caas.slice/tenant-a/c-1"), Some(12288));
        let v1 = TenantCgroups::new(d.path(), CgroupLayout::Hybrid);
        assert_eq!(v1.anon_bytes("/caas.slice/tenant-a/c-1"), None);
    }

    #[test]
    fn v1_fixture_tree() {
        let d = tempfile::tempdir().unwrap();
        for h in ["cpu", "cpuacct", "memory", "pids", "devices", "unified"] {
            fs::create_dir(d.path().join(h)).unwrap();
        }
        let cg = TenantCgroups::new(d.path(), CgroupLayout::Hybrid);
        cg.create("a", &L).unwrap();
        let t = d.path().join("cpu/caas.slice/tenant-a");
        assert_eq!(
            fs::read_to_string(t.join("cpu.cfs_quota_us")).unwrap(),
            "150000"
        );
        assert_eq!(
            fs::read_to_string(
                d.path()
                    .join("memory/caas.slice/tenant-a/memory.limit_in_bytes")
            )
            .unwrap(),
            (256u64 << 20).to_string()
        );
        assert_eq!(
            fs::read_to_string(d.path().join("pids/caas.slice/tenant-a/pids.max")).unwrap(),
            "100"
        );
        // A container cgroup made by the runtime in another hierarchy is removed with the tenant.
        fs::create_dir_all(d.path().join("devices/caas.slice/tenant-a/c1")).unwrap();
        cg.remove("a").unwrap();
        for h in ["cpu", "cpuacct", "memory", "pids", "devices"] {
            assert!(
                !d.path().join(h).join("caas.slice/tenant-a").exists(),
                "{h}"
            );
        }
        assert!(!d.path().join("unified/caas.slice").exists());
        cg.remove("a").unwrap();
    }

    #[test]
    fn v2_fixture_tree() {
        let d = tempfile::tempdir().unwrap();
        let cg = TenantCgroups::new(d.path(), CgroupLayout::V2);
        cg.create("b", &L).unwrap();
        let t = d.path().join("caas.slice/tenant-b");
        assert_eq!(
            fs::read_to_string(t.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        assert_eq!(fs::read_to_string(t.join("pids.max")).unwrap(), "100");
        assert_eq!(
            fs::read_to_string(d.path().join("caas.slice/cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        cg.remove("b").unwrap();
        assert!(!t.exists());
    }
}
