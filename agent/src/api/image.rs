//! `caas.v1.ImageService`. Authorized and checked; the image domain (registry pull, unpack) is
//! not built in this version, so valid calls get `UNIMPLEMENTED`.

use std::{pin::Pin, sync::Arc};

use caas_proto::v1::{self as pb, image_service_server::ImageService};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::{AgentState, auth::Ctx, convert, status};
use crate::{
    authz::{self, Action, Scope},
    validate::Invalid,
};

/// Longest image reference accepted.
const MAX_REFERENCE_LEN: usize = 4096;

#[derive(Debug, Clone)]
pub struct ImageApi {
    #[allow(dead_code)]
    state: Arc<AgentState>,
}

impl ImageApi {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }
}

fn check_tenant_and_ref<T>(
    req: &Request<T>,
    action: Action,
    tenant: &str,
    reference: &str,
) -> Result<(), Status> {
    let ctx = Ctx::of(req)?;
    authz::authorize(&ctx.caller, action, Scope::Tenant(tenant)).map_err(status::denied)?;
    convert::id("tenant", tenant.to_string())?;
    if reference.is_empty() || reference.len() > MAX_REFERENCE_LEN {
        return Err(status::invalid(Invalid::new(
            "reference",
            format!("must be 1..={MAX_REFERENCE_LEN} bytes"),
        )));
    }
    Ok(())
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
        check_tenant_and_ref(&req, Action::ImageWrite, &t, &r)?;
        Err(status::unimplemented("image pull"))
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
        convert::tenant_filter_id(r.tenant)?;
        Err(status::unimplemented("the image store"))
    }

    async fn inspect_image(
        &self,
        req: Request<pb::InspectImageRequest>,
    ) -> Result<Response<pb::Image>, Status> {
        let (t, r) = (
            req.get_ref().tenant.clone(),
            req.get_ref().reference.clone(),
        );
        check_tenant_and_ref(&req, Action::ImageRead, &t, &r)?;
        Err(status::unimplemented("the image store"))
    }

    async fn remove_image(
        &self,
        req: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::RemoveImageResponse>, Status> {
        let (t, r) = (
            req.get_ref().tenant.clone(),
            req.get_ref().reference.clone(),
        );
        check_tenant_and_ref(&req, Action::ImageWrite, &t, &r)?;
        Err(status::unimplemented("the image store"))
    }

    async fn import_image(
        &self,
        req: Request<pb::ImportImageRequest>,
    ) -> Result<Response<pb::Image>, Status> {
        let (t, r) = (
            req.get_ref().tenant.clone(),
            req.get_ref().reference.clone(),
        );
        check_tenant_and_ref(&req, Action::ImageWrite, &t, &r)?;
        Err(status::unimplemented("image import"))
    }
}
