//! Unit tests of the ledger, each on its own temporary database.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::*;
use crate::meter::Counters;

mod network;
mod random;

type TestResult = anyhow::Result<()>;

const T0: u64 = 1_700_000_000; // a multiple of 3600 would hide misalignment: this is not

fn config(window_secs: u32) -> LedgerConfig {
    LedgerConfig {
        window_secs,
        ..LedgerConfig::new("node-1")
    }
}

fn key(tenant: &str, container: Option<&str>) -> MeterKey {
    MeterKey {
        tenant: tenant.to_owned(),
        container: container.map(str::to_owned),
    }
}

fn sample(key: &MeterKey, at: u64, cpu_ns: u64, working_set: u64) -> Sample {
    Sample {
        key: key.clone(),
        at_unix_s: at,
        read_at_ns: 0,
        counters: Counters {
            cpu_ns,
            memory_working_set: working_set,
            ..Counters::default()
        },
        last: false,
    }
}

fn last(mut s: Sample) -> Sample {
    s.last = true;
    s
}

fn db(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("ledger.db")
}

fn all_records(ledger: &Ledger) -> anyhow::Result<Vec<Record>> {
    Ok(ledger.read_records(0, usize::MAX, None)?)
}

/// CPU billed for a key: its records plus its open window.
fn billed(ledger: &Ledger, k: &MeterKey) -> anyhow::Result<(u64, u64)> {
    let s = ledger.usage(
        &k.tenant,
        k.container.as_deref(),
        0,
        u64::MAX >> 1,
        Per::Window,
    )?;
    Ok((s.total.cpu_ns, s.total.memory_byte_seconds))
}

/// The files as they are on disk at this instant, copied elsewhere: what a kill -9 of the agent
/// now would leave behind (the page cache survives the process).
fn crash_copy(path: &Path, to: &Path) -> anyhow::Result<PathBuf> {
    let dst = to.join("crashed.db");
    std::fs::copy(path, &dst)?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let mut dst_wal = dst.as_os_str().to_owned();
    dst_wal.push("-wal");
    if Path::new(&wal).exists() {
        std::fs::copy(&wal, &dst_wal)?;
    }
    Ok(dst)
}

#[test]
fn ledger_is_send() {
    fn send<T: Send>() {}
    send::<Ledger>();
}

#[test]
fn exact_cpu_across_window_boundaries() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(10))?;
    let c = key("acme", Some("web"));
    let t = key("acme", None);
    let (mut cpu, mut records) = (0u64, Vec::new());
    let mut per_window: HashMap<u64, u64> = HashMap::new();
    for i in 0..95u64 {
        let at = T0 + i;
        let d = 1_000_003 * (i % 7) + 11;
        cpu += d;
        *per_window.entry(at - at % 10).or_default() += d;
        let batch = [sample(&c, at, cpu, 4096), sample(&t, at, 2 * cpu, 8192)];
        records.extend(ledger.ingest(&batch)?);
    }
    // T0 % 10 == 0, so 95 seconds close 9 windows per key and leave the 10th open.
    assert_eq!(records.len(), 18);
    assert_eq!(records, all_records(&ledger)?);
    let cursors: Vec<u64> = records.iter().map(|r| r.cursor).collect();
    assert_eq!(cursors, (1..=18).collect::<Vec<_>>());
    for r in records.iter().filter(|r| r.container.is_some()) {
        assert_eq!(r.window_start_unix_s % 10, 0);
        assert_eq!(r.window_secs, 10);
        assert_eq!(r.cpu_ns, per_window[&r.window_start_unix_s], "{}", r.id);
        assert_eq!(r.memory_peak_bytes, 4096);
        assert_eq!(r.id, format!("node-1/acme/web/{}", r.window_start_unix_s));
    }
    let tenant_record = records
        .iter()
        .find(|r| r.container.is_none())
        .expect("tenant record");
    assert_eq!(tenant_record.id, format!("node-1/acme/-/{T0}"));
    // The first sample of a new key counts 1 s of memory, every later one 1 s.
    assert_eq!(billed(&ledger, &c)?, (cpu, 95 * 4096));
    assert_eq!(billed(&ledger, &t)?, (2 * cpu, 95 * 8192));
    let closed: u64 = records
        .iter()
        .filter(|r| r.container.is_some())
        .map(|r| r.cpu_ns)
        .sum();
    let open = ledger.usage("acme", Some("web"), T0 + 90, T0 + 100, Per::Window)?;
    assert_eq!(closed + open.total.cpu_ns, cpu);
    Ok(())
}

#[test]
fn kill_mid_window_and_reopen_resumes_from_baseline_across_a_gap() -> TestResult {
    let dir = tempfile::tempdir()?;
    let crash_dir = tempfile::tempdir()?;
    let c = key("t1", Some("job"));
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    let mut cpu = 0;
    for i in 0..25 {
        cpu += 7_777_777;
        ledger.ingest(&[sample(&c, T0 + i, cpu, 1000)])?;
    }
    // kill -9 mid-window: no close, no checkpoint; reopen what the disk holds.
    let crashed = crash_copy(&db(&dir), crash_dir.path())?;
    drop(ledger);
    let mut ledger = Ledger::open(&crashed, config(60))?;
    // The agent was down 9 s; the kernel kept counting.
    cpu += 9 * 5_000_000;
    let at = T0 + 25 + 8;
    ledger.ingest(&[sample(&c, at, cpu, 3000)])?;
    let per_second = ledger.usage("t1", Some("job"), T0, T0 + 100, Per::Second)?;
    let gap = per_second.points.last().expect("gap point");
    assert_eq!(
        (gap.time_unix_s, gap.seconds, gap.cpu_ns),
        (at, 9, 45_000_000)
    );
    assert_eq!(
        gap.memory_byte_seconds,
        9 * 3000,
        "a gap assumes the later level"
    );
    for i in 1..=100 {
        cpu += 3_000_000;
        ledger.ingest(&[sample(&c, at + i, cpu, 1000)])?;
    }
    ledger.close_idle(at + 100 + 60 + IDLE_GRACE_SECS)?;
    let records = all_records(&ledger)?;
    assert_eq!(records.iter().map(|r| r.cpu_ns).sum::<u64>(), cpu);
    assert_eq!(per_second.total.cpu_ns + 300_000_000, cpu);
    assert_eq!(
        records.iter().map(|r| r.memory_byte_seconds).sum::<u64>(),
        25 * 1000 + 9 * 3000 + 100 * 1000
    );
    Ok(())
}

#[test]
fn counter_going_backwards_starts_a_new_baseline() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    let c = key("t1", Some("c1"));
    let mut s = sample(&c, T0, 500, 0);
    s.counters.oom_kills = 3;
    ledger.ingest(&[s])?;
    ledger.ingest(&[sample(&c, T0 + 1, 900, 0)])?; // oom_kills back to 0: a new cgroup
    ledger.ingest(&[sample(&c, T0 + 2, 40, 0)])?; // recreated: 40 is new usage
    let mut s = sample(&c, T0 + 3, 100, 0);
    s.counters.oom_kills = 1;
    ledger.ingest(&[s])?;
    let u = ledger.usage("t1", Some("c1"), T0, T0 + 4, Per::Second)?;
    let cpu: Vec<u64> = u.points.iter().map(|p| p.cpu_ns).collect();
    assert_eq!(cpu, [500, 400, 40, 60]);
    assert_eq!(u.total.oom_kills, 3 + 1);
    Ok(())
}

#[test]
fn single_last_sample_of_a_new_key_is_billed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    let c = key("t1", Some("blip"));
    let records = ledger.ingest(&[last(sample(&c, T0 + 30, 300_000_000, 2 << 20))])?;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!((r.cpu_ns, r.memory_byte_seconds), (300_000_000, 2 << 20));
    assert_eq!(r.window_start_unix_s, T0 + 30 - (T0 + 30) % 60);
    assert!((r.cpu_seconds() - 0.3).abs() < 1e-9);
    assert!((r.memory_gib_seconds() - 2.0 / 1024.0).abs() < 1e-12);
    // A new container with the same id later: a new cgroup, counting from 0 again.
    let records = ledger.ingest(&[last(sample(&c, T0 + 200, 5, 0))])?;
    assert_eq!(records[0].cpu_ns, 5);
    // Recreated again within the window its predecessor's `last` closed: the window's id is
    // taken, so it is billed in the next window.
    let records = ledger.ingest(&[last(sample(&c, T0 + 201, 7, 0))])?;
    let start = T0 + 200 - (T0 + 200) % 60;
    assert_eq!(
        (records[0].window_start_unix_s, records[0].cpu_ns),
        (start + 60, 7)
    );
    Ok(())
}

#[test]
fn last_sample_in_a_later_window_closes_both_windows() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(10))?;
    let c = key("t1", Some("c1"));
    ledger.ingest(&[sample(&c, T0 + 5, 10, 0)])?;
    let records = ledger.ingest(&[last(sample(&c, T0 + 12, 25, 0))])?;
    let got: Vec<(u64, u64)> = records
        .iter()
        .map(|r| (r.window_start_unix_s, r.cpu_ns))
        .collect();
    assert_eq!(got, [(T0, 10), (T0 + 10, 15)]);
    Ok(())
}

#[test]
fn replayed_batches_are_not_counted_twice() -> TestResult {
    let dir = tempfile::tempdir()?;
    let c = key("t1", Some("c1"));
    let batches: Vec<Vec<Sample>> = (0..30)
        .map(|i| vec![sample(&c, T0 + i, (i + 1) * 1000, 10)])
        .collect();
    let mut ledger = Ledger::open(db(&dir), config(10))?;
    for b in &batches[..20] {
        ledger.ingest(b)?;
    }
    ledger.ingest(&batches[19])?; // the caller retried a batch that had committed
    drop(ledger);
    let mut ledger = Ledger::open(db(&dir), config(10))?;
    for b in &batches[15..] {
        ledger.ingest(b)?; // replayed after restart, then new ones
    }
    let dup = [batches[29][0].clone(), batches[29][0].clone()];
    assert!(ledger.ingest(&dup)?.is_empty());
    ledger.close_idle(T0 + 100)?;
    let records = all_records(&ledger)?;
    let ids: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), records.len());
    assert_eq!(records.iter().map(|r| r.cpu_ns).sum::<u64>(), 30_000);
    assert_eq!(
        records.iter().map(|r| r.memory_byte_seconds).sum::<u64>(),
        300
    );
    let per_second = ledger.usage("t1", Some("c1"), 0, u64::MAX >> 1, Per::Second)?;
    assert_eq!(per_second.points.len(), 30);
    Ok(())
}

#[test]
fn a_late_sample_after_an_idle_close_goes_to_the_next_window() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(10))?;
    let c = key("t1", Some("c1"));
    ledger.ingest(&[sample(&c, T0 + 1, 100, 0)])?;
    assert!(ledger.close_idle(T0 + 10 + IDLE_GRACE_SECS - 1)?.is_empty());
    let idle = ledger.close_idle(T0 + 10 + IDLE_GRACE_SECS)?;
    assert_eq!(idle.len(), 1);
    assert_eq!(idle[0].window_start_unix_s, T0);
    // A stalled meter delivers a sample of the closed window.
    ledger.ingest(&[sample(&c, T0 + 9, 150, 0)])?;
    let records = ledger.ingest(&[sample(&c, T0 + 20, 170, 0)])?;
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].window_start_unix_s, records[0].cpu_ns),
        (T0 + 10, 50)
    );
    assert_eq!(billed(&ledger, &c)?.0, 170);
    Ok(())
}

#[test]
fn read_ack_and_prune() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(1);
    cfg.sample_retention_secs = 60;
    cfg.record_retention_secs = 100;
    let mut ledger = Ledger::open(db(&dir), cfg.clone())?;
    let (a, b) = (key("a", None), key("b", Some("x")));
    for i in 0..10 {
        ledger.ingest(&[
            sample(&a, T0 + i, i * 10 + 10, 0),
            sample(&b, T0 + i, i + 1, 0),
        ])?;
    }
    ledger.ingest(&[last(sample(&b, T0 + 10, 11, 0))])?;
    // Windows of 1 s: 9 closed windows of a, 11 of b (its last sample closes two).
    assert_eq!(ledger.last_cursor()?, 20);
    let page = ledger.read_records(5, 3, None)?;
    assert_eq!(page.iter().map(|r| r.cursor).collect::<Vec<_>>(), [6, 7, 8]);
    let only_b = ledger.read_records(0, 100, Some("b"))?;
    assert_eq!(only_b.len(), 11);
    assert!(only_b.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert!(only_b.iter().all(|r| r.tenant == "b"));

    assert_eq!(ledger.acked()?, 0);
    assert_eq!(ledger.ack(10)?, 10);
    assert_eq!(ledger.ack(4)?, 10, "acks never go back");
    let err = ledger.ack(21).expect_err("beyond the end");
    assert!(
        err.to_string().contains("beyond the last record cursor 20"),
        "{err}"
    );

    // Nothing is old enough yet.
    assert_eq!(ledger.prune(T0 + 20)?, PruneReport::default());
    // Samples older than 60 s go; acked records (cursor <= 10) older than 100 s go; b's state
    // (ended at T0 + 10) goes; unacked records stay however old.
    let report = ledger.prune(T0 + 200)?;
    assert_eq!(report.samples, 21);
    assert_eq!(report.records, 10);
    assert_eq!(report.keys, 1);
    let left = all_records(&ledger)?;
    assert_eq!(left.first().map(|r| r.cursor), Some(11));
    assert_eq!(left.len(), 10);
    let stats = ledger.stats()?;
    assert_eq!(
        (stats.records, stats.unacked_records, stats.keys),
        (10, 10, 1)
    );
    assert!(stats.db_bytes > 0);
    // Cursors are never reused, even once the table is empty.
    ledger.ack(20)?;
    ledger.prune(T0 + 10_000)?;
    assert!(all_records(&ledger)?.is_empty());
    assert_eq!(ledger.last_cursor()?, 20);
    let r = ledger.ingest(&[sample(&a, T0 + 10_000, 1000, 0)])?;
    assert_eq!((r[0].cursor, r[0].window_start_unix_s), (21, T0 + 9));
    // A replay of the pruned key b is not billed as a new cgroup.
    assert!(
        ledger
            .ingest(&[last(sample(&b, T0 + 10, 11, 0))])?
            .is_empty()
    );
    drop(ledger);
    let ledger = Ledger::open(db(&dir), cfg)?;
    assert_eq!((ledger.acked()?, ledger.last_cursor()?), (20, 21));
    Ok(())
}

#[test]
fn exporter_cursors() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    assert_eq!(ledger.cursor("cloudevents")?, 0);
    ledger.set_cursor("cloudevents", 42)?;
    ledger.set_cursor("grpc", 7)?;
    ledger.set_cursor("grpc", 3)?;
    drop(ledger);
    let ledger = Ledger::open(db(&dir), config(60))?;
    assert_eq!(
        (ledger.cursor("cloudevents")?, ledger.cursor("grpc")?),
        (42, 3)
    );
    Ok(())
}

#[test]
fn usage_per_second_and_per_window() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(10))?;
    let c = key("t1", Some("c1"));
    for (i, ws) in [
        (0u64, 100u64),
        (1, 300),
        (2, 200),
        (10, 50),
        (11, 50),
        (12, 80),
    ] {
        ledger.ingest(&[sample(&c, T0 + i, (i + 1) * 10, ws)])?;
    }
    let s = ledger.usage("t1", Some("c1"), T0 + 1, T0 + 11, Per::Second)?;
    let got: Vec<(u64, u64, u64, u64)> = s
        .points
        .iter()
        .map(|p| {
            (
                p.time_unix_s - T0,
                p.seconds,
                p.cpu_ns,
                p.memory_byte_seconds,
            )
        })
        .collect();
    assert_eq!(got, [(1, 1, 10, 300), (2, 1, 10, 200), (10, 8, 80, 400)]);
    assert_eq!(s.total.memory_peak, 300);
    assert_eq!(s.total.memory_working_set, 900 / 10);

    let w = ledger.usage("t1", Some("c1"), T0, T0 + 20, Per::Window)?;
    let got: Vec<(u64, u64, u64, u64, u64)> = w
        .points
        .iter()
        .map(|p| {
            let t = p.time_unix_s - T0;
            (t, p.seconds, p.cpu_ns, p.memory_byte_seconds, p.memory_peak)
        })
        .collect();
    // The closed window, then the open one (holding the 8-second gap).
    assert_eq!(got, [(0, 3, 30, 600, 300), (10, 10, 100, 530, 80)]);
    assert_eq!(w.total.cpu_ns, 130);
    assert_eq!(w.points[0].memory_working_set, 200);
    assert!(
        ledger
            .usage("nobody", None, T0, T0 + 20, Per::Second)?
            .points
            .is_empty()
    );
    Ok(())
}

#[test]
fn invalid_keys_are_dropped_not_fatal() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    let good = key("t1", None);
    let batch = [
        last(sample(&key("a/b", None), T0, 5, 0)),
        last(sample(&key("t1", Some("-")), T0, 5, 0)),
        last(sample(&good, T0, 5, 0)),
    ];
    let records = ledger.ingest(&batch)?;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id, format!("node-1/t1/-/{}", T0 - T0 % 60));
    Ok(())
}

#[test]
fn config_is_validated() -> TestResult {
    let dir = tempfile::tempdir()?;
    for bad in [0, 3601] {
        let err = Ledger::open(db(&dir), config(bad)).expect_err("window refused");
        assert_eq!(
            err.to_string(),
            format!("invalid ledger config: window_secs must be 1..=3600 seconds, is {bad}")
        );
    }
    for good in [1, 3600] {
        Ledger::open(db(&dir), config(good))?;
    }
    let err = Ledger::open(db(&dir), LedgerConfig::new("a/b")).expect_err("node refused");
    assert!(err.to_string().contains("node"), "{err}");
    let mut cfg = config(60);
    cfg.sample_retention_secs = 1;
    let err = Ledger::open(db(&dir), cfg).expect_err("retention refused");
    assert!(err.to_string().contains("sample_retention_secs"), "{err}");
    Ok(())
}

#[test]
fn future_schema_and_foreign_files_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    drop(Ledger::open(db(&dir), config(60))?);
    rusqlite::Connection::open(db(&dir))?.pragma_update(None, "user_version", 3)?;
    let err = Ledger::open(db(&dir), config(60)).expect_err("future version refused");
    assert!(
        err.to_string()
            .contains("has schema version 3; this agent knows versions up to 2"),
        "{err}"
    );

    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)?.execute_batch("CREATE TABLE t (x INTEGER)")?;
    let err = Ledger::open(&other, config(60)).expect_err("foreign file refused");
    assert!(
        err.to_string().contains("is not a caas-agent ledger"),
        "{err}"
    );
    Ok(())
}

#[test]
fn final_reading_in_the_same_second_as_the_last_tick_counts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    let c = key("t1", Some("short"));
    ledger.ingest(&[sample(&c, T0 + 10, 100, 1 << 20)])?;
    // The container ends 0.7 s after that tick: its final reading has the same second.
    let records = ledger.ingest(&[last(sample(&c, T0 + 10, 180, 1 << 20))])?;
    assert_eq!(records.len(), 1, "the last reading closes the window");
    assert_eq!(records[0].cpu_ns, 180);
    // A second that adds no time adds no memory.
    assert_eq!(records[0].memory_byte_seconds, 1 << 20);
    // A replay of an older reading in that second is still ignored.
    let d = key("t1", Some("other"));
    ledger.ingest(&[sample(&d, T0 + 10, 500, 0)])?;
    assert!(ledger.ingest(&[sample(&d, T0 + 10, 400, 0)])?.is_empty());
    let records = ledger.ingest(&[last(sample(&d, T0 + 10, 400, 0))])?;
    assert!(records.is_empty(), "a lower final reading is a replay");
    assert_eq!(billed(&ledger, &d)?.0, 500);
    Ok(())
}
