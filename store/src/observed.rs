//! A backend whose every operation is told to an [`Observer`]: how the
//! servers measure their database (operation, time, outcome) without the
//! store knowing about metrics.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;

use crate::{Backend, Error, Precondition, RawPage, RawRecord, Result};

/// Told of every database operation the store makes.
pub trait Observer: std::fmt::Debug + Send + Sync + 'static {
    /// `operation` (`get`, `insert`, `replace`, `write_many`, `delete`,
    /// `delete_many`, `list`, `prepare`) took `elapsed` and ended with
    /// `outcome`.
    fn observe(
        &self,
        operation: &'static str,
        elapsed: std::time::Duration,
        outcome: std::result::Result<(), &Error>,
    );
}

/// `inner`, observed by `observer`.
pub(crate) struct Observed {
    pub(crate) inner: Arc<dyn Backend>,
    pub(crate) observer: Arc<dyn Observer>,
}

impl Observed {
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        // A span of its own only within a call's span: background writes
        // (a batch of reports) start no trace of their own.
        let result = if tracing::Span::current().is_none() {
            call.await
        } else {
            use tracing::Instrument as _;
            call.instrument(tracing::info_span!(
                "store",
                otel.name = %format_args!("store {operation}"),
                otel.kind = "client",
                db.operation = operation,
            ))
            .await
        };
        self.observer
            .observe(operation, start.elapsed(), result.as_ref().map(drop));
        result
    }
}

#[async_trait]
impl Backend for Observed {
    async fn prepare(&self, collection: &str) -> Result<()> {
        self.timed("prepare", self.inner.prepare(collection)).await
    }

    async fn insert(&self, collection: &str, record: &RawRecord) -> Result<()> {
        self.timed("insert", self.inner.insert(collection, record))
            .await
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<RawRecord>> {
        self.timed("get", self.inner.get(collection, id)).await
    }

    async fn replace(
        &self,
        collection: &str,
        record: &RawRecord,
        status_in: &[String],
    ) -> Result<()> {
        self.timed("replace", self.inner.replace(collection, record, status_in))
            .await
    }

    async fn write_many(
        &self,
        collection: &str,
        records: &[RawRecord],
        durable: bool,
    ) -> Result<()> {
        self.timed(
            "write_many",
            self.inner.write_many(collection, records, durable),
        )
        .await
    }

    async fn delete(&self, collection: &str, id: &str, condition: &Precondition) -> Result<bool> {
        self.timed("delete", self.inner.delete(collection, id, condition))
            .await
    }

    async fn delete_many(&self, collection: &str, ids: &[String]) -> Result<()> {
        self.timed("delete_many", self.inner.delete_many(collection, ids))
            .await
    }

    async fn list(&self, collection: &str, page: RawPage<'_>) -> Result<Vec<RawRecord>> {
        self.timed("list", self.inner.list(collection, page)).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
