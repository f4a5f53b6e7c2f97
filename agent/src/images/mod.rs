//! Images: pulled from OCI registries or imported from OCI layouts, kept per tenant.
//!
//! - The blob cache ([`blobs`]) is host-wide and content-addressed: a blob enters it only after
//!   its bytes matched its digest, and one download per digest runs at a time.
//! - Each tenant has its own store, `<state_dir>/images/<tenant>/`: `images.json` (its image
//!   records) and `l/<key>/`, one directory per layer, unpacked with owners shifted into the
//!   tenant's uid range and whiteouts in overlayfs form. A container's rootfs is an overlay of
//!   its image's layer directories with a writable upper layer of its own.
//! - Tenants never share records or layer directories, and a pull always asks the registry for
//!   the manifest with the caller's own credentials, so a cached blob is never a way into
//!   another tenant's private image.
//! - Blobs no image of any tenant references are deleted ([`ImageStore::gc`]) after a remove.

pub mod blobs;
pub mod error;
mod import;
pub mod layer;
pub mod manifest;
pub mod registry;

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{RwLock, mpsc};

pub use error::ImageError;
use error::io_at;
pub use registry::Credentials;

use crate::{engine::unpack::Budget, validate::Invalid};
use blobs::{BlobStore, KeyedLocks};
use manifest::{Digest, ImageConfig, Layer, Manifest};

/// Hex digits of a layer digest that name its directory (short, so the overlay's lower-directory
/// list of a many-layer image fits in one page).
const LAYER_KEY_LEN: usize = 24;
/// How often pull progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// `[images]`: registry pulls and the image store.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Registries (`host` or `host:port`) spoken to over plain HTTP instead of HTTPS.
    pub insecure_registries: Vec<String>,
    /// Registries reached through another endpoint, by registry host (`docker.io` for Docker
    /// Hub), as containerd's `hosts.toml` mirrors: an offline cluster pulls `registry.k8s.io/...`
    /// from a local registry. Images keep the name they were asked by.
    pub mirrors: std::collections::BTreeMap<String, Mirror>,
    /// Largest image: its compressed blobs, and again its unpacked file content, in bytes.
    pub max_image_bytes: u64,
    /// Blob downloads of one image at the same time (1 ..= 16); layer unpacks, across the whole
    /// store, run at most min(CPUs, this) at once.
    pub parallel_layers: u32,
    /// Seconds to connect to a registry (1 ..= 300).
    pub connect_timeout_secs: u64,
    /// Seconds a registry may stay silent mid-transfer before the transfer is retried (1 ..= 3600).
    pub read_timeout_secs: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            mirrors: std::collections::BTreeMap::new(),
            max_image_bytes: 16 << 30,
            parallel_layers: 4,
            connect_timeout_secs: 10,
            read_timeout_secs: 60,
        }
    }
}

/// Where a mirrored registry is reached.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// `host` or `host:port` of the registry that serves in its place.
    pub endpoint: String,
    /// Speak plain HTTP to it (a local registry).
    #[serde(default)]
    pub plain_http: bool,
}

/// Checks a `host` or `host:port`.
fn check_host(field: String, r: &str) -> Result<(), Invalid> {
    if r.is_empty()
        || r.len() > 255
        || r.contains("://")
        || r.contains('/')
        || r.chars().any(char::is_whitespace)
    {
        return Err(Invalid::new(
            field,
            format!("{r:?} is not a host or host:port (no scheme, no path)"),
        ));
    }
    Ok(())
}

impl ImagesConfig {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (i, r) in self.insecure_registries.iter().enumerate() {
            check_host(format!("images.insecure_registries[{i}]"), r)?;
        }
        for (host, m) in &self.mirrors {
            check_host(format!("images.mirrors.{host:?}"), host)?;
            check_host(format!("images.mirrors.{host:?}.endpoint"), &m.endpoint)?;
        }
        crate::validate::check_range(
            "images.max_image_bytes",
            self.max_image_bytes,
            1 << 20,
            1 << 40,
        )?;
        crate::validate::check_range("images.parallel_layers", self.parallel_layers, 1, 16)?;
        crate::validate::check_range(
            "images.connect_timeout_secs",
            self.connect_timeout_secs,
            1,
            300,
        )?;
        crate::validate::check_range("images.read_timeout_secs", self.read_timeout_secs, 1, 3600)?;
        Ok(())
    }
}

/// Where an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Pulled from a registry.
    Registry,
    /// Imported from an OCI layout on the host.
    Import,
}

/// One image of a tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// The reference it was pulled or imported as, as given.
    pub reference: String,
    /// The same, normalized (`registry/repository:tag`).
    pub normalized: String,
    /// The digest the reference pointed at (an index's, for a multi-platform image).
    pub digest: Digest,
    /// The manifest of this host's platform.
    pub manifest_digest: Digest,
    /// Its media type.
    pub manifest_media_type: String,
    /// The image config blob.
    pub config_digest: Digest,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Compressed layers plus config, in bytes.
    pub size_bytes: u64,
    /// When it was pulled or imported.
    pub created_at_unix_ms: u64,
    /// Where it came from.
    pub source: Source,
}

impl ImageRecord {
    fn new(
        reference: &str,
        normalized: String,
        digest: Digest,
        manifest_digest: Digest,
        m: &Manifest,
        source: Source,
    ) -> Self {
        Self {
            reference: reference.into(),
            normalized,
            digest,
            manifest_digest,
            manifest_media_type: m.media_type.clone(),
            config_digest: m.config.clone(),
            size_bytes: m.layers.iter().map(|l| l.size).sum::<u64>() + m.config_size,
            layers: m.layers.clone(),
            created_at_unix_ms: now_ms(),
            source,
        }
    }

    fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.digest, &self.manifest_digest, &self.config_digest]
            .into_iter()
            .chain(self.layers.iter().map(|l| &l.digest))
    }

    /// Whether `q` names this image: its reference as given or normalized, its digest (bare or
    /// after `@`), or its id (the config digest, as the CRI names images).
    pub fn matches(&self, q: &str) -> bool {
        if q == self.reference || q == self.normalized || q == self.config_digest.as_str() {
            return true;
        }
        let digest = q.rsplit_once('@').map_or(q, |(_, d)| d);
        if digest == self.digest.as_str() || digest == self.manifest_digest.as_str() {
            return q == digest || normalize(q).is_some_and(|n| n == self.normalized_repo_at());
        }
        normalize(q).is_some_and(|n| n == self.normalized)
    }

    /// `registry/repository@digest` of this image.
    pub fn normalized_repo_at(&self) -> String {
        let repo = self
            .normalized
            .rsplit_once('@')
            .map(|(r, _)| r.to_string())
            .unwrap_or_else(|| match self.normalized.rsplit_once(':') {
                Some((r, tag)) if !tag.contains('/') => r.to_string(),
                _ => self.normalized.clone(),
            });
        format!("{repo}@{}", self.digest)
    }
}

/// `registry/repository:tag` (or `@digest`) of a reference, when it parses.
/// A registry reference, or `BadReference` saying why not.
fn parse_reference(reference: &str) -> Result<oci_client::Reference, ImageError> {
    oci_client::Reference::try_from(reference).map_err(|e| ImageError::BadReference {
        reference: reference.into(),
        reason: e.to_string(),
    })
}

pub fn normalize(q: &str) -> Option<String> {
    oci_client::Reference::try_from(q).ok().map(|r| r.whole())
}

/// A layer's progress during a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgress {
    /// The layer (blob) digest.
    pub digest: String,
    /// Its size.
    pub total_bytes: u64,
    /// Bytes downloaded so far.
    pub done_bytes: u64,
}

/// What a container needs of an image.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// The record.
    pub image: ImageRecord,
    /// Layer directories, topmost first (overlay `lowerdir` order).
    pub lower_dirs: Vec<PathBuf>,
    /// The image's run-time defaults.
    pub config: ImageConfig,
}

/// The image store of every tenant, and the blob cache.
#[derive(Debug)]
pub struct ImageStore {
    config: ImagesConfig,
    root: PathBuf,
    blobs: Arc<BlobStore>,
    records: Mutex<HashMap<String, Vec<ImageRecord>>>,
    /// Per tenant: pulls and imports share it, removes take it alone (they delete layer
    /// directories a pull in flight could be about to use).
    tenant_locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
    layer_locks: KeyedLocks,
    /// Layer unpacks running at once, over every pull and import: they are CPU-bound (inflate,
    /// sha256), so more than the CPUs only adds switching.
    unpacks: tokio::sync::Semaphore,
}

fn layer_key(d: &Digest) -> &str {
    &d.hex()[..LAYER_KEY_LEN]
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl ImageStore {
    /// Opens the store under `state_dir`: loads every tenant's records, drops half-unpacked
    /// layers, and deletes blobs nothing references.
    pub fn open(state_dir: &Path, config: ImagesConfig) -> Result<Self, ImageError> {
        // The registry client's TLS uses the process-wide provider: the same ring as the API's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let root = state_dir.join("images");
        crate::fsutil::ensure_dir(&root, 0o700).map_err(io_at(&root))?;
        let blobs = Arc::new(BlobStore::open(&state_dir.join("blobs"))?);
        let mut records = HashMap::new();
        for e in fs::read_dir(&root).map_err(io_at(&root))?.flatten() {
            let Some(tenant) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let dir = e.path();
            if let Ok(rd) = fs::read_dir(dir.join("l")) {
                for l in rd.flatten() {
                    if l.file_name().to_string_lossy().starts_with(".tmp-") {
                        let _ = fs::remove_dir_all(l.path());
                    }
                }
            }
            let file = dir.join("images.json");
            let recs: Vec<ImageRecord> = match crate::fsutil::read_capped(&file, 64 << 20) {
                Ok(b) => serde_json::from_slice(&b).map_err(|e| ImageError::Io {
                    path: file.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(io_at(&file)(e)),
            };
            records.insert(tenant, recs);
        }
        let store = Self {
            root,
            blobs,
            records: Mutex::new(records),
            tenant_locks: Mutex::new(HashMap::new()),
            layer_locks: KeyedLocks::default(),
            unpacks: tokio::sync::Semaphore::new(
                std::thread::available_parallelism()
                    .map_or(1, usize::from)
                    .min(config.parallel_layers as usize)
                    .max(1),
            ),
            config,
        };
        store.gc();
        Ok(store)
    }

    /// The configuration.
    pub fn config(&self) -> &ImagesConfig {
        &self.config
    }

    /// The blob cache.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.root.join(tenant)
    }

    fn tenant_lock(&self, tenant: &str) -> Arc<RwLock<()>> {
        self.tenant_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.to_string())
            .or_default()
            .clone()
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<ImageRecord>>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Images of one tenant (or all), whose reference contains `contains`.
    pub fn list(&self, tenant: Option<&str>, contains: &str) -> Vec<(String, ImageRecord)> {
        let recs = self.records();
        let mut out: Vec<(String, ImageRecord)> = recs
            .iter()
            .filter(|(t, _)| tenant.is_none_or(|x| x == t.as_str()))
            .flat_map(|(t, rs)| rs.iter().map(move |r| (t.clone(), r.clone())))
            .filter(|(_, r)| r.reference.contains(contains) || r.normalized.contains(contains))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1.reference).cmp(&(&b.0, &b.1.reference)));
        out
    }

    /// The run-time defaults of an image's config, when it is readable and has them.
    fn run_config(&self, r: &ImageRecord) -> Option<manifest::RunConfig> {
        let parsed = self
            .blobs
            .read_small(&r.config_digest, manifest::MAX_JSON_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|b| manifest::parse_config(&b, r.layers.len()).map_err(|e| e.to_string()));
        match parsed {
            Ok(c) => c.config,
            Err(e) => {
                // Its user and stop signal then fall back to the defaults: say so.
                tracing::warn!(image = %r.normalized, config = %r.config_digest, error = %e, "the image's config cannot be read");
                None
            }
        }
    }

    /// The `User` of an image's config, when the config is readable and sets one.
    pub fn rootfs_config_user(&self, r: &ImageRecord) -> Option<String> {
        self.run_config(r)?.user.filter(|u| !u.is_empty())
    }

    /// The image's stop signal (`StopSignal` of its config), as the config names it.
    pub fn stop_signal(&self, r: &ImageRecord) -> Option<String> {
        self.run_config(r)?
            .stop_signal
            .filter(|s| !s.trim().is_empty())
    }

    /// One image of a tenant.
    pub fn get(&self, tenant: &str, q: &str) -> Result<ImageRecord, ImageError> {
        self.records()
            .get(tenant)
            .and_then(|rs| rs.iter().find(|r| r.matches(q)).cloned())
            .ok_or_else(|| ImageError::NotInStore {
                tenant: tenant.into(),
                reference: q.into(),
            })
    }

    /// The config JSON of an image.
    pub fn config_json(&self, r: &ImageRecord) -> Result<String, ImageError> {
        let bytes = self
            .blobs
            .read_small(&r.config_digest, manifest::MAX_JSON_BYTES)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// What a container of `tenant` made from image `q` is built from.
    pub fn rootfs(&self, tenant: &str, q: &str) -> Result<Rootfs, ImageError> {
        let image = self.get(tenant, q)?;
        let bytes = self
            .blobs
            .read_small(&image.config_digest, manifest::MAX_JSON_BYTES)?;
        let config = manifest::parse_config(&bytes, image.layers.len())?;
        let l = self.tenant_dir(tenant).join("l");
        let lower_dirs: Vec<PathBuf> = image
            .layers
            .iter()
            .rev()
            .map(|x| l.join(layer_key(&x.digest)))
            .collect();
        if let Some(missing) = lower_dirs.iter().find(|d| !d.is_dir()) {
            return Err(ImageError::Io {
                path: missing.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "a layer directory of the image is missing; remove the image and pull it again",
                ),
            });
        }
        Ok(Rootfs {
            image,
            lower_dirs,
            config,
        })
    }

    /// Pulls `reference` for `tenant` (whose uid range starts at `id_start`), reporting layer
    /// progress on `progress`.
    pub async fn pull(
        &self,
        tenant: &str,
        id_start: u32,
        reference: &str,
        creds: &Credentials,
        progress: Option<mpsc::Sender<LayerProgress>>,
    ) -> Result<ImageRecord, ImageError> {
        let parsed = parse_reference(reference)?;
        let normalized = parsed.whole();
        let remote = registry::Remote::new(&self.config, parsed, creds);
        let lock = self.tenant_lock(tenant);
        let guard = lock.read().await;
        let resolved = remote.resolve().await?;
        let m = &resolved.manifest;
        self.check_size(m)?;
        let mut pins = self.blobs.pins();
        for d in [&resolved.digest, &resolved.manifest_digest, &m.config] {
            pins.add(d);
        }
        for l in &m.layers {
            pins.add(&l.digest);
        }
        if let Some(index) = &resolved.index {
            self.blobs.put(&resolved.digest, index)?;
        }
        self.blobs
            .put(&resolved.manifest_digest, &resolved.manifest_bytes)?;
        let none = AtomicU64::new(0);
        remote
            .fetch_blob(
                &self.blobs,
                &m.config,
                m.config_size,
                manifest::MAX_JSON_BYTES,
                &none,
            )
            .await?;
        let config = manifest::parse_config(
            &self.blobs.read_small(&m.config, manifest::MAX_JSON_BYTES)?,
            m.layers.len(),
        )?;
        let diff_ids = diff_ids(&config);
        let counters: Vec<AtomicU64> = m.layers.iter().map(|_| AtomicU64::new(0)).collect();
        let budget = Arc::new(Budget::new(self.config.max_image_bytes));
        // Every layer's download may start at once, up to `parallel_layers`; each unpack starts
        // as soon as its blob is in, bounded by the store-wide unpack limit (the CPUs). A layer
        // never waits for another layer's unpack to be let into the network.
        let downloads = tokio::sync::Semaphore::new(self.config.parallel_layers as usize);
        let work = futures::stream::iter(m.layers.clone().into_iter().enumerate())
            .map(|(i, l)| {
                let (remote, counters, budget, diff, downloads) =
                    (&remote, &counters, &budget, &diff_ids, &downloads);
                async move {
                    {
                        let _slot = downloads
                            .acquire()
                            .await
                            .map_err(|_| ImageError::Unavailable("the agent is stopping".into()))?;
                        remote
                            .fetch_blob(
                                &self.blobs,
                                &l.digest,
                                l.size,
                                self.config.max_image_bytes,
                                &counters[i],
                            )
                            .await?;
                    }
                    self.ensure_layer(tenant, id_start, &l, diff.get(i), budget)
                        .await
                }
            })
            .buffer_unordered(m.layers.len().max(1))
            .try_collect::<Vec<()>>();
        let report = report_progress(&m.layers, &counters, progress.as_ref());
        let result = tokio::select! {
            r = work => r,
            () = report => unreachable!("progress reporting never ends on its own"),
        };
        if let Some(tx) = &progress {
            send_progress(tx, &m.layers, &counters, None).await;
        }
        result?;
        let record = ImageRecord::new(
            reference,
            normalized,
            resolved.digest.clone(),
            resolved.manifest_digest.clone(),
            m,
            Source::Registry,
        );
        self.record(tenant, record, pins, guard).await
    }

    /// Saves the record of a pulled or imported image, then lets go of its blobs' pins and of
    /// the tenant's lock; a replaced image's layers no other image uses are collected.
    async fn record(
        &self,
        tenant: &str,
        record: ImageRecord,
        pins: blobs::Pins,
        guard: tokio::sync::RwLockReadGuard<'_, ()>,
    ) -> Result<ImageRecord, ImageError> {
        let replaced = self.save(tenant, record.clone())?;
        drop(pins);
        drop(guard);
        if replaced {
            self.collect(tenant).await;
        }
        Ok(record)
    }

    /// Gives `rec`, an image `tenant` has, the name `reference` too (the tag another tenant
    /// pulled it by), unless the tenant has that name already: as if it had been pulled by it.
    /// The record by digest it was given by goes (the tag names that content now).
    pub async fn name_as(
        &self,
        tenant: &str,
        rec: &ImageRecord,
        reference: &str,
    ) -> Result<ImageRecord, ImageError> {
        let parsed = parse_reference(reference)?;
        let lock = self.tenant_lock(tenant);
        let guard = lock.read().await;
        if self
            .list(Some(tenant), "")
            .iter()
            .any(|(_, r)| r.reference == reference)
        {
            return Ok(rec.clone());
        }
        let mut named = rec.clone();
        named.reference = reference.into();
        named.normalized = parsed.whole();
        let replaced = self.save(tenant, named.clone())?;
        drop(guard);
        if replaced {
            self.collect(tenant).await;
        }
        Ok(named)
    }

    fn check_size(&self, m: &Manifest) -> Result<(), ImageError> {
        let total: u64 = m.layers.iter().map(|l| l.size).sum::<u64>() + m.config_size;
        if total > self.config.max_image_bytes {
            return Err(ImageError::TooLarge(format!(
                "the image's blobs are {total} bytes, over the {}-byte cap ([images] max_image_bytes)",
                self.config.max_image_bytes
            )));
        }
        Ok(())
    }

    /// Unpacks one layer into the tenant's store unless it is there already.
    async fn ensure_layer(
        &self,
        tenant: &str,
        id_start: u32,
        l: &Layer,
        diff_id: Option<&Digest>,
        budget: &Arc<Budget>,
    ) -> Result<(), ImageError> {
        let key = layer_key(&l.digest).to_string();
        let ldir = self.tenant_dir(tenant).join("l");
        let dest = ldir.join(&key);
        let _g = self.layer_locks.lock(&format!("{tenant}/{key}")).await;
        if dest.is_dir() {
            return Ok(());
        }
        let _cpu = self
            .unpacks
            .acquire()
            .await
            .map_err(|_| ImageError::Unavailable("the agent is stopping".into()))?;
        crate::fsutil::ensure_dir(&self.tenant_dir(tenant), 0o700)
            .map_err(io_at(self.tenant_dir(tenant)))?;
        fs::create_dir_all(&ldir).map_err(io_at(&ldir))?;
        let tmp = ldir.join(format!(".tmp-{key}-{:08x}", rand::random::<u32>()));
        let blob = self.blobs.path(&l.digest);
        let (digest, compression, diff_id) = (l.digest.clone(), l.compression, diff_id.cloned());
        let budget = budget.clone();
        // If this future is dropped (another layer of the pull failed), the unpack still runs
        // to its end without the lock; a second unpack of the same layer may then race it. Each
        // works in its own temporary directory, and whichever renames second keeps the first's.
        tokio::task::spawn_blocking(move || {
            let r = layer::unpack_layer(
                &blob,
                &digest,
                compression,
                diff_id.as_ref(),
                &tmp,
                id_start,
                &budget,
            )
            .and_then(|()| match fs::rename(&tmp, &dest) {
                Err(_) if dest.is_dir() => {
                    let _ = fs::remove_dir_all(&tmp);
                    Ok(())
                }
                other => other.map_err(io_at(&dest)),
            });
            if r.is_err() {
                let _ = fs::remove_dir_all(&tmp);
            }
            r
        })
        .await
        .map_err(|e| ImageError::Io {
            path: ldir.clone(),
            source: std::io::Error::other(e),
        })?
    }

    /// Records an image (replacing one of the same reference). Returns whether one was replaced.
    ///
    /// A reference that now names other content (a tag that moved) does not take the old image
    /// away: containers made from it may still run on its layers. The old image stays, by its
    /// digest (`repo@sha256:…`, untagged, as the CRI lists it), until it is removed like any
    /// image (kubelet's image GC removes it once no container uses it).
    fn save(&self, tenant: &str, record: ImageRecord) -> Result<bool, ImageError> {
        let mut recs = self.records();
        let mut list = recs.get(tenant).cloned().unwrap_or_default();
        let before = list.len();
        let mut kept = Vec::new();
        list.retain(|r| {
            if r.reference != record.reference {
                return true;
            }
            if r.manifest_digest != record.manifest_digest {
                let mut old = r.clone();
                old.reference = r.normalized_repo_at();
                old.normalized = old.reference.clone();
                kept.push(old);
            }
            false
        });
        // Back to content kept untagged before (A, B, A again): the tag names it now.
        let now_at = record.normalized_repo_at();
        list.retain(|r| !(r.reference == now_at && r.manifest_digest == record.manifest_digest));
        for old in kept {
            if !list.iter().any(|r| r.reference == old.reference)
                && old.reference != record.reference
            {
                list.push(old);
            }
        }
        let replaced = list.len() != before;
        list.push(record);
        self.write_records(tenant, &list)?;
        recs.insert(tenant.to_string(), list);
        Ok(replaced)
    }

    /// Writes a tenant's records durably (temp file, fsync, rename).
    fn write_records(&self, tenant: &str, list: &[ImageRecord]) -> Result<(), ImageError> {
        let dir = self.tenant_dir(tenant);
        crate::fsutil::ensure_dir(&dir, 0o700).map_err(io_at(&dir))?;
        let file = dir.join("images.json");
        let bytes = serde_json::to_vec_pretty(list).map_err(|e| ImageError::Io {
            path: file.clone(),
            source: std::io::Error::other(e),
        })?;
        crate::fsutil::write_atomic(&file, &bytes, 0o600).map_err(io_at(&file))
    }

    /// Removes an image of a tenant. `containers` are the tenant's (name, image) pairs: an
    /// image one of them uses is refused.
    pub async fn remove(
        &self,
        tenant: &str,
        q: &str,
        containers: &[(String, String)],
    ) -> Result<ImageRecord, ImageError> {
        let lock = self.tenant_lock(tenant);
        let _g = lock.write().await;
        let image = self.get(tenant, q)?;
        // A container names what it runs by id: another record of the same content (a second
        // tag of it) keeps that content's layers, so this one may go.
        let same_content_stays = self.records().get(tenant).is_some_and(|l| {
            l.iter()
                .any(|r| r.reference != image.reference && r.config_digest == image.config_digest)
        });
        let users: Vec<&str> = containers
            .iter()
            .filter(|(_, img)| {
                image.matches(img)
                    && !(same_content_stays && img.as_str() == image.config_digest.as_str())
            })
            .map(|(n, _)| n.as_str())
            .collect();
        if !users.is_empty() {
            return Err(ImageError::InUse {
                reference: image.reference.clone(),
                containers: users.join(", "),
            });
        }
        {
            let mut recs = self.records();
            let mut list = recs.get(tenant).cloned().unwrap_or_default();
            list.retain(|r| r.reference != image.reference);
            self.write_records(tenant, &list)?;
            recs.insert(tenant.to_string(), list);
        }
        self.collect_locked(tenant);
        Ok(image)
    }

    /// Deletes every image of a tenant (when the tenant goes).
    pub async fn remove_tenant(&self, tenant: &str) {
        let lock = self.tenant_lock(tenant);
        let _g = lock.write().await;
        self.records().remove(tenant);
        let dir = self.tenant_dir(tenant);
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a tenant's images failed");
        }
        self.gc();
        self.tenant_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
    }

    async fn collect(&self, tenant: &str) {
        let lock = self.tenant_lock(tenant);
        let _g = lock.write().await;
        self.collect_locked(tenant);
    }

    /// Deletes the tenant's layer directories no record uses, then unreferenced blobs. The
    /// caller holds the tenant's lock exclusively.
    fn collect_locked(&self, tenant: &str) {
        let keep: HashSet<String> = self
            .records()
            .get(tenant)
            .into_iter()
            .flatten()
            .flat_map(|r| r.layers.iter().map(|l| layer_key(&l.digest).to_string()))
            .collect();
        let ldir = self.tenant_dir(tenant).join("l");
        if let Ok(rd) = fs::read_dir(&ldir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name)
                    && let Err(err) = fs::remove_dir_all(e.path())
                {
                    tracing::warn!(dir = %e.path().display(), error = %err, "removing a layer failed");
                }
            }
        }
        self.gc();
    }

    /// Deletes blobs no image of any tenant references (pulls in flight pin theirs).
    pub fn gc(&self) {
        let keep: HashSet<Digest> = self
            .records()
            .values()
            .flatten()
            .flat_map(|r| r.blobs().cloned())
            .collect();
        match self.blobs.gc(&keep) {
            Ok((0, _)) => {}
            Ok((n, bytes)) => tracing::info!(blobs = n, bytes, "unreferenced blobs deleted"),
            Err(e) => tracing::warn!(error = %e, "blob garbage collection failed"),
        }
    }
}

fn diff_ids(c: &ImageConfig) -> Vec<Digest> {
    c.rootfs
        .as_ref()
        .map(|r| {
            r.diff_ids
                .iter()
                .filter_map(|d| Digest::parse(d).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends every layer's progress that changed since `last` (all of them when `last` is None).
async fn send_progress(
    tx: &mpsc::Sender<LayerProgress>,
    layers: &[Layer],
    counters: &[AtomicU64],
    last: Option<&mut Vec<u64>>,
) {
    let mut unused = Vec::new();
    let (last, all) = match last {
        Some(l) => (l, false),
        None => (&mut unused, true),
    };
    last.resize(layers.len(), u64::MAX);
    for (i, l) in layers.iter().enumerate() {
        let done = counters[i].load(Ordering::Relaxed);
        if all || last[i] != done {
            last[i] = done;
            // A caller that went away does not stop the pull.
            let _ = tx
                .send(LayerProgress {
                    digest: l.digest.to_string(),
                    total_bytes: l.size,
                    done_bytes: done,
                })
                .await;
        }
    }
}

async fn report_progress(
    layers: &[Layer],
    counters: &[AtomicU64],
    tx: Option<&mpsc::Sender<LayerProgress>>,
) {
    let Some(tx) = tx else {
        return std::future::pending().await;
    };
    let mut last = Vec::new();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tick.tick().await;
        send_progress(tx, layers, counters, Some(&mut last)).await;
    }
}
