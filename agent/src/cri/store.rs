//! What the CRI keeps beside the caas model: pod sandboxes, and per container the CRI metadata.
//!
//! One JSON file per object under `<state_dir>/cri/{pods,containers}/<id>.json`, replaced
//! atomically, all loaded at start-up. The container's process state is never kept here: it is
//! the engine's, asked on every call.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// A pod sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PodRecord {
    /// 32 hex digits.
    pub id: String,
    /// The tenant it lives in.
    pub tenant: String,
    /// `metadata`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.attempt`.
    pub attempt: u32,
    /// Whether it is ready (false once stopped).
    pub ready: bool,
    /// Creation time, ns since the epoch.
    pub created_at_ns: i64,
    /// Where kubelet wants its containers' logs.
    pub log_directory: String,
    /// The pod's hostname.
    pub hostname: String,
    /// Labels as given.
    pub labels: BTreeMap<String, String>,
    /// Annotations as given.
    pub annotations: BTreeMap<String, String>,
    /// The runtime handler it was run with.
    pub runtime_handler: String,
    /// Its host ports (`hostPort`), published to its tenant's address while it is ready.
    #[serde(default)]
    pub ports: Vec<(crate::net::ports::Proto, u16, u16)>,
    /// Its `/etc/resolv.conf`, from its DNS config (empty: the tenant's).
    #[serde(default)]
    pub resolv_conf: String,
    /// CPU time of its removed containers, so that the pod's total never goes back.
    #[serde(default)]
    pub removed_cpu_ns: u64,
    /// Its network namespace of its own, set up by CNI (none: it shares its tenant's).
    #[serde(default)]
    pub network: Option<PodNetwork>,
    /// Namespaced kernel parameters, set in each of its containers.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// Whether its containers share a process namespace (`namespace_options.pid` POD), held
    /// by a PID 1 of the tenant's engine.
    #[serde(default)]
    pub shared_pid: bool,
    /// For a shared process namespace in a user-namespaced tenant: the tenant's namespace dir,
    /// where its PID 1 is recorded (so a pod whose PID 1 is gone shows not ready).
    #[serde(default)]
    pub pidns_dir: String,
}

/// A pod's own network namespace and what CNI made in it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct PodNetwork {
    /// The engine's name of the namespace (the pod id), recorded before it is made, so that an
    /// agent that dies half-way still finds what to tear down.
    pub netns: String,
    /// The bind mount that holds it (empty until it is made, and again once torn down).
    #[serde(default)]
    pub path: String,
    /// The CNI network list's name.
    #[serde(default)]
    pub network: String,
    /// The pod's address (from the last plugin's result), or empty until CNI has added it.
    #[serde(default)]
    pub ip: String,
    /// The network list it was added with, so DEL runs what ADD ran.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// The network list's result, kept for DEL (`prevResult`).
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// A VM tenant's pod: the list as the guest runs it (host-local IPAM, which runs on the
    /// host, replaced by static IPAM with the addresses it gave), so DEL runs there what ADD
    /// ran.
    #[serde(default)]
    pub guest_config: Option<serde_json::Value>,
    /// A VM tenant's pod: the boot of the VM its netns was made in (its VMM's record); empty
    /// for a user-namespaced tenant's pod.
    #[serde(default)]
    pub vm_boot: String,
}

/// The CRI side of one container of a pod.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerRecord {
    /// The caas container id (also the CRI id).
    pub id: String,
    /// Its pod.
    pub pod: String,
    /// Its tenant (the pod's).
    pub tenant: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.attempt`.
    pub attempt: u32,
    /// The image as kubelet named it.
    pub image: String,
    /// The image id (config digest).
    pub image_id: String,
    /// Labels as given.
    pub labels: BTreeMap<String, String>,
    /// Annotations as given.
    pub annotations: BTreeMap<String, String>,
    /// Absolute path of the CRI log file, or empty.
    pub log_path: String,
    /// Creation time, ns since the epoch.
    pub created_at_ns: i64,
    /// Host paths bound in: (host path, container path, read-only).
    #[serde(default)]
    pub mounts: Vec<(String, String, bool)>,
    /// Container paths of those mounts that are read-only all the way down.
    #[serde(default)]
    pub recursive_read_only: Vec<String>,
    /// Container paths of those mounts that receive the host's later mounts below them
    /// (HostToContainer).
    #[serde(default)]
    pub host_to_container: Vec<String>,
    /// Image volumes: container path to the image as kubelet named it.
    #[serde(default)]
    pub image_mounts: BTreeMap<String, String>,
    /// The ids (config digests) of those images.
    #[serde(default)]
    pub image_mount_ids: Vec<String>,
    /// The signal StopContainer sends first: the image's `StopSignal`; 0 for SIGTERM.
    #[serde(default)]
    pub stop_signal: i32,
    /// The image by the tag it was pulled by (empty: pulled by digest); ContainerStatus shows
    /// it, as containerd does, where kubelet put the image id.
    #[serde(default)]
    pub image_tag: String,
    /// The image as `repository@manifest digest`: ContainerStatus's `image_ref` (kubelet's
    /// `imageID` of the container).
    #[serde(default)]
    pub image_repo_digest: String,
}

/// How far a container's output has been copied to its CRI log: byte offsets of the engine's
/// stdout and stderr files, and whether the copy is complete (the container exited).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogOffsets {
    /// Bytes of stdout copied.
    pub stdout: u64,
    /// Bytes of stderr copied.
    pub stderr: u64,
    /// The output ended and all of it is in the log.
    pub done: bool,
}

/// Every pod and CRI container record.
#[derive(Debug)]
pub struct CriStore {
    root: PathBuf,
    pods: Mutex<HashMap<String, PodRecord>>,
    containers: Mutex<HashMap<String, ContainerRecord>>,
}

fn load<T: for<'de> Deserialize<'de>>(dir: &Path) -> io::Result<Vec<T>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path.extension().is_none_or(|x| x != "json") {
            // A temp file of a write a crash interrupted.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let data = crate::fsutil::read_capped(&path, 1 << 20)?;
        match serde_json::from_slice(&data) {
            Ok(r) => out.push(r),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "unreadable CRI record skipped; remove it")
            }
        }
    }
    Ok(out)
}

impl CriStore {
    /// The ready pods that publish ports, by tenant (their ports outlive an agent restart).
    pub fn port_owners(&self) -> HashMap<String, std::collections::HashSet<String>> {
        let mut out: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        for p in self
            .pods
            .try_lock()
            .map(|g| g.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if p.ready && !p.ports.is_empty() {
                out.entry(p.tenant).or_default().insert(p.id);
            }
        }
        out
    }

    /// Opens (and creates) the store under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for d in ["pods", "containers", "logs"] {
            crate::fsutil::ensure_dir(&root.join(d), 0o700)?;
        }
        let pods: Vec<PodRecord> = load(&root.join("pods"))?;
        let containers: Vec<ContainerRecord> = load(&root.join("containers"))?;
        Ok(Self {
            root: root.to_path_buf(),
            pods: Mutex::new(pods.into_iter().map(|p| (p.id.clone(), p)).collect()),
            containers: Mutex::new(containers.into_iter().map(|c| (c.id.clone(), c)).collect()),
        })
    }

    fn path(&self, kind: &str, id: &str) -> PathBuf {
        self.root.join(kind).join(format!("{id}.json"))
    }

    fn write<T: Serialize>(&self, kind: &str, id: &str, v: &T) -> io::Result<()> {
        let data = serde_json::to_vec(v).map_err(io::Error::other)?;
        crate::fsutil::write_atomic(&self.path(kind, id), &data, 0o600)
    }

    fn unlink(&self, kind: &str, id: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(kind, id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Adds a pod unless one with the same name, namespace, uid and attempt exists (then its
    /// id is the error).
    pub async fn add_pod(&self, p: PodRecord) -> Result<(), AddError> {
        let mut pods = self.pods.lock().await;
        if let Some(o) = pods.values().find(|o| {
            o.name == p.name
                && o.namespace == p.namespace
                && o.uid == p.uid
                && o.attempt == p.attempt
        }) {
            return Err(AddError::Exists(o.id.clone()));
        }
        self.write("pods", &p.id, &p).map_err(AddError::Io)?;
        pods.insert(p.id.clone(), p);
        Ok(())
    }

    /// The pod `id`, or the one pod whose id starts with it.
    pub async fn pod(&self, id: &str) -> Option<PodRecord> {
        let pods = self.pods.lock().await;
        if let Some(p) = pods.get(id) {
            return Some(p.clone());
        }
        let mut m = pods
            .values()
            .filter(|p| !id.is_empty() && p.id.starts_with(id));
        match (m.next(), m.next()) {
            (Some(p), None) => Some(p.clone()),
            _ => None,
        }
    }

    /// Every pod.
    pub async fn pods(&self) -> Vec<PodRecord> {
        self.pods.lock().await.values().cloned().collect()
    }

    /// Marks a pod not ready.
    pub async fn set_pod_ready(&self, id: &str, ready: bool) -> io::Result<()> {
        let mut pods = self.pods.lock().await;
        if let Some(p) = pods.get_mut(id)
            && p.ready != ready
        {
            let mut q = p.clone();
            q.ready = ready;
            self.write("pods", id, &q)?;
            *p = q;
        }
        Ok(())
    }

    /// Replaces a pod's network record.
    pub async fn set_pod_network(&self, id: &str, network: Option<PodNetwork>) -> io::Result<()> {
        let mut pods = self.pods.lock().await;
        if let Some(p) = pods.get_mut(id)
            && p.network != network
        {
            let mut q = p.clone();
            q.network = network;
            self.write("pods", id, &q)?;
            *p = q;
        }
        Ok(())
    }

    /// Adds a removed container's CPU time to its pod's total.
    pub async fn add_removed_cpu(&self, id: &str, ns: u64) -> io::Result<()> {
        let mut pods = self.pods.lock().await;
        if let Some(p) = pods.get_mut(id)
            && ns > 0
        {
            let mut q = p.clone();
            q.removed_cpu_ns = q.removed_cpu_ns.saturating_add(ns);
            self.write("pods", id, &q)?;
            *p = q;
        }
        Ok(())
    }

    /// Forgets a pod.
    pub async fn remove_pod(&self, id: &str) -> io::Result<()> {
        let mut pods = self.pods.lock().await;
        self.unlink("pods", id)?;
        pods.remove(id);
        Ok(())
    }

    /// Whether a container id is taken by a CRI container.
    pub async fn has_container(&self, id: &str) -> bool {
        self.containers.lock().await.contains_key(id)
    }

    /// Adds a container record.
    pub async fn add_container(&self, c: ContainerRecord) -> io::Result<()> {
        let mut cs = self.containers.lock().await;
        self.write("containers", &c.id, &c)?;
        cs.insert(c.id.clone(), c);
        Ok(())
    }

    /// The container `id`, or the one whose id starts with it.
    pub async fn container(&self, id: &str) -> Option<ContainerRecord> {
        let cs = self.containers.lock().await;
        if let Some(c) = cs.get(id) {
            return Some(c.clone());
        }
        let mut m = cs
            .values()
            .filter(|c| !id.is_empty() && c.id.starts_with(id));
        match (m.next(), m.next()) {
            (Some(c), None) => Some(c.clone()),
            _ => None,
        }
    }

    /// Every container record.
    pub async fn containers(&self) -> Vec<ContainerRecord> {
        self.containers.lock().await.values().cloned().collect()
    }

    /// The containers of a pod.
    pub async fn containers_of(&self, pod: &str) -> Vec<ContainerRecord> {
        self.containers
            .lock()
            .await
            .values()
            .filter(|c| c.pod == pod)
            .cloned()
            .collect()
    }

    /// How far the container's output was copied (zero when never).
    pub fn log_offsets(&self, id: &str) -> LogOffsets {
        crate::fsutil::read_capped(&self.path("logs", id), 4096)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }

    /// Records how far the output was copied. Without fsync: after a host crash the copy
    /// starts again from an older offset, and lines are written twice, not lost.
    pub fn set_log_offsets(&self, id: &str, o: LogOffsets) -> io::Result<()> {
        let data = serde_json::to_vec(&o).map_err(io::Error::other)?;
        crate::fsutil::write_replace_volatile(&self.path("logs", id), &data, 0o600)
    }

    /// Forgets a container.
    pub async fn remove_container(&self, id: &str) -> io::Result<()> {
        let mut cs = self.containers.lock().await;
        self.unlink("logs", id)?;
        self.unlink("containers", id)?;
        cs.remove(id);
        Ok(())
    }
}

/// Why a pod could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The same pod (name, namespace, uid, attempt) exists.
    #[error("pod sandbox {0} has the same name, namespace, uid and attempt")]
    Exists(String),
    /// Its record could not be written.
    #[error("writing the pod record: {0}")]
    Io(io::Error),
}
