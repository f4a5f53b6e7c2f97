//! Container output into kubelet's log files, in the CRI log format.
//!
//! The engine keeps each container's stdout and stderr in files of its own (the caas API's
//! `Logs` reads them). For a CRI container the agent also follows that output and writes it to
//! the path kubelet gave, a line at a time: `<RFC 3339 time with ns> <stdout|stderr> <F|P>
//! <text>`, `P` marking a piece of a line longer than [`MAX_LINE`] or not yet ended. A copier
//! starts with the container and ends when its output ends. It records how far it copied (byte
//! offsets of the engine's files, `<state_dir>/cri/logs/<id>.json`), so after an agent restart,
//! or when the engine could not be reached for a while, it goes on from there: a line may be
//! written twice after a crash, none is lost.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use caas_proto::{engine::v1 as epb, v1 as pb};
use futures::StreamExt;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{
    Cri,
    store::{ContainerRecord, LogOffsets},
};

/// Longest piece written as one log line; longer lines are split into `P` pieces.
pub const MAX_LINE: usize = 16 << 10;

/// A request to reopen the log file (kubelet rotated it), answered once it is reopened.
type Reopen = tokio::sync::oneshot::Sender<std::io::Result<()>>;

/// A running copier: its reopen requests, and a receiver that sees the copier end (its sender
/// is dropped when it does).
type Running = (
    tokio::sync::mpsc::Sender<Reopen>,
    tokio::sync::watch::Receiver<()>,
);

/// The running copiers, by container id.
#[derive(Debug)]
pub struct Copiers {
    running: Mutex<HashMap<String, Running>>,
    /// Containers whose copier did not end within a status's wait: later statuses do not wait
    /// again (a copier backing off from an unreachable engine would slow every one of them).
    waited: Mutex<std::collections::HashSet<String>>,
    shutdown: CancellationToken,
}

/// Longest wait between attempts to reach a container's output again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Copiers {
    /// No copiers yet.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            waited: Mutex::new(std::collections::HashSet::new()),
            shutdown,
        }
    }

    /// Starts copying `c`'s output (once per container), from where an earlier copy stopped.
    pub async fn start(&self, cri: Arc<Cri>, c: &ContainerRecord) {
        if c.log_path.is_empty() || cri.store.log_offsets(&c.id).done {
            return;
        }
        let (tx, mut reopen) = tokio::sync::mpsc::channel(4);
        let (ended, ended_rx) = tokio::sync::watch::channel(());
        {
            let mut running = self.running.lock().await;
            if running.contains_key(&c.id) {
                return;
            }
            running.insert(c.id.clone(), (tx, ended_rx));
        }
        let c = c.clone();
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            let _ended = ended;
            let mut backoff = Duration::from_millis(500);
            loop {
                match copy(&cri, &c, &mut reopen, &stop).await {
                    Ok(()) => break,
                    Err(e) => {
                        // Gone with its container: nothing more to copy.
                        if cri.store.container(&c.id).await.is_none() || stop.is_cancelled() {
                            break;
                        }
                        tracing::warn!(container = %c.id, path = %c.log_path, error = %e, retry_in = ?backoff, "copying container output to its CRI log failed; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            cri.logs.running.lock().await.remove(&c.id);
            cri.logs.waited.lock().await.remove(&c.id);
        });
    }

    /// Waits, at most `limit`, for the copier of `id` to end: of an exited container, once all
    /// of its output is in the log. Returns at once when none runs, and when an earlier wait for
    /// the same copier ran out.
    pub async fn wait_ended(&self, id: &str, limit: Duration) {
        let Some(mut ended) = self.running.lock().await.get(id).map(|r| r.1.clone()) else {
            return;
        };
        if self.waited.lock().await.contains(id) {
            return;
        }
        // The sender is only ever dropped, never sent on: `changed` returns when it is.
        if tokio::time::timeout(limit, ended.changed()).await.is_err() {
            self.waited.lock().await.insert(id.to_string());
        }
    }

    /// Makes the copier of `id` reopen its file; returns once it did. False when none runs.
    pub async fn reopen(&self, id: &str) -> std::io::Result<bool> {
        let Some(tx) = self.running.lock().await.get(id).map(|r| r.0.clone()) else {
            return Ok(false);
        };
        let (ack, done) = tokio::sync::oneshot::channel();
        if tx.send(ack).await.is_err() {
            return Ok(false);
        }
        match done.await {
            Ok(r) => r.map(|()| true),
            Err(_) => Ok(false),
        }
    }
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// Formats `data` of one stream as CRI log lines, keeping an unended last line in `pending`.
/// With `flush`, a pending piece is written as `P`.
pub fn format_lines(
    stream: &str,
    time: &str,
    pending: &mut Vec<u8>,
    data: &[u8],
    flush: bool,
    out: &mut Vec<u8>,
) {
    pending.extend_from_slice(data);
    let mut start = 0;
    let line = |out: &mut Vec<u8>, text: &[u8], tag: &str| {
        out.extend_from_slice(format!("{time} {stream} {tag} ").as_bytes());
        out.extend_from_slice(text);
        out.push(b'\n');
    };
    while let Some(nl) = pending[start..].iter().position(|b| *b == b'\n') {
        let mut text = &pending[start..start + nl];
        // A terminal ends its lines with \r\n: the line is the text before both.
        if let Some(t) = text.strip_suffix(b"\r") {
            text = t;
        }
        while text.len() > MAX_LINE {
            line(out, &text[..MAX_LINE], "P");
            text = &text[MAX_LINE..];
        }
        line(out, text, "F");
        start += nl + 1;
    }
    let mut rest = &pending[start..];
    while rest.len() > MAX_LINE || (flush && !rest.is_empty()) {
        let n = rest.len().min(MAX_LINE);
        line(out, &rest[..n], "P");
        rest = &rest[n..];
    }
    *pending = rest.to_vec();
}

fn rfc3339_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond()
    )
}

async fn copy(
    cri: &Cri,
    c: &ContainerRecord,
    reopen: &mut tokio::sync::mpsc::Receiver<Reopen>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let path = PathBuf::from(&c.log_path);
    let mut at = cri.store.log_offsets(&c.id);
    let mut file = open(&path)?;
    let (_, mut eng) = cri.state.sandboxes.engine_of(&c.tenant).await?;
    let mut chunks = eng
        .logs(epb::LogsRequest {
            container: c.id.clone(),
            tail: 0,
            follow: true,
            stream: pb::LogStream::Unspecified as i32,
            stdout_offset: Some(at.stdout),
            stderr_offset: Some(at.stderr),
        })
        .await?
        .into_inner();
    let (mut p_out, mut p_err) = (Vec::new(), Vec::new());
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            Some(ack) = reopen.recv() => {
                let r = open(&path).map(|f| file = f);
                let _ = ack.send(r);
                continue;
            }
            c = chunks.next() => c,
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk?;
        let n = chunk.data.len() as u64;
        let (pending, name) = if chunk.stream == pb::LogStream::Stderr as i32 {
            at.stderr += n;
            (&mut p_err, "stderr")
        } else {
            at.stdout += n;
            (&mut p_out, "stdout")
        };
        let mut out = Vec::new();
        format_lines(name, &rfc3339_now(), pending, &chunk.data, false, &mut out);
        file.write_all(&out)?;
        // An unended line is held back and not yet counted as copied.
        let held = (p_out.len() as u64, p_err.len() as u64);
        cri.store.set_log_offsets(
            &c.id,
            LogOffsets {
                stdout: at.stdout - held.0,
                stderr: at.stderr - held.1,
                done: false,
            },
        )?;
    }
    // The output ended (the container exited): an unended last line is written as it is.
    let mut out = Vec::new();
    let now = rfc3339_now();
    format_lines("stdout", &now, &mut p_out, &[], true, &mut out);
    format_lines("stderr", &now, &mut p_err, &[], true, &mut out);
    file.write_all(&out)?;
    at.done = true;
    cri.store.set_log_offsets(&c.id, at)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_tagged() {
        let mut pending = Vec::new();
        let mut out = Vec::new();
        format_lines("stdout", "T", &mut pending, b"a\nbc", false, &mut out);
        assert_eq!(out, b"T stdout F a\n");
        assert_eq!(pending, b"bc");
        out.clear();
        format_lines("stdout", "T", &mut pending, b"d\n\n", false, &mut out);
        assert_eq!(out, b"T stdout F bcd\nT stdout F \n");
        assert!(pending.is_empty());
        out.clear();
        format_lines("stderr", "T", &mut pending, b"tail", true, &mut out);
        assert_eq!(out, b"T stderr P tail\n");
        // A terminal's \r\n ends a line as \n does; a \r inside a line stays.
        out.clear();
        pending.clear();
        format_lines("stdout", "T", &mut pending, b"x\r\ny\rz\n", false, &mut out);
        assert_eq!(out, b"T stdout F x\nT stdout F y\rz\n");
    }

    #[test]
    fn long_lines_become_partial_pieces() {
        let mut pending = Vec::new();
        let mut out = Vec::new();
        let mut data = vec![b'x'; MAX_LINE + 3];
        data.push(b'\n');
        format_lines("stdout", "T", &mut pending, &data, false, &mut out);
        let text = String::from_utf8(out).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("T stdout P xxx"));
        assert_eq!(lines[1], "T stdout F xxx");
    }
}
