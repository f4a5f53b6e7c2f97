//! The per-key state machine: the counter baseline and the open window of one [`MeterKey`].
//!
//! Pure logic, no SQL: [`Meter::apply`] turns a sample into a per-second row and zero, one or two
//! closed windows, and [`super::Ledger`] persists the result in one transaction. Everything here is
//! exact integer arithmetic; an overflow is an error, never a wrap.
//!
//! Network bytes (a tenant's link, `rx_bytes`/`tx_bytes`) are cumulative counters like CPU, with
//! three differences, because the link is not the cgroup:
//!
//! - A reading without them (`Counters::net` is `None`: a container, no network, or a link that
//!   could not be read) counts no bytes and leaves their baseline alone, so a link readable
//!   again continues from it and nothing is lost or counted twice.
//! - A link created again counts from 0 while the cgroup lives on: a reading below the baseline
//!   is a new link, all of it new bytes (logged), as for a recreated cgroup's counters.
//! - A key whose baseline is not a reading of its current link (`net_known` false: a key carried
//!   over from a ledger of schema version 1, before bytes were metered) takes its first reading
//!   as the baseline and counts nothing for it: the bytes before it were never metered, and
//!   billing a link's whole life in one window would be wrong. A new cgroup (a fresh key) has a
//!   new link too, so its baseline is 0 and known.

use super::error::{LedgerError, add};
use crate::meter::{MeterKey, Sample};

/// The persisted state of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Meter {
    /// The key's row id in `meters`.
    pub key_id: i64,
    /// The last cumulative CPU reading counted (the baseline of the next delta).
    pub cpu_ns: u64,
    /// The last cumulative OOM-kill reading counted.
    pub oom_kills: u64,
    /// The second of the last sample counted; samples at or before it are replays and ignored.
    pub last_at_s: Option<u64>,
    /// The next sample comes from a new cgroup whose counters start at 0: the key was never
    /// seen, or its last cgroup ended with a `last` sample.
    pub fresh: bool,
    /// The end of the key's last closed window: no later window may start before it, so a window
    /// id is never produced twice.
    pub billed_until: u64,
    /// The last cumulative reading of the bytes the tenant received, counted.
    pub rx_bytes: u64,
    /// The last cumulative reading of the bytes the tenant sent, counted.
    pub tx_bytes: u64,
    /// Whether `rx_bytes`/`tx_bytes` are the baseline of the tenant's current link (see the
    /// module doc).
    pub net_known: bool,
    /// The window being accumulated, if any.
    pub open: Option<Window>,
}

/// A window's accumulators: open while samples arrive, then closed into a billing record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    /// First second of the window (Unix seconds).
    pub start: u64,
    /// First second after the window.
    pub end: u64,
    /// Seconds covered by the samples counted in it (more than the window's length after a gap).
    pub seconds: u64,
    /// CPU time used, in nanoseconds.
    pub cpu_ns: u64,
    /// Working set integrated over time, in byte-seconds.
    pub memory_byte_seconds: u64,
    /// Highest working set sampled in the window, in bytes.
    pub memory_peak: u64,
    /// OOM kills.
    pub oom_kills: u64,
    /// Bytes the tenant received.
    pub rx_bytes: u64,
    /// Bytes the tenant sent.
    pub tx_bytes: u64,
}

/// What one accepted sample contributes, as stored in the per-second table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SampleRow {
    /// The sample's second.
    pub at_s: u64,
    /// Seconds since the key's previous sample (1 for the first sample of a cgroup).
    pub seconds: u64,
    /// CPU delta in nanoseconds.
    pub cpu_ns: u64,
    /// Working set in bytes.
    pub working_set: u64,
    /// OOM-kill delta.
    pub oom_kills: u64,
    /// Delta of the bytes the tenant received.
    pub rx_bytes: u64,
    /// Delta of the bytes the tenant sent.
    pub tx_bytes: u64,
}

/// The result of an accepted sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Applied {
    /// The per-second row.
    pub row: SampleRow,
    /// Windows closed by this sample, oldest first: the previous window when the sample is in a
    /// later one, and the sample's own window when it is the cgroup's `last`.
    pub closed: Vec<Window>,
}

/// The start of the aligned window that holds `at_s`.
pub(super) fn align(at_s: u64, window_secs: u32) -> u64 {
    at_s - at_s % u64::from(window_secs)
}

impl Window {
    /// An empty window starting at `start` and ending at the next aligned boundary.
    fn starting(start: u64, window_secs: u32) -> Result<Self, LedgerError> {
        let end = add(align(start, window_secs), window_secs.into(), "window end")?;
        Ok(Window {
            start,
            end,
            seconds: 0,
            cpu_ns: 0,
            memory_byte_seconds: 0,
            memory_peak: 0,
            oom_kills: 0,
            rx_bytes: 0,
            tx_bytes: 0,
        })
    }

    fn add(&mut self, row: &SampleRow, byte_seconds: u64) -> Result<(), LedgerError> {
        self.seconds = add(self.seconds, row.seconds, "window seconds")?;
        self.cpu_ns = add(self.cpu_ns, row.cpu_ns, "window cpu_ns")?;
        self.memory_byte_seconds = add(
            self.memory_byte_seconds,
            byte_seconds,
            "window memory byte-seconds",
        )?;
        self.memory_peak = self.memory_peak.max(row.working_set);
        self.oom_kills = add(self.oom_kills, row.oom_kills, "window oom_kills")?;
        self.rx_bytes = add(self.rx_bytes, row.rx_bytes, "window rx_bytes")?;
        self.tx_bytes = add(self.tx_bytes, row.tx_bytes, "window tx_bytes")?;
        Ok(())
    }
}

impl SampleRow {
    /// Working set × seconds covered: the gap before a sample is assumed to have been at the
    /// level the sample reads.
    pub fn byte_seconds(&self) -> Result<u64, LedgerError> {
        self.working_set
            .checked_mul(self.seconds)
            .ok_or(LedgerError::Overflow {
                what: "memory byte-seconds of a sample",
            })
    }
}

/// `current - baseline` of a cumulative counter. A counter below its baseline belongs to a new
/// cgroup or link (the old one was removed and created again without a `last` sample): its whole
/// value is new usage, and it becomes the new baseline.
fn delta(key: &MeterKey, counter: &'static str, baseline: u64, current: u64) -> u64 {
    match current.checked_sub(baseline) {
        Some(d) => d,
        None => {
            tracing::warn!(
                tenant = %key.tenant,
                container = key.container.as_deref().unwrap_or("-"),
                counter,
                baseline,
                current,
                "cumulative counter went backwards: its cgroup or link was recreated, starting a \
                 new baseline"
            );
            current
        }
    }
}

impl Meter {
    /// The state of a key never seen: its cgroup's counters start at 0.
    pub fn new(key_id: i64) -> Self {
        Meter {
            key_id,
            cpu_ns: 0,
            oom_kills: 0,
            last_at_s: None,
            fresh: true,
            billed_until: 0,
            rx_bytes: 0,
            tx_bytes: 0,
            net_known: true,
            open: None,
        }
    }

    /// Counts one sample. `None` for a replay (a second already counted), which changes nothing.
    pub fn apply(
        &mut self,
        sample: &Sample,
        window_secs: u32,
    ) -> Result<Option<Applied>, LedgerError> {
        let at = sample.at_unix_s;
        let c = &sample.counters;
        // A reading taken on demand (the final one of a cgroup, or one before a delete) often
        // falls in the second a tick was read in: it still counts (what was used since), adding
        // no seconds. A counter below the baseline in the same second is a replay, never a new
        // cgroup; an equal one adds nothing.
        let same_second = !self.fresh
            && self.last_at_s == Some(at)
            && c.cpu_ns >= self.cpu_ns
            && c.oom_kills >= self.oom_kills
            && c.net.is_none_or(|n| {
                !self.net_known || (n.rx_bytes >= self.rx_bytes && n.tx_bytes >= self.tx_bytes)
            });
        if self.last_at_s.is_some_and(|last| at <= last) && !same_second {
            return Ok(None);
        }
        let (cpu_base, oom_base, seconds, new_cgroup) = match self.last_at_s {
            Some(last) if !self.fresh => (self.cpu_ns, self.oom_kills, at - last, false),
            _ => (0, 0, 1, true),
        };
        let (rx_bytes, tx_bytes) = match c.net {
            None => (0, 0),
            Some(n) if new_cgroup => (n.rx_bytes, n.tx_bytes),
            Some(n) if self.net_known => (
                delta(&sample.key, "rx_bytes", self.rx_bytes, n.rx_bytes),
                delta(&sample.key, "tx_bytes", self.tx_bytes, n.tx_bytes),
            ),
            Some(n) => {
                tracing::info!(
                    tenant = %sample.key.tenant,
                    rx_bytes = n.rx_bytes,
                    tx_bytes = n.tx_bytes,
                    "first network reading of a tenant metered before network bytes were: \
                     taken as the baseline, bytes from now on are counted"
                );
                (0, 0)
            }
        };
        let row = SampleRow {
            at_s: at,
            seconds,
            cpu_ns: delta(&sample.key, "cpu_ns", cpu_base, c.cpu_ns),
            working_set: c.memory_working_set,
            oom_kills: delta(&sample.key, "oom_kills", oom_base, c.oom_kills),
            rx_bytes,
            tx_bytes,
        };
        let byte_seconds = row.byte_seconds()?;

        let mut closed = Vec::new();
        if let Some(window) = self.open.take_if(|w| at >= w.end) {
            closed.push(self.close(window));
        }
        let window = match &mut self.open {
            Some(w) => w,
            // A sample whose aligned window was already closed (late, after `close_idle`) is
            // billed in the next window instead.
            none => none.insert(Window::starting(
                align(at, window_secs).max(self.billed_until),
                window_secs,
            )?),
        };
        window.add(&row, byte_seconds)?;
        if sample.last
            && let Some(window) = self.open.take()
        {
            closed.push(self.close(window));
        }

        self.cpu_ns = c.cpu_ns;
        self.oom_kills = c.oom_kills;
        match c.net {
            Some(n) => (self.rx_bytes, self.tx_bytes) = (n.rx_bytes, n.tx_bytes),
            // A new cgroup without a reading of its link (yet): the link is new too.
            None if new_cgroup => (self.rx_bytes, self.tx_bytes) = (0, 0),
            None => {}
        }
        self.net_known |= c.net.is_some() || new_cgroup;
        self.last_at_s = Some(at);
        self.fresh = sample.last;
        Ok(Some(Applied { row, closed }))
    }

    /// Whether the open window got no sample for [`super::IDLE_GRACE_SECS`] after its end.
    pub fn idle(&self, now_unix_s: u64) -> bool {
        self.open
            .is_some_and(|w| now_unix_s >= w.end.saturating_add(super::IDLE_GRACE_SECS))
    }

    /// Closes the open window if it is [`Meter::idle`].
    pub fn close_idle(&mut self, now_unix_s: u64) -> Option<Window> {
        if !self.idle(now_unix_s) {
            return None;
        }
        let window = self.open.take()?;
        Some(self.close(window))
    }

    fn close(&mut self, window: Window) -> Window {
        self.billed_until = self.billed_until.max(window.end);
        window
    }
}
