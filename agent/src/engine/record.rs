//! A container as the engine remembers it, persisted as `containers/<id>/record.json` so a new
//! engine process re-adopts what the last one ran.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::fsutil;

const FORMAT_MAJOR: u32 = 1;
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Life-cycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Built; its init waits to exec.
    Created,
    /// Its init runs.
    Running,
    /// Its init exited (or was killed).
    Exited,
}

/// One container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Format version.
    pub version: u32,
    /// Engine-unique id.
    pub id: String,
    /// Unique within the tenant.
    pub name: String,
    /// What it was created from.
    pub image: String,
    /// argv.
    pub command: Vec<String>,
    /// CPU limit.
    pub cpus: Option<f64>,
    /// Memory limit.
    pub memory_bytes: Option<u64>,
    /// Pids limit.
    pub pids: Option<u64>,
    /// Keys of the imports this container binds as volumes (VM guests): each goes with the
    /// last container that binds it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_imports: Vec<String>,
    /// Volumes that are one file copied into the guest (VM tenants): container path to the
    /// guest's copy, for the host to read back what the container wrote (kubelet's
    /// termination log).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_files: BTreeMap<String, PathBuf>,
    /// Volumes that are a directory copied into the guest: container path to the copy, for
    /// kubelet's updates to be brought in.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_dirs: BTreeMap<String, PathBuf>,
    /// The process identity resolved at create: uid, gid, supplementary groups (tenant ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<(u32, u32, Vec<u32>)>,
    /// Relative CPU weight (`cpu.shares` units); absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_shares: Option<u64>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// State.
    pub state: State,
    /// Host pid of the init while it runs.
    pub pid: u32,
    /// Exit code (128 + signal when killed).
    pub exit_code: i32,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
    /// Times, unix ms.
    pub created_ms: u64,
    /// Start time.
    pub started_ms: u64,
    /// Exit time.
    pub finished_ms: u64,
    /// Detail for the state.
    pub message: String,
    /// The OOM score adjustment asked for its processes (exec'd ones too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
    /// Its init's stdin is kept open for attaches.
    #[serde(default)]
    pub stdin: bool,
    /// Its init runs on a terminal.
    #[serde(default)]
    pub tty: bool,
}

impl Record {
    /// Replaces the record by rename. No fsync: the record must survive a crash of the engine
    /// or the agent (it does: the page cache outlives them), not a crash of the host, which ends
    /// the container anyway. Three saves per container lifecycle made six fsyncs, a large share
    /// of the create-to-delete time.
    pub fn save(&self, dir: &Path, durable: bool) -> std::io::Result<()> {
        let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        if durable {
            fsutil::write_atomic(&dir.join("record.json"), &body, 0o600)
        } else {
            fsutil::write_replace_volatile(&dir.join("record.json"), &body, 0o600)
        }
    }

    /// Reads a record back; refuses other format versions.
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let bytes = fsutil::read_capped(&dir.join("record.json"), MAX_RECORD_BYTES)?;
        let r: Record = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
        if r.version != FORMAT_MAJOR {
            return Err(std::io::Error::other(format!(
                "record format {} is not {FORMAT_MAJOR}",
                r.version
            )));
        }
        Ok(r)
    }

    /// A new record in state Created.
    pub fn new(id: String, name: String, image: String, command: Vec<String>) -> Self {
        Self {
            version: FORMAT_MAJOR,
            id,
            name,
            image,
            command,
            cpus: None,
            memory_bytes: None,
            pids: None,
            cpu_shares: None,
            volume_imports: Vec::new(),
            volume_files: BTreeMap::new(),
            volume_dirs: BTreeMap::new(),
            user: None,
            labels: BTreeMap::new(),
            state: State::Created,
            pid: 0,
            exit_code: 0,
            oom_killed: false,
            created_ms: now_ms(),
            started_ms: 0,
            finished_ms: 0,
            message: String::new(),
            oom_score_adj: None,
            stdin: false,
            tty: false,
        }
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
