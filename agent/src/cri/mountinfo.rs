//! Where a bind mount comes from, read from `/proc/self/mountinfo`.
//!
//! kubelet binds a volume's subPath under the pod's own `pods/<uid>/volume-subpaths/`, so the
//! path a container's mount names lies in the pod's directory whatever volume it came from (a
//! host path's too). The bind's source is what must pass the volume checks: the directory the
//! same file system shows the bound tree at, in another mount of it.

use std::path::{Path, PathBuf};

/// One line of mountinfo: what is needed here.
#[derive(Debug, Clone, PartialEq)]
struct Mount {
    /// `major:minor` of the file system.
    dev: String,
    /// The directory of the file system this mount shows.
    root: PathBuf,
    /// Where it is mounted.
    point: PathBuf,
    /// It is shared (`shared:N` among its optional fields): what is mounted below it in this
    /// namespace reaches its peers, such as a bind of it. A slave that is not shared receives
    /// its master's mounts, but passes on nothing mounted on it here.
    receives: bool,
}

/// A path field of mountinfo as it is: mountinfo escapes space, tab, newline and backslash
/// as `\ooo`.
pub fn unescape(s: &str) -> String {
    String::from_utf8_lossy(&crate::fsutil::unescape_mountinfo(s.as_bytes())).into_owned()
}

fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_id, _parent) = (f.next()?, f.next()?);
            let dev = f.next()?.to_string();
            let root = PathBuf::from(unescape(f.next()?));
            let point = PathBuf::from(unescape(f.next()?));
            let _options = f.next()?;
            let receives = f
                .take_while(|x| *x != "-")
                .any(|x| x.starts_with("shared:"));
            Some(Mount {
                dev,
                root,
                point,
                receives,
            })
        })
        .collect()
}

/// The mount `path` lies in: the deepest mount point above it, the last one mounted there.
fn containing<'a>(path: &Path, mounts: &'a [Mount]) -> Option<&'a Mount> {
    let deepest = mounts
        .iter()
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| m.point.components().count())?;
    mounts.iter().rev().find(|x| x.point == deepest.point)
}

/// The mount point of the mount `path` lies in, and whether that mount is shared: what a bind
/// of `path` that is to follow what the host (kubelet) mounts below it needs.
pub fn propagation(path: &Path, mountinfo: &str) -> Option<(PathBuf, bool)> {
    let mounts = parse(mountinfo);
    containing(path, &mounts).map(|m| (m.point.clone(), m.receives))
}

/// The mount `path` lies in (its mount point), and the places that show the same directory
/// through the other mounts of its file system: for a path in a bind of a subdirectory, that
/// directory where the file system is mounted as a whole (or in any other mount of it whose
/// root holds it). No places when no other mount shows it.
pub fn sources(path: &Path, mountinfo: &str) -> Option<(PathBuf, Vec<PathBuf>)> {
    let mounts = parse(mountinfo);
    let m = containing(path, &mounts)?;
    let rel = path.strip_prefix(&m.point).ok()?;
    let inner = m.root.join(rel);
    let places = mounts
        .iter()
        .filter(|n| n.dev == m.dev && n.point != m.point && inner.starts_with(&n.root))
        .filter_map(|n| Some(n.point.join(inner.strip_prefix(&n.root).ok()?)))
        .collect();
    Some((m.point.clone(), places))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/cm rw - tmpfs tmpfs rw
40 22 8:1 /etc /var/lib/kubelet/pods/u1/volume-subpaths/host/c/0 rw - ext4 /dev/sda1 rw
41 22 8:1 /var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/e/sub /var/lib/kubelet/pods/u1/volume-subpaths/e/c/1 rw - ext4 /dev/sda1 rw
42 22 0:25 /..data/key /var/lib/kubelet/pods/u1/volume-subpaths/cm/c/2 rw - tmpfs tmpfs rw
43 22 0:99 /x /var/lib/kubelet/pods/u1/volume-subpaths/gone/c/3 rw - tmpfs tmpfs rw
44 22 8:1 /srv/with\\040space /mnt/sp rw - ext4 /dev/sda1 rw
45 22 8:2 / /boot rw - ext4 /dev/sda2 rw
46 22 8:2 / /var/lib/kubelet/pods/u1/volume-subpaths/boot/c/4 rw - ext4 /dev/sda2 rw
";

    fn s(p: &str) -> (PathBuf, Vec<PathBuf>) {
        sources(Path::new(p), INFO).unwrap()
    }

    fn pb(p: &str) -> PathBuf {
        PathBuf::from(p)
    }

    #[test]
    fn a_mount_passes_on_the_hosts_mounts_only_when_shared() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /srv/private rw - tmpfs tmpfs rw
31 22 0:26 / /srv/shared rw shared:7 - tmpfs tmpfs rw
32 22 0:27 / /srv/slave rw master:7 - tmpfs tmpfs rw
33 22 0:28 / /srv/private rw,nosuid shared:9 master:3 - tmpfs tmpfs rw
";
        let p = |x: &str| propagation(Path::new(x), info).unwrap();
        assert_eq!(p("/srv/shared/a/b"), (pb("/srv/shared"), true));
        // A slave only: what is mounted on it here does not reach a bind of it.
        assert_eq!(p("/srv/slave"), (pb("/srv/slave"), false));
        assert_eq!(p("/etc"), (pb("/"), true));
        // The last mount on a point covers the one before.
        assert_eq!(p("/srv/private/x"), (pb("/srv/private"), true));
        let only_private = "30 22 0:25 / /srv rw - tmpfs tmpfs rw\n";
        assert_eq!(
            propagation(Path::new("/srv/x"), only_private),
            Some((pb("/srv"), false))
        );
        assert_eq!(propagation(Path::new("/etc"), only_private), None);
    }

    #[test]
    fn a_path_in_a_mount_of_a_whole_file_system_is_that_mount_s() {
        let e = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/e";
        assert_eq!(s(e).0, pb("/"));
        let cm = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/cm";
        assert_eq!(s(&format!("{cm}/a")).0, pb(cm));
    }

    #[test]
    fn a_subpath_bind_leads_back_to_what_it_binds() {
        let sub = "/var/lib/kubelet/pods/u1/volume-subpaths";
        // A host path's subPath: /etc.
        assert_eq!(
            s(&format!("{sub}/host/c/0")),
            (pb(&format!("{sub}/host/c/0")), vec![pb("/etc")])
        );
        assert_eq!(s(&format!("{sub}/host/c/0/ssh")).1, vec![pb("/etc/ssh")]);
        // An emptyDir's and a config map's: the pod's own volumes.
        assert_eq!(
            s(&format!("{sub}/e/c/1")).1,
            vec![pb(
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/e/sub"
            )]
        );
        assert_eq!(
            s(&format!("{sub}/cm/c/2")).1,
            vec![pb(
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/cm/..data/key"
            )]
        );
        // A file system no other mount shows.
        assert!(s(&format!("{sub}/gone/c/3")).1.is_empty());
        // A bind of a whole file system's root: where else it is mounted.
        assert_eq!(s(&format!("{sub}/boot/c/4/grub")).1, vec![pb("/boot/grub")]);
        // Escaped names.
        assert_eq!(s("/mnt/sp/f").1, vec![pb("/srv/with space/f")]);
    }
}
