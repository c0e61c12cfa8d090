//! Entry points for the fuzz targets (`fuzz/`): what a stranger's bytes on
//! the monitor link go through before anything is stored. Not an API.

use oakestra_addons_proto::engine::v1 as pb;
use prost::Message as _;

/// A hello as the manager reads it: decoded, then checked.
pub fn hello(data: &[u8]) {
    if let Ok(hello) = pb::Hello::decode(data) {
        let _ = super::hello::ValidHello::try_from(hello);
    }
}

/// A status report as the manager reads it: decoded, checked, and its
/// statuses converted.
pub fn report(data: &[u8]) {
    if let Ok(report) = pb::StatusReport::decode(data) {
        let _ = super::reports::check_report(report);
    }
}

/// A whole link message.
pub fn message(data: &[u8]) {
    if let Ok(message) = pb::OpenLinkRequest::decode(data) {
        match message.message {
            Some(pb::open_link_request::Message::Hello(hello)) => {
                let _ = super::hello::ValidHello::try_from(hello);
            }
            Some(pb::open_link_request::Message::Report(report)) => {
                let _ = super::reports::check_report(report);
            }
            _ => {}
        }
    }
}
