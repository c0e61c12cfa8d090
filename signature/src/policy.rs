//! Trust policies: which keys must have signed which images. One format
//! for the marketplace (checked at approval) and for each node (checked
//! again before a pull, against what the manager sent):
//!
//! ```yaml
//! keys:                       # by name: inline PEM, or a file beside the policy
//!   team: team.pub
//!   ops: |
//!     -----BEGIN PUBLIC KEY-----
//!     ...
//! rules:                      # the first that matches decides
//!   - images: ["registry.internal:5000/team/*"]
//!     addons: ["scheduler*"]  # both lists, when given, must match
//!     keys: [team]            # a signature by any one of them
//!   - images: ["mirror.local/*"]
//!     signature: none         # an unsigned registry: not checked
//! default: required           # everything else: required (by any key
//!                             # above), optional or none
//! ```
//!
//! `*` in a pattern matches any run of characters, `/` included; images
//! are matched as `registry/repository` with Docker's defaults filled in
//! (`busybox` is `docker.io/library/busybox`).

use std::{collections::BTreeMap, path::Path};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::Deserialize;

use crate::{keys::PublicKey, payload};

/// Largest policy file read.
const MAX_POLICY_BYTES: u64 = 1 << 20;
/// Longest signature read (base64 of an ASN.1 ECDSA or Ed25519 signature
/// is under 100 bytes).
const MAX_SIGNATURE_CHARS: usize = 1024;

/// What a rule asks of an image's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Signed by one of the rule's keys, or refused.
    Required,
    /// Checked when there is a signature by one of the keys; unsigned
    /// passes.
    Optional,
    /// Not checked.
    None,
}

/// A key of a policy and its name there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedKey {
    /// The policy's name of it.
    pub name: String,
    /// The key.
    pub key: PublicKey,
}

#[derive(Debug, Clone)]
struct Rule {
    images: Vec<String>,
    addons: Vec<String>,
    mode: Mode,
    /// Indexes into the policy's keys.
    keys: Vec<usize>,
}

/// A trust policy, loaded and checked.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    keys: Vec<NamedKey>,
    rules: Vec<Rule>,
    default: Mode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    keys: BTreeMap<String, String>,
    #[serde(default)]
    rules: Vec<RuleFile>,
    #[serde(default)]
    default: Option<Mode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    addons: Vec<String>,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    signature: Option<Mode>,
}

/// What a policy asks of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement<'a> {
    /// Whether a signature is needed.
    pub mode: Mode,
    /// The keys that may have made it.
    pub keys: Vec<&'a NamedKey>,
}

/// The stable reasons of a refused signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// No signature at all where one is required.
    Missing,
    /// Signatures, none of which is by a trusted key for this digest.
    Invalid,
}

impl RefusalCode {
    /// `SIGNATURE_MISSING` or `SIGNATURE_INVALID`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "SIGNATURE_MISSING",
            Self::Invalid => "SIGNATURE_INVALID",
        }
    }
}

/// Why an image's signature does not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", code.as_str())]
pub struct Refusal {
    /// Which kind of refusal.
    pub code: RefusalCode,
    /// Why, in words.
    pub reason: String,
}

/// One signature found for an image: the payload as signed and the
/// signature, base64 as in cosign's annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The simple-signing payload, byte for byte.
    pub payload: Vec<u8>,
    /// Base64 of the signature over `payload`.
    pub signature: String,
}

/// The signature that passed, and who made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The policy's name of the key.
    pub key_name: String,
    /// The key's fingerprint.
    pub fingerprint: String,
    /// The signature that verified.
    pub candidate: Candidate,
}

/// What checking an image under a policy found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The policy does not check this image.
    NotChecked,
    /// Optional, and no signature by a trusted key was found.
    Unsigned,
    /// Signed by a trusted key.
    Signed(Signed),
}

impl TrustPolicy {
    /// Loads the policy at `path`; key files are read beside it.
    pub fn load(path: &Path) -> Result<Self, String> {
        let size = std::fs::metadata(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?
            .len();
        if size > MAX_POLICY_BYTES {
            return Err(format!("{} is over 1 MiB", path.display()));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::parse(&text, base).map_err(|err| format!("{}: {err}", path.display()))
    }

    /// A node's policy at `path`: as [`TrustPolicy::load`], but a rule may
    /// not match by addon name. On a node the addon's name is what the
    /// manager sent, so a rule keyed on it would let a compromised manager
    /// pick the rule (one with `signature: none`, or other keys) by naming
    /// the addon; the image it pins is what the node pulls, so image
    /// patterns are safe.
    pub fn load_for_node(path: &Path) -> Result<Self, String> {
        let policy = Self::load(path)?;
        policy
            .refuse_addon_rules()
            .map_err(|err| format!("{}: {err}", path.display()))?;
        Ok(policy)
    }

    /// Refuses a rule that matches by addon name.
    pub fn refuse_addon_rules(&self) -> Result<(), String> {
        match self.rules.iter().position(|rule| !rule.addons.is_empty()) {
            Some(i) => Err(format!(
                "rules[{i}].addons: a node cannot trust the addon name the manager sends; match by `images` only"
            )),
            None => Ok(()),
        }
    }

    /// Parses a policy; relative key files are read under `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let file: PolicyFile = serde_yaml_ng::from_str(text).map_err(|err| err.to_string())?;
        let mut keys = Vec::new();
        for (name, value) in &file.keys {
            let pem = if value.trim_start().starts_with("-----BEGIN") {
                value.clone()
            } else {
                let path = base.join(value.trim());
                std::fs::read_to_string(&path)
                    .map_err(|err| format!("keys.{name}: cannot read {}: {err}", path.display()))?
            };
            let key = PublicKey::from_pem(&pem).map_err(|err| format!("keys.{name}: {err}"))?;
            keys.push(NamedKey {
                name: name.clone(),
                key,
            });
        }
        let all: Vec<usize> = (0..keys.len()).collect();
        let mut rules = Vec::new();
        for (i, rule) in file.rules.into_iter().enumerate() {
            if rule.images.is_empty() && rule.addons.is_empty() {
                return Err(format!("rules[{i}]: give `images` or `addons` to match"));
            }
            let mode = rule.signature.unwrap_or(Mode::Required);
            let mut indexes = Vec::new();
            for name in &rule.keys {
                let Some(at) = keys.iter().position(|k| &k.name == name) else {
                    return Err(format!("rules[{i}].keys: no key named `{name}`"));
                };
                indexes.push(at);
            }
            if indexes.is_empty() {
                indexes = all.clone();
            }
            if mode != Mode::None && indexes.is_empty() {
                return Err(format!(
                    "rules[{i}]: a signature is checked but no key is given"
                ));
            }
            rules.push(Rule {
                images: rule.images,
                addons: rule.addons,
                mode,
                keys: indexes,
            });
        }
        let default = file.default.unwrap_or(Mode::Required);
        if default != Mode::None && keys.is_empty() {
            return Err(format!(
                "default: {} needs at least one key (or say `default: none`)",
                match default {
                    Mode::Required => "required",
                    _ => "optional",
                }
            ));
        }
        Ok(Self {
            keys,
            rules,
            default,
        })
    }

    /// What the policy asks of `image` (any reference) of addon `addon`.
    pub fn requirement(&self, image: &str, addon: &str) -> Requirement<'_> {
        let repository = payload::normalize_repository(image);
        let rule = self.rules.iter().find(|rule| {
            (rule.images.is_empty() || rule.images.iter().any(|p| glob(p, &repository)))
                && (rule.addons.is_empty() || rule.addons.iter().any(|p| glob(p, addon)))
        });
        match rule {
            Some(rule) => Requirement {
                mode: rule.mode,
                keys: rule.keys.iter().map(|&i| &self.keys[i]).collect(),
            },
            None => Requirement {
                mode: self.default,
                keys: self.keys.iter().collect(),
            },
        }
    }

    /// Checks the signatures found for `image`, pinned at `digest`, of
    /// addon `addon`.
    pub fn check(
        &self,
        image: &str,
        digest: &str,
        addon: &str,
        candidates: &[Candidate],
    ) -> Result<Verdict, Refusal> {
        let requirement = self.requirement(image, addon);
        match requirement.mode {
            Mode::None => Ok(Verdict::NotChecked),
            Mode::Optional => Ok(verify(&requirement.keys, image, digest, candidates)
                .map_or(Verdict::Unsigned, Verdict::Signed)),
            Mode::Required => {
                verify(&requirement.keys, image, digest, candidates).map(Verdict::Signed)
            }
        }
    }
}

/// The first of `candidates` that signs exactly `digest` in the
/// repository of `image` with one of `keys`.
pub fn verify(
    keys: &[&NamedKey],
    image: &str,
    digest: &str,
    candidates: &[Candidate],
) -> Result<Signed, Refusal> {
    let repository = payload::normalize_repository(image);
    if candidates.is_empty() {
        return Err(Refusal {
            code: RefusalCode::Missing,
            reason: format!("{repository}@{digest} has no signature"),
        });
    }
    let mut why = None;
    for candidate in candidates {
        if let Err(reason) = payload::check(&candidate.payload, &repository, digest) {
            why.get_or_insert(reason);
            continue;
        }
        let Some(signature) = (candidate.signature.len() <= MAX_SIGNATURE_CHARS)
            .then(|| STANDARD.decode(candidate.signature.trim()).ok())
            .flatten()
        else {
            why.get_or_insert_with(|| "a signature is not base64".into());
            continue;
        };
        if let Some(signer) = keys
            .iter()
            .find(|named| named.key.verify(&candidate.payload, &signature))
        {
            return Ok(Signed {
                key_name: signer.name.clone(),
                fingerprint: signer.key.fingerprint(),
                candidate: candidate.clone(),
            });
        }
        why.get_or_insert_with(|| {
            format!(
                "not signed by a trusted key ({})",
                keys.iter()
                    .map(|k| k.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    }
    Err(Refusal {
        code: RefusalCode::Invalid,
        reason: format!(
            "{repository}@{digest}: {}",
            why.unwrap_or_else(|| "no valid signature".into())
        ),
    })
}

/// Whether `text` matches `pattern`, where `*` matches any run of
/// characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::keys::SigningKey;

    const DIGEST: &str = "sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b";

    /// A real cosign signature (sigstore-rs's test data): cosign signed
    /// this payload with this key.
    const COSIGN_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENptdY/l3nB0yqkXLBWkZWQwo6+cu
OSWS1X9vPavpiQOoTTGC0xX57OojUadxF1cdQmrsiReWg2Wn4FneJfa8xw==
-----END PUBLIC KEY-----
";
    const COSIGN_SIGNATURE: &str = "MEUCIQD6q/COgzOyW0YH1Dk+CCYSt4uAhm3FDHUwvPI55zwnlwIgE0ZK58ZOWpZw8YVmBapJhBqCfdPekIknimuO0xH8Jh8=";

    fn policy(text: &str) -> TrustPolicy {
        TrustPolicy::parse(text, Path::new(".")).unwrap()
    }

    fn indent(pem: &str) -> String {
        pem.lines().map(|l| format!("    {l}\n")).collect()
    }

    #[test]
    fn a_signature_cosign_made_verifies() {
        let text = format!("keys:\n  cosign: |\n{}", indent(COSIGN_PUBLIC_KEY));
        let policy = policy(&text);
        let candidate = Candidate {
            payload: payload::build("registry-testing.svc.lan/busybox", DIGEST),
            signature: COSIGN_SIGNATURE.into(),
        };
        let verdict = policy
            .check(
                "registry-testing.svc.lan/busybox:latest",
                DIGEST,
                "any",
                std::slice::from_ref(&candidate),
            )
            .unwrap();
        let Verdict::Signed(signed) = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(signed.key_name, "cosign");
        // Another digest's check finds the payload names a different one.
        let other = format!("sha256:{}", "1".repeat(64));
        let refused = policy
            .check(
                "registry-testing.svc.lan/busybox",
                &other,
                "any",
                std::slice::from_ref(&candidate),
            )
            .unwrap_err();
        assert_eq!(refused.code, RefusalCode::Invalid);
        // One byte changed in what was signed.
        let mut tampered = candidate;
        tampered.payload.push(b' ');
        assert_eq!(
            policy
                .check(
                    "registry-testing.svc.lan/busybox",
                    DIGEST,
                    "any",
                    &[tampered]
                )
                .unwrap_err()
                .code,
            RefusalCode::Invalid
        );
    }

    #[test]
    fn rules_decide_in_order_and_the_default_takes_the_rest() {
        let (team, _) = SigningKey::generate().unwrap();
        let (ops, _) = SigningKey::generate().unwrap();
        let text = format!(
            "keys:\n  team: |\n{}  ops: |\n{}rules:\n  - images: [\"127.0.0.1:5000/team/*\"]\n    keys: [team]\n  - images: [\"mirror.local/*\"]\n    signature: none\n  - addons: [\"beta-*\"]\n    signature: optional\ndefault: required\n",
            indent(&team.public_key().to_pem()),
            indent(&ops.public_key().to_pem())
        );
        let policy = policy(&text);
        let image = "127.0.0.1:5000/team/sched";
        let signed_by = |key: &SigningKey, repository: &str| {
            let payload = payload::build(repository, DIGEST);
            Candidate {
                signature: STANDARD.encode(key.sign(&payload).unwrap()),
                payload,
            }
        };
        assert!(matches!(
            policy.check(image, DIGEST, "a", &[signed_by(&team, image)]),
            Ok(Verdict::Signed(Signed { ref key_name, .. })) if key_name == "team"
        ));
        assert_eq!(
            policy
                .check(image, DIGEST, "a", &[signed_by(&ops, image)])
                .unwrap_err()
                .code,
            RefusalCode::Invalid,
            "the rule names only team"
        );
        assert_eq!(
            policy.check(image, DIGEST, "a", &[]).unwrap_err().code,
            RefusalCode::Missing
        );
        assert_eq!(
            policy.check("mirror.local/x", DIGEST, "a", &[]),
            Ok(Verdict::NotChecked)
        );
        assert_eq!(
            policy.check("ghcr.io/x/y", DIGEST, "beta-one", &[]),
            Ok(Verdict::Unsigned)
        );
        // The default takes any key of the policy.
        let other = "ghcr.io/x/y";
        assert!(matches!(
            policy.check(other, DIGEST, "a", &[signed_by(&ops, other)]),
            Ok(Verdict::Signed(_))
        ));
        // A signature made in one repository does not pass in another.
        assert_eq!(
            policy
                .check(other, DIGEST, "a", &[signed_by(&ops, image)])
                .unwrap_err()
                .code,
            RefusalCode::Invalid
        );
    }

    #[test]
    fn bad_policies_are_refused_with_where() {
        let parse = |text: &str| TrustPolicy::parse(text, Path::new(".")).unwrap_err();
        assert!(parse("default: required\n").contains("needs at least one key"));
        assert!(parse("rules:\n  - keys: [x]\n").contains("rules[0]"));
        assert!(
            parse("rules:\n  - images: [a]\n    keys: [x]\ndefault: none\n")
                .contains("no key named `x`")
        );
        assert!(parse("keys:\n  k: missing.pub\n").contains("keys.k"));
        assert!(parse("surprise: 1\n").contains("unknown field"));
        assert!(TrustPolicy::parse("default: none\n", Path::new(".")).is_ok());
    }

    #[test]
    fn a_node_refuses_rules_by_addon_name() {
        let (key, _) = SigningKey::generate().unwrap();
        let keys = format!("keys:\n  k: |\n{}", indent(&key.public_key().to_pem()));
        let by_name = policy(&format!(
            "{keys}rules:\n  - addons: [\"beta-*\"]\n    signature: none\n"
        ));
        assert!(
            by_name
                .refuse_addon_rules()
                .unwrap_err()
                .contains("rules[0].addons")
        );
        let by_image = policy(&format!(
            "{keys}rules:\n  - images: [\"mirror.local/*\"]\n    signature: none\n"
        ));
        assert!(by_image.refuse_addon_rules().is_ok());
    }

    #[test]
    fn globs() {
        assert!(glob("a/*", "a/b/c"));
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(!glob("a*c", "abbb"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    proptest! {
        #[test]
        fn a_pattern_without_stars_matches_only_itself(a in "[a-z/.:]{0,12}", b in "[a-z/.:]{0,12}") {
            prop_assert_eq!(glob(&a, &b), a == b);
        }

        #[test]
        fn a_star_matches_every_suffix(prefix in "[a-z/]{0,8}", rest in "[a-z/]{0,8}") {
            let pattern = format!("{prefix}*");
            let text = format!("{prefix}{rest}");
            prop_assert!(glob(&pattern, &text));
        }
    }
}
