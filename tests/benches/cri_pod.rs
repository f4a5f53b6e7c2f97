//! CRI pod start benchmark: `RunPodSandbox` + `CreateContainer` + `StartContainer` of a
//! pause-like container, caas-agent's CRI next to containerd 1.6 + runc (Debian's packages), both
//! driven by the same CRI v1 client over their unix sockets in the same run. Prints one
//! plain-text table.
//!
//! Run as root from the workspace root:
//!
//! ```sh
//! cargo build --release --bins -p caas-agent      # the agent binary the bench starts
//! cargo bench -p caas-tests --bench cri_pod
//! ```
//!
//! Needs Debian's `containerd`, `runc`, `containernetworking-plugins`, `docker-registry`,
//! `skopeo` and `busybox-static` (scripts/setup.sh installs them); without one it says which
//! and skips. Knobs: `CAAS_BENCH_ITERS` (timed iterations per runtime, default 50),
//! `CAAS_BENCH_WARMUP` (untimed ones first, default 3), `CAAS_BENCH_KEEP_LOGS=1` (copies
//! containerd's and the agent's logs to the temp dir and says where).
//!
//! What it does:
//!
//! 1. Builds a pause-like image: one layer holding a static busybox with `sleep` and `sh` links,
//!    `Entrypoint ["/bin/sleep"]`, `Cmd ["infinity"]`; pushes it to Debian's `docker-registry`
//!    on 127.0.0.1 (tests/src/registry.rs). No traffic goes anywhere but 127.0.0.1.
//! 2. Starts `caas-agent serve` (target/release/caas-agent) with `[cri] enabled` and the
//!    registry in `[images] insecure_registries`, and pulls the image over CRI `PullImage` with
//!    the pod config of the bench namespace (so it lands in that namespace's tenant, as a
//!    kubelet's pull does).
//! 3. Starts `containerd` as a child on a temp root, state dir and socket, with a generated
//!    config.toml: the CRI plugin with that image as `sandbox_image`, a registry mirror
//!    `http://127.0.0.1:PORT` for it, the overlayfs snapshotter, runc through
//!    `io.containerd.runc.v2` with the cgroupfs driver (`SystemdCgroup = false`: PID 1 is not
//!    systemd here), `restrict_oom_score_adj` (root lacks CAP_SYS_RESOURCE here), network
//!    namespaces under its state dir, and CNI from a temp conf dir: a `bridge` network (its own
//!    bridge, no gateway address, no masquerade, so no host route, sysctl or iptables change)
//!    with `host-local` addresses from 10.250.0.0/24, plus the loopback network containerd
//!    always adds. Pulls the same image over CRI `PullImage`.
//! 4. Warm-ups, then timed iterations; in each, both runtimes once, the first of the two
//!    alternating: a new pod (new name and uid, namespace `bench`), `RunPodSandbox`,
//!    `CreateContainer` (the image's entrypoint, no command given), `StartContainer`, each timed
//!    from the call to its answer. Untimed: making the pod's log directory before, checking the
//!    container is `CONTAINER_RUNNING` after, then `StopPodSandbox` + `RemovePodSandbox`.
//! 5. Then, per runtime, the same for the first pod of each of a few new namespaces: for
//!    caas-agent that is the pod that creates the namespace's tenant.
//! 6. Cleans up, also on failure (guards' `Drop`): pods, containerd (SIGTERM, then whatever it
//!    left: runc containers, shims, the overlay / shm / netns mounts under its temp dirs, the
//!    CNI bridge and veths and cached results, the pods' cgroups), and the agent's tenants.
//!
//! Both runtimes give each pod a network namespace of its own set up by the same CNI plugins
//! (caas-agent with `[cri.cni]` on, its bridge inside the tenant's network namespace). The pods
//! still differ, and the report says so: containerd's `RunPodSandbox` also starts a pause
//! container; caas-agent has none (its engine holds the namespaces), and its pods live in the
//! tenant (the namespace), whose user namespace every container of the tenant joins.

#![allow(clippy::unwrap_used)] // a benchmark harness: a failing setup step should stop it loudly

use std::{
    collections::HashMap,
    fmt::Write as _,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use caas_proto::cri::v1 as cri;
use caas_tests::{
    AgentProcess, Stats, cleanup_tenants,
    cri::CriClient,
    registry::{Compression, ImageBuilder, LayerTar, OciLayout, PushMode, Registry, RegistryOpts},
    stats, unique_slice, write_agent_config,
};
use sha2::{Digest as _, Sha256};

/// The namespace of the timed pods (for caas-agent: their tenant).
const NAMESPACE: &str = "bench";
/// Namespaces made for the first-pod figures: `<prefix>-<i>`.
const FIRST_NS_PREFIX: &str = "bench-first";
const FIRST_PODS: usize = 3;
const REPO: &str = "bench/pause";
const TAG: &str = "v1";
const CALLS: [&str; 3] = ["RunPodSandbox", "CreateContainer", "StartContainer"];
/// The CRI namespace containerd keeps its pods' containers in.
const CONTAINERD_NS: &str = "k8s.io";
/// Where Debian's containernetworking-plugins are.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Pod addresses on the bench's CNI bridge (no host address or route is made for it).
const CNI_SUBNET: &str = "10.250.0.0/24";
/// libcni's cache of results (containerd 1.6 does not move it).
const CNI_CACHE_DIR: &str = "/var/lib/cni";
/// containerd 1.6 puts shim sockets here whatever its state dir (`runtime/v2/shim`).
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("cri_pod bench: needs root (tenants, cgroups, containerd); skipped");
        return;
    }
    let mut missing: Vec<String> = [
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "docker-registry",
        "skopeo",
        "ip",
    ]
    .into_iter()
    .filter(|t| which(t).is_none())
    .map(str::to_string)
    .collect();
    for p in ["bridge", "host-local", "loopback"] {
        if !Path::new(CNI_BIN_DIR).join(p).exists() {
            missing.push(format!("{CNI_BIN_DIR}/{p}"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("/bin/busybox".into());
    }
    if !missing.is_empty() {
        println!(
            "cri_pod bench: needs {} (Debian: containerd runc containernetworking-plugins \
             docker-registry skopeo iproute2 busybox-static; scripts/setup.sh installs them); \
             skipped",
            missing.join(", ")
        );
        return;
    }
    if let Err(e) = caas_tests::check_bench_agent_binary() {
        eprintln!("cri_pod bench: {e:#}");
        std::process::exit(1);
    }
    let iters = env_usize("CAAS_BENCH_ITERS", 50).max(1);
    let warmup = env_usize("CAAS_BENCH_WARMUP", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(run(iters, warmup)) {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("cri_pod bench failed: {e:#}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The image

/// The pause-like image: a static busybox, `sleep infinity` as its process.
fn pause_image() -> anyhow::Result<ImageBuilder> {
    let bb = std::fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    let mut t = LayerTar::new();
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp"] {
        t = t.dir(d);
    }
    let t = t
        .file_mode("bin/busybox", &bb, 0o755)
        .symlink("bin/sleep", "/bin/busybox")
        .symlink("bin/sh", "/bin/busybox");
    Ok(ImageBuilder::new()
        .layer(t.into_tar(), Compression::Gzip)
        .entrypoint(&["/bin/sleep"])
        .cmd(&["infinity"]))
}

/// The pushed image: `127.0.0.1:PORT/bench/pause:v1` and its id (the config digest).
struct Pushed {
    reference: String,
    id: String,
    compressed_bytes: u64,
}

async fn push_image(reg: &Registry) -> anyhow::Result<Pushed> {
    let dir = tempfile::Builder::new()
        .prefix("caas-bench-cri-layout-")
        .tempdir()?;
    let mut layout = OciLayout::new(&dir.path().join("layout"))?;
    let built = layout.add_image(&pause_image()?, TAG)?;
    let m = reg
        .push(layout.dir(), TAG, &format!("{REPO}:{TAG}"), PushMode::Oci)
        .await?;
    ensure!(m.digest == built.manifest.digest, "pushed manifest differs");
    Ok(Pushed {
        reference: format!("{}/{REPO}:{TAG}", reg.host()),
        id: built.config.digest.clone(),
        compressed_bytes: built.layers.iter().map(|l| l.size).sum::<u64>() + built.config.size,
    })
}

// ---------------------------------------------------------------------------------------------
// caas-agent

/// A `caas-agent serve` with `[cri] enabled`. Its tenants are deleted and it is stopped by
/// [`Agent::stop`], or on drop.
struct Agent {
    dir: Option<tempfile::TempDir>,
    proc: Option<AgentProcess>,
    socket: PathBuf,
    cri_socket: PathBuf,
    slice: String,
}

impl Agent {
    async fn start(registry: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("caas-bench-cri-agent-")
            .tempdir()?;
        let slice = unique_slice();
        let socket = dir.path().join("run/agent.sock");
        // The same CNI network as containerd's (bridge, no gateway address, no masquerade,
        // host-local addresses): every pod gets a network namespace of its own.
        let cni_conf = dir.path().join("cni");
        std::fs::create_dir_all(&cni_conf)?;
        std::fs::write(
            cni_conf.join("10-caas-bench.conflist"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "caas-bench-agent",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": false,
                    "ipMasq": false,
                    "hairpinMode": false,
                    "ipam": { "type": "host-local", "ranges": [[{ "subnet": CNI_SUBNET }]] },
                }],
            }))?,
        )?;
        let extra = format!(
            "[api]\nunix_socket = \"{}\"\n[images]\ninsecure_registries = [\"{registry}\"]\n\
             [cri]\nenabled = true\n[cri.cni]\nenabled = true\nconf_dir = \"{}\"\n\
             bin_dirs = [\"{CNI_BIN_DIR}\"]\n",
            socket.display(),
            cni_conf.display()
        );
        let cfg = write_agent_config(dir.path(), &slice, &extra);
        let proc =
            AgentProcess::spawn_own_group(&cfg, &socket, &dir.path().join("agent.log")).await?;
        Ok(Self {
            cri_socket: dir.path().join("run/cri.sock"),
            dir: Some(dir),
            proc: Some(proc),
            socket,
            slice,
        })
    }

    fn log_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("agent.log"))
    }

    /// Deletes every tenant (engines, containers, cgroups, images), then SIGTERM and wait.
    fn stop(&mut self, keep_logs: bool) {
        let Some(mut proc) = self.proc.take() else {
            return;
        };
        cleanup_tenants(&self.socket, &self.slice);
        let _ = proc.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(proc.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if keep_logs && let Some(log) = self.log_path() {
            let kept = std::env::temp_dir()
                .join(format!("caas-bench-cri-agent-{}.log", std::process::id()));
            let _ = std::fs::copy(&log, &kept);
            eprintln!("agent log: {}", kept.display());
        }
        // AgentProcess's drop kills it if it is still there.
        drop(proc);
        drop(self.dir.take());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop(false);
    }
}

// ---------------------------------------------------------------------------------------------
// containerd

/// A `containerd` child on temp dirs. [`Containerd::cleanup`] (also run on drop) stops it and
/// removes whatever it left on the host.
struct Containerd {
    dir: Option<tempfile::TempDir>,
    /// The same path as `dir` (kept after `dir` is gone, for messages).
    path: PathBuf,
    child: Option<Child>,
    socket: PathBuf,
    bridge: String,
    net_name: String,
    /// Pods' `cgroup_parent` is `<this>/pod<uid>` (absolute, in every hierarchy).
    cgroup_parent: String,
    /// Whether `/run/containerd` (and its `s`) existed before: if not, they go at the end.
    run_dir_existed: bool,
    /// Whether libcni's cache dir `/var/lib/cni` existed before: likewise.
    cni_cache_existed: bool,
    version: String,
    runc_version: String,
}

impl Containerd {
    fn root(&self) -> PathBuf {
        self.path.join("root")
    }

    fn state(&self) -> PathBuf {
        self.path.join("state")
    }

    fn runc_root(&self) -> PathBuf {
        self.state().join("runc")
    }

    fn log_path(&self) -> PathBuf {
        self.path.join("containerd.log")
    }

    /// The last `n` lines of its log that are not `level=info`.
    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("level=info")).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    async fn start(sandbox_image: &str, registry: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("caas-bench-containerd-")
            .tempdir()?;
        // Shims and runc run as root; still, let anything traverse to its bundle.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )?;
        let pid = std::process::id();
        let mut c = Self {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            child: None,
            socket: PathBuf::new(),
            bridge: format!("caasbr{:x}", pid & 0xff_ffff),
            net_name: format!("caas-bench-{pid}"),
            cgroup_parent: format!("/caas-bench-cri-{pid}"),
            run_dir_existed: Path::new("/run/containerd").exists(),
            cni_cache_existed: Path::new(CNI_CACHE_DIR).exists(),
            version: caas_tests::first_line("containerd", &["--version"]),
            runc_version: caas_tests::first_line("runc", &["--version"]),
        };
        c.socket = c.path.join("containerd.sock");
        for d in ["root", "state", "cni/conf", "cni/ipam", "opt"] {
            std::fs::create_dir_all(c.path.join(d))?;
        }
        std::fs::write(
            c.path.join("cni/conf/10-caas-bench.conflist"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "cniVersion": "0.4.0",
                "name": c.net_name,
                "plugins": [{
                    "type": "bridge",
                    "bridge": c.bridge,
                    "isGateway": false,
                    "ipMasq": false,
                    "hairpinMode": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": CNI_SUBNET }]],
                        "dataDir": c.path.join("cni/ipam"),
                    },
                }],
            }))?,
        )?;
        let config = c.path.join("config.toml");
        std::fs::write(&config, c.config_toml(sandbox_image, registry))?;
        let log = std::fs::File::create(c.log_path())?;
        // Its own process group: a Ctrl-C reaches this process only, which then cleans up.
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting containerd")?;
        c.child = Some(child);
        if let Err(e) = c.wait_ready().await {
            let tail = c.log_tail(30);
            bail!("containerd did not come up: {e:#}\ncontainerd's log (not info) ends:\n{tail}");
        }
        Ok(c)
    }

    fn config_toml(&self, sandbox_image: &str, registry: &str) -> String {
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
[plugins."io.containerd.runtime.v1.linux"]
  runtime_root = "{state}/runc-v1"

[{cri}]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{dir}/cni/conf"
    max_conf_num = 1
  [{cri}.registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"#,
            root = self.root().display(),
            state = self.state().display(),
            sock = self.socket.display(),
            dir = self.path.display(),
            runc = which("runc").unwrap_or_else(|| "runc".into()).display(),
            runc_root = self.runc_root().display(),
        )
    }

    /// Until the CRI answers `Status` with the runtime and the network ready (the CNI config
    /// loaded), at most 30 s.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::from("no answer yet");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(st) = child.try_wait()?
            {
                bail!("containerd exited with {st}");
            }
            ensure!(
                Instant::now() < deadline,
                "containerd's CRI not ready within 30 s: {last}"
            );
            if self.socket.exists() {
                match CriClient::connect(&self.socket).await {
                    Ok(mut c) => match c.rt.status(cri::StatusRequest { verbose: false }).await {
                        Ok(r) => {
                            let conds = r
                                .into_inner()
                                .status
                                .map(|s| s.conditions)
                                .unwrap_or_default();
                            if conds.len() >= 2 && conds.iter().all(|c| c.status) {
                                return Ok(());
                            }
                            last = format!("conditions {conds:?}");
                        }
                        Err(e) => last = format!("Status: {e}"),
                    },
                    Err(e) => last = format!("{e:#}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops containerd and removes what it left: runc containers, shims, mounts under its temp
    /// dirs, the CNI bridge and its veths, CNI's cached results, the pods' cgroups, then the temp
    /// dirs. Idempotent. Returns what it had to clean up beyond the process and the temp dir
    /// (nothing, when every pod was removed through the CRI before).
    fn cleanup(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.dir.is_none() {
            return notes;
        }
        // containerd: SIGTERM, then SIGKILL after 10 s.
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        notes.push("containerd ignored SIGTERM for 10 s: killed".into());
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        // Containers runc still has (containerd leaves running tasks behind on exit).
        let runc_ns_root = self.runc_root().join(CONTAINERD_NS);
        let ids = dir_names(&runc_ns_root);
        if !ids.is_empty() {
            notes.push(format!("runc containers left: {}", ids.len()));
        }
        for id in &ids {
            for args in [
                vec!["kill", id.as_str(), "KILL"],
                vec!["delete", "--force", id],
            ] {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&runc_ns_root)
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // Shims of this containerd (they outlive it), and their sockets.
        let sock = self.socket.as_os_str().as_bytes().to_vec();
        let shims = find_pids(|args| {
            args.first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-address" && w[1] == sock.as_slice())
        });
        if !shims.is_empty() {
            notes.push(format!("shims left: {}", shims.len()));
        }
        for pid in &shims {
            let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while shims
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let tasks = self
            .state()
            .join("io.containerd.runtime.v2.task")
            .join(CONTAINERD_NS);
        for id in dir_names(&tasks) {
            let p = Path::new(SHIM_SOCKET_DIR).join(shim_socket_name(&self.socket, &id));
            if std::fs::remove_file(&p).is_ok() {
                notes.push(format!("removed shim socket {}", p.display()));
            }
        }
        // Mounts under the temp dir: rootfs overlays, /dev/shm tmpfs, netns bind mounts.
        let mut mounts = mounts_under(&self.path);
        if !mounts.is_empty() {
            notes.push(format!("mounts left: {}", mounts.len()));
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in &mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        let still = mounts_under(&self.path);
        // The CNI bridge and any veth still on it (a veth goes with its netns otherwise).
        for veth in links_of_master(&self.bridge) {
            notes.push(format!("veth left on {}: {veth}", self.bridge));
            ip(&["link", "del", &veth]);
        }
        if link_exists(&self.bridge) {
            ip(&["link", "del", &self.bridge]);
        }
        // libcni's result cache (not under containerd's dirs).
        // Ours: `<network>-<sandbox id>-<ifname>` of our network, and of the loopback network
        // containerd adds (`cni-loopback`) for our sandboxes.
        let prefix = format!("{}-", self.net_name);
        let sandboxes: Vec<String> = [
            self.root().join("io.containerd.grpc.v1.cri/sandboxes"),
            self.state().join("io.containerd.grpc.v1.cri/sandboxes"),
            tasks.clone(),
        ]
        .iter()
        .flat_map(|d| dir_names(d))
        .collect();
        let results = Path::new(CNI_CACHE_DIR).join("results");
        for f in dir_names(&results) {
            let lo = f
                .strip_prefix("cni-loopback-")
                .is_some_and(|rest| sandboxes.iter().any(|id| rest == format!("{id}-lo")));
            if f.starts_with(&prefix) || lo {
                notes.push(format!("CNI result left: {f}"));
                let _ = std::fs::remove_file(results.join(f));
            }
        }
        if !self.cni_cache_existed {
            let _ = std::fs::remove_dir(&results);
            let _ = std::fs::remove_dir(CNI_CACHE_DIR);
        }
        // The pods' cgroups, in every hierarchy (all empty once the containers are gone).
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let p = h.path().join(self.cgroup_parent.trim_start_matches('/'));
                if p.exists() && !remove_cgroup_tree(&p) {
                    notes.push(format!("cgroup not removed: {}", p.display()));
                }
            }
        }
        if !self.run_dir_existed {
            let _ = std::fs::remove_dir(SHIM_SOCKET_DIR);
            let _ = std::fs::remove_dir("/run/containerd");
        }
        if still.is_empty() {
            drop(self.dir.take());
        } else {
            // Never delete through a mount that would not go.
            notes.push(format!(
                "{} mounts would not unmount; kept {}: {still:?}",
                still.len(),
                self.path.display()
            ));
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
        notes
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for n in self.cleanup() {
            eprintln!("containerd cleanup: {n}");
        }
    }
}

/// The name of a containerd 1.6 shim's socket in [`SHIM_SOCKET_DIR`]: the sha256 of
/// `<containerd address>/<namespace>/<id>`.
fn shim_socket_name(address: &Path, id: &str) -> String {
    let p = address.join(CONTAINERD_NS).join(id);
    format!("{:x}", Sha256::digest(p.as_os_str().as_bytes()))
}

fn dir_names(p: &Path) -> Vec<String> {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Pids whose argv matches.
fn find_pids(pred: impl Fn(&[&[u8]]) -> bool) -> Vec<nix::unistd::Pid> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        if pred(&args) {
            out.push(nix::unistd::Pid::from_raw(pid));
        }
    }
    out
}

/// Mount points at or below `dir` in this mount namespace.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(caas_agent::cri::mountinfo::unescape(m)))
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Interfaces enslaved to `master`.
fn links_of_master(master: &str) -> Vec<String> {
    if !link_exists(master) {
        return Vec::new();
    }
    let out = Command::new("ip")
        .args(["-o", "link", "show", "master", master])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // `7: veth1234@if3: <...> ...`
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// rmdir a cgroup directory tree, children first. Whether it is gone.
fn remove_cgroup_tree(p: &Path) -> bool {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    std::fs::remove_dir(p).is_ok() || !p.exists()
}

// ---------------------------------------------------------------------------------------------
// The CRI calls

/// One runtime under test, as a kubelet sees it.
struct Contender {
    label: String,
    cri: CriClient,
    /// Pods' log directories go under here.
    logs: tempfile::TempDir,
    /// `cgroup_parent` of its pods (`<this>/pod<uid>`).
    cgroup_parent: String,
    image: String,
}

/// The three timings (ms) of one pod.
type Sample = [f64; 3];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn new_uid() -> String {
    let r: u128 = rand::random();
    let h = format!("{r:032x}");
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

impl Contender {
    /// A pod's config as a kubelet sends it for a pod without volumes or ports: metadata,
    /// hostname, a log directory that exists, a cgroup parent, and the default namespace modes
    /// (network and IPC per pod, PID per container).
    fn pod_config(&self, namespace: &str, name: &str) -> anyhow::Result<cri::PodSandboxConfig> {
        let uid = new_uid();
        let log_dir = self.logs.path().join(format!("{namespace}_{name}_{uid}"));
        std::fs::create_dir_all(log_dir.join("pause"))?;
        let ns = cri::NamespaceOption {
            network: cri::NamespaceMode::Pod as i32,
            pid: cri::NamespaceMode::Container as i32,
            ipc: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        };
        Ok(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.display().to_string(),
            labels: HashMap::from([
                ("io.kubernetes.pod.name".into(), name.into()),
                ("io.kubernetes.pod.namespace".into(), namespace.into()),
                ("io.kubernetes.pod.uid".into(), uid.clone()),
            ]),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/pod{uid}", self.cgroup_parent),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(ns),
                    seccomp: Some(cri::SecurityProfile::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// The pause-like container: the image's entrypoint (no command given), limits of half a CPU
    /// and 64 MiB, the runtime's default seccomp profile.
    fn container_config(&self) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "pause".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            log_path: "pause/0.log".into(),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: 50_000,
                    cpu_shares: 512,
                    memory_limit_in_bytes: 64 << 20,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    seccomp: Some(cri::SecurityProfile::default()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// `PullImage` with the bench namespace's pod config (the kubelet passes the pod's); the
    /// image id.
    async fn pull(&mut self) -> anyhow::Result<String> {
        let sandbox = self.pod_config(NAMESPACE, "pull")?;
        let r = self
            .cri
            .img
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: self.image.clone(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: Some(sandbox),
            })
            .await
            .with_context(|| format!("{}: PullImage {}", self.label, self.image))?;
        let image_ref = r.into_inner().image_ref;
        // containerd answers the image id; caas-agent too (the config digest).
        let st = self
            .cri
            .img
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: self.image.clone(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .with_context(|| format!("{}: ImageStatus", self.label))?
            .into_inner();
        let id = st.image.map(|i| i.id).unwrap_or_default();
        ensure!(
            !id.is_empty(),
            "{}: ImageStatus does not know the pulled image (PullImage said {image_ref})",
            self.label
        );
        Ok(id)
    }

    /// One pod: the three timed calls, then (untimed) the check that the container runs, and the
    /// pod's stop and removal (also after a failed call).
    async fn pod(&mut self, namespace: &str, name: &str) -> anyhow::Result<Sample> {
        let config = self.pod_config(namespace, name)?;
        let mut pod_id = None;
        let timed = self.timed(&config, &mut pod_id).await;
        let label = self.label.clone();
        let checked = match timed {
            Ok((sample, container)) => self.check_running(&container).await.map(|()| sample),
            Err(e) => Err(e),
        };
        let removed = match pod_id {
            Some(id) => self.remove_pod(&id).await,
            None => Ok(()),
        };
        let sample = checked.with_context(|| format!("{label}: pod {namespace}/{name}"))?;
        removed.with_context(|| format!("{label}: removing pod {namespace}/{name}"))?;
        Ok(sample)
    }

    async fn timed(
        &mut self,
        config: &cri::PodSandboxConfig,
        pod_id: &mut Option<String>,
    ) -> anyhow::Result<(Sample, String)> {
        let container = self.container_config();
        let rt = &mut self.cri.rt;
        let t0 = Instant::now();
        let id = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .context("RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id;
        let t1 = Instant::now();
        *pod_id = Some(id.clone());
        let cid = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: id,
                config: Some(container),
                sandbox_config: Some(config.clone()),
            })
            .await
            .context("CreateContainer")?
            .into_inner()
            .container_id;
        let t2 = Instant::now();
        rt.start_container(cri::StartContainerRequest {
            container_id: cid.clone(),
        })
        .await
        .context("StartContainer")?;
        let t3 = Instant::now();
        Ok(([ms(t1 - t0), ms(t2 - t1), ms(t3 - t2)], cid))
    }

    async fn check_running(&mut self, container: &str) -> anyhow::Result<()> {
        let st = self
            .cri
            .rt
            .container_status(cri::ContainerStatusRequest {
                container_id: container.into(),
                verbose: false,
            })
            .await
            .context("ContainerStatus")?
            .into_inner()
            .status
            .context("ContainerStatus without a status")?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "container {container} is {:?} after StartContainer (exit code {}, {} {})",
            cri::ContainerState::try_from(st.state),
            st.exit_code,
            st.reason,
            st.message
        );
        Ok(())
    }

    async fn remove_pod(&mut self, id: &str) -> anyhow::Result<()> {
        self.cri
            .rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .context("StopPodSandbox")?;
        self.cri
            .rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .context("RemovePodSandbox")?;
        Ok(())
    }

    /// Stops and removes every pod the runtime lists (after a failure); how many.
    async fn remove_all_pods(&mut self) -> usize {
        let Ok(list) = self
            .cri
            .rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
        else {
            return 0;
        };
        let ids: Vec<String> = list.into_inner().items.into_iter().map(|p| p.id).collect();
        for id in &ids {
            let _ = self.remove_pod(id).await;
        }
        ids.len()
    }

    async fn version(&mut self) -> String {
        match self
            .cri
            .rt
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
        {
            Ok(v) => {
                let v = v.into_inner();
                format!(
                    "{} {} (CRI {})",
                    v.runtime_name, v.runtime_version, v.runtime_api_version
                )
            }
            Err(e) => format!("Version failed: {}", e.message()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Run

struct Results {
    iters: usize,
    warmup: usize,
    image_bytes: u64,
    /// caas-agent, containerd: timed samples.
    samples: [Vec<Sample>; 2],
    /// caas-agent, containerd: first pods of new namespaces.
    first: [Vec<Sample>; 2],
    versions: [String; 2],
    containerd_version: String,
    runc_version: String,
    cleanup_notes: Vec<String>,
    load_before: String,
    load_after: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(iters: usize, warmup: usize) -> anyhow::Result<String> {
    let keep_logs = std::env::var_os("CAAS_BENCH_KEEP_LOGS").is_some();
    // From here SIGINT and SIGTERM no longer end the process: they stop the bench loop, and
    // the cleanup runs (containerd and the agent have process groups of their own, so a Ctrl-C
    // does not reach them).
    let mut signals = Signals::new()?;
    let load_before = loadavg();
    let reg = Registry::start(RegistryOpts::default()).await?;
    let host = reg.host();
    let image = push_image(&reg).await?;
    eprintln!("cri_pod: pushed {} ({})", image.reference, image.id);

    let mut agent = Agent::start(&host).await?;
    let mut containerd = match Containerd::start(&image.reference, &host).await {
        Ok(c) => c,
        Err(e) => {
            tokio::task::block_in_place(|| agent.stop(keep_logs));
            return Err(e);
        }
    };
    eprintln!(
        "cri_pod: {} and caas-agent up; {warmup} warm-ups + {iters} iterations each",
        containerd.version
    );

    let mut contenders = match connect(&agent, &containerd, &image).await {
        Ok(c) => c,
        Err(e) => {
            tokio::task::block_in_place(|| {
                for n in containerd.cleanup() {
                    eprintln!("containerd cleanup: {n}");
                }
                agent.stop(keep_logs);
            });
            return Err(e);
        }
    };
    let result = tokio::select! {
        r = bench(&mut contenders, iters, warmup) => r,
        s = signals.recv() => Err(anyhow::anyhow!("interrupted by {s}")),
    };
    if result.is_err() {
        eprintln!("cri_pod: failed; cleaning up");
    }
    // Whatever happened: every pod goes through the CRI first (a failure may have left some).
    let mut leftover = Vec::new();
    for c in &mut contenders {
        let n = c.remove_all_pods().await;
        if n > 0 {
            leftover.push(format!("{}: {n} pods were left and removed", c.label));
        }
    }
    let versions = [contenders[0].version().await, contenders[1].version().await];
    drop(contenders);
    if keep_logs {
        let kept =
            std::env::temp_dir().join(format!("caas-bench-containerd-{}.log", std::process::id()));
        let _ = std::fs::copy(containerd.log_path(), &kept);
        eprintln!("containerd log: {}", kept.display());
    }
    let tail = containerd.log_tail(30);
    let (containerd_version, runc_version) =
        (containerd.version.clone(), containerd.runc_version.clone());
    let mut cleanup_notes = tokio::task::block_in_place(|| {
        let notes = containerd.cleanup();
        agent.stop(keep_logs);
        notes
    });
    drop(reg);
    cleanup_notes.extend(leftover);
    let (samples, first) = result.map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\ncontainerd's log (not info) ends:\n{tail}\ncleanup: {cleanup_notes:?}"
        )
    })?;
    Ok(table(&Results {
        iters,
        warmup,
        image_bytes: image.compressed_bytes,
        samples,
        first,
        versions,
        containerd_version,
        runc_version,
        cleanup_notes,
        load_before,
        load_after: loadavg(),
    }))
}

/// SIGINT and SIGTERM, caught from [`Signals::new`] on.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
        })
    }

    /// Until one arrives (or arrived since `new`); its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// CRI clients of both, each with the image pulled.
async fn connect(
    agent: &Agent,
    containerd: &Containerd,
    image: &Pushed,
) -> anyhow::Result<Vec<Contender>> {
    let mut out = Vec::new();
    for (label, socket) in [
        ("caas-agent", &agent.cri_socket),
        ("containerd", &containerd.socket),
    ] {
        let mut c = Contender {
            label: label.into(),
            cri: CriClient::connect(socket).await?,
            logs: tempfile::Builder::new()
                .prefix(&format!("caas-bench-cri-{label}-pods-"))
                .tempdir()?,
            cgroup_parent: containerd.cgroup_parent.clone(),
            image: image.reference.clone(),
        };
        let id = c.pull().await?;
        ensure!(
            id == image.id,
            "{label}: the pulled image's id is {id}, its config digest {}",
            image.id
        );
        out.push(c);
    }
    Ok(out)
}

type Bench = ([Vec<Sample>; 2], [Vec<Sample>; 2]);

async fn bench(contenders: &mut [Contender], iters: usize, warmup: usize) -> anyhow::Result<Bench> {
    let mut samples: [Vec<Sample>; 2] = Default::default();
    for round in 0..warmup + iters {
        let timed = round >= warmup;
        for k in 0..2 {
            let c = (round + k) % 2;
            let name = format!("pause-{round}");
            let s = contenders[c].pod(NAMESPACE, &name).await?;
            if timed {
                samples[c].push(s);
            }
        }
        if round % 10 == 9 || round + 1 == warmup {
            eprintln!(
                "cri_pod: round {}/{}{}",
                round + 1,
                warmup + iters,
                if timed { "" } else { " (warm-ups done)" }
            );
        }
    }
    // The first pod of a new namespace (for caas-agent: the one that creates the tenant).
    let mut first: [Vec<Sample>; 2] = Default::default();
    for i in 0..FIRST_PODS {
        let ns = format!("{FIRST_NS_PREFIX}-{i}");
        for k in 0..2 {
            let c = (i + k) % 2;
            first[c].push(contenders[c].pod(&ns, "pause-first").await?);
        }
    }
    Ok((samples, first))
}

// ---------------------------------------------------------------------------------------------
// Report

const LABEL_W: usize = 46;
const COL_W: usize = 9;

fn total(s: &Sample) -> f64 {
    s.iter().sum()
}

/// The stats of the total and of each call.
fn per_call(samples: &[Sample]) -> [Stats; 4] {
    [
        stats(samples.iter().map(total)),
        stats(samples.iter().map(|s| s[0])),
        stats(samples.iter().map(|s| s[1])),
        stats(samples.iter().map(|s| s[2])),
    ]
}

fn row(o: &mut String, label: &str, cols: &[String]) {
    let _ = write!(o, "{label:<LABEL_W$}");
    for c in cols {
        let _ = write!(o, "{c:>COL_W$}");
    }
    o.push('\n');
}

fn table(r: &Results) -> String {
    let mut o = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let _ = writeln!(
        o,
        "\n{} iterations per runtime after {} warm-ups, runtimes alternating first; {cpus} CPUs; \
         loadavg before {} / after {}",
        r.iters, r.warmup, r.load_before, r.load_after
    );
    let _ = writeln!(
        o,
        "image: static busybox, `sleep infinity` ({} KiB compressed), from docker-registry on \
         127.0.0.1; pulled before timing",
        r.image_bytes / 1024
    );
    let rule = "-".repeat(LABEL_W + COL_W * 4);
    let _ = writeln!(o, "{rule}");
    let f = |x: f64| format!("{x:.2}");
    let labels = ["total (3 calls)", CALLS[0], CALLS[1], CALLS[2]];
    row(
        &mut o,
        "ms",
        &["median", "p90", "min", "max"].map(String::from),
    );
    let names = ["caas-agent", "containerd + runc"];
    let all = [per_call(&r.samples[0]), per_call(&r.samples[1])];
    for (name, st) in names.iter().zip(&all) {
        for (i, (l, s)) in labels.iter().zip(st).enumerate() {
            let label = if i == 0 {
                format!("{name}: {l}")
            } else {
                format!("  {l}")
            };
            row(&mut o, &label, &[f(s.median), f(s.p90), f(s.min), f(s.max)]);
        }
    }
    let _ = writeln!(o, "{rule}");
    let ratio = |a: f64, b: f64| format!("{:.2}x", a / b);
    for (i, l) in labels.iter().enumerate() {
        let (a, b) = (all[0][i], all[1][i]);
        let label = if i == 0 {
            format!("ratio caas-agent / containerd: {l}")
        } else {
            format!("  {l}")
        };
        row(
            &mut o,
            &label,
            &[
                ratio(a.median, b.median),
                ratio(a.p90, b.p90),
                ratio(a.min, b.min),
                ratio(a.max, b.max),
            ],
        );
    }
    let _ = writeln!(o, "{rule}");
    row(
        &mut o,
        &format!("first pod of a new namespace (n={FIRST_PODS}), median ms"),
        &["total", "RunPod", "Create", "Start"].map(String::from),
    );
    for (name, s) in names.iter().zip(&r.first) {
        let st = per_call(s);
        row(&mut o, &format!("  {name}"), &st.map(|x| f(x.median)));
    }
    let _ = writeln!(o, "{rule}");
    let _ = writeln!(
        o,
        "What RunPodSandbox does:\n\
         - containerd: a sandbox (pause) container from the same image: an overlay snapshot, a \
         new network namespace set up by CNI (loopback, and a veth on a bridge with a host-local \
         address), /dev/shm, hostname/hosts/resolv.conf files, a containerd-shim-runc-v2 process, \
         and runc create + start of `sleep infinity` in new PID, IPC, UTS and network namespaces; \
         the pod's containers then join its network and IPC namespaces.\n\
         - caas-agent: a new network namespace (made by the tenant's engine in the tenant's \
         user namespace) set up by the same CNI bridge and host-local plugins, with the bridge \
         in the tenant's network namespace, and the pod's record (a JSON file) in the \
         namespace's tenant. There is no pause container: the pod's containers join the pod's \
         network namespace and the tenant's user namespace. The tenant (cgroup, namespaces, \
         engine process) is made by the first pod or pull of a namespace: in the timed pods it \
         exists (the pull made it); the \"first pod\" rows include it."
    );
    let _ = writeln!(
        o,
        "CreateContainer + StartContainer: containerd makes the snapshot and the container \
         record, then on start a shim and runc create + start (cgroups, seccomp, root in the \
         host's user namespace); caas-agent's tenant engine makes an overlay rootfs and the \
         container with libcontainer (cgroup, seccomp, in the tenant's user namespace), then \
         starts it. The two split the work differently between the calls: compare the totals."
    );
    let _ = writeln!(
        o,
        "Every pod: a new name and uid, a cgroup parent, pod-level network/IPC and per-container \
         PID namespaces, a 0.5 CPU / 64 MiB container with the default seccomp profile. Untimed: \
         a check that the container runs, then StopPodSandbox + RemovePodSandbox."
    );
    let _ = writeln!(
        o,
        "versions: {} = {}; {}; {}",
        r.containerd_version, r.versions[1], r.runc_version, r.versions[0]
    );
    if r.cleanup_notes.is_empty() {
        let _ = writeln!(o, "cleanup: nothing was left behind");
    } else {
        for n in &r.cleanup_notes {
            let _ = writeln!(o, "cleanup: {n}");
        }
    }
    o
}
