//! OCI image layouts on the host (a directory with `index.json`, or a tarball of one): the first
//! image for linux/amd64 is resolved and its layers are unpacked, in order, into a root
//! filesystem. Every blob is checked against its sha256 digest while it is read.

use std::{
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::unpack::{self, Budget, Unpack, UnpackError, Whiteouts};

/// Largest index or manifest accepted.
const MAX_JSON: u64 = 4 << 20;
/// Largest image (file content) unpacked.
pub const MAX_IMAGE_BYTES: u64 = 8 << 30;

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Descriptor>,
}

/// Why a layout could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The layout is malformed or names something missing.
    #[error("OCI layout {path}: {reason}")]
    Bad {
        /// The layout.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A blob's bytes do not match its digest.
    #[error("OCI layout {path}: blob {digest} does not match its digest")]
    Digest {
        /// The layout.
        path: PathBuf,
        /// The blob.
        digest: String,
    },
    /// A layer was refused or could not be unpacked.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}

/// Whether `p` looks like an OCI layout directory or tarball.
pub fn is_layout(p: &Path) -> bool {
    p.join("index.json").is_file() || (p.is_file() && p.extension().is_some_and(|e| e == "tar"))
}

/// A reader that hashes what passes through it.
pub(crate) struct Hashing<R> {
    /// The source.
    pub(crate) inner: R,
    /// sha256 of what was read so far.
    pub(crate) hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the image of `src` (layout dir or tarball) into `dest`, owners shifted by `id_start`.
/// `scratch` is a private directory for unpacking a tarball.
pub fn unpack_image(
    src: &Path,
    dest: &Path,
    id_start: u32,
    scratch: &Path,
) -> Result<(), LayoutError> {
    let bad = |reason: String| LayoutError::Bad {
        path: src.to_path_buf(),
        reason,
    };
    let dir = if src.is_file() {
        let f = fs::File::open(src).map_err(|e| bad(e.to_string()))?;
        fs::create_dir_all(scratch).map_err(|e| bad(e.to_string()))?;
        unpack::unpack(
            f,
            scratch,
            Unpack {
                shift: None,
                whiteouts: Whiteouts::Apply,
            },
            &Budget::new(MAX_IMAGE_BYTES),
        )?;
        scratch.to_path_buf()
    } else {
        src.to_path_buf()
    };
    let index: Index = read_json(&dir, &dir.join("index.json")).map_err(&bad)?;
    let mut desc = pick(index.manifests)
        .ok_or_else(|| bad("index.json lists no image for linux/amd64".into()))?;
    // An index may point at a further index (multi-arch); follow one level.
    if desc.media_type.contains("image.index") || desc.media_type.contains("manifest.list") {
        let inner: Index =
            read_json(&dir, &blob_path(&dir, &desc.digest).map_err(&bad)?).map_err(&bad)?;
        desc = pick(inner.manifests)
            .ok_or_else(|| bad("the image index has no linux/amd64 image".into()))?;
    }
    let manifest: Manifest =
        read_json(&dir, &blob_path(&dir, &desc.digest).map_err(&bad)?).map_err(&bad)?;
    fs::create_dir_all(dest).map_err(|e| bad(e.to_string()))?;
    let budget = Budget::new(MAX_IMAGE_BYTES);
    for layer in manifest.layers {
        let path = blob_path(&dir, &layer.digest).map_err(&bad)?;
        let f = fs::File::open(&path).map_err(|e| bad(format!("layer {}: {e}", layer.digest)))?;
        let mut hashing = Hashing {
            inner: io::BufReader::new(f),
            hash: Sha256::new(),
        };
        let mt = layer.media_type.as_str();
        let result = if mt.ends_with("+gzip") || mt.ends_with(".gzip") {
            unpack::unpack(
                flate2::read::GzDecoder::new(&mut hashing),
                dest,
                opts(id_start),
                &budget,
            )
        } else if mt.ends_with("tar") || mt.is_empty() {
            unpack::unpack(&mut hashing, dest, opts(id_start), &budget)
        } else {
            return Err(bad(format!(
                "layer {} has media type {mt:?}, which this agent does not unpack",
                layer.digest
            )));
        };
        match result {
            Ok(()) => {}
            // A corrupt blob usually fails to decompress before its digest can be compared:
            // report the mismatch, which is the cause, when there is one.
            Err(e) => {
                if !digest_matches(&path, &layer.digest) {
                    return Err(LayoutError::Digest {
                        path: src.to_path_buf(),
                        digest: layer.digest,
                    });
                }
                return Err(e.into());
            }
        }
        // Hash whatever the tar reader left unread (padding), then compare.
        io::copy(&mut hashing, &mut io::sink()).map_err(|e| bad(e.to_string()))?;
        let got = format!("sha256:{:x}", hashing.hash.finalize());
        if got != layer.digest {
            return Err(LayoutError::Digest {
                path: src.to_path_buf(),
                digest: layer.digest,
            });
        }
    }
    Ok(())
}

fn digest_matches(path: &Path, digest: &str) -> bool {
    let Ok(mut f) = fs::File::open(path) else {
        return false;
    };
    let mut h = Sha256::new();
    if io::copy(&mut f, &mut h).is_err() {
        return false;
    }
    format!("sha256:{:x}", h.finalize()) == digest
}

fn opts(id_start: u32) -> Unpack {
    Unpack {
        shift: Some(id_start),
        whiteouts: Whiteouts::Apply,
    }
}

fn pick(ms: Vec<Descriptor>) -> Option<Descriptor> {
    let mut fallback = None;
    for m in ms {
        match &m.platform {
            Some(p) if p.os == "linux" && p.architecture == "amd64" => return Some(m),
            None if fallback.is_none() => fallback = Some(m),
            _ => {}
        }
    }
    fallback
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("digest {digest:?} is not sha256:<64 hex>"))?;
    Ok(dir.join("blobs/sha256").join(hex))
}

fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, p: &Path) -> Result<T, String> {
    let rel = p.strip_prefix(dir).unwrap_or(p).display().to_string();
    // Blob paths were built from a checked digest; refuse a symlinked blob all the same.
    if fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(format!("{rel} is a symlink"));
    }
    let bytes = crate::fsutil::read_capped(p, MAX_JSON).map_err(|e| format!("{rel}: {e}"))?;
    if let Some(hex) = p
        .parent()
        .filter(|d| d.ends_with("blobs/sha256"))
        .and(p.file_name())
    {
        let got = format!("{:x}", Sha256::digest(&bytes));
        if got != hex.to_string_lossy() {
            return Err(format!("{rel} does not match its digest"));
        }
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{rel}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_check() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b");
        fs::write(&p, b"hello").unwrap();
        let good = format!("sha256:{:x}", Sha256::digest(b"hello"));
        assert!(digest_matches(&p, &good));
        fs::write(&p, b"hellO").unwrap();
        assert!(!digest_matches(&p, &good));
    }
}
