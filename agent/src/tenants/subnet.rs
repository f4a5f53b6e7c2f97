//! IPv4 subnets for tenant networks: each tenant gets one subnet of a fixed size from a
//! configured pool, never overlapping another tenant's or a reserved range (the host's own
//! networks, the operator's denied ranges). Like uid ranges, a tenant's subnet will live in its
//! record, so it is held exactly as long as the tenant exists.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Serialize};

/// An IPv4 network: an address with its prefix length, the host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

/// Why a subnet string or pool was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// Not `a.b.c.d/len`, or host bits set.
    #[error("{0:?} is not an IPv4 network a.b.c.d/len with the host bits zero")]
    Parse(String),
    /// The tenant prefix does not fit the pool.
    #[error("tenant subnets of /{tenant} do not fit in the pool {pool} (need /{min}../30)")]
    Size {
        /// The pool.
        pool: Ipv4Net,
        /// The tenant prefix.
        tenant: u8,
        /// The smallest allowed tenant prefix (the pool's own).
        min: u8,
    },
    /// Every subnet of the pool is taken or reserved.
    #[error(
        "no free tenant subnet: every /{tenant} of {pool} is taken or reserved; widen the pool \
         or free tenants"
    )]
    Exhausted {
        /// The pool.
        pool: Ipv4Net,
        /// The tenant prefix.
        tenant: u8,
    },
}

impl Ipv4Net {
    /// A network; refuses a prefix over 32 or set host bits.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, SubnetError> {
        let n = Self { addr, prefix };
        if prefix > 32 || u32::from(addr) & !n.mask() != 0 {
            return Err(SubnetError::Parse(format!("{addr}/{prefix}")));
        }
        Ok(n)
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Number of addresses, widened so /0 fits.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    fn first(&self) -> u64 {
        u64::from(u32::from(self.addr))
    }

    fn end(&self) -> u64 {
        self.first() + self.size()
    }

    /// Whether two networks share an address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.first() < other.end() && other.first() < self.end()
    }

    /// Whether `ip` lies inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let i = u64::from(u32::from(ip));
        i >= self.first() && i < self.end()
    }

    /// The `n`th address (0 = the network address); `None` past the end.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let i = self.first() + u64::from(n);
        (i < self.end()).then(|| Ipv4Addr::from(u32::try_from(i).unwrap_or(u32::MAX)))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = SubnetError;
    fn from_str(s: &str) -> Result<Self, SubnetError> {
        let bad = || SubnetError::Parse(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Self::new(addr, prefix).map_err(|_| bad())
    }
}

impl TryFrom<String> for Ipv4Net {
    type Error = SubnetError;
    fn try_from(s: String) -> Result<Self, SubnetError> {
        s.parse()
    }
}

impl From<Ipv4Net> for String {
    fn from(n: Ipv4Net) -> String {
        n.to_string()
    }
}

/// Where tenant subnets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool {
    pool: Ipv4Net,
    tenant_prefix: u8,
}

impl SubnetPool {
    /// Tenant subnets of `/tenant_prefix` out of `pool`; at least /30 (network, gateway, one
    /// address, broadcast).
    pub fn new(pool: Ipv4Net, tenant_prefix: u8) -> Result<Self, SubnetError> {
        if tenant_prefix < pool.prefix() || tenant_prefix > 30 {
            return Err(SubnetError::Size {
                pool,
                tenant: tenant_prefix,
                min: pool.prefix(),
            });
        }
        Ok(Self {
            pool,
            tenant_prefix,
        })
    }

    /// The routes of the host's main table (`/proc/net/route`) that a tenant subnet must not
    /// overlap: what the host already reaches (docker's or libvirt's bridges, a VPN, another
    /// runtime's pods), whose traffic a tenant with those addresses would capture. Left out:
    /// the default route, and routes that hold the whole pool (the operator put the pool
    /// inside them, and a tenant's subnet, more specific, takes its own traffic).
    pub fn host_reserved(&self, proc_net_route: &str) -> Vec<Ipv4Net> {
        proc_net_route
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let hex = |s: &str| u32::from_str_radix(s, 16).ok();
                let (dest, mask) = (hex(f.get(1)?)?, hex(f.get(7)?)?);
                // Little-endian words, as the kernel prints them on this host.
                let prefix = u8::try_from(
                    mask.to_le_bytes()
                        .iter()
                        .map(|b| b.count_ones())
                        .sum::<u32>(),
                )
                .ok()?;
                Ipv4Net::new(Ipv4Addr::from(dest.to_le_bytes()), prefix).ok()
            })
            .filter(|r| {
                r.prefix() > 0
                    && !(r.prefix() <= self.pool.prefix() && r.contains(self.pool.addr()))
            })
            .collect()
    }

    /// How many tenant subnets the pool holds.
    pub fn capacity(&self) -> u64 {
        1u64 << (self.tenant_prefix - self.pool.prefix())
    }

    /// The lowest subnet overlapping nothing in `taken` or `reserved`.
    pub fn allocate(
        &self,
        taken: &[Ipv4Net],
        reserved: &[Ipv4Net],
    ) -> Result<Ipv4Net, SubnetError> {
        let step = 1u64 << (32 - u32::from(self.tenant_prefix));
        (0..self.capacity())
            .filter_map(|i| {
                let first = self.pool.first() + i * step;
                let addr = Ipv4Addr::from(u32::try_from(first).ok()?);
                Ipv4Net::new(addr, self.tenant_prefix).ok()
            })
            .find(|c| !taken.iter().chain(reserved).any(|t| t.overlaps(c)))
            .ok_or(SubnetError::Exhausted {
                pool: self.pool,
                tenant: self.tenant_prefix,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn the_hosts_own_routes_are_kept_out_of_tenant_subnets() {
        let pool = SubnetPool::new(net("10.88.0.0/16"), 24).unwrap();
        // As /proc/net/route prints them on x86: default via eth0, 10.88.0.0/24 on a dummy
        // (another runtime's bridge), 10.0.0.0/8 via a VPN (holds the whole pool), and
        // 192.168.122.0/24 (libvirt).
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
podman0\t0000580A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
tun0\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n\
virbr0\t007AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let reserved = pool.host_reserved(table);
        assert_eq!(reserved, vec![net("10.88.0.0/24"), net("192.168.122.0/24")]);
        assert_eq!(
            pool.allocate(&[], &reserved).unwrap(),
            net("10.88.1.0/24"),
            "the subnet the host already routes is skipped"
        );
    }

    #[test]
    fn parsing_refuses_host_bits_and_bad_lengths() {
        assert_eq!(net("10.88.0.0/16").to_string(), "10.88.0.0/16");
        for bad in [
            "10.88.0.1/16",
            "10.88.0.0/33",
            "10.88.0.0",
            "x/8",
            "10.88.0.0/-1",
            "",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&net("10.0.0.0/8")).unwrap();
        assert_eq!(json, "\"10.0.0.0/8\"");
        assert!(serde_json::from_str::<Ipv4Net>("\"10.0.0.1/8\"").is_err());
    }

    #[test]
    fn allocation_skips_taken_and_reserved_and_ends_exhausted() {
        let pool = SubnetPool::new(net("10.88.0.0/22"), 24).unwrap();
        assert_eq!(pool.capacity(), 4);
        let a = pool.allocate(&[], &[]).unwrap();
        assert_eq!(a, net("10.88.0.0/24"));
        // A reserved /25 inside the second /24 makes the whole /24 unusable.
        let reserved = [net("10.88.1.128/25")];
        let b = pool.allocate(&[a], &reserved).unwrap();
        assert_eq!(b, net("10.88.2.0/24"));
        let c = pool.allocate(&[a, b], &reserved).unwrap();
        assert_eq!(c, net("10.88.3.0/24"));
        let e = pool.allocate(&[a, b, c], &reserved).unwrap_err();
        assert!(matches!(e, SubnetError::Exhausted { .. }), "{e}");
        assert!(e.to_string().contains("10.88.0.0/22"), "{e}");
    }

    #[test]
    fn sizes_and_addresses() {
        assert!(SubnetPool::new(net("10.88.0.0/16"), 15).is_err());
        assert!(SubnetPool::new(net("10.88.0.0/16"), 31).is_err());
        let n = net("10.88.4.0/30");
        assert_eq!(n.nth(1), Some(Ipv4Addr::new(10, 88, 4, 1)));
        assert_eq!(n.nth(4), None);
        assert!(n.contains(Ipv4Addr::new(10, 88, 4, 3)));
        assert!(!n.contains(Ipv4Addr::new(10, 88, 4, 4)));
        assert!(net("0.0.0.0/0").overlaps(&n));
        assert_eq!(net("0.0.0.0/0").size(), 1 << 32);
    }
}
