//! `ContainerStats`, `ListContainerStats`, `PodSandboxStats` and `ListPodSandboxStats` from the
//! agent's per-second meter: the same readings that are billed, never a second sampler.
//!
//! A container's figures are its cgroup's last reading (at most a second old), timestamped with
//! when it was read; a pod's are the sums over its containers, at the newest of their readings.
//! CPU is the cumulative `usage_core_nano_seconds`; kubelet derives the rate from two readings
//! and their timestamps, so `usage_nano_cores` is left unset (stamped with the time of the call
//! instead, a rate over 10 s could be up to a tenth off).
//!
//! `ListMetricDescriptors` and `ListPodSandboxMetrics` (kubelet's cadvisor-style `/metrics`
//! from the runtime, `PodAndContainerStatsFromCRI`) give the same readings under cadvisor's
//! names, for every pod and every container the meter reads.

use std::collections::HashMap;

use caas_proto::cri::v1 as cri;

use super::{
    Cri, now_ns,
    store::{ContainerRecord, PodRecord},
};
use crate::meter::{Counters, MeterKey};

/// How long a measured writable layer is reused: walking a large one is not free, and kubelet
/// asks for stats every 10 s.
const LAYER_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// The meter's last readings and when each was taken (ns since the epoch), by (tenant,
/// container); and, where asked for, containers' writable layers.
pub struct Readings {
    counters: HashMap<(String, String), (Counters, i64)>,
    layers: HashMap<String, cri::FilesystemUsage>,
}

impl Readings {
    /// The readings now.
    pub fn now(cri: &Cri) -> Self {
        Self {
            counters: cri
                .state
                .metering
                .latest_timed()
                .into_iter()
                .filter_map(|(MeterKey { tenant, container }, c, at)| {
                    container.map(|id| ((tenant, id), (c, at)))
                })
                .collect(),
            layers: HashMap::new(),
        }
    }

    /// Adds the writable layers of `records`: the bytes and inodes of each container's overlay
    /// upper directory (what it wrote to its root filesystem), which kubelet counts against
    /// `ephemeral-storage` and ranks disk-pressure evictions by. Measured at most every
    /// [`LAYER_TTL`] per container; a VM tenant's layers are in its guest and are not given.
    pub async fn with_layers(&mut self, cri: &Cri, records: &[ContainerRecord]) {
        let now = std::time::Instant::now();
        let mut stale = Vec::new();
        {
            let cache = cri
                .layer_usage
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for c in records {
                match cache.get(&c.id) {
                    Some((at, u)) if now.duration_since(*at) < LAYER_TTL => {
                        self.layers.insert(c.id.clone(), u.clone());
                    }
                    _ => stale.push((c.id.clone(), upper_dir(cri, c))),
                }
            }
        }
        if stale.is_empty() {
            return;
        }
        let mountpoint = cri.state.config.state_dir.display().to_string();
        let measured = tokio::task::spawn_blocking(move || {
            stale
                .into_iter()
                .filter(|(_, dir)| dir.is_dir())
                .map(|(id, dir)| {
                    let (bytes, inodes) = crate::fsutil::disk_usage(&dir);
                    let u = cri::FilesystemUsage {
                        timestamp: now_ns(),
                        fs_id: Some(cri::FilesystemIdentifier {
                            mountpoint: mountpoint.clone(),
                        }),
                        used_bytes: u64v(bytes),
                        inodes_used: u64v(inodes),
                    };
                    (id, u)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut cache = cri
            .layer_usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (id, u) in measured {
            cache.insert(id.clone(), (now, u.clone()));
            self.layers.insert(id, u);
        }
    }

    /// The last reading of `c`.
    pub fn of(&self, c: &ContainerRecord) -> Option<&Counters> {
        self.counters
            .get(&(c.tenant.clone(), c.id.clone()))
            .map(|(c, _)| c)
    }

    /// When the last reading of `c` was taken: the stats' timestamp, from which kubelet
    /// derives CPU rates (the time of the call would be up to the meter's period off).
    pub fn read_at(&self, c: &ContainerRecord) -> Option<i64> {
        self.counters
            .get(&(c.tenant.clone(), c.id.clone()))
            .map(|(_, at)| *at)
            .filter(|at| *at > 0)
    }

    /// Reads now the containers of `records` that have no reading yet (made since the meter's
    /// last tick), so that stats asked for right after a start have figures.
    pub async fn complete(&mut self, cri: &Cri, records: &[ContainerRecord]) {
        for c in records {
            let key = (c.tenant.clone(), c.id.clone());
            if self.counters.contains_key(&key) {
                continue;
            }
            if let Some(r) = cri
                .state
                .metering
                .read_container_now(&c.tenant, &c.id)
                .await
            {
                self.counters.insert(key, r);
            }
        }
    }
}

/// Where the engine keeps a container's overlay upper directory on the host (see
/// `engine::rootfs::mount_overlay`): `<state_dir>/engines/<tenant>/containers/<id>/layer/upper`.
fn upper_dir(cri: &Cri, c: &ContainerRecord) -> std::path::PathBuf {
    cri.state
        .config
        .state_dir
        .join("engines")
        .join(&c.tenant)
        .join("containers")
        .join(&c.id)
        .join("layer/upper")
}

fn u64v(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

fn cpu(ts: i64, c: Option<&Counters>) -> Option<cri::CpuUsage> {
    c.map(|c| cri::CpuUsage {
        timestamp: ts,
        usage_core_nano_seconds: u64v(c.cpu_ns),
        usage_nano_cores: None,
    })
}

fn memory(ts: i64, c: Option<&Counters>) -> Option<cri::MemoryUsage> {
    c.map(|c| cri::MemoryUsage {
        timestamp: ts,
        working_set_bytes: u64v(c.memory_working_set),
        available_bytes: None,
        usage_bytes: None,
        rss_bytes: None,
        page_faults: None,
        major_page_faults: None,
    })
}

/// One container's stats.
pub fn container(r: &ContainerRecord, readings: &Readings) -> cri::ContainerStats {
    let ts = readings.read_at(r).unwrap_or_else(now_ns);
    let c = readings.of(r);
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(cri::ContainerMetadata {
                name: r.name.clone(),
                attempt: r.attempt,
            }),
            labels: r
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            annotations: r
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }),
        cpu: cpu(ts, c),
        memory: memory(ts, c),
        writable_layer: readings.layers.get(&r.id).cloned(),
        swap: None,
    }
}

/// A pod's stats: the sums over its containers that the meter reads, and each container's.
pub fn pod(
    p: &PodRecord,
    containers: &[ContainerRecord],
    readings: &Readings,
) -> cri::PodSandboxStats {
    // The newest of its containers' readings (one meter tick reads them all).
    let ts = containers
        .iter()
        .filter_map(|c| readings.read_at(c))
        .max()
        .unwrap_or_else(now_ns);
    let mut sum = Counters::default();
    let mut any = false;
    for c in containers.iter().filter_map(|c| readings.of(c)) {
        any = true;
        sum.cpu_ns += c.cpu_ns;
        sum.memory_working_set += c.memory_working_set;
        sum.pids += c.pids;
    }
    // Removed containers' CPU stays in the total: it is cumulative and must not go back.
    sum.cpu_ns += p.removed_cpu_ns;
    let sum = (any || p.removed_cpu_ns > 0).then_some(&sum);
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: p.id.clone(),
            metadata: Some(cri::PodSandboxMetadata {
                name: p.name.clone(),
                uid: p.uid.clone(),
                namespace: p.namespace.clone(),
                attempt: p.attempt,
            }),
            labels: p
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            annotations: p
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: cpu(ts, sum),
            memory: memory(ts, sum),
            network: None,
            process: sum.map(|s| cri::ProcessUsage {
                timestamp: ts,
                process_count: u64v(s.pids),
            }),
            containers: containers.iter().map(|c| container(c, readings)).collect(),
        }),
        windows: None,
    }
}

/// One metric kubelet's cadvisor-style endpoint takes from the runtime: its descriptor and how
/// a reading gives it. kubelet takes a value as it is, so each is in its name's unit.
struct MetricDef {
    name: &'static str,
    help: &'static str,
    kind: cri::MetricType,
    value: fn(&Counters) -> Option<u64>,
}

/// The metrics served, with cadvisor's names and meanings.
const METRICS: &[MetricDef] = &[
    MetricDef {
        name: "container_cpu_usage_seconds_total",
        help: "Cumulative cpu time consumed in seconds (whole seconds: the CRI carries integers).",
        kind: cri::MetricType::Counter,
        value: |c| Some(c.cpu_ns / 1_000_000_000),
    },
    MetricDef {
        name: "container_memory_working_set_bytes",
        help: "Current working set in bytes.",
        kind: cri::MetricType::Gauge,
        value: |c| Some(c.memory_working_set),
    },
    MetricDef {
        name: "container_memory_max_usage_bytes",
        help: "Maximum memory usage recorded in bytes.",
        kind: cri::MetricType::Gauge,
        value: |c| (c.memory_peak > 0).then_some(c.memory_peak),
    },
    MetricDef {
        name: "container_oom_events_total",
        help: "Count of out of memory events observed for the container.",
        kind: cri::MetricType::Counter,
        value: |c| Some(c.oom_kills),
    },
    MetricDef {
        name: "container_processes",
        help: "Number of processes running inside the container.",
        kind: cri::MetricType::Gauge,
        value: |c| Some(c.pids),
    },
];

/// The label each metric carries: the container's id, or the pod's for its sums, as cadvisor's
/// `id` names the cgroup. Every series is then distinct, also for a kubelet that adds no labels
/// of its own (newer ones add namespace, pod and container).
const LABEL_KEYS: &[&str] = &["id"];

/// The descriptors of the metrics [`pod_metrics`] gives.
pub fn metric_descriptors() -> Vec<cri::MetricDescriptor> {
    METRICS
        .iter()
        .map(|m| cri::MetricDescriptor {
            name: m.name.into(),
            help: m.help.into(),
            label_keys: LABEL_KEYS.iter().map(ToString::to_string).collect(),
        })
        .collect()
}

fn metrics_of(c: &Counters, ts: i64, id: &str) -> Vec<cri::Metric> {
    METRICS
        .iter()
        .filter_map(|m| {
            (m.value)(c).map(|v| cri::Metric {
                name: m.name.into(),
                // The meter's reading, not one made for this call.
                timestamp: ts,
                metric_type: m.kind as i32,
                label_values: vec![id.to_string()],
                value: u64v(v),
            })
        })
        .collect()
}

/// A pod's metrics: each container's the meter reads, and the pod's own, which are the sums
/// over them (its CPU with that of its removed containers, as in [`pod`]). A pod with no
/// reading yet is listed with none.
pub fn pod_metrics(
    p: &PodRecord,
    containers: &[ContainerRecord],
    readings: &Readings,
) -> cri::PodSandboxMetrics {
    let mut sum = Counters::default();
    let mut ts = 0;
    let mut container_metrics = Vec::new();
    for c in containers {
        let (Some(r), Some(at)) = (readings.of(c), readings.read_at(c)) else {
            continue;
        };
        ts = ts.max(at);
        sum.cpu_ns += r.cpu_ns;
        sum.memory_working_set += r.memory_working_set;
        sum.oom_kills += r.oom_kills;
        sum.pids += r.pids;
        container_metrics.push(cri::ContainerMetrics {
            container_id: c.id.clone(),
            metrics: metrics_of(r, at, &c.id),
        });
    }
    sum.cpu_ns += p.removed_cpu_ns;
    let metrics = if ts > 0 {
        metrics_of(&sum, ts, &p.id)
    } else {
        Vec::new()
    };
    cri::PodSandboxMetrics {
        pod_sandbox_id: p.id.clone(),
        metrics,
        container_metrics,
    }
}
