//! Compiles every contract under `proto/oakestra` and writes the file
//! descriptor set that the servers publish through gRPC reflection.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "oakestra/addons/marketplace/v1/marketplace.proto",
    "oakestra/addons/engine/v1/manager.proto",
    "oakestra/addons/engine/v1/monitor_link.proto",
    "oakestra/addons/monitor/v1/monitor.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        // `MonitorLinkService.Connect` would clash with the generated
        // `connect` constructor; clients are built from a `Channel` instead.
        .build_transport(false)
        .file_descriptor_set_path(out_dir.join("oakestra_addons_descriptor.bin"))
        .compile_protos(PROTOS, &["."])?;
    Ok(())
}
