//! Typed, validated microVM configurations for the VMMs caas-agent can drive: QEMU's `microvm`
//! machine, Firecracker and Cloud Hypervisor.
//!
//! The agent reads the `[vm]` section of its config into a [`VmConfig`], fills in the paths that
//! differ per tenant (sockets, serial log, disks), then:
//! 1. [`VmConfig::prepare`] fills in defaults and checks every value against the named limits in
//!    [`limits`], touching nothing on the host;
//! 2. [`Prepared::validate_host`] checks the host: the kernel and disks exist, the VMM binary is
//!    installed, `/dev/kvm` opens where KVM is needed;
//! 3. [`Prepared::render`] gives the [`Launch`]: the argv, and the files to write first (the
//!    Firecracker JSON).
//!
//! Every error is a [`ConfigError`] that starts with the dotted field at fault:
//! `vm.memory_mib: 64 is below the minimum of 128`.
//!
//! # The `[vm]` section
//! `backend` picks the VMM; its own settings go in the section named like it (`[vm.qemu]`,
//! `[vm.firecracker]`, `[vm.cloud-hypervisor]`), and a section for another backend is an error.
//! Unknown keys are refused everywhere.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let text = r#"
//! [vm]
//! backend = "qemu"          # qemu | firecracker | cloud-hypervisor
//! vcpus = 1                 # default 1
//! memory_mib = 256          # default 256
//! kernel = "/var/lib/caas-agent/guest/vmlinux"
//! initrd = "/var/lib/caas-agent/guest/initrd.img"    # optional
//! ## cmdline = "..."         # default: the backend's, see Prepared::cmdline
//! serial = { file = "/run/caas-agent/vm/t1/serial.log" } # or "none" (default), { unix = "..." }
//! ## tap = "caas-t1"         # a host tap device as the guest's eth0
//!
//! [[vm.disks]]
//! path = "/var/lib/caas-agent/vm/t1/data.img"
//! read_only = false         # default false; format = "raw" is the only format
//!
//! [[vm.ports]]              # virtio-serial ports (QEMU only)
//! name = "caas.engine"
//! socket = "/run/caas-agent/vm/t1/engine.sock"
//!
//! ## [vm.vsock]              # Firecracker and Cloud Hypervisor instead of ports
//! ## cid = 3
//! ## socket = "/run/caas-agent/vm/t1/vsock.sock"
//!
//! [vm.qemu]
//! accel = "tcg"             # tcg (default) | kvm | auto
//! ## cpu = "max"             # default: host under kvm, else max
//! ## tb_size_mib = 512       # TCG translation cache
//! ## machine_options = ["rtc=on"]
//! qmp_socket = "/run/caas-agent/vm/t1/qmp.sock"
//! ## binary = "qemu-system-x86_64"
//!
//! ## [vm.firecracker]        binary, api_socket, config_file (required), log_path
//! ## [vm.cloud-hypervisor]   binary, api_socket
//! "#;
//! let mut file: toml::Table = toml::from_str(text)?;
//! let vm: vmm_config::VmConfig = file.remove("vm").ok_or("no [vm]")?.try_into()?;
//! let prepared = vm.prepare()?;
//! assert_eq!(prepared.accel(), vmm_config::Accel::Tcg);
//! let launch = prepared.render();
//! assert_eq!(launch.argv[0], "qemu-system-x86_64");
//! # Ok(())
//! # }
//! ```
//!
//! # Which backend can do what
//! | | QEMU `microvm` | Firecracker | Cloud Hypervisor |
//! |---|---|---|---|
//! | engine channel | virtio-serial port `caas.engine` | vsock | vsock |
//! | most vCPUs | [`limits::QEMU_MAX_VCPUS`] | [`limits::FIRECRACKER_MAX_VCPUS`] | [`limits::CLOUD_HYPERVISOR_MAX_VCPUS`] |
//! | serial | file, unix socket | file (via its stdout) | file, unix socket |
//! | accelerator | KVM, TCG, auto | KVM | KVM |

mod cloud_hypervisor;
mod config;
mod error;
mod firecracker;
mod host;
mod launch;
pub mod limits;
mod qemu;
#[cfg(test)]
mod testutil;
mod validate;

pub use cloud_hypervisor::{CloudHypervisor, DEFAULT_CLOUD_HYPERVISOR_BINARY};
pub use config::{Backend, BackendKind, Disk, DiskFormat, Port, Serial, VmConfig, Vsock};
pub use error::ConfigError;
pub use firecracker::{DEFAULT_FIRECRACKER_BINARY, Firecracker};
pub use launch::{EngineChannel, Launch, LaunchFile, Prepared};
pub use qemu::{Accel, DEFAULT_QEMU_BINARY, QemuMicrovm};
