//! One layer blob unpacked into its own directory of a tenant's store, owners shifted into the
//! tenant's range and whiteouts kept in overlayfs form, so a container's rootfs is an overlay of
//! the layer directories. The uncompressed stream is hashed while it is unpacked and checked
//! against the config's `diff_id`.

use std::{
    fs,
    io::{self, BufReader, Read},
    os::unix::fs::PermissionsExt,
    path::Path,
};

use sha2::{Digest as _, Sha256};

use super::{
    error::{ImageError, io_at},
    manifest::{Compression, Digest},
};
use crate::engine::{
    layout::Hashing,
    unpack::{self, Budget, Unpack, UnpackError, Whiteouts},
};

/// Unpacks the cached blob `blob` of layer `layer` into the new directory `dest`.
/// On error `dest` may hold part of the layer; the caller removes it.
pub fn unpack_layer(
    blob: &Path,
    layer: &Digest,
    compression: Compression,
    diff_id: Option<&Digest>,
    dest: &Path,
    id_start: u32,
    budget: &Budget,
) -> Result<(), ImageError> {
    fs::create_dir(dest).map_err(io_at(dest))?;
    std::os::unix::fs::chown(dest, Some(id_start), Some(id_start)).map_err(io_at(dest))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).map_err(io_at(dest))?;
    let f = fs::File::open(blob).map_err(io_at(blob))?;
    let compressed = BufReader::with_capacity(256 << 10, f);
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(compressed),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(compressed)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(compressed).map_err(|e| {
                ImageError::Corrupt(format!("layer {layer}: not a zstd stream: {e}"))
            })?,
        ),
    };
    let mut tar = Hashing {
        inner: decoded,
        hash: Sha256::new(),
    };
    let opts = Unpack {
        shift: Some(id_start),
        whiteouts: Whiteouts::Overlay,
    };
    unpack::unpack(&mut tar, dest, opts, budget).map_err(|e| match e {
        UnpackError::Refused { .. } => ImageError::Refused {
            layer: layer.to_string(),
            message: e.to_string(),
        },
        UnpackError::TooLarge { cap } => ImageError::TooLarge(format!(
            "the image unpacks to more than the {cap}-byte cap ([images] max_image_bytes)"
        )),
        UnpackError::Io { what, source } => {
            if matches!(
                source.kind(),
                io::ErrorKind::InvalidData
                    | io::ErrorKind::InvalidInput
                    | io::ErrorKind::UnexpectedEof
            ) {
                ImageError::Corrupt(format!(
                    "layer {layer} is not a valid {compression:?} tar ({what}: {source})"
                ))
            } else {
                ImageError::Io {
                    path: dest.to_path_buf(),
                    source: io::Error::new(source.kind(), format!("{what}: {source}")),
                }
            }
        }
    })?;
    // What the tar reader left unread (the end-of-archive padding) belongs to the diff too.
    io::copy(&mut tar, &mut io::sink()).map_err(|e| {
        ImageError::Corrupt(format!("layer {layer}: reading past the tar end: {e}"))
    })?;
    if let Some(want) = diff_id {
        let got = format!("sha256:{:x}", tar.hash.finalize());
        if got != want.as_str() {
            return Err(ImageError::Corrupt(format!(
                "layer {layer} unpacks to {got}, but the image config says {want}"
            )));
        }
    }
    Ok(())
}
