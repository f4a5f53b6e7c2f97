//! The tenant's user and network namespaces. Made once per tenant and kept alive by bind mounts
//! under `<run_dir>/tenants/<id>/ns/`, so they outlive any one engine process; every container of
//! the tenant joins both by path. The netns is owned by the tenant's userns, so tenant root may
//! configure it and mount sysfs for it, and nothing else.

use std::{
    fs,
    io::Read,
    os::fd::{AsRawFd, OwnedFd},
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
    let (to_parent_r, to_parent_w) = nix::unistd::pipe().map_err(|e| step("pipe")(errno(e)))?;
    let (to_child_r, to_child_w) = nix::unistd::pipe().map_err(|e| step("pipe")(errno(e)))?;
    // The child uses its copies of the descriptors by reference; they close when it exits.
    let child = crate::sys::fork_and_run(|| {
        if nix::sched::unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET).is_err() {
            return 1;
        }
        // Root of the new userns holds CAP_NET_ADMIN over the new netns: bring loopback up.
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
                "the namespace child failed to unshare user+net",
            )));
        }
        if ready[0] != b'1' {
            tracing::warn!("could not bring loopback up in the tenant netns");
        }
        let map = format!("0 {id_start} {RANGE_SIZE}\n");
        fs::write(format!("/proc/{child}/uid_map"), &map).map_err(step("writing uid_map"))?;
        fs::write(format!("/proc/{child}/gid_map"), &map).map_err(step("writing gid_map"))?;
        for (kind, target) in [("user", &user), ("net", &net)] {
            let src = format!("/proc/{child}/ns/{kind}");
            nix::mount::mount(
                Some(src.as_str()),
                target.as_path(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| step("bind-mounting a namespace")(errno(e)))?;
        }
        Ok(())
    })();
    let _ = nix::unistd::write(&to_child_w, b"1");
    drop::<OwnedFd>(to_child_w);
    let _ = waitpid(child, None);
    if result.is_err() {
        release(ns_dir);
    }
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
    let (to_parent_r, to_parent_w) = nix::unistd::pipe().map_err(|e| step("pipe")(errno(e)))?;
    let (to_child_r, to_child_w) = nix::unistd::pipe().map_err(|e| step("pipe")(errno(e)))?;
    let child = crate::sys::fork_and_run(|| {
        if nix::sched::setns(&user, CloneFlags::CLONE_NEWUSER).is_err()
            || nix::sched::unshare(CloneFlags::CLONE_NEWNET).is_err()
        {
            return 1;
        }
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
        if n != 1 || ready[0] != b'1' {
            return Err(step("unshare")(std::io::Error::other(
                "the namespace child failed to make a netns in the tenant's userns with loopback up",
            )));
        }
        let src = format!("/proc/{child}/ns/net");
        nix::mount::mount(
            Some(src.as_str()),
            path.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| step("bind-mounting a namespace")(errno(e)))
    })();
    let _ = nix::unistd::write(&to_child_w, b"1");
    drop::<OwnedFd>(to_child_w);
    let _ = waitpid(child, None);
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
