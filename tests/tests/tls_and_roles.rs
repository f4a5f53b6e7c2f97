//! mTLS is enforced at the TLS layer, and roles from client certificates are enforced per RPC.

#![allow(clippy::unwrap_used)] // integration-test helpers panic on purpose: that is a failing test

use std::sync::Arc;

use caas_proto::v1::{
    self as pb, container_service_client::ContainerServiceClient,
    node_service_client::NodeServiceClient, tenant_service_client::TenantServiceClient,
    usage_service_client::UsageServiceClient,
};
use caas_tests::TestAgent;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// Connects with raw rustls (optionally presenting `client`), sends the HTTP/2 preface and reads.
/// Returns the error the server's TLS layer answered with, or None if it accepted the peer.
async fn raw_tls(agent: &TestAgent, client: Option<(&str, &str)>) -> Option<String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(agent.pki.ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = match connector.connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return Some(e.to_string()),
    };
    // In TLS 1.3 the server judges the client certificate after the client's handshake ends,
    // so its verdict arrives on the first read.
    if let Err(e) = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await {
        return Some(e.to_string());
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => None,
        Ok(Ok(_)) => Some("closed without an alert".into()),
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer within 5 s".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_layer_refuses_missing_unknown_and_expired_certificates() {
    let agent = TestAgent::start(|_| {}).await.unwrap();

    // A good certificate passes the TLS layer.
    let good = agent.pki.client("observer");
    assert_eq!(raw_tls(&agent, Some((&good.cert, &good.key))).await, None);

    // No client certificate.
    let e = raw_tls(&agent, None).await.expect("refused");
    assert!(e.contains("CertificateRequired"), "no cert: {e}");

    // A certificate from a CA the agent does not trust.
    let other = caas_agent::certs::Ca::new("someone else")
        .unwrap()
        .client("admin")
        .unwrap();
    let e = raw_tls(&agent, Some((&other.cert, &other.key)))
        .await
        .expect("refused");
    assert!(
        e.contains("UnknownCA") || e.contains("BadCertificate"),
        "unknown CA: {e}"
    );

    // An expired certificate from the right CA.
    let now = OffsetDateTime::now_utc();
    let expired = agent
        .pki
        .ca
        .client_valid("admin", now - Duration::days(30), now - Duration::days(1))
        .unwrap();
    let e = raw_tls(&agent, Some((&expired.cert, &expired.key)))
        .await
        .expect("refused");
    assert!(e.contains("CertificateExpired"), "expired: {e}");

    // And through a real gRPC client, none of them gets an answer from a service.
    for pem in [&other, &expired] {
        let outcome = match agent.with_cert(pem).await {
            Err(_) => None,
            Ok(ch) => Some(
                NodeServiceClient::new(ch)
                    .who_am_i(pb::WhoAmIRequest {})
                    .await
                    .expect_err("a refused certificate must not reach a service")
                    .code(),
            ),
        };
        assert!(
            matches!(
                outcome,
                None | Some(Code::Unavailable | Code::Unknown | Code::Cancelled)
            ),
            "{outcome:?}"
        );
    }
}

fn create(id: &str) -> pb::CreateTenantRequest {
    pb::CreateTenantRequest {
        id: id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_per_rpc() {
    if !caas_tests::require_root("roles_are_enforced_per_rpc") {
        return;
    }
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut admin = TenantServiceClient::new(agent.unix().await);
    for id in ["a", "b"] {
        admin.create_tenant(create(id)).await.unwrap();
    }

    // Who the agent thinks each caller is.
    for role in ["admin", "scheduler", "billing", "observer", "tenant:a"] {
        let w = NodeServiceClient::new(agent.as_role(role).await)
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(w.role, role);
        assert_eq!(w.identity, format!("cert:CN={role}"));
    }

    // billing cannot create a tenant, but reads usage (the ledger itself is not built yet).
    let billing = agent.as_role("billing").await;
    let e = TenantServiceClient::new(billing.clone())
        .create_tenant(create("c"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("billing"), "{e:?}");
    let e = TenantServiceClient::new(billing.clone())
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Billing reads every tenant's records.
    UsageServiceClient::new(billing)
        .read_records(pb::ReadRecordsRequest::default())
        .await
        .expect("billing passes authorization");

    // tenant:a reads a, not b, and its list holds only a.
    let mut ta = TenantServiceClient::new(agent.as_role("tenant:a").await);
    assert_eq!(
        ta.get_tenant(pb::GetTenantRequest { id: "a".into() })
            .await
            .unwrap()
            .into_inner()
            .id,
        "a"
    );
    let e = ta
        .get_tenant(pb::GetTenantRequest { id: "b".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        !e.message().contains("quotas"),
        "a denial leaks nothing of b: {e:?}"
    );
    let ids: Vec<_> = ta
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, ["a"]);
    let e = ta
        .delete_tenant(pb::DeleteTenantRequest {
            id: "a".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "a tenant cannot delete itself"
    );
    let mut ta_c = ContainerServiceClient::new(agent.as_role("tenant:a").await);
    let in_b = pb::CreateContainerRequest {
        tenant: "b".into(),
        name: "x".into(),
        ..Default::default()
    };
    assert_eq!(
        ta_c.create_container(in_b).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let e = ta_c
        .list_containers(pb::ListContainersRequest {
            tenant: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = UsageServiceClient::new(agent.as_role("tenant:a").await)
        .get_usage(pb::GetUsageRequest {
            tenant: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // observer reads but never mutates.
    let observer = agent.as_role("observer").await;
    let mut ot = TenantServiceClient::new(observer.clone());
    assert_eq!(
        ot.list_tenants(pb::ListTenantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tenants
            .len(),
        2
    );
    for e in [
        ot.create_tenant(create("c")).await.unwrap_err(),
        ot.delete_tenant(pb::DeleteTenantRequest {
            id: "a".into(),
            force: true,
        })
        .await
        .unwrap_err(),
        ot.update_tenant_quotas(pb::UpdateTenantQuotasRequest {
            id: "a".into(),
            quotas: None,
        })
        .await
        .unwrap_err(),
        ContainerServiceClient::new(observer.clone())
            .create_container(pb::CreateContainerRequest {
                tenant: "a".into(),
                name: "x".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        UsageServiceClient::new(observer)
            .ack_records(pb::AckRecordsRequest { cursor: 1 })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }

    // scheduler manages tenants.
    let mut sched = TenantServiceClient::new(agent.as_role("scheduler").await);
    sched.create_tenant(create("c")).await.unwrap();
    sched
        .delete_tenant(pb::DeleteTenantRequest {
            id: "c".into(),
            force: false,
        })
        .await
        .unwrap();

    // A certificate from the right CA whose CN names no role gets nothing.
    let nobody = agent.as_role("root").await;
    let e = NodeServiceClient::new(nobody)
        .get_node_info(pb::GetNodeInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("names no role"), "{e:?}");

    // Nothing the refused callers tried changed anything.
    let ids: Vec<_> = admin
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let ch = agent.as_role("observer").await;
    let mut h = tonic_health_client(ch);
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "caas.v1.TenantService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

fn tonic_health_client(
    ch: tonic::transport::Channel,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    tonic_health::pb::health_client::HealthClient::new(ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut c = ServerReflectionClient::new(agent.unix().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer: {resp:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "caas.v1.TenantService",
        "caas.v1.ContainerService",
        "caas.v1.ImageService",
        "caas.v1.UsageService",
        "caas.v1.NodeService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}
