//! The metering pipeline as the agent runs it: the [`crate::meter`] sampler reads every tenant
//! and container cgroup each second, one task hands its batches to the [`crate::ledger`], and
//! readers (the usage API, the exporter, the metrics endpoint) share the ledger and a watch of
//! the last record cursor written.
//!
//! What this module owns: which cgroups are metered (tenants once ready, containers once
//! created) and which tenants' network links with them ([`Metering::track_tenant_link`]), the
//! readings around a cgroup's removal ([`Metering::flush_container`] before,
//! [`Metering::finish_container`] after: if the cgroup is gone by then, the reading taken
//! before is the final one), and flushing the ledger at shutdown. It never touches the
//! kernel itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    cgroups::{CgroupLayout, TenantCgroups},
    ledger::{Ledger, LedgerConfig, LedgerError},
    meter::{Counters, MeterError, MeterKey, Sample, Sampler, SamplerConfig, SamplerHandle},
};

/// How often acknowledged records and old samples are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(300);
/// How long to wait before retrying a batch the ledger refused.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// How long blocking ledger work may take before a caller gets an error.
pub const LEDGER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why metering could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeteringError {
    /// The ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The sampler could not be started.
    #[error(transparent)]
    Meter(#[from] MeterError),
}

/// The shared ledger: SQLite work is blocking, so callers on the runtime go through
/// [`crate::blocking::run`].
pub type SharedLedger = Arc<Mutex<Ledger>>;

/// Locks the ledger; a panic in another holder does not make the data unusable (every write
/// is one transaction), so poisoning is ignored.
pub fn lock(ledger: &SharedLedger) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running pipeline.
#[derive(Debug)]
pub struct Metering {
    /// The ledger, shared with readers.
    pub ledger: SharedLedger,
    /// The sampler.
    pub sampler: SamplerHandle,
    written: watch::Receiver<u64>,
    latest: Arc<Mutex<BTreeMap<MeterKey, (Counters, i64)>>>,
    tracked: Mutex<BTreeSet<MeterKey>>,
    /// (tenant, container name) -> container id, so a delete by name finds its key.
    names: Mutex<BTreeMap<(String, String), String>>,
    cgroups: TenantCgroups,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Now, in whole Unix seconds (0 if the clock is before 1970).
pub fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Metering {
    /// Opens the ledger at `db`, starts the sampler on `cgroup_root` and the task that feeds
    /// the ledger. Must be called inside a tokio runtime.
    pub fn start(
        db: &Path,
        config: LedgerConfig,
        cgroup_root: &Path,
        layout: CgroupLayout,
        cgroups: TenantCgroups,
    ) -> Result<Self, MeteringError> {
        let ledger = Ledger::open(db, config)?;
        let last = ledger.last_cursor()?;
        let ledger = Arc::new(Mutex::new(ledger));
        let (tx, rx) = mpsc::unbounded_channel();
        let sampler = Sampler::spawn(SamplerConfig::new(cgroup_root, layout), tx)?;
        let (written_tx, written) = watch::channel(last);
        let latest = Arc::new(Mutex::new(BTreeMap::new()));
        let task = tokio::spawn(feed(rx, ledger.clone(), written_tx, latest.clone()));
        Ok(Self {
            ledger,
            sampler,
            written,
            latest,
            tracked: Mutex::new(BTreeSet::new()),
            names: Mutex::new(BTreeMap::new()),
            cgroups,
            task: Mutex::new(Some(task)),
        })
    }

    /// A receiver of the last record cursor written (changes whenever records are added).
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.clone()
    }

    /// The last counters read of every metered cgroup (for the metrics endpoint).
    pub fn latest(&self) -> Vec<(MeterKey, Counters)> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, (c, _))| (k.clone(), *c))
            .collect()
    }

    /// [`Metering::latest`] with the time of each reading (ns since the Unix epoch).
    pub fn latest_timed(&self) -> Vec<(MeterKey, Counters, i64)> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, (c, at))| (k.clone(), *c, *at))
            .collect()
    }

    fn tenant_key(tenant: &str) -> MeterKey {
        MeterKey {
            tenant: tenant.to_string(),
            container: None,
        }
    }

    fn container_key(tenant: &str, container: &str) -> MeterKey {
        MeterKey {
            tenant: tenant.to_string(),
            container: Some(container.to_string()),
        }
    }

    fn is_tracked(&self, key: &MeterKey) -> bool {
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    async fn track(&self, key: MeterKey, rel: String) {
        if self.is_tracked(&key) {
            return;
        }
        match self.sampler.add(key.clone(), rel.clone()).await {
            Ok(()) | Err(MeterError::AlreadyMetered { .. }) => {
                self.tracked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key);
            }
            // Usage of a cgroup that cannot be read is not billed; say so loudly.
            Err(e) => tracing::error!(
                tenant = %key.tenant,
                container = key.container.as_deref().unwrap_or("-"),
                cgroup = %rel,
                error = %e,
                "cgroup cannot be metered"
            ),
        }
    }

    /// Meters a tenant's whole subtree (from when it is ready, or recovered).
    pub async fn track_tenant(&self, tenant: &str) {
        let rel = self.cgroups.tenant_path(tenant);
        let rel = rel.trim_start_matches('/').to_string();
        self.track(Self::tenant_key(tenant), rel).await;
    }

    /// Also meters the tenant's network bytes, from its host-side link `link` (e.g.
    /// [`crate::net::link_name`] of the tenant), with every reading of the tenant: call it after
    /// [`Metering::track_tenant`] once the tenant's network is up (or recovered). Calling it again
    /// with the same link changes nothing. Containers get no network bytes: they share the
    /// tenant's network namespace. A link that cannot be read (yet) never stops the tenant's
    /// metering; the readings leave its bytes out until it can be.
    pub async fn track_tenant_link(&self, tenant: &str, link: &str) {
        let key = Self::tenant_key(tenant);
        let tracked = self.is_tracked(&key);
        if !tracked {
            // `track_tenant` failed (and said why), or was not called.
            tracing::error!(
                tenant,
                link,
                "tenant is not metered; its network bytes cannot be metered either"
            );
            return;
        }
        if let Err(e) = self.sampler.set_link(key, link.to_string()).await {
            tracing::error!(tenant, link, error = %e, "network link cannot be metered");
        }
    }

    /// Meters a container's cgroup (from its creation, or its recovery).
    pub async fn track_container(&self, tenant: &str, id: &str, name: &str) {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((tenant.to_string(), name.to_string()), id.to_string());
        let tenant_rel = self.cgroups.tenant_path(tenant);
        let rel = format!("{}/c-{id}", tenant_rel.trim_start_matches('/'));
        self.track(Self::container_key(tenant, id), rel).await;
    }

    async fn finish(&self, key: MeterKey) {
        let was = self
            .tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        if !was {
            return;
        }
        match self.sampler.finish(key.clone()).await {
            Ok(_) => {}
            // A tick saw the cgroup gone first and emitted its final reading then.
            Err(MeterError::NotMetered { .. }) => {}
            Err(e) => tracing::warn!(
                tenant = %key.tenant,
                container = key.container.as_deref().unwrap_or("-"),
                error = %e,
                "final reading failed; usage since the last sample is not billed"
            ),
        }
    }

    /// The id of a metered container named `container` (an id or a name); ids of containers
    /// no longer metered pass through.
    pub fn container_id(&self, tenant: &str, container: &str) -> String {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(tenant.to_string(), container.to_string()))
            .cloned()
            .unwrap_or_else(|| container.to_string())
    }

    /// A reading of a container taken now, before an operation that may remove its cgroup
    /// (a delete, which the engine may also refuse). The container stays metered; call
    /// [`Metering::finish_container`] once the operation succeeded.
    pub async fn flush_container(&self, tenant: &str, container: &str) {
        let key = Self::container_key(tenant, &self.container_id(tenant, container));
        self.read_now(key).await;
    }

    /// A reading of a metered container taken now, for a caller that needs one before the
    /// next tick (the CRI's stats of a container started a moment ago). It is a reading like
    /// any other: it also goes to the ledger. With when it was read (ns since the Unix epoch);
    /// `None` when the container is not metered or its cgroup cannot be read.
    pub async fn read_container_now(&self, tenant: &str, id: &str) -> Option<(Counters, i64)> {
        let key = Self::container_key(tenant, id);
        let tracked = self.is_tracked(&key);
        if !tracked {
            return None;
        }
        self.sampler
            .read_now(key)
            .await
            .ok()
            .map(|s| (s.counters, s.read_at_ns))
    }

    /// [`Metering::flush_container`] for a tenant and all of its containers.
    pub async fn flush_tenant(&self, tenant: &str) {
        for key in self.keys_of(tenant) {
            self.read_now(key).await;
        }
    }

    async fn read_now(&self, key: MeterKey) {
        let tracked = self.is_tracked(&key);
        if tracked && let Err(e) = self.sampler.read_now(key.clone()).await {
            tracing::warn!(
                tenant = %key.tenant,
                container = key.container.as_deref().unwrap_or("-"),
                error = %e,
                "reading a cgroup before its removal failed"
            );
        }
    }

    fn keys_of(&self, tenant: &str) -> Vec<MeterKey> {
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|k| k.tenant == tenant)
            .cloned()
            .collect()
    }

    /// The final reading of a container (named by id or name), before its cgroup is removed.
    pub async fn finish_container(&self, tenant: &str, container: &str) {
        let id = {
            let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
            match names.remove(&(tenant.to_string(), container.to_string())) {
                Some(id) => id,
                None => {
                    names.retain(|(t, _), id| !(t == tenant && id == container));
                    container.to_string()
                }
            }
        };
        self.finish(Self::container_key(tenant, &id)).await;
    }

    /// The final readings of a tenant and every container of it still metered, before the
    /// subtree is removed.
    pub async fn finish_tenant(&self, tenant: &str) {
        let keys = self.keys_of(tenant);
        // Containers first: their records close before the tenant's.
        for k in keys.iter().filter(|k| k.container.is_some()) {
            self.finish(k.clone()).await;
        }
        self.finish(Self::tenant_key(tenant)).await;
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(t, _), _| t != tenant);
    }

    /// Stops sampling and waits until every batch taken is in the ledger.
    pub async fn shutdown(&self) {
        if let Err(e) = self.sampler.shutdown().await {
            tracing::debug!(error = %e, "sampler already stopped");
        }
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            // The sampler's sender is gone, so the feed ends once it drained the channel.
            let _ = task.await;
        }
    }
}

/// Moves batches from the sampler into the ledger, closes idle windows and prunes.
async fn feed(
    mut rx: mpsc::UnboundedReceiver<Vec<Sample>>,
    ledger: SharedLedger,
    written: watch::Sender<u64>,
    latest: Arc<Mutex<BTreeMap<MeterKey, (Counters, i64)>>>,
) {
    let mut last_prune = tokio::time::Instant::now();
    // A batch the ledger could not take; it goes in front of the next one.
    let mut pending: Vec<Sample> = Vec::new();
    let mut closed = false;
    // Logged when writes start failing and when they work again, not on every retry.
    let mut failing = false;
    loop {
        let mut batch = std::mem::take(&mut pending);
        if batch.is_empty() {
            match rx.recv().await {
                Some(b) => batch = b,
                None => return,
            }
        } else if !closed {
            tokio::time::sleep(RETRY_AFTER).await;
        }
        // Everything already queued goes into the same transaction.
        loop {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        {
            let mut l = latest.lock().unwrap_or_else(PoisonError::into_inner);
            for s in &batch {
                if s.last {
                    l.remove(&s.key);
                } else {
                    l.insert(s.key.clone(), (s.counters, s.read_at_ns));
                }
            }
        }
        let prune = last_prune.elapsed() >= PRUNE_EVERY;
        if prune {
            last_prune = tokio::time::Instant::now();
        }
        let l = ledger.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut g = lock(&l);
            let now = now_unix_s();
            let made = match g.ingest(&batch) {
                Ok(r) => r.len(),
                Err(e) => return Err((e, batch)),
            };
            let idle = g.close_idle(now).map(|r| r.len()).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "closing idle windows failed");
                0
            });
            if prune && let Err(e) = g.prune(now) {
                tracing::warn!(error = %e, "pruning the ledger failed");
            }
            let cursor = g.last_cursor().unwrap_or(0);
            Ok((made + idle, cursor))
        })
        .await;
        match result {
            Ok(Ok((made, cursor))) => {
                if failing {
                    failing = false;
                    tracing::info!("usage ledger writes work again; nothing was lost");
                }
                if made > 0 {
                    written.send_replace(cursor);
                }
            }
            Ok(Err((e, batch))) => {
                // The counters are cumulative and the baseline only moves on commit: retrying
                // the batch later loses nothing.
                if !failing {
                    failing = true;
                    tracing::error!(error = %e, samples = batch.len(), "writing usage to the ledger failed; retrying every 500 ms");
                }
                if closed {
                    tracing::error!(
                        "the agent is stopping; the usage since the last commit will be counted after its restart"
                    );
                    return;
                }
                pending = batch;
            }
            Err(e) => tracing::error!(error = %e, "the ledger task panicked"),
        }
        if closed && pending.is_empty() {
            return;
        }
    }
}
