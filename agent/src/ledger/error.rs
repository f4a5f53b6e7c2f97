//! The ledger's error type, and the checked conversions between Rust's `u64` and SQLite's `i64`.

use std::path::PathBuf;

/// What went wrong in the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A [`super::LedgerConfig`] field is out of range.
    #[error("invalid ledger config: {field} {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The database file could not be opened or set up.
    #[error("open ledger database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file system does not support SQLite's write-ahead log (it needs shared memory).
    #[error(
        "ledger database {path}: journal mode is {mode}, write-ahead logging could not be enabled"
    )]
    NoWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// The file belongs to another application.
    #[error("{path} is not a caas-agent ledger (sqlite application id {found:#x})")]
    NotALedger {
        /// The database file.
        path: PathBuf,
        /// The application id found in the file.
        found: i64,
    },
    /// The file was written by a newer agent whose schema this one does not know.
    #[error(
        "ledger database {path} has schema version {found}; this agent knows versions up to \
         {supported}: upgrade the agent, do not downgrade it over a newer ledger"
    )]
    FutureSchema {
        /// The database file.
        path: PathBuf,
        /// The version in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A query or statement failed.
    #[error("ledger: {what}")]
    Sql {
        /// What the ledger was doing.
        what: &'static str,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// A number does not fit: a counter over `i64::MAX`, or a sum that overflows `u64`.
    #[error("ledger: {what} overflows")]
    Overflow {
        /// Which number.
        what: &'static str,
    },
    /// A stored number is negative where only counts and times are written.
    #[error("ledger: stored {what} is negative ({value}); the database is damaged")]
    Corrupt {
        /// Which column.
        what: &'static str,
        /// The value read.
        value: i64,
    },
    /// An ack names a cursor the ledger never handed out.
    #[error("ack of cursor {cursor} is beyond the last record cursor {last}")]
    AckBeyondEnd {
        /// The cursor acked.
        cursor: u64,
        /// The last cursor issued.
        last: u64,
    },
    /// The size of the database files could not be read.
    #[error("read size of {path}")]
    Stat {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Attaches what the ledger was doing to a SQLite error.
pub(super) trait SqlContext<T> {
    fn ctx(self, what: &'static str) -> Result<T, LedgerError>;
}

impl<T> SqlContext<T> for Result<T, rusqlite::Error> {
    fn ctx(self, what: &'static str) -> Result<T, LedgerError> {
        self.map_err(|source| LedgerError::Sql { what, source })
    }
}

/// A `u64` as a SQLite integer, refused when over `i64::MAX`.
pub(super) fn to_sql(value: u64, what: &'static str) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::Overflow { what })
}

/// A SQLite integer as a `u64`, refused when negative.
pub(super) fn from_sql(value: i64, what: &'static str) -> Result<u64, LedgerError> {
    u64::try_from(value).map_err(|_| LedgerError::Corrupt { what, value })
}

/// `a + b`, or an overflow error naming the sum.
pub(super) fn add(a: u64, b: u64, what: &'static str) -> Result<u64, LedgerError> {
    a.checked_add(b).ok_or(LedgerError::Overflow { what })
}
