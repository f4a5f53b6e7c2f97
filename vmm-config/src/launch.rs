//! A validated configuration ([`Prepared`]) and what launching it takes ([`Launch`]): the argv,
//! the files to write first, and where the VMM's stdout goes. Knows nothing of any one VMM; the
//! backend modules fill [`Launch`] in.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use crate::{
    Accel, Backend, BackendKind, ConfigError, VmConfig,
    limits::{ENGINE_PORT_NAME, ENGINE_VSOCK_PORT},
};

/// A configuration with its defaults filled in and every value checked; made by
/// [`VmConfig::prepare`].
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    vm: VmConfig,
    cmdline: String,
    engine: EngineChannel,
}

/// How the agent reaches the tenant engine inside the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineChannel {
    /// The virtio-serial port [`ENGINE_PORT_NAME`]; the VMM listens on `socket` (QEMU).
    VirtioSerial {
        /// The host unix socket to connect to.
        socket: PathBuf,
    },
    /// Hybrid vsock: connect to `socket`, write `CONNECT <port>\n`, read `OK <n>\n`, then the
    /// stream is the guest's (Firecracker, Cloud Hypervisor).
    Vsock {
        /// The host unix socket to connect to.
        socket: PathBuf,
        /// The guest's context id.
        cid: u32,
        /// The guest port the engine listens on ([`ENGINE_VSOCK_PORT`]).
        port: u32,
    },
}

/// What starting the VMM takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The program (`argv[0]`, a name to look up on `PATH` or an absolute path) and its
    /// arguments.
    pub argv: Vec<OsString>,
    /// Files to write (replacing what is there) before starting it.
    pub files: Vec<LaunchFile>,
    /// Where the VMM's stdout should go, when it carries the guest console (Firecracker writes
    /// the serial port to its stdout). `None`: the VMM's stdout carries nothing of the guest.
    pub stdout: Option<PathBuf>,
}

/// A file to write before the VMM starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchFile {
    /// Where.
    pub path: PathBuf,
    /// What.
    pub contents: Vec<u8>,
}

impl Prepared {
    pub(crate) fn new(vm: VmConfig) -> Result<Self, ConfigError> {
        let engine = engine_channel(&vm)?;
        let cmdline = vm.cmdline.clone().unwrap_or_else(|| vm.default_cmdline());
        Ok(Self {
            vm,
            cmdline,
            engine,
        })
    }

    /// The configuration, defaults filled in.
    pub fn config(&self) -> &VmConfig {
        &self.vm
    }

    /// Which VMM runs it.
    pub fn backend(&self) -> BackendKind {
        self.vm.backend.kind()
    }

    /// How guest code runs: QEMU's setting, and KVM for Firecracker and Cloud Hypervisor (which
    /// have nothing else). Under [`Accel::Auto`] QEMU decides at start.
    pub fn accel(&self) -> Accel {
        match &self.vm.backend {
            Backend::Qemu(q) => q.accel,
            Backend::Firecracker(_) | Backend::CloudHypervisor(_) => Accel::Kvm,
        }
    }

    /// The kernel command line the guest gets: `vm.cmdline`, or the backend's default:
    /// - QEMU under TCG or auto: `console=ttyS0 panic=-1 tsc_early_khz=2400000 no_timer_check
    ///   quiet` (without the TSC hint a TCG guest randomly hangs at "Marking TSC unstable");
    /// - QEMU under KVM and Cloud Hypervisor: `console=ttyS0 panic=-1 quiet`;
    /// - Firecracker: `console=ttyS0 reboot=k panic=-1 pci=off quiet` (Firecracker exits on the
    ///   keyboard-controller reset `reboot=k` asks for, and has no PCI bus).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// How the agent reaches the guest engine.
    pub fn engine_channel(&self) -> &EngineChannel {
        &self.engine
    }

    /// The argv and files that start this VM.
    pub fn render(&self) -> Launch {
        match &self.vm.backend {
            Backend::Qemu(q) => q.render(&self.vm, &self.cmdline),
            Backend::Firecracker(f) => f.render(&self.vm, &self.cmdline),
            Backend::CloudHypervisor(c) => c.render(&self.vm, &self.cmdline),
        }
    }
}

/// The engine channel is what the agent needs from every VM, so a VM without one is refused.
fn engine_channel(vm: &VmConfig) -> Result<EngineChannel, ConfigError> {
    match vm.backend.kind() {
        BackendKind::Qemu => vm
            .ports
            .iter()
            .find(|p| p.name == ENGINE_PORT_NAME)
            .map(|p| EngineChannel::VirtioSerial {
                socket: p.socket.clone(),
            })
            .ok_or(ConfigError::Missing {
                field: "vm.ports".into(),
                why: "a port named \"caas.engine\", the agent's channel to the guest engine",
            }),
        BackendKind::Firecracker | BackendKind::CloudHypervisor => vm
            .vsock
            .as_ref()
            .map(|v| EngineChannel::Vsock {
                socket: v.socket.clone(),
                cid: v.cid,
                port: ENGINE_VSOCK_PORT,
            })
            .ok_or(ConfigError::Missing {
                field: "vm.vsock".into(),
                why: "the agent's channel to the guest engine; this backend has no virtio-serial",
            }),
    }
}

/// An argv under construction.
pub(crate) struct Argv(Vec<OsString>);

impl Argv {
    pub(crate) fn new(program: &Path) -> Self {
        Self(vec![program.as_os_str().to_owned()])
    }

    pub(crate) fn push(&mut self, arg: impl Into<OsString>) {
        self.0.push(arg.into());
    }

    pub(crate) fn push2(&mut self, flag: &str, value: impl Into<OsString>) {
        self.0.push(flag.into());
        self.0.push(value.into());
    }

    pub(crate) fn into_vec(self) -> Vec<OsString> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cloud_hypervisor_vm, firecracker_vm, qemu_vm};

    #[test]
    fn the_engine_channel_follows_the_backend() {
        assert_eq!(
            qemu_vm().prepare().unwrap().engine_channel(),
            &EngineChannel::VirtioSerial {
                socket: "/run/vm/engine.sock".into()
            }
        );
        for vm in [firecracker_vm(), cloud_hypervisor_vm()] {
            assert_eq!(
                vm.prepare().unwrap().engine_channel(),
                &EngineChannel::Vsock {
                    socket: "/run/vm/vsock.sock".into(),
                    cid: 3,
                    port: ENGINE_VSOCK_PORT,
                }
            );
        }
    }

    #[test]
    fn the_default_cmdline_can_be_extended() {
        let mut vm = qemu_vm();
        vm.cmdline = Some(format!("{} rdinit=/init", vm.default_cmdline()));
        let p = vm.prepare().unwrap();
        assert_eq!(
            p.cmdline(),
            "console=ttyS0 panic=-1 tsc_early_khz=2400000 no_timer_check quiet rdinit=/init"
        );
        assert_eq!(p.backend(), BackendKind::Qemu);
    }
}
