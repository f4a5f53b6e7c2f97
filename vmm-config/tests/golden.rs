//! Golden tests: a full config of each backend, rendered, against the files in `tests/golden/`
//! (`<backend>.toml` in; `<backend>.argv`, one argument per line, and `firecracker.json` out).
//!
//! After an intended change, rewrite the expected files with
//! `UPDATE_GOLDEN=1 cargo test -p vmm-config --test golden` and review the diff.
#![allow(clippy::unwrap_used)]

use std::{fs, path::PathBuf};

use vmm_config::{Launch, VmConfig};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn render(backend: &str) -> Launch {
    let text = fs::read_to_string(golden_dir().join(format!("{backend}.toml"))).unwrap();
    let vm: VmConfig = toml::from_str(&text).unwrap();
    vm.prepare().unwrap().render()
}

fn argv_text(launch: &Launch) -> String {
    launch
        .argv
        .iter()
        .map(|a| format!("{}\n", a.to_str().unwrap()))
        .collect()
}

/// Compares `actual` with the golden file `name`, or rewrites it under `UPDATE_GOLDEN=1`.
fn check(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        fs::write(&path, actual).unwrap();
        return;
    }
    let expected = fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        panic!(
            "{} differs from the rendering (- golden, + rendered); if the change is intended, \
             run UPDATE_GOLDEN=1 cargo test -p vmm-config --test golden\n{}",
            path.display(),
            diff(&expected, actual)
        );
    }
}

/// A line diff: the common prefix and suffix are skipped, the middle shown as -/+ lines.
fn diff(expected: &str, actual: &str) -> String {
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let head = e.iter().zip(&a).take_while(|(x, y)| x == y).count();
    let tail = e[head..]
        .iter()
        .rev()
        .zip(a[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let mut out = format!("@@ line {} @@\n", head + 1);
    for line in &e[head..e.len() - tail] {
        out += &format!("-{line}\n");
    }
    for line in &a[head..a.len() - tail] {
        out += &format!("+{line}\n");
    }
    out
}

#[test]
fn qemu() {
    let launch = render("qemu");
    assert!(launch.files.is_empty() && launch.stdout.is_none());
    check("qemu.argv", &argv_text(&launch));
}

#[test]
fn firecracker() {
    let launch = render("firecracker");
    check("firecracker.argv", &argv_text(&launch));
    let paths: Vec<_> = launch.files.iter().map(|f| f.path.clone()).collect();
    assert_eq!(
        paths,
        [
            PathBuf::from("/run/caas-agent/vm/t1/firecracker.json"),
            PathBuf::from("/run/caas-agent/vm/t1/firecracker.log"),
        ]
    );
    assert!(launch.files[1].contents.is_empty());
    assert_eq!(
        launch.stdout,
        Some(PathBuf::from("/run/caas-agent/vm/t1/serial.log"))
    );
    check(
        "firecracker.json",
        std::str::from_utf8(&launch.files[0].contents).unwrap(),
    );
}

#[test]
fn cloud_hypervisor() {
    let launch = render("cloud-hypervisor");
    assert!(launch.files.is_empty() && launch.stdout.is_none());
    check("cloud-hypervisor.argv", &argv_text(&launch));
}

#[test]
fn the_diff_shows_only_what_changed() {
    assert_eq!(
        diff("a\nb\nc\nd\n", "a\nB\nc\nd\n"),
        "@@ line 2 @@\n-b\n+B\n"
    );
    assert_eq!(diff("a\n", "a\nb\n"), "@@ line 2 @@\n+b\n");
}
