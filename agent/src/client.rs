//! Connecting to an agent: over its unix socket, or over TCP with a client certificate. Used by
//! `caasctl` and the end-to-end tests.

use std::{path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where and how to reach an agent.
#[derive(Debug, Clone)]
pub enum Target {
    /// The agent's unix socket.
    Unix(PathBuf),
    /// `https://host:port` with mutual TLS.
    Tls {
        /// The URL.
        endpoint: String,
        /// CA PEM that signed the server certificate.
        ca_pem: Vec<u8>,
        /// Client certificate PEM.
        cert_pem: Vec<u8>,
        /// Client key PEM.
        key_pem: Vec<u8>,
        /// Server name to verify (default: the endpoint's host).
        domain: Option<String>,
    },
}

/// Why the agent could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint or TLS settings are malformed.
    #[error("endpoint {endpoint}: {source}")]
    Endpoint {
        /// What was given.
        endpoint: String,
        /// The cause.
        source: tonic::transport::Error,
    },
    /// Nothing answered.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// Socket path or URL.
        target: String,
        /// The cause.
        source: tonic::transport::Error,
    },
}

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects and returns a channel for any of the generated clients.
pub async fn connect(target: &Target) -> Result<Channel, ConnectError> {
    match target {
        Target::Unix(path) => {
            let path = path.clone();
            let shown = path.display().to_string();
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(|source| ConnectError::Connect {
                    target: shown,
                    source,
                })
        }
        Target::Tls {
            endpoint,
            ca_pem,
            cert_pem,
            key_pem,
            domain,
        } => {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .identity(Identity::from_pem(cert_pem, key_pem));
            if let Some(d) = domain {
                tls = tls.domain_name(d.clone());
            }
            let ep = Endpoint::from_shared(endpoint.clone())
                .and_then(|e| e.tls_config(tls))
                .map_err(|source| ConnectError::Endpoint {
                    endpoint: endpoint.clone(),
                    source,
                })?
                .connect_timeout(CONNECT_TIMEOUT);
            ep.connect().await.map_err(|source| ConnectError::Connect {
                target: endpoint.clone(),
                source,
            })
        }
    }
}
