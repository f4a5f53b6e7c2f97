//! `caas-agent serve`: binds the listeners, serves the API, and shuts down along one path:
//! signal -> cancellation token -> stop accepting -> drain in-flight calls (bounded) -> flush
//! state -> remove the socket -> exit 0.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::UnixListener, task::JoinSet};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{
    service::InterceptorLayer,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};

use crate::{
    api::{self, AgentState, auth, limits::MessageLimitLayer},
    config::{Config, TlsConfig},
    ledger::LedgerConfig,
    net, node,
    sandbox::{Manager, SandboxError},
    systemd,
    usage::Metering,
};

/// The usage ledger's file under the state dir.
pub const USAGE_DB: &str = "usage.db";

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the agent could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A directory could not be prepared.
    #[error("preparing {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another agent answers on the socket.
    #[error("another agent is already listening on {0}; stop it or set api.unix_socket")]
    SocketInUse(PathBuf),
    /// A listener could not be bound.
    #[error("binding {what}: {source}")]
    Bind {
        /// The address or path.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A TLS file could not be read or used.
    #[error("TLS {what}: {message}")]
    Tls {
        /// Which file or step.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// Tenant state could not be loaded.
    #[error(transparent)]
    Sandboxes(#[from] SandboxError),
    /// Tenant networks could not be started.
    #[error(transparent)]
    Network(#[from] crate::net::NetError),
    /// The usage ledger or the meter could not start.
    #[error("metering: {0}")]
    Metering(#[from] crate::usage::MeteringError),
    /// The image store could not be opened.
    #[error("images: {0}")]
    Images(#[from] crate::images::ImageError),
    /// The reflection service could not be built.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A server failed while serving.
    #[error("serving {what}: {source}")]
    Serve {
        /// Which listener.
        what: &'static str,
        /// The cause.
        source: tonic::transport::Error,
    },
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The unix socket it serves on.
    pub unix_socket: PathBuf,
    /// The CRI socket, when `[cri] enabled`.
    pub cri_socket: Option<PathBuf>,
    /// The TCP address it serves on, if any (the real port when configured with `:0`).
    pub tcp_addr: Option<SocketAddr>,
    /// The metrics address, if any (the real port when configured with `:0`).
    pub metrics_addr: Option<SocketAddr>,
    state: Arc<AgentState>,
    health: tonic_health::server::HealthReporter,
    servers: JoinSet<Result<(), ServeError>>,
    /// The exporter and the metrics server: they end on the shutdown token.
    background: JoinSet<Result<(), crate::export::ExportError>>,
    ready: tokio::sync::watch::Sender<bool>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
}

/// Sets `favordynmods` on the host's cgroup2 mount, or says why not; a failure costs only speed.
fn favor_dynmods(root: &Path) {
    use crate::cgroups::dynmods::{self, Outcome};
    match dynmods::set(root, true) {
        Ok(Outcome::Changed(m)) => tracing::info!(
            mount = %m.display(),
            "cgroup2 remounted with favordynmods: moving a process into a cgroup no longer waits for an RCU grace period ([tenants] cgroup_favor_dynmods = false leaves the mount alone)"
        ),
        Ok(Outcome::Unchanged(m)) => {
            tracing::debug!(mount = %m.display(), "cgroup2 already has favordynmods")
        }
        Ok(Outcome::NoCgroup2) => tracing::info!(
            root = %root.display(),
            "no cgroup2 mount: favordynmods not set (moving a process into a cgroup waits for an RCU grace period)"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "favordynmods not set; containers start a few ms slower")
        }
    }
}

/// Prepares state, binds every listener and starts serving. Returns once the sockets listen.
pub async fn start(config: Config) -> Result<Agent, ServeError> {
    let shutdown = CancellationToken::new();
    for (dir, mode) in [(&config.state_dir, 0o700), (&config.run_dir, 0o755)] {
        crate::fsutil::ensure_dir(dir, mode).map_err(|source| ServeError::Dir {
            path: dir.clone(),
            source,
        })?;
    }
    check_traversable(&config.run_dir)?;
    let node = node::probe(config.node_name());
    if config.tenants.cgroup_favor_dynmods {
        favor_dynmods(&config.tenants.cgroup_root);
    }
    let cgroups = crate::cgroups::TenantCgroups::with_slice(
        &config.tenants.cgroup_root,
        node.cgroup_layout,
        &config.tenants.cgroup_slice,
    );
    let metering = Arc::new(Metering::start(
        &config.state_dir.join(USAGE_DB),
        LedgerConfig {
            node: node.node.clone(),
            window_secs: config.usage.window_secs,
            sample_retention_secs: config.usage.sample_retention_secs,
            record_retention_secs: config.usage.record_retention_secs,
        },
        &config.tenants.cgroup_root,
        node.cgroup_layout,
        cgroups,
    )?);
    let images = Arc::new(crate::images::ImageStore::open(
        &config.state_dir,
        config.images.clone(),
    )?);
    let network = if config.network.enabled {
        let mut reserved = Vec::new();
        if let Some(a) = config.api.tcp_listen {
            reserved.push((net::ports::Proto::Tcp, a.port(), "the agent's API".into()));
        }
        if let Some(a) = config.metrics.listen {
            reserved.push((
                net::ports::Proto::Tcp,
                a.port(),
                "the agent's metrics".into(),
            ));
        }
        Some(Arc::new(
            net::Network::start(&config.network, &config.state_dir, reserved).await?,
        ))
    } else {
        None
    };
    let mut sandboxes = Manager::open(
        &config,
        node.cgroup_layout,
        Some(metering.clone()),
        Some(images.clone()),
        network.clone(),
    )?;
    sandboxes.resolve_vm_accelerator().await;
    let cri_store = if config.cri.enabled {
        let store = crate::cri::Cri::open_store(&config).map_err(|source| ServeError::Dir {
            path: config.state_dir.join("cri"),
            source,
        })?;
        sandboxes.keep_port_owners(store.port_owners());
        Some(store)
    } else {
        None
    };
    sandboxes.recover().await;
    match network {
        Some(n) => {
            let stop = shutdown.clone();
            let every = Duration::from_secs(config.network.firewall_check_secs);
            tokio::spawn(async move { n.guard(every, stop).await });
        }
        // Networks off: recovery removed the tenants' links; then the table an earlier run
        // left (never before: a link must not be without it).
        None => net::Network::remove_table().await,
    }
    let state = Arc::new(AgentState {
        config,
        node,
        sandboxes,
        metering,
        images,
        started: Instant::now(),
        shutdown: shutdown.clone(),
    });
    {
        // A VM whose VMM died is reported failed, then booted again, without waiting for a call.
        let state = state.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => state.sandboxes.check_vms().await,
                }
            }
        });
    }
    let cfg = &state.config;
    let limit = cfg.api.max_message_bytes;
    let (health, health_svc) = tonic_health::server::health_reporter();
    api::set_health(&health, true).await;
    let mut servers = JoinSet::new();

    // Every listener is bound before any serves: a client that reaches the unix socket finds
    // the TCP port bound too.
    let tcp = match (cfg.api.tcp_listen, cfg.api.tls.as_ref()) {
        (Some(addr), Some(tls)) => {
            let tls = server_tls(tls).await?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    what: addr.to_string(),
                    source,
                })?;
            Some((addr, tls, listener))
        }
        _ => None,
    };
    let unix_socket = cfg.unix_socket();
    let unix = bind_unix(&unix_socket).await?;
    {
        let routes = api::routes(state.clone())?.add_service(health_svc.clone());
        let auth = auth::authenticator(auth::Transport::Unix {
            allowed_uids: cfg.api.unix_allowed_uids.clone(),
        });
        let stop = shutdown.clone();
        servers.spawn(async move {
            Server::builder()
                .layer(MessageLimitLayer::new(limit))
                .layer(InterceptorLayer::new(auth))
                .add_routes(routes)
                .serve_with_incoming_shutdown(UnixListenerStream::new(unix), stop.cancelled_owned())
                .await
                .map_err(|source| ServeError::Serve {
                    what: "unix socket",
                    source,
                })
        });
    }

    let mut cri_socket = None;
    if let Some(store) = cri_store {
        let path = cfg.cri_socket();
        let listener = bind_unix(&path).await?;
        let stream =
            crate::cri::stream::StreamServer::start(cfg.cri.stream_address, shutdown.clone())
                .await
                .map_err(|source| ServeError::Bind {
                    what: format!("cri.stream_address {}", cfg.cri.stream_address),
                    source,
                })?;
        let cri = crate::cri::Cri::open(state.clone(), store, stream).await;
        tokio::spawn(crate::cri::gc::run(cri.clone(), shutdown.clone()));
        tokio::spawn(crate::cri::vm_volumes::run(cri.clone(), shutdown.clone()));
        // kubelet runs as root; the CRI has no roles of its own.
        let auth = auth::authenticator(auth::Transport::Unix {
            allowed_uids: Vec::new(),
        });
        let routes = crate::cri::routes(cri);
        let stop = shutdown.clone();
        servers.spawn(async move {
            Server::builder()
                .layer(MessageLimitLayer::new(limit))
                .layer(InterceptorLayer::new(auth))
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .map_err(|source| ServeError::Serve {
                    what: "CRI socket",
                    source,
                })
        });
        cri_socket = Some(path);
    }

    let mut tcp_addr = None;
    if let Some((addr, tls, listener)) = tcp {
        tcp_addr = Some(listener.local_addr().map_err(|source| ServeError::Bind {
            what: addr.to_string(),
            source,
        })?);
        let routes = api::routes(state.clone())?.add_service(health_svc);
        let stop = shutdown.clone();
        let builder = Server::builder()
            .tls_config(tls)
            .map_err(|e| ServeError::Tls {
                what: "config".into(),
                message: e.to_string(),
            })?;
        servers.spawn(async move {
            builder
                .layer(MessageLimitLayer::new(limit))
                .layer(InterceptorLayer::new(auth::authenticator(
                    auth::Transport::MutualTls,
                )))
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .map_err(|source| ServeError::Serve {
                    what: "tcp",
                    source,
                })
        });
    }

    let export_status = Arc::new(crate::export::ExportStatus::default());
    let mut background = JoinSet::new();
    if cfg.export.endpoint.is_some() {
        background.spawn(crate::export::run(
            cfg.export.clone(),
            state.metering.ledger.clone(),
            state.metering.written(),
            shutdown.clone(),
            export_status.clone(),
        ));
    }
    let mut metrics_addr = None;
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    if let Some(addr) = cfg.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind {
                what: format!("metrics.listen {addr}"),
                source,
            })?;
        metrics_addr = listener.local_addr().ok();
        let snapshot = metrics_snapshot(state.clone(), export_status.clone());
        let stop = shutdown.clone();
        background.spawn(async move {
            crate::metrics::serve(listener, snapshot, ready, stop).await;
            Ok(())
        });
    }
    ready_tx.send_replace(true);

    let watchdog = systemd::spawn_watchdog(shutdown.clone());
    tracing::info!(
        version = crate::VERSION,
        node = %state.node.node,
        unix = %unix_socket.display(),
        tcp = %tcp_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        cri = %cri_socket.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "off".into()),
        cgroups = %state.node.cgroup_layout,
        tenants = state.sandboxes.registry.allocated().await.0,
        "caas-agent listening"
    );
    Ok(Agent {
        unix_socket,
        cri_socket,
        tcp_addr,
        metrics_addr,
        state,
        health,
        servers,
        background,
        ready: ready_tx,
        watchdog,
    })
}

impl Agent {
    /// The token whose cancellation starts shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Shuts down: stop accepting, drain for at most `api.drain_timeout_secs`, flush, clean up.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        let drain = Duration::from_secs(self.state.config.api.drain_timeout_secs);
        systemd::stopping();
        api::set_health(&self.health, false).await;
        self.ready.send_replace(false);
        self.state.shutdown.cancel();
        let started = Instant::now();
        let mut first_error = None;
        let drained = tokio::time::timeout(drain, async {
            while let Some(r) = self.servers.join_next().await {
                match r {
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "server stopped with an error");
                        first_error.get_or_insert(e);
                    }
                    Err(e) => tracing::error!(error = %e, "server task failed"),
                    Ok(Ok(())) => {}
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?drain,
                "drain timeout reached; closing the calls still in flight"
            );
            self.servers.abort_all();
            while self.servers.join_next().await.is_some() {}
        } else {
            tracing::info!(took = ?started.elapsed(), "in-flight calls drained");
        }
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        // Tenant records are written through on every change; the ledger takes the samples
        // still queued, then the meter stops.
        while let Some(r) = self.background.join_next().await {
            match r {
                Ok(Err(e)) => tracing::error!(error = %e, "the usage exporter stopped"),
                Err(e) => tracing::error!(error = %e, "a background task failed"),
                Ok(Ok(())) => {}
            }
        }
        self.state.metering.shutdown().await;
        for socket in std::iter::once(&self.unix_socket).chain(self.cri_socket.as_ref()) {
            if let Err(e) = std::fs::remove_file(socket)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(socket = %socket.display(), error = %e, "could not remove the socket");
            }
        }
        tracing::info!("caas-agent stopped");
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until a server stops by itself (an error) or the shutdown token is cancelled.
    pub async fn until_stopped(&mut self) {
        let token = self.state.shutdown.clone();
        tokio::select! {
            _ = token.cancelled() => {}
            Some(r) = self.servers.join_next() => {
                tracing::error!(result = ?r.map(|r| r.err().map(|e| e.to_string())), "a server stopped unexpectedly");
                token.cancel();
            }
        }
    }
}

/// What the metrics endpoint shows, read fresh on every scrape (on the blocking pool).
fn metrics_snapshot(
    state: Arc<AgentState>,
    export: Arc<crate::export::ExportStatus>,
) -> Arc<dyn Fn() -> crate::metrics::MetricsSnapshot + Send + Sync> {
    Arc::new(move || {
        let m = &state.metering;
        let (ledger, last) = {
            let l = crate::usage::lock(&m.ledger);
            (l.stats().ok(), l.last_cursor().unwrap_or(0))
        };
        crate::metrics::MetricsSnapshot {
            node: state.node.node.clone(),
            cgroups: m.latest(),
            sampler: m.sampler.stats(),
            ledger,
            export: state
                .config
                .export
                .endpoint
                .is_some()
                .then(|| export.metrics(last)),
        }
    })
}

/// Runs the agent until SIGTERM or SIGINT, then shuts down cleanly.
pub async fn run(config: Config) -> Result<(), ServeError> {
    let mut agent = start(config).await?;
    systemd::ready();
    systemd::status("serving");
    let token = agent.shutdown_token();
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
        ) else {
            tracing::error!("could not install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    agent.until_stopped().await;
    agent.shutdown().await
}

/// Containers run as unprivileged host uids and must reach their root filesystems under
/// `run_dir`, so every ancestor of it must be searchable by others.
fn check_traversable(run_dir: &Path) -> Result<(), ServeError> {
    for dir in run_dir.ancestors() {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(ServeError::Dir {
                path: run_dir.to_path_buf(),
                source: std::io::Error::other(format!(
                    "{} (mode {:o}) is not searchable by other users, so tenant containers could not \
                     reach their root filesystems; chmod o+x it or choose another run_dir",
                    dir.display(),
                    meta.permissions().mode() & 0o7777
                )),
            });
        }
    }
    Ok(())
}

async fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    if path.exists() {
        // A live agent answers; a stale socket from a crash does not and is replaced.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| ServeError::Bind {
            what: path.display().to_string(),
            source,
        })?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind {
        what: path.display().to_string(),
        source,
    })?;
    // Root only. The window before this chmod is covered by the peer-uid check in `auth`.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServeError::Bind {
            what: path.display().to_string(),
            source,
        }
    })?;
    Ok(listener)
}

async fn server_tls(tls: &TlsConfig) -> Result<ServerTlsConfig, ServeError> {
    let read = |p: PathBuf, what: &'static str| async move {
        tokio::fs::read(&p).await.map_err(|e| ServeError::Tls {
            what: format!("api.tls.{what} {}", p.display()),
            message: e.to_string(),
        })
    };
    let ca = read(tls.ca.clone(), "ca").await?;
    let cert = read(tls.cert.clone(), "cert").await?;
    let key = read(tls.key.clone(), "key").await?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .timeout(TLS_HANDSHAKE_TIMEOUT))
}
