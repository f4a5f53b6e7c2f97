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
pub mod engine;
pub mod fsutil;
pub mod logging;
pub mod node;
pub mod sandbox;
pub mod serve;
pub mod sys;
pub mod systemd;
pub mod tenants;
pub mod validate;

/// The agent's version, as reported by `NodeService.GetNodeInfo` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
pub(crate) mod testutil {
    /// True when running as root. Otherwise prints the skip (and records it in `$CAAS_SKIP_LOG`),
    /// or fails the test when `CAAS_REQUIRE_PRIVILEGED=1`.
    pub fn require_root(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(
            std::env::var("CAAS_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
            "{test}: needs root, and CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory"
        );
        eprintln!("SKIP {test}: needs root");
        if let Some(p) = std::env::var_os("CAAS_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
            {
                let _ = writeln!(f, "SKIP {test}: needs root");
            }
        }
        false
    }
}
