//! Names of addons, services, volumes and networks.
//!
//! They follow what Oakestra and Docker accept for container names, so
//! every descriptor Oakestra's marketplace takes is taken here too, and a
//! plugin can carry the name of a core component that holds an underscore
//! (`service_manager`, `resource_abstractor`). Where a name must be a DNS
//! name (a container's hostname, the names in its hosts file), the node uses
//! [`dns_alias`] beside the name itself.

/// Longest name.
pub const MAX_NAME: usize = 63;

/// What a name may be, for error messages.
pub const NAME_RULE: &str =
    "letters, digits, '_', '.' and '-', starting with a letter or a digit, at most 63 characters";

/// Whether `name` is a name: ASCII letters, digits, `_`, `.` and `-`,
/// starting with a letter or a digit, at most [`MAX_NAME`] bytes (Docker's
/// container-name grammar, bounded). It is always one plain path
/// component, never `.` or `..`.
pub fn is_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The DNS label a name is known by where only DNS names fit: lowercase,
/// with `_` and `.` turned into `-` and trailing `-` dropped
/// (`Service_Manager` → `service-manager`). Two names of one addon with the
/// same alias are refused at publish, so the alias names one service.
pub fn dns_alias(name: &str) -> String {
    let alias: String = name
        .chars()
        .map(|c| match c {
            '_' | '.' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    alias.trim_end_matches('-').to_owned()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn takes_oakestra_names() {
        for name in [
            "my_service",
            "service_manager",
            "resource_abstractor",
            "Scheduler",
            "v1.2",
            "a",
            "9lives",
            "x_",
        ] {
            assert!(is_name(name), "{name}");
        }
        for name in [
            "",
            "_x",
            ".x",
            "-x",
            "..",
            ".",
            "a/b",
            "a b",
            "ä",
            "a\u{0}",
            &"a".repeat(64),
        ] {
            assert!(!is_name(name), "{name:?}");
        }
    }

    #[test]
    fn aliases_are_dns_labels() {
        assert_eq!(dns_alias("service_manager"), "service-manager");
        assert_eq!(dns_alias("My.Service_"), "my-service");
        assert_eq!(dns_alias("web"), "web");
    }

    proptest! {
        #[test]
        fn every_name_has_a_dns_label_alias(name in "[A-Za-z0-9][A-Za-z0-9_.-]{0,62}") {
            prop_assert!(is_name(&name));
            let alias = dns_alias(&name);
            prop_assert!(!alias.is_empty() && alias.len() <= MAX_NAME);
            prop_assert!(alias.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            prop_assert!(!alias.starts_with('-') && !alias.ends_with('-'));
        }
    }
}
