//! The Prometheus text exposition format 0.0.4: one `# HELP` and `# TYPE` per family, then its
//! samples, values in base units (seconds, bytes).

use std::fmt::Write as _;
use std::time::Duration;

use super::MetricsSnapshot;
use crate::meter::{Counters, MeterKey, NetBytes};

/// The media type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// A metric value, written exactly: integers as they are, nanoseconds as decimal seconds.
#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Nanos(u128),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Nanos(ns) => write!(f, "{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000),
        }
    }
}

fn seconds(d: Duration) -> Value {
    Value::Nanos(d.as_nanos())
}

fn nanos(ns: u64) -> Value {
    Value::Nanos(u128::from(ns))
}

/// The text being built. Writing to a `String` cannot fail, so `write!` results are dropped.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.0, "# HELP {name} {}", escape(help, false));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Value) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{label}=\"{}\"", escape(v, true));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A family with a single unlabelled sample.
    fn single(&mut self, name: &str, kind: Kind, help: &str, value: Value) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Escapes a label value (`\`, `"`, newline) or a HELP text (`\`, newline).
fn escape(s: &str, quote: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// A per-cgroup family, in both scopes: `caas_tenant_<suffix>` and `caas_container_<suffix>`.
struct CgroupFamily {
    suffix: &'static str,
    kind: Kind,
    help: &'static str,
    value: fn(&Counters) -> Value,
}

const CGROUP_FAMILIES: &[CgroupFamily] = &[
    CgroupFamily {
        suffix: "cpu_seconds_total",
        kind: Kind::Counter,
        help: "CPU time used by the cgroup, in seconds.",
        value: |c| nanos(c.cpu_ns),
    },
    CgroupFamily {
        suffix: "memory_working_set_bytes",
        kind: Kind::Gauge,
        help: "Memory working set of the cgroup (usage minus inactive file cache), in bytes.",
        value: |c| Value::Int(c.memory_working_set),
    },
    CgroupFamily {
        suffix: "oom_kills_total",
        kind: Kind::Counter,
        help: "Processes of the cgroup killed by the OOM killer.",
        value: |c| Value::Int(c.oom_kills),
    },
    CgroupFamily {
        suffix: "pids",
        kind: Kind::Gauge,
        help: "Tasks in the cgroup.",
        value: |c| Value::Int(c.pids),
    },
];

/// A family of a tenant's network link: tenants only (containers share their tenant's network
/// namespace), and only those whose last reading had the link's counters.
struct LinkFamily {
    name: &'static str,
    help: &'static str,
    value: fn(&NetBytes) -> u64,
}

const LINK_FAMILIES: &[LinkFamily] = &[
    LinkFamily {
        name: "caas_tenant_network_receive_bytes_total",
        help: "Bytes the tenant received over its network link (L2, headers included); \
               restarts at 0 when the link is created again.",
        value: |n| n.rx_bytes,
    },
    LinkFamily {
        name: "caas_tenant_network_transmit_bytes_total",
        help: "Bytes the tenant sent over its network link (L2, headers included); restarts at \
               0 when the link is created again.",
        value: |n| n.tx_bytes,
    },
];

/// The snapshot in the Prometheus text format 0.0.4.
pub fn render(s: &MetricsSnapshot) -> String {
    let mut out = Out(String::with_capacity(4096 + s.cgroups.len() * 400));
    out.family(
        "caas_agent_info",
        Kind::Gauge,
        "The agent's node name and version; always 1.",
    );
    out.sample(
        "caas_agent_info",
        &[("node", &s.node), ("version", crate::VERSION)],
        Value::Int(1),
    );

    // A key listed twice would make duplicate series, which Prometheus rejects: the first wins.
    let mut cgroups: Vec<&(MeterKey, Counters)> = s.cgroups.iter().collect();
    cgroups.sort_by(|a, b| a.0.cmp(&b.0));
    cgroups.dedup_by(|a, b| a.0 == b.0);
    for scope in ["tenant", "container"] {
        for f in CGROUP_FAMILIES {
            let name = format!("caas_{scope}_{}", f.suffix);
            out.family(&name, f.kind, f.help);
            for (key, counters) in &cgroups {
                let value = (f.value)(counters);
                match (scope, key.container.as_deref()) {
                    ("tenant", None) => out.sample(&name, &[("tenant", &key.tenant)], value),
                    ("container", Some(c)) => {
                        out.sample(&name, &[("tenant", &key.tenant), ("container", c)], value)
                    }
                    _ => {}
                }
            }
        }
    }
    for f in LINK_FAMILIES {
        out.family(f.name, Kind::Counter, f.help);
        for (key, counters) in &cgroups {
            if let (None, Some(net)) = (&key.container, &counters.net) {
                out.sample(
                    f.name,
                    &[("tenant", &key.tenant)],
                    Value::Int((f.value)(net)),
                );
            }
        }
    }

    let m = &s.sampler;
    let count = |n: usize| Value::Int(u64::try_from(n).unwrap_or(u64::MAX));
    out.single(
        "caas_meter_targets",
        Kind::Gauge,
        "Cgroups the meter samples.",
        count(m.targets),
    );
    out.single(
        "caas_meter_failing_targets",
        Kind::Gauge,
        "Cgroups whose last read failed.",
        count(m.failing),
    );
    out.single(
        "caas_meter_ticks_total",
        Kind::Counter,
        "Sampling ticks run.",
        Value::Int(m.ticks),
    );
    out.single(
        "caas_meter_missed_ticks_total",
        Kind::Counter,
        "Sampling ticks skipped because the meter was too late for them.",
        Value::Int(m.missed_ticks),
    );
    out.single(
        "caas_meter_last_tick_seconds",
        Kind::Gauge,
        "How long the last tick's reads took, in seconds.",
        seconds(m.last_tick),
    );
    out.single(
        "caas_meter_lag_seconds",
        Kind::Gauge,
        "How late after its second the last tick started, in seconds.",
        seconds(m.last_lag),
    );
    out.single(
        "caas_meter_read_errors_total",
        Kind::Counter,
        "Failed cgroup reads (not counting cgroups that were gone).",
        Value::Int(m.read_errors),
    );
    out.single(
        "caas_meter_gone_targets_total",
        Kind::Counter,
        "Targets dropped because their cgroup was removed.",
        Value::Int(m.gone),
    );
    out.single(
        "caas_meter_link_errors_total",
        Kind::Counter,
        "Failed reads of tenants' network links (those readings had no network bytes).",
        Value::Int(m.link_errors),
    );
    out.single(
        "caas_meter_undelivered_samples_total",
        Kind::Counter,
        "Samples lost because the ledger's channel was closed.",
        Value::Int(m.undelivered),
    );

    if let Some(l) = &s.ledger {
        out.single(
            "caas_ledger_bytes",
            Kind::Gauge,
            "Size of the ledger database and its write-ahead log, in bytes.",
            Value::Int(l.db_bytes),
        );
        out.single(
            "caas_ledger_records",
            Kind::Gauge,
            "Billing records held in the ledger.",
            Value::Int(l.records),
        );
        out.single(
            "caas_ledger_unacked_records",
            Kind::Gauge,
            "Billing records not yet acknowledged by the billing consumer.",
            Value::Int(l.unacked_records),
        );
        out.single(
            "caas_ledger_open_windows",
            Kind::Gauge,
            "Cgroups with a billing window still open.",
            Value::Int(l.open_windows),
        );
        out.single(
            "caas_ledger_keys",
            Kind::Gauge,
            "Cgroups whose metering state the ledger holds.",
            Value::Int(l.keys),
        );
    }

    if let Some(e) = &s.export {
        out.single(
            "caas_export_backlog_records",
            Kind::Gauge,
            "Billing records written but not yet delivered by the event exporter.",
            Value::Int(e.backlog),
        );
        out.single(
            "caas_export_delivered_total",
            Kind::Counter,
            "Usage events delivered by the exporter since the agent started.",
            Value::Int(e.delivered),
        );
        out.single(
            "caas_export_failures_total",
            Kind::Counter,
            "Failed export attempts since the agent started.",
            Value::Int(e.failures),
        );
    }
    out.0
}
