//! The sampler: one dedicated OS thread that reads every metered cgroup on each wall-clock second
//! and hands the readings to the ledger as one `Vec<Sample>` per tick.
//!
//! It never runs on the tokio runtime: a tick is a few thousand blocking `pread`s, which must not
//! hold up async tasks, and the runtime must not delay a tick. The thread owns its targets
//! outright (no lock on the hot path); [`SamplerHandle`] talks to it over a command channel,
//! whose wait doubles as the sleep until the next boundary, so commands are served between ticks
//! within one tick's duration. The handle's methods only send a message and await the reply, so
//! they never block the runtime.
//!
//! Timing (`schedule.rs`): ticks fall on whole seconds of the wall clock and carry that second;
//! a boundary the thread reaches more than half a period late is skipped and counted in
//! [`SamplerStats::missed_ticks`] (counters are cumulative, so nothing is lost but resolution).
//!
//! Delivery: an unbounded `tokio` channel. The ledger is the only consumer and drains it
//! continuously; a batch is a few hundred kilobytes for 1,000 containers, so even a consumer
//! stalled for minutes holds little. A closed channel is logged (once) and every sample lost to
//! it is counted in [`SamplerStats::undelivered`]; samples are never dropped silently.
//!
//! Failures are per target: a target whose read fails stays registered and is retried every
//! tick, logged once when it starts failing and once when it recovers; a target whose cgroup is
//! gone is dropped (call [`SamplerHandle::finish`] before removing a cgroup to bill its last
//! interval: that is how a container that lived 300 ms gets billed).
//!
//! A tenant target may also have a network link ([`SamplerHandle::set_link`]): each of its
//! readings, ticks and final ones alike, then carries the link's byte counters. A link that
//! cannot be read leaves them out of the reading (see `link.rs`) and never fails the sample;
//! it is logged once when that starts and once when it ends, and counted in
//! [`SamplerStats::link_errors`]. Once a reading before the tenant's removal was taken
//! ([`SamplerHandle::read_now`]), the link being gone is expected (it is removed before the
//! final reading) and neither logged as a failure nor counted.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc::UnboundedSender, oneshot};

use super::{
    CgroupReader, Counters, DEFAULT_NET_ROOT, LinkReader, MeterError, MeterKey, NetBytes, Sample,
    link::TenantLink,
    schedule::{Schedule, Step},
};
use crate::cgroups::CgroupLayout;

/// The production tick: one second.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(1);
/// Shortest tick accepted (tests use short ticks).
const MIN_PERIOD: Duration = Duration::from_millis(10);
/// Longest tick accepted.
const MAX_PERIOD: Duration = Duration::from_secs(60);
/// At most one "fell behind" warning per this long.
const MISS_LOG_EVERY: Duration = Duration::from_secs(60);

/// Where and how often the sampler reads.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// The cgroup root (normally `/sys/fs/cgroup`).
    pub root: PathBuf,
    /// The host's layout.
    pub layout: CgroupLayout,
    /// Where network links' counters are (normally `/sys/class/net`).
    pub net_root: PathBuf,
    /// Tick period; ticks fall on multiples of it since the Unix epoch.
    pub period: Duration,
}

impl SamplerConfig {
    /// One tick per wall-clock second, links under `/sys/class/net`.
    pub fn new(root: impl Into<PathBuf>, layout: CgroupLayout) -> Self {
        Self {
            root: root.into(),
            layout,
            net_root: PathBuf::from(DEFAULT_NET_ROOT),
            period: DEFAULT_PERIOD,
        }
    }
}

/// What the sampler has done, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplerStats {
    /// Targets registered now.
    pub targets: usize,
    /// Targets whose last read failed.
    pub failing: usize,
    /// Ticks run.
    pub ticks: u64,
    /// Boundaries skipped because the sampler was too late for them.
    pub missed_ticks: u64,
    /// How long the last tick's reads took.
    pub last_tick: Duration,
    /// How late after its boundary the last tick started.
    pub last_lag: Duration,
    /// Failed reads (not counting cgroups that were gone).
    pub read_errors: u64,
    /// Targets dropped because their cgroup was removed.
    pub gone: u64,
    /// Samples that could not be delivered because the channel was closed.
    pub undelivered: u64,
    /// Failed reads or opens of tenants' network links (their readings had no network bytes).
    pub link_errors: u64,
}

enum Command {
    Add {
        key: MeterKey,
        rel: String,
        reply: oneshot::Sender<Result<(), MeterError>>,
    },
    Remove {
        key: MeterKey,
        reply: oneshot::Sender<bool>,
    },
    Finish {
        key: MeterKey,
        reply: oneshot::Sender<Result<Sample, MeterError>>,
    },
    ReadNow {
        key: MeterKey,
        reply: oneshot::Sender<Result<Sample, MeterError>>,
    },
    SetLink {
        key: MeterKey,
        link: String,
        reply: oneshot::Sender<Result<(), MeterError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

struct Target {
    key: MeterKey,
    reader: CgroupReader,
    failing: bool,
    /// The last counters read and when, for a final sample after the cgroup is gone.
    last: Option<(Counters, i64)>,
    /// A tenant's network link.
    link: Option<TenantLink>,
    /// A reading before the tenant's removal was taken: its link going away is expected then (it
    /// is removed before the final reading), so that is not logged as a failure.
    removing: bool,
}

impl Target {
    /// The network bytes to add to a reading just taken: `None` without a link, or when the link
    /// cannot be read now (`retry_now`: reopen a closed link at once, for a reading on demand).
    /// Counts each failure in `errors`.
    fn read_link(&mut self, retry_now: bool, errors: &mut u64) -> Option<NetBytes> {
        let link = self.link.as_mut()?;
        link.read(&self.key.tenant, retry_now, self.removing, errors)
    }
}

/// The sampling thread's state. Start it with [`Sampler::spawn`].
pub struct Sampler {
    config: SamplerConfig,
    targets: Vec<Target>,
    out: UnboundedSender<Vec<Sample>>,
    stats: SamplerStats,
    published: Arc<Mutex<SamplerStats>>,
    closed_logged: bool,
    miss_log: Option<Instant>,
    unlogged_misses: u64,
}

impl Sampler {
    /// Starts the sampling thread; samples go to `out`.
    pub fn spawn(
        config: SamplerConfig,
        out: UnboundedSender<Vec<Sample>>,
    ) -> Result<SamplerHandle, MeterError> {
        if !(MIN_PERIOD..=MAX_PERIOD).contains(&config.period) {
            return Err(MeterError::BadPeriod(config.period));
        }
        let (commands, rx) = mpsc::channel();
        let published = Arc::new(Mutex::new(SamplerStats::default()));
        let sampler = Self {
            config,
            targets: Vec::new(),
            out,
            stats: SamplerStats::default(),
            published: published.clone(),
            closed_logged: false,
            miss_log: None,
            unlogged_misses: 0,
        };
        let thread = std::thread::Builder::new()
            .name("caas-meter".into())
            .spawn(move || sampler.run(rx))
            .map_err(MeterError::Spawn)?;
        Ok(SamplerHandle {
            commands,
            stats: published,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut schedule = Schedule::new(self.config.period, since_epoch());
        loop {
            match schedule.poll(since_epoch()) {
                Step::Tick { at, lag, missed } => {
                    self.note_missed(missed);
                    self.tick(at, lag);
                }
                Step::Wait { sleep, missed } => {
                    self.note_missed(missed);
                    match rx.recv_timeout(sleep) {
                        Ok(Command::Shutdown { reply }) => {
                            let _ = reply.send(());
                            break;
                        }
                        Ok(cmd) => self.command(cmd),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        // Every handle is gone: nobody can add, finish or read stats any more.
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
            self.publish();
        }
        tracing::debug!("meter sampler stopped");
    }

    /// Reads every target once. Costs one `Sample` (its key clone) per target and one `Vec`.
    fn tick(&mut self, at: Duration, lag: Duration) {
        let started = Instant::now();
        let at_unix_s = at.as_secs();
        let mut batch = Vec::with_capacity(self.targets.len());
        let (mut errors, mut gone, mut failing, mut link_errors) = (0, 0, 0, 0);
        self.targets.retain_mut(|t| match t.reader.read() {
            Ok(mut counters) => {
                let read_at_ns = now_ns();
                counters.net = t.read_link(false, &mut link_errors);
                t.last = Some((counters, read_at_ns));
                if t.failing {
                    t.failing = false;
                    tracing::info!(
                        tenant = %t.key.tenant,
                        container = t.key.container.as_deref().unwrap_or("-"),
                        "cgroup readable again; metering resumed"
                    );
                }
                batch.push(Sample {
                    key: t.key.clone(),
                    at_unix_s,
                    counters,
                    read_at_ns,
                    last: false,
                });
                true
            }
            Err(e) if e.is_gone() => {
                gone += 1;
                // The last reading taken is the final one: it closes the cgroup's billing
                // window now instead of after the ledger's idle grace.
                if let Some((counters, read_at_ns)) = t.last {
                    batch.push(Sample {
                        key: t.key.clone(),
                        at_unix_s,
                        counters,
                        read_at_ns,
                        last: true,
                    });
                }
                tracing::debug!(
                    tenant = %t.key.tenant,
                    container = t.key.container.as_deref().unwrap_or("-"),
                    error = %e,
                    "cgroup removed; its last reading is its final one"
                );
                false
            }
            Err(e) => {
                errors += 1;
                failing += 1;
                if !t.failing {
                    t.failing = true;
                    tracing::warn!(
                        tenant = %t.key.tenant,
                        container = t.key.container.as_deref().unwrap_or("-"),
                        error = %e,
                        "cgroup read failed; retried every tick, logged again when it recovers"
                    );
                }
                true
            }
        });
        self.stats.ticks += 1;
        self.stats.last_tick = started.elapsed();
        self.stats.last_lag = lag;
        self.stats.read_errors += errors;
        self.stats.link_errors += link_errors;
        self.stats.gone += gone;
        self.stats.failing = failing;
        // Published before the batch leaves, so whoever receives it sees the tick's stats.
        self.publish();
        self.deliver(batch);
    }

    /// Serves one command. Stats are published before the reply, so a caller that reads them
    /// after its request returns sees the request's effect.
    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Add { key, rel, reply } => {
                let result = self.add(key, &rel);
                self.publish();
                let _ = reply.send(result);
            }
            Command::Remove { key, reply } => {
                let found = self.take(&key).is_some();
                self.publish();
                let _ = reply.send(found);
            }
            Command::Finish { key, reply } => {
                let result = self.finish(key);
                self.publish();
                let _ = reply.send(result);
            }
            Command::ReadNow { key, reply } => {
                let result = self.read_now(key);
                self.publish();
                let _ = reply.send(result);
            }
            Command::SetLink { key, link, reply } => {
                let result = self.set_link(key, &link);
                self.publish();
                let _ = reply.send(result);
            }
            // Handled by the loop, which must stop.
            Command::Shutdown { reply } => {
                let _ = reply.send(());
            }
        }
    }

    fn add(&mut self, key: MeterKey, rel: &str) -> Result<(), MeterError> {
        if self.targets.iter().any(|t| t.key == key) {
            return Err(MeterError::AlreadyMetered { key });
        }
        let reader = CgroupReader::open(&self.config.root, self.config.layout, rel)?;
        self.targets.push(Target {
            key,
            reader,
            failing: false,
            last: None,
            link: None,
            removing: false,
        });
        Ok(())
    }

    /// Gives the tenant target `key` the network link `link`; a link it has already is kept,
    /// another replaces it. The link need not exist yet.
    fn set_link(&mut self, key: MeterKey, link: &str) -> Result<(), MeterError> {
        if key.container.is_some() {
            return Err(MeterError::LinkOnContainer { key });
        }
        let reader = LinkReader::new(&self.config.net_root, link)?;
        let Some(t) = self.targets.iter_mut().find(|t| t.key == key) else {
            return Err(MeterError::NotMetered { key });
        };
        if t.link.as_ref().is_some_and(|l| l.name() == link) {
            return Ok(());
        }
        t.link = Some(TenantLink::new(reader));
        // Opened now, so a link that is missing from the start is logged at once.
        let mut errors = 0;
        t.read_link(true, &mut errors);
        self.stats.link_errors += errors;
        Ok(())
    }

    /// Unregisters `key`. Linear in the targets; commands are rare next to ticks.
    fn take(&mut self, key: &MeterKey) -> Option<Target> {
        let i = self.targets.iter().position(|t| &t.key == key)?;
        let t = self.targets.swap_remove(i);
        if t.failing {
            self.stats.failing = self.stats.failing.saturating_sub(1);
        }
        Some(t)
    }

    /// Reads `key` now with a fresh `memory.stat`, emits the reading as its last sample and stops
    /// metering it, whether or not the read succeeded (the caller is about to remove it).
    fn finish(&mut self, key: MeterKey) -> Result<Sample, MeterError> {
        let Some(mut t) = self.take(&key) else {
            return Err(MeterError::NotMetered { key });
        };
        t.removing = true;
        let read = match t.reader.read_final() {
            Ok(mut counters) => {
                let read_at_ns = now_ns();
                counters.net = t.read_link(true, &mut self.stats.link_errors);
                Ok((counters, read_at_ns))
            }
            // Removed after a [`SamplerHandle::read_now`]: nothing ran since that reading.
            Err(e) if e.is_gone() && t.last.is_some() => t.last.ok_or(e),
            Err(e) => Err(e),
        };
        match read {
            Ok((counters, read_at_ns)) => {
                let sample = Sample {
                    key,
                    at_unix_s: since_epoch().as_secs(),
                    counters,
                    read_at_ns,
                    last: true,
                };
                self.deliver(vec![sample.clone()]);
                Ok(sample)
            }
            Err(e) => {
                if e.is_gone() {
                    self.stats.gone += 1;
                } else {
                    self.stats.read_errors += 1;
                }
                Err(e)
            }
        }
    }

    /// Reads `key` now and emits the reading as an ordinary sample; the key stays metered.
    fn read_now(&mut self, key: MeterKey) -> Result<Sample, MeterError> {
        let Some(t) = self.targets.iter_mut().find(|t| t.key == key) else {
            return Err(MeterError::NotMetered { key });
        };
        let mut counters = t.reader.read_final()?;
        let read_at_ns = now_ns();
        counters.net = t.read_link(true, &mut self.stats.link_errors);
        t.last = Some((counters, read_at_ns));
        t.removing = true;
        let sample = Sample {
            key,
            at_unix_s: since_epoch().as_secs(),
            counters,
            read_at_ns,
            last: false,
        };
        self.deliver(vec![sample.clone()]);
        Ok(sample)
    }

    fn deliver(&mut self, batch: Vec<Sample>) {
        if batch.is_empty() {
            return;
        }
        let n = u64::try_from(batch.len()).unwrap_or(u64::MAX);
        if self.out.send(batch).is_err() {
            self.stats.undelivered += n;
            self.publish();
            if !self.closed_logged {
                self.closed_logged = true;
                tracing::error!("the sample channel is closed; meter samples are being lost");
            }
        }
    }

    fn note_missed(&mut self, missed: u64) {
        if missed == 0 {
            return;
        }
        self.stats.missed_ticks += missed;
        self.unlogged_misses += missed;
        if self.miss_log.is_none_or(|t| t.elapsed() >= MISS_LOG_EVERY) {
            tracing::warn!(
                missed = self.unlogged_misses,
                targets = self.targets.len(),
                last_tick = ?self.stats.last_tick,
                "meter sampler fell behind and skipped ticks"
            );
            self.miss_log = Some(Instant::now());
            self.unlogged_misses = 0;
        }
    }

    fn publish(&mut self) {
        self.stats.targets = self.targets.len();
        *self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.stats;
    }
}

/// Now, ns since the Unix epoch.
fn now_ns() -> i64 {
    i64::try_from(since_epoch().as_nanos()).unwrap_or(i64::MAX)
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// A cloneable handle to the sampling thread. When every handle is dropped the thread stops.
#[derive(Clone)]
pub struct SamplerHandle {
    commands: mpsc::Sender<Command>,
    stats: Arc<Mutex<SamplerStats>>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for SamplerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplerHandle")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl SamplerHandle {
    /// Starts metering the cgroup `rel` (relative to each hierarchy root, e.g.
    /// `caas.slice/tenant-a/c-x`) as `key`. Fails if the cgroup cannot be opened or `key` is
    /// already metered.
    pub async fn add(&self, key: MeterKey, rel: String) -> Result<(), MeterError> {
        self.request(|reply| Command::Add { key, rel, reply })
            .await?
    }

    /// Stops metering `key` without a final reading. True if it was metered.
    pub async fn remove(&self, key: MeterKey) -> Result<bool, MeterError> {
        self.request(|reply| Command::Remove { key, reply }).await
    }

    /// Reads `key` now, before the caller removes its cgroup, emits the reading through the
    /// sample channel with `last: true` (after every earlier sample of the key), stops metering
    /// `key` and returns the reading. The key is unregistered even when the read fails.
    /// If the cgroup is already gone, the last reading taken (by a tick or by
    /// [`SamplerHandle::read_now`]) is emitted as the final one.
    pub async fn finish(&self, key: MeterKey) -> Result<Sample, MeterError> {
        self.request(|reply| Command::Finish { key, reply }).await?
    }

    /// Reads `key` now and emits the reading as an ordinary sample, keeping the key metered:
    /// taken before an operation that may remove the cgroup (or may be refused), followed by
    /// [`SamplerHandle::finish`] once it did. From then on a tenant's network link found gone
    /// is taken as removed with the tenant, not as a failure.
    pub async fn read_now(&self, key: MeterKey) -> Result<Sample, MeterError> {
        self.request(|reply| Command::ReadNow { key, reply })
            .await?
    }

    /// Also reads the network link `link` (its name under the sampler's net root, e.g.
    /// `caas-0123456789`) with every reading of the tenant target `key`, ticks and final ones
    /// alike. The link need not exist yet: until it can be read, readings have no network bytes.
    /// Fails if `key` is a container (containers share their tenant's network namespace), is not
    /// metered, or `link` is not a plain interface name. Setting the same link again changes
    /// nothing; another link replaces it.
    pub async fn set_link(&self, key: MeterKey, link: String) -> Result<(), MeterError> {
        self.request(|reply| Command::SetLink { key, link, reply })
            .await?
    }

    /// The sampler's counters as of its last tick or command.
    pub fn stats(&self) -> SamplerStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the thread and joins it. Further requests fail with [`MeterError::Stopped`];
    /// calling it again is harmless.
    pub async fn shutdown(&self) -> Result<(), MeterError> {
        // Stopped here means the thread already ended; the join below tells how.
        let _ = self.request(|reply| Command::Shutdown { reply }).await;
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(thread) = thread else {
            return Ok(());
        };
        // The thread has answered and is returning, so the join is immediate; it is still a
        // blocking call, so it goes through the blocking helper.
        let joined = crate::blocking::run(
            "joining the meter sampler",
            crate::blocking::DEFAULT_TIMEOUT,
            move || thread.join(),
        )
        .await;
        match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => {
                tracing::error!("the meter sampler thread panicked or did not stop");
                Err(MeterError::Stopped)
            }
        }
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeterError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| MeterError::Stopped)?;
        rx.await.map_err(|_| MeterError::Stopped)
    }
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
