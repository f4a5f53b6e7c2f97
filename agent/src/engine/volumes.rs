//! Volumes staged on the host side before a container is made.
//!
//! A container's bind mounts are made by its init, inside the tenant's user namespace, as the
//! tenant's unprivileged root. That root cannot look up a host path behind a directory it may not
//! search, and kubelet keeps every pod's volumes behind such directories
//! (`/var/lib/kubelet/pods/<uid>` is 0750 root). So the engine, host root in the host's mount
//! namespace, first binds each volume at `<run>/volumes/<container>/<n>`, a path the tenant's root
//! can search (0711 directories), and the container's spec binds from there. What lies in the
//! volume keeps its own owners and modes: the staging only opens the way to it.
//!
//! The staged binds are private mounts (nothing propagates from or to them) and go with the
//! container. Anything that removes a tenant's run dir must unmount them first
//! ([`unmount_under`]), or removing the directory would reach into the volumes themselves.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use nix::mount::{MntFlags, MsFlags};

/// Where a container's volumes are staged.
pub fn dir(run: &Path, id: &str) -> PathBuf {
    run.join("volumes").join(id)
}

/// Binds each `(host path, container path, read-only)` at a staging path and returns the same
/// list with the staging paths. On error, what was staged is undone.
pub fn stage(
    run: &Path,
    id: &str,
    mounts: &[(PathBuf, String, bool)],
) -> Result<Vec<(PathBuf, String, bool)>, String> {
    if mounts.is_empty() {
        return Ok(Vec::new());
    }
    let r = stage_all(run, id, mounts);
    if r.is_err() {
        unstage(run, id);
    }
    r
}

fn stage_all(
    run: &Path,
    id: &str,
    mounts: &[(PathBuf, String, bool)],
) -> Result<Vec<(PathBuf, String, bool)>, String> {
    let base = dir(run, id);
    for d in [run.join("volumes"), base.clone()] {
        crate::fsutil::ensure_dir(&d, 0o711).map_err(|e| format!("{}: {e}", d.display()))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let mut out = Vec::with_capacity(mounts.len());
    for (i, (host, inside, ro)) in mounts.iter().enumerate() {
        let meta = fs::metadata(host).map_err(|e| {
            format!(
                "mounts[{i}]: host path {}: {e} (it must exist on this node)",
                host.display()
            )
        })?;
        let at = base.join(i.to_string());
        if meta.is_dir() {
            fs::create_dir(&at)
        } else {
            fs::File::create(&at).map(drop)
        }
        .map_err(|e| format!("{}: {e}", at.display()))?;
        nix::mount::mount(
            Some(host.as_path()),
            at.as_path(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("mounts[{i}]: binding {}: {e}", host.display()))?;
        nix::mount::mount(
            None::<&str>,
            at.as_path(),
            None::<&str>,
            MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("mounts[{i}]: making {} private: {e}", at.display()))?;
        out.push((at, inside.clone(), *ro));
    }
    Ok(out)
}

/// Unmounts and removes a container's staged volumes; none is fine.
pub fn unstage(run: &Path, id: &str) {
    let base = dir(run, id);
    unmount_under(&base);
    if let Ok(rd) = fs::read_dir(&base) {
        for e in rd.flatten() {
            // Only what is no longer a mount point is removed: never a volume's own content.
            let p = e.path();
            let _ = fs::remove_dir(&p).or_else(|_| fs::remove_file(&p));
        }
    }
    let _ = fs::remove_dir(&base);
}

/// Unmounts every mount at or below `dir` (deepest first), as seen in this process's mount
/// namespace. Call before removing a directory that may hold bind mounts.
pub fn unmount_under(dir: &Path) {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mount_points(&text)
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first; a path mounted more than once is unmounted as often.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, MntFlags::MNT_DETACH);
    }
}

/// The mount points listed in mountinfo text (field 5, with its octal escapes undone).
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|f| PathBuf::from(unescape(f)))
        .collect()
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_with_their_escapes_undone() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 98:0 / /run/x/volumes/c1/0 rw - ext4 /dev/sda rw\n";
        assert_eq!(
            mount_points(text),
            vec![
                PathBuf::from("/mnt/a b"),
                PathBuf::from("/run/x/volumes/c1/0")
            ]
        );
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }
}
