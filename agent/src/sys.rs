//! The crate's only `unsafe`: process-level calls that must happen before any other thread exists.

use nix::unistd::{ForkResult, Pid};

/// Forks; in the child runs `child` and exits with its code without returning.
///
/// Call only while the process is single-threaded (the engine calls it before its runtime starts).
pub fn fork_and_run(child: impl FnOnce() -> i32) -> nix::Result<Pid> {
    // SAFETY: the caller guarantees there is only one thread, so no lock can be held by another
    // thread at fork time; the child runs `child` and then `_exit`s without unwinding into the
    // parent's stack or running its atexit handlers.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            let code = child();
            // SAFETY: `_exit` is async-signal-safe and ends the child immediately.
            unsafe { libc::_exit(code) }
        }
    }
}

/// `IFF_UP` as the `c_short` that `ifreq` holds (the constant is 1, so it fits).
const IFF_UP: libc::c_short = 1;

/// Sets the loopback interface of the calling thread's network namespace up.
pub fn set_loopback_up() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills its flags union member.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS just initialised the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= IFF_UP };
    // SAFETY: as above; SIOCSIFFLAGS reads the name and flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Gives this process every standard signal's default action and an empty signal mask: what a
/// container's process gets right before it execs (see the engine's workload executor). Runs in
/// the container's single-threaded init, after the seccomp profile is loaded (which allows
/// `rt_sigaction` and `rt_sigprocmask`).
pub fn default_signals() -> nix::Result<()> {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, sigprocmask};
    for s in Signal::iterator() {
        if matches!(s, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler code, and the process is single-threaded and
        // about to exec: nothing else reads or changes dispositions meanwhile.
        unsafe { nix::sys::signal::signal(s, SigHandler::SigDfl) }?;
    }
    // The real-time signals too, but for the C library's own two below SIGRTMIN.
    for s in libc::SIGRTMIN()..=libc::SIGRTMAX() {
        // SAFETY: as above; SIG_DFL for a real-time signal number libc hands out.
        if unsafe { libc::signal(s, libc::SIG_DFL) } == libc::SIG_ERR {
            return Err(nix::errno::Errno::last());
        }
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// Reconfigures the superblock of the file system mounted at `path` so that its flag
/// parameters are exactly `flags` (`fspick` then `fsconfig`, Linux 5.2+). Unlike a mount(2)
/// remount this touches neither the mount's own flags (`nosuid`, a read-only bind of it) nor
/// the superblock's read-only state.
pub fn reconfigure_flags(path: &std::path::Path, flags: &[&str]) -> std::io::Result<()> {
    use std::{
        ffi::CString,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        os::unix::ffi::OsStrExt,
    };
    let c = |s: &[u8]| CString::new(s).map_err(std::io::Error::other);
    let at = c(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path that outlives the call; fspick returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_fspick,
            libc::AT_FDCWD,
            at.as_ptr(),
            libc::FSPICK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: fspick succeeded, so `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let config = |cmd: libc::c_uint, key: Option<&CString>| {
        let key = key.map_or(std::ptr::null(), |k| k.as_ptr());
        // SAFETY: `fd` is open, `key` is NULL or a NUL-terminated string that outlives the
        // call, and a flag or a command takes no value (NULL, 0).
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fd.as_raw_fd(),
                cmd,
                key,
                std::ptr::null::<libc::c_void>(),
                0,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    for f in flags {
        config(libc::FSCONFIG_SET_FLAG, Some(&c(f.as_bytes())?))?;
    }
    config(libc::FSCONFIG_CMD_RECONFIGURE, None)
}

/// Restores the default action of SIGPIPE, which the Rust runtime ignores: a command-line tool
/// whose reader went away (`caasctl ... | head`) should end quietly, as other Unix tools do,
/// instead of panicking on the failed write. Call it first in `main`, before any thread exists.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL is a valid disposition for SIGPIPE, no handler code is installed, and
    // the caller runs before any other thread exists, so nothing races on signal dispositions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
