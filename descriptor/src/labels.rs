//! Node labels and node selectors: what a monitor announces about its node
//! (`--node-label zone=edge`) and what an installation asks of the nodes
//! that run it. Pure: the monitor checks its flags with it, the manager a
//! hello and an install request, and the manager matches them.

use std::collections::BTreeMap;

use crate::FieldViolation;

/// Most labels a node announces or a selector names.
pub const MAX_LABELS: usize = 32;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_LENGTH: usize = 63;

/// Checks labels (or a selector) given at `field`: at most [`MAX_LABELS`],
/// keys 1 to 63 bytes of ASCII letters, digits, `-`, `_`, `.` and `/`,
/// values at most 63 bytes of letters, digits, `-`, `_` and `.`. Every
/// violation is named by its path (`labels[zone]`).
pub fn validate_labels(labels: &BTreeMap<String, String>, field: &str) -> Vec<FieldViolation> {
    let mut violations = Vec::new();
    if labels.len() > MAX_LABELS {
        violations.push(FieldViolation::new(
            field,
            format!("at most {MAX_LABELS} labels, got {}", labels.len()),
        ));
        return violations;
    }
    for (key, value) in labels {
        let path = || format!("{field}[{}]", printable(key));
        let key_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
        if key.is_empty() || key.len() > MAX_LABEL_LENGTH || !key.chars().all(key_char) {
            violations.push(FieldViolation::new(
                path(),
                format!(
                    "a label key is 1 to {MAX_LABEL_LENGTH} bytes of letters, digits, '-', '_', '.' and '/'"
                ),
            ));
        }
        let value_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if value.len() > MAX_LABEL_LENGTH || !value.chars().all(value_char) {
            violations.push(FieldViolation::new(
                path(),
                format!(
                    "a label value is at most {MAX_LABEL_LENGTH} bytes of letters, digits, '-', '_' and '.'"
                ),
            ));
        }
    }
    violations
}

/// Whether a node with `labels` runs what `selector` places: it has every
/// label of the selector, with the same value. An empty selector matches
/// every node.
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// Parses `KEY=VALUE` (a flag's form of one label).
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))?;
    let one = BTreeMap::from([(key.to_owned(), value.to_owned())]);
    match validate_labels(&one, "label").first() {
        Some(violation) => Err(format!("`{text}`: {}", violation.reason)),
        None => Ok((key.to_owned(), value.to_owned())),
    }
}

/// A key as a path shows it: at most 64 characters, control characters
/// escaped, so a hostile key cannot flood or forge an error message.
fn printable(key: &str) -> String {
    key.chars().take(64).flat_map(char::escape_debug).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn checks_keys_values_and_count() {
        assert!(
            validate_labels(
                &labels(&[("zone", "edge"), ("oakestra.io/arch", "arm64")]),
                "l"
            )
            .is_empty()
        );
        assert!(
            validate_labels(&labels(&[("gpu", "")]), "l").is_empty(),
            "an empty value is a value"
        );
        let bad = validate_labels(
            &labels(&[("", "x"), ("a b", "x"), ("ok", "a=b")]),
            "hello.labels",
        );
        let fields: Vec<&str> = bad.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["hello.labels[]", "hello.labels[a b]", "hello.labels[ok]"]
        );
        let too_long = "k".repeat(64);
        assert_eq!(validate_labels(&labels(&[(&too_long, "v")]), "l").len(), 1);
        let many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|n| (format!("k{n}"), String::new()))
            .collect();
        assert_eq!(validate_labels(&many, "l")[0].field, "l");
        let hostile = validate_labels(&labels(&[("a\nb", "v")]), "l");
        assert_eq!(hostile[0].field, "l[a\\nb]");
    }

    #[test]
    fn a_selector_needs_every_label_with_its_value() {
        let node = labels(&[("zone", "edge"), ("gpu", "yes")]);
        assert!(matches(&BTreeMap::new(), &node));
        assert!(matches(&labels(&[("zone", "edge")]), &node));
        assert!(matches(&node, &node));
        assert!(!matches(&labels(&[("zone", "cloud")]), &node));
        assert!(!matches(
            &labels(&[("zone", "edge"), ("ssd", "yes")]),
            &node
        ));
        assert!(!matches(&labels(&[("zone", "edge")]), &BTreeMap::new()));
    }

    #[test]
    fn parses_flags() {
        assert_eq!(
            parse_label("zone=edge").unwrap(),
            ("zone".into(), "edge".into())
        );
        assert_eq!(parse_label("gpu=").unwrap(), ("gpu".into(), String::new()));
        assert!(parse_label("zone").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_label("=edge").is_err());
        assert!(parse_label("zone=a=b").is_err());
    }

    proptest! {
        #[test]
        fn a_node_matches_every_subset_of_its_labels(
            node in proptest::collection::btree_map("[a-z]{1,4}", "[a-z]{0,3}", 0..6),
            keep in proptest::collection::vec(any::<bool>(), 6),
            extra in "[a-z]{5,6}",
        ) {
            let selector: BTreeMap<String, String> = node
                .iter()
                .zip(keep.iter().cycle())
                .filter(|(_, keep)| **keep)
                .map(|((k, v), _)| (k.clone(), v.clone()))
                .collect();
            prop_assert!(matches(&selector, &node));
            let mut more = selector.clone();
            more.insert(extra, "x".into());
            prop_assert!(!matches(&more, &node));
        }
    }
}
