//! The installed QEMU accepts what we render: it parses the argv, loads the kernel and initrd,
//! opens every disk, socket and file, and builds every device, on paths that hold commas. No guest
//! instruction runs: `-S` keeps the vCPUs stopped, QMP confirms the VM never left `prelaunch`,
//! and `quit` ends it. The kernel is a 203-byte ELF that only carries a PVH entry note.
//!
//! Needs `qemu-system-x86_64` on PATH: skipped with a message without it, and failed instead when
//! `CAAS_REQUIRE_PRIVILEGED=1`.
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use vmm_config::{
    Accel, Backend, DEFAULT_QEMU_BINARY, Disk, DiskFormat, Port, QemuMicrovm, Serial, VmConfig,
    limits::ENGINE_PORT_NAME,
};

/// How long QEMU may take to start, and to quit; generous for a loaded build machine.
const DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn qemu_accepts_the_ci_configuration_with_every_device() {
    let Some(binary) = qemu_or_skip("qemu_accepts_the_ci_configuration_with_every_device") else {
        return;
    };
    let dir = comma_dir();
    let mut vm = vm_in(dir.path(), binary, Accel::Tcg);
    vm.serial = Serial::File(dir.path().join("serial,0.log"));
    if let Backend::Qemu(q) = &mut vm.backend {
        q.tb_size_mib = Some(32);
        q.machine_options = vec!["rtc=on".into()];
    }
    vm.ports.push(Port {
        name: "caas.log".into(),
        socket: dir.path().join("log.sock"),
    });
    for (name, read_only) in [("rw,disk.img", false), ("ro,disk.img", true)] {
        fs::write(dir.path().join(name), vec![0u8; 1 << 20]).unwrap();
        vm.disks.push(Disk {
            path: dir.path().join(name),
            read_only,
            format: DiskFormat::Raw,
        });
    }
    start_paused_and_quit(vm, dir.path());
    assert!(dir.path().join("serial,0.log").exists());
}

// Not `auto` or `kvm`: whether QEMU gets through vCPU setup under KVM is the host's health, not
// our rendering (KVM initializes on the CI machines, then the vCPU setup aborts).
#[test]
fn qemu_accepts_a_serial_socket() {
    let Some(binary) = qemu_or_skip("qemu_accepts_a_serial_socket") else {
        return;
    };
    let dir = comma_dir();
    let mut vm = vm_in(dir.path(), binary, Accel::Tcg);
    vm.serial = Serial::Unix(dir.path().join("serial.sock"));
    start_paused_and_quit(vm, dir.path());
}

/// QEMU from PATH, or `None` after recording why the test is skipped.
fn qemu_or_skip(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(DEFAULT_QEMU_BINARY))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = format!("{DEFAULT_QEMU_BINARY} is not on PATH");
        if std::env::var_os("CAAS_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
            panic!("{test}: {why}, and CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory");
        }
        skip(test, &why);
    }
    found
}

/// Records a skip as the workspace's tests do: on stderr, and in `$CAAS_SKIP_LOG` when set,
/// because cargo hides the output of passing tests and a skip must never be silent.
fn skip(test: &str, reason: &str) {
    eprintln!("SKIP {test}: {reason}");
    if let Some(path) = std::env::var_os("CAAS_SKIP_LOG") {
        let log = fs::OpenOptions::new().create(true).append(true).open(path);
        if let Ok(mut log) = log {
            let _ = writeln!(log, "SKIP {test}: {reason}");
        }
    }
}

/// A fresh temp dir whose name holds a comma, so that every rendered path does.
fn comma_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmm-config,qemu-")
        .tempdir()
        .unwrap()
}

fn vm_in(dir: &Path, binary: PathBuf, accel: Accel) -> VmConfig {
    fs::write(dir.join("vmlinux"), pvh_kernel()).unwrap();
    fs::write(dir.join("initrd,img"), b"not an archive; never unpacked").unwrap();
    let mut vm = VmConfig::new(
        Backend::Qemu(QemuMicrovm {
            binary,
            accel,
            qmp_socket: Some(dir.join("qmp,0.sock")),
            ..QemuMicrovm::default()
        }),
        dir.join("vmlinux"),
    );
    vm.memory_mib = vmm_config::limits::MIN_MEMORY_MIB;
    vm.initrd = Some(dir.join("initrd,img"));
    vm.ports.push(Port {
        name: ENGINE_PORT_NAME.into(),
        socket: dir.join("engine,0.sock"),
    });
    vm
}

/// Runs the rendered argv with `-S`, checks over QMP that the VM is built and never ran, quits.
fn start_paused_and_quit(vm: VmConfig, dir: &Path) {
    let prepared = vm.prepare().unwrap();
    prepared.validate_host().unwrap();
    let Backend::Qemu(QemuMicrovm {
        qmp_socket: Some(qmp),
        ..
    }) = &prepared.config().backend
    else {
        panic!("the test config has a QMP socket")
    };
    let mut argv = prepared.render().argv;
    argv.push("-S".into());
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stream = match connect(qmp, &mut child) {
        Ok(s) => s,
        Err(why) => {
            let _ = child.kill();
            let (status, stderr) = finish(&mut child);
            panic!("QEMU refused {argv:?}: {why}; {status}; stderr:\n{stderr}");
        }
    };
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut qmp_call = |command: &str| {
        let mut line = String::new();
        if !command.is_empty() {
            (&stream)
                .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
                .unwrap();
        }
        // Skip asynchronous events; the answer is the first line without one.
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if !line.contains("\"event\"") {
                return line.clone();
            }
        }
    };
    assert!(qmp_call("").contains("\"QMP\""));
    assert!(qmp_call("qmp_capabilities").contains("\"return\""));
    let status = qmp_call("query-status");
    assert!(status.contains("\"prelaunch\""), "{status}");
    assert!(status.contains("\"running\": false"), "{status}");
    qmp_call("quit");
    let (status, stderr) = finish(&mut child);
    assert!(
        status.success(),
        "QEMU ended with {status}; stderr:\n{stderr}"
    );
    // A deprecated spelling works today and breaks on a later QEMU.
    assert!(!stderr.contains("deprecated"), "{stderr}");
    if !stderr.is_empty() {
        eprintln!("QEMU stderr:\n{stderr}");
    }
}

/// Connects to the QMP socket once QEMU listens on it.
fn connect(qmp: &Path, child: &mut Child) -> Result<UnixStream, String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match UnixStream::connect(qmp) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Some(status) = child.try_wait().unwrap() {
                    return Err(format!("it exited with {status} before listening"));
                }
                if Instant::now() > deadline {
                    return Err(format!("no QMP socket after {DEADLINE:?}: {e}"));
                }
                sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Waits (bounded) for QEMU to exit, killing it at the deadline; its exit status and stderr.
fn finish(child: &mut Child) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

/// The smallest kernel QEMU's `microvm` loads: an x86-64 ELF with one loadable segment (a `hlt`
/// loop at 1 MiB + 200) and a `Xen` note of type 18 (`XEN_ELFNOTE_PHYS32_ENTRY`) pointing at it,
/// which is how QEMU recognizes a PVH kernel. Never executed here.
fn pvh_kernel() -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    const CODE: u64 = 200;
    const SIZE: u64 = CODE + 3;
    const PHDRS: u64 = 64;
    const NOTE: u64 = PHDRS + 2 * 56;
    let entry = BASE + CODE;
    let mut elf = Vec::new();
    let u16s = |elf: &mut Vec<u8>, v: &[u16]| v.iter().for_each(|x| elf.extend(x.to_le_bytes()));
    let u32s = |elf: &mut Vec<u8>, v: &[u32]| v.iter().for_each(|x| elf.extend(x.to_le_bytes()));
    let u64s = |elf: &mut Vec<u8>, v: &[u64]| v.iter().for_each(|x| elf.extend(x.to_le_bytes()));
    // ELF header: 64-bit, little-endian, version 1, executable, x86-64.
    elf.extend(b"\x7fELF\x02\x01\x01");
    elf.resize(16, 0);
    u16s(&mut elf, &[2, 62]);
    u32s(&mut elf, &[1]);
    u64s(&mut elf, &[entry, PHDRS, 0]);
    u32s(&mut elf, &[0]);
    u16s(&mut elf, &[64, 56, 2, 64, 0, 0]);
    // PT_LOAD, read + execute: the whole file at 1 MiB.
    u32s(&mut elf, &[1, 5]);
    u64s(&mut elf, &[0, BASE, BASE, SIZE, SIZE, 0x1000]);
    // PT_NOTE: 12-byte header, "Xen\0", the 8-byte entry address.
    u32s(&mut elf, &[4, 4]);
    u64s(&mut elf, &[NOTE, BASE + NOTE, BASE + NOTE, 24, 24, 4]);
    u32s(&mut elf, &[4, 8, 18]);
    elf.extend(b"Xen\0");
    u64s(&mut elf, &[entry]);
    elf.resize(usize::try_from(CODE).unwrap(), 0);
    elf.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp back to the hlt
    assert_eq!(u64::try_from(elf.len()).unwrap(), SIZE);
    elf
}
