//! Pure validation: defaults, then every value against its named limit, without touching the host
//! (that is [`crate::host`]'s). Holds the rules shared by all backends: sizes, paths, names, and
//! the check that no two devices share a host path.

use std::path::Path;

use crate::{
    Backend, BackendKind, ConfigError, Prepared, Serial, VmConfig,
    limits::{
        CLOUD_HYPERVISOR_MAX_VCPUS, FIRECRACKER_MAX_VCPUS, MAX_BINARY_NAME_LEN, MAX_CMDLINE_LEN,
        MAX_DISKS, MAX_GUEST_CID, MAX_MEMORY_MIB, MAX_PATH_LEN, MAX_PORT_NAME_LEN, MAX_PORTS,
        MAX_TAP_NAME_LEN, MAX_UNIX_SOCKET_PATH_LEN, MIN_GUEST_CID, MIN_MEMORY_MIB, MIN_VCPUS,
        QEMU_MAX_VCPUS,
    },
};

impl VmConfig {
    /// Fills in the defaults that depend on other choices (the command line, QEMU's CPU model),
    /// then checks every value. Touches nothing on the host; see
    /// [`Prepared::validate_host`] for that.
    pub fn prepare(mut self) -> Result<Prepared, ConfigError> {
        self.fill_defaults();
        self.validate()?;
        Prepared::new(self)
    }

    fn fill_defaults(&mut self) {
        match &mut self.backend {
            Backend::Qemu(q) => q.fill_defaults(),
            Backend::Firecracker(f) => f.fill_defaults(),
            Backend::CloudHypervisor(c) => c.fill_defaults(),
        }
        if self.cmdline.is_none() {
            self.cmdline = Some(self.default_cmdline());
        }
    }

    /// The kernel command line this VM gets when `cmdline` is not set: the backend's default
    /// (see [`Prepared::cmdline`]), for extending rather than replacing it.
    pub fn default_cmdline(&self) -> String {
        match &self.backend {
            Backend::Qemu(q) => q.default_cmdline(),
            Backend::Firecracker(f) => f.default_cmdline(),
            Backend::CloudHypervisor(c) => c.default_cmdline(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let kind = self.backend.kind();
        let max_vcpus = match kind {
            BackendKind::Qemu => QEMU_MAX_VCPUS,
            BackendKind::Firecracker => FIRECRACKER_MAX_VCPUS,
            BackendKind::CloudHypervisor => CLOUD_HYPERVISOR_MAX_VCPUS,
        };
        check_range("vm.vcpus", self.vcpus, MIN_VCPUS, max_vcpus, Some(kind))?;
        check_range(
            "vm.memory_mib",
            self.memory_mib,
            MIN_MEMORY_MIB,
            MAX_MEMORY_MIB,
            None,
        )?;
        check_path("vm.kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_path("vm.initrd", initrd)?;
        }
        if let Some(cmdline) = &self.cmdline {
            check_cmdline(cmdline)?;
        }
        check_count("vm.disks", self.disks.len(), MAX_DISKS)?;
        for (i, disk) in self.disks.iter().enumerate() {
            check_path(&format!("vm.disks[{i}].path"), &disk.path)?;
        }
        match &self.serial {
            Serial::None => {}
            Serial::File(p) => check_path("vm.serial.file", p).map(drop)?,
            Serial::Unix(p) => check_socket_path("vm.serial.unix", p)?,
        }
        check_count("vm.ports", self.ports.len(), MAX_PORTS)?;
        for (i, port) in self.ports.iter().enumerate() {
            let field = format!("vm.ports[{i}].name");
            check_name(&field, &port.name, MAX_PORT_NAME_LEN)?;
            if let Some(j) = self.ports[..i].iter().position(|p| p.name == port.name) {
                return Err(ConfigError::Duplicate {
                    field,
                    other: format!("vm.ports[{j}].name"),
                    value: port.name.clone(),
                });
            }
            check_socket_path(&format!("vm.ports[{i}].socket"), &port.socket)?;
        }
        if let Some(vsock) = &self.vsock {
            check_range(
                "vm.vsock.cid",
                vsock.cid,
                MIN_GUEST_CID,
                MAX_GUEST_CID,
                None,
            )?;
            check_socket_path("vm.vsock.socket", &vsock.socket)?;
        }
        if let Some(tap) = &self.tap {
            check_name("vm.tap", tap, MAX_TAP_NAME_LEN)?;
        }
        match &self.backend {
            Backend::Qemu(q) => q.validate(self)?,
            Backend::Firecracker(f) => f.validate(self)?,
            Backend::CloudHypervisor(c) => c.validate(self)?,
        }
        self.check_distinct_paths()
    }

    /// Every host path a device or the VMM writes, opens or listens on, with its field name.
    pub(crate) fn device_paths(&self) -> Vec<(String, &Path)> {
        let mut paths: Vec<(String, &Path)> = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            paths.push((format!("vm.disks[{i}].path"), &d.path));
        }
        match &self.serial {
            Serial::None => {}
            Serial::File(p) => paths.push(("vm.serial.file".into(), p)),
            Serial::Unix(p) => paths.push(("vm.serial.unix".into(), p)),
        }
        for (i, p) in self.ports.iter().enumerate() {
            paths.push((format!("vm.ports[{i}].socket"), &p.socket));
        }
        if let Some(v) = &self.vsock {
            paths.push(("vm.vsock.socket".into(), &v.socket));
        }
        let own = match &self.backend {
            Backend::Qemu(q) => q.paths(),
            Backend::Firecracker(f) => f.paths(),
            Backend::CloudHypervisor(c) => c.paths(),
        };
        paths.extend(own.into_iter().map(|(f, p)| (f.to_string(), p)));
        paths
    }

    // Two devices on one socket or file would fight over it (or share a writable disk).
    fn check_distinct_paths(&self) -> Result<(), ConfigError> {
        let paths = self.device_paths();
        for (i, (field, path)) in paths.iter().enumerate() {
            if let Some((other, _)) = paths[..i].iter().find(|(_, p)| p == path) {
                return Err(ConfigError::Duplicate {
                    field: field.clone(),
                    other: other.clone(),
                    value: path.display().to_string(),
                });
            }
        }
        Ok(())
    }
}

/// `min <= value <= max`, naming the backend in the message when the maximum is its own.
pub(crate) fn check_range(
    field: &str,
    value: u32,
    min: u32,
    max: u32,
    backend: Option<BackendKind>,
) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError::TooSmall {
            field: field.into(),
            value: value.into(),
            min: min.into(),
        });
    }
    if value > max {
        return Err(ConfigError::TooLarge {
            field: field.into(),
            value: value.into(),
            max: max.into(),
            backend,
        });
    }
    Ok(())
}

fn check_count(field: &str, len: usize, max: usize) -> Result<(), ConfigError> {
    if len > max {
        return Err(ConfigError::TooLong {
            field: field.into(),
            len,
            max,
            unit: "entries",
        });
    }
    Ok(())
}

/// A host path: UTF-8 (it goes into JSON and option strings), absolute (the VMM's working
/// directory is not ours), free of control characters and of `.`/`..` components, not ending in
/// `/`, and at most [`MAX_PATH_LEN`] bytes. Returns it as a `&str`.
pub(crate) fn check_path<'a>(field: &str, path: &'a Path) -> Result<&'a str, ConfigError> {
    let bad = |problem| ConfigError::BadPath {
        field: field.into(),
        path: path.to_path_buf(),
        problem,
    };
    let s = path.to_str().ok_or_else(|| bad("is not valid UTF-8"))?;
    if s.is_empty() {
        return Err(bad("is empty"));
    }
    if !s.starts_with('/') {
        return Err(bad("is not absolute"));
    }
    if s.chars().any(char::is_control) {
        return Err(bad("contains a control character"));
    }
    if s.split('/').any(|c| c == "." || c == "..") {
        return Err(bad("has a . or .. component"));
    }
    if s.len() > 1 && s.ends_with('/') {
        return Err(bad("ends with /"));
    }
    if s.len() > MAX_PATH_LEN {
        return Err(ConfigError::TooLong {
            field: field.into(),
            len: s.len(),
            max: MAX_PATH_LEN,
            unit: "bytes",
        });
    }
    Ok(s)
}

/// A path a unix socket is bound to: a host path that fits `sun_path`.
pub(crate) fn check_socket_path(field: &str, path: &Path) -> Result<(), ConfigError> {
    let s = check_path(field, path)?;
    if s.len() > MAX_UNIX_SOCKET_PATH_LEN {
        return Err(ConfigError::TooLong {
            field: field.into(),
            len: s.len(),
            max: MAX_UNIX_SOCKET_PATH_LEN,
            unit: "bytes (a unix socket path)",
        });
    }
    Ok(())
}

/// A VMM binary: a bare name looked up on `PATH` when launched, or an absolute path.
pub(crate) fn check_binary(field: &str, binary: &Path) -> Result<(), ConfigError> {
    match binary.to_str() {
        Some(s) if !s.contains('/') => check_name(field, s, MAX_BINARY_NAME_LEN),
        _ => check_path(field, binary).map(drop),
    }
}

/// A name rendered into VMM options and guest device names (ports, tap devices, CPU models):
/// 1..=`max` bytes of ASCII letters, digits, `.`, `_` and `-`, starting with a letter or digit.
/// This leaves out everything with a meaning in QEMU's or Cloud Hypervisor's option syntax
/// (`,` `=` `"` `[` `]`), `/`, and the names `.` and `..`.
pub(crate) fn check_name(field: &str, value: &str, max: usize) -> Result<(), ConfigError> {
    let bad = |problem| ConfigError::BadValue {
        field: field.into(),
        value: value.into(),
        problem,
    };
    if value.is_empty() {
        return Err(bad("is empty"));
    }
    if value.len() > max {
        return Err(ConfigError::TooLong {
            field: field.into(),
            len: value.len(),
            max,
            unit: "bytes",
        });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("may only hold ASCII letters, digits, '.', '_' and '-'"));
    }
    if !value.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("must start with an ASCII letter or digit"));
    }
    Ok(())
}

/// The kernel command line: printable ASCII (it is one argv element and one JSON string, and the
/// kernel parses nothing else), at most [`MAX_CMDLINE_LEN`] bytes.
fn check_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    if cmdline.len() > MAX_CMDLINE_LEN {
        return Err(ConfigError::TooLong {
            field: "vm.cmdline".into(),
            len: cmdline.len(),
            max: MAX_CMDLINE_LEN,
            unit: "bytes",
        });
    }
    if !cmdline.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(ConfigError::BadValue {
            field: "vm.cmdline".into(),
            value: cmdline.into(),
            problem: "may only hold printable ASCII characters and spaces",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
