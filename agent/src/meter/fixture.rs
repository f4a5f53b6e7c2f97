//! Test and benchmark support: cgroup and network-link fixture trees in a plain directory, and
//! scratch cgroups on the real hierarchy (root only). Not used by the agent itself.
//!
//! Fixtures hold what the kernel writes, in its formats, for the files the readers open (plus
//! neighbouring lines and files that must not be mistaken for them, such as v1's non-`total_`
//! `inactive_file` or a link's packet counters).

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use crate::cgroups::CgroupLayout;

/// The numbers a fixture cgroup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixtureCounters {
    /// CPU time in ns; a multiple of 1000, since v2 reports microseconds.
    pub cpu_ns: u64,
    /// Memory usage in bytes (`memory.current` / `memory.usage_in_bytes`).
    pub memory_usage: u64,
    /// Inactive file cache in bytes (`memory.stat`).
    pub inactive_file: u64,
    /// Peak usage, or `None` for a v2 kernel without `memory.peak` (v1 then writes 0).
    pub memory_peak: Option<u64>,
    /// OOM kills.
    pub oom_kills: u64,
    /// Tasks.
    pub pids: u64,
}

/// Writes (or overwrites in place, so open readers see the new values) the counter files of the
/// cgroup `rel` under `root` as `layout` lays them out. The hybrid layout gets the v1 files plus
/// a controller-less `unified/<rel>`.
pub fn write_fixture(
    root: &Path,
    layout: CgroupLayout,
    rel: &str,
    c: &FixtureCounters,
) -> io::Result<()> {
    let put = |dir: &Path, name: &str, text: String| -> io::Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join(name), text)
    };
    match layout {
        CgroupLayout::V2 => {
            let dir = root.join(rel);
            let usec = c.cpu_ns / 1000;
            put(
                &dir,
                "cpu.stat",
                format!(
                    "usage_usec {usec}\nuser_usec {}\nsystem_usec {}\nnr_periods 0\n\
                     nr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n",
                    usec / 2,
                    usec - usec / 2
                ),
            )?;
            put(&dir, "memory.current", format!("{}\n", c.memory_usage))?;
            match c.memory_peak {
                Some(p) => put(&dir, "memory.peak", format!("{p}\n"))?,
                None => match fs::remove_file(dir.join("memory.peak")) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
            }
            put(
                &dir,
                "memory.events",
                format!(
                    "low 0\nhigh 0\nmax 3\noom {}\noom_kill {}\noom_group_kill 0\n",
                    c.oom_kills, c.oom_kills
                ),
            )?;
            put(&dir, "memory.stat", memory_stat(c, "", false))?;
            put(&dir, "pids.current", format!("{}\n", c.pids))?;
        }
        CgroupLayout::V1 | CgroupLayout::Hybrid => {
            put(
                &root.join("cpuacct").join(rel),
                "cpuacct.usage",
                format!("{}\n", c.cpu_ns),
            )?;
            let mem = root.join("memory").join(rel);
            put(
                &mem,
                "memory.usage_in_bytes",
                format!("{}\n", c.memory_usage),
            )?;
            put(
                &mem,
                "memory.max_usage_in_bytes",
                format!("{}\n", c.memory_peak.unwrap_or(0)),
            )?;
            put(
                &mem,
                "memory.oom_control",
                format!(
                    "oom_kill_disable 0\nunder_oom 0\noom_kill {}\n",
                    c.oom_kills
                ),
            )?;
            put(&mem, "memory.failcnt", "0\n".into())?;
            put(&mem, "memory.stat", memory_stat(c, "total_", true))?;
            put(
                &root.join("pids").join(rel),
                "pids.current",
                format!("{}\n", c.pids),
            )?;
            if layout == CgroupLayout::Hybrid {
                let unified = root.join("unified").join(rel);
                put(&unified, "cgroup.procs", String::new())?;
                put(&unified, "cgroup.events", "populated 0\nfrozen 0\n".into())?;
            }
        }
        CgroupLayout::None => {}
    }
    Ok(())
}

/// A `memory.stat` in the kernel's shape. `prefix` is `total_` for v1's hierarchical figures;
/// v1 also carries a local `inactive_file` line with a different number, as the kernel does.
fn memory_stat(c: &FixtureCounters, prefix: &str, v1_local: bool) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: u64| s.push_str(&format!("{k} {v}\n"));
    line("anon", c.memory_usage / 2);
    line("file", c.inactive_file * 2);
    line("shmem", 0);
    line("active_anon", 4096);
    line("inactive_anon", c.memory_usage / 2);
    if v1_local {
        line("inactive_file", c.inactive_file / 3);
    }
    line(&format!("{prefix}inactive_file"), c.inactive_file);
    line(&format!("{prefix}active_file"), c.inactive_file);
    line("unevictable", 0);
    line("pgfault", 1234);
    s
}

/// Writes (or overwrites in place) the counters of the network link `link` under the net root
/// `root` (a stand-in for `/sys/class/net`), as the host side of the link counts them:
/// `host_rx_bytes` is what the tenant sent, `host_tx_bytes` what it received.
pub fn write_link_fixture(
    root: &Path,
    link: &str,
    host_rx_bytes: u64,
    host_tx_bytes: u64,
) -> io::Result<()> {
    let stats = root.join(link).join("statistics");
    fs::create_dir_all(&stats)?;
    fs::write(stats.join("rx_bytes"), format!("{host_rx_bytes}\n"))?;
    fs::write(stats.join("tx_bytes"), format!("{host_tx_bytes}\n"))?;
    fs::write(
        stats.join("rx_packets"),
        format!("{}\n", host_rx_bytes / 100),
    )?;
    fs::write(
        stats.join("tx_packets"),
        format!("{}\n", host_tx_bytes / 100),
    )?;
    fs::write(stats.join("rx_dropped"), "0\n")?;
    fs::write(root.join(link).join("ifindex"), "7\n")
}

/// Removes the link `link` from a fixture tree. A removed link's sysfs files fail every read on
/// a descriptor still open (`ENODEV`), which a plain file cannot do: the files are emptied first,
/// so that open descriptors read nothing a counter can be parsed from.
pub fn remove_link_fixture(root: &Path, link: &str) -> io::Result<()> {
    let dir = root.join(link);
    let stats = dir.join("statistics");
    for name in ["rx_bytes", "tx_bytes"] {
        match fs::write(stats.join(name), "") {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Scratch cgroups on the real hierarchy, removed when dropped (rmdir, leaf only).
#[derive(Debug)]
pub struct ScratchCgroup {
    dirs: Vec<PathBuf>,
}

impl ScratchCgroup {
    /// Makes the cgroup `rel` (its parent must exist) in each hierarchy the meter reads:
    /// `root/<rel>` on v2, `root/{cpuacct,memory,pids}/<rel>` on v1 and hybrid.
    pub fn create(root: &Path, layout: CgroupLayout, rel: &str) -> io::Result<Self> {
        let wanted: Vec<PathBuf> = match layout {
            CgroupLayout::V2 => vec![root.join(rel)],
            CgroupLayout::V1 | CgroupLayout::Hybrid => ["cpuacct", "memory", "pids"]
                .iter()
                .map(|c| root.join(c).join(rel))
                .collect(),
            CgroupLayout::None => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no cgroup hierarchy under {}", root.display()),
                ));
            }
        };
        let mut made = Self { dirs: Vec::new() };
        for dir in wanted {
            // On failure, `made` drops and removes what was created so far.
            fs::create_dir(&dir)
                .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", dir.display())))?;
            made.dirs.push(dir);
        }
        Ok(made)
    }

    /// Moves process `pid` into the cgroup in every hierarchy.
    pub fn add_pid(&self, pid: u32) -> io::Result<()> {
        for dir in &self.dirs {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the directories; retried briefly, since a just-killed task can keep a cgroup
    /// busy for a moment.
    pub fn remove(&mut self) -> io::Result<()> {
        while let Some(dir) = self.dirs.last() {
            let mut tries = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if tries < 50 && e.raw_os_error() == Some(libc::EBUSY) => {
                        tries += 1;
                        thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("rmdir {}: {e}", dir.display()),
                        ));
                    }
                }
            }
            self.dirs.pop();
        }
        Ok(())
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("leaving a scratch cgroup behind: {e}");
        }
    }
}
