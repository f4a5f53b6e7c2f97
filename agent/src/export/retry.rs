//! Retry pacing for the exporter: exponential backoff with jitter, and failure logs that say
//! something once per outage and then once a minute, however fast the retries are.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// How often a continuing outage is logged again.
pub(super) const LOG_EVERY: Duration = Duration::from_secs(60);

/// Delays between attempts: doubling from `initial` up to `max`, each drawn uniformly from its
/// upper half so that many agents that lost the same endpoint do not retry in lockstep.
#[derive(Debug)]
pub(super) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(super) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt.
    pub(super) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }

    /// Back to `initial`, after a success.
    pub(super) fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[derive(Debug)]
struct Outage {
    since: Instant,
    attempts: u64,
    last_logged: Instant,
}

/// Rate-limited logging of delivery failures.
#[derive(Debug, Default)]
pub(super) struct FailureLog {
    outage: Option<Outage>,
}

impl FailureLog {
    /// Records a failed attempt, logging it if it starts an outage or a minute passed.
    pub(super) fn failed(&mut self, now: Instant, error: &str, retry_in: Duration) {
        match &mut self.outage {
            None => {
                tracing::warn!(
                    error,
                    retry_in_ms = retry_in.as_millis(),
                    "usage export failed; retrying the same batch with backoff"
                );
                self.outage = Some(Outage {
                    since: now,
                    attempts: 1,
                    last_logged: now,
                });
            }
            Some(o) => {
                o.attempts += 1;
                if now.duration_since(o.last_logged) >= LOG_EVERY {
                    tracing::warn!(
                        error,
                        attempts = o.attempts,
                        failing_for_s = now.duration_since(o.since).as_secs(),
                        "usage export still failing"
                    );
                    o.last_logged = now;
                }
            }
        }
    }

    /// Records a success, logging the end of an outage.
    pub(super) fn succeeded(&mut self, now: Instant) {
        if let Some(o) = self.outage.take() {
            tracing::info!(
                failed_attempts = o.attempts,
                outage_s = now.duration_since(o.since).as_secs(),
                "usage export recovered"
            );
        }
    }

    /// Whether an outage is going on (for tests).
    #[cfg(test)]
    pub(super) fn failing(&self) -> bool {
        self.outage.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_max_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let bases = [100u64, 200, 400, 800, 1000, 1000];
        for base in bases {
            let d = b.next_delay().as_millis();
            assert!(
                (u128::from(base / 2)..=u128::from(base)).contains(&d),
                "{d} not in upper half of {base}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn zero_delay_is_allowed() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.next_delay(), Duration::ZERO);
    }

    #[test]
    fn outage_starts_and_ends() {
        let mut log = FailureLog::default();
        let t = Instant::now();
        log.failed(t, "boom", Duration::from_millis(1));
        log.failed(t + LOG_EVERY, "boom", Duration::from_millis(1));
        assert!(log.failing());
        log.succeeded(t + LOG_EVERY);
        assert!(!log.failing());
    }
}
