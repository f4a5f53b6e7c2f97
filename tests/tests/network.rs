//! Tenant networks, end to end: real veth pairs, the agent's nftables table, NAT to a test host
//! in a network namespace the test makes, published ports (also a CRI pod's host ports), the wall
//! between tenants, network bytes in the meter, and a clean host after tenants go (also across
//! an agent restart).
//!
//! The tests of this file share the host's nftables and routes, so they run one at a time.

#![allow(clippy::unwrap_used)] // integration-test helpers panic on purpose: that is a failing test

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use caas_agent::config::Config;
use caas_proto::{
    cri::v1 as cri,
    v1::{
        self as pb, container_service_client::ContainerServiceClient,
        tenant_service_client::TenantServiceClient, usage_service_client::UsageServiceClient,
    },
};
use caas_tests::{
    TestAgent, busybox_rootfs,
    calls::cref,
    cri::CriClient,
    registry::{
        Compression, ImageBuilder, OciLayout, PushMode, Registry, RegistryOpts, tools_available,
    },
    require_root, tar_dir,
};
use tonic::{Code, transport::Channel};

/// One test at a time: they all change the host's network.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

macro_rules! root_or_skip {
    ($name:literal) => {
        if !require_root($name) {
            return;
        }
    };
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A "test host" in a network namespace of its own, reached from the host by a veth pair
/// (`198.18.<n>.1` on the host, `.2` inside). It also holds a stand-in for a cloud metadata
/// service, 169.254.169.254, routed from the host through it.
struct TestHost {
    ns: String,
    /// The host side: the uplink of these tests.
    link: String,
    host_ip: Ipv4Addr,
    ip: Ipv4Addr,
}

const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

impl TestHost {
    fn new(n: u8) -> Self {
        let ns = caas_tests::unique("cth");
        let link = format!("cthu{:08x}", rand_u32());
        let (host_ip, ip_) = (Ipv4Addr::new(198, 18, n, 1), Ipv4Addr::new(198, 18, n, 2));
        ip(&["netns", "add", &ns]);
        let h = TestHost {
            ns: ns.clone(),
            link: link.clone(),
            host_ip,
            ip: ip_,
        };
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &link]);
        ip(&["link", "set", &link, "up"]);
        for a in [
            vec!["addr", "add", &format!("{ip_}/24"), "dev", "eth0"],
            vec!["addr", "add", "169.254.169.254/32", "dev", "lo"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["-n", ns.as_str()];
            full.extend(a.iter().map(|s| &**s));
            ip(&full);
        }
        ip(&[
            "route",
            "add",
            "169.254.169.254/32",
            "via",
            &ip_.to_string(),
        ]);
        h
    }

    /// Runs `f` on a thread inside the test host's netns (sockets made there stay there).
    fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap();
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// [`fetch`] from inside the test host, retried for 5 s while it gets nothing (the
    /// listeners of these tests are loops of one-shot `nc -l`).
    fn fetch_soon(&self, addr: SocketAddr) -> String {
        self.inside(|| {
            (0..50)
                .find_map(|_| {
                    let r = fetch(addr).ok().filter(|s| !s.is_empty());
                    if r.is_none() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    r
                })
                .unwrap_or_default()
        })
    }

    /// A TCP server in the test host on `addr:port` that answers each connection with
    /// `hello`, reads it to the end, and records the peer and the bytes read.
    fn serve(&self, addr: Ipv4Addr, port: u16) -> Served {
        let l = self.inside(|| TcpListener::bind((addr, port)).unwrap());
        serve(l)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["route", "del", "169.254.169.254/32"])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A host port in the agent's default publish range (30000-32767, below the ephemeral ports).
fn publish_port() -> u16 {
    30000 + (rand_u32() % 2768) as u16
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u32::from_ne_bytes(b)
}

/// What a test server saw: each connection's peer and how many bytes it sent.
#[derive(Clone, Default)]
struct Served(Arc<Mutex<Vec<(SocketAddr, u64)>>>);

impl Served {
    fn peers(&self) -> Vec<(SocketAddr, u64)> {
        self.0.lock().unwrap().clone()
    }
}

fn serve(l: TcpListener) -> Served {
    let seen = Served::default();
    let out = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let peer = s.peer_addr().unwrap();
                let _ = s.write_all(b"hello\n");
                let mut n = 0u64;
                let mut buf = vec![0u8; 1 << 16];
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                seen.0.lock().unwrap().push((peer, n));
            });
        }
    });
    out
}

/// Connects and reads what the peer says first (a line), within 3 s.
fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut got = Vec::new();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(k) => {
                got.extend_from_slice(&b[..k]);
                if got.contains(&b'\n') {
                    break;
                }
            }
            Err(e) if got.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&got).trim().to_string())
}

/// Retries `fetch` for up to 5 s (a container's listener takes a moment to come up).
async fn fetch_soon(addr: SocketAddr) -> String {
    let mut last = None;
    for _ in 0..100 {
        match tokio::task::spawn_blocking(move || fetch(addr))
            .await
            .unwrap()
        {
            Ok(s) if !s.is_empty() => return s,
            Ok(_) => {}
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} never answered: {last:?}");
}

struct Api {
    t: TenantServiceClient<Channel>,
    c: ContainerServiceClient<Channel>,
    u: UsageServiceClient<Channel>,
    rootfs: String,
}

fn publish(host: u16, inside: u16) -> pb::PortMapping {
    pb::PortMapping {
        host_port: host.into(),
        container_port: inside.into(),
        protocol: "tcp".into(),
        host_ip: String::new(),
    }
}

impl Api {
    async fn new(agent: &TestAgent) -> Self {
        let ch = agent.unix().await;
        Self {
            t: TenantServiceClient::new(ch.clone()),
            c: ContainerServiceClient::new(ch.clone()),
            u: UsageServiceClient::new(ch),
            rootfs: busybox_rootfs(agent.dir.path()).display().to_string(),
        }
    }

    async fn tenant(&mut self, id: &str) -> pb::Tenant {
        self.t
            .create_tenant(pb::CreateTenantRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn tenant_isolated(&mut self, id: &str, isolation: pb::Isolation) -> pb::Tenant {
        self.t
            .create_tenant(pb::CreateTenantRequest {
                id: id.into(),
                isolation: isolation as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn delete_tenant(&mut self, id: &str) {
        self.t
            .delete_tenant(pb::DeleteTenantRequest {
                id: id.into(),
                force: true,
            })
            .await
            .unwrap();
    }

    async fn create(
        &mut self,
        tenant: &str,
        name: &str,
        script: &str,
        ports: Vec<pb::PortMapping>,
    ) -> Result<pb::Container, tonic::Status> {
        self.c
            .create_container(pb::CreateContainerRequest {
                tenant: tenant.into(),
                name: name.into(),
                rootfs_path: self.rootfs.clone(),
                command: vec!["sh".into(), "-c".into(), script.into()],
                ports,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn run(&mut self, tenant: &str, name: &str, script: &str) {
        self.run_publishing(tenant, name, script, vec![]).await;
    }

    async fn run_publishing(
        &mut self,
        tenant: &str,
        name: &str,
        script: &str,
        ports: Vec<pb::PortMapping>,
    ) -> pb::Container {
        self.create(tenant, name, script, ports).await.unwrap();
        self.c
            .start_container(pb::StartContainerRequest {
                r#ref: cref(tenant, name),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn wait(&mut self, tenant: &str, name: &str) -> i32 {
        caas_tests::calls::wait(&mut self.c, tenant, name)
            .await
            .exit_code
    }

    async fn logs(&mut self, tenant: &str, name: &str) -> String {
        caas_tests::calls::logs(&mut self.c, tenant, name).await
    }

    /// Runs `script` in a new container and returns its exit code and output.
    async fn outcome(&mut self, tenant: &str, name: &str, script: &str) -> (i32, String) {
        self.run(tenant, name, script).await;
        let code = self.wait(tenant, name).await;
        (code, self.logs(tenant, name).await)
    }

    async fn delete(&mut self, tenant: &str, name: &str) {
        self.c
            .delete_container(pb::DeleteContainerRequest {
                r#ref: cref(tenant, name),
                force: true,
            })
            .await
            .unwrap();
    }
}

/// An agent with tenant networks on, the test host's link as its uplink.
async fn agent(pool: &str, host: &TestHost) -> TestAgent {
    let (pool, uplink) = (pool.to_string(), host.link.clone());
    TestAgent::start(move |c| network_config(c, &pool, &uplink))
        .await
        .unwrap()
}

fn network_config(c: &mut Config, pool: &str, uplink: &str) {
    c.network.enabled = true;
    c.network.pool = pool.parse().unwrap();
    c.network.uplinks = vec![uplink.to_string()];
    c.network.dns = vec![Ipv4Addr::new(198, 18, 0, 53)];
    // The API on every host address, so that a tenant's probes of it test the firewall.
    c.api.tcp_listen = Some("0.0.0.0:0".parse().unwrap());
    c.usage.window_secs = 2;
}

/// Restarts the agent on the same state (its tenants and their engines live on).
async fn restart(agent: &mut TestAgent, pool: &str, host: &TestHost) {
    restart_with(agent, pool, host, |_| {}).await;
}

/// [`restart`], with `tweak` applied to the config after the network's settings (the same
/// tweak the agent was started with, e.g. to keep the CRI on).
async fn restart_with(
    agent: &mut TestAgent,
    pool: &str,
    host: &TestHost,
    tweak: impl FnOnce(&mut Config),
) {
    agent.agent.take().unwrap().shutdown().await.unwrap();
    let mut c = caas_tests::test_config(agent.dir.path());
    c.tenants.cgroup_slice = agent.slice.clone();
    c.api.tls = Some(agent.pki.tls_config());
    network_config(&mut c, pool, &host.link);
    tweak(&mut c);
    let a = caas_agent::serve::start(c).await.unwrap();
    agent.addr = a.tcp_addr.unwrap();
    agent.agent = Some(a);
}

/// The host's links, addresses and nftables ruleset, for before/after comparisons: JSON from
/// `ip -j` and `nft -j` with what changes by itself (counters, handles, timers) left out.
fn host_network() -> serde_json::Value {
    fn run(cmd: &str, args: &[&str]) -> serde_json::Value {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(out.status.success(), "{cmd} {args:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
    fn scrub(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for k in [
                    "handle",
                    "stats64",
                    "valid_life_time",
                    "preferred_life_time",
                    "operstate",
                    "tentative",
                    "linkmode",
                    "flags",
                    "link_index",
                    "metainfo",
                ] {
                    m.remove(k);
                }
                m.values_mut().for_each(scrub);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(scrub),
            _ => {}
        }
    }
    let mut v = serde_json::json!({
        "link": run("ip", &["-j", "link", "show"]),
        "addr": run("ip", &["-j", "addr", "show"]),
        "nft": run("nft", &["-j", "list", "ruleset"]),
    });
    scrub(&mut v);
    v
}

fn diff(before: &serde_json::Value, after: &serde_json::Value) -> String {
    let (b, a) = (
        serde_json::to_string_pretty(before).unwrap(),
        serde_json::to_string_pretty(after).unwrap(),
    );
    let bl: std::collections::BTreeSet<&str> = b.lines().collect();
    let al: std::collections::BTreeSet<&str> = a.lines().collect();
    let mut out = String::new();
    for l in al.difference(&bl) {
        out.push_str(&format!("+ {l}\n"));
    }
    for l in bl.difference(&al) {
        out.push_str(&format!("- {l}\n"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_reach_each_other_inside_and_the_world_by_nat_but_never_each_other() {
    root_or_skip!("tenants_reach_each_other_inside_and_the_world_by_nat_but_never_each_other");
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(41);
    let world = host.serve(host.ip, 9000);
    let metadata = host.serve(METADATA, 80);
    let agent = agent("10.231.0.0/24", &host).await;
    let mut api = Api::new(&agent).await;
    let (a, b) = (caas_tests::unique("na"), caas_tests::unique("nb"));
    let ta = api.tenant(&a).await;
    api.tenant(&b).await;
    let a_ip = "10.231.0.2";

    // Inside: eth0 with the tenant's address, a default route via the host side, and the
    // resolver the operator configured.
    let (code, out) = api
        .outcome(
            &a,
            "ipa",
            "ip -4 addr show eth0; ip route; cat /etc/resolv.conf",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("inet {a_ip}/30")), "{out}");
    assert!(out.contains("default via 10.231.0.1"), "{out}");
    assert!(out.contains("nameserver 198.18.0.53"), "{out}");
    assert!(!ta.id.is_empty());

    // Two containers of A talk over TCP.
    api.run(&a, "srv", "echo from-srv | nc -l -p 8080").await;
    let mut talked = String::new();
    for i in 0..50 {
        let (code, out) = api
            .outcome(&a, &format!("cli{i}"), &format!("nc -w 2 {a_ip} 8080"))
            .await;
        if code == 0 && out.contains("from-srv") {
            talked = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(talked.contains("from-srv"), "A's containers never talked");
    // A listener again, for B to try.
    api.run(&a, "srv2", "while :; do echo a | nc -l -p 8081; done")
        .await;
    assert_eq!(
        fetch_soon(format!("{a_ip}:8081").parse().unwrap()).await,
        "a"
    );

    // B reaches none of A, the host's API port (it listens on every host address), or the
    // metadata address; the host itself reaches the API on those addresses.
    let api_port = agent.addr.port();
    for ip in ["10.231.0.1", "10.231.0.5"] {
        let a: SocketAddr = format!("{ip}:{api_port}").parse().unwrap();
        tokio::task::spawn_blocking(move || TcpStream::connect_timeout(&a, Duration::from_secs(3)))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("the host cannot reach its own API at {a}: {e}"));
    }
    for (i, target) in [
        format!("{a_ip} 8081"),
        format!("10.231.0.1 {api_port}"),
        format!("10.231.0.5 {api_port}"),
        format!("{} {api_port}", host.host_ip),
        format!("{METADATA} 80"),
    ]
    .iter()
    .enumerate()
    {
        let (code, out) = api
            .outcome(&b, &format!("probe{i}"), &format!("nc -w 2 {target}"))
            .await;
        assert_ne!(code, 0, "tenant B reached {target}: {out}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        metadata.peers().is_empty(),
        "the metadata stand-in was reached from a tenant: {:?}",
        metadata.peers()
    );
    // The host itself does reach them (the wall is the tenants', not the host's).
    assert_eq!(fetch_soon(SocketAddr::from((METADATA, 80))).await, "hello");

    // B's network works: the probes above failed for the wall, not for a broken B.
    let (code, out) = api
        .outcome(
            &b,
            "b-egress",
            &format!("echo ping | nc -w 3 {} 9000", host.ip),
        )
        .await;
    assert_eq!(code, 0, "tenant B has no egress: {out}");

    // Egress: A reaches the test host through NAT; the test host sees the uplink's address.
    let (code, out) = api
        .outcome(
            &a,
            "egress",
            &format!("echo ping | nc -w 3 {} 9000", host.ip),
        )
        .await;
    assert_eq!(code, 0, "egress failed: {out}");
    assert!(out.contains("hello"), "{out}");
    let peers = world.peers();
    let seen: Vec<Ipv4Addr> = peers
        .iter()
        .filter_map(|(p, _)| match p {
            SocketAddr::V4(v) => Some(*v.ip()),
            SocketAddr::V6(_) => None,
        })
        .collect();
    assert!(
        seen.contains(&host.host_ip),
        "the test host saw {seen:?}, not the uplink address {}",
        host.host_ip
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_ports_serve_on_loopback_and_the_uplink_and_have_one_owner() {
    root_or_skip!("published_ports_serve_on_loopback_and_the_uplink_and_have_one_owner");
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(42);
    let agent = agent("10.232.0.0/24", &host).await;
    let mut api = Api::new(&agent).await;
    let (a, b) = (caas_tests::unique("pa"), caas_tests::unique("pb"));
    api.tenant(&a).await;
    api.tenant(&b).await;
    let port = publish_port();

    let c = api
        .run_publishing(
            &a,
            "web",
            "while :; do echo web-a | nc -l -p 8080; done",
            vec![publish(port, 8080)],
        )
        .await;
    assert_eq!(c.ports, vec![publish(port, 8080)], "start lists the port");
    let inspected = api
        .c
        .inspect_container(pb::InspectContainerRequest {
            r#ref: cref(&a, "web"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inspected.ports, vec![publish(port, 8080)]);

    // On 127.0.0.1, on the uplink address from the host, and from the test host.
    assert_eq!(
        fetch_soon(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await,
        "web-a"
    );
    assert_eq!(
        fetch_soon(SocketAddr::from((host.host_ip, port))).await,
        "web-a"
    );
    let uplink = SocketAddr::from((host.host_ip, port));
    assert_eq!(host.fetch_soon(uplink), "web-a", "from the test host");

    // Another tenant reaches it too, through the host (hairpin).
    let (code, out) = api
        .outcome(&b, "hairpin", &format!("nc -w 3 {} {port}", host.host_ip))
        .await;
    assert_eq!((code, out.trim()), (0, "web-a"), "B to A's published port");

    // A second container, of either tenant, is refused the host port, and told who has it.
    for t in [&a, &b] {
        let e = api
            .create(t, "web2", "true", vec![publish(port, 9090)])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        assert!(
            e.message().contains("\"web\"") && e.message().contains(a.as_str()),
            "{}",
            e.message()
        );
    }
    // Nothing of the refused creates is left.
    let listed = api
        .c
        .list_containers(pb::ListContainersRequest {
            tenant: b.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.containers.iter().all(|c| c.name != "web2"),
        "{listed:?}"
    );
    // Bad input is refused by field.
    for (m, field) in [
        (publish(0, 80), "ports[0].host_port"),
        (
            pb::PortMapping {
                container_port: 70000,
                ..publish(81, 80)
            },
            "ports[0].container_port",
        ),
        (
            pb::PortMapping {
                protocol: "sctp".into(),
                ..publish(81, 80)
            },
            "ports[0].protocol",
        ),
    ] {
        let e = api.create(&b, "bad", "true", vec![m]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{}", e.message());
    }
    // Outside the node's publish range; a port a host process has bound.
    let e = api
        .create(&b, "low", "true", vec![publish(80, 80)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("30000-32767"), "{}", e.message());
    let squatter = loop {
        if let Ok(l) = TcpListener::bind(("0.0.0.0", publish_port())) {
            break l;
        }
    };
    let taken = squatter.local_addr().unwrap().port();
    let e = api
        .create(&b, "taken", "true", vec![publish(taken, 80)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("in use on the host"),
        "{}",
        e.message()
    );

    // Deleting the owner releases the port: B can have it now.
    api.delete(&a, "web").await;
    api.run_publishing(
        &b,
        "web",
        "while :; do echo web-b | nc -l -p 8080; done",
        vec![publish(port, 8080)],
    )
    .await;
    assert_eq!(
        fetch_soon(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await,
        "web-b"
    );

    // A firewall reload on the host takes the agent's table away (here: deleted, as `nft flush
    // ruleset` would). A port published before the agent's guard notices still works, and so
    // do the ports published before.
    let out = std::process::Command::new("nft")
        .args(["delete", "table", "inet", "caas"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let port2 = publish_port();
    api.run_publishing(
        &a,
        "web3",
        "while :; do echo web-3 | nc -l -p 8080; done",
        vec![publish(port2, 8080)],
    )
    .await;
    assert_eq!(
        fetch_soon(SocketAddr::from((Ipv4Addr::LOCALHOST, port2))).await,
        "web-3"
    );
    assert_eq!(
        fetch_soon(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await,
        "web-b"
    );
}

/// A host firewall reload (`nft flush ruleset`) takes the agent's table with it (here the table
/// alone is deleted, which is the same event for it); the agent loads
/// it again at nftables' delete event, not at its next check (an hour away here), and the
/// tenants are walled off again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firewall_is_back_as_soon_as_a_host_firewall_reload_removes_it() {
    root_or_skip!("the_firewall_is_back_as_soon_as_a_host_firewall_reload_removes_it");
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(51);
    let uplink = host.link.clone();
    let agent = TestAgent::start(move |c| {
        network_config(c, "10.228.0.0/24", &uplink);
        c.network.firewall_check_secs = 3600;
    })
    .await
    .unwrap();
    let mut api = Api::new(&agent).await;
    let (a, b) = (caas_tests::unique("fa"), caas_tests::unique("fb"));
    api.tenant(&a).await;
    api.tenant(&b).await;
    api.run(&a, "srv", "while :; do echo a | nc -l -p 8081; done")
        .await;
    assert_eq!(fetch_soon("10.228.0.2:8081".parse().unwrap()).await, "a");
    let listed = || {
        Command::new("nft")
            .args(["list", "table", "inet", "caas"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(listed());
    // The monitor is started by the guard's task: give it a moment to be up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What `nft flush ruleset` does to it, without flushing the rest of this host's rules.
    let out = Command::new("nft")
        .args(["delete", "table", "inet", "caas"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !listed() {
        assert!(
            std::time::Instant::now() < deadline,
            "the table inet caas is still gone 20 s after the flush (the next check is an hour away)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out) = api.outcome(&b, "probe", "nc -w 2 10.228.0.2 8081").await;
    assert_ne!(code, 0, "tenant B reached A after the reload: {out}");
}

/// The host's conntrack entries (`/proc/net/nf_conntrack`) with an address, either way, that
/// starts with `prefix` (`10.233.0.`).
fn conntrack_in(prefix: &str) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/nf_conntrack")
        .expect("/proc/net/nf_conntrack: the kernel's conntrack table as text");
    table
        .lines()
        .filter(|l| {
            l.split_whitespace().any(|w| {
                (w.starts_with("src=") || w.starts_with("dst=")) && w[4..].starts_with(prefix)
            })
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_tenants_leaves_the_host_network_as_it_was_also_after_a_restart() {
    root_or_skip!("deleting_tenants_leaves_the_host_network_as_it_was_also_after_a_restart");
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(43);
    let pool = "10.233.0.0/24";
    let mut agent = agent(pool, &host).await;
    let mut api = Api::new(&agent).await;
    let before = host_network();

    // Once with the agent up throughout, once with a restart between create and delete.
    for round in 0..2 {
        let t = caas_tests::unique("cl");
        api.tenant(&t).await;
        let port = publish_port();
        api.run_publishing(
            &t,
            "web",
            "while :; do echo up | nc -l -p 8080; done",
            vec![publish(port, 8080)],
        )
        .await;
        assert_eq!(
            fetch_soon(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await,
            "up"
        );
        // Flows that outlive the tenant's link unless the agent deletes them: one the published
        // port brought in from outside (not masqueraded) and one out by the uplink.
        assert_eq!(
            host.fetch_soon(SocketAddr::from((host.host_ip, port))),
            "up",
            "from the test host"
        );
        let out_port = 9100 + round;
        let _served = host.serve(host.ip, out_port);
        let (code, out) = api
            .outcome(&t, "egress", &format!("nc -w 3 {} {out_port}", host.ip))
            .await;
        assert_eq!((code, out.trim()), (0, "hello"), "egress to the test host");
        let during = host_network();
        assert!(
            !diff(&before, &during).is_empty(),
            "a tenant with a published port changed nothing on the host?"
        );
        assert!(
            !conntrack_in("10.233.0.").is_empty(),
            "the fetch left no conntrack entry with the tenant's address"
        );
        if round == 1 {
            restart(&mut agent, pool, &host).await;
            api = Api::new(&agent).await;
            // The published port survived the restart.
            assert_eq!(
                fetch_soon(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await,
                "up"
            );
        }
        api.delete_tenant(&t).await;
        let after = host_network();
        let d = diff(&before, &after);
        assert!(d.is_empty(), "round {round}: left behind:\n{d}");
        // Its flows went with it (the fetches' TIME_WAIT entries would live two minutes).
        let left = conntrack_in("10.233.0.");
        assert!(
            left.is_empty(),
            "round {round}: conntrack entries of the deleted tenant: {left:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_tenant_sends_are_billed() {
    root_or_skip!("bytes_a_tenant_sends_are_billed");
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(44);
    let agent = agent("10.234.0.0/24", &host).await;
    let mut api = Api::new(&agent).await;
    let t = caas_tests::unique("bw");
    api.tenant(&t).await;
    let mib = 1u64 << 20;
    // The container serves a 100 MiB file over HTTP on a published port; the test host
    // downloads it through the uplink. (busybox httpd sends with sendfile, as real servers do;
    // busybox nc would write 1 KiB at a time, and the link's counters include every packet's
    // headers.)
    let port = publish_port();
    api.run_publishing(
        &t,
        "send",
        "dd if=/dev/zero of=/tmp/blob bs=1M count=100 2>/dev/null && echo ready && httpd -f -p 8080 -h /tmp",
        vec![publish(port, 8080)],
    )
    .await;
    for _ in 0..200 {
        if api.logs(&t, "send").await.contains("ready") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (header, body) = download(&host, SocketAddr::from((host.host_ip, port)), "/blob");
    assert_eq!(body, 100 * mib, "downloaded {body} bytes: {header}");
    let tx = billed_tx(&mut api, &t, 100 * mib).await;
    let ratio = tx as f64 / (100 * mib) as f64;
    eprintln!("measured: 100 MiB sent, billed tx {tx} bytes ({ratio:.4}×)");
    assert!(
        (0.98..=1.02).contains(&ratio),
        "billed {tx} bytes for 100 MiB sent ({ratio:.4}×)"
    );
}

/// With BIG TCP on the uplink (an IPv4 GSO size above the default 64 KiB), a new tenant's link
/// takes the uplink's size on both ends, so that the tenant's TCP sends packets the uplink
/// passes on whole; bulk traffic through the NAT arrives intact. With the default uplink size,
/// the tenant link keeps the kernel's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_links_take_the_uplinks_big_tcp_size() {
    root_or_skip!("tenant_links_take_the_uplinks_big_tcp_size");
    let _serial = SERIAL.lock().await;
    const BIG: u32 = 196_608;
    let host = TestHost::new(49);
    let host_ns = PathBuf::from(format!("/run/netns/{}", host.ns));
    assert_eq!(
        caas_agent::net::gso_of(None, &host.link).await.unwrap(),
        Some(65_536),
        "a new veth has the kernel's default"
    );
    let agent = agent("10.239.0.0/24", &host).await;
    let mut api = Api::new(&agent).await;
    let tenant_ns = |t: &str| agent.dir.path().join("run/tenants").join(t).join("ns/net");

    // The default uplink: the tenant link keeps the default.
    let small = caas_tests::unique("gs");
    api.tenant(&small).await;
    let link = caas_agent::net::link_name(&small);
    assert_eq!(
        caas_agent::net::gso_of(None, &link).await.unwrap(),
        Some(65_536)
    );

    // BIG TCP on the uplink (both its ends, as on a real NIC's path): a new tenant takes it.
    caas_agent::net::set_link_gso(None, &host.link, BIG)
        .await
        .unwrap();
    caas_agent::net::set_link_gso(Some(&host_ns), "eth0", BIG)
        .await
        .unwrap();
    let big = caas_tests::unique("gb");
    api.tenant(&big).await;
    let link = caas_agent::net::link_name(&big);
    assert_eq!(
        caas_agent::net::gso_of(None, &link).await.unwrap(),
        Some(BIG),
        "the host side of a tenant link made after the uplink got BIG TCP"
    );
    assert_eq!(
        caas_agent::net::gso_of(Some(&tenant_ns(&big)), "eth0")
            .await
            .unwrap(),
        Some(BIG),
        "the tenant's eth0"
    );

    // 64 MiB through the NAT to the test host, with the large packets: all of it arrives.
    let world = host.serve(host.ip, 9000);
    let (code, out) = api
        .outcome(
            &big,
            "bulk",
            &format!(
                "dd if=/dev/zero bs=1M count=64 2>/dev/null | nc -w 5 {} 9000 >/dev/null; echo sent",
                host.ip
            ),
        )
        .await;
    assert!(code == 0 && out.contains("sent"), "{code} {out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        if let Some(&(_, n)) = world.peers().first() {
            break n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the test host saw no connection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(got, 64 << 20, "bytes the test host received");
    api.delete_tenant(&big).await;
    api.delete_tenant(&small).await;
}

/// An HTTP/1.0 GET of `path` from `addr`, made inside the test host: the response's header and
/// its body's length.
fn download(host: &TestHost, addr: SocketAddr, path: &str) -> (String, u64) {
    host.inside(|| {
        let mut last = None;
        for _ in 0..50 {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                Ok(mut s) => {
                    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                        .unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let mut all = Vec::with_capacity(101 << 20);
                    s.read_to_end(&mut all).unwrap();
                    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let header = String::from_utf8_lossy(&all[..split]).to_string();
                    return (header, (all.len() - split) as u64);
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{addr} never answered: {last:?}");
    })
}

/// The tenant's billed tx bytes once they reach `at_least` (the link's counters are read with
/// each sample), or what they are after 10 s.
async fn billed_tx(api: &mut Api, tenant: &str, at_least: u64) -> u64 {
    let mut tx = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let u = api
            .u
            .get_usage(pb::GetUsageRequest {
                tenant: tenant.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        tx = u.total.unwrap().tx_bytes;
        if tx >= at_least {
            break;
        }
    }
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_tenant_gets_the_same_network_through_a_tap() {
    if !caas_tests::vm::vm_available("a_vm_tenant_gets_the_same_network_through_a_tap") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(47);
    let world = host.serve(host.ip, 9000);
    let metadata = host.serve(METADATA, 80);
    let pool = "10.237.0.0/24";
    let uplink = host.link.clone();
    let mut agent = TestAgent::start(move |c| {
        network_config(c, pool, &uplink);
        caas_tests::vm::configure(c);
    })
    .await
    .unwrap();
    let before = host_network();
    let mut api = Api::new(&agent).await;
    let (v, u) = (caas_tests::unique("nv"), caas_tests::unique("nu"));
    api.tenant_isolated(&v, pb::Isolation::Vm).await;
    api.tenant(&u).await;
    let (v_ip, u_ip) = ("10.237.0.2", "10.237.0.6");
    let guest_console = || {
        std::fs::read_to_string(
            agent
                .dir
                .path()
                .join(format!("state/engines/{v}/console.log")),
        )
        .unwrap_or_default()
    };

    // Inside the guest's containers: eth0 with the tenant's address, the default route via the
    // host's tap, the operator's resolver.
    let (code, out) = api
        .outcome(
            &v,
            "ipa",
            "ip -4 addr show eth0; ip route; cat /etc/resolv.conf",
        )
        .await;
    assert_eq!(code, 0, "{out}\n{}", guest_console());
    assert!(out.contains(&format!("inet {v_ip}/30")), "{out}");
    assert!(out.contains("default via 10.237.0.1"), "{out}");
    assert!(out.contains("nameserver 198.18.0.53"), "{out}");
    // On the host, the tenant's link is a tap device.
    let link = caas_agent::net::link_name(&v);
    let tun = std::fs::read_to_string(format!("/sys/class/net/{link}/tun_flags"));
    assert!(tun.is_ok(), "{link} is not a tun/tap device");

    // Egress through NAT: the test host sees the uplink's address.
    let (code, out) = api
        .outcome(
            &v,
            "egress",
            &format!("echo ping | nc -w 5 {} 9000", host.ip),
        )
        .await;
    assert_eq!(code, 0, "egress from the VM failed: {out}");
    assert!(out.contains("hello"), "{out}");
    let seen: Vec<SocketAddr> = world.peers().into_iter().map(|(p, _)| p).collect();
    assert!(
        seen.iter()
            .any(|p| p.ip() == std::net::IpAddr::V4(host.host_ip)),
        "the test host saw {seen:?}, not the uplink address {}",
        host.host_ip
    );

    // The wall: the VM tenant and the userns tenant reach none of each other, nor the host's
    // API port or the metadata address.
    api.run(&u, "srv", "while :; do echo u | nc -l -p 8081; done")
        .await;
    assert_eq!(
        fetch_soon(format!("{u_ip}:8081").parse().unwrap()).await,
        "u"
    );
    api.run(&v, "srv", "while :; do echo v | nc -l -p 8081; done")
        .await;
    assert_eq!(
        fetch_soon(format!("{v_ip}:8081").parse().unwrap()).await,
        "v",
        "the host cannot reach the VM tenant's listener"
    );
    let api_port = agent.addr.port();
    for (i, (from, target)) in [
        (&v, format!("{u_ip} 8081")),
        (&v, format!("10.237.0.1 {api_port}")),
        (&v, format!("{} {api_port}", host.host_ip)),
        (&v, format!("{METADATA} 80")),
        (&u, format!("{v_ip} 8081")),
    ]
    .into_iter()
    .enumerate()
    {
        let (code, out) = api
            .outcome(from, &format!("probe{i}"), &format!("nc -w 2 {target}"))
            .await;
        assert_ne!(code, 0, "tenant {from} reached {target}: {out}");
    }
    assert!(
        metadata.peers().is_empty(),
        "the metadata stand-in was reached: {:?}",
        metadata.peers()
    );

    // A published port serves the VM's listener on 127.0.0.1 and on the uplink, and the bytes
    // it sends are billed to the tenant.
    let mib = 1u64 << 20;
    let port = publish_port();
    api.run_publishing(
        &v,
        "send",
        "dd if=/dev/zero of=/tmp/blob bs=1M count=100 2>/dev/null && echo hi > /tmp/hi && echo ready && httpd -f -p 8080 -h /tmp",
        vec![publish(port, 8080)],
    )
    .await;
    for _ in 0..600 {
        if api.logs(&v, "send").await.contains("ready") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (header, body) = tokio::task::spawn_blocking(move || {
        // "ready" is printed just before httpd binds: under emulation that takes a moment.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{addr} never accepted within 30 s: {e}"),
            }
        };
        s.write_all(b"GET /hi HTTP/1.0\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        let (h, b) = all.split_once("\r\n\r\n").unwrap();
        (h.to_string(), b.to_string())
    })
    .await
    .unwrap();
    assert_eq!(body, "hi\n", "127.0.0.1:{port}: {header}");
    let before_tx = billed_tx(&mut api, &v, 0).await;
    let (header, body) = download(&host, SocketAddr::from((host.host_ip, port)), "/blob");
    assert_eq!(body, 100 * mib, "downloaded {body} bytes: {header}");
    let tx = billed_tx(&mut api, &v, before_tx + 100 * mib).await - before_tx;
    let ratio = tx as f64 / (100 * mib) as f64;
    eprintln!("measured: 100 MiB sent from a VM tenant, billed tx {tx} bytes ({ratio:.4}×)");
    assert!(
        (0.98..=1.02).contains(&ratio),
        "billed {tx} bytes for 100 MiB sent ({ratio:.4}×)"
    );

    // An agent restart leaves the VM, its tap and its port as they were: the new agent adopts
    // the running VM and finds its network made.
    restart_with(&mut agent, pool, &host, caas_tests::vm::configure).await;
    let mut api = Api::new(&agent).await;
    let (code, out) = api
        .outcome(
            &v,
            "after-restart",
            &format!("echo ping | nc -w 5 {} 9000", host.ip),
        )
        .await;
    assert_eq!(code, 0, "egress after an agent restart: {out}");
    let (_, body) = download(&host, SocketAddr::from((host.host_ip, port)), "/hi");
    assert_eq!(body, 3, "the published port after an agent restart");

    // kill -9 of the VMM: the watcher boots the VM again, onto the same tap, and its network
    // works (the containers ended with the VM).
    let index = || std::fs::read_to_string(format!("/sys/class/net/{link}/ifindex")).unwrap();
    let tap_index = index();
    let pid_file = agent.dir.path().join(format!("run/tenants/{v}/vmm.pid"));
    let vmm_pid = || -> i32 {
        std::fs::read_to_string(&pid_file)
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    };
    let vmm = vmm_pid();
    assert!(vmm > 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut code = -1;
    let mut out = String::new();
    for i in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = api
            .t
            .get_tenant(pb::GetTenantRequest { id: v.clone() })
            .await
            .unwrap()
            .into_inner();
        if t.state != pb::TenantState::Ready as i32 || vmm_pid() == vmm {
            continue;
        }
        (code, out) = api
            .outcome(
                &v,
                &format!("after-crash{i}"),
                &format!("echo ping | nc -w 5 {} 9000", host.ip),
            )
            .await;
        break;
    }
    assert_eq!(code, 0, "egress after the VM was booted again: {out}");
    assert_eq!(index(), tap_index, "the rebooted VM got a new tap");

    // A running VM that is not on its tap (here: the tap deleted by hand) is found so by a
    // restarted agent and booted again onto a new one, instead of looking ready and reaching
    // nothing.
    let vmm = vmm_pid();
    ip(&["link", "del", &link]);
    restart_with(&mut agent, pool, &host, caas_tests::vm::configure).await;
    let mut api = Api::new(&agent).await;
    assert_ne!(vmm_pid(), vmm, "the VM off its tap was not booted again");
    let (code, out) = api
        .outcome(
            &v,
            "after-tap-loss",
            &format!("echo ping | nc -w 5 {} 9000", host.ip),
        )
        .await;
    assert_eq!(code, 0, "egress after the tap was made again: {out}");

    // Deleting the tenants leaves the host's links, addresses and rules as they were.
    api.delete_tenant(&v).await;
    api.delete_tenant(&u).await;
    let d = diff(&before, &host_network());
    assert!(d.is_empty(), "left behind:\n{d}");
}

/// A tenant never gets a subnet the host already routes (another runtime's bridge, a VPN, a
/// libvirt network): its addresses would capture that traffic. The pool's first subnet is on a
/// link of the host here, so the first tenant gets the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_subnet_is_never_one_the_host_already_routes() {
    root_or_skip!("a_tenant_subnet_is_never_one_the_host_already_routes");
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(50);
    let dummy = format!("cdum{}", std::process::id() % 100_000);
    let ip = |args: &[&str]| {
        let o = Command::new("ip").args(args).output().unwrap();
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    // A veth pair (this kernel has no dummy links), both ends up so the route is there.
    let peer = format!("{dummy}p");
    ip(&["link", "add", &dummy, "type", "veth", "peer", "name", &peer]);
    ip(&["addr", "add", "10.229.0.1/30", "dev", &dummy]);
    ip(&["link", "set", &peer, "up"]);
    ip(&["link", "set", &dummy, "up"]);
    let agent = agent("10.229.0.0/24", &host).await;
    let mut api = Api::new(&agent).await;
    let t = caas_tests::unique("rt");
    api.tenant(&t).await;
    let link = caas_agent::net::link_name(&t);
    let addrs = String::from_utf8(
        Command::new("ip")
            .args(["-o", "-4", "addr", "show", "dev", &link])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let _ = Command::new("ip").args(["link", "del", &dummy]).status();
    assert!(
        addrs.contains("10.229.0.5/30"),
        "the tenant's host link has the second subnet's gateway: {addrs}"
    );
    api.delete_tenant(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_reaches_tenants_at_their_addresses_and_a_link_goes_with_its_tenant() {
    root_or_skip!("the_host_reaches_tenants_at_their_addresses_and_a_link_goes_with_its_tenant");
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(45);
    let agent = agent("10.235.0.0/24", &host).await;
    let mut api = Api::new(&agent).await;
    let (a, b) = (caas_tests::unique("ha"), caas_tests::unique("hb"));
    api.tenant(&a).await;
    api.tenant(&b).await;
    let la = caas_agent::net::link_name(&a);
    let lb = caas_agent::net::link_name(&b);
    let links = String::from_utf8(
        Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        links
            .lines()
            .any(|l| l.contains(&la) && l.contains("10.235.0.1/30")),
        "{links}"
    );
    assert!(
        links
            .lines()
            .any(|l| l.contains(&lb) && l.contains("10.235.0.5/30")),
        "{links}"
    );
    for (t, ip) in [(&a, "10.235.0.2"), (&b, "10.235.0.6")] {
        api.run(
            t,
            "srv",
            &format!("while :; do echo hello-{t} | nc -l -p 8080; done"),
        )
        .await;
        assert_eq!(
            fetch_soon(format!("{ip}:8080").parse().unwrap()).await,
            format!("hello-{t}")
        );
    }
    api.delete_tenant(&a).await;
    assert!(
        !std::path::Path::new("/sys/class/net").join(&la).exists(),
        "{la} left behind"
    );
    assert!(std::path::Path::new("/sys/class/net").join(&lb).exists());
}

// --- CRI pods with host ports -----------------------------------------------------------------

/// A kubelet's view of a CRI-enabled agent: its CRI client, and where pods keep their logs.
struct Kubelet {
    cri: CriClient,
    logs: PathBuf,
}

/// How long a CRI container may take to be running.
const RUNNING_DEADLINE: Duration = Duration::from_secs(60);

impl Kubelet {
    async fn connect(agent: &TestAgent) -> Self {
        Self {
            cri: CriClient::connect(&agent.dir.path().join("run/cri.sock"))
                .await
                .unwrap(),
            logs: agent.dir.path().join("pods"),
        }
    }

    /// A pod's config as the kubelet sends it (metadata, hostname, a log directory that exists)
    /// with TCP port mappings `(host port, container port)`.
    fn pod(&self, namespace: &str, name: &str, ports: &[(u16, u16)]) -> cri::PodSandboxConfig {
        let uid = format!("{namespace}-{name}-uid");
        let log_dir = self.logs.join(format!("{namespace}_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir).unwrap();
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid,
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.display().to_string(),
            port_mappings: ports
                .iter()
                .map(|&(host, inside)| cri::PortMapping {
                    protocol: cri::Protocol::Tcp as i32,
                    container_port: inside.into(),
                    host_port: host.into(),
                    host_ip: String::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    async fn run_pod(&mut self, config: &cri::PodSandboxConfig) -> Result<String, tonic::Status> {
        self.run_pod_with(config, "").await
    }

    /// RunPodSandbox with a runtime handler (`caas-vm`: the pod's tenant is a VM tenant).
    async fn run_pod_with(
        &mut self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        self.cri
            .rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    async fn pods(&mut self) -> Vec<cri::PodSandbox> {
        self.cri
            .rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items
    }

    async fn stop_pod(&mut self, id: &str) {
        self.cri
            .rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e:?}"));
    }

    async fn remove_pod(&mut self, id: &str) {
        self.cri
            .rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e:?}"));
    }

    /// Busybox pushed to `reg` and pulled as the kubelet would: the image id.
    async fn busybox(&mut self, reg: &Registry, agent: &TestAgent) -> String {
        let image = push_busybox(reg, &agent.dir.path().join("work")).await;
        self.pull(&image).await
    }

    /// PullImage without a pod, as the kubelet does before creating containers; the image id.
    async fn pull(&mut self, image: &str) -> String {
        self.cri
            .img
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            })
            .await
            .unwrap_or_else(|e| panic!("PullImage {image}: {e:?}"))
            .into_inner()
            .image_ref
    }

    /// Creates and starts container `name` of the pod running `sh -c script`, and waits until it
    /// is running; its id.
    async fn run_container(
        &mut self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        name: &str,
        image: &str,
        script: &str,
    ) -> String {
        std::fs::create_dir_all(Path::new(&pod.log_directory).join(name)).unwrap();
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: vec!["sh".into(), "-c".into(), script.into()],
            log_path: format!("{name}/0.log"),
            ..Default::default()
        };
        let id = self
            .cri
            .rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.into(),
                config: Some(config),
                sandbox_config: Some(pod.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e:?}"))
            .into_inner()
            .container_id;
        self.cri
            .rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e:?}"));
        let deadline = std::time::Instant::now() + RUNNING_DEADLINE;
        loop {
            let st = self
                .cri
                .rt
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await
                .unwrap_or_else(|e| panic!("ContainerStatus {name}: {e:?}"))
                .into_inner()
                .status
                .unwrap();
            if st.state == cri::ContainerState::ContainerRunning as i32 {
                return id;
            }
            assert!(
                st.state == cri::ContainerState::ContainerCreated as i32
                    && std::time::Instant::now() < deadline,
                "container {name} is not running: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A busybox image (`Cmd ["/bin/sh"]`) pushed to `reg` as `busybox:v1`, built under `work`; its
/// reference.
async fn push_busybox(reg: &Registry, work: &Path) -> String {
    let base = tar_dir(&busybox_rootfs(work));
    let mut layout = OciLayout::new(&work.join("layout")).unwrap();
    layout
        .add_image(
            &ImageBuilder::new().layer(base, Compression::Gzip),
            "busybox",
        )
        .unwrap();
    reg.push(layout.dir(), "busybox", "busybox:v1", PushMode::Oci)
        .await
        .unwrap();
    format!("{}/busybox:v1", reg.host())
}

/// A CRI pod's `port_mappings` publish its host port on every host address to its tenant's
/// address (pods share their tenant's network namespace): 127.0.0.1:H reaches a container of the
/// pod listening on the container port. Another namespace's pod (another tenant) asking for H is
/// refused with ALREADY_EXISTS naming the owner pod, and leaves no pod; the port survives an agent
/// restart; StopPodSandbox releases it, so the refused pod can now run with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_host_ports_publish_to_the_pod_and_have_one_owner_across_a_restart() {
    let name = "cri_pod_host_ports_publish_to_the_pod_and_have_one_owner_across_a_restart";
    if !require_root(name) || !tools_available(name) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(46);
    let pool = "10.236.0.0/24";
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let registry = reg.host();
    let cri_config = move |c: &mut Config| {
        c.cri.enabled = true;
        c.images.insecure_registries = vec![registry];
    };
    let (p, l, tweak) = (pool.to_string(), host.link.clone(), cri_config.clone());
    let mut agent = TestAgent::start(move |c| {
        network_config(c, &p, &l);
        tweak(c);
    })
    .await
    .unwrap();
    let mut k = Kubelet::connect(&agent).await;
    let image_id = k.busybox(&reg, &agent).await;
    let (ns_a, ns_b) = (caas_tests::unique("hpa"), caas_tests::unique("hpb"));
    let local = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    // Pod A takes a free host port H for its container's 8080 (another port if a host process
    // happens to have H).
    let (port, pod_a, a_id) = 'pick: {
        for _ in 0..20 {
            let port = publish_port();
            if TcpListener::bind(("0.0.0.0", port)).is_err() {
                continue;
            }
            let pod = k.pod(&ns_a, "web", &[(port, 8080), (0, 9090)]);
            match k.run_pod(&pod).await {
                Ok(id) => break 'pick (port, pod, id),
                Err(e)
                    if e.code() == Code::FailedPrecondition
                        && e.message().contains("in use on the host") => {}
                Err(e) => panic!("RunPodSandbox {ns_a}/web with host port {port}: {e:?}"),
            }
        }
        panic!("no free host port in 20 tries");
    };
    k.run_container(
        &a_id,
        &pod_a,
        "srv",
        &image_id,
        "while :; do echo pod-a | nc -l -p 8080; done",
    )
    .await;
    assert_eq!(fetch_soon(local(port)).await, "pod-a", "127.0.0.1:{port}");

    // Pod B, of another namespace (so another tenant), is refused H and told who has it.
    let pod_b = k.pod(&ns_b, "web", &[(port, 8080)]);
    let e = k.run_pod(&pod_b).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let owner = format!("pod {ns_a}/web");
    assert!(
        e.message().contains(&owner),
        "the refusal does not name {owner:?}: {}",
        e.message()
    );
    let pods = k.pods().await;
    assert!(
        pods.iter()
            .all(|p| p.metadata.as_ref().unwrap().namespace != ns_b),
        "the refused pod was left behind: {pods:?}"
    );
    assert_eq!(pods.len(), 1, "{pods:?}");
    // A's port still leads to A.
    assert_eq!(fetch_soon(local(port)).await, "pod-a");

    // Across an agent restart, the ready pod keeps its port.
    restart_with(&mut agent, pool, &host, cri_config).await;
    k = Kubelet::connect(&agent).await;
    assert_eq!(
        fetch_soon(local(port)).await,
        "pod-a",
        "127.0.0.1:{port} after a restart"
    );

    // StopPodSandbox releases H: B's pod now runs with it, and H leads to B.
    k.stop_pod(&a_id).await;
    let b_id = k
        .run_pod(&pod_b)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {ns_b}/web once A is stopped: {e:?}"));
    k.run_container(
        &b_id,
        &pod_b,
        "srv",
        &image_id,
        "while :; do echo pod-b | nc -l -p 8080; done",
    )
    .await;
    assert_eq!(fetch_soon(local(port)).await, "pod-b", "127.0.0.1:{port}");

    k.remove_pod(&a_id).await;
    k.remove_pod(&b_id).await;
    assert!(k.pods().await.is_empty());
    agent.stop().await.unwrap();
}

// --- CRI pods with a network namespace of their own (CNI) ---------------------------------------

/// Whether Debian's CNI plugins are installed (the bridge and host-local plugins this test's
/// network list uses); otherwise the skip is recorded, or the test fails where privileged tests
/// are mandatory.
fn cni_plugins_available(test: &str) -> bool {
    let missing: Vec<&str> = ["bridge", "host-local"]
        .into_iter()
        .filter(|p| !Path::new(CNI_BIN).join(p).is_file())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!(
        "needs the CNI plugins {} in {CNI_BIN} (Debian: containernetworking-plugins; scripts/setup.sh installs it)",
        missing.join(", ")
    );
    assert!(
        !caas_tests::privileged_required(),
        "{test}: {reason}, and CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory"
    );
    caas_tests::skip(test, &reason);
    false
}

const CNI_BIN: &str = "/usr/lib/cni";

/// The pods' network list: Debian's bridge plugin (a bridge in each tenant's netns, the pods'
/// gateway) with host-local addresses, as a cluster's conflist would have it.
const POD_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "caas-test-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "10.245.0.0/24" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    }
  ]
}"#;

impl Kubelet {
    /// ExecSync of `script` in container `id`: its exit code and stdout.
    async fn exec(&mut self, id: &str, script: &str) -> (i32, String) {
        let r = self
            .cri
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                timeout: 20,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync {script:?} in {id}: {e:?}"))
            .into_inner();
        (r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned())
    }

    /// PortForward to port 8080 of pod `id`: the streaming server's URL.
    async fn port_forward(&mut self, id: &str) -> Result<String, tonic::Status> {
        self.cri
            .rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: id.into(),
                port: vec![8080],
            })
            .await
            .map(|r| r.into_inner().url)
    }

    /// PodSandboxStatus of pod `id`.
    async fn pod_status(&mut self, id: &str) -> cri::PodSandboxStatus {
        self.cri
            .rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e:?}"))
            .into_inner()
            .status
            .unwrap()
    }

    /// The state PodSandboxStatus reports.
    async fn pod_state(&mut self, id: &str) -> cri::PodSandboxState {
        cri::PodSandboxState::try_from(self.pod_status(id).await.state).unwrap()
    }

    /// The address PodSandboxStatus reports.
    async fn pod_ip(&mut self, id: &str) -> String {
        self.pod_status(id).await.network.unwrap().ip
    }
}

/// Runs a pod of `namespace` (with runtime `handler`) whose host port, a free one, leads to its
/// container port 8080, and in it a container answering `reply` on 8080: the host port, the pod
/// config and the pod id, and the container id. Another port is tried when a host process
/// happens to have one.
async fn serve_on_a_host_port(
    k: &mut Kubelet,
    namespace: &str,
    handler: &str,
    image: &str,
    reply: &str,
) -> (u16, cri::PodSandboxConfig, String, String) {
    let (port, pod, id) = 'pick: {
        for _ in 0..20 {
            let port = publish_port();
            if TcpListener::bind(("0.0.0.0", port)).is_err() {
                continue;
            }
            let pod = k.pod(namespace, "server", &[(port, 8080)]);
            match k.run_pod_with(&pod, handler).await {
                Ok(id) => break 'pick (port, pod, id),
                Err(e)
                    if e.code() == Code::FailedPrecondition
                        && e.message().contains("in use on the host") => {}
                Err(e) => panic!("RunPodSandbox {namespace}/server with host port {port}: {e:?}"),
            }
        }
        panic!("no free host port in 20 tries");
    };
    let c = k
        .run_container(
            &id,
            &pod,
            "srv",
            image,
            &format!("while :; do echo {reply} | nc -l -p 8080; done"),
        )
        .await;
    (port, pod, id, c)
}

/// The IPv4 peers the test host's server saw.
fn v4_peers(world: &Served) -> Vec<Ipv4Addr> {
    world
        .peers()
        .iter()
        .filter_map(|(p, _)| match p {
            SocketAddr::V4(v) => Some(*v.ip()),
            SocketAddr::V6(_) => None,
        })
        .collect()
}

/// Whether the host has no route to `ip`/32 (a stopped pod's is gone).
fn no_host_route(ip: Ipv4Addr) -> bool {
    let routes = Command::new("ip")
        .args(["-4", "route", "show", &format!("{ip}/32")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&routes.stdout).trim().is_empty()
}

/// The CRI with `[cri.cni]` on and the test's network list ([`POD_CONFLIST`], in the directory
/// returned, which must outlive the agent), pulling from `reg`.
fn cni_config(
    reg: &Registry,
) -> (
    tempfile::TempDir,
    impl Fn(&mut Config) + Clone + Send + 'static,
) {
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(conf.path().join("10-pods.conflist"), POD_CONFLIST).unwrap();
    let registry = reg.host();
    let conf_dir = conf.path().to_path_buf();
    let tweak = move |c: &mut Config| {
        c.cri.enabled = true;
        c.cri.cni.enabled = true;
        c.cri.cni.conf_dir = conf_dir.clone();
        c.cri.cni.bin_dirs = vec![PathBuf::from(CNI_BIN)];
        c.images.insecure_registries = vec![registry.clone()];
    };
    (conf, tweak)
}

/// The pods [`pods_on_a_cni_network`] made.
struct CniPods {
    /// The server pod's host port.
    port: u16,
    server_id: String,
    server_ip: Ipv4Addr,
    client_id: String,
    /// The client pod's container.
    client: String,
    client_ip: Ipv4Addr,
    /// The other tenant's pod.
    other_id: String,
    other_ip: Ipv4Addr,
}

/// What a pod network through CNI gives pods of tenant `ns` (runtime `handler`), with the test
/// list's range (10.245.0.0/24): a server pod answering `reply` on 8080 with a host port, whose
/// eth0 has the address PodSandboxStatus reports and routes via the list's bridge; a client pod
/// of the tenant that does not share the server's loopback and reaches it at its address over
/// the bridge; the host reaching the server at its address (kubelet's probes do) and at the host
/// port on 127.0.0.1 and the uplink; the client reaching the test host through NAT with the
/// uplink's address; and a user-namespaced pod of tenant `other` with an address of its own from
/// the node's store, which does not reach the server.
async fn pods_on_a_cni_network(
    k: &mut Kubelet,
    host: &TestHost,
    image: &str,
    (ns, handler): (&str, &str),
    other: &str,
    reply: &str,
) -> CniPods {
    let in_range = |a: Ipv4Addr| a.octets()[..3] == [10, 245, 0];
    let (port, _, server_id, srv) = serve_on_a_host_port(k, ns, handler, image, reply).await;
    let server_ip: Ipv4Addr = k.pod_ip(&server_id).await.parse().unwrap();
    assert!(
        in_range(server_ip),
        "the pod's address {server_ip} is not from the network list's range 10.245.0.0/24"
    );
    let (code, out) = k.exec(&srv, "ip -4 -o addr show eth0; ip route").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{server_ip}/24")), "{out}");
    assert!(out.contains("default via 10.245.0.1"), "{out}");

    let client_pod = k.pod(ns, "client", &[]);
    let client_id = k.run_pod_with(&client_pod, handler).await.unwrap();
    let client = k
        .run_container(&client_id, &client_pod, "c", image, "sleep 600")
        .await;
    let client_ip: Ipv4Addr = k.pod_ip(&client_id).await.parse().unwrap();
    assert!(in_range(client_ip) && client_ip != server_ip, "{client_ip}");
    let (_, out) = k
        .exec(
            &client,
            "nc -w 2 127.0.0.1 8080 </dev/null && echo CONNECTED || echo refused",
        )
        .await;
    assert!(
        out.contains("refused"),
        "the client pod shares the server's loopback: {out}"
    );
    let (code, out) = k
        .exec(&client, &format!("nc -w 5 {server_ip} 8080 </dev/null"))
        .await;
    assert!(
        code == 0 && out.contains(reply),
        "pod to pod over the tenant's bridge: {code} {out}"
    );

    assert_eq!(
        fetch_soon(SocketAddr::from((server_ip, 8080))).await,
        reply,
        "the host to the pod's address {server_ip}"
    );
    for addr in [Ipv4Addr::LOCALHOST, host.host_ip] {
        assert_eq!(
            fetch_soon(SocketAddr::from((addr, port))).await,
            reply,
            "{addr}:{port}"
        );
    }

    let world = host.serve(host.ip, 9000);
    let (code, out) = k
        .exec(&client, &format!("echo ping | nc -w 5 {} 9000", host.ip))
        .await;
    assert!(
        code == 0 && out.contains("hello"),
        "pod egress: {code} {out}"
    );
    let seen = v4_peers(&world);
    assert!(
        seen.contains(&host.host_ip),
        "the test host saw {seen:?}, not the uplink address {}",
        host.host_ip
    );

    let other_pod = k.pod(other, "client", &[]);
    let other_id = k.run_pod(&other_pod).await.unwrap();
    let o = k
        .run_container(&other_id, &other_pod, "c", image, "sleep 600")
        .await;
    let other_ip: Ipv4Addr = k.pod_ip(&other_id).await.parse().unwrap();
    assert!(
        in_range(other_ip) && other_ip != server_ip && other_ip != client_ip,
        "tenant {other}'s pod got {other_ip}; {ns}'s pods have {server_ip} and {client_ip}"
    );
    let (_, out) = k
        .exec(
            &o,
            &format!("nc -w 2 {server_ip} 8080 </dev/null || echo unreached"),
        )
        .await;
    assert!(
        !out.contains(reply),
        "tenant {other} reached {ns}'s pod: {out}"
    );
    CniPods {
        port,
        server_id,
        server_ip,
        client_id,
        client,
        client_ip,
        other_id,
        other_ip,
    }
}

/// With `[cri.cni]` on, every pod gets a network namespace of its own, made inside its tenant's
/// network boundary by the standard CNI plugins (bridge + host-local from Debian's
/// containernetworking-plugins): all that [`pods_on_a_cni_network`] checks, with the pod's netns
/// held on the host, and all of it survives an agent restart. StopPodSandbox takes the namespace
/// and the address away; once the pods and tenants are gone the host's links, addresses and
/// nftables ruleset are as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pods_get_a_network_namespace_of_their_own_through_cni() {
    let name = "cri_pods_get_a_network_namespace_of_their_own_through_cni";
    if !require_root(name) || !tools_available(name) || !cni_plugins_available(name) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(48);
    let pool = "10.238.0.0/24";
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let (_conf, cri_config) = cni_config(&reg);
    let (p, l, tweak) = (pool.to_string(), host.link.clone(), cri_config.clone());
    let mut agent = TestAgent::start(move |c| {
        network_config(c, &p, &l);
        tweak(c);
    })
    .await
    .unwrap();
    // The agent's table is loaded (with the uplink): what follows must leave the host so.
    let before = host_network();
    let mut k = Kubelet::connect(&agent).await;
    let image_id = k.busybox(&reg, &agent).await;
    let (ns_a, ns_b) = (caas_tests::unique("cna"), caas_tests::unique("cnb"));
    let local = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    let pods = pods_on_a_cni_network(&mut k, &host, &image_id, (&ns_a, ""), &ns_b, "pod-a").await;
    let (server_id, server_ip, client) =
        (pods.server_id.clone(), pods.server_ip, pods.client.clone());
    let (client_id, b_id, port) = (pods.client_id.clone(), pods.other_id.clone(), pods.port);
    let pod_ns = agent
        .dir
        .path()
        .join("run/tenants")
        .join(&ns_a)
        .join("ns/pods")
        .join(&server_id);
    assert!(
        caas_agent::engine::ns::is_ns(&pod_ns),
        "no pod netns at {}",
        pod_ns.display()
    );

    // An agent restart keeps the pods' networks.
    restart_with(&mut agent, pool, &host, cri_config).await;
    k = Kubelet::connect(&agent).await;
    assert_eq!(k.pod_ip(&server_id).await, server_ip.to_string());
    assert_eq!(fetch_soon(local(port)).await, "pod-a", "after a restart");
    let (code, out) = k
        .exec(&client, &format!("nc -w 5 {server_ip} 8080 </dev/null"))
        .await;
    assert!(code == 0 && out.contains("pod-a"), "after a restart: {out}");

    // Stopping the server pod takes its namespace and address away.
    k.stop_pod(&server_id).await;
    assert!(
        !pod_ns.exists(),
        "the stopped pod's netns is still at {}",
        pod_ns.display()
    );
    assert_eq!(k.pod_ip(&server_id).await, "");
    assert!(
        no_host_route(server_ip),
        "the stopped pod's route to {server_ip} is still there"
    );
    let ipam = agent
        .dir
        .path()
        .join("run/cni-ipam/caas-test-pods")
        .join(server_ip.to_string());
    assert!(
        !ipam.exists(),
        "host-local still holds {server_ip}: {}",
        ipam.display()
    );
    // Stopping twice succeeds (the network is gone already).
    k.stop_pod(&server_id).await;

    for id in [&server_id, &client_id, &b_id] {
        k.remove_pod(id).await;
    }
    assert!(k.pods().await.is_empty());
    let mut api = Api::new(&agent).await;
    // The tenant PullImage put the image in (`[cri] image_tenant`) goes too.
    for t in [ns_a.as_str(), ns_b.as_str(), "default"] {
        api.delete_tenant(t).await;
    }
    let d = diff(&before, &host_network());
    assert!(d.is_empty(), "left behind on the host:\n{d}");
    agent.stop().await.unwrap();
}

/// With `[cri.cni]` on, a VM tenant's pods get network namespaces of their own too, made in its
/// guest by the same plugins (sent into the guest, run there by its engine), while host-local
/// allocates on the host from the node's one store: all that [`pods_on_a_cni_network`] checks
/// (the guest's bridge between the pods, the host to a pod through the tenant's tap, host ports,
/// NAT out, another tenant walled off), and port-forward reaches the pod at its address. After
/// the VM crashes and is booted again, its pods are not ready and refuse port-forward, and their
/// stop releases their addresses; a pod made in the new boot works. StopPodSandbox releases the
/// address and the route. Once the pods and tenants are gone the host's links, addresses and
/// nftables ruleset are as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_tenants_pods_get_network_namespaces_of_their_own_in_its_guest() {
    let name = "a_vm_tenants_pods_get_network_namespaces_of_their_own_in_its_guest";
    if !require_root(name)
        || !tools_available(name)
        || !cni_plugins_available(name)
        || !caas_tests::vm::vm_available(name)
    {
        return;
    }
    let _serial = SERIAL.lock().await;
    let host = TestHost::new(52);
    let pool = "10.227.0.0/24";
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let (_conf, cri_config) = cni_config(&reg);
    let uplink = host.link.clone();
    let mut agent = TestAgent::start(move |c| {
        network_config(c, pool, &uplink);
        caas_tests::vm::configure(c);
        cri_config(c);
    })
    .await
    .unwrap();
    let before = host_network();
    let mut k = Kubelet::connect(&agent).await;
    let image_id = k.busybox(&reg, &agent).await;
    let (ns_v, ns_u) = (caas_tests::unique("cvm"), caas_tests::unique("cvu"));
    let console = || {
        std::fs::read_to_string(
            agent
                .dir
                .path()
                .join(format!("state/engines/{ns_v}/console.log")),
        )
        .unwrap_or_default()
    };

    let pods =
        pods_on_a_cni_network(&mut k, &host, &image_id, (&ns_v, "caas-vm"), &ns_u, "pod-v").await;
    let (server_id, server_ip, client_id, client_ip) = (
        pods.server_id.clone(),
        pods.server_ip,
        pods.client_id.clone(),
        pods.client_ip,
    );
    let (u_id, u_ip) = (pods.other_id.clone(), pods.other_ip);
    // host-local holds the pods' addresses in the node's store, on the host.
    let held = |ip: Ipv4Addr| {
        agent
            .dir
            .path()
            .join("run/cni-ipam/caas-test-pods")
            .join(ip.to_string())
    };
    for ip in [server_ip, client_ip, u_ip] {
        assert!(held(ip).exists(), "{} is missing", held(ip).display());
    }
    // Port-forward (kubectl port-forward through the streaming server) reaches the pod at its
    // own address, not the tenant's.
    if let Some(spdy) = &caas_tests::spdy::client(name) {
        let pf = k.port_forward(&server_id).await.unwrap();
        let r = caas_tests::spdy::run(spdy, &["portforward", &pf, "8080"], b"ping\n").await;
        assert!(r.code == 0 && r.stdout.contains("pod-v"), "{r:?}");
    }

    // Stopping the server pod releases its address and route; stopping twice succeeds.
    k.stop_pod(&server_id).await;
    assert_eq!(k.pod_ip(&server_id).await, "");
    assert!(
        no_host_route(server_ip),
        "the stopped pod's route to {server_ip} is still there"
    );
    assert!(
        !held(server_ip).exists(),
        "host-local still holds {server_ip}"
    );
    k.stop_pod(&server_id).await;

    // The VM crashes and is booted again: the client pod's namespace went with the old boot, so
    // the pod is not ready (kubelet replaces it), and its stop releases its address on the host.
    let mut api = Api::new(&agent).await;
    let pid_file = agent
        .dir
        .path()
        .join("run/tenants")
        .join(&ns_v)
        .join("vmm.pid");
    let vmm_record = || std::fs::read_to_string(&pid_file).unwrap_or_default();
    let first_boot = vmm_record();
    let vmm: i32 = first_boot
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no VMM pid in {}", pid_file.display()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut rebooted = false;
    for _ in 0..1200 {
        let t = api
            .t
            .get_tenant(pb::GetTenantRequest { id: ns_v.clone() })
            .await
            .unwrap()
            .into_inner();
        let now = vmm_record();
        if t.state == pb::TenantState::Ready as i32 && !now.is_empty() && now != first_boot {
            rebooted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rebooted, "the VM was not booted again\n{}", console());
    assert_eq!(
        k.pod_state(&client_id).await,
        cri::PodSandboxState::SandboxNotready,
        "a pod whose namespace went with the VM's last boot is ready"
    );
    let e = k.port_forward(&client_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    k.stop_pod(&client_id).await;
    assert!(
        !held(client_ip).exists(),
        "host-local still holds {client_ip}"
    );

    // A new server pod in the new boot gets an address and serves (the plugins are there
    // from the first boot's imports).
    let again_pod = k.pod(&ns_v, "server2", &[]);
    let again_id = k.run_pod_with(&again_pod, "caas-vm").await.unwrap();
    k.run_container(
        &again_id,
        &again_pod,
        "srv",
        &image_id,
        "while :; do echo pod-v2 | nc -l -p 8080; done",
    )
    .await;
    let again_ip: Ipv4Addr = k.pod_ip(&again_id).await.parse().unwrap();
    assert_eq!(
        fetch_soon(SocketAddr::from((again_ip, 8080))).await,
        "pod-v2",
        "the host to the new VM pod's address {again_ip}"
    );

    for id in [&server_id, &client_id, &again_id, &u_id] {
        k.stop_pod(id).await;
        k.remove_pod(id).await;
    }
    assert!(k.pods().await.is_empty());
    for ip in [client_ip, again_ip, u_ip] {
        assert!(!held(ip).exists(), "host-local still holds {ip}");
    }
    for t in [ns_v.as_str(), ns_u.as_str(), "default"] {
        api.delete_tenant(t).await;
    }
    let d = diff(&before, &host_network());
    assert!(d.is_empty(), "left behind on the host:\n{d}");
    agent.stop().await.unwrap();
}
