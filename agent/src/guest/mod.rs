//! `caas-agent guest`: the init (PID 1) of a VM tenant's guest.
//!
//! The host boots the guest kernel with the initramfs of [`crate::vm::initramfs`] and the kernel
//! command line `rdinit=/bin/caas-agent -- guest --tenant <id> --id-start <n>`. This process then
//! 1. moves the root onto a bind mount of the initramfs (so containers can `pivot_root`), and
//!    mounts /proc, /sys, /dev, /run, /tmp and the cgroup2 hierarchy;
//! 2. loads the kernel modules listed in the initramfs, in order, with the parameters the
//!    command line gives them (what modprobe would do);
//! 3. mounts the tenant's disk (`/dev/vda`, ext4, made by the host) as the engine's state dir;
//!    with `--net`, makes the tenant's namespaces and moves the network card (virtio-net, on the
//!    host a tap device) into the tenant netns as `eth0`, addressed as a userns tenant's is;
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
    vm::{handshake, initramfs::LOAD_ORDER},
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

/// What a probing guest prints when it reached its init.
pub const PROBE_LINE: &str = "caas-guest: probe reached init";

/// The guest init's command line (after `--` on the kernel command line).
#[derive(Debug, Clone, clap::Args)]
pub struct GuestArgs {
    /// Tenant id.
    #[arg(long, required_unless_present = "probe", default_value = "")]
    pub tenant: String,
    /// First uid/gid of the tenant's range (the same range as on the host).
    #[arg(long, required_unless_present = "probe", default_value_t = 0)]
    pub id_start: u32,
    /// Only say [`PROBE_LINE`] and power off: the host's check that a guest boots to its init
    /// under an accelerator.
    #[arg(long)]
    pub probe: bool,
    /// The virtio-serial port to serve the engine protocol on.
    #[arg(long, default_value = ENGINE_PORT)]
    pub port: String,
    /// Block device holding the tenant's state (ext4); without it, state lives in memory. A
    /// disk that is named but does not appear is an error, never a silent fallback.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// The tenant's subnet, when it has a network: the guest's card goes into the tenant netns
    /// with the subnet's second address, routed via the first (the host's tap).
    #[arg(long)]
    pub net: Option<String>,
    /// Name servers for the containers' resolv.conf (with `--net`).
    #[arg(long, value_delimiter = ',')]
    pub dns: Vec<std::net::Ipv4Addr>,
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("caas-guest: {msg}");
}

/// Runs the guest init. Returns only on a failure the guest cannot continue from; the caller then
/// powers off, so a broken guest stops instead of hanging.
pub fn main(args: &GuestArgs) -> Result<(), String> {
    if args.probe {
        eprintln!("{PROBE_LINE}");
        return Ok(());
    }
    crate::validate::check_id("--tenant", &args.tenant).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    leave_rootfs()?;
    mount_basics()?;
    load_modules()?;
    let persistent = mount_state(args.disk.as_deref())?;
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
        in_vm: true,
    };
    if let Some(subnet) = &args.net {
        setup_network(&engine_args, subnet, &args.dns)?;
    }
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

/// Moves the root onto a bind mount of itself. The initramfs is the kernel's `rootfs`, a mount
/// with no parent, and `pivot_root` refuses to move such a root: every container's runtime would
/// fail with EINVAL. With a bind mount of it as the root (the way switch_root leaves a real root),
/// the containers' mount namespaces pivot as on any host.
fn leave_rootfs() -> Result<(), String> {
    fn err(what: &'static str) -> impl Fn(nix::Error) -> String {
        move |e| format!("making the root pivotable: {what}: {e}")
    }
    fs::create_dir_all("/newroot").map_err(|e| format!("/newroot: {e}"))?;
    mount(
        Some("/"),
        "/newroot",
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err("bind mount"))?;
    nix::unistd::chdir("/newroot").map_err(err("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(err("move"))?;
    nix::unistd::chroot(".").map_err(err("chroot"))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))
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
    // favordynmods (Linux 6.0+): moving a container's process into its cgroup does not wait
    // for an RCU grace period (see crate::cgroups::dynmods). An older kernel refuses it.
    if mnt(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nodev,
        Some(crate::cgroups::dynmods::OPTION),
    )
    .is_err()
    {
        mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None)?;
    }
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

/// Mounts the tenant's disk at [`STATE_DIR`], or a tmpfs when there is none.
fn mount_state(disk: Option<&Path>) -> Result<bool, String> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let Some(disk) = disk else {
        mnt("tmpfs", STATE_DIR, "tmpfs", flags, Some("mode=0700"))?;
        return Ok(false);
    };
    // The block device appears once virtio_blk has probed it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !disk.exists() {
        if Instant::now() >= deadline {
            return Err(format!(
                "the tenant's disk {} did not appear (is the VMM given a virtio-blk disk?)",
                disk.display()
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
    mnt(&disk.to_string_lossy(), STATE_DIR, "ext4", flags, None)?;
    Ok(true)
}

/// Makes the tenant's namespaces before the engine would (it finds them made), moves the
/// guest's network card into the netns and configures it, and writes the containers'
/// resolv.conf where the engine looks for it. Runs while the process is single-threaded (the
/// namespaces are made by a fork).
fn setup_network(a: &EngineArgs, subnet: &str, dns: &[std::net::Ipv4Addr]) -> Result<(), String> {
    let subnet: crate::tenants::subnet::Ipv4Net = subnet
        .parse()
        .map_err(|e| format!("--net {subnet:?}: {e}"))?;
    let paths = a.paths();
    crate::fsutil::ensure_dir(&paths.run, 0o711)
        .map_err(|e| format!("{}: {e}", paths.run.display()))?;
    crate::engine::ns::ensure(&paths.ns(), a.id_start).map_err(|e| e.to_string())?;
    let conf = paths.run.join("resolv.conf");
    fs::write(&conf, crate::net::resolv_conf(dns))
        .map_err(|e| format!("{}: {e}", conf.display()))?;
    // The card appears once virtio_net has probed it; one current-thread runtime for the
    // netlink calls, gone before the engine starts.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let ns = paths.ns().join("net");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (index, name) = loop {
        if let Some(card) = crate::net::guest_card() {
            break card;
        }
        if Instant::now() >= deadline {
            return Err(
                "no virtio-net card appeared in 10 s (is the VMM given the tenant's tap device?)"
                    .into(),
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    rt.block_on(crate::net::adopt_guest_link(&ns, index, subnet))
        .map_err(|e| format!("{name}: {e}"))?;
    log(format_args!(
        "network: eth0 {} in the tenant netns",
        crate::net::addresses(subnet).1
    ));
    Ok(())
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

/// Powers the guest off, with the disk clean: every process is killed, the mounts on or under
/// the state and run dirs (container overlays) come off deepest first, then the disk; if it is
/// still busy it is remounted read-only. Never returns.
pub fn power_off() -> ! {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGKILL,
    );
    // Reap what was killed, so nothing holds a mount.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => thread::sleep(Duration::from_millis(10)),
            Ok(_) => {}
            Err(_) => break, // no children left
        }
    }
    nix::unistd::sync();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|t| (t.starts_with(RUN_DIR) || t.starts_with(STATE_DIR)) && *t != STATE_DIR)
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
    }
    if nix::mount::umount(STATE_DIR).is_err() {
        let _ = mount(
            None::<&str>,
            STATE_DIR,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        );
    }
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

/// Serves one host connection of the port after another until the host side goes away: each
/// starts with the handshake of [`crate::vm::handshake`] and gets an engine connection of its
/// own. One thread, non-blocking descriptors and poll: when the host goes away (POLLHUP on the
/// port) whatever is buffered for either side is dropped at once, and a write to the port never
/// blocks the relay.
fn relay_once(port: &Path, socket: &Path) -> io::Result<()> {
    let dev = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(port)?;
    let mut buf = vec![0u8; 64 * 1024];
    // Host bytes not yet relayed: before a hello, what may hold one.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let nonce = loop {
            if let Some((end, nonce)) = handshake::find_hello(&pending) {
                pending.drain(..end);
                break nonce;
            }
            // Keep a tail that may be the start of a hello cut by a read.
            let keep = handshake::HELLO.len() + handshake::NONCE_LEN - 1;
            if pending.len() > keep {
                pending.drain(..pending.len() - keep);
            }
            let mut fds = [PollFd::new(dev.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ev = fds[0].revents().unwrap_or(PollFlags::empty());
            // While nobody is connected on the host side, poll returns at once with POLLHUP
            // (and POLLIN: a read would return end-of-file); wait a little and look again.
            if ev.contains(PollFlags::POLLHUP) {
                pending.clear(); // what a host that went away sent is of no use
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            if ev.contains(PollFlags::POLLIN) && !read_into(&mut &dev, &mut buf, &mut pending)? {
                thread::sleep(Duration::from_millis(5));
            }
        };
        let engine = UnixStream::connect(socket)?;
        engine.set_nonblocking(true)?;
        match pump(
            &dev,
            &engine,
            handshake::ack(&nonce),
            std::mem::take(&mut pending),
        )? {
            PumpEnd::HostGone => return Ok(()),
            // A new host connection: this engine connection ends, the next one starts.
            PumpEnd::Hello(bytes) => pending = bytes,
        }
    }
}

/// Bytes waiting for one side, at most this many before reading from the other side pauses.
const RELAY_BUFFER: usize = 256 * 1024;

/// Why relaying one connection stopped.
enum PumpEnd {
    /// The host side disconnected.
    HostGone,
    /// A read from the port began with a hello: these bytes, from it on.
    Hello(Vec<u8>),
}

fn pump(
    dev: &fs::File,
    engine: &UnixStream,
    mut to_host: Vec<u8>,
    mut to_engine: Vec<u8>,
) -> io::Result<PumpEnd> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut engine_eof = false;
    loop {
        let mut dev_ev = PollFlags::empty();
        let mut eng_ev = PollFlags::empty();
        if to_engine.len() < RELAY_BUFFER {
            dev_ev |= PollFlags::POLLIN;
        }
        if !to_host.is_empty() {
            dev_ev |= PollFlags::POLLOUT;
        }
        if to_host.len() < RELAY_BUFFER && !engine_eof {
            eng_ev |= PollFlags::POLLIN;
        }
        if !to_engine.is_empty() {
            eng_ev |= PollFlags::POLLOUT;
        }
        let mut fds = [
            PollFd::new(dev.as_fd(), dev_ev),
            PollFd::new(engine.as_fd(), eng_ev),
        ];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let d = fds[0].revents().unwrap_or(PollFlags::empty());
        let e = fds[1].revents().unwrap_or(PollFlags::empty());
        if d.contains(PollFlags::POLLHUP) {
            return Ok(PumpEnd::HostGone); // buffers are dropped with the connection
        }
        if d.contains(PollFlags::POLLERR) || e.contains(PollFlags::POLLERR) {
            return Err(io::Error::other("the port or the engine socket failed"));
        }
        if d.contains(PollFlags::POLLIN) {
            loop {
                match (&*dev).read(&mut buf) {
                    Ok(0) => return Ok(PumpEnd::HostGone),
                    Ok(n) if buf[..n].starts_with(&handshake::HELLO) => {
                        return Ok(PumpEnd::Hello(buf[..n].to_vec()));
                    }
                    Ok(n) => {
                        to_engine.extend_from_slice(&buf[..n]);
                        if to_engine.len() >= RELAY_BUFFER {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if !engine_eof
            && e.intersects(PollFlags::POLLIN | PollFlags::POLLHUP)
            && !read_into(&mut &*engine, &mut buf, &mut to_host)?
        {
            engine_eof = true;
        }
        if engine_eof && to_host.is_empty() {
            return Err(io::Error::other("the engine closed the connection"));
        }
        if !to_host.is_empty() {
            write_from(&mut &*dev, &mut to_host)?;
        }
        if !to_engine.is_empty() {
            write_from(&mut &*engine, &mut to_engine)?;
        }
    }
}

/// Reads what is there into `out`; false at end-of-file.
fn read_into(from: &mut impl Read, buf: &mut [u8], out: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        match from.read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() >= RELAY_BUFFER {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes as much of `pending` as goes now, and keeps the rest.
fn write_from(to: &mut impl Write, pending: &mut Vec<u8>) -> io::Result<()> {
    while !pending.is_empty() {
        match to.write(pending) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
