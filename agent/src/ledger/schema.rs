//! The database file: connection settings, the schema and its version, the migrations of files
//! written by older agents, and loading the state of every key at open.
//!
//! # Versions
//!
//! `PRAGMA user_version` says which schema a file holds. A new file gets [`SCHEMA`] as it is now.
//! A file of an older version is brought up to date by the [`MIGRATIONS`] after its version, all
//! in the transaction that checks the version, so a crash leaves the file either as it was or
//! fully migrated. A migration only adds: a migrated file must end up with exactly the tables and
//! columns a new one gets (a test compares them), so columns added by a migration go last in
//! [`SCHEMA`] too, with the same default. Files of a newer version are refused: an agent must not
//! be downgraded over its ledger.
//!
//! - 1: CPU, memory and OOM kills.
//! - 2: network bytes (`rx_bytes`, `tx_bytes`) in `samples`, `open_windows` and `records`, and
//!   the last readings in `meters`, with `net_known`: whether they are readings of the tenant's
//!   current link. Rows of version 1 read 0 bytes, and their keys' first network reading is
//!   taken as the baseline only (see `meter.rs`).

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::error::{LedgerError, SqlContext, from_sql};
use super::meter::{Meter, Window};
use crate::meter::MeterKey;

/// `PRAGMA application_id` of a ledger file ("caas" in ASCII), so that the agent never adopts a
/// SQLite file of something else.
const APPLICATION_ID: i64 = 0x6361_6173;

/// The schema version this build writes (`PRAGMA user_version`). Files of a higher version are
/// refused; lower versions are migrated by [`MIGRATIONS`].
pub(super) const SCHEMA_VERSION: i64 = 2;

/// The statements that bring a file of the version before each one up to it, oldest first; the
/// last is [`SCHEMA_VERSION`].
const MIGRATIONS: &[(i64, &str)] = &[(
    2,
    "
ALTER TABLE meters ADD COLUMN rx_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE meters ADD COLUMN tx_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE meters ADD COLUMN net_known INTEGER NOT NULL DEFAULT 0;
ALTER TABLE open_windows ADD COLUMN rx_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE open_windows ADD COLUMN tx_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE samples ADD COLUMN rx_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE samples ADD COLUMN tx_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE records ADD COLUMN rx_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE records ADD COLUMN tx_bytes INTEGER NOT NULL DEFAULT 0;
",
)];

/// How `container` is stored for a tenant's whole subtree. Container ids are 1..=63 bytes of
/// `[a-z0-9-]`, so the empty string never collides with one.
pub(super) const TENANT_SUBTREE: &str = "";

const SCHEMA: &str = "
-- One row per key ever seen: the counter baseline and replay guard. A key is never deleted while
-- it has samples or an open window.
CREATE TABLE meters (
    key_id       INTEGER PRIMARY KEY,
    tenant       TEXT    NOT NULL,
    container    TEXT    NOT NULL,  -- '' = the tenant's whole subtree
    cpu_ns       INTEGER NOT NULL,  -- last cumulative reading counted
    oom_kills    INTEGER NOT NULL,  -- last cumulative reading counted
    last_at_s    INTEGER NOT NULL,  -- samples at or before this second are replays
    fresh        INTEGER NOT NULL,  -- 1: the next sample is a new cgroup counting from 0
    billed_until INTEGER NOT NULL,  -- end of the last closed window
    -- Network bytes of a tenant's link, from the tenant's side (version 2):
    rx_bytes     INTEGER NOT NULL DEFAULT 0,  -- last cumulative reading counted
    tx_bytes     INTEGER NOT NULL DEFAULT 0,  -- last cumulative reading counted
    net_known    INTEGER NOT NULL DEFAULT 0,  -- 0: the next network reading is a baseline only
    UNIQUE (tenant, container)
);

-- The window each key is accumulating.
CREATE TABLE open_windows (
    key_id              INTEGER PRIMARY KEY REFERENCES meters (key_id),
    window_start        INTEGER NOT NULL,
    window_end          INTEGER NOT NULL,
    seconds             INTEGER NOT NULL,
    cpu_ns              INTEGER NOT NULL,
    memory_byte_seconds INTEGER NOT NULL,
    memory_peak         INTEGER NOT NULL,
    oom_kills           INTEGER NOT NULL,
    rx_bytes            INTEGER NOT NULL DEFAULT 0,
    tx_bytes            INTEGER NOT NULL DEFAULT 0
);

-- Per-second usage, kept for sample_retention_secs.
CREATE TABLE samples (
    key_id      INTEGER NOT NULL,
    at_s        INTEGER NOT NULL,
    seconds     INTEGER NOT NULL,  -- seconds since the key's previous sample
    cpu_ns      INTEGER NOT NULL,  -- delta
    working_set INTEGER NOT NULL,  -- bytes
    oom_kills   INTEGER NOT NULL,  -- delta
    rx_bytes    INTEGER NOT NULL DEFAULT 0,  -- delta: bytes the tenant received
    tx_bytes    INTEGER NOT NULL DEFAULT 0,  -- delta: bytes the tenant sent
    PRIMARY KEY (key_id, at_s)
) WITHOUT ROWID;
CREATE INDEX samples_by_time ON samples (at_s);

-- Closed windows. AUTOINCREMENT so that a cursor is never handed out twice, even after pruning
-- has emptied the table.
CREATE TABLE records (
    cursor              INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT    NOT NULL UNIQUE,  -- node/tenant/container-or-'-'/window_start
    node                TEXT    NOT NULL,
    tenant              TEXT    NOT NULL,
    container           TEXT    NOT NULL,         -- '' = the tenant's whole subtree
    window_start        INTEGER NOT NULL,
    window_secs         INTEGER NOT NULL,
    seconds             INTEGER NOT NULL,
    cpu_ns              INTEGER NOT NULL,
    memory_byte_seconds INTEGER NOT NULL,
    memory_peak         INTEGER NOT NULL,
    oom_kills           INTEGER NOT NULL,
    rx_bytes            INTEGER NOT NULL DEFAULT 0,
    tx_bytes            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX records_by_key ON records (tenant, container, window_start);
-- Ordered by cursor within a tenant (the rowid is the last column of every index).
CREATE INDEX records_by_tenant ON records (tenant);

-- The billing consumer's acknowledgement (every record up to acked_cursor is delivered), and the
-- second before which the state of ended keys has been pruned (an unknown key's sample older than
-- it may be a replay of a forgotten key, and is ignored).
CREATE TABLE ledger_state (
    id                   INTEGER PRIMARY KEY CHECK (id = 1),
    acked_cursor         INTEGER NOT NULL,
    meters_pruned_before INTEGER NOT NULL
);
INSERT INTO ledger_state (id, acked_cursor, meters_pruned_before) VALUES (1, 0, 0);

-- Named exporter cursors.
CREATE TABLE cursors (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Opens (creating if needed) the file, applies the connection settings and checks or creates the
/// schema.
pub(super) fn open(path: &Path) -> Result<Connection, LedgerError> {
    let open_err = |source| LedgerError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    // WAL: a commit appends to the log instead of rewriting pages, readers never block the writer,
    // and a kill -9 at any point leaves either the whole transaction or none of it.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LedgerError::NoWal {
            path: path.to_owned(),
            mode,
        });
    }
    // FULL, not NORMAL: NORMAL in WAL mode survives a process crash but may lose the last commits
    // on power loss, and a lost commit can hold a record already streamed to billing, which would
    // then be produced again with other values under the same id. FULL costs one fsync of the log
    // per commit, and the ledger commits about once a second.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(open_err)?;
    // Another process (an operator's sqlite3 shell) may hold a lock briefly.
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    // Bounds the log file left behind after a burst of writes.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
        .map_err(open_err)?;

    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(open_err)?;
    let app_id: i64 = tx
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(open_err)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(open_err)?;
    let tables: i64 = tx
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(open_err)?;
    if app_id != APPLICATION_ID && (app_id != 0 || tables != 0) {
        return Err(LedgerError::NotALedger {
            path: path.to_owned(),
            found: app_id,
        });
    }
    if version > SCHEMA_VERSION {
        return Err(LedgerError::FutureSchema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version == 0 {
        tx.execute_batch(SCHEMA).map_err(open_err)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(open_err)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_err)?;
    } else if version < SCHEMA_VERSION {
        for (to, statements) in MIGRATIONS.iter().filter(|(to, _)| *to > version) {
            tx.execute_batch(statements).map_err(open_err)?;
            tx.pragma_update(None, "user_version", to)
                .map_err(open_err)?;
        }
        tracing::info!(
            path = %path.display(),
            from = version,
            to = SCHEMA_VERSION,
            "ledger schema migrated"
        );
    }
    tx.commit().map_err(open_err)?;
    Ok(conn)
}

/// Every key's state, as persisted.
pub(super) fn load_meters(conn: &Connection) -> Result<HashMap<MeterKey, Meter>, LedgerError> {
    let mut stmt = conn
        .prepare(
            "SELECT m.key_id, m.tenant, m.container, m.cpu_ns, m.oom_kills, m.last_at_s, m.fresh,
                    m.billed_until, w.window_start, w.window_end, w.seconds, w.cpu_ns,
                    w.memory_byte_seconds, w.memory_peak, w.oom_kills, w.rx_bytes, w.tx_bytes,
                    m.rx_bytes, m.tx_bytes, m.net_known
             FROM meters m LEFT JOIN open_windows w ON w.key_id = m.key_id",
        )
        .ctx("prepare loading meters")?;
    let mut rows = stmt.query([]).ctx("load meters")?;
    let mut meters = HashMap::new();
    while let Some(r) = rows.next().ctx("load meters")? {
        let u = |i: usize, what: &'static str| -> Result<u64, LedgerError> {
            from_sql(r.get(i).ctx("read meter column")?, what)
        };
        let container: String = r.get(2).ctx("read meter container")?;
        let key = MeterKey {
            tenant: r.get(1).ctx("read meter tenant")?,
            container: (container != TENANT_SUBTREE).then_some(container),
        };
        let window_start: Option<i64> = r.get(8).ctx("read open window")?;
        let open = match window_start {
            None => None,
            Some(start) => Some(Window {
                start: from_sql(start, "window_start")?,
                end: u(9, "window_end")?,
                seconds: u(10, "window seconds")?,
                cpu_ns: u(11, "window cpu_ns")?,
                memory_byte_seconds: u(12, "window memory_byte_seconds")?,
                memory_peak: u(13, "window memory_peak")?,
                oom_kills: u(14, "window oom_kills")?,
                rx_bytes: u(15, "window rx_bytes")?,
                tx_bytes: u(16, "window tx_bytes")?,
            }),
        };
        let meter = Meter {
            key_id: r.get(0).ctx("read meter key_id")?,
            cpu_ns: u(3, "meter cpu_ns")?,
            oom_kills: u(4, "meter oom_kills")?,
            last_at_s: Some(u(5, "meter last_at_s")?),
            fresh: r.get(6).ctx("read meter fresh")?,
            billed_until: u(7, "meter billed_until")?,
            rx_bytes: u(17, "meter rx_bytes")?,
            tx_bytes: u(18, "meter tx_bytes")?,
            net_known: r.get(19).ctx("read meter net_known")?,
            open,
        };
        meters.insert(key, meter);
    }
    Ok(meters)
}
