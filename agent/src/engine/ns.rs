//! The tenant's user and network namespaces. Made once per tenant and kept alive by bind mounts
//! under `<run_dir>/tenants/<id>/ns/`, so they outlive any one engine process; every container of
//! the tenant joins both by path. The netns is owned by the tenant's userns, so tenant root may
//! configure it and mount sysfs for it, and nothing else.

use std::{
    fs,
    io::Read,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{
    mount::{MntFlags, MsFlags},
    sched::CloneFlags,
    sys::wait::waitpid,
};

use crate::tenants::idrange::RANGE_SIZE;

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Why the namespaces could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    /// A step failed.
    #[error("tenant namespaces: {step}: {source}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

fn step(step: &'static str) -> impl FnOnce(std::io::Error) -> NsError {
    move |source| NsError::Step { step, source }
}

fn errno(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Whether `p` is a live namespace bind mount.
pub fn is_ns(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| (s.filesystem_type().0 & 0xffff_ffff) == NSFS_MAGIC)
}

/// Makes sure `ns_dir/user` and `ns_dir/net` hold the tenant's namespaces, with container uid and
/// gid 0..65536 mapped to host `id_start..`. Must run while the process is single-threaded.
pub fn ensure(ns_dir: &Path, id_start: u32) -> Result<(), NsError> {
    let (user, net) = (ns_dir.join("user"), ns_dir.join("net"));
    if is_ns(&user) && is_ns(&net) {
        return Ok(());
    }
    release(ns_dir);
    fs::create_dir_all(ns_dir).map_err(step("creating the ns dir"))?;
    for p in [&user, &net] {
        fs::File::create(p).map_err(step("creating a ns mount point"))?;
    }
    let result = hold(
        || nix::sched::unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET).is_ok(),
        Some(id_start),
        &[("user", &user), ("net", &net)],
    )
    .map(|lo| {
        if !lo {
            tracing::warn!("could not bring loopback up in the tenant netns");
        }
    });
    if result.is_err() {
        release(ns_dir);
    }
    result
}

/// Forks a child that `enter`s new namespaces (false: it could not) and brings loopback up in
/// its netns, writes its id maps (`map`: container ids 0..65536 to host `map..`) when it made a
/// user namespace, and bind-mounts its namespaces of each kind onto their targets, which exist.
/// Returns whether loopback came up. Must run while the process is single-threaded.
fn hold(
    enter: impl FnOnce() -> bool,
    map: Option<u32>,
    binds: &[(&str, &Path)],
) -> Result<bool, NsError> {
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (to_parent_r, to_parent_w) =
        nix::unistd::pipe2(cloexec).map_err(|e| step("pipe")(errno(e)))?;
    let (to_child_r, to_child_w) =
        nix::unistd::pipe2(cloexec).map_err(|e| step("pipe")(errno(e)))?;
    // The child uses its copies of the descriptors by reference; they close when it exits.
    let child = crate::sys::fork_and_run(|| {
        if !enter() {
            return 1;
        }
        // Root of the new (or joined) userns holds CAP_NET_ADMIN over the new netns.
        let lo = crate::sys::set_loopback_up().is_ok();
        if nix::unistd::write(&to_parent_w, if lo { b"1" } else { b"0" }).is_err() {
            return 1;
        }
        let mut done = [0u8; 1];
        let _ = nix::unistd::read(to_child_r.as_raw_fd(), &mut done);
        0
    })
    .map_err(|e| step("fork")(errno(e)))?;
    drop(to_parent_w);
    drop(to_child_r);
    let result = (|| {
        let mut ready = [0u8; 1];
        let n = fs::File::from(to_parent_r)
            .read(&mut ready)
            .map_err(step("waiting for unshare"))?;
        if n != 1 {
            return Err(step("unshare")(std::io::Error::other(
                "the namespace child failed to make its namespaces",
            )));
        }
        if let Some(id_start) = map {
            let map = format!("0 {id_start} {RANGE_SIZE}\n");
            fs::write(format!("/proc/{child}/uid_map"), &map).map_err(step("writing uid_map"))?;
            fs::write(format!("/proc/{child}/gid_map"), &map).map_err(step("writing gid_map"))?;
        }
        for (kind, target) in binds {
            let src = format!("/proc/{child}/ns/{kind}");
            nix::mount::mount(
                Some(src.as_str()),
                *target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| step("bind-mounting a namespace")(errno(e)))?;
        }
        Ok(ready[0] == b'1')
    })();
    let _ = nix::unistd::write(&to_child_w, b"1");
    drop::<OwnedFd>(to_child_w);
    let _ = waitpid(child, None);
    result
}

/// Where the pod network namespace `name` is held.
pub fn pod_netns_path(ns_dir: &Path, name: &str) -> PathBuf {
    ns_dir.join("pods").join(name)
}

/// Makes sure the pod network namespace `name` exists: a netns owned by the tenant's userns
/// (`ns_dir/user`, which must exist), so the tenant's containers may join it, with loopback up,
/// held by a bind mount at [`pod_netns_path`]. Must run while the process is single-threaded.
pub fn ensure_pod_netns(ns_dir: &Path, name: &str) -> Result<PathBuf, NsError> {
    let path = pod_netns_path(ns_dir, name);
    if is_ns(&path) {
        return Ok(path);
    }
    let user = fs::File::open(ns_dir.join("user")).map_err(step("opening the tenant userns"))?;
    if !is_ns(&ns_dir.join("user")) {
        return Err(step("opening the tenant userns")(std::io::Error::other(
            "the tenant's user namespace is not there",
        )));
    }
    let dir = ns_dir.join("pods");
    fs::create_dir_all(&dir).map_err(step("creating the pod ns dir"))?;
    fs::File::create(&path).map_err(step("creating a ns mount point"))?;
    let result = hold(
        || {
            nix::sched::setns(&user, CloneFlags::CLONE_NEWUSER).is_ok()
                && nix::sched::unshare(CloneFlags::CLONE_NEWNET).is_ok()
        },
        None,
        &[("net", &path)],
    )
    .and_then(|lo| {
        if lo {
            Ok(())
        } else {
            Err(step("loopback")(std::io::Error::other(
                "could not bring loopback up in the pod's netns",
            )))
        }
    });
    match result {
        Ok(()) => Ok(path),
        Err(e) => {
            remove_pod_netns(ns_dir, name);
            Err(e)
        }
    }
}

/// Unmounts and removes a pod network namespace; gone already is fine. The netns itself ends
/// when nothing else holds it (its containers have exited).
pub fn remove_pod_netns(ns_dir: &Path, name: &str) {
    let p = pod_netns_path(ns_dir, name);
    let _ = nix::mount::umount2(&p, MntFlags::MNT_DETACH);
    let _ = fs::remove_file(&p);
}

/// Unmounts and removes the tenant's namespace files, its pods' included (tenant deletion, or
/// a failed setup).
pub fn release(ns_dir: &Path) {
    remove_all_pidns(ns_dir);
    if let Ok(rd) = fs::read_dir(ns_dir.join("pods")) {
        for e in rd.flatten() {
            let _ = nix::mount::umount2(&e.path(), MntFlags::MNT_DETACH);
            let _ = fs::remove_file(e.path());
        }
        let _ = fs::remove_dir(ns_dir.join("pods"));
    }
    for kind in ["user", "net"] {
        let p = ns_dir.join(kind);
        let _ = nix::mount::umount2(&p, MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&p);
    }
}

/// Where a pod's process-namespace holder is recorded: the bind mount of its pid namespace
/// (its identity) and its pid.
fn pidns_files(ns_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let d = ns_dir.join("pods");
    (
        d.join(format!("{name}.pidns")),
        d.join(format!("{name}.pid")),
    )
}

/// The pid of the live holder of pod `name`'s process namespace: the process its pid file names,
/// if that process's pid namespace is still the one bind-mounted (a reused pid is not it).
pub fn pidns_holder(ns_dir: &Path, name: &str) -> Option<i32> {
    use std::os::unix::fs::MetadataExt;
    let (ns, pidfile) = pidns_files(ns_dir, name);
    let pid: i32 = fs::read_to_string(&pidfile).ok()?.trim().parse().ok()?;
    let want = fs::metadata(&ns).ok().filter(|_| is_ns(&ns))?;
    let have = fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    (have.ino() == want.ino() && have.dev() == want.dev()).then_some(pid)
}

/// The empty directory a pod's PID 1 is confined to.
fn pidns_root(ns_dir: &Path, name: &str) -> PathBuf {
    ns_dir.join("pods").join(format!("{name}.root"))
}

/// The fd number the tenant's netns is handed to the pod's PID 1 on.
pub const PAUSE_NETNS_FD: i32 = 3;
/// The descriptor on which the pod's PID 1 says it has confined itself (one byte, then closed).
pub const PAUSE_READY_FD: i32 = 4;
/// How long the engine waits for the pod's PID 1 to confine itself.
const PAUSE_READY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Makes sure pod `name` has a process namespace of its own, owned by the tenant's userns, with
/// a holder as its PID 1: `exe pause` (named `caas-pause` in its argv), which reaps what is
/// orphaned in it; containers of the pod join it through its bind mount ([`pidns_path`]).
/// Before it waits, the holder confines itself as tightly as a container ([`confine_pause`]).
/// Returns the holder's pid. Must run while the process is single-threaded.
pub fn ensure_pidns(ns_dir: &Path, name: &str, exe: &Path) -> Result<i32, NsError> {
    use std::os::unix::ffi::OsStrExt;
    if let Some(pid) = pidns_holder(ns_dir, name) {
        return Ok(pid);
    }
    remove_pidns(ns_dir, name);
    let user = fs::File::open(ns_dir.join("user")).map_err(step("opening the tenant userns"))?;
    let net = fs::File::open(ns_dir.join("net")).map_err(step("opening the tenant netns"))?;
    let (ns, pidfile) = pidns_files(ns_dir, name);
    let root = pidns_root(ns_dir, name);
    fs::create_dir_all(ns_dir.join("pods")).map_err(step("creating the pod ns dir"))?;
    fs::File::create(&ns).map_err(step("creating a ns mount point"))?;
    fs::create_dir_all(&root).map_err(step("creating the holder's root"))?;
    fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o555))
        .map_err(step("creating the holder's root"))?;
    let exe = std::ffi::CString::new(exe.as_os_str().as_bytes())
        .map_err(|e| step("the engine's path")(std::io::Error::other(e)))?;
    let root_arg = std::ffi::CString::new(root.as_os_str().as_bytes())
        .map_err(|e| step("the holder's root")(std::io::Error::other(e)))?;
    let argv = [
        c"caas-pause".to_owned(),
        c"pause".to_owned(),
        c"--root".to_owned(),
        root_arg,
    ];
    let devnull = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(step("opening /dev/null"))?;
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (to_parent_r, to_parent_w) =
        nix::unistd::pipe2(cloexec).map_err(|e| step("pipe")(errno(e)))?;
    // Closed by a successful exec; written to when the exec fails.
    let (exec_r, exec_w) = nix::unistd::pipe2(cloexec).map_err(|e| step("pipe")(errno(e)))?;
    // Written to by the PID 1 once it has confined itself; closed unwritten if it could not.
    let (ready_r, ready_w) = nix::unistd::pipe2(cloexec).map_err(|e| step("pipe")(errno(e)))?;
    let child = crate::sys::fork_and_run(|| {
        let root = nix::unistd::Gid::from_raw(0);
        if nix::sched::setns(&user, CloneFlags::CLONE_NEWUSER).is_err()
            || nix::unistd::setresgid(root, root, root).is_err()
            || nix::unistd::setgroups(&[]).is_err()
            || nix::unistd::setresuid(0.into(), 0.into(), 0.into()).is_err()
            || nix::sched::unshare(CloneFlags::CLONE_NEWPID).is_err()
        {
            return 1;
        }
        // SAFETY: this (forked) process is single-threaded; the grandchild only makes system
        // calls and execs, or _exits.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                let _ = nix::unistd::setsid();
                // Standard streams to /dev/null, the tenant's netns on fd 3, and nothing else
                // of the engine's open across the exec.
                // The ready pipe first goes out of the way of the numbers it is given below.
                let Ok(ready) = nix::fcntl::fcntl(
                    ready_w.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(64),
                ) else {
                    // SAFETY: _exit ends the process at once, running nothing of the engine's.
                    unsafe { libc::_exit(126) }
                };
                for fd in 0..3 {
                    let _ = nix::unistd::dup2(devnull.as_raw_fd(), fd);
                }
                let _ = nix::unistd::dup2(net.as_raw_fd(), PAUSE_NETNS_FD);
                let _ = nix::unistd::dup2(ready, PAUSE_READY_FD);
                // SAFETY: close_range(2) takes plain integers; it closes every descriptor above
                // fd 4 except that it only marks them close-on-exec (flag 4 =
                // CLOSE_RANGE_CLOEXEC), so the exec-failure pipe stays usable until the exec.
                unsafe {
                    libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 4u32);
                }
                let _ = nix::unistd::execv(&exe, &argv);
                let _ = nix::unistd::write(&exec_w, b"x");
                // SAFETY: _exit ends the process at once, running nothing of the engine's.
                unsafe { libc::_exit(127) }
            }
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                let b = child.as_raw().to_le_bytes();
                if nix::unistd::write(&to_parent_w, &b).is_err() {
                    return 1;
                }
                0
            }
            Err(_) => 1,
        }
    })
    .map_err(|e| step("fork")(errno(e)))?;
    drop(to_parent_w);
    drop(exec_w);
    drop(ready_w);
    let mut b = [0u8; 4];
    let read = fs::File::from(to_parent_r).read_exact(&mut b);
    let _ = waitpid(child, None);
    let result = (|| {
        read.map_err(|_| {
            step("starting the pod's PID 1")(std::io::Error::other(
                "the namespace child failed to join the tenant's userns and make a pid namespace",
            ))
        })?;
        let mut failed = [0u8; 1];
        if fs::File::from(exec_r).read(&mut failed).unwrap_or(0) > 0 {
            return Err(step("starting the pod's PID 1")(std::io::Error::other(
                format!(
                    "{} could not be run as the tenant's root (is every directory on its path searchable by others?)",
                    exe.to_string_lossy()
                ),
            )));
        }
        // No container may join before the PID 1 is confined: until then its root is the
        // engine's, and a container of the pod could look through /proc/1/root.
        wait_ready(ready_r)?;
        let pid = i32::from_le_bytes(b);
        let src = format!("/proc/{pid}/ns/pid");
        nix::mount::mount(
            Some(src.as_str()),
            ns.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| step("bind-mounting a namespace")(errno(e)))?;
        fs::write(&pidfile, pid.to_string()).map_err(step("writing the holder's pid"))?;
        Ok(pid)
    })();
    if result.is_err() {
        if let Ok(pid) = read_pid(&b) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        remove_pidns(ns_dir, name);
    }
    result
}

/// Waits (up to [`PAUSE_READY_WAIT`]) for the pod's PID 1 to say it has confined itself.
fn wait_ready(ready: OwnedFd) -> Result<(), NsError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let failed = |why: &str| {
        step("starting the pod's PID 1")(std::io::Error::other(format!(
            "it {why} (joining the tenant's netns, its own namespaces, the pivot into an empty root, becoming nobody)"
        )))
    };
    let deadline = std::time::Instant::now() + PAUSE_READY_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::from(u16::try_from(left.as_millis().min(60_000)).unwrap_or(60_000));
        let mut fds = [PollFd::new(ready.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) if left.is_zero() => {
                return Err(failed(&format!(
                    "did not confine itself within {} s",
                    PAUSE_READY_WAIT.as_secs()
                )));
            }
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(step("waiting for the pod's PID 1")(errno(e))),
        }
    }
    let mut b = [0u8; 1];
    match fs::File::from(ready).read(&mut b) {
        Ok(1) if b[0] == b'1' => Ok(()),
        _ => Err(failed("could not confine itself")),
    }
}

/// The bind mount of pod `name`'s process namespace, which its containers join (a namespace
/// whose PID 1 is gone refuses new processes: a container cannot end up anywhere else).
pub fn pidns_path(ns_dir: &Path, name: &str) -> PathBuf {
    pidns_files(ns_dir, name).0
}

/// What the pod's PID 1 does first, right after its exec, as root of the tenant's user
/// namespace: it joins the tenant's network namespace (fd [`PAUSE_NETNS_FD`]), takes mount,
/// IPC, UTS and cgroup namespaces of its own, pivots into an empty read-only tmpfs mounted on
/// `root` (nothing of the host's stays mounted for it), becomes nobody (65534, so no
/// capability is left), and is no longer dumpable nor able to gain privileges. Whoever gets
/// hold of it (a pod's container may signal or, with CAP_SYS_PTRACE, trace it) finds nothing
/// of the host's.
pub fn confine_pause(root: &Path) -> Result<(), String> {
    let net = unsafe_owned_fd(PAUSE_NETNS_FD);
    nix::sched::setns(&net, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining the tenant's netns: {e}"))?;
    drop(net);
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|e| format!("namespaces of its own: {e}"))?;
    // Its root becomes an empty read-only tmpfs and the host's mounts go from its mount
    // namespace altogether (pivot_root, then the old root detached): a chroot could be walked
    // out of through /proc/<pid>/root/.. by whoever may trace it.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))?;
    nix::mount::mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,mode=0555"),
    )
    .map_err(|e| format!("a tmpfs root: {e}"))?;
    nix::unistd::chdir(root).map_err(|e| format!("{}: {e}", root.display()))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("the old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("a read-only root: {e}"))?;
    let nobody = nix::unistd::Gid::from_raw(65534);
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setresgid(nobody, nobody, nobody).map_err(|e| format!("setresgid: {e}"))?;
    let nobody = nix::unistd::Uid::from_raw(65534);
    nix::unistd::setresuid(nobody, nobody, nobody).map_err(|e| format!("setresuid: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("dumpable: {e}"))?;
    Ok(())
}

/// Takes fd `fd` (inherited across the exec) as owned.
fn unsafe_owned_fd(fd: i32) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: the fd was set up by the engine before the exec for this process alone, and
    // nothing else in this process refers to it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn read_pid(b: &[u8; 4]) -> Result<i32, ()> {
    let pid = i32::from_le_bytes(*b);
    if pid > 1 { Ok(pid) } else { Err(()) }
}

/// Ends pod `name`'s process namespace: its holder is killed (and with it every process left
/// in the namespace) and its files go. Gone already is fine.
pub fn remove_pidns(ns_dir: &Path, name: &str) {
    if let Some(pid) = pidns_holder(ns_dir, name) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
    let (ns, pidfile) = pidns_files(ns_dir, name);
    let _ = nix::mount::umount2(&ns, MntFlags::MNT_DETACH);
    let _ = fs::remove_file(&ns);
    let _ = fs::remove_file(&pidfile);
    let _ = fs::remove_dir(pidns_root(ns_dir, name));
}

/// Kills the PID 1s of pod process namespaces that no pod holds: an engine that died between
/// starting one and recording it left it running, untracked. They are the processes of this
/// tenant's user namespace that run `caas-pause pause --root <ns_dir>/pods/<name>.root` and
/// are not `<name>`'s recorded holder; what such a one left of its files goes too. Returns how
/// many were killed.
pub fn kill_untracked_holders(ns_dir: &Path) -> usize {
    use std::os::unix::{ffi::OsStrExt, fs::MetadataExt};
    let same = |a: &fs::Metadata, b: &fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    let Ok(userns) = fs::metadata(ns_dir.join("user")) else {
        return 0;
    };
    let pods = ns_dir.join("pods");
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // The user namespace first: only this tenant's processes have their command line read
        // (reading another's can wait on its memory map).
        if !fs::metadata(e.path().join("ns/user")).is_ok_and(|m| same(&m, &userns)) {
            continue;
        }
        // Held from here on, so that the pid cannot be another process's by the time it is
        // signalled.
        let Ok(pidfd) = pidfd_open(pid) else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let [b"caas-pause", b"pause", b"--root", root, ..] = args.as_slice() else {
            continue;
        };
        let root = Path::new(std::ffi::OsStr::from_bytes(root));
        let Some(name) = root
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_suffix(".root"))
            .filter(|_| root.parent() == Some(pods.as_path()))
        else {
            continue;
        };
        let holder = pidns_holder(ns_dir, name);
        if holder == Some(pid) {
            continue;
        }
        // SAFETY: pidfd_send_signal(2) takes a descriptor this function owns and plain values.
        let sent = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        } == 0;
        if sent {
            tracing::warn!(
                pod = name,
                pid,
                "killed a pod's PID 1 that no pod holds (its engine died making it)"
            );
            killed += 1;
            if holder.is_none() {
                remove_pidns(ns_dir, name);
            }
        }
    }
    killed
}

/// A pidfd for `pid` (pidfd_open(2)).
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes plain values and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the descriptor is new and owned by nothing else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Ends every pod process namespace of the tenant (its engine shuts down, or the tenant goes).
pub fn remove_all_pidns(ns_dir: &Path) {
    let Ok(rd) = fs::read_dir(ns_dir.join("pods")) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(name) = n.strip_suffix(".pid") {
            remove_pidns(ns_dir, name);
        }
    }
}
