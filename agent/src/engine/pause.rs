//! PID 1 of a pod's shared process namespace (`caas-agent pause`, named `caas-pause` in its argv): it
//! holds the namespace open and reaps the processes orphaned in it, as a pause container's
//! process does. SIGTERM or SIGINT end it, and with it every process of the namespace.

use nix::sys::{
    signal::{SigSet, Signal},
    wait::{WaitPidFlag, WaitStatus, waitpid},
};

/// Confines itself to `root` ([`super::ns::confine_pause`]), then runs until SIGTERM or
/// SIGINT. It ends at once if it cannot confine itself.
pub fn main(root: &std::path::Path) -> ! {
    if let Err(e) = super::ns::confine_pause(root) {
        eprintln!("caas-pause: {e}");
        // SAFETY: _exit ends the process at once.
        unsafe { libc::_exit(1) }
    }
    // Tells the engine it is confined (no descriptor there when run by hand: nothing to tell).
    // SAFETY: plain system calls on a descriptor number that nothing else in this process
    // uses; both fail harmlessly when it is not open.
    unsafe {
        libc::write(super::ns::PAUSE_READY_FD, b"1".as_ptr().cast(), 1);
        libc::close(super::ns::PAUSE_READY_FD);
    }
    run()
}

/// Runs until SIGTERM or SIGINT. The signals are blocked and waited for, so none is missed
/// between a reap and the wait.
fn run() -> ! {
    let mut set = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        set.add(s);
    }
    let _ = set.thread_block();
    loop {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if let Ok(Signal::SIGTERM | Signal::SIGINT) = set.wait() {
            // SAFETY: _exit ends the process at once.
            unsafe { libc::_exit(0) }
        }
    }
}
