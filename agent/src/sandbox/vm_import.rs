//! Sending a host root filesystem (a directory, or an OCI layout tarball), image layers and a
//! container's volumes into a VM tenant's guest, whose engine cannot read the host's files:
//! streamed over the engine protocol, once per content (the key is a digest of the path and its
//! change time), then named by its guest path.

use std::{
    io::{self, Write},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use caas_proto::engine::v1::{self as epb, engine_client::EngineClient};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::{Status, transport::Channel};

use super::SandboxError;

/// Size of one streamed chunk.
const CHUNK: usize = 256 * 1024;

/// Sends `host_path` into the guest unless it is there already; returns the guest path to use
/// as the container's rootfs.
pub async fn import(
    eng: &mut EngineClient<Channel>,
    host_path: &str,
) -> Result<String, SandboxError> {
    let path = PathBuf::from(host_path);
    let missing = || {
        SandboxError::Status(Status::invalid_argument(format!(
            "rootfs_path {host_path}: does not exist, or is neither a directory nor an OCI image layout"
        )))
    };
    let meta = std::fs::metadata(&path).map_err(|_| missing())?;
    let kind = if meta.is_dir() {
        epb::ImportKind::DirTar
    } else if meta.is_file() && path.extension().is_some_and(|e| e == "tar") {
        epb::ImportKind::File
    } else {
        return Err(missing());
    };
    send(eng, &path, kind, host_path).await
}

/// Sends the file `host_path` (a CNI plugin binary) into the guest unless it is there; returns
/// its guest path.
pub async fn import_file(
    eng: &mut EngineClient<Channel>,
    host_path: &Path,
) -> Result<String, SandboxError> {
    send(
        eng,
        host_path,
        epb::ImportKind::File,
        &host_path.display().to_string(),
    )
    .await
}

/// Sends each image layer directory (overlayfs form, owners in the tenant's range) into the guest
/// unless it is there; returns their guest paths, in the same order.
pub async fn import_layers(
    eng: &mut EngineClient<Channel>,
    dirs: &[String],
) -> Result<Vec<String>, SandboxError> {
    let mut out = Vec::with_capacity(dirs.len());
    for d in dirs {
        out.push(send(eng, Path::new(d), epb::ImportKind::LayerTar, d).await?);
    }
    Ok(out)
}

/// The binds of a container in a VM tenant, each with its content sent into the guest (once per
/// content, see `send`) and its host path replaced by the guest's copy; an image volume's
/// layers go as the container's own layers do. The guest engine removes a volume's copy with the
/// last container that binds it. The copy is not the host's directory: what the container
/// writes stays in the guest, and what the host changes later reaches only containers made
/// after the change. Device nodes cannot be copied in and are refused.
pub async fn import_volumes(
    eng: &mut EngineClient<Channel>,
    mounts: Vec<epb::BindMount>,
) -> Result<Vec<epb::BindMount>, SandboxError> {
    let mut out = Vec::with_capacity(mounts.len());
    for (i, mut m) in mounts.into_iter().enumerate() {
        if !m.device_access.is_empty() {
            return Err(SandboxError::Status(Status::unimplemented(format!(
                "mounts[{i}]: the device {} in a VM tenant (the guest has its own devices)",
                m.host_path
            ))));
        }
        if !m.image_layers.is_empty() {
            m.image_layers = import_layers(eng, &m.image_layers).await?;
            out.push(m);
            continue;
        }
        let path = PathBuf::from(&m.host_path);
        let meta = std::fs::metadata(&path).map_err(|e| {
            SandboxError::Status(Status::invalid_argument(format!(
                "mounts[{i}]: host path {}: {e}",
                m.host_path
            )))
        })?;
        let kind = if meta.is_dir() {
            epb::ImportKind::VolumeDirTar
        } else if meta.is_file() {
            epb::ImportKind::VolumeFile
        } else {
            return Err(SandboxError::Status(Status::invalid_argument(format!(
                "mounts[{i}]: host path {} is neither a directory nor a regular file, which is all a VM tenant's guest can be given a copy of",
                m.host_path
            ))));
        };
        let shown = format!("mounts[{i}]: host path {}", m.host_path);
        m.host_path = send(eng, &path, kind, &shown).await?;
        out.push(m);
    }
    Ok(out)
}

/// The import key the host directory `path` has now (new content, new key).
pub fn volume_dir_key(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    Ok(key(path, &meta, epb::ImportKind::VolumeDirTar))
}

/// Sends the directory `path` into the guest as a volume import (unless there) and brings a
/// container's copy of it, bound at `container_path`, to that content (engine `SyncVolume`).
/// True when the copy changed.
pub async fn sync_volume_dir(
    eng: &mut EngineClient<Channel>,
    container: &str,
    container_path: &str,
    path: &Path,
) -> Result<bool, SandboxError> {
    let shown = format!("{} (volume {container_path})", path.display());
    let guest = send(eng, path, epb::ImportKind::VolumeDirTar, &shown).await?;
    let from_key = Path::new(&guest)
        .parent()
        .and_then(Path::file_name)
        .and_then(|k| k.to_str())
        .ok_or_else(|| SandboxError::Status(Status::internal(format!("import path {guest}"))))?
        .to_string();
    Ok(eng
        .sync_volume(epb::SyncVolumeRequest {
            container: container.into(),
            container_path: container_path.into(),
            from_key,
        })
        .await
        .map_err(SandboxError::Status)?
        .into_inner()
        .changed)
}

async fn send(
    eng: &mut EngineClient<Channel>,
    path: &Path,
    kind: epb::ImportKind,
    shown: &str,
) -> Result<String, SandboxError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| SandboxError::Status(Status::failed_precondition(format!("{shown}: {e}"))))?;
    let key = key(path, &meta, kind);
    let have = eng
        .imported(epb::ImportedRequest { key: key.clone() })
        .await
        .map_err(SandboxError::Status)?
        .into_inner();
    if have.present {
        return Ok(have.path);
    }
    let (tx, rx) = mpsc::channel::<epb::ImportChunk>(4);
    tx.send(epb::ImportChunk {
        key,
        kind: kind as i32,
        ..Default::default()
    })
    .await
    .map_err(|_| SandboxError::Status(Status::internal("import: the stream closed")))?;
    let src = path.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let mut w = ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            total: 0,
        };
        match kind {
            epb::ImportKind::DirTar | epb::ImportKind::VolumeDirTar => {
                let mut b = tar::Builder::new(&mut w);
                b.follow_symlinks(false);
                b.append_dir_all(".", &src)?;
                b.finish()?;
            }
            epb::ImportKind::LayerTar => {
                let mut b = tar::Builder::new(&mut w);
                b.follow_symlinks(false);
                append_layer(&mut b, &src, Path::new(""))?;
                b.finish()?;
            }
            epb::ImportKind::VolumeFile => {
                let mut b = tar::Builder::new(&mut w);
                b.append_path_with_name(&src, crate::engine::runtime::VOLUME_IMPORT)?;
                b.finish()?;
            }
            _ => {
                io::copy(&mut std::fs::File::open(&src)?, &mut w)?;
            }
        }
        w.flush()?;
        // Only a source read to its end is declared whole: on any error above the stream just
        // ends, and the guest keeps nothing.
        let total = w.total;
        w.tx.blocking_send(epb::ImportChunk {
            done: true,
            total_bytes: total,
            ..Default::default()
        })
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the guest stopped the import"))
    });
    let sent = eng
        .import(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let produced = producer
        .await
        .map_err(|e| SandboxError::Status(Status::internal(format!("import: {e}"))))?;
    // The host's own failure first: it says what is wrong with the source; the guest then only
    // says the stream ended early.
    produced.map_err(|e| {
        SandboxError::Status(Status::failed_precondition(format!(
            "{shown}: reading it: {e}"
        )))
    })?;
    Ok(sent.map_err(SandboxError::Status)?.into_inner().path)
}

/// Appends `root/rel` and everything under it, entries sorted by name; an opaque directory gets
/// an empty `.wh..wh..opq` file (the guest turns it back into the attribute).
fn append_layer<W: Write>(b: &mut tar::Builder<W>, root: &Path, rel: &Path) -> io::Result<()> {
    let path = root.join(rel);
    let meta = std::fs::symlink_metadata(&path)?;
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", rel.display()));
    if rel.as_os_str().is_empty() {
        // The layer's root: made by the guest's unpack.
    } else if meta.file_type().is_char_device() {
        // An overlayfs whiteout. (tar's own path for device files names the entry by its host
        // path, so the header is made here.)
        let mut h = tar::Header::new_gnu();
        h.set_metadata(&meta);
        h.set_entry_type(tar::EntryType::Char);
        h.set_size(0);
        let rdev = meta.rdev();
        h.set_device_major(libc::major(rdev)).map_err(named)?;
        h.set_device_minor(libc::minor(rdev)).map_err(named)?;
        b.append_data(&mut h, rel, io::empty()).map_err(named)?;
    } else {
        b.append_path_with_name(&path, rel).map_err(named)?;
    }
    if meta.is_dir() {
        if crate::engine::unpack::is_opaque(&path) {
            let mut h = tar::Header::new_gnu();
            h.set_metadata(&meta); // the directory's owner and time
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(0);
            h.set_mode(0o644);
            b.append_data(
                &mut h,
                rel.join(crate::engine::server::OPAQUE_MARKER),
                io::empty(),
            )?;
        }
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for n in names {
            append_layer(b, root, &rel.join(n))?;
        }
    }
    Ok(())
}

/// A digest of the path and its size and change time: new content gets a new key.
fn key(path: &Path, meta: &std::fs::Metadata, kind: epb::ImportKind) -> String {
    let mut h = Sha256::new();
    h.update((kind as i32).to_le_bytes());
    h.update(path.as_os_str().as_encoded_bytes());
    h.update(meta.size().to_le_bytes());
    h.update(meta.mtime().to_le_bytes());
    h.update(meta.mtime_nsec().to_le_bytes());
    h.update(meta.ctime().to_le_bytes());
    h.update(meta.ctime_nsec().to_le_bytes());
    let d = h.finalize();
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes into import chunks on a channel (from a blocking task).
struct ChunkWriter {
    tx: mpsc::Sender<epb::ImportChunk>,
    buf: Vec<u8>,
    /// Bytes sent so far.
    total: u64,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.total += data.len() as u64;
        self.tx
            .blocking_send(epb::ImportChunk {
                data,
                ..Default::default()
            })
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the guest stopped the import"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_tar_carries_links_whiteouts_and_opaque_dirs() {
        let d = tempfile::tempdir().unwrap();
        let l = d.path().join("layer");
        std::fs::create_dir_all(l.join("bin")).unwrap();
        std::fs::create_dir_all(l.join("opt/keep")).unwrap();
        std::fs::write(l.join("bin/busybox"), b"x").unwrap();
        std::os::unix::fs::symlink("/bin/busybox", l.join("bin/sh")).unwrap();
        crate::engine::unpack::set_opaque(&l.join("opt/keep")).unwrap();
        let wh = std::ffi::CString::new(l.join("bin/gone").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR | 0o600, 0) };
        assert_eq!(rc, 0);
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        append_layer(&mut b, &l, Path::new("")).unwrap();
        let bytes = b.into_inner().unwrap();
        let mut ar = tar::Archive::new(bytes.as_slice());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(
            names.contains(&"opt/keep/.wh..wh..opq".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"bin/sh".to_string()), "{names:?}");
        assert!(names.contains(&"bin/gone".to_string()), "{names:?}");
    }
}
