//! Helpers of `scripts/dev.sh`, from the project's tools so the dev
//! stack and the tests share one tested implementation:
//!
//! - `oak-dev images REGISTRY`: builds the demo images from busybox-static
//!   (no network needed) and pushes them to the registry at `REGISTRY`
//!   (`host:port`, plain HTTP): `demo/core-scheduler:1`,
//!   `demo/energy-scheduler:1` and `demo/metrics:1`.
//! - `oak-dev pki DIR NODE_ID`: the stack's security in `DIR` (see
//!   [`StackPki`]): `ca.pem`, `ca/server.pem` and `ca/server.key` for the
//!   three servers, `jwt-secret`, and role tokens `user.jwt` (publisher,
//!   reviewer, operator), `manager.jwt` (viewer) and `node.jwt` (node
//!   `NODE_ID`). An existing CA and secret are kept; tokens are fresh.
//! - `oak-dev clean-network STATE_DIR BRIDGE_PREFIX SUBNET_PREFIX`: removes
//!   what a monitor with these settings may have left on the host: network
//!   namespaces, bridges, iptables rules.

#![allow(clippy::print_stdout, clippy::print_stderr)] // A command-line tool.

use std::{path::PathBuf, process::ExitCode};

use oak_tools::{NodeCleanup, images::push_demo_images, pki::StackPki};

async fn images(registry: &str) {
    for (reference, digest) in push_demo_images(registry).await {
        println!("{reference} {digest}");
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: oak-dev images REGISTRY | oak-dev pki DIR NODE_ID | oak-dev clean-network STATE_DIR BRIDGE_PREFIX SUBNET_PREFIX"
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
        ["pki", dir, node] => {
            let pki = StackPki::create(&PathBuf::from(dir), node);
            println!(
                "tokens valid for {} days: {}, {}, {}",
                StackPki::TOKEN_TTL_SECS / 86_400,
                pki.user_token.display(),
                pki.manager_token.display(),
                pki.node_token.display()
            );
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
