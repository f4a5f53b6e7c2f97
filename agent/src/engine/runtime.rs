//! The engine's containers: create with libcontainer, start, signal, reap, delete.
//!
//! Runs on the engine's single thread. libcontainer's `build()` clones and waits for its
//! intermediate process synchronously, so no reaping can interleave with it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use caas_proto::v1 as pb;
use libcontainer::{
    container::{Container, builder::ContainerBuilder},
    syscall::syscall::SyscallType,
};
use nix::{
    sys::{
        signal::Signal,
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
use tokio::sync::{broadcast, watch};

use super::{
    record::{Record, State, now_ms},
    rootfs, spec,
};
use crate::cgroups::{CgroupLayout, TenantCgroups};

/// Events kept in memory for `Events(after_seq)` replays.
const EVENT_BACKLOG: usize = 1024;

/// What went wrong, with a variant per gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such container.
    #[error("container {0:?} does not exist")]
    NotFound(String),
    /// The name is taken.
    #[error("a container named {0:?} already exists in this tenant")]
    NameTaken(String),
    /// Bad input (a missing rootfs, a command not in the image).
    #[error("{0}")]
    Invalid(String),
    /// Wrong state for the request.
    #[error("{0}")]
    State(String),
    /// The tenant is at its container quota.
    #[error(
        "the tenant has {0} containers, its quota max_containers; delete one or raise the quota"
    )]
    Quota(u32),
    /// The runtime failed.
    #[error("{0}")]
    Runtime(String),
}

/// The name of a volume import's content under `<imports>/<key>/` (VM guests): a directory or
/// one file.
pub const VOLUME_IMPORT: &str = "volume";

/// Directory layout of one tenant engine.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Persistent: `<state_dir>/engines/<tenant>`.
    pub state: PathBuf,
    /// Runtime: `<run_dir>/tenants/<tenant>`.
    pub run: PathBuf,
}

impl Paths {
    fn container(&self, id: &str) -> PathBuf {
        self.state.join("containers").join(id)
    }
    /// Where a container's root filesystem is mounted: under the run dir, whose path the tenant's
    /// (unprivileged) root can traverse, unlike the 0700 state dir.
    fn mountpoint(&self, id: &str) -> PathBuf {
        self.run.join("rootfs").join(id)
    }
    fn images(&self) -> PathBuf {
        self.state.join("images")
    }
    /// Root filesystems and image files the host sent in (VM tenants).
    pub fn imports(&self) -> PathBuf {
        self.state.join("imports")
    }
    /// The tenant's namespace files.
    pub fn ns(&self) -> PathBuf {
        self.run.join("ns")
    }
    fn youki(&self) -> PathBuf {
        self.run.join("youki")
    }
    /// The engine's socket.
    pub fn socket(&self) -> PathBuf {
        self.run.join("engine.sock")
    }
}

/// What `Create` needs.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// Engine-unique id.
    pub id: String,
    /// Tenant-unique name.
    pub name: String,
    /// Display name of the source.
    pub image: String,
    /// Host rootfs directory.
    pub rootfs: PathBuf,
    /// argv.
    pub command: Vec<String>,
    /// KEY=VALUE.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: String,
    /// Limits.
    pub cpus: Option<f64>,
    /// Relative CPU weight, `cpu.shares` units.
    pub cpu_shares: Option<u64>,
    /// Memory limit.
    pub memory_bytes: Option<u64>,
    /// Pids limit.
    pub pids: Option<u64>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The tenant's container quota (0 = none).
    pub max_containers: u32,
    /// Layer directories of a stored image, topmost first (instead of `rootfs`).
    pub lower_dirs: Vec<PathBuf>,
    /// `uid[:gid]` or `name[:group]` inside; empty = root.
    pub user: String,
    /// Host name inside; empty = the name.
    pub hostname: String,
    /// /etc/resolv.conf content; empty = the tenant's.
    pub resolv_conf: String,
    /// Capabilities dropped from the default set.
    pub cap_drop: Vec<String>,
    /// Host paths bound in: (host path, container path, read-only).
    pub mounts: Vec<spec::Bind>,
    /// The init's OOM score adjustment.
    pub oom_score_adj: Option<i32>,
    /// Mount the root filesystem read-only.
    pub readonly_rootfs: bool,
    /// Extra group ids of the process.
    pub supplemental_groups: Vec<u32>,
    /// Add the groups the image's /etc/group gives the user.
    pub merge_image_groups: bool,
    /// Keep the init's stdin open for attaches.
    pub stdin: bool,
    /// Close it when the first attach's stdin ends.
    pub stdin_once: bool,
    /// Run the init on a terminal.
    pub tty: bool,
    /// A pod network namespace of the tenant to join (empty: the tenant's).
    pub netns: String,
    /// Paths masked inside, beyond the defaults.
    pub masked_paths: Vec<String>,
    /// Paths read-only inside, beyond the defaults.
    pub readonly_paths: Vec<String>,
    /// Namespaced kernel parameters.
    pub sysctls: BTreeMap<String, String>,
    /// A seccomp profile (OCI JSON) instead of the default; empty: the default.
    pub seccomp: String,
    /// A pod process namespace of the tenant to join (empty: a new one).
    pub pidns: String,
    /// Capabilities added to the default set.
    pub cap_add: Vec<String>,
    /// A running container of this engine whose process namespace to join (empty: none).
    pub pid_target: String,
    /// Leave no-new-privileges off the init (setuid files work, within the tenant's userns).
    pub allow_privilege_escalation: bool,
    /// No seccomp filter (the CRI's Unconfined, where the operator allows it).
    pub unconfined: bool,
}

/// A container's stdin pipe as the engine keeps it: shared by its attaches, and closed for all
/// of them at once (stdin_once).
pub type SharedStdin = std::sync::Arc<tokio::sync::Mutex<Option<super::fdio::FdIo>>>;

/// Where an attach's input goes.
#[derive(Debug, Clone)]
pub enum AttachInput {
    /// Nowhere (the attach did not ask for stdin).
    None,
    /// The container's stdin pipe.
    Pipe(SharedStdin),
    /// The container's terminal.
    Tty(std::sync::Arc<super::fdio::FdIo>),
}

/// An attach's view of a container.
#[derive(Debug)]
pub struct AttachIo {
    /// The container id.
    pub id: String,
    /// Where its input goes.
    pub input: AttachInput,
    /// Its terminal, for resizes (a terminal attach only).
    pub tty: Option<std::sync::Arc<super::fdio::FdIo>>,
    /// Its stdin closes when this attach's stdin ends.
    pub stdin_once: bool,
    /// Its output files.
    pub stdout_log: PathBuf,
    /// The same.
    pub stderr_log: PathBuf,
}

/// What the engine holds of a container's stdio for attaches. Lost when the engine restarts:
/// the stdin pipe then reads as ended, and a terminal hangs up.
#[derive(Debug)]
pub struct ContainerIo {
    /// The write end of its stdin pipe (not on a terminal).
    pub stdin: Option<SharedStdin>,
    /// The terminal's master, when it has one: its input, its output (copied to stdout.log)
    /// and its size.
    pub tty: Option<std::sync::Arc<super::fdio::FdIo>>,
    /// Close the stdin pipe when the first attach's stdin ends (not on a terminal, as
    /// containerd does).
    pub stdin_once: bool,
}

/// The tenant's containers.
pub struct Engine {
    tenant: String,
    id_start: u32,
    paths: Paths,
    cgroup_root: PathBuf,
    layout: CgroupLayout,
    cgroups: TenantCgroups,
    /// The cgroup hierarchies, listed once: a container's cgroup is a directory in each.
    hierarchies: Vec<PathBuf>,
    /// On a v1 or hybrid host: what a container's `/sys/fs/cgroup` holds, made by the engine.
    cgroup_view: Option<super::cgroupfs::View>,
    recs: BTreeMap<String, Record>,
    exits: HashMap<String, watch::Sender<bool>>,
    events: broadcast::Sender<pb::ContainerEvent>,
    execs: HashMap<i32, tokio::sync::oneshot::Sender<i32>>,
    exec_seq: u64,
    /// Stdio kept for attaches, by container id.
    ios: HashMap<String, ContainerIo>,
    backlog: VecDeque<pb::ContainerEvent>,
    seq: u64,
    /// Records are fsynced when saved (a VM guest, whose crash loses its page cache).
    durable: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Loads the records a previous engine left; [`Engine::check_boot`] and [`Engine::adopt`]
    /// then settle what became of their containers.
    pub fn open(
        tenant: String,
        id_start: u32,
        paths: Paths,
        cgroups: TenantCgroups,
        cgroup_root: PathBuf,
    ) -> Self {
        let layout = cgroups.layout();
        let mut recs = BTreeMap::new();
        if let Ok(rd) = fs::read_dir(paths.state.join("containers")) {
            for e in rd.flatten() {
                match Record::load(&e.path()) {
                    Ok(r) => {
                        recs.insert(r.id.clone(), r);
                    }
                    Err(err) => {
                        tracing::warn!(dir = %e.path().display(), error = %err, "skipping an unreadable container record")
                    }
                }
            }
        }
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let hierarchies = cgroups.all_hierarchies();
        let cgroup_view = match layout {
            CgroupLayout::V1 | CgroupLayout::Hybrid => {
                let v = super::cgroupfs::View::detect(&cgroup_root, &hierarchies);
                if v.is_none() {
                    tracing::warn!(
                        "cannot read this process's cgroups; containers' /sys/fs/cgroup is left to libcontainer"
                    );
                }
                v
            }
            CgroupLayout::V2 | CgroupLayout::None => None,
        };
        let mut eng = Self {
            tenant,
            id_start,
            paths,
            cgroup_root,
            layout,
            hierarchies,
            cgroup_view,
            cgroups,
            recs,
            exits: HashMap::new(),
            events,
            execs: HashMap::new(),
            exec_seq: 0,
            ios: HashMap::new(),
            backlog: VecDeque::new(),
            seq: 0,
            durable: false,
        };
        let ids: Vec<String> = eng.recs.keys().cloned().collect();
        for id in ids {
            eng.exits.insert(id.clone(), watch::channel(false).0);
        }
        eng
    }

    /// The volume imports among `mounts` (binds whose source is `<imports>/<key>/volume`):
    /// their keys, and the container path and source of those that are one file, and of
    /// those that are a directory.
    fn volume_imports(&self, mounts: &[spec::Bind]) -> VolumeImports {
        let imports = self.paths.imports();
        let mut keys = Vec::new();
        let mut files = std::collections::BTreeMap::new();
        let mut dirs = std::collections::BTreeMap::new();
        for m in mounts
            .iter()
            .filter(|m| m.host.file_name().is_some_and(|n| n == VOLUME_IMPORT))
        {
            let Some(key) = m
                .host
                .parent()
                .filter(|d| d.parent() == Some(imports.as_path()))
                .and_then(|d| d.file_name()?.to_str())
            else {
                continue;
            };
            keys.push(key.to_string());
            if m.host.is_file() {
                files.insert(m.inside.clone(), m.host.clone());
            } else if m.host.is_dir() {
                dirs.insert(m.inside.clone(), m.host.clone());
            }
        }
        keys.sort();
        keys.dedup();
        (keys, files, dirs)
    }

    /// Brings a container's copy of a volume in kubelet's atomic-writer layout up to the
    /// content of the import `from_key`, as kubelet's atomic writer changes the host's (see
    /// `sync_atomic_writer`); the import then goes unless a container binds it. False when the
    /// copy had that content already.
    pub fn sync_volume(
        &self,
        key: &str,
        container_path: &str,
        from_key: &str,
    ) -> Result<bool, EngineError> {
        let id = self.resolve(key)?;
        let r = self.get(&id)?;
        if r.state == State::Exited {
            return Err(EngineError::State(format!(
                "container {:?} has exited; its volumes are not updated",
                r.name
            )));
        }
        let dst = r.volume_dirs.get(container_path).ok_or_else(|| {
            EngineError::NotFound(format!(
                "{container_path} in container {:?} (not a directory volume copied into the guest)",
                r.name
            ))
        })?;
        let src = self.paths.imports().join(from_key).join(VOLUME_IMPORT);
        if !src.is_dir() {
            return Err(EngineError::NotFound(format!(
                "import {from_key}: no volume directory to bring in (send it first)"
            )));
        }
        let changed = sync_atomic_writer(&src, dst)
            .map_err(|e| EngineError::Runtime(format!("updating {container_path}: {e}")));
        self.collect_volume_imports(Some(&[from_key.to_string()]));
        changed
    }

    /// The start of what a container wrote into a volume that is one file copied into this
    /// guest (see [`VOLUME_IMPORT`]), at most `max` bytes.
    pub fn read_volume_file(
        &self,
        key: &str,
        container_path: &str,
        max: usize,
    ) -> Result<Vec<u8>, EngineError> {
        use std::{io::Read, os::unix::fs::OpenOptionsExt};
        let id = self.resolve(key)?;
        let r = self.get(&id)?;
        let src = r.volume_files.get(container_path).ok_or_else(|| {
            EngineError::NotFound(format!(
                "{container_path} in container {:?} (not a one-file volume copied into the guest)",
                r.name
            ))
        })?;
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
            .map_err(|e| EngineError::Runtime(format!("{}: {e}", src.display())))?;
        let mut data = Vec::new();
        f.take(max as u64)
            .read_to_end(&mut data)
            .map_err(|e| EngineError::Runtime(format!("{}: {e}", src.display())))?;
        Ok(data)
    }

    /// Removes the volume imports in `keys` that no container binds any more, or with `None`,
    /// every volume import no container binds (at start: what a crash between a container's
    /// removal and this left behind).
    pub fn collect_volume_imports(&self, keys: Option<&[String]>) {
        let used: std::collections::HashSet<&str> = self
            .recs
            .values()
            .flat_map(|r| r.volume_imports.iter().map(String::as_str))
            .collect();
        let imports = self.paths.imports();
        let candidates: Vec<String> = match keys {
            Some(k) => k.to_vec(),
            None => fs::read_dir(&imports)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().join(VOLUME_IMPORT).symlink_metadata().is_ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect(),
        };
        for k in candidates.iter().filter(|k| !used.contains(k.as_str())) {
            let dir = imports.join(k);
            match fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::debug!(import = %k, "volume import removed: no container binds it")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing a volume import failed");
                }
            }
        }
    }

    /// Re-adopts the containers a previous engine left running: those whose process is gone are
    /// marked exited. Call after [`Engine::check_boot`].
    pub fn adopt(&mut self) {
        let ids: Vec<String> = self.recs.keys().cloned().collect();
        for id in ids {
            self.check_adopted(&id);
        }
    }

    /// Records survive a crash of the machine (a VM's guest): each is on disk when saved. On a
    /// host, an engine crash keeps the page cache, so records are written without waiting.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Containers recorded as running under an earlier boot of the machine (its boot id, kept in
    /// `<state>/boot_id`, differs) died with it: their pids mean nothing now, so they are marked
    /// exited with `message`, whatever runs under those pids today.
    pub fn check_boot(&mut self, message: &str) {
        let now = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let file = self.paths.state.join("boot_id");
        let before = fs::read_to_string(&file).ok();
        if before.as_deref().is_some_and(|b| b != now) {
            let ids: Vec<String> = self
                .recs
                .values()
                .filter(|r| r.state != State::Exited)
                .map(|r| r.id.clone())
                .collect();
            for id in ids {
                self.mark_exited(&id, -1, message);
            }
        }
        if before.as_deref() != Some(now.as_str())
            && let Err(e) = crate::fsutil::write_atomic(&file, now.as_bytes(), 0o600)
        {
            tracing::warn!(file = %file.display(), error = %e, "recording the boot id failed");
        }
    }

    /// A re-adopted container is not our child: if its pid is gone, it exited while no engine
    /// watched, and its exit code is lost.
    pub fn check_adopted(&mut self, id: &str) {
        let Some(r) = self.recs.get(id) else { return };
        if r.state == State::Exited || r.pid == 0 {
            return;
        }
        let alive = nix::sys::signal::kill(Pid::from_raw(r.pid as i32), None).is_ok()
            && fs::read_to_string(format!("/proc/{}/stat", r.pid))
                .is_ok_and(|s| !s.contains(") Z "));
        if !alive {
            // Whatever its init left in a shared process namespace must not go on running.
            self.kill_leftovers(id);
            self.mark_exited(
                id,
                -1,
                "exited while no engine was watching; its exit code is unknown",
            );
        }
    }

    /// Ids of containers this engine watches by pid (not its children).
    pub fn adopted_running(&self) -> Vec<String> {
        self.recs
            .values()
            .filter(|r| r.state != State::Exited && r.pid != 0)
            .map(|r| r.id.clone())
            .collect()
    }

    fn cgroup(&self, id: &str) -> String {
        format!("{}/c-{id}", self.cgroups.tenant_path(&self.tenant))
    }

    fn emit(&mut self, typ: pb::ContainerEventType, id: &str) {
        let Some(r) = self.recs.get(id) else { return };
        self.seq += 1;
        let ev = pb::ContainerEvent {
            seq: self.seq,
            r#type: typ as i32,
            tenant: self.tenant.clone(),
            container_id: r.id.clone(),
            container_name: r.name.clone(),
            exit_code: r.exit_code,
            time_unix_ms: now_ms(),
        };
        if self.backlog.len() == EVENT_BACKLOG {
            self.backlog.pop_front();
        }
        self.backlog.push_back(ev.clone());
        let _ = self.events.send(ev);
    }

    /// Events after `seq`, and a receiver for what follows.
    pub fn subscribe(
        &self,
        after: u64,
    ) -> (
        Vec<pb::ContainerEvent>,
        broadcast::Receiver<pb::ContainerEvent>,
    ) {
        let rx = self.events.subscribe();
        let past = if after == 0 {
            Vec::new()
        } else {
            self.backlog
                .iter()
                .filter(|e| e.seq > after)
                .cloned()
                .collect()
        };
        (past, rx)
    }

    fn save(&self, id: &str) {
        if let Some(r) = self.recs.get(id)
            && let Err(e) = r.save(&self.paths.container(id), self.durable)
        {
            tracing::error!(container = id, error = %e, "persisting a container record failed");
        }
    }

    /// Resolves an id or a name.
    pub fn resolve(&self, key: &str) -> Result<String, EngineError> {
        if self.recs.contains_key(key) {
            return Ok(key.to_string());
        }
        self.recs
            .values()
            .find(|r| r.name == key)
            .map(|r| r.id.clone())
            .ok_or_else(|| EngineError::NotFound(key.to_string()))
    }

    /// One container.
    pub fn get(&self, key: &str) -> Result<&Record, EngineError> {
        let id = self.resolve(key)?;
        self.recs.get(&id).ok_or(EngineError::NotFound(id))
    }

    /// Changes a container's limits in its cgroup and its record.
    pub fn update(
        &mut self,
        key: &str,
        cpus: Option<f64>,
        cpu_shares: Option<u64>,
        memory_bytes: Option<u64>,
        pids: Option<u64>,
    ) -> Result<&Record, EngineError> {
        let id = self.resolve(key)?;
        let r = self
            .recs
            .get(&id)
            .ok_or(EngineError::NotFound(id.clone()))?;
        if r.state == State::Exited {
            return Err(EngineError::State(format!(
                "container {:?} has exited; its limits cannot change",
                r.name
            )));
        }
        // One limit at a time, memory first (the one the kernel may refuse); the record takes
        // each as it lands, so a failure half-way leaves record and kernel in agreement.
        let rel = self.cgroup(&id);
        // v2 takes a memory limit below what cannot be reclaimed and OOM-kills; refuse it
        // before, as v1 does itself.
        if let (Some(m), Some(anon)) = (memory_bytes, self.cgroups.anon_bytes(&rel))
            && m < anon
        {
            return Err(EngineError::State(format!(
                "the memory limit {m} is below the {anon} bytes of anonymous memory the container uses now; raise it, or lower the container's use first"
            )));
        }
        let steps = [
            (None, memory_bytes, None),
            (cpus, None, None),
            (None, None, pids),
        ];
        for (c, m, p) in steps {
            if c.is_none() && m.is_none() && p.is_none() {
                continue;
            }
            let written = self
                .cgroups
                .set_some_limits(&rel, c, m, p)
                .map_err(|e| match &e {
                    // v1 refuses a memory limit below what is in use with EBUSY.
                    crate::cgroups::CgroupError::Io { source, .. }
                        if source.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        EngineError::State(format!(
                            "the memory limit is below what the container uses now: {e}"
                        ))
                    }
                    // v1 refuses a CFS quota above the parent's with EINVAL.
                    crate::cgroups::CgroupError::Io { source, .. }
                        if source.raw_os_error() == Some(libc::EINVAL) =>
                    {
                        EngineError::State(format!(
                            "the limit is above what the tenant's quota allows: {e}"
                        ))
                    }
                    _ => EngineError::Runtime(format!("updating the limits: {e}")),
                });
            if let Err(e) = written {
                self.save(&id);
                return Err(e);
            }
            if let Some(r) = self.recs.get_mut(&id) {
                if c.is_some() {
                    r.cpus = c;
                }
                if m.is_some() {
                    r.memory_bytes = m;
                }
                if p.is_some() {
                    r.pids = p;
                }
            }
        }
        if let Some(s) = cpu_shares {
            if let Err(e) = self.cgroups.set_cpu_shares(&rel, s) {
                self.save(&id);
                return Err(EngineError::Runtime(format!(
                    "updating the CPU shares: {e}"
                )));
            }
            if let Some(r) = self.recs.get_mut(&id) {
                r.cpu_shares = Some(s);
            }
        }
        self.save(&id);
        self.recs.get(&id).ok_or(EngineError::NotFound(id))
    }

    /// A container's CPU time (µs) and memory in use, and the tenant's whole CPU time (µs), as
    /// this engine's cgroups count them.
    pub fn usage(&self, key: &str) -> Result<(u64, u64, u64), EngineError> {
        let id = self.resolve(key)?;
        let (Some(cpu), mem) = self.cgroups.usage(&self.cgroup(&id)) else {
            return Err(EngineError::State(format!(
                "container {key:?} has no cgroup (it has exited)"
            )));
        };
        let (tenant, _) = self.cgroups.usage(&self.cgroups.tenant_path(&self.tenant));
        Ok((cpu, mem.unwrap_or(0), tenant.unwrap_or(0)))
    }

    /// The engine's directories.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// All containers.
    pub fn list(&self) -> Vec<Record> {
        self.recs.values().cloned().collect()
    }

    /// The log files of a container.
    pub fn log_paths(&self, key: &str) -> Result<(PathBuf, PathBuf), EngineError> {
        let id = self.resolve(key)?;
        let d = self.paths.container(&id);
        Ok((d.join("stdout.log"), d.join("stderr.log")))
    }

    /// Creates a container (its init waits for Start).
    /// Makes (or finds) the pod process namespace `name`; returns its holder's pid.
    pub fn create_pidns(&self, name: &str) -> Result<i32, EngineError> {
        crate::validate::check_id("name", name).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let exe = std::env::current_exe()
            .map_err(|e| EngineError::Runtime(format!("the engine's own binary: {e}")))?;
        super::ns::ensure_pidns(&self.paths.ns(), name, &exe)
            .map_err(|e| EngineError::Runtime(e.to_string()))
    }

    /// Ends the pod process namespace `name`.
    pub fn delete_pidns(&self, name: &str) -> Result<(), EngineError> {
        crate::validate::check_id("name", name).map_err(|e| EngineError::Invalid(e.to_string()))?;
        super::ns::remove_pidns(&self.paths.ns(), name);
        Ok(())
    }

    /// Ends every pod process namespace of the tenant.
    pub fn delete_all_pidns(&self) {
        super::ns::remove_all_pidns(&self.paths.ns());
    }

    /// Unstages the volumes of containers this engine has no record of (it died creating them),
    /// and kills pod PID 1s it has no record of (it died starting them).
    pub fn clean_up_orphans(&self) {
        super::volumes::unstage_orphans(&self.paths.run, &|id| self.recs.contains_key(id));
        super::ns::kill_untracked_holders(&self.paths.ns());
    }

    /// Starts `cmd` as a child whose exit [`Engine::reap`] delivers on the receiver (it reaps
    /// every child, so nothing else may wait for one). Spawning and registering happen under
    /// the caller's hold of the engine: no reap comes between.
    pub fn spawn_tracked(
        &mut self,
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, tokio::sync::oneshot::Receiver<i32>)> {
        let child = cmd.spawn()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Ok(pid) = i32::try_from(child.id()) {
            self.execs.insert(pid, tx);
        }
        Ok((child, rx))
    }

    /// Unmounts and removes the pod network namespace `name`; gone is fine.
    pub fn delete_netns(&self, name: &str) -> Result<(), EngineError> {
        crate::validate::check_id("name", name).map_err(|e| EngineError::Invalid(e.to_string()))?;
        super::ns::remove_pod_netns(&self.paths.ns(), name);
        Ok(())
    }

    /// Makes (or finds) the pod network namespace `name`; returns the path that holds it.
    pub fn create_netns(&self, name: &str) -> Result<PathBuf, EngineError> {
        crate::validate::check_id("name", name).map_err(|e| EngineError::Invalid(e.to_string()))?;
        super::ns::ensure_pod_netns(&self.paths.ns(), name)
            .map_err(|e| EngineError::Runtime(e.to_string()))
    }

    pub fn create(&mut self, c: CreateSpec) -> Result<Record, EngineError> {
        if self.recs.values().any(|r| r.name == c.name) {
            return Err(EngineError::NameTaken(c.name));
        }
        if self.recs.contains_key(&c.id) {
            return Err(EngineError::NameTaken(c.id));
        }
        if c.max_containers > 0
            && self.recs.len() >= usize::try_from(c.max_containers).unwrap_or(usize::MAX)
        {
            return Err(EngineError::Quota(c.max_containers));
        }
        let t0 = Instant::now();
        let lowers = if c.lower_dirs.is_empty() {
            vec![
                rootfs::prepare_image(&self.paths.images(), &c.rootfs, self.id_start).map_err(
                    |e| match e {
                        rootfs::RootfsError::Missing(_) | rootfs::RootfsError::Image(_) => {
                            EngineError::Invalid(e.to_string())
                        }
                        other => EngineError::Runtime(other.to_string()),
                    },
                )?,
            ]
        } else {
            c.lower_dirs.clone()
        };
        if c.command.is_empty() {
            return Err(EngineError::Invalid("command: must not be empty".into()));
        }
        for (field, paths) in [
            ("masked_paths", &c.masked_paths),
            ("readonly_paths", &c.readonly_paths),
        ] {
            if let Some((i, p)) = paths.iter().enumerate().find(|(_, p)| {
                let p = Path::new(p);
                !p.is_absolute()
                    || p == Path::new("/")
                    || p.components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
            }) {
                return Err(EngineError::Invalid(format!(
                    "{field}[{i}]: {p:?} must be an absolute path other than /, without `..`"
                )));
            }
        }
        for (k, v) in &c.sysctls {
            spec::check_sysctl(k, v, !c.netns.is_empty())
                .map_err(|e| EngineError::Invalid(format!("sysctls: {e}")))?;
        }
        if !c.pidns.is_empty() {
            crate::validate::check_id("pidns", &c.pidns)
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
            if super::ns::pidns_holder(&self.paths.ns(), &c.pidns).is_none() {
                return Err(EngineError::State(format!(
                    "pidns: the pod's process namespace {:?} is gone (its PID 1 ended, or its pod stopped)",
                    c.pidns
                )));
            }
        }
        let pid_target = if c.pid_target.is_empty() {
            None
        } else {
            if !c.pidns.is_empty() {
                return Err(EngineError::Invalid(
                    "pid_target and pidns: a container joins one process namespace, not two".into(),
                ));
            }
            Some(self.pid_target(&c.pid_target)?)
        };
        if !c.netns.is_empty() {
            crate::validate::check_id("netns", &c.netns)
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
            if !super::ns::is_ns(&super::ns::pod_netns_path(&self.paths.ns(), &c.netns)) {
                return Err(EngineError::State(format!(
                    "netns: the pod network namespace {:?} does not exist (it goes when its pod stops)",
                    c.netns
                )));
            }
        }
        let dir = self.paths.container(&c.id);
        fs::create_dir_all(&dir)
            .map_err(|e| EngineError::Runtime(format!("{}: {e}", dir.display())))?;
        let t_image = t0.elapsed();
        if let Some(g) = c.supplemental_groups.iter().find(|g| **g > 65_535) {
            return Err(EngineError::Invalid(format!(
                "supplemental_groups: {g} is outside the tenant's ids (0..=65535)"
            )));
        }
        if let Some(v) = c.oom_score_adj
            && !(-1000..=1000).contains(&v)
        {
            return Err(EngineError::Invalid(format!(
                "oom_score_adj: {v} is outside -1000..=1000"
            )));
        }
        if let Some((i, _)) = c
            .mounts
            .iter()
            .enumerate()
            .find(|(_, m)| !m.image_layers.is_empty() && !m.readonly)
        {
            return Err(EngineError::Invalid(format!(
                "mounts[{i}]: an image volume is read-only (set readonly)"
            )));
        }
        if let Some((i, m)) = c.mounts.iter().enumerate().find(|(_, m)| {
            if m.image_layers.is_empty() {
                !m.host.exists()
            } else {
                m.image_layers.iter().any(|l| !l.is_dir())
            }
        }) {
            if !m.image_layers.is_empty() {
                return Err(EngineError::State(format!(
                    "mounts[{i}]: a layer of the image volume is no longer in the tenant's image store (the image was removed); pull it again"
                )));
            }
            return Err(EngineError::Invalid(format!(
                "mounts[{i}]: host path {} does not exist on this node",
                m.host.display()
            )));
        }
        if let Some((i, _)) = c
            .mounts
            .iter()
            .enumerate()
            .find(|(_, m)| m.recursive_read_only && !m.readonly)
        {
            return Err(EngineError::Invalid(format!(
                "mounts[{i}]: recursive_read_only needs readonly"
            )));
        }
        let (volume_imports, volume_files, volume_dirs) = self.volume_imports(&c.mounts);
        // Volumes are bound where the tenant's root can reach them, then bound in from there.
        let staged = super::volumes::stage(
            &self.paths.run,
            &c.id,
            self.id_start,
            &self.paths.ns().join("user"),
            &c.mounts,
        )
        .map_err(EngineError::Runtime)?;
        let mut c = c;
        c.mounts = staged;
        let t_staged = t0.elapsed();
        // A target that ended while this container was made fails its build too: that is the
        // target's state, not an error of the engine's.
        let target_gone = |t: &(PathBuf, (u64, u64))| {
            (ns_id(&t.0.to_string_lossy()).as_ref() != Some(&t.1)).then(|| {
                EngineError::State(format!(
                    "pid_target: container {:?} ended while this container was made; its process namespace is gone",
                    c.pid_target
                ))
            })
        };
        let result = self
            .build(&c, &lowers, &dir, pid_target.as_ref().map(|t| t.0.as_path()))
            .map_err(|e| pid_target.as_ref().and_then(target_gone).unwrap_or(e))
            .and_then(|(pid, phases, io, user)| {
                // The target's pid could have been reused between the check and the join: the
                // new container must be in the namespace that was checked, or it goes.
                match &pid_target {
                    Some((_, want)) if ns_id(&format!("/proc/{pid}/ns/pid")).as_ref() != Some(want) => {
                        Err(EngineError::State(format!(
                            "pid_target: container {:?} ended while this container was made; its process namespace is gone",
                            c.pid_target
                        )))
                    }
                    _ => Ok((pid, phases, io, user)),
                }
            });
        match result {
            Ok((pid, phases, io, user)) => {
                if let Some(io) = io {
                    self.ios.insert(c.id.clone(), io);
                }
                if let Some(v) = c.oom_score_adj {
                    set_oom_score_adj(&c.id, pid, v);
                }
                let mut r = Record::new(c.id.clone(), c.name, c.image, c.command);
                r.cpus = c.cpus;
                r.volume_imports = volume_imports;
                r.user = Some(user);
                r.volume_files = volume_files;
                r.volume_dirs = volume_dirs;
                r.cpu_shares = c.cpu_shares;
                r.memory_bytes = c.memory_bytes;
                r.pids = c.pids;
                r.labels = c.labels;
                r.pid = pid;
                r.oom_score_adj = c.oom_score_adj;
                r.stdin = c.stdin;
                r.tty = c.tty;
                self.recs.insert(c.id.clone(), r.clone());
                self.exits.insert(c.id.clone(), watch::channel(false).0);
                self.save(&c.id);
                self.emit(pb::ContainerEventType::Created, &c.id);
                tracing::debug!(
                    container = %c.id,
                    image_us = micros(t_image),
                    checks_us = micros(t_staged.saturating_sub(t_image)),
                    rootfs_us = micros(phases.rootfs),
                    spec_us = micros(phases.spec),
                    view_us = micros(phases.view),
                    runtime_us = micros(phases.runtime),
                    total_us = micros(t0.elapsed()),
                    "container created"
                );
                Ok(r)
            }
            Err(e) => {
                super::volumes::unstage(&self.paths.run, &c.id);
                let mp = self.paths.mountpoint(&c.id);
                rootfs::unmount(&mp);
                let _ = fs::remove_dir(&mp);
                if let Ok(mut ct) = Container::load(self.paths.youki().join(&c.id)) {
                    let _ = ct.delete(true);
                }
                if let Some(v) = &self.cgroup_view {
                    v.remove_cgroups(&self.cgroup(&c.id));
                }
                let _ = fs::remove_dir_all(&dir);
                let _ = fs::remove_file(self.paths.run.join(format!("resolv-{}.conf", c.id)));
                self.collect_volume_imports(Some(&volume_imports));
                Err(e)
            }
        }
    }

    /// The process namespace of a running container of this engine, for another to join: its
    /// path through the container's init and the namespace's (device, inode), which the joiner
    /// is checked against once made.
    fn pid_target(&self, key: &str) -> Result<(PathBuf, (u64, u64)), EngineError> {
        let r = self.get(key).map_err(|_| {
            EngineError::NotFound(format!(
                "pid_target: no container {key:?} in this tenant's engine"
            ))
        })?;
        if r.state != State::Running || r.pid == 0 {
            return Err(EngineError::State(format!(
                "pid_target: container {key:?} is {}; only a running container's process namespace can be joined",
                format!("{:?}", r.state).to_lowercase()
            )));
        }
        let path = PathBuf::from(format!("/proc/{}/ns/pid", r.pid));
        let id = ns_id(&path.to_string_lossy()).ok_or_else(|| {
            EngineError::State(format!(
                "pid_target: container {key:?} ended (its init {} is gone)",
                r.pid
            ))
        })?;
        Ok((path, id))
    }

    fn build(
        &mut self,
        c: &CreateSpec,
        lowers: &[PathBuf],
        dir: &Path,
        pid_target: Option<&Path>,
    ) -> Result<(u32, BuildPhases, Option<ContainerIo>, ProcessUser), EngineError> {
        let t0 = Instant::now();
        let rt = |what: &str| {
            let what = what.to_string();
            move |e: &dyn std::fmt::Display| EngineError::Runtime(format!("{what}: {e}"))
        };
        let root = self.paths.mountpoint(&c.id);
        rootfs::mount_overlay(lowers, &dir.join("layer"), &root, self.id_start)
            .map_err(|e| rt("rootfs")(&e))?;
        // Looked up in the merged view, as the container will see it.
        if let Some(argv0) = c.command.first() {
            rootfs::find_command(&root, argv0, &c.env)
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
        }
        let (uid, gid) = rootfs::resolve_user(&root, &c.user)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let mut groups = c.supplemental_groups.clone();
        if c.merge_image_groups {
            for g in rootfs::image_groups(&root, uid) {
                if g != gid && !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
        let rootfs_done = t0.elapsed();
        let cgroup = self.cgroup(&c.id);
        let resolv = if c.resolv_conf.is_empty() {
            self.paths.run.join("resolv.conf")
        } else {
            // In the run dir, which the tenant's root may traverse (the state dir it may not).
            let own = self.paths.run.join(format!("resolv-{}.conf", c.id));
            fs::write(&own, &c.resolv_conf).map_err(|e| rt("resolv.conf")(&e))?;
            own
        };
        // The pod's process namespace, by its bind mount (its holder checked in `create`).
        let pidns = (!c.pidns.is_empty())
            .then(|| super::ns::pidns_path(&self.paths.ns(), &c.pidns))
            .or_else(|| pid_target.map(Path::to_path_buf));
        // Made just before libcontainer runs (below), released right after.
        let cgroup_view = self
            .cgroup_view
            .as_ref()
            .map(|_| super::volumes::dir(&self.paths.run, &c.id).join("cgroup"));
        let spec = spec::build(&spec::ContainerSpec {
            cgroup_view: cgroup_view.as_deref(),
            resolv_conf: resolv.exists().then_some(resolv.as_path()),
            cap_drop: &c.cap_drop,
            cap_add: &c.cap_add,
            mounts: &c.mounts,
            readonly_rootfs: c.readonly_rootfs,
            no_new_privileges: !c.allow_privilege_escalation,
            unconfined: c.unconfined,
            supplemental_groups: &groups,
            tty: c.tty,
            rootfs: &root,
            command: &c.command,
            env: &c.env,
            workdir: &c.workdir,
            ns_dir: &self.paths.ns(),
            netns: (!c.netns.is_empty())
                .then(|| super::ns::pod_netns_path(&self.paths.ns(), &c.netns))
                .as_deref(),
            cgroup: &cgroup,
            masked_paths: &c.masked_paths,
            readonly_paths: &c.readonly_paths,
            sysctls: &c.sysctls,
            seccomp: (!c.seccomp.is_empty()).then_some(c.seccomp.as_str()),
            pidns: pidns.as_deref(),
            cpus: c.cpus,
            cpu_shares: c.cpu_shares,
            memory_bytes: c.memory_bytes,
            pids: c.pids,
            hostname: if c.hostname.is_empty() {
                &c.name
            } else {
                &c.hostname
            },
            uid,
            gid,
        })
        .map_err(|e| match e {
            spec::SpecError::Oci(_) => rt("spec")(&e),
            _ => EngineError::Invalid(e.to_string()),
        })?;
        let bundle = dir.join("bundle");
        fs::create_dir_all(&bundle).map_err(|e| rt("bundle")(&e))?;
        spec.save(bundle.join("config.json"))
            .map_err(|e| rt("bundle")(&e))?;
        let open = |name: &str| -> Result<OwnedFd, EngineError> {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .map(OwnedFd::from)
                .map_err(|e| rt("log file")(&e))
        };
        let spec_done = t0.elapsed();
        let mut builder = ContainerBuilder::new(c.id.clone(), SyscallType::default())
            .with_executor(WorkloadExecutor {
                seccomp: None,
                reset_signals: spec::signal_calls_allowed(
                    spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()),
                ),
            })
            .validate_id()
            .map_err(|e| rt("container id")(&e))?
            .with_root_path(self.paths.youki())
            .map_err(|e| rt("state dir")(&e))?;
        // Stdin: /dev/null, or a pipe whose write end the engine keeps for attaches; a terminal
        // is made by libcontainer inside the container and its master sent back here.
        let mut stdin_w = None;
        let mut console = None;
        if c.tty {
            let (listener, sock) =
                console_socket(&format!("tty-{}", c.id)).map_err(|e| rt("console socket")(&e))?;
            builder = builder.with_console_socket(Some(sock.0.join("tty.sock")));
            console = Some((listener, sock));
        } else {
            let stdin: OwnedFd = if c.stdin {
                let (r, w) = nix::unistd::pipe().map_err(|e| rt("pipe")(&e))?;
                stdin_w = Some(w);
                r
            } else {
                fs::File::open("/dev/null")
                    .map(OwnedFd::from)
                    .map_err(|e| rt("/dev/null")(&e))?
            };
            builder = builder
                .with_stdin(stdin)
                .with_stdout(open("stdout.log")?)
                .with_stderr(open("stderr.log")?);
        }
        if let (Some(v), Some(at)) = (&self.cgroup_view, &cgroup_view) {
            super::volumes::base(&self.paths.run, &c.id, self.id_start)
                .map_err(EngineError::Runtime)?;
            v.stage(at, &cgroup).map_err(EngineError::Runtime)?;
        }
        let view_done = t0.elapsed();
        let built = builder
            .as_init(&bundle)
            .with_systemd(false)
            .with_detach(true)
            .build();
        if let Some(at) = &cgroup_view {
            super::cgroupfs::release(at);
        }
        let container = built.map_err(|e| rt("creating the container")(&e))?;
        let io = match (console, stdin_w) {
            (Some((listener, _dir)), _) => {
                let master =
                    receive_terminal(&listener).map_err(|e| rt("the container's terminal")(&e))?;
                let master = std::sync::Arc::new(
                    super::fdio::FdIo::new(master)
                        .map_err(|e| rt("the container's terminal")(&e))?,
                );
                // Its output, stdout and stderr together, goes to stdout.log as it comes.
                let log = open("stdout.log")?;
                tokio::spawn(copy_terminal(master.clone(), fs::File::from(log)));
                Some(ContainerIo {
                    stdin: None,
                    tty: Some(master),
                    stdin_once: false,
                })
            }
            (None, Some(w)) => Some(ContainerIo {
                stdin: Some(std::sync::Arc::new(tokio::sync::Mutex::new(Some(
                    super::fdio::FdIo::new(w).map_err(|e| rt("stdin")(&e))?,
                )))),
                tty: None,
                stdin_once: c.stdin_once,
            }),
            (None, None) => None,
        };
        // libcontainer leaves the process non-dumpable; the engine's /proc should stay readable.
        let _ = nix::sys::prctl::set_dumpable(true);
        let pid = container
            .pid()
            .ok_or_else(|| EngineError::Runtime("the container has no pid".into()))?;
        let pid =
            u32::try_from(pid.as_raw()).map_err(|_| EngineError::Runtime("bad pid".into()))?;
        let phases = BuildPhases {
            rootfs: rootfs_done,
            spec: spec_done.saturating_sub(rootfs_done),
            view: view_done.saturating_sub(spec_done),
            runtime: t0.elapsed().saturating_sub(view_done),
        };
        Ok((pid, phases, io, (uid, gid, groups)))
    }

    /// Lets a created container's init exec its command.
    pub fn start(&mut self, key: &str) -> Result<Record, EngineError> {
        let id = self.resolve(key)?;
        let state = self.recs.get(&id).map(|r| r.state);
        if state != Some(State::Created) {
            return Err(EngineError::State(format!(
                "container {key:?} is {}, only a created container can start",
                state
                    .map(|s| format!("{s:?}").to_lowercase())
                    .unwrap_or_default()
            )));
        }
        let t0 = Instant::now();
        let mut ct = Container::load(self.paths.youki().join(&id))
            .map_err(|e| EngineError::Runtime(format!("loading container state: {e}")))?;
        ct.start()
            .map_err(|e| EngineError::Runtime(format!("starting the container: {e}")))?;
        tracing::debug!(container = %id, runtime_us = micros(t0.elapsed()), "container started");
        if let Some(r) = self.recs.get_mut(&id) {
            // The init may already have exited and been reaped between start and here.
            if r.state == State::Created {
                r.state = State::Running;
            }
            r.started_ms = now_ms();
        }
        self.save(&id);
        self.emit(pb::ContainerEventType::Started, &id);
        self.get(&id).cloned()
    }

    /// Sends `sig` to the container's init.
    pub fn signal(&mut self, key: &str, sig: Signal) -> Result<Record, EngineError> {
        let id = self.resolve(key)?;
        let r = self
            .recs
            .get(&id)
            .ok_or(EngineError::NotFound(id.clone()))?;
        if r.state == State::Exited {
            return Err(EngineError::State(format!(
                "container {key:?} is not running"
            )));
        }
        nix::sys::signal::kill(Pid::from_raw(r.pid as i32), sig)
            .map_err(|e| EngineError::Runtime(format!("signalling the container: {e}")))?;
        Ok(r.clone())
    }

    /// Runs a process inside a running container, as the container's own process runs (its
    /// user, groups, capabilities, no-new-privileges, environment as the base of `env`), wired
    /// as `io` asks. Returns the caller's ends of its stdio, a receiver for its exit code
    /// (delivered by [`Engine::reap`]) and its pid.
    pub fn exec(
        &mut self,
        key: &str,
        args: Vec<String>,
        env: &[String],
        workdir: &str,
        io: ExecIo,
    ) -> Result<(ExecStdio, tokio::sync::oneshot::Receiver<i32>, i32), EngineError> {
        let (id, _) = self.running(key)?;
        if args.is_empty() {
            return Err(EngineError::Invalid("command: must not be empty".into()));
        }
        if !workdir.is_empty() && !workdir.starts_with('/') {
            return Err(EngineError::Invalid(format!(
                "workdir {workdir:?}: must be an absolute path"
            )));
        }
        let dir = self.paths.container(&id);
        let rt =
            |what: &'static str| move |e: nix::Error| EngineError::Runtime(format!("{what}: {e}"));
        let io_rt = |what: &'static str| {
            move |e: std::io::Error| EngineError::Runtime(format!("{what}: {e}"))
        };
        // The container's process as its spec has it, with this command.
        let spec = oci_spec::runtime::Spec::load(dir.join("bundle").join("config.json"))
            .map_err(|e| EngineError::Runtime(format!("the container's spec: {e}")))?;
        let mut process = spec.process().clone().unwrap_or_default();
        let mut envs: Vec<String> = process.env().clone().unwrap_or_default();
        for e in env {
            let Some((k, _)) = e.split_once('=') else {
                return Err(EngineError::Invalid(format!(
                    "env {e:?}: must be KEY=VALUE"
                )));
            };
            envs.retain(|old| old.split_once('=').is_none_or(|(ok, _)| ok != k));
            envs.push(e.clone());
        }
        if !envs.iter().any(|e| e.starts_with("PATH=")) {
            envs.push(format!("PATH={}", rootfs::DEFAULT_PATH));
        }
        process.set_args(Some(args)).set_env(Some(envs));
        if !workdir.is_empty() {
            process.set_cwd(PathBuf::from(workdir));
        }
        process.set_terminal(Some(io.tty.is_some()));
        if let Some((w, h)) = io.tty {
            let size = oci_spec::runtime::BoxBuilder::default()
                .width(u64::from(w))
                .height(u64::from(h))
                .build()
                .map_err(|e| EngineError::Runtime(format!("console size: {e}")))?;
            process.set_console_size(Some(size));
        }
        self.exec_seq += 1;
        let tag = format!("exec-{}-{}", std::process::id(), self.exec_seq);
        let process_file = dir.join(format!("{tag}.json"));
        fs::write(
            &process_file,
            serde_json::to_vec(&process).map_err(|e| EngineError::Runtime(e.to_string()))?,
        )
        .map_err(io_rt("writing the exec's process.json"))?;
        let _cleanup = RemoveOnDrop(vec![process_file.clone()]);
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
            .with_executor(WorkloadExecutor {
                seccomp,
                reset_signals: true,
            })
            .with_root_path(self.paths.youki())
            .map_err(|e| EngineError::Runtime(format!("state dir: {e}")))?;
        let (builder, stdio, console) = if io.tty.is_some() {
            // libcontainer makes the terminal inside the container and sends its master over
            // this socket. It lives in a private directory of its own under /tmp: a socket
            // path holds at most 107 bytes, which the state dir of a long tenant name exceeds,
            // and nobody else may connect to it first.
            let (listener, private) = console_socket(&tag).map_err(io_rt("console socket"))?;
            (
                builder.with_console_socket(Some(private.0.join("tty.sock"))),
                None,
                Some((listener, private)),
            )
        } else {
            let (out_r, out_w) = nix::unistd::pipe().map_err(rt("pipe"))?;
            let (err_r, err_w) = nix::unistd::pipe().map_err(rt("pipe"))?;
            let (stdin_w, stdin_r): (Option<OwnedFd>, OwnedFd) = if io.stdin {
                let (r, w) = nix::unistd::pipe().map_err(rt("pipe"))?;
                (Some(w), r)
            } else {
                let null = fs::File::open("/dev/null")
                    .map(OwnedFd::from)
                    .map_err(io_rt("/dev/null"))?;
                (None, null)
            };
            (
                builder
                    .with_stdin(stdin_r)
                    .with_stdout(out_w)
                    .with_stderr(err_w),
                Some(ExecStdio::Pipes {
                    stdin: stdin_w,
                    stdout: out_r,
                    stderr: err_r,
                }),
                None,
            )
        };
        let built = build_in_userns(&self.paths.ns().join("user"), move || {
            builder
                .as_tenant()
                .with_process(Some(&process_file))
                .with_detach(true)
                .build()
                .map_err(|e| e.to_string())
        });
        if console.is_some() {
            // libcontainer 0.7 leaves its link to the console socket in the container's dir.
            remove_tty_links(&self.paths.youki().join(&id));
        }
        let pid = built.map_err(|e| EngineError::Runtime(format!("exec: {e}")))?;
        let _ = nix::sys::prctl::set_dumpable(true);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.execs.insert(pid.as_raw(), tx);
        let stdio = match (stdio, console) {
            (Some(s), _) => s,
            (None, Some((listener, _sock))) => match receive_terminal(&listener) {
                Ok(master) => ExecStdio::Tty(master),
                Err(e) => {
                    self.kill_exec(pid.as_raw());
                    return Err(EngineError::Runtime(format!(
                        "receiving the exec's terminal: {e}"
                    )));
                }
            },
            (None, None) => unreachable!("either pipes or a console socket"),
        };
        // An exec'd process (a probe) gets the container's OOM score, not the engine's.
        if let Some(v) = self.recs.get(&id).and_then(|r| r.oom_score_adj)
            && let Ok(p) = u32::try_from(pid.as_raw())
        {
            set_oom_score_adj(&id, p, v);
        }
        Ok((stdio, rx, pid.as_raw()))
    }

    /// The id and record of a running container.
    fn running(&self, key: &str) -> Result<(String, &Record), EngineError> {
        let id = self.resolve(key)?;
        let r = self
            .recs
            .get(&id)
            .ok_or(EngineError::NotFound(id.clone()))?;
        if r.state != State::Running {
            return Err(EngineError::State(format!(
                "container {key:?} is not running"
            )));
        }
        Ok((id, r))
    }

    /// What an attach to a running container's init needs: its id, the stdin and terminal the
    /// engine holds for it (as asked: stdin only for a container made with stdin, a terminal
    /// only for one made with a terminal), and its log files.
    pub fn attach_io(&self, key: &str, stdin: bool, tty: bool) -> Result<AttachIo, EngineError> {
        let (id, r) = self.running(key)?;
        let io = self.ios.get(&id);
        // A terminal container's output may be taken without a terminal (kubectl attach
        // without -i), as its stdout; a terminal attach needs the terminal.
        let terminal = match (tty, r.tty) {
            (false, _) => None,
            (true, false) => {
                return Err(EngineError::Invalid(
                    "tty: the container was created without a terminal (config.tty); attach without tty".into(),
                ));
            }
            (true, true) => Some(io.and_then(|io| io.tty.clone()).ok_or_else(|| {
                EngineError::State(
                    "the container's terminal was lost when its tenant engine restarted".into(),
                )
            })?),
        };
        let input = if !stdin {
            AttachInput::None
        } else if !r.stdin {
            return Err(EngineError::Invalid(
                "stdin: the container was created without stdin (config.stdin); attach without it"
                    .into(),
            ));
        } else if r.tty {
            AttachInput::Tty(io.and_then(|io| io.tty.clone()).ok_or_else(|| {
                EngineError::State(
                    "the container's terminal was lost when its tenant engine restarted".into(),
                )
            })?)
        } else {
            AttachInput::Pipe(io.and_then(|io| io.stdin.clone()).ok_or_else(|| {
                EngineError::State(
                    "the container's stdin is closed (stdin_once, or its tenant engine restarted)"
                        .into(),
                )
            })?)
        };
        let (out, err) = self.log_paths(&id)?;
        Ok(AttachIo {
            input,
            tty: terminal,
            stdin_once: io.is_some_and(|io| io.stdin_once),
            stdout_log: out,
            stderr_log: err,
            id,
        })
    }

    /// Copies what a terminal still holds after its container ended into the stdout file:
    /// until it reads as ended (the kernel may hand the last output over a moment late), at
    /// most 200 ms. The pump task never holds data across an await, and this thread is the
    /// only one, so the order of the output is kept.
    fn drain_terminal(&self, id: &str, master: &super::fdio::FdIo) {
        use std::io::Write as _;
        let Ok((out, _)) = self.log_paths(id) else {
            return;
        };
        let mut log = fs::OpenOptions::new().append(true).open(out).ok();
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match master.read_now(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if let Some(l) = &mut log {
                        let _ = l.write_all(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
    }

    /// Forgets a container's stdin pipe (stdin_once: its first attach's stdin ended; the
    /// attach closed the pipe itself).
    pub fn forget_stdin(&mut self, id: &str) {
        if let Some(io) = self.ios.get_mut(id) {
            io.stdin = None;
        }
    }

    /// Kills an exec process whose caller went away. Only one not reaped yet: its pid is still
    /// the engine's child, so it cannot have been reused.
    pub fn kill_exec(&mut self, pid: i32) {
        if self.execs.contains_key(&pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// A receiver that turns true once the container has exited.
    pub fn exit_watch(&self, key: &str) -> Result<(String, watch::Receiver<bool>), EngineError> {
        let id = self.resolve(key)?;
        let rx = self
            .exits
            .get(&id)
            .map(watch::Sender::subscribe)
            .ok_or(EngineError::NotFound(id.clone()))?;
        Ok((id, rx))
    }

    /// Removes an exited container (the caller killed and waited for a running one).
    pub fn remove(&mut self, id: &str) -> Result<(), EngineError> {
        let r = self.recs.get(id).ok_or(EngineError::NotFound(id.into()))?;
        if r.state != State::Exited {
            return Err(EngineError::State(format!(
                "container {:?} is running; stop it first or delete with force",
                r.name
            )));
        }
        let t0 = Instant::now();
        if !self.remove_runtime_state(id) {
            match Container::load(self.paths.youki().join(id)) {
                Ok(mut ct) => {
                    if let Err(e) = ct.delete(true) {
                        tracing::warn!(container = id, error = %e, "libcontainer delete failed");
                    }
                }
                Err(e) => {
                    tracing::debug!(container = id, error = %e, "no runtime state to delete")
                }
            }
        }
        let runtime_done = t0.elapsed();
        let dir = self.paths.container(id);
        let mp = self.paths.mountpoint(id);
        rootfs::unmount(&mp);
        let _ = fs::remove_dir(&mp);
        super::volumes::unstage(&self.paths.run, id);
        let _ = fs::remove_file(self.paths.run.join(format!("resolv-{id}.conf")));
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "removing the container dir failed");
        }
        tracing::debug!(
            container = id,
            runtime_us = micros(runtime_done),
            files_us = micros(t0.elapsed().saturating_sub(runtime_done)),
            "container removed"
        );
        self.emit(pb::ContainerEventType::Deleted, id);
        let gone = self.recs.remove(id);
        self.exits.remove(id);
        if let Some(r) = gone.filter(|r| !r.volume_imports.is_empty()) {
            self.collect_volume_imports(Some(&r.volume_imports));
        }
        Ok(())
    }

    /// Removes an exited container's cgroup (a directory in each hierarchy) and the runtime's
    /// state dir directly. libcontainer's delete does the same for a stopped container, but
    /// first re-reads its state and parses mountinfo to find the hierarchies, on every call.
    /// False when a cgroup is still busy (tasks of the container still exiting): the caller
    /// then goes through libcontainer, which retries.
    fn remove_runtime_state(&self, id: &str) -> bool {
        let rel = self.cgroup(id);
        let rel = rel.trim_start_matches('/');
        for h in &self.hierarchies {
            match fs::remove_dir(h.join(rel)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::debug!(container = id, hierarchy = %h.display(), error = %e, "cgroup not removed directly");
                    return false;
                }
            }
        }
        match fs::remove_dir_all(self.paths.youki().join(id)) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::debug!(container = id, error = %e, "runtime state not removed directly");
                false
            }
        }
    }

    /// Reaps every exited child; records the containers among them.
    pub fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.on_exit(pid, code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.on_exit(pid, 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, code: i32) {
        if let Some(tx) = self.execs.remove(&pid.as_raw()) {
            let _ = tx.send(code);
            return;
        }
        let Some(id) = self
            .recs
            .values()
            .find(|r| r.pid == pid.as_raw() as u32 && r.state != State::Exited)
            .map(|r| r.id.clone())
        else {
            return;
        };
        self.kill_leftovers(&id);
        self.mark_exited(&id, code, "");
    }

    /// Kills what is left in an exited container's cgroup. A container with a process
    /// namespace of its own has nothing left (its init's exit ended the namespace); one in a
    /// pod's shared namespace may (its init's children go to the pod's PID 1), and a container
    /// that exited must not go on running.
    ///
    /// Nothing may escape by forking meanwhile: on cgroup v2 the kernel kills the whole cgroup
    /// (`cgroup.kill`); on v1 the cgroup is frozen first, signalled, then thawed, and without a
    /// freezer the listing and killing repeat until no new process shows up.
    fn kill_leftovers(&self, id: &str) {
        let rel = self.cgroup(id);
        let rel = rel.trim_start_matches('/');
        let dirs: Vec<PathBuf> = self
            .hierarchies
            .iter()
            .map(|h| h.join(rel))
            .filter(|d| d.join("cgroup.procs").exists())
            .collect();
        let procs = |d: &Path| -> Vec<i32> {
            fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        };
        let Some(first) = dirs.first() else { return };
        if procs(first).is_empty() {
            return;
        }
        if let Some(d) = dirs.iter().find(|d| d.join("cgroup.kill").exists())
            && fs::write(d.join("cgroup.kill"), "1").is_ok()
        {
            return;
        }
        let freezer = dirs
            .iter()
            .find(|d| d.join("freezer.state").exists())
            .filter(|d| freeze(d));
        let mut killed = std::collections::HashSet::new();
        for _ in 0..64 {
            let new: Vec<i32> = procs(first)
                .into_iter()
                .filter(|p| !killed.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                killed.insert(pid);
            }
            // Frozen, nothing forked since the listing: one pass got them all.
            if freezer.is_some() {
                break;
            }
        }
        if let Some(d) = freezer {
            // Thawed, the signalled processes die. (An engine that dies before this leaves the
            // cgroup frozen; the next one finds the container exited and comes here again.)
            let thawed = (0..10).any(|_| fs::write(d.join("freezer.state"), "THAWED").is_ok());
            if !thawed {
                tracing::error!(container = %id, cgroup = %d.display(), "thawing the container's cgroup failed; its processes stay frozen");
            }
        }
        tracing::info!(container = %id, processes = killed.len(), "killed what the container's init left running");
    }

    fn mark_exited(&mut self, id: &str, code: i32, message: &str) {
        // Its stdin pipe and terminal go with it; what its terminal still holds goes to its
        // stdout file first, so that nothing following the file (an attach, logs, the CRI
        // log) ends before its last output.
        if let Some(io) = self.ios.remove(id)
            && let Some(master) = io.tty
        {
            self.drain_terminal(id, &master);
        }
        let oom = self.oom_kills(id) > 0;
        if let Some(r) = self.recs.get_mut(id) {
            r.state = State::Exited;
            r.exit_code = code;
            r.oom_killed = oom;
            r.finished_ms = now_ms();
            r.message = message.to_string();
        }
        tracing::info!(container = id, code, oom, "container exited");
        self.save(id);
        if oom {
            self.emit(pb::ContainerEventType::Oom, id);
        }
        self.emit(pb::ContainerEventType::Exited, id);
        if let Some(tx) = self.exits.get(id) {
            // send() would drop the value when nobody waits yet; later waiters must still see it.
            tx.send_replace(true);
        }
    }

    /// OOM kills in the container's memory cgroup (v1 `memory.oom_control`, v2 `memory.events`).
    fn oom_kills(&self, id: &str) -> u64 {
        let rel = self.cgroup(id);
        let rel = rel.trim_start_matches('/');
        let (file, key) = match self.layout {
            CgroupLayout::V2 => (self.cgroup_root.join(rel).join("memory.events"), "oom_kill"),
            _ => (
                self.cgroup_root
                    .join("memory")
                    .join(rel)
                    .join("memory.oom_control"),
                "oom_kill",
            ),
        };
        fs::read_to_string(file)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0)
    }
}

/// Keys of a container's volume imports, and its one-file and directory volumes by container
/// path (see [`Engine::volume_imports`]).
type VolumeImports = (
    Vec<String>,
    std::collections::BTreeMap<String, PathBuf>,
    std::collections::BTreeMap<String, PathBuf>,
);

/// kubelet's atomic writer (configMap, secret, projected and downward-API volumes): the names a
/// container sees are links through `..data`, itself a link to a timestamped directory `..<ts>`.
/// Brings `dst` (a copy in that layout that a container has bound) to the content of `src` the
/// way the atomic writer changes the host's: the new timestamped directory is copied in beside
/// the old one, `..data` is swapped to it by a rename (a reader sees the old content or the
/// new, never a mix), then names are added or removed and the old directory goes. False when
/// `dst` had `src`'s timestamped directory already.
fn sync_atomic_writer(src: &Path, dst: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::symlink;
    let data = |d: &Path| fs::read_link(d.join("..data"));
    let new = data(src).map_err(|e| {
        std::io::Error::other(format!(
            "the new content has no ..data link ({e}): not kubelet's atomic-writer layout"
        ))
    })?;
    let old = data(dst).map_err(|e| {
        std::io::Error::other(format!(
            "the copy has no ..data link ({e}): not kubelet's atomic-writer layout"
        ))
    })?;
    let plain = |p: &Path| {
        p.components().count() == 1
            && p.to_str()
                .is_some_and(|s| s.starts_with("..") && s.len() > 2 && !s.contains('/'))
    };
    if !plain(&new) {
        return Err(std::io::Error::other(format!(
            "..data links to {}, not a timestamped directory beside it",
            new.display()
        )));
    }
    if new == old {
        return Ok(false);
    }
    let tmp = dst.join(format!("..sync-{:08x}", rand::random::<u32>()));
    copy_tree(&src.join(&new), &tmp)?;
    let placed = dst.join(&new);
    if placed.exists() {
        fs::remove_dir_all(&placed)?;
    }
    fs::rename(&tmp, &placed)?;
    let link = dst.join("..data_tmp");
    let _ = fs::remove_file(&link);
    symlink(&new, &link)?;
    fs::rename(&link, dst.join("..data"))?;
    // The names: as in the new content (each a link through ..data).
    let names = |d: &Path| -> std::io::Result<std::collections::BTreeSet<std::ffi::OsString>> {
        Ok(fs::read_dir(d)?
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with(".."))
            .collect())
    };
    let (want, have) = (names(src)?, names(dst)?);
    for n in want.difference(&have) {
        symlink(fs::read_link(src.join(n))?, dst.join(n))?;
    }
    for n in have.difference(&want) {
        fs::remove_file(dst.join(n))?;
    }
    // The old content, and anything else timestamped but no longer linked.
    for e in fs::read_dir(dst)?.flatten() {
        let n = e.file_name();
        let s = n.to_string_lossy();
        if s.starts_with("..") && s != "..data" && n != new.as_os_str() && e.file_type()?.is_dir() {
            fs::remove_dir_all(e.path())?;
        }
    }
    Ok(true)
}

/// Copies the tree `src` to `dst` (which must not exist): directories, files and links, with
/// their modes and owners.
fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = fs::symlink_metadata(src)?;
    if m.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else if m.is_dir() {
        fs::create_dir(dst)?;
        for e in fs::read_dir(src)?.flatten() {
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
    } else if m.is_file() {
        fs::copy(src, dst)?;
    } else {
        return Ok(());
    }
    std::os::unix::fs::lchown(dst, Some(m.uid()), Some(m.gid()))?;
    if !m.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    Ok(())
}

/// The identity a container's process runs as: uid, gid, supplementary groups.
type ProcessUser = (u32, u32, Vec<u32>);

/// How long the steps of [`Engine::build`] took (logged at debug level).
struct BuildPhases {
    rootfs: Duration,
    spec: Duration,
    /// Staging the container's view of its cgroups (v1 hosts).
    view: Duration,
    runtime: Duration,
}

/// How an exec'd process's stdio is wired.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecIo {
    /// Keep its stdin open for the caller (otherwise /dev/null).
    pub stdin: bool,
    /// Run it on a terminal of this size (columns, rows).
    pub tty: Option<(u16, u16)>,
}

/// The caller's ends of an exec'd process's stdio.
#[derive(Debug)]
pub enum ExecStdio {
    /// Pipes: stdin's write end when it was kept open, stdout's and stderr's read ends.
    Pipes {
        /// Write end of its stdin.
        stdin: Option<OwnedFd>,
        /// Read end of its stdout.
        stdout: OwnedFd,
        /// Read end of its stderr.
        stderr: OwnedFd,
    },
    /// The master of its terminal: its input, and its output (stdout and stderr together).
    Tty(OwnedFd),
}

/// A console socket for libcontainer to send a terminal's master over, in a private directory
/// of its own under /tmp: a socket path holds at most 107 bytes, which the state dir of a long
/// tenant name exceeds, and nobody else may connect to it first. The socket is `tty.sock` in
/// the returned directory, which goes when that is dropped.
fn console_socket(
    tag: &str,
) -> std::io::Result<(std::os::unix::net::UnixListener, RemoveDirOnDrop)> {
    use std::os::unix::fs::DirBuilderExt as _;
    let private = std::env::temp_dir().join(format!("caas-{tag}"));
    let _ = fs::remove_dir_all(&private);
    fs::DirBuilder::new().mode(0o700).create(&private)?;
    let guard = RemoveDirOnDrop(private);
    let listener = std::os::unix::net::UnixListener::bind(guard.0.join("tty.sock"))?;
    Ok((listener, guard))
}

/// Copies a container's terminal output to its stdout.log until the terminal closes.
async fn copy_terminal(master: std::sync::Arc<super::fdio::FdIo>, mut log: fs::File) {
    use std::io::Write as _;
    let mut buf = vec![0u8; 32 << 10];
    let mut warned = false;
    loop {
        match master.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // A failed write (a full disk) loses output but must not stop the reading: a
                // terminal nobody reads blocks the container's writes.
                if let Err(e) = log.write_all(&buf[..n])
                    && !warned
                {
                    warned = true;
                    tracing::warn!(error = %e, "a container's terminal output could not be written to its stdout file; it is being dropped");
                }
            }
        }
    }
}

/// A directory removed (with what it holds) when this is dropped.
struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Removes the `tenant-tty-*.sock` links libcontainer makes in a container's state dir for an
/// exec on a terminal (a container's own terminal leaves a `console-socket` link, which goes
/// with the container).
fn remove_tty_links(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("tenant-tty-")
            && name.ends_with(".sock")
            && e.file_type().is_ok_and(|t| t.is_symlink())
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Files removed when this is dropped.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Accepts libcontainer's connection on the console socket and takes the terminal master it
/// sends (SCM_RIGHTS). The connection was made and the descriptor sent before `build()`
/// returned, so this does not wait for long; a bound keeps a failed init from hanging the engine.
fn receive_terminal(listener: &std::os::unix::net::UnixListener) -> std::io::Result<OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let late = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "libcontainer did not send the terminal within a second of starting the process",
        )
    };
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(1);
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(late());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| match e {
        nix::errno::Errno::EAGAIN => late(),
        e => std::io::Error::from(e),
    })?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed `fd` in this process for us; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(std::io::Error::other("no descriptor came with the message"))
}

/// Freezes a v1 freezer cgroup and waits (up to about 100 ms) until it is frozen; thaws it
/// again and says false when it does not get there.
fn freeze(dir: &Path) -> bool {
    let state = dir.join("freezer.state");
    if fs::write(&state, "FROZEN").is_err() {
        return false;
    }
    for _ in 0..100 {
        if fs::read_to_string(&state).is_ok_and(|s| s.trim() == "FROZEN") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = fs::write(&state, "THAWED");
    false
}

/// The (device, inode) of a namespace file such as `/proc/PID/ns/pid`; None when it is gone.
fn ns_id(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Record -> wire type.
pub fn to_pb(tenant: &str, r: &Record) -> pb::Container {
    pb::Container {
        id: r.id.clone(),
        tenant: tenant.to_string(),
        name: r.name.clone(),
        image: r.image.clone(),
        state: match r.state {
            State::Created => pb::ContainerState::Created,
            State::Running => pb::ContainerState::Running,
            State::Exited => pb::ContainerState::Exited,
        } as i32,
        exit_code: r.exit_code,
        oom_killed: r.oom_killed,
        pid: if r.state == State::Exited { 0 } else { r.pid },
        created_at_unix_ms: r.created_ms,
        started_at_unix_ms: r.started_ms,
        finished_at_unix_ms: r.finished_ms,
        command: r.command.clone(),
        resources: Some(pb::Resources {
            cpus: r.cpus,
            memory_bytes: r.memory_bytes,
            pids: r.pids,
            cpu_shares: r.cpu_shares,
        }),
        user: r.user.as_ref().map(|(uid, gid, groups)| pb::ProcessUser {
            uid: *uid,
            gid: *gid,
            groups: groups.clone(),
        }),
        labels: r.labels.clone(),
        ports: Vec::new(),
        message: r.message.clone(),
        vm_usage: None,
    }
}

/// Sets the OOM score adjustment of a container's init (its processes inherit it). Set on the
/// init, not through the spec: libcontainer would write it to the engine's own process, and
/// every later container would inherit it. Lowering the score needs CAP_SYS_RESOURCE, which
/// root lacks on some hosts; then the inherited score stays and a warning says so.
fn set_oom_score_adj(id: &str, pid: u32, v: i32) {
    let path = format!("/proc/{pid}/oom_score_adj");
    if let Err(e) = fs::write(&path, v.to_string()) {
        let now = fs::read_to_string(&path).unwrap_or_default();
        tracing::warn!(
            container = id,
            wanted = v,
            kept = now.trim(),
            error = %e,
            "the container's OOM score adjustment could not be set (lowering it needs CAP_SYS_RESOURCE); it keeps the inherited one"
        );
    }
}

/// The workload executor of containers and execs. Right before the exec it gives the process
/// every signal's default action and an empty signal mask, as a fresh process has: an ignored
/// signal stays ignored across exec, and the engine's are not the workload's (the Rust runtime
/// ignores SIGPIPE, so `yes | head -1` would end in EPIPE errors; an agent started from a
/// shell in the background ignores SIGINT and SIGQUIT, and a shell script cannot trap a signal
/// ignored when it started, so an image's `StopSignal: SIGQUIT` would do nothing).
///
/// For a container, libcontainer has loaded its seccomp profile by then: the reset is done
/// only when the profile lets `rt_sigaction` and `rt_sigprocmask` through (the agent's own
/// does), since a strict one could kill the process for it, and its failure is not fatal.
///
/// For an exec it also applies the container's seccomp profile (`seccomp`), after the reset:
/// libcontainer 0.7's tenant builder drops `linux.seccomp` from the spec it builds for an exec,
/// so without this an exec'd process would run unfiltered.
#[derive(Clone)]
struct WorkloadExecutor {
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    reset_signals: bool,
}

impl libcontainer::workload::Executor for WorkloadExecutor {
    fn exec(
        &self,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorError> {
        if self.reset_signals {
            // Best effort: a process whose signals cannot be reset still runs, as before.
            let _ = crate::sys::default_signals();
        }
        if let Some(s) = &self.seccomp {
            // The capabilities are dropped by now: loading a filter needs no-new-privileges,
            // so an exec gets it even in a container that allows privilege escalation.
            nix::sys::prctl::set_no_new_privs().map_err(|e| {
                libcontainer::workload::ExecutorError::Other(format!("no-new-privileges: {e}"))
            })?;
            libcontainer::seccomp::initialize_seccomp(s).map_err(|e| {
                libcontainer::workload::ExecutorError::Other(format!("seccomp: {e}"))
            })?;
        }
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(
        &self,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}

/// Runs libcontainer's tenant build (an exec into a running container) in a child of the engine
/// that first joins the tenant's user namespace. libcontainer 0.7's tenant builder joins each of
/// the container's namespaces but its user namespace (its list of namespaces to join leaves
/// `user` out), so built from the engine, host root, the exec'd process would run as root of
/// the host's user namespace. From inside the tenant's, its user is the tenant's. The child
/// keeps host root's own uid for files (the container's state and cgroup files are root's),
/// and only the tenant's capabilities. Must run while the process is single-threaded.
fn build_in_userns(
    userns: &Path,
    build: impl FnOnce() -> Result<Pid, String>,
) -> Result<Pid, String> {
    use std::io::Read as _;
    let user = fs::File::open(userns).map_err(|e| format!("{}: {e}", userns.display()))?;
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let child = crate::sys::fork_and_run(|| {
        let answer = match nix::sched::setns(&user, nix::sched::CloneFlags::CLONE_NEWUSER) {
            Err(e) => format!("err joining the tenant's user namespace: {e}"),
            Ok(()) => match build() {
                Ok(pid) => format!("ok {}", pid.as_raw()),
                Err(e) => format!("err {e}"),
            },
        };
        i32::from(nix::unistd::write(&w, answer.as_bytes()).is_err())
    })
    .map_err(|e| format!("fork: {e}"))?;
    drop(w);
    let mut answer = String::new();
    let read = fs::File::from(r).read_to_string(&mut answer);
    let _ = waitpid(child, None);
    read.map_err(|e| format!("the exec's builder: {e}"))?;
    match answer.split_once(' ') {
        Some(("ok", pid)) => pid
            .parse::<i32>()
            .map(Pid::from_raw)
            .map_err(|_| format!("the exec's builder answered {answer:?}")),
        Some(("err", e)) => Err(e.to_string()),
        _ => Err(format!(
            "the exec's builder ended without an answer {answer:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A volume in kubelet's atomic-writer layout at `d`: `..<ts>/<name>` files, `..data`
    /// linking to `..<ts>`, and `<name>` linking through `..data`.
    fn atomic(d: &Path, ts: &str, files: &[(&str, &str)]) {
        fs::create_dir_all(d.join(ts)).unwrap();
        for (n, v) in files {
            fs::write(d.join(ts).join(n), v).unwrap();
            let _ = std::os::unix::fs::symlink(format!("..data/{n}"), d.join(n));
        }
        let _ = fs::remove_file(d.join("..data"));
        std::os::unix::fs::symlink(ts, d.join("..data")).unwrap();
    }

    #[test]
    fn a_copy_follows_kubelets_atomic_writer_update() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        atomic(&dst, "..1", &[("a", "old a"), ("gone", "x")]);
        atomic(&src, "..2", &[("a", "new a"), ("b", "new b")]);
        assert!(sync_atomic_writer(&src, &dst).unwrap());
        assert_eq!(fs::read_to_string(dst.join("a")).unwrap(), "new a");
        assert_eq!(fs::read_to_string(dst.join("b")).unwrap(), "new b");
        assert!(
            dst.join("gone").symlink_metadata().is_err(),
            "a name no longer given"
        );
        assert!(!dst.join("..1").exists(), "the old content went");
        assert_eq!(fs::read_link(dst.join("..data")).unwrap(), Path::new("..2"));
        // Again: nothing to do.
        assert!(!sync_atomic_writer(&src, &dst).unwrap());
        // Not that layout: refused, nothing touched.
        let plain = t.path().join("plain");
        fs::create_dir_all(&plain).unwrap();
        assert!(sync_atomic_writer(&src, &plain).is_err());
        assert_eq!(fs::read_dir(&plain).unwrap().count(), 0);
    }
}
