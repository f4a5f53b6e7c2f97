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
pub mod cri;
pub mod ctl;
pub mod engine;
pub mod export;
pub mod fsutil;
pub mod guest;
pub mod images;
pub mod keyed;
pub mod ledger;
pub mod logging;
pub mod meter;
pub mod metrics;
pub mod net;
pub mod node;
pub mod sandbox;
pub mod serve;
pub mod sys;
pub mod systemd;
pub mod tenants;
pub mod usage;
pub mod validate;
pub mod vm;

/// The agent's version, as reported by `NodeService.GetNodeInfo` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Test support shared by the unit tests here and the end-to-end tests in `tests/`.
#[doc(hidden)]
pub mod testing {
    /// Whether privileged tests must run (CI sets `CAAS_REQUIRE_PRIVILEGED=1`).
    pub fn privileged_required() -> bool {
        std::env::var("CAAS_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
    }

    /// True when running as root. Otherwise records the skip, or fails the test when
    /// privileged tests are mandatory.
    pub fn require_root(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(
            !privileged_required(),
            "{test}: needs root, and CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory"
        );
        skip(test, "needs root");
        false
    }

    /// Records a skipped test: on stderr, and in `$CAAS_SKIP_LOG` when set, because cargo hides
    /// the output of tests that pass and a skip must never be silent. The test command prints it.
    pub fn skip(test: &str, reason: &str) {
        eprintln!("SKIP {test}: {reason}");
        if let Some(path) = std::env::var_os("CAAS_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "SKIP {test}: {reason}");
            }
        }
    }
}
