//! `runtime.v1.RuntimeService`: pod sandboxes and their containers, mapped onto tenants and
//! their engines.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use caas_proto::{cri::v1 as cri, engine::v1 as epb, v1 as pb};
use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::{
    Cri, HANDLER_USERNS, HANDLER_VM, TENANT_ANNOTATION, cni, now_ns, ns, stats,
    store::{AddError, ContainerRecord, PodNetwork, PodRecord},
    stream,
};
use crate::{
    api::{auth::Ctx, convert, status},
    net::ports::Proto,
    tenants::{Isolation, QuotaRequest, TenantSpec, TenantState},
    validate::{self, Invalid},
};

/// Longest a `ExecSync` may return per stream; more is cut.
const MAX_EXEC_OUTPUT: usize = 16 << 20;
/// How long a pod waits for its tenant when another call is creating it.
const TENANT_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct RuntimeApi {
    cri: Arc<Cri>,
}

impl RuntimeApi {
    pub fn new(cri: Arc<Cri>) -> Self {
        Self { cri }
    }

    /// The container whose process namespace a new container of pod `p` joins (the TARGET
    /// mode, as kubelet asks for an ephemeral container made with `kubectl debug --target`):
    /// one of the same pod. Empty for the other modes. Whether it runs is the engine's check.
    async fn pid_target(&self, p: &PodRecord, c: &cri::ContainerConfig) -> Result<String, Status> {
        let Some(ns) = security_of(c).and_then(|s| s.namespace_options.as_ref()) else {
            return Ok(String::new());
        };
        if ns.pid != cri::NamespaceMode::Target as i32 {
            return Ok(String::new());
        }
        match self.cri.store.container(&ns.target_id).await {
            Some(t) if t.pod == p.id => Ok(t.id),
            Some(t) => Err(Status::failed_precondition(format!(
                "config.linux.security_context.namespace_options.target_id: container {} is in pod sandbox {}, not in {}; a container can only join the process namespace of one of its own pod",
                t.id, t.pod, p.id
            ))),
            None => Err(Status::not_found(format!(
                "config.linux.security_context.namespace_options.target_id: no container {:?}",
                ns.target_id
            ))),
        }
    }
}

fn bad(field: &str, reason: impl Into<String>) -> Status {
    status::invalid(Invalid::new(field, reason))
}

/// The stdio an Exec or Attach asks for.
#[derive(Debug, Clone, Copy)]
struct Wiring {
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
}

fn unsupported(field: &str) -> Status {
    Status::unimplemented(format!(
        "{field} is not supported by caas-agent {} yet; leave it unset",
        crate::VERSION
    ))
}

fn sorted(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn unsorted(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn io_err(e: &std::io::Error, ctx: &Ctx) -> Status {
    status::internal(e, ctx)
}

/// An engine's error as the caller sees it.
fn engine_err(s: Status, ctx: &Ctx) -> Status {
    status::sandbox(crate::sandbox::SandboxError::Status(s), ctx)
}

/// Whether a pod config names a tenant: by the annotation or by a namespace.
pub fn names_a_tenant(config: &cri::PodSandboxConfig) -> bool {
    config.annotations.contains_key(TENANT_ANNOTATION)
        || config
            .metadata
            .as_ref()
            .is_some_and(|m| !m.namespace.is_empty())
}

/// The tenant a pod lives in: its `caas.io/tenant` annotation, else its namespace.
pub fn tenant_of(config: &cri::PodSandboxConfig) -> Result<String, Status> {
    if let Some(t) = config.annotations.get(TENANT_ANNOTATION) {
        let field = format!("config.annotations[{TENANT_ANNOTATION}]");
        validate::check_id(&field, t).map_err(status::invalid)?;
        return Ok(t.clone());
    }
    let ns = config
        .metadata
        .as_ref()
        .map(|m| m.namespace.clone())
        .unwrap_or_default();
    validate::check_id("config.metadata.namespace", &ns).map_err(|e| {
        status::invalid(Invalid::new(
            e.field,
            format!(
                "{}; it names the pod's tenant unless the pod has the annotation {TENANT_ANNOTATION}",
                e.reason
            ),
        ))
    })?;
    Ok(ns)
}

fn isolation_of(handler: &str) -> Result<Isolation, Status> {
    match handler {
        "" | HANDLER_USERNS => Ok(Isolation::Userns),
        HANDLER_VM => Ok(Isolation::Vm),
        other => Err(bad(
            "runtime_handler",
            format!(
                "{other:?} is not a handler of this runtime; use {HANDLER_USERNS:?} or {HANDLER_VM:?}"
            ),
        )),
    }
}

impl Cri {
    /// The tenant of a pod: made on first use (unless known tenants are required) and ready.
    pub async fn ensure_tenant(
        &self,
        id: &str,
        isolation: Isolation,
        ctx: &Ctx,
    ) -> Result<crate::tenants::Tenant, Status> {
        let sandboxes = &self.state.sandboxes;
        let deadline = tokio::time::Instant::now() + TENANT_WAIT;
        loop {
            match sandboxes.tenant(id).await {
                Ok(t) if !super::open_to_pods(&t) => {
                    return Err(Status::failed_precondition(format!(
                        "tenant {id} is not open to Kubernetes pods (it lacks the label {}=true, which the tenants the CRI creates carry); use another namespace, or create the tenant with that label",
                        super::CRI_LABEL
                    )));
                }
                Ok(t) if t.isolation != isolation => {
                    return Err(Status::failed_precondition(format!(
                        "tenant {id} has isolation {}, but the pod asks for {}; use the runtime handler {:?}",
                        t.isolation.as_str(),
                        isolation.as_str(),
                        match t.isolation {
                            Isolation::Userns => HANDLER_USERNS,
                            Isolation::Vm => HANDLER_VM,
                        }
                    )));
                }
                Ok(t) if t.state == TenantState::Ready => return Ok(t),
                Ok(t)
                    if t.state == TenantState::Pending
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(t) => {
                    return Err(Status::unavailable(format!(
                        "tenant {id} is {}: {}",
                        format!("{:?}", t.state).to_lowercase(),
                        t.message
                    )));
                }
                Err(crate::sandbox::SandboxError::Tenant(
                    crate::tenants::TenantError::NotFound { .. },
                )) => {
                    if self.state.config.cri.require_known_tenants {
                        return Err(Status::failed_precondition(format!(
                            "tenant {id} does not exist and cri.require_known_tenants is set; create it first (caasctl tenant create {id})"
                        )));
                    }
                    let q = self.state.config.cri.default_quotas;
                    let spec = TenantSpec {
                        id: id.into(),
                        isolation,
                        quotas: QuotaRequest {
                            cpus: q.cpus,
                            memory_bytes: q.memory_bytes,
                            pids: q.pids,
                            max_containers: q.max_containers,
                        },
                        labels: BTreeMap::from([
                            (
                                super::gc::CREATED_BY.0.into(),
                                super::gc::CREATED_BY.1.into(),
                            ),
                            (super::CRI_LABEL.into(), "true".into()),
                        ]),
                    };
                    // Its own task: a caller that goes away must not cut the rollback short.
                    let state = self.state.clone();
                    let made =
                        tokio::spawn(async move { state.sandboxes.create_tenant(spec).await })
                            .await
                            .map_err(|e| Status::internal(format!("creating the tenant: {e}")))?;
                    match made {
                        Ok(t) => {
                            tracing::info!(tenant = %id, isolation = isolation.as_str(), "tenant created for a pod");
                            return Ok(t);
                        }
                        // Another pod's call made it meanwhile: wait for it above.
                        Err(crate::sandbox::SandboxError::Tenant(
                            crate::tenants::TenantError::AlreadyExists { .. },
                        )) => {}
                        Err(e) => return Err(status::sandbox(e, ctx)),
                    }
                }
                Err(e) => return Err(status::sandbox(e, ctx)),
            }
        }
    }

    /// A streaming URL for an exec of `cmd` (or, with `attach`, an attach) in a running
    /// container: what Exec and Attach share.
    async fn stream_url(
        &self,
        container: &str,
        cmd: Vec<String>,
        attach: bool,
        w: Wiring,
        ctx: &Ctx,
    ) -> Result<String, Status> {
        if !(w.stdin || w.stdout || w.stderr) {
            return Err(bad("stdin", "one of stdin, stdout and stderr must be true"));
        }
        if w.tty && w.stderr {
            return Err(bad(
                "stderr",
                "tty and stderr cannot both be true (a terminal's output is one stream)",
            ));
        }
        let c = self.container_or_not_found(container).await?;
        let running = self
            .inspect(&c, ctx)
            .await?
            .is_some_and(|now| now.state == pb::ContainerState::Running as i32);
        if !running {
            return Err(Status::failed_precondition(format!(
                "container {container:?} is not running"
            )));
        }
        let engine = self.engine(&c.tenant, ctx).await?;
        Ok(self.stream.url(stream::Session::Exec(stream::ExecSession {
            engine,
            container: c.id.clone(),
            cmd,
            attach,
            tty: w.tty,
            stdin: w.stdin,
            stdout: w.stdout,
            stderr: w.stderr,
        })))
    }

    async fn pod_or_not_found(&self, id: &str) -> Result<PodRecord, Status> {
        self.store
            .pod(id)
            .await
            .ok_or_else(|| Status::not_found(format!("pod sandbox {id:?} does not exist")))
    }

    async fn container_or_not_found(&self, id: &str) -> Result<ContainerRecord, Status> {
        self.store
            .container(id)
            .await
            .ok_or_else(|| Status::not_found(format!("container {id:?} does not exist")))
    }

    /// The engine's view of a CRI container (None when the engine no longer has it).
    async fn inspect(
        &self,
        c: &ContainerRecord,
        ctx: &Ctx,
    ) -> Result<Option<pb::Container>, Status> {
        let mut eng = self.engine(&c.tenant, ctx).await?;
        match eng
            .inspect(epb::ContainerId {
                container: c.id.clone(),
            })
            .await
        {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(engine_err(s, ctx)),
        }
    }

    /// A container's CRI status (`UNKNOWN` when its engine cannot be asked).
    pub(super) async fn status_of(&self, c: &ContainerRecord) -> cri::ContainerStatus {
        let ctx = Ctx {
            caller: crate::authz::Caller {
                role: crate::authz::Role::Admin,
                identity: "cri-events".into(),
            },
            request_id: String::new(),
        };
        let now = self.inspect(c, &ctx).await.ok().flatten();
        cri_container_status(c, now.as_ref())
    }

    /// Deletes a container in its engine and forgets it; gone already is fine.
    async fn remove_container(&self, c: &ContainerRecord, ctx: &Ctx) -> Result<(), Status> {
        let last_cpu = stats::Readings::now(self).of(c).map_or(0, |r| r.cpu_ns);
        let state = self.state.clone();
        let (tenant, id) = (c.tenant.clone(), c.id.clone());
        // The engine's delete and the agent's release are one step, whatever the caller does.
        let deleted = tokio::spawn(async move {
            let mut eng = match state.sandboxes.engine_of(&tenant).await {
                Ok((_, e)) => e,
                // The tenant is gone, and its containers with it.
                Err(crate::sandbox::SandboxError::Tenant(
                    crate::tenants::TenantError::NotFound { .. },
                )) => return Ok(()),
                Err(e) => return Err(e),
            };
            state.sandboxes.container_deleting(&tenant, &id).await;
            match eng
                .delete(epb::DeleteRequest {
                    container: id.clone(),
                    force: true,
                })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(crate::sandbox::SandboxError::Status(s)),
            }
            state.sandboxes.container_deleted(&tenant, &id).await;
            Ok(())
        })
        .await
        .map_err(|e| Status::internal(format!("deleting the container: {e}")))?;
        deleted.map_err(|e| status::sandbox(e, ctx))?;
        self.store
            .add_removed_cpu(&c.pod, last_cpu)
            .await
            .map_err(|e| io_err(&e, ctx))?;
        self.termination_read.lock().await.remove(&c.id);
        self.unwatch_volumes(&c.id);
        self.layer_usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&c.id);
        self.store
            .remove_container(&c.id)
            .await
            .map_err(|e| io_err(&e, ctx))
    }

    /// kubelet reads an exited container's termination message from the host file it bound at
    /// the path its annotation names (at most 4 KiB). A container of a VM tenant wrote the
    /// guest's copy of that file: it is copied back once, before the container is reported
    /// exited. A failure is logged and tried again at the next status.
    async fn copy_back_termination_message(&self, c: &ContainerRecord) {
        let Some(inside) = c.annotations.get(TERMINATION_MESSAGE_PATH) else {
            return;
        };
        let Some((host, _, _)) = c.mounts.iter().find(|(_, i, _)| i == inside) else {
            return;
        };
        if !self.termination_read.lock().await.insert(c.id.clone()) {
            return;
        }
        let copied = async {
            let (t, mut eng) = self
                .state
                .sandboxes
                .engine_of(&c.tenant)
                .await
                .map_err(|e| e.to_string())?;
            if t.isolation != Isolation::Vm {
                return Ok(());
            }
            let data = eng
                .read_volume_file(epb::ReadVolumeFileRequest {
                    container: c.id.clone(),
                    container_path: inside.clone(),
                    max_bytes: MAX_TERMINATION_MESSAGE,
                })
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner()
                .data;
            // kubelet's own file: written only if it is still there.
            let mut f = tokio::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(host)
                .await
                .map_err(|e| format!("{host}: {e}"))?;
            // A tokio file's write only queues the bytes: flushed, they are in the file before
            // the status that says exited is answered.
            tokio::io::AsyncWriteExt::write_all(&mut f, &data)
                .await
                .map_err(|e| format!("{host}: {e}"))?;
            tokio::io::AsyncWriteExt::flush(&mut f)
                .await
                .map_err(|e| format!("{host}: {e}"))
        }
        .await;
        if let Err(e) = copied {
            tracing::warn!(container = %c.id, error = %e, "copying the termination message back from the VM failed");
            self.termination_read.lock().await.remove(&c.id);
        }
    }

    pub(super) fn pod_status(
        &self,
        p: &PodRecord,
        ip: String,
        ready_tenants: &ReadyTenants,
    ) -> cri::PodSandboxStatus {
        cri::PodSandboxStatus {
            id: p.id.clone(),
            metadata: Some(pod_metadata(p)),
            state: pod_state(p, ready_tenants) as i32,
            created_at: p.created_at_ns,
            network: Some(cri::PodSandboxNetworkStatus {
                // A dual-stack network's IPv6 address, for the pod's `podIPs`.
                additional_ips: p
                    .network
                    .as_ref()
                    .filter(|n| !n.ip.is_empty() && n.ip == ip)
                    .and_then(|n| n.result.as_ref())
                    .and_then(super::cni::ipv6_of)
                    .map(|a| cri::PodIp { ip: a.to_string() })
                    .into_iter()
                    .collect(),
                ip,
            }),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace {
                    options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: if p.shared_pid {
                            cri::NamespaceMode::Pod as i32
                        } else {
                            cri::NamespaceMode::Container as i32
                        },
                        ipc: cri::NamespaceMode::Pod as i32,
                        target_id: String::new(),
                        userns_options: None,
                    }),
                }),
            }),
            labels: unsorted(&p.labels),
            annotations: unsorted(&p.annotations),
            runtime_handler: p.runtime_handler.clone(),
        }
    }

    /// The tenants that are ready now, each with its VM's boot ([`Cri::vm_boot`]).
    pub(super) async fn ready_tenants(&self) -> ReadyTenants {
        self.state
            .sandboxes
            .registry
            .list(&crate::tenants::TenantFilter {
                state: Some(TenantState::Ready),
                ..Default::default()
            })
            .await
            .into_iter()
            .map(|t| {
                let boot = if t.isolation == Isolation::Vm {
                    self.vm_boot(&t.id)
                } else {
                    String::new()
                };
                (t.id, boot)
            })
            .collect()
    }

    /// Which boot of VM tenant `tenant`'s VM runs now: its VMM's record (`pid start-time`,
    /// which a VM booted again after a crash changes), or empty when none runs.
    fn vm_boot(&self, tenant: &str) -> String {
        std::fs::read_to_string(
            self.state
                .config
                .run_dir
                .join("tenants")
                .join(tenant)
                .join("vmm.pid"),
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
    }

    /// The engine of a ready tenant.
    async fn engine(
        &self,
        tenant: &str,
        ctx: &Ctx,
    ) -> Result<
        caas_proto::engine::v1::engine_client::EngineClient<tonic::transport::Channel>,
        Status,
    > {
        self.state
            .sandboxes
            .engine_of(tenant)
            .await
            .map(|(_, e)| e)
            .map_err(|e| status::sandbox(e, ctx))
    }

    /// Marks a pod not ready and releases its host ports (its network resources): the common
    /// start of a stop and a remove.
    async fn unready(&self, p: &PodRecord, ctx: &Ctx) -> Result<(), Status> {
        self.store
            .set_pod_ready(&p.id, false)
            .await
            .map_err(|e| io_err(&e, ctx))?;
        self.state.sandboxes.unpublish_owner(&p.tenant, &p.id).await;
        Ok(())
    }

    /// The gate of a tenant: pods and pulls on their way in hold it shared, the idle-tenant
    /// collector exclusively while it checks and deletes.
    pub(super) async fn tenant_gate(&self, id: &str) -> Arc<tokio::sync::RwLock<()>> {
        crate::keyed::entry(&self.tenant_gates, id).await
    }

    /// The lock that serializes a pod's container creates with its stop and remove.
    async fn pod_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        crate::keyed::entry(&self.pod_locks, id).await
    }

    /// The directory of a tenant's namespace files.
    fn tenant_ns_dir(&self, tenant: &str) -> std::path::PathBuf {
        self.state
            .config
            .run_dir
            .join("tenants")
            .join(tenant)
            .join("ns")
    }

    /// Where host-local keeps a tenant's pod addresses (with the tenant's run dir, it goes with
    /// the tenant).
    /// Where host-local keeps pods' addresses when the network list names no `dataDir`: one
    /// store for the node, so that every pod's address is the node's only one (the host routes
    /// each to its tenant).
    fn ipam_dir(&self) -> std::path::PathBuf {
        self.state.config.run_dir.join("cni-ipam")
    }

    /// The tenant's subnet, when tenant networks are on: the host reaches its pods through it.
    async fn tenant_subnet(&self, tenant: &str) -> Option<crate::tenants::subnet::Ipv4Net> {
        if !self.state.config.network.enabled {
            return None;
        }
        self.state
            .sandboxes
            .tenant(tenant)
            .await
            .ok()
            .and_then(|t| t.subnet)
    }

    /// Whether a new pod of `tenant` gets a network namespace of its own (CNI on: in a VM
    /// tenant, inside its guest).
    async fn cni_applies(&self, tenant: &str) -> bool {
        self.state.config.cri.cni.enabled && self.state.sandboxes.tenant(tenant).await.is_ok()
    }

    /// Whether `tenant` is a VM tenant.
    async fn is_vm(&self, tenant: &str) -> bool {
        self.state
            .sandboxes
            .tenant(tenant)
            .await
            .is_ok_and(|t| t.isolation == Isolation::Vm)
    }

    /// The network and host ports of a new pod (its record added): its own netns through CNI
    /// when the record names one, then its host ports. On error, the network is undone.
    async fn make_pod_network(&self, pod: &PodRecord, ctx: &Ctx) -> Result<PodRecord, Status> {
        let p = self.setup_network(pod).await?;
        if p.shared_pid
            && let Err(e) = self.setup_pidns(&p).await
        {
            if let Err(t) = self.teardown_network(&p).await {
                tracing::warn!(pod = %p.id, error = %t.message(), "undoing a pod network");
            }
            return Err(e);
        }
        if p.ports.is_empty() {
            return Ok(p);
        }
        // A pod with a netns of its own is reached on the tenant's address at the host port,
        // which the tenant netns forwards to the pod.
        let ports: Vec<(Proto, u16, u16)> = if p.network.is_some() {
            p.ports.iter().map(|&(pr, h, _)| (pr, h, h)).collect()
        } else {
            p.ports.clone()
        };
        let name = format!("pod {}/{}", p.namespace, p.name);
        if let Err(e) = self
            .state
            .sandboxes
            .publish_owner(&p.tenant, &p.id, &name, &ports)
            .await
        {
            if let Err(t) = self.teardown_network(&p).await {
                tracing::warn!(pod = %p.id, error = %t.message(), "undoing a pod network");
            }
            return Err(status::sandbox(e, ctx));
        }
        Ok(p)
    }

    /// The engine of a pod's tenant, for the pod's namespaces (`UNAVAILABLE` naming it when it
    /// is not up).
    async fn pod_engine(
        &self,
        tenant: &str,
    ) -> Result<
        caas_proto::engine::v1::engine_client::EngineClient<tonic::transport::Channel>,
        Status,
    > {
        self.state
            .sandboxes
            .engine_of(tenant)
            .await
            .map(|(_, e)| e)
            .map_err(|e| Status::unavailable(format!("tenant {tenant:?}'s engine: {e}")))
    }

    /// Gives a pod with `shared_pid` its process namespace: the tenant's engine starts its
    /// PID 1 (`caas-agent pause`).
    async fn setup_pidns(&self, p: &PodRecord) -> Result<(), Status> {
        let mut eng = self.pod_engine(&p.tenant).await?;
        eng.create_pidns(epb::NetnsRequest { name: p.id.clone() })
            .await
            .map_err(context(format!("making pod {}'s process namespace", p.id)))?;
        Ok(())
    }

    /// Ends a pod's shared process namespace (its PID 1, and whatever is left in it). Without
    /// an engine to ask, the agent ends it itself where it can (a user-namespaced tenant's
    /// files are on the host); a tenant that is gone took it along.
    pub(super) async fn teardown_pidns(&self, p: &PodRecord) -> Result<(), Status> {
        if !p.shared_pid {
            return Ok(());
        }
        match self.state.sandboxes.engine_of(&p.tenant).await {
            Ok((_, mut eng)) => {
                eng.delete_pidns(epb::NetnsRequest { name: p.id.clone() })
                    .await
                    .map_err(context(format!("ending pod {}'s process namespace", p.id)))?;
            }
            Err(_) => crate::engine::ns::remove_pidns(&self.tenant_ns_dir(&p.tenant), &p.id),
        }
        Ok(())
    }

    /// Drops the record of a pod that could not be made, unless its network could not be
    /// undone: then it stays, not ready, for kubelet's clean-up of dead sandboxes (Stop,
    /// Remove) to finish.
    async fn drop_failed_pod(&self, pod: &PodRecord) {
        // The undo already ran where the failure was; once more tells whether it is complete
        // (teardown is idempotent: a DEL of what is gone succeeds).
        let now = self.store.pod(&pod.id).await.unwrap_or_else(|| pod.clone());
        if let Err(e) = self.teardown_pidns(&now).await {
            tracing::warn!(pod = %pod.id, error = %e.message(), "ending a pod's process namespace");
        }
        let undone = match self.teardown_network(&now).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pod = %pod.id, error = %e.message(), "undoing a pod network");
                false
            }
        };
        if undone {
            let _ = self.store.remove_pod(&pod.id).await;
            self.pod_locks.lock().await.remove(&pod.id);
        } else {
            tracing::warn!(pod = %pod.id, "a pod whose network could not be undone is kept, not ready, for StopPodSandbox to retry");
            let _ = self.store.set_pod_ready(&pod.id, false).await;
        }
    }

    /// Gives a pod whose record names a netns ([`PodNetwork::netns`]) its network: the engine
    /// makes the netns, the CNI plugins add the pod to the network list, the record keeps the
    /// result, and the tenant netns's rules learn the pod's host ports. On error what was made
    /// is torn down again.
    async fn setup_network(&self, p: &PodRecord) -> Result<PodRecord, Status> {
        let Some(net) = p.network.clone() else {
            return Ok(p.clone());
        };
        let r = self.setup_network_inner(p, net).await;
        if r.is_err() {
            let now = self.store.pod(&p.id).await.unwrap_or_else(|| p.clone());
            if let Err(e) = self.teardown_network(&now).await {
                tracing::warn!(pod = %p.id, error = %e.message(), "undoing a pod network");
            }
        }
        r
    }

    async fn setup_network_inner(
        &self,
        p: &PodRecord,
        mut net: PodNetwork,
    ) -> Result<PodRecord, Status> {
        let cfg = &self.state.config.cri.cni;
        let list = cfg
            .network()
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let vm = self.is_vm(&p.tenant).await;
        let mut eng = self.pod_engine(&p.tenant).await?;
        if vm {
            let info = eng
                .info(epb::InfoRequest {})
                .await
                .map_err(context(format!("asking tenant {:?}'s VM", p.tenant)))?
                .into_inner();
            if !info.pod_networks {
                return Err(Status::failed_precondition(format!(
                    "tenant {:?}'s VM was booted without what pods' own networks need in its guest (by an earlier agent, or with [cri.cni] off); delete the tenant and let its next pod make it again",
                    p.tenant
                )));
            }
            // Recorded before the guest makes the netns: a teardown after an agent that died
            // in between still knows the netns is in the guest, and in which boot.
            net.vm_boot = self.vm_boot(&p.tenant);
            self.store
                .set_pod_network(&p.id, Some(net.clone()))
                .await
                .map_err(|e| Status::internal(format!("recording pod {}: {e}", p.id)))?;
        }
        let made = eng
            .create_netns(epb::NetnsRequest {
                name: net.netns.clone(),
            })
            .await
            .map_err(context(format!("making pod {}'s network namespace", p.id)))?
            .into_inner();
        if vm {
            // In the guest: the host sees neither the path nor the namespace, and a VM booted
            // again has lost it.
            net.path = made.path;
        } else {
            let path =
                crate::engine::ns::pod_netns_path(&self.tenant_ns_dir(&p.tenant), &net.netns);
            if !crate::engine::ns::is_ns(&path) {
                return Err(Status::internal(format!(
                    "pod {}'s network namespace is not at {} after the engine made it",
                    p.id,
                    path.display()
                )));
            }
            net.path = path.to_string_lossy().into_owned();
        }
        net.network = list.name.clone();
        net.config = Some(list.to_json());
        // Recorded before ADD: an agent that dies during it still knows what to delete.
        self.store
            .set_pod_network(&p.id, Some(net.clone()))
            .await
            .map_err(|e| Status::internal(format!("recording pod {}: {e}", p.id)))?;
        let ipam_dir = self.ipam_dir();
        let netns = std::path::PathBuf::from(&net.path);
        let call = pod_call(p, &net.netns, &netns, &ipam_dir);
        let result = if vm {
            // host-local allocates here, in the node's store; the guest's plugins get the
            // addresses as static IPAM.
            let guest = cni::delegate_ipam(cfg, &list, &call)
                .await
                .map_err(|e| cni_status(&p.id, e))?;
            net.guest_config = Some(guest.to_json());
            self.store
                .set_pod_network(&p.id, Some(net.clone()))
                .await
                .map_err(|e| Status::internal(format!("recording pod {}: {e}", p.id)))?;
            let runner = self.guest_runner(&p.tenant, &guest).await?;
            cni::add(cfg, &guest, &call, &runner).await.and_then(|r| {
                // The host routes the pod's address to the tenant: the guest may claim none
                // but those its IPAM was given (the undo releases them).
                let given = cni::static_addresses(&guest);
                let mut claimed = cni::ipv4_of(&r)
                    .map(std::net::IpAddr::V4)
                    .into_iter()
                    .chain(cni::ipv6_of(&r).map(std::net::IpAddr::V6));
                match claimed.find(|a| !given.contains(a)) {
                    None => Ok(r),
                    Some(a) => Err(cni::CniError::Config(format!(
                        "the VM guest's network gave the pod {a}, which its IPAM did not allocate (it has {given:?})"
                    ))),
                }
            })
        } else {
            let runner = cni::Runner::Host {
                tenant_netns: self.tenant_ns_dir(&p.tenant).join("net"),
            };
            cni::add(cfg, &list, &call, &runner).await
        }
        .map_err(|e| Status::internal(format!("pod {}: {e}", p.id)))?;
        let ip = cni::ipv4_of(&result);
        net.ip = ip.map(|a| a.to_string()).unwrap_or_default();
        net.result = Some(result);
        self.store
            .set_pod_network(&p.id, Some(net))
            .await
            .map_err(|e| Status::internal(format!("recording pod {}: {e}", p.id)))?;
        if let (Some(ip), Some(subnet)) = (ip, self.tenant_subnet(&p.tenant).await) {
            crate::net::route_pod(&p.tenant, subnet, ip)
                .await
                .map_err(|e| Status::internal(format!("pod {}: {e}", p.id)))?;
        }
        self.refresh_tenant_rules(&p.tenant).await?;
        self.store
            .pod(&p.id)
            .await
            .ok_or_else(|| Status::aborted(format!("pod {} was removed meanwhile", p.id)))
    }

    /// Runs a VM tenant's pod plugins in its guest: the plugins `list` names (and the IPAM
    /// they run) sent in first, each once per content.
    async fn guest_runner(
        &self,
        tenant: &str,
        list: &cni::NetworkList,
    ) -> Result<cni::Runner, Status> {
        let cfg = &self.state.config.cri.cni;
        let mut files = Vec::new();
        for name in cni::guest_plugins(list) {
            let path = cfg.plugin(&name).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "CNI plugin {name:?} of network {:?} is in none of [cri.cni] bin_dirs",
                    list.name
                ))
            })?;
            files.push((name, path));
        }
        let (engine, plugins) = self
            .state
            .sandboxes
            .import_files(tenant, &files)
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "sending the CNI plugins into tenant {tenant:?}'s VM: {e}"
                ))
            })?;
        Ok(cni::Runner::Guest { engine, plugins })
    }

    /// Takes a pod's own network down: CNI DEL with what ADD gave, the netns, the record's
    /// address and results, the host-port forwards. What is gone already is skipped; an error leaves the
    /// record, so that a retry (kubelet retries a stop) goes on from there.
    pub(super) async fn teardown_network(&self, p: &PodRecord) -> Result<(), Status> {
        let Some(net) = p.network.clone() else {
            return Ok(());
        };
        if let (Ok(ip), Some(subnet)) = (
            net.ip.parse::<std::net::Ipv4Addr>(),
            self.tenant_subnet(&p.tenant).await,
        ) {
            crate::net::unroute_pod(&p.tenant, subnet, ip)
                .await
                .map_err(|e| Status::internal(format!("pod {}: {e}", p.id)))?;
        }
        let parse = |c: &Option<serde_json::Value>| {
            c.as_ref()
                .map(|c| {
                    cni::NetworkList::parse(&c.to_string(), "the pod's recorded network")
                        .map_err(|e| Status::internal(e.to_string()))
                })
                .transpose()
        };
        let recorded = parse(&net.config)?;
        let ipam_dir = self.ipam_dir();
        let cfg = &self.state.config.cri.cni;
        let in_vm = !net.vm_boot.is_empty() || self.is_vm(&p.tenant).await;
        let rules_tenant_alive = if !in_vm {
            self.teardown_host_network(p, &net, recorded.as_ref())
                .await?
        } else {
            // The guest's part, while the VM that has the pod's netns runs (one booted again
            // has lost it, and a deleted tenant took it along); then the addresses the host's
            // store gave.
            // No boot recorded: the guest was never asked for the netns.
            let vm_alive = !net.vm_boot.is_empty() && self.vm_boot(&p.tenant) == net.vm_boot;
            let netns = std::path::PathBuf::from(&net.path);
            let call = pod_call(p, &net.netns, &netns, &ipam_dir);
            if vm_alive {
                if let Some(guest) = parse(&net.guest_config)? {
                    let runner = self.guest_runner(&p.tenant, &guest).await?;
                    cni::del(cfg, &guest, net.result.as_ref(), &call, &runner)
                        .await
                        .map_err(|e| Status::internal(format!("pod {}: {e}", p.id)))?;
                }
                self.pod_engine(&p.tenant)
                    .await?
                    .delete_netns(epb::NetnsRequest {
                        name: net.netns.clone(),
                    })
                    .await
                    .map_err(context(format!(
                        "removing pod {}'s network namespace",
                        p.id
                    )))?;
            }
            if let Some(list) = &recorded {
                cni::release_ipam(cfg, list, &call)
                    .await
                    .map_err(|e| Status::internal(format!("pod {}: {e}", p.id)))?;
            }
            vm_alive
        };
        // The record keeps the netns's name: the pod had one, and has no address now.
        let down = PodNetwork {
            netns: net.netns.clone(),
            network: net.network.clone(),
            vm_boot: net.vm_boot.clone(),
            ..PodNetwork::default()
        };
        self.store
            .set_pod_network(&p.id, Some(down))
            .await
            .map_err(|e| Status::internal(format!("recording pod {}: {e}", p.id)))?;
        if rules_tenant_alive {
            self.refresh_tenant_rules(&p.tenant).await?;
        }
        Ok(())
    }

    /// The host's part of [`Self::teardown_network`] for a user-namespaced tenant's pod: DEL in
    /// the tenant's netns, and the pod's netns unmounted. Returns whether the tenant's netns is
    /// there (its rules are then rewritten).
    async fn teardown_host_network(
        &self,
        p: &PodRecord,
        net: &PodNetwork,
        recorded: Option<&cni::NetworkList>,
    ) -> Result<bool, Status> {
        let tenant_netns = self.tenant_ns_dir(&p.tenant).join("net");
        let netns = crate::engine::ns::pod_netns_path(&self.tenant_ns_dir(&p.tenant), &net.netns);
        let tenant_alive = crate::engine::ns::is_ns(&tenant_netns);
        if !tenant_alive && let Some(list) = recorded {
            // The plugins cannot run without the tenant's netns; what host-local holds for the
            // pod in the node's store is released here, as its DEL would.
            let released = cni::release_host_local(list, &self.ipam_dir(), &p.id).map_err(|e| {
                Status::internal(format!("pod {}: releasing its address: {e}", p.id))
            })?;
            if !released.is_empty() {
                tracing::info!(pod = %p.id, addresses = ?released, "released a pod's addresses without its tenant's netns");
            }
        }
        // DEL also when the pod's netns is gone (the plugins release what they hold, such as
        // its address); not when the tenant's is: what the plugins made there went with it.
        if tenant_alive && let Some(list) = recorded {
            let ipam_dir = self.ipam_dir();
            let call = pod_call(p, &net.netns, &netns, &ipam_dir);
            let runner = cni::Runner::Host {
                tenant_netns: tenant_netns.clone(),
            };
            cni::del(
                &self.state.config.cri.cni,
                list,
                net.result.as_ref(),
                &call,
                &runner,
            )
            .await
            .map_err(|e| Status::internal(format!("pod {}: {e}", p.id)))?;
        }
        // The agent, root in the host's mount namespace, takes the bind mount away itself:
        // no need for the tenant's engine to be up.
        crate::engine::ns::remove_pod_netns(&self.tenant_ns_dir(&p.tenant), &net.netns);
        Ok(tenant_alive)
    }

    /// Rewrites the rules in a tenant's netns (a VM tenant's: in its guest) from its ready
    /// pods that have an address. One rewrite at a time per tenant (a guest slow to answer
    /// holds up only its own), each from the records as they are when it starts: the last one
    /// written is never an older view.
    async fn refresh_tenant_rules(&self, tenant: &str) -> Result<(), Status> {
        let lock = crate::keyed::entry(&self.cni_rules, tenant).await;
        let _one = lock.lock().await;
        let vm = self.is_vm(tenant).await;
        let boot = if vm {
            self.vm_boot(tenant)
        } else {
            String::new()
        };
        let mut forwards = Vec::new();
        for p in self.store.pods().await {
            let Some(ip) = p
                .network
                .as_ref()
                .filter(|n| p.ready && p.tenant == tenant && n.vm_boot == boot)
                .and_then(|n| n.ip.parse::<std::net::Ipv4Addr>().ok())
            else {
                continue;
            };
            forwards.extend(p.ports.iter().map(|&(proto, host, inside)| cni::Forward {
                proto,
                port: host,
                pod_ip: ip,
                pod_port: inside,
            }));
        }
        let tenant_ip = self
            .state
            .sandboxes
            .tenant(tenant)
            .await
            .ok()
            .and_then(|t| t.subnet)
            .filter(|_| self.state.config.network.enabled)
            .map(|s| crate::net::addresses(s).1);
        if vm {
            let eng = self.pod_engine(tenant).await?;
            cni::apply_guest_rules(tenant, &eng, tenant_ip, &forwards).await
        } else {
            cni::apply_tenant_rules(
                tenant,
                &self.tenant_ns_dir(tenant).join("net"),
                tenant_ip,
                &forwards,
            )
            .await
        }
        .map_err(|e| Status::internal(e.to_string()))
    }

    pub(super) async fn pod_ip(&self, p: &PodRecord) -> String {
        if let Some(n) = &p.network {
            return n.ip.clone();
        }
        self.state
            .sandboxes
            .tenant(&p.tenant)
            .await
            .ok()
            .and_then(|t| t.subnet)
            .map(|s| crate::net::addresses(s).1.to_string())
            .unwrap_or_default()
    }
}

/// What pod `p`'s plugin calls need: its metadata, its netns (`name` to its engine, `path` to
/// the plugins) and the node's host-local store.
fn pod_call<'a>(
    p: &'a PodRecord,
    name: &'a str,
    path: &'a std::path::Path,
    ipam_dir: &'a std::path::Path,
) -> cni::PodCall<'a> {
    cni::PodCall {
        id: &p.id,
        netns: path,
        netns_name: name,
        namespace: &p.namespace,
        name: &p.name,
        uid: &p.uid,
        ipam_dir,
    }
}

/// A CNI failure: a configuration the node's network cannot serve is `FAILED_PRECONDITION`,
/// anything else `INTERNAL`.
fn cni_status(pod: &str, e: cni::CniError) -> Status {
    match e {
        cni::CniError::Config(_) => Status::failed_precondition(format!("pod {pod}: {e}")),
        _ => Status::internal(format!("pod {pod}: {e}")),
    }
}

fn pod_metadata(p: &PodRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: p.name.clone(),
        uid: p.uid.clone(),
        namespace: p.namespace.clone(),
        attempt: p.attempt,
    }
}

/// Ready while its record says so and its tenant is ready: a pod whose tenant was deleted or
/// failed is not, so kubelet makes a new one.
/// The ready tenants, each with its VM's boot (empty for a user-namespaced tenant).
pub(super) type ReadyTenants = HashMap<String, String>;

fn pod_state(p: &PodRecord, ready_tenants: &ReadyTenants) -> cri::PodSandboxState {
    // A pod whose own network was never completed (an agent that died during its set-up), or
    // whose netns is gone (a host reboot, tenant namespaces made again; in a VM tenant, a VM
    // booted again since), is not ready: kubelet stops it, which tears down what was left, and
    // makes a new one.
    let network_made = p.network.as_ref().is_none_or(|n| {
        !n.ip.is_empty()
            && if n.vm_boot.is_empty() {
                crate::engine::ns::is_ns(std::path::Path::new(&n.path))
            } else {
                ready_tenants.get(&p.tenant) == Some(&n.vm_boot)
            }
    });
    // A shared process namespace whose PID 1 ended (signalled from inside the pod, or a host
    // reboot) takes no new container: the pod is not ready either.
    let pid1_alive = p.pidns_dir.is_empty()
        || crate::engine::ns::pidns_holder(std::path::Path::new(&p.pidns_dir), &p.id).is_some();
    if p.ready && network_made && pid1_alive && ready_tenants.contains_key(&p.tenant) {
        cri::PodSandboxState::SandboxReady
    } else {
        cri::PodSandboxState::SandboxNotready
    }
}

fn container_state(c: Option<&pb::Container>) -> cri::ContainerState {
    match c.map(|c| pb::ContainerState::try_from(c.state)) {
        Some(Ok(pb::ContainerState::Created)) => cri::ContainerState::ContainerCreated,
        Some(Ok(pb::ContainerState::Running)) => cri::ContainerState::ContainerRunning,
        Some(Ok(pb::ContainerState::Exited)) => cri::ContainerState::ContainerExited,
        _ => cri::ContainerState::ContainerUnknown,
    }
}

fn container_metadata(c: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: c.name.clone(),
        attempt: c.attempt,
    }
}

fn image_spec(c: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: c.image.clone(),
        ..Default::default()
    }
}

fn cri_container(r: &ContainerRecord, c: Option<&pb::Container>) -> cri::Container {
    cri::Container {
        id: r.id.clone(),
        pod_sandbox_id: r.pod.clone(),
        metadata: Some(container_metadata(r)),
        image: Some(image_spec(r)),
        image_ref: r.image_id.clone(),
        state: container_state(c) as i32,
        created_at: r.created_at_ns,
        labels: unsorted(&r.labels),
        annotations: unsorted(&r.annotations),
        image_id: r.image_id.clone(),
    }
}

fn cri_container_status(r: &ContainerRecord, c: Option<&pb::Container>) -> cri::ContainerStatus {
    let state = container_state(c);
    let (reason, message) = match c {
        Some(c) if state == cri::ContainerState::ContainerExited => (
            if c.oom_killed {
                "OOMKilled"
            } else if c.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            },
            c.message.clone(),
        ),
        Some(c) => ("", c.message.clone()),
        None => (
            "NotFound",
            "the container's engine no longer has it".to_string(),
        ),
    };
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: Some(container_metadata(r)),
        state: state as i32,
        created_at: r.created_at_ns,
        started_at: c.map_or(0, |c| ns(c.started_at_unix_ms)),
        finished_at: c.map_or(0, |c| ns(c.finished_at_unix_ms)),
        exit_code: c.map_or(0, |c| c.exit_code),
        // As containerd: the image's tag and its repository digest rather than the image id
        // kubelet passed (kubelet shows them as the container's `image` and `imageID`).
        image: Some(if r.image_tag.is_empty() {
            image_spec(r)
        } else {
            cri::ImageSpec {
                image: r.image_tag.clone(),
                ..Default::default()
            }
        }),
        image_ref: if r.image_repo_digest.is_empty() {
            r.image_id.clone()
        } else {
            r.image_repo_digest.clone()
        },
        reason: reason.into(),
        message,
        labels: unsorted(&r.labels),
        annotations: unsorted(&r.annotations),
        mounts: r
            .mounts
            .iter()
            .map(|(host, inside, ro)| cri::Mount {
                container_path: inside.clone(),
                host_path: host.clone(),
                readonly: *ro,
                recursive_read_only: r.recursive_read_only.contains(inside),
                propagation: if r.host_to_container.contains(inside) {
                    cri::MountPropagation::PropagationHostToContainer as i32
                } else {
                    cri::MountPropagation::PropagationPrivate as i32
                },
                image: r.image_mounts.get(inside).map(|image| cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        log_path: r.log_path.clone(),
        resources: c.and_then(|c| c.resources.as_ref()).map(|res| {
            const PERIOD: i64 = 100_000;
            #[allow(clippy::cast_possible_truncation)]
            let quota = res.cpus.map_or(0, |c| (c * PERIOD as f64).round() as i64);
            cri::ContainerResources {
                linux: Some(cri::LinuxContainerResources {
                    cpu_period: if quota > 0 { PERIOD } else { 0 },
                    cpu_quota: quota,
                    cpu_shares: res
                        .cpu_shares
                        .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
                    memory_limit_in_bytes: res
                        .memory_bytes
                        .map_or(0, |m| i64::try_from(m).unwrap_or(i64::MAX)),
                    ..Default::default()
                }),
                windows: None,
            }
        }),
        image_id: r.image_id.clone(),
        // The identity the process started with (kubelet 1.33+ shows it in the pod's status,
        // and it is how a pod sees what supplementalGroupsPolicy gave it): its groups include
        // its primary group, as the process's own list does.
        user: c.and_then(|c| c.user.as_ref()).map(|u| cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: i64::from(u.uid),
                gid: i64::from(u.gid),
                supplemental_groups: std::iter::once(u.gid)
                    .chain(u.groups.iter().copied().filter(|g| *g != u.gid))
                    .map(i64::from)
                    .collect(),
            }),
        }),
    }
}

fn labels_match(have: &BTreeMap<String, String>, want: &HashMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// A pod's host ports as `(protocol, host port, container port)`; mappings without a host port
/// publish nothing (kubelet sends every declared container port).
fn pod_ports(c: &cri::PodSandboxConfig) -> Result<Vec<(Proto, u16, u16)>, Status> {
    let mut out: Vec<(Proto, u16, u16)> = Vec::new();
    for (i, m) in c.port_mappings.iter().enumerate() {
        if m.host_port == 0 {
            continue;
        }
        let f = |name: &str| format!("config.port_mappings[{i}].{name}");
        let port = |name: &str, v: i32| {
            u16::try_from(v)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(&f(name), format!("{v} is not a port (1 to 65535)")))
        };
        let host = port("host_port", m.host_port)?;
        let inside = port("container_port", m.container_port)?;
        let proto = match cri::Protocol::try_from(m.protocol) {
            Ok(cri::Protocol::Tcp) => Proto::Tcp,
            Ok(cri::Protocol::Udp) => Proto::Udp,
            _ => return Err(unsupported(&format!("{} = SCTP", f("protocol")))),
        };
        if !(m.host_ip.is_empty() || m.host_ip == "0.0.0.0") {
            return Err(unsupported(&format!(
                "{} (host ports listen on every host address)",
                f("host_ip")
            )));
        }
        if out.iter().any(|&(p, h, _)| p == proto && h == host) {
            return Err(bad(
                &f("host_port"),
                format!("{host}/{} is asked for twice", proto.as_str()),
            ));
        }
        out.push((proto, host, inside));
    }
    Ok(out)
}

/// Refuses what a pod asks for that this runtime cannot give yet, naming the field.
fn check_pod_config(c: &cri::PodSandboxConfig) -> Result<(), Status> {
    let m = c
        .metadata
        .as_ref()
        .ok_or_else(|| bad("config.metadata", "is required"))?;
    if m.name.is_empty() {
        return Err(bad("config.metadata.name", "must not be empty"));
    }
    // They go into CNI_ARGS (`K=V;K=V`) and into messages: no separators, no control characters.
    for (field, v) in [
        ("config.metadata.name", &m.name),
        ("config.metadata.namespace", &m.namespace),
        ("config.metadata.uid", &m.uid),
    ] {
        if v.len() > 253
            || v.chars()
                .any(|ch| ch == ';' || ch == '=' || ch == '/' || ch.is_control())
            || v == "."
            || v == ".."
        {
            return Err(bad(
                field,
                "must be at most 253 characters without ';', '=', '/' or control characters, and not . or ..",
            ));
        }
    }
    if !c.log_directory.is_empty() && !c.log_directory.starts_with('/') {
        return Err(bad("config.log_directory", "must be an absolute path"));
    }
    if !c.hostname.is_empty() {
        check_hostname(&c.hostname)?;
    }
    if let Some(sc) = c.linux.as_ref().and_then(|l| l.security_context.as_ref()) {
        if sc.privileged {
            return Err(unsupported("config.linux.security_context.privileged"));
        }
        if let Some(ns) = &sc.namespace_options {
            check_namespaces("config.linux.security_context.namespace_options", ns)?;
        }
        check_profile("config.linux.security_context.seccomp", sc.seccomp.as_ref())?;
    }
    Ok(())
}

/// A pod's hostname: a DNS name of at most 63 bytes.
/// A pod's host name: at most 64 bytes, what the kernel's UTS name holds (kubelet allows an FQDN
/// of 64 with `setHostnameAsFQDN`).
fn check_hostname(h: &str) -> Result<(), Status> {
    let ok = h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !h.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(bad(
            "config.hostname",
            format!("{h:?} is not a host name (letters, digits, '-' and '.', at most 64 bytes)"),
        ))
    }
}

/// Seccomp: the runtime's default profile is always applied; `Unconfined` and `RuntimeDefault`
/// get it, a profile of the node's own (`Localhost`) is not supported yet.
fn check_profile(field: &str, p: Option<&cri::SecurityProfile>) -> Result<(), Status> {
    match p {
        Some(p)
            if p.profile_type == cri::security_profile::ProfileType::Localhost as i32
                && !std::path::Path::new(&p.localhost_ref).is_absolute() =>
        {
            Err(bad(
                &format!("{field}.localhost_ref"),
                format!(
                    "{:?} must be the absolute path of a profile file on the node",
                    p.localhost_ref
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// The pod process namespace a container joins: the pod's, when the container asks for the
/// POD mode (kubelet's shareProcessNamespace) and the pod was made with it.
fn pod_pidns(p: &PodRecord, c: &cri::ContainerConfig) -> Result<String, Status> {
    let wants = security_of(c)
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|ns| ns.pid == cri::NamespaceMode::Pod as i32);
    match (wants, p.shared_pid) {
        (false, _) => Ok(String::new()),
        (true, true) => Ok(p.id.clone()),
        (true, false) => Err(Status::failed_precondition(format!(
            "config.linux.security_context.namespace_options.pid = POD, but pod sandbox {} was not made with a shared process namespace (its namespace_options.pid)",
            p.id
        ))),
    }
}

/// The OCI seccomp profile of a container that asks for a Localhost one (empty: the default),
/// loaded from the node for the capabilities the container will have.
fn localhost_profile_of(c: &cri::ContainerConfig) -> Result<String, Status> {
    let Some(path) = security_of(c).map(localhost_seccomp).transpose()?.flatten() else {
        return Ok(String::new());
    };
    let drop = security_of(c)
        .and_then(|s| s.capabilities.as_ref())
        .map(|c| c.drop_capabilities.clone())
        .unwrap_or_default();
    let add = security_of(c)
        .and_then(|s| s.capabilities.as_ref())
        .map(|c| c.add_capabilities.clone())
        .unwrap_or_default();
    let caps: HashSet<String> = crate::engine::spec::capabilities_with(&drop, &add)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| serde_json::to_value(c).ok())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    super::seccomp::load_localhost(&path, &caps)
        .map_err(|e| bad("config.linux.security_context.seccomp", e))
}

/// The Localhost seccomp profile a container asks for, if any: its `seccomp`, or else the
/// deprecated `seccomp_profile_path` (`localhost/<path>`; `runtime/default`, `docker/default`
/// and `unconfined` mean the default profile, which is always applied at least; anything else
/// is refused).
// The deprecated field is read on purpose: older kubelets and critest still send it.
#[allow(deprecated)]
fn localhost_seccomp(sc: &cri::LinuxContainerSecurityContext) -> Result<Option<String>, Status> {
    let f = "config.linux.security_context";
    if let Some(p) = &sc.seccomp {
        check_profile(&format!("{f}.seccomp"), Some(p))?;
        return Ok(
            (p.profile_type == cri::security_profile::ProfileType::Localhost as i32)
                .then(|| p.localhost_ref.clone()),
        );
    }
    match sc.seccomp_profile_path.as_str() {
        "" | "runtime/default" | "docker/default" | "unconfined" => Ok(None),
        s => match s.strip_prefix("localhost/") {
            Some(path) if std::path::Path::new(path).is_absolute() => Ok(Some(path.to_string())),
            _ => Err(bad(
                &format!("{f}.seccomp_profile_path"),
                format!(
                    "{s:?} is none of runtime/default, docker/default, unconfined or localhost/<absolute path>"
                ),
            )),
        },
    }
}

/// Whether a container asks to run without a seccomp filter, as Kubernetes reads it: the
/// `Unconfined` type, or no profile at all (also none in the deprecated field, or
/// `unconfined` there).
#[allow(deprecated)] // seccomp_profile_path: older kubelets and critest still send it
fn asks_unconfined(c: &cri::ContainerConfig) -> bool {
    let Some(sc) = security_of(c) else {
        return true;
    };
    match &sc.seccomp {
        Some(p) => p.profile_type == cri::security_profile::ProfileType::Unconfined as i32,
        None => matches!(sc.seccomp_profile_path.as_str(), "" | "unconfined"),
    }
}

/// A `nameserver` of resolv.conf: an IP address, or an IPv6 one with a zone (`fe80::1%eth0`,
/// which kubelet copies from a host's resolv.conf for `dnsPolicy: Default`).
fn is_nameserver(s: &str) -> bool {
    match s.split_once('%') {
        None => s.parse::<std::net::IpAddr>().is_ok(),
        Some((addr, zone)) => {
            addr.parse::<std::net::Ipv6Addr>().is_ok()
                && !zone.is_empty()
                && zone.len() < 16
                && zone
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        }
    }
}

/// `/etc/resolv.conf` from a pod's DNS config (empty: none given, the tenant's applies).
fn resolv_conf(dns: Option<&cri::DnsConfig>) -> Result<String, Status> {
    let Some(d) = dns else {
        return Ok(String::new());
    };
    if d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty() {
        return Ok(String::new());
    }
    let mut out = String::new();
    for (i, s) in d.servers.iter().enumerate() {
        if !is_nameserver(s) {
            return Err(bad(
                &format!("config.dns_config.servers[{i}]"),
                format!("{s:?} is not an IP address (nor an IPv6 one with a %zone)"),
            ));
        }
        out.push_str(&format!("nameserver {s}\n"));
    }
    let word = |field: &str, v: &[String]| -> Result<(), Status> {
        for (i, w) in v.iter().enumerate() {
            if w.is_empty()
                || w.len() > 253
                || w.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(bad(
                    &format!("config.dns_config.{field}[{i}]"),
                    format!("{w:?} is not one word"),
                ));
            }
        }
        Ok(())
    };
    word("searches", &d.searches)?;
    word("options", &d.options)?;
    if !d.searches.is_empty() {
        out.push_str(&format!("search {}\n", d.searches.join(" ")));
    }
    if !d.options.is_empty() {
        out.push_str(&format!("options {}\n", d.options.join(" ")));
    }
    Ok(out)
}

fn check_namespaces(field: &str, ns: &cri::NamespaceOption) -> Result<(), Status> {
    let node = cri::NamespaceMode::Node as i32;
    for (name, mode) in [("network", ns.network), ("pid", ns.pid), ("ipc", ns.ipc)] {
        if mode == node {
            return Err(unsupported(&format!(
                "{field}.{name} = NODE (the host's namespace)"
            )));
        }
    }
    // kubelet with UserNamespacesSupport (on by default since Kubernetes 1.33) sends NODE for
    // every pod without `hostUsers: false`: "the runtime's default", which here is the
    // tenant's user namespace, as with no options at all. POD asks for kubelet's own mapping,
    // which a tenant cannot have: its mapping is the agent's (the runtime handlers say
    // user_namespaces: false, so kubelet refuses such pods itself).
    if let Some(u) = &ns.userns_options
        && u.mode != cri::NamespaceMode::Node as i32
    {
        return Err(unsupported(&format!(
            "{field}.userns_options.mode = {} (hostUsers: false asks for kubelet's id mapping; every tenant has its own user namespace already, with the agent's mapping)",
            cri::NamespaceMode::try_from(u.mode)
                .map_or_else(|_| u.mode.to_string(), |m| m.as_str_name().to_string())
        )));
    }
    Ok(())
}

/// Refuses container fields this runtime cannot give yet, naming the field.
fn check_container_config(c: &cri::ContainerConfig) -> Result<(), Status> {
    let m = c
        .metadata
        .as_ref()
        .ok_or_else(|| bad("config.metadata", "is required"))?;
    if m.name.is_empty() {
        return Err(bad("config.metadata.name", "must not be empty"));
    }
    if c.image.as_ref().is_none_or(|i| i.image.is_empty()) {
        return Err(bad("config.image.image", "must name an image"));
    }
    if !c.cdi_devices.is_empty() {
        return Err(unsupported("config.cdi_devices"));
    }
    if let Some(sc) = c.linux.as_ref().and_then(|l| l.security_context.as_ref()) {
        let f = "config.linux.security_context";
        if sc.privileged {
            return Err(unsupported(&format!("{f}.privileged")));
        }
        if let Some(ns) = &sc.namespace_options {
            check_namespaces(&format!("{f}.namespace_options"), ns)?;
            if ns.pid == cri::NamespaceMode::Target as i32 && ns.target_id.is_empty() {
                return Err(bad(
                    &format!("{f}.namespace_options.target_id"),
                    "must name the container whose process namespace to join (pid = TARGET)",
                ));
            }
        }
        if let Some(caps) = &sc.capabilities {
            if !caps.add_ambient_capabilities.is_empty() {
                return Err(unsupported(&format!(
                    "{f}.capabilities.add_ambient_capabilities"
                )));
            }
            for (i, c) in caps.add_capabilities.iter().enumerate() {
                // With CAP_SYS_ADMIN a container could unmount its masked paths, and some of
                // what they hide in /proc (sched_debug, timer lists) describes the host.
                let upper = c.to_uppercase();
                if upper == "ALL" || upper.trim_start_matches("CAP_") == "SYS_ADMIN" {
                    return Err(unsupported(&format!(
                        "{f}.capabilities.add_capabilities[{i}] = {c} (it would let a container unmount the masks over the host's information in /proc)"
                    )));
                }
                if crate::engine::spec::capabilities_with(&[], std::slice::from_ref(c)).is_err() {
                    return Err(bad(
                        &format!("{f}.capabilities.add_capabilities[{i}]"),
                        format!("{c:?} is not a capability name"),
                    ));
                }
            }
            for (i, c) in caps.drop_capabilities.iter().enumerate() {
                if crate::engine::spec::capabilities(std::slice::from_ref(c)).is_err() {
                    return Err(bad(
                        &format!("{f}.capabilities.drop_capabilities[{i}]"),
                        format!("{c:?} is not a capability name"),
                    ));
                }
            }
        }
        localhost_seccomp(sc)?;
        if let Some(p) = &sc.apparmor
            && p.profile_type == cri::security_profile::ProfileType::Localhost as i32
        {
            return Err(unsupported(&format!("{f}.apparmor of type Localhost")));
        }
    }
    Ok(())
}

/// A container's security context, when it has one.
fn security_of(c: &cri::ContainerConfig) -> Option<&cri::LinuxContainerSecurityContext> {
    c.linux.as_ref().and_then(|l| l.security_context.as_ref())
}

/// A container's supplemental groups, ids inside its tenant's range.
fn supplemental_groups(c: &cri::ContainerConfig) -> Result<Vec<u32>, Status> {
    let Some(sc) = security_of(c) else {
        return Ok(Vec::new());
    };
    sc.supplemental_groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            u32::try_from(*g)
                .ok()
                .filter(|g| *g <= 65_535)
                .ok_or_else(|| {
                    bad(
                        &format!("config.linux.security_context.supplemental_groups[{i}]"),
                        format!("{g} is not a group id of the container (0 to 65535)"),
                    )
                })
        })
        .collect()
}

/// The OOM score adjustment kubelet gives a container (by its QoS class), when it gives one.
fn oom_score_adj(c: &cri::ContainerConfig) -> Result<Option<i32>, Status> {
    let Some(r) = c.linux.as_ref().and_then(|l| l.resources.as_ref()) else {
        return Ok(None);
    };
    if !(-1000..=1000).contains(&r.oom_score_adj) {
        return Err(bad(
            "config.linux.resources.oom_score_adj",
            format!("{} is outside -1000..=1000", r.oom_score_adj),
        ));
    }
    Ok(i32::try_from(r.oom_score_adj).ok())
}

/// A container's volumes: host paths bound in, checked.
/// Prefixes an engine's answer with what was being done, keeping its code.
fn context(what: String) -> impl FnOnce(Status) -> Status {
    move |s| Status::new(s.code(), format!("{what}: {}", s.message()))
}

/// Where a volume's host path may lie.
struct HostPathRules<'a> {
    /// `[cri] volume_roots`, resolved.
    roots: Vec<std::path::PathBuf>,
    /// The agent's state and run dirs, resolved.
    agent_dirs: Vec<std::path::PathBuf>,
    /// kubelet's root and its `pods`, resolved.
    kubelet: Option<std::path::PathBuf>,
    kubelet_pods: Option<std::path::PathBuf>,
    pod_uid: &'a str,
}

impl HostPathRules<'_> {
    /// The pod's own directory in kubelet's.
    fn pod_dir(&self) -> Option<std::path::PathBuf> {
        self.kubelet_pods
            .as_ref()
            .filter(|_| !self.pod_uid.is_empty())
            .map(|k| k.join(self.pod_uid))
    }

    /// Whether `real` lies where kubelet binds subPaths for this pod.
    fn is_subpath(&self, real: &std::path::Path) -> bool {
        self.pod_dir()
            .is_some_and(|d| real.starts_with(d.join("volume-subpaths")))
    }

    /// Checks a resolved host path: under a volume root, not in /proc, /sys, /dev or the
    /// agent's dirs, and inside kubelet's directory only in this pod's own. Whether it lies in
    /// a volume kubelet made for the pod (see [`KUBELET_MADE_VOLUMES`]), or why not allowed.
    fn check(&self, real: &std::path::Path) -> Result<bool, String> {
        let allowed = self.roots.iter().any(|r| real.starts_with(r) && real != r);
        let forbidden = ["/proc", "/sys", "/dev"]
            .iter()
            .any(|d| real.starts_with(d))
            || self
                .agent_dirs
                .iter()
                .any(|d| real.starts_with(d) || d.starts_with(real));
        let pod_dir = self.pod_dir();
        // Inside kubelet's directory, only this pod's own `pods/<uid>`: the engine binds as
        // host root, so kubelet's 0750 directories no longer keep pods apart.
        let own_pod = pod_dir
            .as_ref()
            .is_some_and(|d| real.starts_with(d) && real != d);
        // Volumes kubelet makes for the pod itself. Not `volume-subpaths` (binds of any
        // volume, a host path's included) nor other plugins' dirs (CSI, local volumes: the
        // storage behind them is not the pod's own).
        let kubelet_made = pod_dir.as_ref().is_some_and(|d| {
            let plugins = d.join("volumes");
            KUBELET_MADE_VOLUMES
                .iter()
                .any(|p| real.starts_with(plugins.join(p)) && real != plugins.join(p))
        });
        let in_kubelet = self.kubelet.as_ref().is_some_and(|k| real.starts_with(k))
            || self
                .kubelet_pods
                .as_ref()
                .is_some_and(|k| real.starts_with(k));
        if in_kubelet && !own_pod {
            return Err(format!(
                "{} is in kubelet's directory ([cri] kubelet_root) but not in this pod's own directory (pods/{})",
                real.display(),
                self.pod_uid
            ));
        }
        if !allowed || forbidden {
            return Err(format!(
                "{} is not under a directory of [cri] volume_roots ({}); volumes must lie there",
                real.display(),
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(kubelet_made)
    }
}

/// The volume plugins whose directories under `pods/<uid>/volumes` kubelet makes for the pod
/// itself (a directory or a tmpfs of its own): those `[cri] idmap_volumes = "pod"` idmaps.
const KUBELET_MADE_VOLUMES: &[&str] = &[
    "kubernetes.io~empty-dir",
    "kubernetes.io~secret",
    "kubernetes.io~configmap",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
];

fn mounts_of(
    c: &cri::ContainerConfig,
    roots: &[std::path::PathBuf],
    agent_dirs: &[&std::path::Path],
    kubelet_root: &std::path::Path,
    pod_uid: &str,
    idmap: super::IdmapVolumes,
) -> Result<Vec<epb::BindMount>, Status> {
    let host_rules = HostPathRules {
        roots: roots.iter().filter_map(|r| r.canonicalize().ok()).collect(),
        agent_dirs: agent_dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .collect(),
        kubelet: kubelet_root.canonicalize().ok(),
        kubelet_pods: kubelet_root.join("pods").canonicalize().ok(),
        pod_uid,
    };
    let denied = |f: &dyn Fn(&str) -> String, why: &str| {
        Status::permission_denied(format!("{}: {why}", f("host_path")))
    };
    let mut out = Vec::new();
    for (i, m) in c.mounts.iter().enumerate() {
        let f = |name: &str| format!("config.mounts[{i}].{name}");
        if m.image.as_ref().is_some_and(|im| !im.image.is_empty()) {
            // An image volume: its layers are filled in by the create handler once the image
            // is found.
            if !m.readonly {
                return Err(bad(
                    &f("readonly"),
                    "an image volume is read-only: set readonly",
                ));
            }
            if m.propagation != cri::MountPropagation::PropagationPrivate as i32
                || !m.uid_mappings.is_empty()
                || !m.gid_mappings.is_empty()
            {
                return Err(unsupported(&format!(
                    "{} with propagation or id mappings",
                    f("image")
                )));
            }
            check_container_path(&f("container_path"), &m.container_path)?;
            out.push(epb::BindMount {
                host_path: String::new(),
                container_path: m.container_path.clone(),
                readonly: true,
                recursive_read_only: m.recursive_read_only,
                image_layers: Vec::new(),
                device_access: String::new(),
                idmap: false,
                host_to_container: false,
            });
            continue;
        }
        if m.recursive_read_only && !m.readonly {
            return Err(bad(
                &f("recursive_read_only"),
                "needs readonly: a mount read-only all the way down is read-only itself",
            ));
        }
        if m.recursive_read_only
            && m.propagation != cri::MountPropagation::PropagationPrivate as i32
        {
            return Err(bad(
                &f("recursive_read_only"),
                "needs private propagation: mounts that appear below it later could not be made read-only",
            ));
        }
        let host_to_container = match cri::MountPropagation::try_from(m.propagation) {
            Ok(cri::MountPropagation::PropagationPrivate) => false,
            Ok(cri::MountPropagation::PropagationHostToContainer) => true,
            Ok(cri::MountPropagation::PropagationBidirectional) => {
                return Err(Status::unimplemented(format!(
                    "{}: Bidirectional cannot be had here: a container's mount namespace belongs to its tenant's user namespace, and the kernel never lets mounts made there reach the host; use HostToContainer or None",
                    f("propagation")
                )));
            }
            Err(_) => {
                return Err(bad(
                    &f("propagation"),
                    format!("{} is not a mount propagation", m.propagation),
                ));
            }
        };
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(unsupported(&f("uid_mappings")));
        }
        let host = std::path::Path::new(&m.host_path);
        if !host.is_absolute()
            || host
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad(
                &f("host_path"),
                "must be an absolute path without `..`",
            ));
        }
        // Resolved, so that a symlink cannot lead out of the allowed roots; the engine is given
        // the resolved path.
        let Ok(real) = host.canonicalize() else {
            return Err(bad(
                &f("host_path"),
                format!("{} does not exist on this node", m.host_path),
            ));
        };
        let mut kubelet_made = host_rules.check(&real).map_err(|e| denied(&f, &e))?;
        let info = if host_rules.is_subpath(&real) {
            std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
        } else {
            String::new()
        };
        if let Some((point, places)) = super::mountinfo::sources(&real, &info)
            .filter(|(point, _)| host_rules.is_subpath(point))
        {
            // kubelet bound a subPath of some volume here (a host path's too): what the bind
            // shows must pass as well, where its file system shows it elsewhere.
            let checked: Vec<_> = places
                .iter()
                .filter(|p| !host_rules.is_subpath(p))
                .map(|p| host_rules.check(p))
                .collect();
            match checked.iter().find_map(|c| c.as_ref().ok()) {
                Some(made) => kubelet_made = *made,
                None => {
                    let why = checked
                        .into_iter()
                        .find_map(Result::err)
                        .unwrap_or_else(|| {
                            "no other mount on this node shows what it binds".into()
                        });
                    return Err(denied(
                        &f,
                        &format!(
                            "{} is a subPath bind (mounted at {}) of {}: {why}",
                            real.display(),
                            point.display(),
                            places
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(" or ")
                        ),
                    ));
                }
            }
        }
        check_container_path(&f("container_path"), &m.container_path)?;
        if host_to_container {
            // The host's later mounts reach the container only through a mount that passes
            // them on: the one the path lies in must be shared.
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            match super::mountinfo::propagation(&real, &info) {
                Some((_, true)) => {}
                Some((point, false)) => {
                    return Err(Status::failed_precondition(format!(
                        "{}: HostToContainer needs the mount {} that holds {} to be shared, or what the host mounts below it cannot reach the container; make it so (mount --make-rshared {}), as kubelet does for its own directory",
                        f("propagation"),
                        point.display(),
                        real.display(),
                        point.display()
                    )));
                }
                None => {
                    return Err(Status::failed_precondition(format!(
                        "{}: no mount of this node holds {}",
                        f("propagation"),
                        real.display()
                    )));
                }
            }
        }
        out.push(epb::BindMount {
            host_path: real.display().to_string(),
            container_path: m.container_path.clone(),
            readonly: m.readonly,
            recursive_read_only: m.recursive_read_only,
            image_layers: Vec::new(),
            device_access: String::new(),
            // The pod's own volumes (emptyDirs, secrets, config maps, projected): kubelet
            // gives them owners and groups (fsGroup) meant for the container's ids. Not one
            // that follows the host's mounts: an idmapped mount is a copy of the tree, which
            // later mounts on the host do not reach.
            idmap: !host_to_container
                && match idmap {
                    super::IdmapVolumes::None => false,
                    super::IdmapVolumes::Pod => kubelet_made,
                    super::IdmapVolumes::All => true,
                },
            host_to_container,
        });
    }
    Ok(out)
}

/// The host devices a container asks for (device plugins' `devices`), as device binds for its
/// engine: only nodes listed in `[cri] allowed_devices`, resolved, and char or block devices.
fn devices_of(
    c: &cri::ContainerConfig,
    allowed: &[std::path::PathBuf],
) -> Result<Vec<epb::BindMount>, Status> {
    use std::os::unix::fs::FileTypeExt;
    let allowed: Vec<std::path::PathBuf> = allowed
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .collect();
    let mut out = Vec::new();
    for (i, d) in c.devices.iter().enumerate() {
        let f = |name: &str| format!("config.devices[{i}].{name}");
        // Whether a path that is not allowed exists is not told.
        let real = std::path::Path::new(&d.host_path)
            .canonicalize()
            .ok()
            .filter(|r| allowed.contains(r))
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "{}: {:?} is not in [cri] allowed_devices; the node's operator lists the devices pods may be given",
                    f("host_path"),
                    d.host_path
                ))
            })?;
        let kind = std::fs::metadata(&real)
            .map_err(|e| bad(&f("host_path"), format!("{}: {e}", real.display())))?
            .file_type();
        if !(kind.is_char_device() || kind.is_block_device()) {
            return Err(bad(
                &f("host_path"),
                format!("{} is not a char or block device", real.display()),
            ));
        }
        check_container_path(&f("container_path"), &d.container_path)?;
        // kubelet sends "mrw" by default; an empty one means all of them.
        let access = if d.permissions.is_empty() {
            "rwm".to_string()
        } else {
            d.permissions.clone()
        };
        if !access.chars().all(|c| "rwm".contains(c)) {
            return Err(bad(
                &f("permissions"),
                format!("{access:?} must be letters of \"rwm\""),
            ));
        }
        out.push(epb::BindMount {
            host_path: real.display().to_string(),
            container_path: d.container_path.clone(),
            readonly: false,
            recursive_read_only: false,
            image_layers: Vec::new(),
            device_access: access,
            idmap: false,
            host_to_container: false,
        });
    }
    Ok(out)
}

/// Where a volume may go inside a container.
fn check_container_path(field: &str, path: &str) -> Result<(), Status> {
    let inside = std::path::Path::new(path);
    if !inside.is_absolute()
        || inside
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        || inside == std::path::Path::new("/")
        || inside.starts_with("/proc")
        || inside.starts_with("/sys")
    {
        return Err(bad(
            field,
            "must be an absolute path without `..`, and not /, /proc or /sys",
        ));
    }
    Ok(())
}

/// The `user` an engine is given from a container's security context (None: the image's).
fn user_of(c: &cri::ContainerConfig) -> Result<Option<String>, Status> {
    let Some(sc) = c.linux.as_ref().and_then(|l| l.security_context.as_ref()) else {
        return Ok(None);
    };
    let id = |field: &str, v: i64| {
        u32::try_from(v).map_err(|_| {
            bad(
                &format!("config.linux.security_context.{field}"),
                format!("{v} is not a uid/gid"),
            )
        })
    };
    let user = match (&sc.run_as_user, sc.run_as_username.as_str()) {
        (Some(u), _) => Some(id("run_as_user", u.value)?.to_string()),
        (None, "") => None,
        (None, name) => Some(name.to_string()),
    };
    let group = sc
        .run_as_group
        .as_ref()
        .map(|g| id("run_as_group", g.value))
        .transpose()?;
    Ok(match (user, group) {
        (None, None) => None,
        (Some(u), None) => Some(u),
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (None, Some(_)) => {
            return Err(bad(
                "config.linux.security_context.run_as_group",
                "needs run_as_user or run_as_username",
            ));
        }
    })
}

#[tonic::async_trait]
impl cri::runtime_service_server::RuntimeService for RuntimeApi {
    async fn version(
        &self,
        _req: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "caas-agent".into(),
            runtime_version: crate::VERSION.into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let config = r.config.ok_or_else(|| bad("config", "is required"))?;
        check_pod_config(&config)?;
        let ports = pod_ports(&config)?;
        let resolv_conf = resolv_conf(config.dns_config.as_ref())?;
        let isolation = isolation_of(&r.runtime_handler)?;
        let tenant = tenant_of(&config)?;
        // Namespaced ones only; the network's only where the pod gets a netns of its own.
        let own_netns = self.cri.state.config.cri.cni.enabled;
        let sysctls = sorted(
            config
                .linux
                .as_ref()
                .map(|l| l.sysctls.clone())
                .unwrap_or_default(),
        );
        for (k, v) in &sysctls {
            crate::engine::spec::check_sysctl(k, v, own_netns)
                .map_err(|e| bad(&format!("config.linux.sysctls[{k:?}]"), e))?;
        }
        if own_netns {
            // A pod network that cannot be made is refused before a tenant is made for it.
            let list = self
                .cri
                .state
                .config
                .cri
                .cni
                .network()
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            if isolation == Isolation::Vm {
                cni::check_guest_ipam(&list)
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
            }
        }
        // Held until the pod is recorded: the idle-tenant collector never deletes the tenant
        // between its check and the record.
        let _gate = self.cri.tenant_gate(&tenant).await.read_owned().await;
        self.cri.ensure_tenant(&tenant, isolation, &ctx).await?;
        let shared_pid = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|sc| sc.namespace_options.as_ref())
            .is_some_and(|ns| ns.pid == cri::NamespaceMode::Pod as i32);
        let pidns_dir = if shared_pid && isolation == Isolation::Userns {
            self.cri
                .tenant_ns_dir(&tenant)
                .to_string_lossy()
                .into_owned()
        } else {
            String::new()
        };
        let m = config.metadata.unwrap_or_default();
        let id = format!("{:032x}", rand::random::<u128>());
        let network = self.cri.cni_applies(&tenant).await.then(|| PodNetwork {
            netns: id.clone(),
            ..PodNetwork::default()
        });

        let p = PodRecord {
            id,
            tenant,
            name: m.name,
            uid: m.uid,
            namespace: m.namespace,
            attempt: m.attempt,
            ready: true,
            created_at_ns: now_ns(),
            log_directory: config.log_directory,
            hostname: config.hostname,
            labels: sorted(config.labels),
            annotations: sorted(config.annotations),
            runtime_handler: r.runtime_handler,
            ports,
            resolv_conf,
            removed_cpu_ns: 0,
            network,
            sysctls,
            shared_pid,
            pidns_dir,
        };
        // The pod's lock, taken before its record exists: a stop or remove that finds the record
        // waits until its network and ports are made (or undone).
        let lock = self.cri.pod_lock(&p.id).await;
        let one = lock.lock_owned().await;
        match self.cri.store.add_pod(p.clone()).await {
            Ok(()) => {}
            Err(e @ AddError::Exists(_)) => return Err(Status::already_exists(e.to_string())),
            Err(AddError::Io(e)) => return Err(io_err(&e, &ctx)),
        }
        // The network and the host ports: all of them or no pod. In a task of its own, so a
        // caller that goes away half-way leaves nothing held.
        let cri = self.cri.clone();
        let (pod, task_ctx) = (p.clone(), ctx.clone());
        let p = tokio::spawn(async move {
            let _one = one;
            let made = cri.make_pod_network(&pod, &task_ctx).await;
            if made.is_err() {
                cri.drop_failed_pod(&pod).await;
            }
            made
        })
        .await
        .map_err(|e| Status::internal(format!("setting up the pod's network: {e}")))??;
        let ip = self.cri.pod_ip(&p).await;
        tracing::info!(pod = %p.id, tenant = %p.tenant, name = %p.name, namespace = %p.namespace, %ip, "pod sandbox running");
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: p.id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let id = req.into_inner().pod_sandbox_id;
        // Stopping what is gone already succeeds.
        let Some(p) = self.cri.store.pod(&id).await else {
            return Ok(Response::new(cri::StopPodSandboxResponse {}));
        };
        let lock = self.cri.pod_lock(&p.id).await;
        let _one = lock.lock().await;
        // A stopped pod's network resources are reclaimed: its host ports go.
        self.cri.unready(&p, &ctx).await?;
        for c in self.cri.store.containers_of(&p.id).await {
            let Some(now) = self.cri.inspect(&c, &ctx).await? else {
                continue;
            };
            if now.state == pb::ContainerState::Running as i32 {
                let mut eng = self.cri.engine(&c.tenant, &ctx).await?;
                match eng
                    .stop(epb::StopRequest {
                        container: c.id.clone(),
                        signal: libc::SIGKILL,
                        grace_seconds: 1,
                    })
                    .await
                {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(s) => {
                        return Err(engine_err(s, &ctx));
                    }
                }
            }
        }
        // Its containers are down: its own process namespace and network go (as containerd
        // tears them down at stop).
        if let Some(p) = self.cri.store.pod(&p.id).await {
            self.cri.teardown_pidns(&p).await?;
            self.cri.teardown_network(&p).await?;
        }
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let id = req.into_inner().pod_sandbox_id;
        let Some(p) = self.cri.store.pod(&id).await else {
            return Ok(Response::new(cri::RemovePodSandboxResponse {}));
        };
        let lock = self.cri.pod_lock(&p.id).await;
        let _one = lock.lock().await;
        self.cri.unready(&p, &ctx).await?;
        for c in self.cri.store.containers_of(&p.id).await {
            self.cri.remove_container(&c, &ctx).await?;
        }
        if let Some(p) = self.cri.store.pod(&p.id).await {
            self.cri.teardown_pidns(&p).await?;
            self.cri.teardown_network(&p).await?;
        }
        self.cri
            .store
            .remove_pod(&p.id)
            .await
            .map_err(|e| io_err(&e, &ctx))?;
        self.cri.pod_locks.lock().await.remove(&p.id);
        tracing::info!(pod = %p.id, tenant = %p.tenant, "pod sandbox removed");
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let p = self.cri.pod_or_not_found(&r.pod_sandbox_id).await?;
        let ip = self.cri.pod_ip(&p).await;
        let mut info = HashMap::new();
        if r.verbose {
            info.insert(
                "info".into(),
                serde_json::json!({ "tenant": p.tenant, "hostname": p.hostname, "log_directory": p.log_directory })
                    .to_string(),
            );
        }
        let mut containers_statuses = Vec::new();
        for c in self.cri.store.containers_of(&p.id).await {
            let now = self.cri.inspect(&c, &ctx).await.ok().flatten();
            containers_statuses.push(cri_container_status(&c, now.as_ref()));
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(self.cri.pod_status(&p, ip, &self.cri.ready_tenants().await)),
            info,
            containers_statuses,
            timestamp: now_ns(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let f = req.into_inner().filter.unwrap_or_default();
        let ready = self.cri.ready_tenants().await;
        let mut items: Vec<cri::PodSandbox> = self
            .cri
            .store
            .pods()
            .await
            .into_iter()
            .filter(|p| f.id.is_empty() || p.id.starts_with(&f.id))
            .filter(|p| {
                f.state
                    .as_ref()
                    .is_none_or(|s| s.state == pod_state(p, &ready) as i32)
            })
            .filter(|p| labels_match(&p.labels, &f.label_selector))
            .map(|p| cri::PodSandbox {
                id: p.id.clone(),
                metadata: Some(pod_metadata(&p)),
                state: pod_state(&p, &ready) as i32,
                created_at: p.created_at_ns,
                labels: unsorted(&p.labels),
                annotations: unsorted(&p.annotations),
                runtime_handler: p.runtime_handler.clone(),
            })
            .collect();
        items.sort_by_key(|p| p.created_at);
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let p = self.cri.pod_or_not_found(&r.pod_sandbox_id).await?;
        // Held until the engine made the container: a stop or remove of the pod waits for it,
        // and two creates of one name cannot both pass the check below.
        let lock = self.cri.pod_lock(&p.id).await;
        let _one = lock.lock().await;
        let p = self.cri.pod_or_not_found(&p.id).await?;
        if !p.ready {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is stopped; run a new pod sandbox",
                p.id
            )));
        }
        let config = r.config.ok_or_else(|| bad("config", "is required"))?;
        check_container_config(&config)?;
        let user = user_of(&config)?;
        let meta = config.metadata.clone().unwrap_or_default();
        if let Some(o) = self
            .cri
            .store
            .containers_of(&p.id)
            .await
            .iter()
            .find(|c| c.name == meta.name && c.attempt == meta.attempt)
        {
            return Err(Status::already_exists(format!(
                "pod sandbox {} has a container {:?} attempt {} already: {}",
                p.id, meta.name, meta.attempt, o.id
            )));
        }
        let image = config.image.clone().unwrap_or_default().image;
        let rootfs = self.cri.image_for(&p.tenant, &image, &ctx).await?;
        let mut id;
        loop {
            id = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
            if !self.cri.store.has_container(&id).await {
                break;
            }
        }
        let env: Vec<String> = config
            .envs
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect();
        for (i, kv) in config.envs.iter().enumerate() {
            if kv.key.is_empty()
                || kv.key.contains('=')
                || kv.key.contains('\0')
                || kv.value.contains('\0')
            {
                return Err(bad(
                    &format!("config.envs[{i}]"),
                    format!("{:?} is not a variable name", kv.key),
                ));
            }
        }
        // Kubernetes: command replaces the image's Entrypoint, args its Cmd.
        let run = rootfs.config.config.clone().unwrap_or_default();
        let command: Vec<String> = match (config.command.is_empty(), config.args.is_empty()) {
            (false, _) => config.command.iter().chain(&config.args).cloned().collect(),
            (true, false) => run
                .entrypoint
                .clone()
                .unwrap_or_default()
                .into_iter()
                .chain(config.args.iter().cloned())
                .collect(),
            (true, true) => Vec::new(),
        };
        if !config.working_dir.is_empty() && !config.working_dir.starts_with('/') {
            return Err(bad(
                "config.working_dir",
                "must be an absolute path inside the container",
            ));
        }
        // A VM tenant's guest gets a copy of each volume, which the host's later mounts do not
        // reach.
        if let Some(i) = config
            .mounts
            .iter()
            .position(|m| m.propagation == cri::MountPropagation::PropagationHostToContainer as i32)
            && self.cri.is_vm(&p.tenant).await
        {
            return Err(Status::unimplemented(format!(
                "config.mounts[{i}].propagation: HostToContainer in a VM tenant: its guest gets a copy of each volume, which the host's later mounts do not reach; use None"
            )));
        }
        let pid_target = self.pid_target(&p, &config).await?;
        let mut create = epb::CreateRequest {
            id: id.clone(),
            name: format!("k8s-{id}"),
            image: image.clone(),
            rootfs: String::new(),
            command,
            env,
            workdir: config.working_dir.clone(),
            resources: Some(resources_of(&config)?),
            labels: BTreeMap::from([("caas.io/pod".into(), p.id.clone())]),
            max_containers: 0,
            lower_dirs: Vec::new(),
            user: String::new(),
            hostname: p.hostname.clone(),
            resolv_conf: p.resolv_conf.clone(),
            mounts: mounts_of(
                &config,
                &self.cri.state.config.cri.volume_roots,
                &[
                    &self.cri.state.config.state_dir,
                    &self.cri.state.config.run_dir,
                ],
                &self.cri.state.config.cri.kubelet_root,
                &p.uid,
                self.cri.state.config.cri.idmap_volumes,
            )?,
            oom_score_adj: oom_score_adj(&config)?,
            readonly_rootfs: security_of(&config).is_some_and(|s| s.readonly_rootfs),
            supplemental_groups: supplemental_groups(&config)?,
            merge_image_groups: security_of(&config).is_none_or(|s| {
                s.supplemental_groups_policy == cri::SupplementalGroupsPolicy::Merge as i32
            }),
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            tty: config.tty,
            netns: p
                .network
                .as_ref()
                .map(|n| n.netns.clone())
                .unwrap_or_default(),
            // Kubelet's lists (the defaults of its proc mount type) add to the engine's own,
            // which always apply: a container is never masked less than the defaults.
            masked_paths: security_of(&config)
                .map(|s| s.masked_paths.clone())
                .unwrap_or_default(),
            readonly_paths: security_of(&config)
                .map(|s| s.readonly_paths.clone())
                .unwrap_or_default(),
            sysctls: p.sysctls.clone().into_iter().collect(),
            seccomp: localhost_profile_of(&config)?,
            pidns: pod_pidns(&p, &config)?,
            pid_target,
            cap_drop: config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .and_then(|s| s.capabilities.as_ref())
                .map(|c| c.drop_capabilities.clone())
                .unwrap_or_default(),
            cap_add: security_of(&config)
                .and_then(|s| s.capabilities.as_ref())
                .map(|c| c.add_capabilities.clone())
                .unwrap_or_default(),
            // kubelet sets no_new_privs for allowPrivilegeEscalation: false only; otherwise a
            // setuid file may raise the process, as in containerd, to the container's root at
            // most (the tenant's user namespace).
            allow_privilege_escalation: !security_of(&config).is_some_and(|s| s.no_new_privs),
            // Only where the operator allows it; otherwise the default profile applies.
            unconfined: self.cri.state.config.cri.allow_unconfined_seccomp
                && asks_unconfined(&config),
        };
        create.mounts.extend(devices_of(
            &config,
            &self.cri.state.config.cri.allowed_devices,
        )?);
        let tenant = self.cri.state.sandboxes.tenant(&p.tenant).await.ok();
        // Within the tenant's quotas: above them the limit could not hold (a cgroup v1 kernel
        // refuses a CPU quota above its parent's, deep in the runtime).
        if let (Some(t), Some(res)) = (&tenant, &create.resources) {
            within_quotas(res, t, "config.linux.resources")?;
        }
        // A VM tenant's guest gets a copy of each volume (`sandbox::vm_import`); host devices
        // cannot be copied in.
        if create.mounts.iter().any(|m| !m.device_access.is_empty())
            && tenant.as_ref().is_none_or(|t| t.isolation == Isolation::Vm)
        {
            return Err(unsupported(
                "config.devices in a VM tenant (the guest has its own devices, not the host's)",
            ));
        }
        // Image volumes: the layers of the image, as the tenant's store holds them (pulled
        // first, as kubelet does for a container's own image).
        let mut image_mounts = BTreeMap::new();
        let mut image_mount_ids = Vec::new();
        for (i, m) in config.mounts.iter().enumerate() {
            let Some(im) = m.image.as_ref().filter(|im| !im.image.is_empty()) else {
                continue;
            };
            let vol = self
                .cri
                .image_for(&p.tenant, &im.image, &ctx)
                .await
                .map_err(|e| {
                    Status::new(
                        e.code(),
                        format!("config.mounts[{i}].image: {}", e.message()),
                    )
                })?;
            // Resolved: the engine opens them with no symbolic link allowed on the way.
            create.mounts[i].image_layers = vol
                .lower_dirs
                .iter()
                .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
                .map(|d| d.display().to_string())
                .collect();
            image_mounts.insert(m.container_path.clone(), im.image.clone());
            image_mount_ids.push(vol.image.config_digest.to_string());
        }
        let image_id = rootfs.image.config_digest.to_string();
        let image_tag = if rootfs.image.normalized.contains('@') {
            String::new()
        } else {
            rootfs.image.normalized.clone()
        };
        let image_repo_digest = rootfs.image.normalized_repo_at();
        // What the image says stops it (nginx SIGQUIT, postgres SIGINT), as containerd sends.
        let stop_signal = match self.cri.state.images.stop_signal(&rootfs.image) {
            None => 0,
            Some(name) => crate::images::manifest::signal_number(&name).unwrap_or_else(|| {
                tracing::warn!(image = %image, stop_signal = %name, "the image's StopSignal is not a signal; SIGTERM stops the container");
                0
            }),
        };
        convert::apply_image(&mut create, rootfs)?;
        if let Some(u) = user {
            create.user = u;
        }
        let log_path = match (p.log_directory.is_empty(), config.log_path.is_empty()) {
            (false, false) => {
                let rel = std::path::Path::new(&config.log_path);
                if rel.is_absolute()
                    || rel
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(bad(
                        "config.log_path",
                        "must be a relative path inside the pod's log_directory, without `..`",
                    ));
                }
                std::path::Path::new(&p.log_directory)
                    .join(rel)
                    .display()
                    .to_string()
            }
            _ => String::new(),
        };
        let record = ContainerRecord {
            id: id.clone(),
            pod: p.id.clone(),
            tenant: p.tenant.clone(),
            name: meta.name,
            attempt: meta.attempt,
            image,
            image_id,
            labels: sorted(config.labels),
            annotations: sorted(config.annotations),
            log_path,
            created_at_ns: now_ns(),
            mounts: create
                .mounts
                .iter()
                .filter(|m| m.device_access.is_empty())
                .map(|m| (m.host_path.clone(), m.container_path.clone(), m.readonly))
                .collect(),
            recursive_read_only: create
                .mounts
                .iter()
                .filter(|m| m.recursive_read_only)
                .map(|m| m.container_path.clone())
                .collect(),
            host_to_container: create
                .mounts
                .iter()
                .filter(|m| m.host_to_container)
                .map(|m| m.container_path.clone())
                .collect(),
            image_mounts,
            image_mount_ids,
            stop_signal,
            image_tag,
            image_repo_digest,
        };
        // The record first: a container the engine made is never one the CRI does not know.
        self.cri
            .store
            .add_container(record)
            .await
            .map_err(|e| io_err(&e, &ctx))?;
        let state = self.cri.state.clone();
        let watch = if tenant
            .as_ref()
            .is_some_and(|t| t.isolation == Isolation::Vm)
        {
            super::vm_volumes::watchable(&create.mounts)
        } else {
            Vec::new()
        };
        let tenant = p.tenant.clone();
        let made =
            tokio::spawn(
                async move { state.sandboxes.create_container(&tenant, create, &[]).await },
            )
            .await
            .map_err(|e| Status::internal(format!("creating the container: {e}")))?;
        if let Err(e) = made {
            // The engine may have made it before the error (a cut connection): delete it there
            // too, so no engine container is unknown to the CRI.
            if let Some(rec) = self.cri.store.container(&id).await
                && let Err(d) = self.cri.remove_container(&rec, &ctx).await
            {
                tracing::warn!(container = %id, error = %d, "a failed create left a record; RemoveContainer deletes it");
            }
            return Err(status::sandbox(e, &ctx));
        }
        self.cri.watch_volumes(&p.tenant, &id, watch);
        tracing::info!(pod = %p.id, container = %id, tenant = %p.tenant, "container created");
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let c = self
            .cri
            .container_or_not_found(&req.into_inner().container_id)
            .await?;
        let mut eng = self.cri.engine(&c.tenant, &ctx).await?;
        eng.start(epb::ContainerId {
            container: c.id.clone(),
        })
        .await
        .map_err(|s| engine_err(s, &ctx))?;
        self.cri.logs.start(self.cri.clone(), &c).await;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        // Stopping what is not there (any more) is done, as the CRI's idempotence asks.
        let Some(c) = self.cri.store.container(&r.container_id).await else {
            return Ok(Response::new(cri::StopContainerResponse {}));
        };
        let Some(now) = self.cri.inspect(&c, &ctx).await? else {
            return Ok(Response::new(cri::StopContainerResponse {}));
        };
        if now.state != pb::ContainerState::Running as i32 {
            return Ok(Response::new(cri::StopContainerResponse {}));
        }
        let mut eng = self.cri.engine(&c.tenant, &ctx).await?;
        let grace = u32::try_from(r.timeout.max(0)).unwrap_or(u32::MAX);
        let stopped = if grace == 0 {
            eng.kill(epb::KillRequest {
                container: c.id.clone(),
                signal: libc::SIGKILL,
            })
            .await
            .map(|_| ())
        } else {
            eng.stop(epb::StopRequest {
                container: c.id.clone(),
                signal: if c.stop_signal > 0 {
                    c.stop_signal
                } else {
                    libc::SIGTERM
                },
                grace_seconds: grace,
            })
            .await
            .map(|_| ())
        };
        match stopped {
            Ok(()) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => {
                return Err(engine_err(s, &ctx));
            }
        }
        if grace == 0 {
            // A kill does not wait: the container is stopped when this returns.
            let _ = eng
                .wait(epb::ContainerId {
                    container: c.id.clone(),
                })
                .await;
        }
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let id = req.into_inner().container_id;
        if let Some(c) = self.cri.store.container(&id).await {
            self.cri.remove_container(&c, &ctx).await?;
        }
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let f = req.into_inner().filter.unwrap_or_default();
        let records: Vec<ContainerRecord> = self
            .cri
            .store
            .containers()
            .await
            .into_iter()
            .filter(|c| f.id.is_empty() || c.id.starts_with(&f.id))
            .filter(|c| f.pod_sandbox_id.is_empty() || c.pod.starts_with(&f.pod_sandbox_id))
            .filter(|c| labels_match(&c.labels, &f.label_selector))
            .collect();
        let mut engines: HashMap<String, Option<HashMap<String, pb::Container>>> = HashMap::new();
        for c in &records {
            if !engines.contains_key(&c.tenant) {
                let list = self
                    .cri
                    .state
                    .sandboxes
                    .list_containers(Some(&c.tenant))
                    .await
                    .ok()
                    .map(|l| l.into_iter().map(|x| (x.id.clone(), x)).collect());
                engines.insert(c.tenant.clone(), list);
            }
        }
        let mut containers: Vec<cri::Container> = records
            .iter()
            .map(|r| {
                let now = engines
                    .get(&r.tenant)
                    .and_then(|l| l.as_ref())
                    .and_then(|l| l.get(&r.id));
                cri_container(r, now)
            })
            .filter(|c| f.state.as_ref().is_none_or(|s| s.state == c.state))
            .collect();
        containers.sort_by_key(|c| c.created_at);
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let c = self.cri.container_or_not_found(&r.container_id).await?;
        let now = self.cri.inspect(&c, &ctx).await?;
        if now
            .as_ref()
            .is_some_and(|n| n.state == pb::ContainerState::Exited as i32)
        {
            // An exited container's last lines may still be on their way to its CRI log: the
            // status says exited once they are in it (as containerd waits for a task's IO), so
            // a reader that sees EXITED finds the whole log.
            self.cri
                .logs
                .wait_ended(&c.id, std::time::Duration::from_secs(2))
                .await;
            self.cri.copy_back_termination_message(&c).await;
        }
        let mut info = HashMap::new();
        if r.verbose {
            info.insert(
                "info".into(),
                serde_json::json!({ "tenant": c.tenant, "pod": c.pod, "pid": now.as_ref().map(|n| n.pid) })
                    .to_string(),
            );
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(cri_container_status(&c, now.as_ref())),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let c = self.cri.container_or_not_found(&r.container_id).await?;
        let Some(linux) = r.linux else {
            return Ok(Response::new(cri::UpdateContainerResourcesResponse {}));
        };
        if !linux.cpuset_cpus.is_empty() {
            return Err(unsupported("linux.cpuset_cpus"));
        }
        if !linux.cpuset_mems.is_empty() {
            return Err(unsupported("linux.cpuset_mems"));
        }
        let res = limits_of(&linux, "linux")?;
        if res.cpus.is_none() && res.memory_bytes.is_none() && res.cpu_shares.is_none() {
            return Ok(Response::new(cri::UpdateContainerResourcesResponse {}));
        }
        // Within the tenant's quotas, checked here for every cgroup version (v2 and VM guests
        // would take a child limit above the parent's and not enforce it).
        let t = self
            .cri
            .state
            .sandboxes
            .tenant(&c.tenant)
            .await
            .map_err(|e| status::sandbox(e, &ctx))?;
        within_quotas(&res, &t, "linux")?;
        let mut eng = self.cri.engine(&c.tenant, &ctx).await?;
        eng.update(epb::UpdateRequest {
            container: c.id.clone(),
            resources: Some(res),
        })
        .await
        .map_err(|s| engine_err(s, &ctx))?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let c = self
            .cri
            .container_or_not_found(&req.into_inner().container_id)
            .await?;
        let reopened =
            self.cri.logs.reopen(&c.id).await.map_err(|e| {
                Status::internal(format!("reopening the log file {}: {e}", c.log_path))
            })?;
        if !reopened {
            return Err(Status::failed_precondition(format!(
                "container {} is not running: its log is not being written",
                c.id
            )));
        }
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let c = self.cri.container_or_not_found(&r.container_id).await?;
        if r.cmd.first().is_none_or(String::is_empty) {
            return Err(bad("cmd", "must not be empty"));
        }
        let mut eng = self.cri.engine(&c.tenant, &ctx).await?;
        let run = async {
            let mut s = eng
                .exec(epb::ExecRequest {
                    container: c.id.clone(),
                    command: r.cmd.clone(),
                    env: Vec::new(),
                    workdir: String::new(),
                })
                .await?
                .into_inner();
            let mut out = cri::ExecSyncResponse::default();
            while let Some(m) = s.next().await {
                match m?.output {
                    Some(pb::exec_output::Output::Stdout(d)) => append_capped(&mut out.stdout, &d),
                    Some(pb::exec_output::Output::Stderr(d)) => append_capped(&mut out.stderr, &d),
                    Some(pb::exec_output::Output::ExitCode(code)) => out.exit_code = code,
                    None => {}
                }
            }
            Ok::<_, Status>(out)
        };
        let out = if r.timeout > 0 {
            tokio::time::timeout(Duration::from_secs(r.timeout.unsigned_abs()), run)
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "the command did not finish within {} s",
                        r.timeout
                    ))
                })?
        } else {
            run.await
        };
        out.map(Response::new).map_err(|s| engine_err(s, &ctx))
    }

    async fn exec(
        &self,
        req: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        if r.cmd.first().is_none_or(String::is_empty) {
            return Err(bad("cmd", "must not be empty"));
        }
        let wiring = Wiring {
            tty: r.tty,
            stdin: r.stdin,
            stdout: r.stdout,
            stderr: r.stderr,
        };
        let url = self
            .cri
            .stream_url(&r.container_id, r.cmd, false, wiring, &ctx)
            .await?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let wiring = Wiring {
            tty: r.tty,
            stdin: r.stdin,
            stdout: r.stdout,
            stderr: r.stderr,
        };
        let url = self
            .cri
            .stream_url(&r.container_id, Vec::new(), true, wiring, &ctx)
            .await?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let p = self.cri.pod_or_not_found(&r.pod_sandbox_id).await?;
        let mut ports = Vec::new();
        for (i, port) in r.port.iter().enumerate() {
            match u16::try_from(*port) {
                Ok(v) if v != 0 => ports.push(v),
                _ => return Err(bad(&format!("port[{i}]"), format!("{port} is not a port"))),
            }
        }
        let t = self
            .cri
            .state
            .sandboxes
            .tenant(&p.tenant)
            .await
            .map_err(|e| status::sandbox(e, &ctx))?;
        let target = if t.isolation == Isolation::Vm
            && let Some(n) = &p.network
        {
            // A VM pod with a netns of its own: its address, which the host routes to the
            // tenant's tap, while the boot that made it runs.
            let ip =
                n.ip.parse()
                    .ok()
                    .filter(|_| self.cri.vm_boot(&p.tenant) == n.vm_boot);
            match ip {
                _ if !self.cri.state.config.network.enabled => {
                    return Err(Status::failed_precondition(format!(
                        "pod {} is in VM tenant {:?}, and tenant networks are off: port-forward to a VM tenant's pod goes to its address through the tenant's link (enable [network])",
                        p.id, p.tenant
                    )));
                }
                Some(ip) => stream::PortTarget::Address(ip),
                None => {
                    return Err(Status::failed_precondition(format!(
                        "pod {} has no network namespace (stopped, not set up, or its VM booted again since); run a new pod sandbox",
                        p.id
                    )));
                }
            }
        } else if t.isolation == Isolation::Vm {
            // The guest's loopback is out of the host's reach; its address is not.
            match (t.subnet, &self.cri.state.config.network.enabled) {
                (Some(subnet), true) => {
                    stream::PortTarget::Address(crate::net::addresses(subnet).1)
                }
                _ => {
                    return Err(Status::failed_precondition(format!(
                        "pod {:?} is in VM tenant {:?}, which has no network: port-forward to a VM tenant goes to its address (enable [network])",
                        p.id, p.tenant
                    )));
                }
            }
        } else if let Some(n) = &p.network {
            // A pod with a netns of its own is reached there or not at all.
            let path =
                crate::engine::ns::pod_netns_path(&self.cri.tenant_ns_dir(&p.tenant), &n.netns);
            if n.ip.is_empty() || !crate::engine::ns::is_ns(&path) {
                return Err(Status::failed_precondition(format!(
                    "pod {} has no network namespace (stopped, or not set up); run a new pod sandbox",
                    p.id
                )));
            }
            stream::PortTarget::Netns(path)
        } else {
            stream::PortTarget::Netns(self.cri.tenant_ns_dir(&p.tenant).join("net"))
        };
        let url = self
            .cri
            .stream
            .url(stream::Session::PortForward(stream::PortForwardSession {
                pod: p.id.clone(),
                target,
                ports,
            }));
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let c = self
            .cri
            .container_or_not_found(&req.into_inner().container_id)
            .await?;
        let mut readings = stats::Readings::now(&self.cri);
        readings.complete(&self.cri, std::slice::from_ref(&c)).await;
        readings
            .with_layers(&self.cri, std::slice::from_ref(&c))
            .await;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats::container(&c, &readings)),
        }))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let f = req.into_inner().filter.unwrap_or_default();
        let mut readings = stats::Readings::now(&self.cri);
        let mut records: Vec<ContainerRecord> = self
            .cri
            .store
            .containers()
            .await
            .into_iter()
            .filter(|c| f.id.is_empty() || c.id.starts_with(&f.id))
            .filter(|c| f.pod_sandbox_id.is_empty() || c.pod.starts_with(&f.pod_sandbox_id))
            .filter(|c| labels_match(&c.labels, &f.label_selector))
            .collect();
        records.sort_by_key(|c| c.created_at_ns);
        readings.complete(&self.cri, &records).await;
        readings.with_layers(&self.cri, &records).await;
        Ok(Response::new(cri::ListContainerStatsResponse {
            stats: records
                .iter()
                .map(|c| stats::container(c, &readings))
                .collect(),
        }))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let p = self
            .cri
            .pod_or_not_found(&req.into_inner().pod_sandbox_id)
            .await?;
        let mut readings = stats::Readings::now(&self.cri);
        let containers = self.cri.store.containers_of(&p.id).await;
        readings.with_layers(&self.cri, &containers).await;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats::pod(&p, &containers, &readings)),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let f = req.into_inner().filter.unwrap_or_default();
        let mut readings = stats::Readings::now(&self.cri);
        let mut pods: Vec<PodRecord> = self
            .cri
            .store
            .pods()
            .await
            .into_iter()
            .filter(|p| f.id.is_empty() || p.id.starts_with(&f.id))
            .filter(|p| labels_match(&p.labels, &f.label_selector))
            .collect();
        pods.sort_by_key(|p| p.created_at_ns);
        let mut out = Vec::new();
        for p in &pods {
            let containers = self.cri.store.containers_of(&p.id).await;
            readings.with_layers(&self.cri, &containers).await;
            out.push(stats::pod(p, &containers, &readings));
        }
        Ok(Response::new(cri::ListPodSandboxStatsResponse {
            stats: out,
        }))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        // kubelet sends the pod CIDR; tenant networks come from the agent's own pool.
        if let Some(cidr) = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .filter(|c| !c.is_empty())
        {
            tracing::info!(pod_cidr = %cidr, "kubelet's pod CIDR noted; tenant networks use [network] subnet_pool");
        }
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let verbose = req.into_inner().verbose;
        // With [cri.cni] on, pods need its network list: not ready until there is one kubelet's
        // pods could use (as containerd says "cni plugin not initialized"), so the node stays
        // NotReady rather than take pods whose sandboxes would fail.
        let cni = &self.cri.state.config.cri.cni;
        let (network, reason, message) = if cni.enabled {
            match cni.network() {
                Ok(_) => (true, "", String::new()),
                Err(e) => (false, "NetworkPluginNotReady", format!("[cri.cni]: {e}")),
            }
        } else if self.cri.state.config.network.enabled {
            (true, "", String::new())
        } else {
            (
                false,
                "NetworkDisabled",
                "tenant networks are off ([network] enabled = false) and so is [cri.cni]"
                    .to_string(),
            )
        };
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: network,
                reason: reason.into(),
                message,
            },
        ];
        // A VM tenant's volumes are copies in its guest, with no mounts below them: recursive
        // read-only is advertised for user-namespace pods only, where it was tested.
        let handler = |name: &str| cri::RuntimeHandler {
            name: name.into(),
            features: Some(cri::RuntimeHandlerFeatures {
                recursive_read_only_mounts: name != HANDLER_VM,
                user_namespaces: false,
            }),
        };
        let mut info = HashMap::new();
        if verbose {
            let (accel, warning) = self.cri.state.sandboxes.vm_accelerator();
            info.insert(
                "config".into(),
                serde_json::json!({ "vm_accelerator": accel, "vm_warning": warning, "require_known_tenants": self.cri.state.config.cri.require_known_tenants })
                    .to_string(),
            );
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: vec![handler(""), handler(HANDLER_USERNS), handler(HANDLER_VM)],
            // Strict (only the groups asked for, not the image's /etc/group memberships) is
            // honoured, and ContainerStatus reports the resulting user.
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
        }))
    }

    async fn checkpoint_container(
        &self,
        _req: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(status::unimplemented("CheckpointContainer"))
    }

    type GetContainerEventsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>,
    >;

    async fn get_container_events(
        &self,
        _req: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        // Subscribed before the answer: no event after it is missed.
        let followers = super::events::subscribe(&self.cri).await;
        tokio::spawn(super::events::run(self.cri.clone(), followers, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse {
            descriptors: stats::metric_descriptors(),
        }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        let mut readings = stats::Readings::now(&self.cri);
        let mut pods = self.cri.store.pods().await;
        pods.sort_by_key(|p| p.created_at_ns);
        let mut out = Vec::with_capacity(pods.len());
        for p in &pods {
            let containers = self.cri.store.containers_of(&p.id).await;
            readings.complete(&self.cri, &containers).await;
            out.push(stats::pod_metrics(p, &containers, &readings));
        }
        Ok(Response::new(cri::ListPodSandboxMetricsResponse {
            pod_metrics: out,
        }))
    }

    async fn runtime_config(
        &self,
        _req: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }
}

/// A container's limits from its CRI resources (unset: the tenant's).
fn resources_of(c: &cri::ContainerConfig) -> Result<pb::Resources, Status> {
    match c.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        Some(r) => limits_of(r, "config.linux.resources"),
        None => Ok(pb::Resources::default()),
    }
}

/// A container's CPU and memory limits against its tenant's quotas: above them is
/// FAILED_PRECONDITION, naming the quota and how to raise it; `field` prefixes the names.
fn within_quotas(
    res: &pb::Resources,
    t: &crate::tenants::Tenant,
    field: &str,
) -> Result<(), Status> {
    if res.cpus.is_some_and(|x| x > t.quotas.cpus) {
        return Err(Status::failed_precondition(format!(
            "{field}.cpu_quota: the limit is above what the tenant's quota allows ({} CPUs, tenant {:?}); raise the quota (caasctl tenant update, or [cri.default_quotas] for new tenants)",
            t.quotas.cpus, t.id
        )));
    }
    if res.memory_bytes.is_some_and(|m| m > t.quotas.memory_bytes) {
        return Err(Status::failed_precondition(format!(
            "{field}.memory_limit_in_bytes: the limit is above what the tenant's quota allows ({} bytes, tenant {:?}); raise the quota (caasctl tenant update, or [cri.default_quotas] for new tenants)",
            t.quotas.memory_bytes, t.id
        )));
    }
    Ok(())
}

/// kubelet's annotation of a container: where it writes its termination message.
const TERMINATION_MESSAGE_PATH: &str = "io.kubernetes.container.terminationMessagePath";
/// What kubelet reads of a termination message at most.
const MAX_TERMINATION_MESSAGE: u32 = 4096;

/// The `unified` (cgroup v2) keys kubelet sends on its own, and the values it sends: taken,
/// as on a cgroup v1 node where kubelet sends none. `memory.oom.group`: an OOM kill takes the
/// whole container (the engine's containers are one cgroup each; on v1 the kernel kills one
/// process). `memory.swap.max` 0: no swap, which the engine gives every container with a
/// memory limit (its swap limit is the memory limit).
const KUBELET_UNIFIED: &[(&str, &str)] = &[("memory.oom.group", "1"), ("memory.swap.max", "0")];

/// The CPU and memory limits and the CPU weight of CRI resources; `field` prefixes the names in errors. Huge
/// pages and `unified` keys are taken only as kubelet sends them for every container (a limit
/// of 0 per page size: none; [`KUBELET_UNIFIED`]); any other is UNIMPLEMENTED, never ignored.
fn limits_of(r: &cri::LinuxContainerResources, field: &str) -> Result<pb::Resources, Status> {
    if let Some(h) = r.hugepage_limits.iter().find(|h| h.limit != 0) {
        return Err(unsupported(&format!(
            "{field}.hugepage_limits[{:?}] = {} (huge pages for containers)",
            h.page_size, h.limit
        )));
    }
    if let Some((k, v)) = r
        .unified
        .iter()
        .find(|(k, v)| !KUBELET_UNIFIED.contains(&(k.as_str(), v.as_str())))
    {
        return Err(unsupported(&format!("{field}.unified[{k:?}] = {v:?}")));
    }
    let mut out = pb::Resources::default();
    if r.cpu_quota > 0 && r.cpu_period > 0 {
        #[allow(clippy::cast_precision_loss)]
        let cpus = r.cpu_quota as f64 / r.cpu_period as f64;
        out.cpus = Some(
            validate::check_cpus(
                &format!("{field}.cpu_quota"),
                cpus.max(crate::config::MIN_TENANT_CPUS),
                crate::config::MIN_TENANT_CPUS,
                crate::config::MAX_TENANT_CPUS,
            )
            .map_err(status::invalid)?,
        );
    }
    if r.cpu_shares < 0 {
        return Err(bad(
            &format!("{field}.cpu_shares"),
            format!("{} is negative", r.cpu_shares),
        ));
    }
    if r.cpu_shares > 0 {
        // Clamped to the kernel's range, as kubelet and runc do (a pod's requests of less than
        // 2 millicores give 2).
        out.cpu_shares = Some(
            r.cpu_shares
                .unsigned_abs()
                .clamp(crate::config::MIN_CPU_SHARES, crate::config::MAX_CPU_SHARES),
        );
    }
    if r.memory_limit_in_bytes > 0 {
        let m = r.memory_limit_in_bytes.unsigned_abs();
        validate::check_range(
            &format!("{field}.memory_limit_in_bytes"),
            m,
            4 << 20,
            crate::config::MAX_TENANT_MEMORY,
        )
        .map_err(status::invalid)?;
        out.memory_bytes = Some(m);
    }
    Ok(out)
}

fn append_capped(buf: &mut Vec<u8>, d: &[u8]) {
    let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len());
    buf.extend_from_slice(&d[..d.len().min(room)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_may_be_as_long_as_the_kernel_takes() {
        let fqdn = format!("{}.example.com", "a".repeat(52));
        assert_eq!(fqdn.len(), 64);
        assert!(check_hostname(&fqdn).is_ok());
        assert!(check_hostname(&format!("a{fqdn}")).is_err());
        assert!(check_hostname("-x").is_err());
    }

    #[test]
    fn nameservers_may_be_ipv6_with_a_zone_as_a_hosts_resolv_conf_has_them() {
        for ok in ["10.0.0.10", "2001:db8::53", "fe80::1%eth0", "fe80::1%3"] {
            assert!(is_nameserver(ok), "{ok}");
        }
        for bad in [
            "",
            "ns1",
            "10.0.0.10%eth0",
            "fe80::1%",
            "fe80::1%eth 0",
            "fe80::1%a%b",
        ] {
            assert!(!is_nameserver(bad), "{bad}");
        }
        let conf = resolv_conf(Some(&cri::DnsConfig {
            servers: vec!["fe80::1%eth0".into()],
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(conf, "nameserver fe80::1%eth0\n");
    }
}
