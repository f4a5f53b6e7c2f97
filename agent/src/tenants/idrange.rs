//! Host uid/gid ranges for tenants: 65,536 ids each, the same numbers for uids and gids, taken
//! from a configured pool, never overlapping another tenant's range or any `/etc/subuid` or
//! `/etc/subgid` entry (those belong to the host's own rootless users).
//!
//! A tenant's range is stored in its record, so it is held exactly as long as the tenant exists
//! and is never handed out twice while anything of the tenant remains.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Ids per tenant: a full 16-bit space, so uid 0..=65535 inside maps one to one.
pub const RANGE_SIZE: u32 = 65_536;

/// A contiguous range of host ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// First host id.
    pub start: u32,
    /// Number of ids.
    pub size: u32,
}

impl IdRange {
    /// One past the last id, widened so it cannot overflow.
    pub fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.size)
    }

    /// Whether two ranges share an id.
    pub fn overlaps(&self, other: &IdRange) -> bool {
        u64::from(self.start) < other.end() && u64::from(other.start) < self.end()
    }

    /// Whether a host id lies inside.
    pub fn contains(&self, id: u32) -> bool {
        id >= self.start && u64::from(id) < self.end()
    }
}

/// Where tenant ranges may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdPool {
    /// First id of the pool (a multiple of [`RANGE_SIZE`] keeps ranges aligned).
    pub start: u32,
    /// How many tenant ranges the pool holds.
    pub ranges: u32,
}

/// The pool has no free range.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "no free uid/gid range: all {ranges} ranges of the pool starting at {start} are taken or reserved \
     by /etc/subuid or /etc/subgid; raise tenants.id_pool_ranges or free tenants"
)]
pub struct PoolExhausted {
    /// Pool start.
    pub start: u32,
    /// Pool size in ranges.
    pub ranges: u32,
}

impl IdPool {
    /// The lowest free range: not in `taken`, not in `reserved`.
    pub fn allocate(
        &self,
        taken: &[IdRange],
        reserved: &[IdRange],
    ) -> Result<IdRange, PoolExhausted> {
        (0..self.ranges)
            .filter_map(|i| {
                let start = u64::from(self.start) + u64::from(i) * u64::from(RANGE_SIZE);
                let start = u32::try_from(start).ok()?;
                // The last id must stay below u32::MAX (the kernel's "no id" value).
                (u64::from(start) + u64::from(RANGE_SIZE) < u64::from(u32::MAX)).then_some(
                    IdRange {
                        start,
                        size: RANGE_SIZE,
                    },
                )
            })
            .find(|r| !taken.iter().chain(reserved).any(|t| t.overlaps(r)))
            .ok_or(PoolExhausted {
                start: self.start,
                ranges: self.ranges,
            })
    }
}

/// Parses `/etc/subuid`-style text (`name:start:count` per line); bad lines are skipped.
pub fn parse_subid(text: &str) -> Vec<IdRange> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let _name = f.next()?;
            let start = f.next()?.trim().parse().ok()?;
            let size = f.next()?.trim().parse().ok()?;
            Some(IdRange { start, size })
        })
        .collect()
}

/// The ranges reserved by the host's subordinate-id files under `etc` (normally `/etc`).
pub fn host_reserved(etc: &Path) -> Vec<IdRange> {
    ["subuid", "subgid"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(etc.join(f)).ok())
        .flat_map(|t| parse_subid(&t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: IdPool = IdPool {
        start: 1 << 20,
        ranges: 4,
    };

    #[test]
    fn allocates_lowest_free_and_skips_reserved() {
        let a = POOL.allocate(&[], &[]).unwrap();
        assert_eq!(
            a,
            IdRange {
                start: 1 << 20,
                size: RANGE_SIZE
            }
        );
        let b = POOL.allocate(&[a], &[]).unwrap();
        assert_eq!(b.start, (1 << 20) + RANGE_SIZE);
        // A subuid entry straddling the third slot pushes allocation to the fourth.
        let reserved = parse_subid(&format!("alice:{}:10\n", (1 << 20) + 2 * RANGE_SIZE + 5));
        let c = POOL.allocate(&[a, b], &reserved).unwrap();
        assert_eq!(c.start, (1 << 20) + 3 * RANGE_SIZE);
        assert!(POOL.allocate(&[a, b, c], &reserved).is_err());
        // Freed ranges are reused.
        assert_eq!(POOL.allocate(&[b, c], &reserved).unwrap(), a);
    }

    #[test]
    fn never_reaches_u32_max() {
        let pool = IdPool {
            start: u32::MAX - RANGE_SIZE,
            ranges: 10,
        };
        assert!(pool.allocate(&[], &[]).is_err());
    }

    #[test]
    fn overlap_and_parse() {
        let r = IdRange {
            start: 100,
            size: 10,
        };
        assert!(r.overlaps(&IdRange {
            start: 109,
            size: 1
        }));
        assert!(!r.overlaps(&IdRange {
            start: 110,
            size: 1
        }));
        assert!(r.contains(109) && !r.contains(110));
        let v = parse_subid("# c\nroot:100000:65536\nbad line\nbob:x:1\n\nu:1:2:extra\n");
        assert_eq!(
            v,
            vec![
                IdRange {
                    start: 100000,
                    size: 65536
                },
                IdRange { start: 1, size: 2 }
            ]
        );
    }
}
