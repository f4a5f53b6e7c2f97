//! The agent's configuration: `/etc/caas-agent/config.toml`, every field optional.
//!
//! One validator serves the file and the API ([`crate::validate`]). Unknown keys are refused, and
//! every error is one line that names the file, the line or the field, and what is allowed.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::validate::{self, Invalid};

/// Where `caas-agent serve` looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/caas-agent/config.toml";
/// The largest config file the agent reads.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Bounds of `api.max_message_bytes`.
pub const MIN_MESSAGE_BYTES: usize = 1024;
/// Upper bound of `api.max_message_bytes`.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Upper bound of `api.drain_timeout_secs`.
pub const MAX_DRAIN_SECS: u64 = 300;
/// Upper bound of `tenants.max_tenants`.
pub const MAX_TENANTS: u32 = 10_000;
/// Largest CPU quota a tenant may be given.
pub const MAX_TENANT_CPUS: f64 = 4096.0;
/// Smallest CPU quota (one hundredth of a core).
pub const MIN_TENANT_CPUS: f64 = 0.01;
/// Smallest memory quota: below this nothing useful runs.
pub const MIN_TENANT_MEMORY: u64 = 16 << 20;
/// Largest memory quota (64 TiB).
pub const MAX_TENANT_MEMORY: u64 = 64 << 40;
/// Largest pids quota (the kernel's pid_max ceiling).
pub const MAX_TENANT_PIDS: u64 = 4_194_304;
/// The range of a container's relative CPU weight, in cgroup v1 `cpu.shares` units (the
/// kernel's own bounds).
pub const MIN_CPU_SHARES: u64 = 2;
/// See [`MIN_CPU_SHARES`].
pub const MAX_CPU_SHARES: u64 = 262_144;
/// Largest container count per tenant.
pub const MAX_TENANT_CONTAINERS: u32 = 10_000;

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type).
    #[error("config {path}: line {line}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// The parser's message, on one line.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("config {path}: {invalid}")]
    Invalid {
        /// The config file (or `<defaults>`).
        path: PathBuf,
        /// Which field and why.
        invalid: Invalid,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name in billing records and events (default: the host name).
    pub node_name: Option<String>,
    /// Persistent state: tenants, ledger, images.
    pub state_dir: PathBuf,
    /// Runtime sockets.
    pub run_dir: PathBuf,
    /// The gRPC API.
    pub api: ApiConfig,
    /// Tenant defaults and limits.
    pub tenants: TenantsConfig,
    /// Metering and the usage ledger.
    pub usage: UsageConfig,
    /// Registry pulls and the image store.
    pub images: crate::images::ImagesConfig,
    /// Tenant networks.
    pub network: crate::net::NetworkConfig,
    /// The CloudEvents push of billing records.
    pub export: crate::export::ExportConfig,
    /// Prometheus metrics and health probes over HTTP.
    pub metrics: crate::metrics::MetricsConfig,
    /// Logging.
    pub log: LogConfig,
    /// The Kubernetes CRI socket.
    pub cri: crate::cri::CriConfig,
    /// VM tenants' machine (`vmm-config`): without it, tenants with isolation vm are refused.
    pub vm: Option<vmm_config::VmConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: None,
            state_dir: PathBuf::from("/var/lib/caas-agent"),
            run_dir: PathBuf::from("/run/caas-agent"),
            api: ApiConfig::default(),
            tenants: TenantsConfig::default(),
            usage: UsageConfig::default(),
            images: crate::images::ImagesConfig::default(),
            network: crate::net::NetworkConfig::default(),
            export: crate::export::ExportConfig::default(),
            metrics: crate::metrics::MetricsConfig::default(),
            log: LogConfig::default(),
            cri: crate::cri::CriConfig::default(),
            vm: None,
        }
    }
}

/// `[api]`: where and how the gRPC API is served.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The root-only unix socket (default: `<run_dir>/agent.sock`).
    pub unix_socket: Option<PathBuf>,
    /// TCP address for mTLS clients; requires `[api.tls]`.
    pub tcp_listen: Option<SocketAddr>,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// How long in-flight calls may run after SIGTERM.
    pub drain_timeout_secs: u64,
    /// Unix-socket callers with these uids are admitted besides root.
    pub unix_allowed_uids: Vec<u32>,
    /// Certificates for the TCP listener.
    pub tls: Option<TlsConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            unix_socket: None,
            tcp_listen: None,
            max_message_bytes: 4 << 20,
            drain_timeout_secs: 10,
            unix_allowed_uids: Vec::new(),
            tls: None,
        }
    }
}

/// `[api.tls]`: PEM files for mutual TLS.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA that signs client certificates.
    pub ca: PathBuf,
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
}

/// `[tenants]`: what a tenant gets when it does not ask, and how many there may be.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// Most tenants on this node.
    pub max_tenants: u32,
    /// Default CPU quota.
    pub default_cpus: f64,
    /// Default memory quota in bytes.
    pub default_memory_bytes: u64,
    /// Default pids quota.
    pub default_pids: u64,
    /// Default container count limit.
    pub default_max_containers: u32,
    /// First host uid/gid of the pool tenant ranges come from.
    pub id_pool_start: u32,
    /// How many 65,536-id ranges the pool holds.
    pub id_pool_ranges: u32,
    /// The binary run as each tenant's engine (default: this agent's own executable).
    pub engine_binary: Option<PathBuf>,
    /// Directory holding `subuid`/`subgid`, whose ranges tenants never get.
    pub subid_dir: PathBuf,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// The slice under which every tenant's cgroup subtree is made.
    pub cgroup_slice: String,
    /// Whether the agent sets the cgroup2 mount option `favordynmods` at start (see
    /// [`crate::cgroups::dynmods`]): moving a process into a cgroup then no longer waits for an
    /// RCU grace period. Host-wide; false leaves the mount as it is.
    pub cgroup_favor_dynmods: bool,
    /// VM tenants: the guest kernel's `lib/modules/<version>` directory, whose virtio and
    /// overlay modules go into the guest's initramfs (`scripts/guest-kernel.sh` puts it here).
    pub vm_modules_dir: Option<PathBuf>,
    /// VM tenants: size of a new tenant's disk (its images and container state), in MiB.
    pub vm_disk_mib: u64,
    /// VM tenants: how long a boot may take until the guest's engine answers, in seconds.
    pub vm_boot_timeout_secs: u64,
}

/// Checks the `[vm]` template: what the agent sets per tenant must be left out, and the rest must
/// pass vmm-config's own checks once those per-tenant parts are in.
fn check_vm(vm: &vmm_config::VmConfig, run_dir: &Path) -> Result<(), Invalid> {
    let per_tenant = "is set by the agent for each tenant; leave it out of [vm]";
    if vm.backend.kind() != vmm_config::BackendKind::Qemu {
        return Err(Invalid::new(
            "vm.backend",
            format!(
                "{} cannot run VM tenants in this version: its engine channel would be vsock, \
                 which the agent does not speak yet; use qemu",
                vm.backend.kind().as_str()
            ),
        ));
    }
    for (field, set) in [
        ("vm.initrd", vm.initrd.is_some()),
        ("vm.disks", !vm.disks.is_empty()),
        ("vm.ports", !vm.ports.is_empty()),
        ("vm.vsock", vm.vsock.is_some()),
        ("vm.serial", vm.serial != vmm_config::Serial::None),
    ] {
        if set {
            return Err(Invalid::new(field, per_tenant));
        }
    }
    // The longest tenant id gives the longest socket paths the VMM will be handed.
    let longest = run_dir
        .join("tenants")
        .join("t".repeat(63))
        .join("engine.sock");
    if longest.as_os_str().len() > 107 {
        return Err(Invalid::new(
            "run_dir",
            format!(
                "is too long for VM tenants: their sockets ({}) may have at most 107 bytes",
                longest.display()
            ),
        ));
    }
    let mut probe = vm.clone();
    probe.ports.push(vmm_config::Port {
        name: crate::guest::ENGINE_PORT.to_string(),
        socket: longest,
    });
    if let Err(e) = probe.prepare() {
        // vmm-config's messages start with the field at fault: `vm.memory_mib: ...`.
        let msg = e.to_string();
        let (field, reason) = msg.split_once(": ").unwrap_or(("vm", msg.as_str()));
        return Err(Invalid::new(field, reason));
    }
    Ok(())
}

/// Smallest and largest tenant disk of a VM tenant, in MiB.
pub const VM_DISK_MIB: (u64, u64) = (64, 16 << 20);
/// Shortest and longest boot timeout of a VM tenant, in seconds.
pub const VM_BOOT_TIMEOUT_SECS: (u64, u64) = (5, 3600);

impl Default for TenantsConfig {
    fn default() -> Self {
        Self {
            max_tenants: 1000,
            default_cpus: 1.0,
            default_memory_bytes: 1 << 30,
            default_pids: 1024,
            default_max_containers: 100,
            id_pool_start: 1 << 20,
            id_pool_ranges: 10_000,
            engine_binary: None,
            subid_dir: PathBuf::from("/etc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_slice: crate::cgroups::tenant::SLICE.to_string(),
            cgroup_favor_dynmods: true,
            vm_modules_dir: Some(PathBuf::from("/var/lib/caas-agent/guest/modules")),
            vm_disk_mib: 2048,
            vm_boot_timeout_secs: 120,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[usage]`: metering and the usage ledger (`<state_dir>/usage.db`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Seconds per billing record (1 ..= 3600).
    pub window_secs: u32,
    /// How long per-second samples are kept, in seconds.
    pub sample_retention_secs: u64,
    /// How long acknowledged billing records are kept, in seconds (unacknowledged ones are
    /// kept until acknowledged).
    pub record_retention_secs: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            window_secs: crate::ledger::DEFAULT_WINDOW_SECS,
            sample_retention_secs: crate::ledger::DEFAULT_SAMPLE_RETENTION_SECS,
            record_retention_secs: crate::ledger::DEFAULT_RECORD_RETENTION_SECS,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Text or JSON.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `caas_agent=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Loads `path` if given (it must exist), else the default path if it exists, else defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match crate::fsutil::read_capped(&path, MAX_CONFIG_BYTES) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|e| ConfigError::Parse {
                path: path.clone(),
                line: 1,
                message: format!("not UTF-8: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                let cfg = Config::default();
                cfg.validate().map_err(|invalid| ConfigError::Invalid {
                    path: "<defaults>".into(),
                    invalid,
                })?;
                return Ok(cfg);
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Self::parse(&path, &text)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            let message = e.message().replace('\n', " ");
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                message: match key_at_line(text, line) {
                    Some(key) if !message.contains(&key) => format!("{key}: {message}"),
                    _ => message,
                },
            }
        })?;
        cfg.validate().map_err(|invalid| ConfigError::Invalid {
            path: path.to_path_buf(),
            invalid,
        })?;
        Ok(cfg)
    }

    /// Checks every value against its named limit.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(n) = &self.node_name {
            check_node_name(n)?;
        }
        check_abs("state_dir", &self.state_dir)?;
        check_abs("run_dir", &self.run_dir)?;
        if let Some(p) = &self.api.unix_socket {
            check_abs("api.unix_socket", p)?;
            // sun_path holds 108 bytes including the terminating NUL.
            if p.as_os_str().len() > 107 {
                return Err(Invalid::new(
                    "api.unix_socket",
                    "is longer than the 107 bytes a unix socket path may have",
                ));
            }
        }
        validate::check_range(
            "api.max_message_bytes",
            self.api.max_message_bytes,
            MIN_MESSAGE_BYTES,
            MAX_MESSAGE_BYTES,
        )?;
        validate::check_range(
            "api.drain_timeout_secs",
            self.api.drain_timeout_secs,
            1,
            MAX_DRAIN_SECS,
        )?;
        if self.api.tcp_listen.is_some() && self.api.tls.is_none() {
            return Err(Invalid::new(
                "api.tcp_listen",
                "needs [api.tls] (ca, cert, key): the TCP API is served with mutual TLS only",
            ));
        }
        if let Some(tls) = &self.api.tls {
            check_abs("api.tls.ca", &tls.ca)?;
            check_abs("api.tls.cert", &tls.cert)?;
            check_abs("api.tls.key", &tls.key)?;
        }
        self.export.validate()?;
        self.images.validate()?;
        self.cri.validate()?;
        self.network.subnet_pool()?;
        let u = &self.usage;
        validate::check_range(
            "usage.window_secs",
            u.window_secs,
            1,
            crate::ledger::MAX_WINDOW_SECS,
        )?;
        validate::check_range(
            "usage.sample_retention_secs",
            u.sample_retention_secs,
            crate::ledger::MIN_SAMPLE_RETENTION_SECS,
            crate::ledger::MAX_SAMPLE_RETENTION_SECS,
        )?;
        validate::check_range(
            "usage.record_retention_secs",
            u.record_retention_secs,
            0,
            crate::ledger::MAX_RECORD_RETENTION_SECS,
        )?;
        let t = &self.tenants;
        validate::check_range("tenants.max_tenants", t.max_tenants, 1, MAX_TENANTS)?;
        validate::check_cpus(
            "tenants.default_cpus",
            t.default_cpus,
            MIN_TENANT_CPUS,
            MAX_TENANT_CPUS,
        )?;
        validate::check_range(
            "tenants.default_memory_bytes",
            t.default_memory_bytes,
            MIN_TENANT_MEMORY,
            MAX_TENANT_MEMORY,
        )?;
        validate::check_range("tenants.default_pids", t.default_pids, 1, MAX_TENANT_PIDS)?;
        validate::check_range(
            "tenants.default_max_containers",
            t.default_max_containers,
            1,
            MAX_TENANT_CONTAINERS,
        )?;
        validate::check_range(
            "tenants.id_pool_start",
            t.id_pool_start,
            65_536,
            u32::MAX / 2,
        )?;
        validate::check_range("tenants.id_pool_ranges", t.id_pool_ranges, 1, 32_768)?;
        if u64::from(t.id_pool_start) + u64::from(t.id_pool_ranges) * 65_536 >= u64::from(u32::MAX)
        {
            return Err(Invalid::new(
                "tenants.id_pool_ranges",
                "the pool would reach past the largest uid; lower id_pool_start or id_pool_ranges",
            ));
        }
        if let Some(b) = &t.engine_binary {
            check_abs("tenants.engine_binary", b)?;
        }
        check_abs("tenants.subid_dir", &t.subid_dir)?;
        check_abs("tenants.cgroup_root", &t.cgroup_root)?;
        let slice_ok = t.cgroup_slice.ends_with(".slice")
            && t.cgroup_slice.len() <= 64
            && validate::check_id(
                "tenants.cgroup_slice",
                t.cgroup_slice.trim_end_matches(".slice"),
            )
            .is_ok();
        if !slice_ok {
            return Err(Invalid::new(
                "tenants.cgroup_slice",
                "must be NAME.slice with NAME of [a-z0-9-], at most 64 bytes",
            ));
        }
        if let Some(d) = &t.vm_modules_dir {
            check_abs("tenants.vm_modules_dir", d)?;
        }
        validate::check_range(
            "tenants.vm_disk_mib",
            t.vm_disk_mib,
            VM_DISK_MIB.0,
            VM_DISK_MIB.1,
        )?;
        validate::check_range(
            "tenants.vm_boot_timeout_secs",
            t.vm_boot_timeout_secs,
            VM_BOOT_TIMEOUT_SECS.0,
            VM_BOOT_TIMEOUT_SECS.1,
        )?;
        if let Some(vm) = &self.vm {
            check_vm(vm, &self.run_dir)?;
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(Invalid::new(
                "log.level",
                format!("{:?}: {e}", self.log.level),
            ));
        }
        Ok(())
    }

    /// The unix socket path, defaulted from `run_dir`.
    pub fn unix_socket(&self) -> PathBuf {
        self.api
            .unix_socket
            .clone()
            .unwrap_or_else(|| self.run_dir.join("agent.sock"))
    }

    /// The CRI socket path, defaulted from `run_dir`.
    pub fn cri_socket(&self) -> PathBuf {
        self.cri
            .socket
            .clone()
            .unwrap_or_else(|| self.run_dir.join("cri.sock"))
    }

    /// This node's name: configured, or the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }
}

/// The dotted key set on 1-based `line` (`api.max_message_bytes`), for error messages.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.starts_with('[') {
            table = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
        if i + 1 == line {
            let (k, _) = l.split_once('=')?;
            let k = k.trim();
            return Some(if table.is_empty() {
                k.to_string()
            } else {
                format!("{table}.{k}")
            });
        }
    }
    None
}

fn check_abs(field: &str, p: &Path) -> Result<(), Invalid> {
    if !p.is_absolute() {
        return Err(Invalid::new(
            field,
            format!("{} must be an absolute path", p.display()),
        ));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Invalid::new(field, "must not contain `..`"));
    }
    Ok(())
}

fn check_node_name(n: &str) -> Result<(), Invalid> {
    if n.is_empty() || n.len() > 253 {
        return Err(Invalid::new("node_name", "must be 1..=253 bytes"));
    }
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        || n.starts_with(['-', '.'])
    {
        return Err(Invalid::new(
            "node_name",
            "must be a host name: ASCII letters, digits, '-' and '.'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/t/config.toml"), s)
    }

    #[test]
    fn empty_is_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
node_name = "node-1.example"
state_dir = "/tmp/s"
run_dir = "/tmp/r"
[api]
unix_socket = "/tmp/r/a.sock"
tcp_listen = "127.0.0.1:7443"
max_message_bytes = 65536
drain_timeout_secs = 3
[api.tls]
ca = "/c/ca.pem"
cert = "/c/server.pem"
key = "/c/server-key.pem"
[tenants]
max_tenants = 5
default_cpus = 0.5
[log]
format = "json"
level = "debug"
"#,
        )
        .unwrap();
        assert_eq!(c.api.max_message_bytes, 65536);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.tenants.max_tenants, 5);
    }

    #[test]
    fn unknown_key_is_one_line_with_line_number() {
        let e = parse("node_name = \"a\"\n[api]\nbogus = 1\n").unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn the_shipped_example_is_true() {
        let text = include_str!("../../scripts/config.example.toml");
        // Every commented setting and table header, uncommented, must parse to the defaults.
        let live: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| (l.starts_with('[') && l.ends_with(']')) || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = parse(&live.replace("0.0.0.0:7443", "127.0.0.1:7443")).unwrap();
        assert_eq!(
            c.api.tls.as_ref().map(|t| t.ca.clone()),
            Some("/etc/caas-agent/tls/ca.pem".into())
        );
        let defaults = Config {
            node_name: c.node_name.clone(),
            api: ApiConfig {
                unix_socket: c.api.unix_socket.clone(),
                tcp_listen: c.api.tcp_listen,
                tls: c.api.tls.clone(),
                ..ApiConfig::default()
            },
            tenants: TenantsConfig {
                engine_binary: c.tenants.engine_binary.clone(),
                ..TenantsConfig::default()
            },
            // Examples of settings that are off by default.
            export: crate::export::ExportConfig {
                endpoint: c.export.endpoint.clone(),
                ..Default::default()
            },
            metrics: crate::metrics::MetricsConfig {
                listen: c.metrics.listen,
            },
            network: crate::net::NetworkConfig {
                uplinks: c.network.uplinks.clone(),
                dns: c.network.dns.clone(),
                ..Default::default()
            },
            images: crate::images::ImagesConfig {
                mirrors: c.images.mirrors.clone(),
                ..Default::default()
            },
            cri: crate::cri::CriConfig {
                socket: c.cri.socket.clone(),
                default_quotas: c.cri.default_quotas,
                ..Default::default()
            },
            vm: c.vm.clone(),
            ..Config::default()
        };
        assert_eq!(c, defaults, "the example's values are the defaults");
        assert_eq!(c.cri_socket(), Config::default().cri_socket());
        let vm = c.vm.as_ref().expect("the example shows [vm]");
        assert_eq!(vm.backend.kind(), vmm_config::BackendKind::Qemu);
        assert_eq!(c.unix_socket(), Config::default().unix_socket());
    }

    #[test]
    fn wrong_type_names_the_key() {
        let msg = parse("[api]\nmax_message_bytes = \"big\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("api.max_message_bytes") && msg.contains("line 2"),
            "{msg}"
        );
    }

    #[test]
    fn out_of_range_names_field() {
        for (text, field) in [
            ("[api]\nmax_message_bytes = 1", "api.max_message_bytes"),
            ("[api]\ndrain_timeout_secs = 0", "api.drain_timeout_secs"),
            ("[tenants]\ndefault_cpus = 0.0", "tenants.default_cpus"),
            ("[tenants]\nmax_tenants = 0", "tenants.max_tenants"),
            ("state_dir = \"relative\"", "state_dir"),
            ("[api]\ntcp_listen = \"127.0.0.1:1\"", "api.tcp_listen"),
            ("[log]\nlevel = \"=\"", "log.level"),
            ("[tenants]\nvm_disk_mib = 1", "tenants.vm_disk_mib"),
            (
                "[network]\nenabled = true\nfirewall_check_secs = 0",
                "network.firewall_check_secs",
            ),
            (
                "[network]\nenabled = true\nfirewall_check_secs = 3601",
                "network.firewall_check_secs",
            ),
            (
                "[tenants]\nvm_boot_timeout_secs = 0",
                "tenants.vm_boot_timeout_secs",
            ),
            (
                "[vm]\nbackend = \"qemu\"\nkernel = \"/k\"\nmemory_mib = 64",
                "vm.memory_mib",
            ),
            ("[vm]\nbackend = \"xen\"\nkernel = \"/k\"", "vm.backend"),
            (
                "[vm]\nbackend = \"firecracker\"\nkernel = \"/k\"\n[vm.firecracker]\nconfig_file = \"/f.json\"",
                "vm.backend",
            ),
            (
                "[vm]\nbackend = \"qemu\"\nkernel = \"/k\"\n[[vm.ports]]\nname = \"x\"\nsocket = \"/s\"",
                "vm.ports",
            ),
            (
                "[vm]\nbackend = \"qemu\"\nkernel = \"relative\"",
                "vm.kernel",
            ),
        ] {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains(field), "{text}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }
}
