//! Forgetting a deleted tenant's connections: the host's conntrack entries with an address in
//! its subnet, over ctnetlink (`NETLINK_NETFILTER`).
//!
//! Without this, the entries of a deleted tenant (its egress flows, the published-port flows to
//! it, their `TIME_WAIT` remains) live on until they time out, up to five days for an
//! established TCP flow. A tenant given the same subnet meanwhile would inherit them: packets of
//! an old flow would still be translated to its addresses, and replies to them would pass the
//! forward chain as established. So the entries go with the tenant.
//!
//! The kernel's flush filter matches exact addresses only, so the entries are dumped, those with
//! an address of the subnet in either direction are picked, and each is deleted by its original
//! tuple, id and zone (an entry that is gone meanwhile is no error).

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::tenants::subnet::Ipv4Net;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const HDR: usize = 16;
/// `AF_INET` as nfgenmsg's one-byte family.
const FAMILY_INET: u8 = 2;
/// `AF_NETLINK` as a socket address family.
const FAMILY_NETLINK: libc::sa_family_t = 16;
/// The size of a `sockaddr_nl` (12 bytes).
const SOCKADDR_NL_LEN: libc::socklen_t = 12;
/// The size of a `timeval` (16 bytes on 64-bit Linux).
const TIMEVAL_LEN: libc::socklen_t = 16;

/// One entry to delete: what identifies it.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    /// The payload of its `CTA_TUPLE_ORIG`, as the kernel sent it.
    orig: Vec<u8>,
    /// `CTA_ID` (network order, as sent).
    id: Option<[u8; 4]>,
    /// `CTA_ZONE` (network order, as sent).
    zone: Option<[u8; 2]>,
}

/// The attributes in `b`: (type without flags, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, payload))
    })
}

/// The IPv4 source and destination of a tuple's payload.
fn tuple_addrs(tuple: &[u8]) -> Vec<Ipv4Addr> {
    attrs(tuple)
        .filter(|(k, _)| *k == CTA_TUPLE_IP)
        .flat_map(|(_, ip)| attrs(ip))
        .filter(|(k, v)| (*k == CTA_IP_V4_SRC || *k == CTA_IP_V4_DST) && v.len() == 4)
        .map(|(_, v)| Ipv4Addr::new(v[0], v[1], v[2], v[3]))
        .collect()
}

/// The entry of one ctnetlink message body (after the netlink header), if one of its addresses,
/// either way, lies in `subnet`.
fn entry_in(body: &[u8], subnet: Ipv4Net) -> Option<Entry> {
    // nfgenmsg: family, version, resource id.
    let attrs_of = body.get(4..)?;
    let mut orig = None;
    let mut id = None;
    let mut zone = None;
    let mut hit = false;
    for (kind, v) in attrs(attrs_of) {
        match kind {
            CTA_TUPLE_ORIG => {
                hit |= tuple_addrs(v).iter().any(|a| subnet.contains(*a));
                orig = Some(v.to_vec());
            }
            CTA_TUPLE_REPLY => hit |= tuple_addrs(v).iter().any(|a| subnet.contains(*a)),
            CTA_ID => id = v.try_into().ok(),
            CTA_ZONE => zone = v.try_into().ok(),
            _ => {}
        }
    }
    Some(Entry {
        orig: orig?,
        id,
        zone,
    })
    .filter(|_| hit)
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// A ctnetlink request for IPv4: netlink header, nfgenmsg, `attributes`.
fn message(kind: u16, flags: u16, seq: u32, attributes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR + 4 + attributes.len());
    let len = u32::try_from(HDR + 4 + attributes.len()).unwrap_or(u32::MAX);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_INET, NFNETLINK_V0, resource id 0.
    m.extend_from_slice(&[FAMILY_INET, 0, 0, 0]);
    m.extend_from_slice(attributes);
    m
}

fn delete_request(e: &Entry, seq: u32) -> Vec<u8> {
    let mut a = Vec::new();
    attr(&mut a, CTA_TUPLE_ORIG | NLA_F_NESTED, &e.orig);
    if let Some(id) = e.id {
        attr(&mut a, CTA_ID, &id);
    }
    if let Some(z) = e.zone {
        attr(&mut a, CTA_ZONE, &z);
    }
    message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, &a)
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        let s = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        // An answer that never comes must not hold a thread for ever.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt(2) with a timeval that outlives the call, and its size.
        let r = unsafe {
            libc::setsockopt(
                s.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                TIMEVAL_LEN,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    fn send(&self, m: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all zero but the family addresses the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = FAMILY_NETLINK;
        // SAFETY: m and to outlive the call; the lengths are theirs.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                SOCKADDR_NL_LEN,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Reads the answers to request `seq` until its end (`DONE`, or the `ERROR` an ack is);
    /// `each` gets every other message's type and body. An error answer other than `ENOENT`
    /// is returned; `false` when a dump was interrupted by a change of the table (its
    /// messages carry `NLM_F_DUMP_INTR`) and may have missed entries.
    fn answers(&self, seq: u32, mut each: impl FnMut(u16, &[u8])) -> io::Result<bool> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut whole = true;
        loop {
            let n = self.recv(&mut buf)?;
            let mut rest = &buf[..n];
            while rest.len() >= HDR {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let flags = u16::from_ne_bytes([rest[6], rest[7]]);
                let got = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                if len < HDR || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a truncated ctnetlink message",
                    ));
                }
                let body = &rest[HDR..len];
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if got != seq {
                    continue;
                }
                whole &= flags & NLM_F_DUMP_INTR == 0;
                match kind {
                    // DONE carries the dump's error code, ERROR the request's (0: an ack).
                    NLMSG_DONE | NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
                        return match -code {
                            0 | libc::ENOENT => Ok(whole),
                            e => Err(io::Error::from_raw_os_error(e)),
                        };
                    }
                    _ => each(kind, body),
                }
            }
        }
    }
}

/// Deletes the host's conntrack entries with an address in `subnet`; how many went.
/// Blocking (netlink round trips): run it off the async threads.
pub fn forget(subnet: Ipv4Net) -> io::Result<usize> {
    let s = Socket::open()?;
    let mut seq = 0u32;
    let mut found = Vec::new();
    // A dump the table changed under says so (NLM_F_DUMP_INTR): then it is taken again.
    for attempt in 0.. {
        seq += 1;
        found.clear();
        let dump = message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, &[]);
        s.send(&dump)?;
        let whole = s.answers(seq, |kind, body| {
            if kind & 0xff == 0 {
                // IPCTNL_MSG_CT_NEW: how a dump reports an entry.
                found.extend(entry_in(body, subnet));
            }
        })?;
        if whole || attempt == 4 {
            break;
        }
    }
    let mut gone = 0;
    for e in &found {
        seq += 1;
        s.send(&delete_request(e, seq))?;
        s.answers(seq, |_, _| {})?;
        gone += 1;
    }
    Ok(gone)
}

/// [`forget`] for tenant `tenant` on the blocking pool; a failure is logged, never returned
/// (the entries then stay until they time out).
pub async fn forget_for(tenant: &str, subnet: Ipv4Net) {
    let forgot = crate::blocking::run(
        "forgetting a tenant's connections",
        crate::blocking::DEFAULT_TIMEOUT,
        move || forget(subnet),
    )
    .await;
    let failed = match forgot {
        Ok(Ok(n)) => {
            tracing::debug!(%tenant, %subnet, entries = n, "conntrack entries of the subnet deleted");
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::warn!(%tenant, %subnet, error = %failed, "deleting the conntrack entries of the tenant's subnet failed; they stay until they time out");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut ip = Vec::new();
        attr(&mut ip, CTA_IP_V4_SRC, &src.octets());
        attr(&mut ip, CTA_IP_V4_DST, &dst.octets());
        let mut t = Vec::new();
        attr(&mut t, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
        // A protocol part, as the kernel sends: skipped by the address reader.
        attr(&mut t, 2 | NLA_F_NESTED, &[4, 0, 1, 0, 6, 0, 0, 0]);
        t
    }

    fn body(orig: &[u8], reply: &[u8]) -> Vec<u8> {
        let mut b = vec![FAMILY_INET, 0, 0, 0];
        attr(&mut b, CTA_TUPLE_ORIG | NLA_F_NESTED, orig);
        attr(&mut b, CTA_TUPLE_REPLY | NLA_F_NESTED, reply);
        attr(&mut b, CTA_ID, &[0, 0, 0, 7]);
        b
    }

    #[test]
    fn the_constants_are_the_kernels() {
        assert_eq!(i32::from(FAMILY_INET), libc::AF_INET);
        assert_eq!(i32::from(FAMILY_NETLINK), libc::AF_NETLINK);
        assert_eq!(
            SOCKADDR_NL_LEN as usize,
            std::mem::size_of::<libc::sockaddr_nl>()
        );
        assert_eq!(TIMEVAL_LEN as usize, std::mem::size_of::<libc::timeval>());
    }

    #[test]
    fn entries_with_a_subnet_address_either_way_are_picked() {
        let net: Ipv4Net = "10.240.3.0/24".parse().unwrap();
        let tenant = Ipv4Addr::new(10, 240, 3, 2);
        let outside = Ipv4Addr::new(192, 0, 2, 9);
        let uplink = Ipv4Addr::new(198, 51, 100, 1);
        let host = Ipv4Addr::LOCALHOST;
        // Egress: the tenant's address in the original direction.
        let egress = tuple(tenant, outside);
        let e = entry_in(&body(&egress, &tuple(outside, uplink)), net).unwrap();
        assert_eq!(e.orig, egress);
        assert_eq!(e.id, Some([0, 0, 0, 7]));
        assert_eq!(e.zone, None);
        // A published port: the tenant's address only in the reply direction.
        assert!(entry_in(&body(&tuple(host, host), &tuple(tenant, host)), net).is_some());
        // Another tenant's flow.
        let other = Ipv4Addr::new(10, 240, 4, 2);
        assert!(entry_in(&body(&tuple(other, outside), &tuple(outside, uplink)), net).is_none());
    }

    #[test]
    fn a_delete_request_carries_the_original_tuple_id_and_zone() {
        let e = Entry {
            orig: tuple(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)),
            id: Some([1, 2, 3, 4]),
            zone: Some([0, 5]),
        };
        let m = delete_request(&e, 9);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(
            u16::from_ne_bytes([m[4], m[5]]),
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
        );
        let got: Vec<(u16, Vec<u8>)> = attrs(&m[HDR + 4..]).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(
            got,
            vec![
                (CTA_TUPLE_ORIG, e.orig.clone()),
                (CTA_ID, vec![1, 2, 3, 4]),
                (CTA_ZONE, vec![0, 5]),
            ]
        );
    }
}
