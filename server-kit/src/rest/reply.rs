//! A REST answer in the shape of Oakestra's Flask servers, and the HTTP
//! status of each gRPC code.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use tonic::{Code, Status, body::Body};
use tonic_types::StatusExt as _;

/// A REST answer: a status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body.
    pub body: serde_json::Value,
}

impl Reply {
    /// `body` with `status`.
    pub fn json(status: StatusCode, body: serde_json::Value) -> Self {
        Self { status, body }
    }

    /// An error in Oakestra's shape.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self::json(status, error_body(status, &message.into()))
    }

    /// 405 naming the methods the route answers.
    pub fn method_not_allowed(allowed: &str) -> Self {
        Self::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("this route answers {allowed}"),
        )
    }

    /// 422 with the fields of `location` (`json` or `query`) that do not
    /// validate, as flask-smorest answers.
    pub fn invalid(location: &str, violations: &[(String, String)]) -> Self {
        let status = StatusCode::UNPROCESSABLE_ENTITY;
        let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (field, reason) in violations {
            let field = if field.is_empty() { "_schema" } else { field };
            fields
                .entry(field.to_owned())
                .or_default()
                .push(reason.clone());
        }
        let mut body = error_body(status, "the request does not validate");
        body["errors"] = serde_json::json!({ location: fields });
        Self::json(status, body)
    }

    /// A gRPC error as a REST one. `rename` turns a request field path of
    /// the gRPC message into the REST body's (e.g. drops `addon.`).
    pub fn from_status(status: &Status, rename: impl Fn(&str) -> String) -> Self {
        let http = http_status(status.code());
        let mut body = error_body(http, status.message());
        if let Some(reason) = crate::reason_of(status) {
            body["reason"] = reason.into();
        }
        if let Some(bad) = status.get_details_bad_request() {
            let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for violation in bad.field_violations {
                fields
                    .entry(rename(&violation.field))
                    .or_default()
                    .push(violation.description);
            }
            if !fields.is_empty() {
                body["errors"] = serde_json::json!({ "json": fields });
            }
        }
        if let Some(failure) = status.get_details_precondition_failure() {
            body["violations"] = failure
                .violations
                .into_iter()
                .map(|v| {
                    serde_json::json!({
                        "type": v.r#type,
                        "subject": v.subject,
                        "description": v.description,
                    })
                })
                .collect();
        }
        Self::json(http, body)
    }

    pub(crate) fn into_response(self) -> http::Response<Body> {
        let bytes = serde_json::to_vec(&self.body).unwrap_or_default();
        let mut response = http::Response::new(Body::new(Full::new(Bytes::from(bytes))));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

fn error_body(status: StatusCode, message: &str) -> serde_json::Value {
    serde_json::json!({
        "code": status.as_u16(),
        "status": status.canonical_reason().unwrap_or_default(),
        "message": message,
    })
}

/// The HTTP status of a gRPC code, as Oakestra's servers answer the same
/// failures: 400 for a request that cannot go ahead (an addon already
/// installed, not approved, privileges not accepted), 422 for one that
/// does not validate, 404, 401 and 403.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::UNPROCESSABLE_ENTITY,
        Code::FailedPrecondition | Code::AlreadyExists => StatusCode::BAD_REQUEST,
        Code::Aborted => StatusCode::CONFLICT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
