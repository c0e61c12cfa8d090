//! Records as the backends store them.

use crate::{Document, Error, RawRecord, Result, Versioned, stored_key};

pub(super) fn encode<T: Document>(record: &Versioned<T>, seq: u64) -> Result<RawRecord> {
    let id = record.value.id().to_owned();
    let body = serde_json::value::to_raw_value(&record.value).map_err(|source| Error::Codec {
        action: "encode",
        collection: T::COLLECTION.to_owned(),
        id: id.clone(),
        source: source.into(),
    })?;
    Ok(RawRecord {
        key: stored_key(record.value.unique_key(), &id),
        status: record.value.status(),
        revision: record.revision,
        seq,
        id,
        body,
    })
}

pub(super) fn decode<T: Document>(raw: RawRecord) -> Result<Versioned<T>> {
    decode_body(&raw.id, raw.revision, &raw.body)
}

pub(super) fn decode_body<T: Document>(
    id: &str,
    revision: u64,
    body: &serde_json::value::RawValue,
) -> Result<Versioned<T>> {
    let value = serde_json::from_str(body.get()).map_err(|source| Error::Codec {
        action: "decode",
        collection: T::COLLECTION.to_owned(),
        id: id.to_owned(),
        source: source.into(),
    })?;
    Ok(Versioned { revision, value })
}
