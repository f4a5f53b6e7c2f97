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
//! The staged binds are private mounts (nothing propagates from or to them), except those asked
//! to follow the host's mounts (`host_to_container`, slaves of the host's mount), and go with
//! the container. Anything that removes a tenant's run dir must unmount them first
//! ([`unmount_under`]), or removing the directory would reach into the volumes themselves.

use std::{
    ffi::OsString,
    fs,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStringExt, fs::PermissionsExt},
    },
    path::{Path, PathBuf},
};

use super::spec::Bind;
use nix::{
    fcntl::{OFlag, OpenHow, ResolveFlag},
    mount::{MntFlags, MsFlags},
};

/// Where a container's volumes are staged.
pub fn dir(run: &Path, id: &str) -> PathBuf {
    run.join("volumes").join(id)
}

/// Makes `<run>/volumes` ready: owned by root and the tenant's root group (`gid`, the host id
/// of the tenant's gid 0) with mode 0710, so that only the tenant's root (and host root) may
/// pass it, and a private mount of its own, so that nothing staged under it propagates to
/// other mount namespaces.
fn prepare(run: &Path, gid: u32) -> Result<PathBuf, String> {
    let v = run.join("volumes");
    crate::fsutil::ensure_dir(&v, 0o710).map_err(|e| format!("{}: {e}", v.display()))?;
    nix::unistd::chown(&v, Some(0.into()), Some(gid.into()))
        .map_err(|e| format!("{}: {e}", v.display()))?;
    fs::set_permissions(&v, fs::Permissions::from_mode(0o710))
        .map_err(|e| format!("{}: {e}", v.display()))?;
    let canon = v
        .canonicalize()
        .map_err(|e| format!("{}: {e}", v.display()))?;
    if !mount_points().contains(&canon) {
        // Recursive: what is staged under it already (an engine of an earlier version) stays
        // visible through it, and is made private with it.
        nix::mount::mount(
            Some(&canon),
            &canon,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("binding {} onto itself: {e}", canon.display()))?;
        make_private(&canon)?;
    } else {
        // Only the mount itself: each staged bind below has the propagation it was given (a
        // recursive change would cut host-to-container binds off their host mounts).
        nix::mount::mount(
            None::<&str>,
            &canon,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("making {} private: {e}", canon.display()))?;
    }
    Ok(v)
}

/// Binds each `(host path, container path, read-only)` at a staging path and returns the same
/// list with the staging paths. `gid` is the host id of the tenant's root group; `userns` the
/// tenant's user namespace, which [`Bind::idmap`] volumes are shown through. On error, what
/// was staged is undone.
pub fn stage(
    run: &Path,
    id: &str,
    gid: u32,
    userns: &Path,
    mounts: &[Bind],
) -> Result<Vec<Bind>, String> {
    if mounts.is_empty() {
        return Ok(Vec::new());
    }
    let r = stage_all(run, id, gid, userns, mounts);
    if r.is_err() {
        unstage(run, id);
    }
    r
}

/// Makes a container's staging directory (and `<run>/volumes` with it) and returns it.
/// Whatever is mounted under it goes with [`unstage`].
pub fn base(run: &Path, id: &str, gid: u32) -> Result<PathBuf, String> {
    prepare(run, gid)?;
    let base = dir(run, id);
    crate::fsutil::ensure_dir(&base, 0o711).map_err(|e| format!("{}: {e}", base.display()))?;
    Ok(base)
}

fn stage_all(
    run: &Path,
    id: &str,
    gid: u32,
    userns: &Path,
    mounts: &[Bind],
) -> Result<Vec<Bind>, String> {
    let base = base(run, id, gid)?;
    let mut out = Vec::with_capacity(mounts.len());
    for (i, m) in mounts.iter().enumerate() {
        if m.image_layers.len() > 1 {
            let at = base.join(i.to_string());
            stage_image(&at, &m.image_layers).map_err(|e| format!("mounts[{i}]: {e}"))?;
            out.push(Bind {
                host: at,
                ..m.clone()
            });
            continue;
        }
        // An image of one layer is that layer, bound like a host path (read-only).
        let host = m.image_layers.first().unwrap_or(&m.host);
        // The agent checked the path with every symlink resolved; opened now with no symlink
        // allowed on the way, a component swapped for a link since then is refused, and the
        // bind is made from what was opened, not from the name again.
        let raw = nix::fcntl::openat2(
            libc::AT_FDCWD,
            host.as_path(),
            OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS),
        )
        .map_err(|e| {
            format!(
                "mounts[{i}]: host path {}: {e} (it must exist, with no symbolic link on the way)",
                host.display()
            )
        })?;
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let is_dir = nix::sys::stat::fstat(fd.as_raw_fd())
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
            .map_err(|e| format!("mounts[{i}]: {}: {e}", host.display()))?;
        let at = base.join(i.to_string());
        if is_dir {
            fs::create_dir(&at)
        } else {
            fs::File::create(&at).map(drop)
        }
        .map_err(|e| format!("{}: {e}", at.display()))?;
        let idmapped = m.idmap
            && !m.host_to_container
            && match bind_idmapped(&fd, &at, userns) {
                Ok(()) => true,
                // Nothing was mounted: a plain bind keeps host ids, as without the flag (a
                // file system that takes no idmapped mount, an older kernel, a source that is
                // idmapped already).
                Err(e) => {
                    tracing::warn!(volume = %host.display(), error = %e, "no idmapped mount of the volume could be made: bound with host ids, which the container sees as nobody outside the tenant's range");
                    false
                }
            };
        if !idmapped {
            let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
            nix::mount::mount(
                Some(source.as_str()),
                at.as_path(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| format!("mounts[{i}]: binding {}: {e}", host.display()))?;
        }
        if m.host_to_container {
            // The bind joined the host mount's peer group (a shared one) or its master's (a
            // slave one); as a slave of it, the host's later mounts below reach the container,
            // and nothing goes the other way.
            nix::mount::mount(
                None::<&str>,
                at.as_path(),
                None::<&str>,
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| format!("mounts[{i}]: making {} a slave: {e}", at.display()))?;
        } else {
            make_private(&at).map_err(|e| format!("mounts[{i}]: {e}"))?;
        }
        // Read-only here already: the container's mount namespace gets this mount locked
        // read-only, so its bind cannot be made writable from inside, whatever it may do.
        // (A bind remount sets nosuid, nodev and noexec to what it is given: the source's are
        // kept; given no atime flag, the kernel keeps the mount's own.)
        if m.readonly {
            use nix::sys::statvfs::FsFlags;
            let has = nix::sys::statvfs::statvfs(at.as_path())
                .map(|v| v.flags())
                .map_err(|e| format!("mounts[{i}]: {}: {e}", at.display()))?;
            let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            for (f, keep) in [
                (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            ] {
                if has.contains(f) {
                    flags |= keep;
                }
            }
            nix::mount::mount(
                None::<&str>,
                at.as_path(),
                None::<&str>,
                flags,
                None::<&str>,
            )
            .map_err(|e| format!("mounts[{i}]: making {} read-only: {e}", at.display()))?;
        }
        out.push(Bind {
            host: at,
            ..m.clone()
        });
    }
    Ok(out)
}

/// Mounts a clone of the tree `source` (with what is mounted below it) on `at`, idmapped
/// through the user namespace at `userns`: an owner k on disk is shown as the namespace's k,
/// and the namespace's ids are written to disk as themselves (open_tree, mount_setattr with
/// `MOUNT_ATTR_IDMAP`, move_mount; host root only, which the engine is).
fn bind_idmapped(source: &OwnedFd, at: &Path, userns: &Path) -> Result<(), nix::errno::Errno> {
    use std::os::unix::ffi::OsStrExt;
    let ns = fs::File::open(userns)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))?;
    // SAFETY: open_tree(2) with a descriptor we own and an empty path; the result is a new
    // descriptor owned at once.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            source.as_raw_fd(),
            c"".as_ptr(),
            libc::OPEN_TREE_CLONE
                | libc::OPEN_TREE_CLOEXEC
                | libc::AT_EMPTY_PATH as libc::c_uint
                | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    let tree = i32::try_from(tree).map_err(|_| nix::errno::Errno::EOVERFLOW)?;
    if tree < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: a new descriptor nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree) };
    let attr = libc::mount_attr {
        // nosuid and nodev as every volume is inside: here too, since what the container's root
        // writes is root's on disk.
        attr_set: libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(ns.as_raw_fd()).map_err(|_| nix::errno::Errno::EBADF)?,
    };
    // SAFETY: mount_setattr(2) on the detached tree, with an attr struct that outlives the call
    // and its size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    let target =
        std::ffi::CString::new(at.as_os_str().as_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    // SAFETY: move_mount(2) of the tree onto a path that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}

/// Mounts the read-only union of an image's layers (topmost first) on a new directory `at`,
/// private like every staged volume. (An overlay without an upper layer is read-only.)
fn stage_image(at: &Path, layers: &[PathBuf]) -> Result<(), String> {
    fs::create_dir(at).map_err(|e| format!("{}: {e}", at.display()))?;
    let lowerdir = layers
        .iter()
        .map(|l| {
            let s = l.display().to_string();
            // `:` separates layers and `,` options in the overlay's mount options.
            if s.contains([':', ',', '\\']) {
                Err(format!(
                    "image layer {s:?}: a path with ':', ',' or '\\' cannot be an overlay layer"
                ))
            } else {
                Ok(s)
            }
        })
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let opts = format!("lowerdir={lowerdir}");
    if opts.len() >= 4096 {
        return Err(format!(
            "the image's {} layer paths do not fit in the overlay's 4096-byte mount options",
            layers.len()
        ));
    }
    nix::mount::mount(
        Some("overlay"),
        at,
        Some("overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| format!("mounting the image's layers on {}: {e}", at.display()))?;
    make_private(at)
}

/// Makes the mount at `p` and those below it private: nothing propagates to or from other
/// mount namespaces.
fn make_private(p: &Path) -> Result<(), String> {
    nix::mount::mount(
        None::<&str>,
        p,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("making {} private: {e}", p.display()))
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

/// Unstages the volumes of containers the engine has no record of (an engine that died while
/// creating one).
pub fn unstage_orphans(run: &Path, known: &dyn Fn(&str) -> bool) {
    let Ok(rd) = fs::read_dir(run.join("volumes")) else {
        return;
    };
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if !known(&id) {
            tracing::info!(container = %id, "unstaging the volumes of a container that was never made");
            unstage(run, &id);
        }
    }
}

/// Unmounts every mount at or below `dir` (deepest first), as seen in this process's mount
/// namespace. True when none is left after: only then may the directory be removed.
pub fn unmount_under(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        // Not there: nothing is mounted on it.
        return true;
    };
    let under = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|p| p.starts_with(&dir))
            .collect();
        // Deepest first; a path mounted more than once is listed (and unmounted) as often.
        v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        v
    };
    // Passes until none is left or a pass unmounts nothing: a mount stacked over others hides
    // them until it goes.
    let mut left = under();
    for _ in 0..16 {
        if left.is_empty() {
            break;
        }
        for p in &left {
            if let Err(e) = nix::mount::umount2(p, MntFlags::MNT_DETACH) {
                tracing::debug!(mount = %p.display(), error = %e, "unmounting");
            }
        }
        let now = under();
        if now.len() >= left.len() {
            left = now;
            break;
        }
        left = now;
    }
    if !left.is_empty() {
        tracing::error!(dir = %dir.display(), mounts = ?left, "mounts are left under a directory about to be removed");
    }
    left.is_empty() && !mount_points_unreadable()
}

/// Whether this process's mountinfo cannot be read (then nothing may be assumed unmounted).
fn mount_points_unreadable() -> bool {
    fs::read("/proc/self/mountinfo").is_err()
}

/// The mount points of this process's mount namespace.
fn mount_points() -> Vec<PathBuf> {
    fs::read("/proc/self/mountinfo")
        .map(|b| parse_mount_points(&b))
        .unwrap_or_default()
}

/// The mount points listed in mountinfo bytes (field 5, with its octal escapes undone; names
/// need not be UTF-8).
fn parse_mount_points(mountinfo: &[u8]) -> Vec<PathBuf> {
    mountinfo
        .split(|b| *b == b'\n')
        .filter_map(|l| l.split(|b| *b == b' ').nth(4))
        .map(|f| PathBuf::from(OsString::from_vec(crate::fsutil::unescape_mountinfo(f))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_with_their_escapes_undone() {
        let text = b"36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 98:0 / /run/x/volumes/c1/0 rw - ext4 /dev/sda rw\n\
                    38 35 98:0 / /run/\xff rw - ext4 /dev/sda rw\n";
        let points = parse_mount_points(text);
        assert_eq!(
            points[2],
            PathBuf::from(OsString::from_vec(b"/run/\xff".to_vec()))
        );
        assert_eq!(
            points[..2].to_vec(),
            vec![
                PathBuf::from("/mnt/a b"),
                PathBuf::from("/run/x/volumes/c1/0")
            ]
        );
    }
}
