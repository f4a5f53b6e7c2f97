//! The configuration types and their TOML shape (`[vm]`, `[vm.<backend>]`). This module owns what
//! a config may say; what values are allowed is [`crate::validate`]'s, and how a VMM is told is
//! each backend module's.

use std::{fmt, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{
    CloudHypervisor, ConfigError, Firecracker, QemuMicrovm,
    limits::{DEFAULT_MEMORY_MIB, DEFAULT_VCPUS},
};

/// One VM: its size, boot payload, devices and the VMM that runs it (the `[vm]` section).
///
/// Deserializes from the shape shown in the [crate docs](crate); unknown keys are refused. Paths
/// that differ per VM (sockets, the serial log, disks) are usually filled in by the agent for each
/// tenant before [`VmConfig::prepare`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "VmToml", into = "VmToml")]
pub struct VmConfig {
    /// The VMM and its own settings (`vm.backend` plus the `[vm.<backend>]` section).
    pub backend: Backend,
    /// Virtual CPUs (default [`DEFAULT_VCPUS`]).
    pub vcpus: u32,
    /// Guest memory in MiB (default [`DEFAULT_MEMORY_MIB`]).
    pub memory_mib: u32,
    /// The guest kernel: an uncompressed `vmlinux` ELF with a PVH entry note (all three VMMs boot
    /// it directly, without firmware).
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line; unset means the backend's default (see
    /// [`Prepared::cmdline`](crate::Prepared::cmdline)). A value replaces the default entirely.
    pub cmdline: Option<String>,
    /// Block devices, in guest order (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<Disk>,
    /// Where the guest's first serial port (`ttyS0`) goes.
    pub serial: Serial,
    /// virtio-serial ports backed by host unix sockets (QEMU only).
    pub ports: Vec<Port>,
    /// A vsock device backed by a host unix socket (Firecracker, Cloud Hypervisor).
    pub vsock: Option<Vsock>,
    /// A host tap device to attach as the guest's network interface.
    pub tap: Option<String>,
}

impl VmConfig {
    /// A VM with the given backend and kernel and defaults for everything else.
    pub fn new(backend: Backend, kernel: impl Into<PathBuf>) -> Self {
        Self {
            backend,
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            disks: Vec::new(),
            serial: Serial::None,
            ports: Vec::new(),
            vsock: None,
            tap: None,
        }
    }
}

/// The VMM that runs a VM, with its own settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// QEMU's `microvm` machine (`backend = "qemu"`, settings in `[vm.qemu]`).
    Qemu(QemuMicrovm),
    /// Firecracker (`backend = "firecracker"`, settings in `[vm.firecracker]`).
    Firecracker(Firecracker),
    /// Cloud Hypervisor (`backend = "cloud-hypervisor"`, settings in `[vm.cloud-hypervisor]`).
    CloudHypervisor(CloudHypervisor),
}

impl Backend {
    /// Which VMM this is.
    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Qemu(_) => BackendKind::Qemu,
            Backend::Firecracker(_) => BackendKind::Firecracker,
            Backend::CloudHypervisor(_) => BackendKind::CloudHypervisor,
        }
    }
}

impl From<BackendKind> for Backend {
    /// The backend with its default settings.
    fn from(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Qemu => Backend::Qemu(QemuMicrovm::default()),
            BackendKind::Firecracker => Backend::Firecracker(Firecracker::default()),
            BackendKind::CloudHypervisor => Backend::CloudHypervisor(CloudHypervisor::default()),
        }
    }
}

/// The name of a VMM, as `vm.backend` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// `qemu`
    Qemu,
    /// `firecracker`
    Firecracker,
    /// `cloud-hypervisor`
    CloudHypervisor,
}

impl BackendKind {
    /// The name in configs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Firecracker => "firecracker",
            BackendKind::CloudHypervisor => "cloud-hypervisor",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qemu" => Ok(BackendKind::Qemu),
            "firecracker" => Ok(BackendKind::Firecracker),
            "cloud-hypervisor" => Ok(BackendKind::CloudHypervisor),
            other => Err(ConfigError::UnknownBackend { name: other.into() }),
        }
    }
}

impl Serialize for BackendKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

// By hand rather than derived: serde's message for an unknown variant does not say which field it
// was in, and ours does (`vm.backend: unknown backend "xen", expected one of ...`).
impl<'de> Deserialize<'de> for BackendKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = BackendKind;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("vm.backend as a string: qemu, firecracker or cloud-hypervisor")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BackendKind, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// A block device backed by a host file or block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The host file or block device.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub read_only: bool,
    /// The image format.
    #[serde(default)]
    pub format: DiskFormat,
}

/// A disk image format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The guest sees the bytes of the file as they are (the one format all three VMMs share).
    #[default]
    Raw,
}

/// Where the guest's serial console goes.
///
/// In TOML: `serial = "none"`, `serial = { file = "/path" }` or `serial = { unix = "/path" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Serial {
    /// Nowhere.
    #[default]
    None,
    /// Into a host file, replaced at each launch.
    File(PathBuf),
    /// To a unix socket the VMM listens on (QEMU, Cloud Hypervisor).
    Unix(PathBuf),
}

/// A virtio-serial port whose host end is a unix socket the VMM listens on (QEMU only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// The name the guest sees (`/dev/virtio-ports/<name>`), such as
    /// [`ENGINE_PORT_NAME`](crate::limits::ENGINE_PORT_NAME).
    pub name: String,
    /// The host unix socket.
    pub socket: PathBuf,
}

/// A vsock device whose host end is a unix socket (Firecracker's and Cloud Hypervisor's hybrid
/// vsock: the host connects to `socket` and writes `CONNECT <port>\n`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id.
    pub cid: u32,
    /// The host unix socket.
    pub socket: PathBuf,
}

/// The TOML shape of `[vm]`: the backend as a name plus one optional section per backend.
/// [`VmConfig`] converts from and to it, so the typed form cannot hold settings for a backend
/// other than the chosen one.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmToml {
    backend: BackendKind,
    #[serde(default = "default_vcpus")]
    vcpus: u32,
    #[serde(default = "default_memory_mib")]
    memory_mib: u32,
    kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tap: Option<String>,
    #[serde(default)]
    serial: Serial,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vsock: Option<Vsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    qemu: Option<QemuMicrovm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    firecracker: Option<Firecracker>,
    #[serde(
        default,
        rename = "cloud-hypervisor",
        skip_serializing_if = "Option::is_none"
    )]
    cloud_hypervisor: Option<CloudHypervisor>,
}

fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}

fn default_memory_mib() -> u32 {
    DEFAULT_MEMORY_MIB
}

impl TryFrom<VmToml> for VmConfig {
    type Error = ConfigError;

    fn try_from(t: VmToml) -> Result<Self, ConfigError> {
        let kind = t.backend;
        let refuse = |present: bool, section: BackendKind| {
            if present && section != kind {
                Err(ConfigError::OtherBackendSection {
                    field: format!("vm.{section}"),
                    backend: kind,
                })
            } else {
                Ok(())
            }
        };
        refuse(t.qemu.is_some(), BackendKind::Qemu)?;
        refuse(t.firecracker.is_some(), BackendKind::Firecracker)?;
        refuse(t.cloud_hypervisor.is_some(), BackendKind::CloudHypervisor)?;
        let backend = match kind {
            BackendKind::Qemu => Backend::Qemu(t.qemu.unwrap_or_default()),
            BackendKind::Firecracker => Backend::Firecracker(t.firecracker.unwrap_or_default()),
            BackendKind::CloudHypervisor => {
                Backend::CloudHypervisor(t.cloud_hypervisor.unwrap_or_default())
            }
        };
        Ok(VmConfig {
            backend,
            vcpus: t.vcpus,
            memory_mib: t.memory_mib,
            kernel: t.kernel,
            initrd: t.initrd,
            cmdline: t.cmdline,
            disks: t.disks,
            serial: t.serial,
            ports: t.ports,
            vsock: t.vsock,
            tap: t.tap,
        })
    }
}

impl From<VmConfig> for VmToml {
    fn from(vm: VmConfig) -> Self {
        let (mut qemu, mut firecracker, mut cloud_hypervisor) = (None, None, None);
        let backend = vm.backend.kind();
        match vm.backend {
            Backend::Qemu(q) => qemu = Some(q),
            Backend::Firecracker(f) => firecracker = Some(f),
            Backend::CloudHypervisor(c) => cloud_hypervisor = Some(c),
        }
        VmToml {
            backend,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel: vm.kernel,
            initrd: vm.initrd,
            cmdline: vm.cmdline,
            tap: vm.tap,
            serial: vm.serial,
            disks: vm.disks,
            ports: vm.ports,
            vsock: vm.vsock,
            qemu,
            firecracker,
            cloud_hypervisor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Accel, limits::ENGINE_PORT_NAME};

    fn parse(text: &str) -> Result<VmConfig, String> {
        toml::from_str::<VmConfig>(text).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = r#"
backend = "qemu"
vcpus = 1
memory_mib = 256
kernel = "/var/lib/caas-agent/guest/vmlinux"
[qemu]
accel = "tcg"
"#;

    #[test]
    fn the_minimal_qemu_shape_parses_with_defaults() {
        let vm = parse(MINIMAL).unwrap();
        let mut expected = VmConfig::new(
            Backend::Qemu(QemuMicrovm {
                accel: Accel::Tcg,
                ..QemuMicrovm::default()
            }),
            "/var/lib/caas-agent/guest/vmlinux",
        );
        assert_eq!(vm, expected);
        // Without its section a backend gets its defaults; vcpus and memory have theirs.
        let vm = parse("backend = \"firecracker\"\nkernel = \"/k\"").unwrap();
        expected = VmConfig::new(Backend::from(BackendKind::Firecracker), "/k");
        assert_eq!(vm, expected);
    }

    #[test]
    fn every_field_has_a_toml_spelling() {
        let vm = parse(
            r#"
backend = "cloud-hypervisor"
vcpus = 2
memory_mib = 512
kernel = "/k"
initrd = "/i"
cmdline = "console=ttyS0"
tap = "tap0"
serial = { unix = "/run/s.sock" }
vsock = { cid = 7, socket = "/run/v.sock" }
[[disks]]
path = "/d0"
[[disks]]
path = "/d1"
read_only = true
format = "raw"
[[ports]]
name = "caas.engine"
socket = "/run/e.sock"
[cloud-hypervisor]
binary = "/opt/ch"
api_socket = "/run/api.sock"
"#,
        )
        .unwrap();
        assert_eq!(vm.backend.kind(), BackendKind::CloudHypervisor);
        assert_eq!((vm.vcpus, vm.memory_mib), (2, 512));
        assert_eq!(vm.serial, Serial::Unix("/run/s.sock".into()));
        assert_eq!(
            vm.vsock,
            Some(Vsock {
                cid: 7,
                socket: "/run/v.sock".into()
            })
        );
        assert!(vm.disks[1].read_only && !vm.disks[0].read_only);
        assert_eq!(vm.ports[0].name, ENGINE_PORT_NAME);
        assert_eq!(
            vm.backend,
            Backend::CloudHypervisor(CloudHypervisor {
                binary: "/opt/ch".into(),
                api_socket: Some("/run/api.sock".into()),
            })
        );
        assert_eq!(
            parse("backend = \"qemu\"\nkernel = \"/k\"\nserial = \"none\"")
                .unwrap()
                .serial,
            Serial::None
        );
        assert_eq!(
            parse("backend = \"qemu\"\nkernel = \"/k\"\nserial = { file = \"/s.log\" }")
                .unwrap()
                .serial,
            Serial::File("/s.log".into())
        );
    }

    #[test]
    fn an_unknown_backend_names_the_field_and_the_choices() {
        let e = parse("backend = \"xen\"\nkernel = \"/k\"").unwrap_err();
        assert!(
            e.contains(
                "vm.backend: unknown backend \"xen\", expected one of qemu, firecracker, \
                 cloud-hypervisor"
            ),
            "{e}"
        );
        let e = parse("backend = 1\nkernel = \"/k\"").unwrap_err();
        assert!(e.contains("vm.backend as a string"), "{e}");
        let e = parse("kernel = \"/k\"").unwrap_err();
        assert!(e.contains("missing field `backend`"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = parse(&format!("{MINIMAL}\n[unknown]\nx = 1")).unwrap_err();
        assert!(e.contains("unknown field `unknown`"), "{e}");
        let e = parse("backend = \"qemu\"\nkernel = \"/k\"\nmemory = 256").unwrap_err();
        assert!(e.contains("unknown field `memory`"), "{e}");
        let e = parse("backend = \"qemu\"\nkernel = \"/k\"\n[qemu]\nacel = \"tcg\"").unwrap_err();
        assert!(e.contains("unknown field `acel`"), "{e}");
        let e = parse("backend = \"qemu\"\nkernel = \"/k\"\n[[disks]]\npath = \"/d\"\nro = true")
            .unwrap_err();
        assert!(e.contains("unknown field `ro`"), "{e}");
        let e = parse(
            "backend = \"qemu\"\nkernel = \"/k\"\n[[disks]]\npath = \"/d\"\nformat = \"qcow2\"",
        )
        .unwrap_err();
        assert!(e.contains("unknown variant `qcow2`"), "{e}");
        let e = parse("backend = \"qemu\"\nkernel = \"/k\"\n[qemu]\naccel = \"hvf\"").unwrap_err();
        assert!(
            e.contains("unknown variant `hvf`, expected one of `kvm`, `tcg`, `auto`"),
            "{e}"
        );
    }

    #[test]
    fn a_section_for_another_backend_is_refused() {
        let e = parse("backend = \"qemu\"\nkernel = \"/k\"\n[firecracker]\nbinary = \"/fc\"")
            .unwrap_err();
        assert!(
            e.contains("vm.firecracker: settings for another backend; vm.backend is qemu"),
            "{e}"
        );
        let e =
            parse("backend = \"firecracker\"\nkernel = \"/k\"\n[cloud-hypervisor]").unwrap_err();
        assert!(
            e.contains("vm.cloud-hypervisor: settings for another backend"),
            "{e}"
        );
    }

    #[test]
    fn a_config_survives_a_toml_round_trip() {
        for mut vm in crate::testutil::every_backend() {
            vm.disks.push(Disk {
                path: "/d".into(),
                read_only: true,
                format: DiskFormat::Raw,
            });
            vm.serial = Serial::File("/s.log".into());
            vm.tap = Some("tap0".into());
            let text = toml::to_string(&vm).unwrap();
            assert_eq!(parse(&text).unwrap(), vm, "{text}");
        }
    }
}
