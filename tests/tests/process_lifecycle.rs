//! The agent as a process: SIGTERM drains and exits 0, state survives restarts, denials are
//! logged with the caller's identity, and the unix socket is root-only.

#![allow(clippy::unwrap_used)] // integration-test helpers panic on purpose: that is a failing test

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use caas_agent::client::{self, Target};
use caas_proto::v1::{self as pb, tenant_service_client::TenantServiceClient};
use caas_tests::{AgentProcess, Pki, bin, require_root};
use nix::sys::signal::Signal;
use tonic::Code;

const DRAIN_SECS: u64 = 3;

/// Writes a config under `dir`; returns its path and the cgroup slice it uses.
fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let slice = caas_tests::unique_slice();
    std::fs::write(dir.join("slice"), &slice).unwrap();
    caas_tests::write_agent_config(
        dir,
        &slice,
        &format!("[api]\ndrain_timeout_secs = {DRAIN_SECS}\n{extra}"),
    )
}

fn slice_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("slice")).unwrap()
}

#[tokio::test]
async fn sigterm_during_a_stream_of_calls_drains_and_exits_zero() {
    if !require_root("sigterm_during_a_stream_of_calls_drains_and_exits_zero") {
        return;
    }
    const WORKERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let socket = dir.path().join("run/agent.sock");
    let mut agent = AgentProcess::spawn(&cfg, &socket, &dir.path().join("agent.log"))
        .await
        .unwrap();
    {
        let ch = client::connect(&Target::Unix(socket.clone()))
            .await
            .unwrap();
        let mut t = TenantServiceClient::new(ch);
        for w in 0..WORKERS {
            t.create_tenant(pb::CreateTenantRequest {
                id: format!("w{w}"),
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }

    // Each client, on its own connection, rewrites its tenant's pids quota as fast as it can:
    // every acknowledged call is a write to disk that must survive.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for w in 0..WORKERS {
        let socket = socket.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let ch = client::connect(&Target::Unix(socket)).await.unwrap();
            let mut t = TenantServiceClient::new(ch);
            let (mut last_acked, mut calls, mut failures) = (0u64, 0usize, Vec::new());
            for n in 1.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let call = t.update_tenant_quotas(pb::UpdateTenantQuotasRequest {
                    id: format!("w{w}"),
                    quotas: Some(pb::Quotas {
                        pids: Some(n),
                        ..Default::default()
                    }),
                });
                match tokio::time::timeout(Duration::from_secs(DRAIN_SECS + 5), call).await {
                    Ok(Ok(_)) => {
                        last_acked = n;
                        calls += 1;
                    }
                    Ok(Err(s)) => {
                        failures.push(s.code());
                        break;
                    }
                    Err(_) => panic!("a call hung past the drain timeout"),
                }
            }
            (w, last_acked, calls, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    agent.signal(Signal::SIGTERM).unwrap();
    let status = agent
        .wait_for_exit(Duration::from_secs(DRAIN_SECS + 2))
        .await
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "agent still running after the drain timeout: {}",
                agent.log_text()
            )
        });
    assert_eq!(status.code(), Some(0), "{}", agent.log_text());
    stop.store(true, Ordering::Relaxed);

    let mut acked = Vec::new();
    let mut total = 0;
    for c in clients {
        let (w, last, calls, failures) = c.await.unwrap();
        for code in &failures {
            // A call either completed, or failed as "the agent is not there": never half-done.
            assert!(
                matches!(code, Code::Unavailable | Code::Cancelled),
                "unclean failure {code:?}"
            );
        }
        total += calls;
        acked.push((w, last));
    }
    assert!(total > WORKERS, "the clients made few calls: {total}");
    assert!(!socket.exists(), "the socket is removed on exit");
    assert!(agent.log_text().contains("SIGTERM"), "{}", agent.log_text());
    drop(agent);

    // Nothing acknowledged was lost: a new agent on the same state has every write (or the one
    // after it, if the answer to that one was lost in the shutdown).
    let agent = AgentProcess::spawn(&cfg, &socket, &dir.path().join("agent2.log"))
        .await
        .unwrap();
    let ch = client::connect(&Target::Unix(socket.clone()))
        .await
        .unwrap();
    let mut t = TenantServiceClient::new(ch);
    for (w, last) in acked {
        let got = t
            .get_tenant(pb::GetTenantRequest {
                id: format!("w{w}"),
            })
            .await
            .unwrap()
            .into_inner()
            .quotas
            .unwrap()
            .pids
            .unwrap();
        assert!(
            got == last || got == last + 1,
            "tenant w{w}: acknowledged pids={last}, persisted {got}"
        );
    }
    caas_tests::cleanup_tenants(&socket, &slice_of(dir.path()));
    drop(agent);
}

#[tokio::test]
async fn denials_are_logged_with_the_caller_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki")).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tls = pki.tls_config();
    let cfg = write_config(
        dir.path(),
        &format!(
            "tcp_listen = \"127.0.0.1:{port}\"\n[api.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        ),
    );
    let socket = dir.path().join("run/agent.sock");
    let mut agent = AgentProcess::spawn(&cfg, &socket, &dir.path().join("agent.log"))
        .await
        .unwrap();
    let billing = pki.client("billing");
    let ch = client::connect(&Target::Tls {
        endpoint: format!("https://127.0.0.1:{port}"),
        ca_pem: pki.ca.cert_pem().into_bytes(),
        cert_pem: billing.cert.into_bytes(),
        key_pem: billing.key.into_bytes(),
        domain: Some("localhost".into()),
    })
    .await
    .unwrap();
    let e = TenantServiceClient::new(ch)
        .create_tenant(pb::CreateTenantRequest {
            id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    agent.signal(Signal::SIGTERM).unwrap();
    agent
        .wait_for_exit(Duration::from_secs(DRAIN_SECS + 2))
        .await
        .unwrap();
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("permission denied"))
        .unwrap_or_else(|| panic!("no denial logged: {log}"));
    assert!(
        line.contains("cert:CN=billing") && line.contains("TenantWrite"),
        "{line}"
    );
}

#[tokio::test]
async fn the_unix_socket_is_root_only() {
    if !require_root("the_unix_socket_is_root_only") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The temp dir must be traversable by the unprivileged user for the test to mean anything.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cfg = write_config(dir.path(), "");
    let socket = dir.path().join("run/agent.sock");
    let agent = AgentProcess::spawn(&cfg, &socket, &dir.path().join("agent.log"))
        .await
        .unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    let as_nobody = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(bin("caasctl"));
        std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
        std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
        cmd.arg("--socket")
            .arg(&socket)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = as_nobody(&["node", "info"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Permission denied") || err.contains("permission"),
        "{err}"
    );

    // Root is admin.
    let out = std::process::Command::new(bin("caasctl"))
        .arg("--socket")
        .arg(&socket)
        .args(["--json", "node", "whoami"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["role"], "admin");
    drop(agent);
}

/// An agent turns on `favordynmods` on the host's cgroup2 mount at start (a create then does
/// not wait for an RCU grace period when its process joins its cgroup).
#[tokio::test]
async fn the_agent_sets_favordynmods_on_the_hosts_cgroup2_mount() {
    use caas_agent::cgroups::dynmods;
    const TEST: &str = "the_agent_sets_favordynmods_on_the_hosts_cgroup2_mount";
    if !require_root(TEST) {
        return;
    }
    let root = Path::new("/sys/fs/cgroup");
    let mount = || {
        dynmods::find_cgroup2(
            &std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
            root,
        )
    };
    if mount().is_none() {
        assert!(
            !caas_agent::testing::privileged_required(),
            "{TEST}: this host has no cgroup2 mount, and CAAS_REQUIRE_PRIVILEGED=1 makes the test mandatory"
        );
        caas_agent::testing::skip(TEST, "this host has no cgroup2 mount");
        return;
    }
    dynmods::set(root, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let socket = dir.path().join("run/agent.sock");
    let _agent = AgentProcess::spawn(&cfg, &socket, &dir.path().join("agent.log"))
        .await
        .unwrap();
    let m = mount().unwrap();
    assert!(m.favors_dynmods(), "{m:?}");
}

#[tokio::test]
async fn a_second_agent_on_the_same_socket_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let socket = dir.path().join("run/agent.sock");
    let _first = AgentProcess::spawn(&cfg, &socket, &dir.path().join("a.log"))
        .await
        .unwrap();
    let out = std::process::Command::new(bin("caas-agent"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
}

#[tokio::test]
async fn systemd_gets_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = std::process::Command::new(bin("caas-agent"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    let recv = |buf: &mut [u8]| {
        sock.recv(buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    // Readiness comes once the sockets listen; the watchdog pings every 100 ms.
    while !(seen.contains("READY=1") && seen.matches("WATCHDOG=1").count() >= 2) {
        seen.push_str(
            &recv(&mut buf).unwrap_or_else(|e| panic!("no notification ({e}); got {seen:?}")),
        );
        seen.push('\n');
    }
    assert!(
        dir.path().join("run/agent.sock").exists(),
        "READY=1 only after the socket listens"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGTERM,
    )
    .unwrap();
    while !seen.contains("STOPPING=1") {
        seen.push_str(
            &recv(&mut buf).unwrap_or_else(|e| panic!("no STOPPING=1 ({e}); got {seen:?}")),
        );
    }
    assert!(child.wait().unwrap().success());
}
