//! Detects the cgroup layout from `/proc/self/mountinfo`.
//!
//! - `v2`: one cgroup2 mount at the root (the production target).
//! - `v1`: controller hierarchies only.
//! - `hybrid`: v1 controllers plus a cgroup2 mount (usually `<root>/unified`) that holds no
//!   controllers; these build machines have it.

use std::{fmt, path::Path};

/// The host's cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Unified hierarchy only.
    V2,
    /// Legacy controller hierarchies only.
    V1,
    /// Legacy controllers and a (controller-less) cgroup2 mount.
    Hybrid,
    /// No cgroup mounts under the root.
    None,
}

impl fmt::Display for CgroupLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V2 => "v2",
            Self::V1 => "v1",
            Self::Hybrid => "hybrid",
            Self::None => "none",
        })
    }
}

/// Reads `/proc/self/mountinfo` and classifies the mounts under `root` (normally `/sys/fs/cgroup`).
pub fn detect_layout(root: &Path) -> std::io::Result<CgroupLayout> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_layout(&text, root))
}

/// Classifies the cgroup mounts under `root` in mountinfo text.
pub fn parse_layout(mountinfo: &str, root: &Path) -> CgroupLayout {
    let (mut v1, mut v2_at_root, mut v2_below) = (false, false, false);
    for line in mountinfo.lines() {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source ...
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mountpoint) = left.split(' ').nth(4) else {
            continue;
        };
        let Some(fstype) = right.split(' ').next() else {
            continue;
        };
        let mp = Path::new(mountpoint);
        if !mp.starts_with(root) {
            continue;
        }
        match fstype {
            "cgroup2" if mp == root => v2_at_root = true,
            "cgroup2" => v2_below = true,
            "cgroup" => v1 = true,
            _ => {}
        }
    }
    match (v1, v2_at_root, v2_below) {
        (false, true, _) => CgroupLayout::V2,
        (true, _, true) | (true, true, _) => CgroupLayout::Hybrid,
        (true, false, false) => CgroupLayout::V1,
        (false, false, true) => CgroupLayout::V2,
        (false, false, false) => CgroupLayout::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
28 26 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,cpu,cpuacct
29 26 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
";
    const V2: &str = "\
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate
";
    const V1: &str = "\
26 25 0:24 / /sys/fs/cgroup ro shared:8 - tmpfs tmpfs ro,mode=755
28 26 0:26 / /sys/fs/cgroup/cpu,cpuacct rw shared:10 - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn layouts() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(parse_layout(HYBRID, root), CgroupLayout::Hybrid);
        assert_eq!(parse_layout(V2, root), CgroupLayout::V2);
        assert_eq!(parse_layout(V1, root), CgroupLayout::V1);
        assert_eq!(parse_layout("", root), CgroupLayout::None);
        assert_eq!(
            parse_layout(V2, Path::new("/elsewhere")),
            CgroupLayout::None
        );
    }

    #[test]
    fn this_host_answers() {
        // Whatever the machine has, detection must not fail where /proc is mounted.
        detect_layout(Path::new("/sys/fs/cgroup")).unwrap();
    }
}
