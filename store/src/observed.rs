//! A backend whose every operation is told to an [`Observer`]: how the
//! servers measure their database (operation, time, outcome) without the
//! store knowing about metrics.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;

use crate::{Backend, Error, Precondition, RawPage, RawRecord, Result};

/// Told of every database operation the store makes.
pub trait Observer: std::fmt::Debug + Send + Sync + 'static {
    /// `operation` (`get`, `insert`, `replace`, `write_many`, `delete`,
    /// `delete_many`, `list`, `prepare`, `advance`, `delete_before`) took `elapsed` and ended with
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

/// The `Backend` impl of [`Observed`]: each operation of `inner`, timed
/// and told under its name.
macro_rules! observed {
    ($($operation:literal: fn $method:ident(&self, $($arg:ident: $ty:ty),*) -> $out:ty;)*) => {
        #[async_trait]
        impl Backend for Observed {
            $(
                async fn $method(&self, $($arg: $ty),*) -> Result<$out> {
                    self.timed($operation, self.inner.$method($($arg),*)).await
                }
            )*

            fn describe(&self) -> String {
                self.inner.describe()
            }

            fn reopened(&self) -> u64 {
                self.inner.reopened()
            }

            fn shared(&self) -> bool {
                self.inner.shared()
            }
        }
    };
}

observed! {
    "prepare": fn prepare(&self, collection: &str) -> ();
    "insert": fn insert(&self, collection: &str, record: &RawRecord) -> ();
    "get": fn get(&self, collection: &str, id: &str) -> Option<RawRecord>;
    "replace": fn replace(&self, collection: &str, record: &RawRecord, status_in: &[String]) -> ();
    "write_many": fn write_many(&self, collection: &str, records: &[RawRecord], durable: bool, since: Option<u64>) -> ();
    "delete": fn delete(&self, collection: &str, id: &str, condition: &Precondition) -> bool;
    "delete_many": fn delete_many(&self, collection: &str, ids: &[String]) -> ();
    "list": fn list(&self, collection: &str, page: RawPage<'_>) -> Vec<RawRecord>;
    "advance": fn advance(&self, name: &str, by: u64) -> u64;
    "delete_before": fn delete_before(&self, collection: &str, id: &str) -> ();
}
