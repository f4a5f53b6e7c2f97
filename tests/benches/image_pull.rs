//! Image pull benchmark: pull + unpack of a ~200 MiB, 5-layer gzip image from a local registry,
//! caas-agent's `PullImage` next to `skopeo copy` + `umoci unpack`. Prints one plain-text table.
//!
//! Run as root from the workspace root:
//!
//! ```sh
//! cargo build --release --bins -p caas-agent      # the agent binary the bench starts
//! cargo bench -p caas-tests --bench image_pull
//! ```
//!
//! Knobs: `CAAS_BENCH_ROUNDS` (timed rounds, default 5), `CAAS_BENCH_WARMUP` (untimed rounds
//! first, default 1), `CAAS_BENCH_DIR` (where the agents' state dirs and the peer's layout and
//! bundle go, default the temp dir: the file system under test), `CAAS_BENCH_KEEP_LOGS=1`
//! (copies the agents' logs to the temp dir and says where), `CAAS_BENCH_TIMELINE=1` (prints
//! each agent pull's per-layer timeline to stderr).
//!
//! What it does:
//!
//! 1. Builds the image in memory, deterministically (seeded RNG): 5 layers of ~40 MiB of file
//!    content each; every layer holds ~1,500 text-like files of 1..64 KiB (log-uniform sizes,
//!    gzip compresses them about 3:1) and a few 1..6 MiB files of random bytes (incompressible);
//!    layer 1 starts with a busybox root (`/bin/busybox`, its applet links, `/etc/passwd`), so
//!    the image runs. Layers are gzip (`tar+gzip`, level "fast", as the test harness writes
//!    them).
//! 2. Starts Debian's `docker-registry` on 127.0.0.1 (tests/src/registry.rs) and pushes the OCI
//!    layout there with skopeo (digests preserved).
//! 3. Starts two `caas-agent serve` processes (target/release/caas-agent), one with
//!    `[images] parallel_layers = 4` (the default) and one with `parallel_layers = 1`, each with
//!    its own state dir and one tenant.
//! 4. Rounds; in each, every contender once, in an order rotated per round, with `sync` before
//!    each (page caches are not dropped: the registry's blobs are read from page cache by all):
//!    - agent: its blob cache (`<state_dir>/blobs/sha256`) and the tenant's layer directories
//!      must be empty; `PullImage` is timed from the call to the final `Image` event; then the
//!      image is removed (which deletes its layer directories and, by GC, its blobs).
//!    - peer: `skopeo copy docker://127.0.0.1:PORT/bench/big:v1 oci:<fresh dir>:v1`, then
//!      `umoci unpack --image <dir>:v1 <fresh bundle>`, each timed from spawn to exit.
//!
//!    Every round checks that the unpacked trees hold every regular file of the image.
//!
//! The file system matters: on ext4 without a journal, every file creation checks recently
//! deleted inodes one by one (`find_inode_bit` -> `recently_deleted`, done only when there is no
//! journal); on the machine this bench was written on that made file creation cost 250..400 µs of
//! system time each and dominated both contenders' unpacks, varying from run to run. Point
//! `CAAS_BENCH_DIR` at a journaled file system (e.g. a loop-mounted ext4) to avoid it.
//!
//! The agent's phases come from watching its state dir every 2 ms (a layer's ingest file
//! appearing = download started, its blob in `sha256/` = downloaded, hashed and fsynced, its
//! `.tmp-<key>-*` directory = unpack started, `l/<key>` = unpacked). CPU times are the agent
//! process's `utime`/`stime`, and for the peers those of the waited-for children.

#![allow(clippy::unwrap_used)] // a benchmark harness: a failing setup step should stop it loudly

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use caas_agent::client::{self, Target};
use caas_proto::v1::{
    self as pb, image_service_client::ImageServiceClient, pull_progress::Event,
    tenant_service_client::TenantServiceClient,
};
use caas_tests::{
    AgentProcess, cleanup_tenants,
    registry::{
        BuiltImage, Compression, ImageBuilder, LayerTar, OciLayout, PushMode, Registry,
        RegistryOpts, digest_hex,
    },
    unique_slice, write_agent_config,
};
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use tonic::transport::Channel;

const TENANT: &str = "bench";
const REPO: &str = "bench/big";
const TAG: &str = "v1";
const LAYERS: usize = 5;
/// File content per layer.
const LAYER_BYTES: usize = 40 << 20;
/// Of which text-like small files (the rest: random-byte files).
const TEXT_BYTES: usize = 22 << 20;
const SEED: u64 = 0x1a7e_2024_0005;
/// Hex digits of a layer digest naming its directory in the agent's store (`images/mod.rs`).
const LAYER_KEY_LEN: usize = 24;

/// Where the agents' state and the peer's output go (`CAAS_BENCH_DIR`, else the temp dir).
fn work_dir() -> PathBuf {
    std::env::var_os("CAAS_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
}

/// `<fstype> on <device> (<mount point>)` of the file system holding `p`, and for ext4 whether
/// it has a journal.
fn describe_fs(p: &Path) -> String {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let best = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && p.starts_with(f[1])).then(|| (f[0], f[1], f[2]))
        })
        .max_by_key(|(_, mp, _)| mp.len());
    let Some((dev, mp, fstype)) = best else {
        return "unknown file system".into();
    };
    let mut d = format!("{fstype} on {dev} ({mp})");
    if fstype == "ext4" {
        let name = Path::new(dev).file_name().unwrap_or_default();
        let task =
            std::fs::read_to_string(Path::new("/sys/fs/ext4").join(name).join("journal_task"))
                .unwrap_or_default();
        match task.trim() {
            "" => {}
            "<none>" => d.push_str(", no journal"),
            _ => d.push_str(", journaled"),
        }
    }
    d
}

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("image_pull bench: needs root (tenants, cgroups, user namespaces); skipped");
        return;
    }
    let missing: Vec<&str> = ["docker-registry", "skopeo", "umoci", "busybox"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .collect();
    if !missing.is_empty() {
        println!(
            "image_pull bench: needs {} (Debian: docker-registry skopeo umoci busybox-static); \
             skipped",
            missing.join(", ")
        );
        return;
    }
    if let Err(e) = caas_tests::check_bench_agent_binary() {
        eprintln!("image_pull bench: {e:#}");
        std::process::exit(1);
    }
    let rounds = env_usize("CAAS_BENCH_ROUNDS", 5).max(1);
    let warmup = env_usize("CAAS_BENCH_WARMUP", 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(run(rounds, warmup)) {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("image_pull bench failed: {e:#}");
            std::process::exit(1);
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------------
// The image

#[derive(Debug, Default, Clone)]
struct LayerStats {
    tar_bytes: u64,
    content_bytes: u64,
    files: usize,
    dirs: usize,
    symlinks: usize,
}

/// Words of the text files: a few keywords and punctuation, then seeded random identifiers.
fn vocabulary(rng: &mut StdRng) -> Vec<Vec<u8>> {
    const COMMON: &[&str] = &[
        "fn", "let", "if", "else", "return", "struct", "impl", "for", "in", "match", "self", "pub",
        "use", "mut", "const", "=", "==", "->", "=>", "{", "}", "(", ")", ";", ",", "&", "+", "0",
        "1", "None", "Some", "Ok", "Err", "the", "a", "of", "to", "is", "#", "//", "<", ">",
    ];
    let mut v: Vec<Vec<u8>> = COMMON.iter().map(|w| w.as_bytes().to_vec()).collect();
    for _ in 0..1000 {
        let len = rng.random_range(3..14);
        let camel = rng.random_bool(0.3);
        let w: Vec<u8> = (0..len)
            .map(|i| {
                let c = b'a' + rng.random_range(0..26u8);
                if camel && (i == 0 || rng.random_bool(0.15)) {
                    c.to_ascii_uppercase()
                } else if !camel && i > 0 && rng.random_bool(0.1) {
                    b'_'
                } else {
                    c
                }
            })
            .collect();
        v.push(w);
    }
    v
}

/// `len` bytes of source-code-like lines from `vocab`, skewed towards its first words.
fn text(rng: &mut StdRng, vocab: &[Vec<u8>], len: usize) -> Vec<u8> {
    let n = vocab.len() as u64;
    let mut out = Vec::with_capacity(len + 256);
    while out.len() < len {
        let r = rng.next_u64();
        let indent = (r % 6) as usize * 4;
        out.resize(out.len() + indent, b' ');
        let words = 3 + (r >> 8) % 10;
        for _ in 0..words {
            let x = rng.next_u64();
            // The product of two uniforms: small indices are much more frequent.
            let idx = ((x & 0xffff_ffff) % n) * ((x >> 32) % n) / n;
            out.extend_from_slice(&vocab[usize::try_from(idx).unwrap()]);
            out.push(if x & 0xf == 0 { b',' } else { b' ' });
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

/// Adds directory entries for every ancestor of `path` not added yet (parents first).
fn ensure_parents(
    mut t: LayerTar,
    dirs: &mut BTreeSet<String>,
    path: &str,
    s: &mut LayerStats,
) -> LayerTar {
    let mut prefix = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for p in &parts[..parts.len() - 1] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(p);
        if dirs.insert(prefix.clone()) {
            t = t.dir(&prefix);
            s.dirs += 1;
        }
    }
    t
}

/// Layer `i` (0 = bottom): its tar and what it holds.
fn build_layer(i: usize) -> (Vec<u8>, LayerStats) {
    let mut rng = StdRng::seed_from_u64(SEED + i as u64);
    let vocab = vocabulary(&mut rng);
    let mut s = LayerStats::default();
    let mut dirs = BTreeSet::new();
    let mut t = LayerTar::new();
    let mut binary_left = LAYER_BYTES - TEXT_BYTES;
    if i == 0 {
        for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
            dirs.insert(d.to_string());
            t = t.dir(d);
            s.dirs += 1;
        }
        let bb = std::fs::read("/bin/busybox").expect("reading /bin/busybox");
        binary_left -= bb.len();
        s.content_bytes += bb.len() as u64;
        s.files += 1;
        t = t.file_mode("bin/busybox", &bb, 0o755);
        let list = std::process::Command::new("/bin/busybox")
            .arg("--list")
            .output()
            .expect("busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" && !applet.contains('/') {
                t = t.symlink(&format!("bin/{applet}"), "/bin/busybox");
                s.symlinks += 1;
            }
        }
        let passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n";
        t = t.file("etc/passwd", passwd);
        s.files += 1;
        s.content_bytes += passwd.len() as u64;
    }
    // Text-like files: ~30 per directory, 10 directories per package.
    let mut text_left = TEXT_BYTES;
    let mut f = 0usize;
    while text_left > 0 {
        // 1 KiB * 64^u: log-uniform in 1..64 KiB (the float is in range: no truncation).
        #[allow(clippy::cast_possible_truncation)]
        let size = (1024.0 * 64f64.powf(rng.random::<f64>())) as usize;
        let size = size.clamp(1024, 64 << 10).min(text_left);
        let path = format!(
            "usr/share/l{i}/pkg{:02}/d{}/f{f:05}.txt",
            f / 300,
            (f / 30) % 10
        );
        t = ensure_parents(t, &mut dirs, &path, &mut s);
        t = t.file(&path, &text(&mut rng, &vocab, size));
        s.files += 1;
        s.content_bytes += size as u64;
        text_left -= size;
        f += 1;
    }
    // Binary-ish files: 1..6 MiB of random bytes each.
    let mut k = 0;
    while binary_left > 0 {
        let size = rng.random_range(1 << 20..=6 << 20).min(binary_left);
        let mut data = vec![0u8; size];
        rng.fill_bytes(&mut data);
        let path = format!("usr/lib/l{i}/lib{k:02}.so");
        t = ensure_parents(t, &mut dirs, &path, &mut s);
        t = t.file_mode(&path, &data, 0o755);
        s.files += 1;
        s.content_bytes += size as u64;
        binary_left -= size;
        k += 1;
    }
    let tar = t.into_tar();
    s.tar_bytes = tar.len() as u64;
    (tar, s)
}

struct Image {
    built: BuiltImage,
    layers: Vec<LayerStats>,
    compressed_bytes: u64,
    generate: Duration,
    push: Duration,
}

impl Image {
    fn total(&self) -> LayerStats {
        let mut t = LayerStats::default();
        for l in &self.layers {
            t.tar_bytes += l.tar_bytes;
            t.content_bytes += l.content_bytes;
            t.files += l.files;
            t.dirs += l.dirs;
            t.symlinks += l.symlinks;
        }
        t
    }
}

async fn build_and_push(reg: &Registry) -> anyhow::Result<Image> {
    let t0 = Instant::now();
    // One thread per layer (the RNG of each layer is seeded on its own: same bytes either way).
    let layers: Vec<(Vec<u8>, LayerStats)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..LAYERS)
            .map(|i| sc.spawn(move || build_layer(i)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut img = ImageBuilder::new().cmd(&["/bin/sh"]);
    let mut stats = Vec::new();
    for (tar, s) in layers {
        img = img.layer(tar, Compression::Gzip);
        stats.push(s);
    }
    let dir = tempfile::Builder::new()
        .prefix("caas-bench-layout-")
        .tempdir()?;
    let mut layout = OciLayout::new(&dir.path().join("layout"))?;
    let built = tokio::task::block_in_place(|| layout.add_image(&img, TAG))?;
    drop(img);
    let generate = t0.elapsed();
    let t1 = Instant::now();
    let m = reg
        .push(layout.dir(), TAG, &format!("{REPO}:{TAG}"), PushMode::Oci)
        .await?;
    ensure!(m.digest == built.manifest.digest, "pushed manifest differs");
    let push = t1.elapsed();
    let compressed_bytes = built.layers.iter().map(|l| l.size).sum::<u64>() + built.config.size;
    Ok(Image {
        built,
        layers: stats,
        compressed_bytes,
        generate,
        push,
    })
}

// ---------------------------------------------------------------------------------------------
// Contenders

struct Agent {
    label: String,
    parallel: u32,
    dir: tempfile::TempDir,
    proc: AgentProcess,
    socket: PathBuf,
    slice: String,
    /// `127.0.0.1:PORT` of the registry.
    registry: String,
    images: ImageServiceClient<Channel>,
}

impl Agent {
    async fn start(parallel: u32, registry: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("caas-bench-agent-p{parallel}-"))
            .tempdir_in(work_dir())?;
        let slice = unique_slice();
        let socket = dir.path().join("run/agent.sock");
        let extra = format!(
            "[api]\nunix_socket = \"{}\"\n[images]\ninsecure_registries = [\"{registry}\"]\n\
             parallel_layers = {parallel}\n",
            socket.display()
        );
        let cfg = write_agent_config(dir.path(), &slice, &extra);
        let proc = AgentProcess::spawn(&cfg, &socket, &dir.path().join("agent.log")).await?;
        let ch = client::connect(&Target::Unix(socket.clone())).await?;
        TenantServiceClient::new(ch.clone())
            .create_tenant(pb::CreateTenantRequest {
                id: TENANT.into(),
                ..Default::default()
            })
            .await
            .context("creating the bench tenant")?;
        Ok(Self {
            label: format!("caas-agent PullImage, parallel_layers={parallel}"),
            parallel,
            dir,
            proc,
            socket,
            slice,
            registry: registry.to_string(),
            images: ImageServiceClient::new(ch),
        })
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Deletes the tenant (its engine, cgroups and images), then SIGTERM and wait.
    async fn stop(mut self, keep_logs: bool) {
        let (socket, slice) = (self.socket.clone(), self.slice.clone());
        tokio::task::block_in_place(|| cleanup_tenants(&socket, &slice));
        let _ = self.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.proc.wait_for_exit(Duration::from_secs(20)).await;
        if keep_logs {
            let log = self.dir.path().join("agent.log");
            let kept =
                std::env::temp_dir().join(format!("caas-bench-agent-p{}.log", self.parallel));
            let _ = std::fs::copy(&log, &kept);
            eprintln!(
                "agent log (parallel_layers={}): {}",
                self.parallel,
                kept.display()
            );
        }
    }
}

#[derive(Debug, Clone, Default)]
struct AgentRound {
    wall: f64,
    cpu_user: f64,
    cpu_sys: f64,
    /// Call to the first layer's ingest file.
    first_download: f64,
    /// Call to the last layer blob in the cache.
    last_blob: f64,
    /// Per-layer download time (ingest file seen .. blob cached), summed over layers.
    download_sum: f64,
    /// Per-layer unpack time (`.tmp-` dir seen .. `l/<key>` renamed in), summed over layers.
    unpack_sum: f64,
    /// Call to the first unpack start.
    first_unpack: f64,
    /// Call to the last layer directory in place.
    last_layer: f64,
    /// The registry's user+system CPU seconds meanwhile.
    registry_cpu: f64,
}

#[derive(Debug, Clone, Default)]
struct PeerRound {
    skopeo: f64,
    umoci: f64,
    skopeo_cpu: (f64, f64),
    umoci_cpu: (f64, f64),
    /// The registry's user+system CPU seconds meanwhile.
    registry_cpu: f64,
}

/// First sightings of files in the agent's state dir, relative to `t0`.
#[derive(Debug, Default)]
struct Sightings {
    ingest: HashMap<String, Duration>,
    blob: HashMap<String, Duration>,
    tmp: HashMap<String, Duration>,
    layer: HashMap<String, Duration>,
}

fn watch(state: PathBuf, t0: Instant, stop: Arc<AtomicBool>, out: Arc<Mutex<Sightings>>) {
    let ingest = state.join("blobs/ingest");
    let blobs = state.join("blobs/sha256");
    let layers = state.join("images").join(TENANT).join("l");
    let names = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    loop {
        let done = stop.load(Ordering::Relaxed);
        let now = t0.elapsed();
        let mut s = out.lock().unwrap();
        for n in names(&ingest) {
            s.ingest.entry(n).or_insert(now);
        }
        for n in names(&blobs) {
            s.blob.entry(n).or_insert(now);
        }
        for n in names(&layers) {
            if let Some(rest) = n.strip_prefix(".tmp-") {
                let key = rest.split('-').next().unwrap_or_default().to_string();
                s.tmp.entry(key).or_insert(now);
            } else {
                s.layer.entry(n).or_insert(now);
            }
        }
        drop(s);
        if done {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The pid of `docker-registry serve <its dir>/config.yml`, as text.
fn registry_pid(reg: &Registry) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let cfg = reg.storage_dir().parent()?.join("config.yml");
    let want = cfg.as_os_str().as_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let raw = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        (args.len() >= 3 && args[1] == b"serve" && args[2] == want).then(|| pid.to_string())
    })
}

fn count_entries(p: &Path, files: &mut usize) -> anyhow::Result<()> {
    for e in std::fs::read_dir(p).with_context(|| format!("reading {}", p.display()))? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            count_entries(&e.path(), files)?;
        } else if ft.is_file() {
            *files += 1;
        }
    }
    Ok(())
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).map_or(true, |mut rd| rd.next().is_none())
}

/// utime, stime (seconds) of `pid`, or its waited-for children's (`children`).
fn cpu_times(pid: &str, children: bool) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    // Fields after the command: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    let (u, s) = if children { (13, 14) } else { (11, 12) };
    (
        f.get(u).copied().unwrap_or(0.0) / tck,
        f.get(s).copied().unwrap_or(0.0) / tck,
    )
}

async fn agent_round(a: &mut Agent, image: &Image) -> anyhow::Result<AgentRound> {
    let state = a.state();
    let blobs = state.join("blobs/sha256");
    let ldir = state.join("images").join(TENANT).join("l");
    ensure!(
        is_empty_dir(&blobs),
        "{}: the blob cache {} is not empty before the pull",
        a.label,
        blobs.display()
    );
    ensure!(
        is_empty_dir(&ldir),
        "{}: {} is not empty before the pull",
        a.label,
        ldir.display()
    );
    let reference = format!("{}/{REPO}:{TAG}", a.registry);
    let pid = a.pid().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Sightings::default()));
    let cpu0 = cpu_times(&pid, false);
    let t0 = Instant::now();
    let watcher = {
        let (state, stop, seen) = (state.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || watch(state, t0, stop, seen))
    };
    let pulled = async {
        let mut stream = a
            .images
            .clone()
            .pull_image(pb::PullImageRequest {
                tenant: TENANT.into(),
                reference: reference.clone(),
                auth: None,
            })
            .await?
            .into_inner();
        while let Some(ev) = stream.message().await? {
            if let Some(Event::Image(i)) = ev.event {
                return Ok::<_, tonic::Status>(i);
            }
        }
        Err(tonic::Status::unknown(
            "the pull stream ended without an image",
        ))
    }
    .await;
    let wall = t0.elapsed();
    let cpu1 = cpu_times(&pid, false);
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let img = pulled.with_context(|| format!("{}: pulling {reference}", a.label))?;
    ensure!(
        img.digest == image.built.manifest.digest && img.layers.len() == LAYERS,
        "{}: pulled {} with {} layers",
        a.label,
        img.digest,
        img.layers.len()
    );

    // Every regular file of the image is in the layer directories.
    let mut files = 0;
    count_entries(&ldir, &mut files)?;
    let want = image.total().files;
    ensure!(
        files == want,
        "{}: {files} regular files unpacked, the image has {want}",
        a.label
    );

    // The watcher is done: the sightings are ours alone.
    let s = std::mem::take(&mut *seen.lock().unwrap());
    let secs = |d: Option<&Duration>| d.map_or(f64::NAN, Duration::as_secs_f64);
    let mut r = AgentRound {
        wall: wall.as_secs_f64(),
        cpu_user: cpu1.0 - cpu0.0,
        cpu_sys: cpu1.1 - cpu0.1,
        first_download: f64::INFINITY,
        first_unpack: f64::INFINITY,
        ..Default::default()
    };
    let timeline = std::env::var_os("CAAS_BENCH_TIMELINE").is_some();
    for (i, l) in image.built.layers.iter().enumerate() {
        let hex = digest_hex(&l.digest);
        let key = &hex[..LAYER_KEY_LEN];
        // A blob written in one go between two looks may never be seen in ingest/: 0 then.
        let ingest = secs(s.ingest.get(hex).or(s.blob.get(hex)));
        let blob = secs(s.blob.get(hex));
        let tmp = secs(s.tmp.get(key).or(s.layer.get(key)));
        let layer = secs(s.layer.get(key));
        if timeline {
            eprintln!(
                "  {}: layer {}: download {ingest:.3}..{blob:.3} s, unpack {tmp:.3}..{layer:.3} s",
                a.label,
                i + 1
            );
        }
        r.first_download = r.first_download.min(ingest);
        r.last_blob = r.last_blob.max(blob);
        r.download_sum += blob - ingest;
        r.first_unpack = r.first_unpack.min(tmp);
        r.unpack_sum += layer - tmp;
        r.last_layer = r.last_layer.max(layer);
    }

    // Remove it: the layer directories go, and GC deletes the blobs.
    a.images
        .remove_image(pb::RemoveImageRequest {
            tenant: TENANT.into(),
            reference,
        })
        .await
        .with_context(|| format!("{}: removing the image", a.label))?;
    ensure!(
        is_empty_dir(&blobs),
        "{}: blobs left in {} after the remove",
        a.label,
        blobs.display()
    );
    Ok(r)
}

async fn timed(cmd: &mut tokio::process::Command, what: &str) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    let d = t0.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(d)
}

async fn peer_round(registry: &str, image: &Image) -> anyhow::Result<PeerRound> {
    let dir = tempfile::Builder::new()
        .prefix("caas-bench-peer-")
        .tempdir_in(work_dir())?;
    let layout = dir.path().join("oci");
    let bundle = dir.path().join("bundle");
    let me = std::process::id().to_string();
    let c0 = cpu_times(&me, true);
    let skopeo = timed(
        tokio::process::Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--src-no-creds",
            ])
            .arg(format!("docker://{registry}/{REPO}:{TAG}"))
            .arg(format!("oci:{}:{TAG}", layout.display())),
        "skopeo copy",
    )
    .await?;
    let c1 = cpu_times(&me, true);
    let umoci = timed(
        tokio::process::Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{TAG}", layout.display()))
            .arg(&bundle),
        "umoci unpack",
    )
    .await?;
    let c2 = cpu_times(&me, true);
    let mut files = 0;
    count_entries(&bundle.join("rootfs"), &mut files)?;
    let want = image.total().files;
    ensure!(
        files == want,
        "umoci: {files} regular files unpacked, the image has {want}"
    );
    tokio::task::block_in_place(|| drop(dir));
    Ok(PeerRound {
        skopeo,
        umoci,
        skopeo_cpu: (c1.0 - c0.0, c1.1 - c0.1),
        umoci_cpu: (c2.0 - c1.0, c2.1 - c1.1),
        registry_cpu: 0.0,
    })
}

// ---------------------------------------------------------------------------------------------
// Run

struct Results {
    image: Image,
    rounds: usize,
    warmup: usize,
    agents: Vec<(String, Vec<AgentRound>)>,
    peer: Vec<PeerRound>,
    skopeo_version: String,
    umoci_version: String,
    load_before: String,
    load_after: String,
}

fn version(cmd: &str) -> String {
    caas_tests::first_line(cmd, &["--version"])
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(rounds: usize, warmup: usize) -> anyhow::Result<String> {
    let load_before = loadavg();
    let reg = Registry::start(RegistryOpts::default()).await?;
    let host = reg.host();
    eprintln!("image_pull: building the image and pushing it to {host} ...");
    let image = build_and_push(&reg).await?;
    eprintln!(
        "image_pull: built in {:.1} s, pushed in {:.1} s; {warmup} warm-up + {rounds} rounds",
        image.generate.as_secs_f64(),
        image.push.as_secs_f64()
    );
    let keep_logs = std::env::var_os("CAAS_BENCH_KEEP_LOGS").is_some();
    let reg_pid = registry_pid(&reg);
    let mut agents = vec![Agent::start(4, &host).await?, Agent::start(1, &host).await?];
    let result = rounds_loop(
        &mut agents,
        &host,
        reg_pid.as_deref(),
        &image,
        rounds,
        warmup,
    )
    .await;
    for a in agents {
        a.stop(keep_logs).await;
    }
    let (agent_rounds, peer) = result?;
    drop(reg);
    Ok(table(&Results {
        image,
        rounds,
        warmup,
        agents: agent_rounds,
        peer,
        skopeo_version: version("skopeo"),
        umoci_version: version("umoci"),
        load_before,
        load_after: loadavg(),
    }))
}

type Rounds = (Vec<(String, Vec<AgentRound>)>, Vec<PeerRound>);

async fn rounds_loop(
    agents: &mut [Agent],
    host: &str,
    reg_pid: Option<&str>,
    image: &Image,
    rounds: usize,
    warmup: usize,
) -> anyhow::Result<Rounds> {
    let reg_cpu = || {
        reg_pid.map_or(f64::NAN, |p| {
            let (u, s) = cpu_times(p, false);
            u + s
        })
    };
    let mut agent_rounds: Vec<Vec<AgentRound>> = agents.iter().map(|_| Vec::new()).collect();
    let mut peer = Vec::new();
    let contenders = agents.len() + 1;
    for round in 0..warmup + rounds {
        let timed_round = round >= warmup;
        for k in 0..contenders {
            let c = (round + k) % contenders;
            tokio::task::block_in_place(nix::unistd::sync);
            let reg0 = reg_cpu();
            if c < agents.len() {
                let mut r = agent_round(&mut agents[c], image).await?;
                r.registry_cpu = reg_cpu() - reg0;
                eprintln!(
                    "round {round}{}: {}: {:.2} s",
                    if timed_round { "" } else { " (warm-up)" },
                    agents[c].label,
                    r.wall
                );
                if timed_round {
                    agent_rounds[c].push(r);
                }
            } else {
                let mut r = peer_round(host, image).await?;
                r.registry_cpu = reg_cpu() - reg0;
                eprintln!(
                    "round {round}{}: skopeo copy {:.2} s + umoci unpack {:.2} s",
                    if timed_round { "" } else { " (warm-up)" },
                    r.skopeo,
                    r.umoci
                );
                if timed_round {
                    peer.push(r);
                }
            }
        }
    }
    tokio::task::block_in_place(nix::unistd::sync);
    Ok((
        agents
            .iter()
            .map(|a| a.label.clone())
            .zip(agent_rounds)
            .collect(),
        peer,
    ))
}

// ---------------------------------------------------------------------------------------------
// Report

use caas_tests::{Stats, stats};

fn median(samples: impl IntoIterator<Item = f64>) -> f64 {
    stats(samples).median
}

const LABEL_W: usize = 56;

/// A phase row of an agent: its label and how to read it from a round.
type Phase = (&'static str, fn(&AgentRound) -> f64);

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn table(r: &Results) -> String {
    let mut o = String::new();
    let total = r.image.total();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let _ = writeln!(
        o,
        "\nimage: {LAYERS} gzip layers, {:.1} MiB file content ({:.1} MiB as tar), {:.1} MiB \
         compressed (ratio {:.2}); {} regular files, {} directories, {} symlinks",
        mib(total.content_bytes),
        mib(total.tar_bytes),
        mib(r.image.compressed_bytes),
        total.tar_bytes as f64 / r.image.compressed_bytes as f64,
        total.files,
        total.dirs,
        total.symlinks
    );
    for (i, (l, d)) in r.image.layers.iter().zip(&r.image.built.layers).enumerate() {
        let _ = writeln!(
            o,
            "  layer {}: {:>6.1} MiB content, {:>6.1} MiB gzip, {:>5} files",
            i + 1,
            mib(l.content_bytes),
            mib(d.size),
            l.files
        );
    }
    let _ = writeln!(
        o,
        "{} rounds after {} warm-up; {cpus} CPUs; loadavg before {} / after {}",
        r.rounds, r.warmup, r.load_before, r.load_after
    );
    let fs = describe_fs(&work_dir());
    let _ = writeln!(
        o,
        "agent state and peer output in {}: {fs}",
        work_dir().display()
    );
    if fs.starts_with("ext4") && fs.ends_with("no journal") {
        let _ = writeln!(
            o,
            "note: ext4 without a journal: file creation scans recently deleted inodes there, \
             which can dominate both unpacks' system time (see the header of this bench)"
        );
    }
    let rule = "-".repeat(LABEL_W + 8 * 5);
    let _ = writeln!(o, "{rule}");
    let head = ["median", "min", "max", "cpu usr", "cpu sys"];
    let _ = writeln!(
        o,
        "{:<LABEL_W$}{:>8}{:>8}{:>8}{:>8}{:>8}",
        "pull + unpack, wall seconds", head[0], head[1], head[2], head[3], head[4]
    );
    let row = |o: &mut String, label: &str, s: Stats, cpu: Option<(f64, f64)>| {
        let (u, sy) = cpu.map_or((String::new(), String::new()), |(u, s)| {
            (format!("{u:.2}"), format!("{s:.2}"))
        });
        let _ = writeln!(
            o,
            "{label:<LABEL_W$}{:>8.2}{:>8.2}{:>8.2}{u:>8}{sy:>8}",
            s.median, s.min, s.max
        );
    };
    let peer_total: Vec<f64> = r.peer.iter().map(|p| p.skopeo + p.umoci).collect();
    let peer_s = stats(peer_total.iter().copied());
    for (label, rs) in &r.agents {
        let cpu = (
            median(rs.iter().map(|x| x.cpu_user)),
            median(rs.iter().map(|x| x.cpu_sys)),
        );
        row(&mut o, label, stats(rs.iter().map(|x| x.wall)), Some(cpu));
        let phases: [Phase; 6] = [
            ("  first layer download starts at", |x| x.first_download),
            ("  last layer blob cached at", |x| x.last_blob),
            ("  first layer unpack starts at", |x| x.first_unpack),
            ("  last layer unpacked at", |x| x.last_layer),
            ("  sum of per-layer downloads (+sha256, fsync)", |x| {
                x.download_sum
            }),
            ("  sum of per-layer unpacks (gunzip, sha256, write)", |x| {
                x.unpack_sum
            }),
        ];
        for (l, f) in phases {
            row(&mut o, l, stats(rs.iter().map(f)), None);
        }
    }
    let cpu_sum = |f: fn(&PeerRound) -> (f64, f64)| {
        (
            median(r.peer.iter().map(|p| f(p).0)),
            median(r.peer.iter().map(|p| f(p).1)),
        )
    };
    let both = |p: &PeerRound| {
        (
            p.skopeo_cpu.0 + p.umoci_cpu.0,
            p.skopeo_cpu.1 + p.umoci_cpu.1,
        )
    };
    row(
        &mut o,
        "skopeo copy + umoci unpack",
        peer_s,
        Some(cpu_sum(both)),
    );
    row(
        &mut o,
        "  skopeo copy docker:// -> oci: layout",
        stats(r.peer.iter().map(|p| p.skopeo)),
        Some(cpu_sum(|p| p.skopeo_cpu)),
    );
    row(
        &mut o,
        "  umoci unpack layout -> bundle",
        stats(r.peer.iter().map(|p| p.umoci)),
        Some(cpu_sum(|p| p.umoci_cpu)),
    );
    let _ = writeln!(o, "{rule}");
    for (label, rs) in &r.agents {
        let a = stats(rs.iter().map(|x| x.wall));
        let p = label.rsplit_once(", ").map_or(label.as_str(), |(_, p)| p);
        let _ = writeln!(
            o,
            "{:<LABEL_W$}{:>7.2}x{:>7.2}x{:>7.2}x",
            format!("ratio agent ({p}) / skopeo+umoci"),
            a.median / peer_s.median,
            a.min / peer_s.min,
            a.max / peer_s.max
        );
    }
    if let [(_, a4), (_, a1), ..] = r.agents.as_slice() {
        let (a, b) = (
            stats(a4.iter().map(|x| x.wall)),
            stats(a1.iter().map(|x| x.wall)),
        );
        let _ = writeln!(
            o,
            "{:<LABEL_W$}{:>7.2}x{:>7.2}x{:>7.2}x",
            "ratio parallel_layers=4 / parallel_layers=1",
            a.median / b.median,
            a.min / b.min,
            a.max / b.max
        );
    }
    let _ = writeln!(o, "{rule}");
    let mut reg = Vec::new();
    for (label, rs) in &r.agents {
        let p = label.rsplit_once(", ").map_or(label.as_str(), |(_, p)| p);
        reg.push(format!(
            "agent ({p}) {:.2}",
            median(rs.iter().map(|x| x.registry_cpu))
        ));
    }
    reg.push(format!(
        "skopeo {:.2}",
        median(r.peer.iter().map(|x| x.registry_cpu))
    ));
    let _ = writeln!(
        o,
        "registry (docker-registry) CPU seconds per pull, median: {}",
        reg.join(", ")
    );
    let _ = writeln!(
        o,
        "agent: PullImage over the unix socket, from the call to the final Image event; blobs \
         are verified (sha256, size), fsynced, each layer unpacked into its own directory \
         (owners shifted into the tenant's range) with its diff_id checked."
    );
    let _ = writeln!(
        o,
        "peer: skopeo copy (layers in parallel, digests verified) then umoci unpack (layers in \
         sequence into one rootfs, owners kept, plus its mtree manifest of the rootfs); each \
         timed from spawn to exit."
    );
    let _ = writeln!(
        o,
        "cpu: the agent process's user/system seconds during the pull; the peers' as children \
         of this process. The registry's CPU is in neither."
    );
    let _ = writeln!(
        o,
        "peer versions: {}; {}",
        r.skopeo_version, r.umoci_version
    );
    o
}
