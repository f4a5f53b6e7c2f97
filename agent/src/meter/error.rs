//! The meter's one error type. Read errors are per cgroup: one failing cgroup never stops the
//! sampling of the others.

use std::{io, path::PathBuf};

use super::MeterKey;
use crate::cgroups::CgroupLayout;

/// Why a cgroup could not be metered, or a sampler request failed.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// The cgroup (or network link) was removed: its directory is missing, or a read on an open
    /// file returned `ENODEV`/`ENOENT` (open descriptors do not keep a cgroup or a link from
    /// being removed).
    #[error("{path} is gone")]
    Gone {
        /// The cgroup directory or counter file.
        path: PathBuf,
    },
    /// A counter file could not be opened or read.
    #[error("counter file {path}: {source}")]
    Io {
        /// The counter file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A counter file holds something other than what the kernel writes there.
    #[error("counter file {path}: {reason}: {content:?}")]
    Malformed {
        /// The counter file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
        /// The start of what the file held.
        content: String,
    },
    /// The relative cgroup path is empty, absolute, or climbs with `..`.
    #[error("cgroup path {rel:?} is not a plain relative path")]
    InvalidPath {
        /// The path as given.
        rel: String,
    },
    /// A network link name that is not a plain interface name.
    #[error("network link name {link:?} is not 1..=15 bytes of [A-Za-z0-9_.-] (nor . or ..)")]
    InvalidLink {
        /// The name as given.
        link: String,
    },
    /// Network bytes are metered per tenant: a container shares its tenant's network namespace.
    #[error("{} cannot have a network link: containers share their tenant's", describe(.key))]
    LinkOnContainer {
        /// The key.
        key: MeterKey,
    },
    /// The host layout has no hierarchy to read counters from.
    #[error("no cgroup hierarchy to meter under {root} (layout {layout})")]
    NoHierarchy {
        /// The cgroup root.
        root: PathBuf,
        /// The layout detected there.
        layout: CgroupLayout,
    },
    /// The sampler already has a target with this key.
    #[error("{} is already metered", describe(.key))]
    AlreadyMetered {
        /// The key.
        key: MeterKey,
    },
    /// The sampler has no target with this key.
    #[error("{} is not metered", describe(.key))]
    NotMetered {
        /// The key.
        key: MeterKey,
    },
    /// The sampler's configuration is unusable.
    #[error("sampler period {0:?} is outside 10 ms ..= 60 s")]
    BadPeriod(std::time::Duration),
    /// The sampler thread could not be started.
    #[error("starting the meter sampler thread: {0}")]
    Spawn(io::Error),
    /// The sampler thread has stopped (shut down, or it panicked).
    #[error("the meter sampler has stopped")]
    Stopped,
}

/// Longest excerpt of a malformed file kept in the error.
const EXCERPT: usize = 64;

impl MeterError {
    /// Maps an I/O error on `path`: `ENODEV`/`ENOENT` mean the cgroup was removed.
    pub(crate) fn from_io(path: &std::path::Path, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENODEV | libc::ENOENT) => Self::Gone {
                path: path.to_path_buf(),
            },
            _ => Self::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }

    /// A malformed-content error quoting the start of `content`.
    pub(crate) fn malformed(path: &std::path::Path, reason: &'static str, content: &[u8]) -> Self {
        let end = content.len().min(EXCERPT);
        Self::Malformed {
            path: path.to_path_buf(),
            reason,
            content: String::from_utf8_lossy(&content[..end]).into_owned(),
        }
    }

    /// True when the cgroup no longer exists, so metering it can stop.
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Gone { .. })
    }
}

/// `tenant a` or `container a/x`, for messages.
pub(crate) fn describe(key: &MeterKey) -> String {
    match &key.container {
        Some(c) => format!("container {}/{c}", key.tenant),
        None => format!("tenant {}", key.tenant),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn enodev_and_enoent_mean_gone() {
        let p = Path::new("/sys/fs/cgroup/memory/caas.slice/tenant-a/memory.usage_in_bytes");
        for errno in [libc::ENODEV, libc::ENOENT] {
            let e = MeterError::from_io(p, io::Error::from_raw_os_error(errno));
            assert!(e.is_gone(), "{errno}: {e}");
            assert!(e.to_string().contains("tenant-a/memory.usage_in_bytes"));
        }
        let e = MeterError::from_io(p, io::Error::from_raw_os_error(libc::EACCES));
        assert!(!e.is_gone());
        assert!(matches!(e, MeterError::Io { .. }));
    }

    #[test]
    fn messages_name_the_file_and_quote_a_bounded_excerpt() {
        let e = MeterError::malformed(Path::new("/c/memory.current"), "not a number", &[b'x'; 500]);
        let msg = e.to_string();
        assert!(msg.starts_with("counter file /c/memory.current: not a number: "));
        assert!(msg.len() < 150, "{msg}");
        let key = MeterKey {
            tenant: "a".into(),
            container: Some("x".into()),
        };
        assert_eq!(
            MeterError::NotMetered { key }.to_string(),
            "container a/x is not metered"
        );
    }
}
