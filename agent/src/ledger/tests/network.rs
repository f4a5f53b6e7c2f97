//! Network bytes of a tenant's link: deltas in samples, windows and records, links created again,
//! readings without the link, and ledger files of schema version 1 (before network bytes).

use rusqlite::Connection;

use super::*;
use crate::meter::NetBytes;

/// A tenant sample whose reading has the link's counters (from the tenant's side).
fn net_sample(k: &MeterKey, at: u64, cpu_ns: u64, rx_bytes: u64, tx_bytes: u64) -> Sample {
    let mut s = sample(k, at, cpu_ns, 1000);
    s.counters.net = Some(NetBytes { rx_bytes, tx_bytes });
    s
}

fn bytes_of(points: &[UsagePoint]) -> Vec<(u64, u64)> {
    points.iter().map(|p| (p.rx_bytes, p.tx_bytes)).collect()
}

#[test]
fn deltas_are_summed_into_windows_records_and_totals() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(10))?;
    let t = key("acme", None);
    let c = key("acme", Some("web"));
    let mut records = Vec::new();
    let (mut rx, mut tx) = (0u64, 0u64);
    for i in 0..25u64 {
        rx += 1500 * (i % 4);
        tx += 100 + i;
        records.extend(ledger.ingest(&[
            net_sample(&t, T0 + i, (i + 1) * 10, rx, tx),
            // A container's readings have no network bytes: it shares the tenant's netns.
            sample(&c, T0 + i, (i + 1) * 5, 10),
        ])?);
    }
    // T0 % 10 == 0: windows [T0, T0+10) and [T0+10, T0+20) closed, [T0+20, T0+30) open.
    let tenant: Vec<&Record> = records.iter().filter(|r| r.container.is_none()).collect();
    assert_eq!(tenant.len(), 2);
    let window =
        |from: u64, to: u64| (from..to).fold((0, 0), |(r, t), i| (r + 1500 * (i % 4), t + 100 + i));
    assert_eq!((tenant[0].rx_bytes, tenant[0].tx_bytes), window(0, 10));
    assert_eq!((tenant[1].rx_bytes, tenant[1].tx_bytes), window(10, 20));
    assert!(
        records
            .iter()
            .filter(|r| r.container.is_some())
            .all(|r| (r.rx_bytes, r.tx_bytes) == (0, 0))
    );
    assert_eq!(all_records(&ledger)?, records, "read back as written");

    let w = ledger.usage("acme", None, T0, T0 + 30, Per::Window)?;
    assert_eq!(
        bytes_of(&w.points),
        [window(0, 10), window(10, 20), window(20, 25)],
        "two records, then the open window"
    );
    assert_eq!((w.total.rx_bytes, w.total.tx_bytes), (rx, tx));

    let s = ledger.usage("acme", None, T0 + 3, T0 + 6, Per::Second)?;
    assert_eq!(
        bytes_of(&s.points),
        [(1500 * 3, 103), (0, 104), (1500, 105)]
    );
    assert_eq!((s.total.rx_bytes, s.total.tx_bytes), (1500 * 4, 312));

    // The open window survives a restart with its bytes, and so does the baseline.
    drop(ledger);
    let mut ledger = Ledger::open(db(&dir), config(10))?;
    let closed = ledger.ingest(&[last(net_sample(&t, T0 + 25, 300, rx + 7, tx + 9))])?;
    assert_eq!(closed.len(), 1);
    let (wrx, wtx) = window(20, 25);
    assert_eq!((closed[0].rx_bytes, closed[0].tx_bytes), (wrx + 7, wtx + 9));
    Ok(())
}

#[test]
fn a_link_created_again_is_a_new_baseline_not_a_wrap() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    let t = key("t1", None);
    ledger.ingest(&[net_sample(&t, T0, 10, 5_000, 800)])?;
    ledger.ingest(&[net_sample(&t, T0 + 1, 20, 6_000, 900)])?;
    // The link is removed and created again: its counters start at 0, the cgroup's do not.
    ledger.ingest(&[net_sample(&t, T0 + 2, 30, 40, 0)])?;
    ledger.ingest(&[net_sample(&t, T0 + 3, 40, 90, 25)])?;
    let u = ledger.usage("t1", None, T0, T0 + 4, Per::Second)?;
    assert_eq!(
        bytes_of(&u.points),
        [(5_000, 800), (1_000, 100), (40, 0), (50, 25)]
    );
    assert_eq!((u.total.rx_bytes, u.total.tx_bytes), (6_090, 925));
    let cpu: Vec<u64> = u.points.iter().map(|p| p.cpu_ns).collect();
    assert_eq!(cpu, [10, 10, 10, 10], "CPU is not disturbed by the link");
    Ok(())
}

#[test]
fn a_reading_without_the_link_counts_nothing_and_keeps_the_baseline() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    let t = key("t1", None);
    ledger.ingest(&[net_sample(&t, T0, 10, 1_000, 100)])?;
    // The link could not be read for two seconds (the readings have no network bytes).
    ledger.ingest(&[sample(&t, T0 + 1, 20, 0)])?;
    ledger.ingest(&[sample(&t, T0 + 2, 30, 0)])?;
    // Readable again, the same link: everything since the last reading is counted, once.
    ledger.ingest(&[net_sample(&t, T0 + 3, 40, 1_700, 130)])?;
    let u = ledger.usage("t1", None, T0, T0 + 4, Per::Second)?;
    assert_eq!(
        bytes_of(&u.points),
        [(1_000, 100), (0, 0), (0, 0), (700, 30)]
    );
    // A crash while the link is unreadable keeps the baseline too.
    ledger.ingest(&[sample(&t, T0 + 4, 50, 0)])?;
    drop(ledger);
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    ledger.ingest(&[net_sample(&t, T0 + 5, 60, 1_750, 131)])?;
    let u = ledger.usage("t1", None, T0, T0 + 6, Per::Second)?;
    assert_eq!((u.total.rx_bytes, u.total.tx_bytes), (1_750, 131));
    Ok(())
}

#[test]
fn a_new_tenant_counts_its_link_from_zero_even_when_first_read_later() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    let t = key("t1", None);
    // The tenant's first readings come before its link is metered.
    ledger.ingest(&[sample(&t, T0, 10, 0)])?;
    ledger.ingest(&[net_sample(&t, T0 + 1, 20, 300, 40)])?;
    // The tenant is deleted (the link is gone by its final reading), and one of the same id is
    // made later, with a new link.
    let closed = ledger.ingest(&[last(sample(&t, T0 + 2, 30, 0))])?;
    assert_eq!((closed[0].rx_bytes, closed[0].tx_bytes), (300, 40));
    ledger.ingest(&[net_sample(&t, T0 + 100, 5, 20, 7)])?;
    let u = ledger.usage("t1", None, T0 + 100, T0 + 101, Per::Second)?;
    assert_eq!(bytes_of(&u.points), [(20, 7)]);
    Ok(())
}

#[test]
fn a_same_second_reading_with_fewer_bytes_is_a_replay() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(db(&dir), config(60))?;
    let t = key("t1", None);
    ledger.ingest(&[net_sample(&t, T0, 10, 500, 50)])?;
    ledger.ingest(&[net_sample(&t, T0 + 1, 20, 900, 90)])?;
    // An older reading handed in again in the last second: not a new link.
    assert!(
        ledger
            .ingest(&[last(net_sample(&t, T0 + 1, 20, 800, 90))])?
            .is_empty()
    );
    // A final reading in that second with more bytes counts what it adds.
    let closed = ledger.ingest(&[last(net_sample(&t, T0 + 1, 25, 950, 91))])?;
    assert_eq!((closed[0].rx_bytes, closed[0].tx_bytes), (950, 91));
    Ok(())
}

/// Schema version 1, as agents before network bytes created it.
const SCHEMA_V1: &str = "
CREATE TABLE meters (
    key_id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, container TEXT NOT NULL,
    cpu_ns INTEGER NOT NULL, oom_kills INTEGER NOT NULL, last_at_s INTEGER NOT NULL,
    fresh INTEGER NOT NULL, billed_until INTEGER NOT NULL, UNIQUE (tenant, container)
);
CREATE TABLE open_windows (
    key_id INTEGER PRIMARY KEY REFERENCES meters (key_id), window_start INTEGER NOT NULL,
    window_end INTEGER NOT NULL, seconds INTEGER NOT NULL, cpu_ns INTEGER NOT NULL,
    memory_byte_seconds INTEGER NOT NULL, memory_peak INTEGER NOT NULL,
    oom_kills INTEGER NOT NULL
);
CREATE TABLE samples (
    key_id INTEGER NOT NULL, at_s INTEGER NOT NULL, seconds INTEGER NOT NULL,
    cpu_ns INTEGER NOT NULL, working_set INTEGER NOT NULL, oom_kills INTEGER NOT NULL,
    PRIMARY KEY (key_id, at_s)
) WITHOUT ROWID;
CREATE INDEX samples_by_time ON samples (at_s);
CREATE TABLE records (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, node TEXT NOT NULL,
    tenant TEXT NOT NULL, container TEXT NOT NULL, window_start INTEGER NOT NULL,
    window_secs INTEGER NOT NULL, seconds INTEGER NOT NULL, cpu_ns INTEGER NOT NULL,
    memory_byte_seconds INTEGER NOT NULL, memory_peak INTEGER NOT NULL,
    oom_kills INTEGER NOT NULL
);
CREATE INDEX records_by_key ON records (tenant, container, window_start);
CREATE INDEX records_by_tenant ON records (tenant);
CREATE TABLE ledger_state (
    id INTEGER PRIMARY KEY CHECK (id = 1), acked_cursor INTEGER NOT NULL,
    meters_pruned_before INTEGER NOT NULL
);
INSERT INTO ledger_state (id, acked_cursor, meters_pruned_before) VALUES (1, 0, 0);
CREATE TABLE cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
PRAGMA application_id = 1667326323;
PRAGMA user_version = 1;
";

/// Every table's columns as `PRAGMA table_info` lists them: name, type, not null, default,
/// primary key position.
fn columns(path: &Path) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let conn = Connection::open(path)?;
    let mut tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    tables.retain(|t| t != "sqlite_sequence");
    let mut out = Vec::new();
    for t in tables {
        let cols = conn
            .prepare(&format!("PRAGMA table_info({t})"))?
            .query_map([], |r| {
                Ok(format!(
                    "{} {} notnull={} default={:?} pk={}",
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?
                ))
            })?
            .collect::<Result<_, _>>()?;
        out.push((t, cols));
    }
    Ok(out)
}

#[test]
fn a_version_1_ledger_is_migrated_and_keeps_counting() -> TestResult {
    let dir = tempfile::tempdir()?;
    let old = dir.path().join("v1.db");
    {
        // A v1 ledger in use: a tenant and a container with a baseline, an open window, per-second
        // rows and a record, as a v1 agent left them.
        let conn = Connection::open(&old)?;
        conn.execute_batch(SCHEMA_V1)?;
        conn.execute_batch(&format!(
            "INSERT INTO meters VALUES (1, 'acme', '', 5000, 1, {at}, 0, {start});
             INSERT INTO meters VALUES (2, 'acme', 'web', 700, 0, {at}, 0, {start});
             INSERT INTO open_windows VALUES (1, {start}, {end}, 9, 900, 9000, 1000, 0);
             INSERT INTO samples VALUES (1, {at}, 1, 100, 1000, 0);
             INSERT INTO records (id, node, tenant, container, window_start, window_secs, seconds,
                     cpu_ns, memory_byte_seconds, memory_peak, oom_kills)
                 VALUES ('node-1/acme/-/{prev}', 'node-1', 'acme', '', {prev}, 60, 60, 4100,
                         60000, 1000, 1);",
            at = T0 + 8,
            start = T0 - T0 % 60,
            end = T0 - T0 % 60 + 60,
            prev = T0 - T0 % 60 - 60,
        ))?;
    }

    let mut ledger = Ledger::open(&old, config(60))?;
    let version: i64 =
        Connection::open(&old)?.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    assert_eq!(version, schema::SCHEMA_VERSION);
    let fresh = dir.path().join("new.db");
    drop(Ledger::open(&fresh, config(60))?);
    assert_eq!(
        columns(&old)?,
        columns(&fresh)?,
        "a migrated file has the schema of a new one"
    );

    // Old rows read with 0 bytes.
    let old_records = all_records(&ledger)?;
    assert_eq!(old_records.len(), 1);
    assert_eq!(
        (
            old_records[0].cpu_ns,
            old_records[0].rx_bytes,
            old_records[0].tx_bytes
        ),
        (4100, 0, 0)
    );
    let s = ledger.usage("acme", None, 0, T0 + 100, Per::Second)?;
    assert_eq!(bytes_of(&s.points), [(0, 0)]);
    assert_eq!(s.total.cpu_ns, 100);

    // The tenant's link has been counting since before the upgrade: its first reading is the
    // baseline only, not a bill for its whole life. CPU continues from the v1 baseline.
    let t = key("acme", None);
    ledger.ingest(&[net_sample(&t, T0 + 9, 5300, 7_000_000, 3_000_000)])?;
    ledger.ingest(&[net_sample(&t, T0 + 10, 5400, 7_000_500, 3_000_040)])?;
    let s = ledger.usage("acme", None, T0 + 9, T0 + 11, Per::Second)?;
    assert_eq!(bytes_of(&s.points), [(0, 0), (500, 40)]);
    let cpu: Vec<u64> = s.points.iter().map(|p| p.cpu_ns).collect();
    assert_eq!(cpu, [300, 100]);
    // The window opened by the v1 agent closes with v1 usage and the new bytes.
    let closed = ledger.ingest(&[last(net_sample(&t, T0 + 11, 5500, 7_000_600, 3_000_050))])?;
    assert_eq!(closed.len(), 1);
    let r = &closed[0];
    assert_eq!(r.cursor, 2);
    assert_eq!((r.cpu_ns, r.rx_bytes, r.tx_bytes), (900 + 500, 600, 50));

    // Opening the migrated file again changes nothing.
    drop(ledger);
    let ledger = Ledger::open(&old, config(60))?;
    assert_eq!(all_records(&ledger)?.len(), 2);
    assert_eq!(columns(&old)?, columns(&fresh)?);
    Ok(())
}
