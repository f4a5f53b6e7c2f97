//! Unpacking untrusted tar streams (image layers, layout tarballs) into a root filesystem.
//!
//! Nothing in a tarball is trusted: an entry whose path is absolute or holds `..`, whose parent
//! is a symlink, or a hardlink pointing outside the root is refused with an error naming the
//! entry, before anything of it is written. Owners are shifted into the tenant's range, device
//! nodes are skipped, OCI whiteouts are applied, and a size cap bounds what one image may write.

use std::{
    fs,
    io::{self, Read},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Component, Path, PathBuf},
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
    /// Most bytes of file content to write.
    pub cap: u64,
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
fn parent_dir(root: &Path, rel: &Path, entry: &str) -> Result<PathBuf, UnpackError> {
    let mut dir = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            dir.push(c);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refused(entry, "a parent directory is a symlink"));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(refused(entry, "a parent is not a directory")),
                Err(_) => fs::create_dir(&dir).map_err(io_err(dir.display().to_string()))?,
            }
        }
    }
    Ok(dir)
}

fn shifted(id: u64, shift: Option<u32>) -> Option<u32> {
    let start = shift?;
    let id = u32::try_from(id)
        .ok()
        .filter(|i| *i < RANGE_SIZE)
        .unwrap_or(65_534);
    Some(start + id)
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Unpacks one tar stream into `root`. Returns the bytes of file content written.
pub fn unpack(
    reader: impl Read,
    root: &Path,
    opts: Unpack,
    mut written: u64,
) -> Result<u64, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(io_err("reading the archive"))? {
        let mut entry = entry.map_err(io_err("reading an entry"))?;
        let raw = entry.path().map_err(io_err("an entry path"))?.into_owned();
        let name = raw.display().to_string();
        let rel = clean(&name, &raw)?;
        let Some(file_name) = rel.file_name().map(|f| f.to_string_lossy().into_owned()) else {
            continue; // "." itself
        };
        let dir = parent_dir(root, &rel, &name)?;
        // OCI whiteouts: an opaque marker empties its directory; `.wh.x` deletes `x`.
        if file_name == ".wh..wh..opq" {
            for e in fs::read_dir(&dir)
                .map_err(io_err(dir.display().to_string()))?
                .flatten()
            {
                remove_any(&e.path());
            }
            continue;
        }
        if let Some(victim) = file_name.strip_prefix(".wh.") {
            if victim.is_empty() || victim == "." || victim == ".." || victim.contains('/') {
                return Err(refused(&name, "malformed whiteout"));
            }
            remove_any(&dir.join(victim));
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
                    fs::create_dir(&dest).map_err(io_err(name.clone()))?;
                }
                Err(_) => fs::create_dir(&dest).map_err(io_err(name.clone()))?,
            }
        } else if kind.is_file() {
            written = written.saturating_add(header.size().unwrap_or(0));
            if written > opts.cap {
                return Err(UnpackError::TooLarge { cap: opts.cap });
            }
            remove_any(&dest);
            // O_EXCL|O_NOFOLLOW: never write through anything that appeared at that name.
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&dest)
                .map_err(io_err(name.clone()))?;
            io::copy(&mut entry, &mut f).map_err(io_err(name.clone()))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(io_err("a link target"))?
                .ok_or_else(|| refused(&name, "symlink without a target"))?;
            remove_any(&dest);
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
            let tdir = parent_dir(root, &target_rel, &name)?;
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
            remove_any(&dest);
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
    Ok(written)
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
        cap: 1 << 20,
    };

    fn run(bytes: &[u8]) -> (tempfile::TempDir, Result<u64, UnpackError>) {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("root")).unwrap();
        let r = unpack(bytes, &d.path().join("root"), OPTS, 0);
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
        let n = unpack(&layer1[..], &root, OPTS, 0).unwrap();
        unpack(&layer2[..], &root, OPTS, n).unwrap();
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
        let r = unpack(
            &big[..],
            &root,
            Unpack {
                shift: None,
                cap: 1000,
            },
            0,
        );
        assert!(matches!(r, Err(UnpackError::TooLarge { .. })));
    }
}
