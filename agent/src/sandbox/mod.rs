//! Tenant sandboxes (userns mode): for each tenant a cgroup subtree with its quotas, a uid/gid
//! range (in its record), a user and network namespace, and an engine process that owns its
//! containers. This module provisions and tears them down, keeps a channel to every engine, and
//! restarts engines that die. The API's tenant and container calls come through here.

mod engine_proc;
pub mod vm_import;
mod vm_proc;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use caas_proto::{engine::v1 as epb, engine::v1::engine_client::EngineClient, v1 as pb};
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::{
    cgroups::{CgroupError, CgroupLayout, Limits, TenantCgroups},
    config::Config,
    tenants::{QuotaRequest, Registry, Tenant, TenantError, TenantFilter, TenantSpec, TenantState},
    usage::Metering,
};

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The registry refused or failed.
    #[error(transparent)]
    Tenant(#[from] TenantError),
    /// cgroup setup or removal failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The engine could not be started or reached.
    #[error("engine of tenant {tenant:?}: {message}")]
    Engine {
        /// Tenant.
        tenant: String,
        /// What went wrong.
        message: String,
    },
    /// The tenant still has containers.
    #[error("tenant {tenant:?} still has {count} container(s); delete them first or use force")]
    HasContainers {
        /// Tenant.
        tenant: String,
        /// How many.
        count: usize,
    },
    /// Ports were asked for a tenant without a network.
    #[error(
        "tenant {tenant:?} has no network (tenant networks are off on this node, or the tenant predates them); create the container without published ports"
    )]
    NoNetwork {
        /// Tenant.
        tenant: String,
    },
    /// A port could not be published.
    #[error(transparent)]
    Publish(#[from] crate::net::PublishError),
    /// VM isolation is not configured on this node.
    #[error(
        "isolation vm is not available on this node: its agent config has no [vm] section (see scripts/config.example.toml); use userns"
    )]
    VmUnavailable,
    /// This node's VM set-up is missing something (the kernel, the VMM, the guest's modules).
    #[error("isolation vm: {0}")]
    VmHost(String),
    /// The tenant's memory quota cannot hold its VM.
    #[error(
        "quotas.memory_bytes: {quota} bytes cannot hold a VM of {vm_mib} MiB plus {overhead_mib} MiB for its VMM; ask for at least {needed} bytes"
    )]
    VmTooBig {
        /// The tenant's memory quota.
        quota: u64,
        /// Guest memory.
        vm_mib: u64,
        /// What the VMM itself needs beyond guest memory.
        overhead_mib: u64,
        /// The smallest quota that fits.
        needed: u64,
    },
    /// The engine answered with an error status; it is passed on as is.
    #[error("{0}")]
    Status(tonic::Status),
}

/// Tenants, their sandboxes and their engines.
#[derive(Debug)]
pub struct Manager {
    /// The tenant registry.
    pub registry: Registry,
    cgroups: TenantCgroups,
    state_dir: PathBuf,
    run_dir: PathBuf,
    cgroup_root: PathBuf,
    cgroup_slice: String,
    engine_binary: PathBuf,
    engines: Mutex<HashMap<String, (EngineClient<Channel>, engine_proc::EngineProcess)>>,
    /// The meter, told which cgroups exist and when they go away.
    metering: Option<Arc<Metering>>,
    /// The image store: a deleted tenant's images go with it.
    images: Option<Arc<crate::images::ImageStore>>,
    /// Tenant networks' node side (firewall, published ports), when networks are on.
    pub network: Option<Arc<crate::net::Network>>,
    /// One lock per tenant serializes provisioning, teardown and engine restarts.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// VM tenants' machine template and settings, when `[vm]` is configured.
    vm: Option<VmTemplate>,
    /// What VM tenants run on, and the warning for the operator (set at start-up).
    vm_accel: (String, Option<String>),
    /// One lock per VM tenant serializes sending root filesystems and layers into its guest.
    import_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// When the watcher last tried to boot again a VM tenant it had marked failed.
    vm_retries: Mutex<HashMap<String, std::time::Instant>>,
    /// Owners of published ports that are not engine containers (CRI pods), by tenant: kept
    /// when recovery releases the ports of containers that are gone.
    port_owners: HashMap<String, std::collections::HashSet<String>>,
}

/// What every VM tenant's machine starts from.
#[derive(Debug, Clone)]
struct VmTemplate {
    machine: vmm_config::VmConfig,
    modules_dir: Option<PathBuf>,
    disk_mib: u64,
    boot_timeout: Duration,
    /// The node's default tenant memory quota, for tenants that do not ask.
    default_memory_bytes: u64,
    /// Pods get network namespaces of their own (`[cri] enabled` and `[cri.cni] enabled`).
    pod_networks: bool,
}

/// How the watcher's failed state for a crashed VM begins (it retries only those).
const CRASHED: &str = "the VM crashed";

/// Memory the VMM process needs beyond guest memory, charged to the tenant's cgroup with it:
/// under TCG QEMU holds about 200 MiB besides the guest (its translation cache among it).
pub const VMM_OVERHEAD_MIB: u64 = 256;

/// How a tenant's engine runs: a process on the host, or the init of a microVM.
enum Proc {
    Userns(engine_proc::Spawn),
    Vm(Box<vm_proc::VmSpawn>),
}

impl Proc {
    async fn connect(&self) -> Option<(Channel, engine_proc::EngineProcess)> {
        match self {
            Proc::Userns(s) => engine_proc::connect(&s.socket()).await,
            Proc::Vm(s) => vm_proc::connect(s).await,
        }
    }
    async fn spawn(&self) -> Result<(Channel, engine_proc::EngineProcess), String> {
        match self {
            Proc::Userns(s) => engine_proc::spawn(s).await,
            Proc::Vm(s) => vm_proc::spawn(s).await,
        }
    }
    async fn stop(&self, client: Option<EngineClient<Channel>>) {
        match self {
            Proc::Userns(s) => engine_proc::stop(s, client).await,
            Proc::Vm(s) => vm_proc::stop(s, client).await,
        }
    }
}

fn limits(t: &Tenant) -> Limits {
    Limits {
        cpus: t.quotas.cpus,
        memory_bytes: t.quotas.memory_bytes,
        pids: t.quotas.pids,
    }
}

impl Manager {
    /// Opens the registry; engines are reconnected by [`Manager::recover`].
    pub fn open(
        config: &Config,
        layout: CgroupLayout,
        metering: Option<Arc<Metering>>,
        images: Option<Arc<crate::images::ImageStore>>,
        network: Option<Arc<crate::net::Network>>,
    ) -> Result<Self, SandboxError> {
        let subnets = config
            .network
            .subnet_pool()
            .map_err(|e| SandboxError::Engine {
                tenant: String::new(),
                message: e.to_string(),
            })?;
        let registry =
            Registry::open(&config.state_dir, config.tenants.clone())?.with_subnets(subnets);
        let engine_binary = match &config.tenants.engine_binary {
            Some(b) => b.clone(),
            None => std::env::current_exe().map_err(|e| SandboxError::Engine {
                tenant: String::new(),
                message: format!("finding the agent's own executable: {e}"),
            })?,
        };
        Ok(Self {
            registry,
            cgroups: TenantCgroups::with_slice(
                &config.tenants.cgroup_root,
                layout,
                &config.tenants.cgroup_slice,
            ),
            state_dir: config.state_dir.clone(),
            run_dir: config.run_dir.clone(),
            cgroup_root: config.tenants.cgroup_root.clone(),
            cgroup_slice: config.tenants.cgroup_slice.clone(),
            engine_binary,
            engines: Mutex::new(HashMap::new()),
            metering,
            images,
            network,
            locks: Mutex::new(HashMap::new()),
            vm: config.vm.as_ref().map(|machine| VmTemplate {
                machine: machine.clone(),
                modules_dir: config.tenants.vm_modules_dir.clone(),
                disk_mib: config.tenants.vm_disk_mib,
                boot_timeout: Duration::from_secs(config.tenants.vm_boot_timeout_secs),
                default_memory_bytes: config.tenants.default_memory_bytes,
                pod_networks: config.cri.enabled && config.cri.cni.enabled,
            }),
            vm_accel: ("unprobed".into(), None),
            import_locks: Mutex::new(HashMap::new()),
            vm_retries: Mutex::new(HashMap::new()),
            port_owners: HashMap::new(),
        })
    }

    fn proc_args(&self, t: &Tenant) -> Result<Proc, SandboxError> {
        let args = crate::engine::EngineArgs {
            tenant: t.id.clone(),
            id_start: t.id_range.start,
            state_dir: self.state_dir.clone(),
            run_dir: self.run_dir.clone(),
            cgroup_root: self.cgroup_root.clone(),
            cgroup_slice: self.cgroup_slice.clone(),
            in_vm: false,
        };
        if t.isolation != crate::tenants::Isolation::Vm {
            return Ok(Proc::Userns(engine_proc::Spawn {
                binary: self.engine_binary.clone(),
                args,
            }));
        }
        let vm = self.vm.as_ref();
        let paths = args.paths();
        let cgroup_procs = self
            .cgroups
            .procs_files(&format!("{}/vmm", self.cgroups.tenant_path(&t.id)))?;
        Ok(Proc::Vm(Box::new(vm_proc::VmSpawn {
            tenant: t.id.clone(),
            id_start: t.id_range.start,
            machine: vm.map(|v| v.machine.clone()),
            modules_dir: vm.and_then(|v| v.modules_dir.clone()),
            engine_binary: self.engine_binary.clone(),
            disk_mib: vm.map_or(0, |v| v.disk_mib),
            state: paths.state,
            run: paths.run,
            cache: self.state_dir.join("vm"),
            cgroup_procs,
            boot_timeout: vm.map_or(Duration::from_secs(120), |v| v.boot_timeout),
            net: match (&self.network, t.subnet) {
                (Some(n), Some(subnet)) => Some(vm_proc::GuestNet {
                    subnet,
                    dns: n.config.name_servers_quiet(),
                }),
                _ => None,
            },
            pod_networks: vm.is_some_and(|v| v.pod_networks),
        })))
    }

    /// Refuses a VM tenant this node cannot run, before anything is made for it (or before its
    /// quota shrinks below what its VM needs).
    fn check_vm(
        &self,
        isolation: crate::tenants::Isolation,
        memory_bytes: Option<u64>,
        host: bool,
    ) -> Result<(), SandboxError> {
        if isolation != crate::tenants::Isolation::Vm {
            return Ok(());
        }
        let Some(vm) = &self.vm else {
            return Err(SandboxError::VmUnavailable);
        };
        let vm_mib = u64::from(vm.machine.memory_mib);
        let needed = (vm_mib + VMM_OVERHEAD_MIB) << 20;
        let quota = memory_bytes.unwrap_or(vm.default_memory_bytes);
        if quota < needed {
            return Err(SandboxError::VmTooBig {
                quota,
                vm_mib,
                overhead_mib: VMM_OVERHEAD_MIB,
                needed,
            });
        }
        if !host {
            return Ok(());
        }
        vm_proc::check_host(&vm.machine, vm.modules_dir.as_deref()).map_err(SandboxError::VmHost)
    }

    async fn lock(&self, tenant: &str) -> Arc<Mutex<()>> {
        crate::keyed::entry(&self.locks, tenant).await
    }

    /// One import into a VM tenant's guest at a time: two creates from the same image must not
    /// send the same layer twice at once.
    async fn import_lock(&self, tenant: &str) -> Arc<Mutex<()>> {
        crate::keyed::entry(&self.import_locks, tenant).await
    }

    /// After an agent (re)start: reconnect to every running engine, start the missing ones.
    pub async fn recover(&self) {
        let tenants = self.registry.list(&TenantFilter::default()).await;
        for t in &tenants {
            if t.state == TenantState::Deleting {
                continue;
            }
            let t = t.clone();
            let lock = self.lock(&t.id).await;
            let _g = lock.lock().await;
            let recovered = match self.ensure_engine(&t).await {
                Ok(eng) => self.ensure_network(&t).await.map(|()| eng),
                Err(e) => Err(e),
            };
            match recovered {
                Ok(mut eng) => {
                    let _ = self.registry.set_state(&t.id, TenantState::Ready, "").await;
                    if let Some(m) = &self.metering {
                        m.track_tenant(&t.id).await;
                        if t.subnet.is_some() && self.network.is_some() {
                            m.track_tenant_link(&t.id, &crate::net::link_name(&t.id))
                                .await;
                        }
                    }
                    match eng.list(epb::ListRequest {}).await {
                        Ok(r) => {
                            let containers = r.into_inner().containers;
                            // A VM tenant's containers have their cgroups inside the guest;
                            // the host meters the whole VM through the tenant's cgroup.
                            if let Some(m) = self
                                .metering
                                .as_ref()
                                .filter(|_| t.isolation != crate::tenants::Isolation::Vm)
                            {
                                for c in &containers {
                                    m.track_container(&t.id, &c.id, &c.name).await;
                                }
                            }
                            // Ports of containers deleted while the agent was down go.
                            if let Some(n) = &self.network {
                                let alive = containers
                                    .into_iter()
                                    .map(|c| c.id)
                                    .chain(
                                        self.port_owners.get(&t.id).into_iter().flatten().cloned(),
                                    )
                                    .collect();
                                let gone = n.prune(Some((&t.id, &alive)), None).await;
                                if gone > 0 {
                                    tracing::info!(tenant = %t.id, ports = gone, "released the ports of containers that are gone");
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(tenant = %t.id, error = %e, "listing containers failed")
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(tenant = %t.id, error = %e, "tenant engine could not be recovered");
                    let _ = self
                        .registry
                        .set_state(&t.id, TenantState::Failed, &e.to_string())
                        .await;
                }
            }
        }
        if let Some(n) = &self.network {
            let known = tenants.iter().map(|t| t.id.clone()).collect();
            n.prune(None, Some(&known)).await;
            if let Err(e) = n.reload().await {
                tracing::error!(error = %e, "reloading the firewall after recovery failed");
            }
        }
    }

    /// Creates a tenant and its sandbox. On failure nothing is left behind.
    pub async fn create_tenant(&self, spec: TenantSpec) -> Result<Tenant, SandboxError> {
        self.check_vm(spec.isolation, spec.quotas.memory_bytes, true)?;
        let t = self.registry.create(spec).await?;
        let lock = self.lock(&t.id).await;
        let _g = lock.lock().await;
        let provisioned = async {
            self.cgroups.create(&t.id, &limits(&t))?;
            self.ensure_engine(&t).await?;
            self.ensure_network(&t).await
        }
        .await;
        match provisioned {
            Ok(_) => {
                if let Some(m) = &self.metering {
                    m.track_tenant(&t.id).await;
                    if t.subnet.is_some() && self.network.is_some() {
                        m.track_tenant_link(&t.id, &crate::net::link_name(&t.id))
                            .await;
                    }
                }
                Ok(self
                    .registry
                    .set_state(&t.id, TenantState::Ready, "")
                    .await?)
            }
            Err(e) => {
                tracing::error!(tenant = %t.id, error = %e, "provisioning failed; rolling back");
                self.teardown(&t).await;
                let _ = self.registry.delete(&t.id).await;
                Err(e)
            }
        }
    }

    /// Changes quotas in the record and in the kernel.
    pub async fn update_quotas(&self, id: &str, q: QuotaRequest) -> Result<Tenant, SandboxError> {
        let before = self.registry.get(id).await?;
        if q.memory_bytes.is_some() {
            self.check_vm(before.isolation, q.memory_bytes, false)?;
        }
        let after = self.registry.update_quotas(id, q).await?;
        if let Err(e) = self.cgroups.set_limits(id, &limits(&after)) {
            // Keep record and kernel in agreement.
            let old = QuotaRequest {
                cpus: Some(before.quotas.cpus),
                memory_bytes: Some(before.quotas.memory_bytes),
                pids: Some(before.quotas.pids),
                max_containers: Some(before.quotas.max_containers),
            };
            let _ = self.registry.update_quotas(id, old).await;
            return Err(e.into());
        }
        Ok(after)
    }

    /// Deletes a tenant: refuses while containers exist unless `force`, which deletes them.
    pub async fn delete_tenant(&self, id: &str, force: bool) -> Result<(), SandboxError> {
        let t = self.registry.get(id).await?;
        let lock = self.lock(id).await;
        let _g = lock.lock().await;
        if let Some(mut eng) = self.engine_for_delete(&t).await {
            let n = eng
                .list(epb::ListRequest {})
                .await
                .map(|r| r.into_inner().containers.len())
                .unwrap_or(0);
            if n > 0 && !force {
                return Err(SandboxError::HasContainers {
                    tenant: id.into(),
                    count: n,
                });
            }
        }
        self.registry
            .set_state(id, TenantState::Deleting, "tearing down")
            .await?;
        self.teardown(&t).await;
        self.registry.delete(id).await?;
        self.locks.lock().await.remove(id);
        Ok(())
    }

    async fn teardown(&self, t: &Tenant) {
        // A reading before the engine stops (it removes its containers' cgroups), the final
        // ones after: where a cgroup is gone by then, the reading before is the last.
        if let Some(m) = &self.metering {
            m.flush_tenant(&t.id).await;
        }
        let client = self.engines.lock().await.remove(&t.id).map(|(c, _)| c);
        match self.proc_args(t) {
            Ok(p) => p.stop(client).await,
            Err(e) => {
                tracing::error!(tenant = %t.id, error = %e, "cannot stop the tenant's engine")
            }
        }
        if let Some(n) = &self.network {
            n.unpublish_tenant(&t.id).await;
        }
        if let Some(subnet) = t.subnet {
            crate::net::detach(&t.id).await;
            // Its flows go with it: a tenant given the subnet next must not inherit them.
            // (Masquerade forgets those that left by its link when the link goes; not those
            // that left by an uplink, nor those published ports brought in unmasqueraded.)
            crate::net::conntrack::forget_for(&t.id, subnet).await;
        }
        if let Some(m) = &self.metering {
            m.finish_tenant(&t.id).await;
        }
        crate::engine::ns::release(&self.run_dir.join("tenants").join(&t.id).join("ns"));
        let mut cgroups_gone = false;
        for attempt in 0..50 {
            match self.cgroups.remove(&t.id) {
                Ok(()) => {
                    cgroups_gone = true;
                    break;
                }
                Err(CgroupError::Busy(_)) if attempt < 49 => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => {
                    tracing::error!(tenant = %t.id, error = %e, "removing the tenant cgroups failed");
                    break;
                }
            }
        }
        if let Some(images) = &self.images {
            images.remove_tenant(&t.id).await;
        }
        for d in [
            self.run_dir.join("tenants").join(&t.id),
            self.state_dir.join("engines").join(&t.id),
        ] {
            // Mounts an engine left (a container's staged volumes, its rootfs) go first: the
            // removal must never reach into what they show. An engine that may still run (its
            // cgroup could not be removed) could stage again meanwhile: then the dirs stay.
            let keep = if !cgroups_gone && t.isolation != crate::tenants::Isolation::Vm {
                Some("the tenant's processes may still run")
            } else if !crate::engine::volumes::unmount_under(&d) {
                Some("mounts are left under it")
            } else {
                None
            };
            if let Some(why) = keep {
                // Kept, but out of the way: a new tenant of the same id must not find it.
                let q = quarantine_path(&d);
                match std::fs::rename(&d, &q) {
                    Ok(()) => {
                        tracing::error!(tenant = %t.id, dir = %q.display(), "{why}: the tenant's dir is kept there, not removed; remove it by hand once that is resolved")
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::error!(tenant = %t.id, dir = %d.display(), error = %e, "{why}, and the dir could not be moved aside")
                    }
                }
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(&d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %d.display(), error = %e, "removing a tenant dir failed");
            }
        }
    }

    /// Joins the tenant's netns to the host, unless it has no subnet or is joined already.
    async fn ensure_network(&self, t: &Tenant) -> Result<(), SandboxError> {
        let Some(subnet) = t.subnet else {
            return Ok(());
        };
        let Some(n) = &self.network else {
            // Networks were switched off: no link without the firewall.
            crate::net::detach(&t.id).await;
            return Ok(());
        };
        if t.isolation == crate::tenants::Isolation::Vm {
            // The tap was made before the VM booted (the guest's name servers went with its
            // command line); again here, for a VM an earlier agent left running.
            let engine_err = |e: crate::net::NetError| SandboxError::Engine {
                tenant: t.id.clone(),
                message: e.to_string(),
            };
            crate::net::ensure_tap(&t.id, subnet)
                .await
                .map_err(engine_err)?;
            if !crate::net::tap_attached(&t.id) {
                // A running VM that is not on its tap (started without a network by an older
                // agent or while networks were off, or its tap was deleted by hand) would
                // look fine and reach nothing: boot it again onto the tap.
                tracing::error!(tenant = %t.id, link = %crate::net::link_name(&t.id), "the tenant's running VM is not attached to its tap device; rebooting it (its containers end)");
                let client = self.engines.lock().await.remove(&t.id).map(|(c, _)| c);
                self.proc_args(t)?.stop(client).await;
                self.ensure_engine(t).await?;
                if !crate::net::tap_attached(&t.id) {
                    return Err(SandboxError::Engine {
                        tenant: t.id.clone(),
                        message: format!(
                            "the VM booted but its tap device {} has no carrier; see the VMM log",
                            crate::net::link_name(&t.id)
                        ),
                    });
                }
            }
            return Ok(());
        }
        let path = crate::net::resolv_conf_path(&self.run_dir, &t.id);
        let conf = crate::net::resolv_conf(&n.config.name_servers());
        crate::fsutil::write_replace_volatile(&path, conf.as_bytes(), 0o644).map_err(|e| {
            SandboxError::Engine {
                tenant: t.id.clone(),
                message: format!("writing {}: {e}", path.display()),
            }
        })?;
        if crate::net::attached(&t.id).await {
            return crate::net::configure_host_side(&t.id).await.map_err(|e| {
                SandboxError::Engine {
                    tenant: t.id.clone(),
                    message: e.to_string(),
                }
            });
        }
        let ns = self
            .run_dir
            .join("tenants")
            .join(&t.id)
            .join("ns")
            .join("net");
        // Flows of an earlier holder of the subnet that a crash kept from being forgotten.
        crate::net::conntrack::forget_for(&t.id, subnet).await;
        crate::net::attach(&t.id, &ns, subnet, &n.config.uplinks())
            .await
            .map_err(|e| SandboxError::Engine {
                tenant: t.id.clone(),
                message: e.to_string(),
            })
    }

    /// The engine to ask before a delete, with the tenant's lock held: a userns tenant's dead
    /// engine is started again (it adopts the containers that still run), a VM tenant's dead VM
    /// is not (its containers died with it).
    async fn engine_for_delete(&self, t: &Tenant) -> Option<EngineClient<Channel>> {
        let cached = self.engines.lock().await.get(&t.id).cloned();
        if let Some((c, p)) = cached
            && p.alive()
        {
            return Some(c);
        }
        self.engines.lock().await.remove(&t.id);
        if t.isolation == crate::tenants::Isolation::Vm {
            let p = self.proc_args(t).ok()?;
            return p.connect().await.map(|(ch, _)| EngineClient::new(ch));
        }
        self.ensure_engine(t).await.ok()
    }

    /// Connects to the tenant's engine, starting it if it does not answer. The caller holds the
    /// tenant's lock.
    async fn ensure_engine(&self, t: &Tenant) -> Result<EngineClient<Channel>, SandboxError> {
        Ok(self.ensure_engine_process(t).await?.0)
    }

    async fn ensure_engine_process(
        &self,
        t: &Tenant,
    ) -> Result<(EngineClient<Channel>, engine_proc::EngineProcess), SandboxError> {
        if let Some(found) = self.engines.lock().await.get(&t.id) {
            return Ok(found.clone());
        }
        let args = self.proc_args(t)?;
        let (ch, process) = match args.connect().await {
            Some(found) => found,
            None => args.spawn().await.map_err(|message| SandboxError::Engine {
                tenant: t.id.clone(),
                message,
            })?,
        };
        let client = EngineClient::new(ch);
        self.engines
            .lock()
            .await
            .insert(t.id.clone(), (client.clone(), process));
        Ok((client, process))
    }

    /// The engine of a ready tenant; a dead engine is restarted (its containers are re-adopted;
    /// a VM is booted again). Whether it lives is one procfs read (its pid and start time), not a
    /// round trip: every container call comes through here. Starting one happens under the
    /// tenant's lock, after checking again that the tenant is not being deleted.
    pub async fn engine(&self, t: &Tenant) -> Result<EngineClient<Channel>, SandboxError> {
        let cached = self.engines.lock().await.get(&t.id).cloned();
        if let Some((c, p)) = cached
            && p.alive()
        {
            return Ok(c);
        }
        let lock = self.lock(&t.id).await;
        let _g = lock.lock().await;
        // Another caller may have started it while this one waited for the lock.
        let cached = self.engines.lock().await.get(&t.id).cloned();
        match cached {
            Some((c, p)) if p.alive() => return Ok(c),
            Some(_) => {
                tracing::warn!(tenant = %t.id, "tenant engine is gone; restarting it");
                self.engines.lock().await.remove(&t.id);
            }
            None => {}
        }
        let current = self.registry.get(&t.id).await?;
        if matches!(current.state, TenantState::Deleting) {
            return Err(SandboxError::Engine {
                tenant: t.id.clone(),
                message: "the tenant is being deleted".into(),
            });
        }
        self.ensure_engine(&current).await
    }

    /// Decides, once at start-up, what VM tenants run on. With `accel = "tcg"` that is TCG; with
    /// `kvm` or `auto` a probe VM must really boot to its init under KVM (see
    /// `vm_proc::probe_kvm`), else VM tenants run under TCG, with a loud warning in the log and
    /// in `NodeService`. No `[vm]`: "none".
    pub async fn resolve_vm_accelerator(&mut self) {
        let Some(vm) = self.vm.as_mut() else {
            self.vm_accel = ("none".into(), None);
            return;
        };
        let vmm_config::Backend::Qemu(q) = &mut vm.machine.backend else {
            return;
        };
        if q.accel == vmm_config::Accel::Tcg {
            let w = "VM tenants run under software emulation (TCG), as configured ([vm.qemu] accel = \"tcg\"): they are many times slower than under KVM";
            tracing::warn!("{w}");
            self.vm_accel = ("tcg".into(), Some(w.into()));
            return;
        }
        let probe = vm_proc::probe_kvm(
            &vm.machine,
            vm.modules_dir.as_deref(),
            &self.engine_binary,
            &self.state_dir.join("vm"),
            &self.run_dir.join("vm-probe"),
            vm.pod_networks,
        )
        .await;
        let vmm_config::Backend::Qemu(q) = &mut vm.machine.backend else {
            return;
        };
        match probe {
            Ok(()) => {
                tracing::info!("a KVM guest boots here: VM tenants run under KVM");
                q.accel = vmm_config::Accel::Kvm;
                q.tb_size_mib = None;
                self.vm_accel = ("kvm".into(), None);
            }
            Err(e) => {
                let w = format!(
                    "VM tenants run under software emulation (TCG), many times slower than KVM: {e}"
                );
                tracing::warn!("{w}");
                q.accel = vmm_config::Accel::Tcg;
                q.cpu = None;
                self.vm_accel = ("tcg".into(), Some(w));
            }
        }
    }

    /// Finds VM tenants whose VMM died: each is reported failed ("the VM crashed"), then booted
    /// again and reported ready; its containers come back as exited (vm crashed). A VM whose
    /// boot failed is tried again every 30 s. State changes happen under the tenant's lock, and
    /// never over a tenant being deleted.
    pub async fn check_vms(&self) {
        const RETRY: Duration = Duration::from_secs(30);
        if self.vm.is_none() {
            return;
        }
        let dead: std::collections::HashSet<String> = self
            .engines
            .lock()
            .await
            .iter()
            .filter(|(_, (_, p))| !p.alive())
            .map(|(id, _)| id.clone())
            .collect();
        let tenants = self.registry.list(&TenantFilter::default()).await;
        for t in tenants {
            if t.isolation != crate::tenants::Isolation::Vm {
                continue;
            }
            let crashed = t.state == TenantState::Ready && dead.contains(&t.id);
            let retry = t.state == TenantState::Failed
                && t.message.starts_with(CRASHED)
                && self
                    .vm_retries
                    .lock()
                    .await
                    .get(&t.id)
                    .is_none_or(|at| at.elapsed() >= RETRY);
            if !crashed && !retry {
                continue;
            }
            let lock = self.lock(&t.id).await;
            let _g = lock.lock().await;
            let Ok(now) = self.registry.get(&t.id).await else {
                continue;
            };
            if now.state != t.state {
                continue; // someone else (a delete, a call) got there first
            }
            if crashed {
                tracing::error!(tenant = %t.id, "the tenant's VM crashed (its VMM exited); booting it again");
                let _ = self
                    .registry
                    .set_state(
                        &t.id,
                        TenantState::Failed,
                        &format!("{CRASHED}; booting it again"),
                    )
                    .await;
            }
            self.vm_retries
                .lock()
                .await
                .insert(t.id.clone(), std::time::Instant::now());
            self.engines.lock().await.remove(&t.id);
            match self.ensure_engine(&now).await {
                Ok(_) => {
                    self.vm_retries.lock().await.remove(&t.id);
                    let _ = self.registry.set_state(&t.id, TenantState::Ready, "").await;
                    tracing::info!(tenant = %t.id, "the crashed VM runs again");
                }
                Err(e) => {
                    tracing::error!(tenant = %t.id, error = %e, "booting the crashed VM again failed; trying again in 30 s");
                    let _ = self
                        .registry
                        .set_state(
                            &t.id,
                            TenantState::Failed,
                            &format!("{CRASHED}, and booting it again failed (tried again every 30 s): {e}"),
                        )
                        .await;
                }
            }
        }
    }

    /// What VM tenants run on ("kvm", "tcg", "none") and the warning that goes with it.
    pub fn vm_accelerator(&self) -> (&str, Option<&str>) {
        (&self.vm_accel.0, self.vm_accel.1.as_deref())
    }

    /// The tenant named `id`.
    pub async fn tenant(&self, id: &str) -> Result<Tenant, SandboxError> {
        Ok(self.registry.get(id).await?)
    }

    /// Sends files of the host (CNI plugins, by name) into VM tenant `id`'s guest, each once
    /// per content; returns the guest's engine and each file's guest path by name.
    pub async fn import_files(
        &self,
        id: &str,
        files: &[(String, PathBuf)],
    ) -> Result<
        (
            EngineClient<Channel>,
            std::collections::BTreeMap<String, String>,
        ),
        SandboxError,
    > {
        let (_, mut eng) = self.engine_of(id).await?;
        let lock = self.import_lock(id).await;
        let _one = lock.lock().await;
        let mut out = std::collections::BTreeMap::new();
        for (name, path) in files {
            out.insert(name.clone(), vm_import::import_file(&mut eng, path).await?);
        }
        Ok((eng, out))
    }

    /// The engine of the tenant named `id`, which must exist and be ready.
    pub async fn engine_of(
        &self,
        id: &str,
    ) -> Result<(Tenant, EngineClient<Channel>), SandboxError> {
        let t = self.registry.get(id).await?;
        if t.state != TenantState::Ready {
            return Err(SandboxError::Engine {
                tenant: id.into(),
                message: format!("tenant is {:?}: {}", t.state, t.message).to_lowercase(),
            });
        }
        let e = self.engine(&t).await?;
        Ok((t, e))
    }

    /// Creates a container after checking the tenant's container quota, with its published
    /// ports (`(protocol, host port, container port)`): all of them or no container.
    pub async fn create_container(
        &self,
        tenant: &str,
        mut req: epb::CreateRequest,
        publish: &[(crate::net::ports::Proto, u16, u16)],
    ) -> Result<pb::Container, SandboxError> {
        let (t, mut eng) = self.engine_of(tenant).await?;
        // A limit above the tenant's quota could not hold (a cgroup v1 kernel refuses a CPU
        // quota above its parent's, deep in the runtime).
        let res = req.resources.unwrap_or_default();
        let over = [
            (
                "resources.cpus",
                res.cpus
                    .filter(|c| *c > t.quotas.cpus)
                    .map(|_| format!("{} CPUs", t.quotas.cpus)),
            ),
            (
                "resources.memory_bytes",
                res.memory_bytes
                    .filter(|m| *m > t.quotas.memory_bytes)
                    .map(|_| format!("{} bytes", t.quotas.memory_bytes)),
            ),
            (
                "resources.pids",
                res.pids
                    .filter(|p| *p > t.quotas.pids)
                    .map(|_| format!("{} pids", t.quotas.pids)),
            ),
        ];
        if let Some((field, quota)) = over.into_iter().find_map(|(f, q)| q.map(|q| (f, q))) {
            return Err(SandboxError::Status(tonic::Status::failed_precondition(
                format!(
                    "{field}: the limit is above what the tenant's quota allows ({quota}, tenant {:?}); raise the quota (caasctl tenant update)",
                    t.id
                ),
            )));
        }
        let published = self.publish_for(&t, &req.id, &req.name, publish).await?;
        if t.isolation == crate::tenants::Isolation::Vm {
            let lock = self.import_lock(&t.id).await;
            let _one = lock.lock().await;
            if !req.lower_dirs.is_empty() {
                req.lower_dirs = vm_import::import_layers(&mut eng, &req.lower_dirs).await?;
            }
            if !req.rootfs.is_empty() {
                req.rootfs = vm_import::import(&mut eng, &req.rootfs).await?;
            }
            if !req.mounts.is_empty() {
                req.mounts =
                    vm_import::import_volumes(&mut eng, std::mem::take(&mut req.mounts)).await?;
            }
        }
        // The engine counts its containers and refuses one over the quota.
        req.max_containers = t.quotas.max_containers;
        let id = req.id.clone();
        let c = match eng.create(req).await {
            Ok(c) => c.into_inner(),
            Err(e) => {
                if let Some(n) = self.network.as_ref().filter(|_| !published.is_empty()) {
                    n.unpublish_container(&t.id, &id).await;
                }
                return Err(SandboxError::Status(e));
            }
        };
        // A VM tenant's containers have their cgroups inside the guest; the host meters the
        // whole VM through the tenant's cgroup.
        if let Some(m) = self
            .metering
            .as_ref()
            .filter(|_| t.isolation != crate::tenants::Isolation::Vm)
        {
            m.track_container(&t.id, &c.id, &c.name).await;
        }
        Ok(self.with_ports(c).await)
    }

    /// Publishes `publish` (`(protocol, host port, container port)`) to the tenant's address for
    /// `owner` (a container id, or a CRI pod's id): all of them or none.
    async fn publish_for(
        &self,
        t: &crate::tenants::Tenant,
        owner: &str,
        name: &str,
        publish: &[(crate::net::ports::Proto, u16, u16)],
    ) -> Result<Vec<crate::net::ports::Published>, SandboxError> {
        if publish.is_empty() {
            return Ok(Vec::new());
        }
        let (Some(n), Some(subnet)) = (&self.network, t.subnet) else {
            return Err(SandboxError::NoNetwork {
                tenant: t.id.clone(),
            });
        };
        let ip = crate::net::addresses(subnet).1;
        let published: Vec<_> = publish
            .iter()
            .map(
                |&(proto, host_port, container_port)| crate::net::ports::Published {
                    proto,
                    host_port,
                    container_port,
                    tenant: t.id.clone(),
                    container: owner.to_string(),
                    name: name.to_string(),
                    tenant_ip: ip,
                },
            )
            .collect();
        n.publish(&published).await?;
        Ok(published)
    }

    /// Publishes ports of an owner that is not an engine container (a CRI pod, whose ports
    /// lead to its tenant's address): all of them or none.
    pub async fn publish_owner(
        &self,
        tenant: &str,
        owner: &str,
        name: &str,
        publish: &[(crate::net::ports::Proto, u16, u16)],
    ) -> Result<(), SandboxError> {
        let t = self.registry.get(tenant).await?;
        self.publish_for(&t, owner, name, publish).await.map(|_| ())
    }

    /// Releases the ports of `owner` (a container or a CRI pod) of `tenant`.
    pub async fn unpublish_owner(&self, tenant: &str, owner: &str) {
        if let Some(n) = &self.network {
            n.unpublish_container(tenant, owner).await;
        }
    }

    /// Owners of published ports that are not engine containers, by tenant (CRI pods): recovery
    /// keeps their ports. Set before [`Manager::recover`].
    pub fn keep_port_owners(&mut self, owners: HashMap<String, std::collections::HashSet<String>>) {
        self.port_owners = owners;
    }

    /// `c` with its usage inside the guest and its share of the VMM's CPU time on the host, when
    /// its tenant is a VM tenant: the guest's figure scaled by the VMM's CPU time over the guest
    /// tenant cgroup's, so the VM's own overhead is shared out in proportion.
    pub async fn with_vm_usage(
        &self,
        mut c: pb::Container,
        eng: &mut EngineClient<Channel>,
    ) -> pb::Container {
        let vm = self
            .registry
            .get(&c.tenant)
            .await
            .is_ok_and(|t| t.isolation == crate::tenants::Isolation::Vm);
        if !vm {
            return c;
        }
        let Ok(r) = eng
            .usage(epb::UsageRequest {
                container: c.id.clone(),
            })
            .await
        else {
            return c;
        };
        let r = r.into_inner();
        // The VMM process's own CPU time covers this boot only (the cgroup's would add every
        // earlier boot's), as the guest's counters do.
        let vmm = self
            .engines
            .lock()
            .await
            .get(&c.tenant)
            .map(|(_, p)| p.pid());
        let host = vmm.and_then(engine_proc::cpu_usec);
        #[allow(clippy::cast_precision_loss)]
        let (guest, factor) = (
            r.container_cpu_usec as f64 / 1e6,
            match host {
                Some(h) if r.tenant_cpu_usec > 0 => h as f64 / r.tenant_cpu_usec as f64,
                _ => 1.0,
            },
        );
        c.vm_usage = Some(pb::VmUsage {
            guest_cpu_seconds: guest,
            guest_memory_bytes: r.container_memory_bytes,
            host_cpu_seconds: guest * factor,
        });
        c
    }

    /// `c` with its published ports filled in (the agent, not the engine, keeps them).
    pub async fn with_ports(&self, mut c: pb::Container) -> pb::Container {
        if let Some(n) = &self.network {
            c.ports = n
                .ports
                .of_container(&c.tenant, &c.id)
                .await
                .into_iter()
                .map(|p| pb::PortMapping {
                    host_port: p.host_port.into(),
                    container_port: p.container_port.into(),
                    protocol: p.proto.as_str().into(),
                    host_ip: String::new(),
                })
                .collect();
        }
        c
    }

    /// A reading of a container's usage before its engine is asked to delete it.
    pub async fn container_deleting(&self, tenant: &str, container: &str) {
        if let Some(m) = &self.metering {
            m.flush_container(tenant, container).await;
        }
    }

    /// The final reading of a deleted container (the one taken before, if its cgroup is gone);
    /// its published ports are released.
    pub async fn container_deleted(&self, tenant: &str, container: &str) {
        if let Some(n) = &self.network {
            n.unpublish_container(tenant, container).await;
        }
        if let Some(m) = &self.metering {
            m.finish_container(tenant, container).await;
        }
    }

    /// Containers of `tenant`, or of every ready tenant.
    pub async fn list_containers(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<pb::Container>, SandboxError> {
        let tenants = match tenant {
            Some(t) => vec![self.registry.get(t).await?],
            None => self.registry.list(&TenantFilter::default()).await,
        };
        let mut out = Vec::new();
        for t in tenants
            .into_iter()
            .filter(|t| t.state == TenantState::Ready)
        {
            let mut eng = self.engine(&t).await?;
            for c in eng
                .list(epb::ListRequest {})
                .await
                .map_err(SandboxError::Status)?
                .into_inner()
                .containers
            {
                out.push(self.with_ports(c).await);
            }
        }
        Ok(out)
    }
}

/// Where a tenant dir that could not be removed is moved: beside it, hidden, unique.
fn quarantine_path(d: &std::path::Path) -> std::path::PathBuf {
    let name = d
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_nanos())
        .unwrap_or_default();
    d.with_file_name(format!(".quarantine-{name}-{nanos}"))
}
