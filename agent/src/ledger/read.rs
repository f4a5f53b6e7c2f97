//! Reading the ledger: billing records by cursor, the consumer's ack, exporter cursors, usage
//! series, pruning and size statistics.

use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use super::error::{LedgerError, SqlContext, add, from_sql, to_sql};
use super::meter::Window;
use super::schema::TENANT_SUBTREE;
use super::{Ledger, MeterKey};

/// One closed window of one key: what billing consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the ledger, increasing with every record ever written (never reused).
    pub cursor: u64,
    /// Deterministic id: `node/tenant/container/window_start`, container `-` for the tenant's
    /// whole subtree. Billing deduplicates on it.
    pub id: String,
    /// The node that measured it.
    pub node: String,
    /// The tenant.
    pub tenant: String,
    /// The container, or `None` for the tenant's whole subtree.
    pub container: Option<String>,
    /// First second of the window (Unix seconds).
    pub window_start_unix_s: u64,
    /// Length of the window in seconds.
    pub window_secs: u32,
    /// CPU time used, in nanoseconds.
    pub cpu_ns: u64,
    /// Memory working set integrated over time, in byte-seconds.
    pub memory_byte_seconds: u64,
    /// Highest working set sampled in the window, in bytes.
    pub memory_peak_bytes: u64,
    /// OOM kills in the window.
    pub oom_kills: u64,
    /// Bytes the tenant received over its network link in the window (L2, headers included);
    /// 0 for a container, whose traffic is its tenant's.
    pub rx_bytes: u64,
    /// Bytes the tenant sent over its network link in the window (L2, headers included); 0 for
    /// a container.
    pub tx_bytes: u64,
}

impl Record {
    /// CPU time in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.cpu_ns as f64 / 1e9
    }

    /// Memory in GiB-seconds.
    pub fn memory_gib_seconds(&self) -> f64 {
        self.memory_byte_seconds as f64 / (1u64 << 30) as f64
    }
}

/// The resolution of a usage series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    /// One point per sample, from the per-second table (kept for the sample retention).
    Second,
    /// One point per billing window: the records, then the window still open.
    Window,
}

/// Usage over a span of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsagePoint {
    /// The sample's second, or the window's start.
    pub time_unix_s: u64,
    /// Seconds covered: 1 per sample normally, more after a gap in sampling.
    pub seconds: u64,
    /// CPU time used, in nanoseconds.
    pub cpu_ns: u64,
    /// Working set integrated over time, in byte-seconds.
    pub memory_byte_seconds: u64,
    /// Working set in bytes: the sampled value per second, the time-weighted average
    /// (`memory_byte_seconds / seconds`) per window and in the total.
    pub memory_working_set: u64,
    /// Highest working set sampled in the span, in bytes.
    pub memory_peak: u64,
    /// OOM kills.
    pub oom_kills: u64,
    /// Bytes the tenant received over its network link (0 for a container).
    pub rx_bytes: u64,
    /// Bytes the tenant sent over its network link (0 for a container).
    pub tx_bytes: u64,
}

/// A usage series, oldest point first, with its total (whose `time_unix_s` is the query's start).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageSeries {
    /// The points.
    pub points: Vec<UsagePoint>,
    /// Sum of the points (peak: their maximum).
    pub total: UsagePoint,
}

/// Size of the ledger, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerStats {
    /// Bytes of the database file and its write-ahead log.
    pub db_bytes: u64,
    /// Records held.
    pub records: u64,
    /// Records after the acknowledged cursor.
    pub unacked_records: u64,
    /// Keys with an open window.
    pub open_windows: u64,
    /// Keys whose state is held.
    pub keys: u64,
}

/// What [`Ledger::prune`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PruneReport {
    /// Per-second samples.
    pub samples: u64,
    /// Acknowledged records past their retention.
    pub records: u64,
    /// State of keys whose cgroup ended before the sample retention.
    pub keys: u64,
}

const RECORD_COLUMNS: &str = "cursor, id, node, tenant, container, window_start, window_secs, \
     cpu_ns, memory_byte_seconds, memory_peak, oom_kills, rx_bytes, tx_bytes";

fn record_from_row(r: &Row<'_>) -> Result<Record, LedgerError> {
    let u = |i: usize, what: &'static str| -> Result<u64, LedgerError> {
        from_sql(r.get(i).ctx("read record column")?, what)
    };
    let container: String = r.get(4).ctx("read record container")?;
    Ok(Record {
        cursor: u(0, "record cursor")?,
        id: r.get(1).ctx("read record id")?,
        node: r.get(2).ctx("read record node")?,
        tenant: r.get(3).ctx("read record tenant")?,
        container: (container != TENANT_SUBTREE).then_some(container),
        window_start_unix_s: u(5, "record window_start")?,
        window_secs: r.get(6).ctx("read record window_secs")?,
        cpu_ns: u(7, "record cpu_ns")?,
        memory_byte_seconds: u(8, "record memory_byte_seconds")?,
        memory_peak_bytes: u(9, "record memory_peak")?,
        oom_kills: u(10, "record oom_kills")?,
        rx_bytes: u(11, "record rx_bytes")?,
        tx_bytes: u(12, "record tx_bytes")?,
    })
}

fn limit_sql(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Ledger {
    /// Up to `limit` records after `after_cursor`, by cursor, of every tenant or of one.
    pub fn read_records(
        &self,
        after_cursor: u64,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<Record>, LedgerError> {
        let after = to_sql(after_cursor, "cursor")?;
        let mut out = Vec::new();
        let mut push = |r: &Row<'_>| -> Result<(), LedgerError> {
            out.push(record_from_row(r)?);
            Ok(())
        };
        match tenant {
            None => {
                let mut stmt = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT {RECORD_COLUMNS} FROM records WHERE cursor > ?1
                         ORDER BY cursor LIMIT ?2"
                    ))
                    .ctx("prepare record read")?;
                let mut rows = stmt
                    .query(params![after, limit_sql(limit)])
                    .ctx("read records")?;
                while let Some(r) = rows.next().ctx("read records")? {
                    push(r)?;
                }
            }
            Some(tenant) => {
                let mut stmt = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT {RECORD_COLUMNS} FROM records INDEXED BY records_by_tenant
                         WHERE tenant = ?1 AND cursor > ?2 ORDER BY cursor LIMIT ?3"
                    ))
                    .ctx("prepare tenant record read")?;
                let mut rows = stmt
                    .query(params![tenant, after, limit_sql(limit)])
                    .ctx("read tenant records")?;
                while let Some(r) = rows.next().ctx("read tenant records")? {
                    push(r)?;
                }
            }
        }
        Ok(out)
    }

    /// The cursor of the newest record ever written (0 before the first), pruned or not.
    pub fn last_cursor(&self) -> Result<u64, LedgerError> {
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'records'",
                [],
                |r| r.get(0),
            )
            .optional()
            .ctx("read last cursor")?;
        from_sql(seq.unwrap_or(0), "last cursor")
    }

    /// The acknowledged cursor: every record up to it was delivered to billing.
    pub fn acked(&self) -> Result<u64, LedgerError> {
        let acked: i64 = self
            .conn
            .query_row(
                "SELECT acked_cursor FROM ledger_state WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .ctx("read acked cursor")?;
        from_sql(acked, "acked cursor")
    }

    /// Acknowledges every record up to `cursor` and returns the acknowledged cursor. Acks only
    /// move forward: a lower cursor changes nothing. A cursor beyond the last record is refused,
    /// since it would acknowledge records not yet written.
    pub fn ack(&mut self, cursor: u64) -> Result<u64, LedgerError> {
        let last = self.last_cursor()?;
        if cursor > last {
            return Err(LedgerError::AckBeyondEnd { cursor, last });
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("begin ack transaction")?;
        tx.execute(
            "UPDATE ledger_state SET acked_cursor = max(acked_cursor, ?1) WHERE id = 1",
            [to_sql(cursor, "ack cursor")?],
        )
        .ctx("write ack")?;
        tx.commit().ctx("commit ack")?;
        self.acked()
    }

    /// A named exporter cursor, 0 if never set.
    pub fn cursor(&self, name: &str) -> Result<u64, LedgerError> {
        let value: Option<i64> = self
            .conn
            .prepare_cached("SELECT value FROM cursors WHERE name = ?1")
            .ctx("prepare cursor read")?
            .query_row([name], |r| r.get(0))
            .optional()
            .ctx("read cursor")?;
        from_sql(value.unwrap_or(0), "exporter cursor")
    }

    /// Sets a named exporter cursor.
    pub fn set_cursor(&mut self, name: &str, value: u64) -> Result<(), LedgerError> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO cursors (name, value) VALUES (?1, ?2)")
            .ctx("prepare cursor write")?
            .execute(params![name, to_sql(value, "exporter cursor")?])
            .ctx("write cursor")?;
        Ok(())
    }

    /// Deletes samples older than the sample retention, acknowledged records whose window ended
    /// before the record retention (never an unacknowledged one), and the state of keys whose
    /// cgroup ended before the sample retention.
    pub fn prune(&mut self, now_unix_s: u64) -> Result<PruneReport, LedgerError> {
        let sample_cutoff = now_unix_s.saturating_sub(self.config.sample_retention_secs);
        let record_cutoff = now_unix_s.saturating_sub(self.config.record_retention_secs);
        // Only keys whose samples all go now, so no sample outlives its key's state.
        let ended: Vec<(MeterKey, i64)> = self
            .meters
            .iter()
            .filter(|(_, m)| {
                m.fresh && m.open.is_none() && m.last_at_s.is_some_and(|at| at < sample_cutoff)
            })
            .map(|(k, m)| (k.clone(), m.key_id))
            .collect();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("begin prune transaction")?;
        let samples = tx
            .execute(
                "DELETE FROM samples WHERE at_s < ?1",
                [to_sql(sample_cutoff, "sample cutoff")?],
            )
            .ctx("prune samples")?;
        let records = tx
            .execute(
                "DELETE FROM records
                 WHERE cursor <= (SELECT acked_cursor FROM ledger_state WHERE id = 1)
                   AND window_start + window_secs <= ?1",
                [to_sql(record_cutoff, "record cutoff")?],
            )
            .ctx("prune records")?;
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM meters WHERE key_id = ?1")
                .ctx("prepare key prune")?;
            for (_, key_id) in &ended {
                stmt.execute([key_id]).ctx("prune key")?;
            }
        }
        let pruned_before = if ended.is_empty() {
            self.meters_pruned_before
        } else {
            self.meters_pruned_before.max(sample_cutoff)
        };
        tx.execute(
            "UPDATE ledger_state SET meters_pruned_before = ?1 WHERE id = 1",
            [to_sql(pruned_before, "pruned-before second")?],
        )
        .ctx("write pruned-before second")?;
        tx.commit().ctx("commit prune")?;
        for (key, _) in &ended {
            self.meters.remove(key);
        }
        self.meters_pruned_before = pruned_before;
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Ok(PruneReport {
            samples: count(samples),
            records: count(records),
            keys: count(ended.len()),
        })
    }

    /// Usage of one key (`container` `None`: the tenant's whole subtree) in `[start_s, end_s)`.
    /// An unknown key has an empty series.
    pub fn usage(
        &self,
        tenant: &str,
        container: Option<&str>,
        start_s: u64,
        end_s: u64,
        per: Per,
    ) -> Result<UsageSeries, LedgerError> {
        let key = MeterKey {
            tenant: tenant.to_owned(),
            container: container.map(str::to_owned),
        };
        let mut points = Vec::new();
        let (start, end) = (to_sql(start_s, "usage start")?, to_sql(end_s, "usage end")?);
        match per {
            Per::Second => {
                if let Some(meter) = self.meters.get(&key) {
                    let mut stmt = self
                        .conn
                        .prepare_cached(
                            "SELECT at_s, seconds, cpu_ns, working_set, oom_kills, rx_bytes,
                                    tx_bytes
                             FROM samples
                             WHERE key_id = ?1 AND at_s >= ?2 AND at_s < ?3 ORDER BY at_s",
                        )
                        .ctx("prepare sample read")?;
                    let mut rows = stmt
                        .query(params![meter.key_id, start, end])
                        .ctx("read samples")?;
                    while let Some(r) = rows.next().ctx("read samples")? {
                        let u = |i: usize, what: &'static str| -> Result<u64, LedgerError> {
                            from_sql(r.get(i).ctx("read sample column")?, what)
                        };
                        let seconds = u(1, "sample seconds")?;
                        let working_set = u(3, "sample working set")?;
                        points.push(UsagePoint {
                            time_unix_s: u(0, "sample second")?,
                            seconds,
                            cpu_ns: u(2, "sample cpu_ns")?,
                            memory_byte_seconds: working_set.checked_mul(seconds).ok_or(
                                LedgerError::Overflow {
                                    what: "sample memory byte-seconds",
                                },
                            )?,
                            memory_working_set: working_set,
                            memory_peak: working_set,
                            oom_kills: u(4, "sample oom_kills")?,
                            rx_bytes: u(5, "sample rx_bytes")?,
                            tx_bytes: u(6, "sample tx_bytes")?,
                        });
                    }
                }
            }
            Per::Window => {
                let mut stmt = self
                    .conn
                    .prepare_cached(
                        "SELECT window_start, window_secs, seconds, cpu_ns, memory_byte_seconds,
                                memory_peak, oom_kills, rx_bytes, tx_bytes
                         FROM records
                         WHERE tenant = ?1 AND container = ?2
                           AND window_start >= ?3 AND window_start < ?4
                         ORDER BY window_start",
                    )
                    .ctx("prepare window read")?;
                let container = container.unwrap_or(TENANT_SUBTREE);
                let mut rows = stmt
                    .query(params![tenant, container, start, end])
                    .ctx("read windows")?;
                while let Some(r) = rows.next().ctx("read windows")? {
                    let u = |i: usize, what: &'static str| -> Result<u64, LedgerError> {
                        from_sql(r.get(i).ctx("read window column")?, what)
                    };
                    let start = u(0, "record window_start")?;
                    points.push(window_point(&Window {
                        start,
                        end: add(start, u(1, "record window_secs")?, "record window end")?,
                        seconds: u(2, "record seconds")?,
                        cpu_ns: u(3, "record cpu_ns")?,
                        memory_byte_seconds: u(4, "record memory_byte_seconds")?,
                        memory_peak: u(5, "record memory_peak")?,
                        oom_kills: u(6, "record oom_kills")?,
                        rx_bytes: u(7, "record rx_bytes")?,
                        tx_bytes: u(8, "record tx_bytes")?,
                    }));
                }
                if let Some(w) = self.meters.get(&key).and_then(|m| m.open.as_ref())
                    && (start_s..end_s).contains(&w.start)
                {
                    points.push(window_point(w));
                }
            }
        }
        let mut total = UsagePoint {
            time_unix_s: start_s,
            ..UsagePoint::default()
        };
        for p in &points {
            total.seconds = add(total.seconds, p.seconds, "usage seconds")?;
            total.cpu_ns = add(total.cpu_ns, p.cpu_ns, "usage cpu_ns")?;
            total.memory_byte_seconds = add(
                total.memory_byte_seconds,
                p.memory_byte_seconds,
                "usage memory byte-seconds",
            )?;
            total.memory_peak = total.memory_peak.max(p.memory_peak);
            total.oom_kills = add(total.oom_kills, p.oom_kills, "usage oom_kills")?;
            total.rx_bytes = add(total.rx_bytes, p.rx_bytes, "usage rx_bytes")?;
            total.tx_bytes = add(total.tx_bytes, p.tx_bytes, "usage tx_bytes")?;
        }
        total.memory_working_set = average(total.memory_byte_seconds, total.seconds);
        Ok(UsageSeries { points, total })
    }

    /// Sizes for metrics.
    pub fn stats(&self) -> Result<LedgerStats, LedgerError> {
        let mut db_bytes = 0u64;
        for suffix in ["", "-wal"] {
            let mut file = self.path.clone().into_os_string();
            file.push(suffix);
            match std::fs::metadata(&file) {
                Ok(m) => db_bytes = db_bytes.saturating_add(m.len()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
                Err(source) => {
                    return Err(LedgerError::Stat {
                        path: file.into(),
                        source,
                    });
                }
            }
        }
        let (records, unacked): (i64, i64) = self
            .conn
            .query_row(
                "SELECT count(*),
                        (SELECT count(*) FROM records
                         WHERE cursor > (SELECT acked_cursor FROM ledger_state WHERE id = 1))
                 FROM records",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ctx("count records")?;
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Ok(LedgerStats {
            db_bytes,
            records: from_sql(records, "record count")?,
            unacked_records: from_sql(unacked, "unacked record count")?,
            open_windows: count(self.meters.values().filter(|m| m.open.is_some()).count()),
            keys: count(self.meters.len()),
        })
    }
}

fn average(byte_seconds: u64, seconds: u64) -> u64 {
    byte_seconds.checked_div(seconds).unwrap_or(0)
}

fn window_point(w: &Window) -> UsagePoint {
    UsagePoint {
        time_unix_s: w.start,
        seconds: w.seconds,
        cpu_ns: w.cpu_ns,
        memory_byte_seconds: w.memory_byte_seconds,
        memory_working_set: average(w.memory_byte_seconds, w.seconds),
        memory_peak: w.memory_peak,
        oom_kills: w.oom_kills,
        rx_bytes: w.rx_bytes,
        tx_bytes: w.tx_bytes,
    }
}
