//! Pod networks through CNI: a network namespace per pod inside its tenant's network boundary.
//!
//! The tenant's netns is the "host" side of CNI. The agent asks the tenant's engine for a pod
//! netns (owned by the tenant's user namespace, so the tenant's containers may join it), then
//! runs the plugins of the configured network list with their process in the tenant's netns and
//! `CNI_NETNS` naming the pod's. A bridge plugin thus makes its bridge inside the tenant's netns,
//! and a pod's traffic leaves the tenant through the tenant's own link to the host, where the
//! firewall, NAT and byte counters of the tenant apply unchanged. In the tenant's netns the
//! agent keeps a small nftables table of its own: pods' traffic leaving through `eth0` is
//! masqueraded to the tenant's address (the host accepts no other source from a tenant), and a
//! pod's host ports, which the host publishes to the tenant's address, are forwarded on to the
//! pod.
//!
//! The protocol is the CNI specification's (1.0.0 and the 0.x versions the plugins still speak):
//! one process per plugin and command, the network configuration on stdin, `CNI_*` in the
//! environment, the result or an error as JSON on stdout. Each plugin of a list gets the
//! previous one's result as `prevResult`; DEL runs the list backwards with the ADD result.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use caas_proto::engine::v1::{self as epb, engine_client::EngineClient};
use tonic::transport::Channel;

use crate::{net::ports::Proto, validate::Invalid};

/// `[cri.cni]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    /// Give every pod a network namespace of its own inside its tenant's, set up by the network
    /// list in `conf_dir` (off: a tenant's pods share the tenant's netns). A VM tenant's pods
    /// get theirs in its guest, where the plugins run.
    pub enabled: bool,
    /// Where the network configuration is: the first `*.conflist`, `*.conf` or `*.json` file by
    /// name, as containerd picks it.
    pub conf_dir: PathBuf,
    /// Where plugin binaries are looked for, in order (`CNI_PATH`).
    pub bin_dirs: Vec<PathBuf>,
    /// How long one plugin may take before it is killed and the call fails.
    pub plugin_timeout_seconds: u64,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            plugin_timeout_seconds: 30,
        }
    }
}

impl CniConfig {
    /// Checks that the paths are absolute and the timeout is sane.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.conf_dir.is_absolute() {
            return Err(Invalid::new(
                "cri.cni.conf_dir",
                format!("{} must be an absolute path", self.conf_dir.display()),
            ));
        }
        if self.bin_dirs.is_empty() {
            return Err(Invalid::new(
                "cri.cni.bin_dirs",
                "must name at least one directory",
            ));
        }
        for (i, d) in self.bin_dirs.iter().enumerate() {
            if !d.is_absolute() || d.to_string_lossy().contains(':') {
                return Err(Invalid::new(
                    format!("cri.cni.bin_dirs[{i}]"),
                    format!("{} must be an absolute path without ':'", d.display()),
                ));
            }
        }
        if !(1..=600).contains(&self.plugin_timeout_seconds) {
            return Err(Invalid::new(
                "cri.cni.plugin_timeout_seconds",
                format!("{} is outside 1..=600", self.plugin_timeout_seconds),
            ));
        }
        Ok(())
    }
}

/// What went wrong with a pod's network.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The network configuration is missing or malformed.
    #[error("CNI network configuration: {0}")]
    Config(String),
    /// A plugin failed or could not be run.
    #[error("CNI plugin {plugin:?} of network {network:?}, {command}: {message}")]
    Plugin {
        /// The plugin's type.
        plugin: String,
        /// The network list's name.
        network: String,
        /// ADD or DEL.
        command: &'static str,
        /// What it said, or why it could not run.
        message: String,
    },
    /// The tenant netns's rules could not be set.
    #[error("the pod rules in tenant {tenant:?}'s network namespace: {message}")]
    Rules {
        /// The tenant.
        tenant: String,
        /// nft's complaint.
        message: String,
    },
}

/// A network configuration list, as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    /// Its name.
    pub name: String,
    /// Its `cniVersion`.
    pub cni_version: String,
    /// The plugins' configurations, in order.
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkList {
    /// The list as JSON (what a pod's record keeps, so DEL uses the ADD's configuration).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "plugins": self.plugins,
        })
    }

    /// Parses a `.conflist` document, or a single plugin's `.conf` (a list of one).
    pub fn parse(text: &str, what: &str) -> Result<Self, CniError> {
        let bad = |m: String| CniError::Config(format!("{what}: {m}"));
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("is not a JSON object".into()))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("has no \"name\"".into()))?
            .to_string();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.2.0")
            .to_string();
        let plugins: Vec<Map<String, Value>> = match obj.get("plugins") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    p.as_object()
                        .cloned()
                        .ok_or_else(|| bad(format!("plugins[{i}] is not an object")))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("\"plugins\" is not a list".into())),
            None => vec![obj.clone()],
        };
        if plugins.is_empty() {
            return Err(bad("lists no plugins".into()));
        }
        for (i, p) in plugins.iter().enumerate() {
            let t = p.get("type").and_then(Value::as_str).unwrap_or_default();
            if t.is_empty() || t.contains('/') || t == "." || t == ".." {
                return Err(bad(format!(
                    "plugins[{i}] has no \"type\" that names a plugin binary"
                )));
            }
        }
        Ok(Self {
            name,
            cni_version,
            plugins,
        })
    }

    /// The first configuration file of `dir` by name, as containerd and CRI-O pick it.
    pub fn load(dir: &Path) -> Result<Self, CniError> {
        let rd = std::fs::read_dir(dir).map_err(|e| {
            CniError::Config(format!(
                "{}: {e}; put a network list there or set [cri.cni] conf_dir",
                dir.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
            })
            .collect();
        files.sort();
        let first = files.first().ok_or_else(|| {
            CniError::Config(format!(
                "{} holds no *.conflist, *.conf or *.json file",
                dir.display()
            ))
        })?;
        let text = std::fs::read_to_string(first)
            .map_err(|e| CniError::Config(format!("{}: {e}", first.display())))?;
        Self::parse(&text, &first.display().to_string())
    }
}

impl CniConfig {
    /// Loads the network list and checks that every plugin it names is installed: what a pod
    /// needs before anything is made for it.
    pub fn network(&self) -> Result<NetworkList, CniError> {
        let list = NetworkList::load(&self.conf_dir)?;
        for p in &list.plugins {
            let ty = p.get("type").and_then(Value::as_str).unwrap_or_default();
            if self.plugin(ty).is_none() {
                return Err(CniError::Config(format!(
                    "network {:?} uses plugin {ty:?}, which is in none of {}; install it (Debian: containernetworking-plugins) or set [cri.cni] bin_dirs",
                    list.name,
                    self.bin_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(list)
    }

    /// Where plugin `ty` is installed.
    pub fn plugin(&self, ty: &str) -> Option<PathBuf> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.is_file())
    }
}

/// What a pod's plugin calls need to know.
#[derive(Debug, Clone)]
pub struct PodCall<'a> {
    /// The pod id (`CNI_CONTAINERID`).
    pub id: &'a str,
    /// The pod's netns (`CNI_NETNS`): a host path, or in a VM tenant the guest's.
    pub netns: &'a Path,
    /// The engine's name for the pod's netns (a VM tenant's guest finds it by that name).
    pub netns_name: &'a str,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` for `CNI_ARGS`.
    pub namespace: &'a str,
    /// The pod's name.
    pub name: &'a str,
    /// The pod's uid.
    pub uid: &'a str,
    /// Where host-local keeps this tenant's allocations (unless the configuration says).
    pub ipam_dir: &'a Path,
}

impl PodCall<'_> {
    /// `CNI_ARGS`: kubelet's pod metadata.
    fn args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.id, self.uid
        )
    }
}

/// Where a pod's plugins run.
#[derive(Debug, Clone)]
pub enum Runner {
    /// On the host, each process in the tenant's netns (a user-namespaced tenant).
    Host {
        /// The tenant's netns.
        tenant_netns: PathBuf,
    },
    /// On the host, in the agent's own netns: host-local IPAM for a VM tenant's pod, which
    /// touches no namespace.
    Node,
    /// In a VM tenant's guest, through its engine (`CniPlugin`), in the guest's tenant netns.
    Guest {
        /// The guest's engine.
        engine: EngineClient<Channel>,
        /// The plugin binaries sent into the guest: name to guest path.
        plugins: BTreeMap<String, String>,
    },
}

/// One plugin call as the CNI specification has a runtime make it: the environment a plugin
/// process gets. The agent runs plugins with it on the host, a VM guest's engine in the guest.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// `CNI_COMMAND`: ADD or DEL.
    pub command: &'a str,
    /// `CNI_CONTAINERID`.
    pub container_id: &'a str,
    /// `CNI_NETNS`.
    pub netns: &'a Path,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// `CNI_ARGS`.
    pub args: &'a str,
    /// `CNI_PATH`: where the plugin finds the plugins it runs in turn (IPAM).
    pub cni_path: &'a str,
}

impl Invocation<'_> {
    /// The plugin's process: only the specification's environment and a `PATH`, standard
    /// streams piped, and, when `enter` is given, that network namespace entered before exec.
    pub fn command(&self, bin: &Path, enter: Option<std::fs::File>) -> std::process::Command {
        let mut cmd = std::process::Command::new(bin);
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", self.netns)
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_PATH", self.cni_path)
            .env("CNI_ARGS", self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = enter {
            // SAFETY: the closure runs in the forked child before exec and makes one system
            // call (setns), which is async-signal-safe; it allocates nothing and takes no lock.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        cmd
    }
}

/// What a plugin process's exit means: its result (`Null` for DEL or an empty answer), or its
/// error message (the specification's `{"code", "msg", "details"}` on stdout, else what it
/// printed). `status` describes an unsuccessful exit.
pub fn outcome(
    command: &str,
    success: bool,
    status: &str,
    stdout: &[u8],
    stderr: &[u8],
) -> Result<Value, String> {
    let stdout = String::from_utf8_lossy(stdout);
    if !success {
        return Err(serde_json::from_str::<Value>(&stdout)
            .ok()
            .map(|v| {
                let mut m = v
                    .get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or("failed")
                    .to_string();
                if let Some(d) = v
                    .get("details")
                    .and_then(Value::as_str)
                    .filter(|d| !d.is_empty())
                {
                    let _ = write!(m, ": {d}");
                }
                if let Some(c) = v.get("code").and_then(Value::as_u64) {
                    let _ = write!(m, " (code {c})");
                }
                m
            })
            .unwrap_or_else(|| {
                format!(
                    "{status}: {}{}",
                    stdout.trim(),
                    String::from_utf8_lossy(stderr).trim()
                )
            }));
    }
    if command == "DEL" || stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).map_err(|e| format!("its result is not JSON: {e}"))
}

/// The interface the pod gets.
pub const POD_IF: &str = "eth0";

/// Runs the list's ADD with `runner`; returns the last plugin's result, which gives the pod an
/// IPv4 address ([`ipv4_of`]). On failure, what was added is deleted again. A guest's list has
/// had its host-local IPAM delegated first ([`delegate_ipam`]).
pub async fn add(
    cfg: &CniConfig,
    list: &NetworkList,
    pod: &PodCall<'_>,
    runner: &Runner,
) -> Result<Value, CniError> {
    let mut prev: Option<Value> = None;
    for (i, plugin) in list.plugins.iter().enumerate() {
        let conf = plugin_conf(list, plugin, prev.as_ref(), pod);
        match exec(cfg, list, plugin_type(plugin), "ADD", &conf, pod, runner).await {
            Ok(r) => prev = Some(r),
            Err(e) => {
                // Undo the plugins that ran, this one included (a DEL of what is not there
                // succeeds), as libcni does.
                let partial = NetworkList {
                    plugins: list.plugins[..=i].to_vec(),
                    ..list.clone()
                };
                if let Err(undo) = del(cfg, &partial, prev.as_ref(), pod, runner).await {
                    tracing::warn!(pod = pod.id, error = %undo, "undoing a failed CNI ADD");
                }
                return Err(e);
            }
        }
    }
    let result = prev.unwrap_or(Value::Null);
    if ipv4_of(&result).is_none() {
        let _ = del(cfg, list, Some(&result), pod, runner).await;
        return Err(CniError::Config(format!(
            "network {:?} gave the pod no IPv4 address (result: {result})",
            list.name
        )));
    }
    Ok(result)
}

/// Runs the list's DEL backwards with `runner`, every plugin even after one fails; the first
/// failure is returned.
pub async fn del(
    cfg: &CniConfig,
    list: &NetworkList,
    result: Option<&Value>,
    pod: &PodCall<'_>,
    runner: &Runner,
) -> Result<(), CniError> {
    let mut first = None;
    for plugin in list.plugins.iter().rev() {
        let conf = plugin_conf(list, plugin, result, pod);
        if let Err(e) = exec(cfg, list, plugin_type(plugin), "DEL", &conf, pod, runner).await {
            tracing::warn!(pod = pod.id, error = %e, "CNI DEL");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn ipam_type(plugin: &Map<String, Value>) -> Option<&str> {
    plugin
        .get("ipam")
        .and_then(Value::as_object)
        .map(|i| i.get("type").and_then(Value::as_str).unwrap_or_default())
}

/// The IPAM plugin that runs on the node for a VM tenant's pods.
const NODE_IPAM: &str = "host-local";
/// The IPAM plugin a VM guest's plugins get the node's addresses through.
const GUEST_IPAM: &str = "static";

/// The list a VM tenant's guest runs for a pod: each host-local IPAM of `list` runs here on the
/// host, in the node's one address store (so the pod's address is the node's only one, as for
/// a user-namespaced tenant's pods, and the host can route it), and is replaced by static IPAM
/// with the addresses, routes and DNS it gave. Static IPAM stays as it is; any other IPAM (such
/// as dhcp, which needs the pod's netns on the host) is refused before anything is allocated.
/// On failure what was allocated is released.
pub async fn delegate_ipam(
    cfg: &CniConfig,
    list: &NetworkList,
    pod: &PodCall<'_>,
) -> Result<NetworkList, CniError> {
    check_guest_ipam(list)?;
    if list.plugins.iter().any(|p| ipam_type(p) == Some(NODE_IPAM))
        && cfg.plugin(NODE_IPAM).is_none()
    {
        return Err(CniError::Config(format!(
            "network {:?} uses host-local IPAM, which is in none of [cri.cni] bin_dirs",
            list.name
        )));
    }
    let mut guest = list.clone();
    for (i, plugin) in list.plugins.iter().enumerate() {
        if ipam_type(plugin) != Some(NODE_IPAM) {
            continue;
        }
        let conf = plugin_conf(list, plugin, None, pod);
        let r = exec(cfg, list, NODE_IPAM, "ADD", &conf, pod, &Runner::Node)
            .await
            .and_then(|r| {
                static_ipam(&r).ok_or_else(|| CniError::Plugin {
                    plugin: NODE_IPAM.into(),
                    network: list.name.clone(),
                    command: "ADD",
                    message: format!("its result gives no address: {r}"),
                })
            });
        match r {
            Ok(ipam) => {
                guest.plugins[i].insert("ipam".into(), ipam);
            }
            Err(e) => {
                let done = NetworkList {
                    plugins: list.plugins[..=i].to_vec(),
                    ..list.clone()
                };
                if let Err(undo) = release_ipam(cfg, &done, pod).await {
                    tracing::warn!(pod = pod.id, error = %undo, "releasing a VM pod's addresses");
                }
                return Err(e);
            }
        }
    }
    Ok(guest)
}

/// Releases what the host's IPAM holds for a VM tenant's pod: DEL of each host-local IPAM of
/// `list` (the list as configured, not the guest's), every one even after one fails.
pub async fn release_ipam(
    cfg: &CniConfig,
    list: &NetworkList,
    pod: &PodCall<'_>,
) -> Result<(), CniError> {
    let mut first = None;
    for plugin in list.plugins.iter().rev() {
        if ipam_type(plugin) != Some(NODE_IPAM) {
            continue;
        }
        let conf = plugin_conf(list, plugin, None, pod);
        if let Err(e) = exec(cfg, list, NODE_IPAM, "DEL", &conf, pod, &Runner::Node).await {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The addresses the static IPAM of `list` gives (those host-local allocated, in a guest's
/// list), without their prefixes: a VM guest's result may name no other, since the host routes
/// what it names to the tenant.
pub fn static_addresses(list: &NetworkList) -> Vec<std::net::IpAddr> {
    list.plugins
        .iter()
        .filter(|p| ipam_type(p) == Some(GUEST_IPAM))
        .filter_map(|p| p.get("ipam")?.get("addresses")?.as_array().cloned())
        .flatten()
        .filter_map(|a| a.get("address")?.as_str()?.split('/').next()?.parse().ok())
        .collect()
}

/// Refuses a list whose IPAM a VM tenant's pods cannot take: host-local (run on the host) and
/// static are what they can.
pub fn check_guest_ipam(list: &NetworkList) -> Result<(), CniError> {
    for p in &list.plugins {
        match ipam_type(p) {
            None | Some(NODE_IPAM | GUEST_IPAM) => {}
            Some(other) => {
                return Err(CniError::Config(format!(
                    "network {:?}: plugin {:?} uses IPAM {other:?}; a VM tenant's pods take host-local IPAM (run on the host) or static",
                    list.name,
                    plugin_type(p)
                )));
            }
        }
    }
    Ok(())
}

/// The plugins a guest's list runs, by name: each plugin's type and static IPAM.
pub fn guest_plugins(list: &NetworkList) -> Vec<String> {
    let mut v: Vec<String> = list
        .plugins
        .iter()
        .flat_map(|p| [Some(plugin_type(p)), ipam_type(p)])
        .flatten()
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Static IPAM configuration holding what an IPAM result gave: its addresses (with their
/// gateways), routes and DNS. `None` when it gives no address.
fn static_ipam(result: &Value) -> Option<Value> {
    let mut addresses = Vec::new();
    let mut routes: Vec<Value> = result
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let entry = |address: &Value, gateway: Option<&Value>| {
        let mut a = Map::new();
        a.insert("address".into(), address.clone());
        if let Some(g) = gateway {
            a.insert("gateway".into(), g.clone());
        }
        Value::Object(a)
    };
    if let Some(ips) = result.get("ips").and_then(Value::as_array) {
        for ip in ips {
            if let Some(addr) = ip.get("address") {
                addresses.push(entry(addr, ip.get("gateway")));
            }
        }
    } else {
        // 0.2: `ip4` and `ip6`, each with its own routes.
        for fam in ["ip4", "ip6"] {
            if let Some(v) = result.get(fam) {
                if let Some(addr) = v.get("ip") {
                    addresses.push(entry(addr, v.get("gateway")));
                }
                if let Some(r) = v.get("routes").and_then(Value::as_array) {
                    routes.extend(r.iter().cloned());
                }
            }
        }
    }
    if addresses.is_empty() {
        return None;
    }
    let mut ipam = Map::new();
    ipam.insert("type".into(), Value::String(GUEST_IPAM.into()));
    ipam.insert("addresses".into(), Value::Array(addresses));
    if !routes.is_empty() {
        ipam.insert("routes".into(), Value::Array(routes));
    }
    if let Some(dns) = result
        .get("dns")
        .filter(|d| d.as_object().is_some_and(|o| !o.is_empty()))
    {
        ipam.insert("dns".into(), dns.clone());
    }
    Some(Value::Object(ipam))
}

/// The IPv6 address a dual-stack result gives the pod besides its IPv4 one (0.3+ `ips`, or
/// 0.2 `ip6.ip`), without its prefix: the first global one. Kubernetes takes one address per
/// family (a pod's `podIPs`), so there is at most one.
pub fn ipv6_of(result: &Value) -> Option<Ipv6Addr> {
    first_address(result, "ip6", |a: &Ipv6Addr| {
        !a.is_unicast_link_local() && !a.is_loopback() && !a.is_unspecified()
    })
}

/// The IPv4 address a result gives the pod (0.3+ `ips`, or 0.2 `ip4.ip`), without its prefix.
pub fn ipv4_of(result: &Value) -> Option<Ipv4Addr> {
    first_address(result, "ip4", |_: &Ipv4Addr| true)
}

/// The first address of type `A` in a result that `keep` takes: from `ips` (0.3+), or from
/// `<legacy>.ip` (0.2).
fn first_address<A: std::str::FromStr>(
    result: &Value,
    legacy: &str,
    keep: impl Fn(&A) -> bool,
) -> Option<A> {
    let parse = |s: &str| {
        s.split('/')
            .next()
            .and_then(|a| a.parse::<A>().ok())
            .filter(|a| keep(a))
    };
    if let Some(ips) = result.get("ips").and_then(Value::as_array) {
        return ips
            .iter()
            .filter_map(|ip| ip.get("address").and_then(Value::as_str))
            .find_map(parse);
    }
    result
        .get(legacy)
        .and_then(|v| v.get("ip"))
        .and_then(Value::as_str)
        .and_then(parse)
}

/// One plugin's stdin: its configuration with the list's name and version, the previous result,
/// and, for host-local IPAM without a `dataDir`, the tenant's own allocation directory (every
/// tenant's bridge is its own L2 domain, so each allocates from the whole range).
fn plugin_conf(
    list: &NetworkList,
    plugin: &Map<String, Value>,
    prev: Option<&Value>,
    pod: &PodCall<'_>,
) -> Value {
    let mut c = plugin.clone();
    c.insert("name".into(), Value::String(list.name.clone()));
    c.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    if let Some(p) = prev
        && !list.cni_version.starts_with("0.2")
        && !list.cni_version.starts_with("0.1")
    {
        c.insert("prevResult".into(), p.clone());
    }
    if let Some(Value::Object(ipam)) = c.get_mut("ipam")
        && ipam.get("type").and_then(Value::as_str) == Some("host-local")
        && !ipam.contains_key("dataDir")
    {
        ipam.insert(
            "dataDir".into(),
            Value::String(pod.ipam_dir.to_string_lossy().into_owned()),
        );
    }
    Value::Object(c)
}

/// Releases the addresses host-local holds for `container` in `list` (its `dataDir`, else
/// `default_dir`), as its DEL would: for a pod whose tenant's netns is gone, where the plugins
/// cannot run. host-local keeps one file per address, named by it, that starts with the
/// container id. Returns the addresses released.
pub fn release_host_local(
    list: &NetworkList,
    default_dir: &Path,
    container: &str,
) -> std::io::Result<Vec<String>> {
    let mut released = Vec::new();
    for p in &list.plugins {
        let Some(Value::Object(ipam)) = p.get("ipam") else {
            continue;
        };
        if ipam.get("type").and_then(Value::as_str) != Some("host-local") {
            continue;
        }
        let dir = ipam
            .get("dataDir")
            .and_then(Value::as_str)
            .map_or_else(|| default_dir.to_path_buf(), PathBuf::from)
            .join(&list.name);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<std::net::IpAddr>().is_err() {
                continue; // last_reserved_ip.*, the lock
            }
            let held = std::fs::read_to_string(e.path()).unwrap_or_default();
            if held.lines().next().map(str::trim) == Some(container) {
                std::fs::remove_file(e.path())?;
                released.push(name);
            }
        }
    }
    Ok(released)
}

impl CniConfig {
    /// `CNI_PATH` on the host.
    fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// Runs plugin `ty` with `runner`.
async fn exec(
    cfg: &CniConfig,
    list: &NetworkList,
    ty: &str,
    command: &'static str,
    conf: &Value,
    pod: &PodCall<'_>,
    runner: &Runner,
) -> Result<Value, CniError> {
    let fail = |message: String| CniError::Plugin {
        plugin: ty.to_string(),
        network: list.name.clone(),
        command,
        message,
    };
    let body = conf.to_string().into_bytes();
    let args = pod.args();
    let host = |tenant_netns: Option<&Path>| {
        let bin = cfg.plugin(ty).ok_or_else(|| {
            fail(format!(
                "no such plugin in {}; install it (Debian: containernetworking-plugins) or set [cri.cni] bin_dirs",
                cfg.bin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let enter = tenant_netns
            .map(|p| {
                std::fs::File::open(p)
                    .map_err(|e| fail(format!("the tenant's netns {}: {e}", p.display())))
            })
            .transpose()?;
        let cni_path = cfg.cni_path();
        let inv = Invocation {
            command,
            container_id: pod.id,
            netns: pod.netns,
            ifname: POD_IF,
            args: &args,
            cni_path: &cni_path,
        };
        Ok::<_, CniError>((bin.clone(), inv.command(&bin, enter)))
    };
    match runner {
        Runner::Host { tenant_netns } => {
            let (bin, cmd) = host(Some(tenant_netns))?;
            let out = run_host(cfg, &bin, cmd, &body).await.map_err(fail)?;
            outcome(
                command,
                out.status.success(),
                &out.status.to_string(),
                &out.stdout,
                &out.stderr,
            )
            .map_err(fail)
        }
        Runner::Node => {
            let (bin, cmd) = host(None)?;
            let out = run_host(cfg, &bin, cmd, &body).await.map_err(fail)?;
            outcome(
                command,
                out.status.success(),
                &out.status.to_string(),
                &out.stdout,
                &out.stderr,
            )
            .map_err(fail)
        }
        Runner::Guest { engine, plugins } => {
            // The guest kills the plugin after the timeout; a guest that does not answer at all
            // must not hold the pod's set-up for ever either.
            let limit = Duration::from_secs(cfg.plugin_timeout_seconds + GUEST_MARGIN_SECS);
            let mut engine = engine.clone();
            let call = engine.cni_plugin(epb::CniPluginRequest {
                plugins: plugins.clone().into_iter().collect(),
                plugin: ty.to_string(),
                command: command.to_string(),
                container_id: pod.id.to_string(),
                netns: pod.netns_name.to_string(),
                ifname: POD_IF.to_string(),
                args,
                config: body,
                timeout_seconds: u32::try_from(cfg.plugin_timeout_seconds).unwrap_or(600),
            });
            let r = tokio::time::timeout(limit, call)
                .await
                .map_err(|_| {
                    fail(format!(
                        "the VM guest did not answer within {} s",
                        limit.as_secs()
                    ))
                })?
                .map_err(|e| fail(format!("in the VM guest: {}", e.message())))?
                .into_inner();
            outcome(
                command,
                r.exit_code == 0,
                &format!("exit code {}", r.exit_code),
                &r.stdout,
                &r.stderr,
            )
            .map_err(fail)
        }
    }
}

/// How much longer than a plugin may take its VM guest may take to answer.
const GUEST_MARGIN_SECS: u64 = 15;

/// How long a VM guest may take to load the pod rules.
const GUEST_RULES_SECS: u64 = 30;

/// Runs a plugin process on the host: feeds it its configuration and waits, under the
/// configured timeout (a plugin that exits without reading all of it, a broken pipe here, still
/// has its say on stdout).
async fn run_host(
    cfg: &CniConfig,
    bin: &Path,
    cmd: std::process::Command,
    body: &[u8],
) -> Result<std::process::Output, String> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let stdin = child.stdin.take();
    let body = body.to_vec();
    let run = async move {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(&body).await;
        }
        child.wait_with_output().await
    };
    tokio::time::timeout(Duration::from_secs(cfg.plugin_timeout_seconds), run)
        .await
        .map_err(|_| {
            format!(
                "took longer than {} s and was killed ([cri.cni] plugin_timeout_seconds)",
                cfg.plugin_timeout_seconds
            )
        })?
        .map_err(|e| format!("waiting for it: {e}"))
}

/// A host port forwarded in the tenant's netns to a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// tcp or udp.
    pub proto: Proto,
    /// The port on the tenant's address (the host port; the host publishes it there).
    pub port: u16,
    /// The pod's address.
    pub pod_ip: Ipv4Addr,
    /// The pod's port.
    pub pod_port: u16,
}

/// The nft table the agent keeps in a tenant's netns.
const TABLE: &str = "caas_pods";

/// The transaction that replaces the tenant netns's table: masquerade of pods' traffic leaving
/// through `eth0` to the tenant's address, and the host ports' forwards.
pub fn tenant_rules(tenant_ip: Option<Ipv4Addr>, forwards: &[Forward]) -> String {
    let mut s = format!("add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    s.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n",
    );
    for f in forwards {
        let _ = writeln!(
            s,
            "    iifname \"eth0\" {} dport {} dnat to {}:{}",
            f.proto.as_str(),
            f.port,
            f.pod_ip,
            f.pod_port
        );
    }
    s.push_str(
        "  }\n  chain postrouting {\n    type nat hook postrouting priority 100; policy accept;\n",
    );
    match tenant_ip {
        Some(ip) => {
            let _ = writeln!(s, "    oifname \"eth0\" ip saddr != {ip} masquerade");
        }
        None => s.push_str("    oifname \"eth0\" masquerade\n"),
    }
    s.push_str("  }\n}\n");
    s
}

/// Turns IPv4 forwarding on in network namespace `ns`, from a thread of its own that enters it
/// (`/proc/sys/net` is the opener's netns) and ends after: never a pooled thread, which would
/// stay in the namespace. Blocks until done.
pub fn enable_forwarding(ns: std::fs::File) -> std::io::Result<()> {
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)
            .and_then(|()| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
    })
    .join()
    .map_err(|_| std::io::Error::other("the thread turning forwarding on died"))?
}

/// `nft -f -` in network namespace `ns`, its script to come on stdin. nft is looked for where
/// a VM guest has it (its init gives processes no `PATH`), then on the `PATH`.
pub fn nft_in(ns: std::fs::File) -> std::process::Command {
    let nft = crate::vm::initramfs::GUEST_NFT;
    let mut cmd = std::process::Command::new(if Path::new(nft).is_file() { nft } else { "nft" });
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: as in `Invocation::command`: one async-signal-safe system call in the child
    // before exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    cmd
}

/// Replaces the table in a user-namespaced tenant's netns and turns forwarding on there (a VM
/// tenant's guest engine does the same in the guest, `PodRules`).
pub async fn apply_tenant_rules(
    tenant: &str,
    tenant_netns: &Path,
    tenant_ip: Option<Ipv4Addr>,
    forwards: &[Forward],
) -> Result<(), CniError> {
    let fail = |message: String| CniError::Rules {
        tenant: tenant.into(),
        message,
    };
    let ns = std::fs::File::open(tenant_netns)
        .map_err(|e| fail(format!("{}: {e}", tenant_netns.display())))?;
    let ns2 = ns.try_clone().map_err(|e| fail(e.to_string()))?;
    tokio::task::spawn_blocking(move || enable_forwarding(ns2))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(format!("turning forwarding on: {e}")))?;
    let script = tenant_rules(tenant_ip, forwards);
    let mut cmd = tokio::process::Command::from(nft_in(ns));
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("starting nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| fail(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| fail(format!("nft: {e}")))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Replaces the pod rules in a VM tenant's guest (its engine's `PodRules`).
pub async fn apply_guest_rules(
    tenant: &str,
    engine: &EngineClient<Channel>,
    tenant_ip: Option<Ipv4Addr>,
    forwards: &[Forward],
) -> Result<(), CniError> {
    let mut engine = engine.clone();
    let call = engine.pod_rules(epb::PodRulesRequest {
        tenant_ip: tenant_ip.map(|a| a.to_string()).unwrap_or_default(),
        forwards: forwards
            .iter()
            .map(|f| epb::PodForward {
                proto: f.proto.as_str().into(),
                port: f.port.into(),
                pod_ip: f.pod_ip.to_string(),
                pod_port: f.pod_port.into(),
            })
            .collect(),
    });
    let fail = |message: String| CniError::Rules {
        tenant: tenant.into(),
        message,
    };
    tokio::time::timeout(Duration::from_secs(GUEST_RULES_SECS), call)
        .await
        .map_err(|_| {
            fail(format!(
                "the VM guest did not answer within {GUEST_RULES_SECS} s"
            ))
        })?
        .map_err(|e| fail(format!("in the VM guest: {}", e.message())))?;
    Ok(())
}

/// The forwards of a `PodRules` request, checked.
pub fn forwards_of(req: &epb::PodRulesRequest) -> Result<(Option<Ipv4Addr>, Vec<Forward>), String> {
    let tenant_ip = if req.tenant_ip.is_empty() {
        None
    } else {
        Some(
            req.tenant_ip
                .parse()
                .map_err(|_| format!("tenant_ip {:?} is not an IPv4 address", req.tenant_ip))?,
        )
    };
    let port = |what: &str, i: usize, p: u32| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("forwards[{i}].{what} {p} is not a port"))
    };
    let forwards = req
        .forwards
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Ok(Forward {
                proto: match f.proto.as_str() {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    p => return Err(format!("forwards[{i}].proto {p:?} is neither tcp nor udp")),
                },
                port: port("port", i, f.port)?,
                pod_ip: f.pod_ip.parse().map_err(|_| {
                    format!("forwards[{i}].pod_ip {:?} is not an IPv4 address", f.pod_ip)
                })?,
                pod_port: port("pod_port", i, f.pod_port)?,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok((tenant_ip, forwards))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_and_a_single_conf_both_load_and_bad_ones_are_named() {
        let l = NetworkList::parse(
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap"}]}"#,
            "x.conflist",
        )
        .unwrap();
        assert_eq!(l.name, "pods");
        assert_eq!(l.plugins.len(), 2);
        let one = NetworkList::parse(
            r#"{"cniVersion":"0.4.0","name":"one","type":"bridge"}"#,
            "y.conf",
        )
        .unwrap();
        assert_eq!(one.plugins.len(), 1);
        assert_eq!(one.cni_version, "0.4.0");
        for (bad, what) in [
            ("{", "not JSON"),
            (r#"{"plugins":[{"type":"bridge"}]}"#, "no \"name\""),
            (r#"{"name":"n","plugins":[]}"#, "no plugins"),
            (r#"{"name":"n","plugins":[{"type":"../x"}]}"#, "type"),
        ] {
            let e = NetworkList::parse(bad, "z.conflist")
                .unwrap_err()
                .to_string();
            assert!(e.contains("z.conflist") && e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn plugin_stdin_carries_name_version_prev_result_and_the_nodes_ipam_dir() {
        let l = NetworkList::parse(
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","ipam":{"type":"host-local","ranges":[]}},{"type":"tuning","ipam":{"type":"host-local","dataDir":"/keep"}}]}"#,
            "x",
        )
        .unwrap();
        let pod = PodCall {
            id: "p",
            netns: Path::new("/n"),
            netns_name: "p",
            namespace: "ns",
            name: "name",
            uid: "u",
            ipam_dir: Path::new("/run/caas/cni-ipam"),
        };
        let first = plugin_conf(&l, &l.plugins[0], None, &pod);
        assert_eq!(first["name"], "pods");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert_eq!(first["ipam"]["dataDir"], "/run/caas/cni-ipam");
        let prev = serde_json::json!({"ips":[{"address":"10.1.0.5/24"}]});
        let second = plugin_conf(&l, &l.plugins[1], Some(&prev), &pod);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["ipam"]["dataDir"], "/keep");
        assert_eq!(ipv4_of(&prev), Some(Ipv4Addr::new(10, 1, 0, 5)));
        assert_eq!(
            ipv4_of(&serde_json::json!({"ip4":{"ip":"10.2.0.7/16"}})),
            Some(Ipv4Addr::new(10, 2, 0, 7))
        );
        assert_eq!(ipv4_of(&serde_json::json!({"ips":[]})), None);
        let dual = serde_json::json!({"ips":[
            {"address":"fe80::1/64","interface":2},
            {"address":"10.1.0.5/24","interface":2},
            {"address":"fd00:1::5/64","interface":2},
            {"address":"fd00:2::5/64","interface":2}]});
        assert_eq!(ipv4_of(&dual), Some(Ipv4Addr::new(10, 1, 0, 5)));
        assert_eq!(ipv6_of(&dual), "fd00:1::5".parse().ok());
        assert_eq!(ipv6_of(&prev), None);
        assert_eq!(
            ipv6_of(&serde_json::json!({"ip6":{"ip":"2001:db8::7/64"}})),
            "2001:db8::7".parse().ok()
        );
    }

    #[test]
    fn host_local_addresses_of_one_pod_are_released_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("keep");
        let l = NetworkList::parse(
            &format!(
                r#"{{"cniVersion":"1.0.0","name":"pods","plugins":[{{"type":"bridge","ipam":{{"type":"host-local"}}}},{{"type":"x","ipam":{{"type":"host-local","dataDir":"{}"}}}},{{"type":"portmap"}}]}}"#,
                kept.display()
            ),
            "x",
        )
        .unwrap();
        let store = dir.path().join("default");
        for (d, ip, who) in [
            (&store, "10.1.0.5", "pod-a\r\neth0"),
            (&store, "10.1.0.6", "pod-b\r\neth0"),
            (&store, "last_reserved_ip.0", "pod-a"),
            (&kept, "10.2.0.9", "pod-a"),
        ] {
            std::fs::create_dir_all(d.join("pods")).unwrap();
            std::fs::write(d.join("pods").join(ip), who).unwrap();
        }
        let mut released = release_host_local(&l, &store, "pod-a").unwrap();
        released.sort();
        assert_eq!(released, ["10.1.0.5", "10.2.0.9"]);
        assert!(
            store.join("pods/10.1.0.6").exists(),
            "another pod's address"
        );
        assert!(store.join("pods/last_reserved_ip.0").exists());
        assert!(!store.join("pods/10.1.0.5").exists());
        assert!(!kept.join("pods/10.2.0.9").exists());
        // Nothing held, or no store at all: nothing to do.
        assert!(
            release_host_local(&l, &dir.path().join("none"), "pod-a")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_vm_guests_list_takes_static_ipam_with_what_host_local_gave() {
        let r = serde_json::json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.245.0.7/24", "gateway": "10.245.0.1"},
                    {"address": "fd00:245::7/64"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.96.0.10"]}
        });
        assert_eq!(
            static_ipam(&r).unwrap(),
            serde_json::json!({
                "type": "static",
                "addresses": [{"address": "10.245.0.7/24", "gateway": "10.245.0.1"},
                              {"address": "fd00:245::7/64"}],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {"nameservers": ["10.96.0.10"]}
            })
        );
        // 0.2: ip4 with its own routes; an empty dns is left out.
        let old = serde_json::json!({
            "ip4": {"ip": "10.2.0.7/16", "gateway": "10.2.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
            "dns": {}
        });
        assert_eq!(
            static_ipam(&old).unwrap(),
            serde_json::json!({
                "type": "static",
                "addresses": [{"address": "10.2.0.7/16", "gateway": "10.2.0.1"}],
                "routes": [{"dst": "0.0.0.0/0"}]
            })
        );
        assert_eq!(static_ipam(&serde_json::json!({"ips": []})), None);

        let l = NetworkList::parse(
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","ipam":{"type":"static","addresses":[]}},{"type":"tuning"},{"type":"bridge"}]}"#,
            "x",
        )
        .unwrap();
        assert_eq!(guest_plugins(&l), ["bridge", "static", "tuning"]);
        // What a guest may claim: the static addresses, and nothing from other IPAM.
        let given = NetworkList::parse(
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[
                {"type":"bridge","ipam":{"type":"static","addresses":[{"address":"10.9.0.4/24"},{"address":"fd00::4/64"}]}},
                {"type":"ptp","ipam":{"type":"host-local","addresses":[{"address":"10.1.1.1/24"}]}}]}"#,
            "x",
        )
        .unwrap();
        assert_eq!(
            static_addresses(&given),
            [
                "10.9.0.4".parse::<std::net::IpAddr>().unwrap(),
                "fd00::4".parse().unwrap()
            ]
        );
        check_guest_ipam(&l).unwrap();
        let dhcp = NetworkList::parse(
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"macvlan","ipam":{"type":"dhcp"}}]}"#,
            "x",
        )
        .unwrap();
        let e = check_guest_ipam(&dhcp).unwrap_err().to_string();
        assert!(
            e.contains("\"macvlan\"") && e.contains("\"dhcp\"") && e.contains("host-local"),
            "{e}"
        );
    }

    /// A stand-in host-local: logs its command and container to `log`, answers ADD with an
    /// address.
    fn fake_host_local(dir: &Path, log: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("host-local");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\ncat >/dev/null\necho \"$CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME\" >> {}\n\
                 [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.9.0.4/24\",\"gateway\":\"10.9.0.1\"}}]}}'\n\
                 exit 0\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn host_local_runs_on_the_node_for_a_vm_pod_and_its_release_is_a_del() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        fake_host_local(d.path(), &log);
        let cfg = CniConfig {
            enabled: true,
            bin_dirs: vec![d.path().to_path_buf()],
            ..CniConfig::default()
        };
        let l = NetworkList::parse(
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","isGateway":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.9.0.0/24"}]]}},{"type":"tuning"}]}"#,
            "x",
        )
        .unwrap();
        let pod = PodCall {
            id: "pod-1",
            netns: Path::new("/run/guest/ns/pods/pod-1"),
            netns_name: "pod-1",
            namespace: "ns",
            name: "p",
            uid: "u",
            ipam_dir: &d.path().join("ipam"),
        };
        let guest = delegate_ipam(&cfg, &l, &pod).await.unwrap();
        assert_eq!(
            guest.plugins[0]["ipam"],
            serde_json::json!({"type": "static",
                "addresses": [{"address": "10.9.0.4/24", "gateway": "10.9.0.1"}]})
        );
        assert_eq!(guest.plugins[0]["isGateway"], true, "the rest is kept");
        assert_eq!(guest.plugins[1], l.plugins[1]);
        release_ipam(&cfg, &l, &pod).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "ADD pod-1 eth0\nDEL pod-1 eth0\n"
        );
        // A list whose host-local is not installed is refused before anything runs.
        let none = CniConfig {
            bin_dirs: vec![d.path().join("nothing")],
            ..cfg.clone()
        };
        let e = delegate_ipam(&none, &l, &pod).await.unwrap_err();
        assert!(matches!(e, CniError::Config(_)), "{e}");
    }

    #[test]
    fn a_plugins_exit_is_its_result_or_its_error_message() {
        assert_eq!(
            outcome("ADD", true, "", br#"{"ips":[]}"#, b"").unwrap(),
            serde_json::json!({"ips": []})
        );
        assert_eq!(outcome("DEL", true, "", b"", b"").unwrap(), Value::Null);
        let e = outcome(
            "ADD",
            false,
            "exit status: 1",
            br#"{"code":11,"msg":"failed to allocate","details":"range full"}"#,
            b"",
        )
        .unwrap_err();
        assert_eq!(e, "failed to allocate: range full (code 11)");
        let e = outcome("ADD", false, "exit code 2", b"", b"panic: boom").unwrap_err();
        assert_eq!(e, "exit code 2: panic: boom");
        assert!(outcome("ADD", true, "", b"not json", b"").is_err());
    }

    #[test]
    fn pod_rules_requests_are_checked_field_by_field() {
        let fwd = |proto: &str, port: u32, ip: &str| epb::PodForward {
            proto: proto.into(),
            port,
            pod_ip: ip.into(),
            pod_port: 80,
        };
        let req = |tenant_ip: &str, f: Vec<epb::PodForward>| epb::PodRulesRequest {
            tenant_ip: tenant_ip.into(),
            forwards: f,
        };
        let (ip, f) = forwards_of(&req("10.88.0.2", vec![fwd("udp", 5353, "10.245.0.3")])).unwrap();
        assert_eq!(ip, Some(Ipv4Addr::new(10, 88, 0, 2)));
        assert_eq!(
            f,
            [Forward {
                proto: Proto::Udp,
                port: 5353,
                pod_ip: Ipv4Addr::new(10, 245, 0, 3),
                pod_port: 80
            }]
        );
        assert_eq!(forwards_of(&req("", vec![])).unwrap(), (None, vec![]));
        for (r, what) in [
            (req("nope", vec![]), "tenant_ip"),
            (
                req("", vec![fwd("sctp", 1, "10.0.0.1")]),
                "forwards[0].proto",
            ),
            (req("", vec![fwd("tcp", 0, "10.0.0.1")]), "forwards[0].port"),
            (
                req("", vec![fwd("tcp", 70000, "10.0.0.1")]),
                "forwards[0].port",
            ),
            (
                req("", vec![fwd("tcp", 80, "fd00::1")]),
                "forwards[0].pod_ip",
            ),
        ] {
            let e = forwards_of(&r).unwrap_err();
            assert!(e.starts_with(what), "{what}: {e}");
        }
    }

    #[test]
    fn the_tenant_rules_masquerade_pods_and_forward_host_ports() {
        let s = tenant_rules(
            Some(Ipv4Addr::new(10, 88, 0, 2)),
            &[Forward {
                proto: Proto::Tcp,
                port: 30080,
                pod_ip: Ipv4Addr::new(10, 244, 0, 3),
                pod_port: 80,
            }],
        );
        assert!(s.starts_with("add table ip caas_pods\ndelete table ip caas_pods\n"));
        assert!(s.contains("iifname \"eth0\" tcp dport 30080 dnat to 10.244.0.3:80"));
        assert!(s.contains("oifname \"eth0\" ip saddr != 10.88.0.2 masquerade"));
    }
}
