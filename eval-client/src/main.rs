//! `pruneval`: benchmark runner and A/B retention reports against an OpenAI-compatible server.
//! Skeleton: the tasks arrive with their own issue.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Eval client for pruneserve and any OpenAI-compatible server"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _ = Cli::parse();
    anyhow::bail!("no subcommand is implemented yet: see the pruneval issue")
}
