//! `caas.v1.TenantService`.

use std::sync::Arc;

use caas_proto::v1::{self as pb, tenant_service_server::TenantService};
use tonic::{Request, Response, Status};

use super::{AgentState, auth::Ctx, convert, status};
use crate::authz::{self, Action, Scope};

#[derive(Debug, Clone)]
pub struct TenantApi {
    state: Arc<AgentState>,
}

impl TenantApi {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::TenantWrite, Scope::Tenant(&r.id))
            .map_err(status::denied)?;
        let spec = convert::tenant_spec(r)?;
        // Its own task: a caller that goes away (deadline, reset) while a VM boots must not
        // leave a half-made tenant; the creation finishes or rolls back either way.
        let state = self.state.clone();
        let t = tokio::spawn(async move { state.sandboxes.create_tenant(spec).await })
            .await
            .map_err(|e| Status::internal(format!("creating the tenant: {e}")))?
            .map_err(|e| status::sandbox(e, &ctx))?;
        tracing::info!(tenant = %t.id, caller = %ctx.caller.identity, "tenant created");
        Ok(Response::new(convert::tenant_out(t)))
    }

    async fn get_tenant(
        &self,
        req: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::TenantRead, Scope::Tenant(&r.id))
            .map_err(status::denied)?;
        let id = convert::id("id", r.id)?;
        let t = self
            .state
            .sandboxes
            .registry
            .get(&id)
            .await
            .map_err(|e| status::tenant(e, &ctx))?;
        Ok(Response::new(convert::tenant_out(t)))
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        authz::authorize(&ctx.caller, Action::TenantRead, Scope::Node).map_err(status::denied)?;
        let filter = convert::tenant_filter(req.into_inner(), authz::visible_tenant(&ctx.caller))?;
        let tenants = self.state.sandboxes.registry.list(&filter).await;
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: tenants.into_iter().map(convert::tenant_out).collect(),
        }))
    }

    async fn update_tenant_quotas(
        &self,
        req: Request<pb::UpdateTenantQuotasRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::TenantWrite, Scope::Tenant(&r.id))
            .map_err(status::denied)?;
        let id = convert::id("id", r.id)?;
        let t = self
            .state
            .sandboxes
            .update_quotas(&id, convert::quotas_in(r.quotas))
            .await
            .map_err(|e| status::sandbox(e, &ctx))?;
        tracing::info!(tenant = %t.id, caller = %ctx.caller.identity, "tenant quotas updated");
        Ok(Response::new(convert::tenant_out(t)))
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::TenantWrite, Scope::Tenant(&r.id))
            .map_err(status::denied)?;
        let id = convert::id("id", r.id)?;
        // Its own task, so a caller going away cannot stop a teardown halfway.
        let state = self.state.clone();
        let (tid, force) = (id.clone(), r.force);
        tokio::spawn(async move { state.sandboxes.delete_tenant(&tid, force).await })
            .await
            .map_err(|e| Status::internal(format!("deleting the tenant: {e}")))?
            .map_err(|e| status::sandbox(e, &ctx))?;
        tracing::info!(tenant = %id, caller = %ctx.caller.identity, "tenant deleted");
        Ok(Response::new(pb::DeleteTenantResponse {}))
    }
}
