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
    /// A VM's engine: the VMM's unix socket for the guest's virtio-serial port, where every
    /// connection starts with the relay handshake ([`crate::vm::handshake`]).
    Relayed(PathBuf),
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

/// Ping interval on unix-socket connections, and how long a ping may go unanswered.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// Connects and returns a channel for any of the generated clients.
pub async fn connect(target: &Target) -> Result<Channel, ConnectError> {
    match target {
        Target::Unix(path) | Target::Relayed(path) => {
            let relayed = matches!(target, Target::Relayed(_));
            let path = path.clone();
            let shown = path.display().to_string();
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                // A peer that stops answering (a VM's engine relay that lost its engine, a hung
                // process) is noticed by unanswered pings, and the next call dials again.
                .http2_keep_alive_interval(KEEPALIVE)
                .keep_alive_timeout(KEEPALIVE)
                .keep_alive_while_idle(true)
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let mut s = tokio::net::UnixStream::connect(path).await?;
                        if relayed {
                            tokio::time::timeout(
                                CONNECT_TIMEOUT,
                                crate::vm::handshake::client(&mut s),
                            )
                            .await
                            .map_err(|_| {
                                std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    "the guest relay did not answer the handshake",
                                )
                            })??;
                        }
                        Ok::<_, std::io::Error>(TokioIo::new(s))
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
