//! Helpers of `scripts/dev.sh`, built from the test harness so the dev
//! stack and the tests share one tested implementation:
//!
//! - `oak-dev images REGISTRY`: builds the demo images from busybox-static
//!   (no network needed) and pushes them to the registry at `REGISTRY`
//!   (`host:port`, plain HTTP): `demo/core-scheduler:1`,
//!   `demo/energy-scheduler:1` and `demo/metrics:1`.
//! - `oak-dev clean-network STATE_DIR BRIDGE_PREFIX SUBNET_PREFIX`: removes
//!   what a monitor with these settings may have left on the host: network
//!   namespaces, bridges, iptables rules.

#![allow(clippy::print_stdout, clippy::print_stderr)] // A command-line tool.

use std::{path::PathBuf, process::ExitCode};

use integration_tests::{NodeCleanup, images::push_demo_images};

async fn images(registry: &str) {
    for (reference, digest) in push_demo_images(registry).await {
        println!("{reference} {digest}");
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: oak-dev images REGISTRY | oak-dev clean-network STATE_DIR BRIDGE_PREFIX SUBNET_PREFIX"
    );
    ExitCode::from(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["images", registry] => {
            images(registry).await;
            ExitCode::SUCCESS
        }
        ["clean-network", state_dir, bridge_prefix, subnet_prefix] => {
            drop(NodeCleanup::new(
                &PathBuf::from(state_dir),
                bridge_prefix,
                subnet_prefix,
            ));
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}
