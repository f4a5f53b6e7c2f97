//! Tenant networks, first step: each tenant's network namespace is joined to the host by one
//! veth pair (no bridge: routed, L3). The host side is `caas-<10 hex>` with the first address of
//! the tenant's subnet; the tenant side is `eth0` in the tenant's netns with the second address
//! and a default route via the host side. Forwarding is switched on for the host-side link only
//! (the host's global `ip_forward` is left alone). Everything is done over rtnetlink.
//!
//! Not built yet (issue 7): egress NAT, the firewall between tenants, published ports, DNS and
//! the byte counters in the meter. `docs/notes/tenant-networks-research.md` has the plan.

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
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            pool: Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16)
                .unwrap_or_else(|_| unreachable!("10.88.0.0/16 is a valid network")),
            tenant_prefix: 30,
        }
    }
}

impl NetworkConfig {
    /// The subnet pool, when networks are on.
    pub fn subnet_pool(&self) -> Result<Option<SubnetPool>, Invalid> {
        if !self.enabled {
            return Ok(None);
        }
        SubnetPool::new(self.pool, self.tenant_prefix)
            .map(Some)
            .map_err(|e| Invalid::new("network.tenant_prefix", e.to_string()))
    }
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

/// Joins the tenant's netns (bind-mounted at `ns`) to the host with a veth pair in `subnet`.
/// On error nothing of it is left.
pub async fn attach(tenant: &str, ns: &Path, subnet: Ipv4Net) -> Result<(), NetError> {
    let link = link_name(tenant);
    let r = attach_inner(&link, ns, subnet).await;
    if r.is_err() {
        detach(tenant).await;
    }
    r
}

async fn attach_inner(link: &str, ns: &Path, subnet: Ipv4Net) -> Result<(), NetError> {
    let (host_ip, tenant_ip) = addresses(subnet);
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
    let mut conf = InetDevConf::default();
    conf.forwarding = 1;
    let up = LinkUnspec::new_with_index(idx)
        .up()
        .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
            AfSpecInet::DevConfRequest(conf),
        ])]))
        .build();
    host.link()
        .set(up)
        .execute()
        .await
        .map_err(fail(link, "bringing the host side up"))?;
    let inner = connect_in(ns, link)?;
    let eth = index_of(&inner, TENANT_IF).await.ok_or_else(|| NetError {
        link: link.into(),
        step: "finding eth0 in the tenant netns",
        message: "it does not exist".into(),
    })?;
    inner
        .address()
        .add(eth, IpAddr::V4(tenant_ip), subnet.prefix())
        .execute()
        .await
        .map_err(fail(link, "addressing eth0"))?;
    for name in [TENANT_IF, "lo"] {
        if let Some(i) = index_of(&inner, name).await {
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

async fn detach_link(h: &Handle, link: &str) {
    if let Some(i) = index_of(h, link).await
        && let Err(e) = h.link().del(i).execute().await
    {
        tracing::warn!(%link, error = %e, "removing a tenant link failed");
    }
}

/// Removes the tenant's veth pair (both ends go together); a missing one is fine.
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
    fn the_host_takes_the_first_address() {
        let (h, t) = addresses("10.88.0.4/30".parse().unwrap());
        assert_eq!(
            (h, t),
            (Ipv4Addr::new(10, 88, 0, 5), Ipv4Addr::new(10, 88, 0, 6))
        );
    }
}
