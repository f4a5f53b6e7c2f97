//! Input rules shared by the config file and the API: identifiers, labels and quotas.
//!
//! Anything that may become a path, a cgroup name or a netns name passes [`check_id`] first. Every
//! error names the field it is about, so a client can tell which input to fix.

use std::collections::BTreeMap;

/// Longest identifier (tenant, container, node-local names). Fits a DNS label and leaves room in
/// cgroup and netns names built from it.
pub const MAX_ID_LEN: usize = 63;
/// Most labels one object may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 255;

/// An input that breaks a rule. `field` is the dotted name of the field (`quotas.cpus`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// The field at fault, as the client named it.
    pub field: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

impl Invalid {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks an identifier: 1..=63 bytes of `[a-z0-9-]`, starting and ending with a letter or digit.
pub fn check_id(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if value == "." || value == ".." {
        return Err(Invalid::new(field, format!("{value:?} is not allowed")));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Invalid::new(
            field,
            format!("is {} bytes long, the limit is {MAX_ID_LEN}", value.len()),
        ));
    }
    if let Some((i, c)) = value
        .char_indices()
        .find(|(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        return Err(Invalid::new(
            field,
            format!(
                "{c:?} at byte {i} is not allowed; use lowercase ASCII letters, digits and '-'"
            ),
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(Invalid::new(
            field,
            "must start and end with a letter or a digit",
        ));
    }
    Ok(())
}

/// Checks a label map: at most [`MAX_LABELS`] entries, keys of `[a-z0-9._/-]`, printable values.
pub fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if labels.len() > MAX_LABELS {
        return Err(Invalid::new(
            field,
            format!("has {} labels, the limit is {MAX_LABELS}", labels.len()),
        ));
    }
    for (k, v) in labels {
        let kf = format!("{field}[{k:?}]");
        if k.is_empty() || k.len() > MAX_LABEL_KEY_LEN {
            return Err(Invalid::new(
                kf,
                format!("key must be 1..={MAX_LABEL_KEY_LEN} bytes"),
            ));
        }
        if !k
            .chars()
            .all(|c| matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' | '/'))
        {
            return Err(Invalid::new(
                kf,
                "key may hold only ASCII letters, digits and '-', '_', '.', '/'",
            ));
        }
        if v.len() > MAX_LABEL_VALUE_LEN {
            return Err(Invalid::new(
                kf,
                format!(
                    "value is {} bytes, the limit is {MAX_LABEL_VALUE_LEN}",
                    v.len()
                ),
            ));
        }
        if v.chars().any(char::is_control) {
            return Err(Invalid::new(kf, "value must not hold control characters"));
        }
    }
    Ok(())
}

/// Checks that a number lies in `min..=max`; the message names the range.
pub fn check_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, Invalid> {
    if value < min || value > max {
        return Err(Invalid::new(
            field,
            format!("{value} is out of range; allowed {min}..={max}"),
        ));
    }
    Ok(value)
}

/// Checks a CPU amount (`cpus`): finite, and within `min..=max`.
pub fn check_cpus(field: &str, value: f64, min: f64, max: f64) -> Result<f64, Invalid> {
    if !value.is_finite() {
        return Err(Invalid::new(
            field,
            format!("{value} is not a number of CPUs"),
        ));
    }
    check_range(field, value, min, max)
}

/// Checks that a label map matches a selector: every selector entry is present with that value.
pub fn labels_match(
    labels: &BTreeMap<String, String>,
    selector: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("id", "a").is_ok());
        assert!(check_id("id", "tenant-42").is_ok());
        assert!(check_id("id", &"a".repeat(MAX_ID_LEN)).is_ok());
        for bad in [
            "", ".", "..", "A", "a_b", "a.b", "-a", "a-", "a/b", "ä", "a b",
        ] {
            let e = check_id("tenant.id", bad).unwrap_err();
            assert_eq!(e.field, "tenant.id", "{bad:?}");
        }
        let e = check_id("id", &"a".repeat(MAX_ID_LEN + 1)).unwrap_err();
        assert!(e.reason.contains("limit is 63"), "{e}");
        assert!(
            check_id("id", "..")
                .unwrap_err()
                .reason
                .contains("not allowed")
        );
    }

    #[test]
    fn labels() {
        let mut l = BTreeMap::new();
        l.insert("team".to_string(), "blue".to_string());
        assert!(check_labels("labels", &l).is_ok());
        l.insert("bad key".to_string(), "x".to_string());
        assert!(check_labels("labels", &l).is_err());
        let many: BTreeMap<_, _> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(check_labels("labels", &many).is_err());
        let mut sel = BTreeMap::new();
        sel.insert("team".to_string(), "blue".to_string());
        assert!(labels_match(&l, &sel));
        sel.insert("team".to_string(), "red".to_string());
        assert!(!labels_match(&l, &sel));
    }

    #[test]
    fn ranges() {
        assert!(check_range("x", 5u64, 1, 10).is_ok());
        assert!(check_range("x", 0u64, 1, 10).is_err());
        assert!(check_cpus("cpus", f64::NAN, 0.01, 64.0).is_err());
        assert!(check_cpus("cpus", f64::INFINITY, 0.01, 64.0).is_err());
        assert!(check_cpus("cpus", 0.5, 0.01, 64.0).is_ok());
    }
}
