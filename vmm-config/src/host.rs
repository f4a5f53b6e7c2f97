//! The checks only the host can answer: does the kernel exist, is the VMM installed, is there a
//! directory for each socket. Kept apart from [`crate::validate`] so that pure validation runs in
//! unit tests without any of these files.

use std::{
    ffi::OsStr,
    fs,
    io::ErrorKind,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::{Accel, Backend, ConfigError, Prepared};

/// The device KVM guests need.
const KVM_DEVICE: &str = "/dev/kvm";

impl Prepared {
    /// Checks the host: the VMM binary is an executable file (on `PATH` when given by name), the
    /// kernel and initrd are readable files, every disk exists as a file or block device, the
    /// directory of every socket, log and config file exists, and `/dev/kvm` opens when the VM
    /// needs KVM (QEMU with `accel = "kvm"`, Firecracker, Cloud Hypervisor).
    pub fn validate_host(&self) -> Result<(), ConfigError> {
        let vm = self.config();
        let (field, binary) = match &vm.backend {
            Backend::Qemu(q) => ("vm.qemu.binary", &q.binary),
            Backend::Firecracker(f) => ("vm.firecracker.binary", &f.binary),
            Backend::CloudHypervisor(c) => ("vm.cloud-hypervisor.binary", &c.binary),
        };
        check_binary(field, binary)?;
        check_readable_file("vm.kernel", &vm.kernel)?;
        if let Some(initrd) = &vm.initrd {
            check_readable_file("vm.initrd", initrd)?;
        }
        for (i, disk) in vm.disks.iter().enumerate() {
            let field = format!("vm.disks[{i}].path");
            let meta = metadata(&field, &disk.path)?;
            if !(meta.is_file() || meta.file_type().is_block_device()) {
                return Err(wrong_kind(field, &disk.path, "a file or a block device"));
            }
        }
        for (field, path) in vm.device_paths() {
            if vm.disks.iter().any(|d| d.path == path) {
                continue;
            }
            // `/` has no parent; any other validated path has one.
            if let Some(dir) = path.parent() {
                let meta = metadata(&field, dir)?;
                if !meta.is_dir() {
                    return Err(wrong_kind(field, dir, "a directory"));
                }
            }
        }
        let kvm_field = match &vm.backend {
            Backend::Qemu(q) if q.accel == Accel::Kvm => Some("vm.qemu.accel"),
            Backend::Qemu(_) => None,
            Backend::Firecracker(_) | Backend::CloudHypervisor(_) => Some("vm.backend"),
        };
        if let Some(field) = kvm_field {
            let kvm = Path::new(KVM_DEVICE);
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(kvm)
                .map_err(|e| io_error(field, kvm, e))?;
        }
        Ok(())
    }
}

fn check_readable_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    if !metadata(field, path)?.is_file() {
        return Err(wrong_kind(field.into(), path, "a file"));
    }
    fs::File::open(path).map_err(|e| io_error(field, path, e))?;
    Ok(())
}

fn check_binary(field: &str, binary: &Path) -> Result<(), ConfigError> {
    if binary.is_absolute() {
        let meta = metadata(field, binary)?;
        if !(meta.is_file() && meta.permissions().mode() & 0o111 != 0) {
            return Err(wrong_kind(field.into(), binary, "an executable file"));
        }
        return Ok(());
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    if find_on_path(binary.as_os_str(), &path_var).is_some() {
        return Ok(());
    }
    Err(ConfigError::NotOnPath {
        field: field.into(),
        name: binary.display().to_string(),
    })
}

/// The first executable file called `name` in the directories of `path_var`.
fn find_on_path(name: &OsStr, path_var: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path_var)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn metadata(field: &str, path: &Path) -> Result<fs::Metadata, ConfigError> {
    fs::metadata(path).map_err(|e| io_error(field, path, e))
}

fn io_error(field: &str, path: &Path, source: std::io::Error) -> ConfigError {
    if source.kind() == ErrorKind::NotFound {
        ConfigError::NotFound {
            field: field.into(),
            path: path.to_path_buf(),
        }
    } else {
        ConfigError::Host {
            field: field.into(),
            path: path.to_path_buf(),
            source,
        }
    }
}

fn wrong_kind(field: String, path: &Path, expected: &'static str) -> ConfigError {
    ConfigError::WrongKind {
        field,
        path: path.to_path_buf(),
        expected,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::{Disk, DiskFormat, QemuMicrovm, VmConfig, testutil::qemu_vm};

    /// A QEMU VM whose every file lives in a fresh temp dir, with an executable stand-in binary.
    fn vm_in(dir: &Path) -> VmConfig {
        let binary = dir.join("qemu");
        fs::write(&binary, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        fs::write(dir.join("disk.img"), b"").unwrap();
        let mut vm = qemu_vm();
        if let Backend::Qemu(q) = &mut vm.backend {
            *q = QemuMicrovm {
                binary,
                qmp_socket: Some(dir.join("qmp.sock")),
                ..q.clone()
            };
        }
        vm.kernel = dir.join("vmlinux");
        vm.ports[0].socket = dir.join("engine.sock");
        vm.disks.push(Disk {
            path: dir.join("disk.img"),
            read_only: false,
            format: DiskFormat::Raw,
        });
        vm
    }

    fn host_refusal(vm: VmConfig) -> String {
        let prepared = vm.prepare().unwrap();
        prepared.validate_host().unwrap_err().to_string()
    }

    #[test]
    fn a_complete_host_passes() {
        let dir = tempfile::tempdir().unwrap();
        vm_in(dir.path())
            .prepare()
            .unwrap()
            .validate_host()
            .unwrap();
    }

    #[test]
    fn a_missing_kernel_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = vm_in(dir.path());
        vm.kernel = dir.path().join("x/vmlinux");
        assert_eq!(
            host_refusal(vm),
            format!(
                "vm.kernel: {}/x/vmlinux does not exist",
                dir.path().display()
            )
        );
        let mut vm = vm_in(dir.path());
        vm.initrd = Some(dir.path().to_path_buf());
        assert!(host_refusal(vm).ends_with("is not a file"));
    }

    #[test]
    fn a_missing_binary_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = vm_in(dir.path());
        if let Backend::Qemu(q) = &mut vm.backend {
            q.binary = "caas-test-no-such-vmm".into();
        }
        assert_eq!(
            host_refusal(vm),
            "vm.qemu.binary: caas-test-no-such-vmm is not an executable file in any directory of PATH"
        );
        let mut vm = vm_in(dir.path());
        if let Backend::Qemu(q) = &mut vm.backend {
            q.binary = dir.path().join("vmlinux");
        }
        assert!(host_refusal(vm).ends_with("vmlinux is not an executable file"));
    }

    #[test]
    fn disks_must_exist_and_sockets_need_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = vm_in(dir.path());
        vm.disks[0].path = dir.path().join("nope.img");
        assert!(host_refusal(vm).starts_with("vm.disks[0].path: "));
        let mut vm = vm_in(dir.path());
        vm.disks[0].path = dir.path().to_path_buf();
        assert!(host_refusal(vm).ends_with("is not a file or a block device"));
        let mut vm = vm_in(dir.path());
        vm.ports[0].socket = dir.path().join("gone/engine.sock");
        assert_eq!(
            host_refusal(vm),
            format!(
                "vm.ports[0].socket: {}/gone does not exist",
                dir.path().display()
            )
        );
    }

    #[test]
    fn path_lookup_finds_only_executable_files() {
        let dir = tempfile::tempdir().unwrap();
        // Writes the executable stand-in `qemu` and the plain file `vmlinux`.
        let _ = vm_in(dir.path());
        let path_var =
            std::env::join_paths([dir.path().join("none"), dir.path().to_path_buf()]).unwrap();
        assert_eq!(
            find_on_path(OsStr::new("qemu"), &path_var),
            Some(dir.path().join("qemu"))
        );
        assert_eq!(find_on_path(OsStr::new("vmlinux"), &path_var), None);
    }
}
