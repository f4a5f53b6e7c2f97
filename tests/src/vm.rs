//! Booting a guest for the VM tests and benches: QEMU `microvm` under the accelerator that works
//! here (TCG), the guest kernel that `scripts/guest-kernel.sh` fetched, and the agent's own
//! initramfs.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use caas_agent::{
    client::{self, Target},
    vm::initramfs,
};
use caas_proto::engine::v1::{self as epb, engine_client::EngineClient};
use tonic::transport::Channel;

/// Where `scripts/guest-kernel.sh` puts the guest kernel (`$CAAS_GUEST_DIR` overrides it).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("CAAS_GUEST_DIR")
        .map_or_else(|| PathBuf::from("/var/lib/caas-agent/guest"), PathBuf::from)
}

/// Sets an agent config up for VM tenants as the tests run them: QEMU `microvm` under TCG, one
/// vCPU, 256 MiB, the guest kernel and modules of `scripts/guest-kernel.sh`, 512 MiB disks.
pub fn configure(c: &mut caas_agent::config::Config) {
    let g = guest_dir();
    let qemu = vmm_config::QemuMicrovm {
        accel: vmm_config::Accel::Tcg,
        ..Default::default()
    };
    let mut vm = vmm_config::VmConfig::new(vmm_config::Backend::Qemu(qemu), g.join("vmlinux"));
    vm.vcpus = 1;
    vm.memory_mib = 256;
    c.vm = Some(vm);
    c.tenants.vm_modules_dir = Some(g.join("modules"));
    c.tenants.vm_disk_mib = 512;
}

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Whether a VM test can run: root, QEMU and the guest kernel. Otherwise records the skip, or
/// fails when privileged tests are mandatory (CI installs all three).
pub fn vm_available(test: &str) -> bool {
    if !crate::require_root(test) {
        return false;
    }
    let missing = if Command::new(QEMU).arg("--version").output().is_err() {
        Some(format!(
            "{QEMU} is not installed (Debian package qemu-system-x86)"
        ))
    } else if !guest_dir().join("vmlinux").exists() {
        Some(format!(
            "no guest kernel in {} (run scripts/guest-kernel.sh)",
            guest_dir().display()
        ))
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) => {
            assert!(
                !crate::privileged_required(),
                "{test}: {why}, and CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory"
            );
            crate::skip(test, &why);
            false
        }
    }
}

/// The agent's initramfs for the guest, built (or reused) under `cache`.
pub fn initramfs(cache: &Path) -> anyhow::Result<initramfs::Built> {
    let spec = initramfs::Spec {
        binary: crate::bin("caas-agent"),
        modules_dir: Some(guest_dir().join("modules")),
        modules: initramfs::DEFAULT_MODULES
            .iter()
            .map(ToString::to_string)
            .collect(),
        programs: Vec::new(),
    };
    Ok(initramfs::cached(&spec, cache)?)
}

/// A booted guest and its files.
pub struct Guest {
    pub child: Child,
    pub socket: PathBuf,
    pub console: PathBuf,
    pub started: Instant,
}

/// What to boot.
pub struct Boot<'a> {
    pub dir: &'a Path,
    pub initrd: &'a Path,
    /// The kernel command line after the console and timing options.
    pub init_args: &'a str,
    pub disk: Option<&'a Path>,
    pub memory_mib: u32,
}

/// The kernel options every guest here gets: a serial console, power off on panic, and a fixed
/// TSC frequency (without it a TCG microvm guest randomly hangs at "Marking TSC unstable").
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 tsc_early_khz=2400000 no_timer_check quiet";

impl Guest {
    /// Starts QEMU; the guest's engine port is `<dir>/engine.sock`, its console `<dir>/console.log`.
    pub fn boot(b: &Boot<'_>) -> anyhow::Result<Self> {
        let socket = b.dir.join("engine.sock");
        let console = b.dir.join("console.log");
        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "microvm", "-accel", "tcg", "-cpu", "max", "-smp", "1"])
            .args(["-m", &b.memory_mib.to_string()])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(guest_dir().join("vmlinux"))
            .arg("-initrd")
            .arg(b.initrd)
            .arg("-append")
            .arg(format!("{BASE_CMDLINE} {}", b.init_args))
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=engine,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["-device", "virtserialport,chardev=engine,name=caas.engine"]);
        if let Some(d) = b.disk {
            cmd.arg("-drive")
                .arg(format!("id=disk0,file={},format=raw,if=none", d.display()))
                .args(["-device", "virtio-blk-device,drive=disk0"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(b.dir.join("qemu.log"))?)
            .spawn()
            .context("starting qemu")?;
        Ok(Self {
            child,
            socket,
            console,
            started: Instant::now(),
        })
    }

    /// The guest's console output so far, and what QEMU itself said.
    pub fn console_text(&self) -> String {
        let qemu = self.console.with_file_name("qemu.log");
        format!(
            "{}\n[qemu] {}",
            std::fs::read_to_string(&self.console).unwrap_or_default(),
            std::fs::read_to_string(qemu).unwrap_or_default().trim()
        )
    }

    /// Connects to the guest's engine once it answers `Info`, within `within`.
    pub async fn engine(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<(EngineClient<Channel>, epb::EngineInfo)> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!(
                    "qemu exited ({st}) before the engine answered; console:\n{}",
                    self.console_text()
                );
            }
            if self.socket.exists()
                && let Ok(ch) = client::connect(&Target::Relayed(self.socket.clone())).await
            {
                let mut c = EngineClient::new(ch);
                let info =
                    tokio::time::timeout(Duration::from_secs(5), c.info(epb::InfoRequest {})).await;
                if let Ok(Ok(info)) = info {
                    return Ok((c, info.into_inner()));
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest engine did not answer within {within:?}; console:\n{}",
                    self.console_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for QEMU to exit, within `within`; kills it after that.
    pub fn wait_exit(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "qemu did not exit within {within:?}; console:\n{}",
                    self.console_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A raw disk image of `mib` MiB with an empty ext4 file system (what the agent gives a tenant).
pub fn make_disk(path: &Path, mib: u64) -> anyhow::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(path)
        .output()
        .context("running mkfs.ext4")?;
    if !out.status.success() {
        bail!("mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
