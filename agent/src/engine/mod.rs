//! `caas-agent engine`: one tenant's container engine.
//!
//! One process per tenant, single-threaded (a current-thread runtime, no blocking pool), because
//! libcontainer clones with raw clone3 and changes the process-wide working directory. It joins
//! the tenant's cgroup, makes (or finds) the tenant's user and network namespaces, becomes the
//! subreaper of its containers, and serves the engine protocol on a root-only unix socket.

pub mod cgroupfs;
pub mod fdio;
pub mod layout;
pub mod ns;
pub mod pause;
pub mod record;
pub mod rootfs;
pub mod runtime;
pub mod server;
pub mod spec;
pub mod unpack;
pub mod volumes;

use std::{
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use caas_proto::engine::v1::engine_server::EngineServer;
use tokio_util::sync::CancellationToken;

use crate::cgroups::{CgroupLayout, TenantCgroups, detect_layout};

/// What the agent tells an engine at start: the `caas-agent engine` command line.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// First host uid/gid of the tenant's range.
    #[arg(long)]
    pub id_start: u32,
    /// The agent's state dir.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The agent's run dir.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// cgroup mount root.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// The slice tenants live in.
    #[arg(long, default_value = crate::cgroups::tenant::SLICE)]
    pub cgroup_slice: String,
    /// The engine runs inside a VM tenant's guest (containers left running by an earlier boot
    /// of it are reported as ended by a VM crash).
    #[arg(long)]
    pub in_vm: bool,
}

impl EngineArgs {
    /// The arguments after `engine` that parse back into these.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = Vec::new();
        let mut put = |flag: &str, val: &std::ffi::OsStr| {
            v.push(flag.into());
            v.push(val.to_os_string());
        };
        put("--tenant", self.tenant.as_ref());
        put("--id-start", self.id_start.to_string().as_ref());
        put("--state-dir", self.state_dir.as_os_str());
        put("--run-dir", self.run_dir.as_os_str());
        put("--cgroup-root", self.cgroup_root.as_os_str());
        put("--cgroup-slice", self.cgroup_slice.as_ref());
        if self.in_vm {
            v.push("--in-vm".into());
        }
        v
    }

    /// The engine's directories.
    pub fn paths(&self) -> runtime::Paths {
        runtime::Paths {
            state: self.state_dir.join("engines").join(&self.tenant),
            run: self.run_dir.join("tenants").join(&self.tenant),
        }
    }
}

/// Runs the engine until it is told to shut down. Call before any thread exists.
pub fn main(args: EngineArgs) -> Result<(), String> {
    crate::validate::check_id("--tenant", &args.tenant).map_err(|e| e.to_string())?;
    let layout = detect_layout(&args.cgroup_root).unwrap_or(CgroupLayout::None);
    let cg = TenantCgroups::with_slice(&args.cgroup_root, layout, &args.cgroup_slice);
    let engine_cg = format!("{}/engine", cg.tenant_path(&args.tenant));
    cg.add_pid(&engine_cg, std::process::id())
        .map_err(|e| format!("joining the tenant cgroup: {e}"))?;
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| format!("becoming a subreaper: {e}"))?;
    // No supplementary groups of whoever started the agent: libcontainer leaves a process's
    // groups as they are when the spec names none, and containers must not carry the host's.
    nix::unistd::setgroups(&[]).map_err(|e| format!("dropping supplementary groups: {e}"))?;
    let paths = args.paths();
    // The run dir is on the path to every container's rootfs and runtime state, which the
    // tenant's unprivileged root must traverse: search-only for others, no listing.
    for (d, mode) in [
        (&paths.state, 0o700),
        (&paths.run, 0o711),
        (&paths.run.join("rootfs"), 0o711),
    ] {
        crate::fsutil::ensure_dir(d, mode).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    ns::ensure(&paths.ns(), args.id_start).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(serve(args, paths, cg))
}

async fn serve(args: EngineArgs, paths: runtime::Paths, cg: TenantCgroups) -> Result<(), String> {
    let mut engine = runtime::Engine::open(
        args.tenant.clone(),
        args.id_start,
        paths.clone(),
        cg,
        args.cgroup_root.clone(),
    );
    engine.set_durable(args.in_vm);
    // Imports a crash or a dropped call left half done.
    if let Ok(rd) = std::fs::read_dir(paths.imports()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    engine.check_boot(if args.in_vm {
        "exited (vm crashed): the VM it ran in stopped without shutting down"
    } else {
        "exited: the host restarted"
    });
    engine.clean_up_orphans();
    engine.adopt();
    engine.collect_volume_imports(None);
    let adopted = engine.adopted_running();
    let eng = Arc::new(Mutex::new(engine));
    let shutdown = CancellationToken::new();
    let sock = paths.socket();
    let _ = std::fs::remove_file(&sock);
    let listener =
        tokio::net::UnixListener::bind(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;

    // Children (container inits) are reaped on SIGCHLD; adopted containers of a previous engine
    // are not our children and are polled instead.
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        .map_err(|e| e.to_string())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    {
        let eng = eng.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut poll = tokio::time::interval(std::time::Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = sigchld.recv() => if let Ok(mut e) = eng.lock() { e.reap() },
                    _ = poll.tick() => if let Ok(mut e) = eng.lock() {
                        e.reap();
                        for id in &adopted { e.check_adopted(id) }
                    },
                    _ = sigterm.recv() => stop.cancel(),
                }
            }
        });
    }
    let svc = server::EngineSvc {
        eng,
        shutdown: shutdown.clone(),
        tenant: args.tenant.clone(),
        started_ms: record::now_ms(),
        in_vm: args.in_vm,
    };
    tracing::info!(tenant = %args.tenant, socket = %sock.display(), "engine serving");
    let result = tonic::transport::Server::builder()
        .add_service(EngineServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await;
    let _ = std::fs::remove_file(&sock);
    result.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::EngineArgs;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EngineArgs,
    }

    #[test]
    fn the_command_line_round_trips() {
        let a = EngineArgs {
            tenant: "t-1".into(),
            id_start: 1 << 20,
            state_dir: "/var/lib/x y".into(),
            run_dir: "/run/x".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            cgroup_slice: "caas-test.slice".into(),
            in_vm: true,
        };
        let mut argv: Vec<std::ffi::OsString> = vec!["engine".into()];
        argv.extend(a.to_args());
        let b = Cli::try_parse_from(argv).unwrap().args;
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
