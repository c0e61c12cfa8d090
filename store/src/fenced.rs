//! A backend whose writes first ask a fence: how a process that may lose
//! its right to write (a manager whose lease of its plane ran out while it
//! was paused) is kept from writing once it has, before it even notices.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{Backend, Error, Precondition, RawPage, RawRecord, Result};

/// Says whether writes may go ahead: `Err` with the reason they may not.
pub type Fence = Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

/// `inner`, writing only while `fence` allows.
pub(crate) struct Fenced {
    pub(crate) inner: Arc<dyn Backend>,
    pub(crate) fence: Fence,
}

impl Fenced {
    fn check(&self) -> Result<()> {
        (self.fence)().map_err(|reason| Error::Fenced { reason })
    }
}

#[async_trait]
impl Backend for Fenced {
    async fn prepare(&self, collection: &str) -> Result<()> {
        self.inner.prepare(collection).await
    }

    async fn insert(&self, collection: &str, record: &RawRecord) -> Result<()> {
        self.check()?;
        self.inner.insert(collection, record).await
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<RawRecord>> {
        self.inner.get(collection, id).await
    }

    async fn replace(
        &self,
        collection: &str,
        record: &RawRecord,
        status_in: &[String],
    ) -> Result<()> {
        self.check()?;
        self.inner.replace(collection, record, status_in).await
    }

    async fn write_many(
        &self,
        collection: &str,
        records: &[RawRecord],
        durable: bool,
        since: Option<u64>,
    ) -> Result<()> {
        self.check()?;
        self.inner
            .write_many(collection, records, durable, since)
            .await
    }

    async fn delete(&self, collection: &str, id: &str, condition: &Precondition) -> Result<bool> {
        self.check()?;
        self.inner.delete(collection, id, condition).await
    }

    async fn delete_many(&self, collection: &str, ids: &[String]) -> Result<()> {
        self.check()?;
        self.inner.delete_many(collection, ids).await
    }

    async fn list(&self, collection: &str, page: RawPage<'_>) -> Result<Vec<RawRecord>> {
        self.inner.list(collection, page).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn reopened(&self) -> u64 {
        self.inner.reopened()
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    async fn advance(&self, name: &str, by: u64) -> Result<u64> {
        if by > 0 {
            self.check()?;
        }
        self.inner.advance(name, by).await
    }

    async fn delete_before(&self, collection: &str, id: &str) -> Result<()> {
        self.check()?;
        self.inner.delete_before(collection, id).await
    }
}
