//! `caas.v1.ContainerService`: authorize, check, and hand the call to the tenant's engine.

use std::{pin::Pin, sync::Arc};

use caas_proto::{engine::v1 as epb, v1 as pb, v1::container_service_server::ContainerService};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{AgentState, auth::Ctx, convert, status};
use crate::{
    authz::{self, Action, Scope},
    validate,
};

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct ContainerApi {
    state: Arc<AgentState>,
}

impl ContainerApi {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }

    /// Authorizes `action` on the reference's tenant, checks it, and returns its engine.
    async fn engine_for(
        &self,
        ctx: &Ctx,
        r: Option<pb::ContainerRef>,
        action: Action,
    ) -> Result<
        (
            String,
            epb::engine_client::EngineClient<tonic::transport::Channel>,
        ),
        Status,
    > {
        let tenant = r.as_ref().map(|r| r.tenant.clone()).unwrap_or_default();
        authz::authorize(&ctx.caller, action, Scope::Tenant(&tenant)).map_err(status::denied)?;
        let (tenant, container) = convert::container_ref(r)?;
        let (_, eng) = self
            .state
            .sandboxes
            .engine_of(&tenant)
            .await
            .map_err(|e| status::sandbox(e, ctx))?;
        Ok((container, eng))
    }

    /// An engine's answer with the container's published ports, which the agent keeps.
    async fn ported(&self, r: Response<pb::Container>) -> Result<Response<pb::Container>, Status> {
        Ok(Response::new(
            self.state.sandboxes.with_ports(r.into_inner()).await,
        ))
    }

    /// Ends a stream when the agent shuts down.
    fn until_shutdown<T: Send + 'static>(&self, s: tonic::Streaming<T>) -> Streamed<T> {
        Box::pin(s.take_until(self.state.shutdown.clone().cancelled_owned()))
    }
}

fn engine_err(e: Status, ctx: &Ctx) -> Status {
    status::sandbox(crate::sandbox::SandboxError::Status(e), ctx)
}

#[tonic::async_trait]
impl ContainerService for ContainerApi {
    async fn create_container(
        &self,
        req: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let t0 = std::time::Instant::now();
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(
            &ctx.caller,
            Action::ContainerWrite,
            Scope::Tenant(&r.tenant),
        )
        .map_err(status::denied)?;
        let convert::ContainerCreate {
            tenant,
            publish,
            engine: mut create,
        } = convert::container_create(r)?;
        if create.rootfs.is_empty() {
            // Unknown tenant first, then unknown image.
            self.state
                .sandboxes
                .tenant(&tenant)
                .await
                .map_err(|e| status::sandbox(e, &ctx))?;
            let rootfs = self
                .state
                .images
                .rootfs(&tenant, &create.image)
                .map_err(|e| status::image(e, &ctx))?;
            convert::apply_image(&mut create, rootfs)?;
        }
        // Publish, create and the rollback of a failed create are one step: a client that goes
        // away (deadline, reset) must not leave ports held for a container that never was.
        let state = self.state.clone();
        let t = tenant.clone();
        let c =
            tokio::spawn(
                async move { state.sandboxes.create_container(&t, create, &publish).await },
            )
            .await
            .map_err(|e| Status::internal(format!("creating the container: {e}")))?
            .map_err(|e| status::sandbox(e, &ctx))?;
        tracing::info!(%tenant, container = %c.id, name = %c.name, caller = %ctx.caller.identity, took_us = t0.elapsed().as_micros(), "container created");
        Ok(Response::new(c))
    }

    async fn start_container(
        &self,
        req: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let ctx = Ctx::of(&req)?;
        let (c, mut eng) = self
            .engine_for(&ctx, req.into_inner().r#ref, Action::ContainerWrite)
            .await?;
        let r = eng
            .start(epb::ContainerId { container: c })
            .await
            .map_err(|e| engine_err(e, &ctx))?;
        self.ported(r).await
    }

    async fn stop_container(
        &self,
        req: Request<pb::StopContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let sig = convert::signal("signal", &r.signal)?;
        let (c, mut eng) = self
            .engine_for(&ctx, r.r#ref, Action::ContainerWrite)
            .await?;
        let r = eng
            .stop(epb::StopRequest {
                container: c,
                signal: sig,
                grace_seconds: r.grace_seconds,
            })
            .await
            .map_err(|e| engine_err(e, &ctx))?;
        self.ported(r).await
    }

    async fn kill_container(
        &self,
        req: Request<pb::KillContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let sig = convert::signal("signal", &r.signal)?;
        let (c, mut eng) = self
            .engine_for(&ctx, r.r#ref, Action::ContainerWrite)
            .await?;
        let r = eng
            .kill(epb::KillRequest {
                container: c,
                signal: sig,
            })
            .await
            .map_err(|e| engine_err(e, &ctx))?;
        self.ported(r).await
    }

    async fn delete_container(
        &self,
        req: Request<pb::DeleteContainerRequest>,
    ) -> Result<Response<pb::DeleteContainerResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let tenant = r
            .r#ref
            .as_ref()
            .map(|x| x.tenant.clone())
            .unwrap_or_default();
        let (c, mut eng) = self
            .engine_for(&ctx, r.r#ref, Action::ContainerWrite)
            .await?;
        // By id from here: a name may be taken again by a create running beside this delete.
        let id = eng
            .inspect(epb::ContainerId { container: c })
            .await
            .map_err(|e| engine_err(e, &ctx))?
            .into_inner()
            .id;
        // The engine's delete and the agent's release are one step: a client that goes away
        // (deadline, reset) must not leave the container's ports held by nobody.
        let state = self.state.clone();
        let force = r.force;
        tokio::spawn(async move {
            state.sandboxes.container_deleting(&tenant, &id).await;
            eng.delete(epb::DeleteRequest {
                container: id.clone(),
                force,
            })
            .await?;
            state.sandboxes.container_deleted(&tenant, &id).await;
            Ok::<_, Status>(())
        })
        .await
        .map_err(|e| Status::internal(format!("deleting the container: {e}")))?
        .map_err(|e| engine_err(e, &ctx))?;
        Ok(Response::new(pb::DeleteContainerResponse {}))
    }

    async fn wait_container(
        &self,
        req: Request<pb::WaitContainerRequest>,
    ) -> Result<Response<pb::WaitContainerResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let (c, mut eng) = self
            .engine_for(&ctx, req.into_inner().r#ref, Action::ContainerRead)
            .await?;
        eng.wait(epb::ContainerId { container: c })
            .await
            .map_err(|e| engine_err(e, &ctx))
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
        let tenant = convert::tenant_filter_id(r.tenant)?;
        validate::check_labels("label_selector", &r.label_selector).map_err(status::invalid)?;
        let tenant = tenant.or_else(|| authz::visible_tenant(&ctx.caller).map(str::to_string));
        let all = self
            .state
            .sandboxes
            .list_containers(tenant.as_deref())
            .await
            .map_err(|e| status::sandbox(e, &ctx))?;
        Ok(Response::new(pb::ListContainersResponse {
            containers: all
                .into_iter()
                .filter(|c| convert::container_matches(c, r.state, &r.label_selector))
                .collect(),
        }))
    }

    async fn inspect_container(
        &self,
        req: Request<pb::InspectContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let ctx = Ctx::of(&req)?;
        let (c, mut eng) = self
            .engine_for(&ctx, req.into_inner().r#ref, Action::ContainerRead)
            .await?;
        let r = eng
            .inspect(epb::ContainerId { container: c })
            .await
            .map_err(|e| engine_err(e, &ctx))?;
        let r = self
            .state
            .sandboxes
            .with_vm_usage(r.into_inner(), &mut eng)
            .await;
        self.ported(Response::new(r)).await
    }

    type ExecStream = Streamed<pb::ExecOutput>;
    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let (c, mut eng) = self
            .engine_for(&ctx, r.r#ref, Action::ContainerWrite)
            .await?;
        let s = eng
            .exec(epb::ExecRequest {
                container: c,
                command: r.command,
                env: r.env,
                workdir: r.workdir,
            })
            .await
            .map_err(|e| engine_err(e, &ctx))?
            .into_inner();
        Ok(Response::new(self.until_shutdown(s)))
    }

    type LogsStream = Streamed<pb::LogChunk>;
    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let (c, mut eng) = self
            .engine_for(&ctx, r.r#ref, Action::ContainerRead)
            .await?;
        let s = eng
            .logs(epb::LogsRequest {
                container: c,
                tail: r.tail,
                follow: r.follow,
                stream: r.stream,
                stdout_offset: None,
                stderr_offset: None,
            })
            .await
            .map_err(|e| engine_err(e, &ctx))?
            .into_inner();
        Ok(Response::new(self.until_shutdown(s)))
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
        let tenant = convert::tenant_filter_id(r.tenant)?
            .or_else(|| authz::visible_tenant(&ctx.caller).map(str::to_string));
        let tenants: Vec<String> = match tenant {
            Some(t) => vec![t],
            None => {
                if r.after_seq != 0 {
                    return Err(status::invalid(validate::Invalid::new(
                        "after_seq",
                        "sequence numbers are per tenant; resume with a tenant set",
                    )));
                }
                self.state
                    .sandboxes
                    .registry
                    .list(&crate::tenants::TenantFilter {
                        state: Some(crate::tenants::TenantState::Ready),
                        ..Default::default()
                    })
                    .await
                    .into_iter()
                    .map(|t| t.id)
                    .collect()
            }
        };
        let mut streams = Vec::new();
        for t in tenants {
            let (_, mut eng) = self
                .state
                .sandboxes
                .engine_of(&t)
                .await
                .map_err(|e| status::sandbox(e, &ctx))?;
            let s = eng
                .events(epb::EventsRequest {
                    after_seq: r.after_seq,
                })
                .await
                .map_err(|e| engine_err(e, &ctx))?
                .into_inner();
            streams.push(s);
        }
        let merged = futures::stream::select_all(streams)
            .take_until(self.state.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(merged)))
    }
}
