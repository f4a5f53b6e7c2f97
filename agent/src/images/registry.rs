//! Talking to an OCI distribution registry, through `oci-client` (token and basic auth, the v2
//! API). One client per pull: its token cache then holds only that caller's credentials, so a
//! tenant never rides on another tenant's token.
//!
//! Blobs are streamed into the blob cache's ingest file while they are hashed. A dropped
//! connection is resumed with a range request (a few times, with backoff); a partial file left by
//! a crash is resumed the same way. The digest is checked before the blob enters the cache.

use std::{
    fs,
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use futures::StreamExt;
use oci_client::{
    Client, Reference,
    client::{BlobResponse, ClientConfig, ClientProtocol},
    errors::{OciDistributionError, OciErrorCode},
    secrets::RegistryAuth,
};
use sha2::{Digest as _, Sha256};

use super::{
    ImagesConfig,
    blobs::BlobStore,
    error::{ImageError, io_at},
    manifest::{self, Digest, Manifest, Parsed},
};

/// Attempts per blob when the connection drops.
const BLOB_ATTEMPTS: u32 = 3;
/// First wait between attempts; doubles.
const RETRY_BASE: Duration = Duration::from_millis(200);

/// Credentials for one pull.
#[derive(Clone, Default)]
pub struct Credentials {
    /// Basic-auth user (with `password`).
    pub username: String,
    /// Basic-auth password.
    pub password: String,
    /// A bearer token instead.
    pub identity_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A registry repository, reached with one caller's credentials.
pub struct Remote {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("reference", &self.reference.whole())
            .finish_non_exhaustive()
    }
}

/// What a reference resolved to.
#[derive(Debug)]
pub struct Resolved {
    /// The digest the reference points at (an index's, for a multi-platform image).
    pub digest: Digest,
    /// The index, when there was one: its bytes.
    pub index: Option<Vec<u8>>,
    /// The platform manifest's digest and bytes.
    pub manifest_digest: Digest,
    /// Its bytes.
    pub manifest_bytes: Vec<u8>,
    /// It, parsed.
    pub manifest: Manifest,
}

impl Remote {
    /// A client for `reference` with `creds` (anonymous when empty).
    pub fn new(cfg: &ImagesConfig, mut reference: Reference, creds: &Credentials) -> Self {
        let mut plain = cfg.insecure_registries.clone();
        // A mirrored registry is asked at its mirror (with `?ns=<registry>`, as containerd
        // does); the image keeps its own name.
        if let Some(m) = cfg.mirrors.get(reference.registry()) {
            reference.set_mirror_registry(m.endpoint.clone());
            if m.plain_http {
                plain.push(m.endpoint.clone());
            }
        }
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            connect_timeout: Some(Duration::from_secs(cfg.connect_timeout_secs)),
            read_timeout: Some(Duration::from_secs(cfg.read_timeout_secs)),
            platform_resolver: None,
            user_agent: concat!("caas-agent/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let auth = if !creds.identity_token.is_empty() {
            RegistryAuth::Bearer(creds.identity_token.clone())
        } else if !creds.username.is_empty() {
            RegistryAuth::Basic(creds.username.clone(), creds.password.clone())
        } else {
            RegistryAuth::Anonymous
        };
        Self {
            client: Client::new(config),
            reference,
            auth,
        }
    }

    fn repo(&self) -> String {
        format!(
            "{}/{}",
            self.reference.resolve_registry(),
            self.reference.repository()
        )
    }

    /// Maps a client error; `what` names the manifest or blob asked for.
    fn error(&self, e: OciDistributionError, what: &str) -> ImageError {
        let repo = self.repo();
        match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => ImageError::Denied(format!(
                "registry {repo} refused access to {what} with the given credentials \
                 (give the tenant's registry credentials with the pull)"
            )),
            OciDistributionError::ImageManifestNotFoundError(_) => {
                ImageError::NotFound(format!("{what} is not in {repo}"))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|e| format!("{:?}", e.code))
                    .collect();
                let msg = envelope
                    .errors
                    .iter()
                    .map(|e| e.message.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                match envelope.errors.first().map(|e| &e.code) {
                    Some(
                        OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestUnknown
                        | OciErrorCode::ManifestBlobUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound,
                    ) => ImageError::NotFound(format!("{what} is not in {repo} ({msg})")),
                    Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                        ImageError::Denied(format!(
                            "registry {repo} refused access to {what} ({msg}); give the \
                             tenant's registry credentials with the pull"
                        ))
                    }
                    Some(OciErrorCode::Toomanyrequests) => ImageError::Unavailable(format!(
                        "registry {repo} is rate-limiting ({msg}); try again later"
                    )),
                    _ => ImageError::Registry(format!(
                        "{repo} answered {} for {what}: {msg}",
                        codes.join(",")
                    )),
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                404 => ImageError::NotFound(format!("{what} is not in {repo}")),
                401 | 403 => ImageError::Denied(format!(
                    "registry {repo} refused access to {what} (HTTP {code})"
                )),
                429 | 500..=599 => ImageError::Unavailable(format!(
                    "registry {repo} answered HTTP {code} for {what}: {}",
                    message.chars().take(200).collect::<String>()
                )),
                _ => ImageError::Registry(format!(
                    "{repo} answered HTTP {code} for {what}: {}",
                    message.chars().take(200).collect::<String>()
                )),
            },
            OciDistributionError::RequestError(e) => ImageError::Unavailable(format!(
                "registry {}: {what}: {}",
                self.reference.resolve_registry(),
                chain(&e)
            )),
            OciDistributionError::DigestError(e) => {
                ImageError::Corrupt(format!("{what} from {repo}: {e}"))
            }
            other => ImageError::Registry(format!("{repo}: {what}: {other}")),
        }
    }

    async fn manifest_at(&self, r: &Reference) -> Result<(Vec<u8>, Digest), ImageError> {
        let what = format!("manifest {}", r.digest().or(r.tag()).unwrap_or("latest"));
        let (bytes, _) = self
            .client
            .pull_manifest_raw(r, &self.auth, manifest::ACCEPT)
            .await
            .map_err(|e| self.error(e, &what))?;
        if bytes.len() as u64 > manifest::MAX_JSON_BYTES {
            return Err(ImageError::Unsupported(format!(
                "{what} is {} bytes, over the {}-byte limit",
                bytes.len(),
                manifest::MAX_JSON_BYTES
            )));
        }
        let got = Digest::of(&bytes);
        if let Some(want) = r.digest()
            && want != got.as_str()
        {
            return Err(ImageError::Corrupt(format!(
                "{what} from {}: its bytes hash to {got}",
                self.repo()
            )));
        }
        Ok((bytes.to_vec(), got))
    }

    /// Fetches the manifest the reference names, following an index to this host's platform.
    pub async fn resolve(&self) -> Result<Resolved, ImageError> {
        let (bytes, digest) = self.manifest_at(&self.reference).await?;
        match manifest::parse(&bytes, "")? {
            Parsed::Manifest(m) => Ok(Resolved {
                digest: digest.clone(),
                index: None,
                manifest_digest: digest,
                manifest_bytes: bytes,
                manifest: m,
            }),
            Parsed::Index(entries) => {
                let entry = manifest::pick_platform(&entries)?;
                let inner = Digest::parse(&entry.digest)?;
                let r = Reference::with_digest(
                    self.reference.registry().to_string(),
                    self.reference.repository().to_string(),
                    inner.to_string(),
                );
                let (mbytes, mdigest) = self.manifest_at(&r).await?;
                match manifest::parse(&mbytes, &entry.media_type)? {
                    Parsed::Manifest(m) => Ok(Resolved {
                        digest,
                        index: Some(bytes),
                        manifest_digest: mdigest,
                        manifest_bytes: mbytes,
                        manifest: m,
                    }),
                    Parsed::Index(_) => Err(ImageError::Unsupported(format!(
                        "index entry {inner} is itself an index; nested indexes are not followed"
                    ))),
                }
            }
        }
    }

    /// Makes sure blob `d` (of `size` bytes) is in the cache, downloading it if not. `done`
    /// follows the bytes on disk, for progress.
    pub async fn fetch_blob(
        &self,
        store: &BlobStore,
        d: &Digest,
        size: u64,
        max: u64,
        done: &AtomicU64,
    ) -> Result<(), ImageError> {
        if size > max {
            return Err(ImageError::TooLarge(format!(
                "blob {d} is {size} bytes, over the {max}-byte image cap ([images] max_image_bytes)"
            )));
        }
        let _g = store.lock(d).await;
        if store.has(d) {
            done.store(size, Ordering::Relaxed);
            return Ok(());
        }
        let path = store.ingest_path(d);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_at(&path))?;
        // A pull given up on (another layer of it failed, or the agent is stopping) drops this
        // future mid-download: its partial file goes with it. Only a crash leaves one behind,
        // and that one is resumed.
        let mut cleanup = RemoveOnDrop(Some(path.clone()));
        let mut hash = Sha256::new();
        // A partial download left by a crash: hash what is there and go on from its end.
        let mut offset = file.metadata().map_err(io_at(&path))?.len();
        if offset > 0 && offset <= size {
            let mut buf = vec![0u8; 1 << 20];
            let mut left = offset;
            while left > 0 {
                let n = file.read(&mut buf).map_err(io_at(&path))?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                left = left.saturating_sub(n as u64);
            }
            tracing::info!(blob = %d, offset, "resuming a partial download");
        } else {
            file.set_len(0).map_err(io_at(&path))?;
            offset = 0;
        }
        done.store(offset, Ordering::Relaxed);
        let mut resumed = offset > 0;
        let checked = loop {
            let mut attempt = 0;
            let result = loop {
                match self
                    .download(d, size, &mut file, &mut hash, &mut offset, done)
                    .await
                {
                    Ok(()) => break Ok(()),
                    Err(e) if e.transient() && attempt + 1 < BLOB_ATTEMPTS => {
                        attempt += 1;
                        tracing::warn!(blob = %d, offset, attempt, error = %e, "blob download interrupted; resuming");
                        tokio::time::sleep(RETRY_BASE * 2u32.pow(attempt - 1)).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            let checked = result.and_then(|()| {
                let got = format!("sha256:{:x}", hash.clone().finalize());
                if size > 0 && offset != size {
                    Err(ImageError::Corrupt(format!(
                        "blob {d} from {} has {offset} bytes; its descriptor says {size}",
                        self.repo()
                    )))
                } else if got != d.as_str() {
                    Err(ImageError::Corrupt(format!(
                        "blob {d} from {} does not match its digest (its bytes hash to {got}); \
                         it was not cached",
                        self.repo()
                    )))
                } else {
                    Ok(())
                }
            });
            match checked {
                // The partial file a crash left may be what is wrong: start over, once.
                Err(ImageError::Corrupt(_)) if resumed => {
                    tracing::warn!(blob = %d, "a resumed download did not match its digest; downloading it again whole");
                    resumed = false;
                    hash = Sha256::new();
                    offset = 0;
                    done.store(0, Ordering::Relaxed);
                    file.set_len(0).map_err(io_at(&path))?;
                }
                other => break other,
            }
        };
        match checked {
            Ok(()) => {
                let r = store.commit(d, file);
                if r.is_ok() {
                    cleanup.0 = None;
                }
                r
            }
            Err(e) => {
                drop(file);
                Err(e)
            }
        }
    }

    async fn download(
        &self,
        d: &Digest,
        size: u64,
        file: &mut fs::File,
        hash: &mut Sha256,
        offset: &mut u64,
        done: &AtomicU64,
    ) -> Result<(), ImageError> {
        let what = format!("blob {d}");
        let resp = self
            .client
            .pull_blob_stream_partial(&self.reference, d.as_str(), *offset, None)
            .await
            .map_err(|e| self.error(e, &what))?;
        let mut stream = match resp {
            BlobResponse::Partial(s) => s.stream,
            BlobResponse::Full(s) => {
                if *offset > 0 {
                    // The registry ignored the range: start over.
                    *hash = Sha256::new();
                    *offset = 0;
                    file.set_len(0).map_err(io_at("ingest file"))?;
                    file.seek(SeekFrom::Start(0))
                        .map_err(io_at("ingest file"))?;
                }
                s.stream
            }
        };
        file.seek(SeekFrom::Start(*offset))
            .map_err(io_at("ingest file"))?;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // All bytes are in: the client's own digest check failed. Ours, next, decides
                // and names the blob.
                Err(_) if size > 0 && *offset == size => return Ok(()),
                Err(e) => {
                    return Err(ImageError::Unavailable(format!(
                        "registry {} dropped blob {d} after {} of {size} bytes: {e}",
                        self.reference.resolve_registry(),
                        *offset
                    )));
                }
            };
            if size > 0 && *offset + chunk.len() as u64 > size {
                return Err(ImageError::Corrupt(format!(
                    "blob {d} from {} is longer than the {size} bytes its descriptor says",
                    self.repo()
                )));
            }
            file.write_all(&chunk).map_err(io_at("ingest file"))?;
            hash.update(&chunk);
            *offset += chunk.len() as u64;
            done.store(*offset, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Removes a file when dropped, unless disarmed (its path taken).
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
