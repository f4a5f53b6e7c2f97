//! Unpacking untrusted tar streams (image layers, layout tarballs) into a root filesystem.
//!
//! Nothing in a tarball is trusted: an entry whose path is absolute or holds `..`, whose parent
//! is a symlink, or a hardlink pointing outside the root is refused with an error naming the
//! entry, before anything of it is written. Owners are shifted into the tenant's range, device
//! nodes are skipped, OCI whiteouts are applied (or turned into overlayfs whiteouts, for a layer
//! kept in its own directory), and a size cap bounds what one image may write.

use std::{
    collections::HashSet,
    ffi::CString,
    fs,
    io::{self, Read},
    os::unix::{
        ffi::OsStrExt,
        fs::{OpenOptionsExt, PermissionsExt},
    },
    path::{Component, Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use crate::tenants::idrange::RANGE_SIZE;

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry would land outside the root, or is malformed.
    #[error("refused entry {entry:?}: {reason}")]
    Refused {
        /// The entry's path as stored.
        entry: String,
        /// Why.
        reason: String,
    },
    /// More bytes than the cap.
    #[error("the image is larger than the {cap}-byte cap")]
    TooLarge {
        /// The cap.
        cap: u64,
    },
    /// Reading the archive or writing a file failed.
    #[error("unpacking {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> UnpackError {
    let what = what.into();
    move |source| UnpackError::Io { what, source }
}

/// How owners map: `Some(start)` shifts ids into the tenant's range; `None` keeps them (a layout
/// tarball unpacked only to read its blobs).
#[derive(Debug, Clone, Copy)]
pub struct Unpack {
    /// First host id of the tenant's range.
    pub shift: Option<u32>,
    /// What OCI whiteout entries become.
    pub whiteouts: Whiteouts,
}

/// What OCI whiteout entries (`.wh.name`, `.wh..wh..opq`) become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Applied: the named file, or the directory's content, is deleted (layers unpacked on top
    /// of each other into one tree).
    Apply,
    /// Kept as overlayfs whiteouts: a 0/0 character device for a deleted name, the
    /// `trusted.overlay.opaque` attribute for an opaque directory (a layer in its own directory,
    /// stacked by an overlay mount).
    Overlay,
}

/// The bytes of file content one image may still write, shared by its layers (which may be
/// unpacked in parallel).
#[derive(Debug)]
pub struct Budget {
    used: AtomicU64,
    cap: u64,
}

impl Budget {
    /// A budget of `cap` bytes.
    pub fn new(cap: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            cap,
        }
    }

    /// Bytes taken so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: u64) -> Result<(), UnpackError> {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.cap {
            return Err(UnpackError::TooLarge { cap: self.cap });
        }
        Ok(())
    }
}

fn refused(entry: &str, reason: &str) -> UnpackError {
    UnpackError::Refused {
        entry: entry.into(),
        reason: reason.into(),
    }
}

/// Checks an archive path: relative, no `..`; returns its normal components.
fn clean(entry: &str, p: &Path) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused(entry, "its path climbs out with `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(entry, "its path is absolute"));
            }
        }
    }
    Ok(out)
}

/// The parent directory of `rel` under `root`, refusing symlinked or non-directory parents.
/// Missing parents are made, owned by the tenant's root when owners are shifted. `seen` holds
/// directories already checked (or made) by this unpack; it is emptied whenever anything is
/// removed, so a directory replaced by a symlink is checked again.
fn parent_dir(
    root: &Path,
    rel: &Path,
    entry: &str,
    shift: Option<u32>,
    seen: &mut HashSet<PathBuf>,
) -> Result<PathBuf, UnpackError> {
    let mut dir = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(dir);
    };
    dir.push(parent);
    if parent.as_os_str().is_empty() || seen.contains(&dir) {
        return Ok(dir);
    }
    dir = root.to_path_buf();
    for c in parent.components() {
        dir.push(c);
        if seen.contains(&dir) {
            continue;
        }
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refused(entry, "a parent directory is a symlink"));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(refused(entry, "a parent is not a directory")),
            Err(_) => {
                fs::create_dir(&dir).map_err(io_err(dir.display().to_string()))?;
                if let Some(start) = shift {
                    std::os::unix::fs::lchown(&dir, Some(start), Some(start))
                        .map_err(io_err(dir.display().to_string()))?;
                }
            }
        }
        seen.insert(dir.clone());
    }
    Ok(dir)
}

/// An overlayfs whiteout: a character device 0/0 at `p`.
fn overlay_whiteout(p: &Path) -> io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Marks `dir` opaque for overlayfs: lower layers' entries under it are hidden.
pub(crate) fn set_opaque(dir: &Path) -> io::Result<()> {
    overlay_opaque(dir)
}

/// Whether `dir` is marked opaque for overlayfs.
pub(crate) fn is_opaque(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut v = [0u8; 4];
    // SAFETY: both strings are NUL-terminated; `v` is writable for its length.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    n == 1 && v[0] == b'y'
}

/// Marks `dir` opaque for overlayfs: lower layers' entries under it are hidden.
fn overlay_opaque(dir: &Path) -> io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let (name, value) = (c"trusted.overlay.opaque", b"y");
    // SAFETY: both strings are NUL-terminated and valid for the call; `value` is 1 byte long.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn shifted(id: u64, shift: Option<u32>) -> Option<u32> {
    let start = shift?;
    let id = u32::try_from(id)
        .ok()
        .filter(|i| *i < RANGE_SIZE)
        .unwrap_or(65_534);
    Some(start + id)
}

/// Removes whatever is at `p`; returns whether something was there.
fn remove_any(p: &Path) -> bool {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
            true
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
            true
        }
        Err(_) => false,
    }
}

/// Unpacks one tar stream into `root`, taking file content from `budget`.
pub fn unpack(
    reader: impl Read,
    root: &Path,
    opts: Unpack,
    budget: &Budget,
) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(io_err("reading the archive"))? {
        let mut entry = entry.map_err(io_err("reading an entry"))?;
        let raw = entry.path().map_err(io_err("an entry path"))?.into_owned();
        let name = raw.display().to_string();
        let rel = clean(&name, &raw)?;
        let Some(file_name) = rel.file_name().map(|f| f.to_string_lossy().into_owned()) else {
            continue; // "." itself
        };
        let dir = parent_dir(root, &rel, &name, opts.shift, &mut seen)?;
        // OCI whiteouts: an opaque marker empties its directory; `.wh.x` deletes `x`.
        if file_name == ".wh..wh..opq" {
            if opts.whiteouts == Whiteouts::Overlay {
                overlay_opaque(&dir).map_err(io_err(name.clone()))?;
                continue;
            }
            for e in fs::read_dir(&dir)
                .map_err(io_err(dir.display().to_string()))?
                .flatten()
            {
                remove_any(&e.path());
            }
            seen.clear();
            continue;
        }
        if let Some(victim) = file_name.strip_prefix(".wh.") {
            if victim.is_empty() || victim == "." || victim == ".." || victim.contains('/') {
                return Err(refused(&name, "malformed whiteout"));
            }
            if remove_any(&dir.join(victim)) {
                seen.clear();
            }
            if opts.whiteouts == Whiteouts::Overlay {
                overlay_whiteout(&dir.join(victim)).map_err(io_err(name.clone()))?;
            }
            continue;
        }
        let dest = dir.join(&file_name);
        let header = entry.header();
        let mode = header.mode().map_err(io_err("an entry mode"))? & 0o7777;
        let uid = shifted(header.uid().unwrap_or(0), opts.shift);
        let gid = shifted(header.gid().unwrap_or(0), opts.shift);
        let kind = header.entry_type();
        if kind.is_dir() {
            match fs::symlink_metadata(&dest) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_any(&dest);
                    seen.clear();
                    fs::create_dir(&dest).map_err(io_err(name.clone()))?;
                }
                Err(_) => fs::create_dir(&dest).map_err(io_err(name.clone()))?,
            }
        } else if kind.is_file() {
            budget.take(header.size().unwrap_or(0))?;
            // O_EXCL|O_NOFOLLOW: never write through anything that appeared at that name.
            let create = || {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dest)
            };
            let mut f = match create() {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    remove_any(&dest);
                    seen.clear();
                    create()
                }
                other => other,
            }
            .map_err(io_err(name.clone()))?;
            io::copy(&mut entry, &mut f).map_err(io_err(name.clone()))?;
            // Owner, then mode (chown clears setuid/setgid), through the open file.
            if let (Some(u), Some(g)) = (uid, gid) {
                std::os::unix::fs::fchown(&f, Some(u), Some(g)).map_err(io_err(name.clone()))?;
            }
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err(name.clone()))?;
            continue;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(io_err("a link target"))?
                .ok_or_else(|| refused(&name, "symlink without a target"))?;
            if remove_any(&dest) {
                seen.clear();
            }
            // The target is kept as is: it is only ever resolved inside the container's root
            // (or by the scoped resolver), never followed on the host.
            std::os::unix::fs::symlink(&target, &dest).map_err(io_err(name.clone()))?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(io_err("a link target"))?
                .ok_or_else(|| refused(&name, "hardlink without a target"))?;
            let target_rel = clean(&name, &target)
                .map_err(|_| refused(&name, "its hardlink target lies outside the root"))?;
            let tdir = parent_dir(root, &target_rel, &name, opts.shift, &mut seen)?;
            let src = tdir.join(target_rel.file_name().unwrap_or_default());
            match fs::symlink_metadata(&src) {
                Ok(m) if m.is_file() => {}
                _ => {
                    return Err(refused(
                        &name,
                        "its hardlink target is not a regular file in this image",
                    ));
                }
            }
            if remove_any(&dest) {
                seen.clear();
            }
            fs::hard_link(&src, &dest).map_err(io_err(name.clone()))?;
            continue; // shares the target's owner and mode
        } else {
            // Devices, fifos, sockets: /dev is the runtime's.
            continue;
        }
        if let (Some(u), Some(g)) = (uid, gid) {
            std::os::unix::fs::lchown(&dest, Some(u), Some(g)).map_err(io_err(name.clone()))?;
        }
        if !kind.is_symlink() {
            // After chown, which clears setuid/setgid: the bits stay, owned inside the range.
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                .map_err(io_err(name.clone()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    /// Writes a raw path into the header, bypassing tar's own checks (attackers do not use them).
    fn raw_path(h: &mut tar::Header, p: &str) {
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..p.len()].copy_from_slice(p.as_bytes());
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8]) {
        let mut h = header(tar::EntryType::Regular, body.len() as u64);
        raw_path(&mut h, path);
        h.set_cksum();
        b.append(&h, body).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = header(kind, 0);
        raw_path(&mut h, path);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
    }

    const OPTS: Unpack = Unpack {
        shift: None,
        whiteouts: Whiteouts::Apply,
    };

    fn run(bytes: &[u8]) -> (tempfile::TempDir, Result<(), UnpackError>) {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("root")).unwrap();
        let r = unpack(bytes, &d.path().join("root"), OPTS, &Budget::new(1 << 20));
        (d, r)
    }

    #[test]
    fn escapes_are_refused_and_write_nothing_outside() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "../../etc/passwd",
                tarball(|b| file(b, "../../etc/passwd", b"x")),
            ),
            ("/etc/passwd", tarball(|b| file(b, "/etc/passwd", b"x"))),
            (
                "a/etc/x",
                tarball(|b| {
                    link(b, tar::EntryType::Symlink, "a", "/");
                    file(b, "a/etc/x", b"x");
                }),
            ),
            (
                "shadow",
                tarball(|b| link(b, tar::EntryType::Link, "shadow", "/etc/shadow")),
            ),
            (
                // A directory already checked, then replaced by a symlink out.
                "d/etc/x",
                tarball(|b| {
                    file(b, "d/f", b"x");
                    link(b, tar::EntryType::Symlink, "d", "/");
                    file(b, "d/etc/x", b"x");
                }),
            ),
            (
                "up",
                tarball(|b| link(b, tar::EntryType::Link, "up", "../outside")),
            ),
        ];
        for (entry, bytes) in cases {
            let (d, r) = run(&bytes);
            let e = r.unwrap_err().to_string();
            assert!(e.contains(entry), "{entry}: {e}");
            let outside: Vec<_> = fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(outside, ["root"], "{entry}: nothing beside the root");
        }
    }

    #[test]
    fn files_links_whiteouts_and_cap() {
        let layer1 = tarball(|b| {
            file(b, "etc/hosts", b"127.0.0.1 localhost\n");
            file(b, "old/a", b"a");
            file(b, "keep/b", b"b");
            link(b, tar::EntryType::Symlink, "bin/sh", "/bin/busybox");
            link(b, tar::EntryType::Link, "etc/hosts2", "etc/hosts");
        });
        let layer2 = tarball(|b| {
            file(b, ".wh.old", b"");
            file(b, "keep/.wh..wh..opq", b"");
        });
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        fs::create_dir(&root).unwrap();
        let budget = Budget::new(1 << 20);
        unpack(&layer1[..], &root, OPTS, &budget).unwrap();
        unpack(&layer2[..], &root, OPTS, &budget).unwrap();
        assert_eq!(
            fs::read(root.join("etc/hosts2")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert!(!root.join("old").exists());
        assert!(root.join("keep").is_dir() && !root.join("keep/b").exists());
        let big = tarball(|b| file(b, "big", &vec![0u8; 4096]));
        let r = unpack(&big[..], &root, OPTS, &Budget::new(1000));
        assert!(matches!(r, Err(UnpackError::TooLarge { .. })));
    }

    #[test]
    fn overlay_whiteouts_stay_in_the_layer() {
        if !crate::testing::require_root("overlay_whiteouts_stay_in_the_layer") {
            return;
        }
        let layer = tarball(|b| {
            file(b, "etc/.wh.motd", b"");
            file(b, "var/cache/.wh..wh..opq", b"");
            file(b, "var/cache/kept", b"k");
        });
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        fs::create_dir(&root).unwrap();
        let opts = Unpack {
            shift: Some(400_000),
            whiteouts: Whiteouts::Overlay,
        };
        unpack(&layer[..], &root, opts, &Budget::new(1 << 20)).unwrap();
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = fs::symlink_metadata(root.join("etc/motd")).unwrap();
        assert!(m.file_type().is_char_device() && m.rdev() == 0);
        assert_eq!(fs::metadata(root.join("etc")).unwrap().uid(), 400_000);
        let mut buf = [0u8; 4];
        let c = CString::new(root.join("var/cache").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings and a buffer of the given length.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!((n, buf[0]), (1, b'y'));
        assert_eq!(fs::read(root.join("var/cache/kept")).unwrap(), b"k");
    }
}
