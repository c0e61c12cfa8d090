//! Reads of a collection: views, pages and listings, from memory for a
//! resident collection and from the backend otherwise.

use std::sync::Arc;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{Collection, codec::decode, shared};
use crate::{
    Document, Error, Filter, Page, RawFilter, RawPage, Result, Versioned,
    resident::{Memory, Resident},
    stored_key,
};

impl<T: Document> Collection<T> {
    /// The view `make` derives from the record with `id` (such as the
    /// message an API answers with). In a resident collection it is made
    /// once per revision and shared, and no read reaches the database;
    /// otherwise the record is read and the view made each time.
    pub async fn get_view<V: Send + Sync + 'static>(
        &self,
        id: &str,
        make: impl FnOnce(&Versioned<Arc<T>>) -> V,
    ) -> Result<Option<Arc<V>>> {
        self.settle_before_reading().await;
        if let Some(memory) = &self.memory {
            return Ok(memory.get(id).map(|entry| entry.view(make)));
        }
        Ok(self
            .get(id)
            .await?
            .map(|record| Arc::new(make(&shared(record)))))
    }

    /// A page of the views of the records matching `filter`, as
    /// [`Collection::list`] and [`Collection::get_view`] make them, and the
    /// next page's token.
    pub async fn list_views<V: Send + Sync + 'static>(
        &self,
        filter: &Filter,
        page_size: usize,
        page_token: Option<&str>,
        make: impl Fn(&Versioned<Arc<T>>) -> V,
    ) -> Result<(Vec<Arc<V>>, Option<String>)> {
        self.settle_before_reading().await;
        if let Some(memory) = &self.memory {
            let (entries, next) = memory_page(memory, filter, page_size, page_token)?;
            return Ok((
                entries.iter().map(|entry| entry.view(&make)).collect(),
                next,
            ));
        }
        let page = self.list(filter, page_size, page_token).await?;
        let views = page
            .items
            .into_iter()
            .map(|record| Arc::new(make(&shared(record))))
            .collect();
        Ok((views, page.next_page_token))
    }

    /// One page of the records matching `filter`, in id order. `page_token`
    /// is `None` for the first page and then the previous page's
    /// `next_page_token`.
    pub async fn list(
        &self,
        filter: &Filter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<T>> {
        self.settle_before_reading().await;
        if let Some(memory) = &self.memory {
            let (entries, next_page_token) = memory_page(memory, filter, page_size, page_token)?;
            return Ok(Page {
                items: entries
                    .iter()
                    .map(|entry| Versioned {
                        revision: entry.record.revision,
                        value: (*entry.record.value).clone(),
                    })
                    .collect(),
                next_page_token,
            });
        }
        let page_size = page_size.max(1);
        let after = page_token.map(decode_token).transpose()?;
        let raw_filter = raw_filter(filter);
        // One record more than asked tells whether another page follows.
        let mut records = self
            .backend
            .list(
                T::COLLECTION,
                RawPage {
                    filter: &raw_filter,
                    after: after.as_deref(),
                    limit: page_size + 1,
                },
            )
            .await?;
        let more = records.len() > page_size;
        records.truncate(page_size);
        let next_page_token = match (more, records.last()) {
            (true, Some(last)) => Some(encode_token(&last.id)),
            _ => None,
        };
        Ok(Page {
            items: records.into_iter().map(decode).collect::<Result<_>>()?,
            next_page_token,
        })
    }

    /// Every record matching `filter`, following pages to the end.
    pub async fn list_all(&self, filter: &Filter) -> Result<Vec<Versioned<T>>> {
        let mut all = Vec::new();
        let mut token = None;
        loop {
            let page = self.list(filter, 500, token.as_deref()).await?;
            all.extend(page.items);
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => return Ok(all),
            }
        }
    }
}

/// The token of the next page, if one follows.
type NextPage = Option<String>;

/// A page of a resident collection's entries matching `filter`, and the
/// next page's token, as the backends' listings page.
fn memory_page<T: Document>(
    memory: &Memory<T>,
    filter: &Filter,
    page_size: usize,
    page_token: Option<&str>,
) -> Result<(Vec<Arc<Resident<T>>>, NextPage)> {
    let page_size = page_size.max(1);
    let after = page_token.map(decode_token).transpose()?;
    let raw_filter = raw_filter(filter);
    // One entry more than asked tells whether another page follows.
    let mut entries = memory.page(after.as_deref(), page_size + 1, |entry| {
        (raw_filter.statuses.is_empty() || raw_filter.statuses.contains(&entry.status))
            && raw_filter.key_matches(&entry.key)
    });
    let more = entries.len() > page_size;
    entries.truncate(page_size);
    let next_page_token = match (more, entries.last()) {
        (true, Some(last)) => Some(encode_token(last.record.value.id())),
        _ => None,
    };
    Ok((entries, next_page_token))
}

/// A [`Filter`] in the backends' terms.
fn raw_filter(filter: &Filter) -> RawFilter {
    RawFilter {
        statuses: filter.statuses.clone(),
        key: filter
            .unique_key
            .clone()
            .map(|key| stored_key(Some(key), "")),
        key_prefix: filter
            .unique_key_prefix
            .clone()
            .map(|prefix| stored_key(Some(prefix), "")),
    }
}

const TOKEN_PREFIX: &str = "v1:";

fn encode_token(last_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{TOKEN_PREFIX}{last_id}"))
}

fn decode_token(token: &str) -> Result<String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| Error::InvalidPageToken)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::InvalidPageToken)?;
    text.strip_prefix(TOKEN_PREFIX)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .ok_or(Error::InvalidPageToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let token = encode_token("01hx");
        assert_eq!(decode_token(&token).unwrap(), "01hx");
        assert!(matches!(
            decode_token("not a token"),
            Err(Error::InvalidPageToken)
        ));
        assert!(matches!(
            decode_token(&URL_SAFE_NO_PAD.encode("v2:x")),
            Err(Error::InvalidPageToken)
        ));
    }
}
