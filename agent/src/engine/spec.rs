//! The OCI runtime spec of a container: oci-spec's defaults plus what they lack and Docker's
//! defaults have (an explicit seccomp profile, a device allowlist, the default capability set),
//! joined to the tenant's user and network namespaces, under the tenant's cgroup.

use std::collections::BTreeMap;
use std::path::Path;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilities, LinuxCpuBuilder, LinuxDeviceCgroup,
    LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, LinuxSeccomp, LinuxSeccompAction,
    LinuxSeccompBuilder, LinuxSyscallBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec,
    UserBuilder,
};

use crate::cgroups::tenant::CFS_PERIOD_US;

/// A host path bound into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Absolute host path (file or directory).
    pub host: std::path::PathBuf,
    /// Absolute path inside.
    pub inside: String,
    pub readonly: bool,
    /// With `readonly`: the mounts below `host` are read-only inside too.
    pub recursive_read_only: bool,
    /// An image volume: the read-only union of these layers (topmost first) is staged and
    /// bound instead of `host`.
    pub image_layers: Vec<std::path::PathBuf>,
    /// A device node: the cgroup access (letters of "rwm") it is allowed with; empty: not a
    /// device.
    pub device_access: String,
    /// Staged as an idmapped mount through the tenant's user namespace: on-disk owners are
    /// the container's own ids.
    pub idmap: bool,
    /// Mounts the host makes below `host` later appear inside too: the staged bind is a slave
    /// of the host's mount, and the container's bind of it stays one (`rslave`).
    pub host_to_container: bool,
}

/// What a container runs and within which limits.
#[derive(Debug, Clone)]
pub struct ContainerSpec<'a> {
    /// Overlay mount point.
    pub rootfs: &'a Path,
    /// argv.
    pub command: &'a [String],
    /// KEY=VALUE.
    pub env: &'a [String],
    /// Working directory ("" = /).
    pub workdir: &'a str,
    /// The tenant's namespace files.
    pub ns_dir: &'a Path,
    /// A pod network namespace to join instead of the tenant's (`ns_dir/net`).
    pub netns: Option<&'a Path>,
    /// Paths masked beyond the defaults.
    pub masked_paths: &'a [String],
    /// Paths read-only beyond the defaults.
    pub readonly_paths: &'a [String],
    /// Namespaced kernel parameters ([`check_sysctl`]).
    pub sysctls: &'a BTreeMap<String, String>,
    /// A seccomp profile (OCI JSON) instead of [`default_seccomp`].
    pub seccomp: Option<&'a str>,
    /// A process namespace to join (a pod's) instead of a new one.
    pub pidns: Option<&'a Path>,
    /// Absolute cgroup path.
    pub cgroup: &'a str,
    /// CPU limit in CPUs.
    pub cpus: Option<f64>,
    /// Relative CPU weight, `cpu.shares` units (libcontainer converts it on cgroup v2).
    pub cpu_shares: Option<u64>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Pids limit.
    pub pids: Option<u64>,
    /// Host name inside.
    pub hostname: &'a str,
    /// The process's uid inside.
    pub uid: u32,
    /// Its gid inside.
    pub gid: u32,
    /// The tenant's resolv.conf, bound read-only at /etc/resolv.conf (tenant networks on).
    pub resolv_conf: Option<&'a Path>,
    /// Capabilities dropped from the default set (`NET_RAW`, `CAP_NET_RAW`, or `ALL`).
    pub cap_drop: &'a [String],
    /// Capabilities added to the default set (of the tenant's user namespace).
    pub cap_add: &'a [String],
    /// Host paths bound in: (host path, container path, read-only).
    pub mounts: &'a [Bind],
    /// The container's `/sys/fs/cgroup`, made by the engine ([`super::cgroupfs`]), bound
    /// instead of the default `cgroup` mount; None keeps that mount (libcontainer makes it).
    pub cgroup_view: Option<&'a Path>,
    /// Mount the root filesystem read-only.
    pub readonly_rootfs: bool,
    /// Set no-new-privileges on the process (off: setuid files raise it, within its userns).
    pub no_new_privileges: bool,
    /// No seccomp filter at all (`seccomp` is then ignored).
    pub unconfined: bool,
    /// Extra group ids of the process.
    pub supplemental_groups: &'a [u32],
    /// Run the init on a terminal.
    pub tty: bool,
}

/// Why a spec could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec builder refused a value.
    #[error("building the OCI spec: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
    /// A bind mount that cannot be.
    #[error("mounts: {0}")]
    Mount(String),
    /// A seccomp profile that is not one.
    #[error("seccomp: the profile is not an OCI linux.seccomp: {0}")]
    Seccomp(String),
    /// A capability name that is not one.
    #[error("cap_drop: {0:?} is not a capability name (such as NET_RAW, or ALL)")]
    Capability(String),
}

/// A bind mount's paths: an existing absolute host path, an absolute container path without
/// `..` that is not `/` nor under /proc or /sys.
fn check_bind(host: &Path, inside: &str) -> Result<(), SpecError> {
    if !host.is_absolute() || !host.exists() {
        return Err(SpecError::Mount(format!(
            "host path {} must be an absolute path that exists",
            host.display()
        )));
    }
    let p = Path::new(inside);
    let bad = !p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        || p == Path::new("/")
        || p.starts_with("/proc")
        || p.starts_with("/sys");
    if bad {
        return Err(SpecError::Mount(format!(
            "container path {inside:?} must be absolute, without `..`, and not /, /proc or /sys"
        )));
    }
    Ok(())
}

/// One capability by name (`NET_ADMIN` or `CAP_NET_ADMIN`, any case).
fn capability(name: &str) -> Result<Capability, SpecError> {
    // oci-spec parses the name without its `CAP_` prefix.
    name.to_uppercase()
        .trim_start_matches("CAP_")
        .parse()
        .map_err(|_| SpecError::Capability(name.to_string()))
}

/// The default capability set less `drop`.
pub fn capabilities(drop: &[String]) -> Result<std::collections::HashSet<Capability>, SpecError> {
    capabilities_with(drop, &[])
}

/// The default capability set with `add` and without `drop`, as containerd computes it: `ALL`
/// in `drop` empties the set first, then `add` is added, then the named drops removed. The
/// capabilities are those of the tenant's user namespace: they give no power over the host.
pub fn capabilities_with(
    drop: &[String],
    add: &[String],
) -> Result<std::collections::HashSet<Capability>, SpecError> {
    let mut caps: std::collections::HashSet<Capability> = CAPS.iter().copied().collect();
    if drop.iter().any(|d| d.eq_ignore_ascii_case("ALL")) {
        caps.clear();
    }
    for name in add {
        caps.insert(capability(name)?);
    }
    for name in drop.iter().filter(|d| !d.eq_ignore_ascii_case("ALL")) {
        caps.remove(&capability(name)?);
    }
    Ok(caps)
}

/// Docker's default capability set.
const CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Syscalls a container may not make (EPERM): kernel modules and kexec, host clock and swap,
/// keyrings, BPF and perf, handle-based opens, namespace games and raw I/O ports. Everything else
/// is allowed and further bounded by the user namespace and the capability set.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "personality",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
    "_sysctl",
    "adjtimex",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
];

/// The system calls every container is denied, by name (those libseccomp knows on this
/// architecture).
pub fn denied_syscalls() -> impl Iterator<Item = &'static str> {
    DENIED_SYSCALLS
        .iter()
        .copied()
        // libseccomp refuses names it does not know on this architecture.
        .filter(|n| !matches!(*n, "vm86" | "vm86old" | "stime" | "umount"))
}

/// The default seccomp profile.
/// Whether a process under `profile` may call `rt_sigaction` and `rt_sigprocmask` with any
/// arguments: no rule gives either another action, and each is allowed by a rule without
/// argument conditions or by the default action.
pub fn signal_calls_allowed(profile: Option<&LinuxSeccomp>) -> bool {
    let Some(p) = profile else {
        return true;
    };
    let allow = |a: LinuxSeccompAction| matches!(a, LinuxSeccompAction::ScmpActAllow);
    let rules = p.syscalls().as_deref().unwrap_or_default();
    ["rt_sigaction", "rt_sigprocmask"].iter().all(|name| {
        let listing = || rules.iter().filter(|r| r.names().iter().any(|n| n == name));
        if listing().any(|r| !allow(r.action())) {
            return false;
        }
        allow(p.default_action())
            || listing().any(|r| r.args().as_ref().is_none_or(|a| a.is_empty()))
    })
}

pub fn default_seccomp() -> Result<LinuxSeccomp, SpecError> {
    let denied: Vec<String> = denied_syscalls().map(str::to_string).collect();
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .syscalls(vec![
            LinuxSyscallBuilder::default()
                .names(denied)
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(libc::EPERM as u32)
                .build()?,
        ])
        .build()?)
}

fn dev(
    typ: LinuxDeviceType,
    major: Option<i64>,
    minor: Option<i64>,
    allow: bool,
) -> Result<LinuxDeviceCgroup, SpecError> {
    let mut b = LinuxDeviceCgroupBuilder::default()
        .allow(allow)
        .typ(typ)
        .access("rwm");
    if let Some(m) = major {
        b = b.major(m);
    }
    if let Some(m) = minor {
        b = b.minor(m);
    }
    Ok(b.build()?)
}

/// Deny every device, then allow the standard ones (null, zero, full, random, urandom, tty, ptmx
/// and the pty slaves), as runc and Docker do.
fn device_rules() -> Result<Vec<LinuxDeviceCgroup>, SpecError> {
    let c = LinuxDeviceType::C;
    Ok(vec![
        dev(LinuxDeviceType::A, None, None, false)?,
        dev(c, Some(1), Some(3), true)?,
        dev(c, Some(1), Some(5), true)?,
        dev(c, Some(1), Some(7), true)?,
        dev(c, Some(1), Some(8), true)?,
        dev(c, Some(1), Some(9), true)?,
        dev(c, Some(5), Some(0), true)?,
        dev(c, Some(5), Some(2), true)?,
        dev(c, Some(136), None, true)?,
    ])
}

/// The device cgroup rule that lets a container use the device node at `path` with `access`.
fn device_rule(path: &std::path::Path, access: &str) -> Result<LinuxDeviceCgroup, SpecError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let bad = |why: &str| SpecError::Mount(format!("device {}: {why}", path.display()));
    if access.is_empty() || !access.chars().all(|c| "rwm".contains(c)) {
        return Err(bad(&format!(
            "access {access:?} must be letters of \"rwm\""
        )));
    }
    let m = std::fs::metadata(path).map_err(|e| bad(&e.to_string()))?;
    let typ = if m.file_type().is_char_device() {
        LinuxDeviceType::C
    } else if m.file_type().is_block_device() {
        LinuxDeviceType::B
    } else {
        return Err(bad("is not a char or block device"));
    };
    let (major, minor) = (
        nix::sys::stat::major(m.rdev()),
        nix::sys::stat::minor(m.rdev()),
    );
    LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .typ(typ)
        .major(i64::try_from(major).map_err(|_| bad("major number out of range"))?)
        .minor(i64::try_from(minor).map_err(|_| bad("minor number out of range"))?)
        .access(access)
        .build()
        .map_err(SpecError::from)
}

/// A recursive read-only bind of `host` at `inside`, with nothing to execute, no devices and no
/// setuid.
fn ro_bind(inside: &str, host: &Path) -> Result<oci_spec::runtime::Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(inside)
        .typ("bind")
        .source(host)
        .options(
            ["rbind", "ro", "nosuid", "nodev", "noexec"]
                .map(String::from)
                .to_vec(),
        )
        .build()?)
}

/// Builds the spec.
pub fn build(c: &ContainerSpec<'_>) -> Result<Spec, SpecError> {
    let mut spec = Spec::default();
    if let Some(view) = c.cgroup_view {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for m in mounts
            .iter_mut()
            .filter(|m| m.destination() == Path::new("/sys/fs/cgroup"))
        {
            // Recursive: the view is a tmpfs with a bind per hierarchy below it, each
            // read-only already.
            *m = ro_bind("/sys/fs/cgroup", view)?;
        }
        spec.set_mounts(Some(mounts));
    }
    spec.set_hostname(Some(c.hostname.to_string()));
    spec.set_root(Some(
        RootBuilder::default()
            .path(c.rootfs)
            .readonly(c.readonly_rootfs)
            .build()?,
    ));
    let mut env: Vec<String> = c.env.to_vec();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={}", super::rootfs::DEFAULT_PATH));
    }
    let caps = capabilities_with(c.cap_drop, c.cap_add)?;
    let mut capabilities = LinuxCapabilities::default();
    capabilities.set_bounding(Some(caps.clone()));
    capabilities.set_effective(Some(caps.clone()));
    capabilities.set_permitted(Some(caps));
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);
    let process = ProcessBuilder::default()
        .terminal(c.tty)
        .user(
            UserBuilder::default()
                .uid(c.uid)
                .gid(c.gid)
                .additional_gids(c.supplemental_groups.to_vec())
                .build()?,
        )
        .args(c.command.to_vec())
        .env(env)
        .cwd(if c.workdir.is_empty() { "/" } else { c.workdir })
        .capabilities(capabilities)
        .no_new_privileges(true)
        .build()?;
    let mut process = process;
    if !c.no_new_privileges {
        // Unset rather than false (oci-spec's default is true): libcontainer 0.7 then loads
        // the seccomp filter before it drops the capabilities (loading one needs
        // CAP_SYS_ADMIN in the user namespace, or no-new-privileges).
        process.set_no_new_privileges(None);
    }
    spec.set_process(Some(process));
    if !c.mounts.is_empty() {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for b in c.mounts {
            check_bind(&b.host, &b.inside)?;
            let propagation = if b.host_to_container {
                "rslave"
            } else {
                "rprivate"
            };
            let mut options: Vec<String> =
                ["rbind", propagation, "nosuid"].map(String::from).to_vec();
            // A device node must stay usable; nothing else bound in may hold one.
            if b.device_access.is_empty() {
                options.push("nodev".into());
            }
            options.push(if b.readonly { "ro" } else { "rw" }.into());
            // Mounts below it read-only too (mount_setattr with AT_RECURSIVE).
            if b.readonly && b.recursive_read_only {
                options.push("rro".into());
            }
            mounts.push(
                MountBuilder::default()
                    .destination(&b.inside)
                    .typ("bind")
                    .source(&b.host)
                    .options(options)
                    .build()?,
            );
        }
        spec.set_mounts(Some(mounts));
    }
    if let Some(conf) = c.resolv_conf {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        mounts.push(ro_bind("/etc/resolv.conf", conf)?);
        spec.set_mounts(Some(mounts));
    }

    let ns = |t, path: Option<&Path>| {
        let b = LinuxNamespaceBuilder::default().typ(t);
        match path {
            Some(p) => b.path(p).build(),
            None => b.build(),
        }
    };
    let mut rules = device_rules()?;
    for b in c.mounts.iter().filter(|b| !b.device_access.is_empty()) {
        rules.push(device_rule(&b.host, &b.device_access)?);
    }
    let mut resources = LinuxResourcesBuilder::default().devices(rules);
    if let Some(m) = c.memory_bytes {
        let m = i64::try_from(m).unwrap_or(i64::MAX);
        resources = resources.memory(LinuxMemoryBuilder::default().limit(m).swap(m).build()?);
    }
    if let Some(p) = c.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(i64::try_from(p).unwrap_or(i64::MAX))
                .build()?,
        );
    }
    if c.cpus.is_some() || c.cpu_shares.is_some() {
        let mut cpu = LinuxCpuBuilder::default();
        if let Some(cpus) = c.cpus {
            cpu = cpu
                .period(CFS_PERIOD_US)
                .quota(crate::cgroups::tenant::cfs_quota_us(cpus) as i64);
        }
        if let Some(s) = c.cpu_shares {
            cpu = cpu.shares(s);
        }
        resources = resources.cpu(cpu.build()?);
    }
    let defaults = spec.linux().clone().unwrap_or_default();
    let linux = LinuxBuilder::default()
        .namespaces(vec![
            ns(LinuxNamespaceType::Pid, c.pidns)?,
            ns(LinuxNamespaceType::Ipc, None)?,
            ns(LinuxNamespaceType::Uts, None)?,
            ns(LinuxNamespaceType::Mount, None)?,
            ns(LinuxNamespaceType::User, Some(&c.ns_dir.join("user")))?,
            ns(
                LinuxNamespaceType::Network,
                Some(c.netns.unwrap_or(&c.ns_dir.join("net"))),
            )?,
        ])
        .cgroups_path(c.cgroup)
        .resources(resources.build()?)
        .masked_paths(with_extra(defaults.masked_paths(), c.masked_paths))
        .readonly_paths(with_extra(defaults.readonly_paths(), c.readonly_paths))
        .seccomp(match c.seccomp {
            Some(json) => serde_json::from_str::<LinuxSeccomp>(json)
                .map_err(|e| SpecError::Seccomp(e.to_string()))?,
            None => default_seccomp()?,
        })
        .sysctl(
            c.sysctls
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::HashMap<_, _>>(),
        )
        .build()?;
    let mut linux = linux;
    if c.unconfined {
        linux.set_seccomp(None);
    }
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Whether a kernel parameter may be set in a container: it must belong to a namespace the
/// container has of its own (IPC; network with `own_netns`), never one that changes the host.
/// The error says why.
pub fn check_sysctl(name: &str, value: &str, own_netns: bool) -> Result<(), String> {
    let ipc = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        || name.contains("..")
    {
        return Err(format!("{name:?} is not a kernel parameter name"));
    }
    if value.is_empty() || value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(format!(
            "{name}: the value {value:?} is empty or has control characters"
        ));
    }
    if ipc.contains(&name) || name.starts_with("fs.mqueue.") {
        return Ok(());
    }
    if name.starts_with("net.") {
        return if own_netns {
            Ok(())
        } else {
            Err(format!(
                "{name} would change the network namespace the whole tenant shares; it needs a pod network namespace of its own ([cri.cni])"
            ))
        };
    }
    Err(format!(
        "{name} is not namespaced (only kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.* and net.* are): setting it would change the host"
    ))
}

/// The default paths and, after them, the extra ones they lack: never fewer than the defaults.
fn with_extra(defaults: &Option<Vec<String>>, extra: &[String]) -> Vec<String> {
    let mut all = defaults.clone().unwrap_or_default();
    for p in extra {
        if !all.contains(p) {
            all.push(p.clone());
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(v: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn signal_calls_are_allowed_only_where_the_profile_lets_them_through() {
        assert!(signal_calls_allowed(None));
        assert!(signal_calls_allowed(Some(&default_seccomp().unwrap())));
        let both = ["rt_sigaction", "rt_sigprocmask"];
        let allowlist = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": both, "action": "SCMP_ACT_ALLOW"}]
        }));
        assert!(signal_calls_allowed(Some(&allowlist)));
        let strict = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_KILL",
            "syscalls": [{"names": ["read", "write", "rt_sigprocmask"], "action": "SCMP_ACT_ALLOW"}]
        }));
        assert!(!signal_calls_allowed(Some(&strict)));
        let denied = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["rt_sigaction"], "action": "SCMP_ACT_ERRNO"}]
        }));
        assert!(!signal_calls_allowed(Some(&denied)));
        let conditional = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["rt_sigprocmask"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["rt_sigaction"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 10, "op": "SCMP_CMP_EQ"}]}
            ]
        }));
        assert!(!signal_calls_allowed(Some(&conditional)));
    }
}
