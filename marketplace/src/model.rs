//! The marketplace's records: addon descriptors and their review state, as
//! the handlers use them and as the store keeps them.

use addons_descriptor::Descriptor;
use addons_store::Document;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where an addon is in its review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddonStatus {
    /// Published; verification has not finished.
    UnderReview,
    /// Every image verified and pinned.
    Approved,
    /// An image failed verification for good.
    FailedVerification,
    /// Withdrawn by a reviewer: refused for installs, for good.
    Revoked,
}

impl AddonStatus {
    /// The name the store filters on (Oakestra's status strings).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnderReview => "under_review",
            Self::Approved => "approved",
            Self::FailedVerification => "failed_verification",
            Self::Revoked => "revoked",
        }
    }
}

/// A published addon: its descriptor and its review.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Addon {
    /// Server-assigned id, sorting in creation order.
    pub id: String,
    /// What the developer published.
    #[serde(flatten)]
    pub descriptor: Descriptor,
    /// Review status.
    pub status: AddonStatus,
    /// The latest verification.
    pub verification: Verification,
    /// When it was published.
    pub create_time: DateTime<Utc>,
    /// When it last changed.
    pub update_time: DateTime<Utc>,
    /// Who published it; empty without authentication.
    #[serde(default)]
    pub owner: String,
    /// Why and when it was revoked, once it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<Revocation>,
}

/// A reviewer's revocation of an addon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Why.
    pub reason: String,
    /// Who revoked it.
    pub revoked_by: String,
    /// When.
    pub time: DateTime<Utc>,
}

// Read far more often than written: served from memory.
addons_store::document!(Addon in "addons", resident;
    /// One record per name and version.
    fn unique_key(&self) -> Option<String> {
        Some(version_key(&self.descriptor.name, &self.descriptor.version))
    }

    fn status(&self) -> String {
        self.status.as_str().to_owned()
    }
);

/// Who owns an addon name: taken by its first version's publisher and kept
/// when every version is deleted, so a name once published cannot be taken
/// over by someone else (whose new versions would reach every operator
/// who trusts the name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameClaim {
    /// The addon name.
    pub name: String,
    /// Its owner: the subject that published its first version.
    pub owner: String,
}

impl Document for NameClaim {
    const COLLECTION: &'static str = "addon_names";
    const LOGGED: bool = false;

    fn id(&self) -> &str {
        &self.name
    }
}

/// The unique key of version `version` of addon `name`.
pub(crate) fn version_key(name: &str, version: &str) -> String {
    format!("{name}@{version}")
}

/// The prefix of the unique keys of every version of addon `name`.
pub(crate) fn versions_prefix(name: &str) -> String {
    format!("{name}@")
}

/// The state of an addon's verification.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// Attempts in the current review.
    pub attempts: u32,
    /// The last transient error.
    pub last_error: Option<String>,
    /// When the next attempt runs.
    pub next_attempt_time: Option<DateTime<Utc>>,
    /// When the verification reached its result.
    pub complete_time: Option<DateTime<Utc>>,
    /// Per-service results of the latest attempt.
    pub services: Vec<ServiceVerification>,
    /// Why the addon failed, summarised.
    pub reason: Option<String>,
    /// The marketplace replica running an attempt now, where several
    /// share the store: the others leave the addon alone until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
}

/// A replica's claim on the next verification attempt of an addon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The replica (its [`VerifierOptions::replica`](crate::verifier::VerifierOptions::replica)).
    pub owner: String,
    /// When another replica may take the attempt over: the owner died or
    /// hangs.
    pub expires: DateTime<Utc>,
}

/// The verification result of one service image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceVerification {
    /// The service.
    pub service_name: String,
    /// The image as published.
    pub image: String,
    /// The image pinned by digest.
    pub resolved_image: Option<String>,
    /// Whether it passed.
    pub ok: bool,
    /// Why it failed.
    pub reason: Option<String>,
    /// Platforms the image provides.
    pub platforms: Vec<String>,
    /// Registry bytes fetched to verify it.
    pub bytes_fetched: u64,
    /// The stable code of a definite failure: `IMAGE_INVALID`,
    /// `SIGNATURE_MISSING` or `SIGNATURE_INVALID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    /// Who signed the image, when the trust policy checked a signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureCheck>,
}

/// The signature that verified an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureCheck {
    /// The trust policy's name of the key.
    pub key_name: String,
    /// `sha256:<hex>` of the key.
    pub key_fingerprint: String,
    /// When it was checked.
    pub check_time: DateTime<Utc>,
}
