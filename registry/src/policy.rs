//! Which registries may be reached, judged on the addresses a name
//! resolves to: a publisher names the image, so without this a publish
//! makes the marketplace (and every node) send requests to the node's
//! loopback, a cloud's metadata service or anything on the internal
//! network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The registries a process may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryPolicy {
    /// `HOST` or `HOST:PORT` (`--allowed-registry`): when any is given,
    /// only these (and the insecure ones) are reached at all, at whatever
    /// address they resolve to.
    pub allowed: Vec<String>,
    /// `HOST` or `HOST:PORT` reached over plain HTTP
    /// (`--insecure-registry`), at whatever address they resolve to.
    pub insecure: Vec<String>,
}

impl RegistryPolicy {
    /// Whether `host` (with `port`, or any port when `None`) is named in
    /// `list`.
    fn named(list: &[String], host: &str, port: Option<u16>) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        list.iter().any(|entry| {
            let (entry_host, entry_port) = split_host_port(entry);
            entry_host.eq_ignore_ascii_case(host)
                && match (entry_port, port) {
                    (Some(want), Some(port)) => want == port,
                    _ => true,
                }
        })
    }

    /// Whether `host[:port]` is reached over plain HTTP.
    pub fn is_insecure(&self, host: &str, port: Option<u16>) -> bool {
        Self::named(&self.insecure, host, port)
    }

    /// Whether the operator named `host[:port]`: it may be reached at any
    /// address.
    fn is_named(&self, host: &str, port: Option<u16>) -> bool {
        Self::named(&self.allowed, host, port) || self.is_insecure(host, port)
    }

    /// Judges reaching `host` (`port` when known) at `address`.
    pub fn check(&self, host: &str, port: Option<u16>, address: IpAddr) -> Result<(), String> {
        if self.is_named(host, port) {
            return Ok(());
        }
        if !self.allowed.is_empty() {
            return Err(format!(
                "{host} is not an allowed registry (see --allowed-registry)"
            ));
        }
        if is_public(address) {
            Ok(())
        } else {
            Err(format!(
                "{host} resolves to {address}, which is not a public address: name it with --allowed-registry to reach it"
            ))
        }
    }
}

/// `host` and `port` of `host[:port]` (`[v6]:port` too).
pub fn split_host_port(text: &str) -> (&str, Option<u16>) {
    if let Some(rest) = text.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return (text, None);
        };
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().ok()),
        _ => (text, None),
    }
}

/// Whether `address` is on the public internet: not loopback, private,
/// link-local (cloud metadata services), shared (CGNAT), multicast,
/// broadcast, documentation, benchmarking, reserved or unspecified, and an
/// IPv6 address that embeds an IPv4 one is judged by that one.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let segments = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address too.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = segments[6].to_be_bytes();
                let [c, d] = segments[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (segments[0] & 0xfe00) == 0xfc00 // unique local
                || (segments[0] & 0xffc0) == 0xfe80 // link-local
                || (segments[0] & 0xffc0) == 0xfec0 // site-local
                || segments[0] == 0x2001 && segments[1] == 0x0db8 // documentation
                || segments[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible
                || v6 == Ipv6Addr::UNSPECIFIED)
        }
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    !(v4.is_unspecified()
        || v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_multicast()
        || v4.is_broadcast()
        || v4.is_documentation()
        || a == 0
        || (a == 100 && (b & 0xc0) == 64) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // benchmarking
        || a >= 240) // reserved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_public_addresses_by_default() {
        for public in [
            "1.1.1.1",
            "140.82.112.3",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip(public)), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip(private)), "{private}");
        }
    }

    #[test]
    fn names_the_operator_gave_reach_any_address() {
        let policy = RegistryPolicy {
            allowed: Vec::new(),
            insecure: vec!["127.0.0.1:5000".into()],
        };
        assert!(
            policy
                .check("127.0.0.1", Some(5000), ip("127.0.0.1"))
                .is_ok()
        );
        assert!(
            policy
                .check("127.0.0.1", Some(5001), ip("127.0.0.1"))
                .is_err()
        );
        assert!(
            policy
                .check("evil.example", None, ip("169.254.169.254"))
                .is_err()
        );
        assert!(policy.check("ghcr.io", None, ip("140.82.112.3")).is_ok());
        assert!(policy.is_insecure("127.0.0.1", Some(5000)));
        assert!(!policy.is_insecure("ghcr.io", Some(443)));

        let strict = RegistryPolicy {
            allowed: vec!["registry.internal".into(), "[::1]:5000".into()],
            insecure: Vec::new(),
        };
        assert!(
            strict
                .check("registry.internal", Some(443), ip("10.0.0.5"))
                .is_ok()
        );
        assert!(strict.check("::1", Some(5000), ip("::1")).is_ok());
        assert!(strict.check("ghcr.io", None, ip("140.82.112.3")).is_err());
    }

    #[test]
    fn splits_hosts_and_ports() {
        assert_eq!(split_host_port("r.example:5000"), ("r.example", Some(5000)));
        assert_eq!(split_host_port("r.example"), ("r.example", None));
        assert_eq!(split_host_port("[::1]:5000"), ("::1", Some(5000)));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }
}
