//! The engine protocol service. The one place where engine errors become gRPC statuses.

use std::{
    io::{Read, Seek, SeekFrom},
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use caas_proto::{engine::v1 as epb, v1 as pb};
use futures::Stream;
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::fdio::FdIo;
use super::record::State;
use super::runtime::{
    AttachInput, AttachIo, CreateSpec, Engine, EngineError, ExecIo, ExecStdio, to_pb,
};

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Longest a log line read for `tail` may be before it is cut.
const MAX_TAIL_BYTES: u64 = 8 << 20;
/// Largest piece of a log file sent in one message while following.
const MAX_LOG_CHUNK: usize = 1 << 20;

fn status(e: EngineError) -> Status {
    match e {
        EngineError::NotFound(_) => Status::not_found(e.to_string()),
        EngineError::NameTaken(_) => Status::already_exists(e.to_string()),
        EngineError::Invalid(_) => Status::invalid_argument(e.to_string()),
        EngineError::State(_) => Status::failed_precondition(e.to_string()),
        EngineError::Quota(_) => Status::resource_exhausted(e.to_string()),
        EngineError::Runtime(_) => Status::internal(e.to_string()),
    }
}

/// The service.
#[derive(Clone)]
pub struct EngineSvc {
    /// The engine (one thread: the lock is never contended, it only satisfies `Sync`).
    pub eng: Arc<Mutex<Engine>>,
    /// Cancelled to stop serving.
    pub shutdown: CancellationToken,
    /// Tenant id.
    pub tenant: String,
    /// When this engine started.
    pub started_ms: u64,
    /// It runs in a VM tenant's guest: it runs CNI plugins and pod rules there, which the agent
    /// does itself for a user-namespaced tenant.
    pub in_vm: bool,
}

impl EngineSvc {
    /// The output stream of an exec'd process: its stdout and stderr as they come, then its
    /// exit code. `input` (an interactive exec) feeds its stdin and terminal size. A caller that
    /// goes away (a probe's timeout, a closed terminal) takes the process with it.
    fn exec_output(
        &self,
        stdio: ExecStdio,
        code: tokio::sync::oneshot::Receiver<i32>,
        pid: i32,
        input: Option<tonic::Streaming<epb::ExecInput>>,
        size: Option<(u16, u16)>,
    ) -> Streamed<pb::ExecOutput> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let pump = |fd: FdIo, wrap: fn(Vec<u8>) -> pb::exec_output::Output| {
            let tx = tx.clone();
            async move {
                let mut buf = vec![0u8; 32 << 10];
                loop {
                    match fd.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let msg = pb::ExecOutput {
                                output: Some(wrap(buf[..n].to_vec())),
                            };
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        };
        let (out, err, stdin, tty) = match stdio {
            ExecStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => (
                FdIo::new(stdout).ok(),
                FdIo::new(stderr).ok(),
                stdin.and_then(|f| FdIo::new(f).ok()),
                false,
            ),
            ExecStdio::Tty(master) => {
                let out = FdIo::new(master).ok();
                let writer = out.as_ref().and_then(|o| o.try_clone().ok());
                (out, None, writer, true)
            }
        };
        // The terminal's size is set here (and on each resize) through a handle of its own,
        // which outlives the end of stdin.
        let resizer = if tty {
            stdin.as_ref().and_then(|w| w.try_clone().ok())
        } else {
            None
        };
        if let (Some(r), Some((cols, rows))) = (&resizer, size) {
            let _ = r.resize(cols, rows);
        }
        // (The watch ends with the output, so that the stream can end.)
        let (finished, mut finish) = tokio::sync::oneshot::channel::<()>();
        {
            let (tx, eng) = (tx.clone(), self.eng.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = tx.closed() => {
                        if let Ok(mut e) = eng.lock() {
                            e.kill_exec(pid);
                        }
                    }
                    _ = &mut finish => {}
                }
            });
        }
        if let Some(mut input) = input {
            // Input until the caller's stream ends or says stdin ended; for a terminal, its
            // master stays open for output after stdin ends (its reader holds it).
            tokio::spawn(async move {
                let mut stdin = stdin;
                while let Ok(Some(m)) = input.message().await {
                    match m.input {
                        Some(epb::exec_input::Input::Stdin(data)) => {
                            if let Some(w) = &stdin
                                && w.write_all(&data).await.is_err()
                            {
                                stdin = None;
                            }
                        }
                        Some(epb::exec_input::Input::StdinClose(true)) => {
                            if tty {
                                // End of file on a terminal is its EOF character (^D) at
                                // the start of a line, as a terminal user would type it.
                                if let Some(w) = &stdin {
                                    let _ = w.write_all(&[4]).await;
                                }
                            }
                            stdin = None;
                        }
                        Some(epb::exec_input::Input::Resize(s)) => {
                            if let Some(r) = &resizer {
                                let cols = u16::try_from(s.width).unwrap_or(u16::MAX);
                                let rows = u16::try_from(s.height).unwrap_or(u16::MAX);
                                let _ = r.resize(cols, rows);
                            }
                        }
                        _ => {}
                    }
                }
            });
        } else {
            drop((stdin, resizer));
        }
        let out_task = out.map(|o| tokio::spawn(pump(o, pb::exec_output::Output::Stdout)));
        let err_task = err.map(|e| tokio::spawn(pump(e, pb::exec_output::Output::Stderr)));
        tokio::spawn(async move {
            if let Some(t) = out_task {
                let _ = t.await;
            }
            if let Some(t) = err_task {
                let _ = t.await;
            }
            let last = match code.await {
                Ok(c) => Ok(pb::ExecOutput {
                    output: Some(pb::exec_output::Output::ExitCode(c)),
                }),
                Err(_) => Err(Status::aborted("the exec process was lost")),
            };
            let _ = tx.send(last).await;
            drop(finished);
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// An attach: the container's output from now on (what its log files gain), its stdin and
    /// terminal fed from `input`; ends (with exit code 0: the attach, not the container, is
    /// what ended well) once the container has exited and its output is sent.
    fn attach_output(
        &self,
        io: AttachIo,
        mut input: tonic::Streaming<epb::ExecInput>,
    ) -> Streamed<pb::ExecOutput> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let exited = self.lock().ok().and_then(|e| e.exit_watch(&io.id).ok());
        // The output is taken from where the files end now, before any input can make more.
        let open_at_end = |p: &std::path::Path| {
            let mut f = std::fs::File::open(p).ok()?;
            f.seek(SeekFrom::End(0)).ok()?;
            Some(f)
        };
        let mut files = [
            (
                open_at_end(&io.stdout_log),
                pb::exec_output::Output::Stdout as fn(Vec<u8>) -> _,
            ),
            (
                open_at_end(&io.stderr_log),
                pb::exec_output::Output::Stderr as fn(Vec<u8>) -> _,
            ),
        ];
        {
            let (eng, id) = (self.eng.clone(), io.id.clone());
            let (input_to, tty, once) = (io.input.clone(), io.tty.clone(), io.stdin_once);
            tokio::spawn(async move {
                // This attach's stdin ended (said so, or its caller went away): with
                // stdin_once the container's stdin closes, for every attach at once.
                let close_once = async || {
                    if once && let AttachInput::Pipe(p) = &input_to {
                        p.lock().await.take();
                        if let Ok(mut e) = eng.lock() {
                            e.forget_stdin(&id);
                        }
                    }
                };
                let mut open = true;
                while let Ok(Some(m)) = input.message().await {
                    match m.input {
                        Some(epb::exec_input::Input::Stdin(data)) if open => {
                            let ok = match &input_to {
                                AttachInput::Pipe(p) => match &*p.lock().await {
                                    Some(fd) => fd.write_all(&data).await.is_ok(),
                                    None => false,
                                },
                                AttachInput::Tty(t) => t.write_all(&data).await.is_ok(),
                                AttachInput::None => true,
                            };
                            open = ok;
                        }
                        Some(epb::exec_input::Input::StdinClose(true)) if open => {
                            open = false;
                            close_once().await;
                        }
                        Some(epb::exec_input::Input::Resize(s)) => {
                            if let Some(t) = &tty {
                                let cols = u16::try_from(s.width).unwrap_or(u16::MAX);
                                let rows = u16::try_from(s.height).unwrap_or(u16::MAX);
                                let _ = t.resize(cols, rows);
                            }
                        }
                        _ => {}
                    }
                }
                if open {
                    close_once().await;
                }
            });
        }
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                // Whether it had ended before this round: then this round's reads are the last.
                let done = exited.as_ref().is_none_or(|(_, w)| *w.borrow());
                for (f, wrap) in &mut files {
                    let Some(f) = f else { continue };
                    loop {
                        match f.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let m = pb::ExecOutput {
                                    output: Some(wrap(buf[..n].to_vec())),
                                };
                                if tx.send(Ok(m)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                if done {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    () = tx.closed() => return,
                }
            }
            let _ = tx
                .send(Ok(pb::ExecOutput {
                    output: Some(pb::exec_output::Output::ExitCode(0)),
                }))
                .await;
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// Refuses what only a VM guest's engine does.
    fn vm_only(&self, what: &str) -> Result<(), Status> {
        if self.in_vm {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "{what}: only a VM tenant's guest engine does this; the agent does it on the host for a user-namespaced tenant"
            )))
        }
    }

    /// Runs `cmd` (stdio piped) as a child the engine reaps: feeds it `input`, collects its
    /// output, and gives its exit code (128 + the signal's number when a signal ended it, as
    /// [`Engine::reap`] records it). Killed after `limit`.
    async fn run_tracked(
        &self,
        mut cmd: std::process::Command,
        input: Vec<u8>,
        limit: Duration,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), String> {
        let (mut child, code) = self
            .lock()
            .map_err(|e| e.message().to_string())?
            .spawn_tracked(&mut cmd)
            .map_err(|e| format!("starting {}: {e}", cmd.get_program().to_string_lossy()))?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let fdio = |fd: Option<std::os::fd::OwnedFd>| {
            fd.map(FdIo::new)
                .transpose()
                .map_err(|e| format!("its pipes: {e}"))
        };
        let stdin = fdio(child.stdin.take().map(Into::into))?;
        let stdout = fdio(child.stdout.take().map(Into::into))?;
        let stderr = fdio(child.stderr.take().map(Into::into))?;
        let read_all = |f: Option<FdIo>| async move {
            let mut out = Vec::new();
            if let Some(f) = f {
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n) = f.read(&mut buf).await {
                    if n == 0 || out.len() > 4 << 20 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
            }
            out
        };
        let run = async move {
            let feed = async move {
                if let Some(w) = stdin {
                    // A process that exits without reading all of it still has its say.
                    let _ = w.write_all(&input).await;
                }
            };
            let ((), out, err, code) = tokio::join!(feed, read_all(stdout), read_all(stderr), code);
            (code.unwrap_or(-1), out, err)
        };
        match tokio::time::timeout(limit, run).await {
            Ok((code, out, err)) => Ok((code, out, err)),
            Err(_) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                Err(format!(
                    "took longer than {} s and was killed",
                    limit.as_secs()
                ))
            }
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Engine>, Status> {
        self.eng
            .lock()
            .map_err(|_| Status::internal("engine state lock poisoned"))
    }

    async fn wait_exit(&self, key: &str, limit: Option<Duration>) -> Result<bool, Status> {
        let (_, mut rx) = self.lock()?.exit_watch(key).map_err(status)?;
        let wait = rx.wait_for(|exited| *exited);
        match limit {
            None => wait
                .await
                .map(|_| true)
                .map_err(|_| Status::aborted("container was deleted")),
            Some(d) => Ok(matches!(tokio::time::timeout(d, wait).await, Ok(Ok(_)))),
        }
    }
}

fn signal(n: i32, default: Signal) -> Result<Signal, Status> {
    if n == 0 {
        return Ok(default);
    }
    Signal::try_from(n)
        .map_err(|_| Status::invalid_argument(format!("signal: {n} is not a signal")))
}

#[tonic::async_trait]
impl epb::engine_server::Engine for EngineSvc {
    async fn info(
        &self,
        _: Request<epb::InfoRequest>,
    ) -> Result<Response<epb::EngineInfo>, Status> {
        let n = self.lock()?.list().len();
        Ok(Response::new(epb::EngineInfo {
            tenant: self.tenant.clone(),
            pid: std::process::id(),
            version: crate::VERSION.into(),
            started_at_unix_ms: self.started_ms,
            containers: u32::try_from(n).unwrap_or(u32::MAX),
            pod_networks: self.in_vm
                && std::path::Path::new(crate::vm::initramfs::GUEST_NFT).is_file(),
        }))
    }

    async fn create(
        &self,
        req: Request<epb::CreateRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let r = req.into_inner();
        if r.unconfined && !r.seccomp.is_empty() {
            return Err(Status::invalid_argument(
                "unconfined and seccomp: a container runs either without a filter or with a profile, not both",
            ));
        }
        let res = r.resources.unwrap_or_default();
        let spec = CreateSpec {
            id: r.id,
            name: r.name,
            image: r.image,
            rootfs: PathBuf::from(r.rootfs),
            command: r.command,
            env: r.env,
            workdir: r.workdir,
            cpus: res.cpus,
            cpu_shares: res.cpu_shares,
            memory_bytes: res.memory_bytes,
            pids: res.pids,
            labels: r.labels,
            max_containers: r.max_containers,
            lower_dirs: r.lower_dirs.into_iter().map(PathBuf::from).collect(),
            user: r.user,
            hostname: r.hostname,
            resolv_conf: r.resolv_conf,
            cap_drop: r.cap_drop,
            mounts: r
                .mounts
                .into_iter()
                .map(|m| crate::engine::spec::Bind {
                    host: PathBuf::from(m.host_path),
                    inside: m.container_path,
                    readonly: m.readonly,
                    recursive_read_only: m.recursive_read_only,
                    image_layers: m.image_layers.into_iter().map(PathBuf::from).collect(),
                    device_access: m.device_access,
                    idmap: m.idmap,
                    host_to_container: m.host_to_container,
                })
                .collect(),
            oom_score_adj: r.oom_score_adj,
            readonly_rootfs: r.readonly_rootfs,
            supplemental_groups: r.supplemental_groups,
            merge_image_groups: r.merge_image_groups,
            stdin: r.stdin,
            stdin_once: r.stdin_once,
            tty: r.tty,
            netns: r.netns,
            masked_paths: r.masked_paths,
            readonly_paths: r.readonly_paths,
            sysctls: r.sysctls.into_iter().collect(),
            seccomp: r.seccomp,
            pidns: r.pidns,
            cap_add: r.cap_add,
            pid_target: r.pid_target,
            allow_privilege_escalation: r.allow_privilege_escalation,
            unconfined: r.unconfined,
        };
        let mut eng = self.lock()?;
        let rec = eng.create(spec).map_err(status)?;
        Ok(Response::new(to_pb(&self.tenant, &rec)))
    }

    async fn start(
        &self,
        req: Request<epb::ContainerId>,
    ) -> Result<Response<pb::Container>, Status> {
        let rec = self
            .lock()?
            .start(&req.into_inner().container)
            .map_err(status)?;
        Ok(Response::new(to_pb(&self.tenant, &rec)))
    }

    async fn kill(
        &self,
        req: Request<epb::KillRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let r = req.into_inner();
        let sig = signal(r.signal, Signal::SIGKILL)?;
        let rec = self.lock()?.signal(&r.container, sig).map_err(status)?;
        Ok(Response::new(to_pb(&self.tenant, &rec)))
    }

    async fn stop(
        &self,
        req: Request<epb::StopRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let r = req.into_inner();
        let sig = signal(r.signal, Signal::SIGTERM)?;
        let grace = Duration::from_secs(u64::from(if r.grace_seconds == 0 {
            10
        } else {
            r.grace_seconds
        }));
        let running = self.lock()?.get(&r.container).map_err(status)?.state != State::Exited;
        if running {
            self.lock()?.signal(&r.container, sig).map_err(status)?;
            if !self.wait_exit(&r.container, Some(grace)).await? {
                // PID 1 ignores signals it has no handler for: escalate.
                tracing::info!(container = %r.container, ?grace, "grace period over, sending SIGKILL");
                let _ = self.lock()?.signal(&r.container, Signal::SIGKILL);
                self.wait_exit(&r.container, Some(Duration::from_secs(10)))
                    .await?;
            }
        }
        let rec = self.lock()?.get(&r.container).map_err(status)?.clone();
        Ok(Response::new(to_pb(&self.tenant, &rec)))
    }

    async fn delete(
        &self,
        req: Request<epb::DeleteRequest>,
    ) -> Result<Response<epb::DeleteResponse>, Status> {
        let r = req.into_inner();
        let (id, state) = {
            let eng = self.lock()?;
            let rec = eng.get(&r.container).map_err(status)?;
            (rec.id.clone(), rec.state)
        };
        if state != State::Exited {
            if !r.force {
                return Err(Status::failed_precondition(format!(
                    "container {:?} is running; stop it first or delete with force",
                    r.container
                )));
            }
            let _ = self.lock()?.signal(&id, Signal::SIGKILL);
            if !self.wait_exit(&id, Some(Duration::from_secs(10))).await? {
                return Err(Status::deadline_exceeded(
                    "the container did not exit within 10 s of SIGKILL",
                ));
            }
        }
        self.lock()?.remove(&id).map_err(status)?;
        Ok(Response::new(epb::DeleteResponse {}))
    }

    async fn wait(
        &self,
        req: Request<epb::ContainerId>,
    ) -> Result<Response<pb::WaitContainerResponse>, Status> {
        let key = req.into_inner().container;
        self.wait_exit(&key, None).await?;
        let eng = self.lock()?;
        let rec = eng.get(&key).map_err(status)?;
        Ok(Response::new(pb::WaitContainerResponse {
            exit_code: rec.exit_code,
            oom_killed: rec.oom_killed,
        }))
    }

    async fn list(
        &self,
        _: Request<epb::ListRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let recs = self.lock()?.list();
        Ok(Response::new(pb::ListContainersResponse {
            containers: recs.iter().map(|r| to_pb(&self.tenant, r)).collect(),
        }))
    }

    async fn create_netns(
        &self,
        req: Request<epb::NetnsRequest>,
    ) -> Result<Response<epb::NetnsReply>, Status> {
        let path = self
            .lock()?
            .create_netns(&req.into_inner().name)
            .map_err(status)?;
        Ok(Response::new(epb::NetnsReply {
            path: path.to_string_lossy().into_owned(),
        }))
    }

    async fn create_pidns(
        &self,
        req: Request<epb::NetnsRequest>,
    ) -> Result<Response<epb::NetnsReply>, Status> {
        let pid = self
            .lock()?
            .create_pidns(&req.into_inner().name)
            .map_err(status)?;
        Ok(Response::new(epb::NetnsReply {
            path: format!("/proc/{pid}/ns/pid"),
        }))
    }

    async fn delete_pidns(
        &self,
        req: Request<epb::NetnsRequest>,
    ) -> Result<Response<epb::NetnsReply>, Status> {
        self.lock()?
            .delete_pidns(&req.into_inner().name)
            .map_err(status)?;
        Ok(Response::new(epb::NetnsReply::default()))
    }

    async fn delete_netns(
        &self,
        req: Request<epb::NetnsRequest>,
    ) -> Result<Response<epb::NetnsReply>, Status> {
        self.lock()?
            .delete_netns(&req.into_inner().name)
            .map_err(status)?;
        Ok(Response::new(epb::NetnsReply::default()))
    }

    async fn cni_plugin(
        &self,
        req: Request<epb::CniPluginRequest>,
    ) -> Result<Response<epb::CniPluginReply>, Status> {
        self.vm_only("CniPlugin")?;
        let r = req.into_inner();
        let bad = |m: String| Status::invalid_argument(format!("CniPlugin: {m}"));
        if !matches!(r.command.as_str(), "ADD" | "DEL" | "CHECK") {
            return Err(bad(format!(
                "command {:?} is not ADD, DEL or CHECK",
                r.command
            )));
        }
        if !(1..=600).contains(&r.timeout_seconds) {
            return Err(bad(format!(
                "timeout_seconds {} is outside 1..=600",
                r.timeout_seconds
            )));
        }
        crate::validate::check_id("netns", &r.netns).map_err(|e| bad(e.to_string()))?;
        for (what, v) in [("container_id", &r.container_id), ("ifname", &r.ifname)] {
            if v.is_empty() || v.len() > 64 || v.contains(['/', '\0']) {
                return Err(bad(format!("{what} {v:?} is empty, too long or holds '/'")));
            }
        }
        let (bin_dir, imports, ns_dir) = {
            let eng = self.lock()?;
            (
                eng.paths().run.join("cni-bin"),
                eng.paths().imports(),
                eng.paths().ns(),
            )
        };
        if !r.plugins.contains_key(&r.plugin) {
            return Err(bad(format!(
                "plugin {:?} is not among the plugins sent",
                r.plugin
            )));
        }
        link_plugins(&bin_dir, &imports, &r.plugins).map_err(|e| {
            Status::failed_precondition(format!("CniPlugin: the plugins sent in: {e}"))
        })?;
        let netns = crate::engine::ns::pod_netns_path(&ns_dir, &r.netns);
        let tenant_ns = std::fs::File::open(ns_dir.join("net"))
            .map_err(|e| Status::internal(format!("CniPlugin: the tenant's netns: {e}")))?;
        let cni_path = bin_dir.to_string_lossy().into_owned();
        let inv = crate::cri::cni::Invocation {
            command: &r.command,
            container_id: &r.container_id,
            netns: &netns,
            ifname: &r.ifname,
            args: &r.args,
            cni_path: &cni_path,
        };
        let cmd = inv.command(&bin_dir.join(&r.plugin), Some(tenant_ns));
        let (code, stdout, stderr) = self
            .run_tracked(cmd, r.config, Duration::from_secs(r.timeout_seconds.into()))
            .await
            .map_err(|e| Status::internal(format!("CniPlugin {:?}: {e}", r.plugin)))?;
        Ok(Response::new(epb::CniPluginReply {
            exit_code: code,
            stdout,
            stderr,
        }))
    }

    async fn pod_rules(
        &self,
        req: Request<epb::PodRulesRequest>,
    ) -> Result<Response<epb::PodRulesReply>, Status> {
        self.vm_only("PodRules")?;
        let (tenant_ip, forwards) = crate::cri::cni::forwards_of(&req.into_inner())
            .map_err(|e| Status::invalid_argument(format!("PodRules: {e}")))?;
        let net = self.lock()?.paths().ns().join("net");
        let open = || {
            std::fs::File::open(&net)
                .map_err(|e| Status::internal(format!("PodRules: the tenant's netns: {e}")))
        };
        crate::cri::cni::enable_forwarding(open()?)
            .map_err(|e| Status::internal(format!("PodRules: turning forwarding on: {e}")))?;
        let script = crate::cri::cni::tenant_rules(tenant_ip, &forwards);
        let (code, _, stderr) = self
            .run_tracked(
                crate::cri::cni::nft_in(open()?),
                script.into_bytes(),
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| Status::internal(format!("PodRules: nft: {e}")))?;
        if code != 0 {
            return Err(Status::internal(format!(
                "PodRules: nft: {}",
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
        Ok(Response::new(epb::PodRulesReply {}))
    }

    async fn inspect(
        &self,
        req: Request<epb::ContainerId>,
    ) -> Result<Response<pb::Container>, Status> {
        let eng = self.lock()?;
        let rec = eng.get(&req.into_inner().container).map_err(status)?;
        Ok(Response::new(to_pb(&self.tenant, rec)))
    }

    async fn update(
        &self,
        req: Request<epb::UpdateRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let r = req.into_inner();
        let res = r.resources.unwrap_or_default();
        let mut eng = self.lock()?;
        let rec = eng
            .update(
                &r.container,
                res.cpus,
                res.cpu_shares,
                res.memory_bytes,
                res.pids,
            )
            .map_err(status)?;
        Ok(Response::new(to_pb(&self.tenant, rec)))
    }

    type ExecStream = Streamed<pb::ExecOutput>;
    async fn exec(
        &self,
        req: Request<epb::ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let r = req.into_inner();
        let (stdio, code, pid) = self
            .lock()?
            .exec(
                &r.container,
                r.command,
                &r.env,
                &r.workdir,
                ExecIo::default(),
            )
            .map_err(status)?;
        Ok(Response::new(
            self.exec_output(stdio, code, pid, None, None),
        ))
    }

    type ExecInteractiveStream = Streamed<pb::ExecOutput>;
    async fn exec_interactive(
        &self,
        req: Request<tonic::Streaming<epb::ExecInput>>,
    ) -> Result<Response<Self::ExecInteractiveStream>, Status> {
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .and_then(|m| m.input)
            .ok_or_else(|| Status::invalid_argument("the first message must be start"))?;
        let epb::exec_input::Input::Start(start) = first else {
            return Err(Status::invalid_argument("the first message must be start"));
        };
        let r = start
            .exec
            .ok_or_else(|| Status::invalid_argument("start.exec: missing"))?;
        if start.attach {
            let io = self
                .lock()?
                .attach_io(&r.container, start.stdin, start.tty)
                .map_err(status)?;
            return Ok(Response::new(self.attach_output(io, input)));
        }
        let size = |s: Option<epb::TerminalSize>| {
            let s = s.unwrap_or_default();
            let clamp = |v: u32, default: u16| {
                if v == 0 {
                    default
                } else {
                    u16::try_from(v).unwrap_or(u16::MAX)
                }
            };
            (clamp(s.width, 80), clamp(s.height, 24))
        };
        let io = ExecIo {
            stdin: start.stdin,
            tty: start.tty.then(|| size(start.size)),
        };
        let (stdio, code, pid) = self
            .lock()?
            .exec(&r.container, r.command, &r.env, &r.workdir, io)
            .map_err(status)?;
        Ok(Response::new(self.exec_output(
            stdio,
            code,
            pid,
            Some(input),
            io.tty,
        )))
    }

    type LogsStream = Streamed<pb::LogChunk>;
    async fn logs(
        &self,
        req: Request<epb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let r = req.into_inner();
        let (out, err) = self.lock()?.log_paths(&r.container).map_err(status)?;
        let (_, mut exited) = self.lock()?.exit_watch(&r.container).map_err(status)?;
        let want = pb::LogStream::try_from(r.stream).unwrap_or(pb::LogStream::Unspecified);
        let files: Vec<(pb::LogStream, PathBuf)> =
            [(pb::LogStream::Stdout, out), (pb::LogStream::Stderr, err)]
                .into_iter()
                .filter(|(s, _)| want == pb::LogStream::Unspecified || want == *s)
                .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let stop = self.shutdown.clone();
        let (tail, follow) = (r.tail, r.follow);
        let resume = (r.stdout_offset, r.stderr_offset);
        tokio::spawn(async move {
            let mut offsets = Vec::new();
            for (stream, path) in &files {
                let from = match stream {
                    pb::LogStream::Stderr => resume.1,
                    _ => resume.0,
                };
                if let Some(off) = from {
                    offsets.push(off);
                    continue;
                }
                let (data, end) = read_tail(path, tail);
                if !data.is_empty() && tx.send(Ok(chunk(*stream, data))).await.is_err() {
                    return;
                }
                offsets.push(end);
            }
            if !follow && resume == (None, None) {
                return;
            }
            loop {
                let done = *exited.borrow();
                // Read in pieces of at most MAX_LOG_CHUNK; a file with more is read again at
                // once, not after the poll interval.
                let mut more = false;
                for ((stream, path), off) in files.iter().zip(offsets.iter_mut()) {
                    let (data, end) = read_from(path, *off);
                    more |= data.len() == MAX_LOG_CHUNK;
                    *off = end;
                    if !data.is_empty() && tx.send(Ok(chunk(*stream, data))).await.is_err() {
                        return;
                    }
                }
                if more {
                    continue;
                }
                if done || !follow {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = exited.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type EventsStream = Streamed<pb::ContainerEvent>;
    async fn events(
        &self,
        req: Request<epb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let (past, mut rx) = self.lock()?.subscribe(req.into_inner().after_seq);
        let (tx, out) = tokio::sync::mpsc::channel(64);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            for e in past {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = rx.recv() => match ev {
                        Ok(e) => if tx.send(Ok(e)).await.is_err() { return },
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx.send(Err(Status::data_loss(format!("{n} events were dropped; resume with after_seq")))).await;
                            return;
                        }
                        Err(_) => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn shutdown(
        &self,
        req: Request<epb::ShutdownRequest>,
    ) -> Result<Response<epb::ShutdownResponse>, Status> {
        if req.into_inner().kill_containers {
            let ids: Vec<String> = self.lock()?.list().into_iter().map(|r| r.id).collect();
            for id in ids {
                self.delete(Request::new(epb::DeleteRequest {
                    container: id,
                    force: true,
                }))
                .await?;
            }
            self.lock()?.delete_all_pidns();
        }
        self.shutdown.cancel();
        Ok(Response::new(epb::ShutdownResponse {}))
    }

    async fn import(
        &self,
        req: Request<tonic::Streaming<epb::ImportChunk>>,
    ) -> Result<Response<epb::ImportResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("import: the stream is empty"))?;
        let key = import_key(&first.key)?;
        let kind = epb::ImportKind::try_from(first.kind)
            .ok()
            .filter(|k| *k != epb::ImportKind::Unspecified)
            .ok_or_else(|| {
                Status::invalid_argument(
                    "import: kind must be dir-tar, file, layer-tar, volume-dir-tar or volume-file",
                )
            })?;
        let dir = self.lock()?.paths().imports();
        let dest = dir.join(key);
        if dest.join(IMPORT_COMPLETE).exists() {
            return Ok(Response::new(epb::ImportResponse {
                path: import_path(&dest, kind).to_string_lossy().into_owned(),
            }));
        }
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{key}-{n}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| internal_io(&tmp, &e))?;
        let received = async {
            use std::io::Write;
            let data = tmp.join("data");
            let mut f = std::fs::File::create(&data).map_err(|e| internal_io(&data, &e))?;
            f.write_all(&first.data)
                .map_err(|e| internal_io(&data, &e))?;
            let mut total = first.data.len() as u64;
            let mut done = first.done.then_some(first.total_bytes);
            while let Some(m) = stream.message().await? {
                total += m.data.len() as u64;
                if total > MAX_IMPORT_BYTES {
                    return Err(Status::resource_exhausted(format!(
                        "import: larger than {MAX_IMPORT_BYTES} bytes"
                    )));
                }
                f.write_all(&m.data).map_err(|e| internal_io(&data, &e))?;
                if m.done {
                    done = Some(m.total_bytes);
                }
            }
            match done {
                Some(n) if n == total => {}
                Some(n) => {
                    return Err(Status::data_loss(format!(
                        "import {key}: {total} bytes arrived, the host sent {n}"
                    )));
                }
                None => {
                    return Err(Status::aborted(format!(
                        "import {key}: the stream ended before the host said it was whole"
                    )));
                }
            }
            f.sync_all().map_err(|e| internal_io(&data, &e))?;
            drop(f);
            match kind {
                epb::ImportKind::DirTar
                | epb::ImportKind::LayerTar
                | epb::ImportKind::VolumeDirTar => {
                    let root = import_path(&tmp, kind);
                    let file = std::fs::File::open(&data).map_err(|e| internal_io(&data, &e))?;
                    let mut ar = tar::Archive::new(std::io::BufReader::new(file));
                    ar.set_preserve_ownerships(true);
                    ar.set_preserve_permissions(true);
                    ar.set_unpack_xattrs(false);
                    ar.set_overwrite(true);
                    std::fs::create_dir_all(&root).map_err(|e| internal_io(&root, &e))?;
                    unpack_import(&mut ar, &root, kind == epb::ImportKind::LayerTar).map_err(
                        |e| {
                            let cause = std::error::Error::source(&e)
                                .map(|c| format!(": {c}"))
                                .unwrap_or_default();
                            Status::invalid_argument(format!(
                                "import {key}: unpacking the tar: {e}{cause}"
                            ))
                        },
                    )?;
                    let _ = std::fs::remove_file(&data);
                    if kind == epb::ImportKind::LayerTar {
                        opaque_markers_to_xattrs(&root).map_err(|e| internal_io(&root, &e))?;
                    }
                }
                epb::ImportKind::VolumeFile => {
                    let file = std::fs::File::open(&data).map_err(|e| internal_io(&data, &e))?;
                    let mut ar = tar::Archive::new(std::io::BufReader::new(file));
                    ar.set_preserve_ownerships(true);
                    ar.set_preserve_permissions(true);
                    ar.set_unpack_xattrs(false);
                    unpack_volume_file(&mut ar, &tmp).map_err(|e| {
                        Status::invalid_argument(format!("import {key}: unpacking the tar: {e}"))
                    })?;
                    let _ = std::fs::remove_file(&data);
                }
                _ => {
                    let to = import_path(&tmp, kind);
                    std::fs::rename(&data, &to).map_err(|e| internal_io(&to, &e))?;
                }
            }
            // On disk before it is called complete: a VM crash loses the guest's page cache.
            let fs = std::fs::File::open(&tmp).map_err(|e| internal_io(&tmp, &e))?;
            nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&fs))
                .map_err(|e| internal_io(&tmp, &e.into()))?;
            std::fs::write(tmp.join(IMPORT_COMPLETE), b"").map_err(|e| internal_io(&tmp, &e))?;
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::rename(&tmp, &dest).map_err(|e| internal_io(&dest, &e))?;
            crate::fsutil::sync_dir(&dir).map_err(|e| internal_io(&dir, &e))
        }
        .await;
        if let Err(e) = received {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(Response::new(epb::ImportResponse {
            path: import_path(&dest, kind).to_string_lossy().into_owned(),
        }))
    }

    async fn usage(
        &self,
        req: Request<epb::UsageRequest>,
    ) -> Result<Response<epb::UsageReport>, Status> {
        let (cpu, mem, tenant) = self
            .lock()?
            .usage(&req.into_inner().container)
            .map_err(status)?;
        Ok(Response::new(epb::UsageReport {
            container_cpu_usec: cpu,
            container_memory_bytes: mem,
            tenant_cpu_usec: tenant,
        }))
    }

    async fn read_volume_file(
        &self,
        req: Request<epb::ReadVolumeFileRequest>,
    ) -> Result<Response<epb::ReadVolumeFileReply>, Status> {
        let r = req.into_inner();
        let max = usize::try_from(r.max_bytes)
            .unwrap_or(usize::MAX)
            .min(MAX_VOLUME_FILE_READ);
        let data = self
            .lock()?
            .read_volume_file(&r.container, &r.container_path, max)
            .map_err(status)?;
        Ok(Response::new(epb::ReadVolumeFileReply { data }))
    }

    async fn sync_volume(
        &self,
        req: Request<epb::SyncVolumeRequest>,
    ) -> Result<Response<epb::SyncVolumeReply>, Status> {
        let r = req.into_inner();
        let from = import_key(&r.from_key)?;
        let changed = self
            .lock()?
            .sync_volume(&r.container, &r.container_path, from)
            .map_err(status)?;
        Ok(Response::new(epb::SyncVolumeReply { changed }))
    }

    async fn imported(
        &self,
        req: Request<epb::ImportedRequest>,
    ) -> Result<Response<epb::ImportedResponse>, Status> {
        let r = req.into_inner();
        let key = import_key(&r.key)?;
        let dest = self.lock()?.paths().imports().join(key);
        if !dest.join(IMPORT_COMPLETE).exists() {
            return Ok(Response::new(epb::ImportedResponse::default()));
        }
        let kind = if dest.join("rootfs").is_dir() {
            epb::ImportKind::DirTar
        } else if dest.join(crate::engine::runtime::VOLUME_IMPORT).exists() {
            epb::ImportKind::VolumeFile
        } else {
            epb::ImportKind::File
        };
        Ok(Response::new(epb::ImportedResponse {
            present: true,
            path: import_path(&dest, kind).to_string_lossy().into_owned(),
        }))
    }
}

/// Marks a finished import.
const IMPORT_COMPLETE: &str = ".complete";
/// The largest import (the tenant's disk bounds it too).
const MAX_IMPORT_BYTES: u64 = 64 << 30;
/// The most one ReadVolumeFile answers with.
const MAX_VOLUME_FILE_READ: usize = 1 << 20;

fn import_key(key: &str) -> Result<&str, Status> {
    let ok = !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(key)
    } else {
        Err(Status::invalid_argument(format!(
            "import: key {key:?} must be 1 to 64 of [a-z0-9-]"
        )))
    }
}

/// Unpacks an import's tar under `root`. tar's own unpacking makes device entries into empty
/// files, so they are handled here: in a layer, a 0/0 character device is an overlayfs whiteout
/// and is made as one; any other device node is skipped, as the host's image unpacker does.
/// Unpacks the one regular file named [`VOLUME_IMPORT`] of a volume-file import into `dir`;
/// any other entry is an error.
///
/// [`VOLUME_IMPORT`]: crate::engine::runtime::VOLUME_IMPORT
fn unpack_volume_file<R: std::io::Read>(
    ar: &mut tar::Archive<R>,
    dir: &std::path::Path,
) -> std::io::Result<()> {
    let mut found = false;
    for entry in ar.entries()? {
        let mut e = entry?;
        let name = e.path()?.into_owned();
        if found
            || e.header().entry_type() != tar::EntryType::Regular
            || name != std::path::Path::new(crate::engine::runtime::VOLUME_IMPORT)
        {
            return Err(std::io::Error::other(format!(
                "{}: a volume file import holds one regular file named {:?}",
                name.display(),
                crate::engine::runtime::VOLUME_IMPORT
            )));
        }
        e.unpack_in(dir)?;
        found = true;
    }
    if !found {
        return Err(std::io::Error::other("the tar is empty"));
    }
    Ok(())
}

fn unpack_import<R: std::io::Read>(
    ar: &mut tar::Archive<R>,
    root: &std::path::Path,
    layer: bool,
) -> std::io::Result<()> {
    for entry in ar.entries()? {
        let mut e = entry?;
        let kind = e.header().entry_type();
        if kind == tar::EntryType::Char || kind == tar::EntryType::Block {
            let (major, minor) = (
                e.header().device_major()?.unwrap_or(0),
                e.header().device_minor()?.unwrap_or(0),
            );
            if !(layer && kind == tar::EntryType::Char && major == 0 && minor == 0) {
                continue;
            }
            let rel = e.path()?.into_owned();
            if !rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                return Err(std::io::Error::other(format!(
                    "{}: not a plain relative path",
                    rel.display()
                )));
            }
            let dst = root.join(&rel);
            // Through no symlink an earlier entry made: the parent must resolve under the root.
            let parent = dst.parent().map(std::fs::canonicalize).transpose()?;
            let base = std::fs::canonicalize(root)?;
            if !parent.is_some_and(|p| p.starts_with(&base)) {
                return Err(std::io::Error::other(format!(
                    "{}: its directory is outside the import",
                    rel.display()
                )));
            }
            let _ = std::fs::remove_file(&dst);
            let c = std::ffi::CString::new(dst.as_os_str().as_encoded_bytes())
                .map_err(std::io::Error::other)?;
            // SAFETY: a NUL-terminated path; a 0/0 character device is an overlayfs whiteout.
            if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (uid, gid) = (e.header().uid()?, e.header().gid()?);
            std::os::unix::fs::lchown(&dst, u32::try_from(uid).ok(), u32::try_from(gid).ok())?;
            continue;
        }
        // The source directory itself (`.`): tar's unpacking skips it, so its owner and mode
        // (an emptyDir's 0777, a secret's fsGroup) would be lost; they go to the root.
        if kind == tar::EntryType::Directory
            && e.path()?
                .components()
                .all(|c| matches!(c, std::path::Component::CurDir))
        {
            use std::os::unix::fs::PermissionsExt;
            let (uid, gid) = (e.header().uid()?, e.header().gid()?);
            std::os::unix::fs::lchown(root, u32::try_from(uid).ok(), u32::try_from(gid).ok())?;
            std::fs::set_permissions(
                root,
                std::fs::Permissions::from_mode(e.header().mode()? & 0o7777),
            )?;
            continue;
        }
        e.unpack_in(root)?;
    }
    Ok(())
}

/// The name of the marker file that stands for an opaque directory in a layer tar (as in OCI).
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Turns every [`OPAQUE_MARKER`] file under `root` into its directory's overlayfs opaque
/// attribute.
fn opaque_markers_to_xattrs(root: &std::path::Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(root)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            opaque_markers_to_xattrs(&e.path())?;
        } else if ft.is_file() && e.file_name() == OPAQUE_MARKER {
            std::fs::remove_file(e.path())?;
            super::unpack::set_opaque(root)?;
        }
    }
    Ok(())
}

fn import_path(dest: &std::path::Path, kind: epb::ImportKind) -> PathBuf {
    match kind {
        epb::ImportKind::DirTar | epb::ImportKind::LayerTar => dest.join("rootfs"),
        epb::ImportKind::VolumeDirTar | epb::ImportKind::VolumeFile => {
            dest.join(crate::engine::runtime::VOLUME_IMPORT)
        }
        _ => dest.join("image.tar"),
    }
}

fn internal_io(path: &std::path::Path, e: &std::io::Error) -> Status {
    Status::internal(format!("{}: {e}", path.display()))
}

fn chunk(stream: pb::LogStream, data: Vec<u8>) -> pb::LogChunk {
    pb::LogChunk {
        stream: stream as i32,
        data,
        time_unix_ns: 0,
    }
}

/// The last `lines` lines of a file (all of it for 0), and the offset of its end.
fn read_tail(path: &std::path::Path, lines: u32) -> (Vec<u8>, u64) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), 0);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX_TAIL_BYTES);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return (Vec::new(), len);
    }
    let end = start + buf.len() as u64;
    if lines == 0 {
        return (buf, end);
    }
    let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
    let cut = body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(lines as usize - 1)
        .map(|(i, _)| i + 1)
        .unwrap_or(0);
    (buf[cut..].to_vec(), end)
}

/// What a file holds from `off` on, at most [`MAX_LOG_CHUNK`] bytes, and the offset after it.
fn read_from(path: &std::path::Path, off: u64) -> (Vec<u8>, u64) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), off);
    };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(off)).is_err()
        || f.take(MAX_LOG_CHUNK as u64).read_to_end(&mut buf).is_err()
    {
        return (Vec::new(), off);
    }
    let end = off + buf.len() as u64;
    (buf, end)
}

/// Makes `dir` hold each plugin of `plugins` under its name: a link to its import (a file under
/// `imports`), made executable. A name already linked to the same import is left alone.
fn link_plugins(
    dir: &std::path::Path,
    imports: &std::path::Path,
    plugins: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, path) in plugins {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(format!("{name:?} is not a plugin name"));
        }
        let target = std::path::Path::new(path);
        if !target.starts_with(imports)
            || target
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(format!("{name}: {path} is not an import of this engine"));
        }
        let meta = std::fs::metadata(target).map_err(|e| format!("{name}: {path}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{name}: {path} is not a file"));
        }
        if meta.permissions().mode() & 0o111 != 0o111 {
            std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{name}: {path}: {e}"))?;
        }
        let link = dir.join(name);
        if std::fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        std::os::unix::fs::symlink(target, &tmp)
            .and_then(|()| std::fs::rename(&tmp, &link))
            .map_err(|e| format!("{}: {e}", link.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::link_plugins;

    #[test]
    fn plugins_are_linked_from_imports_only_and_made_executable() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let imports = d.path().join("imports");
        let bin = d.path().join("cni-bin");
        std::fs::create_dir_all(imports.join("k1")).unwrap();
        std::fs::create_dir_all(imports.join("k2")).unwrap();
        let (a, b) = (imports.join("k1/file"), imports.join("k2/file"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let one = |name: &str, path: &std::path::Path| {
            std::collections::BTreeMap::from([(name.to_string(), path.display().to_string())])
        };
        link_plugins(&bin, &imports, &one("bridge", &a)).unwrap();
        assert_eq!(std::fs::read_link(bin.join("bridge")).unwrap(), a);
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // A new import of the same name replaces the link.
        link_plugins(&bin, &imports, &one("bridge", &b)).unwrap();
        assert_eq!(std::fs::read_to_string(bin.join("bridge")).unwrap(), "b");
        let outside = d.path().join("elsewhere");
        std::fs::write(&outside, "x").unwrap();
        for (name, path) in [
            ("bridge", outside.clone()),
            ("bridge", imports.join("k1/../../elsewhere")),
            ("../x", a.clone()),
            ("static", imports.join("k1")),
        ] {
            assert!(
                link_plugins(&bin, &imports, &one(name, &path)).is_err(),
                "{name} {}",
                path.display()
            );
        }
    }

    #[test]
    fn tail_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, b"a\nb\nc\n").unwrap();
        assert_eq!(super::read_tail(&p, 2).0, b"b\nc\n");
        assert_eq!(super::read_tail(&p, 0).0, b"a\nb\nc\n");
        assert_eq!(super::read_tail(&p, 9).0, b"a\nb\nc\n");
        assert_eq!(super::read_from(&p, 4), (b"c\n".to_vec(), 6));
    }
}
