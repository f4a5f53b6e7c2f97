//! Proto <-> domain conversion. Everything a client sends is checked here, so the domain only
//! ever sees well-formed values.

use caas_proto::v1 as pb;
use tonic::Status;

use super::status;
use crate::{
    net::ports::Proto,
    tenants::{Isolation, QuotaRequest, Quotas, Tenant, TenantFilter, TenantSpec, TenantState},
    validate::{self, Invalid},
};

pub fn isolation_in(v: i32) -> Result<Isolation, Invalid> {
    match pb::Isolation::try_from(v) {
        Ok(pb::Isolation::Unspecified | pb::Isolation::Userns) => Ok(Isolation::Userns),
        Ok(pb::Isolation::Vm) => Ok(Isolation::Vm),
        Err(_) => Err(Invalid::new(
            "isolation",
            format!("{v} is not a known isolation"),
        )),
    }
}

fn isolation_filter(v: i32) -> Result<Option<Isolation>, Invalid> {
    match pb::Isolation::try_from(v) {
        Ok(pb::Isolation::Unspecified) => Ok(None),
        Ok(pb::Isolation::Userns) => Ok(Some(Isolation::Userns)),
        Ok(pb::Isolation::Vm) => Ok(Some(Isolation::Vm)),
        Err(_) => Err(Invalid::new(
            "isolation",
            format!("{v} is not a known isolation"),
        )),
    }
}

fn state_filter(v: i32) -> Result<Option<TenantState>, Invalid> {
    Ok(match pb::TenantState::try_from(v) {
        Ok(pb::TenantState::Unspecified) => None,
        Ok(pb::TenantState::Pending) => Some(TenantState::Pending),
        Ok(pb::TenantState::Ready) => Some(TenantState::Ready),
        Ok(pb::TenantState::Failed) => Some(TenantState::Failed),
        Ok(pb::TenantState::Deleting) => Some(TenantState::Deleting),
        Err(_) => {
            return Err(Invalid::new(
                "state",
                format!("{v} is not a known tenant state"),
            ));
        }
    })
}

pub fn quotas_in(q: Option<pb::Quotas>) -> QuotaRequest {
    let q = q.unwrap_or_default();
    QuotaRequest {
        cpus: q.cpus,
        memory_bytes: q.memory_bytes,
        pids: q.pids,
        max_containers: q.max_containers,
    }
}

pub fn tenant_spec(r: pb::CreateTenantRequest) -> Result<TenantSpec, Status> {
    let spec = TenantSpec {
        isolation: isolation_in(r.isolation).map_err(status::invalid)?,
        quotas: quotas_in(r.quotas),
        labels: r.labels,
        id: r.id,
    };
    spec.validate().map_err(status::invalid)?;
    Ok(spec)
}

pub fn tenant_filter(
    r: pb::ListTenantsRequest,
    only: Option<&str>,
) -> Result<TenantFilter, Status> {
    validate::check_labels("label_selector", &r.label_selector).map_err(status::invalid)?;
    Ok(TenantFilter {
        labels: r.label_selector,
        state: state_filter(r.state).map_err(status::invalid)?,
        isolation: isolation_filter(r.isolation).map_err(status::invalid)?,
        only: only.map(str::to_string),
    })
}

/// Checks an id field and hands it back.
pub fn id(field: &str, v: String) -> Result<String, Status> {
    validate::check_id(field, &v).map_err(status::invalid)?;
    Ok(v)
}

/// Checks the id of an optional tenant filter (empty = none).
pub fn tenant_filter_id(v: String) -> Result<Option<String>, Status> {
    if v.is_empty() {
        Ok(None)
    } else {
        id("tenant", v).map(Some)
    }
}

/// Checks a container reference and returns (tenant, container).
pub fn container_ref(r: Option<pb::ContainerRef>) -> Result<(String, String), Status> {
    let r = r.ok_or_else(|| status::invalid(Invalid::new("ref", "is required")))?;
    Ok((
        id("ref.tenant", r.tenant)?,
        id("ref.container", r.container)?,
    ))
}

fn quotas_out(q: Quotas) -> pb::Quotas {
    pb::Quotas {
        cpus: Some(q.cpus),
        memory_bytes: Some(q.memory_bytes),
        pids: Some(q.pids),
        max_containers: Some(q.max_containers),
    }
}

pub fn tenant_out(t: Tenant) -> pb::Tenant {
    pb::Tenant {
        id: t.id,
        isolation: match t.isolation {
            Isolation::Userns => pb::Isolation::Userns,
            Isolation::Vm => pb::Isolation::Vm,
        } as i32,
        quotas: Some(quotas_out(t.quotas)),
        labels: t.labels,
        state: match t.state {
            TenantState::Pending => pb::TenantState::Pending,
            TenantState::Ready => pb::TenantState::Ready,
            TenantState::Failed => pb::TenantState::Failed,
            TenantState::Deleting => pb::TenantState::Deleting,
        } as i32,
        message: t.message,
        id_range: Some(pb::IdRange {
            start: t.id_range.start,
            size: t.id_range.size,
        }),
        created_at_unix_ms: t.created_at_unix_ms,
        containers: 0,
    }
}

/// Most arguments a command may have.
const MAX_ARGS: usize = 4096;
/// Most environment entries.
const MAX_ENV: usize = 1024;
/// Largest total size of argv plus env.
const MAX_ARGV_ENV_BYTES: usize = 256 << 10;

/// Checks a create request and turns it into the engine's request. The id is generated here.
pub fn container_create(r: pb::CreateContainerRequest) -> Result<ContainerCreate, Status> {
    use crate::config::{
        MAX_CPU_SHARES, MAX_TENANT_CPUS, MAX_TENANT_MEMORY, MAX_TENANT_PIDS, MIN_CPU_SHARES,
        MIN_TENANT_CPUS,
    };
    let bad = |f: &str, m: String| status::invalid(Invalid::new(f, m));
    let tenant = id("tenant", r.tenant)?;
    let name = id("name", r.name)?;
    validate::check_labels("labels", &r.labels).map_err(status::invalid)?;
    // The agent's own labels (`caas.io/image-id`) say what a container runs: never a caller's.
    if let Some(k) = r.labels.keys().find(|k| k.starts_with("caas.io/")) {
        return Err(bad(
            &format!("labels[{k:?}]"),
            "keys under caas.io/ are set by the agent".into(),
        ));
    }
    match (r.image.is_empty(), r.rootfs_path.is_empty()) {
        (true, true) => {
            return Err(bad(
                "image",
                "give an image reference of the tenant's, or rootfs_path".into(),
            ));
        }
        (false, false) => {
            return Err(bad(
                "rootfs_path",
                "give either image or rootfs_path, not both".into(),
            ));
        }
        (false, true) => super::image::reference("image", &r.image)?,
        (true, false) => {
            if !r.rootfs_path.starts_with('/') || r.rootfs_path.split('/').any(|c| c == "..") {
                return Err(bad(
                    "rootfs_path",
                    "must be an absolute host path without `..`".into(),
                ));
            }
        }
    }
    // With an image, an empty command runs the image's entrypoint and cmd.
    if (r.image.is_empty() && r.command.is_empty())
        || r.command.first().is_some_and(String::is_empty)
    {
        return Err(bad("command", "must not be empty".into()));
    }
    if r.command.len() > MAX_ARGS {
        return Err(bad(
            "command",
            format!("has {} arguments, the limit is {MAX_ARGS}", r.command.len()),
        ));
    }
    if r.env.len() > MAX_ENV {
        return Err(bad(
            "env",
            format!("has {} entries, the limit is {MAX_ENV}", r.env.len()),
        ));
    }
    let total: usize = r.command.iter().chain(&r.env).map(String::len).sum();
    if total > MAX_ARGV_ENV_BYTES {
        return Err(bad(
            "command",
            format!("command and env are {total} bytes, the limit is {MAX_ARGV_ENV_BYTES}"),
        ));
    }
    for (i, e) in r.env.iter().enumerate() {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() && !e.contains('\0') => {}
            _ => return Err(bad(&format!("env[{i}]"), format!("{e:?} is not KEY=VALUE"))),
        }
    }
    if r.command.iter().any(|a| a.contains('\0')) {
        return Err(bad("command", "must not contain NUL bytes".into()));
    }
    if !r.workdir.is_empty() && !r.workdir.starts_with('/') {
        return Err(bad(
            "workdir",
            "must be an absolute path inside the container".into(),
        ));
    }
    let publish = ports(&r.ports)?;
    let res = r.resources.unwrap_or_default();
    if let Some(c) = res.cpus {
        validate::check_cpus("resources.cpus", c, MIN_TENANT_CPUS, MAX_TENANT_CPUS)
            .map_err(status::invalid)?;
    }
    if let Some(m) = res.memory_bytes {
        validate::check_range("resources.memory_bytes", m, 4 << 20, MAX_TENANT_MEMORY)
            .map_err(status::invalid)?;
    }
    if let Some(p) = res.pids {
        validate::check_range("resources.pids", p, 1, MAX_TENANT_PIDS).map_err(status::invalid)?;
    }
    if let Some(s) = res.cpu_shares {
        validate::check_range("resources.cpu_shares", s, MIN_CPU_SHARES, MAX_CPU_SHARES)
            .map_err(status::invalid)?;
    }
    let id = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    Ok(ContainerCreate {
        tenant,
        publish,
        engine: caas_proto::engine::v1::CreateRequest {
            id,
            image: if r.image.is_empty() {
                r.rootfs_path.clone()
            } else {
                r.image
            },
            name,
            rootfs: r.rootfs_path,
            command: r.command,
            env: r.env,
            workdir: r.workdir,
            resources: Some(res),
            labels: r.labels,
            // Set from the tenant's quota by the sandbox manager.
            max_containers: 0,
            // Set from the tenant's image store by the handler, for an image.
            lower_dirs: Vec::new(),
            user: String::new(),
            hostname: String::new(),
            resolv_conf: String::new(),
            cap_drop: Vec::new(),
            mounts: Vec::new(),
            oom_score_adj: None,
            readonly_rootfs: false,
            supplemental_groups: Vec::new(),
            merge_image_groups: false,
            stdin: false,
            stdin_once: false,
            tty: false,
            netns: String::new(),
            masked_paths: Vec::new(),
            readonly_paths: Vec::new(),
            sysctls: Default::default(),
            seccomp: String::new(),
            pidns: String::new(),
            cap_add: Vec::new(),
            pid_target: String::new(),
            allow_privilege_escalation: false,
            unconfined: false,
        },
    })
}

/// A checked container create request.
#[derive(Debug)]
pub struct ContainerCreate {
    /// The tenant.
    pub tenant: String,
    /// Ports to publish: protocol, host port, container port.
    pub publish: Vec<(Proto, u16, u16)>,
    /// What the engine is asked.
    pub engine: caas_proto::engine::v1::CreateRequest,
}

/// Checks published ports: ports 1 to 65535, tcp or udp, each host port once.
fn ports(list: &[pb::PortMapping]) -> Result<Vec<(Proto, u16, u16)>, Status> {
    let bad =
        |i: usize, f: &str, m: String| status::invalid(Invalid::new(format!("ports[{i}].{f}"), m));
    let port = |i: usize, f: &str, v: u32| {
        u16::try_from(v)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad(i, f, format!("{v} is not a port (1 to 65535)")))
    };
    let mut out: Vec<(Proto, u16, u16)> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let proto = Proto::parse(&m.protocol)
            .ok_or_else(|| bad(i, "protocol", format!("{:?} is not tcp or udp", m.protocol)))?;
        if !m.host_ip.is_empty() {
            return Err(bad(
                i,
                "host_ip",
                "published ports listen on every host address; leave host_ip empty".into(),
            ));
        }
        let host = port(i, "host_port", m.host_port)?;
        let inside = port(i, "container_port", m.container_port)?;
        if out.iter().any(|&(p, h, _)| p == proto && h == host) {
            return Err(bad(
                i,
                "host_port",
                format!("{host}/{} is asked for twice", proto.as_str()),
            ));
        }
        out.push((proto, host, inside));
    }
    Ok(out)
}

/// A signal given by name (`SIGTERM`, `TERM`) or number; empty gives 0 (the engine's default).
pub fn signal(field: &str, s: &str) -> Result<i32, Status> {
    if s.is_empty() {
        return Ok(0);
    }
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|sig| sig as i32)
            .map_err(|_| status::invalid(Invalid::new(field, format!("{n} is not a signal"))));
    }
    let name = if s.starts_with("SIG") {
        s.to_string()
    } else {
        format!("SIG{s}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| status::invalid(Invalid::new(field, format!("{s:?} is not a signal name"))))
}

/// Whether a container passes a list filter.
pub fn container_matches(
    c: &pb::Container,
    state: i32,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    (state == 0 || c.state == state) && validate::labels_match(&c.labels, labels)
}

/// The label with the id (config digest) of the image a container was made from.
pub const IMAGE_ID_LABEL: &str = "caas.io/image-id";

/// A tenant's containers as image users: (name, image) pairs for
/// [`crate::images::ImageStore::remove`], by the id of the content each runs (whatever its
/// reference names now), or, for containers made before they were labelled with it, by the
/// reference each was made from.
pub fn image_users(containers: Vec<pb::Container>) -> Vec<(String, String)> {
    containers
        .into_iter()
        .map(|c| match c.labels.get(IMAGE_ID_LABEL) {
            Some(id) => (c.name.clone(), id.clone()),
            None => (c.name, c.image),
        })
        .collect()
}

/// Fills a create request from a stored image: its layers, and where the request is silent,
/// its entrypoint and cmd, working directory and environment (the request's entries win).
pub fn apply_image(
    create: &mut caas_proto::engine::v1::CreateRequest,
    rootfs: crate::images::Rootfs,
) -> Result<(), Status> {
    let run = rootfs.config.config.unwrap_or_default();
    if create.command.is_empty() {
        create.command = run
            .entrypoint
            .unwrap_or_default()
            .into_iter()
            .chain(run.cmd.unwrap_or_default())
            .collect();
        if create.command.is_empty() {
            return Err(status::invalid(Invalid::new(
                "command",
                format!(
                    "image {:?} has no Entrypoint or Cmd; give a command",
                    create.image
                ),
            )));
        }
    }
    if create.workdir.is_empty() {
        create.workdir = run.working_dir.unwrap_or_default();
    }
    create.user = run.user.unwrap_or_default();
    let mine: std::collections::HashSet<String> = create
        .env
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, _)| k.to_string()))
        .collect();
    let mut env: Vec<String> = run
        .env
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.split_once('=')
                .is_some_and(|(k, _)| !k.is_empty() && !mine.contains(k))
                && !e.contains('\0')
        })
        .collect();
    env.append(&mut create.env);
    create.env = env;
    create.rootfs = String::new();
    // Which content it runs, whatever its reference names later: the image store keeps an
    // image in use by it (see `ImageStore::remove`).
    create.labels.insert(
        IMAGE_ID_LABEL.into(),
        rootfs.image.config_digest.to_string(),
    );
    create.lower_dirs = rootfs
        .lower_dirs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    Ok(())
}
