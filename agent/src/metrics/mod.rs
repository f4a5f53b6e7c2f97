//! Prometheus metrics and health probes, on a plain HTTP port.
//!
//! Owns the text exposition ([`render`]) and the small HTTP/1.1 server ([`serve`]) that answers
//! `/metrics`, `/healthz` and `/readyz`. It reads nothing itself: the agent hands it a closure
//! that gathers a [`MetricsSnapshot`] (plain data) from the meter, the ledger and the exporter.
//! The port is unauthenticated, so it serves only what an operator may see and takes no input
//! but a path: bind it to loopback or a management network.
//!
//! - `render.rs`: the text format 0.0.4;
//! - `server.rs`: the HTTP endpoints.

mod render;
mod server;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use render::{CONTENT_TYPE, render};
pub use server::{MAX_CONNECTIONS, serve};

use crate::ledger::LedgerStats;
use crate::meter::{Counters, MeterKey, SamplerStats};

/// `[metrics]`: the Prometheus and health endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the plain-HTTP metrics and health port, e.g. `127.0.0.1:9464`. It has no
    /// authentication: bind it to loopback or a management network. Unset: no port is opened.
    pub listen: Option<SocketAddr>,
}

/// The exporter's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportMetrics {
    /// Events delivered since the agent started.
    pub delivered: u64,
    /// Failed delivery attempts since the agent started.
    pub failures: u64,
    /// Records written but not yet delivered.
    pub backlog: u64,
}

/// Everything one scrape reports, gathered by the agent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// This node's name (reported in `caas_agent_info`).
    pub node: String,
    /// The latest counters of each metered cgroup: tenants (container `None`) and containers.
    pub cgroups: Vec<(MeterKey, Counters)>,
    /// The sampler's own health.
    pub sampler: SamplerStats,
    /// Ledger sizes, `None` when they could not be read (their metrics are left out).
    pub ledger: Option<LedgerStats>,
    /// The exporter's counters, `None` when export is off.
    pub export: Option<ExportMetrics>,
}
