//! What a test's monitor leaves on the host if the test ends early (a panic
//! before the monitor removed its containers): network namespaces under its
//! state dir, bridges with its prefix, iptables rules for its subnets.
//! [`NodeCleanup`] removes them when dropped, so a failed test does not
//! poison the next run with addresses that are still in use.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Removes a test monitor's host networking when dropped.
#[derive(Debug)]
pub struct NodeCleanup {
    state_dir: PathBuf,
    bridge_prefix: String,
    subnet_prefix: String,
}

/// iptables chains the CNI plugins share between containers: only rules in
/// them are removed, never the chains.
const SHARED_CHAINS: &[&str] = &[
    "CNI-HOSTPORT-DNAT",
    "CNI-HOSTPORT-SETMARK",
    "CNI-HOSTPORT-MASQ",
    "CNI-FORWARD",
    "CNI-ADMIN",
];

impl NodeCleanup {
    /// Cleans up after a monitor with this state dir, `--bridge-prefix` and
    /// `--subnet-prefix`, now (leftovers of an earlier run) and on drop.
    pub fn new(state_dir: &Path, bridge_prefix: &str, subnet_prefix: &str) -> Self {
        let cleanup = Self {
            state_dir: state_dir.to_owned(),
            bridge_prefix: bridge_prefix.to_owned(),
            subnet_prefix: subnet_prefix.to_owned(),
        };
        cleanup.run();
        cleanup
    }

    fn run(&self) {
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("netns")) {
            for entry in entries.flatten() {
                let _ = nix::mount::umount2(&entry.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Ok(links) = std::fs::read_dir("/sys/class/net") {
            for link in links.flatten() {
                let name = link.file_name().to_string_lossy().into_owned();
                let index = name.strip_prefix(&self.bridge_prefix);
                if index.is_some_and(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit())) {
                    let _ = Command::new("ip").args(["link", "del", &name]).status();
                }
            }
        }
        // Any other bridge holding an address in the subnets (left by a run
        // with another prefix) would take their routes.
        if let Ok(output) = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
        {
            let text = String::from_utf8_lossy(&output.stdout);
            for line in text.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let [_, name, "inet", address, ..] = words.as_slice()
                    && address.starts_with(&format!("{}.", self.subnet_prefix))
                {
                    let _ = Command::new("ip").args(["link", "del", name]).status();
                }
            }
        }
        for table in ["nat", "filter"] {
            remove_rules(table, &format!("{}.", self.subnet_prefix));
        }
    }
}

impl Drop for NodeCleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// Removes the rules of `table` that name an address starting with
/// `subnet`, the rules jumping to per-container CNI chains that do, and
/// those chains.
fn remove_rules(table: &str, subnet: &str) {
    let Ok(output) = Command::new("iptables-save").args(["-t", table]).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let rules: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("-A "))
        .filter_map(|rule| {
            let (chain, rest) = rule.split_once(' ')?;
            Some((chain.to_owned(), rest.to_owned()))
        })
        .collect();
    let names_subnet = |rest: &str| {
        rest.split_whitespace()
            .any(|word| word.starts_with(subnet) || word.contains(&format!(":{subnet}")))
            || rest.contains(&format!("--to-destination {subnet}"))
    };
    let chains: Vec<String> = rules
        .iter()
        .filter(|(chain, rest)| {
            chain.starts_with("CNI-")
                && !SHARED_CHAINS.contains(&chain.as_str())
                && names_subnet(rest)
        })
        .map(|(chain, _)| chain.clone())
        .collect();
    for (chain, rest) in &rules {
        let jumps = rest
            .split_whitespace()
            .skip_while(|w| *w != "-j")
            .nth(1)
            .is_some_and(|target| chains.iter().any(|c| c == target));
        if names_subnet(rest) || jumps {
            let mut args = vec![
                "-t".to_owned(),
                table.to_owned(),
                "-D".to_owned(),
                chain.clone(),
            ];
            args.extend(shell_words(rest));
            let _ = Command::new("iptables").args(&args).output();
        }
    }
    for chain in &chains {
        let _ = Command::new("iptables")
            .args(["-t", table, "-F", chain])
            .output();
        let _ = Command::new("iptables")
            .args(["-t", table, "-X", chain])
            .output();
    }
}

/// Splits an iptables-save rule into arguments, honouring double quotes
/// (comments) and backslash escapes.
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                    in_word = true;
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_rules_like_a_shell() {
        assert_eq!(
            shell_words(
                r#"-s 10.9.1.2/32 -m comment --comment "name: \"x\" id: \"a b\"" -j CNI-1"#
            ),
            [
                "-s",
                "10.9.1.2/32",
                "-m",
                "comment",
                "--comment",
                r#"name: "x" id: "a b""#,
                "-j",
                "CNI-1"
            ]
        );
    }
}
