//! The addons an installation is made from, read from the marketplace.

use super::*;

impl Manager {
    /// Approved version `version` of addon `name`: its marketplace id and
    /// its descriptor, images pinned.
    pub(super) async fn fetch_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<(String, Descriptor), Error> {
        let response = self
            .marketplace
            .clone()
            .list_addons(mpb::ListAddonsRequest {
                statuses: vec![
                    mpb::AddonStatus::Approved.into(),
                    mpb::AddonStatus::UnderReview.into(),
                    mpb::AddonStatus::FailedVerification.into(),
                ],
                name: name.to_owned(),
                page_size: 500,
                page_token: String::new(),
            })
            .await
            .map_err(|status| Error::MarketplaceUnavailable(status.message().to_owned()))?;
        let Some(found) = response
            .into_inner()
            .addons
            .into_iter()
            .find(|a| a.version == version)
        else {
            return Err(Error::AddonNotFound(format!("{name}@{version}")));
        };
        let id = found.id.clone();
        Ok((id.clone(), approved(&id, found)?))
    }

    pub(super) async fn fetch_approved(&self, marketplace_id: &str) -> Result<Descriptor, Error> {
        let response = self
            .marketplace
            .clone()
            .get_addon(mpb::GetAddonRequest {
                id: marketplace_id.to_owned(),
            })
            .await;
        let addon = match response {
            Ok(response) => response.into_inner().addon.unwrap_or_default(),
            Err(status) if status.code() == Code::NotFound => {
                return Err(Error::AddonNotFound(marketplace_id.to_owned()));
            }
            Err(status) => return Err(Error::MarketplaceUnavailable(status.message().to_owned())),
        };
        approved(marketplace_id, addon)
    }
}

/// The descriptor of marketplace addon `marketplace_id`, if it is approved
/// with every image pinned.
pub(super) fn approved(marketplace_id: &str, addon: mpb::Addon) -> Result<Descriptor, Error> {
    let status = mpb::AddonStatus::try_from(addon.status).unwrap_or_default();
    if status != mpb::AddonStatus::Approved {
        return Err(Error::NotApproved {
            marketplace_id: marketplace_id.to_owned(),
            status: status.as_str_name().to_owned(),
        });
    }
    let descriptor = Descriptor::from_proto(addon);
    if let Some(service) = descriptor
        .services
        .iter()
        .find(|s| s.resolved_image.is_none())
    {
        return Err(Error::ImageNotPinned {
            marketplace_id: marketplace_id.to_owned(),
            service: service.service_name.clone(),
        });
    }
    Ok(descriptor)
}
