//! Streams every page of a paged listing.

use std::{collections::VecDeque, future::Future};

use futures::Stream;

use crate::ClientError;

/// The items of every page: `fetch(token)` returns one page's items and
/// the next token, empty on the last page.
pub(crate) fn every_page<T, F, Fut>(fetch: F) -> impl Stream<Item = Result<T, ClientError>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), ClientError>>,
{
    let state = (fetch, VecDeque::<T>::new(), Some(String::new()));
    futures::stream::unfold(state, |(mut fetch, mut buffer, mut next)| async move {
        loop {
            if let Some(item) = buffer.pop_front() {
                return Some((Ok(item), (fetch, buffer, next)));
            }
            let token = next.take()?;
            match fetch(token).await {
                Ok((items, token)) => {
                    buffer.extend(items);
                    next = (!token.is_empty()).then_some(token);
                }
                Err(err) => return Some((Err(err), (fetch, buffer, None))),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    #[tokio::test]
    async fn follows_tokens_to_the_last_page() {
        let pages = every_page(|token: String| async move {
            Ok(match token.as_str() {
                "" => (vec![1, 2], "b".to_owned()),
                "b" => (vec![3], "c".to_owned()),
                _ => (vec![], String::new()),
            })
        });
        let items: Vec<i32> = pages.map(|r| r.unwrap()).collect().await;
        assert_eq!(items, [1, 2, 3]);
    }

    #[tokio::test]
    async fn ends_after_an_error() {
        let pages = every_page(|token: String| async move {
            if token.is_empty() {
                Ok((vec![1], "next".to_owned()))
            } else {
                Err(ClientError::Input("boom".into()))
            }
        });
        let items: Vec<Result<i32, ClientError>> = pages.collect().await;
        assert_eq!(items.len(), 2);
        assert!(items[1].is_err());
    }
}
