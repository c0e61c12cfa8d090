//! The MongoDB backend, through the official `mongodb` driver.
//!
//! Each collection holds documents `{_id, key, status, revision, body}`, with
//! a unique index on `key`. `body` is the record as a JSON string: addon
//! labels and environment keys may contain dots and dollar signs, which
//! MongoDB-compatible servers treat differently as field names. Preconditions
//! are part of the write's filter, so they are checked atomically by the
//! server. Writes use `w: majority, j: true` so that a successful call is on
//! disk (on a majority of a replica set).

use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::{
    Client, Collection, Database, IndexModel,
    bson::{Document, doc},
    error::{ErrorKind, WriteFailure},
    options::{
        ClientOptions, CollectionOptions, IndexOptions, ReadConcern, ReturnDocument, WriteConcern,
    },
};

use crate::{Backend, Error, Precondition, RawPage, RawRecord, Result, check};

/// The collection of counters ([`Backend::advance`]), one document each.
const COUNTERS: &str = "counters";

/// MongoDB's duplicate key error code.
const DUPLICATE_KEY: i32 = 11000;

pub(crate) struct MongoBackend {
    db: Database,
    description: String,
}

/// The database named in a connection string's path, if any.
pub(crate) fn database_from_uri(uri: &str) -> Option<String> {
    let rest = &uri[uri.find("://")? + 3..];
    let path = &rest[rest.find('/')? + 1..];
    let name = path.split('?').next().unwrap_or_default();
    (!name.is_empty()).then(|| name.to_owned())
}

impl MongoBackend {
    pub(crate) async fn connect(uri: &str, database: &str, timeout: Duration) -> Result<Self> {
        let description = format!("mongodb database `{database}`");
        let unavailable = |reason: String| Error::Unavailable {
            store: description.clone(),
            reason,
        };
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|err| unavailable(err.to_string()))?;
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout = Some(timeout);
        options
            .app_name
            .get_or_insert_with(|| "oakestra-addons".to_owned());
        let client = Client::with_options(options).map_err(|err| unavailable(err.to_string()))?;
        let db = client.database(database);
        db.run_command(doc! { "ping": 1 })
            .await
            .map_err(|err| unavailable(ping_failure(&err, timeout)))?;
        Ok(Self { db, description })
    }

    fn collection(&self, name: &str) -> Collection<Document> {
        let options = CollectionOptions::builder()
            .write_concern(
                WriteConcern::builder()
                    .w(mongodb::options::Acknowledgment::Majority)
                    .journal(true)
                    .build(),
            )
            .read_concern(ReadConcern::majority())
            .build();
        self.db.collection_with_options(name, options)
    }
}

/// The gist of a failed first contact; the driver's message describes the
/// whole topology on one very long line.
fn ping_failure(err: &mongodb::error::Error, timeout: Duration) -> String {
    match err.kind.as_ref() {
        ErrorKind::ServerSelection { message, .. } => {
            let cause = message
                .split_once("Error: Kind: ")
                .map(|(_, rest)| rest.split(", labels").next().unwrap_or(rest))
                .unwrap_or("no server answered");
            format!("no MongoDB server answered within {timeout:?}: {cause}")
        }
        _ => err
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(write)) => write.code == DUPLICATE_KEY,
        ErrorKind::Command(command) => command.code == DUPLICATE_KEY,
        _ => err.to_string().contains("E11000"),
    }
}

fn to_document(record: &RawRecord) -> Result<Document> {
    let body = record.body.get();
    let revision = i64::try_from(record.revision).map_err(|e| Error::backend("encode", e))?;
    let seq = i64::try_from(record.seq).map_err(|e| Error::backend("encode", e))?;
    Ok(doc! {
        "_id": &record.id,
        "key": &record.key,
        "status": &record.status,
        "revision": revision,
        "seq": seq,
        "body": body,
    })
}

/// An integer field, stored as 64 or 32 bits.
fn integer(
    document: &Document,
    name: &str,
) -> Result<i64, mongodb::bson::document::ValueAccessError> {
    document
        .get_i64(name)
        .or_else(|_| document.get_i32(name).map(i64::from))
}

fn from_document(document: &Document) -> Result<RawRecord> {
    let field = |name: &str| {
        document
            .get_str(name)
            .map_err(|e| Error::backend("decode", format!("field `{name}`: {e}")))
    };
    let revision = integer(document, "revision")
        .map_err(|e| Error::backend("decode", format!("field `revision`: {e}")))?;
    Ok(RawRecord {
        id: field("_id")?.to_owned(),
        key: field("key")?.to_owned(),
        status: field("status")?.to_owned(),
        revision: u64::try_from(revision).map_err(|e| Error::backend("decode", e))?,
        // Records written before the change log have none.
        seq: integer(document, "seq")
            .ok()
            .and_then(|seq| u64::try_from(seq).ok())
            .unwrap_or(0),
        body: serde_json::value::RawValue::from_string(field("body")?.to_owned())
            .map_err(|e| Error::backend("decode", e))?,
    })
}

fn status_filter(filter: &mut Document, statuses: &[String]) {
    if !statuses.is_empty() {
        filter.insert("status", doc! { "$in": statuses.to_vec() });
    }
}

#[async_trait]
impl Backend for MongoBackend {
    async fn prepare(&self, collection: &str) -> Result<()> {
        let coll = self.collection(collection);
        let unique = IndexModel::builder()
            .keys(doc! { "key": 1 })
            .options(
                IndexOptions::builder()
                    .unique(true)
                    .name("key_unique".to_owned())
                    .build(),
            )
            .build();
        // A plain status index: listings sort on `_id`, which has its own
        // index. (nx-27017 cannot index `_id` inside a compound index.)
        let by_status = IndexModel::builder()
            .keys(doc! { "status": 1 })
            .options(IndexOptions::builder().name("status".to_owned()).build())
            .build();
        coll.create_indexes([unique, by_status])
            .await
            .map_err(|e| Error::backend("prepare", e))?;
        Ok(())
    }

    async fn insert(&self, collection: &str, record: &RawRecord) -> Result<()> {
        let coll = self.collection(collection);
        match coll.insert_one(to_document(record)?).await {
            Ok(_) => Ok(()),
            Err(err) if is_duplicate_key(&err) => {
                let key = if err.to_string().contains("_id") {
                    record.id.clone()
                } else {
                    record.key.get(2..).unwrap_or_default().to_owned()
                };
                Err(Error::AlreadyExists {
                    collection: collection.to_owned(),
                    key,
                })
            }
            Err(err) => Err(Error::backend("insert", err)),
        }
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<RawRecord>> {
        self.collection(collection)
            .find_one(doc! { "_id": id })
            .await
            .map_err(|e| Error::backend("get", e))?
            .as_ref()
            .map(from_document)
            .transpose()
    }

    async fn replace(
        &self,
        collection: &str,
        record: &RawRecord,
        status_in: &[String],
    ) -> Result<()> {
        let expected = record.revision - 1;
        let mut filter = doc! {
            "_id": &record.id,
            "revision": i64::try_from(expected).map_err(|e| Error::backend("replace", e))?,
        };
        status_filter(&mut filter, status_in);
        let result = match self
            .collection(collection)
            .replace_one(filter, to_document(record)?)
            .await
        {
            Ok(result) => result,
            Err(err) if is_duplicate_key(&err) => {
                return Err(Error::AlreadyExists {
                    collection: collection.to_owned(),
                    key: record.key.get(2..).unwrap_or_default().to_owned(),
                });
            }
            Err(err) => return Err(Error::backend("replace", err)),
        };
        if result.matched_count == 1 {
            return Ok(());
        }
        self.explain_miss(collection, &record.id, Some(expected), status_in)
            .await
    }

    async fn write_many(
        &self,
        collection: &str,
        records: &[RawRecord],
        _durable: bool,
        // Never opened again: every acknowledged write is kept.
        _since: Option<u64>,
    ) -> Result<()> {
        // No multi-document transactions without a replica set: check every
        // condition first, then write one by one. The collections written
        // this way (the manager's) have one writer at a time, the manager
        // holding its plane's lease, which serialises its writes; another
        // process's write in between makes a later one fail its revision
        // condition, never overwrite.
        for record in records {
            let current = self.get(collection, &record.id).await?;
            match (record.revision, current) {
                (1, Some(_)) => {
                    return Err(Error::AlreadyExists {
                        collection: collection.to_owned(),
                        key: record.id.clone(),
                    });
                }
                (1, None) => {}
                (_, None) => {
                    return Err(Error::NotFound {
                        collection: collection.to_owned(),
                        id: record.id.clone(),
                    });
                }
                (revision, Some(current)) => check(&current, Some(revision - 1), &[])?,
            }
        }
        for record in records {
            if record.revision == 1 {
                self.insert(collection, record).await?;
            } else {
                self.replace(collection, record, &[]).await?;
            }
        }
        Ok(())
    }

    async fn delete(&self, collection: &str, id: &str, condition: &Precondition) -> Result<bool> {
        let mut filter = doc! { "_id": id };
        if let Some(revision) = condition.revision {
            let revision = i64::try_from(revision).map_err(|e| Error::backend("delete", e))?;
            filter.insert("revision", revision);
        }
        status_filter(&mut filter, &condition.status_in);
        let result = self
            .collection(collection)
            .delete_one(filter)
            .await
            .map_err(|e| Error::backend("delete", e))?;
        if result.deleted_count == 1 {
            return Ok(true);
        }
        match self
            .explain_miss(collection, id, condition.revision, &condition.status_in)
            .await
        {
            Err(Error::NotFound { .. }) => Ok(false),
            other => other.map(|()| false),
        }
    }

    async fn delete_many(&self, collection: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.collection(collection)
            .delete_many(doc! { "_id": { "$in": ids } })
            .await
            .map_err(|e| Error::backend("delete_many", e))?;
        Ok(())
    }

    async fn list(&self, collection: &str, page: RawPage<'_>) -> Result<Vec<RawRecord>> {
        let RawPage {
            filter,
            after,
            limit,
        } = page;
        let mut query = Document::new();
        status_filter(&mut query, &filter.statuses);
        match (&filter.key, &filter.key_prefix) {
            (Some(key), _) => {
                query.insert("key", key);
            }
            // A range rather than a regular expression: every MongoDB-wire
            // server answers it from the key index.
            (None, Some(prefix)) => {
                query.insert(
                    "key",
                    doc! { "$gte": prefix, "$lt": format!("{prefix}\u{10ffff}") },
                );
            }
            (None, None) => {}
        }
        if let Some(after) = after {
            query.insert("_id", doc! { "$gt": after });
        }
        let limit = i64::try_from(limit).map_err(|e| Error::backend("list", e))?;
        let documents: Vec<Document> = self
            .collection(collection)
            .find(query)
            .sort(doc! { "_id": 1 })
            .limit(limit)
            .await
            .map_err(|e| Error::backend("list", e))?
            .try_collect()
            .await
            .map_err(|e| Error::backend("list", e))?;
        documents.iter().map(from_document).collect()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    async fn advance(&self, name: &str, by: u64) -> Result<u64> {
        let by = i64::try_from(by).map_err(|e| Error::backend("advance", e))?;
        // Two first advances racing to create the counter: one of the
        // upserts fails on the duplicate id (MongoDB says so; some wire
        // servers answer no document), and its retry finds the counter.
        let mut attempts = 0;
        let counter = loop {
            attempts += 1;
            match self
                .collection(COUNTERS)
                .find_one_and_update(doc! { "_id": name }, doc! { "$inc": { "value": by } })
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await
            {
                Ok(Some(counter)) => break counter,
                Ok(None) if attempts < 5 => {}
                Err(err) if is_duplicate_key(&err) && attempts < 5 => {}
                Ok(None) => {
                    return Err(Error::backend(
                        "advance",
                        format!("counter `{name}` not returned"),
                    ));
                }
                Err(err) => return Err(Error::backend("advance", err)),
            }
        };
        integer(&counter, "value")
            .ok()
            .and_then(|value| u64::try_from(value).ok())
            .ok_or_else(|| Error::backend("advance", format!("counter `{name}` is not a count")))
    }

    async fn delete_before(&self, collection: &str, id: &str) -> Result<()> {
        self.collection(collection)
            .delete_many(doc! { "_id": { "$lt": id } })
            .await
            .map_err(|e| Error::backend("delete_before", e))?;
        Ok(())
    }
}

impl MongoBackend {
    /// Says why a conditional write matched nothing: no record, or a
    /// precondition that does not hold.
    async fn explain_miss(
        &self,
        collection: &str,
        id: &str,
        expected_revision: Option<u64>,
        status_in: &[String],
    ) -> Result<()> {
        match self.get(collection, id).await? {
            None => Err(Error::NotFound {
                collection: collection.to_owned(),
                id: id.to_owned(),
            }),
            Some(current) => {
                check(&current, expected_revision, status_in)?;
                // The record matched when read back: another write won the
                // race in between.
                Err(Error::Conflict {
                    id: id.to_owned(),
                    reason: "another write came first".to_owned(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_database_in_a_connection_string() {
        assert_eq!(
            database_from_uri("mongodb://h:1/addons?w=1").as_deref(),
            Some("addons")
        );
        assert_eq!(database_from_uri("mongodb://h:1/"), None);
        assert_eq!(database_from_uri("mongodb://h:1"), None);
        assert_eq!(
            database_from_uri("mongodb://u:p@h1:1,h2:2/db").as_deref(),
            Some("db")
        );
    }
}
