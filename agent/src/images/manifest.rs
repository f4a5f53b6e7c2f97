//! The parts of OCI and Docker v2 manifests, indexes and image configs the agent uses. Every
//! digest is checked to be `sha256:` plus 64 lowercase hex digits before it becomes a file name.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::error::ImageError;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What the agent asks registries for.
pub const ACCEPT: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// Most layers an image may have (the overlay's lower-directory list has to hold them all).
pub const MAX_LAYERS: usize = 127;
/// Largest manifest, index or config accepted.
pub const MAX_JSON_BYTES: u64 = 4 << 20;

/// A checked `sha256:<64 hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Checks a digest string.
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| {
            ImageError::Unsupported(format!("digest {s:?}: only sha256 digests are supported"))
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ImageError::Unsupported(format!(
                "digest {s:?} is not sha256: and 64 lowercase hex digits"
            )));
        }
        Ok(Self(s.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("sha256:{:x}", Sha256::digest(bytes)))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    /// The whole `sha256:...` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).map_err(|e| e.to_string())
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression of a layer media type; `None` for types that are not layers.
    pub fn of_media_type(mt: &str) -> Option<Self> {
        match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    /// Its media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// Its digest (checked later, by [`Digest::parse`]).
    pub digest: String,
    /// Its size in bytes.
    #[serde(default)]
    pub size: u64,
    /// For index entries: the platform.
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `linux`, ...
    pub os: String,
    /// `v8`, ...
    #[serde(default)]
    pub variant: Option<String>,
}

/// A manifest or an index: which one it is shows in which fields it has.
#[derive(Debug, Deserialize)]
struct Document {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
#[derive(Debug)]
pub enum Parsed {
    /// A multi-platform index (OCI index or Docker manifest list).
    Index(Vec<Descriptor>),
    /// One image's manifest.
    Manifest(Manifest),
}

/// One image's manifest, checked.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Its media type (OCI or Docker).
    pub media_type: String,
    /// The config blob.
    pub config: Digest,
    /// The config's size.
    pub config_size: u64,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
}

/// A layer of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// Its compression.
    pub compression: Compression,
    /// Its media type.
    pub media_type: String,
}

/// Parses a manifest or index. `content_type` is the registry's answer, used when the document
/// does not name its own media type.
pub fn parse(bytes: &[u8], content_type: &str) -> Result<Parsed, ImageError> {
    let d: Document = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::Unsupported(format!("the manifest is not valid JSON: {e}")))?;
    if d.schema_version != 2 {
        return Err(ImageError::Unsupported(format!(
            "manifest schemaVersion {} is not supported (only 2: OCI or Docker v2 schema 2)",
            d.schema_version
        )));
    }
    let mt = if d.media_type.is_empty() {
        content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    } else {
        d.media_type.clone()
    };
    if let Some(ms) = d.manifests {
        if !mt.is_empty() && mt != OCI_INDEX && mt != DOCKER_LIST {
            return Err(ImageError::Unsupported(format!(
                "an index with media type {mt:?}"
            )));
        }
        return Ok(Parsed::Index(ms));
    }
    let (Some(config), Some(layers)) = (d.config, d.layers) else {
        return Err(ImageError::Unsupported(
            "the manifest has neither `manifests` (an index) nor `config` and `layers`".into(),
        ));
    };
    if !mt.is_empty() && mt != OCI_MANIFEST && mt != DOCKER_MANIFEST {
        return Err(ImageError::Unsupported(format!(
            "manifest media type {mt:?} (supported: {OCI_MANIFEST}, {DOCKER_MANIFEST})"
        )));
    }
    if layers.len() > MAX_LAYERS {
        return Err(ImageError::Unsupported(format!(
            "the image has {} layers; at most {MAX_LAYERS} are supported",
            layers.len()
        )));
    }
    let layers = layers
        .into_iter()
        .map(|l| {
            let compression = Compression::of_media_type(&l.media_type).ok_or_else(|| {
                ImageError::Unsupported(format!(
                    "layer {} has media type {:?}, which is not an image layer this agent \
                     unpacks (tar, tar+gzip, tar+zstd)",
                    l.digest, l.media_type
                ))
            })?;
            Ok(Layer {
                digest: Digest::parse(&l.digest)?,
                size: l.size,
                compression,
                media_type: l.media_type,
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    Ok(Parsed::Manifest(Manifest {
        media_type: if mt.is_empty() {
            OCI_MANIFEST.into()
        } else {
            mt
        },
        config: Digest::parse(&config.digest)?,
        config_size: config.size,
        layers,
    }))
}

/// This host's platform in OCI terms: (architecture, variant).
pub fn host_platform() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        "powerpc64" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        other => (other, None),
    }
}

/// The index entry for this host (linux and its architecture; a variant, where both sides
/// name one, must agree).
pub fn pick_platform(entries: &[Descriptor]) -> Result<&Descriptor, ImageError> {
    let (arch, variant) = host_platform();
    entries
        .iter()
        .find(|d| {
            d.platform.as_ref().is_some_and(|p| {
                p.os == "linux"
                    && p.architecture == arch
                    && match (p.variant.as_deref(), variant) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    }
            })
        })
        .ok_or_else(|| {
            let offered: Vec<String> = entries
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            ImageError::NotFound(format!(
                "the index has no image for linux/{arch} (it offers: {})",
                if offered.is_empty() {
                    "no platforms".into()
                } else {
                    offered.join(", ")
                }
            ))
        })
}

/// What the agent reads from an image config.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct ImageConfig {
    /// `amd64`, ...
    #[serde(default)]
    pub architecture: String,
    /// `linux`, ...
    #[serde(default)]
    pub os: String,
    /// The run-time defaults.
    #[serde(default)]
    pub config: Option<RunConfig>,
    /// The uncompressed layer digests.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// The run-time defaults of an image.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RunConfig {
    /// `KEY=VALUE` entries.
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// The entrypoint.
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// The default arguments.
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// The working directory.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// Who the process runs as: `uid[:gid]` or `name[:group]`.
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    /// The signal that asks the process to stop (`SIGQUIT`, `QUIT`, `3`, `SIGRTMIN+3`).
    #[serde(rename = "StopSignal", default)]
    pub stop_signal: Option<String>,
}

/// The number of a signal as an image config names it: `SIGQUIT`, `QUIT`, `3`, or
/// `SIGRTMIN+n` / `RTMIN+n` (`SIGRTMAX-n`); `None` for what is not a signal.
pub fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim();
    if let Ok(num) = n.parse::<i32>() {
        return (1..=libc::SIGRTMAX()).contains(&num).then_some(num);
    }
    let upper = n.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let rt = |rest: &str, base: i32, sign: i32| {
        let off = if rest.is_empty() {
            0
        } else {
            rest.parse::<i32>().ok()?
        };
        let v = base + sign * off;
        (libc::SIGRTMIN()..=libc::SIGRTMAX())
            .contains(&v)
            .then_some(v)
    };
    if let Some(rest) = bare.strip_prefix("RTMIN") {
        return rt(rest.trim_start_matches('+'), libc::SIGRTMIN(), 1);
    }
    if let Some(rest) = bare.strip_prefix("RTMAX") {
        return rt(rest.trim_start_matches('-'), libc::SIGRTMAX(), -1);
    }
    format!("SIG{bare}")
        .parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

/// `rootfs` of an image config.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RootFs {
    /// sha256 of each uncompressed layer, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Parses an image config and checks it against its manifest.
pub fn parse_config(bytes: &[u8], layers: usize) -> Result<ImageConfig, ImageError> {
    let c: ImageConfig = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::Unsupported(format!("the image config is not valid: {e}")))?;
    if !c.os.is_empty() && c.os != "linux" {
        return Err(ImageError::Unsupported(format!(
            "the image is for os {:?}; this host runs linux",
            c.os
        )));
    }
    if let Some(r) = &c.rootfs
        && !r.diff_ids.is_empty()
    {
        if r.diff_ids.len() != layers {
            return Err(ImageError::Unsupported(format!(
                "the image config lists {} diff_ids for {layers} layers",
                r.diff_ids.len()
            )));
        }
        for d in &r.diff_ids {
            Digest::parse(d)?;
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    #[test]
    fn stop_signals_are_read_as_images_name_them() {
        for (name, want) in [
            ("SIGQUIT", Some(libc::SIGQUIT)),
            ("quit", Some(libc::SIGQUIT)),
            ("SIGINT", Some(libc::SIGINT)),
            ("15", Some(libc::SIGTERM)),
            ("SIGRTMIN+3", Some(libc::SIGRTMIN() + 3)),
            ("RTMIN", Some(libc::SIGRTMIN())),
            ("SIGRTMAX-1", Some(libc::SIGRTMAX() - 1)),
            ("SIGNOPE", None),
            ("0", None),
            ("99", None),
            ("SIGRTMIN+99", None),
        ] {
            assert_eq!(signal_number(name), want, "{name}");
        }
    }

    use super::*;

    const H: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn digests_are_checked_before_they_name_files() {
        assert!(Digest::parse(&format!("sha256:{H}")).is_ok());
        for bad in [
            format!("sha512:{H}"),
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", H.to_uppercase()),
            format!("sha256:{H}0"),
            String::new(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifests_and_indexes_are_told_apart() {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"sha256:{H}","size":3}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"sha256:{H}","size":9}}]}}"#
        );
        match parse(m.as_bytes(), OCI_MANIFEST).unwrap() {
            Parsed::Manifest(m) => assert_eq!(m.layers[0].compression, Compression::Zstd),
            Parsed::Index(_) => panic!("a manifest"),
        }
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"digest":"sha256:{H}","size":1,"platform":{{"os":"linux","architecture":"s390x-nope"}}}},
            {{"digest":"sha256:{H}","size":2,"platform":{{"os":"linux","architecture":"{}"}}}}]}}"#,
            host_platform().0
        );
        match parse(i.as_bytes(), "").unwrap() {
            Parsed::Index(es) => assert_eq!(pick_platform(&es).unwrap().size, 2),
            Parsed::Manifest(_) => panic!("an index"),
        }
        let bad_layer = m.replace("tar+zstd", "vnd.helm.chart");
        let e = parse(bad_layer.as_bytes(), "").unwrap_err().to_string();
        assert!(e.contains("vnd.helm.chart"), "{e}");
    }

    #[test]
    fn configs_must_match_their_manifest() {
        let c = format!(r#"{{"os":"linux","rootfs":{{"diff_ids":["sha256:{H}"]}}}}"#);
        assert!(parse_config(c.as_bytes(), 1).is_ok());
        assert!(parse_config(c.as_bytes(), 2).is_err());
        assert!(parse_config(br#"{"os":"windows"}"#, 0).is_err());
    }
}
