//! The caas-agent public gRPC API (`caas.v1`), generated from `proto/caas/v1/*.proto`.
//!
//! This crate owns only wire types; the agent converts them to domain types at the API layer and
//! nothing below that layer sees them.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Generated messages and services of package `caas.v1`.
pub mod v1 {
    tonic::include_proto!("caas.v1");
}

/// The engine protocol (`caas.engine.v1`): the agent's internal channel to each tenant engine.
pub mod engine {
    /// Generated messages and service of package `caas.engine.v1`.
    pub mod v1 {
        tonic::include_proto!("caas.engine.v1");
    }
}

/// The Kubernetes Container Runtime Interface, vendored from kubernetes/cri-api
/// (`proto/k8s/README.md` names the version).
pub mod cri {
    /// Generated messages and the `RuntimeService` and `ImageService` of package `runtime.v1`.
    #[allow(missing_docs, clippy::all, rustdoc::all)]
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
    /// The encoded `FileDescriptorSet` of the CRI proto, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cri_descriptor");
}

/// The encoded `FileDescriptorSet` of every caas proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("caas_descriptor");

/// Serializers that render enum fields by name in `--json` output.
pub mod json {
    use crate::v1;
    use serde::Serializer;

    fn by_name<S: Serializer>(s: S, name: Option<&str>, raw: i32) -> Result<S::Ok, S::Error> {
        match name {
            Some(n) => s.serialize_str(n),
            None => s.serialize_i32(raw),
        }
    }

    macro_rules! enum_serializer {
        ($fn:ident, $ty:ty, $prefix:literal) => {
            #[doc = concat!("Serializes a `", stringify!($ty), "` field by its short name.")]
            pub fn $fn<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
                let name = <$ty>::try_from(*v)
                    .ok()
                    .map(|e| e.as_str_name().trim_start_matches($prefix).to_lowercase());
                by_name(s, name.as_deref(), *v)
            }
        };
    }

    enum_serializer!(isolation, v1::Isolation, "ISOLATION_");
    enum_serializer!(tenant_state, v1::TenantState, "TENANT_STATE_");
    enum_serializer!(container_state, v1::ContainerState, "CONTAINER_STATE_");
    enum_serializer!(log_stream, v1::LogStream, "LOG_STREAM_");
    enum_serializer!(
        container_event_type,
        v1::ContainerEventType,
        "CONTAINER_EVENT_TYPE_"
    );
}
