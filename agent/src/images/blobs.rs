//! The host-wide content-addressed blob cache: `<state_dir>/blobs/sha256/<hex>` holds only
//! complete blobs whose bytes were checked against their digest; downloads in progress live in
//! `<state_dir>/blobs/ingest/<hex>` and move in with one rename. One download per digest at a
//! time: a second puller of the same blob waits for the first and then finds it cached.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::{
    error::{ImageError, io_at},
    manifest::Digest,
};

/// Ingest files older than this are dropped at start-up instead of resumed.
const STALE_INGEST: Duration = Duration::from_secs(24 * 3600);

/// Locks by key; an entry lives while somebody holds or waits for it.
#[derive(Debug, Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A held [`KeyedLocks`] lock.
#[derive(Debug)]
pub struct KeyGuard<'a> {
    owner: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.owner.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map still holds it: nobody waits; forget the entry.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

impl KeyedLocks {
    /// Waits for the lock of `key`.
    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let m = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let guard = m.lock_owned().await;
        KeyGuard {
            owner: self,
            key: key.to_string(),
            guard: Some(guard),
        }
    }
}

/// The blob cache.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    locks: KeyedLocks,
    /// Digests in use by pulls and imports that have not recorded their image yet; GC keeps them.
    pins: Mutex<HashMap<Digest, usize>>,
}

/// Keeps digests from GC while alive.
#[derive(Debug)]
pub struct Pins {
    store: Arc<BlobStore>,
    digests: Vec<Digest>,
}

impl Pins {
    /// Pins one more digest.
    pub fn add(&mut self, d: &Digest) {
        *self
            .store
            .pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(d.clone())
            .or_default() += 1;
        self.digests.push(d.clone());
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut pins = self.store.pins.lock().unwrap_or_else(|p| p.into_inner());
        for d in &self.digests {
            if let Some(n) = pins.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(d);
                }
            }
        }
    }
}

impl BlobStore {
    /// Opens (creating) the cache under `dir`; stale partial downloads are dropped.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        for d in [dir.join("sha256"), dir.join("ingest")] {
            fs::create_dir_all(&d).map_err(io_at(&d))?;
        }
        let ingest = dir.join("ingest");
        for e in fs::read_dir(&ingest).map_err(io_at(&ingest))?.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_none_or(|age| age > STALE_INGEST);
            let name = e.file_name();
            let valid = name
                .to_str()
                .is_some_and(|n| Digest::parse(&format!("sha256:{n}")).is_ok());
            if old || !valid {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            locks: KeyedLocks::default(),
            pins: Mutex::new(HashMap::new()),
        })
    }

    /// Where a complete blob lives.
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join("sha256").join(d.hex())
    }

    /// Where a download of `d` in progress lives (one at a time, under [`BlobStore::lock`]).
    pub fn ingest_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("ingest").join(d.hex())
    }

    /// Whether the blob is cached.
    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// The download lock of one digest.
    pub async fn lock(&self, d: &Digest) -> KeyGuard<'_> {
        self.locks.lock(d.as_str()).await
    }

    /// An empty pin set.
    pub fn pins(self: &Arc<Self>) -> Pins {
        Pins {
            store: self.clone(),
            digests: Vec::new(),
        }
    }

    /// Moves a checked ingest file into the cache, durably.
    pub fn commit(&self, d: &Digest, file: fs::File) -> Result<(), ImageError> {
        let from = self.ingest_path(d);
        file.sync_all().map_err(io_at(&from))?;
        drop(file);
        let to = self.path(d);
        fs::rename(&from, &to).map_err(io_at(&to))?;
        crate::fsutil::sync_dir(&self.dir.join("sha256")).map_err(io_at(&to))
    }

    /// Stores small bytes (a manifest or config) after checking them against `d`.
    pub fn put(&self, d: &Digest, bytes: &[u8]) -> Result<(), ImageError> {
        let got = Digest::of(bytes);
        if &got != d {
            return Err(ImageError::Corrupt(format!(
                "blob {d} does not match its digest (its bytes hash to {got})"
            )));
        }
        if self.has(d) {
            return Ok(());
        }
        let tmp =
            self.dir
                .join("ingest")
                .join(format!("{}.{:08x}", d.hex(), rand::random::<u32>()));
        let mut f = fs::File::create(&tmp).map_err(io_at(&tmp))?;
        f.write_all(bytes).map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
        let to = self.path(d);
        fs::rename(&tmp, &to).map_err(io_at(&to))
    }

    /// Reads a small cached blob, checking its digest again.
    pub fn read_small(&self, d: &Digest, max: u64) -> Result<Vec<u8>, ImageError> {
        let p = self.path(d);
        let bytes = crate::fsutil::read_capped(&p, max).map_err(io_at(&p))?;
        if &Digest::of(&bytes) != d {
            let _ = fs::remove_file(&p);
            return Err(ImageError::Corrupt(format!(
                "cached blob {d} no longer matches its digest; it was removed, pull again"
            )));
        }
        Ok(bytes)
    }

    /// Deletes every cached blob not in `keep` and not pinned. Returns (blobs, bytes) removed.
    pub fn gc(&self, keep: &HashSet<Digest>) -> io::Result<(usize, u64)> {
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (mut n, mut bytes) = (0, 0);
        for e in fs::read_dir(self.dir.join("sha256"))?.flatten() {
            let Some(d) = e
                .file_name()
                .to_str()
                .and_then(|h| Digest::parse(&format!("sha256:{h}")).ok())
            else {
                continue;
            };
            if keep.contains(&d) || pins.contains_key(&d) {
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(e.path()).is_ok() {
                n += 1;
                bytes += size;
            }
        }
        Ok((n, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_checks_and_gc_keeps_what_is_referenced_or_pinned() {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(BlobStore::open(d.path()).unwrap());
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        assert!(matches!(s.put(&a, b"not a"), Err(ImageError::Corrupt(_))));
        assert!(!s.has(&a));
        for (dg, bytes) in [(&a, b"a"), (&b, b"b"), (&c, b"c")] {
            s.put(dg, bytes).unwrap();
        }
        let mut pins = s.pins();
        pins.add(&b);
        let (n, _) = s.gc(&HashSet::from([a.clone()])).unwrap();
        assert_eq!(n, 1);
        assert!(s.has(&a) && s.has(&b) && !s.has(&c));
        drop(pins);
        s.gc(&HashSet::new()).unwrap();
        assert!(!s.has(&a) && !s.has(&b));
    }

    #[test]
    fn a_tampered_cached_blob_is_dropped_on_read() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let a = Digest::of(b"config");
        s.put(&a, b"config").unwrap();
        fs::write(s.path(&a), b"evil").unwrap();
        assert!(matches!(s.read_small(&a, 100), Err(ImageError::Corrupt(_))));
        assert!(!s.has(&a));
    }

    #[tokio::test]
    async fn keyed_locks_serialize_one_key_only() {
        let l = KeyedLocks::default();
        let g = l.lock("x").await;
        let other = tokio::time::timeout(Duration::from_millis(50), l.lock("y")).await;
        assert!(other.is_ok(), "another key is free");
        drop(other);
        let same = tokio::time::timeout(Duration::from_millis(50), l.lock("x")).await;
        assert!(same.is_err(), "the same key waits");
        drop(g);
        assert!(l.map.lock().unwrap().is_empty());
    }
}
