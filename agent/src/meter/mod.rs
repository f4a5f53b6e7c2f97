//! Per-second metering of tenant and container cgroups: the sampling half of usage billing.
//!
//! Owns reading the counters (CPU time, memory working set and peak, OOM kills, tasks) of the
//! cgroups it is told about, and the byte counters of the tenants' network links, and handing
//! them to the ledger as [`Sample`]s:
//!
//! - [`reader`]: [`CgroupReader`] keeps one cgroup's counter files open and re-reads them with
//!   `pread`, on v2, v1 and the hybrid layout;
//! - [`link`]: [`LinkReader`] does the same for a tenant's host-side link
//!   (`statistics/{rx,tx}_bytes`), and never fails a tenant's sample;
//! - [`sampler`]: [`Sampler`] runs on its own thread, reads every target on each wall-clock second
//!   and delivers one `Vec<Sample>` per tick; [`SamplerHandle`] adds, finishes and removes
//!   targets from async code;
//! - `sample.rs`: the types the ledger consumes; `schedule.rs`: tick timing; `parse.rs`: the
//!   byte parsers; `fixture.rs`: fixture trees and scratch cgroups for tests and benchmarks.
//!
//! It must not create, change or remove cgroups or links (the sandbox and `net` do), and never
//! runs on the tokio runtime. Storing, windowing and acknowledging usage belong to the ledger.

pub mod error;
#[doc(hidden)]
pub mod fixture;
pub mod link;
mod parse;
pub mod reader;
pub mod sample;
pub mod sampler;
mod schedule;

pub use error::MeterError;
pub use link::{DEFAULT_NET_ROOT, LINK_RETRY_EVERY, LinkReader};
pub use reader::{CgroupReader, STAT_REFRESH_EVERY};
pub use sample::{Counters, MeterKey, NetBytes, Sample};
pub use sampler::{DEFAULT_PERIOD, Sampler, SamplerConfig, SamplerHandle, SamplerStats};
