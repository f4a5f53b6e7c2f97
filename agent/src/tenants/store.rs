//! The persisted registry: one versioned JSON file per tenant, written atomically.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::idrange::{self, IdPool, IdRange};
use super::model::{QuotaRequest, Quotas, Tenant, TenantFilter, TenantSpec, TenantState};
use crate::{
    blocking::{self, BlockingError},
    config::TenantsConfig,
    fsutil,
    validate::Invalid,
};

/// Version of the tenant file format this build writes and reads.
const FORMAT_MAJOR: u32 = 1;
/// The largest tenant file the agent reads back.
const MAX_TENANT_FILE: u64 = 64 << 10;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// No tenant with this id.
    #[error("tenant {id:?} does not exist")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The id is taken.
    #[error("tenant {id:?} already exists")]
    AlreadyExists {
        /// The id.
        id: String,
    },
    /// The node holds as many tenants as it may.
    #[error("this node already has {max} tenants, its limit (config tenants.max_tenants)")]
    TooMany {
        /// The limit.
        max: u32,
    },
    /// The request broke an input rule.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// A tenant file could not be written or removed.
    #[error("persisting tenant state at {path}: {source}")]
    Persist {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A tenant file could not be read back; the agent refuses to start rather than forget it.
    #[error("loading tenant state {path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No uid/gid range is free.
    #[error(transparent)]
    Exhausted(#[from] super::idrange::PoolExhausted),
    /// No tenant subnet is free.
    #[error("{0}")]
    Subnets(#[from] super::subnet::SubnetError),
    /// The filesystem did not answer in time.
    #[error(transparent)]
    Blocking(#[from] BlockingError),
}

#[derive(Serialize, Deserialize)]
struct TenantFile {
    version: u32,
    tenant: Tenant,
}

/// All tenants of this node.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    limits: TenantsConfig,
    tenants: Mutex<BTreeMap<String, Tenant>>,
    /// Where tenant subnets come from, when tenant networks are on.
    subnets: Option<super::subnet::SubnetPool>,
}

impl Registry {
    /// Opens (creating if needed) the registry under `state_dir/tenants` and loads every tenant.
    pub fn open(state_dir: &Path, limits: TenantsConfig) -> Result<Self, TenantError> {
        let dir = state_dir.join("tenants");
        fsutil::ensure_dir(&dir, 0o700).map_err(|source| TenantError::Persist {
            path: dir.clone(),
            source,
        })?;
        let mut tenants = BTreeMap::new();
        let entries = std::fs::read_dir(&dir).map_err(|source| TenantError::Persist {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| TenantError::Persist {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Leftover temp files from an interrupted write hold nothing that was acknowledged.
            if name.starts_with('.') {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let t = load_file(&path)?;
            tenants.insert(t.id.clone(), t);
        }
        Ok(Self {
            dir,
            limits,
            tenants: Mutex::new(tenants),
            subnets: None,
        })
    }

    /// Gives new tenants a subnet from `pool` (tenant networks on).
    pub fn with_subnets(mut self, pool: Option<super::subnet::SubnetPool>) -> Self {
        self.subnets = pool;
        self
    }

    /// Records a new tenant.
    pub async fn create(&self, spec: TenantSpec) -> Result<Tenant, TenantError> {
        spec.validate()?;
        let quotas = spec.quotas.resolve(&Quotas::defaults(&self.limits))?;
        let mut map = self.tenants.lock().await;
        if map.contains_key(&spec.id) {
            return Err(TenantError::AlreadyExists { id: spec.id });
        }
        if map.len() >= usize::try_from(self.limits.max_tenants).unwrap_or(usize::MAX) {
            return Err(TenantError::TooMany {
                max: self.limits.max_tenants,
            });
        }
        let taken: Vec<IdRange> = map.values().map(|t| t.id_range).collect();
        let reserved = idrange::host_reserved(&self.limits.subid_dir);
        let pool = IdPool {
            start: self.limits.id_pool_start,
            ranges: self.limits.id_pool_ranges,
        };
        let id_range = pool.allocate(&taken, &reserved)?;
        let subnet = match &self.subnets {
            Some(p) => {
                let taken: Vec<_> = map.values().filter_map(|t| t.subnet).collect();
                // The host's routes too; its own tenants' links are among them, and in
                // `taken` already.
                let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
                Some(p.allocate(&taken, &p.host_reserved(&routes))?)
            }
            None => None,
        };
        let tenant = Tenant {
            id: spec.id,
            isolation: spec.isolation,
            quotas,
            labels: spec.labels,
            state: TenantState::Pending,
            message: "provisioning the sandbox".into(),
            created_at_unix_ms: now_ms(),
            id_range,
            subnet,
        };
        self.persist(&tenant).await?;
        map.insert(tenant.id.clone(), tenant.clone());
        Ok(tenant)
    }

    /// One tenant.
    pub async fn get(&self, id: &str) -> Result<Tenant, TenantError> {
        self.tenants
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| TenantError::NotFound { id: id.into() })
    }

    /// The tenants that pass `filter`, ordered by id.
    pub async fn list(&self, filter: &TenantFilter) -> Vec<Tenant> {
        self.tenants
            .lock()
            .await
            .values()
            .filter(|t| filter.matches(t))
            .cloned()
            .collect()
    }

    /// Changes quotas; unset fields keep their current value.
    pub async fn update_quotas(&self, id: &str, req: QuotaRequest) -> Result<Tenant, TenantError> {
        let mut map = self.tenants.lock().await;
        let current = map
            .get(id)
            .ok_or_else(|| TenantError::NotFound { id: id.into() })?;
        let mut updated = current.clone();
        updated.quotas = req.resolve(&current.quotas)?;
        self.persist(&updated).await?;
        map.insert(updated.id.clone(), updated.clone());
        Ok(updated)
    }

    /// Sets a tenant's state and message.
    pub async fn set_state(
        &self,
        id: &str,
        state: TenantState,
        message: &str,
    ) -> Result<Tenant, TenantError> {
        let mut map = self.tenants.lock().await;
        let mut t = map
            .get(id)
            .cloned()
            .ok_or_else(|| TenantError::NotFound { id: id.into() })?;
        t.state = state;
        t.message = message.to_string();
        self.persist(&t).await?;
        map.insert(t.id.clone(), t.clone());
        Ok(t)
    }

    /// Forgets a tenant. The caller has already torn its sandbox down.
    pub async fn delete(&self, id: &str) -> Result<(), TenantError> {
        let mut map = self.tenants.lock().await;
        if !map.contains_key(id) {
            return Err(TenantError::NotFound { id: id.into() });
        }
        let path = self.file(id);
        blocking::run("removing a tenant file", blocking::DEFAULT_TIMEOUT, {
            let path = path.clone();
            move || match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await?
        .map_err(|source| TenantError::Persist { path, source })?;
        map.remove(id);
        Ok(())
    }

    /// Sum of CPU and memory quotas over all tenants.
    pub async fn allocated(&self) -> (usize, f64, u64) {
        let map = self.tenants.lock().await;
        let cpus = map.values().map(|t| t.quotas.cpus).sum();
        let mem = map
            .values()
            .fold(0u64, |a, t| a.saturating_add(t.quotas.memory_bytes));
        (map.len(), cpus, mem)
    }

    fn file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    async fn persist(&self, t: &Tenant) -> Result<(), TenantError> {
        let path = self.file(&t.id);
        let body = serde_json::to_vec_pretty(&TenantFile {
            version: FORMAT_MAJOR,
            tenant: t.clone(),
        })
        .map_err(|e| TenantError::Persist {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        blocking::run("writing a tenant file", blocking::DEFAULT_TIMEOUT, {
            let path = path.clone();
            move || fsutil::write_atomic(&path, &body, 0o600)
        })
        .await?
        .map_err(|source| TenantError::Persist { path, source })
    }
}

fn load_file(path: &Path) -> Result<Tenant, TenantError> {
    let load_err = |reason: String| TenantError::Load {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fsutil::read_capped(path, MAX_TENANT_FILE).map_err(|e| load_err(e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| load_err(format!("not JSON: {e}")))?;
    let version = v.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(FORMAT_MAJOR)) {
        return Err(load_err(format!(
            "format version {version:?} is not {FORMAT_MAJOR}, the one this agent reads; \
             run the agent version that wrote it, or migrate the file"
        )));
    }
    let f: TenantFile = serde_json::from_value(v).map_err(|e| load_err(e.to_string()))?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    if stem.as_deref() != Some(f.tenant.id.as_str()) {
        return Err(load_err(format!(
            "holds tenant {:?}, which does not match its file name",
            f.tenant.id
        )));
    }
    Ok(f.tenant)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::Isolation;

    fn spec(id: &str) -> TenantSpec {
        TenantSpec {
            id: id.into(),
            isolation: Isolation::Userns,
            quotas: QuotaRequest::default(),
            labels: BTreeMap::from([("team".to_string(), id.to_string())]),
        }
    }

    #[tokio::test]
    async fn create_survives_reopen_and_delete_forgets() {
        let d = tempfile::tempdir().unwrap();
        let limits = TenantsConfig {
            subid_dir: d.path().to_path_buf(),
            ..Default::default()
        };
        let r = Registry::open(d.path(), limits.clone()).unwrap();
        let a = r.create(spec("a")).await.unwrap();
        let b = r.create(spec("b")).await.unwrap();
        assert!(!a.id_range.overlaps(&b.id_range), "ranges are disjoint");
        assert!(matches!(
            r.create(spec("a")).await,
            Err(TenantError::AlreadyExists { .. })
        ));
        r.update_quotas(
            "b",
            QuotaRequest {
                cpus: Some(2.5),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        drop(r);
        let r = Registry::open(d.path(), limits.clone()).unwrap();
        assert_eq!(r.list(&TenantFilter::default()).await.len(), 2);
        assert_eq!(r.get("b").await.unwrap().quotas.cpus, 2.5);
        r.delete("a").await.unwrap();
        assert!(matches!(
            r.get("a").await,
            Err(TenantError::NotFound { .. })
        ));
        drop(r);
        let r = Registry::open(d.path(), limits).unwrap();
        let ids: Vec<_> = r
            .list(&TenantFilter::default())
            .await
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, ["b"]);
    }

    #[tokio::test]
    async fn limits_and_bad_files() {
        let d = tempfile::tempdir().unwrap();
        let limits = TenantsConfig {
            max_tenants: 1,
            subid_dir: d.path().to_path_buf(),
            ..Default::default()
        };
        let r = Registry::open(d.path(), limits.clone()).unwrap();
        r.create(spec("a")).await.unwrap();
        assert!(matches!(
            r.create(spec("b")).await,
            Err(TenantError::TooMany { max: 1 })
        ));
        std::fs::write(d.path().join("tenants/z.json"), br#"{"version":9}"#).unwrap();
        let e = Registry::open(d.path(), limits).unwrap_err().to_string();
        assert!(e.contains("z.json") && e.contains("version"), "{e}");
    }
}
