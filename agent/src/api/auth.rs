//! Authentication: turns a connection into a [`Caller`] before any handler runs.
//!
//! - TCP: tonic's rustls already refused connections without a certificate signed by the
//!   configured CA (or an expired one). The role is the leaf certificate's subject CN.
//! - Unix socket: the socket is root-only (0600); the peer's uid is checked again here.

use rand::Rng;
use tonic::{Request, Status, transport::server::UdsConnectInfo};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authz::{Caller, Role};

/// How callers reach this listener.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The unix socket: root, and these extra uids, are `admin`.
    Unix {
        /// Non-root uids let in.
        allowed_uids: Vec<u32>,
    },
    /// TCP with mutual TLS: the certificate names the role.
    MutualTls,
}

/// Identifies a request for logs and error messages.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The interceptor: attaches [`Caller`] and [`RequestId`] to every request, or refuses it.
pub fn authenticator(
    transport: Transport,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut req: Request<()>| {
        let caller = match &transport {
            Transport::Unix { allowed_uids } => unix_caller(&req, allowed_uids)?,
            Transport::MutualTls => tls_caller(&req)?,
        };
        let id = format!("{:016x}", rand::rng().random::<u64>());
        req.extensions_mut().insert(caller);
        req.extensions_mut().insert(RequestId(id));
        Ok(req)
    }
}

fn unix_caller(req: &Request<()>, allowed: &[u32]) -> Result<Caller, Status> {
    let uid = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid());
    match uid {
        Some(uid) if uid == 0 || allowed.contains(&uid) => Ok(Caller {
            role: Role::Admin,
            identity: format!("unix:uid={uid}"),
        }),
        Some(uid) => {
            tracing::warn!(
                uid,
                "unix-socket caller refused: not root nor in api.unix_allowed_uids"
            );
            Err(Status::permission_denied(format!(
                "uid {uid} may not use the agent socket; run as root or add it to api.unix_allowed_uids"
            )))
        }
        None => Err(Status::unauthenticated(
            "the agent could not read the peer credentials of this unix-socket connection",
        )),
    }
}

fn tls_caller(req: &Request<()>) -> Result<Caller, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|_| Status::unauthenticated("the client certificate could not be parsed"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| Status::permission_denied("the client certificate has no subject CN"))?;
    let role = Role::parse(cn).ok_or_else(|| {
        tracing::warn!(cn, "client certificate names no known role");
        Status::permission_denied(format!(
            "certificate CN {:?} names no role; use admin, scheduler, billing, observer or tenant:<id>",
            cn.chars().take(80).collect::<String>()
        ))
    })?;
    Ok(Caller {
        role,
        identity: format!("cert:CN={cn}"),
    })
}

/// The authenticated caller and request id of a request.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Who is calling.
    pub caller: Caller,
    /// For logs and internal-error messages.
    pub request_id: String,
}

impl Ctx {
    /// Reads what the interceptor attached.
    pub fn of<T>(req: &Request<T>) -> Result<Self, Status> {
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::internal("request was not authenticated"))?;
        let request_id = req
            .extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        Ok(Self { caller, request_id })
    }
}
