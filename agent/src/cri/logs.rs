//! Container output into kubelet's log files, in the CRI log format.
//!
//! The engine keeps each container's stdout and stderr in files of its own (the caas API's
//! `Logs` reads them). For a CRI container the agent also follows that output and writes it to
//! the path kubelet gave, a line at a time: `<RFC 3339 time with ns> <stdout|stderr> <F|P>
//! <text>`, `P` marking a piece of a line longer than [`MAX_LINE`] or not yet ended. A copier
//! starts with the container and ends when its output ends. After an agent restart it resumes
//! by skipping, per stream, the bytes its file already holds.

use std::{
    collections::HashMap,
    io::{BufRead, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use caas_proto::{engine::v1 as epb, v1 as pb};
use futures::StreamExt;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Cri, store::ContainerRecord};

/// Longest piece written as one log line; longer lines are split into `P` pieces.
pub const MAX_LINE: usize = 16 << 10;

/// The running copiers, by container id. A reopen request (kubelet rotated the file) is a
/// notification to the copier.
#[derive(Debug)]
pub struct Copiers {
    running: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    shutdown: CancellationToken,
}

impl Copiers {
    /// No copiers yet.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Starts copying `c`'s output (once per container). With `resume`, what the file holds
    /// already is not written again.
    pub async fn start(&self, cri: Arc<Cri>, c: &ContainerRecord, resume: bool) {
        if c.log_path.is_empty() {
            return;
        }
        let reopen = Arc::new(tokio::sync::Notify::new());
        {
            let mut running = self.running.lock().await;
            if running.contains_key(&c.id) {
                return;
            }
            running.insert(c.id.clone(), reopen.clone());
        }
        let c = c.clone();
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = copy(&cri, &c, resume, &reopen, &stop).await {
                tracing::warn!(container = %c.id, path = %c.log_path, error = %e, "copying container output to its CRI log stopped");
            }
            cri.logs.running.lock().await.remove(&c.id);
        });
    }

    /// Makes the copier of `id` reopen its file. False when none runs.
    pub async fn reopen(&self, id: &str) -> bool {
        match self.running.lock().await.get(id) {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
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

/// Bytes of each stream (stdout, stderr) that a CRI log file holds.
pub fn consumed(path: &Path) -> (u64, u64) {
    let Ok(f) = std::fs::File::open(path) else {
        return (0, 0);
    };
    let (mut out, mut err) = (0u64, 0u64);
    for line in std::io::BufReader::new(f)
        .split(b'\n')
        .map_while(Result::ok)
    {
        let mut parts = line.splitn(4, |b| *b == b' ');
        let (_, Some(stream), Some(tag), Some(text)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let n = text.len() as u64 + u64::from(tag == b"F");
        match stream {
            b"stdout" => out += n,
            b"stderr" => err += n,
            _ => {}
        }
    }
    (out, err)
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
    resume: bool,
    reopen: &tokio::sync::Notify,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let path = PathBuf::from(&c.log_path);
    let (mut skip_out, mut skip_err) = if resume { consumed(&path) } else { (0, 0) };
    let mut file = open(&path)?;
    let (_, mut eng) = cri.state.sandboxes.engine_of(&c.tenant).await?;
    let mut chunks = eng
        .logs(epb::LogsRequest {
            container: c.id.clone(),
            tail: 0,
            follow: true,
            stream: pb::LogStream::Unspecified as i32,
        })
        .await?
        .into_inner();
    let (mut p_out, mut p_err) = (Vec::new(), Vec::new());
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            () = reopen.notified() => {
                file = open(&path)?;
                continue;
            }
            c = chunks.next() => c,
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk?;
        let is_err = chunk.stream == pb::LogStream::Stderr as i32;
        let (skip, pending, name) = if is_err {
            (&mut skip_err, &mut p_err, "stderr")
        } else {
            (&mut skip_out, &mut p_out, "stdout")
        };
        let mut data = chunk.data.as_slice();
        let n = usize::try_from(*skip).unwrap_or(usize::MAX).min(data.len());
        data = &data[n..];
        *skip -= n as u64;
        let mut out = Vec::new();
        format_lines(name, &rfc3339_now(), pending, data, false, &mut out);
        file.write_all(&out)?;
    }
    // The output ended (the container exited): an unended last line is written as it is.
    let mut out = Vec::new();
    let now = rfc3339_now();
    format_lines("stdout", &now, &mut p_out, &[], true, &mut out);
    format_lines("stderr", &now, &mut p_err, &[], true, &mut out);
    file.write_all(&out)?;
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

    #[test]
    fn consumed_counts_each_stream() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("log");
        std::fs::write(
            &p,
            "t stdout F hello\nt stderr P ab\nt stderr F c\nt stdout F \n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(consumed(&p), (6 + 1, 2 + 2));
    }
}
