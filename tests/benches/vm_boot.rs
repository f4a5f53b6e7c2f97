//! VM tenant boot benchmark: how much the agent's initramfs and the guest engine add to a bare
//! guest boot, side by side in the same run, plus the VMM's memory beyond guest memory.
//!
//! Run as root from the workspace root, after `scripts/guest-kernel.sh` (the README's set-up runs
//! it):
//!
//! ```sh
//! cargo build --release --bins -p caas-agent
//! cargo bench -p caas-tests --bench vm_boot
//! ```
//!
//! Both contenders boot the same kernel with the same QEMU `microvm` options under the
//! accelerator that works on the machine (TCG here; see docs/design.md), in alternating order:
//! - bare: an initramfs whose /init is Debian's static busybox, which writes one line to the
//!   virtio-serial port and powers off: the guest's boot to init;
//! - agent: the agent's own initramfs; timed until the guest engine answers `Info` over the port
//!   (modules loaded, disk mounted, engine serving): engine-ready.
//!
//! Each time runs from spawning QEMU on the host to the first byte (bare) or answer (agent) on the
//! host side of the port. Then, through the agent's API: CreateTenant of a VM tenant until it is
//! Ready, and create+start+wait of `/bin/true` in it.

#![allow(clippy::unwrap_used)] // a benchmark harness: a failing setup step should stop it loudly

use std::{
    io::Read,
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use caas_agent::vm::initramfs::CpioWriter;
use caas_tests::{
    stats,
    vm::{self, Boot, Guest},
};

const ROUNDS: usize = 10;
const MEMORY_MIB: u32 = 256;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("vm_boot bench: needs root; skipped");
        return;
    }
    if let Err(e) = caas_tests::check_bench_agent_binary() {
        eprintln!("vm_boot bench: {e:#}");
        std::process::exit(1);
    }
    if !vm::vm_available("vm_boot bench") {
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// A minimal initramfs: static busybox as /init, which says "init" on the engine port and
/// powers off.
fn bare_initramfs(dir: &Path) -> std::path::PathBuf {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian busybox-static)");
    let path = dir.join("bare.cpio");
    let mut w = CpioWriter::new(std::io::BufWriter::new(
        std::fs::File::create(&path).unwrap(),
    ));
    for d in ["bin", "dev", "proc", "sys"] {
        w.dir(d, 0o755).unwrap();
    }
    w.char_device("dev/console", 0o600, 5, 1).unwrap();
    w.file("bin/busybox", 0o755, &busybox).unwrap();
    // The bare guest needs the same virtio modules to have a port at all.
    let order = caas_agent::vm::initramfs::module_order(
        &vm::guest_dir().join("modules"),
        &["virtio_mmio".to_string(), "virtio_console".to_string()],
    )
    .unwrap();
    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    let script = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t sysfs sysfs /sys\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         for m in {}; do /bin/busybox insmod /m/$m.ko; done\n\
         until echo init 2>/dev/null >/dev/vport0p1; do /bin/busybox usleep 5000; done\n\
         /bin/busybox poweroff -f\n",
        names.join(" ")
    );
    w.file("init", 0o755, script.as_bytes()).unwrap();
    w.dir("m", 0o755).unwrap();
    for (name, file) in order {
        w.file(
            &format!("m/{name}.ko"),
            0o644,
            &std::fs::read(file).unwrap(),
        )
        .unwrap();
    }
    w.finish().unwrap();
    path
}

/// Boots the bare guest; milliseconds until its init writes to the port.
fn bare_boot(dir: &Path, initrd: &Path) -> f64 {
    let mut g = Guest::boot(&Boot {
        dir,
        initrd,
        init_args: "rdinit=/init",
        disk: None,
        memory_mib: MEMORY_MIB,
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let ms = loop {
        assert!(
            Instant::now() < deadline,
            "bare guest: no word from init; console:\n{}",
            g.console_text()
        );
        if let Ok(mut s) = UnixStream::connect(&g.socket) {
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            let mut b = [0u8; 1];
            if s.read(&mut b).unwrap_or(0) == 1 {
                break g.started.elapsed().as_secs_f64() * 1000.0;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    g.wait_exit(Duration::from_secs(60)).unwrap();
    ms
}

/// The VMM's resident memory beyond the guest's RAM mapping (the anonymous mapping of exactly the
/// guest's size), in MiB, and its total RSS.
fn vmm_overhead_mib(pid: u32) -> (f64, f64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let guest_kib = u64::from(MEMORY_MIB) * 1024;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut in_guest = false;
    for l in smaps.lines() {
        if let Some(size) = l.strip_prefix("Size:") {
            let kib: u64 = size
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
            in_guest = kib == guest_kib;
        } else if let Some(rss) = l.strip_prefix("Rss:") {
            let kib: u64 = rss
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    #[allow(clippy::cast_precision_loss)]
    ((total - guest) as f64 / 1024.0, total as f64 / 1024.0)
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let bare = bare_initramfs(dir.path());
    let agent = vm::initramfs(&dir.path().join("cache")).unwrap();
    let (mut t_bare, mut t_agent, mut over, mut rss) = (vec![], vec![], vec![], vec![]);
    let disk = dir.path().join("disk.img");
    vm::make_disk(&disk, 256).unwrap();
    for round in 0..=ROUNDS {
        let order: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_bare in order {
            let d = tempfile::tempdir().unwrap();
            if is_bare {
                let ms = bare_boot(d.path(), &bare);
                if round > 0 {
                    t_bare.push(ms);
                }
            } else {
                let mut g = Guest::boot(&Boot {
                    dir: d.path(),
                    initrd: &agent.path,
                    init_args: "rdinit=/bin/caas-agent -- guest --tenant bench --id-start 1048576 --disk /dev/vda",
                    disk: Some(&disk),
                    memory_mib: MEMORY_MIB,
                })
                .unwrap();
                let (mut c, _) = g.engine(Duration::from_secs(120)).await.unwrap();
                let ms = g.started.elapsed().as_secs_f64() * 1000.0;
                let (o, r) = vmm_overhead_mib(g.child.id());
                c.shutdown(caas_proto::engine::v1::ShutdownRequest {
                    kill_containers: true,
                })
                .await
                .unwrap();
                g.wait_exit(Duration::from_secs(60)).unwrap();
                if round > 0 {
                    t_agent.push(ms);
                    over.push(o);
                    rss.push(r);
                }
            }
        }
        eprintln!("round {round}/{ROUNDS} done");
    }
    let api = through_the_api().await;
    let (b, a, o, r) = (stats(t_bare), stats(t_agent), stats(over), stats(rss));
    println!();
    println!(
        "{ROUNDS} rounds after 1 warm-up, alternating order; QEMU microvm, accel tcg, 1 vCPU, {MEMORY_MIB} MiB; {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "initramfs: agent {:.1} MiB ({} modules), bare busybox {:.1} MiB",
        agent.bytes as f64 / 1048576.0,
        agent.modules.len(),
        std::fs::metadata(&bare).unwrap().len() as f64 / 1048576.0
    );
    println!("{:-<78}", "");
    println!(
        "{:<52}{:>9}{:>9}{:>8}",
        "ms from spawning the VMM", "median", "p90", "min"
    );
    println!(
        "{:<52}{:>9.0}{:>9.0}{:>8.0}",
        "bare guest: boot to init (busybox writes the port)", b.median, b.p90, b.min
    );
    println!(
        "{:<52}{:>9.0}{:>9.0}{:>8.0}",
        "agent guest: engine ready (answers Info)", a.median, a.p90, a.min
    );
    println!(
        "{:<52}{:>8.2}x",
        "ratio engine-ready / bare boot to init (goal <= 1.5)",
        a.median / b.median
    );
    println!("{:-<78}", "");
    println!(
        "{:<52}{:>9.1}{:>9.1}{:>8.1}",
        "VMM RSS beyond guest RAM at engine ready, MiB", o.median, o.p90, o.min
    );
    println!(
        "{:<52}{:>9.1}{:>9.1}{:>8.1}",
        "VMM RSS total at engine ready, MiB", r.median, r.p90, r.min
    );
    println!("{:-<78}", "");
    println!("through the agent's gRPC API (in-process agent), ms");
    let ct = stats(&api.create_tenant_ms);
    println!(
        "{:<52}{:>9.0}{:>9.0}{:>8.0}",
        "CreateTenant (isolation vm) until it returns Ready", ct.median, ct.p90, ct.min
    );
    println!(
        "{:<52}{:>9.0}",
        "first container: create (rootfs sent into the guest)", api.first_create_ms
    );
    let l = stats(api.lifecycle_ms);
    println!(
        "{:<52}{:>9.1}{:>9.1}{:>8.1}",
        "create+start+wait of /bin/true in the VM tenant", l.median, l.p90, l.min
    );
}

struct ApiResults {
    create_tenant_ms: Vec<f64>,
    first_create_ms: f64,
    lifecycle_ms: Vec<f64>,
}

/// A VM tenant through the agent: CreateTenant until Ready, then ROUNDS lifecycles of /bin/true
/// (after one that also sends the root filesystem into the guest).
async fn through_the_api() -> ApiResults {
    use caas_proto::v1::{
        self as pb, container_service_client::ContainerServiceClient,
        tenant_service_client::TenantServiceClient,
    };
    let agent = caas_tests::TestAgent::start(vm::configure).await.unwrap();
    let ch = agent.unix().await;
    let mut tenants = TenantServiceClient::new(ch.clone());
    let mut containers = ContainerServiceClient::new(ch);
    let rootfs = caas_tests::busybox_rootfs(agent.dir.path());
    // CreateTenant until Ready, ROUNDS times (each tenant deleted again), then one to keep.
    let mut create_tenant_ms = Vec::new();
    for i in 0..=ROUNDS {
        let id = if i == ROUNDS {
            "bench".to_string()
        } else {
            format!("boot{i}")
        };
        let t0 = Instant::now();
        let t = tenants
            .create_tenant(pb::CreateTenantRequest {
                id: id.clone(),
                isolation: pb::Isolation::Vm as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(t.state, pb::TenantState::Ready as i32);
        if i < ROUNDS {
            create_tenant_ms.push(ms);
            tenants
                .delete_tenant(pb::DeleteTenantRequest { id, force: true })
                .await
                .unwrap();
        }
    }
    let cref = |n: &str| caas_tests::calls::cref("bench", n);
    let (mut first_create_ms, mut lifecycle_ms) = (0.0, Vec::new());
    for i in 0..=ROUNDS {
        let name = format!("c{i}");
        let t0 = Instant::now();
        containers
            .create_container(pb::CreateContainerRequest {
                tenant: "bench".into(),
                name: name.clone(),
                rootfs_path: rootfs.display().to_string(),
                command: vec!["/bin/true".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        if i == 0 {
            first_create_ms = t0.elapsed().as_secs_f64() * 1000.0;
        }
        containers
            .start_container(pb::StartContainerRequest { r#ref: cref(&name) })
            .await
            .unwrap();
        let w = caas_tests::calls::wait(&mut containers, "bench", &name).await;
        assert_eq!(w.exit_code, 0);
        if i > 0 {
            lifecycle_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        containers
            .delete_container(pb::DeleteContainerRequest {
                r#ref: cref(&name),
                force: true,
            })
            .await
            .unwrap();
    }
    tenants
        .delete_tenant(pb::DeleteTenantRequest {
            id: "bench".into(),
            force: true,
        })
        .await
        .unwrap();
    ApiResults {
        create_tenant_ms,
        first_create_ms,
        lifecycle_ms,
    }
}
