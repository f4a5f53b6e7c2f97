//! Unit tests of the pure validation, one rule at a time.

use std::path::PathBuf;

use super::*;
use crate::{
    Accel, Disk, DiskFormat, Port, Vsock,
    limits::{DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, ENGINE_PORT_NAME},
    testutil::{
        cloud_hypervisor_vm, every_backend, firecracker_vm, qemu_vm, refusal, refused, vm_for,
    },
};

fn qemu(vm: &mut VmConfig) -> &mut crate::QemuMicrovm {
    match &mut vm.backend {
        Backend::Qemu(q) => q,
        other => panic!("not qemu: {other:?}"),
    }
}

fn disk(path: &str) -> Disk {
    Disk {
        path: path.into(),
        read_only: false,
        format: DiskFormat::Raw,
    }
}

#[test]
fn the_test_configs_are_valid() {
    for vm in every_backend() {
        vm.prepare().unwrap();
    }
}

#[test]
fn defaults_are_filled_in() {
    let p = qemu_vm().prepare().unwrap();
    let vm = p.config();
    assert_eq!(
        (vm.vcpus, vm.memory_mib),
        (DEFAULT_VCPUS, DEFAULT_MEMORY_MIB)
    );
    assert_eq!(
        vm.cmdline.as_deref(),
        Some("console=ttyS0 panic=-1 tsc_early_khz=2400000 no_timer_check quiet")
    );
    assert_eq!(p.cmdline(), vm.cmdline.as_deref().unwrap());
    let Backend::Qemu(q) = &vm.backend else {
        panic!("not qemu")
    };
    assert_eq!(q.cpu.as_deref(), Some("max"));
    assert_eq!(q.binary, PathBuf::from("qemu-system-x86_64"));

    let mut kvm = qemu_vm();
    qemu(&mut kvm).accel = Accel::Kvm;
    let p = kvm.prepare().unwrap();
    assert_eq!(p.cmdline(), "console=ttyS0 panic=-1 quiet");
    let Backend::Qemu(q) = &p.config().backend else {
        panic!("not qemu")
    };
    assert_eq!(q.cpu.as_deref(), Some("host"));
    assert_eq!(p.accel(), Accel::Kvm);

    let p = firecracker_vm().prepare().unwrap();
    assert_eq!(p.cmdline(), "console=ttyS0 reboot=k panic=-1 pci=off quiet");
    assert_eq!(p.accel(), Accel::Kvm);
    let p = cloud_hypervisor_vm().prepare().unwrap();
    assert_eq!(p.cmdline(), "console=ttyS0 panic=-1 quiet");
}

#[test]
fn a_given_cmdline_and_cpu_are_kept() {
    let mut vm = qemu_vm();
    vm.cmdline = Some("console=hvc0".into());
    qemu(&mut vm).cpu = Some("Skylake-Server".into());
    let p = vm.prepare().unwrap();
    assert_eq!(p.cmdline(), "console=hvc0");
    let Backend::Qemu(q) = &p.config().backend else {
        panic!("not qemu")
    };
    assert_eq!(q.cpu_model(), "Skylake-Server");
}

#[test]
fn memory_out_of_range_is_refused() {
    let mut vm = qemu_vm();
    vm.memory_mib = 64;
    assert_eq!(refusal(vm), "vm.memory_mib: 64 is below the minimum of 128");
    let mut vm = qemu_vm();
    vm.memory_mib = MIN_MEMORY_MIB;
    vm.prepare().unwrap();
    let mut vm = qemu_vm();
    vm.memory_mib = MAX_MEMORY_MIB + 1;
    assert_eq!(
        refusal(vm),
        "vm.memory_mib: 1048577 is above the maximum of 1048576"
    );
}

#[test]
fn vcpus_are_checked_against_the_backends_own_maximum() {
    for kind in [
        BackendKind::Qemu,
        BackendKind::Firecracker,
        BackendKind::CloudHypervisor,
    ] {
        let mut vm = vm_for(kind);
        vm.vcpus = 0;
        assert_eq!(refusal(vm), "vm.vcpus: 0 is below the minimum of 1");
    }
    let mut vm = firecracker_vm();
    vm.vcpus = FIRECRACKER_MAX_VCPUS;
    vm.prepare().unwrap();
    let mut vm = firecracker_vm();
    vm.vcpus = FIRECRACKER_MAX_VCPUS + 1;
    assert_eq!(
        refusal(vm),
        "vm.vcpus: 33 is above the maximum of 32 for firecracker"
    );
    // What Firecracker refuses, QEMU takes, up to its own ceiling.
    let mut vm = qemu_vm();
    vm.vcpus = FIRECRACKER_MAX_VCPUS + 1;
    vm.prepare().unwrap();
    let mut vm = qemu_vm();
    vm.vcpus = QEMU_MAX_VCPUS + 1;
    assert_eq!(
        refusal(vm),
        "vm.vcpus: 255 is above the maximum of 254 for qemu"
    );
    let mut vm = cloud_hypervisor_vm();
    vm.vcpus = CLOUD_HYPERVISOR_MAX_VCPUS + 1;
    assert!(refusal(vm).ends_with("for cloud-hypervisor"));
}

#[test]
fn a_cmdline_too_long_for_the_kernel_is_refused() {
    let mut vm = qemu_vm();
    vm.cmdline = Some("a".repeat(MAX_CMDLINE_LEN));
    vm.prepare().unwrap();
    let mut vm = qemu_vm();
    vm.cmdline = Some("a".repeat(MAX_CMDLINE_LEN + 1));
    assert_eq!(
        refusal(vm),
        "vm.cmdline: 1536 bytes is more than the maximum of 1535"
    );
    let mut vm = qemu_vm();
    vm.cmdline = Some("console=ttyS0\nquiet".into());
    assert!(refusal(vm).starts_with("vm.cmdline: \"console=ttyS0\\nquiet\" may only hold"));
}

#[test]
fn paths_must_be_absolute_normal_and_utf8() {
    let cases: [(&str, &str); 5] = [
        ("vmlinux", "is not absolute"),
        ("", "is empty"),
        ("/guest/../etc/vmlinux", "has a . or .. component"),
        ("/guest/./vmlinux", "has a . or .. component"),
        ("/guest/vmlinux/", "ends with /"),
    ];
    for (path, problem) in cases {
        let mut vm = qemu_vm();
        vm.kernel = path.into();
        assert_eq!(refusal(vm), format!("vm.kernel: {path:?} {problem}"));
    }
    let mut vm = qemu_vm();
    vm.initrd = Some("/guest/init\u{7}rd".into());
    assert!(refusal(vm).ends_with("contains a control character"));
    let mut vm = qemu_vm();
    vm.kernel = PathBuf::from(format!("/{}", "k".repeat(MAX_PATH_LEN)));
    assert_eq!(
        refusal(vm),
        "vm.kernel: 4096 bytes is more than the maximum of 4095"
    );
    {
        use std::os::unix::ffi::OsStrExt;
        let mut vm = qemu_vm();
        vm.kernel = std::ffi::OsStr::from_bytes(b"/guest/\xffvmlinux").into();
        assert!(refusal(vm).ends_with("is not valid UTF-8"));
    }
}

#[test]
fn socket_paths_must_fit_sun_path() {
    let mut vm = qemu_vm();
    vm.ports[0].socket = PathBuf::from(format!("/{}", "s".repeat(MAX_UNIX_SOCKET_PATH_LEN)));
    assert_eq!(
        refusal(vm),
        "vm.ports[0].socket: 108 bytes (a unix socket path) is more than the maximum of 107"
    );
}

#[test]
fn port_names_are_an_allowlist_without_commas() {
    for name in [
        "caas,engine",
        "a=b",
        "",
        ".hidden",
        "-x",
        "a/b",
        "name with space",
        "..",
    ] {
        let mut vm = qemu_vm();
        vm.ports.push(Port {
            name: name.into(),
            socket: "/run/vm/other.sock".into(),
        });
        let e = refused(vm);
        assert!(
            matches!(&e, ConfigError::BadValue { field, .. } if field == "vm.ports[1].name"),
            "{name:?}: {e}"
        );
    }
    let mut vm = qemu_vm();
    vm.ports.push(Port {
        name: "x".repeat(MAX_PORT_NAME_LEN + 1),
        socket: "/run/vm/other.sock".into(),
    });
    assert!(refusal(vm).starts_with("vm.ports[1].name: 65 bytes"));
}

#[test]
fn duplicate_port_names_and_shared_paths_are_refused() {
    let mut vm = qemu_vm();
    vm.ports.push(Port {
        name: ENGINE_PORT_NAME.into(),
        socket: "/run/vm/other.sock".into(),
    });
    assert_eq!(
        refusal(vm),
        "vm.ports[1].name: caas.engine is also used by vm.ports[0].name"
    );
    let mut vm = qemu_vm();
    vm.serial = Serial::Unix("/run/vm/engine.sock".into());
    assert_eq!(
        refusal(vm),
        "vm.ports[0].socket: /run/vm/engine.sock is also used by vm.serial.unix"
    );
    let mut vm = qemu_vm();
    vm.disks = vec![disk("/srv/d.img"), disk("/srv/d.img")];
    assert_eq!(
        refusal(vm),
        "vm.disks[1].path: /srv/d.img is also used by vm.disks[0].path"
    );
}

#[test]
fn list_lengths_are_capped() {
    let mut vm = qemu_vm();
    vm.disks = (0..=MAX_DISKS)
        .map(|i| disk(&format!("/srv/{i}.img")))
        .collect();
    assert_eq!(
        refusal(vm),
        "vm.disks: 7 entries is more than the maximum of 6"
    );
    let mut vm = qemu_vm();
    vm.ports = (0..=MAX_PORTS)
        .map(|i| Port {
            name: format!("p{i}"),
            socket: format!("/run/vm/p{i}.sock").into(),
        })
        .collect();
    assert!(refusal(vm).starts_with("vm.ports: 17 entries"));
}

#[test]
fn the_engine_channel_is_required() {
    let mut vm = qemu_vm();
    vm.ports[0].name = "other".into();
    assert_eq!(
        refusal(vm),
        "vm.ports: required (a port named \"caas.engine\", the agent's channel to the guest \
         engine)"
    );
    for mut vm in [firecracker_vm(), cloud_hypervisor_vm()] {
        vm.vsock = None;
        assert!(refusal(vm).starts_with("vm.vsock: required"));
    }
}

#[test]
fn ports_are_refused_where_there_is_no_virtio_serial() {
    for (mut vm, name) in [
        (firecracker_vm(), "firecracker"),
        (cloud_hypervisor_vm(), "cloud-hypervisor"),
    ] {
        vm.ports.push(Port {
            name: ENGINE_PORT_NAME.into(),
            socket: "/run/vm/engine.sock".into(),
        });
        assert_eq!(
            refusal(vm),
            format!(
                "vm.ports: not available with backend {name}: it has no virtio-serial; use \
                 vm.vsock"
            )
        );
    }
}

#[test]
fn vsock_cid_and_tap_name_are_checked() {
    let mut vm = firecracker_vm();
    vm.vsock = Some(Vsock {
        cid: 2,
        socket: "/run/vm/vsock.sock".into(),
    });
    assert_eq!(refusal(vm), "vm.vsock.cid: 2 is below the minimum of 3");
    let mut vm = firecracker_vm();
    vm.vsock.as_mut().unwrap().cid = u32::MAX;
    assert!(refusal(vm).starts_with("vm.vsock.cid: 4294967295 is above"));
    let mut vm = qemu_vm();
    vm.vsock = Some(Vsock {
        cid: 3,
        socket: "/run/vm/vsock.sock".into(),
    });
    assert!(refusal(vm).starts_with("vm.vsock: not available with backend qemu"));

    let mut vm = qemu_vm();
    vm.tap = Some("tap-with-a-long-name".into());
    assert_eq!(
        refusal(vm),
        "vm.tap: 20 bytes is more than the maximum of 15"
    );
    let mut vm = qemu_vm();
    vm.tap = Some("tap,0".into());
    assert!(refusal(vm).starts_with("vm.tap: \"tap,0\" may only hold"));
    let mut vm = qemu_vm();
    vm.tap = Some("caas-t1".into());
    vm.prepare().unwrap();
}

#[test]
fn binaries_are_names_or_absolute_paths() {
    let mut vm = qemu_vm();
    qemu(&mut vm).binary = "bin/qemu".into();
    assert_eq!(refusal(vm), "vm.qemu.binary: \"bin/qemu\" is not absolute");
    let mut vm = qemu_vm();
    qemu(&mut vm).binary = "/opt/qemu/bin/qemu-system-x86_64".into();
    vm.prepare().unwrap();
}
