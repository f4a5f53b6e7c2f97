//! What one container-sample costs: `CgroupReader` on fixture files and on real cgroups, against
//! a bare `pread` loop over the same files (the floor) and open/read/close per file (the naive
//! way). Every row reads the same files at the same cadence: the five counter files on each
//! sample, `memory.stat` on one sample in [`STAT_REFRESH_EVERY`], staggered across cgroups.
//!
//! Run with `cargo bench -p caas-agent --bench meter`. The real-cgroup rows need root; the
//! cgroups they make (`caas-meter-bench-<random>`, under each hierarchy the meter reads) are
//! removed at the end, also when the bench fails.

use std::{
    fs::File,
    hint::black_box,
    io::Read,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result};
use caas_agent::{
    cgroups::{CgroupLayout, detect_layout},
    meter::{
        CgroupReader, STAT_REFRESH_EVERY,
        fixture::{FixtureCounters, ScratchCgroup, write_fixture},
    },
};

const FIXTURE_CGROUPS: usize = 1_000;
const REAL_CGROUPS: usize = 100;
const ROUNDS: usize = 20;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One row of the table.
struct Row {
    case: String,
    cgroups: usize,
    /// Median and fastest round, in ns per container-sample.
    median_ns: f64,
    min_ns: f64,
}

fn main() -> Result<()> {
    let mut rows = Vec::new();

    let fixtures = tempfile::tempdir()?;
    for layout in [CgroupLayout::V2, CgroupLayout::V1] {
        let root = fixtures.path().join(layout.to_string());
        let rels = names("bench", FIXTURE_CGROUPS);
        for (i, rel) in rels.iter().enumerate() {
            let n = u64::try_from(i)?;
            let c = FixtureCounters {
                cpu_ns: 1_000_000 * (n + 1),
                memory_usage: 50_000_000 + n,
                inactive_file: 1_000_000,
                memory_peak: Some(60_000_000),
                oom_kills: 0,
                pids: 1,
            };
            write_fixture(&root, layout, rel, &c)?;
        }
        rows.push(readers(
            format!("(a) CgroupReader, fixture files ({layout})"),
            &root,
            layout,
            &rels,
        )?);
    }

    let root = Path::new(CGROUP_ROOT);
    let layout = detect_layout(root)?;
    let skip = if !nix::unistd::geteuid().is_root() {
        Some("needs root to create cgroups".to_string())
    } else if layout == CgroupLayout::None {
        Some(format!("no cgroup hierarchy under {CGROUP_ROOT}"))
    } else {
        None
    };
    match skip {
        Some(reason) => println!("SKIP rows (b)-(d), real cgroups: {reason}\n"),
        None => real_rows(root, layout, &mut rows)?,
    }

    print_table(&rows);
    Ok(())
}

/// Rows (b) to (d) on `REAL_CGROUPS` scratch cgroups, removed before returning.
fn real_rows(root: &Path, layout: CgroupLayout, rows: &mut Vec<Row>) -> Result<()> {
    let parent_rel = format!("caas-meter-bench-{:08x}", rand::random::<u32>());
    // Dropped in reverse order: the children before their parent.
    let mut parent = ScratchCgroup::create(root, layout, &parent_rel)?;
    let rels = names(&parent_rel, REAL_CGROUPS);
    let mut children = Vec::with_capacity(rels.len());
    for rel in &rels {
        children.push(ScratchCgroup::create(root, layout, rel)?);
    }

    rows.push(readers(
        format!("(b) CgroupReader, real cgroups ({layout})"),
        root,
        layout,
        &rels,
    )?);

    let files: Vec<CgroupFiles> = rels
        .iter()
        .map(|rel| CgroupFiles::new(root, layout, rel))
        .collect::<Result<_>>()?;
    rows.push(pread_loop(&files)?);
    rows.push(open_read_close(&files)?);

    for mut child in children {
        child.remove()?;
    }
    parent.remove()?;
    Ok(())
}

fn names(parent: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{parent}/c-{i}")).collect()
}

/// Times `ROUNDS` rounds of `round` over `n` cgroups (after one warm-up round).
fn measure(case: String, n: usize, mut round: impl FnMut(usize) -> Result<()>) -> Result<Row> {
    round(0)?;
    let mut per_sample = Vec::with_capacity(ROUNDS);
    for r in 1..=ROUNDS {
        let t = Instant::now();
        round(r)?;
        per_sample.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    per_sample.sort_by(f64::total_cmp);
    Ok(Row {
        case,
        cgroups: n,
        median_ns: per_sample[ROUNDS / 2],
        min_ns: per_sample[0],
    })
}

fn readers(case: String, root: &Path, layout: CgroupLayout, rels: &[String]) -> Result<Row> {
    let mut readers: Vec<CgroupReader> = rels
        .iter()
        .map(|rel| CgroupReader::open(root, layout, rel).with_context(|| rel.clone()))
        .collect::<Result<_>>()?;
    measure(case, rels.len(), |_| {
        for r in &mut readers {
            black_box(r.read()?);
        }
        Ok(())
    })
}

/// The files `CgroupReader` reads for one cgroup, opened once.
struct CgroupFiles {
    hot: Vec<(PathBuf, File)>,
    stat: (PathBuf, File),
}

impl CgroupFiles {
    fn new(root: &Path, layout: CgroupLayout, rel: &str) -> Result<Self> {
        let (hot, stat): (Vec<PathBuf>, PathBuf) = match layout {
            CgroupLayout::V2 => {
                let d = root.join(rel);
                let mut hot = vec![d.join("cpu.stat"), d.join("memory.current")];
                if d.join("memory.peak").exists() {
                    hot.push(d.join("memory.peak"));
                }
                hot.extend([d.join("memory.events"), d.join("pids.current")]);
                (hot, d.join("memory.stat"))
            }
            _ => {
                let m = root.join("memory").join(rel);
                let hot = vec![
                    root.join("cpuacct").join(rel).join("cpuacct.usage"),
                    m.join("memory.usage_in_bytes"),
                    m.join("memory.max_usage_in_bytes"),
                    m.join("memory.oom_control"),
                    root.join("pids").join(rel).join("pids.current"),
                ];
                (hot, m.join("memory.stat"))
            }
        };
        let open = |p: PathBuf| -> Result<(PathBuf, File)> {
            let f = File::open(&p).with_context(|| p.display().to_string())?;
            Ok((p, f))
        };
        Ok(Self {
            hot: hot.into_iter().map(open).collect::<Result<_>>()?,
            stat: open(stat)?,
        })
    }

    /// The files one sample reads: the counters, and `memory.stat` on one round in N.
    fn for_sample(&self, round: usize, i: usize) -> impl Iterator<Item = &(PathBuf, File)> {
        let refresh = (round + i).is_multiple_of(STAT_REFRESH_EVERY as usize);
        self.hot.iter().chain(refresh.then_some(&self.stat))
    }
}

fn pread_loop(files: &[CgroupFiles]) -> Result<Row> {
    let mut buf = [0u8; 16 * 1024];
    measure(
        "(c) bare pread loop, same files".into(),
        files.len(),
        |round| {
            for (i, cg) in files.iter().enumerate() {
                for (_, f) in cg.for_sample(round, i) {
                    black_box(f.read_at(&mut buf, 0)?);
                }
            }
            Ok(())
        },
    )
}

fn open_read_close(files: &[CgroupFiles]) -> Result<Row> {
    let mut buf = [0u8; 16 * 1024];
    measure(
        "(d) open/read/close, same files".into(),
        files.len(),
        |round| {
            for (i, cg) in files.iter().enumerate() {
                for (path, _) in cg.for_sample(round, i) {
                    let mut f = File::open(path)?;
                    black_box(f.read(&mut buf)?);
                }
            }
            Ok(())
        },
    )
}

fn print_table(rows: &[Row]) {
    println!(
        "meter: ns per container-sample, median (fastest) of {ROUNDS} rounds; \
         memory.stat on 1 sample in {STAT_REFRESH_EVERY}"
    );
    println!(
        "{:<46} {:>7} {:>10} {:>10} {:>22}",
        "case", "cgroups", "median ns", "min ns", "core % (1,000 @ 1 Hz)"
    );
    for r in rows {
        // 1,000 samples a second of `median_ns` each, as a share of one core's second.
        let core_pct = r.median_ns * 1_000.0 / 1e9 * 100.0;
        println!(
            "{:<46} {:>7} {:>10.0} {:>10.0} {:>21.3}%",
            r.case, r.cgroups, r.median_ns, r.min_ns, core_pct
        );
    }
}
