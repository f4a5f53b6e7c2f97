//! The Kubernetes Container Runtime Interface (CRI v1): `runtime.v1.RuntimeService` and
//! `runtime.v1.ImageService` on a unix socket of their own, for kubelet and crictl.
//!
//! It is a second front door to the same domain, not a second runtime: a pod sandbox lives in a
//! tenant (annotation `caas.io/tenant`, else the pod's namespace), its containers are that
//! tenant's containers, made by the tenant's engine, metered and billed like any other. What the
//! CRI adds is kept in [`store`]: the pod sandboxes, and per container the CRI metadata that the
//! caas model has no field for (pod, attempt, annotations, log path).

pub mod cni;
mod events;
pub mod gc;
mod image;
mod logs;
pub mod mountinfo;
mod runtime;
mod seccomp;
mod stats;
pub mod store;
pub mod stream;
pub mod vm_volumes;

use std::{path::PathBuf, sync::Arc};

use caas_proto::cri::v1::{
    image_service_server::ImageServiceServer, runtime_service_server::RuntimeServiceServer,
};
use serde::{Deserialize, Serialize};

use crate::{api::AgentState, validate::Invalid};

/// The pod annotation that names a pod's tenant.
pub const TENANT_ANNOTATION: &str = "caas.io/tenant";
/// The tenant label that opens a tenant to Kubernetes pods (`true`). Tenants the CRI creates
/// carry it; a tenant made through the caas API is not joined by pods unless it does.
pub const CRI_LABEL: &str = "caas.io/cri";

/// Whether pods may live in `t`.
pub fn open_to_pods(t: &crate::tenants::Tenant) -> bool {
    t.labels.get(CRI_LABEL).is_some_and(|v| v == "true")
}

/// The runtime handler (RuntimeClass) of user-namespaced sandboxes; also the default ("").
pub const HANDLER_USERNS: &str = "caas-userns";
/// The runtime handler of VM tenants.
pub const HANDLER_VM: &str = "caas-vm";

/// `[cri]`: the CRI socket.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    /// Serve the CRI (default off: a node that is not a Kubernetes node does not need it).
    pub enabled: bool,
    /// The socket (default `<run_dir>/cri.sock`); root only, like containerd's.
    pub socket: Option<PathBuf>,
    /// Refuse pods whose tenant does not exist, instead of creating it on first use.
    pub require_known_tenants: bool,
    /// The tenant that a `PullImage` without a pod config (`crictl pull`) pulls into.
    pub image_tenant: String,
    /// Quotas of tenants created on first use (unset: the `[tenants]` defaults).
    pub default_quotas: DefaultQuotas,
    /// Host directories under which volumes (`mounts`) may lie: kubelet's directory by
    /// default. Paths resolve (symlinks followed) before they are checked.
    pub volume_roots: Vec<PathBuf>,
    /// kubelet's root directory: inside it, a pod's volumes may lie only in its own
    /// `pods/<uid>` (never another pod's, nor kubelet's plugin dirs).
    pub kubelet_root: PathBuf,
    /// Where the streaming server (exec, port-forward) listens; kubelet connects to the URLs
    /// it hands out. Loopback by default: kubelet runs on this host.
    pub stream_address: std::net::SocketAddr,
    /// Host device nodes (char or block) that containers may be given (`devices`, as device
    /// plugins ask for them); none by default. A device reaches only the tenants of pods that
    /// ask for it: list only what tenants may share. Paths resolve before they are compared.
    pub allowed_devices: Vec<PathBuf>,
    /// Honour seccomp `Unconfined` as Kubernetes defines it: a container that asks for it, or
    /// asks for no profile at all, runs without a filter. Off by default: every container gets
    /// at least the runtime's default profile, whatever it asks (a multi-tenant node's kernel
    /// is shared by all tenants).
    pub allow_unconfined_seccomp: bool,
    /// A tenant the CRI made is deleted after this many seconds without a pod (and with no
    /// container made through the caas API); 0 keeps them for good. Its usage stays in the
    /// ledger, and the next pod of its namespace makes it again.
    pub idle_tenant_ttl_secs: u64,
    /// Which volumes are shown through the tenant's id mapping (idmapped mounts), so that
    /// their on-disk owners and groups are the container's ids: `pod` (default) the pod's own
    /// (in kubelet's `pods/<uid>`, whose owners and groups kubelet sets for the container's ids,
    /// fsGroup), `all` every volume, `none` none. Others keep host ids, which the tenant's user
    /// namespace shows as nobody unless they lie in its range.
    pub idmap_volumes: IdmapVolumes,
    /// `[cri.cni]`: a network namespace per pod, set up by CNI plugins.
    pub cni: cni::CniConfig,
}

impl Default for CriConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            socket: None,
            require_known_tenants: false,
            image_tenant: "default".into(),
            default_quotas: DefaultQuotas::default(),
            volume_roots: vec![PathBuf::from("/var/lib/kubelet")],
            kubelet_root: PathBuf::from("/var/lib/kubelet"),
            stream_address: std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            allowed_devices: Vec::new(),
            allow_unconfined_seccomp: false,
            idle_tenant_ttl_secs: 600,
            idmap_volumes: IdmapVolumes::Pod,
            cni: cni::CniConfig::default(),
        }
    }
}

/// `[cri] idmap_volumes`: which volumes are idmapped.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IdmapVolumes {
    /// None: every volume keeps host ids.
    None,
    /// The pod's own, in kubelet's `pods/<uid>`.
    #[default]
    Pod,
    /// Every volume (host paths too: the container's root then owns what host root owns in
    /// them; for clusters of one customer, and critest's host-path volume specs).
    All,
}

/// Quotas of the tenants the CRI creates.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultQuotas {
    /// CPUs.
    pub cpus: Option<f64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Process ids.
    pub pids: Option<u64>,
    /// Containers at once.
    pub max_containers: Option<u32>,
}

impl CriConfig {
    /// Checks paths and the image tenant's id.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(p) = &self.socket {
            if !p.is_absolute() {
                return Err(Invalid::new(
                    "cri.socket",
                    format!("{} must be an absolute path", p.display()),
                ));
            }
            if p.as_os_str().len() > 107 {
                return Err(Invalid::new(
                    "cri.socket",
                    "is longer than the 107 bytes a unix socket path may have",
                ));
            }
        }
        for (i, r) in self.volume_roots.iter().enumerate() {
            let forbidden = ["/proc", "/sys", "/dev"].iter().any(|f| r.starts_with(f))
                || r == std::path::Path::new("/");
            if !r.is_absolute() || forbidden {
                return Err(Invalid::new(
                    format!("cri.volume_roots[{i}]"),
                    format!(
                        "{} must be an absolute directory other than / and not under /proc, /sys or /dev",
                        r.display()
                    ),
                ));
            }
        }
        if !self.kubelet_root.is_absolute() {
            return Err(Invalid::new(
                "cri.kubelet_root",
                format!("{} must be an absolute path", self.kubelet_root.display()),
            ));
        }
        for (i, d) in self.allowed_devices.iter().enumerate() {
            if !d.is_absolute() {
                return Err(Invalid::new(
                    format!("cri.allowed_devices[{i}]"),
                    format!("{} must be an absolute path", d.display()),
                ));
            }
        }
        self.cni.validate()?;
        crate::validate::check_id("cri.image_tenant", &self.image_tenant)
    }
}

/// What the CRI services share.
#[derive(Debug)]
pub struct Cri {
    /// The agent's state: tenants, engines, images, meter.
    pub state: Arc<AgentState>,
    /// Pod sandboxes and CRI container records.
    pub store: store::CriStore,
    /// The copiers writing containers' output to kubelet's log files.
    pub logs: logs::Copiers,
    /// Per pod: its container creates, its stop and its remove, one at a time.
    pub(crate) pod_locks:
        tokio::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The streaming server of Exec and PortForward.
    pub stream: Arc<stream::StreamServer>,
    /// Rewrites of the pod rules in a tenant's netns, one at a time per tenant.
    pub(crate) cni_rules:
        tokio::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per tenant: pods and pulls on their way in against the idle-tenant collector.
    pub(crate) tenant_gates:
        tokio::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// Exited containers whose termination message is on the host (copied back from a VM
    /// guest, or not needing it).
    pub(crate) termination_read: tokio::sync::Mutex<std::collections::HashSet<String>>,
    /// VM containers' volumes that kubelet updates (see [`vm_volumes`]).
    pub(crate) vm_volumes: vm_volumes::WatchList,
    /// Containers' writable layers as last measured, and when (see `stats::Readings`).
    pub(crate) layer_usage: std::sync::Mutex<
        std::collections::HashMap<
            String,
            (std::time::Instant, caas_proto::cri::v1::FilesystemUsage),
        >,
    >,
}

impl Cri {
    /// The CRI's records under `<state_dir>/cri` (opened before the agent recovers its
    /// tenants, which must keep the ports of pods).
    pub fn open_store(config: &crate::config::Config) -> std::io::Result<store::CriStore> {
        store::CriStore::open(&config.state_dir.join("cri"))
    }

    /// The CRI over `store`, with its streaming server; resumes the log copiers of running
    /// containers.
    pub async fn open(
        state: Arc<AgentState>,
        store: store::CriStore,
        stream: Arc<stream::StreamServer>,
    ) -> Arc<Self> {
        let cri = Arc::new(Self {
            store,
            logs: logs::Copiers::new(state.shutdown.clone()),
            pod_locks: tokio::sync::Mutex::default(),
            cni_rules: tokio::sync::Mutex::default(),
            tenant_gates: tokio::sync::Mutex::default(),
            termination_read: tokio::sync::Mutex::default(),
            layer_usage: std::sync::Mutex::default(),
            vm_volumes: std::sync::Mutex::default(),
            stream,
            state,
        });
        cri.resume_logs().await;
        cri
    }

    /// Starts again the copiers of containers whose output was not copied whole (each goes on
    /// from its recorded offsets, and waits for an engine that is not back yet).
    async fn resume_logs(self: &Arc<Self>) {
        for c in self.store.containers().await {
            self.logs.start(self.clone(), &c).await;
        }
    }
}

/// The CRI services, ready to serve.
pub fn routes(cri: Arc<Cri>) -> tonic::service::Routes {
    let limit = cri.state.config.api.max_message_bytes;
    let mut b = tonic::service::Routes::builder();
    b.add_service(
        RuntimeServiceServer::new(runtime::RuntimeApi::new(cri.clone()))
            .max_decoding_message_size(limit),
    )
    .add_service(
        ImageServiceServer::new(image::ImageApi::new(cri)).max_decoding_message_size(limit),
    );
    b.routes()
}

/// Nanoseconds since the epoch of a millisecond time (CRI times are nanoseconds).
fn ns(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX / 1_000_000) * 1_000_000
}

/// Nanoseconds since the epoch, now.
fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
