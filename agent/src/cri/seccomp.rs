//! Seccomp profiles of type Localhost: a file on the node, in the format kubelet and Docker use
//! (`defaultAction`, `architectures` or `archMap`, `syscalls` with `names` or `name`, `action`,
//! `errnoRet`, `args`, and `includes`/`excludes` conditions), turned into the OCI runtime
//! spec's `linux.seccomp` for the container it is for.
//!
//! - Conditions are decided here, for this container: a rule applies when the capabilities it
//!   `includes` are all the container's, the architectures it names contain this host's and
//!   the running kernel is at least its `minKernel`, and none of what it `excludes` holds.
//! - The format is parsed strictly: a field of the wrong type or one this does not know is an
//!   error, never skipped (it could be one meant to deny something).
//! - The engine's own denials (namespace, module, key, BPF and mount interfaces) survive any
//!   profile: they are taken out of its rules, and added as a rule when its default lets calls
//!   through.
//! - Actions libcontainer cannot apply (`SCMP_ACT_NOTIFY`, a trace errno above 32767) are
//!   refused, and what comes out must parse as the OCI type.

use std::{collections::HashSet, path::Path};

use serde_json::{Map, Value};

/// Largest profile file read.
const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// This host's architecture, as seccomp names it and as the conditions name it (Go's names).
const NATIVE: (&str, &str) = if cfg!(target_arch = "aarch64") {
    ("SCMP_ARCH_AARCH64", "arm64")
} else {
    ("SCMP_ARCH_X86_64", "amd64")
};

/// Loads the profile at `path` for a container with capabilities `caps` (`CAP_*` names) and
/// returns the OCI `LinuxSeccomp` as JSON. The error says what is wrong, naming the path (never
/// quoting the file).
pub fn load_localhost(path: &str, caps: &HashSet<String>) -> Result<String, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!(
            "{path:?} must be an absolute path to a profile file on the node"
        ));
    }
    let meta = std::fs::metadata(p).map_err(|e| format!("{path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{path} is not a file"));
    }
    if meta.len() > MAX_PROFILE_BYTES {
        return Err(format!("{path} is larger than {MAX_PROFILE_BYTES} bytes"));
    }
    let text = std::fs::read(p).map_err(|e| format!("{path}: {e}"))?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "{path} is not JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    convert(&v, caps).map_err(|e| format!("{path}: {e}"))
}

/// kubelet's (Docker's) profile format. Unknown fields are refused, not ignored: a field this
/// does not understand could be one that was meant to deny something.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Profile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    arch_map: Vec<ArchMap>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    syscalls: Vec<Rule>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ArchMap {
    architecture: String,
    #[serde(default)]
    sub_architectures: Vec<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<Value>>,
    #[serde(default)]
    includes: Option<Condition>,
    #[serde(default)]
    excludes: Option<Condition>,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Condition {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<String>,
}

/// Actions after which a system call goes ahead (the engine's denials are added to a profile
/// whose default is one of them).
const LETTING: [&str; 3] = ["SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE"];

/// The conversion of a parsed profile.
fn convert(v: &Value, caps: &HashSet<String>) -> Result<String, String> {
    let p: Profile =
        serde_json::from_value(v.clone()).map_err(|e| format!("not a seccomp profile: {e}"))?;
    let kernel = kernel_version();
    let refuse_action = |a: &str, errno: Option<u32>, what: &str| -> Result<(), String> {
        if a == "SCMP_ACT_NOTIFY" {
            return Err(format!(
                "{what}: SCMP_ACT_NOTIFY needs a seccomp agent, which this runtime has not"
            ));
        }
        if a == "SCMP_ACT_TRACE" && errno.is_some_and(|e| e > 32767) {
            return Err(format!("{what}: SCMP_ACT_TRACE's errnoRet is above 32767"));
        }
        Ok(())
    };
    refuse_action(&p.default_action, p.default_errno_ret, "defaultAction")?;
    let mut out = Map::new();
    out.insert(
        "defaultAction".into(),
        Value::String(p.default_action.clone()),
    );
    if let Some(e) = p.default_errno_ret {
        out.insert("defaultErrnoRet".into(), e.into());
    }
    if !p.flags.is_empty() {
        out.insert(
            "flags".into(),
            p.flags.iter().cloned().map(Value::String).collect(),
        );
    }
    let mut arches: Vec<String> = p.architectures.clone();
    // Only this host's archMap entry: its architecture and the ones it runs (x86, x32).
    for m in p.arch_map.iter().filter(|m| m.architecture == NATIVE.0) {
        arches.push(m.architecture.clone());
        arches.extend(m.sub_architectures.iter().cloned());
    }
    if !arches.is_empty() {
        out.insert(
            "architectures".into(),
            arches.into_iter().map(Value::String).collect(),
        );
    }
    // The engine's denials stay whatever the profile says: they are what keeps a tenant from
    // the kernel's namespace, module, key and mount interfaces.
    let denied: HashSet<&str> = crate::engine::spec::denied_syscalls().collect();
    let mut rules = Vec::new();
    for (i, r) in p.syscalls.iter().enumerate() {
        let what = format!("syscalls[{i}]");
        let cond = |c: &Option<Condition>, want: bool| -> Result<bool, String> {
            let Some(c) = c else { return Ok(true) };
            let kernel_ok = match &c.min_kernel {
                None => None,
                Some(min) => Some(
                    kernel
                        .zip(parse_version(min))
                        .map(|(k, m)| k >= m)
                        .ok_or_else(|| {
                            format!("{what}: minKernel {min:?} is not a kernel version")
                        })?,
                ),
            };
            let has_cap = |x: &String| caps.contains(x);
            let on_arch = |x: &String| x == NATIVE.1;
            Ok(if want {
                c.caps.iter().all(has_cap)
                    && (c.arches.is_empty() || c.arches.iter().any(on_arch))
                    && kernel_ok.unwrap_or(true)
            } else {
                !c.caps.iter().any(has_cap)
                    && !c.arches.iter().any(on_arch)
                    && !kernel_ok.unwrap_or(false)
            })
        };
        if !cond(&r.includes, true)? || !cond(&r.excludes, false)? {
            continue;
        }
        refuse_action(&r.action, r.errno_ret, &what)?;
        let mut names: Vec<String> = r.names.clone();
        names.extend(r.name.clone());
        if names.is_empty() {
            return Err(format!("{what} names no system call"));
        }
        let kept: Vec<Value> = names
            .into_iter()
            .filter(|n| !denied.contains(n.as_str()))
            .map(Value::String)
            .collect();
        if kept.is_empty() {
            continue;
        }
        let mut rule = Map::new();
        rule.insert("names".into(), Value::Array(kept));
        rule.insert("action".into(), Value::String(r.action.clone()));
        if let Some(e) = r.errno_ret {
            rule.insert("errnoRet".into(), e.into());
        }
        if let Some(a) = &r.args {
            rule.insert("args".into(), Value::Array(a.clone()));
        }
        let _ = &r.comment;
        rules.push(Value::Object(rule));
    }
    if LETTING.contains(&p.default_action.as_str()) {
        let names: Vec<Value> = crate::engine::spec::denied_syscalls()
            .map(|n| Value::String(n.to_string()))
            .collect();
        rules.push(serde_json::json!({
            "names": names,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
        }));
    }
    out.insert("syscalls".into(), Value::Array(rules));
    let out = Value::Object(out);
    // What libcontainer will read: the OCI type, or the profile is refused here.
    serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(out.clone())
        .map_err(|e| format!("not a seccomp profile the runtime can apply: {e}"))?;
    Ok(out.to_string())
}

/// This host's kernel version (major, minor).
fn kernel_version() -> Option<(u32, u32)> {
    let u = nix::sys::utsname::uname().ok()?;
    parse_version(&u.release().to_string_lossy())
}

/// `major.minor` at the start of a version (`6.1.0-18-amd64` is (6, 1)).
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(c: &[&str]) -> HashSet<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    fn names(out: &Value) -> Vec<Value> {
        out["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["names"].clone())
            .collect()
    }

    #[test]
    fn a_docker_format_profile_becomes_the_oci_one_for_this_container() {
        let profile = serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "archMap": [
                { "architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"] },
                { "architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"] }
            ],
            "syscalls": [
                { "names": ["read", "write"], "action": "SCMP_ACT_ALLOW" },
                { "name": "chmod", "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "comment": "x" },
                { "names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": { "caps": ["CAP_SYS_ADMIN"] } },
                { "names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "excludes": { "caps": ["CAP_NET_RAW"] } },
                { "names": ["clone3"], "action": "SCMP_ACT_ALLOW", "includes": { "minKernel": "99.0" } },
                { "names": ["socket"], "action": "SCMP_ACT_ALLOW",
                  "args": [{ "index": 0, "value": 1, "valueTwo": 0, "op": "SCMP_CMP_EQ" }] },
                { "names": ["unshare", "setns", "getpid"], "action": "SCMP_ACT_ALLOW" }
            ]
        });
        let out: Value =
            serde_json::from_str(&convert(&profile, &caps(&["CAP_NET_RAW"])).unwrap()).unwrap();
        if NATIVE.0 == "SCMP_ARCH_X86_64" {
            assert_eq!(
                out["architectures"],
                serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
            );
        }
        // mount needs CAP_SYS_ADMIN (not held); ptrace is excluded with CAP_NET_RAW (held);
        // clone3 needs a kernel this is not; the engine's denials (unshare, setns) are never
        // allowed; a deny-by-default profile gets no extra rule.
        assert_eq!(
            names(&out),
            vec![
                serde_json::json!(["read", "write"]),
                serde_json::json!(["chmod"]),
                serde_json::json!(["socket"]),
                serde_json::json!(["getpid"]),
            ]
        );
        assert_eq!(out["syscalls"][1]["errnoRet"], 1);
        assert!(out["syscalls"][1].get("comment").is_none());
        assert_eq!(out["syscalls"][2]["args"][0]["op"], "SCMP_CMP_EQ");
    }

    #[test]
    fn an_allowing_profile_keeps_the_engines_denials() {
        let profile = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["chmod"], "action": "SCMP_ACT_ERRNO" }]
        });
        let out: Value = serde_json::from_str(&convert(&profile, &caps(&[])).unwrap()).unwrap();
        let n = names(&out);
        assert_eq!(n[0], serde_json::json!(["chmod"]));
        let last = n.last().unwrap().as_array().unwrap();
        for d in ["unshare", "setns", "bpf", "keyctl", "open_tree"] {
            assert!(
                last.contains(&Value::String(d.into())),
                "{d} is not denied: {out}"
            );
        }
        assert_eq!(out["syscalls"][1]["action"], "SCMP_ACT_ERRNO");
    }

    #[test]
    fn bad_profiles_are_refused_saying_why() {
        for (p, why) in [
            (serde_json::json!([]), "not a seccomp profile"),
            (serde_json::json!({ "syscalls": [] }), "defaultAction"),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{ "action": "SCMP_ACT_ERRNO" }] }),
                "names no system call",
            ),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_NOPE" }),
                "not a seccomp profile the runtime can apply",
            ),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_ALLOW", "syscalls": {} }),
                "not a seccomp profile",
            ),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_ALLOW", "bogus": 1 }),
                "bogus",
            ),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                    { "names": ["mount"], "action": "SCMP_ACT_ERRNO", "includes": { "caps": "CAP_SYS_ADMIN" } }
                ] }),
                "not a seccomp profile",
            ),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_NOTIFY" }),
                "SCMP_ACT_NOTIFY",
            ),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                    { "names": ["read"], "action": "SCMP_ACT_NOTIFY" }
                ] }),
                "SCMP_ACT_NOTIFY",
            ),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                    { "names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": { "minKernel": "new" } }
                ] }),
                "minKernel",
            ),
        ] {
            let e = convert(&p, &caps(&[])).unwrap_err();
            assert!(e.contains(why), "{p}: {e}");
        }
        let e = load_localhost("relative.json", &caps(&[])).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        assert_eq!(parse_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_version("5"), Some((5, 0)));
    }
}
