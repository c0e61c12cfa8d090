//! The content store: blobs from the registry written under a lease with
//! their expected digest and size, read back, and labelled for GC.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use addons_registry::Registry;
use containerd_client::services::v1::{
    InfoRequest, ReadContentRequest, UpdateRequest as UpdateContentRequest, WriteAction,
    WriteContentRequest, content_client::ContentClient,
};
use futures::StreamExt as _;
use oci_client::{Reference, manifest::OciDescriptor};

use super::{Containerd, RuntimeError, pull::registry_error};

impl Containerd {
    pub(super) async fn blob_exists(&self, digest: &str) -> Result<bool, RuntimeError> {
        let mut content = ContentClient::new(self.channel().await?);
        let answer = content
            .info(self.request(InfoRequest {
                digest: digest.to_owned(),
            }))
            .await;
        Ok(RuntimeError::unless(answer, "Content.Info", tonic::Code::NotFound)?.is_some())
    }

    pub(super) async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, RuntimeError> {
        let mut content = ContentClient::new(self.channel().await?);
        let mut stream = content
            .read(self.request(ReadContentRequest {
                digest: digest.to_owned(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(RuntimeError::call("Content.Read"))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            data.extend(chunk.map_err(RuntimeError::call("Content.Read"))?.data);
        }
        Ok(data)
    }

    /// Writes a small blob in one go; returns the bytes written (0 when it
    /// was present).
    pub(super) async fn write_blob(
        &self,
        digest: &str,
        data: &[u8],
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<u64, RuntimeError> {
        let chunk = bytes::Bytes::copy_from_slice(data);
        let size = data.len() as i64;
        self.write_content(
            digest,
            size,
            labels,
            futures::stream::iter([Ok::<_, std::convert::Infallible>(chunk)]),
            lease,
            None,
        )
        .await
    }

    /// Streams a layer from the registry into the content store.
    pub(super) async fn stream_blob(
        &self,
        client: &Registry,
        reference: &Reference,
        layer: &OciDescriptor,
        lease: &str,
        image: &str,
        progress: &Arc<AtomicU64>,
    ) -> Result<u64, RuntimeError> {
        let size = u64::try_from(layer.size).map_err(|_| RuntimeError::InvalidImage {
            image: image.to_owned(),
            reason: format!("layer {} has a negative size", layer.digest),
        })?;
        let stream = client
            .blob_stream(
                reference.resolve_registry(),
                reference.repository(),
                &layer.digest,
                size,
            )
            .await
            .map_err(registry_error(image))?;
        let chunks = stream.map(|chunk| chunk.map_err(|err| err.to_string()));
        self.write_content(
            &layer.digest,
            layer.size,
            HashMap::new(),
            chunks,
            lease,
            Some(progress),
        )
        .await
    }

    /// Writes content through containerd's Write stream, committing it with
    /// its expected digest and size.
    pub(super) async fn write_content<S, E>(
        &self,
        digest: &str,
        size: i64,
        labels: HashMap<String, String>,
        chunks: S,
        lease: &str,
        progress: Option<&Arc<AtomicU64>>,
    ) -> Result<u64, RuntimeError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let turn = self
            .writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(digest.to_owned())
            .or_default()
            .clone();
        let _turn = turn.lock().await;
        // Written by another pull while this one waited its turn.
        if self.blob_exists(digest).await? {
            return Ok(0);
        }
        let mut content = ContentClient::new(self.channel().await?);
        let write_ref = format!("oakestra-{digest}");
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let failed: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let feeder = {
            let write_ref = write_ref.clone();
            let digest = digest.to_owned();
            let failed = failed.clone();
            let progress = progress.cloned();
            tokio::spawn(async move {
                let mut offset = 0_i64;
                futures::pin_mut!(chunks);
                while let Some(chunk) = chunks.next().await {
                    let chunk = match chunk {
                        Ok(chunk) => chunk,
                        Err(err) => {
                            *failed
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                                Some(err.to_string());
                            return;
                        }
                    };
                    let len = chunk.len() as i64;
                    let request = WriteContentRequest {
                        action: WriteAction::Write.into(),
                        r#ref: write_ref.clone(),
                        total: size,
                        expected: digest.clone(),
                        offset,
                        data: chunk.to_vec(),
                        labels: HashMap::new(),
                    };
                    if tx.send(request).await.is_err() {
                        return;
                    }
                    offset += len;
                    if let Some(progress) = &progress {
                        progress.fetch_add(len as u64, Ordering::Relaxed);
                    }
                }
                let _ = tx
                    .send(WriteContentRequest {
                        action: WriteAction::Commit.into(),
                        r#ref: write_ref,
                        total: size,
                        expected: digest,
                        offset,
                        data: Vec::new(),
                        labels,
                    })
                    .await;
            })
        };
        let result = content
            .write(self.leased(tokio_stream::wrappers::ReceiverStream::new(rx), lease))
            .await;
        let outcome = match result {
            Ok(response) => {
                let mut responses = response.into_inner();
                let mut last = Ok(());
                while let Some(item) = responses.next().await {
                    if let Err(status) = item {
                        last = Err(status);
                        break;
                    }
                }
                last
            }
            Err(status) => Err(status),
        };
        let _ = feeder.await;
        if let Some(reason) = failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            // A download that broke off: trying again may help.
            return Err(RuntimeError::Registry {
                image: digest.to_owned(),
                reason,
                transient: true,
            });
        }
        match outcome {
            Ok(()) => Ok(size.max(0) as u64),
            // Present already (written by an earlier pull): nothing to do.
            Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(0),
            Err(status) => Err(RuntimeError::Call {
                call: "Content.Write",
                status,
            }),
        }
    }

    pub(super) async fn label_blob(
        &self,
        digest: &str,
        key: &str,
        value: &str,
    ) -> Result<(), RuntimeError> {
        let mut content = ContentClient::new(self.channel().await?);
        content
            .update(self.request(UpdateContentRequest {
                info: Some(containerd_client::services::v1::Info {
                    digest: digest.to_owned(),
                    labels: HashMap::from([(key.to_owned(), value.to_owned())]),
                    ..Default::default()
                }),
                update_mask: Some(super::label_mask(key)),
            }))
            .await
            .map_err(RuntimeError::call("Content.Update"))?;
        Ok(())
    }
}
