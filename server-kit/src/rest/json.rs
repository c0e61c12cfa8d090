//! Domain values as Oakestra's JSON writes them, and listings as one list.

use http::StatusCode;

use super::Reply;

/// Most records one REST listing returns: Oakestra's listings have no
/// pages (the gRPC ones page through everything).
pub const MAX_LISTED: usize = 5000;

/// Every page of a listing, as one JSON list of at most [`MAX_LISTED`]:
/// `page` fetches the page after a token (`""` first) and returns its items
/// and the next token (`""` after the last).
pub async fn every_page<F, Fut>(mut page: F) -> Result<Reply, Reply>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<serde_json::Value>, String), Reply>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (more, next) = page(token).await?;
        items.extend(more);
        if next.is_empty() || items.len() >= MAX_LISTED {
            break;
        }
        token = next;
    }
    items.truncate(MAX_LISTED);
    Ok(Reply::json(StatusCode::OK, items.into()))
}

/// A timestamp as RFC 3339 text, `null` when unset.
pub fn timestamp(time: Option<&prost_types::Timestamp>) -> serde_json::Value {
    time.and_then(|t| {
        let nanos = u32::try_from(t.nanos).ok()?;
        chrono::DateTime::from_timestamp(t.seconds, nanos)
    })
    .map_or(serde_json::Value::Null, |t| {
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .into()
    })
}

/// An enum value's name without its type's prefix, in lowercase, as
/// Oakestra writes statuses (`INSTALLATION_STATUS_PARTIALLY_ACTIVE` →
/// `partially_active`).
pub fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

/// A privilege in JSON: `kind` without its prefix (`host_path`).
pub fn privilege_json(
    kind: &str,
    service_name: &str,
    value: &str,
    read_only: bool,
) -> serde_json::Value {
    serde_json::json!({
        "kind": enum_name(kind, "PRIVILEGE_KIND_"),
        "service_name": service_name,
        "value": value,
        "read_only": read_only,
    })
}
