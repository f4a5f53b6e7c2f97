//! The one way the async code runs blocking file and syscall work: on tokio's blocking pool, with a
//! deadline, so a stuck filesystem shows up as an error instead of a hung request.

use std::time::Duration;

/// How long blocking state-file work may take before the caller gets an error.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a blocking job did not return a value.
#[derive(Debug, thiserror::Error)]
pub enum BlockingError {
    /// The job ran past its deadline (it keeps running; its result is dropped).
    #[error("{what} did not finish within {timeout:?}")]
    Timeout {
        /// What the job was doing.
        what: &'static str,
        /// The deadline it missed.
        timeout: Duration,
    },
    /// The job panicked or was cancelled.
    #[error("{what} failed to run: {source}")]
    Join {
        /// What the job was doing.
        what: &'static str,
        /// Why it did not complete.
        source: tokio::task::JoinError,
    },
}

/// Runs `f` on the blocking pool and waits at most `timeout` for it.
pub async fn run<T, F>(what: &'static str, timeout: Duration, f: F) -> Result<T, BlockingError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(BlockingError::Join { what, source }),
        Err(_) => Err(BlockingError::Timeout { what, timeout }),
    }
}
