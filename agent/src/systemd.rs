//! systemd integration: readiness, stopping and watchdog notifications (`Type=notify`).
//!
//! Each call is a no-op when `NOTIFY_SOCKET` is unset, so the agent runs the same by hand.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Tells systemd the agent is ready (its sockets listen).
pub fn ready() {
    notify(&[sd_notify::NotifyState::Ready]);
}

/// Tells systemd the agent is shutting down.
pub fn stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

/// Shows a status line in `systemctl status`.
pub fn status(msg: &str) {
    notify(&[sd_notify::NotifyState::Status(msg)]);
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}

/// If systemd set a watchdog, pings it at half the interval until `shutdown`.
pub fn spawn_watchdog(shutdown: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let every = (interval / 2).max(Duration::from_millis(100));
    tracing::info!(?every, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => notify(&[sd_notify::NotifyState::Watchdog]),
            }
        }
    }))
}
