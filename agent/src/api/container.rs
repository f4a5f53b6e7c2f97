//! `caas.v1.ContainerService`. Callers are authenticated and authorized and their input is
//! checked; the container domain (tenant engines) is not built in this version, so valid calls
//! get `UNIMPLEMENTED`.

use std::{pin::Pin, sync::Arc};

use caas_proto::v1::{self as pb, container_service_server::ContainerService};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::{AgentState, auth::Ctx, convert, status};
use crate::{
    authz::{self, Action, Scope},
    validate,
};

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct ContainerApi {
    #[allow(dead_code)]
    state: Arc<AgentState>,
}

impl ContainerApi {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }
}

/// Authorizes `action` on the tenant of `r`, checks the reference, and reports the missing domain.
fn on_ref<T>(
    req: Request<T>,
    action: Action,
    f: impl FnOnce(&T) -> Option<&pb::ContainerRef>,
) -> Status
where
    T: Clone,
{
    let ctx = match Ctx::of(&req) {
        Ok(c) => c,
        Err(s) => return s,
    };
    let inner = req.into_inner();
    let r = f(&inner).cloned();
    let tenant = r.as_ref().map(|r| r.tenant.as_str()).unwrap_or("");
    if let Err(d) = authz::authorize(&ctx.caller, action, Scope::Tenant(tenant)) {
        return status::denied(d);
    }
    match convert::container_ref(r) {
        Ok(_) => status::unimplemented("the container service"),
        Err(s) => s,
    }
}

#[tonic::async_trait]
impl ContainerService for ContainerApi {
    async fn create_container(
        &self,
        req: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(
            &ctx.caller,
            Action::ContainerWrite,
            Scope::Tenant(&r.tenant),
        )
        .map_err(status::denied)?;
        convert::id("tenant", r.tenant)?;
        convert::id("name", r.name)?;
        validate::check_labels("labels", &r.labels).map_err(status::invalid)?;
        Err(status::unimplemented("the container service"))
    }

    async fn start_container(
        &self,
        req: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        Err(on_ref(req, Action::ContainerWrite, |r| r.r#ref.as_ref()))
    }

    async fn stop_container(
        &self,
        req: Request<pb::StopContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        Err(on_ref(req, Action::ContainerWrite, |r| r.r#ref.as_ref()))
    }

    async fn kill_container(
        &self,
        req: Request<pb::KillContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        Err(on_ref(req, Action::ContainerWrite, |r| r.r#ref.as_ref()))
    }

    async fn delete_container(
        &self,
        req: Request<pb::DeleteContainerRequest>,
    ) -> Result<Response<pb::DeleteContainerResponse>, Status> {
        Err(on_ref(req, Action::ContainerWrite, |r| r.r#ref.as_ref()))
    }

    async fn wait_container(
        &self,
        req: Request<pb::WaitContainerRequest>,
    ) -> Result<Response<pb::WaitContainerResponse>, Status> {
        Err(on_ref(req, Action::ContainerRead, |r| r.r#ref.as_ref()))
    }

    async fn list_containers(
        &self,
        req: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let scope = if r.tenant.is_empty() {
            Scope::Node
        } else {
            Scope::Tenant(&r.tenant)
        };
        authz::authorize(&ctx.caller, Action::ContainerRead, scope).map_err(status::denied)?;
        convert::tenant_filter_id(r.tenant)?;
        validate::check_labels("label_selector", &r.label_selector).map_err(status::invalid)?;
        Err(status::unimplemented("the container service"))
    }

    async fn inspect_container(
        &self,
        req: Request<pb::InspectContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        Err(on_ref(req, Action::ContainerRead, |r| r.r#ref.as_ref()))
    }

    type ExecStream = Streamed<pb::ExecOutput>;
    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        Err(on_ref(req, Action::ContainerWrite, |r| r.r#ref.as_ref()))
    }

    type LogsStream = Streamed<pb::LogChunk>;
    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        Err(on_ref(req, Action::ContainerRead, |r| r.r#ref.as_ref()))
    }

    type EventsStream = Streamed<pb::ContainerEvent>;
    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let scope = if r.tenant.is_empty() {
            Scope::Node
        } else {
            Scope::Tenant(&r.tenant)
        };
        authz::authorize(&ctx.caller, Action::ContainerRead, scope).map_err(status::denied)?;
        convert::tenant_filter_id(r.tenant)?;
        Err(status::unimplemented("the container event stream"))
    }
}
