//! Development certificates: a CA, a server certificate and one client certificate per role.
//!
//! Production deployments bring their own PKI; this exists so tests and a first run on a laptop
//! use real mutual TLS. A client certificate's subject CN is its role (`admin`, `tenant:a`, ...).

use std::{io, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters.
    #[error("generating {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// The cause.
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8).
    pub key: String,
}

/// A certificate authority that can sign server and client certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> CertError + '_ {
    move |source| CertError::Generate {
        what: what.to_string(),
        source,
    }
}

impl Ca {
    /// A new self-signed CA named `name`, valid ten years from an hour ago.
    pub fn new(name: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate().map_err(gen_err(name))?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(gen_err(name))?;
        Ok(Self { issuer })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for these DNS names and IP addresses, valid a year.
    pub fn server(&self, names: &[String]) -> Result<Pem, CertError> {
        let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err("server"))?;
        params.distinguished_name = dn("caas-agent");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        self.sign(params, "server")
    }

    /// A client certificate whose CN is `role`, valid from `not_before` to `not_after`.
    pub fn client_valid(
        &self,
        role: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Pem, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(role);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        self.sign(params, role)
    }

    /// A client certificate whose CN is `role`, valid a year.
    pub fn client(&self, role: &str) -> Result<Pem, CertError> {
        let now = OffsetDateTime::now_utc();
        self.client_valid(role, now - Duration::hours(1), now + Duration::days(365))
    }

    fn sign(&self, params: CertificateParams, what: &str) -> Result<Pem, CertError> {
        let key = KeyPair::generate().map_err(gen_err(what))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err(what))?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d.push(DnType::OrganizationName, "caas-agent dev");
    d
}

/// The file name a role's certificate is written under (`tenant:a` becomes `tenant-a`).
pub fn role_file_stem(role: &str) -> String {
    role.replace(':', "-")
}

/// Writes `ca.pem`, `server.pem`/`server-key.pem` and `<role>.pem`/`<role>-key.pem` for the
/// built-in roles and each tenant into `out`. Keys are mode 0600. Returns the files written.
pub fn write_dev_bundle(
    out: &Path,
    server_names: &[String],
    tenants: &[String],
) -> Result<Vec<String>, CertError> {
    let ca = Ca::new("caas-agent dev CA")?;
    let mut written = Vec::new();
    let mut put = |name: &str, data: &str, mode: u32| -> Result<(), CertError> {
        let path = out.join(name);
        crate::fsutil::write_atomic(&path, data.as_bytes(), mode).map_err(|source| {
            CertError::Write {
                path: path.display().to_string(),
                source,
            }
        })?;
        written.push(path.display().to_string());
        Ok(())
    };
    crate::fsutil::ensure_dir(out, 0o755).map_err(|source| CertError::Write {
        path: out.display().to_string(),
        source,
    })?;
    put("ca.pem", &ca.cert_pem(), 0o644)?;
    let server = ca.server(server_names)?;
    put("server.pem", &server.cert, 0o644)?;
    put("server-key.pem", &server.key, 0o600)?;
    let mut roles: Vec<String> = ["admin", "scheduler", "billing", "observer"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    roles.extend(tenants.iter().map(|t| format!("tenant:{t}")));
    for role in roles {
        let pem = ca.client(&role)?;
        let stem = role_file_stem(&role);
        put(&format!("{stem}.pem"), &pem.cert, 0o644)?;
        put(&format!("{stem}-key.pem"), &pem.key, 0o600)?;
    }
    Ok(written)
}
