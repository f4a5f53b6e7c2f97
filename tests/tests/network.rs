//! Tenant networks, end to end: real veth pairs, the agent's nftables table, NAT to a test host
//! in a network namespace the test makes, published ports, the wall between tenants, network
//! bytes in the meter, and a clean host after tenants go (also across an agent restart).
//!
//! The tests of this file share the host's nftables and routes, so they run one at a time.

#![allow(clippy::unwrap_used)] // integration-test helpers panic on purpose: that is a failing test

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use caas_agent::config::Config;
use caas_proto::v1::{
    self as pb, container_service_client::ContainerServiceClient,
    tenant_service_client::TenantServiceClient, usage_service_client::UsageServiceClient,
};
use caas_tests::{TestAgent, busybox_rootfs, calls::cref, require_root};
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
    agent.agent.take().unwrap().shutdown().await.unwrap();
    let mut c = caas_tests::test_config(agent.dir.path());
    c.tenants.cgroup_slice = agent.slice.clone();
    c.api.tls = Some(agent.pki.tls_config());
    network_config(&mut c, pool, &host.link);
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
    // The listener is a loop of one-shot `nc -l`: retry across its restarts.
    let from_outside = host.inside(|| {
        (0..50)
            .find_map(|_| {
                let r = fetch(uplink).ok().filter(|s| !s.is_empty());
                if r.is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                r
            })
            .unwrap_or_default()
    });
    assert_eq!(from_outside, "web-a", "from the test host");

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
        let during = host_network();
        assert!(
            !diff(&before, &during).is_empty(),
            "a tenant with a published port changed nothing on the host?"
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
    let uplink = SocketAddr::from((host.host_ip, port));
    let (header, body) = host.inside(|| {
        let mut last = None;
        for _ in 0..50 {
            match TcpStream::connect_timeout(&uplink, Duration::from_secs(3)) {
                Ok(mut s) => {
                    s.write_all(b"GET /blob HTTP/1.0\r\n\r\n").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
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
        panic!("the published port never answered: {last:?}");
    });
    assert_eq!(body, 100 * mib, "downloaded {body} bytes: {header}");
    // The tenant's usage includes the link's counters (read on each sample): wait for a tick.
    let mut tx = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let u = api
            .u
            .get_usage(pb::GetUsageRequest {
                tenant: t.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        tx = u.total.unwrap().tx_bytes;
        if tx >= 100 * mib {
            break;
        }
    }
    let ratio = tx as f64 / (100 * mib) as f64;
    eprintln!("measured: 100 MiB sent, billed tx {tx} bytes ({ratio:.4}×)");
    assert!(
        (0.98..=1.02).contains(&ratio),
        "billed {tx} bytes for 100 MiB sent ({ratio:.4}×)"
    );
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
