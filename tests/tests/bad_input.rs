//! Bad input is refused with INVALID_ARGUMENT naming the field, and changes nothing.

#![allow(clippy::unwrap_used)] // integration-test helpers panic on purpose: that is a failing test

use std::collections::BTreeMap;

use caas_proto::v1::{
    self as pb, container_service_client::ContainerServiceClient,
    image_service_client::ImageServiceClient, tenant_service_client::TenantServiceClient,
    usage_service_client::UsageServiceClient,
};
use caas_tests::{TestAgent, bin};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_name_the_field() {
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut t = TenantServiceClient::new(agent.unix().await);
    let long = "a".repeat(64);
    for bad in [
        "",
        "..",
        ".",
        "UPPER",
        "caf\u{e9}",
        "a_b",
        "a/b",
        long.as_str(),
        "-a",
    ] {
        let e = t
            .create_tenant(pb::CreateTenantRequest {
                id: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
        assert!(e.message().starts_with("id: "), "{bad:?}: {}", e.message());
        let e = t
            .get_tenant(pb::GetTenantRequest { id: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    let e = t
        .create_tenant(pb::CreateTenantRequest {
            id: long.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("limit is 63"), "{}", e.message());

    let mut c = ContainerServiceClient::new(agent.unix().await);
    let e = c
        .start_container(pb::StartContainerRequest {
            r#ref: Some(pb::ContainerRef {
                tenant: "a".into(),
                container: "../etc".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("ref.container: "),
        "{}",
        e.message()
    );
    let e = c
        .start_container(pb::StartContainerRequest { r#ref: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("ref: "), "{}", e.message());
    let e = ImageServiceClient::new(agent.unix().await)
        .inspect_image(pb::InspectImageRequest {
            tenant: "a".into(),
            reference: String::new(),
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("reference: "), "{}", e.message());

    assert!(
        t.list_tenants(pb::ListTenantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tenants
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_quotas_and_labels_name_the_field() {
    if !caas_tests::require_root("bad_quotas_and_labels_name_the_field") {
        return;
    }
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut t = TenantServiceClient::new(agent.unix().await);
    let q = |f: fn(&mut pb::Quotas)| {
        let mut q = pb::Quotas::default();
        f(&mut q);
        Some(q)
    };
    for (quotas, field) in [
        (q(|q| q.cpus = Some(0.0)), "quotas.cpus"),
        (q(|q| q.cpus = Some(f64::NAN)), "quotas.cpus"),
        (q(|q| q.cpus = Some(1e12)), "quotas.cpus"),
        (q(|q| q.memory_bytes = Some(0)), "quotas.memory_bytes"),
        (
            q(|q| q.memory_bytes = Some(u64::MAX)),
            "quotas.memory_bytes",
        ),
        (q(|q| q.pids = Some(0)), "quotas.pids"),
        (q(|q| q.max_containers = Some(0)), "quotas.max_containers"),
    ] {
        let e = t
            .create_tenant(pb::CreateTenantRequest {
                id: "a".into(),
                quotas,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let e = t
        .create_tenant(pb::CreateTenantRequest {
            id: "a".into(),
            labels: BTreeMap::from([("bad key".to_string(), "v".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("labels["), "{}", e.message());

    // A good tenant, then an update with a bad quota leaves it as it was.
    let before = t
        .create_tenant(pb::CreateTenantRequest {
            id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = t
        .update_tenant_quotas(pb::UpdateTenantQuotasRequest {
            id: "a".into(),
            quotas: q(|q| q.pids = Some(0)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let after = t
        .get_tenant(pb::GetTenantRequest { id: "a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.quotas, after.quotas);
    let e = t
        .get_tenant(pb::GetTenantRequest { id: "zz".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = t
        .create_tenant(pb::CreateTenantRequest {
            id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    // A container's labels under caas.io/ are the agent's (what image content it runs).
    let mut c = ContainerServiceClient::new(agent.unix().await);
    let e = c
        .create_container(pb::CreateContainerRequest {
            tenant: "a".into(),
            name: "forged".into(),
            rootfs_path: "/".into(),
            command: vec!["true".into()],
            labels: BTreeMap::from([("caas.io/image-id".to_string(), "sha256:0".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("labels[\"caas.io/image-id\"]"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_queries_name_the_field() {
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut u = UsageServiceClient::new(agent.unix().await);
    let usage = |f: fn(&mut pb::GetUsageRequest)| {
        let mut r = pb::GetUsageRequest {
            tenant: "a".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    for (req, field) in [
        (usage(|r| r.tenant = "A/b".into()), "tenant"),
        (usage(|r| r.tenant = String::new()), "tenant"),
        (usage(|r| r.container = "..".into()), "container"),
        (
            usage(|r| {
                r.start_unix_s = 200;
                r.end_unix_s = 100;
            }),
            "start_unix_s",
        ),
        (
            usage(|r| {
                r.start_unix_s = 1;
                r.end_unix_s = 10_000_000;
                r.granularity = pb::Granularity::Second as i32;
            }),
            "start_unix_s..end_unix_s",
        ),
        (usage(|r| r.granularity = 42), "granularity"),
    ] {
        let e = u.get_usage(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let e = u
        .read_records(pb::ReadRecordsRequest {
            tenant: "no such/tenant".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("tenant"), "{}", e.message());
    let e = u
        .ack_records(pb::AckRecordsRequest { cursor: 5 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cursor"), "{}", e.message());
    // Nothing was acknowledged by the refused ack.
    let r = u
        .read_records(pb::ReadRecordsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(r.records.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_with_the_cap() {
    let agent = TestAgent::start(|c| c.api.max_message_bytes = 4096)
        .await
        .unwrap();
    for ch in [agent.unix().await, agent.as_role("admin").await] {
        let mut t = TenantServiceClient::new(ch);
        let labels: BTreeMap<_, _> = (0..40)
            .map(|i| (format!("k{i}"), "v".repeat(200)))
            .collect();
        let e = t
            .create_tenant(pb::CreateTenantRequest {
                id: "big".into(),
                labels,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("api.max_message_bytes"),
            "{}",
            e.message()
        );
        assert!(e.message().contains("4096"), "{}", e.message());
        // The connection still serves a normal call afterwards, and nothing was created.
        let e = t
            .get_tenant(pb::GetTenantRequest { id: "big".into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
}

fn serve_with_config(text: &str) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(bin("caas-agent"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (out, dir)
}

#[test]
fn a_bad_config_refuses_to_start_with_one_line() {
    for (text, expect) in [
        ("[api]\nmax_message_bytez = 10\n", "max_message_bytez"),
        ("[api]\nmax_message_bytes = 10\n", "api.max_message_bytes"),
        (
            "[api]\ndrain_timeout_secs = 100000\n",
            "api.drain_timeout_secs",
        ),
        ("[tenants]\ndefault_cpus = -1.0\n", "tenants.default_cpus"),
        ("state_dir = 5\n", "state_dir"),
        ("[api]\ntcp_listen = \"127.0.0.1:0\"\n", "api.tcp_listen"),
        ("[usage]\nwindow_secs = 0\n", "usage.window_secs"),
        ("[usage]\nwindow_secs = 7200\n", "usage.window_secs"),
        (
            "[export]\nendpoint = \"https://billing.example/usage\"\n",
            "export.endpoint",
        ),
        ("[metrics]\nlisten = \"not-an-address\"\n", "listen"),
    ] {
        let (out, _dir) = serve_with_config(text);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{text}: {err}");
        assert!(err.contains(expect), "{text}: {err}");
    }
    let out = std::process::Command::new(bin("caas-agent"))
        .args(["serve", "--config", "/nonexistent/caas.toml"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/caas.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_input_names_the_field_and_changes_nothing() {
    if !caas_tests::require_root("bad_image_input_names_the_field_and_changes_nothing") {
        return;
    }
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut t = TenantServiceClient::new(agent.unix().await);
    let mut i = ImageServiceClient::new(agent.unix().await);
    let mut c = ContainerServiceClient::new(agent.unix().await);
    let pull = |tenant: &str, reference: &str| pb::PullImageRequest {
        tenant: tenant.into(),
        reference: reference.into(),
        auth: None,
    };
    // Before any tenant exists: the tenant is what is missing.
    let e = i
        .pull_image(pull("ghost", "127.0.0.1:1/x:1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("ghost"), "{}", e.message());
    t.create_tenant(pb::CreateTenantRequest {
        id: "a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    for (reference, needle) in [
        ("", "reference: "),
        ("a\nb", "reference: "),
        ("Upper/Case:tag", "reference"),
        ("host/repo@sha256:short", "reference"),
    ] {
        let r = match i.pull_image(pull("a", reference)).await {
            Err(e) => Err(e),
            Ok(s) => s.into_inner().message().await.map(|_| ()),
        };
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{reference:?}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{reference:?}: {}",
            e.message()
        );
    }
    let e = i
        .pull_image(pb::PullImageRequest {
            auth: Some(pb::RegistryAuth {
                password: "p".into(),
                ..Default::default()
            }),
            ..pull("a", "127.0.0.1:1/x:1")
        })
        .await
        .unwrap_err();
    assert!(
        e.message().starts_with("auth.username: "),
        "{}",
        e.message()
    );
    for path in ["relative/dir", "/tmp/../etc"] {
        let e = i
            .import_image(pb::ImportImageRequest {
                tenant: "a".into(),
                path: path.into(),
                reference: "local/x:1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{path}: {e:?}");
        assert!(e.message().starts_with("path: "), "{}", e.message());
    }
    let e = i
        .import_image(pb::ImportImageRequest {
            tenant: "a".into(),
            path: "/nonexistent/layout".into(),
            reference: "local/x:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("/nonexistent/layout"),
        "{}",
        e.message()
    );
    let create = |image: &str, rootfs: &str| pb::CreateContainerRequest {
        tenant: "a".into(),
        name: "c".into(),
        image: image.into(),
        rootfs_path: rootfs.into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let e = c.create_container(create("x:1", "/tmp")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("rootfs_path: "), "{}", e.message());
    let e = c.create_container(create("", "")).await.unwrap_err();
    assert!(e.message().starts_with("image: "), "{}", e.message());
    let e = c
        .create_container(create("127.0.0.1:1/never/pulled:1", ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("never/pulled") && e.message().contains("pull or import"),
        "{}",
        e.message()
    );
    // Nothing was made.
    let listed = i
        .list_images(pb::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(listed.is_empty(), "{listed:?}");
    let cs = c
        .list_containers(pb::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(cs.is_empty(), "{cs:?}");
    t.delete_tenant(pb::DeleteTenantRequest {
        id: "a".into(),
        force: true,
    })
    .await
    .unwrap();
}
