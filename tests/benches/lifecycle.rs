//! Container lifecycle benchmark: caas-agent through its gRPC API next to `crun run` and
//! `runc run`, plus the memory of a tenant engine and of the agent, and a burst of concurrent
//! creates. Prints one plain-text table.
//!
//! Run as root from the workspace root:
//!
//! ```sh
//! cargo build --release --bins -p caas-agent      # the tenant engine binary, see below
//! cargo bench -p caas-tests --bench lifecycle
//! ```
//!
//! `cargo bench` builds this file in the release profile, and the test harness starts tenant
//! engines from the `caas-agent` binary next to it (`target/release/caas-agent`), which
//! `cargo bench` does not build: hence the first command. The bench stops with a message saying
//! so when that binary is missing.
//!
//! The peers (`crun`, `runc`) are optional: a missing one gets a "not installed" row. Each peer
//! runs in a child process (this executable again, see [`peer_child`]) that has its own mount
//! namespace in which `/sys/fs/cgroup/unified` is unmounted, because Debian's crun refuses the
//! hybrid cgroup layout; runc gets the same treatment so both see the same host.
//!
//! Every directory of the run (the agent's state and run dirs, the peers' bundles and state
//! roots) comes from `tempfile`, so `TMPDIR` places them all on one file system. On the CI
//! machines `/tmp` is an ext4 without a journal, on which every new inode costs a scan of
//! recently deleted ones (perf: `recently_deleted`, `find_get_block_common`). That costs a few
//! milliseconds per container, more for the agent (about 15 inodes per container: container dir,
//! overlay upper and work, logs, record, bundle, runtime state) than for crun (about 4). Point
//! `TMPDIR` at a journaled file system (e.g. a loop-mounted ext4) or a tmpfs to compare the
//! runtimes rather than that file system. The effect grows with every run in a row: ext4 counts
//! an inode as recently deleted for up to five minutes, and one run deletes some 3,000. Seen
//! here on 2026-12-05: three runs back to back on `/tmp` gave the agent a median of 16, 28 and
//! 39 ms, where a tmpfs gave 11 to 12 (crun 7 to 9 throughout). The table names the file
//! system `TMPDIR` is on.
//!
//! The third peer, `libcontainer`, is youki's libcontainer driven in-process with the peers'
//! bundle (no runtime binary to exec): the floor of the library the agent's engine uses.
//!
//! The lifecycles run in rounds ([`ROUNDS`]): the agent's share, then each peer's (a child
//! process per peer and round, one untimed run first), the peers in an order rotated per round,
//! so that a slow stretch of this noisy machine falls on every runtime rather than on one.

#![allow(clippy::unwrap_used)] // a benchmark harness: a failing setup step should stop it loudly

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use caas_proto::v1::{
    self as pb, container_service_client::ContainerServiceClient,
    tenant_service_client::TenantServiceClient,
};
use caas_tests::{TestAgent, busybox_rootfs};
use serde_json::json;
use tonic::transport::Channel;

const WARMUP: usize = 3;
const ITERS: usize = 50;
/// The lifecycles run in this many rounds: in each, ITERS / ROUNDS of the agent's, then as many
/// of each peer's, every runtime's share after one untimed run of its own (the agent's first
/// after the WARMUP ones), the peers in an order rotated per round.
/// So a slow stretch of the machine falls on all of them rather than on one.
const ROUNDS: usize = 5;
/// Containers kept running for the memory figures.
const MANY: usize = 100;
/// Containers created at once for the burst figure.
const BURST: usize = 20;
/// Host uid/gid that container root maps to for the peers (one range of 65,536 ids).
const PEER_HOST_ID: u32 = 2_000_000;
const PEER_ID_COUNT: u32 = 65_536;
const TENANT: &str = "bench";

/// Environment of the peer child process (see [`peer_child`]).
const ENV_CHILD: &str = "CAAS_BENCH_PEER_CHILD";
const ENV_RUNTIME: &str = "CAAS_BENCH_PEER_RUNTIME";
const ENV_BUNDLE: &str = "CAAS_BENCH_PEER_BUNDLE";
const ENV_ROOT: &str = "CAAS_BENCH_PEER_ROOT";
const ENV_PREFIX: &str = "CAAS_BENCH_PEER_PREFIX";
const ENV_COUNT: &str = "CAAS_BENCH_PEER_COUNT";
/// The in-process peer: youki's libcontainer driven directly, as `youki run` does, with the
/// peers' bundle. It is the floor of what any caller of libcontainer can reach on this host.
const LIBCONTAINER: &str = "libcontainer";

fn main() {
    if std::env::var_os(ENV_CHILD).is_some() {
        std::process::exit(peer_child());
    }
    if !nix::unistd::geteuid().is_root() {
        println!("lifecycle bench: needs root (user namespaces, cgroups, mounts); skipped");
        return;
    }
    if let Err(e) = caas_tests::check_bench_agent_binary() {
        eprintln!("lifecycle bench: {e:#}");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut peers = [
        PeerRounds::new("crun", which("crun")),
        PeerRounds::new("runc", which("runc")),
        PeerRounds::new(LIBCONTAINER, Some(PathBuf::from(LIBCONTAINER))),
    ];
    let mut between = |round: usize| {
        let n = peers.len();
        for k in 0..n {
            peers[(round + k) % n].run_round(round);
        }
    };
    let agent = match rt.block_on(bench_agent(&mut between)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lifecycle bench: caas-agent part failed: {e:#}");
            std::process::exit(1);
        }
    };
    drop(rt);
    let [crun, runc, lc] = peers.map(PeerRounds::finish);
    print!("{}", table(&agent, &crun, &runc, &lc));
}

// ---------------------------------------------------------------------------------------------
// caas-agent

struct AgentResults {
    lifecycle_ms: Vec<f64>,
    /// Per call of the lifecycle: create, start, wait, delete.
    calls_ms: [Vec<f64>; 4],
    engine_fresh_kib: u64,
    engine_idle_kib: u64,
    engine_many_kib: u64,
    bench_idle_kib: u64,
    bench_many_kib: u64,
    burst_wall_ms: f64,
    burst_slowest_ms: f64,
    /// One inspect of a running container: through the agent (client -> agent -> engine), and
    /// straight to the engine's socket (one hop).
    inspect_api_ms: Vec<f64>,
    inspect_engine_ms: Vec<f64>,
    notes: Vec<String>,
}

fn cref(c: &str) -> Option<pb::ContainerRef> {
    Some(pb::ContainerRef {
        tenant: TENANT.into(),
        container: c.into(),
    })
}

fn create_req(rootfs: &str, name: &str, command: &[&str]) -> pb::CreateContainerRequest {
    pb::CreateContainerRequest {
        tenant: TENANT.into(),
        name: name.into(),
        rootfs_path: rootfs.into(),
        command: command.iter().map(|s| (*s).to_string()).collect(),
        ..Default::default()
    }
}

/// Create + start; returns the container (with its host pid).
async fn create_start(
    c: &mut ContainerServiceClient<Channel>,
    req: pb::CreateContainerRequest,
) -> Result<pb::Container, tonic::Status> {
    let name = req.name.clone();
    c.create_container(req).await?;
    Ok(
        c.start_container(pb::StartContainerRequest { r#ref: cref(&name) })
            .await?
            .into_inner(),
    )
}

async fn delete(c: &mut ContainerServiceClient<Channel>, name: &str) -> anyhow::Result<()> {
    c.delete_container(pb::DeleteContainerRequest {
        r#ref: cref(name),
        force: true,
    })
    .await
    .with_context(|| format!("deleting {name}"))?;
    Ok(())
}

/// One full lifecycle of `/bin/true`: create, start, wait, delete. Returns the whole time and
/// the time of each call.
async fn lifecycle(
    c: &mut ContainerServiceClient<Channel>,
    rootfs: &str,
    name: &str,
) -> anyhow::Result<(Duration, [Duration; 4])> {
    let t0 = Instant::now();
    c.create_container(create_req(rootfs, name, &["/bin/true"]))
        .await
        .with_context(|| format!("create {name}"))?;
    let t_create = t0.elapsed();
    c.start_container(pb::StartContainerRequest { r#ref: cref(name) })
        .await
        .with_context(|| format!("start {name}"))?;
    let t_start = t0.elapsed();
    let w = tokio::time::timeout(
        Duration::from_secs(60),
        c.wait_container(pb::WaitContainerRequest { r#ref: cref(name) }),
    )
    .await
    .with_context(|| format!("waiting for {name}: timed out"))?
    .with_context(|| format!("waiting for {name}"))?
    .into_inner();
    let t_wait = t0.elapsed();
    c.delete_container(pb::DeleteContainerRequest {
        r#ref: cref(name),
        force: false,
    })
    .await
    .with_context(|| format!("deleting {name}"))?;
    let d = t0.elapsed();
    ensure!(w.exit_code == 0, "{name}: /bin/true exited {}", w.exit_code);
    Ok((
        d,
        [t_create, t_start - t_create, t_wait - t_start, d - t_wait],
    ))
}

async fn bench_agent(between: &mut dyn FnMut(usize)) -> anyhow::Result<AgentResults> {
    let mut agent = TestAgent::start(|_| {}).await?;
    let r = bench_agent_on(&agent, between).await;
    // Deletes the tenant (its engine and any container left by a failure) and shuts down.
    agent.stop().await?;
    r
}

async fn bench_agent_on(
    agent: &TestAgent,
    between: &mut dyn FnMut(usize),
) -> anyhow::Result<AgentResults> {
    let ch = agent.unix().await;
    let mut t = TenantServiceClient::new(ch.clone());
    let mut c = ContainerServiceClient::new(ch);
    let rootfs = busybox_rootfs(agent.dir.path()).display().to_string();
    let mut notes = Vec::new();

    t.create_tenant(pb::CreateTenantRequest {
        id: TENANT.into(),
        quotas: Some(pb::Quotas {
            cpus: Some(2.0),
            memory_bytes: Some(4 << 30),
            pids: Some(4096),
            max_containers: Some(u32::try_from(MANY + BURST)?),
        }),
        ..Default::default()
    })
    .await
    .context("creating the tenant")?;

    // The engine is `caas-agent engine --tenant bench ... --run-dir <this agent's run dir>`;
    // matching the run dir keeps engines of other agents on this host out.
    let run_dir = agent.dir.path().join("run");
    let engine = find_engine(TENANT, &run_dir)
        .with_context(|| format!("no engine process for run dir {}", run_dir.display()))?;
    let engine_fresh_kib = vm_rss_kib(engine)?;

    // Lifecycles of /bin/true; the first warm-up also copies the rootfs into the tenant's images.
    let mut lifecycle_ms = Vec::with_capacity(ITERS);
    let mut calls_ms: [Vec<f64>; 4] = Default::default();
    for i in 0..WARMUP + ITERS {
        let (d, calls) = lifecycle(&mut c, &rootfs, &format!("true-{i}")).await?;
        if i >= WARMUP {
            lifecycle_ms.push(ms(d));
            for (v, t) in calls_ms.iter_mut().zip(calls) {
                v.push(ms(t));
            }
            if (i - WARMUP + 1).is_multiple_of(ITERS / ROUNDS) {
                // The peers' share of this round (blocking: child processes), while the agent
                // idles on the runtime's workers.
                let round = (i - WARMUP) / (ITERS / ROUNDS);
                tokio::task::block_in_place(|| between(round));
                // One untimed run to come back, as each peer's round begins with one.
                if round + 1 < ROUNDS {
                    lifecycle(&mut c, &rootfs, &format!("true-{i}-rewarm")).await?;
                }
            }
        }
    }

    // Round trips: what one call costs with no container work in it.
    create_start(&mut c, create_req(&rootfs, "probe", &["/bin/sleep", "600"]))
        .await
        .context("create+start probe")?;
    let mut inspect_api_ms = Vec::with_capacity(ITERS);
    for i in 0..WARMUP + ITERS {
        let t0 = Instant::now();
        c.inspect_container(pb::InspectContainerRequest {
            r#ref: cref("probe"),
        })
        .await
        .context("inspect probe")?;
        if i >= WARMUP {
            inspect_api_ms.push(ms(t0.elapsed()));
        }
    }
    let sock = run_dir.join("tenants").join(TENANT).join("engine.sock");
    let mut e = caas_proto::engine::v1::engine_client::EngineClient::new(
        caas_agent::client::connect(&caas_agent::client::Target::Unix(sock.clone()))
            .await
            .with_context(|| format!("connecting to the engine at {}", sock.display()))?,
    );
    let mut inspect_engine_ms = Vec::with_capacity(ITERS);
    for i in 0..WARMUP + ITERS {
        let t0 = Instant::now();
        e.inspect(caas_proto::engine::v1::ContainerId {
            container: "probe".into(),
        })
        .await
        .context("engine inspect probe")?;
        if i >= WARMUP {
            inspect_engine_ms.push(ms(t0.elapsed()));
        }
    }
    drop(e);
    delete(&mut c, "probe").await?;

    // Memory: the idle engine and this process, then with MANY sleeping containers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let engine_idle_kib = vm_rss_kib(engine)?;
    let bench_idle_kib = vm_rss_kib(std::process::id())?;
    let mut pids = Vec::with_capacity(MANY);
    for i in 0..MANY {
        let name = format!("sleep-{i}");
        let made = create_start(&mut c, create_req(&rootfs, &name, &["/bin/sleep", "600"]))
            .await
            .with_context(|| format!("create+start {name}"))?;
        pids.push(made.pid);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alive = pids
        .iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .count();
    ensure!(
        alive == MANY,
        "only {alive} of {MANY} sleep containers are running"
    );
    let engine_many_kib = vm_rss_kib(engine)?;
    let bench_many_kib = vm_rss_kib(std::process::id())?;
    // Cross-check: a container's init is the engine's child.
    if let Some(&pid) = pids.first() {
        match ppid(pid) {
            Ok(pp) if pp == engine => {}
            Ok(pp) => notes.push(format!(
                "container init {pid} has parent {pp}, not the engine {engine} found by cmdline"
            )),
            Err(e) => notes.push(format!("reading the parent of container init {pid}: {e:#}")),
        }
    }
    for i in 0..MANY {
        delete(&mut c, &format!("sleep-{i}")).await?;
    }

    // Burst: BURST create+start calls at once, each from its own task on its own connection
    // (connections are made before the clock starts).
    let mut clients = Vec::with_capacity(BURST);
    for _ in 0..BURST {
        clients.push(ContainerServiceClient::new(agent.unix().await));
    }
    let t0 = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut cl)| {
            let req = create_req(&rootfs, &format!("burst-{i}"), &["/bin/sleep", "600"]);
            tokio::spawn(async move {
                let s = Instant::now();
                create_start(&mut cl, req).await.map(|_| s.elapsed())
            })
        })
        .collect();
    let results = futures::future::join_all(tasks).await;
    let burst_wall_ms = ms(t0.elapsed());
    let mut burst_slowest_ms: f64 = 0.0;
    let mut failures = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(Ok(d)) => burst_slowest_ms = burst_slowest_ms.max(ms(d)),
            Ok(Err(s)) => failures.push(format!("burst-{i}: {}", s.message())),
            Err(e) => failures.push(format!("burst-{i}: task: {e}")),
        }
    }
    for i in 0..BURST {
        // A failed create leaves nothing to delete; ignore that case only.
        if let Err(e) = delete(&mut c, &format!("burst-{i}")).await
            && failures.is_empty()
        {
            return Err(e);
        }
    }
    ensure!(
        failures.is_empty(),
        "concurrent create+start failed: {}",
        failures.join("; ")
    );

    Ok(AgentResults {
        lifecycle_ms,
        calls_ms,
        engine_fresh_kib,
        engine_idle_kib,
        engine_many_kib,
        bench_idle_kib,
        bench_many_kib,
        burst_wall_ms,
        burst_slowest_ms,
        inspect_api_ms,
        inspect_engine_ms,
        notes,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The pid of `caas-agent engine --tenant <tenant> ... --run-dir <run_dir> ...`.
fn find_engine(tenant: &str, run_dir: &Path) -> anyhow::Result<u32> {
    let run_dir = run_dir.to_string_lossy();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let has = |k: &str, v: &str| args.windows(2).any(|w| w[0] == k && w[1] == v);
        if args.get(1).is_some_and(|a| a == "engine")
            && has("--tenant", tenant)
            && has("--run-dir", &run_dir)
        {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("not found"),
        many => bail!("several candidates: {many:?}"),
    }
}

fn status_field(pid: u32, key: &str) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim_start_matches(':').trim().to_string())
        .with_context(|| format!("/proc/{pid}/status has no {key}"))
}

fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let v = status_field(pid, "VmRSS")?;
    let n = v.trim_end_matches("kB").trim();
    n.parse().with_context(|| format!("VmRSS of {pid}: {v:?}"))
}

fn ppid(pid: u32) -> anyhow::Result<u32> {
    Ok(status_field(pid, "PPid")?.parse()?)
}

// ---------------------------------------------------------------------------------------------
// Peers: crun and runc

enum Peer {
    Missing,
    Failed(String),
    Ran { version: String, ms: Vec<f64> },
}

/// A peer across the rounds: its runtime (None: not installed) and what its rounds gave.
struct PeerRounds {
    name: &'static str,
    runtime: Option<PathBuf>,
    ms: Vec<f64>,
    failed: Option<String>,
}

impl PeerRounds {
    fn new(name: &'static str, runtime: Option<PathBuf>) -> Self {
        Self {
            name,
            runtime,
            ms: Vec::with_capacity(ITERS),
            failed: None,
        }
    }

    /// One round's runs (nothing more once a round failed).
    fn run_round(&mut self, round: usize) {
        let Some(rt) = self.runtime.clone() else {
            return;
        };
        if self.failed.is_some() {
            return;
        }
        let runtime = (self.name != LIBCONTAINER).then_some(rt.as_path());
        match run_peer(self.name, runtime, round) {
            Ok(ms) => self.ms.extend(ms),
            Err(e) => self.failed = Some(format!("{e:#}")),
        }
    }

    fn finish(self) -> Peer {
        match (self.runtime, self.failed) {
            (None, _) => Peer::Missing,
            (_, Some(e)) => Peer::Failed(e),
            (Some(rt), None) => Peer::Ran {
                version: if self.name == LIBCONTAINER {
                    "libcontainer 0.7 in-process".to_string()
                } else {
                    caas_tests::first_line(&rt, &["--version"])
                },
                ms: self.ms,
            },
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// One round of a peer: one untimed run, then ITERS / ROUNDS timed ones; their times in ms.
fn run_peer(name: &str, runtime: Option<&Path>, round: usize) -> anyhow::Result<Vec<f64>> {
    let count = 1 + ITERS / ROUNDS;

    // One bundle per peer: a busybox rootfs owned by the mapped root, and a config.json.
    let dir = tempfile::Builder::new()
        .prefix(&format!("caas-bench-{name}-"))
        .tempdir()?;
    // The container's root (host uid PEER_HOST_ID) must traverse to its rootfs.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let rootfs = busybox_rootfs(dir.path());
    chown_tree(&rootfs, PEER_HOST_ID)?;
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec_pretty(&peer_config(&rootfs))?,
    )?;
    let state_root = dir.path().join("state");
    std::fs::create_dir(&state_root)?;

    let out = Command::new(std::env::current_exe()?)
        .env(ENV_CHILD, "1")
        .env(ENV_RUNTIME, runtime.unwrap_or(Path::new(LIBCONTAINER)))
        .env(ENV_BUNDLE, dir.path())
        .env(ENV_ROOT, &state_root)
        .env(
            ENV_PREFIX,
            format!("bench-{name}-{}-{round}", std::process::id()),
        )
        .env(ENV_COUNT, count.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("running the peer child")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why = stdout
            .lines()
            .filter(|l| l.starts_with("error"))
            .chain(stderr.lines())
            .collect::<Vec<_>>()
            .join(" | ");
        bail!("{name} run failed ({}): {why}", out.status);
    }
    let all: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ms "))
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("parsing the peer child's timings")?;
    ensure!(
        all.len() == count,
        "peer child reported {} timings, expected {count}",
        all.len(),
    );
    // `dir` (bundle, rootfs, state root) is removed on drop.
    Ok(all[1..].to_vec())
}

fn chown_tree(p: &Path, id: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(p, Some(id), Some(id))
        .with_context(|| format!("chown {}", p.display()))?;
    if std::fs::symlink_metadata(p)?.is_dir() {
        for e in std::fs::read_dir(p)? {
            chown_tree(&e?.path(), id)?;
        }
    }
    Ok(())
}

/// An OCI config for `/bin/true` with its own user namespace (container 0..65536 -> host
/// PEER_HOST_ID..), network, pid, ipc, uts and mount namespaces; the mounts, capabilities and
/// masked paths of a usual default spec; no seccomp profile and no cgroup limits.
fn peer_config(rootfs: &Path) -> serde_json::Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    let map = json!([{ "containerID": 0, "hostID": PEER_HOST_ID, "size": PEER_ID_COUNT }]);
    let ns = |t: &str| json!({ "type": t });
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": ["/bin/true"],
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
            "noNewPrivileges": true
        },
        "root": { "path": rootfs, "readonly": false },
        "hostname": "bench",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "uidMappings": map,
            "gidMappings": map,
            "namespaces": [ns("pid"), ns("network"), ns("ipc"), ns("uts"), ns("mount"), ns("user")],
            "resources": { "devices": [{ "allow": false, "access": "rwm" }] },
            "maskedPaths": [
                "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// The peer child: this executable started again with `ENV_CHILD` set. It makes a private mount
/// namespace, unmounts `/sys/fs/cgroup/unified` there (Debian's crun refuses the hybrid layout),
/// then runs `<runtime> --root <state> run --bundle <bundle> <unique id>` COUNT times, printing
/// `ms <t>` per run on stdout.
///
/// What one timing includes: fork+exec of the runtime binary, its whole `run` (namespaces, id
/// maps, mounts, cgroups, starting /bin/true, waiting for it, deleting the container) and this
/// process's waitpid. Not included: making this child, the unshare/umount (done once), and
/// writing the bundle.
///
/// With the runtime [`LIBCONTAINER`], each run is [`libcontainer_run`] in this process instead
/// (no fork+exec of a runtime binary: the floor for a caller of the library).
fn peer_child() -> i32 {
    match peer_child_inner() {
        Ok(()) => 0,
        Err(e) => {
            println!("error {e:#}");
            1
        }
    }
}

fn peer_child_inner() -> anyhow::Result<()> {
    use nix::{
        mount::{MntFlags, MsFlags, mount, umount2},
        sched::{CloneFlags, unshare},
    };
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} not set"));
    let runtime = var(ENV_RUNTIME)?;
    let bundle = var(ENV_BUNDLE)?;
    let root = var(ENV_ROOT)?;
    let prefix = var(ENV_PREFIX)?;
    let count: usize = var(ENV_COUNT)?.parse()?;

    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private")?;
    let unified = Path::new("/sys/fs/cgroup/unified");
    match umount2(unified, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point, ENOENT: absent; either way not a hybrid layout.
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => bail!("umount {}: {e}", unified.display()),
    }

    let mut out = std::io::stdout().lock();
    let mut result = Ok(());
    if runtime == LIBCONTAINER {
        // The container's init is reparented here when libcontainer's intermediate exits.
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
        for i in 0..count {
            let id = format!("{prefix}-{i}");
            let t0 = Instant::now();
            libcontainer_run(Path::new(&root), Path::new(&bundle), &id)
                .with_context(|| format!("{id}: libcontainer"))?;
            writeln!(out, "ms {:.4}", ms(t0.elapsed()))?;
        }
        return Ok(());
    }
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let t0 = Instant::now();
        let o = Command::new(&runtime)
            .arg("--root")
            .arg(&root)
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        let d = t0.elapsed();
        match o {
            Ok(o) if o.status.success() => writeln!(out, "ms {:.4}", ms(d))?,
            Ok(o) => {
                result = Err(anyhow::anyhow!(
                    "{id}: {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                break;
            }
            Err(e) => {
                result = Err(anyhow::anyhow!("spawning {runtime}: {e}"));
                break;
            }
        }
    }
    out.flush()?;
    // Whatever a failed run left in the state root: delete it (the state root itself goes with
    // the parent's temp dir).
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let _ = Command::new(&runtime)
                .arg("--root")
                .arg(&root)
                .args(["delete", "--force"])
                .arg(e.file_name())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    result
}

/// One `run` of the bundle by libcontainer, as `youki run` does it: create (detached), start,
/// wait for the init, delete. Stdio is /dev/null (this process's stdout carries the timings).
fn libcontainer_run(root: &Path, bundle: &Path, id: &str) -> anyhow::Result<()> {
    use libcontainer::{container::builder::ContainerBuilder, syscall::syscall::SyscallType};
    use nix::sys::wait::{WaitStatus, waitpid};
    let null = || -> anyhow::Result<std::os::fd::OwnedFd> {
        Ok(std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?
            .into())
    };
    let mut c = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(root)?
        .with_stdin(null()?)
        .with_stdout(null()?)
        .with_stderr(null()?)
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .context("create")?;
    c.start().context("start")?;
    let pid = c.pid().context("no pid after start")?;
    let st = waitpid(pid, None).context("waitpid")?;
    c.delete(true).context("delete")?;
    ensure!(
        matches!(st, WaitStatus::Exited(_, 0)),
        "/bin/true ended with {st:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report

use caas_tests::stats;

const LABEL_W: usize = 58;

fn row3(out: &mut String, label: &str, a: &str, b: &str, c: &str) {
    let _ = writeln!(out, "{label:<LABEL_W$}{a:>9}{b:>9}{c:>9}");
}

fn row(out: &mut String, label: &str, value: &str) {
    let _ = writeln!(out, "{label:<LABEL_W$}{value:>9}");
}

/// The kind of file system `p` is on, by its magic number.
fn fs_name(p: &Path) -> String {
    use nix::sys::statfs::{EXT4_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC, statfs};
    match statfs(p).map(|s| s.filesystem_type()) {
        Ok(t) if t == EXT4_SUPER_MAGIC => "ext4 (see the bench's doc: without a journal it \
                                           slows every run that follows another)"
            .into(),
        Ok(t) if t == TMPFS_MAGIC => "tmpfs".into(),
        Ok(t) if t == XFS_SUPER_MAGIC => "xfs".into(),
        Ok(t) => format!("a file system of type {:#x}", t.0),
        Err(e) => format!("an unknown file system ({e})"),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn delta_mib(from: u64, to: u64) -> String {
    format!("{:+.1}", (to as f64 - from as f64) / 1024.0)
}

fn table(a: &AgentResults, crun: &Peer, runc: &Peer, lc: &Peer) -> String {
    let mut o = String::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let _ = writeln!(
        o,
        "\n{ITERS} iterations after {WARMUP} warm-ups, in {ROUNDS} rounds (the agent's share, then each peer's, each after an untimed run); {cpus} CPUs; loadavg {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let rule = "-".repeat(LABEL_W + 27);
    let _ = writeln!(o, "{rule}");
    row3(
        &mut o,
        "lifecycle of /bin/true (create+start+wait+delete), ms",
        "median",
        "p90",
        "min",
    );
    let ours = stats(&a.lifecycle_ms);
    let f = |x: f64| format!("{x:.2}");
    row3(
        &mut o,
        "caas-agent (gRPC, userns+netns)",
        &f(ours.median),
        &f(ours.p90),
        &f(ours.min),
    );
    for (call, v) in ["create", "start", "wait (until exit)", "delete"]
        .iter()
        .zip(&a.calls_ms)
    {
        let s = stats(v);
        row3(
            &mut o,
            &format!("  of which {call}"),
            &f(s.median),
            &f(s.p90),
            &f(s.min),
        );
    }
    let mut versions = Vec::new();
    for (name, peer) in [("crun", crun), ("runc", runc), (LIBCONTAINER, lc)] {
        let label = format!("{name} run (userns+netns)");
        match peer {
            Peer::Missing => row(
                &mut o,
                &format!("peer {name} not installed: apt-get install {name}"),
                "-",
            ),
            Peer::Failed(e) => {
                row(&mut o, &label, "FAILED");
                let _ = writeln!(o, "    {e}");
            }
            Peer::Ran { version, ms } => {
                let s = stats(ms);
                row3(&mut o, &label, &f(s.median), &f(s.p90), &f(s.min));
                versions.push(version.clone());
            }
        }
    }
    for (name, peer) in [("crun", crun), ("runc", runc), (LIBCONTAINER, lc)] {
        let label = format!("ratio caas-agent / {name}");
        if let Peer::Ran { ms, .. } = peer {
            let s = stats(ms);
            let r = |x: f64, y: f64| format!("{:.2}x", x / y);
            row3(
                &mut o,
                &label,
                &r(ours.median, s.median),
                &r(ours.p90, s.p90),
                &r(ours.min, s.min),
            );
        } else {
            row3(&mut o, &label, "n/a", "n/a", "n/a");
        }
    }
    let _ = writeln!(o, "{rule}");
    let _ = writeln!(o, "memory (VmRSS), MiB");
    row(
        &mut o,
        "  engine, fresh tenant (no container yet)",
        &mib(a.engine_fresh_kib),
    );
    row(
        &mut o,
        &format!("  engine idle, after {} lifecycles", WARMUP + ITERS),
        &mib(a.engine_idle_kib),
    );
    row(
        &mut o,
        &format!("  engine +{MANY} running containers"),
        &delta_mib(a.engine_idle_kib, a.engine_many_kib),
    );
    row(
        &mut o,
        "  agent (bench process, in-process agent), idle",
        &mib(a.bench_idle_kib),
    );
    row(
        &mut o,
        &format!("  agent (bench process) +{MANY} running containers"),
        &delta_mib(a.bench_idle_kib, a.bench_many_kib),
    );
    let _ = writeln!(o, "{rule}");
    row(
        &mut o,
        &format!("{BURST} concurrent create+start: total wall ms"),
        &f(a.burst_wall_ms),
    );
    row(
        &mut o,
        &format!("{BURST} concurrent create+start: slowest call ms"),
        &f(a.burst_slowest_ms),
    );
    let _ = writeln!(o, "{rule}");
    row3(
        &mut o,
        "one round trip (inspect of a running container), ms",
        "median",
        "p90",
        "min",
    );
    for (label, v) in [
        (
            "  through the agent (client -> agent -> engine)",
            &a.inspect_api_ms,
        ),
        ("  straight to the engine's socket", &a.inspect_engine_ms),
    ] {
        let s = stats(v);
        row3(&mut o, label, &f(s.median), &f(s.p90), &f(s.min));
    }
    let _ = writeln!(o, "{rule}");
    let _ = writeln!(
        o,
        "caas-agent: 4 RPCs on one unix-socket connection; the tenant's userns+netns exist \
         already (containers join them), plus an overlay rootfs, cgroup, seccomp per container."
    );
    let _ = writeln!(
        o,
        "peers: one `run` each, new userns+netns per container, no seccomp, no cgroup limits; \
         timed from spawn to exit."
    );
    let tmp = std::env::temp_dir();
    let _ = writeln!(o, "TMPDIR {} is on {}", tmp.display(), fs_name(&tmp));
    // The agent sets it at start (unless configured not to); it speeds every runtime's moves of
    // a process into a cgroup, the peers' too.
    let dynmods = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|t| caas_agent::cgroups::dynmods::find_cgroup2(&t, Path::new("/sys/fs/cgroup")))
        .map_or("no cgroup2 mount", |m| {
            if m.favors_dynmods() { "on" } else { "off" }
        });
    let _ = writeln!(o, "cgroup2 favordynmods: {dynmods}");
    if !versions.is_empty() {
        let _ = writeln!(o, "peer versions: {}", versions.join("; "));
    }
    for n in &a.notes {
        let _ = writeln!(o, "note: {n}");
    }
    o
}
