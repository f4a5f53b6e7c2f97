//! kubelet updates configMap, secret, projected and downward-API volumes in place, with its
//! atomic writer (the names a container sees link through `..data` to a timestamped directory,
//! and an update swaps `..data`). A container of a VM tenant has a copy of each volume in its
//! guest (`sandbox::vm_import`), so the agent watches the host's directories and brings each
//! update in: every [`EVERY`], a watched directory whose import key changed (a new change time)
//! is sent into the guest and the container's copy is swapped to it the same way (engine
//! `SyncVolume`). Renewed certificates, rotated tokens and edited configuration reach a running
//! VM pod as they reach any other, within about kubelet's own delay plus [`EVERY`].

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError},
    time::Duration,
};

use caas_proto::engine::v1 as epb;
use tokio_util::sync::CancellationToken;

use super::Cri;
use crate::{
    sandbox::{SandboxError, vm_import},
    tenants::Isolation,
};

/// How often the watched directories are looked at.
pub const EVERY: Duration = Duration::from_secs(10);

/// A VM container's volume kubelet updates: its tenant, the host's directory, and the import
/// key its copy was last brought to (empty: not known, after an agent restart).
#[derive(Debug, Clone)]
pub struct Watched {
    tenant: String,
    host: PathBuf,
    key: String,
}

/// By (container id, container path).
pub type WatchList = std::sync::Mutex<HashMap<(String, String), Watched>>;

/// A directory in kubelet's atomic-writer layout.
fn is_atomic_writer(dir: &Path) -> bool {
    dir.join("..data")
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
}

/// The volumes of a VM container to watch: read-only directories in kubelet's atomic-writer
/// layout, with their keys now. Taken before the copies are made, so that a change between
/// this and the copy is brought in once more rather than missed.
pub fn watchable(mounts: &[epb::BindMount]) -> Vec<(String, PathBuf, String)> {
    mounts
        .iter()
        .filter(|m| m.readonly && m.image_layers.is_empty() && m.device_access.is_empty())
        .map(|m| (m.container_path.clone(), PathBuf::from(&m.host_path)))
        .filter(|(_, host)| is_atomic_writer(host))
        .filter_map(|(inside, host)| {
            let key = vm_import::volume_dir_key(&host).ok()?;
            Some((inside, host, key))
        })
        .collect()
}

impl Cri {
    /// Watches `volumes` (from [`watchable`]) of the VM container `id` of `tenant`.
    pub(crate) fn watch_volumes(
        &self,
        tenant: &str,
        id: &str,
        volumes: Vec<(String, PathBuf, String)>,
    ) {
        let mut w = self
            .vm_volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (inside, host, key) in volumes {
            w.insert(
                (id.to_string(), inside),
                Watched {
                    tenant: tenant.to_string(),
                    host,
                    key,
                },
            );
        }
    }

    /// Stops watching the volumes of container `id`.
    pub(crate) fn unwatch_volumes(&self, id: &str) {
        self.vm_volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(c, _), _| c != id);
    }
}

/// Runs until `stop`. After an agent restart every CRI container's atomic-writer volumes are
/// watched again with their keys unknown: one sync each, which changes nothing where the
/// guest's copy is current (and a container of a user-namespace tenant is dropped at once).
pub async fn run(cri: Arc<Cri>, stop: CancellationToken) {
    for c in cri.store.containers().await {
        let volumes = c
            .mounts
            .iter()
            .filter(|(_, _, ro)| *ro)
            .map(|(host, inside, _)| (inside.clone(), PathBuf::from(host)))
            .filter(|(_, host)| is_atomic_writer(host))
            .map(|(inside, host)| (inside, host, String::new()))
            .collect();
        cri.watch_volumes(&c.tenant, &c.id, volumes);
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
        pass(&cri).await;
    }
}

/// One look at every watched directory.
pub async fn pass(cri: &Arc<Cri>) {
    let watched: Vec<((String, String), Watched)> = cri
        .vm_volumes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(k, w)| (k.clone(), w.clone()))
        .collect();
    let forget = |k: &(String, String)| {
        cri.vm_volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(k);
    };
    for ((id, inside), w) in watched {
        let k = (id.clone(), inside.clone());
        // Gone from the host: the pod is on its way out.
        let Ok(now) = vm_import::volume_dir_key(&w.host) else {
            forget(&k);
            continue;
        };
        if now == w.key {
            continue;
        }
        let Ok((t, mut eng)) = cri.state.sandboxes.engine_of(&w.tenant).await else {
            continue;
        };
        if t.isolation != Isolation::Vm {
            forget(&k);
            continue;
        }
        match vm_import::sync_volume_dir(&mut eng, &id, &inside, &w.host).await {
            Ok(changed) => {
                if changed {
                    tracing::info!(container = %id, volume = %inside, "a volume kubelet updated was brought into the VM");
                }
                if let Some(e) = cri
                    .vm_volumes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_mut(&k)
                {
                    e.key = now;
                }
            }
            // The container is gone or has exited: nothing to update any more.
            Err(SandboxError::Status(s))
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition
                ) =>
            {
                forget(&k);
            }
            Err(e) => {
                tracing::warn!(container = %id, volume = %inside, error = %e, "bringing a volume update into the VM failed; tried again");
            }
        }
    }
}
