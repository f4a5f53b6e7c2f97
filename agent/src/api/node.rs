//! `caas.v1.NodeService`.

use std::sync::Arc;

use caas_proto::v1::{self as pb, node_service_server::NodeService};
use tonic::{Request, Response, Status};

use super::{AgentState, auth::Ctx, status};
use crate::authz::{self, Action, Scope};

#[derive(Debug, Clone)]
pub struct NodeApi {
    state: Arc<AgentState>,
}

impl NodeApi {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn get_node_info(
        &self,
        req: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let ctx = Ctx::of(&req)?;
        authz::authorize(&ctx.caller, Action::NodeRead, Scope::Node).map_err(status::denied)?;
        let n = &self.state.node;
        let (tenants, cpus, mem) = self.state.sandboxes.registry.allocated().await;
        let mut warnings = Vec::new();
        if n.cgroup_layout != crate::cgroups::CgroupLayout::V2 {
            warnings.push(format!(
                "cgroup layout is {}; v2 is the production target",
                n.cgroup_layout
            ));
        }
        let (accel, vm_warning) = self.state.sandboxes.vm_accelerator();
        warnings.extend(vm_warning.map(String::from));
        Ok(Response::new(pb::NodeInfo {
            node: n.node.clone(),
            version: crate::VERSION.into(),
            kernel: n.kernel.clone(),
            cgroup_layout: n.cgroup_layout.to_string(),
            vm_accelerator: accel.to_string(),
            capacity: Some(pb::Capacity {
                cpus: n.cpus,
                memory_bytes: n.memory_bytes,
                allocated_cpus: cpus,
                allocated_memory_bytes: mem,
            }),
            tenants: u32::try_from(tenants).unwrap_or(u32::MAX),
            uptime_seconds: self.state.started.elapsed().as_secs(),
            warnings,
        }))
    }

    async fn get_health(
        &self,
        req: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::Health>, Status> {
        let ctx = Ctx::of(&req)?;
        authz::authorize(&ctx.caller, Action::NodeRead, Scope::Node).map_err(status::denied)?;
        let state_dir = self.state.config.state_dir.clone();
        let writable = crate::blocking::run(
            "checking the state dir",
            std::time::Duration::from_secs(2),
            move || nix::unistd::access(&state_dir, nix::unistd::AccessFlags::W_OK),
        )
        .await;
        let state_check = match writable {
            Ok(Ok(())) => pb::HealthCheck {
                name: "state_dir".into(),
                ok: true,
                message: "writable".into(),
            },
            Ok(Err(e)) => pb::HealthCheck {
                name: "state_dir".into(),
                ok: false,
                message: format!("not writable: {e}"),
            },
            Err(e) => pb::HealthCheck {
                name: "state_dir".into(),
                ok: false,
                message: e.to_string(),
            },
        };
        let shutting_down = self.state.shutdown.is_cancelled();
        let checks = vec![
            state_check,
            pb::HealthCheck {
                name: "serving".into(),
                ok: !shutting_down,
                message: if shutting_down {
                    "shutting down"
                } else {
                    "accepting calls"
                }
                .into(),
            },
        ];
        Ok(Response::new(pb::Health {
            ok: checks.iter().all(|c| c.ok),
            checks,
        }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        Ok(Response::new(pb::WhoAmIResponse {
            role: ctx.caller.role.to_string(),
            identity: ctx.caller.identity,
        }))
    }
}
