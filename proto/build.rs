//! Compiles every contract under `proto/oakestra` with `protox`, a protobuf
//! compiler written in Rust, so neither this crate nor its consumers need
//! `protoc` or the well-known `.proto` files on the machine. The file
//! descriptor set (with source comments) is also written for gRPC reflection.

use std::{env, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] = &[
    "oakestra/addons/marketplace/v1/marketplace.proto",
    "oakestra/addons/engine/v1/manager.proto",
    "oakestra/addons/engine/v1/monitor_link.proto",
    "oakestra/addons/monitor/v1/monitor.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=oakestra");
    let descriptors = protox::Compiler::new(["."])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTOS)?
        .file_descriptor_set();
    std::fs::write(
        out_dir.join("oakestra_addons_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Maps encode in key order, so one message always encodes to the
        // same bytes (request fingerprints for safe retries rely on it).
        .btree_map(".")
        // Small per-stream buffers (see `src/codec.rs`).
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
