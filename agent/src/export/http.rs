//! The exporter's HTTP/1.1 client: one keep-alive connection to one endpoint, POSTs with a deadline.
//!
//! Deliberately small: plain `http://` only, no redirects, no proxies. A connection is dropped
//! after any error or timeout, so a retry always starts on a fresh one.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;

use super::ExportError;
use super::event::BATCH_CONTENT_TYPE;

/// Most of an error response's body that is read (and kept, shortened, as the error text).
const MAX_RESPONSE_BYTES: usize = 64 << 10;
/// Most characters of an error response's body kept in the error.
const MAX_ERROR_TEXT: usize = 200;

/// A parsed `export.endpoint`.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    /// `host:port` as written, for the `Host` header.
    authority: String,
    /// Host name or address, without the brackets of an IPv6 literal.
    host: String,
    port: u16,
    /// The origin-form request target (`/path?query`).
    target: String,
}

impl Endpoint {
    /// Parses an `http://` URL; the error says what is wrong, for `export.endpoint: ...`.
    pub(super) fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{url:?}: https is not supported yet; use an http:// endpoint on a trusted \
                     network or a local TLS-terminating proxy"
                ));
            }
            _ => return Err(format!("{url:?} must start with http://")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{url:?}: credentials in the URL are not supported (they would end up in logs)"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        Ok(Endpoint {
            authority: authority.as_str().to_owned(),
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            target: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.target)
    }
}

/// POSTs batches to one endpoint over a reused connection.
pub(super) struct Client {
    endpoint: Endpoint,
    timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub(super) fn new(endpoint: Endpoint, timeout: Duration) -> Self {
        Client {
            endpoint,
            timeout,
            conn: None,
        }
    }

    /// POSTs `body`; `Ok` only on a 2xx answer within the timeout (connect included).
    pub(super) async fn post(&mut self, body: Bytes) -> Result<(), ExportError> {
        match tokio::time::timeout(self.timeout, self.exchange(body)).await {
            Ok(result) => result,
            Err(_) => Err(ExportError::Timeout {
                endpoint: self.endpoint.to_string(),
                timeout: self.timeout,
            }),
        }
    }

    /// One request and its answer. The connection goes back into `self.conn` only when the
    /// exchange completed cleanly, so a retry after any error or a timeout reconnects.
    async fn exchange(&mut self, body: Bytes) -> Result<(), ExportError> {
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        let http_err = |source| ExportError::Http {
            endpoint: self.endpoint.to_string(),
            source,
        };
        sender.ready().await.map_err(http_err)?;
        let request = Request::post(self.endpoint.target.as_str())
            .header(HOST, self.endpoint.authority.as_str())
            .header(CONTENT_TYPE, BATCH_CONTENT_TYPE)
            .header(
                USER_AGENT,
                concat!("caas-agent/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(ExportError::Request)?;
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status();
        // Reading the body to its end is what lets the connection be reused.
        let text = match Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
        {
            Ok(collected) => {
                self.conn = Some(sender);
                collected.to_bytes()
            }
            Err(_) => Bytes::new(),
        };
        if status.is_success() {
            return Ok(());
        }
        Err(ExportError::Status {
            endpoint: self.endpoint.to_string(),
            status: status.as_u16(),
            body: error_text(&text),
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ExportError> {
        let connect_err = |source| ExportError::Connect {
            endpoint: self.endpoint.to_string(),
            source,
        };
        let stream =
            tokio::net::TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
                .await
                .map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ExportError::Http {
                endpoint: self.endpoint.to_string(),
                source,
            })?;
        // Ends when `sender` is dropped or the peer closes; its errors reach `sender`'s caller.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "export connection ended");
            }
        });
        Ok(sender)
    }
}

/// The start of an error response's body, on one line: it comes from outside and goes to logs.
fn error_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .take(MAX_ERROR_TEXT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}
