//! caas-agent: the per-server agent of a Containers-as-a-Service provider.
//!
//! The library does the work; `caas-agent` and `caasctl` are thin binaries over it. Layers, top to
//! bottom: [`api`] (tonic services: authentication, authorization, input conversion), the domain
//! ([`tenants`], [`node`]), and the plumbing they share ([`config`], [`validate`], [`fsutil`]).
//! Proto types never travel below [`api`].

pub mod api;
pub mod authz;
pub mod blocking;
pub mod certs;
pub mod cgroups;
pub mod client;
pub mod config;
pub mod ctl;
pub mod fsutil;
pub mod logging;
pub mod node;
pub mod serve;
pub mod systemd;
pub mod tenants;
pub mod validate;

/// The agent's version, as reported by `NodeService.GetNodeInfo` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
