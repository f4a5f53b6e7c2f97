//! Valid configurations for unit tests to break one field at a time.

use crate::{
    Accel, Backend, BackendKind, CloudHypervisor, ConfigError, Firecracker, Port, QemuMicrovm,
    VmConfig, Vsock, limits::ENGINE_PORT_NAME,
};

/// A valid QEMU VM under TCG with the engine port.
pub(crate) fn qemu_vm() -> VmConfig {
    let mut vm = VmConfig::new(
        Backend::Qemu(QemuMicrovm {
            accel: Accel::Tcg,
            ..QemuMicrovm::default()
        }),
        "/guest/vmlinux",
    );
    vm.ports.push(Port {
        name: ENGINE_PORT_NAME.into(),
        socket: "/run/vm/engine.sock".into(),
    });
    vm
}

/// A valid Firecracker VM with vsock.
pub(crate) fn firecracker_vm() -> VmConfig {
    let mut vm = VmConfig::new(
        Backend::Firecracker(Firecracker {
            config_file: Some("/run/vm/firecracker.json".into()),
            ..Firecracker::default()
        }),
        "/guest/vmlinux",
    );
    vm.vsock = Some(vsock());
    vm
}

/// A valid Cloud Hypervisor VM with vsock.
pub(crate) fn cloud_hypervisor_vm() -> VmConfig {
    let mut vm = VmConfig::new(
        Backend::CloudHypervisor(CloudHypervisor::default()),
        "/guest/vmlinux",
    );
    vm.vsock = Some(vsock());
    vm
}

/// A valid VM of each backend.
pub(crate) fn every_backend() -> Vec<VmConfig> {
    vec![qemu_vm(), firecracker_vm(), cloud_hypervisor_vm()]
}

/// A valid VM of the given backend.
pub(crate) fn vm_for(kind: BackendKind) -> VmConfig {
    match kind {
        BackendKind::Qemu => qemu_vm(),
        BackendKind::Firecracker => firecracker_vm(),
        BackendKind::CloudHypervisor => cloud_hypervisor_vm(),
    }
}

fn vsock() -> Vsock {
    Vsock {
        cid: 3,
        socket: "/run/vm/vsock.sock".into(),
    }
}

/// The error `prepare` gives, as text; panics if the config is accepted.
pub(crate) fn refusal(vm: VmConfig) -> String {
    match vm.prepare() {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e.to_string(),
    }
}

/// The error `prepare` gives; panics if the config is accepted.
pub(crate) fn refused(vm: VmConfig) -> ConfigError {
    match vm.prepare() {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e,
    }
}
