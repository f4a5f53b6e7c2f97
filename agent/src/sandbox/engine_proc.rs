//! Starting, reaching and stopping a tenant's engine process.

use std::{path::PathBuf, process::Stdio, time::Duration};

use caas_proto::engine::v1::{self as epb, engine_client::EngineClient};
use tonic::transport::Channel;

use crate::{
    client::{self, Target},
    engine::EngineArgs,
};

/// How to start one engine.
#[derive(Debug, Clone)]
pub struct Spawn {
    pub binary: PathBuf,
    pub args: EngineArgs,
}

impl Spawn {
    pub fn socket(&self) -> PathBuf {
        self.args.paths().socket()
    }
    fn log(&self) -> PathBuf {
        self.args.paths().state.join("engine.log")
    }
}

/// Which process an engine is: its pid and its start time (clock ticks after boot, field 22
/// of `/proc/<pid>/stat`), so a reused pid is never taken for the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineProcess {
    pid: i32,
    start: u64,
}

impl EngineProcess {
    /// The live process `pid`, with its start time.
    pub fn of(pid: u32) -> Option<Self> {
        let pid = i32::try_from(pid).ok()?;
        Some(Self {
            pid,
            start: start_time(pid)?,
        })
    }

    /// The process as written by [`EngineProcess::to_record`], if it still runs.
    pub fn from_record(s: &str) -> Option<Self> {
        let mut it = s.split_whitespace();
        let p = Self {
            pid: it.next()?.parse().ok()?,
            start: it.next()?.parse().ok()?,
        };
        p.alive().then_some(p)
    }

    /// `pid start`, for a pid file that survives the agent.
    pub fn to_record(self) -> String {
        format!("{} {}\n", self.pid, self.start)
    }

    /// The pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the engine process still runs: one small procfs read, no RPC. A process that
    /// ended but is not reaped yet (a zombie, or one being torn down) does not.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// CPU time (user + system, µs) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_usec(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // rest starts at field 3; utime and stime are fields 14 and 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let hz = u64::try_from(nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??).ok()?;
    Some((utime + stime) * 1_000_000 / hz.max(1))
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); starttime is field 22.
    let mut fields = rest.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// A channel to a live engine and which process it is, or None.
pub async fn connect(socket: &std::path::Path) -> Option<(Channel, EngineProcess)> {
    if !socket.exists() {
        return None;
    }
    let ch = client::connect(&Target::Unix(socket.to_path_buf()))
        .await
        .ok()?;
    let mut c = EngineClient::new(ch.clone());
    let info = c.info(epb::InfoRequest {}).await.ok()?.into_inner();
    Some((ch, EngineProcess::of(info.pid)?))
}

/// Starts the engine in its own process group (it must outlive the agent) and waits until it
/// answers.
pub async fn spawn(s: &Spawn) -> Result<(Channel, EngineProcess), String> {
    let log_path = s.log();
    if let Some(d) = log_path.parent() {
        crate::fsutil::ensure_dir(d, 0o700).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut child = tokio::process::Command::new(&s.binary)
        .arg("engine")
        .args(s.args.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", s.binary.display()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = connect(&s.socket()).await {
            // Reap it when it exits, so no zombie is left while the agent runs.
            let tenant = s.args.tenant.clone();
            tokio::spawn(async move {
                if let Ok(st) = child.wait().await {
                    tracing::info!(%tenant, status = %st, "tenant engine exited");
                }
            });
            return Ok(found);
        }
        if let Ok(Some(st)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = tail.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            return Err(format!(
                "the engine exited with {st} before it served: {last}"
            ));
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            return Err("the engine did not answer within 20 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the engine and every container of it, then waits for it to exit.
pub async fn stop(s: &Spawn, client: Option<EngineClient<Channel>>) {
    let client = match client {
        Some(c) => Some(c),
        None => connect(&s.socket())
            .await
            .map(|(ch, _)| EngineClient::new(ch)),
    };
    let Some(mut c) = client else { return };
    let pid = c
        .info(epb::InfoRequest {})
        .await
        .ok()
        .map(|i| i.into_inner().pid);
    if let Err(e) = c
        .shutdown(epb::ShutdownRequest {
            kill_containers: true,
        })
        .await
    {
        tracing::warn!(tenant = %s.args.tenant, error = %e, "engine shutdown call failed");
    }
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    for _ in 0..100 {
        if nix::sys::signal::kill(pid, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(tenant = %s.args.tenant, "engine did not exit; killing it");
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}
