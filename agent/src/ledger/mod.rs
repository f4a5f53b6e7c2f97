//! The durable usage ledger: turns the meter's per-second samples into billing records, in an
//! embedded SQLite database.
//!
//! Owns the database file and everything in it; knows nothing of cgroups (the meter reads them) nor
//! of how records leave the node (the exporters read them through [`Ledger::read_records`] and
//! [`Ledger::ack`]). It is synchronous: the agent owns it on one dedicated thread.
//!
//! # How usage is counted
//!
//! - **Exact CPU.** Each sample's CPU is `cpu_ns - baseline`, where the baseline is the previous
//!   reading counted for that key. The new baseline is written in the same transaction as the
//!   usage it produced, so after a crash (kill -9 anywhere) the ledger resumes from the last
//!   committed baseline: the kernel kept counting while the agent was down, so the first delta
//!   after a restart covers the downtime, and nothing is counted twice. OOM kills are counted the
//!   same way.
//! - **Network bytes** of a tenant's link (`rx_bytes`: received by the tenant, `tx_bytes`: sent)
//!   are counted the same way, with their own baseline, since a link is created and removed
//!   apart from its tenant's cgroup: a reading without them counts none and keeps the baseline;
//!   see `meter.rs`. Containers have none (they share the tenant's network namespace), so the
//!   tenant's figures are the whole tenant's.
//! - **New cgroups count from 0.** A key never seen before, or seen again after its `last` sample,
//!   has baseline 0: its cgroup was created by the agent with zeroed counters, which is what bills
//!   a container that lived for less than a second and produced a single `last` sample.
//! - **Counters going backwards** mean the cgroup was removed and created again without a `last`
//!   sample: the new reading is all new usage and becomes the baseline (logged).
//! - **Replays are ignored.** A sample at or before the key's last counted second changes nothing,
//!   so a batch handed in twice (retry after an error, replay after a restart) is not billed twice.
//!   A wall clock stepped backwards is handled the same way: samples are ignored until it passes
//!   the last counted second, and the first one after covers all the usage in between.
//! - **Memory** is integrated as working set × seconds since the key's previous sample (1 s for a
//!   cgroup's first sample). Over a gap in sampling (agent down) the level the later sample reads
//!   is assumed for the whole gap. A window's peak is the highest working set sampled in it: the
//!   kernel's own peak (`memory.peak`, `max_usage_in_bytes`) is over the cgroup's whole life and
//!   includes page cache, so it can say nothing about one window and is not billed.
//!
//! # Windows
//!
//! Windows are aligned to the epoch: a sample at second `t` belongs to the window starting at
//! `t - t % window_secs`, and carries all the usage since the key's previous sample. So usage
//! accrued during a gap is billed in the window of the first sample after it: totals stay exact,
//! and no record is invented for seconds nobody measured. A key's window closes into a [`Record`]
//! when a sample of the key arrives in a later window, with the key's `last` sample, or through
//! [`Ledger::close_idle`] once no sample came for [`IDLE_GRACE_SECS`] after the window's end (the
//! cgroup vanished without a `last` sample, or the meter stalled). A sample arriving after its
//! window was closed that way is billed in the next window, so a record id is never produced twice
//! and a record never changes once written. The same holds for a cgroup created again under the
//! same key within the window its predecessor's `last` sample closed: it starts in the next window.

mod error;
mod meter;
mod read;
mod schema;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

pub use error::LedgerError;
use error::{SqlContext, from_sql, to_sql};
use meter::{Meter, SampleRow, Window};
pub use read::{LedgerStats, Per, PruneReport, Record, UsagePoint, UsageSeries};

use crate::meter::{MeterKey, Sample};

/// Default billing window.
pub const DEFAULT_WINDOW_SECS: u32 = 60;
/// Longest billing window.
pub const MAX_WINDOW_SECS: u32 = 3600;
/// Default retention of per-second samples: one hour (about 150 MB for 1,000 keys).
pub const DEFAULT_SAMPLE_RETENTION_SECS: u64 = 3600;
/// Shortest retention of per-second samples.
pub const MIN_SAMPLE_RETENTION_SECS: u64 = 60;
/// Longest retention of per-second samples: 31 days.
pub const MAX_SAMPLE_RETENTION_SECS: u64 = 31 * 86_400;
/// Default retention of acknowledged records: 7 days. Unacknowledged records are never pruned.
pub const DEFAULT_RECORD_RETENTION_SECS: u64 = 7 * 86_400;
/// Longest retention of acknowledged records: 400 days.
pub const MAX_RECORD_RETENTION_SECS: u64 = 400 * 86_400;
/// How long after a window's end [`Ledger::close_idle`] waits for a sample before closing it.
/// A live cgroup is sampled every second, so a few seconds of slack absorb a slow meter; closing
/// early costs nothing but moving a late sample into the next window.
pub const IDLE_GRACE_SECS: u64 = 5;
/// Longest node name (a DNS name).
pub const MAX_NODE_LEN: usize = 253;

/// Settings of a [`Ledger`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// The node's name, the first part of every record id.
    pub node: String,
    /// Billing window length in seconds, 1..=3600.
    pub window_secs: u32,
    /// How long per-second samples are kept.
    pub sample_retention_secs: u64,
    /// How long acknowledged records are kept after their window ended.
    pub record_retention_secs: u64,
}

impl LedgerConfig {
    /// The defaults, for `node`.
    pub fn new(node: impl Into<String>) -> Self {
        LedgerConfig {
            node: node.into(),
            window_secs: DEFAULT_WINDOW_SECS,
            sample_retention_secs: DEFAULT_SAMPLE_RETENTION_SECS,
            record_retention_secs: DEFAULT_RECORD_RETENTION_SECS,
        }
    }

    /// Checks every field against its limits.
    pub fn validate(&self) -> Result<(), LedgerError> {
        let bad = |field, reason: String| Err(LedgerError::Config { field, reason });
        if self.node.is_empty() || self.node.len() > MAX_NODE_LEN {
            return bad(
                "node",
                format!("must be 1..={MAX_NODE_LEN} bytes, is {}", self.node.len()),
            );
        }
        if !self
            .node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return bad(
                "node",
                format!(
                    "{:?} may hold only ASCII letters, digits, '-', '_' and '.'",
                    self.node
                ),
            );
        }
        if !(1..=MAX_WINDOW_SECS).contains(&self.window_secs) {
            return bad(
                "window_secs",
                format!(
                    "must be 1..={MAX_WINDOW_SECS} seconds, is {}",
                    self.window_secs
                ),
            );
        }
        if !(MIN_SAMPLE_RETENTION_SECS..=MAX_SAMPLE_RETENTION_SECS)
            .contains(&self.sample_retention_secs)
        {
            return bad(
                "sample_retention_secs",
                format!(
                    "must be {MIN_SAMPLE_RETENTION_SECS}..={MAX_SAMPLE_RETENTION_SECS} seconds, is {}",
                    self.sample_retention_secs
                ),
            );
        }
        if self.record_retention_secs > MAX_RECORD_RETENTION_SECS {
            return bad(
                "record_retention_secs",
                format!(
                    "must be at most {MAX_RECORD_RETENTION_SECS} seconds, is {}",
                    self.record_retention_secs
                ),
            );
        }
        Ok(())
    }
}

/// The ledger: one SQLite database, and in memory a mirror of every key's persisted state.
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    config: LedgerConfig,
    /// Exactly what `meters` and `open_windows` hold; changed only after a commit.
    meters: HashMap<MeterKey, Meter>,
    /// Mirror of `ledger_state.meters_pruned_before`.
    meters_pruned_before: u64,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field("config", &self.config)
            .field("keys", &self.meters.len())
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens the ledger at `path`, creating it if it does not exist.
    pub fn open(path: impl AsRef<Path>, config: LedgerConfig) -> Result<Self, LedgerError> {
        config.validate()?;
        let path = path.as_ref().to_owned();
        let conn = schema::open(&path)?;
        let meters = schema::load_meters(&conn)?;
        let pruned: i64 = conn
            .query_row(
                "SELECT meters_pruned_before FROM ledger_state WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .ctx("read ledger state")?;
        Ok(Ledger {
            conn,
            path,
            config,
            meters,
            meters_pruned_before: from_sql(pruned, "meters_pruned_before")?,
        })
    }

    /// The settings the ledger was opened with.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Counts one batch of samples, in one transaction, and returns the records it closed.
    ///
    /// On error nothing of the batch is counted, and the same batch can be handed in again.
    pub fn ingest(&mut self, batch: &[Sample]) -> Result<Vec<Record>, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("begin ingest transaction")?;
        let mut touched: HashMap<MeterKey, Meter> = HashMap::new();
        let mut records = Vec::new();
        for sample in batch {
            if let Err(reason) = check_key(&sample.key) {
                tracing::warn!(key = ?sample.key, reason, "sample of an invalid key dropped");
                continue;
            }
            let meter = match touched.entry(sample.key.clone()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => match self.meters.get(&sample.key) {
                    Some(m) => e.insert(m.clone()),
                    None if sample.at_unix_s < self.meters_pruned_before => {
                        tracing::warn!(
                            key = ?sample.key,
                            at_unix_s = sample.at_unix_s,
                            "sample of an unknown key older than the pruned key state dropped"
                        );
                        continue;
                    }
                    None => e.insert(Meter::new(insert_key(&tx, &sample.key)?)),
                },
            };
            let Some(applied) = meter.apply(sample, self.config.window_secs)? else {
                tracing::debug!(key = ?sample.key, at_unix_s = sample.at_unix_s, "replayed sample ignored");
                continue;
            };
            insert_sample(&tx, meter.key_id, &applied.row)?;
            for window in &applied.closed {
                records.extend(insert_record(&tx, &self.config.node, &sample.key, window)?);
            }
        }
        for meter in touched.values() {
            save_meter(&tx, meter)?;
        }
        tx.commit().ctx("commit ingest transaction")?;
        self.meters.extend(touched);
        Ok(records)
    }

    /// Closes the windows of keys that got no sample for [`IDLE_GRACE_SECS`] after their window
    /// ended, and returns the records made.
    pub fn close_idle(&mut self, now_unix_s: u64) -> Result<Vec<Record>, LedgerError> {
        let mut closing: Vec<(MeterKey, Meter, Window)> = Vec::new();
        for (key, meter) in self.meters.iter().filter(|(_, m)| m.idle(now_unix_s)) {
            let mut meter = meter.clone();
            if let Some(window) = meter.close_idle(now_unix_s) {
                closing.push((key.clone(), meter, window));
            }
        }
        if closing.is_empty() {
            return Ok(Vec::new());
        }
        // Oldest first, so cursors follow time as far as possible.
        closing.sort_by(|a, b| (a.2.start, &a.0).cmp(&(b.2.start, &b.0)));
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("begin close-idle transaction")?;
        let mut records = Vec::new();
        for (key, meter, window) in &closing {
            records.extend(insert_record(&tx, &self.config.node, key, window)?);
            save_meter(&tx, meter)?;
        }
        tx.commit().ctx("commit close-idle transaction")?;
        self.meters
            .extend(closing.into_iter().map(|(key, meter, _)| (key, meter)));
        Ok(records)
    }
}

/// Why a key cannot be billed: its parts become a record id, so they must be valid ids.
fn check_key(key: &MeterKey) -> Result<(), String> {
    crate::validate::check_id("tenant", &key.tenant).map_err(|e| e.to_string())?;
    if let Some(c) = &key.container {
        crate::validate::check_id("container", c).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn container_column(key: &MeterKey) -> &str {
    key.container.as_deref().unwrap_or(schema::TENANT_SUBTREE)
}

/// The deterministic record id: `node/tenant/container/window_start`, `-` for the tenant's
/// subtree (no container id can be `-`: ids never start with a dash).
fn record_id(node: &str, key: &MeterKey, window_start: u64) -> String {
    let container = key.container.as_deref().unwrap_or("-");
    format!("{node}/{}/{container}/{window_start}", key.tenant)
}

fn insert_key(tx: &Transaction<'_>, key: &MeterKey) -> Result<i64, LedgerError> {
    tx.prepare_cached(
        "INSERT INTO meters (tenant, container, cpu_ns, oom_kills, last_at_s, fresh, billed_until,
             rx_bytes, tx_bytes, net_known)
         VALUES (?1, ?2, 0, 0, 0, 1, 0, 0, 0, 1) RETURNING key_id",
    )
    .ctx("prepare key insert")?
    .query_row(params![key.tenant, container_column(key)], |r| r.get(0))
    .ctx("insert key")
}

fn insert_sample(tx: &Transaction<'_>, key_id: i64, row: &SampleRow) -> Result<(), LedgerError> {
    tx.prepare_cached(
        "INSERT INTO samples (key_id, at_s, seconds, cpu_ns, working_set, oom_kills, rx_bytes,
             tx_bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (key_id, at_s) DO UPDATE SET seconds = seconds + ?3,
             cpu_ns = cpu_ns + ?4, working_set = ?5, oom_kills = oom_kills + ?6,
             rx_bytes = rx_bytes + ?7, tx_bytes = tx_bytes + ?8",
    )
    .ctx("prepare sample insert")?
    .execute(params![
        key_id,
        to_sql(row.at_s, "sample second")?,
        to_sql(row.seconds, "sample seconds")?,
        to_sql(row.cpu_ns, "sample cpu_ns")?,
        to_sql(row.working_set, "sample working set")?,
        to_sql(row.oom_kills, "sample oom_kills")?,
        to_sql(row.rx_bytes, "sample rx_bytes")?,
        to_sql(row.tx_bytes, "sample tx_bytes")?,
    ])
    .ctx("insert sample")?;
    Ok(())
}

fn save_meter(tx: &Transaction<'_>, meter: &Meter) -> Result<(), LedgerError> {
    tx.prepare_cached(
        "UPDATE meters SET cpu_ns = ?2, oom_kills = ?3, last_at_s = ?4, fresh = ?5,
                billed_until = ?6, rx_bytes = ?7, tx_bytes = ?8, net_known = ?9
         WHERE key_id = ?1",
    )
    .ctx("prepare meter update")?
    .execute(params![
        meter.key_id,
        to_sql(meter.cpu_ns, "baseline cpu_ns")?,
        to_sql(meter.oom_kills, "baseline oom_kills")?,
        to_sql(meter.last_at_s.unwrap_or(0), "last sample second")?,
        meter.fresh,
        to_sql(meter.billed_until, "billed-until second")?,
        to_sql(meter.rx_bytes, "baseline rx_bytes")?,
        to_sql(meter.tx_bytes, "baseline tx_bytes")?,
        meter.net_known,
    ])
    .ctx("update meter")?;
    match &meter.open {
        None => {
            tx.prepare_cached("DELETE FROM open_windows WHERE key_id = ?1")
                .ctx("prepare open window delete")?
                .execute([meter.key_id])
                .ctx("delete open window")?;
        }
        Some(w) => {
            tx.prepare_cached(
                "INSERT INTO open_windows (key_id, window_start, window_end, seconds, cpu_ns,
                     memory_byte_seconds, memory_peak, oom_kills, rx_bytes, tx_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (key_id) DO UPDATE SET window_start = ?2, window_end = ?3,
                     seconds = ?4, cpu_ns = ?5, memory_byte_seconds = ?6, memory_peak = ?7,
                     oom_kills = ?8, rx_bytes = ?9, tx_bytes = ?10",
            )
            .ctx("prepare open window write")?
            .execute(params![
                meter.key_id,
                to_sql(w.start, "window start")?,
                to_sql(w.end, "window end")?,
                to_sql(w.seconds, "window seconds")?,
                to_sql(w.cpu_ns, "window cpu_ns")?,
                to_sql(w.memory_byte_seconds, "window memory byte-seconds")?,
                to_sql(w.memory_peak, "window memory peak")?,
                to_sql(w.oom_kills, "window oom_kills")?,
                to_sql(w.rx_bytes, "window rx_bytes")?,
                to_sql(w.tx_bytes, "window tx_bytes")?,
            ])
            .ctx("write open window")?;
        }
    }
    Ok(())
}

/// Writes a closed window as a record, unless its id exists already (then it is dropped and
/// logged: a record, once written, never changes).
fn insert_record(
    tx: &Transaction<'_>,
    node: &str,
    key: &MeterKey,
    w: &Window,
) -> Result<Option<Record>, LedgerError> {
    let id = record_id(node, key, w.start);
    let window_secs =
        u32::try_from(w.end.saturating_sub(w.start)).map_err(|_| LedgerError::Overflow {
            what: "record window length",
        })?;
    let cursor: Option<i64> = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO records (id, node, tenant, container, window_start, window_secs,
                 seconds, cpu_ns, memory_byte_seconds, memory_peak, oom_kills, rx_bytes, tx_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) RETURNING cursor",
        )
        .ctx("prepare record insert")?
        .query_row(
            params![
                id,
                node,
                key.tenant,
                container_column(key),
                to_sql(w.start, "record window start")?,
                window_secs,
                to_sql(w.seconds, "record seconds")?,
                to_sql(w.cpu_ns, "record cpu_ns")?,
                to_sql(w.memory_byte_seconds, "record memory byte-seconds")?,
                to_sql(w.memory_peak, "record memory peak")?,
                to_sql(w.oom_kills, "record oom_kills")?,
                to_sql(w.rx_bytes, "record rx_bytes")?,
                to_sql(w.tx_bytes, "record tx_bytes")?,
            ],
            |r| r.get(0),
        )
        .optional()
        .ctx("insert record")?;
    let Some(cursor) = cursor else {
        tracing::warn!(%id, cpu_ns = w.cpu_ns, "window already recorded; duplicate dropped");
        return Ok(None);
    };
    Ok(Some(Record {
        cursor: from_sql(cursor, "record cursor")?,
        id,
        node: node.to_owned(),
        tenant: key.tenant.clone(),
        container: key.container.clone(),
        window_start_unix_s: w.start,
        window_secs,
        cpu_ns: w.cpu_ns,
        memory_byte_seconds: w.memory_byte_seconds,
        memory_peak_bytes: w.memory_peak,
        oom_kills: w.oom_kills,
        rx_bytes: w.rx_bytes,
        tx_bytes: w.tx_bytes,
    }))
}
