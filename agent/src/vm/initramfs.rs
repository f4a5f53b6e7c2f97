//! The guest's initramfs, built from the agent's own binary: the binary (the guest runs
//! `caas-agent guest` as its init), the shared libraries it links with their loader, the kernel
//! modules the guest needs (with their dependencies, in load order) and `/dev/console`.
//!
//! The archive is an uncompressed `newc` cpio. Uncompressed on purpose: under software emulation
//! (TCG) the guest kernel would spend longer inflating it than the host spends reading it.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

use sha2::{Digest, Sha256};

/// Where the guest finds its binary.
pub const GUEST_BINARY: &str = "/bin/caas-agent";
/// Where the guest finds its modules, and the file listing them in load order.
pub const GUEST_MODULES: &str = "/lib/modules";
/// The load-order file, one module name per line, dependencies first.
pub const LOAD_ORDER: &str = "/lib/modules/load-order";
/// The modules a guest needs: the virtio-mmio transport of QEMU's `microvm`, the virtio-serial
/// port the engine talks over, the tenant's disk, its network card (a tap on the host), and
/// overlayfs for container root filesystems.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "overlay",
];

/// The modules a guest needs for pods with network namespaces of their own (`[cri.cni]`): the
/// bridge and veth pairs the CNI plugins make, and nftables NAT for the pod rules.
pub const POD_NETWORK_MODULES: &[&str] = &[
    "bridge",
    "veth",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_nat",
];

/// Where the guest has nft, when the initramfs carries it (the pod rules are loaded with it).
pub const GUEST_NFT: &str = "/usr/sbin/nft";

/// Why the initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// Reading an input or writing the archive failed.
    #[error("initramfs: {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The binary's shared libraries could not be listed.
    #[error("initramfs: listing the shared libraries of {binary}: {reason}")]
    Libraries {
        /// The binary.
        binary: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A module, or one it depends on, is neither built in nor in the modules directory.
    #[error(
        "initramfs: kernel module {module:?} is not in {dir} (nor built into the kernel); \
         point [vm] modules_dir at the guest kernel's lib/modules/<version> directory"
    )]
    MissingModule {
        /// The module.
        module: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InitramfsError + '_ {
    move |source| InitramfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What goes into the initramfs.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The agent binary that becomes the guest's init.
    pub binary: PathBuf,
    /// The guest kernel's `lib/modules/<version>` directory; `None` when the kernel has every
    /// driver built in.
    pub modules_dir: Option<PathBuf>,
    /// Module names to load (dependencies are added).
    pub modules: Vec<String>,
    /// More programs of the host, each with its guest path (their libraries are added).
    pub programs: Vec<(PathBuf, PathBuf)>,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Built {
    /// The archive.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Modules in load order.
    pub modules: Vec<String>,
    /// Libraries, as the guest's loader finds them.
    pub libraries: Vec<PathBuf>,
}

/// Returns the initramfs for `spec` from `cache_dir`, building it first when the binary, the
/// module list or the modules directory changed since (the file name carries a digest of them).
pub fn cached(spec: &Spec, cache_dir: &Path) -> Result<Built, InitramfsError> {
    // One builder at a time in this process: two tenants booting at once share the archive.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    fs::create_dir_all(cache_dir).map_err(io_err(cache_dir))?;
    let key = cache_key(spec)?;
    let path = cache_dir.join(format!("initramfs-{key}.cpio"));
    let plan = plan(spec)?;
    if let Ok(m) = fs::metadata(&path) {
        return Ok(Built {
            path,
            bytes: m.len(),
            modules: plan.modules.iter().map(|(n, _)| n.clone()).collect(),
            libraries: plan.libraries.iter().map(|(g, _)| g.clone()).collect(),
        });
    }
    // Older archives of other binaries are of no further use.
    if let Ok(rd) = fs::read_dir(cache_dir) {
        for e in rd.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with("initramfs-") && (n.ends_with(".cpio") || n.ends_with(".tmp")) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    write(&plan, &path)
}

/// Builds the initramfs for `spec` at `out` (written to a temporary file, then renamed).
pub fn build(spec: &Spec, out: &Path) -> Result<Built, InitramfsError> {
    write(&plan(spec)?, out)
}

fn cache_key(spec: &Spec) -> Result<String, InitramfsError> {
    let mut h = Sha256::new();
    let m = fs::metadata(&spec.binary).map_err(io_err(&spec.binary))?;
    h.update(spec.binary.as_os_str().as_encoded_bytes());
    h.update(m.len().to_le_bytes());
    h.update(m.mtime().to_le_bytes());
    h.update(m.mtime_nsec().to_le_bytes());
    h.update(m.ino().to_le_bytes());
    if let Some(d) = &spec.modules_dir {
        h.update(d.as_os_str().as_encoded_bytes());
        if let Ok(m) = fs::metadata(d) {
            h.update(m.mtime().to_le_bytes());
        }
    }
    for name in &spec.modules {
        h.update(name.as_bytes());
        h.update([0]);
    }
    for (host, guest) in &spec.programs {
        let m = fs::metadata(host).map_err(io_err(host))?;
        h.update(host.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(guest.as_os_str().as_encoded_bytes());
        h.update(m.len().to_le_bytes());
        h.update(m.mtime().to_le_bytes());
    }
    let d = h.finalize();
    Ok(d[..8].iter().map(|b| format!("{b:02x}")).collect())
}

struct Plan {
    binary: PathBuf,
    /// (file on the host, path in the guest)
    programs: Vec<(PathBuf, PathBuf)>,
    /// (path in the guest, file on the host)
    libraries: Vec<(PathBuf, PathBuf)>,
    /// (name, file on the host), in load order
    modules: Vec<(String, PathBuf)>,
}

fn plan(spec: &Spec) -> Result<Plan, InitramfsError> {
    let mut libraries = shared_libraries(&spec.binary)?;
    for (host, _) in &spec.programs {
        for lib in shared_libraries(host)? {
            if !libraries.iter().any(|(g, _)| *g == lib.0) {
                libraries.push(lib);
            }
        }
    }
    let modules = match &spec.modules_dir {
        Some(dir) => module_order(dir, &spec.modules)?,
        None => Vec::new(),
    };
    Ok(Plan {
        binary: spec.binary.clone(),
        programs: spec.programs.clone(),
        libraries,
        modules,
    })
}

/// A temporary name beside `out` that no other writer uses.
fn temp_name(out: &Path, what: &str) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    out.with_extension(format!("{what}.{}.{n}.tmp", std::process::id()))
}

fn write(plan: &Plan, out: &Path) -> Result<Built, InitramfsError> {
    let tmp = temp_name(out, "cpio");
    let f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut w = CpioWriter::new(io::BufWriter::new(f));
    let res = (|| -> io::Result<()> {
        let mut dirs = HashSet::new();
        for d in [
            "bin", "dev", "etc", "lib", "proc", "run", "sys", "tmp", "var", "var/lib",
        ] {
            w.dir(d, 0o755)?;
            dirs.insert(PathBuf::from(d));
        }
        w.char_device("dev/console", 0o600, 5, 1)?;
        w.dir("lib/modules", 0o755)?;
        dirs.insert(PathBuf::from("lib/modules"));
        let exe = stripped(&plan.binary, out)?;
        w.file(GUEST_BINARY.trim_start_matches('/'), 0o755, &exe)?;
        for (host, guest) in &plan.programs {
            let rel = guest.strip_prefix("/").unwrap_or(guest);
            mkdirs(&mut w, &mut dirs, rel)?;
            let data = fs::read(host)?;
            w.file(&rel.to_string_lossy(), 0o755, &data)?;
        }
        for (guest, host) in &plan.libraries {
            let rel = guest.strip_prefix("/").unwrap_or(guest);
            mkdirs(&mut w, &mut dirs, rel)?;
            let data = fs::read(host)?;
            w.file(&rel.to_string_lossy(), 0o755, &data)?;
        }
        let mut order = String::new();
        for (name, host) in &plan.modules {
            let data = fs::read(host)?;
            w.file(&format!("lib/modules/{name}.ko"), 0o644, &data)?;
            order.push_str(name);
            order.push('\n');
        }
        w.file(LOAD_ORDER.trim_start_matches('/'), 0o644, order.as_bytes())?;
        // On disk before it is renamed in: a cached archive cut short by a crash would be
        // booted for ever.
        w.finish()?
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(InitramfsError::Io {
            path: out.to_path_buf(),
            source: e,
        });
    }
    fs::rename(&tmp, out).map_err(io_err(out))?;
    let bytes = fs::metadata(out).map_err(io_err(out))?.len();
    Ok(Built {
        path: out.to_path_buf(),
        bytes,
        modules: plan.modules.iter().map(|(n, _)| n.clone()).collect(),
        libraries: plan.libraries.iter().map(|(g, _)| g.clone()).collect(),
    })
}

/// The binary without its symbol and debug sections (`strip` from binutils, when installed): a
/// debug build is four times smaller that way, and all of it sits in the guest's memory. The
/// host keeps the full binary for its own backtraces.
fn stripped(binary: &Path, out: &Path) -> io::Result<Vec<u8>> {
    let tmp = temp_name(out, "strip");
    let ok = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&tmp)
        .arg(binary)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let data = if ok { fs::read(&tmp) } else { fs::read(binary) };
    let _ = fs::remove_file(&tmp);
    data
}

fn mkdirs<W: Write>(
    w: &mut CpioWriter<W>,
    made: &mut HashSet<PathBuf>,
    file: &Path,
) -> io::Result<()> {
    let mut parents: Vec<&Path> = file.ancestors().skip(1).collect();
    parents.reverse();
    for p in parents {
        if p.as_os_str().is_empty() || made.contains(p) {
            continue;
        }
        w.dir(&p.to_string_lossy(), 0o755)?;
        made.insert(p.to_path_buf());
    }
    Ok(())
}

/// The program interpreter (`PT_INTERP`) of an ELF executable, if it has one.
pub fn interpreter(binary: &Path) -> Result<Option<PathBuf>, InitramfsError> {
    let data = fs::read(binary).map_err(io_err(binary))?;
    let bad = |reason: &str| InitramfsError::Libraries {
        binary: binary.to_path_buf(),
        reason: reason.to_string(),
    };
    // 64-bit little-endian ELF only: the agent runs on x86_64 and aarch64 Linux.
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    let u16_at = |o: usize| -> Option<u16> {
        Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?))
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?))
    };
    let header = (|| {
        let phoff = usize::try_from(u64_at(0x20)?).ok()?;
        let phentsize = usize::from(u16_at(0x36)?);
        let phnum = usize::from(u16_at(0x38)?);
        Some((phoff, phentsize, phnum))
    })();
    let Some((phoff, phentsize, phnum)) = header else {
        return Err(bad("truncated ELF header"));
    };
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) != Some(PT_INTERP) {
            continue;
        }
        let off = u64_at(ph + 8).and_then(|v| usize::try_from(v).ok());
        let size = u64_at(ph + 32).and_then(|v| usize::try_from(v).ok());
        let (Some(off), Some(size)) = (off, size) else {
            return Err(bad("truncated program header"));
        };
        let raw = data
            .get(off..off + size)
            .ok_or_else(|| bad("PT_INTERP outside the file"))?;
        let s = raw.split(|b| *b == 0).next().unwrap_or_default();
        return Ok(Some(PathBuf::from(String::from_utf8_lossy(s).into_owned())));
    }
    Ok(None)
}

/// The shared libraries `binary` needs, with its loader: (path the guest's loader looks at,
/// host file holding it). Asks the binary's own loader (`ld.so --list`, what `ldd` does), so the
/// answer is the one the loader will act on.
pub fn shared_libraries(binary: &Path) -> Result<Vec<(PathBuf, PathBuf)>, InitramfsError> {
    let Some(interp) = interpreter(binary)? else {
        return Ok(Vec::new()); // statically linked
    };
    let out = Command::new(&interp)
        .arg("--list")
        .arg(binary)
        .output()
        .map_err(io_err(&interp))?;
    if !out.status.success() {
        return Err(InitramfsError::Libraries {
            binary: binary.to_path_buf(),
            reason: format!(
                "{} --list: {}",
                interp.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let mut libs = parse_ld_list(&String::from_utf8_lossy(&out.stdout)).map_err(|reason| {
        InitramfsError::Libraries {
            binary: binary.to_path_buf(),
            reason,
        }
    })?;
    if !libs.iter().any(|(g, _)| *g == interp) {
        libs.push((interp.clone(), interp));
    }
    Ok(libs)
}

/// Parses `ld.so --list` output into (guest path, host path) pairs.
fn parse_ld_list(text: &str) -> Result<Vec<(PathBuf, PathBuf)>, String> {
    let mut v = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let before_addr = |s: &str| s.rsplit_once(" (").map_or(s, |(p, _)| p).trim().to_string();
        if let Some((name, rest)) = line.split_once(" => ") {
            if rest.trim() == "not found" {
                return Err(format!("{} not found", name.trim()));
            }
            let p = PathBuf::from(before_addr(rest));
            if p.is_absolute() {
                v.push((p.clone(), p));
            }
        } else if line.starts_with('/') {
            let p = PathBuf::from(before_addr(line));
            v.push((p.clone(), p));
        }
        // Anything else (linux-vdso.so.1) is provided by the kernel.
    }
    Ok(v)
}

/// Resolves `wanted` and their dependencies in `dir` (a `lib/modules/<version>` tree) into load
/// order, dependencies first. Modules listed in `modules.builtin` need no loading.
pub fn module_order(
    dir: &Path,
    wanted: &[String],
) -> Result<Vec<(String, PathBuf)>, InitramfsError> {
    let mut files = BTreeMap::new();
    index_modules(dir, &mut files).map_err(io_err(dir))?;
    let builtin: HashSet<String> = fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Path::new(l).file_name())
        .map(|n| module_name(&n.to_string_lossy()))
        .collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for w in wanted {
        visit(
            &module_name(w),
            dir,
            &files,
            &builtin,
            &mut seen,
            &mut order,
            0,
        )?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    dir: &Path,
    files: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<(String, PathBuf)>,
    depth: usize,
) -> Result<(), InitramfsError> {
    // Module dependencies are acyclic; the depth bound only guards against a corrupt tree.
    if depth > 64 || !seen.insert(name.to_string()) || builtin.contains(name) {
        return Ok(());
    }
    let Some(path) = files.get(name) else {
        return Err(InitramfsError::MissingModule {
            module: name.to_string(),
            dir: dir.to_path_buf(),
        });
    };
    let data = fs::read(path).map_err(io_err(path))?;
    for dep in modinfo_depends(&data) {
        visit(&dep, dir, files, builtin, seen, order, depth + 1)?;
    }
    order.push((name.to_string(), path.clone()));
    Ok(())
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        let p = e.path();
        if ft.is_dir() {
            index_modules(&p, out)?;
        } else if let Some(stem) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            out.insert(module_name(stem), p);
        }
    }
    Ok(())
}

/// Module names use `_` where file names may use `-`.
fn module_name(file_or_name: &str) -> String {
    file_or_name.trim_end_matches(".ko").replace('-', "_")
}

/// The `depends=` entry of a module's `.modinfo` section: NUL-separated `key=value` strings.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(module_name)
        .collect()
}

/// A `newc` (SVR4, no CRC) cpio archive writer, the format the kernel unpacks an initramfs from.
pub struct CpioWriter<W: Write> {
    w: W,
    ino: u32,
    offset: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(w: W) -> Self {
        Self {
            w,
            ino: 0,
            offset: 0,
        }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.offset += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4)) % 4;
        self.put(&[0u8; 3][..usize::try_from(n).unwrap_or(0)])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: larger than 4 GiB"),
            )
        })?;
        self.ino += 1;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08X}"));
        }
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, 0o040000 | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100000 | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, 0o120777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, 0o020000 | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and flushes.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archive entry read back: (name, mode, rdev, data).
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    fn read_cpio(mut b: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701", "magic at {off}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&b[110..name_end - 1])
                .unwrap()
                .to_string();
            let data_start = (off + name_end).next_multiple_of(4) - off;
            let data = b[data_start..data_start + size as usize].to_vec();
            let next = (off + data_start + size as usize).next_multiple_of(4) - off;
            off += next;
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push((name, mode, (rmaj, rmin), data));
        }
    }

    #[test]
    fn cpio_entries_read_back_with_alignment() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/a", 0o755, b"hello").unwrap();
        w.file("bin/odd-name-length", 0o644, b"").unwrap();
        w.symlink("bin/l", "a").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let e = read_cpio(&bytes);
        assert_eq!(e.len(), 5);
        assert_eq!((e[0].0.as_str(), e[0].1), ("bin", 0o040755));
        assert_eq!(
            (e[1].0.as_str(), e[1].1, e[1].3.as_slice()),
            ("bin/a", 0o100755, &b"hello"[..])
        );
        assert_eq!(e[2].3.len(), 0);
        assert_eq!((e[3].1, e[3].3.as_slice()), (0o120777, &b"a"[..]));
        assert_eq!((e[4].1, e[4].2), (0o020600, (5, 1)));
    }

    #[test]
    fn ld_list_output_parses_and_a_missing_library_is_named() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let v = parse_ld_list(text).unwrap();
        assert_eq!(
            v.iter()
                .map(|(g, _)| g.to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        let e = parse_ld_list("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.contains("libfoo.so.1"), "{e}");
    }

    #[test]
    fn the_test_binary_has_a_loader_and_libc() {
        let exe = std::env::current_exe().unwrap();
        let libs = shared_libraries(&exe).unwrap();
        let names: Vec<String> = libs
            .iter()
            .map(|(g, _)| g.to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n.contains("libc.so")), "{names:?}");
        let interp = interpreter(&exe).unwrap().unwrap();
        assert!(
            libs.iter().any(|(g, _)| *g == interp),
            "{names:?} lacks {interp:?}"
        );
    }

    fn fake_module(dir: &Path, rel: &str, depends: &str) {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut body = b"\x7fELF junk\0license=GPL\0".to_vec();
        body.extend_from_slice(format!("depends={depends}\0name=x\0").as_bytes());
        fs::write(p, body).unwrap();
    }

    #[test]
    fn modules_come_in_dependency_order_and_builtins_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        fake_module(d.path(), "kernel/drivers/virtio/virtio_ring.ko", "");
        fake_module(d.path(), "kernel/drivers/virtio/virtio.ko", "virtio_ring");
        fake_module(
            d.path(),
            "kernel/drivers/virtio/virtio_mmio.ko",
            "virtio,virtio_ring",
        );
        fake_module(
            d.path(),
            "kernel/drivers/char/virtio_console.ko",
            "virtio,virtio_ring",
        );
        fake_module(d.path(), "kernel/fs/over-lay.ko", "");
        fs::write(d.path().join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let want: Vec<String> = ["virtio_console", "virtio_mmio", "ext4", "over-lay"]
            .map(String::from)
            .to_vec();
        let order: Vec<String> = module_order(d.path(), &want)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "virtio_console",
                "virtio_mmio",
                "over_lay"
            ]
        );
        let e = module_order(d.path(), &["nope".to_string()]).unwrap_err();
        assert!(e.to_string().contains("\"nope\""), "{e}");
    }

    #[test]
    fn an_archive_is_cached_per_binary_and_rebuilt_when_it_changes() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("agent");
        fs::copy(std::env::current_exe().unwrap(), &bin).unwrap();
        let spec = Spec {
            binary: bin.clone(),
            modules_dir: None,
            modules: Vec::new(),
            programs: Vec::new(),
        };
        let cache = d.path().join("cache");
        let a = cached(&spec, &cache).unwrap();
        let entries = read_cpio(&fs::read(&a.path).unwrap());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert!(
            names.contains(&"bin/caas-agent") && names.contains(&"dev/console"),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.ends_with("libc.so.6")), "{names:?}");
        let again = cached(&spec, &cache).unwrap();
        assert_eq!(a.path, again.path);
        // A new binary (new inode) gets a new archive, and the old one goes.
        let new_bin = d.path().join("agent2");
        fs::copy(&bin, &new_bin).unwrap();
        fs::rename(&new_bin, &bin).unwrap();
        let b = cached(&spec, &cache).unwrap();
        assert_ne!(a.path, b.path);
        assert!(!a.path.exists());
    }
}
