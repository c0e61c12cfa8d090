//! Streams every page of a paged listing.

use std::future::Future;

use futures::Stream;

use crate::ClientError;

/// The items of every page: `fetch(token)` returns one page's items and
/// the next token, empty on the last page.
pub(crate) fn every_page<T, F, Fut>(fetch: F) -> impl Stream<Item = Result<T, ClientError>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), ClientError>>,
{
    futures::stream::unfold(
        (fetch, Some(String::new())),
        |(mut fetch, token)| async move {
            let token = token?;
            match fetch(token).await {
                Ok((items, next)) => {
                    let next = (!next.is_empty()).then_some(next);
                    let items: Vec<Result<T, ClientError>> = items.into_iter().map(Ok).collect();
                    Some((futures::stream::iter(items), (fetch, next)))
                }
                Err(err) => Some((futures::stream::iter(vec![Err(err)]), (fetch, None))),
            }
        },
    )
    .flatten()
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
