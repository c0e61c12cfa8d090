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

/// The request of a mutating call: the method it is the request of (as
/// audited, and as its `request_id` is remembered under), the resource it
/// acts on (as the audit record names it), and its `request_id` field, which
/// makes a retried call take effect once.
pub trait Mutating: prost::Message {
    /// The gRPC method, such as `InstallAddon`.
    const METHOD: &'static str;
    /// The request's `request_id` field.
    fn request_id(&mut self) -> &mut String;
    /// What the call acts on.
    fn resource(&self) -> &str;
}

macro_rules! mutating {
    ($($request:ty: $method:literal, |$r:ident| $resource:expr;)*) => {
        $(
            impl Mutating for $request {
                const METHOD: &'static str = $method;

                fn request_id(&mut self) -> &mut String {
                    &mut self.request_id
                }

                fn resource(&self) -> &str {
                    let $r = self;
                    $resource
                }
            }
        )*
    };
}

mutating! {
    marketplace::v1::PublishAddonRequest: "PublishAddon", |r| r.addon.as_ref().map_or("", |a| a.name.as_str());
    marketplace::v1::DeleteAddonRequest: "DeleteAddon", |r| &r.id;
    marketplace::v1::ReverifyAddonRequest: "ReverifyAddon", |r| &r.id;
    marketplace::v1::RevokeAddonRequest: "RevokeAddon", |r| &r.id;
    engine::v1::InstallAddonRequest: "InstallAddon", |r| &r.marketplace_id;
    engine::v1::UpgradeInstallationRequest: "UpgradeInstallation", |r| &r.id;
    engine::v1::RollbackInstallationRequest: "RollbackInstallation", |r| &r.id;
    engine::v1::UninstallAddonRequest: "UninstallAddon", |r| &r.id;
}

/// `oakestra.addons.monitor.v1`: the node-local API of an Addons Monitor.
/// The canonical upper-case name of a gRPC status code (`NOT_FOUND`), as
/// the gRPC specification writes it: what error output and metrics show.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pub mod monitor {
    /// Version 1 of the monitor contract.
    pub mod v1 {
        tonic::include_proto!("oakestra.addons.monitor.v1");
    }
}
