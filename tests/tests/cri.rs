//! The Kubernetes CRI (`runtime.v1`) end to end: an agent with `[cri] enabled`, driven over its
//! CRI socket by the generated CRI client the way a kubelet drives a runtime. Pods become
//! tenants, images come from a real registry on 127.0.0.1 (tests/src/registry.rs), containers
//! follow Kubernetes command/args semantics, write the CRI log format, run as the user asked,
//! and pods of two namespaces are two tenants that cannot see each other.
//!
//! The refusals of fields that are not supported yet are all in one test,
//! [`unsupported_container_fields_are_refused_by_name`], so they are easy to update.

#![allow(clippy::unwrap_used)] // integration-test helpers panic on purpose: that is a failing test

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use caas_agent::config::Config;
use caas_proto::{
    cri::v1 as cri,
    v1::{
        self as pb, image_service_client::ImageServiceClient as CaasImageClient,
        tenant_service_client::TenantServiceClient,
    },
};
use caas_tests::{
    TestAgent, busybox_rootfs,
    cri::{CriClient, LogRecord, LogStream, now_ns, parse_log, stream_text},
    registry::{
        Compression, ImageBuilder, LayerTar, OciLayout, PushMode, Registry, RegistryOpts,
        tools_available,
    },
    require_root, tar_dir,
};
use tonic::{Code, Status, transport::Channel};

macro_rules! root_or_skip {
    ($name:literal) => {
        if !require_root($name) {
            return;
        }
    };
}

/// For tests that pull: root, and the registry tools.
macro_rules! registry_or_skip {
    ($name:literal) => {
        if !require_root($name) || !tools_available($name) {
            return;
        }
    };
}

/// How far a runtime's timestamp may lie outside [test start, now] (clock granularity).
const SLACK_NS: i64 = 2_000_000_000;

/// How long a container may take to reach a state, or its log to hold what it wrote.
const STATE_DEADLINE: Duration = Duration::from_secs(60);
const LOG_DEADLINE: Duration = Duration::from_secs(20);

/// The annotation that names a pod's tenant (else its namespace does).
const TENANT_ANNOTATION: &str = "caas.io/tenant";

fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn ids(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[track_caller]
fn expect_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), code, "{what}: {e:?}");
            e
        }
    }
}

/// A security context that sets only the user and group.
fn run_as(uid: i64, gid: i64) -> Option<cri::LinuxContainerConfig> {
    Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: uid }),
            run_as_group: Some(cri::Int64Value { value: gid }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A CRI-enabled agent and what a kubelet (and the test) use to talk to it.
struct Kubelet {
    agent: TestAgent,
    cri: CriClient,
    tenants: TenantServiceClient<Channel>,
    caas_images: CaasImageClient<Channel>,
    /// When the test began (ns since the epoch): every timestamp the runtime reports follows it.
    t0: i64,
}

impl Kubelet {
    /// An agent with `cri.enabled`, then `tweak`; connected on `<run_dir>/cri.sock`.
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let t0 = now_ns();
        let agent = TestAgent::start(|cfg| {
            cfg.cri.enabled = true;
            tweak(cfg);
        })
        .await
        .unwrap();
        let socket = agent.dir.path().join("run/cri.sock");
        let cri = CriClient::connect(&socket).await.unwrap();
        let ch = agent.unix().await;
        Self {
            tenants: TenantServiceClient::new(ch.clone()),
            caas_images: CaasImageClient::new(ch),
            agent,
            cri,
            t0,
        }
    }

    /// A registry on 127.0.0.1, an agent that pulls from it over plain HTTP, and a busybox image
    /// (`Cmd ["/bin/sh"]`) pushed as `busybox:v1` and pulled without a pod, as a kubelet would
    /// before creating containers from it.
    async fn with_registry() -> (Self, Images, Pushed) {
        let reg = Registry::start(RegistryOpts::default()).await.unwrap();
        let host = reg.host();
        let mut k = Self::start(move |cfg| cfg.images.insecure_registries = vec![host]).await;
        let mut images = Images::new(reg, &k.agent.dir.path().join("work"));
        let bb = images.push("busybox", images.busybox()).await;
        let r = k.pull(&bb.reference, None).await.unwrap();
        assert_eq!(r, bb.id, "PullImage answers the image id");
        (k, images, bb)
    }

    #[track_caller]
    fn assert_recent(&self, what: &str, t: i64) {
        let now = now_ns();
        assert!(
            t >= self.t0 - SLACK_NS && t <= now + SLACK_NS,
            "{what} = {t} is not between the test's start ({}) and now ({now}) in nanoseconds \
             since the epoch",
            self.t0
        );
    }

    /// Whether the caas API knows tenant `id`.
    async fn tenant_exists(&mut self, id: &str) -> bool {
        match self
            .tenants
            .get_tenant(pb::GetTenantRequest { id: id.into() })
            .await
        {
            Ok(_) => true,
            Err(e) if e.code() == Code::NotFound => false,
            Err(e) => panic!("GetTenant {id}: {e:?}"),
        }
    }

    async fn tenant(&mut self, id: &str) -> pb::Tenant {
        self.tenants
            .get_tenant(pb::GetTenantRequest { id: id.into() })
            .await
            .unwrap_or_else(|e| panic!("GetTenant {id}: {e:?}"))
            .into_inner()
    }

    async fn tenant_ids(&mut self) -> BTreeSet<String> {
        self.tenants
            .list_tenants(pb::ListTenantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tenants
            .into_iter()
            .map(|t| t.id)
            .collect()
    }

    // --- pods ---------------------------------------------------------------------------------

    /// A pod's config as the kubelet sends it: metadata (uid derived from namespace and name),
    /// hostname, and a log directory `<dir>/pods/<ns>_<name>_<uid>` that exists (the kubelet
    /// makes it before RunPodSandbox).
    fn pod(&self, namespace: &str, name: &str) -> cri::PodSandboxConfig {
        let uid = format!("{namespace}-{name}-uid");
        let log_dir = self
            .agent
            .dir
            .path()
            .join("pods")
            .join(format!("{namespace}_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir).unwrap();
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid,
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.display().to_string(),
            ..Default::default()
        }
    }

    async fn run_pod(
        &mut self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, Status> {
        self.cri
            .rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    /// Runs `config` with the default handler; panics on an error.
    async fn ready_pod(&mut self, config: &cri::PodSandboxConfig) -> String {
        let id = self
            .run_pod(config, "")
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {:?}: {e:?}", config.metadata));
        assert!(!id.is_empty(), "an empty pod id");
        id
    }

    async fn pod_status(&mut self, id: &str) -> Result<cri::PodSandboxStatus, Status> {
        let r = self
            .cri
            .rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner();
        Ok(r.status
            .unwrap_or_else(|| panic!("PodSandboxStatus {id}: no status")))
    }

    async fn list_pods(&mut self, filter: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
        self.cri
            .rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter })
            .await
            .unwrap()
            .into_inner()
            .items
    }

    async fn pod_ids(&mut self, filter: Option<cri::PodSandboxFilter>) -> BTreeSet<String> {
        let items = self.list_pods(filter).await;
        let set: BTreeSet<String> = items.iter().map(|p| p.id.clone()).collect();
        assert_eq!(set.len(), items.len(), "a pod listed twice: {items:?}");
        set
    }

    async fn stop_pod(&mut self, id: &str) -> Result<(), Status> {
        self.cri
            .rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    async fn remove_pod(&mut self, id: &str) -> Result<(), Status> {
        self.cri
            .rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    // --- containers ---------------------------------------------------------------------------

    /// A container's config as the kubelet sends it: `log_path` is `<name>/0.log` under the pod's
    /// log directory, whose `<name>` directory the kubelet makes first.
    fn container(
        &self,
        pod: &cri::PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
        args: &[&str],
    ) -> cri::ContainerConfig {
        std::fs::create_dir_all(Path::new(&pod.log_directory).join(name)).unwrap();
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: strings(command),
            args: strings(args),
            log_path: format!("{name}/0.log"),
            ..Default::default()
        }
    }

    async fn create(
        &mut self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        config: &cri::ContainerConfig,
    ) -> Result<String, Status> {
        self.cri
            .rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.into(),
                config: Some(config.clone()),
                sandbox_config: Some(pod.clone()),
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    async fn created(
        &mut self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        config: &cri::ContainerConfig,
    ) -> String {
        let id = self
            .create(pod_id, pod, config)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {:?}: {e:?}", config.metadata));
        assert!(!id.is_empty(), "an empty container id");
        id
    }

    async fn start_container(&mut self, id: &str) {
        self.cri
            .rt
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {id}: {e:?}"));
    }

    async fn stop_container(&mut self, id: &str, timeout_s: i64) -> Result<(), Status> {
        self.cri
            .rt
            .stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout: timeout_s,
            })
            .await
            .map(|_| ())
    }

    async fn remove_container(&mut self, id: &str) -> Result<(), Status> {
        self.cri
            .rt
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    async fn status(&mut self, id: &str) -> Result<cri::ContainerStatus, Status> {
        let r = self
            .cri
            .rt
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner();
        Ok(r.status
            .unwrap_or_else(|| panic!("ContainerStatus {id}: no status")))
    }

    /// Polls ContainerStatus until the container is in `state` (at most [`STATE_DEADLINE`]).
    async fn wait_state(&mut self, id: &str, state: cri::ContainerState) -> cri::ContainerStatus {
        let deadline = Instant::now() + STATE_DEADLINE;
        loop {
            let st = self
                .status(id)
                .await
                .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e:?}"));
            if st.state == state as i32 {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} did not reach {state:?} within {STATE_DEADLINE:?}: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates, starts and waits for the container to exit; its id and final status.
    async fn run(
        &mut self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        config: &cri::ContainerConfig,
    ) -> (String, cri::ContainerStatus) {
        let id = self.created(pod_id, pod, config).await;
        self.start_container(&id).await;
        let st = self
            .wait_state(&id, cri::ContainerState::ContainerExited)
            .await;
        (id, st)
    }

    async fn list_containers(
        &mut self,
        filter: Option<cri::ContainerFilter>,
    ) -> Vec<cri::Container> {
        self.cri
            .rt
            .list_containers(cri::ListContainersRequest { filter })
            .await
            .unwrap()
            .into_inner()
            .containers
    }

    async fn container_ids(&mut self, filter: Option<cri::ContainerFilter>) -> BTreeSet<String> {
        let items = self.list_containers(filter).await;
        let set: BTreeSet<String> = items.iter().map(|c| c.id.clone()).collect();
        assert_eq!(
            set.len(),
            items.len(),
            "a container listed twice: {items:?}"
        );
        set
    }

    async fn exec(&mut self, id: &str, cmd: &[&str]) -> cri::ExecSyncResponse {
        self.cri
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: strings(cmd),
                timeout: 30,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync {id} {cmd:?}: {e:?}"))
            .into_inner()
    }

    // --- images -------------------------------------------------------------------------------

    async fn pull(
        &mut self,
        image: &str,
        sandbox: Option<&cri::PodSandboxConfig>,
    ) -> Result<String, Status> {
        self.cri
            .img
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: sandbox.cloned(),
            })
            .await
            .map(|r| r.into_inner().image_ref)
    }

    async fn image_status(&mut self, image: &str) -> Option<cri::Image> {
        self.cri
            .img
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .unwrap_or_else(|e| panic!("ImageStatus {image}: {e:?}"))
            .into_inner()
            .image
    }

    async fn list_images(&mut self, filter: Option<&str>) -> Vec<cri::Image> {
        self.cri
            .img
            .list_images(cri::ListImagesRequest {
                filter: filter.map(|f| cri::ImageFilter {
                    image: Some(cri::ImageSpec {
                        image: f.into(),
                        ..Default::default()
                    }),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .images
    }

    async fn remove_image(&mut self, image: &str) -> Result<(), Status> {
        self.cri
            .img
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ())
    }

    /// Whether the caas API shows `reference` pulled into `tenant`.
    async fn tenant_has_image(&mut self, tenant: &str, reference: &str) -> bool {
        match self
            .caas_images
            .inspect_image(pb::InspectImageRequest {
                tenant: tenant.into(),
                reference: reference.into(),
            })
            .await
        {
            Ok(_) => true,
            Err(e) if e.code() == Code::NotFound => false,
            Err(e) => panic!("InspectImage {tenant} {reference}: {e:?}"),
        }
    }
}

// --- logs -------------------------------------------------------------------------------------

/// Polls the container's CRI log file (its status's `log_path`) until it parses completely and
/// `done` holds (at most [`LOG_DEADLINE`]); panics with the file and `what` otherwise.
async fn log_until(
    st: &cri::ContainerStatus,
    what: &str,
    done: impl Fn(&[LogRecord]) -> bool,
) -> Vec<LogRecord> {
    assert!(
        !st.log_path.is_empty(),
        "the container status has no log_path: {st:?}"
    );
    let path = PathBuf::from(&st.log_path);
    let deadline = Instant::now() + LOG_DEADLINE;
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let parsed = parse_log(&text);
        if let Ok(records) = &parsed
            && done(records)
        {
            return parsed.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the log {} did not get there within {LOG_DEADLINE:?}; parsed: {parsed:?}; \
             file:\n{text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the log to hold exactly `stdout` and `stderr` (see [`log_until`]).
async fn expect_output(
    st: &cri::ContainerStatus,
    what: &str,
    stdout: &str,
    stderr: &str,
) -> Vec<LogRecord> {
    log_until(st, what, |r| {
        stream_text(r, LogStream::Stdout) == stdout && stream_text(r, LogStream::Stderr) == stderr
    })
    .await
}

// --- images -----------------------------------------------------------------------------------

/// Images pushed to the test's registry.
struct Images {
    reg: Registry,
    layout: OciLayout,
    /// A busybox root filesystem as one layer tar.
    base: Vec<u8>,
}

/// What [`Images::push`] pushed.
#[derive(Debug, Clone)]
struct Pushed {
    /// `127.0.0.1:PORT/<repo>:v1`.
    reference: String,
    /// `127.0.0.1:PORT/<repo>@<manifest digest>`.
    by_digest: String,
    /// The image id: its config's digest.
    id: String,
}

impl Images {
    fn new(reg: Registry, work: &Path) -> Self {
        let base = tar_dir(&busybox_rootfs(work));
        let layout = OciLayout::new(&work.join("layout")).unwrap();
        Self { reg, layout, base }
    }

    /// A busybox image (`Cmd ["/bin/sh"]`) to build on.
    fn busybox(&self) -> ImageBuilder {
        ImageBuilder::new().layer(self.base.clone(), Compression::Gzip)
    }

    fn host(&self) -> String {
        self.reg.host()
    }

    /// Pushes `img` as `<repo>:v1`.
    async fn push(&mut self, repo: &str, img: ImageBuilder) -> Pushed {
        let built = self.layout.add_image(&img, repo).unwrap();
        let m = self
            .reg
            .push(
                self.layout.dir(),
                repo,
                &format!("{repo}:v1"),
                PushMode::Oci,
            )
            .await
            .unwrap();
        assert_eq!(
            m.config_digest().as_deref(),
            Some(built.config.digest.as_str())
        );
        let host = self.host();
        Pushed {
            reference: format!("{host}/{repo}:v1"),
            by_digest: format!("{host}/{repo}@{}", m.digest),
            id: built.config.digest,
        }
    }
}

// =============================================================================================
// Runtime identity
// =============================================================================================

/// Version and Status say who the runtime is and what it can run; without `cri.enabled` there is
/// no CRI socket at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_status_describe_the_runtime() {
    root_or_skip!("version_and_status_describe_the_runtime");
    let mut k = Kubelet::start(|_| {}).await;
    let v = k
        .cri
        .rt
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "caas-agent", "{v:?}");
    assert_eq!(v.runtime_api_version, "v1", "{v:?}");
    assert_eq!(v.version, "0.1.0", "{v:?}");
    assert_eq!(v.runtime_version, caas_agent::VERSION, "{v:?}");

    let s = k
        .cri
        .rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let conditions = s.status.clone().unwrap_or_default().conditions;
    assert!(
        conditions
            .iter()
            .any(|c| c.r#type == "RuntimeReady" && c.status),
        "RuntimeReady is not true: {conditions:?}"
    );
    let handlers: BTreeSet<&str> = s.runtime_handlers.iter().map(|h| h.name.as_str()).collect();
    for h in ["caas-userns", "caas-vm"] {
        assert!(handlers.contains(h), "{h} is not among {handlers:?}");
    }
    k.agent.stop().await.unwrap();

    let mut plain = TestAgent::start(|_| {}).await.unwrap();
    let socket = plain.dir.path().join("run/cri.sock");
    assert!(
        !socket.exists(),
        "{} exists though cri.enabled is off by default",
        socket.display()
    );
    plain.stop().await.unwrap();
}

// =============================================================================================
// Pods
// =============================================================================================

/// A pod's whole life as the kubelet sees it: run (its namespace becomes a tenant), status,
/// ALREADY_EXISTS for the same pod again, a new attempt, list filters, stop (twice), remove
/// (twice), and unknown ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_stop_and_remove_with_status_and_list_filters() {
    root_or_skip!("pods_run_stop_and_remove_with_status_and_list_filters");
    let mut k = Kubelet::start(|_| {}).await;
    assert!(!k.tenant_exists("ns-life").await);

    let mut web0 = k.pod("ns-life", "web");
    web0.labels = map(&[("app", "web"), ("tier", "front")]);
    web0.annotations = map(&[("note", "first"), ("kubernetes.io/config.seen", "now")]);
    let id0 = k.ready_pod(&web0).await;
    assert!(
        k.tenant_exists("ns-life").await,
        "the pod's namespace became a tenant"
    );

    let st = k.pod_status(&id0).await.unwrap();
    assert_eq!(st.id, id0);
    assert_eq!(st.metadata, web0.metadata);
    assert_eq!(
        st.state,
        cri::PodSandboxState::SandboxReady as i32,
        "{st:?}"
    );
    assert_eq!(st.labels, web0.labels);
    assert_eq!(st.annotations, web0.annotations);
    assert_eq!(st.runtime_handler, "", "{st:?}");
    k.assert_recent("PodSandboxStatus.created_at", st.created_at);

    // The same pod (name, namespace, uid, attempt) again.
    expect_code(
        k.run_pod(&web0, "").await,
        Code::AlreadyExists,
        "the same pod twice",
    );
    // The kubelet's next attempt of that pod is a new sandbox.
    let mut web1 = web0.clone();
    web1.metadata.as_mut().unwrap().attempt = 1;
    web1.labels = map(&[("app", "web"), ("tier", "back")]);
    web1.annotations = HashMap::new();
    let id1 = k.run_pod(&web1, "caas-userns").await.unwrap();
    assert_ne!(id1, id0);
    let st1 = k.pod_status(&id1).await.unwrap();
    assert_eq!(st1.runtime_handler, "caas-userns", "{st1:?}");
    assert_eq!(st1.metadata.as_ref().unwrap().attempt, 1);
    let mut db = k.pod("ns-life", "db");
    db.labels = map(&[("app", "db")]);
    let id2 = k.ready_pod(&db).await;

    // ListPodSandbox and its filters.
    let all = ids(&[&id0, &id1, &id2]);
    assert_eq!(k.pod_ids(None).await, all);
    let by_id = |id: &str| cri::PodSandboxFilter {
        id: id.into(),
        ..Default::default()
    };
    let by_labels = |kv: &[(&str, &str)]| cri::PodSandboxFilter {
        label_selector: map(kv),
        ..Default::default()
    };
    let by_state = |s: cri::PodSandboxState| cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue { state: s as i32 }),
        ..Default::default()
    };
    assert_eq!(k.pod_ids(Some(by_id(&id1))).await, ids(&[&id1]));
    assert_eq!(k.pod_ids(Some(by_id("no-such-pod"))).await, ids(&[]));
    assert_eq!(
        k.pod_ids(Some(by_labels(&[("app", "web")]))).await,
        ids(&[&id0, &id1])
    );
    assert_eq!(
        k.pod_ids(Some(by_labels(&[("app", "web"), ("tier", "back")])))
            .await,
        ids(&[&id1])
    );
    assert_eq!(
        k.pod_ids(Some(by_labels(&[("app", "nope")]))).await,
        ids(&[])
    );
    let listed = k.list_pods(Some(by_id(&id1))).await;
    let p = &listed[0];
    assert_eq!(p.metadata, web1.metadata);
    assert_eq!(p.labels, web1.labels);
    assert_eq!(p.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(p.runtime_handler, "caas-userns");
    k.assert_recent("PodSandbox.created_at", p.created_at);

    // Stop: NOTREADY, and stopping again is fine.
    k.stop_pod(&id0).await.unwrap();
    let st = k.pod_status(&id0).await.unwrap();
    assert_eq!(
        st.state,
        cri::PodSandboxState::SandboxNotready as i32,
        "{st:?}"
    );
    k.stop_pod(&id0).await.unwrap();
    assert_eq!(
        k.pod_ids(Some(by_state(cri::PodSandboxState::SandboxReady)))
            .await,
        ids(&[&id1, &id2])
    );
    assert_eq!(
        k.pod_ids(Some(by_state(cri::PodSandboxState::SandboxNotready)))
            .await,
        ids(&[&id0])
    );
    let mut f = by_state(cri::PodSandboxState::SandboxNotready);
    f.label_selector = map(&[("app", "db")]);
    assert_eq!(k.pod_ids(Some(f)).await, ids(&[]));

    // Unknown ids: status is NotFound, stop and remove are no-ops.
    expect_code(
        k.pod_status("no-such-pod").await,
        Code::NotFound,
        "status of an unknown pod",
    );
    k.stop_pod("no-such-pod").await.unwrap();
    k.remove_pod("no-such-pod").await.unwrap();

    // Remove: gone from status and list; removing again is fine.
    k.remove_pod(&id0).await.unwrap();
    expect_code(
        k.pod_status(&id0).await,
        Code::NotFound,
        "status of a removed pod",
    );
    k.remove_pod(&id0).await.unwrap();
    assert_eq!(k.pod_ids(None).await, ids(&[&id1, &id2]));
    // A pod that is still ready can be removed too (CRI: its containers are forcibly stopped).
    k.remove_pod(&id2).await.unwrap();
    expect_code(
        k.pod_status(&id2).await,
        Code::NotFound,
        "status of a pod removed while ready",
    );
    assert_eq!(k.pod_ids(None).await, ids(&[&id1]));
    k.agent.stop().await.unwrap();
}

/// The `caas.io/tenant` annotation names a pod's tenant; without it the namespace does. Tenants
/// made on first use get `cri.default_quotas`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_tenant_is_its_annotation_or_else_its_namespace() {
    root_or_skip!("a_pods_tenant_is_its_annotation_or_else_its_namespace");
    let mut k = Kubelet::start(|cfg| {
        cfg.cri.default_quotas.memory_bytes = Some(512 << 20);
        cfg.cri.default_quotas.pids = Some(300);
    })
    .await;
    let mut annotated = k.pod("ns-x", "annotated");
    annotated.annotations = map(&[(TENANT_ANNOTATION, "acme-x")]);
    let id = k.ready_pod(&annotated).await;
    assert!(k.tenant_exists("acme-x").await, "the annotation's tenant");
    assert!(
        !k.tenant_exists("ns-x").await,
        "the namespace is not a tenant when the annotation names one"
    );
    assert_eq!(
        k.pod_status(&id).await.unwrap().annotations,
        annotated.annotations
    );

    let plain = k.pod("ns-y", "plain");
    k.ready_pod(&plain).await;
    let t = k.tenant("ns-y").await;
    let q = t.quotas.unwrap_or_default();
    assert_eq!(
        (q.memory_bytes, q.pids),
        (Some(512 << 20), Some(300)),
        "a tenant made on first use has cri.default_quotas: {t:?}"
    );
    assert_eq!(k.tenant_ids().await, ids(&["acme-x", "ns-y"]));
    k.agent.stop().await.unwrap();
}

/// With `require_known_tenants`, a pod whose tenant does not exist is refused with
/// FAILED_PRECONDITION and nothing is made; once the tenant exists the pod runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tenants_are_refused_when_known_ones_are_required() {
    root_or_skip!("unknown_tenants_are_refused_when_known_ones_are_required");
    let mut k = Kubelet::start(|cfg| cfg.cri.require_known_tenants = true).await;
    let pod = k.pod("ns-known", "p");
    expect_code(
        k.run_pod(&pod, "").await,
        Code::FailedPrecondition,
        "a pod of an unknown tenant",
    );
    assert!(!k.tenant_exists("ns-known").await, "no tenant was made");
    assert_eq!(k.pod_ids(None).await, ids(&[]), "no pod was made");

    k.tenants
        .create_tenant(pb::CreateTenantRequest {
            id: "ns-known".into(),
            isolation: pb::Isolation::Userns as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let id = k.ready_pod(&pod).await;
    assert_eq!(
        k.pod_status(&id).await.unwrap().state,
        cri::PodSandboxState::SandboxReady as i32
    );
    k.agent.stop().await.unwrap();
}

/// Pods whose tenant would not be a valid tenant id, unknown runtime handlers, and a missing
/// config are INVALID_ARGUMENT, and make neither a pod nor a tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pods_are_refused_and_make_nothing() {
    root_or_skip!("malformed_pods_are_refused_and_make_nothing");
    let mut k = Kubelet::start(|_| {}).await;
    let long = "n".repeat(64);
    for ns in ["Bad_NS", "", "dots.not.allowed", long.as_str()] {
        let pod = k.pod(ns, "p");
        expect_code(
            k.run_pod(&pod, "").await,
            Code::InvalidArgument,
            &format!("namespace {ns:?}"),
        );
    }
    let mut pod = k.pod("ns-ok", "p");
    pod.annotations = map(&[(TENANT_ANNOTATION, "no/slash")]);
    expect_code(
        k.run_pod(&pod, "").await,
        Code::InvalidArgument,
        "a tenant annotation that is no tenant id",
    );
    let pod = k.pod("ns-ok", "p");
    let e = expect_code(
        k.run_pod(&pod, "runc").await,
        Code::InvalidArgument,
        "runtime handler runc",
    );
    assert!(e.message().contains("runc"), "{e:?}");
    expect_code(
        k.cri
            .rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: None,
                runtime_handler: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "no config",
    );
    assert_eq!(k.pod_ids(None).await, ids(&[]), "no pod was made");
    assert_eq!(k.tenant_ids().await, ids(&[]), "no tenant was made");
    k.agent.stop().await.unwrap();
}

// =============================================================================================
// Images
// =============================================================================================

/// PullImage by tag and by digest answers the image id; ImageStatus, ListImages (with a filter)
/// and ImageFsInfo show pulled images; an image pulled into two tenants is one image; RemoveImage
/// by tag and by id removes, and is a no-op for unknown images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pulled_inspected_listed_and_removed() {
    registry_or_skip!("images_are_pulled_inspected_listed_and_removed");
    let (mut k, mut images, bb) = Kubelet::with_registry().await;
    let hello = LayerTar::new()
        .dir("data")
        .file("data/hello.txt", b"hello\n")
        .into_tar();
    let app = images
        .push("app", images.busybox().layer(hello, Compression::Gzip))
        .await;
    let other = images
        .push("other", images.busybox().label("which", "other"))
        .await;
    let host = images.host();

    // By tag, without a pod: into the image tenant ("default").
    assert_eq!(k.pull(&app.reference, None).await.unwrap(), app.id);
    assert!(
        k.tenant_has_image("default", &app.reference).await,
        "a pull without sandbox_config goes into cri.image_tenant"
    );
    let s = k
        .image_status(&app.reference)
        .await
        .expect("ImageStatus of a pulled image");
    assert_eq!(s.id, app.id, "{s:?}");
    assert!(s.repo_tags.contains(&app.reference), "{s:?}");
    assert!(s.repo_digests.contains(&app.by_digest), "{s:?}");
    assert!(s.size > 0, "{s:?}");
    // The kubelet also asks by image id.
    let by_id = k.image_status(&app.id).await.expect("ImageStatus by id");
    assert_eq!(by_id.id, app.id);
    assert!(
        k.image_status(&format!("{host}/nope:v1")).await.is_none(),
        "an unknown image has no status, and no error"
    );

    // By digest.
    assert_eq!(k.pull(&other.by_digest, None).await.unwrap(), other.id);
    let s = k
        .image_status(&other.by_digest)
        .await
        .expect("ImageStatus by digest");
    assert_eq!(s.id, other.id);
    assert!(s.repo_digests.contains(&other.by_digest), "{s:?}");

    // ListImages, whole and filtered.
    let list: Vec<String> = k
        .list_images(None)
        .await
        .into_iter()
        .map(|i| i.id)
        .collect();
    let set: BTreeSet<String> = list.iter().cloned().collect();
    assert_eq!(set.len(), list.len(), "an image listed twice: {list:?}");
    assert_eq!(set, ids(&[&bb.id, &app.id, &other.id]));
    let filtered = k.list_images(Some(&app.reference)).await;
    assert_eq!(
        filtered.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        [app.id.as_str()],
        "{filtered:?}"
    );

    let fs = k
        .cri
        .img
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fs.image_filesystems.len(), 1, "{fs:?}");
    let used = fs.image_filesystems[0].used_bytes.map(|u| u.value);
    assert!(used.is_some_and(|u| u > 0), "{fs:?}");

    // With a pod's config: into the pod's tenant; and one image, though in two tenants.
    let third = images
        .push("third", images.busybox().label("which", "third"))
        .await;
    let pod = k.pod("ns-img", "puller");
    assert_eq!(
        k.pull(&third.reference, Some(&pod)).await.unwrap(),
        third.id
    );
    assert!(
        k.tenant_has_image("ns-img", &third.reference).await,
        "a pull with sandbox_config goes into the pod's tenant"
    );
    assert_eq!(
        k.image_status(&third.reference).await.map(|i| i.id),
        Some(third.id.clone())
    );
    assert_eq!(k.pull(&third.reference, None).await.unwrap(), third.id);
    let n = k
        .list_images(None)
        .await
        .iter()
        .filter(|i| i.id == third.id)
        .count();
    assert_eq!(n, 1, "an image in two tenants is listed once");

    // RemoveImage by tag.
    k.remove_image(&app.reference).await.unwrap();
    assert!(k.image_status(&app.reference).await.is_none());
    assert!(
        !k.list_images(None).await.iter().any(|i| i.id == app.id),
        "a removed image is not listed"
    );
    k.remove_image(&app.reference).await.unwrap();
    k.remove_image(&format!("{host}/never-pulled:v1"))
        .await
        .unwrap();
    // RemoveImage by id, as the kubelet's image garbage collection does.
    k.remove_image(&other.id).await.unwrap();
    assert!(k.image_status(&other.by_digest).await.is_none());
    assert!(k.image_status(&other.id).await.is_none());
    k.agent.stop().await.unwrap();
}

// =============================================================================================
// Containers
// =============================================================================================

/// Kubernetes semantics: `command` replaces the image's Entrypoint, `args` its Cmd; with only a
/// command the image's Cmd is dropped. Containers are made from the image id (as the kubelet
/// does, from PullImage's answer) and from the tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_and_args_replace_entrypoint_and_cmd() {
    registry_or_skip!("command_and_args_replace_entrypoint_and_cmd");
    let (mut k, mut images, _) = Kubelet::with_registry().await;
    let img = images
        .push(
            "echo",
            images
                .busybox()
                .entrypoint(&["/bin/echo", "ep"])
                .cmd(&["cmd-default"]),
        )
        .await;
    assert_eq!(k.pull(&img.reference, None).await.unwrap(), img.id);
    let pod = k.pod("ns-cmd", "cmd");
    let pod_id = k.ready_pod(&pod).await;
    /// (container name, image, command, args, expected stdout)
    type Case<'a> = (&'a str, &'a str, &'a [&'a str], &'a [&'a str], &'a str);
    let cases: [Case; 4] = [
        ("image-defaults", &img.id, &[], &[], "ep cmd-default\n"),
        (
            "args-only",
            &img.reference,
            &[],
            &["a1", "a2"],
            "ep a1 a2\n",
        ),
        ("command-only", &img.id, &["/bin/echo", "c1"], &[], "c1\n"),
        (
            "command-and-args",
            &img.reference,
            &["/bin/echo", "c1"],
            &["a1"],
            "c1 a1\n",
        ),
    ];
    for (name, image, command, args, want) in cases {
        let c = k.container(&pod, name, image, command, args);
        let (_, st) = k.run(&pod_id, &pod, &c).await;
        assert_eq!(
            (st.exit_code, st.reason.as_str()),
            (0, "Completed"),
            "{name}: {st:?}"
        );
        expect_output(&st, name, want, "").await;
    }
    k.agent.stop().await.unwrap();
}

/// A container that ran: its status (ids, metadata, timestamps in ns, exit code and reason,
/// image, labels, annotations, log path) and its log in the CRI format, both streams, with the
/// working directory and environment it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_status_and_cri_log_report_what_ran() {
    registry_or_skip!("container_status_and_cri_log_report_what_ran");
    let (mut k, _images, bb) = Kubelet::with_registry().await;
    let pod = k.pod("ns-logs", "logger");
    let pod_id = k.ready_pod(&pod).await;
    let script =
        r#"echo "pwd=$(pwd) greeting=$GREETING"; echo "to stderr" >&2; echo second line; exit 3"#;
    let mut c = k.container(&pod, "talker", &bb.id, &["sh", "-c", script], &[]);
    c.working_dir = "/tmp".into();
    c.envs = vec![cri::KeyValue {
        key: "GREETING".into(),
        value: "hello there".into(),
    }];
    c.labels = map(&[("app", "talker")]);
    c.annotations = map(&[("note", "annotated")]);

    let id = k.created(&pod_id, &pod, &c).await;
    let st = k.status(&id).await.unwrap();
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerCreated as i32,
        "{st:?}"
    );
    k.assert_recent("created_at", st.created_at);
    assert_eq!(
        (st.started_at, st.finished_at),
        (0, 0),
        "not started: {st:?}"
    );
    k.start_container(&id).await;
    let st = k
        .wait_state(&id, cri::ContainerState::ContainerExited)
        .await;

    assert_eq!(st.id, id);
    assert_eq!(st.metadata, c.metadata);
    assert_eq!(st.exit_code, 3, "{st:?}");
    assert_eq!(st.reason, "Error", "{st:?}");
    assert_eq!(
        st.image.as_ref().map(|i| i.image.as_str()),
        Some(bb.id.as_str()),
        "{st:?}"
    );
    assert_eq!(st.image_ref, bb.id, "{st:?}");
    assert_eq!(st.labels, c.labels);
    assert_eq!(st.annotations, c.annotations);
    let want_log = Path::new(&pod.log_directory).join("talker/0.log");
    assert_eq!(Path::new(&st.log_path), want_log, "{st:?}");
    k.assert_recent("created_at", st.created_at);
    k.assert_recent("started_at", st.started_at);
    k.assert_recent("finished_at", st.finished_at);
    assert!(
        st.created_at <= st.started_at && st.started_at <= st.finished_at,
        "created <= started <= finished: {st:?}"
    );

    let records = expect_output(
        &st,
        "talker",
        "pwd=/tmp greeting=hello there\nsecond line\n",
        "to stderr\n",
    )
    .await;
    for r in &records {
        assert!(!r.partial, "a short line is one full record: {r:?}");
        let t = i64::try_from(r.time_ns).unwrap();
        k.assert_recent(&format!("the log timestamp {}", r.time), t);
    }
    let stdout: Vec<&LogRecord> = records
        .iter()
        .filter(|r| r.stream == LogStream::Stdout)
        .collect();
    assert!(
        stdout[0].time_ns <= stdout[1].time_ns,
        "one stream's records are in time order: {stdout:?}"
    );
    k.agent.stop().await.unwrap();
}

/// CREATED, RUNNING, EXITED; ExecSync in a running container (stdout, stderr, exit code);
/// ListContainers by id, state, pod and labels; StopContainer sends SIGTERM first and SIGKILL
/// after the timeout; stop and remove are idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_exec_stop_and_remove_with_list_filters() {
    registry_or_skip!("containers_run_exec_stop_and_remove_with_list_filters");
    let (mut k, _images, bb) = Kubelet::with_registry().await;
    let pod = k.pod("ns-cycle", "cycle");
    let pod_id = k.ready_pod(&pod).await;
    let other = k.pod("ns-cycle", "other");
    let other_id = k.ready_pod(&other).await;

    let script = "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 1; done";
    let mut c = k.container(&pod, "sleeper", &bb.reference, &["sh", "-c", script], &[]);
    c.labels = map(&[("role", "sleeper")]);
    let sleeper = k.created(&pod_id, &pod, &c).await;
    let by_state = |s: cri::ContainerState| cri::ContainerFilter {
        state: Some(cri::ContainerStateValue { state: s as i32 }),
        ..Default::default()
    };
    assert_eq!(
        k.container_ids(Some(by_state(cri::ContainerState::ContainerCreated)))
            .await,
        ids(&[&sleeper])
    );
    k.start_container(&sleeper).await;
    let st = k
        .wait_state(&sleeper, cri::ContainerState::ContainerRunning)
        .await;
    k.assert_recent("started_at", st.started_at);
    assert!(st.started_at >= st.created_at, "{st:?}");
    assert_eq!(st.finished_at, 0, "{st:?}");
    log_until(&st, "sleeper ready", |r| {
        stream_text(r, LogStream::Stdout).contains("ready\n")
    })
    .await;

    // ExecSync.
    let r = k
        .exec(&sleeper, &["sh", "-c", "echo out; echo err >&2; exit 7"])
        .await;
    assert_eq!(
        (
            String::from_utf8_lossy(&r.stdout).as_ref(),
            String::from_utf8_lossy(&r.stderr).as_ref(),
            r.exit_code
        ),
        ("out\n", "err\n", 7)
    );
    let r = k.exec(&sleeper, &["true"]).await;
    assert_eq!(
        (r.exit_code, r.stdout.len(), r.stderr.len()),
        (0, 0, 0),
        "{r:?}"
    );

    // A container in the other pod, left created.
    let mut c2 = k.container(&other, "idle", &bb.reference, &["true"], &[]);
    c2.labels = map(&[("role", "idle")]);
    let idle = k.created(&other_id, &other, &c2).await;

    // ListContainers and its filters.
    assert_eq!(k.container_ids(None).await, ids(&[&sleeper, &idle]));
    let f = cri::ContainerFilter {
        id: sleeper.clone(),
        ..Default::default()
    };
    assert_eq!(k.container_ids(Some(f)).await, ids(&[&sleeper]));
    assert_eq!(
        k.container_ids(Some(by_state(cri::ContainerState::ContainerRunning)))
            .await,
        ids(&[&sleeper])
    );
    assert_eq!(
        k.container_ids(Some(by_state(cri::ContainerState::ContainerCreated)))
            .await,
        ids(&[&idle])
    );
    let by_pod = |p: &str| cri::ContainerFilter {
        pod_sandbox_id: p.into(),
        ..Default::default()
    };
    assert_eq!(
        k.container_ids(Some(by_pod(&pod_id))).await,
        ids(&[&sleeper])
    );
    assert_eq!(
        k.container_ids(Some(by_pod(&other_id))).await,
        ids(&[&idle])
    );
    let f = cri::ContainerFilter {
        label_selector: map(&[("role", "sleeper")]),
        ..Default::default()
    };
    assert_eq!(k.container_ids(Some(f)).await, ids(&[&sleeper]));
    let f = cri::ContainerFilter {
        pod_sandbox_id: other_id.clone(),
        label_selector: map(&[("role", "sleeper")]),
        ..Default::default()
    };
    assert_eq!(k.container_ids(Some(f)).await, ids(&[]));
    let listed = k
        .list_containers(Some(cri::ContainerFilter {
            id: sleeper.clone(),
            ..Default::default()
        }))
        .await;
    let l = &listed[0];
    assert_eq!(l.pod_sandbox_id, pod_id);
    assert_eq!(l.metadata, c.metadata);
    assert_eq!(
        l.image.as_ref().map(|i| i.image.as_str()),
        Some(bb.reference.as_str())
    );
    assert_eq!(l.image_ref, bb.id);
    assert_eq!(l.state, cri::ContainerState::ContainerRunning as i32);
    assert_eq!(l.labels, c.labels);
    k.assert_recent("Container.created_at", l.created_at);

    // StopContainer: SIGTERM, which the trap answers; the container is EXITED when it returns.
    k.stop_container(&sleeper, 30).await.unwrap();
    let st = k.status(&sleeper).await.unwrap();
    assert_eq!(
        (st.state, st.exit_code, st.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 3, "Error"),
        "{st:?}"
    );
    k.assert_recent("finished_at", st.finished_at);
    assert!(st.finished_at >= st.started_at, "{st:?}");
    log_until(&st, "the trap ran", |r| {
        stream_text(r, LogStream::Stdout).contains("got-term\n")
    })
    .await;
    k.stop_container(&sleeper, 30).await.unwrap();

    // A PID 1 without a TERM handler ignores SIGTERM: SIGKILL after the timeout.
    let c3 = k.container(&pod, "stubborn", &bb.reference, &["sleep", "600"], &[]);
    let stubborn = k.created(&pod_id, &pod, &c3).await;
    k.start_container(&stubborn).await;
    k.wait_state(&stubborn, cri::ContainerState::ContainerRunning)
        .await;
    let t = Instant::now();
    k.stop_container(&stubborn, 2).await.unwrap();
    let took = t.elapsed();
    let st = k.status(&stubborn).await.unwrap();
    assert_eq!(
        (st.state, st.exit_code, st.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 137, "Error"),
        "killed: {st:?}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "SIGKILL came after {took:?}, before the 2 s timeout"
    );

    // RemoveContainer: gone; again and unknown are no-ops.
    k.remove_container(&sleeper).await.unwrap();
    expect_code(
        k.status(&sleeper).await,
        Code::NotFound,
        "status of a removed container",
    );
    k.remove_container(&sleeper).await.unwrap();
    k.remove_container("no-such-container").await.unwrap();
    assert_eq!(k.container_ids(None).await, ids(&[&stubborn, &idle]));
    k.agent.stop().await.unwrap();
}

/// CreateContainer needs a known pod, a pulled image (the runtime does not pull by itself) and a
/// pod that is not stopped; StopPodSandbox stops the pod's containers, and RemovePodSandbox
/// removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_need_a_ready_pod_and_a_pulled_image_and_go_with_their_pod() {
    registry_or_skip!("containers_need_a_ready_pod_and_a_pulled_image_and_go_with_their_pod");
    let (mut k, mut images, bb) = Kubelet::with_registry().await;
    let pod = k.pod("ns-pod", "p");
    let pod_id = k.ready_pod(&pod).await;

    let c = k.container(&pod, "orphan", &bb.reference, &["true"], &[]);
    expect_code(
        k.create("no-such-pod", &pod, &c).await,
        Code::NotFound,
        "a container in an unknown pod",
    );
    let unpulled = images
        .push("unpulled", images.busybox().label("which", "unpulled"))
        .await;
    let c = k.container(&pod, "unpulled", &unpulled.reference, &["true"], &[]);
    expect_code(
        k.create(&pod_id, &pod, &c).await,
        Code::NotFound,
        "an image that was never pulled",
    );
    assert_eq!(k.container_ids(None).await, ids(&[]));

    let c = k.container(&pod, "runner", &bb.reference, &["sleep", "600"], &[]);
    let runner = k.created(&pod_id, &pod, &c).await;
    k.start_container(&runner).await;
    k.wait_state(&runner, cri::ContainerState::ContainerRunning)
        .await;
    let c = k.container(&pod, "made", &bb.reference, &["true"], &[]);
    let made = k.created(&pod_id, &pod, &c).await;

    // StopPodSandbox stops every process of the pod.
    k.stop_pod(&pod_id).await.unwrap();
    let st = k.status(&runner).await.unwrap();
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerExited as i32,
        "a stopped pod's containers are stopped: {st:?}"
    );
    let c = k.container(&pod, "late", &bb.reference, &["true"], &[]);
    expect_code(
        k.create(&pod_id, &pod, &c).await,
        Code::FailedPrecondition,
        "a container in a stopped pod",
    );

    // RemovePodSandbox removes its containers.
    k.remove_pod(&pod_id).await.unwrap();
    for id in [&runner, &made] {
        expect_code(
            k.status(id).await,
            Code::NotFound,
            "a container of a removed pod",
        );
    }
    let f = cri::ContainerFilter {
        pod_sandbox_id: pod_id.clone(),
        ..Default::default()
    };
    assert_eq!(k.container_ids(Some(f)).await, ids(&[]));
    assert_eq!(k.container_ids(None).await, ids(&[]));
    k.agent.stop().await.unwrap();
}

/// `run_as_user` and `run_as_group` are the ids of the container's process; without them it runs
/// as the image's user (root here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_user_and_group_are_the_process_ids() {
    registry_or_skip!("run_as_user_and_group_are_the_process_ids");
    let (mut k, _images, bb) = Kubelet::with_registry().await;
    let pod = k.pod("ns-user", "u");
    let pod_id = k.ready_pod(&pod).await;
    let script = ["sh", "-c", "id -u; id -g"];
    let c = k.container(&pod, "as-root", &bb.id, &script, &[]);
    let (_, st) = k.run(&pod_id, &pod, &c).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    expect_output(&st, "as-root", "0\n0\n", "").await;

    let mut c = k.container(&pod, "as-1234", &bb.id, &script, &[]);
    c.linux = run_as(1234, 5678);
    let (_, st) = k.run(&pod_id, &pod, &c).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    expect_output(&st, "as-1234", "1234\n5678\n", "").await;
    k.agent.stop().await.unwrap();
}

/// Pods in namespaces ns-a and ns-b are two tenants (disjoint id ranges), and a container of one
/// sees only its own processes, not the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_two_namespaces_are_two_tenants_that_cannot_see_each_other() {
    registry_or_skip!("pods_of_two_namespaces_are_two_tenants_that_cannot_see_each_other");
    let (mut k, _images, bb) = Kubelet::with_registry().await;
    let mut running = Vec::new();
    for (ns, marker) in [("ns-a", "3601"), ("ns-b", "3602")] {
        let pod = k.pod(ns, "sleepy");
        let pod_id = k.ready_pod(&pod).await;
        let c = k.container(&pod, "sleeper", &bb.id, &["sleep", marker], &[]);
        let id = k.created(&pod_id, &pod, &c).await;
        k.start_container(&id).await;
        k.wait_state(&id, cri::ContainerState::ContainerRunning)
            .await;
        running.push((ns, marker, id));
    }
    let a = k.tenant("ns-a").await.id_range.unwrap();
    let b = k.tenant("ns-b").await.id_range.unwrap();
    assert!(
        a.start + a.size <= b.start || b.start + b.size <= a.start,
        "id ranges overlap: {a:?} {b:?}"
    );
    for (i, (ns, own, id)) in running.iter().enumerate() {
        let (_, theirs, _) = &running[1 - i];
        let r = k.exec(id, &["ps", "-o", "pid,args"]).await;
        let ps = String::from_utf8_lossy(&r.stdout);
        assert_eq!(r.exit_code, 0, "{ns}: {r:?}");
        assert!(
            ps.contains(&format!("sleep {own}")),
            "{ns} sees its own sleep: {ps}"
        );
        assert!(
            !ps.contains(&format!("sleep {theirs}")),
            "{ns} sees the other tenant's process: {ps}"
        );
    }
    k.agent.stop().await.unwrap();
}

/// Fields the runtime does not support yet are refused with UNIMPLEMENTED naming the field, and
/// make no container. (Update this test as they become supported.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_container_fields_are_refused_by_name() {
    registry_or_skip!("unsupported_container_fields_are_refused_by_name");
    let (mut k, _images, bb) = Kubelet::with_registry().await;
    let pod = k.pod("ns-unsup", "u");
    let pod_id = k.ready_pod(&pod).await;
    let base = k.container(&pod, "c", &bb.reference, &["true"], &[]);
    let security = |f: &dyn Fn(&mut cri::LinuxContainerSecurityContext)| {
        let mut sc = cri::LinuxContainerSecurityContext::default();
        f(&mut sc);
        Some(cri::LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        })
    };
    let host_dir = k.agent.dir.path().join("host-dir");
    std::fs::create_dir_all(&host_dir).unwrap();
    let cases: Vec<(&str, cri::ContainerConfig)> = vec![
        (
            "privileged",
            cri::ContainerConfig {
                linux: security(&|sc| sc.privileged = true),
                ..base.clone()
            },
        ),
        (
            "mounts",
            cri::ContainerConfig {
                mounts: vec![cri::Mount {
                    container_path: "/data".into(),
                    host_path: host_dir.display().to_string(),
                    ..Default::default()
                }],
                ..base.clone()
            },
        ),
        (
            "devices",
            cri::ContainerConfig {
                devices: vec![cri::Device {
                    container_path: "/dev/null2".into(),
                    host_path: "/dev/null".into(),
                    permissions: "rwm".into(),
                }],
                ..base.clone()
            },
        ),
        (
            "readonly_rootfs",
            cri::ContainerConfig {
                linux: security(&|sc| sc.readonly_rootfs = true),
                ..base.clone()
            },
        ),
        (
            "supplemental_groups",
            cri::ContainerConfig {
                linux: security(&|sc| sc.supplemental_groups = vec![100]),
                ..base.clone()
            },
        ),
        (
            "tty",
            cri::ContainerConfig {
                tty: true,
                ..base.clone()
            },
        ),
        (
            "stdin",
            cri::ContainerConfig {
                stdin: true,
                ..base.clone()
            },
        ),
    ];
    for (field, config) in cases {
        let e = expect_code(
            k.create(&pod_id, &pod, &config).await,
            Code::Unimplemented,
            field,
        );
        assert!(
            e.message().contains(field),
            "the refusal names {field}: {e:?}"
        );
    }
    assert_eq!(k.container_ids(None).await, ids(&[]), "nothing was made");
    k.agent.stop().await.unwrap();
}
