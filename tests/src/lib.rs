//! Harness for the end-to-end tests: agents with their own temp dirs, real certificates, real
//! sockets, and clients for every role.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use caas_agent::{
    certs::{Ca, Pem},
    client::{self, Target},
    config::{Config, TlsConfig},
    serve::{self, Agent},
};
use tonic::transport::Channel;

pub use caas_agent::testing::{privileged_required, require_root, skip};

pub mod calls;
pub mod cri;
pub mod registry;
pub mod spdy;
pub mod vm;

/// A random suffix so parallel tests never share names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16)
}

/// Certificates for one test: a CA and the server's identity, plus whatever clients it issues.
pub struct Pki {
    /// The CA that the agent trusts.
    pub ca: Ca,
    /// Where ca.pem, server.pem and server-key.pem were written.
    pub dir: PathBuf,
}

impl Pki {
    /// Makes a CA and a server certificate for localhost/127.0.0.1 in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let ca = Ca::new("test CA")?;
        let server = ca.server(&["localhost".into(), "127.0.0.1".into()])?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
        std::fs::write(dir.join("server.pem"), &server.cert)?;
        std::fs::write(dir.join("server-key.pem"), &server.key)?;
        Ok(Self {
            ca,
            dir: dir.to_path_buf(),
        })
    }

    /// The `[api.tls]` section for this PKI.
    pub fn tls_config(&self) -> TlsConfig {
        TlsConfig {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join("server.pem"),
            key: self.dir.join("server-key.pem"),
        }
    }

    /// A client certificate for `role`, valid now.
    pub fn client(&self, role: &str) -> Pem {
        self.ca.client(role).expect("issuing a client certificate")
    }
}

/// An agent running inside the test process.
pub struct TestAgent {
    /// Temp dir holding state, run dir and certificates.
    pub dir: tempfile::TempDir,
    /// Its certificates.
    pub pki: Pki,
    /// The running agent (None after shutdown).
    pub agent: Option<Agent>,
    /// Its unix socket.
    pub socket: PathBuf,
    /// Its TCP address.
    pub addr: SocketAddr,
    /// Its cgroup slice.
    pub slice: String,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if self.agent.is_some() {
            // The agent is served by this test's runtime: let its other worker run meanwhile
            // (tests that use a TestAgent run on the multi-thread flavour).
            tokio::task::block_in_place(|| cleanup_tenants(&self.socket, &self.slice));
        }
    }
}

/// With `CAAS_TEST_LOG` set (a filter such as `caas_agent=debug`), the in-process agents of a
/// test binary log to the test's output (shown for failing tests, or all with `--nocapture`):
/// an `INTERNAL` answer says only "the agent log has the details".
fn init_test_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("CAAS_TEST_LOG")
            && let Ok(f) = tracing_subscriber::EnvFilter::try_new(&filter)
        {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(f)
                .with_test_writer()
                .try_init();
        }
    });
}

impl TestAgent {
    /// Starts an agent with TCP on 127.0.0.1:0 and a temp unix socket; `tweak` edits the config.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        init_test_log();
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(&dir.path().join("pki"))?;
        let mut cfg = test_config(dir.path());
        cfg.api.tcp_listen = Some("127.0.0.1:0".parse()?);
        cfg.api.tls = Some(pki.tls_config());
        tweak(&mut cfg);
        cfg.validate()?;
        let slice = cfg.tenants.cgroup_slice.clone();
        let agent = serve::start(cfg).await?;
        let socket = agent.unix_socket.clone();
        let addr = agent
            .tcp_addr
            .ok_or_else(|| anyhow::anyhow!("no tcp listener"))?;
        Ok(Self {
            dir,
            pki,
            agent: Some(agent),
            socket,
            addr,
            slice,
        })
    }

    /// A channel over the unix socket (role admin, as root).
    pub async fn unix(&self) -> Channel {
        client::connect(&Target::Unix(self.socket.clone()))
            .await
            .expect("connecting to the unix socket")
    }

    /// A channel over mTLS with a certificate for `role`.
    pub async fn as_role(&self, role: &str) -> Channel {
        self.with_cert(&self.pki.client(role))
            .await
            .expect("connecting with mTLS")
    }

    /// A channel over mTLS with the given client certificate.
    pub async fn with_cert(&self, pem: &Pem) -> Result<Channel, client::ConnectError> {
        client::connect(&Target::Tls {
            endpoint: format!("https://127.0.0.1:{}", self.addr.port()),
            ca_pem: self.pki.ca.cert_pem().into_bytes(),
            cert_pem: pem.cert.clone().into_bytes(),
            key_pem: pem.key.clone().into_bytes(),
            domain: Some("localhost".into()),
        })
        .await
    }

    /// Deletes every tenant, then shuts down gracefully.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        tokio::task::block_in_place(|| cleanup_tenants(&self.socket, &self.slice));
        if let Some(a) = self.agent.take() {
            a.shutdown().await?;
        }
        Ok(())
    }
}

/// A config whose every path lies under `dir`, with its own cgroup slice and the built engine.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        ..Config::default()
    };
    c.tenants.engine_binary = Some(bin("caas-agent"));
    c.tenants.cgroup_slice = unique_slice();
    c
}

/// A cgroup slice no other test agent uses.
pub fn unique_slice() -> String {
    format!("{}.slice", unique("caas-test"))
}

/// Deletes every tenant of the agent on `socket` (stopping engines and containers), then removes
/// the test's cgroup slice. Tests call it (or drop a [`TestAgent`]) so nothing outlives them.
pub fn cleanup_tenants(socket: &Path, slice: &str) {
    let socket = socket.to_path_buf();
    let slice = slice.to_string();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use caas_proto::v1::{self as pb, tenant_service_client::TenantServiceClient};
            let Ok(ch) = client::connect(&Target::Unix(socket)).await else {
                return;
            };
            let mut t = TenantServiceClient::new(ch);
            let Ok(list) = t.list_tenants(pb::ListTenantsRequest::default()).await else {
                return;
            };
            for tenant in list.into_inner().tenants {
                let _ = t
                    .delete_tenant(pb::DeleteTenantRequest {
                        id: tenant.id,
                        force: true,
                    })
                    .await;
            }
        });
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let _ = std::fs::remove_dir(h.path().join(&slice));
            }
        }
    })
    .join();
}

/// Path of a workspace binary (built by `cargo build --bins`, which the test command runs first).
/// The parent pid of host process `pid` (its `PPid` in /proc); panics when it is gone.
pub fn ppid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PPid in /proc/{pid}/status"))
}

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Writes `<dir>/config.toml` for an agent process: state and run dirs under `dir`, the cgroup
/// `slice`, the built engine, then `extra` (more TOML, sections included). Returns its path.
pub fn write_agent_config(dir: &Path, slice: &str, extra: &str) -> PathBuf {
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n[tenants]\ncgroup_slice = \"{slice}\"\nengine_binary = \"{1}\"\n{extra}",
            dir.display(),
            bin("caas-agent").display()
        ),
    )
    .expect("writing the agent config");
    cfg
}

/// A `caas-agent serve` child process with stderr captured to a file.
pub struct AgentProcess {
    /// The child.
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts `caas-agent serve --config <config>` and waits until `socket` answers.
    pub async fn spawn(config: &Path, socket: &Path, log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(config, socket, log, false).await
    }

    /// [`spawn`](Self::spawn), in a process group of its own: a Ctrl-C in the terminal (which
    /// signals the whole foreground group) then does not stop the agent before the caller has
    /// deleted its tenants through it. For benches that clean up on SIGINT.
    pub async fn spawn_own_group(config: &Path, socket: &Path, log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(config, socket, log, true).await
    }

    async fn spawn_with(
        config: &Path,
        socket: &Path,
        log: &Path,
        own_group: bool,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin("caas-agent"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?);
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd.spawn()?;
        let mut p = Self {
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ch) = client::connect(&Target::Unix(socket.to_path_buf())).await {
                drop(ch);
                return Ok(p);
            }
            if let Some(status) = p.child.try_wait()? {
                anyhow::bail!("agent exited early with {status}: {}", p.log_text());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "agent did not listen within 20 s: {}",
                p.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, sig)?;
        Ok(())
    }

    /// Waits up to `limit` for exit; returns the exit status, or None if it is still running.
    pub async fn wait_for_exit(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A busybox root filesystem in `dir` (every applet linked), owned by host root as an operator's
/// rootfs directory would be. Needs Debian's busybox-static (scripts/setup.sh installs it).
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dirs");
    }
    let bb = Path::new("/bin/busybox");
    assert!(
        bb.exists(),
        "/bin/busybox is missing: install busybox-static (scripts/setup.sh)"
    );
    std::fs::copy(bb, root.join("bin/busybox")).expect("copying busybox");
    let list = Command::new(bb)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') {
            let _ = std::os::unix::fs::symlink("/bin/busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
    std::fs::set_permissions(
        root.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("tmp");
    root
}

/// Writes an OCI image layout at `dir` whose layers are the given tar streams (gzip-compressed
/// here), and returns `dir`. Blob digests are computed, so a test can tamper with them after.
pub fn oci_layout(dir: &Path, layers: &[Vec<u8>]) -> PathBuf {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs dir");
    let put = |bytes: &[u8]| -> (String, usize) {
        let hex = format!("{:x}", Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).expect("blob");
        (format!("sha256:{hex}"), bytes.len())
    };
    let mut layer_descs = Vec::new();
    for l in layers {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(l).expect("gzip");
        let (digest, size) = put(&gz.finish().expect("gzip"));
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size
        }));
    }
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}});
    let (cdigest, csize) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
        "layers": layer_descs,
    });
    let (mdigest, msize) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
        "platform": {"architecture": "amd64", "os": "linux"}
    }]});
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    dir.to_path_buf()
}

/// A tar stream of a directory tree (symlinks kept as links).
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).expect("tar");
    b.into_inner().expect("tar")
}

/// The first line a tool prints for `args` (e.g. `--version`), trimmed; empty when it cannot run.
pub fn first_line(cmd: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// For benches (`harness = false`, release profile): `target/release/caas-agent`, which runs the
/// agent and the tenant engines and which `cargo bench` does not build, must exist; a note is
/// printed when agent sources are newer than it (it would bench an old agent).
pub fn check_bench_agent_binary() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("bench executable not under target/<profile>/deps")?;
    let agent = dir.join("caas-agent");
    anyhow::ensure!(
        agent.exists(),
        "{} is missing: run `cargo build --release --bins -p caas-agent` first",
        agent.display()
    );
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest = ["agent", "proto"]
        .iter()
        .filter_map(|d| newest_mtime(&ws.join(d)))
        .max();
    if let (Some(built), Some(src)) = (modified(&agent), newest)
        && built < src
    {
        eprintln!(
            "note: agent sources changed after {} was built; rebuild it with \
             `cargo build --release --bins -p caas-agent` to bench the current agent",
            agent.display()
        );
    }
    Ok(())
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The latest modification time of any file under `dir`.
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let t = if ft.is_dir() {
            newest_mtime(&e.path())
        } else {
            modified(&e.path())
        };
        newest = newest.max(t);
    }
    newest
}

/// Summary of benchmark samples (every bench prints these). NaN for no samples.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// The 90th percentile, nearest rank.
    pub p90: f64,
}

/// Summarizes benchmark samples.
pub fn stats<I>(samples: I) -> Stats
where
    I: IntoIterator,
    I::Item: std::borrow::Borrow<f64>,
{
    let mut s: Vec<f64> = samples
        .into_iter()
        .map(|x| *std::borrow::Borrow::borrow(&x))
        .collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return Stats {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            p90: f64::NAN,
        };
    }
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Stats {
        median,
        min: s[0],
        max: s[n - 1],
        p90: s[(n * 9).div_ceil(10) - 1],
    }
}
