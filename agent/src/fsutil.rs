//! Durable small files: write to a temp file, fsync, rename, fsync the directory; read back with a
//! size cap.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

/// Atomically replaces `path` with `data`, mode `mode`. A crash leaves either the old or the new
/// content, never a mix.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_replace(path, data, mode, true)
}

/// Replaces `path` with `data` by rename, without fsync. A crash of the process leaves the old or
/// the new content (the rename is atomic and the page cache survives the process); a crash of
/// the host may leave either, or an empty file. Only for state that does not outlive the host:
/// a container record describes processes that a reboot ends anyway.
pub fn write_replace_volatile(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_replace(path, data, mode, false)
}

fn write_replace(path: &Path, data: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a whole file, refusing files larger than `cap` bytes.
pub fn read_capped(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is {len} bytes, over the {cap}-byte cap", path.display()),
        ));
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} grew over the {cap}-byte cap while read", path.display()),
        ));
    }
    Ok(buf)
}

/// Makes the entries of `dir` (a rename or a create in it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) and sets its mode.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// Bytes allocated on disk and inodes used under `dir` (symlinks not followed; unreadable
/// entries skipped). Hard links count once per link.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            bytes += m.blocks() * 512;
            inodes += 1;
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash). Names need not be
/// UTF-8; a backslash not followed by three octal digits of a byte stays as it is.
pub fn unescape_mountinfo(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                u8::try_from(d.iter().fold(0u16, |v, c| v * 8 + u16::from(c - b'0'))).ok()
            });
        if let Some(v) = octal {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_capped_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(read_capped(&p, 10).unwrap(), b"two");
        assert!(read_capped(&p, 2).is_err());
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left behind: {names:?}");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(b"a\\134b\\011"), b"a\\b\t");
        assert_eq!(unescape_mountinfo(b"/mnt/a\\040b"), b"/mnt/a b");
        assert_eq!(unescape_mountinfo(b"trailing\\04"), b"trailing\\04");
        // Not a byte: left as it is.
        assert_eq!(unescape_mountinfo(b"x\\777"), b"x\\777");
    }
}
