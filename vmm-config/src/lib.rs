//! Typed, validated microVM configurations (QEMU `microvm`, Firecracker, Cloud Hypervisor) for VM
//! tenants.
//!
//! Empty in this version: the crate exists so the workspace has its final shape. VM tenants, and
//! with them the configuration types, defaults, validation and per-VMM rendering, are still to be
//! built; until then the agent refuses nothing on their account and uses nothing from here.
