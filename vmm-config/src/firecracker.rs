//! Firecracker: settings (`[vm.firecracker]`), their checks, and the launch: the JSON of
//! `--config-file` (which boots the VM at start, no API calls needed) plus a short argv.
//!
//! Firecracker has no virtio-serial: the engine channel is vsock, whose host end is a unix socket
//! (`vsock.uds_path`). It writes the guest's serial console to its own stdout, so a serial file
//! becomes [`Launch::stdout`]. Seccomp stays on (Firecracker's default).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    BackendKind, ConfigError, Launch, LaunchFile, Serial, VmConfig,
    launch::Argv,
    validate::{check_binary, check_path, check_socket_path},
};

/// The binary run when `vm.firecracker.binary` is not set.
pub const DEFAULT_FIRECRACKER_BINARY: &str = "firecracker";

const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

/// `[vm.firecracker]`: settings of Firecracker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Firecracker {
    /// The Firecracker binary: a name looked up on `PATH` or an absolute path.
    pub binary: PathBuf,
    /// The API socket (`--api-sock`), for a clean shutdown (`SendCtrlAltDel`) and queries. Unset:
    /// `--no-api` (Firecracker's default socket path is one per host, not one per VM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Where the rendered JSON configuration is written (`--config-file`); required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_file: Option<PathBuf>,
    /// Firecracker's own log. Firecracker opens it without creating it, so the launch writes it
    /// (empty) first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
}

impl Default for Firecracker {
    fn default() -> Self {
        Self {
            binary: PathBuf::from(DEFAULT_FIRECRACKER_BINARY),
            api_socket: None,
            config_file: None,
            log_path: None,
        }
    }
}

impl Firecracker {
    pub(crate) fn fill_defaults(&mut self) {
        // Every default is in `Default`; nothing here depends on another choice.
    }

    pub(crate) fn default_cmdline(&self) -> String {
        CMDLINE.into()
    }

    pub(crate) fn validate(&self, vm: &VmConfig) -> Result<(), ConfigError> {
        check_binary("vm.firecracker.binary", &self.binary)?;
        if let Some(p) = &self.api_socket {
            check_socket_path("vm.firecracker.api_socket", p)?;
        }
        match &self.config_file {
            Some(p) => check_path("vm.firecracker.config_file", p).map(drop)?,
            None => {
                return Err(ConfigError::Missing {
                    field: "vm.firecracker.config_file".into(),
                    why: "where the VM's JSON configuration is written for --config-file",
                });
            }
        }
        if let Some(p) = &self.log_path {
            check_path("vm.firecracker.log_path", p)?;
        }
        if !vm.ports.is_empty() {
            return Err(ConfigError::Unsupported {
                field: "vm.ports".into(),
                backend: BackendKind::Firecracker,
                hint: "it has no virtio-serial; use vm.vsock",
            });
        }
        if let Serial::Unix(_) = vm.serial {
            return Err(ConfigError::Unsupported {
                field: "vm.serial.unix".into(),
                backend: BackendKind::Firecracker,
                hint: "it writes the serial console to its stdout; use serial = { file = ... }",
            });
        }
        Ok(())
    }

    pub(crate) fn paths(&self) -> Vec<(&'static str, &Path)> {
        let mut paths = Vec::new();
        if let Some(p) = &self.api_socket {
            paths.push(("vm.firecracker.api_socket", p.as_path()));
        }
        if let Some(p) = &self.config_file {
            paths.push(("vm.firecracker.config_file", p.as_path()));
        }
        if let Some(p) = &self.log_path {
            paths.push(("vm.firecracker.log_path", p.as_path()));
        }
        paths
    }

    pub(crate) fn render(&self, vm: &VmConfig, cmdline: &str) -> Launch {
        let mut argv = Argv::new(&self.binary);
        match &self.api_socket {
            Some(p) => argv.push2("--api-sock", p),
            None => argv.push("--no-api"),
        }
        let mut files = Vec::new();
        if let Some(config_file) = &self.config_file {
            argv.push2("--config-file", config_file);
            files.push(LaunchFile {
                path: config_file.clone(),
                contents: self.config_json(vm, cmdline),
            });
        }
        if let Some(log) = &self.log_path {
            files.push(LaunchFile {
                path: log.clone(),
                contents: Vec::new(),
            });
        }
        Launch {
            argv: argv.into_vec(),
            files,
            stdout: match &vm.serial {
                Serial::File(p) => Some(p.clone()),
                Serial::None | Serial::Unix(_) => None,
            },
        }
    }

    /// The `--config-file` JSON, pretty-printed, fields in Firecracker's documented order.
    fn config_json(&self, vm: &VmConfig, cmdline: &str) -> Vec<u8> {
        let config = FcConfig {
            boot_source: FcBootSource {
                kernel_image_path: text(&vm.kernel),
                initrd_path: vm.initrd.as_deref().map(text),
                boot_args: cmdline.into(),
            },
            drives: vm
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| FcDrive {
                    drive_id: format!("disk{i}"),
                    path_on_host: text(&d.path),
                    // The guest boots from its initramfs; disks are data, never `root=`.
                    is_root_device: false,
                    is_read_only: d.read_only,
                })
                .collect(),
            machine_config: FcMachine {
                vcpu_count: vm.vcpus,
                mem_size_mib: vm.memory_mib,
            },
            network_interfaces: vm
                .tap
                .iter()
                .map(|tap| FcNet {
                    iface_id: "eth0".into(),
                    host_dev_name: tap.clone(),
                })
                .collect(),
            vsock: vm.vsock.as_ref().map(|v| FcVsock {
                guest_cid: v.cid,
                uds_path: text(&v.socket),
            }),
            logger: self.log_path.as_deref().map(|p| FcLogger {
                log_path: text(p),
                level: "Warning",
            }),
        };
        let mut json = serde_json::to_vec_pretty(&config)
            .expect("plain structs of strings, numbers and bools always serialize to JSON");
        json.push(b'\n');
        json
    }
}

/// A validated path (UTF-8) as a JSON string.
fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[derive(Serialize)]
struct FcConfig {
    #[serde(rename = "boot-source")]
    boot_source: FcBootSource,
    drives: Vec<FcDrive>,
    #[serde(rename = "machine-config")]
    machine_config: FcMachine,
    #[serde(rename = "network-interfaces")]
    network_interfaces: Vec<FcNet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vsock: Option<FcVsock>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logger: Option<FcLogger>,
}

#[derive(Serialize)]
struct FcBootSource {
    kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd_path: Option<String>,
    boot_args: String,
}

#[derive(Serialize)]
struct FcDrive {
    drive_id: String,
    path_on_host: String,
    is_root_device: bool,
    is_read_only: bool,
}

#[derive(Serialize)]
struct FcMachine {
    vcpu_count: u32,
    mem_size_mib: u32,
}

#[derive(Serialize)]
struct FcNet {
    iface_id: String,
    host_dev_name: String,
}

#[derive(Serialize)]
struct FcVsock {
    guest_cid: u32,
    uds_path: String,
}

#[derive(Serialize)]
struct FcLogger {
    log_path: String,
    level: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, Disk, DiskFormat, Port, testutil::firecracker_vm, testutil::refusal};

    fn fc(vm: &mut VmConfig) -> &mut Firecracker {
        match &mut vm.backend {
            Backend::Firecracker(f) => f,
            other => panic!("not firecracker: {other:?}"),
        }
    }

    #[test]
    fn the_launch_is_a_config_file_and_a_short_argv() {
        let mut vm = firecracker_vm();
        vm.serial = Serial::File("/run/vm/serial.log".into());
        vm.disks.push(Disk {
            path: "/srv/a,b.img".into(),
            read_only: true,
            format: DiskFormat::Raw,
        });
        let launch = vm.prepare().unwrap().render();
        assert_eq!(
            launch.argv,
            [
                "firecracker",
                "--no-api",
                "--config-file",
                "/run/vm/firecracker.json"
            ]
        );
        assert_eq!(launch.stdout, Some(PathBuf::from("/run/vm/serial.log")));
        assert_eq!(launch.files.len(), 1);
        let json: serde_json::Value = serde_json::from_slice(&launch.files[0].contents).unwrap();
        assert_eq!(json["machine-config"]["vcpu_count"], 1);
        assert_eq!(json["machine-config"]["mem_size_mib"], 256);
        assert_eq!(json["drives"][0]["path_on_host"], "/srv/a,b.img");
        assert_eq!(json["drives"][0]["is_read_only"], true);
        assert_eq!(json["vsock"]["guest_cid"], 3);
        assert!(json.get("logger").is_none());
        assert!(json["boot-source"].get("initrd_path").is_none());
    }

    #[test]
    fn api_socket_and_log_are_passed_on() {
        let mut vm = firecracker_vm();
        fc(&mut vm).api_socket = Some("/run/vm/api.sock".into());
        fc(&mut vm).log_path = Some("/run/vm/firecracker.log".into());
        let launch = vm.prepare().unwrap().render();
        assert_eq!(launch.argv[1..3], ["--api-sock", "/run/vm/api.sock"]);
        assert_eq!(
            launch.files[1].path,
            PathBuf::from("/run/vm/firecracker.log")
        );
        assert!(launch.files[1].contents.is_empty());
        let json: serde_json::Value = serde_json::from_slice(&launch.files[0].contents).unwrap();
        assert_eq!(json["logger"]["log_path"], "/run/vm/firecracker.log");
    }

    #[test]
    fn what_firecracker_cannot_do_is_refused() {
        let mut vm = firecracker_vm();
        vm.ports.push(Port {
            name: "caas.engine".into(),
            socket: "/run/vm/engine.sock".into(),
        });
        assert!(refusal(vm).starts_with("vm.ports: not available with backend firecracker"));
        let mut vm = firecracker_vm();
        vm.serial = Serial::Unix("/run/vm/serial.sock".into());
        assert!(refusal(vm).starts_with("vm.serial.unix: not available with backend firecracker"));
        let mut vm = firecracker_vm();
        fc(&mut vm).config_file = None;
        assert!(refusal(vm).starts_with("vm.firecracker.config_file: required"));
    }
}
