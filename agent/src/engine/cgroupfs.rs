//! A container's `/sys/fs/cgroup` on a v1 (or hybrid) host, made by the engine.
//!
//! What the container sees is what libcontainer would give it for the spec's `cgroup` mount: a
//! tmpfs holding, for each v1 hierarchy, a bind of the container's own cgroup directory there
//! (the same cgroup its processes are in, so `memory.limit_in_bytes` and the like show its
//! limits, and a runtime such as the JVM finds them through mountinfo and `/proc/self/cgroup`).
//! Two differences, both Docker's and runc's defaults: the whole view is read-only (the tmpfs and
//! every hierarchy), and it is made here, by host root, not by the container's init.
//!
//! Why: libcontainer's init makes that view with a tmpfs and one bind per hierarchy, each
//! through its checked-path mount code (tens of syscalls per mount: procfs handle checks,
//! `openat2` of every component, mountinfo reads). On this host's nine hierarchies that was
//! about 1 ms of every container's creation. The engine makes the same mounts with plain
//! syscalls into a staging directory (a private mount, see [`super::volumes`]), and the spec
//! binds the finished view in as one recursive bind.
//!
//! The container's mount namespace is owned by the tenant's user namespace, so the binds it
//! receives from here are locked in it: it can neither unmount one to look under it nor make a
//! read-only one writable.
//!
//! The view lives in the engine's mount namespace only while the container is made
//! ([`release`] once libcontainer is done): the container's namespace has a copy of its own by
//! then (private mounts, so the unmount does not reach it), and the engine's namespace, which
//! every new container copies whole, does not grow by ten mounts per running container.

use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::mount::MsFlags;

/// The controllers libcontainer's v1 manager moves a container into (its `CONTROLLERS`): in a
/// hierarchy with any of them the container's cgroup is its own, elsewhere it is the engine's.
const MANAGED: [&str; 12] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "memory",
    "pids",
    "perf_event",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// One v1 hierarchy as a container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its directory under the cgroup root (`memory`, `cpu,cpuacct`, `systemd`).
    pub name: String,
    /// Whether the container has a cgroup of its own here.
    pub managed: bool,
    /// Otherwise the cgroup the container inherits: the engine's, relative to the hierarchy.
    pub inherited: String,
}

/// The hierarchies a container's view holds, found once when the engine starts.
#[derive(Debug, Clone)]
pub struct View {
    root: PathBuf,
    hierarchies: Vec<Hierarchy>,
}

impl View {
    /// The view for the hierarchy directories `dirs` under `root`, from this process's
    /// `/proc/self/cgroup` and that of the host's PID 1 (whose path is taken off every path,
    /// as libcontainer does when it runs inside a container). None when they cannot be read.
    pub fn detect(root: &Path, dirs: &[PathBuf]) -> Option<Self> {
        let own = fs::read_to_string("/proc/self/cgroup").ok()?;
        let init = fs::read_to_string("/proc/1/cgroup").unwrap_or_default();
        let names: Vec<String> = dirs
            .iter()
            .filter_map(|d| d.file_name()?.to_str().map(str::to_string))
            .collect();
        Some(Self {
            root: root.to_path_buf(),
            hierarchies: hierarchies(&names, &own, &init),
        })
    }

    pub fn hierarchies(&self) -> &[Hierarchy] {
        &self.hierarchies
    }

    /// Makes the view of a container whose cgroup is `cgroup` (absolute, as its spec's
    /// `cgroupsPath`) at `at`, a new directory under a private mount. Creates the container's
    /// cgroup directories (libcontainer finds them made). On error the caller unmounts what is
    /// under `at` ([`super::volumes::unstage`]) and removes the cgroup directories.
    pub fn stage(&self, at: &Path, cgroup: &str) -> Result<(), String> {
        let err = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
            format!("the container's cgroup view: {what} {}: {e}", p.display())
        };
        fs::create_dir(at).map_err(|e| err("creating", at, &e))?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            flags,
            Some("mode=755,size=64k"),
        )
        .map_err(|e| err("mounting a tmpfs on", at, &e))?;
        let own = cgroup.trim_start_matches('/');
        for h in &self.hierarchies {
            let source = if h.managed {
                let p = self.root.join(&h.name).join(own);
                fs::create_dir_all(&p).map_err(|e| err("creating", &p, &e))?;
                p
            } else {
                self.root
                    .join(&h.name)
                    .join(h.inherited.trim_start_matches('/'))
            };
            let target = at.join(&h.name);
            fs::create_dir(&target).map_err(|e| err("creating", &target, &e))?;
            nix::mount::mount(
                Some(&source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| err("binding", &source, &e))?;
            nix::mount::mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
                None::<&str>,
            )
            .map_err(|e| err("making read-only", &target, &e))?;
            // A hierarchy of several controllers is found by each name too, as on the host.
            for part in h.name.split(',').filter(|p| *p != h.name) {
                let link = at.join(part);
                std::os::unix::fs::symlink(&h.name, &link)
                    .map_err(|e| err("linking", &link, &e))?;
            }
        }
        nix::mount::mount(
            None::<&str>,
            at,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
            Some("mode=755,size=64k"),
        )
        .map_err(|e| err("making read-only", at, &e))
    }

    /// Removes the container's cgroup directories that [`View::stage`] made, where they are
    /// empty (a failed create; a created container's go with its delete).
    pub fn remove_cgroups(&self, cgroup: &str) {
        let own = cgroup.trim_start_matches('/');
        for h in self.hierarchies.iter().filter(|h| h.managed) {
            let _ = fs::remove_dir(self.root.join(&h.name).join(own));
        }
    }
}

/// Unmounts a view made by [`View::stage`] from the engine's mount namespace (the whole tree
/// at once) and removes its directory. Containers made with it keep their copies.
pub fn release(at: &Path) {
    if let Err(e) = nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH) {
        tracing::debug!(view = %at.display(), error = %e, "unmounting a cgroup view");
    }
    let _ = fs::remove_dir(at);
}

/// The hierarchies among the directory `names` that appear in `own` (a `/proc/PID/cgroup`),
/// with the paths of `own` less the prefix that `init`'s path in the same hierarchy gives.
/// A directory is matched by its controllers (`cpu,cpuacct`); `systemd` by `name=systemd`.
fn hierarchies(names: &[String], own: &str, init: &str) -> Vec<Hierarchy> {
    let paths = |text: &str| -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
                // The cgroup2 line (`0::/…`) has no controllers: not a v1 hierarchy.
                (!ctl.is_empty()).then(|| (ctl.to_string(), path.to_string()))
            })
            .collect()
    };
    let (own, init) = (paths(own), paths(init));
    let mut out = Vec::new();
    for name in names {
        let key = if name == "systemd" {
            "name=systemd".to_string()
        } else {
            name.clone()
        };
        let Some((_, path)) = own.iter().find(|(c, _)| *c == key) else {
            continue;
        };
        let prefix = init
            .iter()
            .find(|(c, _)| *c == key)
            .map_or("", |(_, p)| p.as_str());
        let inherited = match Path::new(path).strip_prefix(prefix) {
            Ok(rest) if !matches!(prefix, "" | "/") => format!("/{}", rest.display()),
            _ => path.clone(),
        };
        out.push(Hierarchy {
            name: name.clone(),
            managed: name != "systemd" && name.split(',').any(|c| MANAGED.contains(&c)),
            inherited,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn hierarchies_are_matched_by_controllers_and_named_systemd() {
        let own = "9:pids:/caas.slice/engine\n8:cpu,cpuacct:/caas.slice/engine\n\
                   1:name=systemd:/system.slice/caas.service\n0::/system.slice/caas.service\n\
                   5:rdma:/\n";
        let init =
            "9:pids:/\n8:cpu,cpuacct:/\n1:name=systemd:/init.scope\n0::/init.scope\n5:rdma:/\n";
        let h = hierarchies(
            &names(&["cpu,cpuacct", "pids", "systemd", "rdma", "gone"]),
            own,
            init,
        );
        assert_eq!(
            h,
            vec![
                Hierarchy {
                    name: "cpu,cpuacct".into(),
                    managed: true,
                    inherited: "/caas.slice/engine".into()
                },
                Hierarchy {
                    name: "pids".into(),
                    managed: true,
                    inherited: "/caas.slice/engine".into()
                },
                // Neither is a controller libcontainer moves a container into: it inherits
                // the engine's cgroup there.
                Hierarchy {
                    name: "rdma".into(),
                    managed: false,
                    inherited: "/".into()
                },
                Hierarchy {
                    name: "systemd".into(),
                    managed: false,
                    inherited: "/system.slice/caas.service".into()
                },
            ]
        );
    }

    #[test]
    fn the_host_init_path_is_taken_off_as_libcontainer_does() {
        // The agent itself in a container whose cgroups are mounted at its own cgroup.
        let own = "4:memory:/docker/abc/caas.slice/engine\n";
        let init = "4:memory:/docker/abc\n";
        let h = hierarchies(&names(&["memory"]), own, init);
        assert_eq!(h[0].inherited, "/caas.slice/engine");
        // A path outside the init's is kept whole.
        let h = hierarchies(&names(&["memory"]), "4:memory:/elsewhere\n", init);
        assert_eq!(h[0].inherited, "/elsewhere");
    }
}
