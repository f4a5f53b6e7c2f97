//! The clients the streaming tests drive the CRI streaming server with: the SPDY one,
//! `tests/spdy-client/main.go`, on Go's spdystream (what kubelet and critest use), built once
//! per test binary from Debian's Go and `golang-github-docker-spdystream-dev`; and the
//! WebSocket one, `tests/ws-client/ws_exec.py`, on Debian's python3-websocket.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use caas_agent::testing::{privileged_required, skip};

/// Where Debian's Go library sources are.
const GOPATH: &str = "/usr/share/gocode";

/// The built client, or None when Go or spdystream is missing (the skip is recorded; with
/// privileged tests mandatory, that fails the test instead).
pub fn client(test: &str) -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(build);
    match built {
        Ok(p) => Some(p.clone()),
        Err(why) => {
            assert!(
                !privileged_required(),
                "{test}: {why}, and CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory"
            );
            skip(test, why);
            None
        }
    }
}

fn build() -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("spdy-client");
    let libs = [
        "src/github.com/docker/spdystream",
        "src/github.com/gorilla/websocket",
    ];
    if !libs.iter().all(|l| Path::new(GOPATH).join(l).is_dir()) {
        return Err(
            "needs Go's spdystream and gorilla/websocket (Debian: golang-go golang-github-docker-spdystream-dev golang-github-gorilla-websocket-dev; scripts/setup.sh installs them)"
                .into(),
        );
    }
    let out_dir = std::env::temp_dir().join(format!("caas-spdy-client-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let bin = out_dir.join("spdy-client");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src)
        .env("GOPATH", GOPATH)
        .env("GO111MODULE", "off")
        .env("GOCACHE", out_dir.join("cache"))
        .env("GOFLAGS", "")
        .output()
        .map_err(|e| format!("needs Go (Debian: golang-go): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

/// Starts the client with `args` and no stdin, for a test that ends it itself.
pub fn start(client: &Path, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(client)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning spdy-client")
}

/// The WebSocket exec client as a command line (interpreter and script), or None when Debian's
/// python3-websocket is missing (recorded as for [`client`]).
pub fn ws_client(test: &str) -> Option<Vec<String>> {
    const PYTHON: &str = "/usr/bin/python3";
    let ok = Command::new(PYTHON)
        .args(["-c", "import websocket"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let why = "needs Debian's python3-websocket (scripts/setup.sh installs it)";
        assert!(
            !privileged_required(),
            "{test}: {why}, and CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory"
        );
        skip(test, why);
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ws-client/ws_exec.py");
    Some(vec![PYTHON.into(), script.display().to_string()])
}

/// What a client run gave.
#[derive(Debug)]
pub struct Run {
    /// Its exit code.
    pub code: i32,
    /// What it wrote on stdout (the streams' data).
    pub stdout: String,
    /// Its stderr: the stderr stream's data, and its `PROTOCOL`, `STATUS` and `ERROR` lines.
    pub stderr: String,
}

impl Run {
    /// The content of the first `<tag> ` line on stderr.
    pub fn line(&self, tag: &str) -> Option<&str> {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix(tag)?.strip_prefix(' '))
    }
}

/// Runs the client with `args`, `input` on its stdin (then its end), within 60 s.
pub async fn run(client: &Path, args: &[&str], input: &[u8]) -> Run {
    run_with(client, args, input, true).await
}

/// [`run`], with stdin left open after `input` when `close_stdin` is false (the client then
/// ends only when the server ends the streams).
pub async fn run_with(client: &Path, args: &[&str], input: &[u8], close_stdin: bool) -> Run {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(client)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", client.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let (hold, held) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
        if !close_stdin {
            let _ = held.await;
        }
        let _ = stdin.shutdown().await;
    });
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("spdy-client {args:?} did not end within 60 s"))
        .expect("spdy-client output");
    drop(hold);
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
