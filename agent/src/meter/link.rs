//! Reads the byte counters of a tenant's host-side network link, beside its cgroup counters.
//!
//! A tenant with a network has one veth pair; its host side (`caas-<hash>`, see
//! [`crate::net::link_name`]) carries everything the tenant sends or receives. The kernel keeps
//! cumulative counters for it in `<net root>/<link>/statistics/{rx_bytes,tx_bytes}` (the net root
//! is normally `/sys/class/net`). They count at L2, Ethernet headers included, from the host's
//! side: the tenant's sent bytes are the link's `rx_bytes`, its received bytes the link's
//! `tx_bytes`. [`LinkReader`] opens the two files once and re-reads them with `pread` at offset
//! 0, as the cgroup reader does.
//!
//! A link can go away under an open descriptor (the tenant's network is being removed, or the
//! agent re-creates a missing link at start) and the new one counts from 0 again. A failed read
//! therefore never fails the tenant's sample: it reopens the files by name once at once (a link
//! created again under the same name is read at once), and when that fails too, the reading has
//! no network bytes ([`Counters::net`](super::Counters::net) is `None`: the ledger counts nothing
//! for it and keeps its baseline) and the open is retried every [`LINK_RETRY_EVERY`] reads, or at
//! once for a final reading.
//!
//! This module only reads; it never creates, changes or removes a link.

use std::path::{Path, PathBuf};

use super::{MeterError, NetBytes, reader::CounterFile};

/// The kernel's network device directory.
pub const DEFAULT_NET_ROOT: &str = "/sys/class/net";
/// While a link cannot be opened, the open is retried on one read in this many (and on every
/// final read).
pub const LINK_RETRY_EVERY: u32 = 10;
/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_LINK_NAME_LEN: usize = 15;

/// Buffer for one counter file (a decimal `u64` and a newline).
const BUF: usize = 64;

/// The two open counter files of a link.
#[derive(Debug)]
struct LinkFiles {
    /// The host side's `rx_bytes`: what the tenant sent.
    host_rx: CounterFile,
    /// The host side's `tx_bytes`: what the tenant received.
    host_tx: CounterFile,
}

impl LinkFiles {
    fn open(statistics: &Path) -> Result<Self, MeterError> {
        Ok(Self {
            host_rx: CounterFile::open(statistics.join("rx_bytes"))?,
            host_tx: CounterFile::open(statistics.join("tx_bytes"))?,
        })
    }

    fn read(&self) -> Result<NetBytes, MeterError> {
        let mut buf = [0u8; BUF];
        let tx_bytes = self.host_rx.value(&mut buf)?;
        let rx_bytes = self.host_tx.value(&mut buf)?;
        Ok(NetBytes { rx_bytes, tx_bytes })
    }
}

/// One tenant's link: its name, and its counter files while they are open.
#[derive(Debug)]
pub struct LinkReader {
    name: String,
    /// `<net root>/<name>/statistics`.
    statistics: PathBuf,
    files: Option<LinkFiles>,
    /// Reads left before the next open attempt while `files` is `None`.
    until_retry: u32,
}

/// Whether `link` is a name the kernel could have given a link, and safe to join to a path: 1 to
/// [`MAX_LINK_NAME_LEN`] bytes of ASCII letters, digits, `-`, `_` and `.`, and not `.` or `..`.
pub fn valid_link_name(link: &str) -> bool {
    (1..=MAX_LINK_NAME_LEN).contains(&link.len())
        && link != "."
        && link != ".."
        && link
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl LinkReader {
    /// A reader of the link `link` under `net_root` (normally [`DEFAULT_NET_ROOT`]). The files are
    /// opened on the first read, so a link that does not exist yet is no error here.
    pub fn new(net_root: &Path, link: &str) -> Result<Self, MeterError> {
        if !valid_link_name(link) {
            return Err(MeterError::InvalidLink { link: link.into() });
        }
        Ok(Self {
            name: link.to_owned(),
            statistics: net_root.join(link).join("statistics"),
            files: None,
            until_retry: 0,
        })
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the counter files are open (the last read or open attempt succeeded).
    pub fn is_open(&self) -> bool {
        self.files.is_some()
    }

    /// Reads both counters now.
    ///
    /// `Ok(None)`: the link could not be opened lately and this call was not one to retry on
    /// (`retry_now` retries at once: a final reading). An error says why this read or this open
    /// failed; the files are closed then, and the next open is [`LINK_RETRY_EVERY`] reads later.
    pub fn read(&mut self, retry_now: bool) -> Result<Option<NetBytes>, MeterError> {
        match &self.files {
            Some(files) => match files.read() {
                Ok(bytes) => return Ok(Some(bytes)),
                // Removed, or removed and created again: the open files are the old link's.
                // Reopened by name below.
                Err(_) => self.files = None,
            },
            None if !retry_now && self.until_retry > 0 => {
                self.until_retry -= 1;
                return Ok(None);
            }
            None => {}
        }
        let opened = LinkFiles::open(&self.statistics).and_then(|files| {
            let bytes = files.read()?;
            Ok((files, bytes))
        });
        match opened {
            Ok((files, bytes)) => {
                self.files = Some(files);
                Ok(Some(bytes))
            }
            Err(e) => {
                self.until_retry = LINK_RETRY_EVERY - 1;
                Err(e)
            }
        }
    }
}

/// A tenant's link as the sampler holds it: the reader, and whether its failure was logged.
#[derive(Debug)]
pub(super) struct TenantLink {
    reader: LinkReader,
    /// Whether the last read or open failed (the change is logged, not every failure).
    failing: bool,
}

impl TenantLink {
    pub(super) fn new(reader: LinkReader) -> Self {
        Self {
            reader,
            failing: false,
        }
    }

    pub(super) fn name(&self) -> &str {
        self.reader.name()
    }

    /// The bytes for a reading of `tenant`, or `None`. A failure is counted in `errors` and
    /// logged when it starts (and its end when it ends), except a link found gone while the
    /// tenant is `removing`: that is expected, logged at debug level and not counted.
    pub(super) fn read(
        &mut self,
        tenant: &str,
        retry_now: bool,
        removing: bool,
        errors: &mut u64,
    ) -> Option<NetBytes> {
        match self.reader.read(retry_now) {
            Ok(Some(bytes)) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!(
                        tenant,
                        link = self.reader.name(),
                        "network link readable again; its bytes are metered"
                    );
                }
                Some(bytes)
            }
            Ok(None) => None,
            Err(e) if e.is_gone() && removing => {
                tracing::debug!(
                    tenant,
                    link = self.reader.name(),
                    "network link removed with its tenant; the reading before has its bytes"
                );
                None
            }
            Err(e) => {
                *errors += 1;
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(
                        tenant,
                        link = self.reader.name(),
                        error = %e,
                        retry_every = LINK_RETRY_EVERY,
                        "network link unreadable; readings leave its bytes out until it is \
                         readable again, logged again then"
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::meter::fixture::{remove_link_fixture, write_link_fixture};

    const LINK: &str = "caas-0123456789";

    #[test]
    fn reads_the_host_side_counters_as_the_tenant_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        // The host side received 1000 bytes (sent by the tenant) and sent 70 (to the tenant).
        write_link_fixture(dir.path(), LINK, 1000, 70).unwrap();
        let mut r = LinkReader::new(dir.path(), LINK).unwrap();
        assert!(!r.is_open(), "opened on the first read");
        let want = NetBytes {
            rx_bytes: 70,
            tx_bytes: 1000,
        };
        assert_eq!(r.read(false).unwrap(), Some(want));
        assert!(r.is_open());
        write_link_fixture(dir.path(), LINK, 5000, 90).unwrap();
        let want = NetBytes {
            rx_bytes: 90,
            tx_bytes: 5000,
        };
        assert_eq!(r.read(false).unwrap(), Some(want));
        assert_eq!(r.name(), LINK);
    }

    #[test]
    fn a_missing_link_reads_nothing_and_is_retried_every_nth_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = LinkReader::new(dir.path(), LINK).unwrap();
        let e = r.read(false).unwrap_err();
        assert!(e.is_gone(), "{e}");
        assert!(e.to_string().contains("caas-0123456789/statistics"), "{e}");

        // The link appears: it is not looked for again before the retry is due.
        write_link_fixture(dir.path(), LINK, 10, 20).unwrap();
        for i in 1..LINK_RETRY_EVERY {
            assert_eq!(r.read(false).unwrap(), None, "read {i} waits");
        }
        let got = r.read(false).unwrap().expect("retried on the nth read");
        assert_eq!((got.rx_bytes, got.tx_bytes), (20, 10));

        // Removed: the open files fail, the reopen by name fails too.
        remove_link_fixture(dir.path(), LINK).unwrap();
        assert!(r.read(false).is_err());
        assert!(!r.is_open());
        assert_eq!(r.read(false).unwrap(), None);
        // A final reading retries at once.
        write_link_fixture(dir.path(), LINK, 1, 2).unwrap();
        let got = r.read(true).unwrap().expect("final reading retries");
        assert_eq!((got.rx_bytes, got.tx_bytes), (2, 1));
    }

    #[test]
    fn a_malformed_counter_names_the_file_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        write_link_fixture(dir.path(), LINK, 1, 2).unwrap();
        let mut r = LinkReader::new(dir.path(), LINK).unwrap();
        r.read(false).unwrap();
        let rx = dir.path().join(LINK).join("statistics/rx_bytes");
        fs::write(&rx, "many\n").unwrap();
        let e = r.read(false).unwrap_err();
        assert!(
            e.to_string()
                .contains("caas-0123456789/statistics/rx_bytes: not an integer"),
            "{e}"
        );
        write_link_fixture(dir.path(), LINK, 3, 4).unwrap();
        assert_eq!(r.read(true).unwrap().map(|n| n.tx_bytes), Some(3));
    }

    #[test]
    fn link_names_are_an_allowlist() {
        for good in [LINK, "eth0", "a", "veth_1.2", "x".repeat(15).as_str()] {
            assert!(valid_link_name(good), "{good}");
            LinkReader::new(Path::new("/sys/class/net"), good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a b",
            "a:1",
            "x".repeat(16).as_str(),
            "caas-é",
        ] {
            assert!(!valid_link_name(bad), "{bad:?}");
            let e = LinkReader::new(Path::new("/sys/class/net"), bad).unwrap_err();
            assert!(matches!(e, MeterError::InvalidLink { .. }), "{e}");
        }
    }

    /// The host's own loopback: the real sysfs files parse.
    #[test]
    fn reads_a_real_link() {
        let root = Path::new(DEFAULT_NET_ROOT);
        if !root.join("lo/statistics/rx_bytes").exists() {
            crate::testing::skip("meter::link::reads_a_real_link", "no /sys/class/net/lo");
            return;
        }
        let mut r = LinkReader::new(root, "lo").unwrap();
        let first = r.read(false).unwrap().expect("lo is readable");
        let again = r.read(false).unwrap().expect("lo is readable");
        assert!(again.rx_bytes >= first.rx_bytes && again.tx_bytes >= first.tx_bytes);
    }

    /// A real veth pair removed under the open reader: the kernel answers ENODEV, and the link
    /// created again under the same name is read through new descriptors, from 0.
    #[test]
    fn a_real_link_removed_and_created_again() {
        const TEST: &str = "meter::link::a_real_link_removed_and_created_again";
        if !crate::testing::require_root(TEST) {
            return;
        }
        let suffix = format!("{:07x}", rand::random::<u32>() & 0x0fff_ffff);
        let pair = VethPair {
            host: format!("caas-mt-{suffix}"),
            peer: format!("caas-mp-{suffix}"),
        };
        if let Err(e) = pair.create() {
            assert!(
                !crate::testing::privileged_required(),
                "{TEST}: ip link add failed ({e}), and CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory"
            );
            crate::testing::skip(TEST, &format!("cannot make a veth pair: {e}"));
            return;
        }
        let root = Path::new(DEFAULT_NET_ROOT);
        let mut r = LinkReader::new(root, &pair.host).unwrap();
        assert!(r.read(false).unwrap().is_some());
        assert!(r.is_open());

        pair.delete();
        let e = r.read(false).unwrap_err();
        assert!(e.is_gone(), "{e}");
        assert!(!r.is_open());
        assert_eq!(r.read(false).unwrap(), None, "not retried before it is due");

        pair.create().unwrap();
        let again = r.read(true).unwrap().expect("reopened by name");
        // A link just made that is down has sent and received nothing.
        assert_eq!(again, NetBytes::default());
    }

    /// A veth pair made with `ip`, deleted when dropped.
    struct VethPair {
        host: String,
        peer: String,
    }

    impl VethPair {
        fn create(&self) -> Result<(), String> {
            let out = std::process::Command::new("ip")
                .args([
                    "link", "add", &self.host, "type", "veth", "peer", "name", &self.peer,
                ])
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
            }
            Ok(())
        }

        /// Deleting one side deletes the pair.
        fn delete(&self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.host])
                .output();
        }
    }

    impl Drop for VethPair {
        fn drop(&mut self) {
            self.delete();
        }
    }
}
