//! Who may do what. Every RPC names an [`Action`] and, where it touches one tenant, that tenant;
//! [`authorize`] is the only place that decides. Roles come from the client certificate's subject
//! CN (mTLS over TCP) or are `admin` for root on the unix socket.

use std::{
    fmt,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A caller's role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Manages tenants and containers; reads usage.
    Scheduler,
    /// Reads usage and acknowledges billing records; nothing else.
    Billing,
    /// Reads everything, changes nothing.
    Observer,
    /// Only the named tenant's own containers, images and usage.
    Tenant(String),
}

impl Role {
    /// Parses `admin`, `scheduler`, `billing`, `observer` or `tenant:<id>`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "scheduler" => Some(Self::Scheduler),
            "billing" => Some(Self::Billing),
            "observer" => Some(Self::Observer),
            _ => {
                let id = s.strip_prefix("tenant:")?;
                crate::validate::check_id("tenant", id).ok()?;
                Some(Self::Tenant(id.to_string()))
            }
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Admin => f.write_str("admin"),
            Self::Scheduler => f.write_str("scheduler"),
            Self::Billing => f.write_str("billing"),
            Self::Observer => f.write_str("observer"),
            Self::Tenant(t) => write!(f, "tenant:{t}"),
        }
    }
}

/// An authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// What it may do.
    pub role: Role,
    /// Where the role came from, for logs: `unix:uid=0` or `cert:CN=...`.
    pub identity: String,
}

/// What a request does. Reads and writes are split so `observer` and `billing` can be read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create, update or delete tenants.
    TenantWrite,
    /// Get or list tenants.
    TenantRead,
    /// Create, start, stop, kill, delete, exec containers.
    ContainerWrite,
    /// List, inspect, wait, logs, events.
    ContainerRead,
    /// Pull, import, remove images.
    ImageWrite,
    /// List and inspect images.
    ImageRead,
    /// Read usage and billing records.
    UsageRead,
    /// Acknowledge billing records (lets the ledger prune them).
    UsageAck,
    /// Node info and health.
    NodeRead,
}

impl Action {
    fn is_read(self) -> bool {
        matches!(
            self,
            Self::TenantRead
                | Self::ContainerRead
                | Self::ImageRead
                | Self::UsageRead
                | Self::NodeRead
        )
    }
}

/// The tenant a request touches.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Node-wide (tenant lists without a filter are narrowed by [`visible_tenant`]).
    Node,
    /// One tenant, named as the client sent it.
    Tenant(&'a str),
}

/// A refusal. Its message names the role and the action, never other tenants' data.
#[derive(Debug, Clone, thiserror::Error)]
#[error("role {role} may not {action:?}{}", match tenant { Some(t) => format!(" on tenant {t:?}"), None => String::new() })]
pub struct Denied {
    /// The caller's role.
    pub role: String,
    /// What it tried.
    pub action: Action,
    /// The tenant it tried it on.
    pub tenant: Option<String>,
}

/// Decides whether `caller` may do `action` in `scope`; logs every denial (rate-limited).
pub fn authorize(caller: &Caller, action: Action, scope: Scope<'_>) -> Result<(), Denied> {
    let allowed = match (&caller.role, action) {
        (Role::Admin, _) => true,
        (_, Action::NodeRead) => true,
        (Role::Scheduler, Action::UsageAck) => false,
        (Role::Scheduler, _) => true,
        (Role::Billing, Action::UsageRead | Action::UsageAck) => true,
        (Role::Billing, _) => false,
        (Role::Observer, a) => a.is_read(),
        (Role::Tenant(own), a) => {
            let own_scope = match scope {
                Scope::Tenant(t) => t == own,
                // Node-wide reads are narrowed to the tenant's own by the handler.
                Scope::Node => a.is_read(),
            };
            own_scope && !matches!(a, Action::TenantWrite | Action::UsageAck)
        }
    };
    if allowed {
        return Ok(());
    }
    let tenant = match scope {
        Scope::Tenant(t) => Some(t.chars().take(80).collect::<String>()),
        Scope::Node => None,
    };
    if DENIAL_LOG.allow() {
        tracing::warn!(
            caller = %caller.identity,
            role = %caller.role,
            ?action,
            tenant = tenant.as_deref().unwrap_or(""),
            "permission denied"
        );
    }
    Err(Denied {
        role: caller.role.to_string(),
        action,
        tenant,
    })
}

/// For node-wide lists: the only tenant a caller may see, if it is tenant-scoped.
pub fn visible_tenant(caller: &Caller) -> Option<&str> {
    match &caller.role {
        Role::Tenant(t) => Some(t),
        _ => None,
    }
}

/// Denials are caused by clients, so their log lines are rate-limited: a burst, then one per
/// interval, with a count of what was dropped.
struct RateLimit {
    state: Mutex<(Instant, u32, u64)>,
    burst: u32,
    interval: Duration,
}

impl RateLimit {
    fn allow(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return true;
        };
        let now = Instant::now();
        if now.duration_since(s.0) >= self.interval {
            if s.2 > 0 {
                tracing::warn!(
                    suppressed = s.2,
                    "permission-denied log lines were suppressed"
                );
            }
            *s = (now, 0, 0);
        }
        if s.1 < self.burst {
            s.1 += 1;
            true
        } else {
            s.2 += 1;
            false
        }
    }
}

static DENIAL_LOG: std::sync::LazyLock<RateLimit> = std::sync::LazyLock::new(|| RateLimit {
    state: Mutex::new((Instant::now(), 0, 0)),
    burst: 20,
    interval: Duration::from_secs(10),
});

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(r: &str) -> Caller {
        Caller {
            role: Role::parse(r).unwrap(),
            identity: r.into(),
        }
    }

    #[test]
    fn roles_parse() {
        assert_eq!(Role::parse("tenant:a"), Some(Role::Tenant("a".into())));
        assert_eq!(Role::parse("tenant:"), None);
        assert_eq!(Role::parse("tenant:../x"), None);
        assert_eq!(Role::parse("root"), None);
        assert_eq!(Role::Tenant("a".into()).to_string(), "tenant:a");
    }

    #[test]
    fn matrix() {
        use Action::*;
        let t = Scope::Tenant("a");
        let ok = |r: &str, a, s| authorize(&caller(r), a, s).is_ok();
        assert!(ok("admin", TenantWrite, t));
        assert!(ok("scheduler", TenantWrite, t));
        assert!(!ok("scheduler", UsageAck, Scope::Node));
        assert!(!ok("billing", TenantWrite, t));
        assert!(!ok("billing", ContainerRead, t));
        assert!(ok("billing", UsageRead, t));
        assert!(ok("billing", UsageAck, Scope::Node));
        assert!(ok("observer", ContainerRead, t));
        assert!(!ok("observer", ContainerWrite, t));
        assert!(!ok("observer", TenantWrite, t));
        assert!(ok("tenant:a", ContainerWrite, t));
        assert!(ok("tenant:a", TenantRead, t));
        assert!(!ok("tenant:a", TenantWrite, t));
        assert!(!ok("tenant:a", TenantRead, Scope::Tenant("b")));
        assert!(!ok("tenant:a", ContainerWrite, Scope::Tenant("b")));
        assert!(!ok("tenant:a", UsageAck, Scope::Node));
        assert!(ok("tenant:a", TenantRead, Scope::Node));
        assert!(!ok("tenant:a", ContainerWrite, Scope::Node));
        assert!(ok("tenant:a", NodeRead, Scope::Node));
        assert_eq!(visible_tenant(&caller("tenant:a")), Some("a"));
        assert_eq!(visible_tenant(&caller("observer")), None);
    }
}
