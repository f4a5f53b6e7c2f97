//! Pushes billing records to an HTTP endpoint as CloudEvents 1.0, at least once.
//!
//! Owns one named ledger cursor ([`CURSOR_NAME`]) and nothing else of the ledger: it reads records
//! after its cursor, POSTs them as one JSON batch, and moves and persists the cursor only after a
//! 2xx. A failed POST (refused, timed out, non-2xx) is retried with the very same batch, with
//! backoff, for as long as it takes, so no record is ever skipped; a crash between the 2xx and the
//! cursor write resends at most that one batch, which the consumer drops by event `id` (the
//! record id). It does not acknowledge records ([`Ledger::ack`] belongs to the billing consumer
//! of the gRPC API) and so never causes them to be pruned.
//!
//! - `event.rs`: the CloudEvents shape of a record;
//! - `http.rs`: the minimal HTTP/1.1 client;
//! - `retry.rs`: backoff and rate-limited failure logs.

mod event;
mod http;
mod retry;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use event::{BATCH_CONTENT_TYPE, EVENT_TYPE, SOURCE_PREFIX, SPEC_VERSION, encode_batch};

use crate::blocking::{self, BlockingError};
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::ExportMetrics;
use crate::validate::{self, Invalid};
use http::{Client, Endpoint};
use retry::{Backoff, FailureLog};

/// The ledger cursor this exporter owns.
pub const CURSOR_NAME: &str = "cloudevents";
/// Largest `export.batch_max`.
pub const MAX_BATCH: usize = 10_000;
/// Largest `export.timeout_secs`.
pub const MAX_TIMEOUT_SECS: u64 = 300;
/// Largest `export.retry_max_ms` (one hour).
pub const MAX_RETRY_MS: u64 = 3_600_000;
/// How often the ledger is read when no new-record notice came (a safety net: the agent
/// announces every record through the `written` channel).
const IDLE_POLL: Duration = Duration::from_secs(10);

/// `[export]`: where usage events are pushed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// The endpoint that receives batches of events by POST, an `http://` URL such as
    /// `http://billing.internal:8080/v1/usage`. Unset: the exporter is off.
    pub endpoint: Option<String>,
    /// Most records per POST, 1..=10000.
    pub batch_max: usize,
    /// Deadline of one POST, connecting included, in seconds, 1..=300.
    pub timeout_secs: u64,
    /// First delay before retrying a failed POST, in milliseconds; it doubles on each failure.
    pub retry_initial_ms: u64,
    /// Longest delay between retries, in milliseconds, up to one hour.
    pub retry_max_ms: u64,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            endpoint: None,
            batch_max: 500,
            timeout_secs: 10,
            retry_initial_ms: 500,
            retry_max_ms: 30_000,
        }
    }
}

impl ExportConfig {
    /// Checks every value against its limits; errors name the key (`export.endpoint`).
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(url) = &self.endpoint {
            Endpoint::parse(url).map_err(|reason| Invalid::new("export.endpoint", reason))?;
        }
        validate::check_range("export.batch_max", self.batch_max, 1, MAX_BATCH)?;
        validate::check_range(
            "export.timeout_secs",
            self.timeout_secs,
            1,
            MAX_TIMEOUT_SECS,
        )?;
        validate::check_range(
            "export.retry_initial_ms",
            self.retry_initial_ms,
            1,
            MAX_RETRY_MS,
        )?;
        validate::check_range(
            "export.retry_max_ms",
            self.retry_max_ms,
            self.retry_initial_ms,
            MAX_RETRY_MS,
        )?;
        Ok(())
    }
}

/// Why the exporter stopped, or why one attempt failed (attempts are retried, never fatal).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[source] Invalid),
    /// A ledger call failed.
    #[error("ledger: {what}")]
    Ledger {
        /// What the exporter asked of the ledger.
        what: &'static str,
        /// The ledger's error.
        source: LedgerError,
    },
    /// A ledger call did not run or finish in time.
    #[error(transparent)]
    Blocking(#[from] BlockingError),
    /// A record cannot be written as an event (its time is out of range).
    #[error("record time {unix_s} is not a representable date")]
    Time {
        /// The Unix second at fault.
        unix_s: u64,
    },
    /// The batch could not be serialized.
    #[error("encode events")]
    Encode(#[source] serde_json::Error),
    /// The endpoint could not be reached.
    #[error("connect to {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection closed, malformed answer).
    #[error("http exchange with {endpoint}")]
    Http {
        /// The endpoint.
        endpoint: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The request could not be built.
    #[error("build request")]
    Request(#[source] hyper::http::Error),
    /// The endpoint answered, but not with a 2xx.
    #[error("{endpoint} answered {status}: {body}")]
    Status {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body, on one line.
        body: String,
    },
    /// The POST did not complete in time.
    #[error("{endpoint} did not answer within {timeout:?}")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The deadline.
        timeout: Duration,
    },
}

/// What the exporter has done, shared with metrics and status reporting.
#[derive(Debug, Default)]
pub struct ExportStatus {
    delivered: AtomicU64,
    failures: AtomicU64,
    cursor: AtomicU64,
    last_error: Mutex<String>,
}

impl ExportStatus {
    /// Events delivered (accepted with a 2xx) since the agent started.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Failed attempts (POSTs and ledger reads) since the agent started.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The exporter's cursor: every record up to it was delivered (0 until it has been loaded).
    pub fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Relaxed)
    }

    /// The last failure, with its causes; empty if none since the agent started.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Records not yet delivered, given the ledger's [`Ledger::last_cursor`].
    pub fn backlog(&self, last_cursor: u64) -> u64 {
        last_cursor.saturating_sub(self.cursor())
    }

    /// The counters metrics report, given the ledger's [`Ledger::last_cursor`].
    pub fn metrics(&self, last_cursor: u64) -> ExportMetrics {
        ExportMetrics {
            delivered: self.delivered(),
            failures: self.failures(),
            backlog: self.backlog(last_cursor),
        }
    }

    fn failed(&self, error: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            error.clone_into(&mut last);
        }
    }
}

/// An error with its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Runs `f` on the ledger, on the blocking pool.
async fn with_ledger<T, F>(
    ledger: &Arc<Mutex<Ledger>>,
    what: &'static str,
    f: F,
) -> Result<T, ExportError>
where
    T: Send + 'static,
    F: FnOnce(&mut Ledger) -> Result<T, LedgerError> + Send + 'static,
{
    let ledger = Arc::clone(ledger);
    blocking::run(what, blocking::DEFAULT_TIMEOUT, move || {
        // Every ledger write is one transaction, so a panic elsewhere leaves nothing half
        // done: the lock is taken as the rest of the agent takes it, poisoned or not.
        f(&mut crate::usage::lock(&ledger)).map_err(|source| ExportError::Ledger { what, source })
    })
    .await?
}

/// A batch read and encoded, kept until delivered so that retries send exactly the same events.
struct Batch {
    last_cursor: u64,
    events: u64,
    body: Bytes,
}

enum Step {
    /// Nothing after the cursor.
    CaughtUp,
    /// The pending batch was accepted.
    Delivered,
}

/// Pushes records until `shutdown`. Returns at once if no endpoint is configured, and with an
/// error only for an invalid configuration: every other failure is logged and retried.
///
/// `written` carries the cursor of the newest record written; a change wakes the exporter when
/// it has caught up.
pub async fn run(
    cfg: ExportConfig,
    ledger: Arc<Mutex<Ledger>>,
    mut written: watch::Receiver<u64>,
    shutdown: CancellationToken,
    status: Arc<ExportStatus>,
) -> Result<(), ExportError> {
    let Some(url) = cfg.endpoint.as_deref() else {
        tracing::debug!("no export.endpoint: usage export is off");
        return Ok(());
    };
    cfg.validate().map_err(ExportError::Config)?;
    let endpoint = Endpoint::parse(url)
        .map_err(|reason| ExportError::Config(Invalid::new("export.endpoint", reason)))?;
    tracing::info!(%endpoint, "usage export starting");
    let mut client = Client::new(endpoint, Duration::from_secs(cfg.timeout_secs));
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.retry_initial_ms),
        Duration::from_millis(cfg.retry_max_ms),
    );
    let mut log = FailureLog::default();
    let batch_max = cfg.batch_max;
    let mut cursor: Option<u64> = None;
    let mut pending: Option<Batch> = None;
    let mut written_open = true;

    while !shutdown.is_cancelled() {
        let attempt = async {
            let after = match cursor {
                Some(c) => c,
                None => {
                    let c = with_ledger(&ledger, "read export cursor", |l| l.cursor(CURSOR_NAME))
                        .await?;
                    status.cursor.store(c, Ordering::Relaxed);
                    *cursor.insert(c)
                }
            };
            let batch = match pending.take() {
                Some(b) => b,
                None => {
                    // Marks the current notice seen before reading, so a record written after
                    // the read wakes the idle wait below.
                    written.borrow_and_update();
                    let records = with_ledger(&ledger, "read records", move |l| {
                        l.read_records(after, batch_max, None)
                    })
                    .await?;
                    let Some(last) = records.last() else {
                        return Ok(Step::CaughtUp);
                    };
                    Batch {
                        last_cursor: last.cursor,
                        events: u64::try_from(records.len()).unwrap_or(u64::MAX),
                        body: Bytes::from(encode_batch(&records)?),
                    }
                }
            };
            let sent = client.post(batch.body.clone()).await;
            pending = Some(batch);
            sent.map(|()| Step::Delivered)
        };
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            outcome = attempt => outcome,
        };
        match outcome {
            Ok(Step::CaughtUp) => {
                log.succeeded(tokio::time::Instant::now());
                backoff.reset();
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    changed = written.changed(), if written_open => {
                        written_open = changed.is_ok();
                    }
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
            Ok(Step::Delivered) => {
                log.succeeded(tokio::time::Instant::now());
                backoff.reset();
                if let Some(batch) = pending.take() {
                    delivered(&ledger, &status, &batch).await;
                    cursor = Some(batch.last_cursor);
                }
            }
            Err(e) => {
                let text = chain(&e);
                status.failed(&text);
                let delay = backoff.next_delay();
                log.failed(tokio::time::Instant::now(), &text, delay);
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    tracing::info!(cursor = status.cursor(), "usage export stopped");
    Ok(())
}

/// Counts a delivered batch and persists the cursor past it. Not interrupted by shutdown: the
/// write is short, and every batch it records as delivered is one not sent again after a restart.
async fn delivered(ledger: &Arc<Mutex<Ledger>>, status: &ExportStatus, batch: &Batch) {
    status.delivered.fetch_add(batch.events, Ordering::Relaxed);
    status.cursor.store(batch.last_cursor, Ordering::Relaxed);
    let c = batch.last_cursor;
    if let Err(e) = with_ledger(ledger, "persist export cursor", move |l| {
        l.set_cursor(CURSOR_NAME, c)
    })
    .await
    {
        // The cursor moves on in memory; the next delivery persists it. A restart before then
        // resends from the older persisted cursor, which at-least-once allows.
        tracing::warn!(error = %chain(&e), cursor = c, "could not persist the export cursor");
    }
}
