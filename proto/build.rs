//! Compiles proto/caas/v1/*.proto with protox (pure Rust, so no system `protoc` is needed) and
//! generates the tonic services. The encoded descriptor set is kept for server reflection.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "caas/v1/tenant.proto",
    "caas/v1/container.proto",
    "caas/v1/image.proto",
    "caas/v1/usage.proto",
    "caas/v1/node.proto",
    "caas/engine/v1/engine.proto",
];

/// The vendored Kubernetes CRI (see `k8s/README.md`), compiled apart: it has no serde types.
const CRI_PROTOS: &[&str] = &["runtime/v1/api.proto"];

/// Enum-typed fields that `--json` output should show by name, not as a number.
const ENUM_FIELDS: &[(&str, &str)] = &[
    ("caas.v1.Tenant.isolation", "isolation"),
    ("caas.v1.Tenant.state", "tenant_state"),
    ("caas.v1.Container.state", "container_state"),
    ("caas.v1.LogChunk.stream", "log_stream"),
    ("caas.v1.ContainerEvent.type", "container_event_type"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("caas_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    let mut cfg = tonic_prost_build::configure()
        .btree_map(".")
        .type_attribute(".caas.v1", "#[derive(serde::Serialize)]");
    for (field, with) in ENUM_FIELDS {
        cfg = cfg.field_attribute(
            format!(".{field}"),
            format!("#[serde(serialize_with = \"crate::json::{with}\")]"),
        );
    }
    cfg.compile_fds(fds)?;

    for p in CRI_PROTOS {
        println!("cargo:rerun-if-changed=k8s/{p}");
    }
    let cri = protox::compile(CRI_PROTOS, ["k8s"])?;
    fs::write(
        out.join("cri_descriptor.bin"),
        prost::Message::encode_to_vec(&cri),
    )?;
    tonic_prost_build::configure().compile_fds(cri)?;
    Ok(())
}
