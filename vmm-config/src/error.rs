//! The one error type of the crate. Every message starts with the dotted name of the field at
//! fault (`vm.memory_mib`, `vm.disks[1].path`, `vm.qemu.accel`) and says what is allowed.

use std::path::PathBuf;

use crate::BackendKind;

/// Why a VM configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `vm.backend` names no backend this crate knows.
    #[error(
        "vm.backend: unknown backend {name:?}, expected one of qemu, firecracker, cloud-hypervisor"
    )]
    UnknownBackend {
        /// The name given.
        name: String,
    },
    /// A backend section (`[vm.firecracker]`) is given for a backend other than `vm.backend`.
    #[error("{field}: settings for another backend; vm.backend is {backend}")]
    OtherBackendSection {
        /// The section (`vm.firecracker`).
        field: String,
        /// The backend chosen.
        backend: BackendKind,
    },
    /// A number is below its minimum.
    #[error("{field}: {value} is below the minimum of {min}")]
    TooSmall {
        /// The field.
        field: String,
        /// The value given.
        value: u64,
        /// The smallest allowed value.
        min: u64,
    },
    /// A number is above its maximum (the backend's own, where it has one).
    #[error("{field}: {value} is above the maximum of {max}{}", for_backend(*.backend))]
    TooLarge {
        /// The field.
        field: String,
        /// The value given.
        value: u64,
        /// The largest allowed value.
        max: u64,
        /// The backend whose limit this is, when the limit is a backend's.
        backend: Option<BackendKind>,
    },
    /// A string or a list is longer than allowed.
    #[error("{field}: {len} {unit} is more than the maximum of {max}")]
    TooLong {
        /// The field.
        field: String,
        /// Its length.
        len: usize,
        /// The largest allowed length.
        max: usize,
        /// What `len` counts (`bytes`, `entries`).
        unit: &'static str,
    },
    /// A required value is missing.
    #[error("{field}: required ({why})")]
    Missing {
        /// The field.
        field: String,
        /// Why it is needed.
        why: &'static str,
    },
    /// A path breaks a rule.
    #[error("{field}: {path:?} {problem}")]
    BadPath {
        /// The field.
        field: String,
        /// The path given.
        path: PathBuf,
        /// The rule it breaks.
        problem: &'static str,
    },
    /// A name or another string breaks a rule.
    #[error("{field}: {value:?} {problem}")]
    BadValue {
        /// The field.
        field: String,
        /// The value given.
        value: String,
        /// The rule it breaks.
        problem: &'static str,
    },
    /// A value does not go with another setting.
    #[error("{field}: {problem}")]
    Conflict {
        /// The field.
        field: String,
        /// Which setting it conflicts with, and how.
        problem: &'static str,
    },
    /// The backend has no such feature.
    #[error("{field}: not available with backend {backend}: {hint}")]
    Unsupported {
        /// The field.
        field: String,
        /// The backend chosen.
        backend: BackendKind,
        /// What to use instead.
        hint: &'static str,
    },
    /// Two fields name the same path or name.
    #[error("{field}: {value} is also used by {other}")]
    Duplicate {
        /// The later field.
        field: String,
        /// The earlier field with the same value.
        other: String,
        /// The value.
        value: String,
    },
    /// A file the VMM needs does not exist on this host.
    #[error("{field}: {} does not exist", .path.display())]
    NotFound {
        /// The field.
        field: String,
        /// The path given.
        path: PathBuf,
    },
    /// A path on this host is not what the VMM needs (a directory given as a kernel).
    #[error("{field}: {} is not {expected}", .path.display())]
    WrongKind {
        /// The field.
        field: String,
        /// The path given.
        path: PathBuf,
        /// What it must be.
        expected: &'static str,
    },
    /// A path on this host could not be checked.
    #[error("{field}: {}: {source}", .path.display())]
    Host {
        /// The field.
        field: String,
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The VMM binary is not on `PATH`.
    #[error("{field}: {name} is not an executable file in any directory of PATH")]
    NotOnPath {
        /// The field.
        field: String,
        /// The binary name.
        name: String,
    },
}

fn for_backend(backend: Option<BackendKind>) -> String {
    backend.map(|b| format!(" for {b}")).unwrap_or_default()
}
