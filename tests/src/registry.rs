//! Harness for the image tests: a real OCI distribution registry on 127.0.0.1 (Debian's
//! `docker-registry`, CNCF distribution 2.8) with no auth, htpasswd Basic auth, or token (bearer)
//! auth backed by a docker token server on 127.0.0.1 ([`TokenServer`], ES256 JWTs), an OCI image
//! layout builder, `skopeo` pushes, and a fault-injecting HTTP proxy in front of the registry.
//!
//! Nothing here talks to any address but 127.0.0.1.

use std::{
    collections::HashMap,
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header::{HeaderValue, LOCATION, WWW_AUTHENTICATE},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair},
};
use sha2::{Digest as _, Sha256};
use tokio::net::{TcpListener, TcpStream};

use crate::{privileged_required, skip};

/// `PATH` of every image config the builder writes.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Media types the tests meet.
pub mod media {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI layer, gzip.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI layer, zstd.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// OCI layer, uncompressed.
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker layer, gzip.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
}

/// Whether the registry tools are installed (`docker-registry`, `skopeo`, `htpasswd`). When one
/// is missing the test is skipped with the reason, or fails under `CAAS_REQUIRE_PRIVILEGED=1`
/// (CI installs them with scripts/setup.sh).
pub fn tools_available(test: &str) -> bool {
    let missing: Vec<&str> = ["docker-registry", "skopeo", "htpasswd"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!(
        "needs {} (Debian: docker-registry skopeo apache2-utils; scripts/setup.sh installs them)",
        missing.join(", ")
    );
    assert!(
        !privileged_required(),
        "{test}: {reason}, and CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory"
    );
    skip(test, &reason);
    false
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// The hex part of a `sha256:<hex>` digest.
pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// How to start a [`Registry`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOpts {
    /// Basic auth (htpasswd, bcrypt) for every repository: `(user, password)`. With `token`,
    /// these are the credentials the token server accepts instead.
    pub auth: Option<(String, String)>,
    /// Token (bearer) auth instead of htpasswd: the registry trusts the JWTs of a
    /// [`TokenServer`] started with it, which grants `auth`'s user every repository action it
    /// asks for and everyone else nothing. Needs `auth`.
    pub token: bool,
}

impl RegistryOpts {
    /// A registry that answers only to `user`/`password` (HTTP Basic, htpasswd).
    pub fn with_auth(user: &str, password: &str) -> Self {
        Self {
            auth: Some((user.into(), password.into())),
            token: false,
        }
    }

    /// A registry behind the distribution token flow: clients get a `Bearer` challenge whose
    /// realm is a [`TokenServer`] on 127.0.0.1, which signs tokens granting what they ask for to
    /// `user`/`password` and empty tokens to anyone else.
    pub fn with_token_auth(user: &str, password: &str) -> Self {
        Self {
            auth: Some((user.into(), password.into())),
            token: true,
        }
    }
}

/// A `docker-registry serve` child on `127.0.0.1:<free port>`, plain HTTP, filesystem storage in a
/// temp dir with deletes enabled. Killed on drop (with its token server, if any).
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    auth: Option<(String, String)>,
    token: Option<TokenServer>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts a registry and waits until `GET /v2/` answers (200, or 401 with auth).
    pub async fn start(opts: RegistryOpts) -> anyhow::Result<Self> {
        let mut dir = tempfile::tempdir()?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let mut auth_yaml = String::new();
        let mut token = None;
        if opts.token {
            let (user, password) = opts.auth.as_ref().context("token auth needs credentials")?;
            let ts = TokenServer::start(TOKEN_SERVICE, TOKEN_ISSUER, user, password).await?;
            let bundle = dir.path().join("token-root.pem");
            std::fs::write(&bundle, ts.root_cert_pem())?;
            auth_yaml = format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    \
                 issuer: {TOKEN_ISSUER}\n    rootcertbundle: {bundle}\n",
                realm = ts.realm(),
                bundle = bundle.display(),
            );
            token = Some(ts);
        } else if let Some((user, password)) = &opts.auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .context("running htpasswd (apache2-utils)")?;
            ensure!(
                out.status.success(),
                "htpasswd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout)?;
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: caas-test-registry\n    path: {}\n",
                file.display()
            );
        }
        // The port comes from a bind to :0 that is then released, so another process may take
        // it first: the registry then exits (retry), or, worse, someone else answers on it. The
        // unique header below tells our registry apart.
        let id = crate::unique("registry");
        let mut last_err = None;
        for attempt in 0..5 {
            let port = free_port()?;
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n  headers:\n    X-Caas-Registry: [\"{id}\"]\n\
                 {auth_yaml}",
                storage = storage.display(),
            );
            let cfg_path = dir.path().join("config.yml");
            std::fs::write(&cfg_path, config)?;
            let log = dir.path().join(format!("registry-{attempt}.log"));
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve")
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log)?)
                .stderr(std::fs::File::create(
                    dir.path().join(format!("registry-{attempt}.err")),
                )?);
            // Environment variables override the config file (REGISTRY_HTTP_ADDR, ...).
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("REGISTRY_") {
                    cmd.env_remove(k);
                }
            }
            let child = cmd.spawn().context("starting docker-registry")?;
            let mut reg = Self {
                child,
                dir,
                port,
                auth: opts.auth.clone(),
                token: token.take(),
            };
            match reg.wait_ready(&id).await {
                Ok(()) => return Ok(reg),
                Err(e) => {
                    last_err = Some(e);
                    let _ = reg.child.kill();
                    let _ = reg.child.wait();
                    // Take the temp dir back for the next attempt (Drop kills nothing twice).
                    dir = std::mem::replace(&mut reg.dir, tempfile::tempdir()?);
                    token = reg.token.take();
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    async fn wait_ready(&mut self, id: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("docker-registry exited with {status}: {}", self.log_text());
            }
            if let Ok(r) = http_get(&self.host(), "/v2/", &[]).await
                && (r.status == 200 || r.status == 401)
            {
                ensure!(
                    r.header("x-caas-registry") == Some(id),
                    "another server answers on {}",
                    self.host()
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "docker-registry did not answer within 20 s: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The credentials it was started with.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Its token server, when started with [`RegistryOpts::with_token_auth`].
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token.as_ref()
    }

    /// Root of its filesystem storage.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the bytes of blob `digest` (`sha256:<hex>`) on disk. Every
    /// repository shares it, so tampering with it affects every image holding that blob.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest_hex(digest);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }

    /// Its stdout and stderr so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            let mut logs: Vec<_> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log" || x == "err"))
                .collect();
            logs.sort();
            for l in logs {
                s.push_str(&std::fs::read_to_string(l).unwrap_or_default());
            }
        }
        s
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting every manifest type, with its creds
    /// (through the token flow for a token-auth registry).
    pub async fn manifest(&self, repo: &str, reference: &str) -> anyhow::Result<RegistryManifest> {
        fetch_manifest(&self.host(), repo, reference, self.creds()).await
    }

    /// `GET /v2/<repo>/blobs/<digest>` with its creds (see [`registry_get`]).
    pub async fn blob(&self, repo: &str, digest: &str) -> anyhow::Result<HttpResponse> {
        registry_get(
            &self.host(),
            &format!("/v2/{repo}/blobs/{digest}"),
            &[],
            self.creds(),
        )
        .await
    }

    /// Pushes tag `tag` of the OCI layout at `layout` to `<this registry>/<repo_tag>` with
    /// skopeo and its creds, then fetches the manifest back and checks what skopeo made of it:
    /// for [`PushMode::Oci`] and [`PushMode::OciAll`] the registry must hold the layout's exact
    /// manifest (or index) bytes, so zstd layers stay zstd and digests are the layout's; for
    /// [`PushMode::DockerV2s2`] it must be a Docker schema 2 manifest with Docker layer types.
    pub async fn push(
        &self,
        layout: &Path,
        tag: &str,
        repo_tag: &str,
        mode: PushMode,
    ) -> anyhow::Result<RegistryManifest> {
        let opts = PushOpts {
            all: mode == PushMode::OciAll,
            v2s2: mode == PushMode::DockerV2s2,
            creds: self.auth.clone(),
        };
        let dest = format!("{}/{repo_tag}", self.host());
        push(layout, tag, &dest, &opts).await?;
        let (repo, rtag) = repo_tag
            .rsplit_once(':')
            .context("repo_tag must be repo:tag")?;
        let m = self.manifest(repo, rtag).await?;
        match mode {
            PushMode::Oci | PushMode::OciAll => {
                let want = layout_ref_digest(layout, tag)?;
                ensure!(
                    m.digest == want,
                    "skopeo rewrote {repo_tag}: registry has {} ({}), the layout {want}",
                    m.digest,
                    m.media_type
                );
                let expect = if mode == PushMode::OciAll {
                    media::OCI_INDEX
                } else {
                    media::OCI_MANIFEST
                };
                ensure!(m.media_type == expect, "{repo_tag} is {}", m.media_type);
            }
            PushMode::DockerV2s2 => {
                ensure!(
                    m.media_type == media::DOCKER_MANIFEST,
                    "{repo_tag} is {}",
                    m.media_type
                );
                ensure!(
                    m.json["config"]["mediaType"] == media::DOCKER_CONFIG,
                    "config of {repo_tag}: {}",
                    m.json["config"]
                );
                for l in m.json["layers"].as_array().context("layers")? {
                    ensure!(
                        l["mediaType"] == media::DOCKER_LAYER_GZIP,
                        "layer of {repo_tag}: {l}"
                    );
                }
            }
        }
        Ok(m)
    }
}

/// How [`Registry::push`] pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushMode {
    /// One image manifest, bytes and digests preserved.
    Oci,
    /// An image index and every manifest it lists (`--all`), bytes and digests preserved.
    OciAll,
    /// Converted to Docker schema 2 media types (`--format v2s2`).
    DockerV2s2,
}

/// Options of [`push`].
#[derive(Debug, Clone, Default)]
pub struct PushOpts {
    /// `--all`: an index and all its manifests.
    pub all: bool,
    /// `--format v2s2` (else `--preserve-digests`).
    pub v2s2: bool,
    /// `--dest-creds user:pass` (else `--dest-no-creds`).
    pub creds: Option<(String, String)>,
}

/// `skopeo copy oci:<layout>:<tag> docker://<dest>` over plain HTTP (`dest` is
/// `127.0.0.1:PORT/repo:tag`). Without `v2s2`, `--preserve-digests` makes skopeo fail rather than
/// recompress or convert anything (skopeo 1.9 keeps zstd layers as they are either way).
pub async fn push(layout: &Path, tag: &str, dest: &str, opts: &PushOpts) -> anyhow::Result<()> {
    ensure!(
        dest.starts_with("127.0.0.1:"),
        "pushes go to 127.0.0.1 only: {dest}"
    );
    let mut cmd = tokio::process::Command::new("skopeo");
    // --insecure-policy: no dependence on the host's /etc/containers/policy.json.
    cmd.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
    ]);
    if opts.all {
        cmd.arg("--all");
    }
    if opts.v2s2 {
        cmd.args(["--format", "v2s2"]);
    } else {
        cmd.arg("--preserve-digests");
    }
    match &opts.creds {
        Some((u, p)) => cmd.arg("--dest-creds").arg(format!("{u}:{p}")),
        None => cmd.arg("--dest-no-creds"),
    };
    cmd.arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .context("skopeo copy timed out")?
        .context("running skopeo")?;
    ensure!(
        out.status.success(),
        "skopeo copy oci:{}:{tag} docker://{dest} failed ({}): {}",
        layout.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The digest of the descriptor tagged `tag` in the layout's index.json.
pub fn layout_ref_digest(layout: &Path, tag: &str) -> anyhow::Result<String> {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    idx["manifests"]
        .as_array()
        .context("index.json has no manifests")?
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str())
        .map(str::to_string)
        .with_context(|| format!("no {tag} in {}", layout.display()))
}

/// A manifest (or index) as the registry serves it.
#[derive(Debug, Clone)]
pub struct RegistryManifest {
    /// `Docker-Content-Digest`, checked against the bytes.
    pub digest: String,
    /// `Content-Type`.
    pub media_type: String,
    /// The body.
    pub bytes: Bytes,
    /// The body, parsed.
    pub json: serde_json::Value,
}

impl RegistryManifest {
    /// Digests of its layers (a manifest's).
    pub fn layer_digests(&self) -> Vec<String> {
        self.json["layers"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .filter_map(|l| l["digest"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Media types of its layers.
    pub fn layer_media_types(&self) -> Vec<String> {
        self.json["layers"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .filter_map(|l| l["mediaType"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Digest of its config blob.
    pub fn config_digest(&self) -> Option<String> {
        self.json["config"]["digest"].as_str().map(str::to_string)
    }

    /// For an index: the digest of the manifest for `os`/`arch`.
    pub fn platform_digest(&self, os: &str, arch: &str) -> Option<String> {
        self.json["manifests"].as_array()?.iter().find_map(|m| {
            (m["platform"]["os"] == os && m["platform"]["architecture"] == arch)
                .then(|| m["digest"].as_str().map(str::to_string))
                .flatten()
        })
    }
}

/// Fetches a manifest from any registry-like `host` (a [`Registry`] or a [`FaultProxy`]) with
/// `creds` (see [`registry_get`]).
pub async fn fetch_manifest(
    host: &str,
    repo: &str,
    reference: &str,
    creds: Option<(&str, &str)>,
) -> anyhow::Result<RegistryManifest> {
    let headers = [(
        "accept",
        [
            media::OCI_MANIFEST,
            media::OCI_INDEX,
            media::DOCKER_MANIFEST,
            media::DOCKER_LIST,
        ]
        .join(", "),
    )];
    let path = format!("/v2/{repo}/manifests/{reference}");
    let r = registry_get(host, &path, &headers, creds).await?;
    ensure!(
        r.status == 200,
        "GET manifest {repo}:{reference}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let digest = r
        .header("docker-content-digest")
        .context("no Docker-Content-Digest")?
        .to_string();
    ensure!(
        digest == sha256_digest(&r.body),
        "Docker-Content-Digest {digest} is not the body's"
    );
    Ok(RegistryManifest {
        digest,
        media_type: r.header("content-type").unwrap_or_default().to_string(),
        json: serde_json::from_slice(&r.body)?,
        bytes: r.body,
    })
}

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl HttpResponse {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `GET http://<host><path>` over HTTP/1.1 on a fresh connection (host must be 127.0.0.1:PORT).
/// Errors when the connection fails or the body is cut short.
pub async fn http_get(
    host: &str,
    path: &str,
    headers: &[(&str, String)],
) -> anyhow::Result<HttpResponse> {
    ensure!(host.starts_with("127.0.0.1:"), "127.0.0.1 only: {host}");
    let fut = async {
        let stream = TcpStream::connect(host).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::get(path).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new())?)
            .await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        anyhow::Ok(HttpResponse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .with_context(|| format!("GET {host}{path} timed out"))?
}

/// `User-Agent` of the harness's own requests to registries and token servers, so a
/// [`TokenServer`] log tells them apart from the agent's (`caas-agent/...`).
pub const HARNESS_USER_AGENT: &str = "caas-tests-harness";

/// `GET http://<host><path>` from a registry-like `host` with `creds`: HTTP Basic first; when the
/// answer is a 401 with a `Bearer` challenge (a token-auth registry), a token for the
/// challenge's scope is fetched from its realm (127.0.0.1 only) with the same creds, and the
/// GET is sent again with it. Whatever the last answer is, it is returned.
pub async fn registry_get(
    host: &str,
    path: &str,
    headers: &[(&str, String)],
    creds: Option<(&str, &str)>,
) -> anyhow::Result<HttpResponse> {
    let mut h = headers.to_vec();
    h.push(("user-agent", HARNESS_USER_AGENT.into()));
    if let Some((u, p)) = creds {
        h.push(("authorization", basic_auth(u, p)));
    }
    let r = http_get(host, path, &h).await?;
    if r.status != 401 {
        return Ok(r);
    }
    let Some(challenge) = r
        .header("www-authenticate")
        .and_then(BearerChallenge::parse)
    else {
        return Ok(r);
    };
    let token = fetch_token(&challenge, creds).await?;
    h.retain(|(k, _)| *k != "authorization");
    h.push(("authorization", format!("Bearer {token}")));
    http_get(host, path, &h).await
}

/// A `WWW-Authenticate: Bearer realm="...",service="...",scope="..."` challenge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BearerChallenge {
    /// Where to get a token.
    pub realm: String,
    /// The `service` to ask for.
    pub service: Option<String>,
    /// The `scope` the registry wants (space-separated scopes, as sent).
    pub scope: Option<String>,
    /// `error`, when the token sent was not enough (`insufficient_scope`, `invalid_token`).
    pub error: Option<String>,
}

impl BearerChallenge {
    /// Parses a challenge header; `None` when it is not a Bearer one with a realm.
    pub fn parse(header: &str) -> Option<Self> {
        let (scheme, mut rest) = header.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut c = Self::default();
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if rest.is_empty() {
                break;
            }
            let (key, after) = rest.split_once('=')?;
            let (value, next) = match after.strip_prefix('"') {
                Some(q) => {
                    let end = q.find('"')?;
                    (&q[..end], &q[end + 1..])
                }
                None => after.split_once(',').unwrap_or((after, "")),
            };
            match key.trim().to_ascii_lowercase().as_str() {
                "realm" => c.realm = value.into(),
                "service" => c.service = Some(value.into()),
                "scope" => c.scope = Some(value.into()),
                "error" => c.error = Some(value.into()),
                _ => {}
            }
            rest = next;
        }
        (!c.realm.is_empty()).then_some(c)
    }
}

/// A token for `challenge` from its realm (`http://127.0.0.1:PORT/...` only), asked with `creds`
/// (anonymously without); the token server's refusal is an error.
pub async fn fetch_token(
    challenge: &BearerChallenge,
    creds: Option<(&str, &str)>,
) -> anyhow::Result<String> {
    let rest = challenge
        .realm
        .strip_prefix("http://")
        .with_context(|| format!("token realm is not plain http: {}", challenge.realm))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    ensure!(
        host.starts_with("127.0.0.1:"),
        "token realm off 127.0.0.1: {}",
        challenge.realm
    );
    let mut query = Vec::new();
    if let Some(s) = &challenge.service {
        query.push(format!("service={}", percent_encode(s)));
    }
    for scope in challenge.scope.iter().flat_map(|s| s.split_whitespace()) {
        query.push(format!("scope={}", percent_encode(scope)));
    }
    let mut headers = vec![("user-agent", HARNESS_USER_AGENT.to_string())];
    if let Some((u, p)) = creds {
        headers.push(("authorization", basic_auth(u, p)));
    }
    let r = http_get(host, &format!("/{path}?{}", query.join("&")), &headers).await?;
    ensure!(
        r.status == 200,
        "token server {} answered {}: {}",
        challenge.realm,
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    v["token"]
        .as_str()
        .or_else(|| v["access_token"].as_str())
        .map(str::to_string)
        .context("token server answered without a token")
}

/// `Basic <base64(user:password)>`.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64_with(input: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with padding (RFC 4648 section 4).
fn base64(input: &[u8]) -> String {
    base64_with(input, B64_STD, true)
}

/// base64url without padding (RFC 4648 section 5), as JWS wants it.
fn base64url(input: &[u8]) -> String {
    base64_with(input, B64_URL, false)
}

/// Decodes standard base64 (padding optional); `None` on anything else.
fn base64_decode(input: &str) -> Option<Vec<u8>> {
    let input = input.trim_end_matches('=');
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in input.bytes() {
        let v = B64_STD.iter().position(|&a| a == c)?;
        acc = (acc << 6) | u32::try_from(v).ok()?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    // Leftover bits must be padding zeros, and a lone 6-bit group is no byte at all.
    (bits < 6 && acc & ((1 << bits) - 1) == 0).then_some(out)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a query-string component (`%XX`, and `+` for a space).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// Token server
// ---------------------------------------------------------------------------------------------

/// `service` of the token-auth registries [`Registry::start`] makes (the tokens' `aud`).
pub const TOKEN_SERVICE: &str = "caas-test-registry";
/// `issuer` those registries trust (the tokens' `iss`).
pub const TOKEN_ISSUER: &str = "caas-test-token-server";
/// Lifetime of a token (`expires_in`, `exp - iat`).
const TOKEN_TTL_SECS: i64 = 300;

/// One entry of a token's `access` claim: `actions` on resource `kind`/`name` (JWT
/// `{"type", "name", "actions"}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAccess {
    /// `type`: `repository`, `registry`, ...
    pub kind: String,
    /// `name`: the repository (`private/app`).
    pub name: String,
    /// `actions`: `pull`, `push`, ...
    pub actions: Vec<String>,
}

/// One request the [`TokenServer`] answered.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// The HTTP Basic user name it carried (right password or not); `None` for anonymous.
    pub user: Option<String>,
    /// Whether user and password were the ones the server accepts.
    pub authenticated: bool,
    /// The `service` parameter.
    pub service: Option<String>,
    /// Every scope asked for (`scope` parameters, split at spaces), as sent.
    pub scopes: Vec<String>,
    /// What the token handed out grants (empty: nothing, as for anonymous or wrong
    /// credentials).
    pub granted: Vec<TokenAccess>,
    /// The status it was answered with (200 with a token, 400/404 for a malformed request).
    pub status: u16,
    /// The client's `User-Agent` (the agent's is `caas-agent/<version>`; the harness's
    /// [`HARNESS_USER_AGENT`]).
    pub user_agent: String,
}

impl TokenRequest {
    /// Who asked: the Basic user name given, or `"anonymous"`.
    pub fn who(&self) -> &str {
        self.user.as_deref().unwrap_or("anonymous")
    }
}

struct TokenState {
    service: String,
    issuer: String,
    user: String,
    password: String,
    signer: EcdsaKeyPair,
    rng: SystemRandom,
    cert_der: Vec<u8>,
    cert_pem: String,
    jti_prefix: String,
    next_jti: AtomicU64,
    requests: Mutex<Vec<TokenRequest>>,
}

/// A docker distribution token server (the "token" auth of distribution 2.x) on
/// `127.0.0.1:<port>`, plain HTTP. `GET /token?service=S&scope=repository:NAME:pull,push` (scope
/// may repeat, hold several space-separated scopes, or be absent), with optional HTTP Basic
/// credentials, answers `{"token", "access_token", "expires_in", "issued_at"}`. The token is an
/// ES256 JWT signed by a fresh P-256 key whose self-signed certificate ([`Self::root_cert_pem`],
/// the registry's `rootcertbundle`) rides in the JWS header's `x5c`; its claims are `iss`,
/// `sub` (the user), `aud` (the service), `exp`, `nbf`, `iat`, `jti` and `access`. The one
/// user/password it knows gets every action it asks for; anonymous requests and wrong
/// credentials get a valid token with an empty `access` list, as real token servers hand out,
/// which the registry then refuses for anything in a repository. A `service` other than its
/// own is a 400. Every request is logged ([`Self::requests`]). Stopped on drop.
pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<TokenState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenServer {
    /// Listens on 127.0.0.1:0; tokens are for `service`, issued by `issuer`, and grant
    /// `user`/`password` what it asks for.
    pub async fn start(
        service: &str,
        issuer: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?;
        let signer = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow::anyhow!("loading the P-256 key: {e}"))?;
        let key = rcgen::KeyPair::try_from(pkcs8.as_ref())?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "caas test token signer");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyCertSign,
        ];
        let cert = params.self_signed(&key)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(TokenState {
            service: service.into(),
            issuer: issuer.into(),
            user: user.into(),
            password: password.into(),
            signer,
            rng,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            jti_prefix: crate::unique("jti"),
            next_jti: AtomicU64::new(0),
            requests: Mutex::default(),
        });
        let st = state.clone();
        let task = serve_http(listener, move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(st.respond(&req)) }
        });
        Ok(Self { addr, state, task })
    }

    /// `http://127.0.0.1:PORT/token`, the registry's `realm`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The PEM of the certificate whose key signs the tokens (the registry's `rootcertbundle`).
    pub fn root_cert_pem(&self) -> &str {
        &self.state.cert_pem
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.log().clone()
    }

    /// How many requests `who` (a user name, or `"anonymous"`) made so far.
    pub fn count(&self, who: &str) -> usize {
        self.state.log().iter().filter(|r| r.who() == who).count()
    }

    /// Requests so far per [`TokenRequest::who`].
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.state.log().iter() {
            *m.entry(r.who().to_string()).or_default() += 1;
        }
        m
    }

    /// A token signed like the ones it hands out, for `subject` with `access` (to present one
    /// directly, e.g. as an identity token).
    pub fn sign(&self, subject: &str, access: &[TokenAccess]) -> anyhow::Result<String> {
        Ok(self.state.sign(subject, access)?.0)
    }
}

impl TokenState {
    fn log(&self) -> std::sync::MutexGuard<'_, Vec<TokenRequest>> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A compact JWS (ES256, `x5c` = the certificate) and its `iat`.
    fn sign(&self, subject: &str, access: &[TokenAccess]) -> anyhow::Result<(String, i64)> {
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
        )?;
        let jti = self.next_jti.fetch_add(1, Ordering::Relaxed);
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64(&self.cert_der)],
        });
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + TOKEN_TTL_SECS,
            "nbf": now,
            "iat": now,
            "jti": format!("{}-{jti}", self.jti_prefix),
            "access": access.iter().map(|a| serde_json::json!({
                "type": a.kind, "name": a.name, "actions": a.actions,
            })).collect::<Vec<_>>(),
        });
        let input = format!(
            "{}.{}",
            base64url(&serde_json::to_vec(&header)?),
            base64url(&serde_json::to_vec(&claims)?)
        );
        let sig = self
            .signer
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| anyhow::anyhow!("ES256 signing failed"))?;
        Ok((format!("{input}.{}", base64url(sig.as_ref())), now))
    }

    fn respond<B>(&self, req: &Request<B>) -> Response<http_body_util::Full<Bytes>> {
        let (status, body) = self.answer(req);
        let mut r = Response::new(http_body_util::Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }

    fn answer<B>(&self, req: &Request<B>) -> (StatusCode, serde_json::Value) {
        let err = |s: StatusCode, m: &str| (s, serde_json::json!({ "details": m }));
        let mut service = None;
        let mut scopes = Vec::new();
        for pair in req.uri().query().unwrap_or_default().split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match percent_decode(k).as_str() {
                "service" => service = Some(percent_decode(v)),
                "scope" => scopes.extend(percent_decode(v).split_whitespace().map(String::from)),
                _ => {}
            }
        }
        let text = |name| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let mut rec = TokenRequest {
            user: None,
            authenticated: false,
            service: service.clone(),
            scopes: scopes.clone(),
            granted: Vec::new(),
            status: 200,
            user_agent: text(hyper::header::USER_AGENT).unwrap_or_default(),
        };
        let result = (|| {
            if req.method() != hyper::Method::GET || req.uri().path() != "/token" {
                return Err(err(StatusCode::NOT_FOUND, "GET /token only"));
            }
            if let Some(h) = text(hyper::header::AUTHORIZATION) {
                let (user, password) = parse_basic(&h)
                    .ok_or_else(|| err(StatusCode::BAD_REQUEST, "malformed Basic credentials"))?;
                rec.authenticated = user == self.user && password == self.password;
                rec.user = Some(user);
            }
            if service.as_deref() != Some(self.service.as_str()) {
                return Err(err(StatusCode::BAD_REQUEST, "unknown service"));
            }
            if rec.authenticated {
                for s in &scopes {
                    let Some(a) = parse_scope(s) else {
                        return Err(err(StatusCode::BAD_REQUEST, "malformed scope"));
                    };
                    match rec
                        .granted
                        .iter_mut()
                        .find(|g| g.kind == a.kind && g.name == a.name)
                    {
                        Some(g) => {
                            for act in a.actions {
                                if !g.actions.contains(&act) {
                                    g.actions.push(act);
                                }
                            }
                        }
                        None => rec.granted.push(a),
                    }
                }
            }
            let subject = if rec.authenticated {
                self.user.as_str()
            } else {
                ""
            };
            let (token, iat) = self
                .sign(subject, &rec.granted)
                .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")))?;
            let issued_at = time::OffsetDateTime::from_unix_timestamp(iat)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
            Ok(serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": TOKEN_TTL_SECS,
                "issued_at": issued_at,
            }))
        })();
        let out = match result {
            Ok(v) => (StatusCode::OK, v),
            Err(e) => e,
        };
        rec.status = out.0.as_u16();
        self.log().push(rec);
        out
    }
}

/// `(user, password)` of an `Authorization: Basic ...` header.
fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, b64) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = String::from_utf8(base64_decode(b64.trim())?).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.into(), p.into()))
}

/// `type:name:action,action` (the name may hold colons, e.g. a port); `None` when malformed.
fn parse_scope(scope: &str) -> Option<TokenAccess> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    (!kind.is_empty() && !name.is_empty()).then(|| TokenAccess {
        kind: kind.into(),
        name: name.into(),
        actions: actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Layer tarballs and OCI layouts
// ---------------------------------------------------------------------------------------------

/// mtime of every entry [`LayerTar`] writes, so layers are byte-for-byte reproducible.
const MTIME: u64 = 1_700_000_000;

/// A layer tar stream written entry by entry. Names are written into the header exactly as
/// given (no normalisation), so hostile entries such as `../../etc/passwd` or `/etc/passwd` come
/// out as they are. Names must fit the 100-byte ustar name field.
pub struct LayerTar {
    b: tar::Builder<Vec<u8>>,
}

impl Default for LayerTar {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerTar {
    /// An empty layer.
    pub fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, name: &str, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        let raw = name.as_bytes();
        assert!(
            raw.len() < 100,
            "entry name too long for this helper: {name}"
        );
        h.as_old_mut().name[..raw.len()].copy_from_slice(raw);
        h
    }

    fn push(mut self, mut h: tar::Header, data: &[u8]) -> Self {
        h.set_cksum();
        self.b
            .append(&h, data)
            .expect("appending to an in-memory tar");
        self
    }

    /// A directory (mode 0755); `name` gets a trailing `/`.
    pub fn dir(self, name: &str) -> Self {
        let n = if name.ends_with('/') {
            name.to_string()
        } else {
            format!("{name}/")
        };
        let h = Self::header(tar::EntryType::Directory, &n, 0, 0o755);
        self.push(h, &[])
    }

    /// A regular file, mode 0644.
    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.file_mode(name, data, 0o644)
    }

    /// A regular file with `mode`.
    pub fn file_mode(self, name: &str, data: &[u8], mode: u32) -> Self {
        let h = Self::header(tar::EntryType::Regular, name, data.len() as u64, mode);
        self.push(h, data)
    }

    /// A symlink `name -> target` (target verbatim, absolute allowed).
    pub fn symlink(self, name: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, name, 0, 0o777);
        h.set_link_name_literal(target)
            .expect("link target fits the header");
        self.push(h, &[])
    }

    /// A hardlink `name` to `target` (target verbatim, absolute allowed).
    pub fn hardlink(self, name: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, name, 0, 0o644);
        h.set_link_name_literal(target)
            .expect("link target fits the header");
        self.push(h, &[])
    }

    /// A character device node `major:minor` (images must not be able to bring these in).
    pub fn char_device(self, name: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, name, 0, 0o666);
        h.set_device_major(major)
            .expect("a gnu header has device fields");
        h.set_device_minor(minor)
            .expect("a gnu header has device fields");
        self.push(h, &[])
    }

    /// An OCI whiteout hiding `path` of the layers below (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), &[])
    }

    /// An OCI opaque marker: `dir` shows only what this layer puts in it.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{}/.wh..wh..opq", dir.trim_end_matches('/')), &[])
    }

    /// The tar stream.
    pub fn into_tar(self) -> Vec<u8> {
        self.b.into_inner().expect("finishing an in-memory tar")
    }
}

/// `len` bytes that do not compress (a sha256 counter stream seeded with `seed`).
pub fn incompressible(seed: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed.as_bytes());
        h.update(i.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        i += 1;
    }
    out.truncate(len);
    out
}

/// How a layer's tar is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `tar+gzip`.
    Gzip,
    /// `tar+zstd`.
    Zstd,
    /// Plain `tar`.
    None,
}

impl Compression {
    /// The OCI layer media type.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Gzip => media::OCI_LAYER_GZIP,
            Self::Zstd => media::OCI_LAYER_ZSTD,
            Self::None => media::OCI_LAYER_TAR,
        }
    }

    /// Compresses `tar` (deterministically).
    pub fn compress(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Self::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar).expect("gzip");
                gz.finish().expect("gzip")
            }
            Self::Zstd => zstd::encode_all(tar, 3).expect("zstd"),
            Self::None => tar.to_vec(),
        }
    }
}

/// One image: layers (tar + compression) and an image config.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    layers: Vec<(Vec<u8>, Compression)>,
    arch: String,
    os: String,
    env: Vec<String>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    workdir: Option<String>,
    user: Option<String>,
    stop_signal: Option<String>,
    labels: Vec<(String, String)>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl ImageBuilder {
    /// linux/amd64, `Env` = [`DEFAULT_PATH_ENV`], `Cmd` = `["/bin/sh"]`, no layers yet.
    pub fn new() -> Self {
        Self {
            layers: Vec::new(),
            arch: "amd64".into(),
            os: "linux".into(),
            env: vec![DEFAULT_PATH_ENV.into()],
            cmd: Some(vec!["/bin/sh".into()]),
            entrypoint: None,
            workdir: None,
            user: None,
            stop_signal: None,
            labels: Vec::new(),
        }
    }

    /// Adds a layer on top.
    pub fn layer(mut self, tar: Vec<u8>, compression: Compression) -> Self {
        self.layers.push((tar, compression));
        self
    }

    /// The platform architecture (`amd64`, `arm64`, ...).
    pub fn arch(mut self, arch: &str) -> Self {
        self.arch = arch.into();
        self
    }

    /// Adds `KEY=VALUE` to the config's Env.
    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.into());
        self
    }

    /// The config's Cmd.
    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = Some(strings(cmd));
        self
    }

    /// The config's Entrypoint.
    pub fn entrypoint(mut self, ep: &[&str]) -> Self {
        self.entrypoint = Some(strings(ep));
        self
    }

    /// The config's WorkingDir.
    pub fn workdir(mut self, dir: &str) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// The config's User (`uid[:gid]` or `name[:group]`).
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The config's StopSignal (`SIGQUIT`, `3`, ...).
    pub fn stop_signal(mut self, signal: &str) -> Self {
        self.stop_signal = Some(signal.into());
        self
    }

    /// A config label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }

    /// The image config JSON (diff_ids: sha256 of each uncompressed tar).
    pub fn config_json(&self) -> serde_json::Value {
        let diff_ids: Vec<String> = self.layers.iter().map(|(t, _)| sha256_digest(t)).collect();
        let mut config = serde_json::json!({ "Env": self.env });
        if let Some(c) = &self.cmd {
            config["Cmd"] = serde_json::json!(c);
        }
        if let Some(e) = &self.entrypoint {
            config["Entrypoint"] = serde_json::json!(e);
        }
        if let Some(w) = &self.workdir {
            config["WorkingDir"] = serde_json::json!(w);
        }
        if let Some(u) = &self.user {
            config["User"] = serde_json::json!(u);
        }
        if let Some(s) = &self.stop_signal {
            config["StopSignal"] = serde_json::json!(s);
        }
        if !self.labels.is_empty() {
            let labels: serde_json::Map<String, serde_json::Value> = self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                .collect();
            config["Labels"] = serde_json::Value::Object(labels);
        }
        serde_json::json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": self.arch,
            "os": self.os,
            "config": config,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": self.layers.iter().map(|_| serde_json::json!({
                "created": "2023-11-14T22:13:20Z", "created_by": "caas-tests ImageBuilder"
            })).collect::<Vec<_>>(),
        })
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

impl Descriptor {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// What [`OciLayout::add_image`] wrote.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The manifest.
    pub manifest: Descriptor,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
    /// sha256 of each uncompressed layer tar.
    pub diff_ids: Vec<String>,
    /// The config's architecture.
    pub arch: String,
}

/// What [`OciLayout::add_index`] wrote.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    /// The image index.
    pub index: Descriptor,
    /// Its manifests, in order.
    pub images: Vec<BuiltImage>,
}

/// An OCI image layout directory being written: blobs, `oci-layout`, and `index.json` whose
/// entries carry `org.opencontainers.image.ref.name` (so skopeo's `oci:<dir>:<tag>` finds them).
pub struct OciLayout {
    dir: PathBuf,
    refs: Vec<serde_json::Value>,
}

impl OciLayout {
    /// Creates (or reuses) `dir` as an empty layout.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let l = Self {
            dir: dir.to_path_buf(),
            refs: Vec::new(),
        };
        l.write_index()?;
        Ok(l)
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a blob in the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest_hex(digest))
    }

    fn put(&self, media_type: &str, bytes: &[u8]) -> anyhow::Result<Descriptor> {
        let digest = sha256_digest(bytes);
        std::fs::write(self.blob_path(&digest), bytes)?;
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size: bytes.len() as u64,
        })
    }

    fn write_index(&self) -> anyhow::Result<()> {
        let idx = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": self.refs,
        });
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec_pretty(&idx)?,
        )?;
        Ok(())
    }

    fn tag(&mut self, d: &Descriptor, tag: &str, platform: Option<&str>) -> anyhow::Result<()> {
        let mut e = d.json();
        e["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
        if let Some(arch) = platform {
            e["platform"] = serde_json::json!({ "architecture": arch, "os": "linux" });
        }
        self.refs
            .retain(|r| r["annotations"]["org.opencontainers.image.ref.name"] != tag);
        self.refs.push(e);
        self.write_index()
    }

    fn write_image(&self, img: &ImageBuilder) -> anyhow::Result<BuiltImage> {
        let mut layers = Vec::new();
        for (tar, c) in &img.layers {
            layers.push(self.put(c.media_type(), &c.compress(tar))?);
        }
        let config = self.put(media::OCI_CONFIG, &serde_json::to_vec(&img.config_json())?)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": config.json(),
            "layers": layers.iter().map(Descriptor::json).collect::<Vec<_>>(),
        });
        let manifest = self.put(media::OCI_MANIFEST, &serde_json::to_vec(&manifest)?)?;
        Ok(BuiltImage {
            manifest,
            config,
            layers,
            diff_ids: img.layers.iter().map(|(t, _)| sha256_digest(t)).collect(),
            arch: img.arch.clone(),
        })
    }

    /// Writes one image and tags its manifest `tag`.
    pub fn add_image(&mut self, img: &ImageBuilder, tag: &str) -> anyhow::Result<BuiltImage> {
        let built = self.write_image(img)?;
        self.tag(&built.manifest, tag, Some(&img.arch))?;
        Ok(built)
    }

    /// Writes every image, an image index listing them by platform, and tags the index `tag`.
    pub fn add_index(&mut self, images: &[ImageBuilder], tag: &str) -> anyhow::Result<BuiltIndex> {
        let mut built = Vec::new();
        let mut entries = Vec::new();
        for img in images {
            let b = self.write_image(img)?;
            let mut e = b.manifest.json();
            e["platform"] = serde_json::json!({ "architecture": img.arch, "os": img.os });
            entries.push(e);
            built.push(b);
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": entries,
        });
        let index = self.put(media::OCI_INDEX, &serde_json::to_vec(&index)?)?;
        self.tag(&index, tag, None)?;
        Ok(BuiltIndex {
            index,
            images: built,
        })
    }
}

/// The multi-arch pair the image tests use: linux/amd64 = `amd64_base` layers (e.g. busybox)
/// plus a layer holding `/arch-amd64`; linux/arm64 = a single tiny layer holding `/arch-arm64`.
/// Both run `Cmd ["/bin/sh"]`.
pub fn multi_arch_images(amd64_base: &[Vec<u8>]) -> [ImageBuilder; 2] {
    let mut amd = ImageBuilder::new();
    for l in amd64_base {
        amd = amd.layer(l.clone(), Compression::Gzip);
    }
    let amd = amd.layer(
        LayerTar::new().file("arch-amd64", b"amd64\n").into_tar(),
        Compression::Gzip,
    );
    let arm = ImageBuilder::new().arch("arm64").layer(
        LayerTar::new().file("arch-arm64", b"arm64\n").into_tar(),
        Compression::Gzip,
    );
    [amd, arm]
}

// ---------------------------------------------------------------------------------------------
// Fault proxy
// ---------------------------------------------------------------------------------------------

type ProxyBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Default)]
struct Faults {
    /// digest -> how many more GETs of it to cut short.
    drops: HashMap<String, u32>,
    /// digest -> the next GET of it pauses this long halfway.
    stalls: HashMap<String, Duration>,
    /// digest -> GETs of it seen.
    gets: HashMap<String, u32>,
    /// digest -> the `Range` header of each GET of it (empty for none).
    ranges: HashMap<String, Vec<String>>,
}

/// What happens to one blob response.
enum Fault {
    /// Half the body, then the connection is aborted.
    Cut,
    /// Half the body, a pause, then the rest.
    Stall(Duration),
}

struct ProxyState {
    upstream: String,
    me: String,
    faults: Mutex<Faults>,
}

impl ProxyState {
    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A plain-HTTP/1.1 proxy on `127.0.0.1:<port>` in front of a registry. It forwards every request
/// unchanged (method, path, headers including `Host` and `Authorization`, body) on a fresh
/// upstream connection, and rewrites the upstream's `host:port` to its own in `Location` and
/// `WWW-Authenticate`. Blob GETs are counted, and can be cut short on demand.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the connection tasks: aborting it ends them all.
        self.task.abort();
    }
}

/// Serves HTTP/1.1 on `listener` with `handler` until the returned task is aborted (which ends
/// every connection with it).
fn serve_http<F, Fut, B>(listener: TcpListener, handler: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let Ok((stream, _)) = r else { continue };
                    let handler = handler.clone();
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service_fn(handler))
                            .await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream` (`127.0.0.1:PORT`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        ensure!(
            upstream.starts_with("127.0.0.1:"),
            "127.0.0.1 only: {upstream}"
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            me: addr.to_string(),
            faults: Mutex::default(),
        });
        let st = state.clone();
        let task = serve_http(listener, move |req| handle(st.clone(), req));
        Ok(Self { addr, state, task })
    }

    /// `127.0.0.1:PORT` of the proxy.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The next `times` GETs of blob `digest` (any repository) answer with the upstream's status
    /// and headers (full `Content-Length`) and about half the body, then the connection is
    /// aborted. `times` = 0 clears the fault.
    pub fn drop_blob(&self, digest: &str, times: u32) {
        let mut f = self.state.faults();
        if times == 0 {
            f.drops.remove(digest);
        } else {
            f.drops.insert(digest.to_string(), times);
        }
    }

    /// The next GET of blob `digest` sends its status, headers and about half the body, then
    /// pauses for `pause` before sending the rest (a slow registry, to keep a download in
    /// flight while something else happens).
    pub fn stall_blob(&self, digest: &str, pause: Duration) {
        self.state.faults().stalls.insert(digest.to_string(), pause);
    }

    /// Clears every fault (counters stay).
    pub fn clear_faults(&self) {
        let mut f = self.state.faults();
        f.drops.clear();
        f.stalls.clear();
    }

    /// The `Range` header of every GET of blob `digest` so far, in order (empty: none).
    pub fn blob_ranges(&self, digest: &str) -> Vec<String> {
        self.state
            .faults()
            .ranges
            .get(digest)
            .cloned()
            .unwrap_or_default()
    }

    /// How many GETs of blob `digest` have passed through (ranged ones included).
    pub fn count_blob_gets(&self, digest: &str) -> u32 {
        self.state.faults().gets.get(digest).copied().unwrap_or(0)
    }
}

/// The digest in `/v2/<name>/blobs/<digest>` (not `/blobs/uploads/...`).
fn blob_digest(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, digest) = rest.rsplit_once("/blobs/")?;
    (!name.is_empty() && digest.starts_with("sha256:") && !digest.contains('/'))
        .then(|| digest.to_string())
}

async fn handle(
    state: Arc<ProxyState>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    match forward(&state, req).await {
        Ok(r) => Ok(r),
        Err(e) => {
            let mut r = Response::new(
                http_body_util::Full::new(Bytes::from(format!("fault proxy: {e:#}\n")))
                    .map_err(|never| match never {})
                    .boxed(),
            );
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(r)
        }
    }
}

async fn forward(
    state: &ProxyState,
    req: Request<Incoming>,
) -> anyhow::Result<Response<ProxyBody>> {
    let blob = (req.method() == hyper::Method::GET)
        .then(|| blob_digest(req.uri().path()))
        .flatten();
    if let Some(d) = &blob {
        let range = req
            .headers()
            .get(hyper::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut f = state.faults();
        *f.gets.entry(d.clone()).or_default() += 1;
        f.ranges.entry(d.clone()).or_default().push(range);
    }
    let stream = TcpStream::connect(&state.upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    // Origin-form, as a client sends it to a server (Host stays the one the client sent).
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .parse()?;
    let resp = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    let (mut parts, body) = resp.into_parts();
    for name in [LOCATION, WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name).and_then(|v| v.to_str().ok())
            && v.contains(&state.upstream)
        {
            let nv = HeaderValue::from_str(&v.replace(&state.upstream, &state.me))?;
            parts.headers.insert(name, nv);
        }
    }
    let fault = blob.filter(|_| parts.status.is_success()).and_then(|d| {
        let mut f = state.faults();
        if let Some(n) = f.drops.get_mut(&d)
            && *n > 0
        {
            *n -= 1;
            return Some(Fault::Cut);
        }
        f.stalls.remove(&d).map(Fault::Stall)
    });
    let Some(fault) = fault else {
        return Ok(Response::from_parts(
            parts,
            body.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                .boxed(),
        ));
    };
    // Status and headers as the registry sent them (Content-Length of the whole blob), half
    // the bytes, a pause (so they reach the client), then an error (hyper aborts the
    // connection) or the rest.
    let full = body.collect().await?.to_bytes();
    let (first, rest) = (full.slice(..full.len() / 2), full.slice(full.len() / 2..));
    let (pause, cut) = match fault {
        Fault::Cut => (Duration::from_millis(100), true),
        Fault::Stall(d) => (d, false),
    };
    let frames = futures::stream::unfold(0u8, move |step| {
        let (first, rest) = (first.clone(), rest.clone());
        async move {
            match step {
                0 => Some((Ok(Frame::data(first)), 1)),
                1 => {
                    tokio::time::sleep(pause).await;
                    if cut {
                        let e: Box<dyn std::error::Error + Send + Sync> =
                            "fault proxy: connection dropped mid-blob".into();
                        Some((Err(e), 2))
                    } else {
                        Some((Ok(Frame::data(rest)), 2))
                    }
                }
                _ => None,
            }
        }
    });
    Ok(Response::from_parts(
        parts,
        BoxBody::new(StreamBody::new(frames)),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn base64_variants_and_decoding() {
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "user:pa:ss",
        ] {
            assert_eq!(base64_decode(&base64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(base64_decode("Zm9vYg").unwrap(), b"foob");
        assert_eq!(base64_decode("Zm9v!"), None);
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(
            parse_basic(&basic_auth("alice", "s3:cret")),
            Some(("alice".into(), "s3:cret".into()))
        );
        assert_eq!(parse_basic("Bearer abc"), None);
    }

    #[test]
    fn percent_coding_round_trips() {
        let s = "repository:t/app:pull,push";
        assert_eq!(percent_encode(s), "repository%3At%2Fapp%3Apull%2Cpush");
        assert_eq!(percent_decode(&percent_encode(s)), s);
        assert_eq!(percent_decode("a+b%20c%zz%4"), "a b c%zz%4");
    }

    #[test]
    fn challenges_and_scopes_parse() {
        let c = BearerChallenge::parse(
            r#"Bearer realm="http://127.0.0.1:1/token",service="svc",scope="repository:a/b:pull",error="insufficient_scope""#,
        )
        .unwrap();
        assert_eq!(c.realm, "http://127.0.0.1:1/token");
        assert_eq!(c.service.as_deref(), Some("svc"));
        assert_eq!(c.scope.as_deref(), Some("repository:a/b:pull"));
        assert_eq!(c.error.as_deref(), Some("insufficient_scope"));
        assert_eq!(BearerChallenge::parse(r#"Basic realm="x""#), None);
        assert_eq!(
            parse_scope("repository:a/b:pull,push"),
            Some(TokenAccess {
                kind: "repository".into(),
                name: "a/b".into(),
                actions: vec!["pull".into(), "push".into()],
            })
        );
        assert_eq!(parse_scope("registry:catalog:*").unwrap().actions, ["*"]);
        assert_eq!(parse_scope("repository:a"), None);
    }

    /// The token server alone: what it grants whom, and that its JWTs verify (ES256 over the
    /// signing input with the certificate's key).
    #[tokio::test]
    async fn token_server_grants_only_its_user() {
        let ts = TokenServer::start("svc", "iss", "alice", "s3cret")
            .await
            .unwrap();
        let host = ts
            .realm()
            .strip_prefix("http://")
            .unwrap()
            .replace("/token", "");
        let q = "/token?service=svc&scope=repository%3Aa%2Fb%3Apull&scope=repository:a/b:push+repository:c:pull";
        let get = |auth: Option<String>| {
            let host = host.clone();
            async move {
                let h: Vec<(&str, String)> =
                    auth.into_iter().map(|a| ("authorization", a)).collect();
                let r = http_get(&host, q, &h).await.unwrap();
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(v["token"], v["access_token"]);
                assert_eq!(v["expires_in"], 300);
                assert!(v["issued_at"].as_str().unwrap().ends_with('Z'), "{v}");
                v["token"].as_str().unwrap().to_string()
            }
        };
        let good = get(Some(basic_auth("alice", "s3cret"))).await;
        let wrong = get(Some(basic_auth("alice", "nope"))).await;
        let anon = get(None).await;

        let claims = |t: &str| -> serde_json::Value {
            let parts: Vec<&str> = t.split('.').collect();
            assert_eq!(parts.len(), 3);
            // base64url without padding: base64_decode takes it once the alphabet is mapped.
            let unurl = |p: &str| base64_decode(&p.replace('-', "+").replace('_', "/")).unwrap();
            let header: serde_json::Value = serde_json::from_slice(&unurl(parts[0])).unwrap();
            assert_eq!(header["alg"], "ES256");
            assert_eq!(
                base64_decode(header["x5c"][0].as_str().unwrap()).unwrap(),
                ts.state.cert_der
            );
            let sig = unurl(parts[2]);
            assert_eq!(sig.len(), 64, "r||s");
            let pk = ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                ring::signature::KeyPair::public_key(&ts.state.signer).as_ref(),
            );
            pk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
                .unwrap();
            serde_json::from_slice(&unurl(parts[1])).unwrap()
        };
        let c = claims(&good);
        assert_eq!(c["iss"], "iss");
        assert_eq!(c["aud"], "svc");
        assert_eq!(c["sub"], "alice");
        assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 300);
        assert_eq!(
            c["access"],
            serde_json::json!([
                {"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
                {"type": "repository", "name": "c", "actions": ["pull"]},
            ])
        );
        for t in [&wrong, &anon] {
            let c = claims(t);
            assert_eq!(c["access"], serde_json::json!([]));
            assert_eq!(c["sub"], "");
        }
        assert_ne!(claims(&good)["jti"], claims(&anon)["jti"]);

        let r = http_get(&host, "/token?service=other", &[]).await.unwrap();
        assert_eq!(r.status, 400);
        let r = http_get(&host, "/other", &[]).await.unwrap();
        assert_eq!(r.status, 404);
        let log = ts.requests();
        assert_eq!(log.len(), 5);
        assert!(log[0].authenticated && log[0].who() == "alice");
        assert!(!log[1].authenticated && log[1].who() == "alice");
        assert!(log[1].granted.is_empty());
        assert_eq!(log[2].who(), "anonymous");
        assert_eq!(log[0].scopes.len(), 3);
        assert_eq!((log[3].status, log[4].status), (400, 404));
        assert_eq!(ts.count("alice"), 2);
        assert_eq!(ts.count("anonymous"), 3);
        assert_eq!(ts.counts().len(), 2);
    }

    /// A registry behind the token flow: the Bearer challenge, skopeo pushing with
    /// `--dest-creds` through it, the harness's own reads through it, and what the registry
    /// makes of empty tokens (anonymous, wrong password).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_auth_round_trip() {
        if !tools_available("registry::token_auth_round_trip") {
            return;
        }
        let reg = Registry::start(RegistryOpts::with_token_auth("alice", "s3cret"))
            .await
            .unwrap();
        let ts = reg.token_server().unwrap();
        let r = http_get(&reg.host(), "/v2/", &[]).await.unwrap();
        assert_eq!(r.status, 401);
        let c = BearerChallenge::parse(r.header("www-authenticate").unwrap()).unwrap();
        assert_eq!(c.realm, ts.realm());
        assert_eq!(c.service.as_deref(), Some(TOKEN_SERVICE));

        let tmp = tempfile::tempdir().unwrap();
        let mut layout = OciLayout::new(&tmp.path().join("layout")).unwrap();
        let built = layout
            .add_image(
                &ImageBuilder::new().layer(
                    LayerTar::new().file("hello", b"hello\n").into_tar(),
                    Compression::Gzip,
                ),
                "app",
            )
            .unwrap();
        let m = reg
            .push(layout.dir(), "app", "tok/app:v1", PushMode::Oci)
            .await
            .unwrap();
        assert_eq!(m.digest, built.manifest.digest);
        let log = ts.requests();
        assert!(
            log.iter().any(|t| t.authenticated
                && !t.user_agent.starts_with(HARNESS_USER_AGENT)
                && t.granted
                    .iter()
                    .any(|g| g.name == "tok/app" && g.actions.contains(&"push".to_string()))),
            "skopeo got a push token: {log:#?}"
        );
        let b = reg.blob("tok/app", &built.layers[0].digest).await.unwrap();
        assert_eq!(sha256_digest(&b.body), built.layers[0].digest);

        // Empty tokens get the registry's 401 with insufficient_scope.
        for creds in [None, Some(("alice", "nope")), Some(("bob", "s3cret"))] {
            let e = fetch_manifest(&reg.host(), "tok/app", "v1", creds).await;
            let e = format!("{:#}", e.unwrap_err());
            assert!(e.contains("401"), "{creds:?}: {e}");
        }
        let r = registry_get(&reg.host(), "/v2/tok/app/manifests/v1", &[], None)
            .await
            .unwrap();
        let c = BearerChallenge::parse(r.header("www-authenticate").unwrap()).unwrap();
        assert_eq!(c.error.as_deref(), Some("insufficient_scope"), "{c:?}");
        assert_eq!(c.scope.as_deref(), Some("repository:tok/app:pull"));
        // A token granting pull but signed by a key the registry does not trust.
        let forger = TokenServer::start(TOKEN_SERVICE, TOKEN_ISSUER, "x", "y")
            .await
            .unwrap();
        let pull = [TokenAccess {
            kind: "repository".into(),
            name: "tok/app".into(),
            actions: vec!["pull".into()],
        }];
        let path = "/v2/tok/app/manifests/v1";
        for (signer, want) in [(&forger, 401), (ts, 200)] {
            let t = signer.sign("alice", &pull).unwrap();
            let h = [
                ("authorization", format!("Bearer {t}")),
                ("accept", media::OCI_MANIFEST.to_string()),
            ];
            let r = http_get(&reg.host(), path, &h).await.unwrap();
            assert_eq!(r.status, want, "{}", String::from_utf8_lossy(&r.body));
        }
        assert!(ts.count("anonymous") >= 2, "{:?}", ts.counts());
        assert!(ts.count("bob") >= 1, "{:?}", ts.counts());
        // The forged one, and only it, failed verification.
        let log = reg.log_text();
        assert_eq!(
            log.matches("unable to verify certificate chain").count(),
            1,
            "{log}"
        );
    }

    #[test]
    fn blob_paths_are_recognised() {
        let d = "sha256:0123";
        assert_eq!(
            blob_digest(&format!("/v2/a/b/blobs/{d}")).as_deref(),
            Some(d)
        );
        assert_eq!(blob_digest("/v2/a/blobs/uploads/xyz"), None);
        assert_eq!(blob_digest(&format!("/v2/a/manifests/{d}")), None);
    }

    #[test]
    fn hostile_names_stay_verbatim() {
        let t = LayerTar::new()
            .file("../../etc/passwd", b"x")
            .file("/etc/passwd", b"x")
            .symlink("a", "/")
            .hardlink("h", "/etc/shadow")
            .whiteout("etc/motd")
            .opaque("opt/keep")
            .into_tar();
        let mut a = tar::Archive::new(&t[..]);
        let names: Vec<(String, Option<String>)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                    e.link_name_bytes()
                        .map(|l| String::from_utf8_lossy(&l).into_owned()),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("../../etc/passwd".into(), None),
                ("/etc/passwd".into(), None),
                ("a".into(), Some("/".into())),
                ("h".into(), Some("/etc/shadow".into())),
                ("etc/.wh.motd".into(), None),
                ("opt/keep/.wh..wh..opq".into(), None),
            ]
        );
    }

    /// The whole harness against the real tools: registry (with htpasswd auth over plain HTTP),
    /// skopeo pushes keeping gzip/zstd/tar layers and digests, an index pushed with --all, a v2s2
    /// conversion, the on-disk blob path, and the fault proxy forwarding, counting, cutting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn harness_round_trip() {
        if !tools_available("registry::harness_round_trip") {
            return;
        }
        let reg = Registry::start(RegistryOpts::with_auth("alice", "s3cret"))
            .await
            .unwrap();
        // Without credentials: 401 with a Basic challenge.
        let r = http_get(&reg.host(), "/v2/", &[]).await.unwrap();
        assert_eq!(r.status, 401);
        assert!(
            r.header("www-authenticate").unwrap().starts_with("Basic "),
            "{:?}",
            r.headers
        );
        let r = http_get(
            &reg.host(),
            "/v2/",
            &[("authorization", basic_auth("alice", "nope"))],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 401);

        let tmp = tempfile::tempdir().unwrap();
        let mut layout = OciLayout::new(&tmp.path().join("layout")).unwrap();
        let base = LayerTar::new()
            .dir("data")
            .file("data/hello.txt", b"hello\n")
            .into_tar();
        let img = ImageBuilder::new()
            .layer(base.clone(), Compression::Gzip)
            .layer(
                LayerTar::new()
                    .file("z", &incompressible("z", 4096))
                    .into_tar(),
                Compression::Zstd,
            )
            .layer(
                LayerTar::new().file("t", b"t").into_tar(),
                Compression::None,
            )
            .entrypoint(&["/bin/sh", "-c"])
            .workdir("/data");
        let built = layout.add_image(&img, "mixed").unwrap();
        let idx = layout
            .add_index(&multi_arch_images(std::slice::from_ref(&base)), "multi")
            .unwrap();

        let m = reg
            .push(layout.dir(), "mixed", "t/mixed:v1", PushMode::Oci)
            .await
            .unwrap();
        assert_eq!(m.digest, built.manifest.digest);
        assert_eq!(
            m.layer_media_types(),
            [
                media::OCI_LAYER_GZIP,
                media::OCI_LAYER_ZSTD,
                media::OCI_LAYER_TAR
            ]
        );
        let cfg: serde_json::Value = serde_json::from_slice(
            &reg.blob("t/mixed", &built.config.digest)
                .await
                .unwrap()
                .body,
        )
        .unwrap();
        assert_eq!(
            cfg["rootfs"]["diff_ids"][1],
            sha256_digest(&img.layers[1].0)
        );
        assert_eq!(cfg["config"]["Entrypoint"][0], "/bin/sh");

        let mi = reg
            .push(layout.dir(), "multi", "t/multi:v1", PushMode::OciAll)
            .await
            .unwrap();
        assert_eq!(mi.digest, idx.index.digest);
        let arm = mi.platform_digest("linux", "arm64").unwrap();
        assert_eq!(arm, idx.images[1].manifest.digest);
        // --all pushed the arm64 manifest too.
        assert_eq!(reg.manifest("t/multi", &arm).await.unwrap().digest, arm);

        let mv = reg
            .push(layout.dir(), "mixed", "t/v2s2:v1", PushMode::DockerV2s2)
            .await;
        // A zstd layer has no Docker schema 2 media type: skopeo refuses (or we do).
        assert!(mv.is_err(), "v2s2 with a zstd layer: {mv:?}");
        let mut gz_only = OciLayout::new(&tmp.path().join("gz")).unwrap();
        let g = gz_only
            .add_image(
                &ImageBuilder::new().layer(base.clone(), Compression::Gzip),
                "g",
            )
            .unwrap();
        let mv = reg
            .push(gz_only.dir(), "g", "t/v2s2:v1", PushMode::DockerV2s2)
            .await
            .unwrap();
        assert_ne!(mv.digest, g.manifest.digest);
        assert_eq!(mv.layer_digests(), [g.layers[0].digest.clone()]);

        // The registry's storage layout.
        let zstd_layer = &built.layers[1];
        let on_disk = std::fs::read(reg.blob_data_path(&zstd_layer.digest)).unwrap();
        assert_eq!(sha256_digest(&on_disk), zstd_layer.digest);

        // The proxy forwards (auth included), counts, and cuts.
        let proxy = FaultProxy::start(&reg.host()).await.unwrap();
        let via = fetch_manifest(&proxy.host(), "t/mixed", "v1", reg.creds())
            .await
            .unwrap();
        assert_eq!(via.digest, built.manifest.digest);
        let path = format!("/v2/t/mixed/blobs/{}", zstd_layer.digest);
        let auth = [("authorization", basic_auth("alice", "s3cret"))];
        let r = http_get(&proxy.host(), &path, &auth).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(sha256_digest(&r.body), zstd_layer.digest);
        assert_eq!(proxy.count_blob_gets(&zstd_layer.digest), 1);
        let r = http_get(&proxy.host(), "/v2/", &[]).await.unwrap();
        assert_eq!(r.status, 401, "the challenge passes through");

        proxy.drop_blob(&zstd_layer.digest, 1);
        let (got, cut) = raw_get(&proxy.host(), &path, &auth[0].1).await;
        assert!(cut, "the body was cut short");
        let want = usize::try_from(zstd_layer.size).unwrap();
        assert!(
            got >= want / 4 && got < want,
            "about half of {want} bytes arrived: {got}"
        );
        let e = http_get(&proxy.host(), &path, &auth).await;
        assert!(e.is_ok(), "only once: {e:?}");
        // A cut GET is still a GET.
        assert_eq!(proxy.count_blob_gets(&zstd_layer.digest), 3);
        proxy.drop_blob(&zstd_layer.digest, 5);
        assert!(http_get(&proxy.host(), &path, &auth).await.is_err());
        proxy.clear_faults();
        assert!(http_get(&proxy.host(), &path, &auth).await.is_ok());
        assert_eq!(proxy.count_blob_gets(&zstd_layer.digest), 5);
        proxy.stall_blob(&zstd_layer.digest, Duration::from_millis(600));
        let t0 = Instant::now();
        let r = http_get(&proxy.host(), &path, &auth).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(600), "stalled");
        assert_eq!(sha256_digest(&r.body), zstd_layer.digest, "then complete");
        let t0 = Instant::now();
        http_get(&proxy.host(), &path, &auth).await.unwrap();
        assert!(t0.elapsed() < Duration::from_millis(600), "only once");

        // Pushing through the proxy works too (upload Locations point back at the proxy).
        let dest = format!("{}/t/via-proxy:v1", proxy.host());
        push(
            gz_only.dir(),
            "g",
            &dest,
            &PushOpts {
                creds: Some(("alice".into(), "s3cret".into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            reg.manifest("t/via-proxy", "v1").await.unwrap().digest,
            g.manifest.digest
        );

        // Tampering and deletion are visible to clients.
        let p = reg.blob_data_path(&g.layers[0].digest);
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len() / 2;
        bytes[n] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        let r = reg.blob("t/v2s2", &g.layers[0].digest).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), bytes.len());
        assert_ne!(sha256_digest(&r.body), g.layers[0].digest);
        std::fs::remove_file(&p).unwrap();
        let r = reg.blob("t/v2s2", &g.layers[0].digest).await.unwrap();
        assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    }

    /// A GET on a raw socket: (body bytes received, whether the body ended before
    /// Content-Length).
    async fn raw_get(host: &str, path: &str, auth: &str) -> (usize, bool) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(host).await.unwrap();
        s.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        let head_end = text.find("\r\n\r\n").unwrap() + 4;
        let len: usize = text[..head_end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        let got = buf.len() - head_end;
        (got, got < len)
    }
}
