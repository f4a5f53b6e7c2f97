//! The one place where errors become `tonic::Status`, with an explicit code per variant.
//!
//! Internal errors reach the client as a generic message with the request id; the whole chain
//! goes to the log under that id.

use tonic::Status;

use super::auth::Ctx;
use crate::{authz::Denied, sandbox::SandboxError, tenants::TenantError, validate::Invalid};

/// Bad input: `INVALID_ARGUMENT`, naming the field.
pub fn invalid(e: Invalid) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A refused caller: `PERMISSION_DENIED`.
pub fn denied(e: Denied) -> Status {
    Status::permission_denied(e.to_string())
}

/// A registry error.
pub fn tenant(e: TenantError, ctx: &Ctx) -> Status {
    match e {
        TenantError::NotFound { .. } => Status::not_found(e.to_string()),
        TenantError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        TenantError::TooMany { .. } | TenantError::Exhausted(_) | TenantError::Subnets(_) => {
            Status::resource_exhausted(e.to_string())
        }
        TenantError::Invalid(i) => invalid(i),
        TenantError::Persist { .. } | TenantError::Load { .. } | TenantError::Blocking(_) => {
            internal(&e, ctx)
        }
    }
}

/// A sandbox (tenant engine) error. Engine statuses pass through: they are about the caller's
/// own tenant and already carry the right code.
pub fn sandbox(e: SandboxError, ctx: &Ctx) -> Status {
    match e {
        SandboxError::Tenant(t) => tenant(t, ctx),
        SandboxError::HasContainers { .. } => Status::failed_precondition(e.to_string()),
        SandboxError::VmUnavailable => Status::failed_precondition(e.to_string()),
        SandboxError::VmTooBig { .. } => Status::invalid_argument(e.to_string()),
        SandboxError::VmHost(_) => Status::failed_precondition(e.to_string()),
        SandboxError::Status(s) => match s.code() {
            tonic::Code::Internal | tonic::Code::Unknown => {
                tracing::error!(request_id = %ctx.request_id, error = %s.message(), "engine error");
                Status::internal(format!("{} (request id {})", s.message(), ctx.request_id))
            }
            _ => s,
        },
        SandboxError::NoNetwork { .. } => Status::failed_precondition(e.to_string()),
        SandboxError::Publish(p) => publish(p, ctx),
        SandboxError::Engine { .. } => Status::unavailable(e.to_string()),
        SandboxError::Cgroup(_) => internal(&e, ctx),
    }
}

/// A port that cannot be published. The owner of a taken port is named to callers who may see
/// its tenant; a tenant is not told another tenant's names.
fn publish(e: crate::net::PublishError, ctx: &Ctx) -> Status {
    use crate::net::{PublishError, ports::PortError};
    match e {
        PublishError::Port(PortError::Taken {
            port,
            proto,
            tenant,
            name,
        }) => {
            let visible = crate::authz::visible_tenant(&ctx.caller).is_none_or(|t| t == tenant);
            if visible {
                Status::already_exists(
                    PortError::Taken {
                        port,
                        proto,
                        tenant,
                        name,
                    }
                    .to_string(),
                )
            } else {
                Status::already_exists(format!(
                    "host port {port}/{proto} is published by another tenant's container; pick another host port"
                ))
            }
        }
        PublishError::Port(p @ PortError::OutOfRange { .. }) => {
            Status::invalid_argument(p.to_string())
        }
        PublishError::Port(p @ PortError::TooMany { .. }) => {
            Status::resource_exhausted(p.to_string())
        }
        PublishError::Port(p @ (PortError::Reserved { .. } | PortError::InUse { .. })) => {
            Status::failed_precondition(p.to_string())
        }
        PublishError::Port(p @ PortError::Save { .. }) => internal(&p, ctx),
        PublishError::Nft(n) => internal(&n, ctx),
    }
}

/// A part of the API whose domain is not built in this version.
pub fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not available in caas-agent {} yet",
        crate::VERSION
    ))
}

/// Logs the full error and returns a generic `INTERNAL` with the request id.
pub fn internal(e: &dyn std::error::Error, ctx: &Ctx) -> Status {
    let mut chain = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        src = s.source();
    }
    tracing::error!(request_id = %ctx.request_id, caller = %ctx.caller.identity, error = %chain, "internal error");
    Status::internal(format!(
        "internal error (request id {}); the agent log has the details",
        ctx.request_id
    ))
}

/// A usage ledger error.
pub fn ledger(e: crate::ledger::LedgerError, ctx: &Ctx) -> Status {
    use crate::ledger::LedgerError;
    match e {
        LedgerError::AckBeyondEnd { .. } => Status::invalid_argument(format!("cursor: {e}")),
        _ => internal(&e, ctx),
    }
}

/// An image error.
pub fn image(e: crate::images::ImageError, ctx: &Ctx) -> Status {
    use crate::images::ImageError as E;
    match e {
        E::BadReference { .. } | E::Refused { .. } => Status::invalid_argument(e.to_string()),
        E::NotInStore { .. } | E::NotFound(_) => Status::not_found(e.to_string()),
        E::Denied(_) => Status::permission_denied(e.to_string()),
        E::Corrupt(_) => Status::data_loss(e.to_string()),
        E::Unavailable(_) => Status::unavailable(e.to_string()),
        E::Unsupported(_) | E::InUse { .. } => Status::failed_precondition(e.to_string()),
        E::TooLarge(_) => Status::resource_exhausted(e.to_string()),
        E::Registry(_) => Status::unknown(e.to_string()),
        E::Io { .. } => internal(&e, ctx),
    }
}
