//! Seccomp profiles of type Localhost: a file on the node, in the format kubelet and Docker use
//! (`defaultAction`, `architectures` or `archMap`, `syscalls` with `names` or `name`, `action`,
//! `errnoRet`, `args`, and `includes`/`excludes` conditions), turned into the OCI runtime
//! spec's `linux.seccomp` for the container it is for.
//!
//! Conditions are decided here, for this container: a rule applies when the capabilities it
//! `includes` are all the container's and the architectures it names contain this host's, and
//! none of what it `excludes` holds. `minKernel` is not checked (the rule applies). What comes
//! out is checked by parsing it as the OCI type, so the engine is never handed a profile that
//! libcontainer would read otherwise.

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

/// The conversion of a parsed profile.
fn convert(v: &Value, caps: &HashSet<String>) -> Result<String, String> {
    let obj = v.as_object().ok_or("the profile is not a JSON object")?;
    let mut out = Map::new();
    let default = obj
        .get("defaultAction")
        .and_then(Value::as_str)
        .ok_or("the profile has no \"defaultAction\"")?;
    out.insert("defaultAction".into(), Value::String(default.into()));
    if let Some(e) = obj.get("defaultErrnoRet") {
        out.insert("defaultErrnoRet".into(), e.clone());
    }
    if let Some(f) = obj.get("flags") {
        out.insert("flags".into(), f.clone());
    }
    let mut arches: Vec<Value> = Vec::new();
    if let Some(a) = obj.get("architectures").and_then(Value::as_array) {
        arches.extend(a.iter().cloned());
    }
    if let Some(m) = obj.get("archMap").and_then(Value::as_array) {
        // Only this host's entry: its architecture and the ones it runs (x86 and x32 on x86-64).
        for e in m {
            if e.get("architecture").and_then(Value::as_str) == Some(NATIVE.0) {
                arches.push(Value::String(NATIVE.0.into()));
                if let Some(subs) = e.get("subArchitectures").and_then(Value::as_array) {
                    arches.extend(subs.iter().cloned());
                }
            }
        }
    }
    if !arches.is_empty() {
        out.insert("architectures".into(), Value::Array(arches));
    }
    let mut rules = Vec::new();
    for (i, r) in obj
        .get("syscalls")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let r = r
            .as_object()
            .ok_or_else(|| format!("syscalls[{i}] is not an object"))?;
        if !applies(r.get("includes"), caps, true) || !applies(r.get("excludes"), caps, false) {
            continue;
        }
        let mut names: Vec<Value> = r
            .get("names")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(n) = r.get("name").and_then(Value::as_str) {
            names.push(Value::String(n.into()));
        }
        if names.is_empty() {
            return Err(format!("syscalls[{i}] names no system call"));
        }
        let action = r
            .get("action")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("syscalls[{i}] has no \"action\""))?;
        let mut rule = Map::new();
        rule.insert("names".into(), Value::Array(names));
        rule.insert("action".into(), Value::String(action.into()));
        for k in ["errnoRet", "args"] {
            if let Some(x) = r.get(k).filter(|x| !x.is_null()) {
                rule.insert(k.into(), x.clone());
            }
        }
        rules.push(Value::Object(rule));
    }
    out.insert("syscalls".into(), Value::Array(rules));
    let out = Value::Object(out);
    // What libcontainer will read: the OCI type, or the profile is refused here.
    serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(out.clone())
        .map_err(|e| format!("not a seccomp profile the runtime can apply: {e}"))?;
    Ok(out.to_string())
}

/// Whether a rule's `includes` (`want` true: all must hold) or `excludes` (`want` false: none
/// may hold) condition lets it apply to this container.
fn applies(cond: Option<&Value>, caps: &HashSet<String>, want: bool) -> bool {
    let Some(c) = cond.and_then(Value::as_object) else {
        return true;
    };
    let strs = |k: &str| -> Vec<String> {
        c.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let cap_list = strs("caps");
    let arch_list = strs("arches");
    if want {
        cap_list.iter().all(|c| caps.contains(c))
            && (arch_list.is_empty() || arch_list.iter().any(|a| a == NATIVE.1))
    } else {
        !cap_list.iter().any(|c| caps.contains(c)) && !arch_list.iter().any(|a| a == NATIVE.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(c: &[&str]) -> HashSet<String> {
        c.iter().map(|s| s.to_string()).collect()
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
                { "names": ["personality"], "action": "SCMP_ACT_ALLOW",
                  "args": [{ "index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ" }] }
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
        let names: Vec<&Value> = out["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["names"])
            .collect();
        // mount needs CAP_SYS_ADMIN (not held); ptrace is excluded with CAP_NET_RAW (held).
        assert_eq!(
            names,
            vec![
                &serde_json::json!(["read", "write"]),
                &serde_json::json!(["chmod"]),
                &serde_json::json!(["personality"])
            ]
        );
        assert_eq!(out["syscalls"][1]["errnoRet"], 1);
        assert!(out["syscalls"][1].get("comment").is_none());
        assert_eq!(out["syscalls"][2]["args"][0]["op"], "SCMP_CMP_EQ");
    }

    #[test]
    fn bad_profiles_are_refused_saying_why() {
        for (p, why) in [
            (serde_json::json!([]), "not a JSON object"),
            (serde_json::json!({ "syscalls": [] }), "defaultAction"),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{ "action": "SCMP_ACT_ERRNO" }] }),
                "names no system call",
            ),
            (
                serde_json::json!({ "defaultAction": "SCMP_ACT_NOPE" }),
                "not a seccomp profile",
            ),
        ] {
            let e = convert(&p, &caps(&[])).unwrap_err();
            assert!(e.contains(why), "{p}: {e}");
        }
        let e = load_localhost("relative.json", &caps(&[])).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
    }
}
