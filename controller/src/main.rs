//! stasisctl: checkpoint, restore, migrate and inspect whole pods.

use clap::Parser;
use stasis_controller::cli::{self, Cli};

#[tokio::main]
async fn main() {
    stasis_controller::logging::init();
    if let Err(e) = cli::run(Cli::parse()).await {
        eprintln!("stasisctl: {e:#}");
        std::process::exit(1);
    }
}
