//! Reads one cgroup's counters, cheaply enough to do it every second for thousands of cgroups.
//!
//! [`CgroupReader::open`] opens every counter file once and keeps the descriptors;
//! [`CgroupReader::read`] re-reads them with `pread` at offset 0 into a stack buffer and parses
//! them with the byte parsers of `parse.rs`: no path lookups, no allocation, five `pread`s per
//! read.
//!
//! | counter | v2 | v1 (also the hybrid layout: its cgroup2 mount holds no controllers) |
//! | --- | --- | --- |
//! | `cpu_ns` | `cpu.stat` `usage_usec` × 1000 | `cpuacct/<rel>/cpuacct.usage` |
//! | memory usage | `memory.current` | `memory/<rel>/memory.usage_in_bytes` |
//! | `memory_peak` | `memory.peak` (0 when the kernel lacks it) | `memory.max_usage_in_bytes` |
//! | `oom_kills` | `memory.events` `oom_kill` | `memory.oom_control` `oom_kill` |
//! | `pids` | `pids.current` | `pids/<rel>/pids.current` |
//! | inactive file cache | `memory.stat` `inactive_file` | `memory.stat` `total_inactive_file` |
//!
//! `memory_working_set` is usage minus inactive file cache, saturating at 0, as Kubernetes and
//! cAdvisor report it.
//!
//! **Trade-off: `memory.stat` is not read every second.** It is the one expensive file (the
//! kernel formats some forty lines, and on v1 walks the subtree for the `total_*` figures), so the
//! inactive-file figure is cached and refreshed on every [`STAT_REFRESH_EVERY`]-th read, on open,
//! and on every [`CgroupReader::read_final`]. The working set can therefore lag reality in the
//! inactive-file part by up to `STAT_REFRESH_EVERY - 1` seconds (usage itself is always fresh);
//! the final reading, the one a short-lived container is billed on, is always exact. Readers
//! opened together refresh on different reads (a process-wide round-robin phase), so 1,000
//! containers created at once do not all read `memory.stat` in the same second.
//!
//! Caveat of v1: the kernel does not propagate OOM-kill counts to ancestors there, so a tenant's
//! v1 `oom_kills` counts only the tasks directly in the tenant cgroup (v2's `memory.events` is
//! hierarchical); sum the containers' figures instead. Measured on this kernel.
//!
//! This module only reads; it never creates, writes or removes a cgroup.

use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::{Component, Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use super::{
    Counters, MeterError,
    parse::{keyed_u64, parse_u64},
};
use crate::cgroups::CgroupLayout;

/// `memory.stat` is read on one read in this many (and on open and on the final read).
pub const STAT_REFRESH_EVERY: u32 = 10;

/// Buffer for the small files read every second (the largest, v2 `cpu.stat`, is ~250 bytes).
const HOT_BUF: usize = 1024;
/// Buffer for `memory.stat` (~1.5 KiB on current kernels).
const STAT_BUF: usize = 16 * 1024;

/// Round-robin phase handed to each new reader, so their `memory.stat` refreshes spread out.
static NEXT_PHASE: AtomicU32 = AtomicU32::new(0);

/// Which set of files a reader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    V1,
    V2,
}

/// One open counter file and its path (kept for error messages only). Also used for the link
/// counters of `link.rs`.
#[derive(Debug)]
pub(super) struct CounterFile {
    file: File,
    path: PathBuf,
}

impl CounterFile {
    /// Opens `path`. A missing file whose cgroup directory is missing too means the cgroup is
    /// gone; a missing file in an existing directory is an I/O error naming the file.
    pub(super) fn open(path: PathBuf) -> Result<Self, MeterError> {
        match File::open(&path) {
            Ok(file) => Ok(Self { file, path }),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                match path.parent().filter(|dir| !dir.exists()) {
                    Some(dir) => Err(MeterError::Gone {
                        path: dir.to_path_buf(),
                    }),
                    None => Err(MeterError::Io { path, source: e }),
                }
            }
            Err(e) => Err(MeterError::from_io(&path, e)),
        }
    }

    /// Opens `path` if the file exists (for files that older kernels lack).
    fn open_optional(path: PathBuf) -> Result<Option<Self>, MeterError> {
        if path.parent().is_some_and(Path::exists) && !path.exists() {
            return Ok(None);
        }
        Self::open(path).map(Some)
    }

    /// The whole file, re-read from offset 0 into `buf`.
    fn read<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], MeterError> {
        loop {
            match self.file.read_at(buf, 0) {
                // A full buffer may be a truncated file: refuse rather than parse half of it.
                Ok(n) if n >= buf.len() => {
                    return Err(MeterError::malformed(
                        &self.path,
                        "larger than the read buffer",
                        buf,
                    ));
                }
                Ok(n) => return Ok(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MeterError::from_io(&self.path, e)),
            }
        }
    }

    /// A file holding one integer.
    pub(super) fn value(&self, buf: &mut [u8]) -> Result<u64, MeterError> {
        let bytes = self.read(buf)?;
        parse_u64(bytes).ok_or_else(|| MeterError::malformed(&self.path, "not an integer", bytes))
    }

    /// The value of line `key` in a flat-keyed file.
    fn keyed(&self, buf: &mut [u8], key: &'static str) -> Result<u64, MeterError> {
        let bytes = self.read(buf)?;
        match keyed_u64(bytes, key.as_bytes()) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(MeterError::malformed(&self.path, missing_line(key), bytes)),
            Err(()) => Err(MeterError::malformed(
                &self.path,
                "a keyed value is not an integer",
                bytes,
            )),
        }
    }
}

/// The reason text for a missing line, without allocating.
fn missing_line(key: &'static str) -> &'static str {
    match key {
        "usage_usec" => "no usage_usec line",
        "oom_kill" => "no oom_kill line",
        "inactive_file" => "no inactive_file line",
        "total_inactive_file" => "no total_inactive_file line",
        _ => "a line is missing",
    }
}

/// The open counter files of one cgroup.
#[derive(Debug)]
pub struct CgroupReader {
    flavor: Flavor,
    cpu: CounterFile,
    mem_usage: CounterFile,
    mem_peak: Option<CounterFile>,
    oom: CounterFile,
    pids: CounterFile,
    stat: CounterFile,
    /// The inactive file cache figure from the last `memory.stat` refresh.
    inactive_file: u64,
    /// Reads left until the next `memory.stat` refresh.
    until_refresh: u32,
}

impl CgroupReader {
    /// Opens the counter files of the cgroup at `rel` (e.g. `caas.slice/tenant-a/c-x`) under the
    /// cgroup root `root` (normally `/sys/fs/cgroup`), and reads `memory.stat` once.
    pub fn open(root: &Path, layout: CgroupLayout, rel: &str) -> Result<Self, MeterError> {
        let phase = NEXT_PHASE.fetch_add(1, Ordering::Relaxed) % STAT_REFRESH_EVERY;
        Self::open_with_phase(root, layout, rel, phase)
    }

    /// As [`CgroupReader::open`], with the first periodic refresh after
    /// `STAT_REFRESH_EVERY - phase` reads.
    fn open_with_phase(
        root: &Path,
        layout: CgroupLayout,
        rel: &str,
        phase: u32,
    ) -> Result<Self, MeterError> {
        let plain = !rel.is_empty()
            && Path::new(rel)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(MeterError::InvalidPath { rel: rel.into() });
        }
        let mut reader = match layout {
            CgroupLayout::V2 => {
                let dir = root.join(rel);
                Self {
                    flavor: Flavor::V2,
                    cpu: CounterFile::open(dir.join("cpu.stat"))?,
                    mem_usage: CounterFile::open(dir.join("memory.current"))?,
                    mem_peak: CounterFile::open_optional(dir.join("memory.peak"))?,
                    oom: CounterFile::open(dir.join("memory.events"))?,
                    pids: CounterFile::open(dir.join("pids.current"))?,
                    stat: CounterFile::open(dir.join("memory.stat"))?,
                    inactive_file: 0,
                    until_refresh: 0,
                }
            }
            CgroupLayout::V1 | CgroupLayout::Hybrid => {
                let mem = root.join("memory").join(rel);
                Self {
                    flavor: Flavor::V1,
                    cpu: CounterFile::open(root.join("cpuacct").join(rel).join("cpuacct.usage"))?,
                    mem_usage: CounterFile::open(mem.join("memory.usage_in_bytes"))?,
                    mem_peak: Some(CounterFile::open(mem.join("memory.max_usage_in_bytes"))?),
                    oom: CounterFile::open(mem.join("memory.oom_control"))?,
                    pids: CounterFile::open(root.join("pids").join(rel).join("pids.current"))?,
                    stat: CounterFile::open(mem.join("memory.stat"))?,
                    inactive_file: 0,
                    until_refresh: 0,
                }
            }
            CgroupLayout::None => {
                return Err(MeterError::NoHierarchy {
                    root: root.to_path_buf(),
                    layout,
                });
            }
        };
        reader.refresh_inactive()?;
        reader.until_refresh = STAT_REFRESH_EVERY - phase % STAT_REFRESH_EVERY;
        Ok(reader)
    }

    /// Reads the counters now. `memory.stat` is re-read only on every
    /// [`STAT_REFRESH_EVERY`]-th call (see the module doc).
    pub fn read(&mut self) -> Result<Counters, MeterError> {
        self.until_refresh = self.until_refresh.saturating_sub(1);
        let refresh = self.until_refresh == 0;
        self.sample(refresh)
    }

    /// Reads the counters now, with a fresh `memory.stat`: the reading to bill a cgroup that is
    /// about to be removed on.
    pub fn read_final(&mut self) -> Result<Counters, MeterError> {
        self.sample(true)
    }

    fn sample(&mut self, refresh: bool) -> Result<Counters, MeterError> {
        let mut buf = [0u8; HOT_BUF];
        let cpu_ns = match self.flavor {
            Flavor::V2 => {
                let usec = self.cpu.keyed(&mut buf, "usage_usec")?;
                usec.checked_mul(1000).ok_or_else(|| {
                    MeterError::malformed(&self.cpu.path, "usage_usec overflows nanoseconds", b"")
                })?
            }
            Flavor::V1 => self.cpu.value(&mut buf)?,
        };
        let usage = self.mem_usage.value(&mut buf)?;
        let memory_peak = match &self.mem_peak {
            Some(f) => f.value(&mut buf)?,
            None => 0,
        };
        let oom_kills = self.oom.keyed(&mut buf, "oom_kill")?;
        let pids = self.pids.value(&mut buf)?;
        if refresh {
            self.refresh_inactive()?;
        }
        Ok(Counters {
            cpu_ns,
            memory_working_set: usage.saturating_sub(self.inactive_file),
            memory_peak,
            oom_kills,
            pids,
            net: None,
        })
    }

    /// Re-reads the inactive file cache figure from `memory.stat`. Kept out of line so the hot
    /// read's stack frame does not carry the large buffer.
    #[inline(never)]
    #[cold]
    fn refresh_inactive(&mut self) -> Result<(), MeterError> {
        let mut buf = [0u8; STAT_BUF];
        let key = match self.flavor {
            Flavor::V2 => "inactive_file",
            Flavor::V1 => "total_inactive_file",
        };
        self.inactive_file = self.stat.keyed(&mut buf, key)?;
        self.until_refresh = STAT_REFRESH_EVERY;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, process::Command, thread, time::Duration};

    use super::*;
    use crate::meter::fixture::{FixtureCounters, ScratchCgroup, write_fixture};

    const REL: &str = "caas.slice/tenant-a/c-x";

    fn numbers() -> FixtureCounters {
        FixtureCounters {
            cpu_ns: 1_234_567_000,
            memory_usage: 50_000_000,
            inactive_file: 8_000_000,
            memory_peak: Some(70_000_000),
            oom_kills: 2,
            pids: 7,
        }
    }

    fn expected() -> Counters {
        Counters {
            cpu_ns: 1_234_567_000,
            memory_working_set: 42_000_000,
            memory_peak: 70_000_000,
            oom_kills: 2,
            pids: 7,
            net: None,
        }
    }

    #[test]
    fn v2_v1_and_hybrid_read_the_same_numbers() {
        for layout in [CgroupLayout::V2, CgroupLayout::V1, CgroupLayout::Hybrid] {
            let dir = tempfile::tempdir().unwrap();
            write_fixture(dir.path(), layout, REL, &numbers()).unwrap();
            let mut r = CgroupReader::open(dir.path(), layout, REL).unwrap();
            assert_eq!(r.read().unwrap(), expected(), "{layout}");
            assert_eq!(r.read_final().unwrap(), expected(), "{layout}");
        }
    }

    #[test]
    fn v2_without_memory_peak_reports_zero() {
        let dir = tempfile::tempdir().unwrap();
        let c = FixtureCounters {
            memory_peak: None,
            ..numbers()
        };
        write_fixture(dir.path(), CgroupLayout::V2, REL, &c).unwrap();
        let mut r = CgroupReader::open(dir.path(), CgroupLayout::V2, REL).unwrap();
        assert_eq!(r.read().unwrap().memory_peak, 0);
    }

    #[test]
    fn working_set_saturates() {
        let dir = tempfile::tempdir().unwrap();
        let c = FixtureCounters {
            inactive_file: 60_000_000,
            ..numbers()
        };
        write_fixture(dir.path(), CgroupLayout::V1, REL, &c).unwrap();
        let mut r = CgroupReader::open(dir.path(), CgroupLayout::V1, REL).unwrap();
        assert_eq!(r.read().unwrap().memory_working_set, 0);
    }

    #[test]
    fn memory_stat_is_refreshed_every_nth_read_and_on_the_final_read() {
        for layout in [CgroupLayout::V2, CgroupLayout::V1] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = numbers();
            write_fixture(dir.path(), layout, REL, &c).unwrap();
            let mut r = CgroupReader::open_with_phase(dir.path(), layout, REL, 0).unwrap();

            c.inactive_file = 10_000_000;
            write_fixture(dir.path(), layout, REL, &c).unwrap();
            for i in 1..STAT_REFRESH_EVERY {
                let ws = r.read().unwrap().memory_working_set;
                assert_eq!(
                    ws, 42_000_000,
                    "{layout}: read {i} must use the cached figure"
                );
            }
            let ws = r.read().unwrap().memory_working_set;
            assert_eq!(
                ws, 40_000_000,
                "{layout}: read {STAT_REFRESH_EVERY} refreshes"
            );

            c.inactive_file = 20_000_000;
            write_fixture(dir.path(), layout, REL, &c).unwrap();
            assert_eq!(r.read().unwrap().memory_working_set, 40_000_000);
            assert_eq!(r.read_final().unwrap().memory_working_set, 30_000_000);

            // The final read restarts the cadence: the next refresh is N reads later.
            c.inactive_file = 0;
            write_fixture(dir.path(), layout, REL, &c).unwrap();
            for _ in 1..STAT_REFRESH_EVERY {
                assert_eq!(r.read().unwrap().memory_working_set, 30_000_000);
            }
            assert_eq!(r.read().unwrap().memory_working_set, 50_000_000);
        }
    }

    #[test]
    fn refreshes_are_staggered_across_readers() {
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), CgroupLayout::V2, REL, &numbers()).unwrap();
        let firsts: std::collections::BTreeSet<u32> = (0..STAT_REFRESH_EVERY)
            .map(|_| {
                CgroupReader::open(dir.path(), CgroupLayout::V2, REL)
                    .unwrap()
                    .until_refresh
            })
            .collect();
        // Other tests open readers concurrently, so the phases seen here need not be
        // consecutive; they must not all be the same.
        assert!(firsts.len() > 1, "{firsts:?}");
        assert!(
            firsts
                .iter()
                .all(|&n| (1..=STAT_REFRESH_EVERY).contains(&n))
        );
    }

    #[test]
    fn malformed_and_missing_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), CgroupLayout::V2, REL, &numbers()).unwrap();
        let cg = dir.path().join(REL);
        let mut r = CgroupReader::open(dir.path(), CgroupLayout::V2, REL).unwrap();

        fs::write(cg.join("memory.current"), "lots\n").unwrap();
        let e = r.read().unwrap_err();
        assert!(matches!(e, MeterError::Malformed { .. }), "{e}");
        assert!(
            e.to_string().contains("c-x/memory.current: not an integer"),
            "{e}"
        );

        write_fixture(dir.path(), CgroupLayout::V2, REL, &numbers()).unwrap();
        fs::write(cg.join("memory.events"), "low 0\nhigh 0\n").unwrap();
        let e = r.read().unwrap_err();
        assert!(
            e.to_string().contains("memory.events: no oom_kill line"),
            "{e}"
        );

        // A full buffer could be a truncated file.
        fs::write(cg.join("memory.events"), "x".repeat(HOT_BUF)).unwrap();
        let e = r.read().unwrap_err();
        assert!(e.to_string().contains("larger than the read buffer"), "{e}");

        write_fixture(dir.path(), CgroupLayout::V2, REL, &numbers()).unwrap();
        assert_eq!(
            r.read().unwrap(),
            expected(),
            "recovers once the file is sane"
        );

        fs::remove_file(cg.join("pids.current")).unwrap();
        let e = CgroupReader::open(dir.path(), CgroupLayout::V2, REL).unwrap_err();
        assert!(matches!(e, MeterError::Io { .. }), "{e}");
        assert!(e.to_string().contains("c-x/pids.current"), "{e}");
    }

    #[test]
    fn a_missing_cgroup_is_gone_and_bad_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for layout in [CgroupLayout::V2, CgroupLayout::V1] {
            let e = CgroupReader::open(dir.path(), layout, "caas.slice/tenant-z").unwrap_err();
            assert!(e.is_gone(), "{e}");
        }
        for rel in ["", "/abs", "a/../b", "./a"] {
            let e = CgroupReader::open(dir.path(), CgroupLayout::V2, rel).unwrap_err();
            assert!(matches!(e, MeterError::InvalidPath { .. }), "{rel}: {e}");
        }
        let e = CgroupReader::open(dir.path(), CgroupLayout::None, REL).unwrap_err();
        assert!(matches!(e, MeterError::NoHierarchy { .. }), "{e}");
    }

    /// A real cgroup with a busy process in it: counters move, and once the cgroup is removed
    /// the open reader reports it gone (the kernel answers ENODEV).
    #[test]
    fn real_cgroup_counts_a_busy_process_and_reports_removal() {
        if !crate::testing::require_root("meter::reader::real_cgroup") {
            return;
        }
        let root = Path::new("/sys/fs/cgroup");
        let layout = crate::cgroups::detect_layout(root).unwrap();
        let rel = format!("caas-meter-test-{:08x}", rand::random::<u32>());
        // Dropped in reverse order: the child is killed before the cgroup is removed.
        let mut cg = ScratchCgroup::create(root, layout, &rel).unwrap();
        let mut child = KillOnDrop(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap(),
        );
        cg.add_pid(child.0.id()).unwrap();

        let mut r = CgroupReader::open(root, layout, &rel).unwrap();
        thread::sleep(Duration::from_millis(300));
        let live = r.read().unwrap();
        assert!(live.cpu_ns > 0, "{live:?}");
        assert_eq!(live.pids, 1, "{live:?}");

        child.0.kill().unwrap();
        child.0.wait().unwrap();
        let last = r.read_final().unwrap();
        assert!(last.cpu_ns >= live.cpu_ns, "{last:?} after {live:?}");
        assert_eq!(last.pids, 0);

        cg.remove().unwrap();
        let e = r.read().unwrap_err();
        assert!(e.is_gone(), "{e}");
        let e = CgroupReader::open(root, layout, &rel).unwrap_err();
        assert!(e.is_gone(), "{e}");
    }

    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
