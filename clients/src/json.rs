//! Protobuf messages as JSON and YAML in the canonical proto3 JSON mapping,
//! with the proto field names (`service_name`, not `serviceName`): enums by
//! name, timestamps in RFC 3339, 64-bit integers as strings. Built on the
//! descriptor set the servers publish for reflection, so the output is the
//! same a `grpcurl` user sees.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::ClientError;

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut pool = DescriptorPool::decode(oakestra_addons_proto::FILE_DESCRIPTOR_SET)
            .expect("the built-in descriptor set decodes");
        // google.rpc error details, to print what an error carries.
        pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .expect("the error details' descriptor set decodes");
        pool
    })
}

/// An error as JSON: its code by name, its message, its `ErrorInfo` reason
/// (when it has one) and every detail it carries, each with its `@type`.
pub fn status_to_json(status: &tonic::Status) -> serde_json::Value {
    let mut details = serde_json::Value::Array(Vec::new());
    if !status.details().is_empty()
        && let Some(descriptor) = pool().get_message_by_name("google.rpc.Status")
        && let Ok(decoded) = DynamicMessage::decode(descriptor, status.details())
    {
        let options = SerializeOptions::new().use_proto_field_name(true);
        if let Ok(serde_json::Value::Object(mut object)) =
            decoded.serialize_with_options(serde_json::value::Serializer, &options)
            && let Some(found) = object.remove("details")
        {
            details = found;
        }
    }
    let reason = {
        use tonic_types::StatusExt as _;
        status.get_details_error_info().map(|info| info.reason)
    };
    serde_json::json!({
        "code": crate::error::code_name(status.code()),
        "reason": reason,
        "message": status.message(),
        "details": details,
    })
}

/// `message` (of the protobuf type `full_name`) as a JSON value.
pub fn to_json<M: prost::Message>(
    message: &M,
    full_name: &str,
) -> Result<serde_json::Value, ClientError> {
    let descriptor = pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| ClientError::Input(format!("unknown message type {full_name}")))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|err| ClientError::Input(err.to_string()))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|err| ClientError::Input(err.to_string()))
}

/// A message of type `full_name` from its JSON form (either field naming).
pub fn from_json<M: prost::Message + Default>(
    value: &serde_json::Value,
    full_name: &str,
) -> Result<M, ClientError> {
    let descriptor = pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| ClientError::Input(format!("unknown message type {full_name}")))?;
    let dynamic = DynamicMessage::deserialize(descriptor, value.clone())
        .map_err(|err| ClientError::Input(err.to_string()))?;
    M::decode(prost::Message::encode_to_vec(&dynamic).as_slice())
        .map_err(|err| ClientError::Input(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oakestra_addons_proto::engine::v1 as pb;

    #[test]
    fn round_trips_with_proto_names() {
        let installation = pb::Installation {
            id: "01J".into(),
            status: pb::InstallationStatus::PartiallyActive.into(),
            revision: 7,
            services: vec![pb::ServiceStatus {
                service_name: "api".into(),
                exit_code: Some(3),
                update_time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let name = "oakestra.addons.engine.v1.Installation";
        let json = to_json(&installation, name).unwrap();
        assert_eq!(json["status"], "INSTALLATION_STATUS_PARTIALLY_ACTIVE");
        assert_eq!(json["revision"], "7");
        assert_eq!(json["services"][0]["service_name"], "api");
        assert_eq!(json["services"][0]["exit_code"], 3);
        assert_eq!(json["services"][0]["update_time"], "2023-11-14T22:13:20Z");
        let back: pb::Installation = from_json(&json, name).unwrap();
        assert_eq!(back, installation);
    }
}
