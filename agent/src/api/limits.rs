//! Request size cap: tonic refuses a request over `api.max_message_bytes` before any handler sees
//! it, but with `OUT_OF_RANGE` and a message about "decoded message length". Clients are told
//! `INVALID_ARGUMENT` with the size and the setting that caps it, so this layer rewrites exactly
//! that status and nothing else.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::codegen::http::{self, HeaderValue};
use tower::{Layer, Service};

/// Rewrites tonic's over-size status on every response.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimitLayer {
    limit: usize,
}

impl MessageLimitLayer {
    /// For a server whose services decode at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MessageLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// See [`MessageLimitLayer`].
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    limit: usize,
}

impl<S, B, RB> Service<http::Request<B>> for MessageLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let limit = self.limit;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            rewrite(resp.headers_mut(), limit);
            Ok(resp)
        })
    }
}

/// Turns tonic's "decoded message length too large" into `INVALID_ARGUMENT`.
pub fn rewrite(h: &mut http::HeaderMap, limit: usize) {
    if h.get("grpc-status").map(HeaderValue::as_bytes) != Some(b"11".as_slice()) {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(h) else {
        return;
    };
    let msg = status.message();
    if !msg.contains("decoded message length too large") {
        return;
    }
    let found = msg
        .split("found ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap_or("?");
    let replacement = tonic::Status::invalid_argument(format!(
        "request message: {found} bytes is over the limit of {limit} bytes (config api.max_message_bytes)"
    ));
    if replacement.add_header(h).is_err() {
        tracing::warn!("could not rewrite an over-size status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_size_error() {
        let mut h = http::HeaderMap::new();
        tonic::Status::out_of_range(
            "Error, decoded message length too large: found 9000 bytes, the limit is: 1024 bytes",
        )
        .add_header(&mut h)
        .unwrap();
        rewrite(&mut h, 1024);
        let s = tonic::Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().contains("9000 bytes") && s.message().contains("api.max_message_bytes"),
            "{s:?}"
        );

        let mut other = http::HeaderMap::new();
        tonic::Status::out_of_range("index out of range")
            .add_header(&mut other)
            .unwrap();
        rewrite(&mut other, 1024);
        assert_eq!(other["grpc-status"], "11");
    }
}
