//! `GetContainerEvents`: the tenant engines' container events, as the CRI names them.
//!
//! Every tenant open to pods that is ready has its engine's event stream followed (from now on;
//! a tenant that appears is picked up within [`RESCAN`]). Events of CRI containers go out with
//! the pod's status and its containers' statuses, as kubelet's evented PLEG wants; an engine
//! that restarts is followed again at the next scan, and kubelet's periodic relist covers what
//! fell in between.

use std::{collections::HashSet, sync::Arc, time::Duration};

use caas_proto::{cri::v1 as cri, engine::v1 as epb, v1 as pb};
use futures::StreamExt;
use tokio::sync::{Mutex, mpsc};
use tonic::Status;

use super::{Cri, now_ns};

/// How often the tenants are scanned for engines to follow.
pub const RESCAN: Duration = Duration::from_secs(2);

/// The CRI's event type for an engine event (None: not one the CRI has).
fn kind(t: i32) -> Option<cri::ContainerEventType> {
    match pb::ContainerEventType::try_from(t).ok()? {
        pb::ContainerEventType::Created => Some(cri::ContainerEventType::ContainerCreatedEvent),
        pb::ContainerEventType::Started => Some(cri::ContainerEventType::ContainerStartedEvent),
        pb::ContainerEventType::Exited => Some(cri::ContainerEventType::ContainerStoppedEvent),
        pb::ContainerEventType::Deleted => Some(cri::ContainerEventType::ContainerDeletedEvent),
        _ => None,
    }
}

/// The engines followed, and where their events go.
pub struct Followers {
    following: Arc<Mutex<HashSet<String>>>,
    etx: mpsc::Sender<pb::ContainerEvent>,
    erx: mpsc::Receiver<pb::ContainerEvent>,
}

impl Followers {
    /// Follows every ready tenant open to pods not followed yet. Returns once each engine has
    /// subscribed, so no event after this call is missed.
    pub async fn scan(&self, cri: &Cri) {
        let tenants = cri
            .state
            .sandboxes
            .registry
            .list(&crate::tenants::TenantFilter {
                state: Some(crate::tenants::TenantState::Ready),
                ..Default::default()
            })
            .await;
        for t in tenants.into_iter().filter(super::open_to_pods) {
            if !self.following.lock().await.insert(t.id.clone()) {
                continue;
            }
            let stream = match cri.state.sandboxes.engine_of(&t.id).await {
                Ok((_, mut eng)) => eng
                    .events(epb::EventsRequest { after_seq: 0 })
                    .await
                    .map(tonic::Response::into_inner),
                Err(e) => Err(Status::unavailable(e.to_string())),
            };
            let Ok(mut s) = stream else {
                self.following.lock().await.remove(&t.id);
                continue;
            };
            let (etx, following) = (self.etx.clone(), self.following.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = etx.closed() => break,
                        e = s.next() => match e {
                            Some(Ok(e)) => {
                                if etx.send(e).await.is_err() {
                                    break;
                                }
                            }
                            _ => break,
                        },
                    }
                }
                following.lock().await.remove(&t.id);
            });
        }
    }
}

/// Subscribes to every engine of a pod tenant now (see [`Followers::scan`]).
pub async fn subscribe(cri: &Cri) -> Followers {
    let (etx, erx) = mpsc::channel(256);
    let f = Followers {
        following: Arc::default(),
        etx,
        erx,
    };
    f.scan(cri).await;
    f
}

/// Streams events to `tx` until it closes or the agent stops.
pub async fn run(
    cri: Arc<Cri>,
    mut f: Followers,
    tx: mpsc::Sender<Result<cri::ContainerEventResponse, Status>>,
) {
    let mut tick = tokio::time::interval(RESCAN);
    tick.tick().await;
    let stop = cri.state.shutdown.clone();
    loop {
        tokio::select! {
            () = tx.closed() => return,
            () = stop.cancelled() => return,
            _ = tick.tick() => f.scan(&cri).await,
            Some(e) = f.erx.recv() => {
                let Some(k) = kind(e.r#type) else { continue };
                if let Some(r) = cri.event(&e, k).await
                    && tx.send(Ok(r)).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

impl Cri {
    /// The CRI event for an engine event of a CRI container (None for other containers).
    async fn event(
        &self,
        e: &pb::ContainerEvent,
        k: cri::ContainerEventType,
    ) -> Option<cri::ContainerEventResponse> {
        // A CRI container's engine name is `k8s-<id>`; its record may be gone already when the
        // deletion is reported.
        if !e.container_name.starts_with("k8s-") {
            return None;
        }
        let rec = self.store.container(&e.container_id).await;
        let mut pod_sandbox_status = None;
        let mut containers_statuses = Vec::new();
        if let Some(rec) = &rec
            && let Some(p) = self.store.pod(&rec.pod).await
        {
            let ip = self.pod_ip(&p).await;
            let ready = self.ready_tenants().await;
            pod_sandbox_status = Some(self.pod_status(&p, ip, &ready));
            for c in self.store.containers_of(&p.id).await {
                containers_statuses.push(self.status_of(&c).await);
            }
        }
        Some(cri::ContainerEventResponse {
            container_id: e.container_id.clone(),
            container_event_type: k as i32,
            created_at: if e.time_unix_ms > 0 {
                super::ns(e.time_unix_ms)
            } else {
                now_ns()
            },
            pod_sandbox_status,
            containers_statuses,
        })
    }
}
