//! The image service end to end: a real registry on 127.0.0.1 (tests/src/registry.rs), images
//! pushed to it with skopeo, pulled by a real agent, and run as containers. Also tampered and
//! deleted blobs, connections cut mid-blob, hostile layers, credentials kept per tenant, one
//! download for concurrent pulls, imports and garbage collection.

#![allow(clippy::unwrap_used)] // integration-test helpers panic on purpose: that is a failing test

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use caas_proto::v1::{
    self as pb, container_service_client::ContainerServiceClient,
    image_service_client::ImageServiceClient, pull_progress::Event,
    tenant_service_client::TenantServiceClient,
};
use caas_tests::{
    TestAgent, busybox_rootfs,
    calls::cref,
    registry::{
        Compression, FaultProxy, ImageBuilder, LayerTar, OciLayout, PushMode, Registry,
        RegistryManifest, RegistryOpts, TOKEN_SERVICE, TokenRequest, digest_hex, incompressible,
        media, multi_arch_images, tools_available,
    },
    require_root, tar_dir,
};
use sha2::{Digest as _, Sha256};
use tonic::{Code, Status, transport::Channel};

macro_rules! root_or_skip {
    ($name:literal) => {
        if !require_root($name) || !tools_available($name) {
            return;
        }
    };
}

/// An agent that speaks plain HTTP to `registries` (each `127.0.0.1:PORT`).
async fn agent_for(registries: &[String]) -> TestAgent {
    let insecure = registries.to_vec();
    TestAgent::start(move |cfg| {
        cfg.images.insecure_registries = insecure;
    })
    .await
    .unwrap()
}

/// A finished pull: its progress events and the image it ended with.
#[derive(Debug)]
struct Pulled {
    progress: Vec<pb::LayerProgress>,
    image: pb::Image,
}

/// Pulls `reference` into `tenant`; the call's error or the stream's, whichever comes.
async fn pull(
    mut images: ImageServiceClient<Channel>,
    tenant: &str,
    reference: &str,
    auth: Option<(&str, &str)>,
) -> Result<Pulled, Status> {
    let req = pb::PullImageRequest {
        tenant: tenant.into(),
        reference: reference.into(),
        auth: auth.map(|(u, p)| pb::RegistryAuth {
            username: u.into(),
            password: p.into(),
            ..Default::default()
        }),
    };
    let run = async {
        let mut stream = images.pull_image(req).await?.into_inner();
        let mut progress = Vec::new();
        let mut image = None;
        while let Some(ev) = stream.message().await? {
            assert!(
                image.is_none(),
                "{reference}: an event after the image: {ev:?}"
            );
            match ev.event {
                Some(Event::Layer(l)) => progress.push(l),
                Some(Event::Image(i)) => image = Some(i),
                None => panic!("{reference}: an empty PullProgress"),
            }
        }
        let image =
            image.unwrap_or_else(|| panic!("{reference}: the pull stream ended without an image"));
        Ok(Pulled { progress, image })
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap_or_else(|_| panic!("pulling {reference} timed out"))
}

/// The error of `r`, which must have `code` and name `needle`.
#[track_caller]
fn expect_err<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, needle: &str) -> Status {
    match r {
        Ok(v) => panic!("expected {code:?} naming {needle:?}, got {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), code, "{e:?}");
            assert!(
                e.message().contains(needle),
                "{needle:?} not in the message: {e:?}"
            );
            e
        }
    }
}

struct Api {
    t: TenantServiceClient<Channel>,
    c: ContainerServiceClient<Channel>,
    i: ImageServiceClient<Channel>,
    /// `<state_dir>` of the agent.
    state: PathBuf,
}

impl Api {
    async fn new(agent: &TestAgent) -> Self {
        let ch = agent.unix().await;
        Self {
            t: TenantServiceClient::new(ch.clone()),
            c: ContainerServiceClient::new(ch.clone()),
            i: ImageServiceClient::new(ch),
            state: agent.dir.path().join("state"),
        }
    }

    async fn tenant(&mut self, id: &str) {
        self.tenant_as(id, pb::Isolation::Userns).await;
    }

    async fn tenant_as(&mut self, id: &str, isolation: pb::Isolation) {
        self.t
            .create_tenant(pb::CreateTenantRequest {
                id: id.into(),
                isolation: isolation as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn pull(&self, tenant: &str, reference: &str) -> Result<Pulled, Status> {
        pull(self.i.clone(), tenant, reference, None).await
    }

    async fn inspect(&mut self, tenant: &str, reference: &str) -> Result<pb::Image, Status> {
        self.i
            .inspect_image(pb::InspectImageRequest {
                tenant: tenant.into(),
                reference: reference.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn list(&mut self, tenant: &str) -> Vec<pb::Image> {
        self.i
            .list_images(pb::ListImagesRequest {
                tenant: tenant.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .images
    }

    async fn remove(&mut self, tenant: &str, reference: &str) -> Result<(), Status> {
        self.i
            .remove_image(pb::RemoveImageRequest {
                tenant: tenant.into(),
                reference: reference.into(),
            })
            .await
            .map(|_| ())
    }

    async fn import(
        &mut self,
        tenant: &str,
        path: &Path,
        reference: &str,
    ) -> Result<pb::Image, Status> {
        self.i
            .import_image(pb::ImportImageRequest {
                tenant: tenant.into(),
                path: path.display().to_string(),
                reference: reference.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Creates a container from image `reference`; an empty `command` runs the image's own.
    async fn create(
        &mut self,
        tenant: &str,
        name: &str,
        reference: &str,
        command: &[&str],
        env: &[&str],
    ) -> Result<pb::Container, Status> {
        self.c
            .create_container(pb::CreateContainerRequest {
                tenant: tenant.into(),
                name: name.into(),
                image: reference.into(),
                command: command.iter().map(|s| s.to_string()).collect(),
                env: env.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn start(&mut self, tenant: &str, name: &str) {
        self.c
            .start_container(pb::StartContainerRequest {
                r#ref: cref(tenant, name),
            })
            .await
            .unwrap();
    }

    /// Creates, starts and waits for a container from `reference`: (exit code, logs).
    async fn run(
        &mut self,
        tenant: &str,
        name: &str,
        reference: &str,
        command: &[&str],
        env: &[&str],
    ) -> (i32, String) {
        self.create(tenant, name, reference, command, env)
            .await
            .unwrap_or_else(|e| panic!("creating {tenant}/{name} from {reference}: {e:?}"));
        self.start(tenant, name).await;
        let wait = self.c.wait_container(pb::WaitContainerRequest {
            r#ref: cref(tenant, name),
        });
        let code = tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .expect("wait timed out")
            .unwrap()
            .into_inner()
            .exit_code;
        (code, self.logs(tenant, name).await)
    }

    /// `sh -c script` in a container from `reference`; asserts exit 0 and returns the logs.
    async fn sh(&mut self, tenant: &str, name: &str, reference: &str, script: &str) -> String {
        let (code, logs) = self
            .run(tenant, name, reference, &["sh", "-c", script], &[])
            .await;
        assert_eq!(code, 0, "{tenant}/{name} from {reference}: {logs}");
        logs
    }

    async fn logs(&mut self, tenant: &str, name: &str) -> String {
        caas_tests::calls::logs(&mut self.c, tenant, name).await
    }

    async fn delete(&mut self, tenant: &str, name: &str) {
        self.c
            .delete_container(pb::DeleteContainerRequest {
                r#ref: cref(tenant, name),
                force: true,
            })
            .await
            .unwrap();
    }

    /// Whether the blob cache holds `digest`.
    fn cached(&self, digest: &str) -> bool {
        self.state
            .join("blobs/sha256")
            .join(digest_hex(digest))
            .exists()
    }

    /// Every path under `<state_dir>/blobs/ingest` (none when it does not exist).
    fn ingest(&self) -> BTreeSet<String> {
        tree(&self.state.join("blobs/ingest"))
    }

    /// After a failed pull of `m`: its blob `failed` is not in the cache, and nothing partial is
    /// left under ingest (within a few seconds, for downloads that were in flight), naming
    /// which of `m`'s layers a leftover belongs to.
    async fn assert_nothing_partial(&self, what: &str, failed: &str, m: &RegistryManifest) {
        assert!(
            !self.cached(failed),
            "{what}: {failed} is in the blob cache"
        );
        for _ in 0..30 {
            if self.ingest().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let layers = m.layer_digests();
        let left: Vec<String> = self
            .ingest()
            .into_iter()
            .map(|f| {
                let role = match layers.iter().position(|l| digest_hex(l) == f) {
                    Some(_) if digest_hex(failed) == f => "the failed layer",
                    Some(i) => &format!("layer {i} of the image, not the failed one"),
                    None => "not a layer of the image",
                };
                format!("{f} ({role})")
            })
            .collect();
        panic!("{what}: partial downloads left after the failed pull: {left:?}");
    }
}

/// Every path under `dir`, relative, symlinks not followed (empty when `dir` does not exist).
fn tree(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// A busybox root filesystem as one layer tar (every applet linked).
/// An agent that speaks plain HTTP to `reg`, tenants `a` and `b`, and a busybox image whose top
/// layer holds /data/hello.txt = `greeting`, pushed as `<repo>:v1`. Returns the agent, its API,
/// the pushed manifest, and the references by tag and by digest.
async fn two_tenants_and_an_app(
    reg: &Registry,
    repo: &str,
    greeting: &str,
) -> (TestAgent, Api, RegistryManifest, String, String) {
    let agent = agent_for(&[reg.host()]).await;
    let mut api = Api::new(&agent).await;
    api.tenant("a").await;
    api.tenant("b").await;
    let work = agent.dir.path().join("work");
    let base = busybox_layer(&work);
    let mut layout = OciLayout::new(&work.join("layout")).unwrap();
    layout
        .add_image(
            &ImageBuilder::new()
                .layer(base, Compression::Gzip)
                .layer(hello_layer(&format!("{greeting}\n")), Compression::Gzip),
            "app",
        )
        .unwrap();
    let m = reg
        .push(layout.dir(), "app", &format!("{repo}:v1"), PushMode::Oci)
        .await
        .unwrap();
    let r = format!("{}/{repo}:v1", reg.host());
    let by_digest = format!("{}/{repo}@{}", reg.host(), m.digest);
    (agent, api, m, r, by_digest)
}

fn busybox_layer(dir: &Path) -> Vec<u8> {
    tar_dir(&busybox_rootfs(dir))
}

/// A layer holding `/data/hello.txt`.
fn hello_layer(text: &str) -> Vec<u8> {
    LayerTar::new()
        .dir("data")
        .file("data/hello.txt", text.as_bytes())
        .into_tar()
}

/// Checks a pull against what the registry serves for it: the final image names the manifest
/// digest the registry reports and that manifest's layers, and each layer not downloaded
/// before (`seen`) had progress that finished at its full size.
#[track_caller]
fn check_pull(
    p: &Pulled,
    tenant: &str,
    reference: &str,
    digest: &str,
    manifest: &RegistryManifest,
    seen: &mut HashSet<String>,
) {
    let img = &p.image;
    assert_eq!(img.tenant, tenant, "{img:?}");
    assert_eq!(img.reference, reference, "{img:?}");
    assert_eq!(img.digest, digest, "{reference}: {img:?}");
    let layers = manifest.layer_digests();
    assert_eq!(img.layers, layers, "{reference}");
    assert!(img.size_bytes > 0, "{img:?}");
    let cfg: serde_json::Value = serde_json::from_str(&img.config_json)
        .unwrap_or_else(|e| panic!("{reference}: config_json is not JSON ({e}): {img:?}"));
    assert_eq!(cfg["os"], "linux", "{cfg}");
    assert_eq!(cfg["architecture"], "amd64", "{cfg}");
    let sizes: HashMap<String, u64> = manifest.json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    for ev in &p.progress {
        assert!(
            sizes.contains_key(&ev.digest),
            "{reference}: progress for a blob that is not a layer: {ev:?}"
        );
        assert!(ev.done_bytes <= ev.total_bytes, "{reference}: {ev:?}");
    }
    for l in &layers {
        if seen.insert(l.clone()) {
            let done = p.progress.iter().any(|ev| {
                &ev.digest == l && ev.total_bytes == sizes[l] && ev.done_bytes == ev.total_bytes
            });
            assert!(
                done,
                "{reference}: no finished progress for new layer {l} ({} bytes): {:?}",
                sizes[l], p.progress
            );
        }
    }
}

/// Four kinds of image through one registry, each pulled and run: a multi-layer gzip OCI image
/// with whiteouts and an opaque dir (by tag, then by digest), a multi-arch index (the amd64
/// variant must be the one that runs), zstd and uncompressed layers, Docker schema 2 media types.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pulled_images_of_every_kind_run() {
    root_or_skip!("pulled_images_of_every_kind_run");
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let agent = agent_for(&[reg.host()]).await;
    let mut api = Api::new(&agent).await;
    api.tenant("t").await;
    let host = reg.host();
    let work = agent.dir.path().join("work");
    let base = busybox_layer(&work);
    let mut layout = OciLayout::new(&work.join("layout")).unwrap();
    let mut seen = HashSet::new();

    // (1) gzip layers: base, then files, then a whiteout and an opaque dir over them.
    let layered = ImageBuilder::new()
        .layer(base.clone(), Compression::Gzip)
        .layer(
            lower_files().char_device("etc/evil-mem", 1, 1).into_tar(),
            Compression::Gzip,
        )
        .layer(hello_layer("hello from a layer\n"), Compression::Gzip)
        .layer(whiteouts_over_lower_files(), Compression::Gzip)
        .env("GREETING=from-image")
        .workdir("/data")
        .cmd(&[
            "/bin/sh",
            "-c",
            "echo \"greeting=$GREETING extra=$EXTRA pwd=$(pwd)\"; cat hello.txt",
        ]);
    layout.add_image(&layered, "layered").unwrap();
    let m = reg
        .push(layout.dir(), "layered", "layered/img:v1", PushMode::Oci)
        .await
        .unwrap();
    assert_eq!(m.layer_media_types(), [media::OCI_LAYER_GZIP; 4]);
    let r1 = format!("{host}/layered/img:v1");
    let p = api.pull("t", &r1).await.unwrap();
    check_pull(&p, "t", &r1, &m.digest, &m, &mut seen);
    let cfg: serde_json::Value = serde_json::from_str(&p.image.config_json).unwrap();
    assert_eq!(cfg["config"]["WorkingDir"], "/data", "{cfg}");
    let out = api
        .sh(
            "t",
            "layered",
            &r1,
            "cat /data/hello.txt; test ! -e /etc/motd && echo motd-gone; ls /opt/keep; cat /opt/stay",
        )
        .await;
    assert_eq!(out, "hello from a layer\nmotd-gone\nnew\nstay\n");
    // Setuid survives, owned by the container's root, which on the host is the tenant's first
    // id; device nodes in layers are not carried over.
    let out = api
        .sh(
            "t",
            "suid",
            &r1,
            "stat -c '%u %a' /bin/suid-tool; test ! -e /etc/evil-mem && echo no-device",
        )
        .await;
    assert_eq!(out, "0 4755\nno-device\n");
    let start = api
        .t
        .get_tenant(pb::GetTenantRequest { id: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .id_range
        .unwrap()
        .start;
    let layers = api.state.join("images/t/l");
    let on_host: Vec<(u32, u32)> = std::fs::read_dir(&layers)
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.unwrap().path().join("bin/suid-tool")).ok())
        .map(|m| (m.uid(), m.mode() & 0o7777))
        .collect();
    assert_eq!(on_host, [(start, 0o4755)], "owner and mode on the host");
    assert!(
        start >= 65_536,
        "the tenant's range is not host root's: {start}"
    );
    // No command: the image's Cmd runs in its WorkingDir with its Env plus the request's.
    let (code, out) = api
        .run("t", "layered-cmd", &r1, &[], &["EXTRA=from-request"])
        .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "greeting=from-image extra=from-request pwd=/data\nhello from a layer\n"
    );

    // (1a) an image whose config names a User runs as that user, looked up in its own
    // /etc/passwd; a user the image does not know is refused at create, naming it.
    let users = LayerTar::new()
        .dir("etc")
        .file(
            "etc/passwd",
            b"root:x:0:0::/:/bin/sh\nweb:x:101:102::/:/bin/sh\n",
        )
        .file("etc/group", b"root:x:0:\nweb:x:102:\n")
        .into_tar();
    for (tag, user, want) in [
        ("by-name", "web", "101 102"),
        ("by-id", "1234:99", "1234 99"),
    ] {
        let img = ImageBuilder::new()
            .layer(base.clone(), Compression::Gzip)
            .layer(users.clone(), Compression::Gzip)
            .user(user)
            .cmd(&["/bin/sh", "-c", "echo $(id -u) $(id -g)"]);
        layout.add_image(&img, tag).unwrap();
        reg.push(layout.dir(), tag, &format!("user/{tag}:v1"), PushMode::Oci)
            .await
            .unwrap();
        let r = format!("{host}/user/{tag}:v1");
        api.pull("t", &r).await.unwrap();
        let (code, out) = api.run("t", &format!("user-{tag}"), &r, &[], &[]).await;
        assert_eq!((code, out.trim()), (0, want), "{tag}");
    }
    let img = ImageBuilder::new()
        .layer(base.clone(), Compression::Gzip)
        .user("ghost");
    layout.add_image(&img, "ghost").unwrap();
    reg.push(layout.dir(), "ghost", "user/ghost:v1", PushMode::Oci)
        .await
        .unwrap();
    let r = format!("{host}/user/ghost:v1");
    api.pull("t", &r).await.unwrap();
    let e = api
        .c
        .create_container(pb::CreateContainerRequest {
            tenant: "t".into(),
            name: "ghost".into(),
            image: r.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("\"ghost\""), "{}", e.message());

    // (1b) the same image by digest.
    let by_digest = format!("{host}/layered/img@{}", m.digest);
    let p = api.pull("t", &by_digest).await.unwrap();
    check_pull(&p, "t", &by_digest, &m.digest, &m, &mut seen);
    let out = api
        .sh("t", "by-digest", &by_digest, "cat /data/hello.txt")
        .await;
    assert_eq!(out, "hello from a layer\n");

    // (2) a multi-arch index, pushed with --all: the host's platform (linux/amd64) is picked.
    let idx = layout
        .add_index(&multi_arch_images(std::slice::from_ref(&base)), "multi")
        .unwrap();
    let mi = reg
        .push(layout.dir(), "multi", "multi/img:v1", PushMode::OciAll)
        .await
        .unwrap();
    assert_eq!(mi.media_type, media::OCI_INDEX);
    let amd = mi.platform_digest("linux", "amd64").unwrap();
    let arm = mi.platform_digest("linux", "arm64").unwrap();
    assert_eq!(amd, idx.images[0].manifest.digest);
    let amd_m = reg.manifest("multi/img", &amd).await.unwrap();
    let r2 = format!("{host}/multi/img:v1");
    let p = api.pull("t", &r2).await.unwrap();
    // The image is recorded under the digest the registry reports for the tag (the index's);
    // its layers are the amd64 manifest's.
    check_pull(&p, "t", &r2, &mi.digest, &amd_m, &mut seen);
    assert!(
        !p.image.layers.contains(&idx.images[1].layers[0].digest),
        "arm64 layer pulled: {:?}",
        p.image
    );
    assert!(
        p.progress
            .iter()
            .all(|e| e.digest != idx.images[1].layers[0].digest),
        "arm64 layer downloaded"
    );
    assert_ne!(p.image.digest, arm);
    let out = api
        .sh("t", "multi", &r2, "ls /arch-*; cat /arch-amd64")
        .await;
    assert_eq!(out, "/arch-amd64\namd64\n");

    // (3) zstd and uncompressed layers, kept as such by the push; an Entrypoint with a Cmd.
    let zstd = ImageBuilder::new()
        .layer(base.clone(), Compression::Zstd)
        .layer(hello_layer("hello zstd\n"), Compression::None)
        .layer(
            LayerTar::new()
                .file("zstd-marker", b"from a zstd layer\n")
                .into_tar(),
            Compression::Zstd,
        )
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["cat /data/hello.txt /zstd-marker; echo \"args=$#\""]);
    layout.add_image(&zstd, "zstd").unwrap();
    let mz = reg
        .push(layout.dir(), "zstd", "zstd/img:v1", PushMode::Oci)
        .await
        .unwrap();
    assert_eq!(
        mz.layer_media_types(),
        [
            media::OCI_LAYER_ZSTD,
            media::OCI_LAYER_TAR,
            media::OCI_LAYER_ZSTD
        ]
    );
    let r3 = format!("{host}/zstd/img:v1");
    let p = api.pull("t", &r3).await.unwrap();
    check_pull(&p, "t", &r3, &mz.digest, &mz, &mut seen);
    let (code, out) = api.run("t", "zstd", &r3, &[], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "hello zstd\nfrom a zstd layer\nargs=0\n");

    // (4) Docker schema 2 media types (skopeo --format v2s2).
    let mut v2 = OciLayout::new(&work.join("v2s2")).unwrap();
    v2.add_image(
        &ImageBuilder::new()
            .layer(base.clone(), Compression::Gzip)
            .layer(hello_layer("hello docker v2s2\n"), Compression::Gzip),
        "v2",
    )
    .unwrap();
    let md = reg
        .push(v2.dir(), "v2", "docker/img:v1", PushMode::DockerV2s2)
        .await
        .unwrap();
    let r4 = format!("{host}/docker/img:v1");
    let p = api.pull("t", &r4).await.unwrap();
    check_pull(&p, "t", &r4, &md.digest, &md, &mut seen);
    let out = api.sh("t", "docker", &r4, "cat /data/hello.txt").await;
    assert_eq!(out, "hello docker v2s2\n");

    // All five are listed for the tenant, each as pulled; inspect agrees.
    let listed: BTreeSet<String> = api
        .list("t")
        .await
        .into_iter()
        .map(|i| i.reference)
        .collect();
    for r in [&r1, &by_digest, &r2, &r3, &r4] {
        assert!(listed.contains(r.as_str()), "{r} not in {listed:?}");
    }
    assert_eq!(api.inspect("t", &r3).await.unwrap().digest, mz.digest);
    let only: Vec<_> = api
        .i
        .list_images(pb::ListImagesRequest {
            tenant: "t".into(),
            reference_contains: "/zstd/".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .images
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(only, std::slice::from_ref(&r3));

    // Unknown tags and repositories are NOT_FOUND.
    expect_err(
        api.pull("t", &format!("{host}/layered/img:nope")).await,
        Code::NotFound,
        "nope",
    );
    expect_err(
        api.pull("t", &format!("{host}/no/such:v1")).await,
        Code::NotFound,
        "no/such",
    );
    assert!(api.ingest().is_empty(), "{:?}", api.ingest());
}

/// Bytes that do not match their digest, blobs the registry lost, and connections cut mid-blob:
/// each pull fails with the right code naming the blob and leaves nothing partial; a single cut is
/// survived.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_missing_and_cut_blobs() {
    root_or_skip!("tampered_missing_and_cut_blobs");
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let proxy = FaultProxy::start(&reg.host()).await.unwrap();
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let agent = agent_for(&[reg.host(), proxy.host(), dead.clone()]).await;
    let mut api = Api::new(&agent).await;
    api.tenant("t").await;
    let work = agent.dir.path().join("work");
    let base = busybox_layer(&work);
    let mut layout = OciLayout::new(&work.join("layout")).unwrap();
    // Image i: the shared base, then a layer of its own with 256 KiB that do not compress.
    let mut images = Vec::new();
    for i in 1..=4 {
        let payload = incompressible(&format!("payload-{i}"), 256 * 1024);
        let img = ImageBuilder::new()
            .layer(base.clone(), Compression::Gzip)
            .layer(
                LayerTar::new().file("payload", &payload).into_tar(),
                Compression::Gzip,
            );
        let built = layout.add_image(&img, &format!("t{i}")).unwrap();
        let m = reg
            .push(
                layout.dir(),
                &format!("t{i}"),
                &format!("tamper/img{i}:v1"),
                PushMode::Oci,
            )
            .await
            .unwrap();
        images.push((built.layers[1].digest.clone(), m, payload));
    }
    let reg_ref = |i: usize| format!("{}/tamper/img{i}:v1", reg.host());
    let proxy_ref = |i: usize| format!("{}/tamper/img{i}:v1", proxy.host());

    // (0) The shared base is pulled (and unpacked) first, so each failure below is about its
    // own layer; (6) and (7) then check failures beside layers still in flight.
    let mut warm = OciLayout::new(&work.join("warm")).unwrap();
    warm.add_image(
        &ImageBuilder::new().layer(base.clone(), Compression::Gzip),
        "base",
    )
    .unwrap();
    reg.push(warm.dir(), "base", "tamper/base:v1", PushMode::Oci)
        .await
        .unwrap();
    api.pull("t", &format!("{}/tamper/base:v1", reg.host()))
        .await
        .unwrap();

    // (1) Same length, different bytes: DATA_LOSS naming the layer, nothing kept.
    let (u1, m1, _) = &images[0];
    tamper(&reg.blob_data_path(u1));
    expect_err(api.pull("t", &reg_ref(1)).await, Code::DataLoss, u1);
    api.assert_nothing_partial("tampered", u1, m1).await;
    expect_err(api.inspect("t", &reg_ref(1)).await, Code::NotFound, "");

    // (2) The registry lost a layer: NOT_FOUND naming it.
    let (u2, m2, _) = &images[1];
    std::fs::remove_file(reg.blob_data_path(u2)).unwrap();
    expect_err(api.pull("t", &reg_ref(2)).await, Code::NotFound, u2);
    api.assert_nothing_partial("missing", u2, m2).await;

    // (3) Every GET of a layer is cut halfway: UNAVAILABLE, nothing partial; then it works.
    let (u3, m3, payload3) = &images[2];
    proxy.drop_blob(u3, 10_000);
    expect_err(api.pull("t", &proxy_ref(3)).await, Code::Unavailable, "");
    assert!(proxy.count_blob_gets(u3) >= 1, "the layer was fetched");
    api.assert_nothing_partial("cut", u3, m3).await;
    proxy.clear_faults();
    let p = api.pull("t", &proxy_ref(3)).await.unwrap();
    assert_eq!(p.image.digest, m3.digest);
    assert!(api.cached(u3));
    assert!(api.ingest().is_empty(), "{:?}", api.ingest());
    let out = api
        .sh("t", "three", &proxy_ref(3), "sha256sum /payload")
        .await;
    assert_eq!(out, format!("{:x}  /payload\n", Sha256::digest(payload3)));

    // (4) One cut: the agent resumes or retries, and the bytes are right.
    let (u4, m4, payload4) = &images[3];
    proxy.drop_blob(u4, 1);
    let p = api.pull("t", &proxy_ref(4)).await.unwrap();
    assert_eq!(p.image.digest, m4.digest);
    assert!(
        proxy.count_blob_gets(u4) >= 2,
        "the cut GET was followed by another: {}",
        proxy.count_blob_gets(u4)
    );
    assert!(api.ingest().is_empty(), "{:?}", api.ingest());
    let out = api
        .sh("t", "four", &proxy_ref(4), "sha256sum /payload")
        .await;
    assert_eq!(out, format!("{:x}  /payload\n", Sha256::digest(payload4)));

    // (5) Nobody listening: UNAVAILABLE.
    expect_err(
        api.pull("t", &format!("{dead}/x/y:v1")).await,
        Code::Unavailable,
        "",
    );
    assert!(api.ingest().is_empty(), "{:?}", api.ingest());

    // (6) A pull that fails while another of its layers is still downloading leaves no partial
    // file of that one either. The proxy holds both halfway: the bad layer for a moment, the
    // slow one for longer, so the slow download is surely in flight when the bad one fails.
    let img5 = ImageBuilder::new()
        .layer(base.clone(), Compression::Gzip)
        .layer(
            LayerTar::new()
                .file("slow", &incompressible("slow", 512 * 1024))
                .into_tar(),
            Compression::Gzip,
        )
        .layer(
            LayerTar::new()
                .file("bad", &incompressible("bad", 64 * 1024))
                .into_tar(),
            Compression::Gzip,
        );
    let b5 = layout.add_image(&img5, "t5").unwrap();
    let m5 = reg
        .push(layout.dir(), "t5", "tamper/img5:v1", PushMode::Oci)
        .await
        .unwrap();
    let (slow, bad) = (&b5.layers[1].digest, &b5.layers[2].digest);
    tamper(&reg.blob_data_path(bad));
    proxy.stall_blob(bad, Duration::from_millis(500));
    proxy.stall_blob(slow, Duration::from_secs(2));
    expect_err(api.pull("t", &proxy_ref(5)).await, Code::DataLoss, bad);
    assert_eq!(
        proxy.count_blob_gets(slow),
        1,
        "the slow layer was in flight"
    );
    api.assert_nothing_partial("failed beside a download in flight", bad, &m5)
        .await;

    // (7) A pull that fails while another of its layers is still being unpacked does not break
    // the next pull of that layer: a layer of 8000 entries is unpacking when the bad layer,
    // held back by the proxy, fails; the same layer is pulled again at once.
    let many = {
        let mut t = LayerTar::new().dir("many");
        for i in 0..8_000 {
            t = t.file(&format!("many/{i}"), b"x");
        }
        t.into_tar()
    };
    let img7 = ImageBuilder::new()
        .layer(base.clone(), Compression::Gzip)
        .layer(many.clone(), Compression::Gzip)
        .layer(
            LayerTar::new()
                .file("bad", &incompressible("bad7", 64 * 1024))
                .into_tar(),
            Compression::Gzip,
        );
    let img8 = ImageBuilder::new()
        .layer(base.clone(), Compression::Gzip)
        .layer(many, Compression::Gzip)
        .layer(hello_layer("after the race\n"), Compression::Gzip);
    let b7 = layout.add_image(&img7, "t7").unwrap();
    layout.add_image(&img8, "t8").unwrap();
    reg.push(layout.dir(), "t7", "tamper/img7:v1", PushMode::Oci)
        .await
        .unwrap();
    let m8 = reg
        .push(layout.dir(), "t8", "tamper/img8:v1", PushMode::Oci)
        .await
        .unwrap();
    let bad = &b7.layers[2].digest;
    tamper(&reg.blob_data_path(bad));
    proxy.stall_blob(bad, Duration::from_millis(500));
    expect_err(api.pull("t", &proxy_ref(7)).await, Code::DataLoss, bad);
    let p = api.pull("t", &proxy_ref(8)).await.unwrap();
    assert_eq!(p.image.digest, m8.digest);
    let out = api
        .sh(
            "t",
            "eight",
            &proxy_ref(8),
            "ls /many | wc -l; cat /data/hello.txt",
        )
        .await;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["8000", "after", "the", "race"]
    );
}

/// Flips 16 bytes in the middle of a file, keeping its length.
fn tamper(p: &Path) {
    let mut bytes = std::fs::read(p).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(p, &bytes).unwrap();
}

/// Identity of a host file: any write, replace, chown, chmod or new hardlink changes it.
fn file_state(p: &str) -> (String, u64, i64, i64, u32, u32, u32, u64) {
    let md = std::fs::symlink_metadata(p).unwrap();
    let sha = format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()));
    (
        sha,
        md.ino(),
        md.mtime(),
        md.ctime(),
        md.uid(),
        md.gid(),
        md.mode(),
        md.nlink(),
    )
}

/// Paths under `dir` whose file name is one of `names`.
fn named(dir: &Path, names: &[&str]) -> BTreeSet<String> {
    tree(dir)
        .into_iter()
        .filter(|p| names.iter().any(|n| p.rsplit('/').next() == Some(*n)))
        .collect()
}

/// Layers that try to write outside the image are refused, naming the entry, and change nothing
/// on the host or in the tenant's store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_layers_are_refused_and_change_nothing() {
    root_or_skip!("hostile_layers_are_refused_and_change_nothing");
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let agent = agent_for(&[reg.host()]).await;
    let mut api = Api::new(&agent).await;
    api.tenant("t").await;
    let host = reg.host();
    let work = agent.dir.path().join("work");
    let base = busybox_layer(&work);
    let mut layout = OciLayout::new(&work.join("layout")).unwrap();

    // A good image first, so the tenant's store exists and holds something.
    layout
        .add_image(
            &ImageBuilder::new()
                .layer(base.clone(), Compression::Gzip)
                .layer(hello_layer("good\n"), Compression::Gzip),
            "good",
        )
        .unwrap();
    reg.push(layout.dir(), "good", "evil/good:v1", PushMode::Oci)
        .await
        .unwrap();
    let good = format!("{host}/evil/good:v1");
    api.pull("t", &good).await.unwrap();

    // Entries aimed at the host's /etc/passwd carry its current bytes, so that even an agent
    // that wrongly wrote them would not break this machine; the file's inode, times and link
    // count still show any write.
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let marker = format!("caas-escape-{}", std::process::id());
    let deep = format!("{}etc/passwd", "../".repeat(16));
    let through_link = format!("evil-root/etc/{marker}");
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "dotdot",
            LayerTar::new().file("../../etc/passwd", &passwd).into_tar(),
            "../../etc/passwd".into(),
        ),
        (
            "deep",
            LayerTar::new().file(&deep, &passwd).into_tar(),
            deep.clone(),
        ),
        (
            "absolute",
            LayerTar::new().file("/etc/passwd", &passwd).into_tar(),
            "/etc/passwd".into(),
        ),
        (
            "symlink",
            LayerTar::new()
                .symlink("evil-root", "/")
                .file(&through_link, b"x\n")
                .into_tar(),
            through_link.clone(),
        ),
        (
            "hardlink",
            LayerTar::new()
                .hardlink("evil-shadow", "/etc/shadow")
                .into_tar(),
            "evil-shadow".into(),
        ),
        (
            "hardlink-up",
            LayerTar::new()
                .hardlink("evil-shadow-up", &format!("{}etc/shadow", "../".repeat(16)))
                .into_tar(),
            "evil-shadow-up".into(),
        ),
    ];
    for (name, tar, _) in &cases {
        layout
            .add_image(
                &ImageBuilder::new()
                    .layer(base.clone(), Compression::Gzip)
                    .layer(tar.clone(), Compression::Gzip),
                name,
            )
            .unwrap();
    }
    // skopeo takes a moment per push: push them all at once.
    let repo_tags: Vec<String> = cases
        .iter()
        .map(|(n, _, _)| format!("evil/{n}:v1"))
        .collect();
    futures::future::try_join_all(
        cases
            .iter()
            .zip(&repo_tags)
            .map(|((name, _, _), rt)| reg.push(layout.dir(), name, rt, PushMode::Oci)),
    )
    .await
    .unwrap();
    let refs: Vec<String> = repo_tags.iter().map(|rt| format!("{host}/{rt}")).collect();

    let host_files = ["/etc/passwd", "/etc/shadow"].map(file_state);
    let store = api.state.join("images/t");
    let store_before = tree(&store);
    assert!(
        !store_before.is_empty(),
        "the good image is in {}",
        store.display()
    );
    let watched = [
        "passwd",
        "shadow",
        "evil-root",
        "evil-shadow",
        marker.as_str(),
    ];
    let named_before = named(agent.dir.path(), &watched);

    for ((name, _, entry), r) in cases.iter().zip(&refs) {
        let e = expect_err(api.pull("t", r).await, Code::InvalidArgument, entry);
        assert!(
            !e.message().is_empty(),
            "{name}: the refusal says why: {e:?}"
        );
        expect_err(api.inspect("t", r).await, Code::NotFound, "");
    }

    assert_eq!(
        ["/etc/passwd", "/etc/shadow"].map(file_state),
        host_files,
        "a host file changed"
    );
    assert!(
        !Path::new("/etc").join(&marker).exists(),
        "/etc/{marker} was written through a symlink"
    );
    assert_eq!(tree(&store), store_before, "the tenant's store changed");
    assert_eq!(
        named(agent.dir.path(), &watched),
        named_before,
        "an entry landed somewhere under the agent's dirs"
    );
    assert!(api.ingest().is_empty(), "{:?}", api.ingest());
    let listed: Vec<String> = api
        .list("t")
        .await
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(listed, std::slice::from_ref(&good));
    let out = api.sh("t", "good", &good, "cat /data/hello.txt").await;
    assert_eq!(out, "good\n");
}

/// Credentials stay with the tenant that gave them: another tenant cannot pull a private image
/// without its own, even with every blob already on the host, and never sees the first one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_images_stay_with_the_tenant_that_pulled_them() {
    root_or_skip!("private_images_stay_with_the_tenant_that_pulled_them");
    let reg = Registry::start(RegistryOpts::with_auth("alice", "s3cret"))
        .await
        .unwrap();
    let (agent, mut api, m, r, by_digest) =
        two_tenants_and_an_app(&reg, "private/app", "private").await;

    // No credentials or wrong ones, before anything is cached: PERMISSION_DENIED.
    let i = api.i.clone();
    expect_err(
        pull(i.clone(), "a", &r, None).await,
        Code::PermissionDenied,
        "",
    );
    expect_err(
        pull(i.clone(), "a", &r, Some(("alice", "wrong"))).await,
        Code::PermissionDenied,
        "",
    );

    // A, with credentials.
    let p = pull(i.clone(), "a", &r, Some(("alice", "s3cret")))
        .await
        .unwrap();
    assert_eq!(p.image.digest, m.digest);
    for l in m.layer_digests() {
        assert!(api.cached(&l), "{l} cached on the host");
    }
    let out = api.sh("a", "app", &r, "cat /data/hello.txt").await;
    assert_eq!(out, "private\n");

    // B: no credentials, wrong ones, by tag or by digest: refused by the registry every time.
    for reference in [&r, &by_digest] {
        for auth in [None, Some(("alice", "wrong")), Some(("mallory", "s3cret"))] {
            let e = expect_err(
                pull(i.clone(), "b", reference, auth).await,
                Code::PermissionDenied,
                "",
            );
            assert!(!e.message().contains("s3cret"), "{e:?}");
        }
    }
    assert!(api.list("b").await.is_empty());
    let all = api.list("").await;
    assert!(all.iter().all(|i| i.tenant == "a"), "{all:?}");
    assert!(all.iter().any(|i| i.reference == r), "{all:?}");
    for reference in [&r, &by_digest] {
        expect_err(api.inspect("b", reference).await, Code::NotFound, "");
        expect_err(
            api.create("b", "steal", reference, &["true"], &[]).await,
            Code::NotFound,
            "",
        );
    }
    expect_err(api.remove("b", &r).await, Code::NotFound, "");
    assert_eq!(api.inspect("a", &r).await.unwrap().digest, m.digest);

    // B's certificate: nothing of A's, its own list empty.
    let mut ib = ImageServiceClient::new(agent.as_role("tenant:b").await);
    let e = ib
        .list_images(pb::ListImagesRequest {
            tenant: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let own = ib
        .list_images(pb::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(own.is_empty(), "tenant:b sees {own:?}");
    let e = ib
        .inspect_image(pb::InspectImageRequest {
            tenant: "a".into(),
            reference: r.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = ib
        .remove_image(pb::RemoveImageRequest {
            tenant: "a".into(),
            reference: r.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    expect_err(
        pull(ib.clone(), "a", &r, Some(("alice", "s3cret"))).await,
        Code::PermissionDenied,
        "",
    );
    expect_err(
        pull(ib.clone(), "b", &r, None).await,
        Code::PermissionDenied,
        "",
    );

    // A's certificate sees it.
    let mut ia = ImageServiceClient::new(agent.as_role("tenant:a").await);
    let mine = ia
        .list_images(pb::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(mine.iter().any(|i| i.reference == r), "{mine:?}");
}

/// The agent's token requests (`caas-agent/...` user agent) from index `from` of `reg`'s token
/// server log on.
fn agent_token_requests(reg: &Registry, from: usize) -> Vec<TokenRequest> {
    reg.token_server()
        .unwrap()
        .requests()
        .into_iter()
        .skip(from)
        .filter(|t| t.user_agent.starts_with("caas-agent/"))
        .collect()
}

/// The distribution token flow (Bearer challenge, token server, JWT the registry verifies):
/// each pull asks the token server with that pull's own credentials and nobody else's. A gets a
/// token for the repository and runs the image; B, anonymous or with a wrong password, gets an
/// empty token and is refused, even with every blob already on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_auth_pulls_with_each_tenants_own_credentials() {
    root_or_skip!("token_auth_pulls_with_each_tenants_own_credentials");
    let reg = Registry::start(RegistryOpts::with_token_auth("alice", "s3cret"))
        .await
        .unwrap();
    let ts = reg.token_server().unwrap();
    let (_agent, mut api, m, r, by_digest) = two_tenants_and_an_app(&reg, "tok/app", "token").await;
    let i = api.i.clone();
    let pull_scope = ["repository:tok/app:pull".to_string()];

    // A, with its credentials: the agent asked for a pull token as alice, and got one.
    let n = ts.requests().len();
    let p = pull(i.clone(), "a", &r, Some(("alice", "s3cret")))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "A's pull: {e:?}\ntoken requests: {:#?}\nregistry log:\n{}",
                ts.requests(),
                reg.log_text()
            )
        });
    assert_eq!(p.image.digest, m.digest);
    let asked = agent_token_requests(&reg, n);
    assert!(!asked.is_empty(), "the agent never asked the token server");
    for t in &asked {
        assert_eq!(t.who(), "alice", "{asked:#?}");
        assert!(t.authenticated, "{asked:#?}");
        assert_eq!(t.service.as_deref(), Some(TOKEN_SERVICE), "{asked:#?}");
        assert_eq!(t.scopes, pull_scope, "{asked:#?}");
        assert_eq!(t.granted.len(), 1, "{asked:#?}");
        assert_eq!(t.granted[0].actions, ["pull"], "{asked:#?}");
    }
    assert!(ts.count("alice") >= asked.len());
    for l in m.layer_digests() {
        assert!(api.cached(&l), "{l} cached on the host");
    }
    let out = api.sh("a", "app", &r, "cat /data/hello.txt").await;
    assert_eq!(out, "token\n");

    // B, anonymously and with a wrong password, by tag and by digest: the token server hands
    // out empty tokens, and the registry refuses them, although every blob is on the host.
    for reference in [&r, &by_digest] {
        for (auth, who) in [(None, "anonymous"), (Some(("alice", "wrong")), "alice")] {
            let n = ts.requests().len();
            let e = expect_err(
                pull(i.clone(), "b", reference, auth).await,
                Code::PermissionDenied,
                "",
            );
            assert!(!e.message().contains("s3cret"), "{e:?}");
            assert!(!e.message().contains("wrong"), "{e:?}");
            let asked = agent_token_requests(&reg, n);
            assert!(
                !asked.is_empty(),
                "B ({who}) pulled {reference} without asking the token server: {e:?}"
            );
            for t in &asked {
                assert_eq!(t.who(), who, "{asked:#?}");
                assert!(!t.authenticated, "{asked:#?}");
                assert!(t.granted.is_empty(), "{asked:#?}");
                assert_eq!(t.scopes, pull_scope, "{asked:#?}");
            }
        }
    }
    assert!(api.list("b").await.is_empty());
    for reference in [&r, &by_digest] {
        expect_err(api.inspect("b", reference).await, Code::NotFound, "");
        expect_err(
            api.create("b", "steal", reference, &["true"], &[]).await,
            Code::NotFound,
            "",
        );
    }
    assert_eq!(api.inspect("a", &r).await.unwrap().digest, m.digest);
    let all = api.list("").await;
    assert!(all.iter().all(|i| i.tenant == "a"), "{all:?}");

    // The registry accepted the agent's token for A's manifest, and refused the empty ones for
    // lack of scope (never for a token it could not verify). (It names the token's subject
    // only on failed requests.)
    let log = reg.log_text();
    assert!(
        log.lines().any(|l| l.contains("msg=\"authorized request\"")
            && l.contains("caas-agent/")
            && l.contains("/v2/tok/app/manifests/v1")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("insufficient scope") && l.contains("caas-agent/")),
        "{log}"
    );
    assert!(!log.contains("unable to verify"), "{log}");
}

/// Two tenants pulling the same image at the same moment download each layer once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pulls_download_each_blob_once() {
    root_or_skip!("concurrent_pulls_download_each_blob_once");
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let proxy = FaultProxy::start(&reg.host()).await.unwrap();
    let agent = agent_for(&[proxy.host()]).await;
    let mut api = Api::new(&agent).await;
    api.tenant("a").await;
    api.tenant("b").await;
    let work = agent.dir.path().join("work");
    let mut layout = OciLayout::new(&work.join("layout")).unwrap();
    layout
        .add_image(
            &ImageBuilder::new()
                .layer(busybox_layer(&work), Compression::Gzip)
                .layer(
                    LayerTar::new()
                        .file("big", &incompressible("big", 4 << 20))
                        .into_tar(),
                    Compression::Gzip,
                )
                .layer(hello_layer("shared\n"), Compression::Gzip),
            "shared",
        )
        .unwrap();
    let m = reg
        .push(layout.dir(), "shared", "shared/img:v1", PushMode::Oci)
        .await
        .unwrap();
    let r = format!("{}/shared/img:v1", proxy.host());

    let (ca, cb) = (
        ImageServiceClient::new(agent.unix().await),
        ImageServiceClient::new(agent.unix().await),
    );
    let (pa, pb_) = tokio::join!(pull(ca, "a", &r, None), pull(cb, "b", &r, None));
    let (pa, pb_) = (pa.unwrap(), pb_.unwrap());
    assert_eq!(pa.image.digest, m.digest);
    assert_eq!(pb_.image.digest, m.digest);
    assert_eq!(pa.image.tenant, "a");
    assert_eq!(pb_.image.tenant, "b");
    for l in m.layer_digests() {
        assert_eq!(proxy.count_blob_gets(&l), 1, "GETs of layer {l}");
        assert!(api.cached(&l));
    }
    for t in ["a", "b"] {
        let out = api.sh(t, "c", &r, "cat /data/hello.txt").await;
        assert_eq!(out, "shared\n", "{t}");
    }
}

/// A partial download a crash left in `blobs/ingest` is resumed with a range request when its
/// bytes are right, and downloaded again whole when they are not; either way the pull succeeds
/// and the cached blob matches its digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_downloads_left_by_a_crash_resume_or_restart() {
    root_or_skip!("partial_downloads_left_by_a_crash_resume_or_restart");
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let proxy = FaultProxy::start(&reg.host()).await.unwrap();
    let agent = agent_for(&[proxy.host()]).await;
    let mut api = Api::new(&agent).await;
    let work = agent.dir.path().join("work");
    let mut layout = OciLayout::new(&work.join("layout")).unwrap();
    for (i, tag) in ["good", "bad"].iter().enumerate() {
        layout
            .add_image(
                &ImageBuilder::new()
                    .layer(busybox_layer(&work), Compression::Gzip)
                    .layer(
                        LayerTar::new()
                            .file("big", &incompressible(&format!("partial-{i}"), 2 << 20))
                            .into_tar(),
                        Compression::Gzip,
                    ),
                tag,
            )
            .unwrap();
    }
    for (tag, garbage) in [("good", false), ("bad", true)] {
        let m = reg
            .push(
                layout.dir(),
                tag,
                &format!("partial/{tag}:v1"),
                PushMode::Oci,
            )
            .await
            .unwrap();
        let big = m.layer_digests()[1].clone();
        let bytes = std::fs::read(reg.blob_data_path(&big)).unwrap();
        let half = bytes.len() / 2;
        let mut partial = bytes[..half].to_vec();
        if garbage {
            partial.iter_mut().for_each(|b| *b = !*b);
        }
        let ingest = api.state.join("blobs/ingest");
        std::fs::create_dir_all(&ingest).unwrap();
        std::fs::write(ingest.join(digest_hex(&big)), &partial).unwrap();
        api.tenant(tag).await;
        let r = format!("{}/partial/{tag}:v1", proxy.host());
        pull(api.i.clone(), tag, &r, None).await.unwrap();
        let cached = std::fs::read(api.state.join("blobs/sha256").join(digest_hex(&big))).unwrap();
        assert_eq!(cached, bytes, "{tag}: the cached blob is the registry's");
        let ranges = proxy.blob_ranges(&big);
        assert_eq!(
            ranges.first().map(String::as_str),
            Some(format!("bytes={half}-").as_str()),
            "{tag}: the first GET resumes at the partial file's end: {ranges:?}"
        );
        if garbage {
            assert_eq!(
                ranges.get(1).map(String::as_str),
                Some("bytes=0-"),
                "{tag}: a partial file that does not add up is downloaded again whole: {ranges:?}"
            );
        }
        assert!(api.ingest().is_empty(), "{tag}: {:?}", api.ingest());
        let out = api.sh(tag, "c", &r, "wc -c < /big").await;
        assert_eq!(out.trim(), (2 << 20).to_string(), "{tag}");
    }
}

/// Imports from a layout directory and from a tarball of one run; removing an image a container
/// uses is refused; removing the rest collects the blobs nothing references any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn imported_images_run_and_removal_collects_blobs() {
    root_or_skip!("imported_images_run_and_removal_collects_blobs");
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let agent = agent_for(&[reg.host()]).await;
    let mut api = Api::new(&agent).await;
    api.tenant("t").await;
    let work = agent.dir.path().join("work");
    let base = busybox_layer(&work);
    let image = |text: &str| {
        ImageBuilder::new()
            .layer(base.clone(), Compression::Gzip)
            .layer(hello_layer(text), Compression::Gzip)
    };

    // One layout per image, as ImportImage takes a layout.
    let mut one = OciLayout::new(&work.join("one")).unwrap();
    let one_b = one.add_image(&image("imported dir\n"), "v1").unwrap();
    let mut two = OciLayout::new(&work.join("two")).unwrap();
    let two_b = two.add_image(&image("imported tar\n"), "v1").unwrap();
    let two_tar = work.join("two.tar");
    std::fs::write(&two_tar, tar_dir(two.dir())).unwrap();
    let mut pulled = OciLayout::new(&work.join("pulled")).unwrap();
    let p_b = pulled.add_image(&image("pulled\n"), "v1").unwrap();
    let pm = reg
        .push(pulled.dir(), "v1", "gc/pulled:v1", PushMode::Oci)
        .await
        .unwrap();
    let base_digest = p_b.layers[0].digest.clone();
    assert_eq!(
        base_digest, one_b.layers[0].digest,
        "the base layer is shared"
    );

    let (r_one, r_two) = ("local/one:v1", "local/two:v1");
    let i1 = api.import("t", one.dir(), r_one).await.unwrap();
    assert_eq!(i1.digest, one_b.manifest.digest);
    assert_eq!(i1.reference, r_one);
    assert_eq!(i1.tenant, "t");
    let i2 = api.import("t", &two_tar, r_two).await.unwrap();
    assert_eq!(i2.digest, two_b.manifest.digest);
    let r_p = format!("{}/gc/pulled:v1", reg.host());
    let p = api.pull("t", &r_p).await.unwrap();
    assert_eq!(p.image.digest, pm.digest);

    assert_eq!(
        api.sh("t", "one", r_one, "cat /data/hello.txt").await,
        "imported dir\n"
    );
    assert_eq!(
        api.sh("t", "two", r_two, "cat /data/hello.txt").await,
        "imported tar\n"
    );
    // A second name of the same content may go while a container uses the content under the
    // first: the first keeps the layers. The first may not.
    let alias = "local/one-alias:v1";
    api.import("t", one.dir(), alias).await.unwrap();
    api.remove("t", alias).await.unwrap();
    expect_err(api.remove("t", r_one).await, Code::FailedPrecondition, "");
    api.delete("t", "one").await;
    api.delete("t", "two").await;
    let refs: BTreeSet<String> = api
        .list("t")
        .await
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(
        refs,
        [r_one.to_string(), r_two.to_string(), r_p.clone()].into()
    );

    // A container still uses the pulled image: its removal is refused and changes nothing.
    api.create("t", "user", &r_p, &["sleep", "600"], &[])
        .await
        .unwrap();
    api.start("t", "user").await;
    expect_err(api.remove("t", &r_p).await, Code::FailedPrecondition, "");
    assert_eq!(api.inspect("t", &r_p).await.unwrap().digest, pm.digest);
    for l in pm.layer_digests() {
        assert!(api.cached(&l), "{l} still cached");
    }

    // The tag moves on while the container runs: the old image stays, untagged, under its
    // digest, and is still in use by the container (by the content it runs, whatever its
    // reference names now; cri.rs checks that such a container keeps its files).
    let mut moved = OciLayout::new(&work.join("moved")).unwrap();
    moved.add_image(&image("moved on\n"), "v1").unwrap();
    let mm = reg
        .push(moved.dir(), "v1", "gc/pulled:v1", PushMode::Oci)
        .await
        .unwrap();
    assert_ne!(mm.digest, pm.digest);
    assert_eq!(api.pull("t", &r_p).await.unwrap().image.digest, mm.digest);
    let old_at = format!("{}/gc/pulled@{}", reg.host(), pm.digest);
    assert_eq!(api.inspect("t", &old_at).await.unwrap().digest, pm.digest);
    expect_err(api.remove("t", &old_at).await, Code::FailedPrecondition, "");
    // The tag's new image is not in use by the old container.
    api.remove("t", &r_p).await.unwrap();

    // Removing the tarball import: gone from the store, its own blobs collected.
    api.remove("t", r_two).await.unwrap();
    expect_err(api.inspect("t", r_two).await, Code::NotFound, "");
    expect_err(api.remove("t", r_two).await, Code::NotFound, "");
    let two_only = [
        two_b.layers[1].digest.clone(),
        two_b.config.digest.clone(),
        two_b.manifest.digest.clone(),
    ];
    eventually_uncached(&api, &two_only).await;
    assert!(api.cached(&base_digest), "the shared base was collected");
    expect_err(
        api.create("t", "two-again", r_two, &["true"], &[]).await,
        Code::NotFound,
        "",
    );

    // Once the container is gone the pulled image goes too, with its own blobs.
    api.delete("t", "user").await;
    api.remove("t", &old_at).await.unwrap();
    let pulled_only = [
        p_b.layers[1].digest.clone(),
        p_b.config.digest.clone(),
        pm.digest.clone(),
    ];
    eventually_uncached(&api, &pulled_only).await;
    let refs: Vec<String> = api
        .list("t")
        .await
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(refs, [r_one.to_string()]);
    // What is left still runs.
    assert_eq!(
        api.sh("t", "one-again", r_one, "cat /data/hello.txt").await,
        "imported dir\n"
    );
}

/// Waits (briefly: collection may run just after the call) until no digest is cached.
async fn eventually_uncached(api: &Api, digests: &[String]) {
    for _ in 0..50 {
        if digests.iter().all(|d| !api.cached(d)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<_> = digests.iter().filter(|d| api.cached(d)).collect();
    panic!("blobs no image references are still cached: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_images_run_in_a_vm_tenant_with_whiteouts_opaque_dirs_and_setuid() {
    let test = "pulled_images_run_in_a_vm_tenant_with_whiteouts_opaque_dirs_and_setuid";
    if !require_root(test) || !tools_available(test) || !caas_tests::vm::vm_available(test) {
        return;
    }
    let reg = Registry::start(RegistryOpts::default()).await.unwrap();
    let insecure = vec![reg.host()];
    let agent = TestAgent::start(move |cfg| {
        cfg.images.insecure_registries = insecure;
        caas_tests::vm::configure(cfg);
    })
    .await
    .unwrap();
    let mut api = Api::new(&agent).await;
    api.tenant_as("v", pb::Isolation::Vm).await;
    let work = agent.dir.path().join("work");
    let base = busybox_layer(&work);
    let mut layout = OciLayout::new(&work.join("layout")).unwrap();
    // The layers of the userns test: files, then a whiteout and an opaque dir over them.
    let layered = ImageBuilder::new()
        .layer(base, Compression::Gzip)
        .layer(lower_files().into_tar(), Compression::Gzip)
        .layer(hello_layer("hello from a layer\n"), Compression::Gzip)
        .layer(whiteouts_over_lower_files(), Compression::Gzip)
        .workdir("/data")
        .cmd(&["/bin/sh", "-c", "cat hello.txt"]);
    layout.add_image(&layered, "layered").unwrap();
    reg.push(layout.dir(), "layered", "layered/vm:v1", PushMode::Oci)
        .await
        .unwrap();
    let r = format!("{}/layered/vm:v1", reg.host());
    api.pull("v", &r).await.unwrap();
    let out = api
        .sh(
            "v",
            "layered",
            &r,
            "cat /data/hello.txt; test ! -e /etc/motd && echo motd-gone; ls /opt/keep; cat /opt/stay; stat -c '%u %a' /bin/suid-tool",
        )
        .await;
    assert_eq!(out, "hello from a layer\nmotd-gone\nnew\nstay\n0 4755\n");
    // The image's own command, and a second container from the layers already in the guest.
    let (code, out) = api.run("v", "cmd", &r, &[], &[]).await;
    assert_eq!((code, out.as_str()), (0, "hello from a layer\n"));
}

/// Files that a later layer deletes (`etc/motd`) or hides (`opt/keep`), and a setuid file.
fn lower_files() -> LayerTar {
    LayerTar::new()
        .dir("etc")
        .file("etc/motd", b"lower motd\n")
        .dir("opt")
        .dir("opt/keep")
        .file("opt/keep/a", b"a\n")
        .file("opt/keep/b", b"b\n")
        .file("opt/stay", b"stay\n")
        .file_mode("bin/suid-tool", b"#!/bin/sh\n", 0o4755)
}

/// Over [`lower_files`]: a whiteout of `etc/motd`, and `opt/keep` made opaque with a new file.
fn whiteouts_over_lower_files() -> Vec<u8> {
    LayerTar::new()
        .whiteout("etc/motd")
        .dir("opt/keep")
        .opaque("opt/keep")
        .file("opt/keep/new", b"new\n")
        .into_tar()
}
