//! QEMU's `microvm` machine: settings (`[vm.qemu]`), their defaults and checks, and the argv.
//!
//! The argv is the form known to boot our guest on the CI machines, which have no usable KVM and
//! run the guest under TCG:
//!
//! ```text
//! qemu-system-x86_64 -M microvm -accel tcg -cpu max -smp 1 -m 256M
//!   -nodefaults -no-user-config -display none -no-reboot
//!   -kernel vmlinux -initrd initrd.img -append "console=ttyS0 ..."
//! ```
//!
//! `-nodefaults` removes the default monitor, serial, parallel port and network card, and
//! `-display none` the window; everything else is asked for explicitly. We do not use
//! `-nographic`: it connects the serial port and the monitor to QEMU's stdio, and an agent-run
//! QEMU must not have a monitor on its stdio.
//!
//! # Commas
//! QEMU's option syntax (`-drive a=b,c=d`) escapes a comma in a value by doubling it. Paths that
//! go into such options (disks, chardev sockets and files) are written with doubled commas;
//! `-kernel`, `-initrd` and `-append` take their argument whole and get it unchanged. Names
//! (ports, the tap device, the CPU model, machine options) cannot hold a comma at all
//! ([`crate::validate`]). A test runs QEMU on paths with commas to hold us to this.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    BackendKind, ConfigError, Launch, Serial, VmConfig,
    launch::Argv,
    limits::{
        MAX_CPU_MODEL_LEN, MAX_MACHINE_OPTION_LEN, MAX_MACHINE_OPTIONS, MAX_TB_SIZE_MIB,
        MIN_TB_SIZE_MIB,
    },
    validate::{check_binary, check_name, check_range, check_socket_path},
};

/// The binary run when `vm.qemu.binary` is not set.
pub const DEFAULT_QEMU_BINARY: &str = "qemu-system-x86_64";

/// Command line for guests run under TCG.
///
/// `tsc_early_khz=2400000 no_timer_check`: without them a TCG `microvm` guest randomly hangs at
/// "Marking TSC unstable". Under TCG the guest's TSC calibration against the PIT is unreliable;
/// giving the frequency skips the early calibration, and `no_timer_check` skips the IO-APIC timer
/// check that can misjudge a slow emulated timer.
const TCG_CMDLINE: &str = "console=ttyS0 panic=-1 tsc_early_khz=2400000 no_timer_check quiet";
/// Command line for guests under KVM, whose TSC frequency comes from the host.
const KVM_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// `[vm.qemu]`: settings of QEMU's `microvm` machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuMicrovm {
    /// The QEMU binary: a name looked up on `PATH` or an absolute path.
    pub binary: PathBuf,
    /// How guest code runs.
    pub accel: Accel,
    /// The CPU model (`-cpu`); default `host` under KVM, else `max`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Size of TCG's translation cache in MiB (`-accel tcg,tb-size=N`); QEMU's default otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tb_size_mib: Option<u32>,
    /// Extra `microvm` machine properties as `key=value` (`rtc=on`), appended to `-M microvm`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub machine_options: Vec<String>,
    /// A QMP socket QEMU listens on, for a clean shutdown (`system_powerdown`) and queries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qmp_socket: Option<PathBuf>,
}

impl Default for QemuMicrovm {
    fn default() -> Self {
        Self {
            binary: PathBuf::from(DEFAULT_QEMU_BINARY),
            accel: Accel::Tcg,
            cpu: None,
            tb_size_mib: None,
            machine_options: Vec::new(),
            qmp_socket: None,
        }
    }
}

/// How QEMU runs guest code.
///
/// The default is TCG because it is the one that runs everywhere: on the CI machines `/dev/kvm`
/// exists and KVM initializes, but QEMU then aborts while setting up a vCPU ("failed to set MSR
/// 0x10a"). Set `kvm` where KVM guests are known to boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// Software emulation (TCG): slow, but runs where KVM is missing or unusable.
    #[default]
    Tcg,
    /// `-accel kvm -accel tcg`: QEMU takes the first accelerator that initializes. It falls back
    /// to TCG only when KVM fails to initialize, not when KVM initializes and a vCPU then cannot
    /// be set up, which is how KVM fails on the CI machines; probe before relying on it.
    Auto,
}

impl QemuMicrovm {
    /// The CPU model QEMU is given: the configured one, else the default for the accelerator.
    pub fn cpu_model(&self) -> &str {
        match &self.cpu {
            Some(cpu) => cpu,
            // `host` passes the host CPU through and exists only under KVM; `max` is every
            // feature the accelerator can offer, under TCG and KVM alike.
            None if self.accel == Accel::Kvm => "host",
            None => "max",
        }
    }

    pub(crate) fn fill_defaults(&mut self) {
        if self.cpu.is_none() {
            self.cpu = Some(self.cpu_model().to_string());
        }
    }

    pub(crate) fn default_cmdline(&self) -> String {
        match self.accel {
            Accel::Kvm => KVM_CMDLINE.into(),
            // Under auto the guest may end up on TCG; the TSC hint does no harm under KVM, whose
            // kvm-clock the guest prefers anyway.
            Accel::Tcg | Accel::Auto => TCG_CMDLINE.into(),
        }
    }

    pub(crate) fn validate(&self, vm: &VmConfig) -> Result<(), ConfigError> {
        check_binary("vm.qemu.binary", &self.binary)?;
        check_name("vm.qemu.cpu", self.cpu_model(), MAX_CPU_MODEL_LEN)?;
        if let Some(tb) = self.tb_size_mib {
            if self.accel == Accel::Kvm {
                return Err(ConfigError::Conflict {
                    field: "vm.qemu.tb_size_mib".into(),
                    problem: "applies only with vm.qemu.accel = \"tcg\" or \"auto\"",
                });
            }
            check_range(
                "vm.qemu.tb_size_mib",
                tb,
                MIN_TB_SIZE_MIB,
                MAX_TB_SIZE_MIB,
                None,
            )?;
        }
        if self.machine_options.len() > MAX_MACHINE_OPTIONS {
            return Err(ConfigError::TooLong {
                field: "vm.qemu.machine_options".into(),
                len: self.machine_options.len(),
                max: MAX_MACHINE_OPTIONS,
                unit: "entries",
            });
        }
        for (i, opt) in self.machine_options.iter().enumerate() {
            let field = format!("vm.qemu.machine_options[{i}]");
            let (key, value) = opt.split_once('=').ok_or_else(|| ConfigError::BadValue {
                field: field.clone(),
                value: opt.clone(),
                problem: "is not key=value",
            })?;
            check_name(&field, key, MAX_MACHINE_OPTION_LEN)?;
            check_name(&field, value, MAX_MACHINE_OPTION_LEN)?;
        }
        if let Some(qmp) = &self.qmp_socket {
            check_socket_path("vm.qemu.qmp_socket", qmp)?;
        }
        if vm.vsock.is_some() {
            return Err(ConfigError::Unsupported {
                field: "vm.vsock".into(),
                backend: BackendKind::Qemu,
                hint: "the host end of QEMU's vsock is the host kernel, not a unix socket; use \
                       vm.ports (virtio-serial)",
            });
        }
        Ok(())
    }

    /// Host paths of QEMU's own devices, for the distinct-paths check.
    pub(crate) fn paths(&self) -> Vec<(&'static str, &Path)> {
        self.qmp_socket
            .iter()
            .map(|p| ("vm.qemu.qmp_socket", p.as_path()))
            .collect()
    }

    pub(crate) fn render(&self, vm: &VmConfig, cmdline: &str) -> Launch {
        let mut a = Argv::new(&self.binary);
        let mut machine = String::from("microvm");
        for opt in &self.machine_options {
            machine.push(',');
            machine.push_str(opt);
        }
        a.push2("-M", machine);
        let tcg = match self.tb_size_mib {
            Some(n) => format!("tcg,tb-size={n}"),
            None => "tcg".into(),
        };
        match self.accel {
            Accel::Kvm => a.push2("-accel", "kvm"),
            Accel::Tcg => a.push2("-accel", tcg),
            Accel::Auto => {
                a.push2("-accel", "kvm");
                a.push2("-accel", tcg);
            }
        }
        a.push2("-cpu", self.cpu_model());
        a.push2("-smp", vm.vcpus.to_string());
        a.push2("-m", format!("{}M", vm.memory_mib));
        for flag in ["-nodefaults", "-no-user-config"] {
            a.push(flag);
        }
        a.push2("-display", "none");
        // A guest reboot (panic=-1 reboots at once) ends QEMU, so the agent sees the VM stop.
        a.push("-no-reboot");
        a.push2("-kernel", &vm.kernel);
        if let Some(initrd) = &vm.initrd {
            a.push2("-initrd", initrd);
        }
        a.push2("-append", cmdline);
        match &vm.serial {
            Serial::None => {}
            Serial::File(p) => {
                a.push2("-chardev", format!("file,id=serial0,path={}", esc(p)));
                a.push2("-serial", "chardev:serial0");
            }
            Serial::Unix(p) => {
                a.push2("-chardev", listen_socket("serial0", p));
                a.push2("-serial", "chardev:serial0");
            }
        }
        if !vm.ports.is_empty() {
            a.push2("-device", "virtio-serial-device");
        }
        for (i, port) in vm.ports.iter().enumerate() {
            let id = format!("port{i}");
            a.push2("-chardev", listen_socket(&id, &port.socket));
            a.push2(
                "-device",
                format!("virtserialport,chardev={id},name={}", port.name),
            );
        }
        for (i, disk) in vm.disks.iter().enumerate() {
            let ro = if disk.read_only { ",readonly=on" } else { "" };
            a.push2(
                "-drive",
                format!("id=disk{i},file={},format=raw,if=none{ro}", esc(&disk.path)),
            );
            a.push2("-device", format!("virtio-blk-device,drive=disk{i}"));
        }
        if let Some(tap) = &vm.tap {
            a.push2(
                "-netdev",
                format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            );
            a.push2("-device", "virtio-net-device,netdev=net0");
        }
        if let Some(qmp) = &self.qmp_socket {
            a.push2("-chardev", listen_socket("qmp", qmp));
            a.push2("-mon", "chardev=qmp,mode=control");
        }
        Launch {
            argv: a.into_vec(),
            files: Vec::new(),
            stdout: None,
        }
    }
}

/// A chardev QEMU listens on without waiting for a client before it starts the guest. The long
/// form `-chardev socket,path=` rather than `unix:PATH,...`: in the short form a path with `=`
/// before its first comma would be read as an option name.
fn listen_socket(id: &str, path: &Path) -> String {
    format!("socket,id={id},path={},server=on,wait=off", esc(path))
}

/// A path as a value in QEMU's option syntax: commas doubled. Paths are UTF-8 once validated.
fn esc(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, Disk, DiskFormat, testutil::qemu_vm};

    fn qemu(vm: &mut VmConfig) -> &mut QemuMicrovm {
        match &mut vm.backend {
            Backend::Qemu(q) => q,
            other => panic!("not qemu: {other:?}"),
        }
    }

    fn argv(vm: VmConfig) -> Vec<String> {
        let launch = vm.prepare().unwrap().render();
        assert!(launch.files.is_empty() && launch.stdout.is_none());
        launch
            .argv
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    /// The value after the `n`th occurrence of `flag`.
    fn value<'a>(argv: &'a [String], flag: &str, n: usize) -> &'a str {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .nth(n)
            .map(|w| w[1].as_str())
            .unwrap_or_else(|| panic!("no {flag} #{n} in {argv:?}"))
    }

    #[test]
    fn commas_are_doubled_in_option_values_and_kept_in_whole_arguments() {
        let mut vm = qemu_vm();
        vm.kernel = "/srv/a,b/vmlinux".into();
        vm.initrd = Some("/srv/a,b/initrd".into());
        vm.disks.push(Disk {
            path: "/srv/a,b/disk.img".into(),
            read_only: true,
            format: DiskFormat::Raw,
        });
        vm.ports[0].socket = "/run/a,b/engine.sock".into();
        vm.serial = Serial::File("/run/a,b/serial.log".into());
        qemu(&mut vm).qmp_socket = Some("/run/a,b/qmp.sock".into());
        let a = argv(vm);
        assert_eq!(value(&a, "-kernel", 0), "/srv/a,b/vmlinux");
        assert_eq!(value(&a, "-initrd", 0), "/srv/a,b/initrd");
        assert_eq!(
            value(&a, "-drive", 0),
            "id=disk0,file=/srv/a,,b/disk.img,format=raw,if=none,readonly=on"
        );
        assert_eq!(
            value(&a, "-chardev", 0),
            "file,id=serial0,path=/run/a,,b/serial.log"
        );
        assert_eq!(
            value(&a, "-chardev", 1),
            "socket,id=port0,path=/run/a,,b/engine.sock,server=on,wait=off"
        );
        assert_eq!(
            value(&a, "-chardev", 2),
            "socket,id=qmp,path=/run/a,,b/qmp.sock,server=on,wait=off"
        );
    }

    #[test]
    fn the_accelerator_decides_accel_and_cpu() {
        let mut vm = qemu_vm();
        qemu(&mut vm).tb_size_mib = Some(64);
        let a = argv(vm);
        assert_eq!(value(&a, "-accel", 0), "tcg,tb-size=64");
        assert_eq!(value(&a, "-cpu", 0), "max");

        let mut vm = qemu_vm();
        qemu(&mut vm).accel = Accel::Auto;
        let a = argv(vm);
        assert_eq!(
            (value(&a, "-accel", 0), value(&a, "-accel", 1)),
            ("kvm", "tcg")
        );
        assert_eq!(value(&a, "-cpu", 0), "max");

        let mut vm = qemu_vm();
        qemu(&mut vm).accel = Accel::Kvm;
        let a = argv(vm);
        assert_eq!(value(&a, "-accel", 0), "kvm");
        assert_eq!(a.iter().filter(|x| *x == "-accel").count(), 1);
        assert_eq!(value(&a, "-cpu", 0), "host");
    }

    #[test]
    fn tb_size_needs_tcg_and_stays_in_range() {
        let mut vm = qemu_vm();
        qemu(&mut vm).accel = Accel::Kvm;
        qemu(&mut vm).tb_size_mib = Some(64);
        assert_eq!(
            crate::testutil::refusal(vm),
            "vm.qemu.tb_size_mib: applies only with vm.qemu.accel = \"tcg\" or \"auto\""
        );
        let mut vm = qemu_vm();
        qemu(&mut vm).tb_size_mib = Some(0);
        assert_eq!(
            crate::testutil::refusal(vm),
            "vm.qemu.tb_size_mib: 0 is below the minimum of 1"
        );
    }

    #[test]
    fn machine_options_and_cpu_model_are_allowlisted() {
        let mut vm = qemu_vm();
        qemu(&mut vm).machine_options = vec!["rtc=on".into(), "ioapic2=off".into()];
        let a = argv(vm);
        assert_eq!(value(&a, "-M", 0), "microvm,rtc=on,ioapic2=off");
        for bad in ["rtc", "rtc=on,pit=off", "=on", "rtc="] {
            let mut vm = qemu_vm();
            qemu(&mut vm).machine_options = vec![bad.into()];
            let e = crate::testutil::refusal(vm);
            assert!(e.starts_with("vm.qemu.machine_options[0]: "), "{bad}: {e}");
        }
        let mut vm = qemu_vm();
        qemu(&mut vm).cpu = Some("host,+vmx".into());
        assert!(crate::testutil::refusal(vm).starts_with("vm.qemu.cpu: \"host,+vmx\" may only"));
    }

    #[test]
    fn serial_and_devices_render_in_qemu_syntax() {
        let vm = qemu_vm();
        let a = argv(vm);
        assert!(!a.contains(&"-serial".to_string()), "{a:?}");
        assert!(!a.contains(&"-nographic".to_string()), "{a:?}");
        assert_eq!(value(&a, "-device", 0), "virtio-serial-device");
        assert_eq!(
            value(&a, "-device", 1),
            "virtserialport,chardev=port0,name=caas.engine"
        );

        let mut vm = qemu_vm();
        vm.serial = Serial::Unix("/run/vm/serial.sock".into());
        vm.tap = Some("caas-t1".into());
        let a = argv(vm);
        assert_eq!(
            value(&a, "-chardev", 0),
            "socket,id=serial0,path=/run/vm/serial.sock,server=on,wait=off"
        );
        assert_eq!(value(&a, "-serial", 0), "chardev:serial0");
        assert_eq!(
            value(&a, "-netdev", 0),
            "tap,id=net0,ifname=caas-t1,script=no,downscript=no"
        );
        assert_eq!(value(&a, "-device", 2), "virtio-net-device,netdev=net0");
    }
}
