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
            init_args: "rdinit=/bin/caas-agent -- guest --tenant vmt --id-start 1048576",
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

    // A second connection after the first goes away: the relay serves the host again (this is
    // what an agent restart does).
    drop(c);
    let (c2, info2) = g.engine(Duration::from_secs(30)).await.unwrap();
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
