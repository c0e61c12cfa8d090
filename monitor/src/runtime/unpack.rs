//! Unpacking layers into the snapshotter through the diff service, each
//! checked against the diff id its image declares before it is committed.

use std::collections::HashMap;

use containerd_client::{
    services::v1::{
        diff_client::DiffClient,
        snapshots::{
            CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
            StatSnapshotRequest, snapshots_client::SnapshotsClient,
        },
    },
    types::Descriptor,
};
use oci_client::manifest::OciDescriptor;

use super::{Containerd, RuntimeError};

impl Containerd {
    pub(super) async fn snapshot_exists(&self, key: &str) -> Result<bool, RuntimeError> {
        let mut snapshots = SnapshotsClient::new(self.channel().await?);
        let answer = snapshots
            .stat(self.request(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_owned(),
            }))
            .await;
        Ok(RuntimeError::unless(answer, "Snapshots.Stat", tonic::Code::NotFound)?.is_some())
    }

    /// Applies one layer on top of `parent` and commits it as `chain_id`,
    /// once the digest of the applied (uncompressed) content is the
    /// `diff_id` the image's configuration declares for it; otherwise the
    /// extraction is removed and the pull fails.
    pub(super) async fn unpack_layer(
        &self,
        image: &str,
        layer: &OciDescriptor,
        diff_id: &str,
        parent: &str,
        chain_id: &str,
        lease: &str,
    ) -> Result<(), RuntimeError> {
        let channel = self.channel().await?;
        let mut snapshots = SnapshotsClient::new(channel.clone());
        let key = format!("extract-{:016x}-{chain_id}", rand::random::<u64>());
        let mounts = snapshots
            .prepare(self.leased(
                PrepareSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.to_owned(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
            .map_err(RuntimeError::call("Snapshots.Prepare"))?
            .into_inner()
            .mounts;
        let applied = DiffClient::new(channel)
            .apply(self.leased(
                containerd_client::services::v1::ApplyRequest {
                    diff: Some(Descriptor {
                        media_type: layer.media_type.clone(),
                        digest: layer.digest.clone(),
                        size: layer.size,
                        annotations: HashMap::new(),
                    }),
                    mounts,
                    payloads: HashMap::new(),
                    sync_fs: false,
                },
                lease,
            ))
            .await;
        let applied = match applied {
            Ok(response) => response.into_inner().applied,
            Err(status) => {
                let _ = self.remove_snapshot(&key).await;
                return Err(RuntimeError::Call {
                    call: "Diff.Apply",
                    status,
                });
            }
        };
        let digest = applied.map(|d| d.digest).unwrap_or_default();
        if digest != diff_id {
            let _ = self.remove_snapshot(&key).await;
            return Err(RuntimeError::InvalidImage {
                image: image.to_owned(),
                reason: format!(
                    "layer {} unpacks to content {digest}, not the diff id {diff_id} its configuration declares",
                    layer.digest
                ),
            });
        }
        let committed = snapshots
            .commit(self.leased(
                CommitSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    name: chain_id.to_owned(),
                    key: key.clone(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await;
        match committed {
            Ok(_) => Ok(()),
            // Unpacked concurrently by someone else: theirs is as good.
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                let _ = self.remove_snapshot(&key).await;
                Ok(())
            }
            Err(status) => {
                let _ = self.remove_snapshot(&key).await;
                Err(RuntimeError::Call {
                    call: "Snapshots.Commit",
                    status,
                })
            }
        }
    }

    pub(super) async fn remove_snapshot(&self, key: &str) -> Result<(), RuntimeError> {
        let mut snapshots = SnapshotsClient::new(self.channel().await?);
        let answer = snapshots
            .remove(self.request(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_owned(),
            }))
            .await;
        RuntimeError::unless(answer, "Snapshots.Remove", tonic::Code::NotFound).map(drop)
    }
}
