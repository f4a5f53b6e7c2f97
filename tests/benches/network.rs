//! Tenant network benchmark: iperf3 TCP throughput on the agent's paths (container to container
//! inside a tenant, tenant to a test host through the egress NAT) next to the same paths between
//! plain network namespaces, and the time to join a tenant's netns to the host. Prints one
//! plain-text table.
//!
//! Run as root from the workspace root:
//!
//! ```sh
//! cargo build --release --bins -p caas-agent      # the tenant engine binary
//! cargo bench -p caas-tests --bench network
//! ```
//!
//! `cargo bench` does not build `target/release/caas-agent`, which the in-process agent starts as
//! each tenant's engine: hence the first command (the bench stops with a message when it is
//! missing). Needs `iperf3` (Debian package, scripts/setup.sh installs it), `ip`, `sysctl`, `nft`
//! and busybox-static.
//!
//! Knobs: `CAAS_BENCH_ROUNDS` (default 5), `CAAS_BENCH_SECS` (seconds per iperf3 run, default 5),
//! `CAAS_BENCH_ATTACH` (attach samples per method, default 50), `CAAS_BENCH_GSO` (the IPv4 GSO
//! sizes to run the throughput paths with, comma-separated bytes; default `65536,196608`). A
//! run takes about 5 minutes 20 s with the defaults: per GSO size, 6 paths, each a 1 s warm-up
//! run and ROUNDS runs of SECS seconds, plus half a second per run and a few seconds for the
//! attach part and the agent.
//!
//! GSO sizes: for each size, every link the bench makes (both ends of each veth, the test
//! host's uplink included) gets it as its `gso_ipv4_max_size` and `gro_ipv4_max_size`, and a
//! new tenant is made, whose link takes the uplink's size as the agent does (BIG TCP: the agent
//! gives a new tenant link the uplinks' size when all of them are above 64 KiB). So each set
//! compares the paths with the same link settings. 65536 is the kernel's default; 196608 is a
//! BIG TCP size (Linux 6.3+ for IPv4).
//!
//! Throughput paths, each one iperf3 TCP stream from client to server (`iperf3 -c ADDR -t SECS
//! -J`, the server `iperf3 -s -1`), the receiver's rate:
//!
//! 1. plain netns pair: two netns joined by one veth pair. The baseline.
//! 2. plain routed via the host: two netns, each joined to the root netns by its own veth pair,
//!    IPv4 forwarding switched on for those two links only (never `ip_forward`), no NAT. The path
//!    of the NAT case without the agent. The agent runs meanwhile, so the root netns holds its
//!    `inet caas` table: nothing in it matches these links, but its `ct` and nat chains make
//!    conntrack track this traffic too.
//! 3. plain routed via a router netns: the same as 2 with a third, plain netns as the router: no
//!    netfilter hook at all on the path. Rows 2 and 3 apart are the cost of conntrack alone.
//! 4. intra-tenant: iperf3 server in one container of a tenant, client in another, to the
//!    tenant's `eth0` address. A tenant's containers share its netns, so this is its loopback.
//! 5. tenant to test host via NAT: the client in a container, the server in a test-host netns
//!    whose veth is the agent's configured uplink: tenant veth, forward, masquerade, uplink veth.
//! 6. plain NAT via a router netns: the path of 5 built by hand between plain netns: two netns
//!    linked to a third that forwards between them and masquerades what leaves towards the
//!    server (one nft rule, so conntrack and NAT), and the server has no route back. The
//!    issue's peer for 5 ("the same path between two plain network namespaces"): 5 against 6
//!    is what the agent's design and rules cost on top of NAT itself.
//!
//! Each round runs every path once, in an order rotated per round, so that noise from other work
//! on the machine hits all of them alike, after an untimed warm-up round of 1 s per path. The
//! table shows the median, min and max of the rounds, and ratios that are the median of the
//! per-round ratios (a round's paths run within half a minute of each other, so a slow stretch of
//! the machine cancels out better than in a ratio of medians). The tenant gets as many CPUs of
//! quota as the machine has, so its cgroup does not throttle iperf3.
//!
//! Attach: `caas_agent::net::attach` (veth pair with the peer made in the netns, addresses, devconf,
//! links up, default route; over rtnetlink) against a fresh `ip netns add` netns, next to the same
//! steps done by `ip` and `sysctl` commands, alternating, each followed by its detach. A container
//! needs no step of its own: it joins its tenant's netns, which was attached once.
//!
//! Everything the bench makes (netns, links and with them their addresses, routes and per-link
//! sysctls, the tenant) is removed when it ends, also on failure, and the host's `inet caas` table
//! is put back as it was (deleted when there was none). Traffic stays in the namespaces it makes.
//! It refuses to run while links named `caas-*` exist: another agent's tenants would lose their
//! firewall when this bench's agent replaces the table. Nothing else may start a caas-agent on
//! the host meanwhile either (no `cargo test`): one with networks off deletes the table when it
//! starts; the bench checks the table's handle after every run and stops if it changed.
//!
//! On the 2-CPU machine this was written on (kernel 6.18, iperf3 3.12), quiet: pair ~37 Gbit/s,
//! NAT path ~29 (0.79 of the pair), intra-tenant ~42. In a scratch run with the agent's table
//! deleted once the tenant existed (and the test host routed back to the pool), the tenant's
//! path was 0.91 of the pair, like the routed paths without netfilter: conntrack, which the
//! table's `ct` and nat chains switch on for the whole root netns, costs about 10% of a forwarded
//! stream, the NAT and the rules about 5% more. That kernel has no flowtable
//! (`CONFIG_NF_FLOW_TABLE` is not set) to take established flows past conntrack. (The agent now
//! loads its table again as soon as it is deleted, so such a run needs a patched agent.) Against
//! path 6, the NAT path built by hand, the tenant's path measured 0.91-0.94 on 2026-12-05.

#![allow(clippy::unwrap_used)] // a benchmark harness: a failing setup step should stop it loudly

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use caas_agent::tenants::subnet::Ipv4Net;
use caas_proto::v1::{
    self as pb, container_service_client::ContainerServiceClient,
    tenant_service_client::TenantServiceClient,
};
use caas_tests::{TestAgent, busybox_rootfs};
use tonic::transport::Channel;

const IPERF3: &str = "/usr/bin/iperf3";
const PORT: u16 = 5301;
/// Tenant subnets of the bench's agent (the e2e tests use 10.231..10.235).
const TENANT_POOL: &str = "10.240.0.0/24";
/// The subnet of the attach measurements (nothing else uses it meanwhile).
const ATTACH_SUBNET: &str = "10.241.0.0/30";
const ATTACH_WARMUP: usize = 3;

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|v| *v > 0)
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
        println!("network bench: needs root (network namespaces, veths, nftables); skipped");
        return;
    }
    let missing: Vec<&str> = ["iperf3", "ip", "sysctl", "nft", "ldd"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .collect();
    if !missing.is_empty() {
        println!(
            "network bench: needs {} (Debian: iperf3 iproute2 procps nftables libc-bin); skipped",
            missing.join(", ")
        );
        return;
    }
    if let Err(e) = caas_tests::check_bench_agent_binary() {
        eprintln!("network bench: {e:#}");
        std::process::exit(1);
    }
    let gso = match gso_sizes() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("network bench: {e:#}");
            std::process::exit(2);
        }
    };
    let opts = Opts {
        rounds: env_usize("CAAS_BENCH_ROUNDS", 5),
        secs: env_usize("CAAS_BENCH_SECS", 5),
        attach: env_usize("CAAS_BENCH_ATTACH", 50),
        gso,
        tag: format!("{:08x}", rand::random::<u32>()),
    };
    let started = Instant::now();
    // Declared before the runtime so that it is dropped after it: the agent is stopped inside
    // `run`, then the namespaces and links go.
    let mut cleanup = Cleanup::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(run(&opts, &mut cleanup));
    drop(rt);
    drop(cleanup);
    match r {
        Ok(results) => print!("{}", table(&opts, &results, started.elapsed())),
        Err(e) => {
            eprintln!("network bench: {e:#}");
            std::process::exit(1);
        }
    }
}

/// `CAAS_BENCH_GSO`: the IPv4 GSO sizes to run the paths with, comma-separated bytes.
fn gso_sizes() -> anyhow::Result<Vec<u32>> {
    let Ok(v) = std::env::var("CAAS_BENCH_GSO") else {
        return Ok(vec![DEFAULT_GSO, BIG_GSO]);
    };
    v.split(',')
        .map(|x| {
            x.trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| (4096..=524_288).contains(&n))
                .with_context(|| {
                    format!("CAAS_BENCH_GSO: {x:?} is not a size in bytes from 4096 to 524288")
                })
        })
        .collect()
}

/// The kernel's default IPv4 GSO size.
const DEFAULT_GSO: u32 = 65_536;
/// A BIG TCP size (192 KiB), as Cilium's BIG TCP uses on hosts whose NICs take it.
const BIG_GSO: u32 = 196_608;

struct Opts {
    rounds: usize,
    secs: usize,
    attach: usize,
    /// The IPv4 GSO sizes of the bench's links, one throughput set each.
    gso: Vec<u32>,
    /// Random hex in every name this run makes.
    tag: String,
}

// ---------------------------------------------------------------------------------------------
// Cleanup

/// One command that undoes a step, run (quietly, errors ignored) when dropped.
struct Undo(Vec<String>);

impl Undo {
    fn new(argv: &[&str]) -> Self {
        Self(argv.iter().map(|s| (*s).to_string()).collect())
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some((cmd, args)) = self.0.split_first() {
            let _ = Command::new(cmd)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Undo steps, run in the reverse order of their making. Every netns and link is registered
/// right after it is made; addresses, routes and per-link sysctls go with their link.
#[derive(Default)]
struct Cleanup(Vec<Undo>);

impl Cleanup {
    fn push(&mut self, argv: &[&str]) {
        self.0.push(Undo::new(argv));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some(u) = self.0.pop() {
            drop(u);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Plain namespaces

fn cmd(argv: &[&str]) -> anyhow::Result<String> {
    let (c, args) = argv.split_first().context("empty command")?;
    let out = Command::new(c)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {c}"))?;
    ensure!(
        out.status.success(),
        "{}: {}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n <ns> <args>`.
fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec!["ip", "-n", ns];
    argv.extend_from_slice(args);
    cmd(&argv).map(drop)
}

fn add_netns(c: &mut Cleanup, name: &str) -> anyhow::Result<()> {
    cmd(&["ip", "netns", "add", name])?;
    c.push(&["ip", "netns", "del", name]);
    ip_in(name, &["link", "set", "lo", "up"])
}

/// `eth0` in `ns` with `inner`, `ns`'s default route via `outer`, peered with `link` in the
/// root netns with `outer` and IPv4 forwarding on (for this link only).
fn link_to_root(
    c: &mut Cleanup,
    link: &str,
    ns: &str,
    outer: &str,
    inner: &str,
    prefix: u8,
) -> anyhow::Result<()> {
    cmd(&[
        "ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    c.push(&["ip", "link", "del", link]);
    cmd(&[
        "ip",
        "addr",
        "add",
        &format!("{outer}/{prefix}"),
        "dev",
        link,
    ])?;
    cmd(&["ip", "link", "set", link, "up"])?;
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{link}/forwarding"), "1")
        .with_context(|| format!("forwarding on {link}"))?;
    ip_in(
        ns,
        &["addr", "add", &format!("{inner}/{prefix}"), "dev", "eth0"],
    )?;
    ip_in(ns, &["link", "set", "eth0", "up"])?;
    ip_in(ns, &["route", "add", "default", "via", outer])
}

/// Where one iperf3 runs.
#[derive(Clone, Copy)]
enum Side<'a> {
    Netns(&'a str),
    Tenant,
}

/// A path: where the client and the server run, and the address the client connects to.
struct Route<'a> {
    client: Side<'a>,
    server: Side<'a>,
    addr: Ipv4Addr,
}

/// The plain namespaces of paths 1..3 and 6, and the test host of path 5.
struct Plain {
    pair: (String, String),
    routed: (String, String),
    router: (String, String),
    /// Client and server of the plain NAT path (their router is `cbn-n-<tag>`).
    nat: (String, String),
    /// The test host's netns and its root-side link (the agent's uplink).
    host: (String, String),
}

const PAIR_B: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const ROUTED_D: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 2);
const ROUTER_F: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 2);
const NAT_K: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 2);
const TEST_HOST: Ipv4Addr = Ipv4Addr::new(198, 19, 6, 2);

/// `inner.0` and `inner.2` each linked to the router netns `inner.1` by a veth (`links`: the
/// router's end and its address; the inner end is `eth0` with the next address of the /30),
/// forwarding on those two links only. The far side (`inner.2`) gets a default route back
/// through the router only when `route_back`.
fn make_router(
    c: &mut Cleanup,
    [near, router, far]: [&str; 3],
    links: [(&str, &str); 2],
    route_back: bool,
) -> anyhow::Result<()> {
    for n in [near, router, far] {
        add_netns(c, n)?;
    }
    for (i, (inner_ns, (link, outer))) in [near, far].into_iter().zip(links).enumerate() {
        let inner: Ipv4Addr = outer.parse::<Ipv4Addr>()?.to_bits().wrapping_add(1).into();
        ip_in(
            router,
            &[
                "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", inner_ns,
            ],
        )?;
        ip_in(
            router,
            &["addr", "add", &format!("{outer}/30"), "dev", link],
        )?;
        ip_in(router, &["link", "set", link, "up"])?;
        cmd(&[
            "ip",
            "netns",
            "exec",
            router,
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv4.conf.{link}.forwarding=1"),
        ])?;
        ip_in(
            inner_ns,
            &["addr", "add", &format!("{inner}/30"), "dev", "eth0"],
        )?;
        ip_in(inner_ns, &["link", "set", "eth0", "up"])?;
        if i == 0 || route_back {
            ip_in(inner_ns, &["route", "add", "default", "via", outer])?;
        }
    }
    Ok(())
}

fn make_plain(c: &mut Cleanup, tag: &str) -> anyhow::Result<Plain> {
    let ns = |n: &str| format!("cbn-{n}-{tag}");

    // 1: one veth pair between A and B.
    let (a, b) = (ns("a"), ns("b"));
    add_netns(c, &a)?;
    add_netns(c, &b)?;
    ip_in(
        &a,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ],
    )?;
    ip_in(&a, &["addr", "add", "198.19.1.1/30", "dev", "eth0"])?;
    ip_in(&b, &["addr", "add", &format!("{PAIR_B}/30"), "dev", "eth0"])?;
    ip_in(&a, &["link", "set", "eth0", "up"])?;
    ip_in(&b, &["link", "set", "eth0", "up"])?;

    // 2: C and D, each linked to the root netns, which routes between them.
    let (cn, d) = (ns("c"), ns("d"));
    add_netns(c, &cn)?;
    add_netns(c, &d)?;
    link_to_root(
        c,
        &format!("cbnc{tag}"),
        &cn,
        "198.19.2.1",
        "198.19.2.2",
        30,
    )?;
    link_to_root(
        c,
        &format!("cbnd{tag}"),
        &d,
        "198.19.3.1",
        &ROUTED_D.to_string(),
        30,
    )?;

    // 3: E and F, linked to a router netns R (forwarding on its two links only).
    let (e, r, f) = (ns("e"), ns("r"), ns("f"));
    make_router(
        c,
        [&e, &r, &f],
        [("toe", "198.19.4.1"), ("tof", "198.19.5.1")],
        true,
    )?;

    // 6: G and K through a router netns N that masquerades what leaves towards K, as the
    // agent's uplink does. K has no route back to G: without the NAT, nothing would return.
    let (g, n, k) = (ns("g"), ns("n"), ns("k"));
    make_router(
        c,
        [&g, &n, &k],
        [("tog", "198.19.7.1"), ("tok", "198.19.8.1")],
        false,
    )?;
    for rule in [
        "add table ip cbnnat",
        "add chain ip cbnnat post { type nat hook postrouting priority 100; policy accept; }",
        "add rule ip cbnnat post oifname tok masquerade",
    ] {
        cmd(&["ip", "netns", "exec", &n, "nft", rule])?;
    }

    // 5: the test host H; its root-side link is the agent's uplink. H has no route to the
    // tenant pool: the agent's masquerade makes tenants' packets come from 198.19.6.1.
    let h = ns("h");
    let uplink = format!("cbnh{tag}");
    add_netns(c, &h)?;
    link_to_root(c, &uplink, &h, "198.19.6.1", &TEST_HOST.to_string(), 24)?;

    Ok(Plain {
        pair: (a, b),
        routed: (cn, d),
        router: (e, f),
        nat: (g, k),
        host: (h, uplink),
    })
}

// ---------------------------------------------------------------------------------------------
// The agent's side

struct Tenant {
    c: ContainerServiceClient<Channel>,
    id: String,
    rootfs: String,
    addr: Ipv4Addr,
    /// Names of containers: one counter for the run.
    seq: usize,
}

fn cref(tenant: &str, c: &str) -> Option<pb::ContainerRef> {
    Some(pb::ContainerRef {
        tenant: tenant.into(),
        container: c.into(),
    })
}

impl Tenant {
    /// Creates and starts a container running `argv`; returns its name and host pid.
    async fn start(&mut self, role: &str, argv: &[&str]) -> anyhow::Result<(String, u32)> {
        self.seq += 1;
        let name = format!("{role}-{}", self.seq);
        self.c
            .create_container(pb::CreateContainerRequest {
                tenant: self.id.clone(),
                name: name.clone(),
                rootfs_path: self.rootfs.clone(),
                command: argv.iter().map(|s| (*s).to_string()).collect(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating container {name}"))?;
        let made = self
            .c
            .start_container(pb::StartContainerRequest {
                r#ref: cref(&self.id, &name),
            })
            .await
            .with_context(|| format!("starting container {name}"))?
            .into_inner();
        Ok((name, made.pid))
    }

    async fn wait(&mut self, name: &str, limit: Duration) -> anyhow::Result<i32> {
        let call = self.c.wait_container(pb::WaitContainerRequest {
            r#ref: cref(&self.id, name),
        });
        Ok(tokio::time::timeout(limit, call)
            .await
            .with_context(|| format!("container {name} still runs after {limit:?}"))?
            .with_context(|| format!("waiting for container {name}"))?
            .into_inner()
            .exit_code)
    }

    async fn logs(&mut self, name: &str, stream: pb::LogStream) -> anyhow::Result<String> {
        let mut s = self
            .c
            .logs(pb::LogsRequest {
                r#ref: cref(&self.id, name),
                stream: stream.into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("logs of {name}"))?
            .into_inner();
        let mut out = String::new();
        while let Some(chunk) = s.message().await? {
            out.push_str(&String::from_utf8_lossy(&chunk.data));
        }
        Ok(out)
    }

    async fn delete(&mut self, name: &str) -> anyhow::Result<()> {
        self.c
            .delete_container(pb::DeleteContainerRequest {
                r#ref: cref(&self.id, name),
                force: true,
            })
            .await
            .with_context(|| format!("deleting container {name}"))?;
        Ok(())
    }

    /// Runs `argv` in a new container to its end; returns its exit code and its stdout and
    /// stderr, and deletes it.
    async fn run(&mut self, role: &str, argv: &[&str], limit: Duration) -> anyhow::Result<Ran> {
        let (name, _) = self.start(role, argv).await?;
        let code = self.wait(&name, limit).await;
        let stdout = self.logs(&name, pb::LogStream::Stdout).await;
        let stderr = self.logs(&name, pb::LogStream::Stderr).await;
        self.delete(&name).await?;
        Ok(Ran {
            code: code?,
            stdout: stdout?,
            stderr: stderr?,
        })
    }
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Copies iperf3 and every shared object `ldd` lists for it (the dynamic loader too) into the
/// same paths under `rootfs`.
fn add_iperf3(rootfs: &Path) -> anyhow::Result<()> {
    let listed = cmd(&["ldd", IPERF3])?;
    let mut files = vec![PathBuf::from(IPERF3)];
    for line in listed.lines() {
        // `libx.so.1 => /lib/.../libx.so.1 (0x..)`, `/lib64/ld-linux-x86-64.so.2 (0x..)`, or
        // `linux-vdso.so.1 (0x..)` (no file).
        ensure!(!line.contains("not found"), "ldd {IPERF3}: {}", line.trim());
        let path = line
            .rsplit("=>")
            .next()
            .and_then(|s| s.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dst = rootfs.join(f.strip_prefix("/")?);
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        // Follows symlinks: the rootfs gets the file's bytes under the listed name.
        std::fs::copy(&f, &dst)
            .with_context(|| format!("copying {} to {}", f.display(), dst.display()))?;
    }
    Ok(())
}

/// The tenant's eth0 address: the second address of its subnet, the host side having the first.
async fn tenant_addr(tenant: &str) -> anyhow::Result<Ipv4Addr> {
    let link = caas_agent::net::link_name(tenant);
    for _ in 0..100 {
        if let Ok(out) = cmd(&["ip", "-o", "-4", "addr", "show", "dev", &link]) {
            let host = out
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<Ipv4Addr>().ok());
            if let Some(h) = host {
                return Ok(Ipv4Addr::from(u32::from(h) + 1));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the tenant's link {link} never got an address")
}

// ---------------------------------------------------------------------------------------------
// iperf3

/// Whether a TCP socket listens on `port` in the netns of `pid`.
fn listening(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                // sl local_address rem_address st: 0A is LISTEN.
                w.len() > 3 && w[1].ends_with(&want) && w[3] == "0A"
            })
    })
}

async fn wait_listening(pid: u32, what: &str, check_comm: bool) -> anyhow::Result<()> {
    for _ in 0..500 {
        // `ip netns exec` execs iperf3 after entering the netns: until the pid is iperf3, its
        // /proc/<pid>/net shows another netns.
        let comm_ok = !check_comm
            || std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "iperf3");
        if comm_ok && listening(pid, PORT) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{what}: the iperf3 server never listened on port {PORT}")
}

enum Server {
    Process(tokio::process::Child),
    Container(String),
}

fn iperf3_in(ns: &str, args: &[String]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("ip");
    c.args(["netns", "exec", ns, IPERF3])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

fn gbits(json: &str) -> anyhow::Result<f64> {
    let start = json.find('{').context("no JSON in iperf3's output")?;
    let v: serde_json::Value = serde_json::Deserializer::from_str(&json[start..])
        .into_iter()
        .next()
        .context("no JSON in iperf3's output")?
        .context("iperf3's JSON")?;
    if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
        bail!("iperf3: {e}");
    }
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("iperf3's JSON has no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

/// One iperf3 run on `route`: Gbit/s received.
async fn measure(route: &Route<'_>, t: &mut Tenant, secs: usize) -> anyhow::Result<f64> {
    let port = PORT.to_string();
    let server_args = ["-s", "-1", "-p", &port].map(String::from);
    let server = match route.server {
        Side::Netns(ns) => {
            let child = iperf3_in(ns, &server_args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning the iperf3 server")?;
            let pid = child.id().context("the iperf3 server has no pid")?;
            wait_listening(pid, ns, true).await?;
            Server::Process(child)
        }
        Side::Tenant => {
            let mut argv = vec![IPERF3];
            argv.extend(server_args.iter().map(String::as_str));
            let (name, pid) = t.start("srv", &argv).await?;
            wait_listening(pid, &name, false).await?;
            Server::Container(name)
        }
    };

    let secs_s = secs.to_string();
    let addr = route.addr.to_string();
    let client_args = ["-c", &addr, "-p", &port, "-t", &secs_s, "-J"].map(String::from);
    let limit = Duration::from_secs(u64::try_from(secs)? + 30);
    let json = match route.client {
        Side::Netns(ns) => {
            let out = tokio::time::timeout(
                limit,
                iperf3_in(ns, &client_args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .output(),
            )
            .await
            .context("the iperf3 client timed out")?
            .context("running the iperf3 client")?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            ensure!(
                out.status.success(),
                "iperf3 client in {ns}: {}: {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            stdout
        }
        Side::Tenant => {
            let mut argv = vec![IPERF3];
            argv.extend(client_args.iter().map(String::as_str));
            let ran = t.run("cli", &argv, limit).await?;
            ensure!(
                ran.code == 0,
                "iperf3 client container exited {}: {} {}",
                ran.code,
                ran.stdout.trim(),
                ran.stderr.trim()
            );
            ran.stdout
        }
    };

    // The server ends after its one client.
    match server {
        Server::Process(mut child) => {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
                bail!("the iperf3 server did not end after its client");
            }
        }
        Server::Container(name) => {
            let ended = t.wait(&name, Duration::from_secs(10)).await;
            t.delete(&name).await?;
            ended?;
        }
    }
    gbits(&json)
}

// ---------------------------------------------------------------------------------------------
// Throughput

const PATHS: [&str; N_PATHS] = [
    "plain netns pair (one veth pair)",
    "plain routed via the host (2 veths, fwd; agent table: conntrack)",
    "plain routed via a router netns (2 veths, fwd, no netfilter)",
    "intra-tenant: container -> container (tenant eth0 address)",
    "tenant -> test host via NAT (container -> agent uplink)",
    "plain NAT via a router netns (2 veths, fwd, masquerade)",
];
const N_PATHS: usize = 6;
const PAIR: usize = 0;
const ROUTED: usize = 1;
const ROUTER: usize = 2;
const NAT: usize = 4;
const PLAIN_NAT: usize = 5;

struct Results {
    /// Per GSO size, Gbit/s per path, one sample per round.
    gbits: Vec<(u32, [Vec<f64>; N_PATHS])>,
    /// Milliseconds: the agent's `net::attach`, then the same with `ip` commands.
    attach_ms: [Vec<f64>; 2],
    iperf3_version: String,
}

async fn run(opts: &Opts, cleanup: &mut Cleanup) -> anyhow::Result<Results> {
    let live: Vec<String> = std::fs::read_dir("/sys/class/net")?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("caas-"))
        .collect();
    ensure!(
        live.is_empty(),
        "tenant links of another agent exist ({}); this bench's agent would replace the \
         `inet caas` table they rely on: run it when no other agent with tenant networks runs",
        live.join(", ")
    );
    let iperf3_version = cmd(&[IPERF3, "--version"])?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();

    // Attach first, on a quiet host: no agent yet.
    let attach_ms = attach_bench(cleanup, opts).await?;

    let plain = make_plain(cleanup, &opts.tag)?;
    // The agent leaves its table when it stops (its tenants may live on): put back what was
    // here before, a table left by an earlier agent or none.
    match cmd(&["nft", "list", "table", "inet", "caas"]) {
        Ok(before) => {
            let saved = std::env::temp_dir().join(format!("caas-bench-nft-{}", opts.tag));
            std::fs::write(
                &saved,
                format!("add table inet caas\ndelete table inet caas\n{before}"),
            )?;
            let saved = saved.display().to_string();
            cleanup.push(&["rm", "-f", &saved]);
            cleanup.push(&["nft", "-f", &saved]);
        }
        Err(_) => cleanup.push(&["nft", "delete", "table", "inet", "caas"]),
    }
    let uplink = plain.host.1.clone();
    let mut agent = TestAgent::start(move |c| {
        c.network.enabled = true;
        c.network.pool = TENANT_POOL.parse().unwrap();
        c.network.uplinks = vec![uplink];
        c.network.dns = vec![TEST_HOST];
    })
    .await?;
    let r = throughput(&agent, &plain, opts).await;
    // Deletes the tenant (its link and engine) whatever happened.
    let stopped = agent.stop().await;
    let gbits = r?;
    stopped?;
    Ok(Results {
        gbits,
        attach_ms,
        iperf3_version,
    })
}

/// Every link the bench made for the plain paths and the test host (both ends of each veth):
/// the netns it is in (`None`: the root netns) and its name.
fn plain_links(plain: &Plain, tag: &str) -> Vec<(Option<PathBuf>, String)> {
    let ns = |n: &str| Some(PathBuf::from(format!("/run/netns/{n}")));
    let router = format!("cbn-r-{tag}");
    vec![
        (ns(&plain.pair.0), "eth0".into()),
        (ns(&plain.pair.1), "eth0".into()),
        (None, format!("cbnc{tag}")),
        (ns(&plain.routed.0), "eth0".into()),
        (None, format!("cbnd{tag}")),
        (ns(&plain.routed.1), "eth0".into()),
        (ns(&router), "toe".into()),
        (ns(&router), "tof".into()),
        (ns(&plain.router.0), "eth0".into()),
        (ns(&plain.router.1), "eth0".into()),
        (ns(&format!("cbn-n-{tag}")), "tog".into()),
        (ns(&format!("cbn-n-{tag}")), "tok".into()),
        (ns(&plain.nat.0), "eth0".into()),
        (ns(&plain.nat.1), "eth0".into()),
        (None, plain.host.1.clone()),
        (ns(&plain.host.0), "eth0".into()),
    ]
}

/// The throughput paths once per GSO size: every plain link and the uplink (the test host's
/// link) get the size, then a new tenant (whose link takes the uplink's size, as the agent
/// does) runs the tenant paths.
async fn throughput(
    agent: &TestAgent,
    plain: &Plain,
    opts: &Opts,
) -> anyhow::Result<Vec<(u32, [Vec<f64>; N_PATHS])>> {
    let mut out = Vec::new();
    for (i, &gso) in opts.gso.iter().enumerate() {
        for (ns, link) in plain_links(plain, &opts.tag) {
            caas_agent::net::set_link_gso(ns.as_deref(), &link, gso)
                .await
                .with_context(|| format!("setting the GSO size of {link} to {gso}"))?;
        }
        eprintln!("GSO size {gso} on every plain link and the uplink");
        out.push((gso, throughput_at(agent, plain, opts, gso, i).await?));
    }
    Ok(out)
}

async fn throughput_at(
    agent: &TestAgent,
    plain: &Plain,
    opts: &Opts,
    gso: u32,
    set: usize,
) -> anyhow::Result<[Vec<f64>; N_PATHS]> {
    let ch = agent.unix().await;
    let mut tenants = TenantServiceClient::new(ch.clone());
    let id = format!("bench-net-{}-{set}", opts.tag);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    tenants
        .create_tenant(pb::CreateTenantRequest {
            id: id.clone(),
            quotas: Some(pb::Quotas {
                cpus: Some(cpus as f64),
                memory_bytes: Some(2 << 30),
                pids: Some(1024),
                max_containers: Some(10),
            }),
            ..Default::default()
        })
        .await
        .context("creating the tenant")?;
    let rootfs = busybox_rootfs(agent.dir.path());
    add_iperf3(&rootfs)?;
    let mut t = Tenant {
        c: ContainerServiceClient::new(ch),
        id: id.clone(),
        rootfs: rootfs.display().to_string(),
        addr: tenant_addr(&id).await?,
        seq: 0,
    };
    let tenant_gso = caas_agent::net::gso_of(None, &caas_agent::net::link_name(&id)).await?;
    ensure!(
        tenant_gso == Some(gso),
        "the tenant's link has GSO size {tenant_gso:?}, the uplink {gso}"
    );
    // iperf3 runs in a container before anything is timed.
    let ran = t
        .run("check", &[IPERF3, "--version"], Duration::from_secs(30))
        .await?;
    ensure!(
        ran.code == 0,
        "iperf3 does not run in a container (exit {}): {} {}",
        ran.code,
        ran.stdout.trim(),
        ran.stderr.trim()
    );

    let routes = [
        Route {
            client: Side::Netns(&plain.pair.0),
            server: Side::Netns(&plain.pair.1),
            addr: PAIR_B,
        },
        Route {
            client: Side::Netns(&plain.routed.0),
            server: Side::Netns(&plain.routed.1),
            addr: ROUTED_D,
        },
        Route {
            client: Side::Netns(&plain.router.0),
            server: Side::Netns(&plain.router.1),
            addr: ROUTER_F,
        },
        Route {
            client: Side::Tenant,
            server: Side::Tenant,
            addr: t.addr,
        },
        Route {
            client: Side::Tenant,
            server: Side::Netns(&plain.host.0),
            addr: TEST_HOST,
        },
        Route {
            client: Side::Netns(&plain.nat.0),
            server: Side::Netns(&plain.nat.1),
            addr: NAT_K,
        },
    ];
    // The agent loaded its table at start and touches it again only for published ports (none
    // here), so its handle stays. A new handle means it was deleted and loaded again meanwhile:
    // another caas-agent with networks off deletes it when it starts (and this agent's guard
    // loads it again at once), so some run may have gone without the agent's rules for a moment.
    let handle = table_handle()?;
    let same_table = |when: &str| -> anyhow::Result<()> {
        let now = table_handle()?;
        ensure!(
            now == handle,
            "{when}: the table inet caas was replaced meanwhile (handle {handle} -> {now}): \
             did another caas-agent start on this host? Run the bench alone"
        );
        Ok(())
    };
    // Round 0 is a warm-up of 1 s per path (first container starts, page cache, TCP memory).
    let mut gbits: [Vec<f64>; N_PATHS] = Default::default();
    for round in 0..=opts.rounds {
        let secs = if round == 0 { 1 } else { opts.secs };
        for k in 0..routes.len() {
            let i = (round + k) % routes.len();
            let g = measure(&routes[i], &mut t, secs)
                .await
                .with_context(|| format!("round {round}: {}", PATHS[i]))?;
            same_table(&format!("round {round}: {}", PATHS[i]))?;
            let warm = if round == 0 { " (warm-up)" } else { "" };
            eprintln!(
                "gso {gso} round {round}: {:<66} {g:6.2} Gbit/s{warm}",
                PATHS[i]
            );
            if round > 0 {
                gbits[i].push(g);
            }
        }
    }
    Ok(gbits)
}

/// The handle of the table inet caas (`nft -a list table` prints it on the first line).
fn table_handle() -> anyhow::Result<u64> {
    let listed = cmd(&["nft", "-a", "list", "table", "inet", "caas"])?;
    listed
        .lines()
        .next()
        .and_then(|l| l.rsplit("# handle ").next())
        .and_then(|h| h.trim().parse().ok())
        .with_context(|| format!("no table handle in `nft -a list table inet caas`: {listed}"))
}

// ---------------------------------------------------------------------------------------------
// Attach

/// The agent's attach and the same steps by `ip`/`sysctl`, alternating, each against a fresh
/// netns and followed by its detach (not timed). Returns milliseconds per method.
async fn attach_bench(cleanup: &mut Cleanup, opts: &Opts) -> anyhow::Result<[Vec<f64>; 2]> {
    let tenant = format!("bench-attach-{}", opts.tag);
    let agent_link = caas_agent::net::link_name(&tenant);
    let ip_link = format!("cbni{}", opts.tag);
    let ns = format!("cbn-at-{}", opts.tag);
    cleanup.push(&["ip", "link", "del", &agent_link]);
    cleanup.push(&["ip", "link", "del", &ip_link]);
    let subnet: Ipv4Net = ATTACH_SUBNET.parse()?;
    let (outer, inner) = caas_agent::net::addresses(subnet);
    let prefix = subnet.prefix();
    let ns_path = PathBuf::from(format!("/run/netns/{ns}"));

    let mut ms: [Vec<f64>; 2] = Default::default();
    for i in 0..ATTACH_WARMUP + opts.attach {
        for k in 0..2 {
            let method = (i + k) % 2;
            cmd(&["ip", "netns", "add", &ns])?;
            let _ns = Undo::new(&["ip", "netns", "del", &ns]);
            let t0 = Instant::now();
            if method == 0 {
                caas_agent::net::attach(&tenant, &ns_path, subnet, &[])
                    .await
                    .context("caas_agent::net::attach")?;
            } else {
                attach_by_ip(&ip_link, &ns, outer, inner, prefix).await?;
            }
            let d = t0.elapsed();
            let link = if method == 0 { &agent_link } else { &ip_link };
            if i == 0 {
                check_attached(link, &ns, outer, inner)
                    .with_context(|| format!("after attach method {method}"))?;
            }
            if method == 0 {
                caas_agent::net::detach(&tenant).await;
            } else {
                cmd(&["ip", "link", "del", &ip_link])?;
            }
            if i >= ATTACH_WARMUP {
                ms[method].push(d.as_secs_f64() * 1e3);
            }
        }
    }
    Ok(ms)
}

/// What `net::attach` does, as commands: 8 processes.
async fn attach_by_ip(
    link: &str,
    ns: &str,
    outer: Ipv4Addr,
    inner: Ipv4Addr,
    prefix: u8,
) -> anyhow::Result<()> {
    let (o, i) = (format!("{outer}/{prefix}"), format!("{inner}/{prefix}"));
    let outer = outer.to_string();
    let fwd = format!("net.ipv4.conf.{link}.forwarding=1");
    let lnet = format!("net.ipv4.conf.{link}.route_localnet=1");
    let steps: [&[&str]; 8] = [
        &[
            "ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ],
        &["ip", "addr", "add", &o, "dev", link],
        &["ip", "link", "set", link, "up"],
        &["sysctl", "-q", "-w", &fwd, &lnet],
        &["ip", "-n", ns, "addr", "add", &i, "dev", "eth0"],
        &["ip", "-n", ns, "link", "set", "eth0", "up"],
        &["ip", "-n", ns, "link", "set", "lo", "up"],
        &["ip", "-n", ns, "route", "add", "default", "via", &outer],
    ];
    for argv in steps {
        let out = tokio::process::Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", argv[0]))?;
        ensure!(
            out.status.success(),
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Both attach methods leave the same state: checked once each.
fn check_attached(link: &str, ns: &str, outer: Ipv4Addr, inner: Ipv4Addr) -> anyhow::Result<()> {
    let host = cmd(&["ip", "-o", "-4", "addr", "show", "dev", link])?;
    ensure!(host.contains(&format!("inet {outer}/")), "{link}: {host}");
    let up = cmd(&["ip", "-o", "link", "show", "dev", link, "up"])?;
    ensure!(!up.trim().is_empty(), "{link} is not up");
    for (knob, want) in [("forwarding", "1"), ("route_localnet", "1")] {
        let v = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{link}/{knob}"))?;
        ensure!(v.trim() == want, "{link}: {knob} is {}", v.trim());
    }
    let eth = cmd(&["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", "eth0"])?;
    ensure!(
        eth.contains(&format!("inet {inner}/")),
        "eth0 in {ns}: {eth}"
    );
    let links = cmd(&["ip", "-n", ns, "-o", "link", "show", "up"])?;
    ensure!(
        links.contains("eth0@") && links.contains("lo:"),
        "links up in {ns}: {links}"
    );
    let route = cmd(&["ip", "-n", ns, "route", "show", "default"])?;
    ensure!(
        route.contains(&format!("via {outer}")),
        "default route in {ns}: {route}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report

use caas_tests::stats;

/// The median of the per-round ratios `a[r] / b[r]`.
fn ratio(a: &[f64], b: &[f64]) -> f64 {
    let per_round: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    stats(&per_round).median
}

const LABEL_W: usize = 66;

fn row(out: &mut String, label: &str, cols: &[String]) {
    let _ = write!(out, "{label:<LABEL_W$}");
    for c in cols {
        let _ = write!(out, "{c:>9}");
    }
    let _ = writeln!(out);
}

/// Median, min and max of `v`, as columns.
fn spread(v: &[f64]) -> Vec<String> {
    let st = stats(v);
    [st.median, st.min, st.max]
        .iter()
        .map(|x| format!("{x:.2}"))
        .collect()
}

fn table(opts: &Opts, r: &Results, took: Duration) -> String {
    let mut o = String::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let _ = writeln!(
        o,
        "\n{}, 1 TCP stream, {} s per run, {} rounds (order rotated per round); kernel {}; \
         {cpus} CPUs; loadavg {}",
        r.iperf3_version,
        opts.secs,
        opts.rounds,
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let rule = "-".repeat(LABEL_W + 6 * 9);
    let s = |x: &str| x.to_string();
    for (gso, gbits) in &r.gbits {
        let _ = writeln!(o, "{rule}");
        let what = if *gso == DEFAULT_GSO {
            "the kernel's default".to_string()
        } else {
            format!("BIG TCP, {} KiB", gso / 1024)
        };
        row(
            &mut o,
            &format!("TCP throughput, Gbit/s; IPv4 GSO size {gso} on all links ({what})"),
            &[],
        );
        row(
            &mut o,
            "",
            &[
                s("median"),
                s("min"),
                s("max"),
                s("/pair"),
                s("/routed"),
                s("/p.NAT"),
            ],
        );
        for (i, label) in PATHS.iter().enumerate() {
            let mut cols = spread(&gbits[i]);
            for base in [PAIR, ROUTED, PLAIN_NAT] {
                cols.push(format!("{:.2}", ratio(&gbits[i], &gbits[base])));
            }
            row(&mut o, label, &cols);
        }
        let same = ratio(&gbits[NAT], &gbits[PLAIN_NAT]);
        let _ = writeln!(
            o,
            "goal: NAT path >= 0.90 of the same path between plain netns (plain NAT via a router \
             netns, same GSO size): {same:.2}, {}",
            if same >= 0.9 { "met" } else { "NOT met" }
        );
        let _ = writeln!(
            o,
            "NAT path / the plain netns pair (one veth: no forwarding, no conntrack, no NAT): {:.2}",
            ratio(&gbits[NAT], &gbits[PAIR])
        );
        let _ = writeln!(
            o,
            "NAT path / routed via a router netns (its links, no netfilter): {:.2}; routed via \
             the host / via a router netns (conntrack alone): {:.2}",
            ratio(&gbits[NAT], &gbits[ROUTER]),
            ratio(&gbits[ROUTED], &gbits[ROUTER])
        );
    }
    let default = r.gbits.iter().find(|(g, _)| *g == DEFAULT_GSO);
    for (gso, gbits) in r.gbits.iter().filter(|(g, _)| *g != DEFAULT_GSO) {
        if let Some((_, d)) = default {
            // Medians of different runs (the sets run one after the other): a rougher ratio.
            let _ = writeln!(
                o,
                "NAT path with GSO size {gso} / the plain pair at the default size (medians): {:.2}",
                stats(&gbits[NAT]).median / stats(&d[PAIR]).median
            );
        }
    }
    let _ = writeln!(o, "{rule}");
    row(
        &mut o,
        &format!(
            "tenant network attach, ms ({} runs each, fresh netns)",
            opts.attach
        ),
        &[s("median"), s("min"), s("max")],
    );
    for (label, v) in [
        (
            "caas_agent::net::attach (rtnetlink, one devconf message)",
            &r.attach_ms[0],
        ),
        (
            "same steps by ip/sysctl commands (8 processes)",
            &r.attach_ms[1],
        ),
    ] {
        row(&mut o, label, &spread(v));
    }
    row(
        &mut o,
        "attach of a container to its tenant's network: extra steps",
        &[s("0")],
    );
    let _ = writeln!(o, "{rule}");
    let _ = writeln!(
        o,
        "attach = veth pair with the peer made in the netns, host address, link up, forwarding \
         and route_localnet, eth0 address, eth0 and lo up, default route; once per tenant. A \
         container joins its tenant's netns and needs none of it."
    );
    let _ = writeln!(
        o,
        "/pair, /routed, /p.NAT: median of per-round ratios to the pair, to \"plain routed via \
         the host\" (the NAT path's links without NAT and rules) and to \"plain NAT via a router \
         netns\" (the NAT path built by hand: forwarding and one masquerade rule, nothing of the \
         agent); the tenant has {cpus} CPUs of quota. Run took {:.0} s.",
        took.as_secs_f64()
    );
    o
}
