//! The protobuf contracts of the Oakestra addons system, compiled to Rust.
//!
//! This crate is the only schema source of the workspace: every service and
//! client uses the types generated here. The `.proto` files beside this crate
//! are the public API that other Oakestra components generate stubs from.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

pub mod codec;

/// Encoded `FileDescriptorSet` of every contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/oakestra_addons_descriptor.bin"));

/// `oakestra.addons.marketplace.v1`: the addons marketplace.
pub mod marketplace {
    /// Version 1 of the marketplace contract.
    pub mod v1 {
        tonic::include_proto!("oakestra.addons.marketplace.v1");
    }
}

/// `oakestra.addons.engine.v1`: the Addons Manager and its link to monitors.
pub mod engine {
    /// Version 1 of the engine contract.
    pub mod v1 {
        tonic::include_proto!("oakestra.addons.engine.v1");
    }
}

impl engine::v1::Plane {
    /// The plane's name as Oakestra writes it, in container names
    /// (`<plane>_<name>`), logs and messages: `root` or `cluster`. A plane
    /// left unspecified is the root plane.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cluster => "cluster",
            Self::Root | Self::Unspecified => "root",
        }
    }
}

/// `oakestra.addons.monitor.v1`: the node-local API of an Addons Monitor.
pub mod monitor {
    /// Version 1 of the monitor contract.
    pub mod v1 {
        tonic::include_proto!("oakestra.addons.monitor.v1");
    }
}
