//! VM tenants, host side: what the agent needs to boot a tenant's microVM. The guest side (the
//! init that runs inside the VM) is [`crate::guest`].

pub mod handshake;
pub mod initramfs;
