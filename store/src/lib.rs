//! Storage of the Oakestra addons services.
//!
//! The marketplace and the manager keep their records through [`Store`], which
//! hides which database is behind it: MongoDB through the official driver
//! (`mongodb://host:port/dbname`, as Oakestra runs it) or an embedded,
//! crash-safe redb file (`embedded:PATH`, the default). Both backends give the
//! same guarantees, checked by one conformance suite in `integration-tests`:
//!
//! - a record's [`Document::unique_key`] is unique within its collection;
//! - every record carries a revision, starting at 1 and bumped by every
//!   write; a write whose [`Precondition`] names a stale revision or a status
//!   the record no longer has fails with [`Error::Conflict`] and changes
//!   nothing (optimistic concurrency and compare-and-set status transitions);
//! - listings filter on status and unique key and page in id order with
//!   opaque tokens that stay valid while records are added or removed;
//! - a write is durable when its future returns `Ok`.
//!
//! **No crate but this one knows which database is behind a [`Store`].**

mod changelog;
mod collection;
mod embedded;
mod error;
mod fenced;
mod follow;
mod mongo;
mod observed;
mod resident;

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::{Serialize, de::DeserializeOwned};

pub use crate::{
    changelog::ChangeKind,
    collection::{Change, Collection},
    error::{Error, Result},
    fenced::Fence,
    follow::{Event, FollowEnd, Start},
    observed::Observer,
};

/// A record type the store can hold.
pub trait Document: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// Name of the collection (MongoDB collection, redb table) holding it.
    const COLLECTION: &'static str;

    /// Identifier of the record; never changes.
    fn id(&self) -> &str;

    /// Key that must be unique within the collection, if the record has one
    /// right now (the marketplace: the addon name; the manager: the
    /// marketplace id of an installation that is not disabled). None by
    /// default.
    fn unique_key(&self) -> Option<String> {
        None
    }

    /// Status the store filters on and compares in preconditions; empty by
    /// default.
    fn status(&self) -> String {
        String::new()
    }

    /// Whether writes of this collection go to the store's change log, so
    /// watchers can resume ([`Collection::changes_since`]). Bookkeeping
    /// collections turn it off.
    const LOGGED: bool = true;

    /// Whether the store keeps every record of the collection in memory as
    /// well and serves reads from there ([`Collection::get_view`],
    /// [`Collection::list_views`]): for collections read far more often
    /// than written. Memory is updated by each write of this process, so
    /// only this process may write the collection.
    const RESIDENT: bool = false;
}

/// Implements [`Document`] for a record whose id is its `id` field:
/// `document!(Type in "collection")`, then the collection's flags
/// (`unlogged`: [`Document::LOGGED`] off; `resident`: [`Document::RESIDENT`]
/// on), then, after `;`, any other items of the impl (`unique_key`,
/// `status`). A record keyed by another field implements it by hand.
#[macro_export]
macro_rules! document {
    ($type:ident in $collection:literal $(, $flag:ident)* $(; $($items:tt)*)?) => {
        impl $crate::Document for $type {
            const COLLECTION: &'static str = $collection;
            $($crate::document!(@flag $flag);)*

            fn id(&self) -> &str {
                &self.id
            }

            $($($items)*)?
        }
    };
    (@flag unlogged) => {
        const LOGGED: bool = false;
    };
    (@flag resident) => {
        const RESIDENT: bool = true;
    };
}

/// A record together with its revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// Starts at 1, grows by one with every write of the record.
    pub revision: u64,
    /// The record.
    pub value: T,
}

/// What must hold for a write to go ahead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Precondition {
    /// The record must still be at this revision.
    pub revision: Option<u64>,
    /// The record's status must be one of these; empty means any.
    pub status_in: Vec<String>,
}

impl Precondition {
    /// No condition: the write goes ahead whatever the record looks like.
    pub fn none() -> Self {
        Self::default()
    }

    /// The record must still be at `revision`.
    pub fn revision(revision: u64) -> Self {
        Self {
            revision: Some(revision),
            status_in: Vec::new(),
        }
    }

    /// The record's status must be one of `statuses`.
    pub fn status_in<S: Into<String>>(statuses: impl IntoIterator<Item = S>) -> Self {
        Self {
            revision: None,
            status_in: statuses.into_iter().map(Into::into).collect(),
        }
    }
}

/// Which records a listing returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Statuses to include; empty means any.
    pub statuses: Vec<String>,
    /// Only the record holding this unique key.
    pub unique_key: Option<String>,
    /// Only records whose unique key starts with this (for keys made of
    /// parts, such as `name@version`).
    pub unique_key_prefix: Option<String>,
}

/// When a write must be durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Before the call returns.
    Now,
    /// With the store's next durable write, which the caller makes before
    /// it relies on this one (one disk sync for several writes).
    WithNext,
    /// Before the call returns, and with it the writes made
    /// [`Durability::WithNext`] since `Epoch` ([`Collection::epoch`]): the
    /// write is refused, and nothing written, when the database was opened
    /// again since (an embedded store after an I/O error), which dropped
    /// them.
    NowWith(Epoch),
}

/// Which opening of the database a write was made in: an embedded store
/// opens its database again after an I/O error, dropping the writes not
/// yet durable. See [`Durability::NowWith`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(pub(crate) u64);

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// Records of this page in id order.
    pub items: Vec<Versioned<T>>,
    /// Token for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// Returns a new record identifier. Identifiers are ULIDs in lowercase: they
/// sort in creation order, which gives listings a stable order.
pub fn new_id() -> String {
    ulid::Ulid::new().to_string().to_lowercase()
}

/// Where a [`Store`] keeps its data, parsed from `--store`.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A redb file at this path.
    Embedded(std::path::PathBuf),
    /// A MongoDB deployment.
    MongoDb {
        /// The connection string as given.
        uri: String,
        /// Database named in the connection string's path, if any.
        database: Option<String>,
    },
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Connection strings may carry passwords; never print them.
        match self {
            Self::Embedded(path) => f.debug_tuple("Embedded").field(path).finish(),
            Self::MongoDb { database, .. } => f
                .debug_struct("MongoDb")
                .field("database", database)
                .finish_non_exhaustive(),
        }
    }
}

impl std::str::FromStr for Location {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("embedded:") {
            if path.is_empty() {
                return Err(Error::InvalidLocation {
                    reason:
                        "`embedded:` needs a file path, as in `embedded:/var/lib/addons/store.redb`"
                            .into(),
                });
            }
            return Ok(Self::Embedded(path.into()));
        }
        if s.starts_with("mongodb://") || s.starts_with("mongodb+srv://") {
            return Ok(Self::MongoDb {
                uri: s.to_owned(),
                database: mongo::database_from_uri(s),
            });
        }
        Err(Error::InvalidLocation {
            reason: format!(
                "`{}` is neither `embedded:PATH` nor a `mongodb://` connection string",
                redact(s)
            ),
        })
    }
}

/// Removes a password from a connection string before it is shown.
fn redact(s: &str) -> String {
    match (s.find("://"), s.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &s[..scheme], &s[at..]),
        _ => s.to_owned(),
    }
}

/// Options for opening a [`Store`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Database used when a MongoDB connection string names none.
    pub default_database: String,
    /// How long to wait for MongoDB to answer at start before giving up.
    pub connect_timeout: Duration,
    /// Told of every database operation (for metrics); none by default.
    pub observer: Option<Arc<dyn Observer>>,
}

impl OpenOptions {
    /// Options with `default_database` and a 5 s connect timeout.
    pub fn new(default_database: impl Into<String>) -> Self {
        Self {
            default_database: default_database.into(),
            connect_timeout: Duration::from_secs(5),
            observer: None,
        }
    }
}

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// The backend without its observer, for health probes that are not
    /// the servers' work.
    unobserved: Arc<dyn Backend>,
    changes: collection::ChangeHub,
    log: Arc<changelog::ChangeLog>,
    /// The memory of each resident collection, by collection name.
    resident: Arc<
        tokio::sync::Mutex<
            std::collections::HashMap<&'static str, Arc<dyn std::any::Any + Send + Sync>>,
        >,
    >,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend.describe())
            .finish()
    }
}

impl Store {
    /// Opens the store at `location`, creating what is missing, and checks
    /// that it answers. Fails at once on an unreachable MongoDB or an
    /// embedded file another process holds.
    pub async fn open(location: &Location, options: &OpenOptions) -> Result<Self> {
        let backend: Arc<dyn Backend> = match location {
            Location::Embedded(path) => Arc::new(embedded::EmbeddedBackend::open(path).await?),
            Location::MongoDb { uri, database } => Arc::new(
                mongo::MongoBackend::connect(
                    uri,
                    database.as_deref().unwrap_or(&options.default_database),
                    options.connect_timeout,
                )
                .await?,
            ),
        };
        Self::over(backend, options).await
    }

    /// The store kept by `backend`.
    async fn over(backend: Arc<dyn Backend>, options: &OpenOptions) -> Result<Self> {
        let unobserved = backend.clone();
        let backend: Arc<dyn Backend> = match &options.observer {
            Some(observer) => Arc::new(observed::Observed {
                inner: backend,
                observer: observer.clone(),
            }),
            None => backend,
        };
        let log = Arc::new(changelog::ChangeLog::open(backend.clone()).await?);
        let changes = collection::ChangeHub::default();
        let hub = changes.clone();
        changelog::spawn_reader(
            &log,
            Box::new(move |collection, seq, entry| hub.apply(collection, seq, entry)),
        );
        Ok(Self {
            backend,
            unobserved,
            changes,
            log,
            resident: Arc::default(),
        })
    }

    /// This store, writing only while `fence` allows: every write of a
    /// collection opened from it asks first, and fails with
    /// [`Error::Fenced`], writing nothing, when it says no. The store's
    /// change log and live feed are shared with `self`.
    pub fn fenced(&self, fence: Fence) -> Self {
        let backend: Arc<dyn Backend> = Arc::new(fenced::Fenced {
            inner: self.backend.clone(),
            fence,
        });
        Self {
            backend,
            unobserved: self.unobserved.clone(),
            changes: self.changes.clone(),
            // One log: a record write is fenced, its entry follows it.
            log: self.log.clone(),
            resident: self.resident.clone(),
        }
    }

    /// Whether other processes may write the database at the same time
    /// (MongoDB): then one of them at a time should write what only one
    /// may (a plane's desired state).
    pub fn shared(&self) -> bool {
        self.backend.shared()
    }

    /// Whether the database answers: one read of a record that does not
    /// exist, not counted by the observer.
    pub async fn ping(&self) -> Result<()> {
        self.unobserved
            .get(changelog::LOG_COLLECTION, "~ping")
            .await
            .map(drop)
    }

    /// The collection of records of type `T`, with its unique-key index in
    /// place and its change log brought in line with it.
    pub async fn collection<T: Document>(&self) -> Result<Collection<T>> {
        self.backend.prepare(T::COLLECTION).await?;
        if T::LOGGED {
            self.log.repair(T::COLLECTION).await?;
        }
        let mut collection = Collection::new(
            self.backend.clone(),
            self.changes.sender::<T>(),
            self.log.clone(),
        );
        if T::RESIDENT {
            let mut resident = self.resident.lock().await;
            let memory = match resident.get(T::COLLECTION) {
                Some(memory) => memory.clone(),
                None => {
                    let memory: Arc<dyn std::any::Any + Send + Sync> =
                        Arc::new(collection.load_memory().await?);
                    resident.insert(T::COLLECTION, memory.clone());
                    memory
                }
            };
            let memory = memory.downcast::<resident::Memory<T>>().map_err(|_| {
                Error::backend(
                    "open",
                    format!("two document types use collection `{}`", T::COLLECTION),
                )
            })?;
            self.changes.hook::<T>(Some(memory.clone()));
            collection.set_memory(memory);
        } else if T::LOGGED {
            self.changes.hook::<T>(None);
        }
        Ok(collection)
    }

    /// Describes the backend for logs, without credentials.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }
}

/// A record as the backends store it: the envelope fields they index, and
/// the document itself as JSON text, kept unparsed until the collection
/// decodes it into its type (one pass, no intermediate value tree).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RawRecord {
    pub id: String,
    pub key: String,
    pub status: String,
    pub revision: u64,
    /// The change sequence of the record's last write (0: not logged).
    #[serde(default)]
    pub seq: u64,
    pub body: Box<serde_json::value::RawValue>,
}

impl PartialEq for RawRecord {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.id,
            &self.key,
            &self.status,
            self.revision,
            self.seq,
            self.body.get(),
        ) == (
            &other.id,
            &other.key,
            &other.status,
            other.revision,
            other.seq,
            other.body.get(),
        )
    }
}

/// What a database must do for the store. Implementations enforce the
/// unique key, check preconditions atomically with the write, and return
/// only once the write is durable.
#[async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    /// Creates the collection and its indexes if missing.
    async fn prepare(&self, collection: &str) -> Result<()>;
    /// Inserts a new record; [`Error::AlreadyExists`] when its id or key is
    /// taken.
    async fn insert(&self, collection: &str, record: &RawRecord) -> Result<()>;
    async fn get(&self, collection: &str, id: &str) -> Result<Option<RawRecord>>;
    /// Replaces the record with `record.id`, whose stored revision must be
    /// `record.revision - 1` and whose status must satisfy `status_in`.
    async fn replace(
        &self,
        collection: &str,
        record: &RawRecord,
        status_in: &[String],
    ) -> Result<()>;
    /// Writes `records` in one step: one at revision 1 is inserted (as
    /// [`Backend::insert`]), any other replaces its record at the revision
    /// before (as [`Backend::replace`], with no status condition). When one
    /// write fails, none happens: atomically where the database can (redb);
    /// MongoDB checks every condition first and then writes one by one.
    /// Not `durable`: the write may be lost in a crash until the next
    /// durable write of the store, which makes it durable too (redb; every
    /// MongoDB write is acknowledged). With `since`, only in the opening of
    /// the database [`Backend::reopened`] counted then: a write meant to
    /// make earlier ones durable is refused, writing nothing, once a
    /// reopen dropped them.
    async fn write_many(
        &self,
        collection: &str,
        records: &[RawRecord],
        durable: bool,
        since: Option<u64>,
    ) -> Result<()>;
    /// Deletes the record if it satisfies `condition`; `false` when there
    /// was none.
    async fn delete(&self, collection: &str, id: &str, condition: &Precondition) -> Result<bool>;
    /// Deletes the records with these ids, unconditionally, in one step
    /// (one transaction on redb, one command on MongoDB); ids without a
    /// record are skipped. Durable like [`Backend::insert`].
    async fn delete_many(&self, collection: &str, ids: &[String]) -> Result<()>;
    /// One page of records (see [`RawPage`]).
    async fn list(&self, collection: &str, page: RawPage<'_>) -> Result<Vec<RawRecord>>;
    fn describe(&self) -> String;
    /// How many times the database was opened again after an I/O error:
    /// what a reopen drops (writes not yet durable) this process may hold
    /// in memory, to be read again.
    fn reopened(&self) -> u64 {
        0
    }
    /// Whether other processes may write this database at the same time
    /// (MongoDB): the change log's sequence then comes from the database
    /// ([`Backend::advance`]) and its live feed from reading the log back.
    fn shared(&self) -> bool {
        false
    }
    /// Advances the counter `name` by `by`, atomically across every
    /// process writing the database, and returns its new value (`by` 0
    /// reads it). Only a [`Backend::shared`] database has counters.
    async fn advance(&self, name: &str, by: u64) -> Result<u64> {
        let _ = (name, by);
        Err(Error::backend(
            "advance",
            "counters exist only in a database several processes share",
        ))
    }
    /// Deletes every record of `collection` whose id sorts before `id`, in
    /// one step where the database can.
    async fn delete_before(&self, collection: &str, id: &str) -> Result<()> {
        let mut doomed = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .list(
                    collection,
                    RawPage {
                        filter: &RawFilter::default(),
                        after: after.as_deref(),
                        limit: 500,
                    },
                )
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            let done = page.iter().any(|record| record.id.as_str() >= id);
            doomed.extend(
                page.into_iter()
                    .map(|record| record.id)
                    .filter(|doomed| doomed.as_str() < id),
            );
            if done {
                break;
            }
        }
        self.delete_many(collection, &doomed).await
    }
}

/// One page of a backend's listing: up to `limit` records matching
/// `filter` with ids after `after`, in id order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawPage<'a> {
    pub filter: &'a RawFilter,
    pub after: Option<&'a str>,
    pub limit: usize,
}

/// A [`Filter`] in the backends' terms.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawFilter {
    pub statuses: Vec<String>,
    pub key: Option<String>,
    /// A prefix of the stored key (`k:` included).
    pub key_prefix: Option<String>,
}

impl RawFilter {
    /// Whether a stored key passes the key conditions.
    pub(crate) fn key_matches(&self, key: &str) -> bool {
        self.key.as_ref().is_none_or(|k| k == key)
            && self
                .key_prefix
                .as_ref()
                .is_none_or(|p| key.starts_with(p.as_str()))
    }
}

/// The stored form of a unique key. Records without one get a key derived
/// from their id, so one plain unique index serves both cases on every
/// backend.
pub(crate) fn stored_key(unique_key: Option<String>, id: &str) -> String {
    match unique_key {
        Some(key) => format!("k:{key}"),
        None => format!("i:{id}"),
    }
}

/// Checks a precondition against a stored record; used by backends that
/// check in-process, inside their write transaction.
pub(crate) fn check(
    record: &RawRecord,
    expected_revision: Option<u64>,
    status_in: &[String],
) -> Result<()> {
    check_parts(
        &record.id,
        record.revision,
        &record.status,
        expected_revision,
        status_in,
    )
}

/// [`check`] of a record's parts.
pub(crate) fn check_parts(
    id: &str,
    revision: u64,
    status: &str,
    expected_revision: Option<u64>,
    status_in: &[String],
) -> Result<()> {
    if let Some(expected) = expected_revision
        && revision != expected
    {
        return Err(Error::Conflict {
            id: id.to_owned(),
            reason: format!("revision is {revision}, the write expected {expected}"),
        });
    }
    if !status_in.is_empty() && !status_in.iter().any(|s| s == status) {
        return Err(Error::Conflict {
            id: id.to_owned(),
            reason: format!(
                "status is {status}, the write expected one of {}",
                status_in.join(", ")
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod doubt_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            "embedded:/tmp/x.redb".parse::<Location>().unwrap(),
            Location::Embedded("/tmp/x.redb".into())
        );
        let Location::MongoDb { database, .. } = "mongodb://db:27017/marketplace?w=majority"
            .parse::<Location>()
            .unwrap()
        else {
            panic!("not mongodb")
        };
        assert_eq!(database.as_deref(), Some("marketplace"));
        assert!("embedded:".parse::<Location>().is_err());
        assert!("postgres://x".parse::<Location>().is_err());
    }

    #[test]
    fn never_shows_passwords() {
        let err = "redis://user:secret@host".parse::<Location>().unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        let loc = "mongodb://user:secret@host/db".parse::<Location>().unwrap();
        assert!(!format!("{loc:?}").contains("secret"));
    }

    #[test]
    fn ids_sort_in_creation_order() {
        let a = new_id();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_id();
        assert!(a < b, "{a} !< {b}");
    }
}
