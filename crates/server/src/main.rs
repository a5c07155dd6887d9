//! `strata`: the Strata inference server.
//!
//! `strata serve` serves a model (the default one with no arguments) over
//! the OpenAI-compatible HTTP API on 127.0.0.1; `strata fetch-model` only
//! fetches the default model; `strata cache` looks at the SSD tier;
//! `strata bench` measures a server (this one or another). See
//! `strata --help`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use strata_server::Server;
use strata_server::cli::{Cli, Command, ServeArgs};

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
        Command::Serve(args) => serve(*args),
        Command::Bench(cmd) => match strata_bench::cli::main(*cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("strata bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Cache(cmd) => match strata_server::cache_cmd::run(&cmd) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("strata: {e}");
                if !e.ends_with('\n') {
                    eprintln!();
                }
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("strata-http")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let grace = args.shutdown_grace;
        // A spinner while fetching and loading (drawn only on a terminal).
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let shown = bar.clone();
        let say = Box::new(move |line: &str| {
            shown.set_message(line.to_string());
            tracing::info!("{line}");
        });
        let mut server = match Server::start(args, say).await {
            Ok(s) => s,
            Err(e) => {
                bar.finish_and_clear();
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(address = %format!("http://{}", server.addr()), "listening; /health answers 503 until the model is loaded");
        tokio::select! {
            r = server.ready() => {
                bar.finish_and_clear();
                if let Err(e) = r {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
                tracing::info!("ready: http://{}/v1 (OpenAI-compatible)", server.addr());
            }
            () = signal() => {
                bar.finish_and_clear();
                tracing::info!("stopped before the model was loaded");
                return ExitCode::SUCCESS;
            }
        }
        signal().await;
        tracing::info!(grace_seconds = grace.as_secs_f64(), "shutting down: no new connections; running requests may finish");
        server.shutdown(grace).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    });
    // A close still stuck on a hung disk (see `Server::shutdown`) does not
    // keep the process: records are crash-safe, so exiting is safe.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// SIGINT or SIGTERM.
async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
