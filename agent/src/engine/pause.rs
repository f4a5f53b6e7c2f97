//! PID 1 of a pod's shared process namespace (`caas-agent pause`, named `caas-pause` in its argv): it
//! holds the namespace open and reaps the processes orphaned in it, as a pause container's
//! process does. SIGTERM or SIGINT end it, and with it every process of the namespace.

use nix::sys::{
    signal::{SigSet, Signal},
    wait::{WaitPidFlag, WaitStatus, waitpid},
};

/// Runs until SIGTERM or SIGINT. The signals are blocked and waited for, so none is missed
/// between a reap and the wait.
pub fn run() -> ! {
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
            std::process::exit(0)
        }
    }
}
