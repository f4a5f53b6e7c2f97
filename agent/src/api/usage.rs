//! `caas.v1.UsageService`. Authorized and checked; the meter and ledger are not built in this
//! version, so valid calls get `UNIMPLEMENTED`.

use std::{pin::Pin, sync::Arc};

use caas_proto::v1::{self as pb, usage_service_server::UsageService};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::{AgentState, auth::Ctx, convert, status};
use crate::authz::{self, Action, Scope};

#[derive(Debug, Clone)]
pub struct UsageApi {
    #[allow(dead_code)]
    state: Arc<AgentState>,
}

impl UsageApi {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }
}

fn scope_of(tenant: &str) -> Scope<'_> {
    if tenant.is_empty() {
        Scope::Node
    } else {
        Scope::Tenant(tenant)
    }
}

#[tonic::async_trait]
impl UsageService for UsageApi {
    async fn get_usage(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::UsageRead, Scope::Tenant(&r.tenant))
            .map_err(status::denied)?;
        convert::id("tenant", r.tenant)?;
        if !r.container.is_empty() {
            convert::id("container", r.container)?;
        }
        Err(status::unimplemented("usage metering"))
    }

    async fn read_records(
        &self,
        req: Request<pb::ReadRecordsRequest>,
    ) -> Result<Response<pb::ReadRecordsResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::UsageRead, scope_of(&r.tenant))
            .map_err(status::denied)?;
        convert::tenant_filter_id(r.tenant)?;
        Err(status::unimplemented("the usage ledger"))
    }

    type StreamRecordsStream =
        Pin<Box<dyn Stream<Item = Result<pb::BillingRecord, Status>> + Send>>;

    async fn stream_records(
        &self,
        req: Request<pb::StreamRecordsRequest>,
    ) -> Result<Response<Self::StreamRecordsStream>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::UsageRead, scope_of(&r.tenant))
            .map_err(status::denied)?;
        convert::tenant_filter_id(r.tenant)?;
        Err(status::unimplemented("the usage ledger"))
    }

    async fn ack_records(
        &self,
        req: Request<pb::AckRecordsRequest>,
    ) -> Result<Response<pb::AckRecordsResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        authz::authorize(&ctx.caller, Action::UsageAck, Scope::Node).map_err(status::denied)?;
        Err(status::unimplemented("the usage ledger"))
    }
}
