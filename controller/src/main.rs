//! stasisctl: checkpoint, restore, migrate and inspect whole pods.

use clap::Parser;
use stasis_controller::cli::{self, Cli};

#[tokio::main]
async fn main() {
    stasis_controller::logging::init();
    let result = cli::run(Cli::parse()).await;
    stasis_controller::logging::io_summary();
    if let Err(e) = result {
        eprintln!("stasisctl: {e:#}");
        std::process::exit(1);
    }
}
