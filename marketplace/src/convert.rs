//! Conversions between the protobuf messages and the marketplace's records.

use oakestra_addons_proto::marketplace::v1 as pb;

use crate::model::{Addon, AddonStatus, ServiceVerification, Verification};

pub(crate) use addons_server_kit::timestamp;

impl From<AddonStatus> for pb::AddonStatus {
    fn from(status: AddonStatus) -> Self {
        match status {
            AddonStatus::UnderReview => Self::UnderReview,
            AddonStatus::Approved => Self::Approved,
            AddonStatus::FailedVerification => Self::FailedVerification,
            AddonStatus::Revoked => Self::Revoked,
        }
    }
}

/// Maps a requested status; `None` for UNSPECIFIED and unknown values.
pub(crate) fn status_from_proto(value: i32) -> Option<AddonStatus> {
    match pb::AddonStatus::try_from(value).ok()? {
        pb::AddonStatus::Unspecified => None,
        pb::AddonStatus::UnderReview => Some(AddonStatus::UnderReview),
        pb::AddonStatus::Approved => Some(AddonStatus::Approved),
        pb::AddonStatus::FailedVerification => Some(AddonStatus::FailedVerification),
        pb::AddonStatus::Revoked => Some(AddonStatus::Revoked),
    }
}

pub(crate) fn addon_to_proto(record: addons_store::Versioned<Addon>) -> pb::Addon {
    let addon = record.value;
    pb::Addon {
        id: addon.id,
        status: pb::AddonStatus::from(addon.status).into(),
        verification: Some(verification_to_proto(addon.verification)),
        create_time: Some(timestamp(addon.create_time)),
        update_time: Some(timestamp(addon.update_time)),
        revision: record.revision,
        owner: addon.owner,
        revocation: addon.revocation.map(|r| pb::Revocation {
            reason: r.reason,
            revoked_by: r.revoked_by,
            revoke_time: Some(timestamp(r.time)),
        }),
        required_privileges: addons_descriptor::privileges::required(&addon.descriptor)
            .into_iter()
            .map(Into::into)
            .collect(),
        ..addon.descriptor.into_proto()
    }
}

/// The message of an addon kept in memory (a resident record): what
/// `GetAddon` and `ListAddons` answer, made once per revision.
pub(crate) fn addon_view(record: &addons_store::Versioned<std::sync::Arc<Addon>>) -> pb::Addon {
    addon_to_proto(addons_store::Versioned {
        revision: record.revision,
        value: (*record.value).clone(),
    })
}

fn verification_to_proto(v: Verification) -> pb::Verification {
    pb::Verification {
        attempts: v.attempts,
        last_error: v.last_error.unwrap_or_default(),
        next_attempt_time: v.next_attempt_time.map(timestamp),
        complete_time: v.complete_time.map(timestamp),
        services: v
            .services
            .into_iter()
            .map(|s: ServiceVerification| pb::ServiceVerification {
                service_name: s.service_name,
                image: s.image,
                resolved_image: s.resolved_image.unwrap_or_default(),
                ok: s.ok,
                reason: s.reason.unwrap_or_default(),
                platforms: s.platforms,
                bytes_fetched: s.bytes_fetched,
                reason_code: s.reason_code.unwrap_or_default(),
                signed_by: s
                    .signature
                    .as_ref()
                    .map(|c| c.key_name.clone())
                    .unwrap_or_default(),
                key_fingerprint: s
                    .signature
                    .as_ref()
                    .map(|c| c.key_fingerprint.clone())
                    .unwrap_or_default(),
                signature_check_time: s.signature.map(|c| timestamp(c.check_time)),
            })
            .collect(),
        reason: v.reason.unwrap_or_default(),
    }
}
