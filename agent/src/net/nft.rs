//! The agent's nftables table, `inet caas`: egress NAT for tenant subnets, the wall between
//! tenants (and between tenants and the host, and the operator's denied ranges), and the
//! published ports as map elements.
//!
//! Every tenant link is named `caas-…`, so the chains match tenants by interface-name wildcard
//! and never change when a tenant comes or goes; only the port maps do. The whole table is
//! loaded in one `nft -f` transaction that adds, deletes and re-creates it, so a reload is atomic
//! and idempotent, and no other table on the host is touched. The agent talks to the kernel
//! through the `nft` binary (Debian package `nftables`): no netlink nftables library with a
//! license that fits exists (see docs/design.md).

use std::{fmt::Write as _, process::Stdio};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::ports::{Proto, Published};
use crate::tenants::subnet::Ipv4Net;

/// The table's name (family `inet`).
pub const TABLE: &str = "caas";

/// The interface-name pattern of every tenant link.
pub const TENANT_LINKS: &str = "caas-*";

/// nft failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The binary could not be run.
    #[error(
        "running {binary}: {source}; tenant networks need nftables (Debian package `nftables`)"
    )]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran and refused.
    #[error("nft refused {what}: {stderr}")]
    Refused {
        /// What was asked.
        what: String,
        /// nft's complaint.
        stderr: String,
    },
}

/// What the static part of the table is made from.
#[derive(Debug, Clone)]
pub struct Ruleset {
    /// Where tenant subnets come from.
    pub pool: Ipv4Net,
    /// Ranges tenants may never reach (metadata services, the control plane).
    pub denied: Vec<Ipv4Net>,
    /// The interfaces tenants' traffic leaves by (and is masqueraded on).
    pub uplinks: Vec<String>,
    /// Uplinks whose forwarding the agent switched on: what enters on them is forwarded to
    /// tenants only, so the host does not become a router between its other networks.
    pub routed: Vec<String>,
}

fn name_elements(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        format!(" elements = {{ {} }};", list.join(", "))
    }
}

fn set_elements(nets: &[Ipv4Net]) -> String {
    if nets.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
        format!(" elements = {{ {} }};", list.join(", "))
    }
}

fn map_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "publish_tcp4",
        Proto::Udp => "publish_udp4",
    }
}

fn element(p: &Published, with_value: bool) -> String {
    if with_value {
        format!("{} : {} . {}", p.host_port, p.tenant_ip, p.container_port)
    } else {
        p.host_port.to_string()
    }
}

impl Ruleset {
    /// The `nft -f` script that replaces the table with this ruleset and `published`.
    pub fn script(&self, published: &[Published]) -> String {
        let l = TENANT_LINKS;
        let mut maps = String::new();
        for proto in [Proto::Tcp, Proto::Udp] {
            let elems: Vec<String> = published
                .iter()
                .filter(|p| p.proto == proto)
                .map(|p| element(p, true))
                .collect();
            let elems = if elems.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {} }};", elems.join(", "))
            };
            let _ = writeln!(
                maps,
                "  map {} {{ type inet_service : ipv4_addr . inet_service;{elems} }}",
                map_name(proto)
            );
        }
        // Priorities are numbers: nft 1.0.6 takes no `dstnat` keyword on the output hook in
        // the inet family. raw = -300, dstnat = -100, filter = 0, srcnat = 100.
        format!(
            "add table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  set tenant_nets4 {{ type ipv4_addr; flags interval; elements = {{ {pool} }}; }}
  set denied4 {{ type ipv4_addr; flags interval;{denied} }}
  set uplinks {{ type ifname;{uplinks} }}
  set routed {{ type ifname;{routed} }}
{maps}
  chain prerouting_guard {{
    type filter hook prerouting priority -300; policy accept;
    iifname \"{l}\" ip daddr 127.0.0.0/8 drop
    iifname \"{l}\" fib saddr . iif oif missing drop
  }}
  chain prerouting_nat {{
    type nat hook prerouting priority -100; policy accept;
    fib daddr type local dnat ip to tcp dport map @publish_tcp4
    fib daddr type local dnat ip to udp dport map @publish_udp4
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    fib daddr type local dnat ip to tcp dport map @publish_tcp4
    fib daddr type local dnat ip to udp dport map @publish_udp4
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname \"{l}\" ct state established,related accept
    iifname \"{l}\" drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname \"{l}\" ip daddr @denied4 drop
    iifname \"{l}\" oifname != \"{l}\" oifname != @uplinks drop
    oifname \"{l}\" ct status dnat accept
    oifname \"{l}\" ct state established,related accept
    oifname \"{l}\" drop
    iifname @routed drop
  }}
  chain postrouting_nat {{
    type nat hook postrouting priority 100; policy accept;
    oifname \"{l}\" ip saddr 127.0.0.0/8 masquerade
    oifname \"{l}\" ct status dnat ip saddr @tenant_nets4 masquerade
    oifname @uplinks ip saddr @tenant_nets4 ip daddr != @tenant_nets4 masquerade
  }}
}}
",
            pool = self.pool,
            denied = set_elements(&self.denied),
            uplinks = name_elements(&self.uplinks),
            routed = name_elements(&self.routed),
        )
    }
}

/// A running `nft monitor tables` (killed when dropped).
pub struct Monitor {
    _child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Monitor {
    /// Waits until an event deletes the agent's table (`nft flush ruleset` deletes every table
    /// one by one; the agent's own loads delete and add it in one transaction). False when the
    /// monitor ended.
    pub async fn table_deleted(&mut self) -> bool {
        while let Ok(Some(line)) = self.lines.next_line().await {
            if deletes_our_table(&line) {
                return true;
            }
        }
        false
    }
}

/// Whether a line of `nft monitor` says the agent's table was deleted.
fn deletes_our_table(line: &str) -> bool {
    matches!(
        line.split_whitespace().collect::<Vec<_>>().as_slice(),
        ["delete" | "destroy", "table", "inet", t, ..] if *t == TABLE
    )
}

/// Runs the `nft` binary.
#[derive(Debug, Clone)]
pub struct Nft {
    binary: String,
}

impl Default for Nft {
    fn default() -> Self {
        Self {
            binary: "nft".into(),
        }
    }
}

impl Nft {
    /// Runs `nft -f -` with `script` as one transaction.
    async fn run(&self, what: &str, script: &str) -> Result<(), NftError> {
        let spawn = |source| NftError::Spawn {
            binary: self.binary.clone(),
            source,
        };
        let mut child = tokio::process::Command::new(&self.binary)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await.map_err(spawn)?;
        }
        let out = child.wait_with_output().await.map_err(spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NftError::Refused {
                what: what.into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Replaces the table with `rules` and `published`, atomically.
    pub async fn load(&self, rules: &Ruleset, published: &[Published]) -> Result<(), NftError> {
        self.run("loading table inet caas", &rules.script(published))
            .await
    }

    /// Starts `nft monitor tables`: the kernel's table events as they happen, one per line.
    pub fn monitor(&self) -> std::io::Result<Monitor> {
        let mut child = tokio::process::Command::new(&self.binary)
            .args(["monitor", "tables"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("nft monitor: no stdout"))?;
        Ok(Monitor {
            _child: child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        })
    }

    /// Removes the table, if it exists (tenant networks switched off).
    pub async fn remove(&self) -> Result<(), NftError> {
        self.run(
            "removing table inet caas",
            &format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"),
        )
        .await
    }

    /// Adds published ports. The kernel refuses a host port that is already mapped elsewhere.
    pub async fn publish(&self, ports: &[Published]) -> Result<(), NftError> {
        if ports.is_empty() {
            return Ok(());
        }
        let mut s = String::new();
        for p in ports {
            let _ = writeln!(
                s,
                "add element inet {TABLE} {} {{ {} }}",
                map_name(p.proto),
                element(p, true)
            );
        }
        self.run("publishing ports", &s).await
    }

    /// Removes published ports, each in a transaction of its own. Returns false when one could
    /// not be removed (the caller then reloads the whole table).
    pub async fn unpublish(&self, ports: &[Published]) -> bool {
        let mut all = true;
        for p in ports {
            let s = format!(
                "delete element inet {TABLE} {} {{ {} }}\n",
                map_name(p.proto),
                element(p, false)
            );
            if let Err(e) = self.run("unpublishing a port", &s).await {
                tracing::warn!(port = p.host_port, error = %e, "unpublishing a port failed; reloading the table");
                all = false;
            }
        }
        all
    }

    /// Whether the table is loaded.
    pub async fn loaded(&self) -> bool {
        tokio::process::Command::new(&self.binary)
            .args(["list", "table", "inet", TABLE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .is_ok_and(|s| s.success())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn the_monitor_sees_the_tables_deletion_and_nothing_else() {
        assert!(deletes_our_table("delete table inet caas"));
        assert!(deletes_our_table("destroy table inet caas # handle 7"));
        for other in [
            "add table inet caas",
            "delete table ip caas",
            "delete table inet caas2",
            "delete chain inet caas forward",
            "",
        ] {
            assert!(!deletes_our_table(other), "{other}");
        }
    }

    #[test]
    fn the_script_replaces_the_table_and_holds_the_ports() {
        let r = Ruleset {
            pool: "10.88.0.0/16".parse().unwrap(),
            denied: vec!["169.254.0.0/16".parse().unwrap()],
            uplinks: vec!["eth0".into()],
            routed: vec![],
        };
        let p = Published {
            proto: Proto::Udp,
            host_port: 5353,
            container_port: 53,
            tenant: "a".into(),
            container: "c1".into(),
            name: "dns".into(),
            tenant_ip: Ipv4Addr::new(10, 88, 0, 2),
        };
        let s = r.script(std::slice::from_ref(&p));
        assert!(s.starts_with("add table inet caas\ndelete table inet caas\n"));
        assert!(s.contains("elements = { 169.254.0.0/16 }"));
        assert!(s.contains("set uplinks { type ifname; elements = { \"eth0\" }; }"));
        assert!(s.contains("set routed { type ifname; }"));
        assert!(s.contains("map publish_udp4 { type inet_service : ipv4_addr . inet_service; elements = { 5353 : 10.88.0.2 . 53 }; }"));
        assert!(s.contains("map publish_tcp4 { type inet_service : ipv4_addr . inet_service; }"));
        let empty = Ruleset {
            denied: vec![],
            ..r
        };
        assert!(
            empty
                .script(&[])
                .contains("set denied4 { type ipv4_addr; flags interval; }")
        );
    }
}
