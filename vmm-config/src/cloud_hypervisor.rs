//! Cloud Hypervisor: settings (`[vm.cloud-hypervisor]`), their checks, and the argv in its CLI
//! form (`--disk path=P,readonly=on`).
//!
//! Its option lists are split on commas outside `"..."` and `[...]`, and values are trimmed, with
//! no way to escape a quote. So a path that goes into such a list may not hold `,` `"` `[` `]` or
//! end in whitespace; we refuse those rather than quote, which would still leave `"` unwritable.
//! `--kernel`, `--initramfs` and `--cmdline` take their argument whole.
//!
//! Like Firecracker it has no virtio-serial: the engine channel is vsock over a host unix socket.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    BackendKind, ConfigError, Launch, Serial, VmConfig,
    launch::Argv,
    validate::{check_binary, check_socket_path},
};

/// The binary run when `vm.cloud-hypervisor.binary` is not set.
pub const DEFAULT_CLOUD_HYPERVISOR_BINARY: &str = "cloud-hypervisor";

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// `[vm.cloud-hypervisor]`: settings of Cloud Hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudHypervisor {
    /// The Cloud Hypervisor binary: a name looked up on `PATH` or an absolute path.
    pub binary: PathBuf,
    /// The HTTP API socket (`--api-socket path=`), for a clean shutdown (`vm.power-button`) and
    /// queries; no API when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
}

impl Default for CloudHypervisor {
    fn default() -> Self {
        Self {
            binary: PathBuf::from(DEFAULT_CLOUD_HYPERVISOR_BINARY),
            api_socket: None,
        }
    }
}

impl CloudHypervisor {
    pub(crate) fn fill_defaults(&mut self) {
        // Every default is in `Default`; nothing here depends on another choice.
    }

    pub(crate) fn default_cmdline(&self) -> String {
        CMDLINE.into()
    }

    pub(crate) fn validate(&self, vm: &VmConfig) -> Result<(), ConfigError> {
        check_binary("vm.cloud-hypervisor.binary", &self.binary)?;
        if let Some(p) = &self.api_socket {
            check_socket_path("vm.cloud-hypervisor.api_socket", p)?;
        }
        if !vm.ports.is_empty() {
            return Err(ConfigError::Unsupported {
                field: "vm.ports".into(),
                backend: BackendKind::CloudHypervisor,
                hint: "it has no virtio-serial; use vm.vsock",
            });
        }
        // Its argument parser would take a command line that starts with '-' for an option.
        if let Some(cmdline) = vm.cmdline.as_deref().filter(|c| c.starts_with('-')) {
            return Err(ConfigError::BadValue {
                field: "vm.cmdline".into(),
                value: cmdline.into(),
                problem: "may not start with '-' under cloud-hypervisor",
            });
        }
        for (field, path) in vm.device_paths() {
            check_option_value(&field, path)?;
        }
        Ok(())
    }

    pub(crate) fn paths(&self) -> Vec<(&'static str, &Path)> {
        self.api_socket
            .iter()
            .map(|p| ("vm.cloud-hypervisor.api_socket", p.as_path()))
            .collect()
    }

    pub(crate) fn render(&self, vm: &VmConfig, cmdline: &str) -> Launch {
        let mut a = Argv::new(&self.binary);
        if let Some(api) = &self.api_socket {
            a.push2("--api-socket", format!("path={}", api.display()));
        }
        a.push2("--kernel", &vm.kernel);
        if let Some(initrd) = &vm.initrd {
            a.push2("--initramfs", initrd);
        }
        a.push2("--cmdline", cmdline);
        a.push2("--cpus", format!("boot={}", vm.vcpus));
        a.push2("--memory", format!("size={}M", vm.memory_mib));
        for disk in &vm.disks {
            let ro = if disk.read_only { ",readonly=on" } else { "" };
            a.push2("--disk", format!("path={}{ro}", disk.path.display()));
        }
        let serial = match &vm.serial {
            Serial::None => "off".to_string(),
            Serial::File(p) => format!("file={}", p.display()),
            Serial::Unix(p) => format!("socket={}", p.display()),
        };
        a.push2("--serial", serial);
        // The virtio console defaults to the VMM's tty; the guest uses ttyS0 only.
        a.push2("--console", "off");
        if let Some(v) = &vm.vsock {
            a.push2(
                "--vsock",
                format!("cid={},socket={}", v.cid, v.socket.display()),
            );
        }
        if let Some(tap) = &vm.tap {
            a.push2("--net", format!("tap={tap}"));
        }
        Launch {
            argv: a.into_vec(),
            files: Vec::new(),
            stdout: None,
        }
    }
}

/// A path written as a value in one of Cloud Hypervisor's `key=value,...` lists.
fn check_option_value(field: &str, path: &Path) -> Result<(), ConfigError> {
    let s = path.to_string_lossy();
    if s.contains([',', '"', '[', ']']) || s.ends_with(char::is_whitespace) {
        return Err(ConfigError::BadPath {
            field: field.into(),
            path: path.to_path_buf(),
            problem: "may not hold , \" [ ] or end in whitespace under cloud-hypervisor (its \
                      option lists cannot escape them)",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{Disk, DiskFormat, testutil::cloud_hypervisor_vm, testutil::refusal};

    #[test]
    fn paths_in_option_lists_may_not_hold_list_syntax() {
        for path in [
            "/srv/a,b.img",
            "/srv/\"a\".img",
            "/srv/[a].img",
            "/srv/a.img ",
        ] {
            let mut vm = cloud_hypervisor_vm();
            vm.disks.push(Disk {
                path: path.into(),
                read_only: false,
                format: DiskFormat::Raw,
            });
            let e = refusal(vm);
            assert!(e.starts_with("vm.disks[0].path: "), "{path}: {e}");
            assert!(e.contains("under cloud-hypervisor"), "{path}: {e}");
        }
        // --kernel takes its argument whole.
        let mut vm = cloud_hypervisor_vm();
        vm.kernel = "/srv/a,b/vmlinux".into();
        let launch = vm.prepare().unwrap().render();
        assert_eq!(launch.argv[1..3], ["--kernel", "/srv/a,b/vmlinux"]);
    }

    #[test]
    fn a_cmdline_that_looks_like_an_option_is_refused() {
        let mut vm = cloud_hypervisor_vm();
        vm.cmdline = Some("--help".into());
        assert!(refusal(vm).starts_with("vm.cmdline: \"--help\" may not start with '-'"));
    }

    #[test]
    fn serial_off_and_console_off_by_default() {
        let launch = cloud_hypervisor_vm().prepare().unwrap().render();
        let argv: Vec<_> = launch.argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert!(
            argv.windows(2).any(|w| w == ["--serial", "off"]),
            "{argv:?}"
        );
        assert!(
            argv.windows(2).any(|w| w == ["--console", "off"]),
            "{argv:?}"
        );
        assert!(
            argv.windows(2)
                .any(|w| w == ["--vsock", "cid=3,socket=/run/vm/vsock.sock"]),
            "{argv:?}"
        );
    }
}
