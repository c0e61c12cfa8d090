//! Safe retries of mutating calls (AIP-155): a call with a `request_id` is
//! remembered with a fingerprint of its request and its response, so a
//! retry with the same id and request gets the first response back instead
//! of running again, and the same id with another request is refused.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use addons_store::{Collection, Filter, Precondition, Store};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tonic::{Code, Status};

use crate::{ApiError, Identity, audit};

/// How long a response is remembered.
pub const REMEMBERED_FOR: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest `request_id` accepted.
pub const MAX_REQUEST_ID: usize = 128;

/// A remembered call.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RequestRecord {
    id: String,
    /// `method/LEN:caller/request_id`.
    key: String,
    /// SHA-256 of the encoded request without its `request_id`, base64.
    fingerprint: String,
    /// The encoded response, base64.
    response: String,
    /// Seconds since the epoch when the call completed.
    complete_time: i64,
}

addons_store::document!(RequestRecord in "requests", unlogged;
    fn unique_key(&self) -> Option<String> {
        Some(self.key.clone())
    }

    fn status(&self) -> String {
        "done".to_owned()
    }
);

/// The remembered calls of one server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Requests {
    records: Collection<RequestRecord>,
    /// Calls in flight by key, so a retry that overtakes its original waits
    /// for it instead of running beside it.
    in_flight: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    inserts: Arc<AtomicU64>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn expired(record: &RequestRecord) -> bool {
    let age = now().saturating_sub(record.complete_time);
    age > i64::try_from(REMEMBERED_FOR.as_secs()).unwrap_or(i64::MAX)
}

/// Checks a `request_id`: at most [`MAX_REQUEST_ID`] bytes of printable
/// ASCII. The error names the field `request_id`.
pub fn check_request_id(request_id: &str) -> Result<(), Status> {
    if request_id.len() > MAX_REQUEST_ID || !request_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            "invalid request_id",
            [(
                "request_id",
                format!("at most {MAX_REQUEST_ID} printable ASCII characters, no spaces"),
            )],
        )
        .into());
    }
    Ok(())
}

/// A mutating call as its handler's use case sees it.
#[derive(Debug)]
pub struct Mutation<'a, Req> {
    /// Who called.
    pub identity: &'a Identity,
    /// Its `request_id`, empty when it has none.
    pub request_id: &'a str,
    /// The request, its `request_id` cleared.
    pub request: &'a Req,
}

impl<Req> Clone for Mutation<'_, Req> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Req> Copy for Mutation<'_, Req> {}

impl Requests {
    /// The remembered calls kept in `store`.
    pub async fn open(store: &Store) -> Result<Self, addons_store::Error> {
        Ok(Self {
            records: store.collection().await?,
            in_flight: Arc::default(),
            inserts: Arc::default(),
        })
    }

    /// Serves a mutating call: takes its caller's identity and its
    /// `request_id` (cleared in the request), runs `call` at most once per
    /// caller and id ([`Requests::once`]), and writes the audit record of
    /// the request's method on its resource ([`Mutating`](oakestra_addons_proto::Mutating)). Every mutating
    /// handler is this and its call into its use case.
    pub async fn serve<Req, Resp>(
        &self,
        request: tonic::Request<Req>,
        call: impl AsyncFnOnce(Mutation<'_, Req>) -> Result<Resp, Status>,
    ) -> Result<tonic::Response<Resp>, Status>
    where
        Req: oakestra_addons_proto::Mutating,
        Resp: Message + Default,
    {
        let identity = Identity::of(&request);
        let mut request = request.into_inner();
        let id = std::mem::take(request.request_id());
        let mutation = Mutation {
            identity: &identity,
            request_id: &id,
            request: &request,
        };
        let outcome = self
            .once(Req::METHOD, &identity.subject, &id, &request, || {
                call(mutation)
            })
            .await;
        audit(&identity, Req::METHOD, request.resource(), &outcome);
        outcome.map(tonic::Response::new)
    }

    /// Runs `call` once per `request_id`: with an empty id it just runs; with
    /// an id seen before for `method` it returns the remembered response, or
    /// INVALID_ARGUMENT `REQUEST_ID_REUSED` when `request` (whose own
    /// `request_id` field the caller has cleared) differs from the first.
    /// Only successful responses are remembered. A `request_id` is the
    /// `caller`'s own: another caller's call with the same id is another
    /// request, never answered with the first caller's response.
    pub async fn once<Req, Resp, Fut>(
        &self,
        method: &str,
        caller: &str,
        request_id: &str,
        request: &Req,
        call: impl FnOnce() -> Fut,
    ) -> Result<Resp, Status>
    where
        Req: Message,
        Resp: Message + Default,
        Fut: Future<Output = Result<Resp, Status>>,
    {
        if request_id.is_empty() {
            return call().await;
        }
        check_request_id(request_id)?;
        // The caller's length first: no subject can pose as another.
        let key = format!("{method}/{}:{caller}/{request_id}", caller.len());
        let fingerprint = STANDARD.encode(Sha256::digest(request.encode_to_vec()));
        let slot = {
            let mut in_flight = self
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            in_flight.entry(key.clone()).or_default().clone()
        };
        let result = {
            let _held = slot.lock().await;
            self.once_held(&key, &fingerprint, call).await
        };
        {
            let mut in_flight = self
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // The map holds one reference, this call another: nobody waits.
            if Arc::strong_count(&slot) == 2 {
                in_flight.remove(&key);
            }
        }
        result
    }

    async fn once_held<Resp, Fut>(
        &self,
        key: &str,
        fingerprint: &str,
        call: impl FnOnce() -> Fut,
    ) -> Result<Resp, Status>
    where
        Resp: Message + Default,
        Fut: Future<Output = Result<Resp, Status>>,
    {
        let found = self
            .records
            .by_unique_key(key)
            .await
            .map_err(crate::store_error_to_status)?;
        if let Some(found) = found {
            if expired(&found.value) {
                self.records
                    .delete(&found.value.id, &Precondition::none())
                    .await
                    .map_err(crate::store_error_to_status)?;
            } else if found.value.fingerprint != fingerprint {
                return Err(ApiError::new(
                    Code::InvalidArgument,
                    "REQUEST_ID_REUSED",
                    "request_id was used before with a different request",
                )
                .violation(
                    "request_id",
                    "used before with a different request; use a new request_id for a new request",
                )
                .into());
            } else {
                return STANDARD
                    .decode(&found.value.response)
                    .ok()
                    .and_then(|bytes| Resp::decode(bytes.as_slice()).ok())
                    .ok_or_else(|| {
                        ApiError::new(
                            Code::Internal,
                            "RECORD_UNREADABLE",
                            "remembered response is unreadable",
                        )
                        .into()
                    });
            }
        }
        let response = call().await?;
        let record = RequestRecord {
            id: addons_store::new_id(),
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            response: STANDARD.encode(response.encode_to_vec()),
            complete_time: now(),
        };
        if let Err(err) = self.records.insert(record).await {
            // The call took effect; only its retry is not covered.
            tracing::warn!(%key, error = %err, "cannot remember a response for its retries");
        }
        let inserted = self
            .inserts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if inserted.is_multiple_of(64) {
            self.prune().await;
        }
        Ok(response)
    }

    /// Forgets responses older than [`REMEMBERED_FOR`]: ids sort by creation
    /// time, so the oldest come first.
    async fn prune(&self) {
        let Ok(page) = self.records.list(&Filter::default(), 256, None).await else {
            return;
        };
        for record in page.items.iter().filter(|r| expired(&r.value)) {
            let _ = self
                .records
                .delete(&record.value.id, &Precondition::none())
                .await;
        }
    }
}
