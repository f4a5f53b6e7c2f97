//! Root filesystems. A host rootfs directory is copied once per tenant into the tenant's image
//! store with every owner shifted into the tenant's uid/gid range, so container root owns its
//! files; each container then gets an overlay of that copy with its own writable upper layer.
//!
//! Paths inside a rootfs are resolved with [`scoped_resolve`], which follows symlinks but never
//! leaves the root.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash, Hasher},
    io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use nix::mount::{MntFlags, MsFlags};

use crate::tenants::idrange::RANGE_SIZE;

/// Ids a user may have inside: the tenant's range maps 0..65536.
const MAX_INSIDE_ID: u32 = RANGE_SIZE - 1;

/// The uid and gid of `user` (`uid`, `uid:gid`, `name` or `name:group`, as an image's `User`)
/// inside the rootfs at `root`; names come from its /etc/passwd and /etc/group. Empty = root.
pub fn resolve_user(root: &Path, user: &str) -> Result<(u32, u32), RootfsError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let bad = |why: String| RootfsError::Image(format!("user {user:?}: {why}"));
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    // name:x:uid:gid:... (passwd) or name:x:gid:... (group).
    let lookup = |file: &str, name: &str| -> Result<Option<(u32, Option<u32>)>, RootfsError> {
        let path = scoped_resolve(root, Path::new(file)).map_err(io_err(root))?;
        let text = match crate::fsutil::read_capped(&path, 4 << 20) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        for l in text.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 3
                && f[0] == name
                && let Ok(id) = f[2].parse::<u32>()
            {
                return Ok(Some((id, f.get(3).and_then(|g| g.parse::<u32>().ok()))));
            }
        }
        Ok(None)
    };
    let (uid, passwd_gid) = match u.parse::<u32>() {
        Ok(n) => (n, None),
        Err(_) => lookup("/etc/passwd", u)?
            .ok_or_else(|| bad(format!("{u:?} is not in the image's /etc/passwd")))?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                lookup("/etc/group", g)?
                    .ok_or_else(|| bad(format!("group {g:?} is not in the image's /etc/group")))?
                    .0
            }
        },
        None => passwd_gid.unwrap_or(0),
    };
    if uid > MAX_INSIDE_ID || gid > MAX_INSIDE_ID {
        return Err(bad(format!(
            "ids above {MAX_INSIDE_ID} are outside the tenant's range"
        )));
    }
    Ok((uid, gid))
}

/// The groups the image's /etc/group lists the user with uid `uid` as a member of (by the
/// name /etc/passwd gives that uid); none when either file is missing or the uid has no name.
pub fn image_groups(root: &Path, uid: u32) -> Vec<u32> {
    let read = |file: &str| -> Option<String> {
        let path = scoped_resolve(root, Path::new(file)).ok()?;
        crate::fsutil::read_capped(&path, 4 << 20)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let Some(name) = read("/etc/passwd").and_then(|t| {
        t.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_string())
        })
    }) else {
        return Vec::new();
    };
    let Some(groups) = read("/etc/group") else {
        return Vec::new();
    };
    groups
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let member = f.get(3)?.split(',').any(|m| m.trim() == name);
            let gid = f.get(2)?.parse::<u32>().ok()?;
            (member && gid <= MAX_INSIDE_ID).then_some(gid)
        })
        .collect()
}

/// The PATH used to find a command when the container sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Most symlinks followed while resolving one path (as the kernel's ELOOP limit).
const MAX_SYMLINKS: usize = 40;

/// A rootfs problem, named for the client.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The source does not exist or is neither a directory nor an OCI layout.
    #[error("rootfs_path {0}: does not exist, or is neither a directory nor an OCI image layout")]
    Missing(PathBuf),
    /// The command is not in the image.
    #[error("command {command:?} is not in the image (looked in {searched})")]
    CommandNotFound {
        /// What was asked for.
        command: String,
        /// Where it was looked for.
        searched: String,
    },
    /// An OCI image layout could not be used (bad layout, digest mismatch, refused entry).
    #[error("{0}")]
    Image(String),
    /// A file operation failed.
    #[error("rootfs {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Resolves `path` inside `root` like the kernel would after a chroot to `root`: `..` stops at
/// the root and absolute symlink targets start again at the root. Returns the host path.
pub fn scoped_resolve(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut stack: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            stack.pop();
            continue;
        }
        let candidate: PathBuf = root.join(stack.iter().collect::<PathBuf>()).join(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(io::Error::other("too many levels of symbolic links"));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    stack.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => stack.push(part),
        }
    }
    Ok(root.join(stack.iter().collect::<PathBuf>()))
}

/// Finds `command` in the image as the container would run it; errors name the command.
pub fn find_command(root: &Path, command: &str, env: &[String]) -> Result<(), RootfsError> {
    let is_exec = |p: &Path| {
        scoped_resolve(root, p)
            .and_then(fs::metadata)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if command.contains('/') {
        return if is_exec(Path::new(command)) {
            Ok(())
        } else {
            Err(RootfsError::CommandNotFound {
                command: command.into(),
                searched: command.into(),
            })
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    if path
        .split(':')
        .any(|d| is_exec(&Path::new(d).join(command)))
    {
        Ok(())
    } else {
        Err(RootfsError::CommandNotFound {
            command: command.into(),
            searched: format!("PATH={path}"),
        })
    }
}

fn shift(id: u32, start: u32) -> u32 {
    // Ids the tenant's range cannot hold become its "nobody" (65534), never a host id outside it.
    start + if id < RANGE_SIZE { id } else { 65_534 }
}

/// Returns the tenant's shifted copy of `src` (a rootfs directory, or an OCI image layout
/// directory or tarball), making it on first use. The copy is keyed by the source path and its
/// modification time, so a changed source gets a fresh copy.
pub fn prepare_image(images: &Path, src: &Path, id_start: u32) -> Result<PathBuf, RootfsError> {
    let meta = fs::metadata(src).map_err(|_| RootfsError::Missing(src.to_path_buf()))?;
    let layout = super::layout::is_layout(src);
    if !meta.is_dir() && !layout {
        return Err(RootfsError::Missing(src.to_path_buf()));
    }
    let mut h = DefaultHasher::new();
    src.hash(&mut h);
    meta.mtime().hash(&mut h);
    meta.mtime_nsec().hash(&mut h);
    let dest = images.join(format!("{:016x}", h.finish()));
    if dest.join(".complete").exists() {
        return Ok(dest.join("rootfs"));
    }
    let tmp = images.join(format!(".tmp-{:016x}-{}", h.finish(), std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let made = if layout {
        super::layout::unpack_image(src, &tmp.join("rootfs"), id_start, &tmp.join("layout"))
            .map_err(|e| RootfsError::Image(e.to_string()))
    } else {
        copy_shifted(src, &tmp.join("rootfs"), id_start)
    };
    if let Err(e) = made {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = fs::remove_dir_all(tmp.join("layout"));
    fs::write(tmp.join(".complete"), src.to_string_lossy().as_bytes()).map_err(io_err(&tmp))?;
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    Ok(dest.join("rootfs"))
}

fn copy_shifted(src: &Path, dst: &Path, start: u32) -> Result<(), RootfsError> {
    let m = fs::symlink_metadata(src).map_err(io_err(src))?;
    let (uid, gid) = (shift(m.uid(), start), shift(m.gid(), start));
    let ft = m.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src).map_err(io_err(src))?;
        std::os::unix::fs::symlink(&target, dst).map_err(io_err(dst))?;
        std::os::unix::fs::lchown(dst, Some(uid), Some(gid)).map_err(io_err(dst))?;
        return Ok(());
    }
    if ft.is_dir() {
        fs::create_dir(dst).map_err(io_err(dst))?;
        for e in fs::read_dir(src).map_err(io_err(src))? {
            let e = e.map_err(io_err(src))?;
            copy_shifted(&e.path(), &dst.join(e.file_name()), start)?;
        }
    } else if ft.is_file() {
        fs::copy(src, dst).map_err(io_err(dst))?;
    } else {
        // Device nodes, fifos and sockets are not carried over: /dev is the runtime's.
        return Ok(());
    }
    std::os::unix::fs::lchown(dst, Some(uid), Some(gid)).map_err(io_err(dst))?;
    // chown clears setuid/setgid; restore the mode, now that the owner is inside the range.
    fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777)).map_err(io_err(dst))
}

/// Mounts an overlay of `lowers` (topmost first) at `target` with a fresh writable layer under
/// `layer_dir`, owned by the tenant's root.
pub fn mount_overlay(
    lowers: &[PathBuf],
    layer_dir: &Path,
    target: &Path,
    id_start: u32,
) -> Result<(), RootfsError> {
    let lower = lowers.first().ok_or_else(|| RootfsError::Io {
        path: target.to_path_buf(),
        source: io::Error::other("an overlay needs at least one lower directory"),
    })?;
    let (upper, work) = (layer_dir.join("upper"), layer_dir.join("work"));
    for d in [&upper, &work, &target.to_path_buf()] {
        fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let root_mode = fs::metadata(lower)
        .map_err(io_err(lower))?
        .permissions()
        .mode();
    fs::set_permissions(&upper, fs::Permissions::from_mode(root_mode & 0o7777))
        .map_err(io_err(&upper))?;
    std::os::unix::fs::chown(&upper, Some(id_start), Some(id_start)).map_err(io_err(&upper))?;
    // `volatile`: the upper layer is never synced (not on fsync, not on unmount). It holds a
    // container's writes, which are deleted with the container and never reused after a host
    // crash (containers do not outlive the host here), so syncing bought nothing; it cost an
    // ext4 journal commit on every container's removal.
    let lowerdir = lowers
        .iter()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lowerdir},upperdir={},workdir={},volatile",
        upper.display(),
        work.display()
    );
    // The kernel takes one page of mount options.
    if opts.len() >= 4096 {
        return Err(RootfsError::Image(format!(
            "the image's {} layer paths do not fit in the overlay's 4096-byte mount options",
            lowers.len()
        )));
    }
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| RootfsError::Io {
        path: target.to_path_buf(),
        source: io::Error::from_raw_os_error(e as i32),
    })
}

/// Unmounts a container's overlay (missing mounts are fine).
pub fn unmount(target: &Path) {
    let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_groups_are_those_listing_the_user_as_member() {
        let d = tempfile::tempdir().unwrap();
        let etc = d.path().join("etc");
        fs::create_dir_all(&etc).unwrap();
        fs::write(
            etc.join("passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            etc.join("group"),
            "root:x:0:\nwheel:x:10:root, app\naudio:x:63:other\napp:x:1000:\nhuge:x:70000:app\n",
        )
        .unwrap();
        assert_eq!(image_groups(d.path(), 1000), vec![10]);
        assert_eq!(image_groups(d.path(), 0), vec![10]);
        // A uid without a name has no memberships.
        assert!(image_groups(d.path(), 4242).is_empty());
    }

    #[test]
    fn scoped_resolution_never_leaves_the_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("bin")).unwrap();
        fs::write(r.join("bin/busybox"), b"x").unwrap();
        std::os::unix::fs::symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", r.join("escape")).unwrap();
        std::os::unix::fs::symlink("/", r.join("a")).unwrap();
        assert_eq!(
            scoped_resolve(r, Path::new("/bin/sh")).unwrap(),
            r.join("bin/busybox")
        );
        assert_eq!(
            scoped_resolve(r, Path::new("/escape/passwd")).unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(
            scoped_resolve(r, Path::new("a/etc/x")).unwrap(),
            r.join("etc/x")
        );
        assert_eq!(
            scoped_resolve(r, Path::new("../../..")).unwrap(),
            r.to_path_buf()
        );
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert!(scoped_resolve(r, Path::new("loop")).is_err());
    }

    #[test]
    fn users_resolve_by_number_or_through_the_images_own_files() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(
            r.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nweb:x:101:102::/:/bin/false\n",
        )
        .unwrap();
        fs::write(r.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(r, "").unwrap(), (0, 0));
        assert_eq!(resolve_user(r, "1000").unwrap(), (1000, 0));
        assert_eq!(resolve_user(r, "1000:1001").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(r, "web").unwrap(), (101, 102));
        assert_eq!(resolve_user(r, "web:staff").unwrap(), (101, 50));
        let e = resolve_user(r, "nobody").unwrap_err().to_string();
        assert!(e.contains("\"nobody\"") && e.contains("/etc/passwd"), "{e}");
        assert!(resolve_user(r, "web:wheel").is_err());
        assert!(
            resolve_user(r, "70000").is_err(),
            "outside the tenant's range"
        );
        // /etc/passwd as a symlink out of the root is read inside it.
        fs::remove_file(r.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("etc/passwd")).unwrap();
        // (The host's own /etc/passwd has `daemon`.)
        assert!(
            resolve_user(r, "daemon").is_err(),
            "the host's passwd is never read"
        );
    }

    #[test]
    fn commands_are_found_through_links_and_path() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("bin")).unwrap();
        fs::write(r.join("bin/busybox"), b"x").unwrap();
        fs::set_permissions(r.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        find_command(r, "sh", &[]).unwrap();
        find_command(r, "/bin/sh", &[]).unwrap();
        let e = find_command(r, "nope", &[]).unwrap_err().to_string();
        assert!(e.contains("\"nope\"") && e.contains("PATH="), "{e}");
        assert!(find_command(r, "sh", &["PATH=/usr/bin".into()]).is_err());
    }

    #[test]
    fn shifted_copy_keeps_modes_and_moves_owners() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/tool"), b"x").unwrap();
        fs::set_permissions(src.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("tool", src.join("bin/t")).unwrap();
        if !crate::testing::require_root("shifted_copy_keeps_modes_and_moves_owners") {
            return;
        }
        let start = 300_000;
        let out = prepare_image(&d.path().join("images"), &src, start).unwrap();
        let m = fs::metadata(out.join("bin/tool")).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (start, 0o4755));
        assert_eq!(
            fs::symlink_metadata(out.join("bin/t")).unwrap().uid(),
            start
        );
        // Second call reuses the copy.
        assert_eq!(
            prepare_image(&d.path().join("images"), &src, start).unwrap(),
            out
        );
    }
}
