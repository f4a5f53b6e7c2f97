//! cgroup support shared by the agent: which layout the host has (v1, v2 or hybrid), and the
//! tenant subtrees that carry quotas.
//!
//! The per-second readers live in the metering module; this module only answers questions about
//! the host's mounts, from text that tests can supply as fixtures.

pub mod dynmods;
pub mod layout;
pub mod tenant;

pub use layout::{CgroupLayout, detect_layout, parse_layout};
pub use tenant::{CgroupError, Limits, TenantCgroups};
