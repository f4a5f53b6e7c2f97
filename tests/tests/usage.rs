//! Metering end to end: real containers in real cgroups, billed through the ledger and read back
//! through the usage API, compared with the kernel's own counters.

#![allow(clippy::unwrap_used)] // integration-test helpers panic on purpose: that is a failing test

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use caas_agent::cgroups::{CgroupLayout, detect_layout};
use caas_proto::v1::{
    self as pb, container_service_client::ContainerServiceClient,
    tenant_service_client::TenantServiceClient, usage_service_client::UsageServiceClient,
};
use caas_tests::{TestAgent, busybox_rootfs, calls::cref, require_root};
use futures::StreamExt;
use tonic::{Code, transport::Channel};

const MIB: f64 = (1u64 << 20) as f64;

struct Api {
    t: TenantServiceClient<Channel>,
    c: ContainerServiceClient<Channel>,
    u: UsageServiceClient<Channel>,
    rootfs: String,
}

impl Api {
    fn new(ch: Channel, dir: &Path) -> Self {
        Self {
            t: TenantServiceClient::new(ch.clone()),
            c: ContainerServiceClient::new(ch.clone()),
            u: UsageServiceClient::new(ch),
            rootfs: busybox_rootfs(dir).display().to_string(),
        }
    }

    async fn tenant(&mut self, id: &str) {
        self.t
            .create_tenant(pb::CreateTenantRequest {
                id: id.into(),
                quotas: Some(pb::Quotas {
                    cpus: Some(2.0),
                    memory_bytes: Some(1 << 30),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Creates and starts `sh -c script`; returns the container id.
    async fn run(&mut self, tenant: &str, name: &str, script: &str, cpus: Option<f64>) -> String {
        let c = self
            .c
            .create_container(pb::CreateContainerRequest {
                tenant: tenant.into(),
                name: name.into(),
                rootfs_path: self.rootfs.clone(),
                command: vec!["sh".into(), "-c".into(), script.into()],
                resources: Some(pb::Resources {
                    cpus,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        self.c
            .start_container(pb::StartContainerRequest {
                r#ref: cref(tenant, &c.id),
            })
            .await
            .unwrap();
        c.id
    }

    async fn wait(&mut self, tenant: &str, id: &str) -> i32 {
        caas_tests::calls::wait(&mut self.c, tenant, id)
            .await
            .exit_code
    }

    async fn kill(&mut self, tenant: &str, id: &str) {
        self.c
            .kill_container(pb::KillContainerRequest {
                r#ref: cref(tenant, id),
                signal: "SIGKILL".into(),
            })
            .await
            .unwrap();
    }

    async fn delete(&mut self, tenant: &str, id: &str) {
        self.c
            .delete_container(pb::DeleteContainerRequest {
                r#ref: cref(tenant, id),
                force: true,
            })
            .await
            .unwrap();
    }

    /// Every record of `tenant`, paging through ReadRecords.
    async fn records(&mut self, tenant: &str) -> Vec<pb::BillingRecord> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let r = self
                .u
                .read_records(pb::ReadRecordsRequest {
                    after_cursor: after,
                    limit: 100,
                    tenant: tenant.into(),
                })
                .await
                .unwrap()
                .into_inner();
            let n = r.records.len();
            out.extend(r.records);
            if n < 100 {
                return out;
            }
            after = r.next_cursor;
        }
    }

    /// The records of one container once its last record is in (after its delete).
    async fn billed(&mut self, tenant: &str, id: &str) -> Vec<pb::BillingRecord> {
        // The final reading is taken on delete and written within the ledger's next batch.
        let mut last = None;
        for _ in 0..40 {
            let recs: Vec<_> = self
                .records(tenant)
                .await
                .into_iter()
                .filter(|r| r.container == id)
                .collect();
            let sum: f64 = recs.iter().map(|r| r.cpu_seconds).sum();
            if !recs.is_empty() && last == Some((recs.len(), sum)) {
                return recs;
            }
            last = Some((recs.len(), sum));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("no stable records for {tenant}/{id}: {last:?}");
    }
}

/// The kernel's cumulative CPU counter of a container, in seconds.
fn cgroup_cpu_seconds(slice: &str, tenant: &str, id: &str) -> f64 {
    let root = Path::new("/sys/fs/cgroup");
    let rel: PathBuf = [slice, &format!("tenant-{tenant}"), &format!("c-{id}")]
        .iter()
        .collect();
    match detect_layout(root).unwrap() {
        CgroupLayout::V2 => {
            let text = std::fs::read_to_string(root.join(&rel).join("cpu.stat")).unwrap();
            let usec: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            usec as f64 / 1e6
        }
        _ => {
            let p = root.join("cpuacct").join(&rel).join("cpuacct.usage");
            let ns: u64 = std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .trim()
                .parse()
                .unwrap();
            ns as f64 / 1e9
        }
    }
}

fn within(what: &str, got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= want * rel,
        "{what}: got {got}, want {want} ± {:.1}%",
        rel * 100.0
    );
}

fn assert_unique_ids(recs: &[pb::BillingRecord]) {
    let mut seen = BTreeMap::new();
    for r in recs {
        if let Some(prev) = seen.insert(r.id.clone(), r.clone()) {
            panic!("record {} emitted twice: {prev:?} and {r:?}", r.id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_memory_and_short_containers_are_billed_exactly() {
    if !require_root("cpu_memory_and_short_containers_are_billed_exactly") {
        return;
    }
    let agent = TestAgent::start(|c| c.usage.window_secs = 2).await.unwrap();
    let mut api = Api::new(agent.unix().await, agent.dir.path());
    api.tenant("m").await;

    // A busy loop capped at half a CPU for 4 s, and 100 MiB held for 5 s, side by side.
    // The burn runs from some point inside `run` until the kill lands; both ends are
    // bracketed so a slow create of `hold` on a loaded machine does not look like a billing
    // error.
    let before_start = Instant::now();
    let burn = api.run("m", "burn", "while :; do :; done", Some(0.5)).await;
    let after_start = Instant::now();
    let hold = api
        .run(
            "m",
            "hold",
            // dd fills its 100 MiB buffer before it writes a byte, then blocks on the full
            // pipe; the reader sleeps 5 s only once the first byte arrives, so the whole
            // 100 MiB is held for at least 5 s however slowly the fill goes.
            "dd if=/dev/zero bs=100M count=1 2>/dev/null | (head -c 1 >/dev/null; sleep 5)",
            None,
        )
        .await;
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(after_start.elapsed())).await;
    let before_kill = Instant::now();
    api.kill("m", &burn).await;
    assert_eq!(api.wait("m", &burn).await, 137);
    let ran_at_least = (before_kill - after_start).as_secs_f64();
    let ran_at_most =
        before_kill.elapsed().as_secs_f64() + (before_kill - before_start).as_secs_f64();
    assert_eq!(api.wait("m", &hold).await, 0);
    let kernel = cgroup_cpu_seconds(&agent.slice, "m", &burn);
    api.delete("m", &burn).await;
    api.delete("m", &hold).await;
    // The delete removed the container's cgroup in every hierarchy.
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let c = h
            .path()
            .join(&agent.slice)
            .join("tenant-m")
            .join(format!("c-{burn}"));
        assert!(!c.exists(), "{} left behind", c.display());
    }

    let recs = api.billed("m", &burn).await;
    assert_unique_ids(&recs);
    let cpu: f64 = recs.iter().map(|r| r.cpu_seconds).sum();
    eprintln!("measured: burn billed {cpu:.4} CPU-s, cgroup counter {kernel:.4} s");
    within(
        "CPU-s billed against the cgroup's counter",
        cpu,
        kernel,
        0.005,
    );
    // The cap: half a CPU over the time the burn ran, within 5% (the quota is enforced per
    // 100 ms period, so the ends of the run may carry a part-used period).
    let (lo, hi) = (0.5 * ran_at_least * 0.95, 0.5 * ran_at_most * 1.05);
    assert!(
        (lo..=hi).contains(&cpu),
        "CPU-s of a burn at 0.5 CPU that ran {ran_at_least:.3} to {ran_at_most:.3} s: \
         got {cpu:.4}, want {lo:.4} to {hi:.4}"
    );
    assert!(recs.len() >= 2, "2 s windows over 4 s: {recs:?}");
    assert!(
        recs.iter()
            .all(|r| r.window_seconds == 2 && r.node == recs[0].node)
    );

    let recs = api.billed("m", &hold).await;
    let mib_s: f64 = recs.iter().map(|r| r.memory_gib_seconds * 1024.0).sum();
    eprintln!("measured: hold billed {mib_s:.1} MiB·s");
    // Working sets are sampled once a second and each sample stands for its second, so a
    // hold of 5.0 to 5.x s is seen by 5 or 6 samples, plus at most one part-filled sample
    // while dd faults its buffer in. Billed must lie within that, and not drift outside it.
    assert!(
        (475.0..=700.0).contains(&mib_s),
        "MiB·s of 100 MiB held for 5 s on a 1 s sampling grid: got {mib_s:.1}, \
         want 5 to 6 samples of 100 MiB plus at most one partial (475 to 700)"
    );
    let peak = recs.iter().map(|r| r.memory_peak_bytes).max().unwrap();
    assert!(peak as f64 >= 95.0 * MIB, "peak {peak}");

    // GetUsage agrees with the records, per window and per second.
    for g in [pb::Granularity::Window, pb::Granularity::Second] {
        let u = api
            .u
            .get_usage(pb::GetUsageRequest {
                tenant: "m".into(),
                container: burn.clone(),
                granularity: g as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let total = u.total.unwrap().cpu_seconds;
        within(&format!("GetUsage {g:?} total"), total, cpu, 1e-6);
    }

    // A container that lives 300 ms is billed.
    let blip = api
        .run(
            "m",
            "blip",
            "while :; do :; done & sleep 0.3; kill $!",
            None,
        )
        .await;
    assert_eq!(api.wait("m", &blip).await, 0);
    api.delete("m", &blip).await;
    let recs = api.billed("m", &blip).await;
    let cpu: f64 = recs.iter().map(|r| r.cpu_seconds).sum();
    eprintln!(
        "measured: 300 ms container billed {cpu:.4} CPU-s in {} record(s)",
        recs.len()
    );
    assert!(cpu > 0.05, "a 300 ms burn billed {cpu} CPU-s: {recs:?}");

    // The tenant's usage covers its containers' (and its engine's). The tenant is still alive,
    // so its last window may be open: GetUsage per window counts it, the records do not yet.
    // The tenant cgroup is read on ticks only: wait for the one after the short container.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let containers: f64 = api
        .records("m")
        .await
        .iter()
        .filter(|r| !r.container.is_empty())
        .map(|r| r.cpu_seconds)
        .sum();
    let tenant = api
        .u
        .get_usage(pb::GetUsageRequest {
            tenant: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap()
        .cpu_seconds;
    assert!(
        tenant >= containers * 0.999,
        "tenant {tenant} CPU-s, its containers {containers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stream_resumes_from_a_cursor_and_tenants_read_only_their_own() {
    if !require_root("records_stream_resumes_from_a_cursor_and_tenants_read_only_their_own") {
        return;
    }
    let agent = TestAgent::start(|c| c.usage.window_secs = 1).await.unwrap();
    let mut api = Api::new(agent.unix().await, agent.dir.path());
    api.tenant("a").await;
    api.tenant("b").await;
    api.run("a", "s", "sleep 600", None).await;
    api.run("b", "s", "sleep 600", None).await;

    // A consumer takes a few records, disconnects, and comes back from its last cursor.
    let mut got = Vec::new();
    let mut cursor = 0;
    for _ in 0..3 {
        let mut s = api
            .u
            .stream_records(pb::StreamRecordsRequest {
                after_cursor: cursor,
                tenant: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        for _ in 0..4 {
            let r = tokio::time::timeout(Duration::from_secs(10), s.next())
                .await
                .expect("no record within 10 s")
                .unwrap()
                .unwrap();
            assert!(r.cursor > cursor, "cursors only grow");
            cursor = r.cursor;
            got.push(r);
        }
        drop(s);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let all = api.records("").await;
    assert_unique_ids(&all);
    assert_unique_ids(&got);
    let want: Vec<_> = all.iter().filter(|r| r.cursor <= cursor).cloned().collect();
    assert_eq!(
        got, want,
        "the stream holds every record up to its cursor once"
    );
    assert!(all.iter().any(|r| r.tenant == "a") && all.iter().any(|r| r.tenant == "b"));

    // Acks move forward only, and never past what exists.
    let acked = api
        .u
        .ack_records(pb::AckRecordsRequest { cursor })
        .await
        .unwrap()
        .into_inner()
        .acked_cursor;
    assert_eq!(acked, cursor);
    let e = api
        .u
        .ack_records(pb::AckRecordsRequest { cursor: u64::MAX })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // tenant:a sees only its own records and usage, and cannot ack.
    let mut ua = UsageServiceClient::new(agent.as_role("tenant:a").await);
    let mine = ua
        .read_records(pb::ReadRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(!mine.is_empty() && mine.iter().all(|r| r.tenant == "a"));
    let e = ua
        .get_usage(pb::GetUsageRequest {
            tenant: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = ua
        .read_records(pb::ReadRecordsRequest {
            tenant: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = ua
        .ack_records(pb::AckRecordsRequest { cursor: 1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Bad input names the field.
    let e = api
        .u
        .read_records(pb::ReadRecordsRequest {
            limit: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limit"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_mid_burn_loses_and_doubles_nothing() {
    if !require_root("kill_9_of_the_agent_mid_burn_loses_and_doubles_nothing") {
        return;
    }
    use caas_agent::client::{self, Target};
    use caas_tests::{AgentProcess, cleanup_tenants, unique_slice};
    let dir = tempfile::tempdir().unwrap();
    let slice = unique_slice();
    let cfg = caas_tests::write_agent_config(dir.path(), &slice, "[usage]\nwindow_secs = 2\n");
    let socket = dir.path().join("run/agent.sock");
    let connect = || async {
        let ch = client::connect(&Target::Unix(socket.clone()))
            .await
            .unwrap();
        Api::new(ch, dir.path())
    };
    let mut agent = AgentProcess::spawn(&cfg, &socket, &dir.path().join("a1.log"))
        .await
        .unwrap();
    let mut api = connect().await;
    api.tenant("k").await;
    let burn = api.run("k", "burn", "while :; do :; done", Some(0.5)).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;

    agent.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    agent
        .wait_for_exit(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("agent died");
    drop(agent);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _agent = AgentProcess::spawn(&cfg, &socket, &dir.path().join("a2.log"))
        .await
        .unwrap();
    let mut api = connect().await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    api.kill("k", &burn).await;
    assert_eq!(api.wait("k", &burn).await, 137);
    let kernel = cgroup_cpu_seconds(&slice, "k", &burn);
    api.delete("k", &burn).await;
    let recs = api.billed("k", &burn).await;
    assert_unique_ids(&recs);
    let cpu: f64 = recs.iter().map(|r| r.cpu_seconds).sum();
    eprintln!("measured: across kill -9 billed {cpu:.4} CPU-s, cgroup counter {kernel:.4} s");
    within("CPU-s billed across a kill -9", cpu, kernel, 0.01);
    assert!(kernel > 4.0, "10 s at half a CPU burned only {kernel} s");
    let mut starts: Vec<_> = recs.iter().map(|r| r.window_start_unix_s).collect();
    starts.dedup();
    assert_eq!(starts.len(), recs.len(), "no window twice: {recs:?}");
    cleanup_tenants(&socket, &slice);
}

/// A minimal HTTP/1.1 sink: answers 503 until `accept_after`, then 200, and keeps every body
/// it accepted.
async fn sink(
    listener: tokio::net::TcpListener,
    accept_after: std::time::Instant,
    got: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        let got = got.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                // Headers, then Content-Length bytes of body.
                let mut chunk = [0u8; 65536];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
                let status = if std::time::Instant::now() < accept_after {
                    "503 Service Unavailable"
                } else {
                    assert!(
                        head.contains("application/cloudevents-batch+json"),
                        "{head}"
                    );
                    let events: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
                    got.lock().unwrap().extend(events);
                    "200 OK"
                };
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                if conn.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_export_survives_a_refusing_sink_and_metrics_pass_promtool() {
    if !require_root("cloudevents_export_survives_a_refusing_sink_and_metrics_pass_promtool") {
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let accept_after = std::time::Instant::now() + Duration::from_secs(10);
    tokio::spawn(sink(listener, accept_after, got.clone()));
    let agent = TestAgent::start(|c| {
        c.usage.window_secs = 1;
        c.export.endpoint = Some(format!("http://127.0.0.1:{port}/usage"));
        c.export.retry_initial_ms = 200;
        c.export.retry_max_ms = 1000;
        c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
    .unwrap();
    let mut api = Api::new(agent.unix().await, agent.dir.path());
    api.tenant("e").await;
    api.run("e", "s", "sleep 600", None).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        !api.records("").await.is_empty(),
        "records were written while the sink refused"
    );

    // Every record the ledger holds reaches the sink, once each after dedup by id.
    let mut delivered = BTreeMap::new();
    let mut missing = Vec::new();
    for _ in 0..40 {
        let all = api.records("").await;
        delivered = got
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e["id"].as_str().unwrap().to_string(), e.clone()))
            .collect::<BTreeMap<_, _>>();
        missing = all
            .iter()
            .filter(|r| !delivered.contains_key(&r.id))
            .map(|r| r.id.clone())
            .collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let e = delivered.values().next().unwrap();
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["subject"], "e");
    assert!(e["source"].as_str().unwrap().contains(&agent_node(&agent)));
    assert!(e["data"]["cpu_seconds"].is_number(), "{e}");
    // Duplicates are allowed (at least once), different values under one id are not.
    for ev in got.lock().unwrap().iter() {
        assert_eq!(&delivered[ev["id"].as_str().unwrap()], ev);
    }

    // Metrics: well-formed for promtool, with this tenant's series.
    let addr = agent.agent.as_ref().unwrap().metrics_addr.unwrap();
    let text = http_get(addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap().to_string();
    assert!(body.contains("caas_tenant_cpu_seconds_total{"), "{body}");
    assert!(body.contains("tenant=\"e\""), "{body}");
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(http_get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
}

fn agent_node(agent: &TestAgent) -> String {
    let _ = agent;
    nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// One GET over a fresh connection; the whole response as text.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
