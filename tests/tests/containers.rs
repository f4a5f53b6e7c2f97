//! Tenant engines and the container lifecycle, end to end: real user namespaces, cgroups and
//! libcontainer, through the gRPC API.

#![allow(clippy::unwrap_used)] // integration-test helpers panic on purpose: that is a failing test

use std::{collections::BTreeMap, path::Path, time::Duration};

use caas_proto::v1::{
    self as pb, container_service_client::ContainerServiceClient,
    tenant_service_client::TenantServiceClient,
};
use caas_tests::{TestAgent, busybox_rootfs, calls::cref, require_root};
use futures::StreamExt;
use tonic::{Code, transport::Channel};

struct Api {
    t: TenantServiceClient<Channel>,
    c: ContainerServiceClient<Channel>,
    rootfs: String,
    /// What `tenant()` creates: the same tests run against userns and VM tenants.
    isolation: pb::Isolation,
    /// The agent's engines dir (VM tenants' guest consoles are there).
    engines: std::path::PathBuf,
}

impl Api {
    async fn new(agent: &TestAgent) -> Self {
        let ch = agent.unix().await;
        Self {
            t: TenantServiceClient::new(ch.clone()),
            c: ContainerServiceClient::new(ch),
            rootfs: busybox_rootfs(agent.dir.path()).display().to_string(),
            isolation: pb::Isolation::Userns,
            engines: agent.dir.path().join("state/engines"),
        }
    }

    /// The consoles of this agent's VM guests, for failure messages.
    fn guest_consoles(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(&self.engines)
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(t) = std::fs::read_to_string(e.path().join("console.log")) {
                out.push_str(&format!("--- guest console of {:?}:\n{t}\n", e.file_name()));
            }
        }
        out
    }

    /// The same, for VM tenants (the agent must have `[vm]`, see [`vm_agent`]).
    async fn vm(agent: &TestAgent) -> Self {
        Self {
            isolation: pb::Isolation::Vm,
            ..Self::new(agent).await
        }
    }

    async fn tenant(&mut self, id: &str, quotas: Option<pb::Quotas>) -> pb::Tenant {
        self.t
            .create_tenant(pb::CreateTenantRequest {
                id: id.into(),
                quotas,
                isolation: self.isolation as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    fn req(&self, tenant: &str, name: &str, script: &str) -> pb::CreateContainerRequest {
        pb::CreateContainerRequest {
            tenant: tenant.into(),
            name: name.into(),
            rootfs_path: self.rootfs.clone(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }
    }

    async fn run_req(&mut self, req: pb::CreateContainerRequest) -> pb::Container {
        let tenant = req.tenant.clone();
        let c = match self.c.create_container(req).await {
            Ok(c) => c.into_inner(),
            Err(e) => panic!("{e:?}\n{}", self.guest_consoles()),
        };
        self.c
            .start_container(pb::StartContainerRequest {
                r#ref: cref(&tenant, &c.name),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn run(&mut self, tenant: &str, name: &str, script: &str) -> pb::Container {
        let r = self.req(tenant, name, script);
        self.run_req(r).await
    }

    async fn wait(&mut self, tenant: &str, name: &str) -> pb::WaitContainerResponse {
        caas_tests::calls::wait(&mut self.c, tenant, name).await
    }

    async fn logs(&mut self, tenant: &str, name: &str) -> String {
        caas_tests::calls::logs(&mut self.c, tenant, name).await
    }

    /// Waits until the container's logs contain `needle`.
    async fn logs_until(&mut self, tenant: &str, name: &str, needle: &str) -> String {
        for _ in 0..200 {
            let l = self.logs(tenant, name).await;
            if l.contains(needle) {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{tenant}/{name} never printed {needle:?}: {}",
            self.logs(tenant, name).await
        );
    }
}

fn host_uid(pid: u32) -> u32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An agent that can run VM tenants (QEMU microvm under TCG, the guest kernel of
/// scripts/guest-kernel.sh), or None when this machine cannot (the skip is recorded).
async fn vm_agent(test: &str) -> Option<TestAgent> {
    vm_agent_with(test, |_| {}).await
}

async fn vm_agent_with(
    test: &str,
    tweak: impl FnOnce(&mut caas_agent::config::Config),
) -> Option<TestAgent> {
    if !caas_tests::vm::vm_available(test) {
        return None;
    }
    Some(
        TestAgent::start(|c| {
            caas_tests::vm::configure(c);
            tweak(c);
        })
        .await
        .unwrap(),
    )
}

macro_rules! root_or_skip {
    ($name:literal) => {
        if !require_root($name) {
            return;
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_each_run_as_their_own_unprivileged_root() {
    root_or_skip!("two_tenants_each_run_as_their_own_unprivileged_root");
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut api = Api::new(&agent).await;
    let a = api.tenant("a", None).await;
    let b = api.tenant("b", None).await;
    let (ra, rb) = (a.id_range.unwrap(), b.id_range.unwrap());
    assert!(
        ra.start + ra.size <= rb.start || rb.start + rb.size <= ra.start,
        "ranges overlap: {ra:?} {rb:?}"
    );

    let script = "id -u; ps -o pid,comm; echo ready; sleep 60";
    let ca = api.run("a", "one", script).await;
    let cb = api.run("b", "one", script).await;
    let la = api.logs_until("a", "one", "ready").await;
    let lb = api.logs_until("b", "one", "ready").await;
    for (l, c, r) in [(&la, &ca, &ra), (&lb, &cb, &rb)] {
        assert_eq!(l.lines().next(), Some("0"), "root inside: {l}");
        let uid = host_uid(c.pid);
        assert!(
            uid >= r.start && uid < r.start + r.size,
            "host uid {uid} outside {r:?}"
        );
        assert_ne!(uid, 0);
        // The caas API's containers always run with no-new-privileges and the seccomp filter.
        let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid)).unwrap();
        assert!(
            status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"),
            "{status}"
        );
        // Signals start at their default actions, not the engine's: the Rust runtime ignores
        // SIGPIPE, and an ignored signal stays ignored across exec (a pipeline's writer would
        // get EPIPE errors instead of ending quietly).
        let mask = |key: &str| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {status}"));
            u64::from_str_radix(hex.trim(), 16).unwrap()
        };
        assert_eq!(
            mask("SigIgn:") & (1 << (nix::sys::signal::Signal::SIGPIPE as u64 - 1)),
            0,
            "SIGPIPE ignored in the container: {status}"
        );
        assert_eq!(mask("SigBlk:"), 0, "{status}");
        // ps sees only this container's own processes: its shell (pid 1) and ps itself.
        let procs: Vec<&str> = l
            .lines()
            .skip_while(|x| !x.starts_with("PID"))
            .skip(1)
            .take_while(|x| *x != "ready")
            .collect();
        // Busybox runs the ps applet inside the shell, so pid 1 (the shell) is all there is:
        // nothing of the host or of the other tenant.
        assert!(
            !procs.is_empty() && procs.len() <= 2,
            "only own processes visible: {l}"
        );
        assert!(procs[0].trim_start().starts_with("1 "), "{l}");
    }

    // A's container cannot reach B's processes or files through /proc, even by B's host pid.
    let probe = format!("ls /proc/{}/root/ && echo LEAK || echo denied", cb.pid);
    api.run("a", "probe", &probe).await;
    assert_eq!(api.wait("a", "probe").await.exit_code, 0);
    let out = api.logs("a", "probe").await;
    assert!(out.contains("denied") && !out.contains("LEAK"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_containers_share_a_network_that_other_tenants_cannot_reach() {
    root_or_skip!("a_tenants_containers_share_a_network_that_other_tenants_cannot_reach");
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut api = Api::new(&agent).await;
    api.tenant("a", None).await;
    api.tenant("b", None).await;
    api.run(
        "a",
        "server",
        "echo listening; while true; do sleep 600 | nc -l -p 8080; done",
    )
    .await;
    api.logs_until("a", "server", "listening").await;
    // Whether 8080 listens in tenant A's network (busybox nc serves one connection, then the
    // loop waits): checked from another container of A, which shares that network.
    let listening = "for i in $(seq 100); do \
         cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk '$2 ~ /:1F90$/ && $4 == \"0A\" {f=1} END {exit !f}' && exit 0; \
         sleep 0.1; done; exit 1";
    api.run("a", "up", listening).await;
    assert_eq!(api.wait("a", "up").await.exit_code, 0, "A's listener is up");
    // Other tenant first, while the listener is up: its 127.0.0.1 is its own network; nothing
    // listens there.
    api.run(
        "b",
        "client",
        "echo from-b | nc -w 2 127.0.0.1 8080 && echo CONNECTED || echo refused",
    )
    .await;
    api.wait("b", "client").await;
    let out = api.logs("b", "client").await;
    assert!(
        out.contains("refused") && !out.contains("CONNECTED"),
        "{out}"
    );
    api.run("a", "still-up", listening).await;
    assert_eq!(
        api.wait("a", "still-up").await.exit_code,
        0,
        "nothing of B reached A's listener"
    );
    // Same tenant: reaches the listener over the tenant's shared network namespace.
    api.run(
        "a",
        "client",
        "for i in 1 2 3 4 5 6 7 8 9 10; do echo hello-from-a | nc 127.0.0.1 8080 && exit 0; sleep 0.3; done; exit 1",
    )
    .await;
    assert_eq!(api.wait("a", "client").await.exit_code, 0);
    let served = api.logs_until("a", "server", "hello-from-a").await;
    assert!(
        served.contains("hello-from-a") && !served.contains("from-b"),
        "{served}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_logs_and_stop_escalation() {
    root_or_skip!("exit_codes_logs_and_stop_escalation");
    let agent = TestAgent::start(|_| {}).await.unwrap();
    exit_codes_logs_and_stop_escalation_in(&mut Api::new(&agent).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_exit_codes_logs_and_stop_escalation() {
    let Some(agent) = vm_agent("vm_exit_codes_logs_and_stop_escalation").await else {
        return;
    };
    exit_codes_logs_and_stop_escalation_in(&mut Api::vm(&agent).await).await;
}

async fn exit_codes_logs_and_stop_escalation_in(api: &mut Api) {
    api.tenant("t", None).await;

    api.run("t", "ok", "true").await;
    api.run("t", "fail", "echo out; echo err >&2; exit 1").await;
    api.run("t", "killed", "sleep 60").await;
    assert_eq!(api.wait("t", "ok").await.exit_code, 0);
    assert_eq!(api.wait("t", "fail").await.exit_code, 1);
    api.c
        .kill_container(pb::KillContainerRequest {
            r#ref: cref("t", "killed"),
            signal: "KILL".into(),
        })
        .await
        .unwrap();
    assert_eq!(api.wait("t", "killed").await.exit_code, 137);

    // Logs hold every line after exit, from both streams.
    let many = "i=0; while [ $i -lt 500 ]; do echo line-$i; i=$((i+1)); done";
    api.run("t", "chatty", many).await;
    api.wait("t", "chatty").await;
    let l = api.logs("t", "chatty").await;
    assert_eq!(l.lines().count(), 500);
    assert!(l.contains("line-0\n") && l.contains("line-499\n"));
    let l = api.logs("t", "fail").await;
    assert!(l.contains("out") && l.contains("err"), "{l}");
    let mut s = api
        .c
        .logs(pb::LogsRequest {
            r#ref: cref("t", "chatty"),
            tail: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.message().await.unwrap().unwrap().data,
        b"line-498\nline-499\n"
    );

    // PID 1 ignores SIGTERM (no handler): stop escalates to SIGKILL after the grace period.
    api.run("t", "stubborn", "echo up; sleep 600").await;
    api.logs_until("t", "stubborn", "up").await;
    let stopped = api
        .c
        .stop_container(pb::StopContainerRequest {
            r#ref: cref("t", "stubborn"),
            grace_seconds: 1,
            signal: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state, pb::ContainerState::Exited as i32);
    assert_eq!(stopped.exit_code, 137);

    // A running container is not deleted without force; with force it is.
    api.run("t", "busy", "sleep 600").await;
    let e = api
        .c
        .delete_container(pb::DeleteContainerRequest {
            r#ref: cref("t", "busy"),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    api.c
        .delete_container(pb::DeleteContainerRequest {
            r#ref: cref("t", "busy"),
            force: true,
        })
        .await
        .unwrap();
    let names: Vec<String> = api
        .c
        .list_containers(pb::ListContainersRequest {
            tenant: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(!names.contains(&"busy".to_string()), "{names:?}");
    let running = api
        .c
        .list_containers(pb::ListContainersRequest {
            tenant: "t".into(),
            state: pb::ContainerState::Running as i32,
            label_selector: BTreeMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(running.is_empty(), "{running:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_pids_limits_hold() {
    root_or_skip!("memory_and_pids_limits_hold");
    let agent = TestAgent::start(|_| {}).await.unwrap();
    memory_and_pids_limits_hold_in(&mut Api::new(&agent).await, Some(&agent.slice)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_memory_and_pids_limits_hold() {
    let Some(agent) = vm_agent("vm_memory_and_pids_limits_hold").await else {
        return;
    };
    memory_and_pids_limits_hold_in(&mut Api::vm(&agent).await, None).await;
}

/// `host_slice`: where the tenant's cgroups are on this host (userns tenants; a VM tenant's
/// containers have theirs inside the guest).
async fn memory_and_pids_limits_hold_in(api: &mut Api, host_slice: Option<&str>) {
    api.tenant("t", None).await;
    let mut hog = api.req(
        "t",
        "hog",
        "dd if=/dev/zero of=/dev/null bs=200M count=1; echo survived",
    );
    hog.resources = Some(pb::Resources {
        memory_bytes: Some(32 << 20),
        ..Default::default()
    });
    api.run_req(hog).await;
    let w = api.wait("t", "hog").await;
    assert!(w.oom_killed, "{w:?}");
    let c = api
        .c
        .inspect_container(pb::InspectContainerRequest {
            r#ref: cref("t", "hog"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.oom_killed);

    let mut bomb = api.req(
        "t",
        "bomb",
        "i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done",
    );
    bomb.resources = Some(pb::Resources {
        pids: Some(20),
        ..Default::default()
    });
    api.run_req(bomb).await;
    let l = api.logs_until("t", "bomb", "can't fork").await;
    assert!(l.contains("Resource temporarily unavailable"), "{l}");
    // The limit held: the container's pids cgroup never passed 20 tasks.
    let c = api
        .c
        .inspect_container(pb::InspectContainerRequest {
            r#ref: cref("t", "bomb"),
        })
        .await
        .unwrap()
        .into_inner();
    if let Some(slice) = host_slice {
        let dir = format!("/sys/fs/cgroup/pids/{slice}/tenant-t/c-{}", c.id);
        let peak: u64 = std::fs::read_to_string(format!("{dir}/pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(peak <= 20, "pids.current {peak}");
    }
    // And the host stays responsive meanwhile: a container of the same tenant still runs.
    api.run("t", "alive", "echo alive").await;
    assert_eq!(api.wait("t", "alive").await.exit_code, 0);
    api.c
        .delete_container(pb::DeleteContainerRequest {
            r#ref: cref("t", "bomb"),
            force: true,
        })
        .await
        .unwrap();
}

/// On a cgroup v1 host the engine makes a container's `/sys/fs/cgroup` (one bind of the
/// container's own cgroup per hierarchy under a tmpfs) instead of libcontainer's init: the
/// container sees its own limits where a JVM looks for them, cannot write any of it, and the
/// view leaves neither mounts in the engine's namespace nor cgroups of a failed create behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_sees_its_own_cgroups_read_only() {
    root_or_skip!("a_container_sees_its_own_cgroups_read_only");
    let hierarchies: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != "unified")
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !hierarchies.iter().any(|h| h == "memory") {
        println!(
            "a_container_sees_its_own_cgroups_read_only: skipped: this host has no cgroup v1 memory hierarchy (the view is for v1 and hybrid hosts)"
        );
        return;
    }
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut api = Api::new(&agent).await;
    api.tenant("t", None).await;
    let mut req = api.req(
        "t",
        "look",
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max; \
         echo mounts $(grep -c ' - cgroup ' /proc/self/mountinfo); \
         echo own $(grep ':memory:' /proc/self/cgroup | cut -d: -f3); \
         echo root $(grep ' /sys/fs/cgroup/memory ' /proc/self/mountinfo | cut -d' ' -f4); \
         touch /sys/fs/cgroup/x 2>/dev/null && echo tmpfs-writable; \
         mkdir /sys/fs/cgroup/memory/sub 2>/dev/null && echo cgroup-writable; \
         (echo 1 > /sys/fs/cgroup/pids/pids.max) 2>/dev/null && echo limit-writable; \
         echo end",
    );
    req.resources = Some(pb::Resources {
        memory_bytes: Some(48 << 20),
        pids: Some(50),
        ..Default::default()
    });
    let c = api.run_req(req).await;
    assert_eq!(api.wait("t", "look").await.exit_code, 0);
    let out = api.logs("t", "look").await;
    let own = format!("/{}/tenant-t/c-{}", agent.slice, c.id);
    let want = format!(
        "{}\n50\nmounts {}\nown {own}\nroot {own}\nend\n",
        48u64 << 20,
        hierarchies.len()
    );
    assert_eq!(out, want, "the container's view of its cgroups");
    // The view was the engine's only while the container was made. (The engine works in the
    // host's mount namespace, this one: its container's overlay is seen here.)
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo.contains(&format!("/rootfs/{} ", c.id)),
        "the engine's mounts are not seen here:\n{mountinfo}"
    );
    assert!(
        !mountinfo.contains(&format!("/volumes/{}/cgroup", c.id)),
        "the view is still mounted in the engine's namespace:\n{mountinfo}"
    );

    // A create that fails in libcontainer (a working directory that is a file) leaves no
    // cgroup directory of its own and no view.
    let tenant_dir =
        std::path::PathBuf::from(format!("/sys/fs/cgroup/memory/{}/tenant-t", agent.slice));
    let children = || -> Vec<String> {
        std::fs::read_dir(&tenant_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let before = children();
    for h in &hierarchies {
        if h == "systemd" {
            continue;
        }
        assert!(
            std::path::Path::new(&format!("/sys/fs/cgroup/{h}{own}")).is_dir(),
            "{h}: the container's cgroup"
        );
    }
    let mut bad = api.req("t", "bad", "true");
    bad.workdir = "/bin/sh".into();
    let e = api.c.create_container(bad).await.unwrap_err();
    assert!(e.message().contains("creating the container"), "{e:?}");
    assert_eq!(children(), before, "cgroups left by a failed create");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains("/volumes/") && l.contains("/cgroup "))
        .collect();
    assert!(left.is_empty(), "a view left mounted: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_container_input_is_refused_and_changes_nothing() {
    root_or_skip!("bad_container_input_is_refused_and_changes_nothing");
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut api = Api::new(&agent).await;
    api.tenant("t", None).await;
    api.c
        .create_container(api.req("t", "dup", "true"))
        .await
        .unwrap();
    let cases = [
        (api.req("nobody", "x", "true"), Code::NotFound, "nobody"),
        (api.req("t", "dup", "true"), Code::AlreadyExists, "dup"),
        (
            pb::CreateContainerRequest {
                rootfs_path: "/does/not/exist".into(),
                ..api.req("t", "x", "true")
            },
            Code::InvalidArgument,
            "/does/not/exist",
        ),
        (
            pb::CreateContainerRequest {
                command: vec!["no-such-cmd".into()],
                ..api.req("t", "x", "true")
            },
            Code::InvalidArgument,
            "no-such-cmd",
        ),
        (
            pb::CreateContainerRequest {
                command: vec![],
                ..api.req("t", "x", "true")
            },
            Code::InvalidArgument,
            "command",
        ),
        (
            pb::CreateContainerRequest {
                resources: Some(pb::Resources {
                    memory_bytes: Some(0),
                    ..Default::default()
                }),
                ..api.req("t", "x", "true")
            },
            Code::InvalidArgument,
            "resources.memory_bytes",
        ),
        (
            pb::CreateContainerRequest {
                resources: Some(pb::Resources {
                    cpu_shares: Some(1),
                    ..Default::default()
                }),
                ..api.req("t", "x", "true")
            },
            Code::InvalidArgument,
            "resources.cpu_shares",
        ),
        // Above the tenant's quota (default: 1 CPU): the limit could not hold.
        (
            pb::CreateContainerRequest {
                resources: Some(pb::Resources {
                    cpus: Some(64.0),
                    ..Default::default()
                }),
                ..api.req("t", "x", "true")
            },
            Code::FailedPrecondition,
            "resources.cpus: the limit is above what the tenant's quota allows",
        ),
        (
            pb::CreateContainerRequest {
                env: vec!["NOEQUALS".into()],
                ..api.req("t", "x", "true")
            },
            Code::InvalidArgument,
            "env[0]",
        ),
    ];
    for (req, code, needle) in cases {
        let e = api.c.create_container(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    let list = api
        .c
        .list_containers(pb::ListContainersRequest {
            tenant: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(list.len(), 1, "only the first container exists: {list:?}");
    // Nothing of the refused containers is left on disk.
    let containers = agent.dir.path().join("state/engines/t/containers");
    assert_eq!(std::fs::read_dir(&containers).unwrap().count(), 1);
    let e = api
        .t
        .delete_tenant(pb::DeleteTenantRequest {
            id: "t".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let _ = Path::new("");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_leaves_containers_running_and_a_new_agent_finds_them() {
    root_or_skip!("kill_9_of_the_agent_leaves_containers_running_and_a_new_agent_finds_them");
    use caas_agent::client::{self, Target};
    use caas_tests::{AgentProcess, cleanup_tenants, unique_slice};
    let dir = tempfile::tempdir().unwrap();
    let slice = unique_slice();
    let cfg = caas_tests::write_agent_config(dir.path(), &slice, "");
    let socket = dir.path().join("run/agent.sock");
    let rootfs = busybox_rootfs(dir.path()).display().to_string();
    let mut agent = AgentProcess::spawn(&cfg, &socket, &dir.path().join("a1.log"))
        .await
        .unwrap();
    let connect = || async {
        let ch = client::connect(&Target::Unix(socket.clone()))
            .await
            .unwrap();
        (
            TenantServiceClient::new(ch.clone()),
            ContainerServiceClient::new(ch),
        )
    };
    let (mut t, mut c) = connect().await;
    for id in ["a", "b"] {
        t.create_tenant(pb::CreateTenantRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let plan = [
        ("a", "s1", "sleep 600"),
        ("a", "s2", "sleep 600"),
        ("a", "quits", "sleep 2; exit 7"),
        ("b", "s1", "sleep 600"),
        ("b", "s2", "sleep 600"),
    ];
    for (tenant, name, script) in plan {
        let cr = c
            .create_container(pb::CreateContainerRequest {
                tenant: tenant.into(),
                name: name.into(),
                rootfs_path: rootfs.clone(),
                command: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        c.start_container(pb::StartContainerRequest {
            r#ref: cref(tenant, &cr.id),
        })
        .await
        .unwrap();
    }
    let before = c
        .list_containers(pb::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(before.len(), 5);
    // The last event of tenant a so far: the cursor a billing-style consumer would hold.
    let mut ev = c
        .events(pb::EventsRequest {
            tenant: "a".into(),
            after_seq: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut cursor = 1;
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(300), ev.next()).await {
        cursor = e.seq;
    }
    drop(ev);
    assert!(
        cursor >= 6,
        "create+start of 3 containers in a: seq {cursor}"
    );

    agent.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    agent
        .wait_for_exit(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("agent died");
    drop(agent);
    // While no agent runs, one container exits with code 7; the others keep running.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for ct in before.iter().filter(|c| c.name != "quits") {
        assert!(
            Path::new(&format!("/proc/{}", ct.pid)).exists(),
            "{}/{} died with the agent",
            ct.tenant,
            ct.name
        );
    }

    let _agent = AgentProcess::spawn(&cfg, &socket, &dir.path().join("a2.log"))
        .await
        .unwrap();
    let (_, mut c) = connect().await;
    let after = c
        .list_containers(pb::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(after.len(), 5, "{after:?}");
    for b in &before {
        let a = after
            .iter()
            .find(|a| a.id == b.id)
            .unwrap_or_else(|| panic!("{} lost", b.id));
        assert_eq!((&a.tenant, &a.name), (&b.tenant, &b.name));
        if b.name == "quits" {
            assert_eq!(a.state, pb::ContainerState::Exited as i32, "{a:?}");
            assert_eq!(a.exit_code, 7);
        } else {
            assert_eq!(a.state, pb::ContainerState::Running as i32, "{a:?}");
            assert_eq!(a.pid, b.pid);
        }
    }
    // The event stream resumes from the cursor: the exit that happened while no agent ran.
    let mut ev = c
        .events(pb::EventsRequest {
            tenant: "a".into(),
            after_seq: cursor,
        })
        .await
        .unwrap()
        .into_inner();
    let e = tokio::time::timeout(Duration::from_secs(5), ev.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.seq, cursor + 1);
    assert_eq!(e.r#type, pb::ContainerEventType::Exited as i32);
    assert_eq!((e.container_name.as_str(), e.exit_code), ("quits", 7));
    cleanup_tenants(&socket, &slice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_exec_returns_output_and_exit_code() {
    let Some(agent) = vm_agent("vm_exec_returns_output_and_exit_code").await else {
        return;
    };
    let mut api = Api::vm(&agent).await;
    api.tenant("t", None).await;
    exec_returns_output_and_exit_code_in(&mut api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_returns_output_and_exit_code_and_cpu_quota_caps_a_busy_loop() {
    root_or_skip!("exec_returns_output_and_exit_code_and_cpu_quota_caps_a_busy_loop");
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut api = Api::new(&agent).await;
    api.tenant("t", None).await;
    exec_returns_output_and_exit_code_in(&mut api).await;
    cpu_quota_caps_a_busy_loop(&mut api, &agent.slice).await;
}

async fn exec_returns_output_and_exit_code_in(api: &mut Api) {
    api.run("t", "box", "echo up; sleep 600").await;
    api.logs_until("t", "box", "up").await;
    let mut s = api
        .c
        .exec(pb::ExecRequest {
            r#ref: cref("t", "box"),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; id -u; exit 5".into(),
            ],
            env: vec!["X=1".into()],
            workdir: "/tmp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(m) = s.message().await.unwrap() {
        match m.output.unwrap() {
            pb::exec_output::Output::Stdout(b) => out.extend(b),
            pb::exec_output::Output::Stderr(b) => err.extend(b),
            pb::exec_output::Output::ExitCode(c) => code = Some(c),
        }
    }
    assert_eq!(String::from_utf8_lossy(&out), "out\n0\n");
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    assert_eq!(code, Some(5));
    let e = api
        .c
        .exec(pb::ExecRequest {
            r#ref: cref("t", "nope"),
            command: vec!["true".into()],
            ..Default::default()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::NotFound);
}

async fn cpu_quota_caps_a_busy_loop(api: &mut Api, slice: &str) {
    // CPU quota: half a CPU holds a busy loop to about half a CPU.
    let mut busy = api.req("t", "busy", "while :; do :; done");
    busy.resources = Some(pb::Resources {
        cpus: Some(0.5),
        ..Default::default()
    });
    let c = api.run_req(busy).await;
    let usage = format!(
        "/sys/fs/cgroup/cpuacct/{slice}/tenant-t/c-{}/cpuacct.usage",
        c.id
    );
    let read = || {
        std::fs::read_to_string(&usage)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (u0, t0) = (read(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (u1, t1) = (read(), std::time::Instant::now());
    let cpus = (u1 - u0) as f64 / 1e9 / (t1 - t0).as_secs_f64();
    assert!(
        cpus > 0.3 && cpus < 0.6,
        "busy loop used {cpus:.3} CPUs under a 0.5 quota"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_is_restarted_and_readopts_its_containers() {
    root_or_skip!("a_dead_engine_is_restarted_and_readopts_its_containers");
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut api = Api::new(&agent).await;
    api.tenant("t", None).await;
    let c = api.run("t", "survivor", "echo up; sleep 600").await;
    api.logs_until("t", "survivor", "up").await;
    let engine_pid = caas_tests::ppid(c.pid) as i32;
    let cmdline = std::fs::read_to_string(format!("/proc/{engine_pid}/cmdline")).unwrap();
    assert!(
        cmdline.contains("engine"),
        "the container's parent is its engine: {cmdline:?}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(engine_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        Path::new(&format!("/proc/{}", c.pid)).exists(),
        "the container outlives its engine"
    );
    // The next call finds the engine gone, starts a new one, and it re-adopts the container.
    let got = api
        .c
        .inspect_container(pb::InspectContainerRequest {
            r#ref: cref("t", "survivor"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, pb::ContainerState::Running as i32);
    assert_eq!(got.pid, c.pid);
    // Still fully manageable: stop it through the new engine.
    let stopped = api
        .c
        .kill_container(pb::KillContainerRequest {
            r#ref: cref("t", "survivor"),
            signal: "KILL".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.name, "survivor");
    let mut exited = false;
    for _ in 0..40 {
        let s = api
            .c
            .inspect_container(pb::InspectContainerRequest {
                r#ref: cref("t", "survivor"),
            })
            .await
            .unwrap()
            .into_inner();
        if s.state == pb::ContainerState::Exited as i32 {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exited, "the re-adopted container's exit was noticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_from_oci_layouts_and_hostile_layers_are_refused() {
    root_or_skip!("containers_run_from_oci_layouts_and_hostile_layers_are_refused");
    use caas_tests::{oci_layout, tar_dir};
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut api = Api::new(&agent).await;
    api.tenant("t", None).await;
    let base = tar_dir(Path::new(&api.rootfs));
    let second = {
        let d = agent.dir.path().join("layer2");
        std::fs::create_dir_all(d.join("etc")).unwrap();
        std::fs::write(d.join("etc/motd"), "from layer two\n").unwrap();
        tar_dir(&d)
    };
    let layout = oci_layout(&agent.dir.path().join("layout"), &[base.clone(), second]);
    // The same layout as a tarball.
    let tarball = agent.dir.path().join("image.tar");
    std::fs::write(&tarball, tar_dir(&layout)).unwrap();
    for (name, src) in [("from-dir", layout.clone()), ("from-tar", tarball.clone())] {
        let mut r = api.req("t", name, "id -u; cat /etc/motd; stat -c %u /bin/busybox");
        r.rootfs_path = src.display().to_string();
        api.run_req(r).await;
        assert_eq!(api.wait("t", name).await.exit_code, 0);
        assert_eq!(
            api.logs("t", name).await,
            "0\nfrom layer two\n0\n",
            "{name}"
        );
    }

    // A layer that climbs out of the rootfs is refused, naming the entry, and leaves nothing.
    let evil = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        let p = b"../../escaped";
        h.as_old_mut().name[..p.len()].copy_from_slice(p);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let bad = oci_layout(&agent.dir.path().join("evil"), &[base.clone(), evil]);
    let mut r = api.req("t", "evil", "true");
    r.rootfs_path = bad.display().to_string();
    let e = api.c.create_container(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("../../escaped"), "{}", e.message());
    let images = agent.dir.path().join("state/engines/t/images");
    for leftover in ["escaped", "state/escaped", "state/engines/escaped"] {
        assert!(!agent.dir.path().join(leftover).exists(), "{leftover}");
    }

    // An absolute symlink to the host's /etc, then a file through it: refused, host untouched.
    // (Absolute symlinks as such are kept: real images are full of them, and they only ever
    // resolve inside the container's root. What is refused is following one while unpacking.)
    let marker = format!("caas-escape-{}", std::process::id());
    let through_link = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "hostetc", "/etc").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("hostetc/{marker}"), &b"x"[..])
            .unwrap();
        b.into_inner().unwrap()
    };
    let bad = oci_layout(
        &agent.dir.path().join("evil-link"),
        &[base.clone(), through_link],
    );
    let mut r = api.req("t", "evil-link", "true");
    r.rootfs_path = bad.display().to_string();
    let e = api.c.create_container(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(&marker), "{}", e.message());
    assert!(e.message().contains("symlink"), "{}", e.message());
    assert!(
        !Path::new("/etc").join(&marker).exists(),
        "host /etc written"
    );

    let copies = std::fs::read_dir(&images).unwrap().count();
    assert_eq!(copies, 2, "only the two good images are kept");

    // A blob whose bytes do not match its digest is refused.
    let tampered = oci_layout(&agent.dir.path().join("tampered"), &[base]);
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tampered.join("index.json")).unwrap()).unwrap();
    let mdigest = idx["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tampered.join("blobs/sha256").join(&mdigest)).unwrap(),
    )
    .unwrap();
    let layer = m["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let lp = tampered.join("blobs/sha256").join(&layer);
    let mut bytes = std::fs::read(&lp).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0xff;
    std::fs::write(&lp, bytes).unwrap();
    let mut r = api.req("t", "tampered", "true");
    r.rootfs_path = tampered.display().to_string();
    let e = api.c.create_container(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("digest")
            || e.message().contains("gzip")
            || e.message().contains("corrupt"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_quota_holds() {
    root_or_skip!("the_container_quota_holds");
    let agent = TestAgent::start(|_| {}).await.unwrap();
    let mut api = Api::new(&agent).await;
    api.tenant(
        "q",
        Some(pb::Quotas {
            max_containers: Some(1),
            ..Default::default()
        }),
    )
    .await;
    api.run("q", "one", "sleep 600").await;
    let e = api
        .c
        .create_container(api.req("q", "two", "true"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_containers"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_tenant_containers_see_their_guest_not_the_host() {
    let Some(agent) = vm_agent("vm_tenant_containers_see_their_guest_not_the_host").await else {
        return;
    };
    let mut api = Api::vm(&agent).await;
    api.tenant("t", None).await;
    // A file only the host has, and the host's own kernel and sizes.
    let secret = agent.dir.path().join("host-secret");
    std::fs::write(&secret, "host only").unwrap();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let script = format!(
        "echo kernel=$(cat /proc/sys/kernel/osrelease); \
         echo cpus=$(grep -c ^processor /proc/cpuinfo); \
         echo mem_kib=$(awk '/^MemTotal:/ {{print $2}}' /proc/meminfo); \
         echo procs=$(ls -d /proc/[0-9]* | wc -l); \
         cat {} 2>/dev/null && echo SECRET-VISIBLE; \
         ls /proc/1/root/ >/dev/null 2>&1; echo uid=$(id -u)",
        secret.display()
    );
    api.run("t", "look", &script).await;
    assert_eq!(api.wait("t", "look").await.exit_code, 0);
    let l = api.logs("t", "look").await;
    let get = |k: &str| -> String {
        l.lines()
            .find_map(|x| x.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {l}"))
            .to_string()
    };
    // Its own kernel: the guest's, not the host's.
    assert_ne!(get("kernel"), host_kernel.trim(), "{l}");
    // The VM's size, not the host's: 1 vCPU and at most the 256 MiB of guest memory.
    assert_eq!(get("cpus"), "1", "{l}");
    let mem: u64 = get("mem_kib").parse().unwrap();
    assert!(mem <= 256 * 1024, "the container sees {mem} KiB: {l}");
    // Its own processes only (the container's shell and its children).
    let procs: u32 = get("procs").parse().unwrap();
    assert!(procs < 10, "{procs} processes visible: {l}");
    assert!(!l.contains("SECRET-VISIBLE"), "{l}");
    assert_eq!(get("uid"), "0");
    // A memory hog bigger than the whole VM is stopped inside the guest, and the VMM on the host
    // never holds more than the guest's memory plus its own overhead.
    let hog = api.req("t", "hog", "dd if=/dev/zero of=/dev/null bs=1G count=1");
    api.run_req(hog).await;
    let w = api.wait("t", "hog").await;
    assert_ne!(w.exit_code, 0, "{w:?}");
    let pid_file = agent.dir.path().join("run/tenants/t/vmm.pid");
    let vmm: u32 = std::fs::read_to_string(pid_file)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|x| x.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        rss_kib < (256 + 256) * 1024,
        "the VMM holds {rss_kib} KiB for a 256 MiB guest"
    );

    // A root filesystem the host cannot read whole (a unix socket cannot go into a tar) is
    // refused, and stays refused: the guest keeps nothing of a send that did not finish.
    let odd = agent.dir.path().join("odd-rootfs");
    std::fs::create_dir_all(&odd).unwrap();
    for e in std::fs::read_dir(&api.rootfs).unwrap() {
        let e = e.unwrap();
        let to = odd.join(e.file_name());
        if e.file_type().unwrap().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), to).unwrap();
        } else if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
        }
    }
    std::fs::copy(
        std::path::Path::new(&api.rootfs).join("bin/busybox"),
        odd.join("bin/busybox"),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(odd.join("tmp/s.sock")).unwrap();
    for attempt in 0..2 {
        let mut req = api.req("t", &format!("odd{attempt}"), "true");
        req.rootfs_path = odd.display().to_string();
        let e = api.c.create_container(req).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::FailedPrecondition,
            "attempt {attempt}: {e:?}"
        );
        assert!(e.message().contains("odd-rootfs"), "{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_tenant_on_a_node_without_its_kernel_is_refused_and_leaves_nothing() {
    root_or_skip!("a_vm_tenant_on_a_node_without_its_kernel_is_refused_and_leaves_nothing");
    let vm: vmm_config::VmConfig = toml::from_str(
        "backend = \"qemu\"\nkernel = \"/nonexistent/vmlinux\"\n[qemu]\naccel = \"tcg\"\n",
    )
    .unwrap();
    let agent = TestAgent::start(|c| c.vm = Some(vm)).await.unwrap();
    let mut api = Api::vm(&agent).await;
    let e = api
        .t
        .create_tenant(pb::CreateTenantRequest {
            id: "nok".into(),
            isolation: pb::Isolation::Vm as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("vm.kernel"), "{e:?}");
    let left = api
        .t
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert!(left.is_empty(), "{left:?}");
    assert!(!agent.dir.path().join("state/engines/nok").exists());
    assert!(!agent.dir.path().join("run/tenants/nok").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_cpu_burn_is_billed_to_the_tenant_as_the_vmm_cgroup_counts_it() {
    let test = "vm_cpu_burn_is_billed_to_the_tenant_as_the_vmm_cgroup_counts_it";
    let Some(agent) = vm_agent_with(test, |c| c.usage.window_secs = 1).await else {
        return;
    };
    let mut api = Api::vm(&agent).await;
    let usage = caas_proto::v1::usage_service_client::UsageServiceClient::new(agent.unix().await);
    api.tenant("b", None).await;
    let vmm_counter = std::path::Path::new("/sys/fs/cgroup/cpuacct")
        .join(&agent.slice)
        .join("tenant-b/vmm/cpuacct.usage");
    let vmm_seconds = || -> f64 {
        std::fs::read_to_string(&vmm_counter)
            .unwrap_or_else(|e| panic!("{}: {e}", vmm_counter.display()))
            .trim()
            .parse::<f64>()
            .unwrap()
            / 1e9
    };
    let billed = || {
        let mut u = usage.clone();
        async move {
            u.get_usage(pb::GetUsageRequest {
                tenant: "b".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .total
            .map_or(0.0, |t| t.cpu_seconds)
        }
    };
    // Readings on the meter's ticks: wait one out before each pair of readings.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (v0, b0) = (vmm_seconds(), billed().await);
    api.run(
        "b",
        "burn",
        "end=$(($(date +%s) + 4)); while [ $(date +%s) -lt $end ]; do :; done",
    )
    .await;
    assert_eq!(api.wait("b", "burn").await.exit_code, 0);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (v1, b1) = (vmm_seconds(), billed().await);
    let (vmm, bill) = (v1 - v0, b1 - b0);
    eprintln!(
        "measured: VM container burn of 4 s: VMM cgroup {vmm:.3} CPU-s, billed {bill:.3} CPU-s"
    );
    assert!(vmm > 3.0, "the burn did not show in the VMM cgroup: {vmm}");
    assert!(
        (bill - vmm).abs() <= vmm * 0.10,
        "billed {bill:.3} CPU-s, the VMM cgroup counted {vmm:.3}"
    );
    // Inspect shows both: the container's CPU time inside the guest, and its share of the VMM's
    // on the host (the guest's figure scaled to the host's).
    let c = api
        .c
        .inspect_container(pb::InspectContainerRequest {
            r#ref: cref("b", "burn"),
        })
        .await
        .unwrap()
        .into_inner();
    let u = c
        .vm_usage
        .expect("a VM container's inspect carries vm_usage");
    eprintln!(
        "measured: burn container: guest {:.3} CPU-s, its host share {:.3} CPU-s",
        u.guest_cpu_seconds, u.host_cpu_seconds
    );
    assert!(u.guest_cpu_seconds > 3.0, "{u:?}");
    assert!(
        u.host_cpu_seconds >= u.guest_cpu_seconds * 0.99 && u.host_cpu_seconds <= v1,
        "{u:?}; the VMM's whole CPU time is {v1:.3} s"
    );
    drop(usage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_cpu_quota_caps_a_busy_loop() {
    let Some(agent) = vm_agent("vm_cpu_quota_caps_a_busy_loop").await else {
        return;
    };
    let mut api = Api::vm(&agent).await;
    api.tenant("t", None).await;
    // The limits userns tenants get hold inside the guest too: half a CPU holds a busy loop to
    // about half a CPU, as the guest's cgroup counts it (inspect's vm_usage).
    let mut busy = api.req("t", "busy", "while :; do :; done");
    busy.resources = Some(pb::Resources {
        cpus: Some(0.5),
        ..Default::default()
    });
    api.run_req(busy).await;
    let mut c = api.c.clone();
    let read = || {
        let mut c = c.clone();
        async move {
            c.inspect_container(pb::InspectContainerRequest {
                r#ref: cref("t", "busy"),
            })
            .await
            .unwrap()
            .into_inner()
            .vm_usage
            .expect("vm_usage")
            .guest_cpu_seconds
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (u0, t0) = (read().await, std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (u1, t1) = (read().await, std::time::Instant::now());
    let cpus = (u1 - u0) / (t1 - t0).as_secs_f64();
    assert!(
        cpus > 0.3 && cpus < 0.6,
        "busy loop used {cpus:.3} CPUs under a 0.5 quota in the guest"
    );
    let _ = c
        .delete_container(pb::DeleteContainerRequest {
            r#ref: cref("t", "busy"),
            force: true,
        })
        .await;
}
