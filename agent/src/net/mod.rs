//! Tenant networks. Each tenant's network namespace is joined to the host by one veth pair (no
//! bridge: routed, L3; a tenant's containers share its netns, so they meet on its loopback and
//! its `eth0`). The host side is `caas-<10 hex>` with the first address of the tenant's subnet;
//! the tenant side is `eth0` with the second address and a default route via the host side.
//! Forwarding is switched on per link (the tenant links and the configured uplinks), never
//! globally. Links are made over rtnetlink; the firewall, egress NAT and published ports live in
//! the agent's own nftables table ([`nft`]); published ports are owned in [`ports`]. Containers
//! get a resolv.conf written here. `docs/design.md` has the design and its limits.

pub mod conntrack;
pub mod nft;
pub mod ports;

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder, new_connection,
    packet_route::link::{
        AfSpecInet, AfSpecUnspec, InetDevConf, InfoData, InfoVeth, LinkAttribute,
    },
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{
    tenants::subnet::{Ipv4Net, SubnetPool},
    validate::Invalid,
};

/// The interface name inside the tenant's netns.
pub const TENANT_IF: &str = "eth0";

/// `[network]`: tenant networks.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Whether tenants get a network link to the host (off: each tenant's netns has only
    /// loopback).
    pub enabled: bool,
    /// Where tenant subnets come from.
    pub pool: Ipv4Net,
    /// The prefix length of each tenant's subnet (pool's ..= 30).
    pub tenant_prefix: u8,
    /// Host interfaces that lead out (replies to tenants' egress and published-port traffic
    /// arrive on them): the agent switches IPv4 forwarding on for each, and only for them.
    /// Empty: the interfaces of the host's default routes.
    pub uplinks: Vec<String>,
    /// Ranges no tenant may reach (cloud metadata, the control plane), besides other tenants'
    /// subnets and the host's own addresses, which are always walled off.
    pub denied: Vec<Ipv4Net>,
    /// Name servers written into containers' /etc/resolv.conf. Empty: the host's
    /// /etc/resolv.conf ones, without loopback addresses (a tenant cannot reach those).
    pub dns: Vec<Ipv4Addr>,
    /// The lowest host port containers may publish.
    pub publish_min: u16,
    /// The highest (default 32767: below Linux's ephemeral ports, which published ports would
    /// take from the host's outgoing connections).
    pub publish_max: u16,
    /// Published ports per tenant, at most.
    pub max_published_per_tenant: u32,
    /// How often the agent checks that its nftables table is there, in seconds (1 ..= 3600).
    /// It reloads the table as soon as `nft monitor` reports it deleted; this check is for
    /// when the monitor is not running.
    pub firewall_check_secs: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            pool: Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16)
                .unwrap_or_else(|_| unreachable!("10.88.0.0/16 is a valid network")),
            tenant_prefix: 30,
            uplinks: Vec::new(),
            denied: vec![
                Ipv4Net::new(Ipv4Addr::new(169, 254, 0, 0), 16)
                    .unwrap_or_else(|_| unreachable!("169.254.0.0/16 is a valid network")),
            ],
            dns: Vec::new(),
            publish_min: 30000,
            publish_max: 32767,
            max_published_per_tenant: 64,
            firewall_check_secs: 5,
        }
    }
}

impl NetworkConfig {
    /// The subnet pool, when networks are on.
    pub fn subnet_pool(&self) -> Result<Option<SubnetPool>, Invalid> {
        if !self.enabled {
            return Ok(None);
        }
        for (i, u) in self.uplinks.iter().enumerate() {
            let ok_char = |c: char| c.is_ascii_alphanumeric() || "_.:@-".contains(c);
            if u.is_empty() || u.len() > 15 || !u.chars().all(ok_char) || u == "." || u == ".." {
                return Err(Invalid::new(
                    format!("network.uplinks[{i}]"),
                    format!("{u:?} is not an interface name (1 to 15 of a-z A-Z 0-9 _ . : @ -)"),
                ));
            }
            if u.starts_with("caas-") {
                return Err(Invalid::new(
                    format!("network.uplinks[{i}]"),
                    format!("{u:?}: caas- names belong to tenant links"),
                ));
            }
        }
        for (i, d) in self.denied.iter().enumerate() {
            if d.overlaps(&self.pool) {
                return Err(Invalid::new(
                    format!("network.denied[{i}]"),
                    format!("{d} overlaps the tenant pool {}", self.pool),
                ));
            }
        }
        if !(1..=3600).contains(&self.firewall_check_secs) {
            return Err(Invalid::new(
                "network.firewall_check_secs",
                format!("{} is outside 1..=3600", self.firewall_check_secs),
            ));
        }
        if self.publish_min == 0 || self.publish_min > self.publish_max {
            return Err(Invalid::new(
                "network.publish_min",
                format!(
                    "the publish range {}-{} is empty or starts at 0",
                    self.publish_min, self.publish_max
                ),
            ));
        }
        SubnetPool::new(self.pool, self.tenant_prefix)
            .map(Some)
            .map_err(|e| Invalid::new("network.tenant_prefix", e.to_string()))
    }

    /// The uplinks: as configured, or the interfaces of the default routes.
    pub fn uplinks(&self) -> Vec<String> {
        if !self.uplinks.is_empty() {
            return self.uplinks.clone();
        }
        let table = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        let mut out: Vec<String> = Vec::new();
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags ... Mask: a default route has both zero.
            if f.len() > 7
                && f[1] == "00000000"
                && f[7] == "00000000"
                && !out.iter().any(|o| o == f[0])
            {
                out.push(f[0].to_string());
            }
        }
        out
    }

    /// The name servers for containers.
    pub fn name_servers(&self) -> Vec<Ipv4Addr> {
        let found = self.name_servers_quiet();
        if found.is_empty() {
            tracing::warn!(
                "no name server a tenant can reach in the host's resolv.conf: containers get none; set [network] dns"
            );
        }
        found
    }

    /// [`Self::name_servers`] without the warning when there are none.
    pub fn name_servers_quiet(&self) -> Vec<Ipv4Addr> {
        if !self.dns.is_empty() {
            return self.dns.clone();
        }
        // systemd-resolved's stub (127.0.0.53) is unreachable from a tenant; its upstream list
        // is in the second file.
        for f in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
            let conf = std::fs::read_to_string(f).unwrap_or_default();
            let found: Vec<Ipv4Addr> = conf
                .lines()
                .filter_map(|l| l.trim().strip_prefix("nameserver"))
                .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
                .filter(|a| !a.is_loopback() && !a.is_unspecified())
                .collect();
            if !found.is_empty() {
                return found;
            }
        }
        Vec::new()
    }
}

/// The resolv.conf a tenant's containers see.
pub fn resolv_conf(servers: &[Ipv4Addr]) -> String {
    let mut s = String::from("# written by caas-agent for this tenant's containers\n");
    for a in servers {
        s.push_str(&format!("nameserver {a}\n"));
    }
    s
}

/// Where the agent keeps a tenant's resolv.conf; the engine binds it into containers.
pub fn resolv_conf_path(run_dir: &Path, tenant: &str) -> std::path::PathBuf {
    run_dir.join("tenants").join(tenant).join("resolv.conf")
}

/// The node's network side: the nftables table, the published ports, the uplinks.
#[derive(Debug)]
pub struct Network {
    /// `[network]`.
    pub config: NetworkConfig,
    nft: nft::Nft,
    rules: nft::Ruleset,
    /// Published ports.
    pub ports: ports::PortTable,
    /// The host sockets that hold published ports.
    held: std::sync::Mutex<std::collections::HashMap<(ports::Proto, u16), std::os::fd::OwnedFd>>,
    /// Held across every change of the kernel's table (a load from a snapshot of the port
    /// table, an element added or deleted), so that a load never lands after, and undoes, a
    /// publish that its snapshot missed.
    table: tokio::sync::Mutex<()>,
}

impl Network {
    /// Starts the node's network side: switches forwarding on for the uplinks and loads the
    /// table with the ports published before (atomically: a running tenant is never without
    /// its firewall). `reserved` are the agent's own ports.
    pub async fn start(
        config: &NetworkConfig,
        state_dir: &Path,
        reserved: Vec<(ports::Proto, u16, String)>,
    ) -> Result<Self, NetError> {
        let dir = state_dir.join("network");
        let policy = ports::Policy {
            range: (config.publish_min, config.publish_max),
            per_tenant: config.max_published_per_tenant,
        };
        let ports = ports::PortTable::open(&dir.join("ports.json"), reserved, policy)
            .map_err(io_fail("ports.json", "reading the published ports"))?;
        // Uplinks whose forwarding the agent switches on (kept, so that a restart still knows
        // it was the agent): what enters on them may be forwarded to tenants only.
        let routed_file = dir.join("routed-uplinks.json");
        let mut routed: Vec<String> = std::fs::read(&routed_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let uplinks = config.uplinks();
        if uplinks.is_empty() {
            tracing::warn!(
                "no uplink (no default route, and [network] uplinks is empty): tenants have no egress and published ports answer on no interface"
            );
        }
        let mut switch = Vec::new();
        for u in &uplinks {
            let f = format!("/proc/sys/net/ipv4/conf/{u}/forwarding");
            if std::fs::read_to_string(&f).is_ok_and(|v| v.trim() == "0") {
                switch.push(f);
                if !routed.contains(u) {
                    routed.push(u.clone());
                }
            }
        }
        let saved = serde_json::to_vec(&routed).unwrap_or_default();
        crate::fsutil::ensure_dir(&dir, 0o700)
            .and_then(|()| crate::fsutil::write_atomic(&routed_file, &saved, 0o600))
            .map_err(io_fail("routed-uplinks.json", "saving the uplinks"))?;
        let rules = nft::Ruleset {
            pool: config.pool,
            denied: config.denied.clone(),
            uplinks,
            routed,
        };
        // The table before forwarding: never a moment of routing without the firewall.
        let nft = nft::Nft::default();
        nft.load(&rules, &ports.all().await)
            .await
            .map_err(|e| NetError {
                link: "table inet caas".into(),
                step: "loading the firewall",
                message: e.to_string(),
            })?;
        for f in switch {
            match std::fs::write(&f, "1") {
                Ok(()) => tracing::info!(sysctl = %f, "IPv4 forwarding on for an uplink"),
                Err(e) => {
                    tracing::warn!(sysctl = %f, error = %e, "uplink forwarding could not be switched on; tenants' egress and published ports through it will not work")
                }
            }
        }
        let mut held = std::collections::HashMap::new();
        for p in ports.all().await {
            match ports::hold(p.proto, p.host_port) {
                Ok(fd) => {
                    held.insert((p.proto, p.host_port), fd);
                }
                Err(e) => {
                    tracing::warn!(tenant = %p.tenant, container = %p.name, error = %e, "a published port is also bound by a host process; that process gets no traffic on it")
                }
            }
        }
        Ok(Self {
            config: config.clone(),
            nft,
            rules,
            ports,
            held: std::sync::Mutex::new(held),
            table: tokio::sync::Mutex::new(()),
        })
    }

    /// Removes the agent's table, when networks are off (a table left by an earlier run).
    pub async fn remove_table() {
        if let Err(e) = nft::Nft::default().remove().await {
            tracing::debug!(error = %e, "no nftables table to remove");
        }
    }

    /// Loads the table again from the port table (after pruning).
    pub async fn reload(&self) -> Result<(), NetError> {
        let _table = self.table.lock().await;
        self.reload_locked().await
    }

    /// [`Self::reload`], the table lock held by the caller.
    async fn reload_locked(&self) -> Result<(), NetError> {
        self.nft
            .load(&self.rules, &self.ports.all().await)
            .await
            .map_err(|e| NetError {
                link: "table inet caas".into(),
                step: "reloading the firewall",
                message: e.to_string(),
            })
    }

    /// Publishes `ports` (all of them or none).
    pub async fn publish(&self, ports: &[ports::Published]) -> Result<(), PublishError> {
        if ports.is_empty() {
            return Ok(());
        }
        // The agent's table first (it names the owner of a taken port), then the host.
        self.ports.reserve(ports).await?;
        let (tenant, container) = (&ports[0].tenant, &ports[0].container);
        let mut fds = Vec::new();
        for p in ports {
            match ports::hold(p.proto, p.host_port) {
                Ok(fd) => fds.push(((p.proto, p.host_port), fd)),
                Err(e) => {
                    self.ports.release_container(tenant, container).await;
                    return Err(e.into());
                }
            }
        }
        let _table = self.table.lock().await;
        if let Err(e) = self.nft.publish(ports).await {
            // The table may be gone (a firewall reload: `nft flush ruleset`, the nftables
            // service restarting), or be loaded again by the guard meanwhile, or hold an
            // element the port table does not. Loading the whole table from the port table,
            // which holds these ports already, publishes them with the rest, atomically.
            tracing::warn!(error = %e, "publishing ports failed; loading the whole table again");
            if let Err(r) = self.reload_locked().await {
                tracing::error!(error = %r, "reloading the firewall failed");
                self.ports.release_container(tenant, container).await;
                return Err(PublishError::Nft(e));
            }
        }
        self.held_mut().extend(fds);
        Ok(())
    }

    fn held_mut(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<(ports::Proto, u16), std::os::fd::OwnedFd>,
    > {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the table loaded: something else may remove it (`nft flush ruleset`, a restart
    /// of the host's nftables service), and without it tenants reach each other and the host.
    /// Reloads it as soon as `nft monitor` reports its deletion, and checks every `period` as
    /// well (a monitor that ended is started again then), until `stop`.
    pub async fn guard(
        &self,
        period: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut monitor = None;
        loop {
            if monitor.is_none() {
                monitor = self
                    .nft
                    .monitor()
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "nft monitor did not start; the table is checked every {period:?} only");
                    })
                    .ok();
                // A deletion before the monitor listened is seen by no event: check once now.
                if monitor.is_some() {
                    self.reload_if_gone("").await;
                }
            }
            let deleted = async {
                match monitor.as_mut() {
                    Some(m) => m.table_deleted().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(period) => {}
                seen = deleted => {
                    if !seen {
                        tracing::warn!("nft monitor ended; started again at the next check");
                        monitor = None;
                        // Not at once: a monitor that cannot run would spin.
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(period) => {}
                        }
                    }
                }
            }
            self.reload_if_gone("").await;
        }
    }

    /// Loads the table again if it is gone; true when it was gone and is loaded now. `why`
    /// ends the log line.
    async fn reload_if_gone(&self, why: &str) -> bool {
        if self.nft.loaded().await {
            return false;
        }
        tracing::error!(
            "the nftables table inet caas is gone (flushed by someone else?); loading it again {why}"
        );
        match self.reload().await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "reloading the firewall failed");
                false
            }
        }
    }

    async fn unpublish(&self, gone: Vec<ports::Published>) {
        let table = self.table.lock().await;
        if !self.nft.unpublish(&gone).await
            && let Err(e) = self.reload_locked().await
        {
            tracing::error!(error = %e, "reloading the firewall failed");
        }
        drop(table);
        let mut held = self.held_mut();
        for p in &gone {
            held.remove(&(p.proto, p.host_port));
        }
    }

    /// Releases a container's ports.
    pub async fn unpublish_container(&self, tenant: &str, container: &str) {
        let gone = self.ports.release_container(tenant, container).await;
        self.unpublish(gone).await;
    }

    /// Releases the ports of the tenant's containers that are not in `alive` (ids), and of
    /// tenants not in `tenants` when that is given. The table is reloaded after by [`Self::reload`].
    pub async fn prune(
        &self,
        tenant: Option<(&str, &std::collections::HashSet<String>)>,
        tenants: Option<&std::collections::HashSet<String>>,
    ) -> usize {
        let mut gone = Vec::new();
        if let Some((t, alive)) = tenant {
            gone.extend(self.ports.prune_tenant(t, alive).await);
        }
        if let Some(known) = tenants {
            gone.extend(self.ports.prune_tenants(known).await);
        }
        let mut held = self.held_mut();
        for p in &gone {
            held.remove(&(p.proto, p.host_port));
        }
        gone.len()
    }

    /// Releases a tenant's ports.
    pub async fn unpublish_tenant(&self, tenant: &str) {
        let gone = self.ports.release_tenant(tenant).await;
        self.unpublish(gone).await;
    }
}

/// Publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The port cannot be had.
    #[error(transparent)]
    Port(#[from] ports::PortError),
    /// The kernel refused the map element.
    #[error(transparent)]
    Nft(nft::NftError),
}

/// A network step failed.
#[derive(Debug, thiserror::Error)]
#[error("tenant network {link}: {step}: {message}")]
pub struct NetError {
    /// The host-side link.
    pub link: String,
    /// What was being done.
    pub step: &'static str,
    /// The cause.
    pub message: String,
}

/// The host-side link name of a tenant: `caas-` and 10 hex digits of the id's sha256 (link
/// names hold at most 15 bytes; tenant ids up to 63).
pub fn link_name(tenant: &str) -> String {
    let h = Sha256::digest(tenant.as_bytes());
    format!(
        "caas-{}",
        h.iter()
            .take(5)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The host side's and the tenant side's addresses in `subnet`.
pub fn addresses(subnet: Ipv4Net) -> (Ipv4Addr, Ipv4Addr) {
    let first = subnet.nth(1).unwrap_or(subnet.addr());
    let second = subnet.nth(2).unwrap_or(first);
    (first, second)
}

fn fail(link: &str, step: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let link = link.to_string();
    move |e| NetError {
        link,
        step,
        message: e.to_string(),
    }
}

fn io_fail(link: &str, step: &'static str) -> impl FnOnce(std::io::Error) -> NetError {
    let link = link.to_string();
    move |e| NetError {
        link,
        step,
        message: e.to_string(),
    }
}

fn connect(link: &str) -> Result<Handle, NetError> {
    let (conn, handle, _) = new_connection().map_err(io_fail(link, "opening rtnetlink"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// An rtnetlink connection whose socket lives in the netns at `ns`: made on a thread that entered
/// the netns (a socket stays in the netns it was made in), then used from here.
fn connect_in(ns: &Path, link: &str) -> Result<Handle, NetError> {
    let rt = tokio::runtime::Handle::current();
    let ns = ns.to_path_buf();
    let made = std::thread::spawn(move || -> std::io::Result<_> {
        let _rt = rt.enter();
        let target = std::fs::File::open(&ns)?;
        nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        // This thread ends right after: no need to return to the host's netns.
        new_connection()
    })
    .join()
    .map_err(|_| NetError {
        link: link.into(),
        step: "entering the tenant netns",
        message: "the helper thread panicked".into(),
    })?
    .map_err(io_fail(link, "entering the tenant netns"))?;
    let (conn, handle, _) = made;
    tokio::spawn(conn);
    Ok(handle)
}

async fn index_of(h: &Handle, name: &str) -> Option<u32> {
    h.link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|m| m.header.index)
}

/// Whether the host-side link of `tenant` exists.
pub async fn attached(tenant: &str) -> bool {
    let link = link_name(tenant);
    match connect(&link) {
        Ok(h) => index_of(&h, &link).await.is_some(),
        Err(_) => false,
    }
}

/// Sets what the host side of a tenant link needs, again (a host sysctl change may have reset
/// it): IPv4 forwarding and route_localnet on, IPv6 off (tenant networks are IPv4; with IPv6 on,
/// a tenant could send router advertisements to the host).
pub async fn configure_host_side(tenant: &str) -> Result<(), NetError> {
    let link = link_name(tenant);
    let h = connect(&link)?;
    let idx = index_of(&h, &link).await.ok_or_else(|| NetError {
        link: link.clone(),
        step: "finding the link",
        message: "it does not exist".into(),
    })?;
    host_side_conf(&h, idx, &link).await
}

async fn host_side_conf(h: &Handle, idx: u32, link: &str) -> Result<(), NetError> {
    // IPv6 off first, before the link is ever up with a link-local address.
    let v6 = format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6");
    if Path::new(&v6).exists() {
        std::fs::write(&v6, "1").map_err(io_fail(link, "switching IPv6 off"))?;
    }
    let mut conf = InetDevConf::default();
    conf.forwarding = 1;
    // route_localnet lets 127.0.0.1:PORT of a published port be forwarded to the tenant; the
    // table's prerouting guard drops a tenant's packets to 127/8, and its input chain drops
    // everything a tenant sends to the host, so this opens nothing to the tenant.
    conf.route_localnet = 1;
    h.link()
        .set(
            LinkUnspec::new_with_index(idx)
                .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(
                    vec![AfSpecInet::DevConfRequest(conf)],
                )]))
                .build(),
        )
        .execute()
        .await
        .map_err(fail(link, "setting forwarding"))?;
    Ok(())
}

/// The kernel's default largest GSO/GRO packet (64 KiB); above it is BIG TCP.
const LEGACY_GSO: u32 = 65_536;

fn gso_ipv4(a: &LinkAttribute) -> Option<u32> {
    match a {
        LinkAttribute::GsoIpv4MaxSize(n) => Some(*n),
        _ => None,
    }
}

fn tso_max(a: &LinkAttribute) -> Option<u32> {
    match a {
        LinkAttribute::TsoMaxSize(n) => Some(*n),
        _ => None,
    }
}

/// An attribute of the link `req` asks for, as `pick` takes it; `None` when the link or the
/// attribute is not there.
async fn link_u32(
    req: rtnetlink::LinkGetRequest,
    pick: fn(&LinkAttribute) -> Option<u32>,
) -> Option<u32> {
    req.execute()
        .try_next()
        .await
        .ok()
        .flatten()
        .and_then(|m| m.attributes.iter().find_map(pick))
}

/// The IPv4 GSO size the uplinks all take (the smallest of their `gso_ipv4_max_size`), when it
/// is above the kernel's default (BIG TCP on every uplink); `None` otherwise, or when an uplink
/// cannot be read.
async fn uplinks_gso(h: &Handle, uplinks: &[String]) -> Option<u32> {
    let mut least: Option<u32> = None;
    for u in uplinks {
        let g = link_u32(h.link().get().match_name(u.clone()), gso_ipv4).await?;
        least = Some(least.map_or(g, |l| l.min(g)));
    }
    least.filter(|&g| g > LEGACY_GSO)
}

/// The handle for the netns at `ns`, or the agent's own.
fn handle_for(ns: Option<&Path>, link: &str) -> Result<Handle, NetError> {
    match ns {
        Some(ns) => connect_in(ns, link),
        None => connect(link),
    }
}

/// The IPv4 GSO size (`gso_ipv4_max_size`) of `link` in the netns bind-mounted at `ns` (`None`:
/// the agent's own); `None` when the link or the attribute is not there.
pub async fn gso_of(ns: Option<&Path>, link: &str) -> Result<Option<u32>, NetError> {
    let h = handle_for(ns, link)?;
    Ok(link_u32(h.link().get().match_name(link.to_string()), gso_ipv4).await)
}

/// Sets the IPv4 GSO and GRO sizes of `link` in the netns at `ns` (`None`: the agent's own) to
/// `size`, at most what the device takes (as an operator sets an uplink's BIG TCP size).
pub async fn set_link_gso(ns: Option<&Path>, link: &str, size: u32) -> Result<(), NetError> {
    let h = handle_for(ns, link)?;
    let idx = index_of(&h, link).await.ok_or_else(|| NetError {
        link: link.into(),
        step: "finding the link",
        message: "it does not exist".into(),
    })?;
    set_gso(&h, idx, size, link).await
}

/// Sets a link's IPv4 GSO and GRO sizes to `size`, at most what the device can take.
async fn set_gso(h: &Handle, idx: u32, size: u32, link: &str) -> Result<(), NetError> {
    let dev_max = link_u32(h.link().get().match_index(idx), tso_max)
        .await
        .unwrap_or(LEGACY_GSO);
    let size = size.min(dev_max);
    h.link()
        .set(
            LinkUnspec::new_with_index(idx)
                .append_extra_attribute(LinkAttribute::GsoIpv4MaxSize(size))
                .append_extra_attribute(LinkAttribute::GroIpv4MaxSize(size))
                .build(),
        )
        .execute()
        .await
        .map_err(fail(link, "setting the GSO size"))
}

/// Joins the tenant's netns (bind-mounted at `ns`) to the host with a veth pair in `subnet`.
/// Both ends take the uplinks' IPv4 GSO size when all of them have BIG TCP on (`uplinks`: the
/// node's uplinks), so that a tenant's TCP sends packets as large as the uplinks pass on without
/// splitting them; otherwise the kernel's default stays. On error nothing of it is left.
pub async fn attach(
    tenant: &str,
    ns: &Path,
    subnet: Ipv4Net,
    uplinks: &[String],
) -> Result<(), NetError> {
    let link = link_name(tenant);
    let r = attach_inner(&link, ns, subnet, uplinks).await;
    if r.is_err() {
        detach(tenant).await;
    }
    r
}

async fn attach_inner(
    link: &str,
    ns: &Path,
    subnet: Ipv4Net,
    uplinks: &[String],
) -> Result<(), NetError> {
    let (host_ip, _) = addresses(subnet);
    let host = connect(link)?;
    if index_of(&host, link).await.is_some() {
        // Left by an earlier agent that died half-way: start clean.
        detach_link(&host, link).await;
    }
    let nsfd = std::fs::File::open(ns).map_err(io_fail(link, "opening the tenant netns"))?;
    // The peer is made directly inside the tenant's netns.
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(TENANT_IF.to_string())
        .setns_by_fd(nsfd.as_raw_fd())
        .build();
    let msg = LinkVeth::new(link, TENANT_IF)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.link()
        .add(msg)
        .execute()
        .await
        .map_err(fail(link, "creating the veth pair"))?;
    let idx = index_of(&host, link).await.ok_or_else(|| NetError {
        link: link.into(),
        step: "finding the new link",
        message: "it does not exist".into(),
    })?;
    host.address()
        .add(idx, IpAddr::V4(host_ip), subnet.prefix())
        .execute()
        .await
        .map_err(fail(link, "addressing the host side"))?;
    host_side_conf(&host, idx, link).await?;
    let gso = uplinks_gso(&host, uplinks).await;
    if let Some(g) = gso {
        set_gso(&host, idx, g, link).await?;
    }
    host.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(fail(link, "bringing the host side up"))?;
    let inner = connect_in(ns, link)?;
    configure_inside(&inner, link, subnet, gso).await
}

/// Addresses `eth0` in a tenant netns (reached by `inner`), gives it the GSO size `gso` (see
/// [`attach`]), brings it and loopback up, and adds the default route via the host side.
async fn configure_inside(
    inner: &Handle,
    link: &str,
    subnet: Ipv4Net,
    gso: Option<u32>,
) -> Result<(), NetError> {
    let (host_ip, tenant_ip) = addresses(subnet);
    let eth = index_of(inner, TENANT_IF).await.ok_or_else(|| NetError {
        link: link.into(),
        step: "finding eth0 in the tenant netns",
        message: "it does not exist".into(),
    })?;
    if let Some(g) = gso {
        set_gso(inner, eth, g, link).await?;
    }
    inner
        .address()
        .add(eth, IpAddr::V4(tenant_ip), subnet.prefix())
        .execute()
        .await
        .map_err(fail(link, "addressing eth0"))?;
    for name in [TENANT_IF, "lo"] {
        if let Some(i) = index_of(inner, name).await {
            inner
                .link()
                .set(LinkUnspec::new_with_index(i).up().build())
                .execute()
                .await
                .map_err(fail(link, "bringing the tenant side up"))?;
        }
    }
    inner
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(host_ip)
                .build(),
        )
        .execute()
        .await
        .map_err(fail(link, "adding the default route"))?;
    Ok(())
}

fn pod_route(
    ip: Ipv4Addr,
    via: Ipv4Addr,
    idx: u32,
) -> rtnetlink::packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .gateway(via)
        .output_interface(idx)
        .build()
}

/// Routes a CRI pod's address (`ip`, inside the tenant's network, behind its CNI bridge) from
/// the host to the tenant's link, via the tenant's address in `subnet`: the host (kubelet's
/// probes, the node's own connections) reaches the pod there. The firewall still walls it off
/// from other tenants and the uplinks. Replaces a route to `ip` that is there.
pub async fn route_pod(tenant: &str, subnet: Ipv4Net, ip: Ipv4Addr) -> Result<(), NetError> {
    let link = link_name(tenant);
    let h = connect(&link)?;
    let idx = index_of(&h, &link).await.ok_or_else(|| NetError {
        link: link.clone(),
        step: "routing a pod's address",
        message: "the tenant's link does not exist".into(),
    })?;
    let (_, tenant_ip) = addresses(subnet);
    h.route()
        .add(pod_route(ip, tenant_ip, idx))
        .replace()
        .execute()
        .await
        .map_err(fail(&link, "routing a pod's address"))
}

/// Removes the route [`route_pod`] made; a route or link that is gone already is no error.
pub async fn unroute_pod(tenant: &str, subnet: Ipv4Net, ip: Ipv4Addr) -> Result<(), NetError> {
    let link = link_name(tenant);
    let h = connect(&link)?;
    let Some(idx) = index_of(&h, &link).await else {
        return Ok(()); // the link, and its routes with it, are gone
    };
    let (_, tenant_ip) = addresses(subnet);
    match h.route().del(pod_route(ip, tenant_ip, idx)).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
        r => r.map_err(fail(&link, "removing a pod's route")),
    }
}

/// Makes the host side of a VM tenant's network, unless it is there: a persistent tap device
/// named like a userns tenant's veth ([`link_name`]), so the firewall, the published ports and
/// the byte counters treat both alike, with the subnet's first address and the same settings.
/// The VMM attaches to it by name; the guest takes the second address ([`adopt_guest_link`]).
/// Persistent, the tap outlives a crashed VMM (the restarted VM finds it as it was) and goes
/// only with [`detach`]. Idempotent; on error nothing new is left.
pub async fn ensure_tap(tenant: &str, subnet: Ipv4Net) -> Result<(), NetError> {
    let link = link_name(tenant);
    let (host_ip, _) = addresses(subnet);
    let h = connect(&link)?;
    let made = index_of(&h, &link).await.is_none();
    if made {
        make_persistent_tap(&link).map_err(io_fail(&link, "creating the tap device"))?;
    }
    let configured = async {
        let idx = index_of(&h, &link).await.ok_or_else(|| NetError {
            link: link.clone(),
            step: "finding the tap device",
            message: "it does not exist".into(),
        })?;
        let has_address = h
            .address()
            .get()
            .set_link_index_filter(idx)
            .execute()
            .try_filter(|m| {
                futures::future::ready(m.attributes.iter().any(|a| {
                    matches!(a, rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(v)) if *v == host_ip)
                }))
            })
            .try_next()
            .await
            .map_err(fail(&link, "reading the tap's addresses"))?
            .is_some();
        // IPv6 off and forwarding on before the link is up (as for a veth).
        host_side_conf(&h, idx, &link).await?;
        if !has_address {
            h.address()
                .add(idx, IpAddr::V4(host_ip), subnet.prefix())
                .execute()
                .await
                .map_err(fail(&link, "addressing the tap device"))?;
        }
        h.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(fail(&link, "bringing the tap device up"))
    }
    .await;
    if configured.is_err() && made {
        detach_link(&h, &link).await;
    }
    configured
}

/// Creates a persistent tap device `name` (no packet-information header: the VMM's virtio-net
/// sets its own offload header per open).
fn make_persistent_tap(name: &str) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let path = c"/dev/net/tun";
    // SAFETY: open(2) of a NUL-terminated path; the result is checked before use.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        let e = std::io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => {
                " (load the host kernel's tun module: modprobe tun)"
            }
            Some(libc::EACCES | libc::EPERM) => {
                " (the agent needs root, or CAP_NET_ADMIN and access to the device)"
            }
            _ => "",
        };
        return Err(std::io::Error::new(
            e.kind(),
            format!("opening /dev/net/tun: {e}{hint}"),
        ));
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let tun = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(std::io::Error::other(format!(
            "{name:?} is too long for a link name"
        )));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI)
        .map_err(|_| std::io::Error::other("tap flags out of range"))?;
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name and the flags member set; the
    // kernel may write the name back into it.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!(
                "TUNSETIFF {name}: {e} (a link of another kind may have this name, or the agent lacks CAP_NET_ADMIN)"
            ),
        ));
    }
    // SAFETY: TUNSETPERSIST takes its argument by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("TUNSETPERSIST {name}: {e}"),
        ));
    }
    Ok(())
}

/// Whether a VMM has the tenant's tap device open: a tap nobody holds has no carrier.
pub fn tap_attached(tenant: &str) -> bool {
    let link = link_name(tenant);
    std::fs::read_to_string(format!("/sys/class/net/{link}/carrier")).is_ok_and(|c| c.trim() == "1")
}

/// Inside a VM tenant's guest: the guest's virtio-net card (index and name), once its driver
/// has probed it. Only a card of the virtio_net driver is taken: the guest kernel may have
/// other links (sit0, tunl0) that are not it.
pub fn guest_card() -> Option<(u32, String)> {
    let rd = std::fs::read_dir("/sys/class/net").ok()?;
    for e in rd.flatten() {
        let Ok(driver) = std::fs::read_link(e.path().join("device/driver")) else {
            continue; // loopback and other virtual links have no device
        };
        if driver.file_name().is_some_and(|d| d == "virtio_net")
            && let Ok(index) = std::fs::read_to_string(e.path().join("ifindex"))
            && let Ok(index) = index.trim().parse()
        {
            return Some((index, e.file_name().to_string_lossy().into_owned()));
        }
    }
    None
}

/// Inside a VM tenant's guest: moves the guest's network card (`index`, see [`guest_card`])
/// into the tenant netns at `ns` as `eth0`, and configures it as [`attach`] configures a
/// userns tenant's: the second address of `subnet`, a default route via the first (the host's
/// tap). Containers in the guest join that netns as they do on the host.
pub async fn adopt_guest_link(ns: &Path, index: u32, subnet: Ipv4Net) -> Result<(), NetError> {
    let link = TENANT_IF;
    let guest = connect(link)?;
    let nsfd = std::fs::File::open(ns).map_err(io_fail(link, "opening the tenant netns"))?;
    guest
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .name(TENANT_IF.to_string())
                .down()
                .build(),
        )
        .execute()
        .await
        .map_err(fail(link, "naming the guest's network card"))?;
    guest
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(nsfd.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(fail(link, "moving the card into the tenant netns"))?;
    let inner = connect_in(ns, link)?;
    configure_inside(&inner, link, subnet, None).await
}

async fn detach_link(h: &Handle, link: &str) {
    if let Some(i) = index_of(h, link).await
        && let Err(e) = h.link().del(i).execute().await
    {
        tracing::warn!(%link, error = %e, "removing a tenant link failed");
    }
}

/// Removes the tenant's veth pair (both ends go together) or tap device; a missing one is fine.
pub async fn detach(tenant: &str) {
    let link = link_name(tenant);
    if let Ok(h) = connect(&link) {
        detach_link(&h, &link).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_fit_and_differ() {
        let a = link_name("a");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("caas-"));
        assert_ne!(a, link_name("b"));
        assert_eq!(link_name(&"x".repeat(63)).len(), 15);
    }

    #[test]
    fn bad_network_settings_name_the_field() {
        let mut c = NetworkConfig {
            enabled: true,
            uplinks: vec!["caas-1".into()],
            ..Default::default()
        };
        let e = c.subnet_pool().unwrap_err().to_string();
        assert!(e.contains("network.uplinks[0]"), "{e}");
        c.uplinks = vec!["eth0".into()];
        c.denied = vec!["10.88.1.0/24".parse().unwrap()];
        let e = c.subnet_pool().unwrap_err().to_string();
        assert!(
            e.contains("network.denied[0]") && e.contains("overlaps"),
            "{e}"
        );
        c.denied = vec![];
        assert!(c.subnet_pool().unwrap().is_some());
        assert_eq!(c.uplinks(), vec!["eth0".to_string()]);
        c.dns = vec![Ipv4Addr::new(10, 0, 0, 53)];
        assert_eq!(
            resolv_conf(&c.name_servers()),
            "# written by caas-agent for this tenant's containers\nnameserver 10.0.0.53\n"
        );
    }

    #[test]
    fn the_host_takes_the_first_address() {
        let (h, t) = addresses("10.88.0.4/30".parse().unwrap());
        assert_eq!(
            (h, t),
            (Ipv4Addr::new(10, 88, 0, 5), Ipv4Addr::new(10, 88, 0, 6))
        );
    }
}
