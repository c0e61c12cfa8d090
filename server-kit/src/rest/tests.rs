use tonic::{Code, Status};

use super::{gateway::url_form, *};

#[test]
fn checks_ids_and_names_enums() {
    assert!(is_id("01JDX3W0ZK5S9Y2Q8R1V4N6M7T"));
    assert!(!is_id("a/b") && !is_id("") && !is_id(&"x".repeat(65)) && !is_id(".."));
    assert_eq!(
        enum_name(
            "INSTALLATION_STATUS_PARTIALLY_ACTIVE",
            "INSTALLATION_STATUS_"
        ),
        "partially_active"
    );
    let time = prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 5_000_000,
    };
    assert_eq!(timestamp(Some(&time)), "2023-11-14T22:13:20.005Z");
    assert_eq!(timestamp(None), serde_json::Value::Null);
}

#[test]
fn decodes_query_strings() {
    let pairs: Vec<_> = url_form("name=a%20b&status=active&x=1+2&bad=%zz&end=%4")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("name".into(), "a b".into()),
            ("status".into(), "active".into()),
            ("x".into(), "1 2".into()),
            ("bad".into(), "%zz".into()),
            ("end".into(), "%4".into()),
        ]
    );
}

#[test]
fn maps_grpc_errors_to_oakestra_ones() {
    let status: Status = crate::ApiError::invalid(
        "the addon does not validate",
        [("addon.services[0].image", "must not be empty")],
    )
    .into();
    let reply = Reply::from_status(&status, |f| {
        f.strip_prefix("addon.").unwrap_or(f).to_owned()
    });
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.body["code"], 422);
    assert_eq!(reply.body["status"], "Unprocessable Entity");
    assert_eq!(reply.body["reason"], "INVALID_REQUEST");
    assert_eq!(
        reply.body["errors"]["json"]["services[0].image"][0],
        "must not be empty"
    );
    let status: Status =
        crate::ApiError::new(Code::NotFound, "ADDON_NOT_FOUND", "no addon x").into();
    let reply = Reply::from_status(&status, str::to_owned);
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.body["message"], "no addon x");
    assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
    assert_eq!(http_status(Code::AlreadyExists), StatusCode::BAD_REQUEST);
}
