//! Named limits and defaults. Every bound a configuration is checked against lives here, with the
//! reason for its value; backend-specific ceilings are in the backend's own constant.

/// The fewest vCPUs a VM may have.
pub const MIN_VCPUS: u32 = 1;
/// vCPUs a VM gets when `vm.vcpus` is not set.
pub const DEFAULT_VCPUS: u32 = 1;
/// Most vCPUs under QEMU `microvm` (which itself allows 288). Without x2APIC, which QEMU's TCG
/// does not offer, every APIC id must stay below the xAPIC broadcast id 255.
pub const QEMU_MAX_VCPUS: u32 = 254;
/// Most vCPUs under Firecracker: its own `MAX_SUPPORTED_VCPUS` (it aims at small guests).
pub const FIRECRACKER_MAX_VCPUS: u32 = 32;
/// Most vCPUs under Cloud Hypervisor on x86-64: the same xAPIC bound (its vCPU counts were long
/// a `u8`).
pub const CLOUD_HYPERVISOR_MAX_VCPUS: u32 = 254;

/// The least guest memory, in MiB. The guest kernel unpacks our initramfs into RAM (the archive
/// and its unpacked tree are both resident while it does) and then runs the tenant engine and its
/// containers; below 128 MiB that unpacking alone can end in an out-of-memory panic.
pub const MIN_MEMORY_MIB: u32 = 128;
/// Guest memory when `vm.memory_mib` is not set, in MiB: the size known to boot our guest on the
/// CI machines.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// The most guest memory, in MiB (1 TiB): far above what a tenant VM on one host should get, and
/// a guard against a unit mistake (bytes given as MiB).
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

/// `COMMAND_LINE_SIZE` of the x86 boot protocol: the kernel command line buffer, including its
/// terminating NUL. Firecracker and Cloud Hypervisor use the same 2048-byte buffer.
pub const KERNEL_COMMAND_LINE_SIZE: usize = 2048;
/// Bytes of the command line left to the VMM: QEMU `microvm` and Firecracker append a
/// `virtio_mmio.device=<size>@<addr>:<irq>` entry (about 40 bytes) per virtio device.
pub const CMDLINE_VMM_RESERVE: usize = 512;
/// The longest `vm.cmdline`, in bytes: the kernel's buffer less its NUL and the VMM's share.
pub const MAX_CMDLINE_LEN: usize = KERNEL_COMMAND_LINE_SIZE - 1 - CMDLINE_VMM_RESERVE;

/// Most disks per VM. Together with the virtio-serial and network devices this fills the 8
/// virtio-mmio transports QEMU `microvm` has with its second IO-APIC off (`ioapic2=off`; the
/// default machine has 24), so every accepted config fits every machine variant.
pub const MAX_DISKS: usize = 6;

/// Most virtio-serial ports per VM. A virtio-serial device has 31 ports by default and port 0 is
/// kept for a console; our guests need one or two.
pub const MAX_PORTS: usize = 16;
/// The longest port name. The guest sees each port as `/dev/virtio-ports/<name>`.
pub const MAX_PORT_NAME_LEN: usize = 64;
/// The port the agent talks to the guest engine over (QEMU); the guest engine opens
/// `/dev/virtio-ports/caas.engine`.
pub const ENGINE_PORT_NAME: &str = "caas.engine";
/// The vsock port the guest engine listens on (Firecracker, Cloud Hypervisor). The host connects
/// to the VM's vsock unix socket and writes `CONNECT 1024\n` (the hybrid vsock handshake).
pub const ENGINE_VSOCK_PORT: u32 = 1024;

/// The lowest guest vsock CID: 0, 1 and 2 are the hypervisor, loopback and the host.
pub const MIN_GUEST_CID: u32 = 3;
/// The highest guest vsock CID: `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u32 = u32::MAX - 1;

/// The longest path, in bytes: `PATH_MAX` less its NUL.
pub const MAX_PATH_LEN: usize = 4095;
/// The longest VMM binary name looked up on `PATH`: `NAME_MAX`.
pub const MAX_BINARY_NAME_LEN: usize = 255;
/// The longest unix socket path, in bytes: `sun_path` holds 108 bytes including the NUL.
pub const MAX_UNIX_SOCKET_PATH_LEN: usize = 107;
/// The longest tap device name: `IFNAMSIZ` (16) less its NUL.
pub const MAX_TAP_NAME_LEN: usize = 15;

/// The longest QEMU CPU model name (`max`, `host`, `Skylake-Server-v4`).
pub const MAX_CPU_MODEL_LEN: usize = 64;
/// Most entries in `vm.qemu.machine_options`.
pub const MAX_MACHINE_OPTIONS: usize = 16;
/// The longest single `vm.qemu.machine_options` entry.
pub const MAX_MACHINE_OPTION_LEN: usize = 64;
/// The smallest TCG translation cache, in MiB.
pub const MIN_TB_SIZE_MIB: u32 = 1;
/// The largest TCG translation cache, in MiB: QEMU caps its code buffer at 2 GiB on x86-64 hosts,
/// where direct jumps inside the buffer reach +-2 GiB.
pub const MAX_TB_SIZE_MIB: u32 = 2048;
