//! Proto <-> domain conversion. Everything a client sends is checked here, so the domain only
//! ever sees well-formed values.

use caas_proto::v1 as pb;
use tonic::Status;

use super::status;
use crate::{
    tenants::{Isolation, QuotaRequest, Quotas, Tenant, TenantFilter, TenantSpec, TenantState},
    validate::{self, Invalid},
};

pub fn isolation_in(v: i32) -> Result<Isolation, Invalid> {
    match pb::Isolation::try_from(v) {
        Ok(pb::Isolation::Unspecified | pb::Isolation::Userns) => Ok(Isolation::Userns),
        Ok(pb::Isolation::Vm) => Ok(Isolation::Vm),
        Err(_) => Err(Invalid::new(
            "isolation",
            format!("{v} is not a known isolation"),
        )),
    }
}

fn isolation_filter(v: i32) -> Result<Option<Isolation>, Invalid> {
    match pb::Isolation::try_from(v) {
        Ok(pb::Isolation::Unspecified) => Ok(None),
        Ok(pb::Isolation::Userns) => Ok(Some(Isolation::Userns)),
        Ok(pb::Isolation::Vm) => Ok(Some(Isolation::Vm)),
        Err(_) => Err(Invalid::new(
            "isolation",
            format!("{v} is not a known isolation"),
        )),
    }
}

fn state_filter(v: i32) -> Result<Option<TenantState>, Invalid> {
    Ok(match pb::TenantState::try_from(v) {
        Ok(pb::TenantState::Unspecified) => None,
        Ok(pb::TenantState::Pending) => Some(TenantState::Pending),
        Ok(pb::TenantState::Ready) => Some(TenantState::Ready),
        Ok(pb::TenantState::Failed) => Some(TenantState::Failed),
        Ok(pb::TenantState::Deleting) => Some(TenantState::Deleting),
        Err(_) => {
            return Err(Invalid::new(
                "state",
                format!("{v} is not a known tenant state"),
            ));
        }
    })
}

pub fn quotas_in(q: Option<pb::Quotas>) -> QuotaRequest {
    let q = q.unwrap_or_default();
    QuotaRequest {
        cpus: q.cpus,
        memory_bytes: q.memory_bytes,
        pids: q.pids,
        max_containers: q.max_containers,
    }
}

pub fn tenant_spec(r: pb::CreateTenantRequest) -> Result<TenantSpec, Status> {
    let spec = TenantSpec {
        isolation: isolation_in(r.isolation).map_err(status::invalid)?,
        quotas: quotas_in(r.quotas),
        labels: r.labels,
        id: r.id,
    };
    spec.validate().map_err(status::invalid)?;
    Ok(spec)
}

pub fn tenant_filter(
    r: pb::ListTenantsRequest,
    only: Option<&str>,
) -> Result<TenantFilter, Status> {
    validate::check_labels("label_selector", &r.label_selector).map_err(status::invalid)?;
    Ok(TenantFilter {
        labels: r.label_selector,
        state: state_filter(r.state).map_err(status::invalid)?,
        isolation: isolation_filter(r.isolation).map_err(status::invalid)?,
        only: only.map(str::to_string),
    })
}

/// Checks an id field and hands it back.
pub fn id(field: &str, v: String) -> Result<String, Status> {
    validate::check_id(field, &v).map_err(status::invalid)?;
    Ok(v)
}

/// Checks the id of an optional tenant filter (empty = none).
pub fn tenant_filter_id(v: String) -> Result<Option<String>, Status> {
    if v.is_empty() {
        Ok(None)
    } else {
        id("tenant", v).map(Some)
    }
}

/// Checks a container reference and returns (tenant, container).
pub fn container_ref(r: Option<pb::ContainerRef>) -> Result<(String, String), Status> {
    let r = r.ok_or_else(|| status::invalid(Invalid::new("ref", "is required")))?;
    Ok((
        id("ref.tenant", r.tenant)?,
        id("ref.container", r.container)?,
    ))
}

fn quotas_out(q: Quotas) -> pb::Quotas {
    pb::Quotas {
        cpus: Some(q.cpus),
        memory_bytes: Some(q.memory_bytes),
        pids: Some(q.pids),
        max_containers: Some(q.max_containers),
    }
}

pub fn tenant_out(t: Tenant) -> pb::Tenant {
    pb::Tenant {
        id: t.id,
        isolation: match t.isolation {
            Isolation::Userns => pb::Isolation::Userns,
            Isolation::Vm => pb::Isolation::Vm,
        } as i32,
        quotas: Some(quotas_out(t.quotas)),
        labels: t.labels,
        state: match t.state {
            TenantState::Pending => pb::TenantState::Pending,
            TenantState::Ready => pb::TenantState::Ready,
            TenantState::Failed => pb::TenantState::Failed,
            TenantState::Deleting => pb::TenantState::Deleting,
        } as i32,
        message: t.message,
        id_range: None,
        created_at_unix_ms: t.created_at_unix_ms,
        containers: 0,
    }
}
