//! Starting, reaching and stopping a VM tenant's microVM, whose init runs the tenant's engine
//! (see [`crate::guest`]). The VMM's unix socket for the engine port sits where a userns
//! tenant's engine socket would, so the engine client is the same for both.
//!
//! Per tenant:
//! - `<state_dir>/engines/<id>/disk.img`: the tenant's ext4 disk (the engine's state and
//!   container layers), sparse, made on first boot and kept across reboots;
//! - `<state_dir>/engines/<id>/console.log` (the guest's serial console; the previous boot's is
//!   `console.previous.log`) and `vmm.log`;
//! - `<run_dir>/tenants/<id>/engine.sock` (the engine port), `qmp.sock`, and `vmm.pid`
//!   (`pid start-time`), by which a restarted agent finds the VMM again.
//!
//! The VMM runs in its own process group (it outlives the agent) and in the tenant's cgroup
//! (`<tenant>/vmm`), which it joins itself between fork and exec, so the host meter bills the
//! whole VM.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use caas_proto::engine::v1::{self as epb, engine_client::EngineClient};
use tonic::transport::Channel;

use super::engine_proc::EngineProcess;
use crate::{
    client::{self, Target},
    guest::ENGINE_PORT,
    vm::initramfs,
};

/// How to start one tenant's VM.
#[derive(Debug, Clone)]
pub struct VmSpawn {
    /// Tenant id.
    pub tenant: String,
    /// First id of the tenant's range (the guest's containers use the same range).
    pub id_start: u32,
    /// The operator's VM template (`[vm]`); per-tenant paths are filled in here. None when the
    /// node has no `[vm]` any more: the VM can still be found and stopped, not booted.
    pub machine: Option<vmm_config::VmConfig>,
    /// The guest kernel's modules, for the initramfs.
    pub modules_dir: Option<PathBuf>,
    /// The binary that becomes the guest's init and engine.
    pub engine_binary: PathBuf,
    /// Size of a new tenant disk.
    pub disk_mib: u64,
    /// `<state_dir>/engines/<id>`.
    pub state: PathBuf,
    /// `<run_dir>/tenants/<id>`.
    pub run: PathBuf,
    /// Where built initramfs archives are kept (`<state_dir>/vm`).
    pub cache: PathBuf,
    /// The `cgroup.procs` files the VMM joins.
    pub cgroup_procs: Vec<PathBuf>,
    /// How long a boot may take until the engine answers.
    pub boot_timeout: Duration,
    /// The tenant's network, when it has one.
    pub net: Option<GuestNet>,
    /// Pods get network namespaces of their own in the guest (`[cri.cni]` on).
    pub pod_networks: bool,
}

/// A VM tenant's network: a tap device on the host, the guest's card in the tenant netns.
#[derive(Debug, Clone)]
pub struct GuestNet {
    /// The tenant's subnet.
    pub subnet: crate::tenants::subnet::Ipv4Net,
    /// Name servers for the containers.
    pub dns: Vec<std::net::Ipv4Addr>,
}

impl VmSpawn {
    /// The engine port's host socket.
    pub fn socket(&self) -> PathBuf {
        self.run.join("engine.sock")
    }
    fn pid_file(&self) -> PathBuf {
        self.run.join("vmm.pid")
    }
    fn disk(&self) -> PathBuf {
        self.state.join("disk.img")
    }
    fn console(&self) -> PathBuf {
        self.state.join("console.log")
    }
    fn vmm_log(&self) -> PathBuf {
        self.state.join("vmm.log")
    }

    /// The VMM that runs this tenant's VM, if one does.
    pub fn process(&self) -> Option<EngineProcess> {
        let rec = std::fs::read_to_string(self.pid_file()).ok()?;
        EngineProcess::from_record(&rec)
    }

    /// This tenant's machine: the template with its initramfs, disk, engine port, console and
    /// QMP socket, and the kernel command line that starts the guest init.
    fn machine(&self, initrd: &Path) -> Result<vmm_config::Prepared, String> {
        let mut m = self.machine.clone().ok_or_else(|| {
            "this node's agent config has no [vm] section any more; a VM tenant cannot boot"
                .to_string()
        })?;
        m.initrd = Some(initrd.to_path_buf());
        m.disks = vec![vmm_config::Disk {
            path: self.disk(),
            read_only: false,
            format: vmm_config::DiskFormat::Raw,
        }];
        m.ports = vec![vmm_config::Port {
            name: ENGINE_PORT.to_string(),
            socket: self.socket(),
        }];
        m.serial = vmm_config::Serial::File(self.console());
        if let vmm_config::Backend::Qemu(q) = &mut m.backend {
            q.qmp_socket = Some(self.run.join("qmp.sock"));
        }
        m.tap = self
            .net
            .as_ref()
            .map(|_| crate::net::link_name(&self.tenant));
        let base = match &m.cmdline {
            Some(c) => c.clone(),
            None => {
                let mut probe = m.clone();
                probe.cmdline = None;
                probe
                    .prepare()
                    .map_err(|e| e.to_string())?
                    .cmdline()
                    .to_string()
            }
        };
        let mut guest = format!(
            "{base} rdinit={} -- guest --tenant {} --id-start {} --disk /dev/vda",
            initramfs::GUEST_BINARY,
            self.tenant,
            self.id_start
        );
        if let Some(n) = &self.net {
            guest.push_str(&format!(" --net {}", n.subnet));
            if !n.dns.is_empty() {
                let dns: Vec<String> = n.dns.iter().map(ToString::to_string).collect();
                guest.push_str(&format!(" --dns {}", dns.join(",")));
            }
        }
        m.cmdline = Some(guest);
        let p = m.prepare().map_err(|e| e.to_string())?;
        p.validate_host().map_err(|e| e.to_string())?;
        Ok(p)
    }
}

/// The guest's initramfs for `engine_binary`, built once and then reused from `cache`. With
/// `pod_networks` (`[cri.cni]` on) it also carries what pods' own network namespaces need in
/// the guest: the bridge, veth and nftables NAT modules, and the host's nft.
async fn guest_initramfs(
    engine_binary: &Path,
    modules_dir: Option<&Path>,
    cache: &Path,
    pod_networks: bool,
) -> Result<initramfs::Built, String> {
    let mut modules: Vec<String> = initramfs::DEFAULT_MODULES
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut programs = Vec::new();
    if pod_networks {
        modules.extend(
            initramfs::POD_NETWORK_MODULES
                .iter()
                .map(ToString::to_string),
        );
        let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or(
                "pods of VM tenants ([cri.cni] enabled) need nft in the guest, copied from the host: install nftables",
            )?;
        programs.push((nft, PathBuf::from(initramfs::GUEST_NFT)));
    }
    let spec = initramfs::Spec {
        binary: engine_binary.to_path_buf(),
        modules_dir: modules_dir.map(Path::to_path_buf),
        modules,
        programs,
    };
    let cache = cache.to_path_buf();
    crate::blocking::run(
        "building the guest initramfs",
        Duration::from_secs(120),
        move || initramfs::cached(&spec, &cache),
    )
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Whether a guest really boots to its init under KVM here: boots the guest kernel with the
/// agent's initramfs in probe mode (`caas-agent guest --probe`, which prints
/// [`crate::guest::PROBE_LINE`] and powers off) and reads its console. `/dev/kvm` existing, or
/// even KVM initializing in the VMM, is not enough: on some hosts (PVM) a vCPU cannot be set up,
/// or an unmodified guest dies in instruction emulation.
pub async fn probe_kvm(
    machine: &vmm_config::VmConfig,
    modules_dir: Option<&Path>,
    engine_binary: &Path,
    cache: &Path,
    dir: &Path,
    pod_networks: bool,
) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    crate::fsutil::ensure_dir(dir, 0o700).map_err(|e| format!("{}: {e}", dir.display()))?;
    let built = guest_initramfs(engine_binary, modules_dir, cache, pod_networks).await?;
    let mut m = machine.clone();
    if let vmm_config::Backend::Qemu(q) = &mut m.backend {
        q.accel = vmm_config::Accel::Kvm;
        q.tb_size_mib = None; // a TCG setting, refused with kvm
        q.qmp_socket = None;
    }
    let console = dir.join("console.log");
    m.initrd = Some(built.path);
    m.disks = Vec::new();
    m.ports = vec![vmm_config::Port {
        name: ENGINE_PORT.to_string(),
        socket: dir.join("engine.sock"),
    }];
    m.serial = vmm_config::Serial::File(console.clone());
    let mut base = m.clone();
    base.cmdline = None;
    let base = base
        .prepare()
        .map_err(|e| e.to_string())?
        .cmdline()
        .to_string();
    m.cmdline = Some(format!(
        "{base} rdinit={} -- guest --probe",
        initramfs::GUEST_BINARY
    ));
    let p = m.prepare().map_err(|e| e.to_string())?;
    p.validate_host().map_err(|e| e.to_string())?;
    let launch = p.render();
    let Some((program, args)) = launch.argv.split_first() else {
        return Err("the VM configuration rendered no command".into());
    };
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", Path::new(program).display()))?;
    let waited = tokio::time::timeout(Duration::from_secs(30), out.wait_with_output()).await;
    let said = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_dir_all(dir);
    match waited {
        _ if said.contains(crate::guest::PROBE_LINE) => Ok(()),
        Ok(Ok(o)) => Err(format!(
            "the KVM guest did not reach its init ({}; {})",
            o.status,
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .chain(said.lines())
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("no output")
        )),
        Ok(Err(e)) => Err(format!("waiting for the probe VM: {e}")),
        Err(_) => Err("the KVM guest did not reach its init within 30 s".into()),
    }
}

/// What can be checked of the node's VM template before a tenant is made: the VMM binary and
/// the kernel exist (the error names the field), and the guest's modules directory is there.
pub fn check_host(
    machine: &vmm_config::VmConfig,
    modules_dir: Option<&Path>,
) -> Result<(), String> {
    let mut probe = machine.clone();
    probe.ports = vec![vmm_config::Port {
        name: ENGINE_PORT.to_string(),
        socket: PathBuf::from("/engine.sock"),
    }];
    probe
        .prepare()
        .and_then(|p| p.validate_host())
        .map_err(|e| e.to_string())?;
    if let Some(d) = modules_dir
        && !d.is_dir()
    {
        return Err(format!(
            "tenants.vm_modules_dir: {} is not a directory (scripts/guest-kernel.sh puts the guest kernel's modules there)",
            d.display()
        ));
    }
    Ok(())
}

/// A channel to the tenant's engine inside a running VM, and the VMM process; None when no VM
/// runs or its engine does not answer.
pub async fn connect(s: &VmSpawn) -> Option<(Channel, EngineProcess)> {
    let process = s.process()?;
    let ch = client::connect(&Target::Relayed(s.socket())).await.ok()?;
    let mut c = EngineClient::new(ch.clone());
    let info = tokio::time::timeout(Duration::from_secs(10), c.info(epb::InfoRequest {}))
        .await
        .ok()?
        .ok()?;
    (info.into_inner().tenant == s.tenant).then_some((ch, process))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

/// Makes the tenant's disk when it has none: a sparse file with an empty ext4.
async fn ensure_disk(s: &VmSpawn) -> Result<(), String> {
    let disk = s.disk();
    if disk.exists() {
        return Ok(());
    }
    let tmp = disk.with_extension("img.tmp");
    let made = async {
        let f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.set_len(s.disk_mib << 20)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        drop(f);
        let out = tokio::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "caas-tenant"])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(&tmp)
            .output()
            .await
            .map_err(|e| format!("running mkfs.ext4 (Debian package e2fsprogs): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mkfs.ext4 {}: {}",
                tmp.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        std::fs::rename(&tmp, &disk).map_err(|e| format!("{}: {e}", disk.display()))
    }
    .await;
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// Kills every process in the tenant's VMM cgroup (a VMM nobody tracks any more, say one whose
/// pid file was lost) and waits until they are gone: two VMMs must never share a disk.
async fn kill_strays(s: &VmSpawn) {
    for _ in 0..100 {
        let pids: Vec<i32> = s
            .cgroup_procs
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        if pids.is_empty() {
            return;
        }
        for p in pids {
            tracing::warn!(tenant = %s.tenant, pid = p, "killing a stray process in the VMM cgroup");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `process` exits, up to `limit`; then kills it and waits for that.
async fn end(process: EngineProcess, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while process.alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if process.alive() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(process.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        for _ in 0..100 {
            if !process.alive() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Makes sure the tenant's VM runs and its engine answers: a VM that runs already (still booting,
/// say, when a restarted agent comes back) gets until the boot timeout to answer, then is killed
/// and booted again; otherwise the VM is booted.
pub async fn spawn(s: &VmSpawn) -> Result<(Channel, EngineProcess), String> {
    if let Some(running) = s.process() {
        let deadline = tokio::time::Instant::now() + s.boot_timeout;
        while running.alive() && tokio::time::Instant::now() < deadline {
            if let Some(found) = connect(s).await {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if running.alive() {
            tracing::warn!(tenant = %s.tenant, "the tenant's VM does not answer; killing it to boot again");
        }
        end(running, Duration::ZERO).await;
    }
    kill_strays(s).await;
    boot(s).await
}

/// Boots the tenant's VM and waits until its engine answers.
async fn boot(s: &VmSpawn) -> Result<(Channel, EngineProcess), String> {
    for (d, mode) in [(&s.state, 0o700), (&s.run, 0o711)] {
        crate::fsutil::ensure_dir(d, mode).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    ensure_disk(s).await?;
    let built = guest_initramfs(
        &s.engine_binary,
        s.modules_dir.as_deref(),
        &s.cache,
        s.pod_networks,
    )
    .await?;
    let launch = s.machine(&built.path)?.render();
    if let Some(n) = &s.net {
        // The tap before the VMM, which attaches to it by name.
        crate::net::ensure_tap(&s.tenant, n.subnet)
            .await
            .map_err(|e| e.to_string())?;
    }
    for f in &launch.files {
        std::fs::write(&f.path, &f.contents).map_err(|e| format!("{}: {e}", f.path.display()))?;
    }
    let _ = std::fs::remove_file(s.socket());
    // The VMM truncates the console file: keep the previous boot's (a crash's last words).
    let _ = std::fs::rename(s.console(), s.state.join("console.previous.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.vmm_log())
        .map_err(|e| format!("{}: {e}", s.vmm_log().display()))?;
    let Some((program, args)) = launch.argv.split_first() else {
        return Err("the VM configuration rendered no command".into());
    };
    let procs: Vec<CString> = s
        .cgroup_procs
        .iter()
        .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on
    // buffers made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if !ok {
                    return Err(err);
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "starting {} in the cgroups {}: {e}",
            Path::new(program).display(),
            s.cgroup_procs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let Some(process) = child.id().and_then(EngineProcess::of) else {
        let _ = child.wait().await;
        return Err(format!("the VMM exited at once: {}", tail(&s.vmm_log(), 3)));
    };
    if let Err(e) =
        crate::fsutil::write_replace_volatile(&s.pid_file(), process.to_record().as_bytes(), 0o600)
    {
        // Untracked, it would hold the disk for ever.
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(format!("{}: {e}", s.pid_file().display()));
    }
    let deadline = tokio::time::Instant::now() + s.boot_timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let _ = std::fs::remove_file(s.pid_file());
            return Err(format!(
                "the VMM exited with {st} before the guest engine answered: {} (console: {})",
                tail(&s.vmm_log(), 3),
                tail(&s.console(), 3)
            ));
        }
        if s.socket().exists()
            && let Some(found) = connect(s).await
        {
            // Reap it when it exits, so no zombie is left while the agent runs.
            let tenant = s.tenant.clone();
            tokio::spawn(async move {
                if let Ok(st) = child.wait().await {
                    tracing::info!(%tenant, status = %st, "tenant VM exited");
                }
            });
            return Ok(found);
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let _ = std::fs::remove_file(s.pid_file());
            return Err(format!(
                "the guest engine did not answer within {:?} (console: {})",
                s.boot_timeout,
                tail(&s.console(), 3)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shuts the VM down: the engine stops every container and exits, the guest init unmounts the
/// disk and powers off, the VMM exits. A VMM still running 30 s after a shutdown call that
/// worked, or 10 s after SIGTERM when the call failed, is killed; so is anything else left in
/// the VMM's cgroup.
pub async fn stop(s: &VmSpawn, client: Option<EngineClient<Channel>>) {
    if let Some(process) = s.process() {
        let client = match client {
            Some(c) => Some(c),
            None => connect(s).await.map(|(ch, _)| EngineClient::new(ch)),
        };
        let asked = match client {
            Some(mut c) => {
                let call = c.shutdown(epb::ShutdownRequest {
                    kill_containers: true,
                });
                match tokio::time::timeout(Duration::from_secs(20), call).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => {
                        tracing::warn!(tenant = %s.tenant, error = %e, "engine shutdown call failed");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(tenant = %s.tenant, "engine shutdown call timed out");
                        false
                    }
                }
            }
            None => false,
        };
        if asked {
            end(process, Duration::from_secs(30)).await;
        } else {
            // QEMU ends on SIGTERM; the guest's disk was not unmounted, its journal recovers.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(process.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            end(process, Duration::from_secs(10)).await;
        }
    }
    kill_strays(s).await;
    for f in [s.pid_file(), s.socket(), s.run.join("qmp.sock")] {
        let _ = std::fs::remove_file(f);
    }
}
