//! Image errors. Each variant says what went wrong with which thing; `api::status::image` gives
//! each its gRPC code.

use std::{io, path::PathBuf};

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse.
    #[error("reference {reference:?}: {reason}")]
    BadReference {
        /// As given.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The tenant has no image by that reference.
    #[error("tenant {tenant} has no image {reference:?}; pull or import it first")]
    NotInStore {
        /// The tenant.
        tenant: String,
        /// As asked for.
        reference: String,
    },
    /// The registry has no such manifest or blob.
    #[error("{0}")]
    NotFound(String),
    /// The registry refused the credentials (or wants some).
    #[error("{0}")]
    Denied(String),
    /// Bytes do not match their digest (or are longer than their descriptor says).
    #[error("{0}")]
    Corrupt(String),
    /// The registry could not be reached, or dropped the connection.
    #[error("{0}")]
    Unavailable(String),
    /// The image is malformed or uses something this agent does not support.
    #[error("{0}")]
    Unsupported(String),
    /// A layer entry was refused (it would land outside the rootfs, or is malformed).
    #[error("layer {layer}: {message}")]
    Refused {
        /// The layer digest.
        layer: String,
        /// The unpacker's message, naming the entry.
        message: String,
    },
    /// More than the configured cap.
    #[error("{0}")]
    TooLarge(String),
    /// The image is used by containers.
    #[error("image {reference:?} is used by container(s) {containers}; delete them first")]
    InUse {
        /// The image.
        reference: String,
        /// Their names.
        containers: String,
    },
    /// A local file operation failed.
    #[error("image store {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The registry answered something else unexpected.
    #[error("registry: {0}")]
    Registry(String),
}

/// `ImageError::Io` for `path`.
pub fn io_at(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { path, source }
}

impl ImageError {
    /// Whether retrying the same request may succeed (a dropped or refused connection).
    pub fn transient(&self) -> bool {
        matches!(self, ImageError::Unavailable(_))
    }
}
