//! VM tenants: a guest booted from the agent's own initramfs runs the tenant engine, which answers
//! the engine protocol over a virtio-serial port, keeps its state on the tenant's disk, and powers
//! the guest off when told to shut down.
//!
//! These boot real VMs under software emulation (TCG; see docs/design.md), so there are few of
//! them and each shares one boot across its checks.

use std::time::Duration;

use caas_proto::engine::v1 as epb;
use caas_tests::vm::{self, Boot, Guest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_engine_serves_over_virtio_serial_and_powers_off_on_shutdown() {
    let test = "guest_engine_serves_over_virtio_serial_and_powers_off_on_shutdown";
    if !vm::vm_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = vm::initramfs(&dir.path().join("cache")).unwrap();
    let disk = dir.path().join("disk.img");
    vm::make_disk(&disk, 256).unwrap();

    let boot = |dir| {
        Guest::boot(&Boot {
            dir,
            initrd: &initrd.path,
            init_args: "rdinit=/bin/caas-agent -- guest --tenant vmt --id-start 1048576 --disk /dev/vda",
            disk: Some(&disk),
            memory_mib: 256,
        })
    };
    let mut g = boot(dir.path()).unwrap();
    let (mut c, info) = g.engine(Duration::from_secs(90)).await.unwrap();
    assert_eq!(info.tenant, "vmt");
    assert_eq!(info.containers, 0);
    let console = g.console_text();
    eprintln!("guest console:\n{console}");
    assert!(console.contains(caas_agent::guest::READY_LINE), "{console}");
    assert!(console.contains("state on disk"), "{console}");

    // A second connection right after the first goes away: the relay serves the host again (an
    // agent restart, a channel that dials again). The handshake lets the guest tell the two
    // apart even when it never sees the port disconnected in between; without it this waited
    // for the keepalive to give up on the first (20 s).
    drop(c);
    let (c2, info2) = g.engine(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        info2.pid, info.pid,
        "the same engine answers the new connection"
    );
    c = c2;

    c.shutdown(epb::ShutdownRequest {
        kill_containers: true,
    })
    .await
    .unwrap();
    let st = g.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(st.success(), "qemu: {st}; console:\n{}", g.console_text());
    assert!(
        g.console_text().contains("powering off"),
        "{}",
        g.console_text()
    );

    // The disk was unmounted cleanly: the same disk boots again.
    let dir2 = tempfile::tempdir().unwrap();
    let mut g2 = boot(dir2.path()).unwrap();
    let (_c, info3) = g2.engine(Duration::from_secs(90)).await.unwrap();
    assert_eq!(info3.tenant, "vmt");
    drop(g2);
}

/// The `[vm]` part of an agent config for the tests: QEMU microvm under TCG with the guest
/// kernel of scripts/guest-kernel.sh (it continues the `[tenants]` section
/// `write_agent_config` opens).
fn vm_config() -> String {
    let g = vm::guest_dir();
    format!(
        "vm_modules_dir = \"{}\"\nvm_disk_mib = 256\n[vm]\nbackend = \"qemu\"\nvcpus = 1\nmemory_mib = 256\nkernel = \"{}\"\n[vm.qemu]\naccel = \"tcg\"\n",
        g.join("modules").display(),
        g.join("vmlinux").display()
    )
}

fn pid_in(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_tenant_boots_survives_an_agent_kill_is_restarted_after_a_vmm_kill_and_leaves_nothing()
{
    use caas_proto::v1::{
        self as pb, container_service_client::ContainerServiceClient,
        tenant_service_client::TenantServiceClient,
    };
    let test =
        "a_vm_tenant_boots_survives_an_agent_kill_is_restarted_after_a_vmm_kill_and_leaves_nothing";
    if !vm::vm_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let slice = caas_tests::unique_slice();
    let cfg = caas_tests::write_agent_config(dir.path(), &slice, &vm_config());
    let socket = dir.path().join("run/agent.sock");
    let mut agent = caas_tests::AgentProcess::spawn(&cfg, &socket, &dir.path().join("agent.log"))
        .await
        .unwrap();
    let ch = caas_agent::client::connect(&caas_agent::client::Target::Unix(socket.clone()))
        .await
        .unwrap();
    let mut tenants = TenantServiceClient::new(ch.clone());

    // Too little memory for the VM: refused, naming the field, and nothing is made.
    let e = tenants
        .create_tenant(pb::CreateTenantRequest {
            id: "small".into(),
            isolation: pb::Isolation::Vm as i32,
            quotas: Some(pb::Quotas {
                memory_bytes: Some(256 << 20),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("quotas.memory_bytes"), "{e:?}");
    assert!(!dir.path().join("state/engines/small").exists());

    let t = tenants
        .create_tenant(pb::CreateTenantRequest {
            id: "vmt".into(),
            isolation: pb::Isolation::Vm as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.state, pb::TenantState::Ready as i32, "{t:?}");
    assert_eq!(t.isolation, pb::Isolation::Vm as i32);
    let pid_file = dir.path().join("run/tenants/vmt/vmm.pid");
    let vmm = pid_in(&pid_file).expect("vmm.pid");
    // The VMM runs in the tenant's cgroup, so the host meter bills the whole VM.
    let cg = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    assert!(
        cg.lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&format!("/{slice}/tenant-vmt/vmm"))),
        "{cg}"
    );
    let mut containers = ContainerServiceClient::new(ch.clone());
    let list = |c: &mut ContainerServiceClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            c.list_containers(pb::ListContainersRequest {
                tenant: "vmt".into(),
                ..Default::default()
            })
            .await
        }
    };
    assert!(
        list(&mut containers)
            .await
            .unwrap()
            .into_inner()
            .containers
            .is_empty()
    );

    // kill -9 of the agent leaves the VM running; a new agent finds it.
    agent.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    agent.wait_for_exit(Duration::from_secs(10)).await.unwrap();
    assert!(alive(vmm), "the VM died with the agent");
    let mut agent = caas_tests::AgentProcess::spawn(&cfg, &socket, &dir.path().join("agent2.log"))
        .await
        .unwrap();
    let ch = caas_agent::client::connect(&caas_agent::client::Target::Unix(socket.clone()))
        .await
        .unwrap();
    let mut tenants = TenantServiceClient::new(ch.clone());
    let mut containers = ContainerServiceClient::new(ch.clone());
    let t = tenants
        .get_tenant(pb::GetTenantRequest { id: "vmt".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        t.state,
        pb::TenantState::Ready as i32,
        "{t:?}\n{}\nconsole:\n{}",
        agent.log_text(),
        std::fs::read_to_string(dir.path().join("state/engines/vmt/console.log"))
            .unwrap_or_default()
    );
    assert_eq!(
        pid_in(&pid_file),
        Some(vmm),
        "the new agent booted another VM"
    );
    assert!(list(&mut containers).await.is_ok());

    // kill -9 of the VMM: the tenant is reported failed, the VM is booted again, and the
    // container that ran in it is reported exited (vm crashed).
    let rootfs = caas_tests::busybox_rootfs(dir.path());
    containers
        .create_container(pb::CreateContainerRequest {
            tenant: "vmt".into(),
            name: "long".into(),
            rootfs_path: rootfs.display().to_string(),
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    containers
        .start_container(pb::StartContainerRequest {
            r#ref: caas_tests::calls::cref("vmt", "long"),
        })
        .await
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (mut saw_failed, mut ready) = (false, false);
    for _ in 0..1200 {
        let t = tenants
            .get_tenant(pb::GetTenantRequest { id: "vmt".into() })
            .await
            .unwrap()
            .into_inner();
        if t.state == pb::TenantState::Failed as i32 {
            assert!(t.message.contains("crashed"), "{t:?}");
            saw_failed = true;
        }
        if saw_failed && t.state == pb::TenantState::Ready as i32 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        saw_failed && ready,
        "failed seen: {saw_failed}, ready again: {ready}\n{}",
        agent.log_text()
    );
    let vmm2 = pid_in(&pid_file).expect("vmm.pid after the restart");
    assert_ne!(vmm2, vmm);
    assert!(alive(vmm2));
    let long = containers
        .inspect_container(pb::InspectContainerRequest {
            r#ref: caas_tests::calls::cref("vmt", "long"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(long.state, pb::ContainerState::Exited as i32, "{long:?}");
    assert!(long.message.contains("vm crashed"), "{long:?}");
    assert!(list(&mut containers).await.is_ok());

    // A tenant whose VMM died is deleted without booting it again, and without a hang (the
    // delete holds the tenant's lock; finding the engine must not take it again).
    tenants
        .create_tenant(pb::CreateTenantRequest {
            id: "vmd".into(),
            isolation: pb::Isolation::Vm as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let dead = pid_in(&dir.path().join("run/tenants/vmd/vmm.pid")).expect("vmd's vmm.pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dead),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while alive(dead) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        tenants.delete_tenant(pb::DeleteTenantRequest {
            id: "vmd".into(),
            force: false,
        }),
    )
    .await
    .expect("deleting a tenant whose VMM died hung")
    .unwrap();
    assert!(pid_in(&dir.path().join("run/tenants/vmd/vmm.pid")).is_none());
    for p in ["run/tenants/vmd", "state/engines/vmd"] {
        assert!(!dir.path().join(p).exists(), "{p} is left");
    }

    // Deleting the tenant shuts the VM down and leaves nothing: no VMM, no sockets, no disk,
    // no cgroup.
    tenants
        .delete_tenant(pb::DeleteTenantRequest {
            id: "vmt".into(),
            force: true,
        })
        .await
        .unwrap();
    assert!(!alive(vmm2), "the VMM outlived its tenant");
    for p in ["run/tenants/vmt", "state/engines/vmt"] {
        assert!(!dir.path().join(p).exists(), "{p} is left");
    }
    for h in ["memory", "cpu", "pids"] {
        let d = std::path::Path::new("/sys/fs/cgroup")
            .join(h)
            .join(&slice)
            .join("tenant-vmt");
        assert!(!d.exists(), "{} is left", d.display());
    }
    agent.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    agent.wait_for_exit(Duration::from_secs(30)).await.unwrap();
    caas_tests::cleanup_tenants(&socket, &slice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accelerator_is_what_really_boots_and_tcg_is_announced() {
    use caas_proto::v1::{self as pb, node_service_client::NodeServiceClient};
    let test = "the_accelerator_is_what_really_boots_and_tcg_is_announced";
    if !vm::vm_available(test) {
        return;
    }
    // accel = "auto": the agent boots a probe guest under KVM at start-up and keeps KVM only if
    // it reached its init. On machines whose /dev/kvm cannot run an unmodified guest (PVM), that
    // is TCG, announced as a warning.
    let agent = caas_tests::TestAgent::start(|c| {
        vm::configure(c);
        if let Some(vmm_config::Backend::Qemu(q)) = c.vm.as_mut().map(|v| &mut v.backend) {
            q.accel = vmm_config::Accel::Auto;
        }
    })
    .await
    .unwrap();
    let info = NodeServiceClient::new(agent.unix().await)
        .get_node_info(pb::GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let tcg_warning = info
        .warnings
        .iter()
        .any(|w| w.contains("software emulation (TCG)"));
    match info.vm_accelerator.as_str() {
        "kvm" => assert!(!tcg_warning, "{info:?}"),
        "tcg" => assert!(tcg_warning, "{info:?}"),
        other => panic!("vm_accelerator {other:?}: {info:?}"),
    }
    eprintln!(
        "measured: accelerator here: {} ({:?})",
        info.vm_accelerator, info.warnings
    );
    // Whatever it chose, a VM tenant boots on it.
    let t = caas_proto::v1::tenant_service_client::TenantServiceClient::new(agent.unix().await)
        .create_tenant(pb::CreateTenantRequest {
            id: "acc".into(),
            isolation: pb::Isolation::Vm as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.state, pb::TenantState::Ready as i32, "{t:?}");
}
