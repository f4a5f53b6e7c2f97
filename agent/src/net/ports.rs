//! Published ports: which host port leads to which tenant's container, kept by the agent (not by
//! the tenants' engines, which are the tenants' side of the wall) in one durable file. A host port
//! and protocol has at most one owner; asking for a taken one names the owner.
//!
//! The agent also binds each published port on the host (0.0.0.0, without listening) for as long
//! as it is published: a port a host process has is refused, and no host process can take a
//! published one later. Traffic never reaches these sockets: the table's DNAT rewrites it first.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// Parses `tcp`, `udp`, or "" (tcp).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Protocol.
    pub proto: Proto,
    /// The port on every host address.
    pub host_port: u16,
    /// The port inside the tenant's network.
    pub container_port: u16,
    /// The owner's tenant.
    pub tenant: String,
    /// The owner's container id.
    pub container: String,
    /// The owner's container name.
    pub name: String,
    /// The tenant side's address.
    pub tenant_ip: Ipv4Addr,
}

/// How an owner is named in messages: a CRI pod's name reads `pod <namespace>/<name>`, a
/// container's is quoted.
fn owner(name: &str) -> String {
    if name.starts_with("pod ") {
        name.to_string()
    } else {
        format!("container {name:?}")
    }
}

/// A port that cannot be published.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    /// Another container holds it.
    #[error(
        "host port {port}/{proto} is published by {} of tenant {tenant:?}; pick another host port or delete {}",
        owner(name), if name.starts_with("pod ") { "that pod" } else { "that container" }
    )]
    Taken {
        /// Host port.
        port: u16,
        /// Protocol.
        proto: &'static str,
        /// The owner's tenant.
        tenant: String,
        /// The owner's container name.
        name: String,
    },
    /// The agent's own port, or one the operator reserved.
    #[error("host port {port}/{proto} is reserved on this node: {why}")]
    Reserved {
        /// Host port.
        port: u16,
        /// Protocol.
        proto: &'static str,
        /// Whose.
        why: String,
    },
    /// Outside the node's publish range.
    #[error(
        "host port {port} is outside this node's publish range {lo}-{hi} ([network] publish_min, publish_max)"
    )]
    OutOfRange {
        /// Host port.
        port: u16,
        /// Lowest allowed.
        lo: u16,
        /// Highest allowed.
        hi: u16,
    },
    /// The tenant's cap.
    #[error(
        "tenant {tenant:?} publishes {had} port(s) and asks for {asked} more; the limit is {limit} ([network] max_published_per_tenant)"
    )]
    TooMany {
        /// Tenant.
        tenant: String,
        /// Published now.
        had: usize,
        /// Asked for.
        asked: usize,
        /// The limit.
        limit: usize,
    },
    /// A process on the host has it.
    #[error(
        "host port {port}/{proto} is in use on the host (a host process has bound it); pick another host port"
    )]
    InUse {
        /// Host port.
        port: u16,
        /// Protocol.
        proto: &'static str,
    },
    /// The file could not be written.
    #[error("saving published ports to {path}: {message}")]
    Save {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Which host ports may be published, and how many per tenant.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The lowest and highest host port.
    pub range: (u16, u16),
    /// At most this many per tenant.
    pub per_tenant: u32,
}

/// The published ports of the node, in memory and in `<state_dir>/network/ports.json`.
#[derive(Debug)]
pub struct PortTable {
    path: PathBuf,
    reserved: Vec<(Proto, u16, String)>,
    policy: Policy,
    entries: Mutex<Vec<Published>>,
}

impl PortTable {
    /// Loads the table (a missing file is an empty table). `reserved` are host ports nobody may
    /// publish (the agent's own), with the reason.
    pub fn open(
        path: &Path,
        reserved: Vec<(Proto, u16, String)>,
        policy: Policy,
    ) -> std::io::Result<Self> {
        let entries = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path: path.to_path_buf(),
            reserved,
            policy,
            entries: Mutex::new(entries),
        })
    }

    fn save(&self, entries: &[Published]) -> Result<(), PortError> {
        let fail = |e: &dyn std::fmt::Display| PortError::Save {
            path: self.path.clone(),
            message: e.to_string(),
        };
        if let Some(dir) = self.path.parent() {
            crate::fsutil::ensure_dir(dir, 0o700).map_err(|e| fail(&e))?;
        }
        let data = serde_json::to_vec_pretty(entries).map_err(|e| fail(&e))?;
        crate::fsutil::write_atomic(&self.path, &data, 0o600).map_err(|e| fail(&e))
    }

    /// Every published port.
    pub async fn all(&self) -> Vec<Published> {
        self.entries.lock().await.clone()
    }

    /// The ports a container (by id) publishes.
    pub async fn of_container(&self, tenant: &str, container: &str) -> Vec<Published> {
        self.entries
            .lock()
            .await
            .iter()
            .filter(|p| p.tenant == tenant && p.container == container)
            .cloned()
            .collect()
    }

    /// Takes all of `ports` for their container, or none of them.
    pub async fn reserve(&self, ports: &[Published]) -> Result<(), PortError> {
        let mut entries = self.entries.lock().await;
        if let Some(p) = ports.first() {
            let had = entries.iter().filter(|e| e.tenant == p.tenant).count();
            let limit = self.policy.per_tenant as usize;
            if had + ports.len() > limit {
                return Err(PortError::TooMany {
                    tenant: p.tenant.clone(),
                    had,
                    asked: ports.len(),
                    limit,
                });
            }
        }
        let mut asked = HashSet::new();
        for p in ports {
            let (lo, hi) = self.policy.range;
            if !(lo..=hi).contains(&p.host_port) {
                return Err(PortError::OutOfRange {
                    port: p.host_port,
                    lo,
                    hi,
                });
            }
            if let Some((_, _, why)) = self
                .reserved
                .iter()
                .find(|(proto, port, _)| *proto == p.proto && *port == p.host_port)
            {
                return Err(PortError::Reserved {
                    port: p.host_port,
                    proto: p.proto.as_str(),
                    why: why.clone(),
                });
            }
            let held = entries
                .iter()
                .find(|e| e.proto == p.proto && e.host_port == p.host_port);
            if let Some(o) = held {
                return Err(PortError::Taken {
                    port: p.host_port,
                    proto: p.proto.as_str(),
                    tenant: o.tenant.clone(),
                    name: o.name.clone(),
                });
            }
            if !asked.insert((p.proto, p.host_port)) {
                return Err(PortError::Taken {
                    port: p.host_port,
                    proto: p.proto.as_str(),
                    tenant: p.tenant.clone(),
                    name: p.name.clone(),
                });
            }
        }
        let mut next = entries.clone();
        next.extend(ports.iter().cloned());
        self.save(&next)?;
        *entries = next;
        Ok(())
    }

    /// Releases the ports matching `pred`; returns them.
    async fn release_where(&self, pred: impl Fn(&Published) -> bool) -> Vec<Published> {
        let mut entries = self.entries.lock().await;
        let (gone, kept): (Vec<_>, Vec<_>) = entries.iter().cloned().partition(|p| pred(p));
        if gone.is_empty() {
            return gone;
        }
        if let Err(e) = self.save(&kept) {
            // The ports stay held on disk; the next start prunes them (their owner is gone).
            tracing::error!(error = %e, "releasing published ports");
        }
        *entries = kept;
        gone
    }

    /// Releases a container's ports (`container`: its id).
    pub async fn release_container(&self, tenant: &str, container: &str) -> Vec<Published> {
        self.release_where(|p| p.tenant == tenant && p.container == container)
            .await
    }

    /// Releases every port of a tenant.
    pub async fn release_tenant(&self, tenant: &str) -> Vec<Published> {
        self.release_where(|p| p.tenant == tenant).await
    }

    /// Releases the tenant's ports whose container is not in `alive` (ids).
    pub async fn prune_tenant(&self, tenant: &str, alive: &HashSet<String>) -> Vec<Published> {
        self.release_where(|p| p.tenant == tenant && !alive.contains(&p.container))
            .await
    }

    /// Releases the ports of tenants not in `tenants`.
    pub async fn prune_tenants(&self, tenants: &HashSet<String>) -> Vec<Published> {
        self.release_where(|p| !tenants.contains(&p.tenant)).await
    }
}

/// Binds `port` on every host address, without listening, to hold it.
pub fn hold(proto: Proto, port: u16) -> Result<std::os::fd::OwnedFd, PortError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket};
    let ty = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let in_use = |_| PortError::InUse {
        port,
        proto: proto.as_str(),
    };
    let fd = socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None).map_err(in_use)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(0, 0, 0, 0, port),
    )
    .map_err(in_use)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(tenant: &str, container: &str, host_port: u16) -> Published {
        Published {
            proto: Proto::Tcp,
            host_port,
            container_port: 80,
            tenant: tenant.into(),
            container: container.into(),
            name: format!("n-{container}"),
            tenant_ip: Ipv4Addr::new(10, 88, 0, 2),
        }
    }

    #[tokio::test]
    async fn a_host_port_has_one_owner_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("network/ports.json");
        let reserved = vec![(Proto::Tcp, 7443, "the agent's API".to_string())];
        let policy = Policy {
            range: (1024, 32767),
            per_tenant: 3,
        };
        let t = PortTable::open(&path, reserved.clone(), policy).unwrap();
        t.reserve(&[port("a", "c1", 8080)]).await.unwrap();
        let e = t.reserve(&[port("b", "c2", 8080)]).await.unwrap_err();
        assert!(
            matches!(&e, PortError::Taken { tenant, name, .. } if tenant == "a" && name == "n-c1"),
            "{e}"
        );
        // All or nothing: 8081 is not taken when 8080 in the same request is refused.
        assert!(
            t.reserve(&[port("b", "c2", 8081), port("b", "c2", 8080)])
                .await
                .is_err()
        );
        assert!(
            t.reserve(&[port("b", "c2", 8082), port("b", "c2", 8082)])
                .await
                .is_err()
        );
        assert!(matches!(
            t.reserve(&[port("b", "c2", 7443)]).await,
            Err(PortError::Reserved { .. })
        ));
        let mut udp = port("b", "c2", 8080);
        udp.proto = Proto::Udp;
        t.reserve(&[udp]).await.unwrap();

        assert!(matches!(
            t.reserve(&[port("b", "c2", 80)]).await,
            Err(PortError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.reserve(&[
                port("b", "c3", 9001),
                port("b", "c3", 9002),
                port("b", "c3", 9003)
            ])
            .await,
            Err(PortError::TooMany { had: 1, .. })
        ));
        let again = PortTable::open(&path, reserved, policy).unwrap();
        assert_eq!(again.all().await.len(), 2);
        assert_eq!(again.of_container("a", "c1").await.len(), 1);
        // By id only: a name is not an id.
        assert!(again.of_container("a", "n-c1").await.is_empty());
        assert!(again.release_container("a", "n-c1").await.is_empty());
        assert_eq!(again.release_container("a", "c1").await.len(), 1);
        let alive = HashSet::new();
        assert_eq!(again.prune_tenant("b", &alive).await.len(), 1);
        assert!(again.all().await.is_empty());
        // A port a host process has bound is refused, and a held one cannot be taken.
        let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let p = taken.local_addr().unwrap().port();
        assert!(matches!(hold(Proto::Tcp, p), Err(PortError::InUse { .. })));
        drop(taken);
        let held = hold(Proto::Tcp, p).unwrap();
        assert!(std::net::TcpListener::bind(("0.0.0.0", p)).is_err());
        drop(held);
        assert!(
            PortTable::open(&path, vec![], policy)
                .unwrap()
                .all()
                .await
                .is_empty()
        );
    }
}
