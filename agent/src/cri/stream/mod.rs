//! The CRI streaming server. `Exec` and `PortForward` answer with a URL on this server holding
//! a single-use token; kubelet (or `crictl`, `critest`) connects there and upgrades the HTTP
//! connection to SPDY/3.1 ([`spdy`]), then runs Kubernetes' protocols over SPDY streams:
//!
//! - exec, `v4.channel.k8s.io` (also v3 and v2): the client opens an `error` stream and, as
//!   asked, `stdin`, `stdout`, `stderr` and (with a terminal) `resize` streams, each named by
//!   its `streamType` header. The process runs through the tenant engine's interactive exec
//!   (stdin, a terminal, its size). Its end is reported on the error stream: v4 writes a
//!   `metav1.Status` (`Success`, or `Failure` with reason `NonZeroExitCode` and the code as
//!   the cause), v2 and v3 a message on failure only.
//! - attach runs over the same streams as exec, to the container's init: its output from the
//!   moment it starts, its stdin (a container made with `stdin`) and terminal (made with `tty`).
//! - port-forward, `portforward.k8s.io`: per connection, an `error` and a `data` stream with
//!   the same `port` and `requestID` headers; the data is relayed to that port on the pod's
//!   loopback (userns tenants: a socket made inside the tenant's network namespace) or, for VM
//!   tenants, on the tenant's address.
//!
//! Exec is also served over a WebSocket (`v5.channel.k8s.io`, and v4), the transport Kubernetes
//! is moving to (KEP-4006): each binary message is a channel byte and that channel's data;
//! v5's `255, 0` ends stdin. Port-forward over a WebSocket carries the same SPDY connection in
//! its binary messages (`SPDY/3.1+portforward.k8s.io`). Tokens expire after a minute unused, as
//! kubelet's do; a refused upgrade does not use one up.

pub mod spdy;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use caas_proto::{
    engine::v1::{self as epb, engine_client::EngineClient},
    v1 as pb,
};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode, body::Incoming as Body, header::HeaderValue};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long a URL is good for.
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long the client has to open the streams it asked for (kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Exec protocols, the newest first.
const EXEC_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
];
/// The port-forward protocol.
const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

/// What a token was issued for.
#[derive(Debug)]
pub enum Session {
    /// A command in a running container.
    Exec(ExecSession),
    /// Ports of a pod.
    PortForward(PortForwardSession),
}

impl Session {
    fn kind(&self) -> &'static str {
        match self {
            Self::Exec(_) => "exec",
            Self::PortForward(_) => "portforward",
        }
    }
}

/// An exec to run once the client connects.
#[derive(Debug)]
pub struct ExecSession {
    /// The tenant's engine.
    pub engine: EngineClient<Channel>,
    /// The container (its engine id).
    pub container: String,
    /// argv (empty for an attach).
    pub cmd: Vec<String>,
    /// Attach to the container's init instead of running `cmd`.
    pub attach: bool,
    /// Run on a terminal.
    pub tty: bool,
    /// Stream stdin.
    pub stdin: bool,
    /// Stream stdout.
    pub stdout: bool,
    /// Stream stderr (not with a terminal).
    pub stderr: bool,
}

/// Where a pod's ports are reached.
#[derive(Debug, Clone)]
pub enum PortTarget {
    /// On loopback inside this network namespace (bind-mounted at the path).
    Netns(PathBuf),
    /// At this address (a VM tenant's guest).
    Address(Ipv4Addr),
}

/// A pod's ports to forward.
#[derive(Debug)]
pub struct PortForwardSession {
    /// The pod id (for messages).
    pub pod: String,
    /// Where its ports are.
    pub target: PortTarget,
    /// The ports asked for in the request (empty: any port the client names).
    pub ports: Vec<u16>,
}

/// The streaming server.
#[derive(Debug)]
pub struct StreamServer {
    base: String,
    pending: Mutex<HashMap<String, (Session, Instant)>>,
}

impl StreamServer {
    /// Binds `addr` and serves until `stop`.
    pub async fn start(addr: SocketAddr, stop: CancellationToken) -> std::io::Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let host = if bound.ip().is_unspecified() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, bound.port()))
        } else {
            bound
        };
        let server = Arc::new(Self {
            base: format!("http://{host}"),
            pending: Mutex::new(HashMap::new()),
        });
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let (conn, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    c = listener.accept() => match c {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "CRI streaming server: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.handle(req)) }
                    });
                    let io = hyper_util::rt::TokioIo::new(conn);
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(30))
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await
                    {
                        tracing::debug!(error = %e, "CRI streaming connection ended");
                    }
                });
            }
        });
        tracing::info!(address = %server.base, "CRI streaming server listening");
        Ok(server)
    }

    /// A URL that runs `session` once, within a minute.
    pub fn url(&self, session: Session) -> String {
        let mut b = [0u8; 16];
        rand::fill(&mut b);
        let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let kind = session.kind();
        let mut p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        p.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
        p.insert(token.clone(), (session, Instant::now()));
        format!("{}/{kind}/{token}", self.base)
    }

    /// The kind of the session `token` holds, if it holds a live one.
    fn kind_of(&self, token: &str) -> Option<&'static str> {
        let p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        p.get(token)
            .filter(|(_, at)| at.elapsed() < TOKEN_TTL)
            .map(|(s, _)| s.kind())
    }

    fn take(&self, token: &str) -> Option<Session> {
        let mut p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        p.remove(token)
            .filter(|(_, at)| at.elapsed() < TOKEN_TTL)
            .map(|(s, _)| s)
    }

    fn handle(&self, mut req: Request<Body>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        // The token is used up only by an upgrade that goes ahead: a refused attempt (a
        // WebSocket client before it falls back to SPDY) leaves it for the next.
        let Some(session_kind) = self.kind_of(token) else {
            return text(
                StatusCode::NOT_FOUND,
                "unknown or expired streaming token: ask the runtime for a new URL (Exec, PortForward)",
            );
        };
        if session_kind != kind {
            return text(
                StatusCode::NOT_FOUND,
                &format!("this token is for {session_kind}, not {kind}"),
            );
        }
        let upgrade = header_values(&req, hyper::header::UPGRADE);
        if upgrade.iter().any(|u| u.eq_ignore_ascii_case("websocket")) {
            return self.handle_websocket(req, token, session_kind);
        }
        if !upgrade.iter().any(|u| u.eq_ignore_ascii_case("SPDY/3.1")) {
            return text(
                StatusCode::BAD_REQUEST,
                "a streaming request must upgrade the connection to SPDY/3.1 (Connection: Upgrade, Upgrade: SPDY/3.1) or to a WebSocket (v5.channel.k8s.io)",
            );
        }
        let supported: &[&str] = if session_kind == "exec" {
            EXEC_PROTOCOLS
        } else {
            &[PORT_FORWARD_PROTOCOL]
        };
        let protocol = match negotiate(&req, "x-stream-protocol-version", supported) {
            Ok(p) => p,
            Err(refused) => return text(StatusCode::FORBIDDEN, &refused),
        };
        let Some(session) = self.take(token) else {
            return text(
                StatusCode::NOT_FOUND,
                "unknown or expired streaming token: ask the runtime for a new URL (Exec, PortForward)",
            );
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let proto = protocol.clone();
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(error = %e, "CRI streaming: the upgrade failed");
                    return;
                }
            };
            let io = hyper_util::rt::TokioIo::new(upgraded);
            match session {
                Session::Exec(e) => run_exec(io, &proto, e).await,
                Session::PortForward(p) => run_port_forward(io, p).await,
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        );
        h.insert(hyper::header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        if let Ok(v) = HeaderValue::from_str(&protocol) {
            h.insert("X-Stream-Protocol-Version", v);
        }
        r
    }
}

impl StreamServer {
    /// An exec over a WebSocket (`v5.channel.k8s.io`, also v4): each binary message is one
    /// channel's data after a byte naming the channel (0 stdin, 1 stdout, 2 stderr, 3 error,
    /// 4 resize); in v5 the message `255, n` closes channel n (the client's end of stdin).
    fn handle_websocket(
        &self,
        mut req: Request<Body>,
        token: &str,
        kind: &'static str,
    ) -> Response<Full<Bytes>> {
        let Some(key) = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
        else {
            return text(
                StatusCode::BAD_REQUEST,
                "a WebSocket upgrade needs Sec-WebSocket-Key",
            );
        };
        let served: &[&str] = if kind == "exec" {
            WS_EXEC_PROTOCOLS
        } else {
            &[WS_PORT_FORWARD_PROTOCOL]
        };
        let protocol = match negotiate(&req, "sec-websocket-protocol", served) {
            Ok(p) => p,
            Err(refused) => return text(StatusCode::FORBIDDEN, &refused),
        };
        let Some(session) = self.take(token) else {
            return text(
                StatusCode::NOT_FOUND,
                "unknown or expired streaming token: ask the runtime for a new URL (Exec, PortForward)",
            );
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let proto = protocol.clone();
        tokio::spawn(async move {
            let io = match on_upgrade.await {
                Ok(u) => hyper_util::rt::TokioIo::new(u),
                Err(err) => {
                    tracing::warn!(error = %err, "CRI streaming: the upgrade failed");
                    return;
                }
            };
            match session {
                Session::Exec(e) => run_exec_websocket(io, &proto, e).await,
                Session::PortForward(p) => {
                    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                        io,
                        tokio_tungstenite::tungstenite::protocol::Role::Server,
                        None,
                    )
                    .await;
                    run_port_forward(websocket_bytes(ws), p).await;
                }
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        );
        h.insert(
            hyper::header::UPGRADE,
            HeaderValue::from_static("websocket"),
        );
        if let Ok(v) = HeaderValue::from_str(&key) {
            h.insert("Sec-WebSocket-Accept", v);
        }
        if let Ok(v) = HeaderValue::from_str(&protocol) {
            h.insert("Sec-WebSocket-Protocol", v);
        }
        r
    }
}

/// WebSocket exec subprotocols, the newest first.
const WS_EXEC_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// Port-forward over a WebSocket: the SPDY connection, carried in binary messages (KEP-4006).
const WS_PORT_FORWARD_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// A WebSocket as a byte stream, each binary message the next bytes of it: what the SPDY
/// port-forward runs over when a WebSocket carries it.
fn websocket_bytes<IO>(ws: tokio_tungstenite::WebSocketStream<IO>) -> tokio::io::DuplexStream
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let (mut sink, mut source) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(theirs);
    tokio::spawn(async move {
        while let Some(Ok(m)) = source.next().await {
            match m {
                Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    });
    ours
}

async fn run_exec_websocket<IO>(io: IO, protocol: &str, e: ExecSession)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::{Message, protocol::Role};
    const STDIN: u8 = 0;
    const ERROR: u8 = 3;
    const RESIZE: u8 = 4;
    const CLOSE: u8 = 255;
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let (mut sink, mut source) = ws.split();
    let closed = CancellationToken::new();
    let v5 = protocol == WS_EXEC_PROTOCOLS[0];
    let (stdin_tx, stdin) = if e.stdin {
        let (t, r) = mpsc::channel(16);
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    let (resize_tx, resize) = if e.tty {
        let (t, r) = mpsc::channel(16);
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    {
        let closed = closed.clone();
        tokio::spawn(async move {
            let mut stdin_tx = stdin_tx;
            while let Some(m) = source.next().await {
                let data = match m {
                    Ok(Message::Binary(b)) => b,
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Some((&channel, rest)) = data.split_first() else {
                    continue;
                };
                match channel {
                    STDIN => {
                        if let Some(t) = &stdin_tx
                            && t.send(rest.to_vec()).await.is_err()
                        {
                            stdin_tx = None;
                        }
                    }
                    RESIZE => {
                        if let Some(t) = &resize_tx {
                            let _ = t.send(rest.to_vec()).await;
                        }
                    }
                    CLOSE if v5 && rest.first() == Some(&STDIN) => stdin_tx = None,
                    _ => {}
                }
            }
            closed.cancel();
        });
    }
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let (stdout, stderr) = (e.stdout, e.stderr && !e.tty);
    let writer = {
        let closed = closed.clone();
        tokio::spawn(async move {
            while let Some((channel, d)) = out_rx.recv().await {
                // Channels not asked for are dropped, never mixed into another.
                if (channel == STDOUT && !stdout) || (channel == STDERR && !stderr) {
                    continue;
                }
                let mut m = Vec::with_capacity(d.len() + 1);
                m.push(channel);
                m.extend_from_slice(&d);
                if sink.send(Message::Binary(m.into())).await.is_err() {
                    closed.cancel();
                    break;
                }
            }
            sink
        })
    };
    let result = exec_core(&e, stdin, resize, out_tx, closed.clone()).await;
    let Ok(mut sink) = writer.await else {
        return;
    };
    if closed.is_cancelled() {
        return;
    }
    if let Some(b) = exec_status(EXEC_PROTOCOLS[0], result, &e.cmd) {
        let mut m = vec![ERROR];
        m.extend_from_slice(&b);
        let _ = sink.send(Message::Binary(m.into())).await;
    }
    let _ = sink.close().await;
}

/// The first protocol the client offers in `header` (its order of preference, as Kubernetes'
/// handshake takes it) that is `served`, or the refusal naming both lists.
fn negotiate(req: &Request<Body>, header: &'static str, served: &[&str]) -> Result<String, String> {
    let offered: Vec<String> = header_values(req, header)
        .iter()
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    offered
        .iter()
        .find(|o| served.contains(&o.as_str()))
        .cloned()
        .ok_or_else(|| {
            format!(
                "unable to upgrade: no common {header} (offered {offered:?}, served {served:?})"
            )
        })
}

fn header_values(req: &Request<Body>, name: impl hyper::header::AsHeaderName) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(ToString::to_string)
        .collect()
}

fn text(code: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The exec's ending, as the error stream reports it.
fn exec_status(protocol: &str, result: Result<i32, String>, cmd: &[String]) -> Option<Vec<u8>> {
    let v4 = protocol == EXEC_PROTOCOLS[0];
    let status = match result {
        Ok(0) if v4 => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok(0) => return None,
        Ok(code) => {
            let message = format!(
                "command terminated with non-zero exit code: error executing command {cmd:?}, exit code {code}"
            );
            if !v4 {
                return Some(message.into_bytes());
            }
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            })
        }
        Err(message) if !v4 => return Some(message.into_bytes()),
        Err(message) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "code": 500,
        }),
    };
    Some(status.to_string().into_bytes())
}

/// The terminal size a client sends on its resize stream: JSON objects one after another.
#[derive(serde::Deserialize)]
struct TermSize {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

async fn run_exec<IO>(io: IO, protocol: &str, e: ExecSession)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let spdy::Conn {
        mut incoming,
        sender: tx,
        closed,
    } = spdy::serve(io);
    let want_resize = e.tty && protocol != "v2.channel.k8s.io";
    let wanted = |t: &str| match t {
        "error" => true,
        "stdin" => e.stdin,
        "stdout" => e.stdout,
        "stderr" => e.stderr && !e.tty,
        "resize" => want_resize,
        _ => false,
    };
    let expected = 1
        + usize::from(e.stdin)
        + usize::from(e.stdout)
        + usize::from(e.stderr && !e.tty)
        + usize::from(want_resize);
    // The streams we write to are kept by id; what a client sends on them is dropped (their
    // receivers go), so it cannot pile up.
    let mut ids: HashMap<String, u32> = HashMap::new();
    let (mut stdin, mut resize) = (None, None);
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while ids.len() < expected {
        match tokio::time::timeout_at(deadline, incoming.recv()).await {
            Ok(Some(s)) => {
                let kind = s.header("streamtype").unwrap_or("").to_ascii_lowercase();
                if !wanted(&kind) || ids.contains_key(&kind) {
                    tx.reset(s.id).await;
                    continue;
                }
                ids.insert(kind.clone(), s.id);
                match kind.as_str() {
                    "stdin" => stdin = Some(s.data),
                    "resize" => resize = Some(s.data),
                    _ => {}
                }
            }
            Ok(None) => return,
            Err(_) => {
                if let Some(&err) = ids.get("error") {
                    let msg = format!(
                        "timed out after {} s waiting for the client to open its streams (has {:?})",
                        STREAM_CREATION_TIMEOUT.as_secs(),
                        ids.keys().collect::<Vec<_>>()
                    );
                    if let Some(b) = exec_status(protocol, Err(msg), &e.cmd) {
                        tx.data(err, &b).await;
                    }
                    tx.close(err).await;
                }
                tx.go_away().await;
                return;
            }
        }
    }
    // Streams opened later are not part of this exec.
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(s) = incoming.recv().await {
                tx.reset(s.id).await;
            }
        });
    }
    let (err_id, out_id, errout_id) = (
        ids.get("error").copied(),
        ids.get("stdout").copied(),
        ids.get("stderr").copied(),
    );
    // One writer keeps the order of what the process printed.
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let writer = {
        let (tx, closed) = (tx.clone(), closed.clone());
        tokio::spawn(async move {
            while let Some((channel, d)) = out_rx.recv().await {
                // Stderr not asked for (or on a terminal) is dropped, never mixed into stdout.
                let id = if channel == STDOUT { out_id } else { errout_id };
                if let Some(id) = id
                    && !tx.data(id, &d).await
                {
                    closed.cancel();
                    return;
                }
            }
        })
    };
    let result = exec_core(&e, stdin, resize, out_tx, closed.clone()).await;
    let _ = writer.await;
    if closed.is_cancelled() {
        return;
    }
    for id in [out_id, errout_id].into_iter().flatten() {
        tx.close(id).await;
    }
    if let Some(id) = err_id {
        if let Some(b) = exec_status(protocol, result, &e.cmd) {
            tx.data(id, &b).await;
        }
        tx.close(id).await;
    }
    tx.go_away().await;
}

/// Channel numbers of the process's output (as the WebSocket protocol numbers them).
const STDOUT: u8 = 1;
const STDERR: u8 = 2;

/// Runs `e` through the tenant engine's interactive exec, whatever carries it: `stdin` and
/// `resize` (JSON sizes) in, the process's output out on `out` as (channel, bytes). Ends with
/// the exit code, or why there is none; when `closed` is cancelled (the client went away) the
/// engine's stream is dropped, which makes the engine kill the process.
async fn exec_core(
    e: &ExecSession,
    stdin: Option<mpsc::Receiver<Vec<u8>>>,
    resize: Option<mpsc::Receiver<Vec<u8>>>,
    out: mpsc::Sender<(u8, Vec<u8>)>,
    closed: CancellationToken,
) -> Result<i32, String> {
    let (in_tx, in_rx) = mpsc::channel::<epb::ExecInput>(16);
    let start = epb::ExecInput {
        input: Some(epb::exec_input::Input::Start(epb::ExecStart {
            exec: Some(epb::ExecRequest {
                container: e.container.clone(),
                command: e.cmd.clone(),
                env: Vec::new(),
                workdir: String::new(),
            }),
            stdin: e.stdin,
            tty: e.tty,
            size: None,
            attach: e.attach,
        })),
    };
    let _ = in_tx.send(start).await;
    if let Some(mut data) = stdin {
        let in_tx = in_tx.clone();
        tokio::spawn(async move {
            while let Some(d) = data.recv().await {
                let m = epb::ExecInput {
                    input: Some(epb::exec_input::Input::Stdin(d)),
                };
                if in_tx.send(m).await.is_err() {
                    return;
                }
            }
            let _ = in_tx
                .send(epb::ExecInput {
                    input: Some(epb::exec_input::Input::StdinClose(true)),
                })
                .await;
        });
    }
    if let Some(data) = resize {
        tokio::spawn(feed_sizes(data, in_tx.clone()));
    }
    let mut engine = e.engine.clone();
    let out_stream = engine
        .exec_interactive(tokio_stream::wrappers::ReceiverStream::new(in_rx))
        .await
        .map_err(|s| s.message().to_string())?;
    let mut stream = out_stream.into_inner();
    let mut code = None;
    loop {
        let m = tokio::select! {
            m = stream.message() => m,
            () = closed.cancelled() => return Err("the client went away".into()),
        };
        let item = match m {
            Ok(Some(m)) => match m.output {
                Some(pb::exec_output::Output::Stdout(d)) => (STDOUT, d),
                Some(pb::exec_output::Output::Stderr(d)) => (STDERR, d),
                Some(pb::exec_output::Output::ExitCode(c)) => {
                    code = Some(c);
                    continue;
                }
                None => continue,
            },
            Ok(None) => break,
            Err(s) => return Err(s.message().to_string()),
        };
        let sent = tokio::select! {
            r = out.send(item) => r.is_ok(),
            () = closed.cancelled() => false,
        };
        if !sent {
            return Err("the client went away".into());
        }
    }
    drop(in_tx);
    code.ok_or_else(|| "the exec ended without an exit code".into())
}

/// Turns a resize stream (JSON objects one after another) into the engine's resize inputs.
async fn feed_sizes(mut data: mpsc::Receiver<Vec<u8>>, in_tx: mpsc::Sender<epb::ExecInput>) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(d) = data.recv().await {
        buf.extend_from_slice(&d);
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<TermSize>();
        let mut used = 0;
        let mut sizes = Vec::new();
        while let Some(Ok(size)) = it.next() {
            used = it.byte_offset();
            sizes.push(size);
        }
        for size in sizes {
            let m = epb::ExecInput {
                input: Some(epb::exec_input::Input::Resize(epb::TerminalSize {
                    width: u32::from(size.width),
                    height: u32::from(size.height),
                })),
            };
            if in_tx.send(m).await.is_err() {
                return;
            }
        }
        buf.drain(..used);
        if buf.len() > 4096 {
            return; // not a stream of sizes
        }
    }
}

/// Streams of a port-forward waiting for their other half, at most.
const MAX_UNPAIRED: usize = 64;

async fn run_port_forward<IO>(io: IO, p: PortForwardSession)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let spdy::Conn {
        mut incoming,
        sender: tx,
        closed: _,
    } = spdy::serve(io);
    // Half pairs: (error stream id, data stream), and when the first half came.
    type Half = (Option<u32>, Option<spdy::Incoming>, Instant);
    let mut pairs: HashMap<String, Half> = HashMap::new();
    while let Some(s) = incoming.recv().await {
        // A half whose other half did not come within the stream creation timeout goes.
        let mut stale = Vec::new();
        pairs.retain(|_, (e, d, at)| {
            let keep = at.elapsed() < STREAM_CREATION_TIMEOUT;
            if !keep {
                stale.extend(e.iter().copied().chain(d.as_ref().map(|d| d.id)));
            }
            keep
        });
        for id in stale {
            tx.reset(id).await;
        }
        let kind = s.header("streamtype").unwrap_or("").to_ascii_lowercase();
        let port = s.header("port").and_then(|v| v.trim().parse::<u16>().ok());
        let Some(port) = port.filter(|&x| x != 0) else {
            tx.reset(s.id).await;
            continue;
        };
        // Older clients pair by stream id: a data stream follows its error stream.
        let key = match s.header("requestid") {
            Some(r) => format!("{port}/{r}"),
            None if kind == "error" => format!("{port}/#{}", s.id + 2),
            None => format!("{port}/#{}", s.id),
        };
        if !pairs.contains_key(&key) && pairs.len() >= MAX_UNPAIRED {
            tx.reset(s.id).await;
            continue;
        }
        let slot = pairs
            .entry(key.clone())
            .or_insert_with(|| (None, None, Instant::now()));
        match kind.as_str() {
            // Nothing is read from the error stream: its receiver goes.
            "error" if slot.0.is_none() => slot.0 = Some(s.id),
            "data" if slot.1.is_none() => slot.1 = Some(s),
            _ => {
                tx.reset(s.id).await;
                continue;
            }
        }
        let complete = pairs
            .get(&key)
            .is_some_and(|(e, d, _)| e.is_some() && d.is_some());
        if let Some((Some(err), Some(data), _)) = complete.then(|| pairs.remove(&key)).flatten() {
            let allowed = p.ports.is_empty() || p.ports.contains(&port);
            let (tx, target, pod) = (tx.clone(), p.target.clone(), p.pod.clone());
            tokio::spawn(async move {
                forward(tx, err, data, port, allowed, target, pod).await;
            });
        }
    }
}

/// Relays one port-forward connection. When the pod's side ends, the data stream is closed
/// and, a second later (or when the client has closed its side), the error stream too, which is
/// what tells the client this connection is over.
async fn forward(
    tx: spdy::Sender,
    err: u32,
    mut data: spdy::Incoming,
    port: u16,
    allowed: bool,
    target: PortTarget,
    pod: String,
) {
    let fail = |msg: String| {
        let tx = tx.clone();
        let data = data.id;
        async move {
            tx.data(err, msg.as_bytes()).await;
            tx.close(err).await;
            tx.close(data).await;
        }
    };
    if !allowed {
        fail(format!(
            "port {port} of pod {pod} was not in the PortForward request"
        ))
        .await;
        return;
    }
    let conn = match connect(&target, port).await {
        Ok(c) => c,
        Err(e) => {
            fail(format!("error forwarding port {port} to pod {pod}: {e}")).await;
            return;
        }
    };
    let (mut rd, mut wr) = conn.into_split();
    let data_id = data.id;
    let mut up = tokio::spawn(async move {
        while let Some(d) = data.data.recv().await {
            if wr.write_all(&d).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if !tx.data(data_id, &buf[..n]).await {
                    break;
                }
            }
        }
    }
    tx.close(data_id).await;
    if tokio::time::timeout(Duration::from_secs(1), &mut up)
        .await
        .is_err()
    {
        up.abort();
    }
    tx.close(err).await;
}

/// A TCP connection to `port` of the pod.
async fn connect(target: &PortTarget, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    match target {
        PortTarget::Address(a) => tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect((*a, port)),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?,
        PortTarget::Netns(ns) => {
            let ns = ns.clone();
            // A socket stays in the netns it was made in: make it on a thread of its own that
            // entered the pod's (and ends after), then use it from here.
            let (done, made) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let s = (|| -> std::io::Result<std::net::TcpStream> {
                    let f = std::fs::File::open(&ns).map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!(
                                "the tenant's network namespace {}: {e} (is its engine running?)",
                                ns.display()
                            ),
                        )
                    })?;
                    nix::sched::setns(
                        std::os::fd::AsFd::as_fd(&f),
                        nix::sched::CloneFlags::CLONE_NEWNET,
                    )
                    .map_err(std::io::Error::from)?;
                    std::net::TcpStream::connect_timeout(
                        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                        Duration::from_secs(10),
                    )
                })();
                let _ = done.send(s);
            });
            let s = made
                .await
                .map_err(|_| std::io::Error::other("the connecting thread died"))??;
            s.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_endings_as_each_protocol_reports_them() {
        let cmd = vec!["sh".to_string()];
        let ok = exec_status("v4.channel.k8s.io", Ok(0), &cmd).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&ok).unwrap();
        assert_eq!(v["status"], "Success");
        let bad = exec_status("v4.channel.k8s.io", Ok(3), &cmd).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bad).unwrap();
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        assert_eq!(exec_status("v3.channel.k8s.io", Ok(0), &cmd), None);
        let e = exec_status("v2.channel.k8s.io", Err("boom".into()), &cmd).unwrap();
        assert_eq!(e, b"boom");
    }
}
