//! The tenant registry: which tenants exist on this node, their quotas and labels, persisted under
//! `<state_dir>/tenants/<id>.json` so they survive agent restarts.
//!
//! This module owns tenant records only. It must not start processes or touch cgroups: the sandbox
//! of a tenant (uid range, cgroup subtree, netns, engine) is provisioned by the sandbox layer.

pub mod idrange;
mod model;
mod store;
pub mod subnet;

pub use model::{Isolation, QuotaRequest, Quotas, Tenant, TenantFilter, TenantSpec, TenantState};
pub use store::{Registry, TenantError};
