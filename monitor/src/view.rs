//! What the reconciler publishes about the node after each pass, read by
//! the node API and by the link's hello: a module of its own, so the link
//! and the API depend on what the reconciler shows, not on the reconciler.

use std::collections::BTreeMap;

use oakestra_addons_proto::engine::v1 as pb;

/// What the reconciler publishes about the node after each pass.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Passes completed since the monitor started.
    pub completed_passes: u64,
    /// Generation of the desired state the last pass applied (0: none yet).
    pub applied_generation: u64,
    /// The status of each addon container the monitor knows, by id.
    pub services: BTreeMap<String, pb::ServiceStatus>,
    /// The addon containers on the node, for the link's hello.
    pub observed: Vec<pb::ObservedService>,
}
