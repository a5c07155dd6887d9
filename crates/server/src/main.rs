//! `strata`: the Strata inference server.
//!
//! Today the binary answers `--help` and `--version` only; `strata serve`
//! (the OpenAI-compatible HTTP API) arrives with issue 4/6.

use clap::Parser;

/// Strata: an OpenAI-compatible LLM inference server with a paged,
/// prefix-sharing KV cache.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!(
        "strata {}: the `serve` command is not built yet (issue 4/6).",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
