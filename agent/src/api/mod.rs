//! The public gRPC API: one small file per service that turns a request into a domain call.
//!
//! Order inside every handler: who is calling ([`auth`]), may they ([`crate::authz`]), is the
//! input well-formed (`convert`), call the domain, convert back. Errors become a
//! `tonic::Status` only in [`status`].

pub mod auth;
mod container;
pub(crate) mod convert;
mod image;
pub mod limits;
mod node;
pub mod status;
mod tenant;
mod usage;

use std::{sync::Arc, time::Instant};

use caas_proto::v1::{
    container_service_server::ContainerServiceServer, image_service_server::ImageServiceServer,
    node_service_server::NodeServiceServer, tenant_service_server::TenantServiceServer,
    usage_service_server::UsageServiceServer,
};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::{config::Config, node::NodeFacts, sandbox::Manager};

/// What every handler can reach.
#[derive(Debug)]
pub struct AgentState {
    /// The configuration in force.
    pub config: Config,
    /// Host facts probed at start-up.
    pub node: NodeFacts,
    /// Tenants, their sandboxes and engines.
    pub sandboxes: Manager,
    /// The meter and the usage ledger.
    pub metering: Arc<crate::usage::Metering>,
    /// Every tenant's images, and the blob cache.
    pub images: Arc<crate::images::ImageStore>,
    /// When the agent started.
    pub started: Instant,
    /// Cancelled when the agent shuts down; long streams end on it.
    pub shutdown: CancellationToken,
}

/// The caas.v1 services plus reflection, ready to serve on any transport.
/// The caller adds `grpc.health.v1` (its reporter is owned by the server lifecycle).
pub fn routes(state: Arc<AgentState>) -> Result<Routes, tonic_reflection::server::Error> {
    let limit = state.config.api.max_message_bytes;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(caas_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let mut b = Routes::builder();
    b.add_service(
        TenantServiceServer::new(tenant::TenantApi::new(state.clone()))
            .max_decoding_message_size(limit),
    )
    .add_service(
        ContainerServiceServer::new(container::ContainerApi::new(state.clone()))
            .max_decoding_message_size(limit),
    )
    .add_service(
        ImageServiceServer::new(image::ImageApi::new(state.clone()))
            .max_decoding_message_size(limit),
    )
    .add_service(
        UsageServiceServer::new(usage::UsageApi::new(state.clone()))
            .max_decoding_message_size(limit),
    )
    .add_service(NodeServiceServer::new(node::NodeApi::new(state)).max_decoding_message_size(limit))
    .add_service(reflection);
    Ok(b.routes())
}

/// Marks every caas.v1 service as serving (or not) in `grpc.health.v1`.
pub async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    macro_rules! each {
        ($($svc:ty),*) => {$(
            if serving {
                reporter.set_serving::<$svc>().await;
            } else {
                reporter.set_not_serving::<$svc>().await;
            }
        )*};
    }
    each!(
        TenantServiceServer<tenant::TenantApi>,
        ContainerServiceServer<container::ContainerApi>,
        ImageServiceServer<image::ImageApi>,
        UsageServiceServer<usage::UsageApi>,
        NodeServiceServer<node::NodeApi>
    );
    let overall = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter.set_service_status("", overall).await;
}
