//! Command-line flags of `addons-marketplace`.

use addons_server_kit::CommonArgs;

/// The Oakestra addons marketplace: publish addon descriptors and verify
/// their images.
#[derive(Debug, clap::Parser)]
#[command(name = "addons-marketplace", version, args_override_self = true)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Where records are kept: `embedded:PATH` (the default, under
    /// /var/lib/oakestra-addons) or `mongodb://host:port/dbname`.
    #[arg(long, env = "ADDONS_STORE", value_name = "STORE")]
    pub store: Option<String>,
}

/// Port the marketplace listens on by default (Oakestra's marketplace port).
pub const DEFAULT_PORT: u16 = 11102;
