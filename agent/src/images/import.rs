//! Import of an OCI image layout on the host (a directory, or a tarball of one) into a tenant's
//! store. Its blobs enter the blob cache only after their digest is checked, exactly as pulled
//! ones; a tarball is unpacked first (with the same refusals as layers) into a scratch
//! directory.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use futures::{StreamExt, TryStreamExt};
use sha2::{Digest as _, Sha256};

use super::{
    ImageRecord, ImageStore, Source,
    error::{ImageError, io_at},
    manifest::{self, Digest, Parsed},
};
use crate::engine::unpack::{self, Budget, Unpack, Whiteouts};

/// The layout's blobs, with symlinked blob directories refused.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn open(dir: &Path) -> Result<Self, ImageError> {
        for sub in ["blobs", "blobs/sha256"] {
            let p = dir.join(sub);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ImageError::Unsupported(format!(
                        "OCI layout {}: {sub} is not a directory",
                        dir.display()
                    )));
                }
                Err(e) => return Err(io_at(&p)(e)),
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn open_blob(&self, d: &Digest) -> Result<fs::File, ImageError> {
        let p = self.dir.join("blobs/sha256").join(d.hex());
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    ImageError::NotFound(format!(
                        "OCI layout {}: blob {d} is missing",
                        self.dir.display()
                    ))
                } else {
                    io_at(&p)(e)
                }
            })
    }

    fn read_small(&self, d: &Digest) -> Result<Vec<u8>, ImageError> {
        let mut f = self.open_blob(d)?;
        let mut buf = Vec::new();
        io::Read::read_to_end(
            &mut io::Read::take(&mut f, manifest::MAX_JSON_BYTES + 1),
            &mut buf,
        )
        .map_err(io_at(&self.dir))?;
        if buf.len() as u64 > manifest::MAX_JSON_BYTES || &Digest::of(&buf) != d {
            return Err(ImageError::Corrupt(format!(
                "OCI layout {}: blob {d} does not match its digest",
                self.dir.display()
            )));
        }
        Ok(buf)
    }
}

impl ImageStore {
    /// Copies a blob of the layout into the cache, checking its digest on the way.
    fn import_blob(&self, layout: &Layout, d: &Digest, max: u64) -> Result<(), ImageError> {
        if self.blobs.has(d) {
            return Ok(());
        }
        let mut src = layout.open_blob(d)?;
        let tmp = self
            .blobs
            .ingest_path(d)
            .with_extension(format!("import{:08x}", rand::random::<u32>()));
        let result = (|| {
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_at(&tmp))?;
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut n_total = 0u64;
            loop {
                let n = io::Read::read(&mut src, &mut buf).map_err(io_at(&layout.dir))?;
                if n == 0 {
                    break;
                }
                n_total += n as u64;
                if n_total > max {
                    return Err(ImageError::TooLarge(format!(
                        "blob {d} is over the {max}-byte image cap ([images] max_image_bytes)"
                    )));
                }
                hash.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_at(&tmp))?;
            }
            let got = format!("sha256:{:x}", hash.finalize());
            if got != d.as_str() {
                return Err(ImageError::Corrupt(format!(
                    "OCI layout {}: blob {d} does not match its digest (its bytes hash to {got})",
                    layout.dir.display()
                )));
            }
            out.sync_all().map_err(io_at(&tmp))?;
            let to = self.blobs.path(d);
            fs::rename(&tmp, &to).map_err(io_at(&to))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Imports the OCI layout at `path` (directory or tarball) for `tenant` as `reference`.
    pub async fn import(
        self: &Arc<Self>,
        tenant: &str,
        id_start: u32,
        path: &Path,
        reference: &str,
    ) -> Result<ImageRecord, ImageError> {
        let meta = fs::metadata(path).map_err(|e| {
            ImageError::NotFound(format!(
                "path {}: {e}; give an OCI image layout directory or a tarball of one",
                path.display()
            ))
        })?;
        let lock = self.tenant_lock(tenant);
        let guard = lock.read().await;
        let mut pins = self.blobs.pins();
        let scratch = self
            .root
            .join(format!(".import-{:016x}", rand::random::<u64>()));
        let this = self.clone();
        let (src, is_tar) = (path.to_path_buf(), meta.is_file());
        let scratch2 = scratch.clone();
        let staged = tokio::task::spawn_blocking(move || {
            let dir = if is_tar {
                fs::create_dir(&scratch2).map_err(io_at(&scratch2))?;
                let f = fs::File::open(&src).map_err(io_at(&src))?;
                unpack::unpack(
                    f,
                    &scratch2,
                    Unpack {
                        shift: None,
                        whiteouts: Whiteouts::Apply,
                    },
                    &Budget::new(this.config.max_image_bytes),
                )
                .map_err(|e| ImageError::Unsupported(format!("tarball {}: {e}", src.display())))?;
                scratch2.clone()
            } else {
                src.clone()
            };
            this.stage_layout(&dir, &mut pins)
                .map(|staged| (staged, pins))
        })
        .await
        .map_err(|e| ImageError::Io {
            path: path.to_path_buf(),
            source: io::Error::other(e),
        })
        .and_then(|r| r);
        let _ = fs::remove_dir_all(&scratch);
        let ((top, mdigest, m), pins) = staged?;
        let config = manifest::parse_config(
            &self.blobs.read_small(&m.config, manifest::MAX_JSON_BYTES)?,
            m.layers.len(),
        )?;
        let diff_ids = super::diff_ids(&config);
        let budget = Arc::new(Budget::new(self.config.max_image_bytes));
        let (diff_ids, budget) = (&diff_ids, &budget);
        futures::stream::iter(m.layers.clone().into_iter().enumerate())
            .map(|(i, l)| async move {
                self.ensure_layer(tenant, id_start, &l, diff_ids.get(i), budget)
                    .await
            })
            .buffer_unordered(self.config.parallel_layers as usize)
            .try_collect::<Vec<()>>()
            .await?;
        let record = ImageRecord::new(
            reference,
            super::normalize(reference).unwrap_or_else(|| reference.into()),
            top,
            mdigest,
            &m,
            Source::Import,
        );
        self.record(tenant, record, pins, guard).await
    }

    /// Reads the layout's index, picks this host's manifest, and copies every blob it needs
    /// into the cache. Returns (the digest the index entry names, the manifest's, the manifest).
    fn stage_layout(
        &self,
        dir: &Path,
        pins: &mut super::blobs::Pins,
    ) -> Result<(Digest, Digest, manifest::Manifest), ImageError> {
        let index_path = dir.join("index.json");
        let index =
            crate::fsutil::read_capped(&index_path, manifest::MAX_JSON_BYTES).map_err(|e| {
                ImageError::NotFound(format!(
                    "{}: {e}; not an OCI image layout (no index.json)",
                    dir.display()
                ))
            })?;
        let layout = Layout::open(dir)?;
        let entries = match manifest::parse(&index, manifest::OCI_INDEX)? {
            Parsed::Index(e) => e,
            Parsed::Manifest(_) => {
                return Err(ImageError::Unsupported(format!(
                    "{}: index.json is a manifest, not an index",
                    index_path.display()
                )));
            }
        };
        let entry = if entries.len() == 1 && entries[0].platform.is_none() {
            &entries[0]
        } else {
            manifest::pick_platform(&entries)?
        };
        let top = Digest::parse(&entry.digest)?;
        pins.add(&top);
        let mut bytes = layout.read_small(&top)?;
        let mut mdigest = top.clone();
        let m = match manifest::parse(&bytes, &entry.media_type)? {
            Parsed::Manifest(m) => m,
            Parsed::Index(inner) => {
                self.blobs.put(&top, &bytes)?;
                let e = manifest::pick_platform(&inner)?;
                mdigest = Digest::parse(&e.digest)?;
                pins.add(&mdigest);
                bytes = layout.read_small(&mdigest)?;
                match manifest::parse(&bytes, &e.media_type)? {
                    Parsed::Manifest(m) => m,
                    Parsed::Index(_) => {
                        return Err(ImageError::Unsupported(
                            "nested indexes are not followed".into(),
                        ));
                    }
                }
            }
        };
        self.check_size(&m)?;
        pins.add(&m.config);
        for l in &m.layers {
            pins.add(&l.digest);
        }
        self.blobs.put(&mdigest, &bytes)?;
        self.import_blob(&layout, &m.config, manifest::MAX_JSON_BYTES)?;
        for l in &m.layers {
            self.import_blob(&layout, &l.digest, self.config.max_image_bytes)?;
        }
        Ok((top, mdigest, m))
    }
}
