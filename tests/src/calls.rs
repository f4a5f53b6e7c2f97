//! Container calls every end-to-end test makes the same way.

use std::time::Duration;

use caas_proto::v1::{self as pb, container_service_client::ContainerServiceClient};
use tonic::transport::Channel;

/// A reference to container `c` (id or name) of `tenant`.
pub fn cref(tenant: &str, c: &str) -> Option<pb::ContainerRef> {
    Some(pb::ContainerRef {
        tenant: tenant.into(),
        container: c.into(),
    })
}

/// Waits for the container to exit (at most 60 s, then the test fails).
pub async fn wait(
    c: &mut ContainerServiceClient<Channel>,
    tenant: &str,
    name: &str,
) -> pb::WaitContainerResponse {
    let call = c.wait_container(pb::WaitContainerRequest {
        r#ref: cref(tenant, name),
    });
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("wait timed out")
        .expect("WaitContainer")
        .into_inner()
}

/// Everything the container has written so far.
pub async fn logs(c: &mut ContainerServiceClient<Channel>, tenant: &str, name: &str) -> String {
    let mut s = c
        .logs(pb::LogsRequest {
            r#ref: cref(tenant, name),
            ..Default::default()
        })
        .await
        .expect("Logs")
        .into_inner();
    let mut out = String::new();
    while let Some(chunk) = s.message().await.expect("a log chunk") {
        out.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    out
}
