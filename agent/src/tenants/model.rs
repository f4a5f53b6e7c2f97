//! Tenant domain types and the rules that check them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    config::{self, TenantsConfig},
    validate::{self, Invalid},
};

/// How a tenant is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// User-namespaced sandbox on the host.
    Userns,
    /// One microVM per tenant.
    Vm,
}

impl Isolation {
    /// Its name in the config and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Userns => "userns",
            Self::Vm => "vm",
        }
    }
}

/// Where a tenant is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantState {
    /// Recorded; the sandbox is not (yet) up.
    Pending,
    /// Sandbox and engine are up.
    Ready,
    /// Provisioning or the engine failed.
    Failed,
    /// Being torn down.
    Deleting,
}

/// Resolved, validated quotas.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quotas {
    /// CPUs of bandwidth.
    pub cpus: f64,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Pids limit.
    pub pids: u64,
    /// Containers that may exist at once.
    pub max_containers: u32,
}

/// Quotas as a client sends them: unset fields take a default (or keep the current value).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QuotaRequest {
    /// CPUs.
    pub cpus: Option<f64>,
    /// Memory bytes.
    pub memory_bytes: Option<u64>,
    /// Pids.
    pub pids: Option<u64>,
    /// Container count.
    pub max_containers: Option<u32>,
}

impl QuotaRequest {
    /// Fills unset fields from `base` and checks each against the node's limits.
    pub fn resolve(&self, base: &Quotas) -> Result<Quotas, Invalid> {
        let q = Quotas {
            cpus: self.cpus.unwrap_or(base.cpus),
            memory_bytes: self.memory_bytes.unwrap_or(base.memory_bytes),
            pids: self.pids.unwrap_or(base.pids),
            max_containers: self.max_containers.unwrap_or(base.max_containers),
        };
        validate::check_cpus(
            "quotas.cpus",
            q.cpus,
            config::MIN_TENANT_CPUS,
            config::MAX_TENANT_CPUS,
        )?;
        validate::check_range(
            "quotas.memory_bytes",
            q.memory_bytes,
            config::MIN_TENANT_MEMORY,
            config::MAX_TENANT_MEMORY,
        )?;
        validate::check_range("quotas.pids", q.pids, 1, config::MAX_TENANT_PIDS)?;
        validate::check_range(
            "quotas.max_containers",
            q.max_containers,
            1,
            config::MAX_TENANT_CONTAINERS,
        )?;
        Ok(q)
    }
}

impl Quotas {
    /// The node's defaults from `[tenants]`.
    pub fn defaults(cfg: &TenantsConfig) -> Self {
        Self {
            cpus: cfg.default_cpus,
            memory_bytes: cfg.default_memory_bytes,
            pids: cfg.default_pids,
            max_containers: cfg.default_max_containers,
        }
    }
}

/// What a client asks for when it creates a tenant.
#[derive(Debug, Clone)]
pub struct TenantSpec {
    /// The tenant id.
    pub id: String,
    /// Isolation mode.
    pub isolation: Isolation,
    /// Quotas; unset fields take the node defaults.
    pub quotas: QuotaRequest,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
}

impl TenantSpec {
    /// Checks the id and labels (quotas are checked when resolved).
    pub fn validate(&self) -> Result<(), Invalid> {
        validate::check_id("id", &self.id)?;
        validate::check_labels("labels", &self.labels)
    }
}

/// A tenant as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    /// The tenant id.
    pub id: String,
    /// Isolation mode.
    pub isolation: Isolation,
    /// Quotas in force.
    pub quotas: Quotas,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Life-cycle state.
    pub state: TenantState,
    /// Detail for the state.
    pub message: String,
    /// Creation time.
    pub created_at_unix_ms: u64,
    /// The tenant's host uid/gid range.
    pub id_range: super::idrange::IdRange,
    /// The tenant's network subnet, when tenant networks are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<super::subnet::Ipv4Net>,
}

/// Which tenants a list returns.
#[derive(Debug, Clone, Default)]
pub struct TenantFilter {
    /// Every one of these labels must match.
    pub labels: BTreeMap<String, String>,
    /// Only this state.
    pub state: Option<TenantState>,
    /// Only this isolation.
    pub isolation: Option<Isolation>,
    /// Only this tenant (tenant-scoped callers).
    pub only: Option<String>,
}

impl TenantFilter {
    /// Whether `t` passes.
    pub fn matches(&self, t: &Tenant) -> bool {
        self.only.as_ref().is_none_or(|o| *o == t.id)
            && self.state.is_none_or(|s| s == t.state)
            && self.isolation.is_none_or(|i| i == t.isolation)
            && validate::labels_match(&t.labels, &self.labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Quotas {
        Quotas::defaults(&TenantsConfig::default())
    }

    #[test]
    fn unset_takes_base_and_zero_is_refused() {
        let q = QuotaRequest::default().resolve(&base()).unwrap();
        assert_eq!(q, base());
        for (req, field) in [
            (
                QuotaRequest {
                    cpus: Some(0.0),
                    ..Default::default()
                },
                "quotas.cpus",
            ),
            (
                QuotaRequest {
                    cpus: Some(1e9),
                    ..Default::default()
                },
                "quotas.cpus",
            ),
            (
                QuotaRequest {
                    memory_bytes: Some(0),
                    ..Default::default()
                },
                "quotas.memory_bytes",
            ),
            (
                QuotaRequest {
                    memory_bytes: Some(u64::MAX),
                    ..Default::default()
                },
                "quotas.memory_bytes",
            ),
            (
                QuotaRequest {
                    pids: Some(0),
                    ..Default::default()
                },
                "quotas.pids",
            ),
            (
                QuotaRequest {
                    max_containers: Some(0),
                    ..Default::default()
                },
                "quotas.max_containers",
            ),
        ] {
            assert_eq!(req.resolve(&base()).unwrap_err().field, field);
        }
    }
}
