//! `caas-agent guest`: the init (PID 1) of a VM tenant's guest.
//!
//! The host boots the guest kernel with the initramfs of [`crate::vm::initramfs`] and the kernel
//! command line `rdinit=/bin/caas-agent -- guest --tenant <id> --id-start <n>`. This process then
//! 1. mounts /proc, /sys, /dev, /run, /tmp and the cgroup2 hierarchy;
//! 2. loads the kernel modules listed in the initramfs, in order, with the parameters the
//!    command line gives them (what modprobe would do);
//! 3. mounts the tenant's disk (`/dev/vda`, ext4, made by the host) as the engine's state dir;
//! 4. starts the same tenant engine as userns tenants run on the host (`caas-agent engine`),
//!    which serves the engine protocol on its unix socket inside the guest;
//! 5. relays bytes between that socket and the virtio-serial port named `caas.engine`, whose
//!    other end is a unix socket on the host: the agent's engine client connects there exactly as
//!    it connects to a host engine's socket;
//! 6. reaps orphans, restarts the engine if it dies, and powers the guest off when the engine
//!    exits after a `Shutdown` call (exit status 0).
//!
//! A virtio console port reports "host not connected" by returning end-of-file on read and
//! POLLHUP on poll without blocking, so waiting for the host to (re)connect is a short sleep loop
//! (poll also reports POLLIN then, so POLLIN alone does not mean a host is there).

use std::{
    ffi::CString,
    fs,
    io::{self, Read, Write},
    os::{
        fd::AsFd,
        unix::{fs::OpenOptionsExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use nix::{
    mount::{MsFlags, mount},
    poll::{PollFd, PollFlags, PollTimeout, poll},
};

use crate::{
    cgroups::{CgroupLayout, Limits, TenantCgroups},
    engine::EngineArgs,
    vm::initramfs::LOAD_ORDER,
};

/// Name of the virtio-serial port the engine protocol runs over.
pub const ENGINE_PORT: &str = "caas.engine";
/// Where the tenant's disk is mounted in the guest: the engine's state dir.
pub const STATE_DIR: &str = "/var/lib/caas";
/// The engine's run dir in the guest.
pub const RUN_DIR: &str = "/run/caas";
/// What the guest prints once the engine answers on its socket (the host's boot timer and the
/// console log look for it).
pub const READY_LINE: &str = "caas-guest: engine ready";

/// The guest init's command line (after `--` on the kernel command line).
#[derive(Debug, Clone, clap::Args)]
pub struct GuestArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// First uid/gid of the tenant's range (the same range as on the host).
    #[arg(long)]
    pub id_start: u32,
    /// The virtio-serial port to serve the engine protocol on.
    #[arg(long, default_value = ENGINE_PORT)]
    pub port: String,
    /// Block device holding the tenant's state (ext4); without it, state lives in memory.
    #[arg(long, default_value = "/dev/vda")]
    pub disk: PathBuf,
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("caas-guest: {msg}");
}

/// Runs the guest init. Returns only on a failure the guest cannot continue from; the caller then
/// powers off, so a broken guest stops instead of hanging.
pub fn main(args: &GuestArgs) -> Result<(), String> {
    crate::validate::check_id("--tenant", &args.tenant).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    mount_basics()?;
    load_modules()?;
    let persistent = mount_state(&args.disk)?;
    let limits = guest_limits();
    let cg = TenantCgroups::with_slice(
        Path::new("/sys/fs/cgroup"),
        CgroupLayout::V2,
        crate::cgroups::tenant::SLICE,
    );
    cg.create(&args.tenant, &limits)
        .map_err(|e| format!("tenant cgroup: {e}"))?;
    let engine_args = EngineArgs {
        tenant: args.tenant.clone(),
        id_start: args.id_start,
        state_dir: PathBuf::from(STATE_DIR),
        run_dir: PathBuf::from(RUN_DIR),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        cgroup_slice: crate::cgroups::tenant::SLICE.to_string(),
    };
    let socket = engine_args.paths().socket();
    let port = find_port(&args.port, Duration::from_secs(10))?;
    log(format_args!(
        "port {} is {}; state on {}",
        args.port,
        port.display(),
        if persistent {
            "disk"
        } else {
            "tmpfs (no disk)"
        }
    ));
    let mut engine = spawn_engine(&engine_args)?;
    wait_for_socket(&socket, &mut engine, Duration::from_secs(30))?;
    eprintln!("{READY_LINE} after {} ms", t0.elapsed().as_millis());
    {
        let socket = socket.clone();
        thread::Builder::new()
            .name("relay".into())
            .spawn(move || relay_forever(&port, &socket))
            .map_err(|e| format!("relay thread: {e}"))?;
    }
    supervise(engine, &engine_args)
}

fn mnt(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    fs::create_dir_all(target).map_err(|e| format!("{target}: {e}"))?;
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| format!("mounting {fstype} on {target}: {e}"))
}

fn mount_basics() -> Result<(), String> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", "proc", nodev, None)?;
    mnt("sysfs", "/sys", "sysfs", nodev, None)?;
    mnt(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mnt("shm", "/dev/shm", "tmpfs", nodev, Some("mode=1777"))?;
    mnt(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mnt(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None)?;
    Ok(())
}

/// Loads the modules of the initramfs in order. Parameters come from the kernel command line
/// (`virtio_mmio.device=...`), as modprobe would pass them.
fn load_modules() -> Result<(), String> {
    let order = match fs::read_to_string(LOAD_ORDER) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{LOAD_ORDER}: {e}")),
    };
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let dir = Path::new(LOAD_ORDER).parent().unwrap_or(Path::new("/"));
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let params = module_params(&cmdline, name);
        let path = dir.join(format!("{name}.ko"));
        let f = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let params = CString::new(params).map_err(|_| format!("{name}: NUL in parameters"))?;
        match nix::kmod::finit_module(f.as_fd(), &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("loading module {name}: {e}")),
        }
    }
    Ok(())
}

/// The `name.key=value` words of `cmdline` for module `name`, as `key=value key2=value2`.
fn module_params(cmdline: &str, name: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .filter_map(|w| {
            let (m, rest) = w.split_once('.')?;
            (norm(m) == name && rest.contains('=')).then(|| rest.to_string())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Mounts the tenant's disk at [`STATE_DIR`] if there is one; otherwise a tmpfs.
fn mount_state(disk: &Path) -> Result<bool, String> {
    // The block device appears once virtio_blk has probed; allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !disk.exists() && Instant::now() < deadline && disk.starts_with("/dev/vd") {
        thread::sleep(Duration::from_millis(10));
    }
    if disk.exists() {
        let d = disk.to_string_lossy();
        mnt(
            &d,
            STATE_DIR,
            "ext4",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        )?;
        Ok(true)
    } else {
        mnt(
            "tmpfs",
            STATE_DIR,
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0700"),
        )?;
        Ok(false)
    }
}

/// The whole guest is the tenant's: its vCPUs, its memory, and the kernel's pid limit.
fn guest_limits() -> Limits {
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(256 * 1024);
    let pids = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32_768);
    #[allow(clippy::cast_precision_loss)]
    Limits {
        cpus: cpus as f64,
        memory_bytes: mem_kib * 1024,
        pids,
    }
}

/// The device node of the virtio-serial port called `name`.
fn find_port(name: &str, wait: Duration) -> Result<PathBuf, String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(rd) = fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let n = fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if n.trim() == name {
                    let dev = Path::new("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no virtio-serial port named {name:?} appeared (is `-device virtserialport,name={name}` on the VMM's command line?)"
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn spawn_engine(a: &EngineArgs) -> Result<Child, String> {
    Command::new("/proc/self/exe")
        .arg("engine")
        .args(a.to_args())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        // The console is a serial line the host writes to a file: no colour codes.
        .env("NO_COLOR", "1")
        .spawn()
        .map_err(|e| format!("starting the engine: {e}"))
}

fn wait_for_socket(socket: &Path, engine: &mut Child, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    loop {
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = engine.try_wait() {
            return Err(format!("the engine exited before serving: {st}"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the engine did not serve on {} within {wait:?}",
                socket.display()
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits on children: the engine (restarted when it fails; the guest powers off when it exits
/// cleanly, which it does after `Shutdown`) and orphans reparented to PID 1.
fn supervise(mut engine: Child, args: &EngineArgs) -> Result<(), String> {
    let mut restarts: u32 = 0;
    loop {
        let engine_pid = nix::unistd::Pid::from_raw(i32::try_from(engine.id()).unwrap_or(i32::MAX));
        match nix::sys::wait::waitpid(None, None) {
            Ok(status) if status.pid() == Some(engine_pid) => {
                let _ = engine.try_wait();
                match status {
                    nix::sys::wait::WaitStatus::Exited(_, 0) => {
                        log("the engine shut down; powering off");
                        return Ok(());
                    }
                    other => {
                        restarts += 1;
                        log(format_args!(
                            "the engine ended ({other:?}); restart {restarts}"
                        ));
                        // Back off when it keeps failing, up to 5 s between attempts.
                        thread::sleep(Duration::from_millis(u64::from(restarts.min(50)) * 100));
                        engine = spawn_engine(args)?;
                    }
                }
            }
            Ok(_) => {} // an orphan
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("waiting for children: {e}")),
        }
    }
}

/// Powers the guest off after flushing the disk. Never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::mount::umount2(STATE_DIR, nix::mount::MntFlags::MNT_DETACH);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // If power-off is not wired up, a reboot ends the VMM (it runs with -no-reboot).
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// Relays between the port and the engine's socket, one host connection at a time, for ever.
fn relay_forever(port: &Path, socket: &Path) {
    loop {
        if let Err(e) = relay_once(port, socket) {
            log(format_args!("relay: {e}"));
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits until the host side of the port is connected, then copies both ways until either side
/// closes.
fn relay_once(port: &Path, socket: &Path) -> io::Result<()> {
    let dev = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(port)?;
    // While nobody is connected on the host side, poll returns at once with POLLHUP (and
    // POLLIN, since a read would not block: it returns end-of-file).
    loop {
        let mut fds = [PollFd::new(dev.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(1000u16)).map_err(io::Error::from)?;
        let ev = fds[0].revents().unwrap_or(PollFlags::empty());
        if !ev.contains(PollFlags::POLLHUP) {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let engine = UnixStream::connect(socket)?;
    let (mut dev_r, mut dev_w) = (dev.try_clone()?, dev);
    let (mut eng_r, mut eng_w) = (engine.try_clone()?, engine);
    let up = thread::Builder::new()
        .name("relay-up".into())
        .spawn(move || {
            let r = copy(&mut eng_r, &mut dev_w);
            // The engine closed, or the host went: either way the connection is over.
            let _ = eng_r.shutdown(std::net::Shutdown::Both);
            r
        })?;
    let down = copy(&mut dev_r, &mut eng_w);
    let _ = eng_w.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    down.map(|_| ())
}

/// Copies until end-of-file (the host disconnected, or the engine closed) or an error.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::module_params;

    #[test]
    fn module_parameters_come_from_the_command_line() {
        let c = "console=ttyS0 virtio_mmio.device=512@0xfeb00e00:12 virtio-mmio.force_legacy=1 \
                 quiet -- guest --tenant a.b=c";
        assert_eq!(
            module_params(c, "virtio_mmio"),
            "device=512@0xfeb00e00:12 force_legacy=1"
        );
        assert_eq!(module_params(c, "overlay"), "");
    }
}
