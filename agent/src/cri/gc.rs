//! Deleting the tenants the CRI made once they have had no pod for `[cri] idle_tenant_ttl_secs`.
//!
//! A namespace becomes a tenant on its first pod (an engine, a uid range, a cgroup subtree, a
//! network). Without this, every namespace a cluster ever ran a pod in would keep them for good:
//! kubelet never says a namespace is gone, and test suites such as critest make one per test.
//!
//! Only tenants the CRI created (`caas.io/created-by=cri`) are collected, never the image tenant
//! (`PullImage` without a pod goes there) and never one made through the caas API. A tenant is
//! collected when, for the whole period, it had no pod sandbox in the CRI's records, and, at the
//! end, its engine has no container (one made through the caas API keeps it). The idle clocks
//! live in memory: after an agent restart every tenant waits a whole period again.
//!
//! `RunPodSandbox` and `PullImage` hold their tenant's gate (read) from before they ensure the
//! tenant until the pod is recorded or the image is pulled; the collector takes it (write) for
//! its last check and the delete. So a pod arriving meanwhile either finds the tenant, or waits
//! for the delete to end and makes the tenant again; it never lands in a tenant being torn down.
//! Billing is not touched: the ledger keeps the tenant's records, and a tenant made again under
//! the same id goes on in it.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Cri;
use crate::{
    sandbox::SandboxError,
    tenants::{TenantFilter, TenantState},
};

/// The label the CRI puts on the tenants it makes.
pub const CREATED_BY: (&str, &str) = ("caas.io/created-by", "cri");

/// How often the collector looks: a quarter of the period, between 1 s and 1 min.
fn interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Runs until `stop`; does nothing when the period is 0.
pub async fn run(cri: Arc<Cri>, stop: CancellationToken) {
    let secs = cri.state.config.cri.idle_tenant_ttl_secs;
    if secs == 0 {
        return;
    }
    let ttl = Duration::from_secs(secs);
    let mut idle: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval(ttl)) => {}
        }
        pass(&cri, ttl, &mut idle).await;
    }
}

/// One look: starts the idle clock of tenants without pods, stops that of tenants with one,
/// and deletes those idle for the whole period.
async fn pass(cri: &Arc<Cri>, ttl: Duration, idle: &mut HashMap<String, Instant>) {
    let filter = TenantFilter {
        labels: [(CREATED_BY.0.to_string(), CREATED_BY.1.to_string())].into(),
        ..TenantFilter::default()
    };
    let candidates: Vec<String> = cri
        .state
        .sandboxes
        .registry
        .list(&filter)
        .await
        .into_iter()
        .filter(|t| matches!(t.state, TenantState::Ready | TenantState::Failed))
        .filter(super::open_to_pods)
        .map(|t| t.id)
        .filter(|id| *id != cri.state.config.cri.image_tenant)
        .collect();
    let with_pods: HashSet<String> = cri
        .store
        .pods()
        .await
        .into_iter()
        .map(|p| p.tenant)
        .collect();
    idle.retain(|id, _| candidates.contains(id));
    let now = Instant::now();
    for id in candidates {
        if with_pods.contains(&id) {
            idle.remove(&id);
            continue;
        }
        let since = *idle.entry(id.clone()).or_insert(now);
        if now.duration_since(since) < ttl {
            continue;
        }
        match collect(cri, &id).await {
            Collected::Deleted => {
                idle.remove(&id);
                tracing::info!(tenant = %id, idle_secs = ttl.as_secs(), "tenant the CRI made deleted: it had no pod for the idle period ([cri] idle_tenant_ttl_secs)");
            }
            Collected::InUse => {
                idle.remove(&id);
            }
            Collected::Busy => {}
            Collected::Failed(e) => {
                // Tried again at the next look.
                tracing::warn!(tenant = %id, error = %e, "deleting an idle tenant the CRI made failed");
            }
        }
    }
}

enum Collected {
    Deleted,
    /// A pod or a container appeared: its clock starts again when they are gone.
    InUse,
    /// A pod or a pull is on its way into it, or its engine did not answer: looked at again
    /// next time.
    Busy,
    Failed(SandboxError),
}

async fn collect(cri: &Arc<Cri>, id: &str) -> Collected {
    let gate = cri.tenant_gate(id).await;
    let Ok(_closed) = gate.clone().try_write_owned() else {
        return Collected::Busy;
    };
    if cri.store.pods().await.iter().any(|p| p.tenant == id) {
        return Collected::InUse;
    }
    // A ready tenant's engine must say it holds no container: one that cannot answer now
    // (delete_tenant would count that as none) is looked at again later.
    let ready = cri
        .state
        .sandboxes
        .registry
        .get(id)
        .await
        .is_ok_and(|t| t.state == TenantState::Ready);
    if ready {
        let Ok((_, mut eng)) = cri.state.sandboxes.engine_of(id).await else {
            return Collected::Busy;
        };
        match eng.list(caas_proto::engine::v1::ListRequest {}).await {
            Ok(r) if r.get_ref().containers.is_empty() => {}
            Ok(_) => return Collected::InUse,
            Err(_) => return Collected::Busy,
        }
    }
    // In a task of its own: an agent shutting down must not cut a delete half-way.
    let state = cri.state.clone();
    let tenant = id.to_string();
    let done =
        tokio::spawn(async move { state.sandboxes.delete_tenant(&tenant, false).await }).await;
    // The gate stays in the map: a pod waiting on it meanwhile makes the tenant again under
    // the same gate, which the next look must see.
    match done {
        Ok(Ok(())) => Collected::Deleted,
        Ok(Err(SandboxError::HasContainers { .. })) => Collected::InUse,
        Ok(Err(e)) => Collected::Failed(e),
        Err(e) => Collected::Failed(SandboxError::Status(tonic::Status::internal(format!(
            "the delete task ended: {e}"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_looks_often_enough_and_not_too_often() {
        assert_eq!(interval(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(interval(Duration::from_secs(600)), Duration::from_secs(60));
        assert_eq!(interval(Duration::from_secs(120)), Duration::from_secs(30));
    }
}
