//! `caas.v1.ImageService`: pull, list, inspect, remove and import, per tenant.

use std::{path::Path, pin::Pin, sync::Arc};

use caas_proto::v1::{self as pb, image_service_server::ImageService};
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{AgentState, auth::Ctx, convert, status};
use crate::{
    authz::{self, Action, Scope},
    images::{Credentials, ImageRecord, ImageStore},
    validate::Invalid,
};

/// Longest image reference accepted.
pub const MAX_REFERENCE_LEN: usize = 4096;
/// Longest registry credential field accepted.
const MAX_SECRET_LEN: usize = 16 << 10;

#[derive(Debug, Clone)]
pub struct ImageApi {
    state: Arc<AgentState>,
}

impl ImageApi {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }

    /// The tenant's id range start; NOT_FOUND for an unknown tenant.
    async fn id_start(&self, tenant: &str, ctx: &Ctx) -> Result<u32, Status> {
        self.state
            .sandboxes
            .tenant(tenant)
            .await
            .map(|t| t.id_range.start)
            .map_err(|e| status::sandbox(e, ctx))
    }
}

/// Checks a reference string.
pub fn reference(field: &str, r: &str) -> Result<(), Status> {
    if r.is_empty() || r.len() > MAX_REFERENCE_LEN || r.chars().any(char::is_control) {
        return Err(status::invalid(Invalid::new(
            field,
            format!("must be 1..={MAX_REFERENCE_LEN} bytes without control characters"),
        )));
    }
    Ok(())
}

fn check_tenant_and_ref<T>(
    req: &Request<T>,
    action: Action,
    tenant: &str,
    r: &str,
) -> Result<Ctx, Status> {
    let ctx = Ctx::of(req)?;
    authz::authorize(&ctx.caller, action, Scope::Tenant(tenant)).map_err(status::denied)?;
    convert::id("tenant", tenant.to_string())?;
    reference("reference", r)?;
    Ok(ctx)
}

fn to_pb(store: &ImageStore, tenant: &str, r: &ImageRecord) -> pb::Image {
    pb::Image {
        tenant: tenant.into(),
        reference: r.reference.clone(),
        digest: r.digest.to_string(),
        size_bytes: r.size_bytes,
        layers: r.layers.iter().map(|l| l.digest.to_string()).collect(),
        // A config that went missing from the cache shows as empty; using the image says why.
        config_json: store.config_json(r).unwrap_or_default(),
        created_at_unix_ms: r.created_at_unix_ms,
        repo_tags: vec![r.normalized.clone()],
    }
}

fn credentials(a: Option<pb::RegistryAuth>) -> Result<Credentials, Status> {
    let a = a.unwrap_or_default();
    for (f, v) in [
        ("auth.username", &a.username),
        ("auth.password", &a.password),
        ("auth.identity_token", &a.identity_token),
    ] {
        if v.len() > MAX_SECRET_LEN {
            return Err(status::invalid(Invalid::new(
                f,
                format!("is longer than {MAX_SECRET_LEN} bytes"),
            )));
        }
    }
    if a.username.is_empty() && !a.password.is_empty() {
        return Err(status::invalid(Invalid::new(
            "auth.username",
            "is required with a password",
        )));
    }
    Ok(Credentials {
        username: a.username,
        password: a.password,
        identity_token: a.identity_token,
    })
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    type PullImageStream = Pin<Box<dyn Stream<Item = Result<pb::PullProgress, Status>> + Send>>;

    async fn pull_image(
        &self,
        req: Request<pb::PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let (t, r) = (
            req.get_ref().tenant.clone(),
            req.get_ref().reference.clone(),
        );
        let ctx = check_tenant_and_ref(&req, Action::ImageWrite, &t, &r)?;
        let creds = credentials(req.into_inner().auth)?;
        let id_start = self.id_start(&t, &ctx).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let store = self.state.images.clone();
        // The pull runs to its end even if the caller goes away: nothing is left half-done.
        tokio::spawn(async move {
            let (ptx, mut prx) = tokio::sync::mpsc::channel(64);
            let forward = {
                let tx = tx.clone();
                async move {
                    while let Some(p) = prx.recv().await {
                        let p: crate::images::LayerProgress = p;
                        let _ = tx
                            .send(Ok(pb::PullProgress {
                                event: Some(pb::pull_progress::Event::Layer(pb::LayerProgress {
                                    digest: p.digest,
                                    total_bytes: p.total_bytes,
                                    done_bytes: p.done_bytes,
                                })),
                            }))
                            .await;
                    }
                }
            };
            let (result, ()) =
                tokio::join!(store.pull(&t, id_start, &r, &creds, Some(ptx)), forward);
            let last = match result {
                Ok(rec) => {
                    tracing::info!(tenant = %t, reference = %r, digest = %rec.digest, caller = %ctx.caller.identity, "image pulled");
                    Ok(pb::PullProgress {
                        event: Some(pb::pull_progress::Event::Image(to_pb(&store, &t, &rec))),
                    })
                }
                Err(e) => {
                    tracing::warn!(tenant = %t, reference = %r, error = %e, "image pull failed");
                    Err(status::image(e, &ctx))
                }
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let scope = if r.tenant.is_empty() {
            Scope::Node
        } else {
            Scope::Tenant(&r.tenant)
        };
        authz::authorize(&ctx.caller, Action::ImageRead, scope).map_err(status::denied)?;
        let tenant = convert::tenant_filter_id(r.tenant)?
            .or_else(|| authz::visible_tenant(&ctx.caller).map(str::to_string));
        if r.reference_contains.len() > MAX_REFERENCE_LEN {
            return Err(status::invalid(Invalid::new(
                "reference_contains",
                format!("is longer than {MAX_REFERENCE_LEN} bytes"),
            )));
        }
        let store = &self.state.images;
        let images = store
            .list(tenant.as_deref(), &r.reference_contains)
            .iter()
            .map(|(t, rec)| to_pb(store, t, rec))
            .collect();
        Ok(Response::new(pb::ListImagesResponse { images }))
    }

    async fn inspect_image(
        &self,
        req: Request<pb::InspectImageRequest>,
    ) -> Result<Response<pb::Image>, Status> {
        let (t, r) = (
            req.get_ref().tenant.clone(),
            req.get_ref().reference.clone(),
        );
        let ctx = check_tenant_and_ref(&req, Action::ImageRead, &t, &r)?;
        let store = &self.state.images;
        let rec = store.get(&t, &r).map_err(|e| status::image(e, &ctx))?;
        Ok(Response::new(to_pb(store, &t, &rec)))
    }

    async fn remove_image(
        &self,
        req: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::RemoveImageResponse>, Status> {
        let (t, r) = (
            req.get_ref().tenant.clone(),
            req.get_ref().reference.clone(),
        );
        let ctx = check_tenant_and_ref(&req, Action::ImageWrite, &t, &r)?;
        // Which of the tenant's containers use which image (a container keeps its image).
        let containers: Vec<(String, String)> = match self.state.sandboxes.tenant(&t).await {
            Ok(_) => self
                .state
                .sandboxes
                .list_containers(Some(&t))
                .await
                .map_err(|e| status::sandbox(e, &ctx))
                .map(super::convert::image_users)?,
            Err(_) => Vec::new(),
        };
        let rec = self
            .state
            .images
            .remove(&t, &r, &containers)
            .await
            .map_err(|e| status::image(e, &ctx))?;
        tracing::info!(tenant = %t, reference = %rec.reference, caller = %ctx.caller.identity, "image removed");
        Ok(Response::new(pb::RemoveImageResponse {}))
    }

    async fn import_image(
        &self,
        req: Request<pb::ImportImageRequest>,
    ) -> Result<Response<pb::Image>, Status> {
        let (t, r) = (
            req.get_ref().tenant.clone(),
            req.get_ref().reference.clone(),
        );
        let ctx = check_tenant_and_ref(&req, Action::ImageWrite, &t, &r)?;
        if authz::visible_tenant(&ctx.caller).is_some() {
            return Err(Status::permission_denied(
                "importing reads a host path: it needs the admin or scheduler role; tenants pull",
            ));
        }
        let path = req.into_inner().path;
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") || path.contains('\0') {
            return Err(status::invalid(Invalid::new(
                "path",
                "must be an absolute host path without `..`",
            )));
        }
        let id_start = self.id_start(&t, &ctx).await?;
        let store = &self.state.images;
        let rec = store
            .import(&t, id_start, Path::new(&path), &r)
            .await
            .map_err(|e| status::image(e, &ctx))?;
        tracing::info!(tenant = %t, reference = %r, digest = %rec.digest, caller = %ctx.caller.identity, "image imported");
        Ok(Response::new(to_pb(store, &t, &rec)))
    }
}
