//! The cgroup2 mount option `favordynmods` (Linux 6.0+).
//!
//! Every move of a process into a cgroup (a write to `cgroup.procs`, on v1 as on v2) takes the
//! kernel's global `cgroup_threadgroup_rwsem` for writing. By default that lock is a per-CPU
//! rwsem that keeps forks and exits cheap and makes a writer wait for an RCU grace period first,
//! unless another writer came within the last one. On these machines that wait was 4.7 to 14.7 ms
//! for a move after a quiet moment, and 0.15 ms with `favordynmods`, which keeps the lock in its
//! writer-friendly mode at the price of a slightly costlier fork and exit. A container runtime
//! moves a process into a new cgroup for every container and every exec, so this is the setting
//! the kernel offers for hosts like this one. The lock is shared by all hierarchies, so setting
//! the option on the cgroup2 mount helps the v1 controllers of a hybrid host too.
//!
//! The option is a superblock flag, set by reconfiguring the superblock (`fspick` and
//! `fsconfig`), not by a mount(2) remount: that would also apply the mount's own flags, and a
//! read-only view of cgroupfs (systemd's `ProtectControlGroups`) would make the whole host's
//! cgroupfs read-only. The reconfiguration must pass the superblock's other flags again
//! (`nsdelegate`, `memory_recursiveprot`, ...), or they are cleared.

use std::{
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
};

/// The superblock option this module sets.
pub const OPTION: &str = "favordynmods";

/// A cgroup2 mount as `/proc/self/mountinfo` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Per-mount options (field 6), e.g. `rw,nosuid,nodev,noexec,relatime`.
    pub mount_options: String,
    /// Superblock options (after the fs type and source), e.g. `rw,nsdelegate`.
    pub super_options: String,
}

impl Cgroup2Mount {
    /// Whether `favordynmods` is on.
    pub fn favors_dynmods(&self) -> bool {
        self.super_options.split(',').any(|o| o == OPTION)
    }

    /// The superblock's flag parameters with `favordynmods` set to `on` and the rest kept.
    fn flags_with(&self, on: bool) -> Vec<&str> {
        let mut flags: Vec<&str> = self
            .super_options
            .split(',')
            .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro" && *o != OPTION)
            .collect();
        if on {
            flags.push(OPTION);
        }
        flags
    }
}

/// The cgroup2 mount at or below `root` (normally `/sys/fs/cgroup`: the whole hierarchy on a v2
/// host, `/sys/fs/cgroup/unified` on a hybrid one), from mountinfo text. The last one listed
/// wins, as it is the one on top.
pub fn find_cgroup2(mountinfo: &str, root: &Path) -> Option<Cgroup2Mount> {
    let mut found = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(mountpoint), Some(mount_options), Some(&"cgroup2"), Some(super_options)) =
            (left.get(4), left.get(5), right.first(), right.get(2))
        else {
            continue;
        };
        let mountpoint = PathBuf::from(std::ffi::OsString::from_vec(
            crate::fsutil::unescape_mountinfo(mountpoint.as_bytes()),
        ));
        if mountpoint.starts_with(root) {
            found = Some(Cgroup2Mount {
                mountpoint,
                mount_options: (*mount_options).to_string(),
                super_options: (*super_options).to_string(),
            });
        }
    }
    found
}

/// What [`set`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The option was already as asked on this mount.
    Unchanged(PathBuf),
    /// The mount was remounted with the option as asked.
    Changed(PathBuf),
    /// There is no cgroup2 mount under the root (a v1-only host): nothing to set it on.
    NoCgroup2,
}

/// Why [`set`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DynmodsError {
    /// mountinfo could not be read.
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(#[source] std::io::Error),
    /// The reconfiguration failed (EINVAL: a kernel before 6.0, which has no such option;
    /// EPERM: not root in the initial namespaces).
    #[error(
        "reconfiguring the cgroup2 file system at {} with options {data:?}: {source} (the kernel takes `favordynmods` from Linux 6.0; set [tenants] cgroup_favor_dynmods = false to leave the mount alone)",
        mountpoint.display()
    )]
    Remount {
        /// The mount.
        mountpoint: PathBuf,
        /// The flag parameters passed.
        data: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
}

/// Sets `favordynmods` on the cgroup2 mount under `root` to `on`, keeping its other options.
pub fn set(root: &Path, on: bool) -> Result<Outcome, DynmodsError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(DynmodsError::Mountinfo)?;
    let Some(m) = find_cgroup2(&text, root) else {
        return Ok(Outcome::NoCgroup2);
    };
    if m.favors_dynmods() == on {
        return Ok(Outcome::Unchanged(m.mountpoint));
    }
    let flags = m.flags_with(on);
    crate::sys::reconfigure_flags(&m.mountpoint, &flags).map_err(|source| {
        DynmodsError::Remount {
            mountpoint: m.mountpoint.clone(),
            data: flags.join(","),
            source,
        }
    })?;
    Ok(Outcome::Changed(m.mountpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,memory
";

    #[test]
    fn the_cgroup2_mount_and_its_options_are_found() {
        let m = find_cgroup2(HYBRID, Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(m.mountpoint, Path::new("/sys/fs/cgroup/unified"));
        assert!(!m.favors_dynmods());
        let v1_only: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(find_cgroup2(&v1_only, Path::new("/sys/fs/cgroup")), None);
        // A cgroup2 mount elsewhere (a container's view, a test's) is not the host's.
        assert_eq!(find_cgroup2(HYBRID, Path::new("/elsewhere")), None);
        let spaced = "40 1 0:30 / /srv/a\\040b rw,relatime - cgroup2 none rw,favordynmods\n";
        let m = find_cgroup2(spaced, Path::new("/srv")).unwrap();
        assert_eq!(m.mountpoint, Path::new("/srv/a b"));
        assert!(m.favors_dynmods());
    }

    #[test]
    fn a_reconfiguration_keeps_the_superblocks_other_flags() {
        let m = find_cgroup2(HYBRID, Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(m.flags_with(true), ["nsdelegate", OPTION]);
        let on = Cgroup2Mount {
            super_options: "ro,favordynmods,memory_recursiveprot".into(),
            mount_options: "ro,noatime".into(),
            ..m
        };
        // The read-only state is the superblock's own, not a flag parameter: never passed.
        assert_eq!(on.flags_with(false), ["memory_recursiveprot"]);
    }

    /// On the host's own cgroup2 mount, as root: the option goes on and off, the other options
    /// stay, and the mount is left as it was found.
    #[test]
    fn the_option_is_set_on_the_hosts_cgroup2_mount() {
        const TEST: &str = "cgroups::dynmods::the_option_is_set_on_the_hosts_cgroup2_mount";
        if !crate::testing::require_root(TEST) {
            return;
        }
        let root = Path::new("/sys/fs/cgroup");
        let read = || {
            find_cgroup2(
                &std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
                root,
            )
        };
        let Some(before) = read() else {
            assert!(
                !crate::testing::privileged_required(),
                "{TEST}: no cgroup2 mount under {}, and CAAS_REQUIRE_PRIVILEGED=1 makes this test mandatory",
                root.display()
            );
            crate::testing::skip(TEST, "this host has no cgroup2 mount");
            return;
        };
        let was_on = before.favors_dynmods();
        let others = |m: &Cgroup2Mount| {
            let mut v: Vec<String> = m
                .super_options
                .split(',')
                .filter(|o| *o != OPTION)
                .map(str::to_string)
                .collect();
            v.sort();
            (v, m.mount_options.clone())
        };
        assert_eq!(
            set(root, false).unwrap(),
            if was_on {
                Outcome::Changed(before.mountpoint.clone())
            } else {
                Outcome::Unchanged(before.mountpoint.clone())
            }
        );
        assert!(!read().unwrap().favors_dynmods());
        assert_eq!(
            set(root, true).unwrap(),
            Outcome::Changed(before.mountpoint.clone())
        );
        let after = read().unwrap();
        assert!(after.favors_dynmods(), "{after:?}");
        assert_eq!(others(&after), others(&before));
        assert_eq!(
            set(root, true).unwrap(),
            Outcome::Unchanged(before.mountpoint.clone())
        );
        set(root, was_on).unwrap();
        assert_eq!(read().unwrap().favors_dynmods(), was_on);
    }
}
