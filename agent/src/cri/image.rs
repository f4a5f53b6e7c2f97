//! `runtime.v1.ImageService` over the agent's image store.
//!
//! Images are per tenant in caas (unpacked with owners shifted into the tenant's range); the
//! CRI's view is node-wide. The CRI sees the images of the tenants open to pods (label
//! `caas.io/cri=true`, which the tenants it creates carry). A pull with a pod config
//! goes to that pod's tenant, without one to `image_tenant`. A container of a tenant that lacks
//! an image another CRI tenant has pulled gets it from the blob cache (the registry is asked for
//! the manifest again, with no credentials: a private image needs a pull for that pod). The
//! image id is the config digest, as in containerd.

use std::{collections::BTreeSet, sync::Arc};

use caas_proto::cri::v1 as cri;
use tonic::{Request, Response, Status};

use super::{
    Cri, now_ns,
    runtime::{names_a_tenant, tenant_of},
};
use crate::{
    api::{auth::Ctx, status},
    images::{Credentials, ImageError, ImageRecord, Rootfs},
    tenants::Isolation,
    validate::Invalid,
};

#[derive(Debug, Clone)]
pub struct ImageApi {
    cri: Arc<Cri>,
}

impl ImageApi {
    pub fn new(cri: Arc<Cri>) -> Self {
        Self { cri }
    }
}

/// Whether `q` names `r`: a reference the store matches, or its id (config digest, with or
/// without `sha256:`).
fn names(r: &ImageRecord, q: &str) -> bool {
    let id = r.config_digest.as_str();
    q == id || id.strip_prefix("sha256:") == Some(q) || r.matches(q)
}

fn to_cri(records: &[&ImageRecord], store: &crate::images::ImageStore) -> cri::Image {
    let first = records[0];
    let mut tags = BTreeSet::new();
    let mut digests = BTreeSet::new();
    for r in records {
        // A reference by digest has no tag.
        if !r.normalized.contains('@') {
            tags.insert(r.normalized.clone());
        }
        digests.insert(r.normalized_repo_at());
    }
    let user = store.rootfs_config_user(first).unwrap_or_default();
    let (uid, username) = match user.split(':').next().unwrap_or("") {
        "" => (Some(cri::Int64Value { value: 0 }), String::new()),
        u => match u.parse::<i64>() {
            Ok(n) => (Some(cri::Int64Value { value: n }), String::new()),
            Err(_) => (None, u.to_string()),
        },
    };
    cri::Image {
        id: first.config_digest.to_string(),
        repo_tags: tags.into_iter().collect(),
        repo_digests: digests.into_iter().collect(),
        size: first.size_bytes,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: first.config_digest.to_string(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// `user:password` from a docker `auth` field (standard base64).
fn decode_auth(s: &str) -> Option<(String, String)> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push(u8::try_from((bits >> n) & 0xff).ok()?);
        }
    }
    let text = String::from_utf8(out).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn credentials(a: Option<cri::AuthConfig>) -> Result<Credentials, Status> {
    let a = a.unwrap_or_default();
    let (mut username, mut password) = (a.username, a.password);
    if username.is_empty() && !a.auth.is_empty() {
        (username, password) = decode_auth(&a.auth).ok_or_else(|| {
            status::invalid(Invalid::new("auth.auth", "is not base64 of user:password"))
        })?;
    }
    let identity_token = if a.registry_token.is_empty() {
        a.identity_token
    } else {
        a.registry_token
    };
    Ok(Credentials {
        username,
        password,
        identity_token,
    })
}

impl Cri {
    /// The tenants whose images the CRI sees: those open to pods (the caas API's other
    /// tenants are not the CRI's to show, nor kubelet's image GC's to remove from).
    async fn image_tenants(&self) -> BTreeSet<String> {
        self.state
            .sandboxes
            .registry
            .list(&crate::tenants::TenantFilter::default())
            .await
            .into_iter()
            .filter(super::open_to_pods)
            .map(|t| t.id)
            .collect()
    }

    /// Every image the CRI sees named by `q`, with its tenant.
    async fn find_images(&self, q: &str) -> Vec<(String, ImageRecord)> {
        let tenants = self.image_tenants().await;
        self.state
            .images
            .list(None, "")
            .into_iter()
            .filter(|(t, r)| tenants.contains(t) && (q.is_empty() || names(r, q)))
            .collect()
    }

    /// What a container of `tenant` needs of `image`: from the tenant's store, or pulled into
    /// it from the blob cache when another CRI tenant has it.
    pub async fn image_for(&self, tenant: &str, image: &str, ctx: &Ctx) -> Result<Rootfs, Status> {
        let images = &self.state.images;
        if let Some((_, r)) = images
            .list(Some(tenant), "")
            .into_iter()
            .find(|(_, r)| names(r, image))
        {
            return images
                .rootfs(tenant, &r.reference)
                .map_err(|e| status::image(e, ctx));
        }
        let Some((_, r)) = self.find_images(image).await.into_iter().next() else {
            return Err(Status::not_found(format!(
                "image {image:?} is not on this node; pull it first (PullImage)"
            )));
        };
        let t = self
            .state
            .sandboxes
            .tenant(tenant)
            .await
            .map_err(|e| status::sandbox(e, ctx))?;
        // By digest: the very image kubelet was told is here, even if its tag moved since.
        let pinned = r.normalized_repo_at();
        let rec = images
            .pull(
                tenant,
                t.id_range.start,
                &pinned,
                &Credentials::default(),
                None,
            )
            .await
            .map_err(|e| match e {
                // kubelet does not pull an image it was told is on the node, so the pod's own
                // credentials never come here: say what to do.
                crate::images::ImageError::Denied(m) => Status::failed_precondition(format!(
                    "image {image:?} is on this node for another tenant, and tenants never share credentials: the registry refused it without this pod's ({m}); give the pod imagePullPolicy: Always so that kubelet pulls it with its pull secrets"
                )),
                e => status::image(e, ctx),
            })?;
        // Named as the other tenant has it (its tag), so that it is listed, reported and
        // removed by that name here too.
        let rec = images
            .name_as(tenant, &rec, &r.reference)
            .await
            .map_err(|e| status::image(e, ctx))?;
        images
            .rootfs(tenant, &rec.reference)
            .map_err(|e| status::image(e, ctx))
    }
}

fn reference(spec: Option<cri::ImageSpec>) -> Result<String, Status> {
    let image = spec.map(|s| s.image).unwrap_or_default();
    if image.is_empty() {
        return Err(status::invalid(Invalid::new(
            "image.image",
            "must name an image",
        )));
    }
    if image.len() > 1024 {
        return Err(status::invalid(Invalid::new(
            "image.image",
            "is longer than 1024 bytes",
        )));
    }
    Ok(image)
}

#[tonic::async_trait]
impl cri::image_service_server::ImageService for ImageApi {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let q = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .unwrap_or_default();
        let found = self.cri.find_images(&q).await;
        // One entry per image id, over every tenant that has it.
        let mut ids: Vec<String> = found
            .iter()
            .map(|(_, r)| r.config_digest.to_string())
            .collect();
        ids.sort();
        ids.dedup();
        let images = ids
            .iter()
            .map(|id| {
                let same: Vec<&ImageRecord> = found
                    .iter()
                    .map(|(_, r)| r)
                    .filter(|r| r.config_digest.as_str() == id)
                    .collect();
                to_cri(&same, &self.cri.state.images)
            })
            .collect();
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let r = req.into_inner();
        let q = reference(r.image)?;
        let found = self.cri.find_images(&q).await;
        let image = found.first().map(|(_, first)| {
            let same: Vec<&ImageRecord> = found
                .iter()
                .map(|(_, r)| r)
                .filter(|r| r.config_digest == first.config_digest)
                .collect();
            to_cri(&same, &self.cri.state.images)
        });
        let mut info = std::collections::HashMap::new();
        if r.verbose
            && let Some((_, first)) = found.first()
        {
            info.insert(
                "info".into(),
                serde_json::json!({
                    "tenants": found.iter().map(|(t, _)| t.clone()).collect::<BTreeSet<_>>(),
                    "manifest": first.manifest_digest.to_string(),
                    "layers": first.layers.iter().map(|l| l.digest.to_string()).collect::<Vec<_>>(),
                })
                .to_string(),
            );
        }
        Ok(Response::new(cri::ImageStatusResponse { image, info }))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        let handler = r
            .image
            .as_ref()
            .map(|i| i.runtime_handler.clone())
            .unwrap_or_default();
        let reference = reference(r.image)?;
        let creds = credentials(r.auth)?;
        // A pod's pull goes into the pod's tenant. A config that names no tenant (critest's
        // image tests send one with labels only) is no pod's: the image tenant, as without one.
        let tenant = match &r.sandbox_config {
            Some(sc) if names_a_tenant(sc) => tenant_of(sc)?,
            _ => self.cri.state.config.cri.image_tenant.clone(),
        };
        // Held until the image is in: the idle-tenant collector leaves the tenant alone.
        let gate = self.cri.tenant_gate(&tenant).await.read_owned().await;
        let t = match self.cri.state.sandboxes.tenant(&tenant).await {
            Ok(t) if super::open_to_pods(&t) => t,
            Ok(_) => {
                return Err(Status::failed_precondition(format!(
                    "tenant {tenant} is not open to Kubernetes pods (it lacks the label {}=true)",
                    super::CRI_LABEL
                )));
            }
            Err(_) => {
                let isolation = match handler.as_str() {
                    super::HANDLER_VM => Isolation::Vm,
                    _ => Isolation::Userns,
                };
                self.cri.ensure_tenant(&tenant, isolation, &ctx).await?
            }
        };
        // The pull runs to its end even if the caller goes away: nothing is left half-done.
        let state = self.cri.state.clone();
        let (tn, rf) = (tenant.clone(), reference.clone());
        let rec = tokio::spawn(async move {
            let _gate = gate;
            state
                .images
                .pull(&tn, t.id_range.start, &rf, &creds, None)
                .await
        })
        .await
        .map_err(|e| Status::internal(format!("pulling the image: {e}")))?
        .map_err(|e| {
            tracing::warn!(%tenant, %reference, error = %e, "CRI image pull failed");
            status::image(e, &ctx)
        })?;
        tracing::info!(%tenant, %reference, id = %rec.config_digest, "CRI image pulled");
        Ok(Response::new(cri::PullImageResponse {
            image_ref: rec.config_digest.to_string(),
        }))
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let q = reference(req.into_inner().image)?;
        // Removing an image that is not there succeeds.
        for (tenant, r) in self.cri.find_images(&q).await {
            let users: Vec<(String, String)> = match self
                .cri
                .state
                .sandboxes
                .list_containers(Some(&tenant))
                .await
            {
                Ok(cs) => {
                    let mut users = crate::api::convert::image_users(cs);
                    // Pods' containers use it by id too (an image whose tag moved on is known
                    // by its id only), and those that have it as a volume.
                    for c in self.cri.store.containers().await {
                        if c.tenant == tenant {
                            let name = format!("k8s-{}", c.id);
                            users.push((name.clone(), c.image_id.clone()));
                            for id in &c.image_mount_ids {
                                users.push((name.clone(), id.clone()));
                            }
                            // Recorded before their ids were: by the name kubelet gave.
                            if c.image_mount_ids.is_empty() {
                                for image in c.image_mounts.values() {
                                    users.push((name.clone(), image.clone()));
                                }
                            }
                        }
                    }
                    users
                }
                Err(crate::sandbox::SandboxError::Tenant(
                    crate::tenants::TenantError::NotFound { .. },
                )) => continue,
                Err(e) => return Err(status::sandbox(e, &ctx)),
            };
            match self
                .cri
                .state
                .images
                .remove(&tenant, &r.reference, &users)
                .await
            {
                Ok(_) | Err(ImageError::NotInStore { .. }) => {}
                Err(e) => return Err(status::image(e, &ctx)),
            }
        }
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let state_dir = self.cri.state.config.state_dir.clone();
        let (used, inodes) = tokio::task::spawn_blocking(move || {
            let mut total = (0u64, 0u64);
            for d in ["images", "blobs"] {
                let (b, i) = crate::fsutil::disk_usage(&state_dir.join(d));
                total.0 += b;
                total.1 += i;
            }
            total
        })
        .await
        .map_err(|e| Status::internal(format!("measuring the image store: {e}")))?;
        let fs = cri::FilesystemUsage {
            timestamp: now_ns(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.cri.state.config.state_dir.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: used }),
            inodes_used: Some(cri::UInt64Value { value: inodes }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs],
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_auth_decodes() {
        // "user:pa:ss" in base64.
        assert_eq!(
            decode_auth("dXNlcjpwYTpzcw=="),
            Some(("user".into(), "pa:ss".into()))
        );
        assert_eq!(decode_auth("!!"), None);
        // No colon.
        assert_eq!(decode_auth("dXNlcg=="), None);
    }
}
