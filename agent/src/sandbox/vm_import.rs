//! Sending a host root filesystem (a directory, or an OCI layout tarball) into a VM tenant's
//! guest, whose engine cannot read the host's files: streamed over the engine protocol, once per
//! content (the key is a digest of the path and its change time), then named by its guest path.

use std::{
    io::{self, Write},
    os::unix::fs::MetadataExt,
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
    let key = key(&path, &meta);
    let have = eng
        .imported(epb::ImportedRequest { key: key.clone() })
        .await
        .map_err(SandboxError::Status)?
        .into_inner();
    if have.present {
        return Ok(have.path);
    }
    let (tx, rx) = mpsc::channel::<epb::ImportChunk>(4);
    let first = epb::ImportChunk {
        key,
        kind: kind as i32,
        data: Vec::new(),
    };
    tx.send(first)
        .await
        .map_err(|_| SandboxError::Status(Status::internal("import: the stream closed")))?;
    let producer = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let mut w = ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        match kind {
            epb::ImportKind::DirTar => {
                let mut b = tar::Builder::new(&mut w);
                b.follow_symlinks(false);
                b.append_dir_all(".", &path)?;
                b.finish()?;
            }
            _ => {
                io::copy(&mut std::fs::File::open(&path)?, &mut w)?;
            }
        }
        w.flush()
    });
    let sent = eng
        .import(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let produced = producer
        .await
        .map_err(|e| SandboxError::Status(Status::internal(format!("import: {e}"))))?;
    let path = sent.map_err(SandboxError::Status)?.into_inner().path;
    produced.map_err(|e| {
        SandboxError::Status(Status::failed_precondition(format!(
            "rootfs_path {host_path}: reading it: {e}"
        )))
    })?;
    Ok(path)
}

/// A digest of the path and its size and change time: new content gets a new key.
fn key(path: &Path, meta: &std::fs::Metadata) -> String {
    let mut h = Sha256::new();
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
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
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
