//! `strata bench ...`: the arguments and what each subcommand does.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::client::Endpoint;
use crate::report::{RunResult, markdown};
use crate::run::{Limits, run_workload};
use crate::workload::{Sizes, Workload, builtin, sharegpt};

/// `strata bench`.
#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Runs a built-in workload (w1 ... w8) against an endpoint.
    Run(RunArgs),
    /// Replays a ShareGPT conversation file against an endpoint.
    Sharegpt(ShareGptArgs),
    /// Measures this machine's roofline and the forward pass under it.
    Roofline(RooflineArgs),
    /// Compares Strata's log-probabilities with llama.cpp's.
    Quality(QualityArgs),
    /// Writes BENCHMARKS.md and its plots from a results directory.
    Report(ReportArgs),
}

/// Where to send requests and within which bounds.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The server's OpenAI base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1")]
    pub url: String,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "STRATA_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow a host other than this machine's loopback.
    #[arg(long)]
    pub allow_remote: bool,
    /// The `model` field to send (default: none, the server's own).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Requests in flight at once, at most.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Requests per phase, at most.
    #[arg(long, default_value_t = 10_000)]
    pub max_requests: usize,
    /// Seconds after which a phase sends no new request.
    #[arg(long, default_value_t = 600)]
    pub phase_time: u64,
    /// Seconds after which a request fails.
    #[arg(long, default_value_t = 300)]
    pub request_timeout: u64,
    /// The server's name in the results.
    #[arg(long, default_value = "server")]
    pub label: String,
    /// The server's command line, recorded in the results.
    #[arg(long)]
    pub command: Option<String>,
    /// Where to write the results (JSON); the table goes to stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Add the phases to those already in `--out` (same workload).
    #[arg(long)]
    pub append: bool,
}

/// `strata bench run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The workload: w1, w2, w3, w4, w5, w6-cold, w6-restart, w7, w8.
    #[arg(long)]
    pub workload: String,
    /// The seed of the text and the arrivals.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Small counts (a smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Run only the phases with these names (like `clients 8`), so that a
    /// harness can restart the server between them.
    #[arg(long = "phase")]
    pub phases: Vec<String>,
    /// The endpoint and bounds.
    #[command(flatten)]
    pub target: Target,
}

/// `strata bench sharegpt`.
#[derive(Args, Debug, Clone)]
pub struct ShareGptArgs {
    /// A ShareGPT JSON file.
    #[arg(long)]
    pub file: PathBuf,
    /// Conversations to replay, at most.
    #[arg(long, default_value_t = 100)]
    pub conversations: usize,
    /// Users at once.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Output tokens per turn, at most.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// The endpoint and bounds.
    #[command(flatten)]
    pub target: Target,
}

/// `strata bench roofline`.
#[derive(Args, Debug, Clone)]
pub struct RooflineArgs {
    /// The GGUF model [default: the default model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Thread counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// The read buffer, MiB (several times the last-level cache).
    #[arg(long, default_value_t = 1024)]
    pub buffer_mib: usize,
    /// Runs of each figure (medians).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where to write the results (JSON).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `strata bench quality`.
#[derive(Args, Debug, Clone)]
pub struct QualityArgs {
    /// Strata's OpenAI base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1")]
    pub url: String,
    /// The file `llama-perplexity --kl-divergence-base FILE` wrote.
    #[arg(long)]
    pub llama_logits: PathBuf,
    /// llama-perplexity's printed PPL estimate.
    #[arg(long)]
    pub llama_ppl: Option<f64>,
    /// The GGUF both ran [default: the default model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Chunks to compare, at most.
    #[arg(long)]
    pub max_chunks: Option<usize>,
    /// Chunks (from the first) also compared with the f32 reference, which
    /// is slow (about a minute a chunk on 2 cores).
    #[arg(long, default_value_t = 2)]
    pub reference_chunks: usize,
    /// Where to write the results (JSON).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `strata bench report`.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The results directory the harness filled.
    #[arg(long, default_value = "bench-results")]
    pub results: PathBuf,
    /// The Markdown file to write.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Where the plots go (SVG), linked from the Markdown.
    #[arg(long, default_value = "docs/bench")]
    pub plots: PathBuf,
}

/// Runs a `strata bench` subcommand.
pub fn main(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Run(a) => {
            let mut w = builtin(
                &a.workload,
                Sizes {
                    seed: a.seed,
                    quick: a.quick,
                },
            )
            .map_err(anyhow::Error::msg)?;
            if !a.phases.is_empty() {
                let known: Vec<String> = w.phases.iter().map(|p| p.name.clone()).collect();
                if let Some(bad) = a.phases.iter().find(|p| !known.contains(p)) {
                    bail!("{} has no phase {bad:?}: its phases are {known:?}", w.id);
                }
                w.phases.retain(|p| a.phases.contains(&p.name));
            }
            drive(&a.target, &w)
        }
        BenchCommand::Sharegpt(a) => {
            let text = std::fs::read_to_string(&a.file)
                .with_context(|| format!("reading {}", a.file.display()))?;
            let convs = crate::sharegpt::parse(&text).map_err(anyhow::Error::msg)?;
            if convs.is_empty() {
                bail!("{}: no conversation with a complete turn", a.file.display());
            }
            drive(
                &a.target,
                &sharegpt(&convs, a.clients, a.conversations, a.max_tokens),
            )
        }
        BenchCommand::Roofline(a) => {
            let model = model_path(a.model.as_deref())?;
            let r = crate::roofline::measure(
                &model,
                &a.threads,
                a.buffer_mib << 20,
                a.runs,
                &mut |l| eprintln!("roofline: {l}"),
            )?;
            let json = serde_json::to_string_pretty(&r)?;
            write_out(a.out.as_deref(), &json)?;
            print!("{}", crate::compare::roofline_table(&r));
            Ok(())
        }
        BenchCommand::Quality(a) => {
            let model = model_path(a.model.as_deref())?;
            let ep = endpoint(&a.url, None, false)?;
            let rt = runtime()?;
            let p = rt.block_on(crate::quality::compare(
                &ep,
                &a.llama_logits,
                &model,
                a.llama_ppl,
                a.max_chunks,
                a.reference_chunks,
                &mut |l| eprintln!("quality: {l}"),
            ))?;
            write_out(a.out.as_deref(), &serde_json::to_string_pretty(&p)?)?;
            print!("{}", crate::compare::parity_table(&p));
            Ok(())
        }
        BenchCommand::Report(a) => crate::compare::write_report(&a.results, &a.out, &a.plots),
    }
}

fn model_path(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => strata_model::default_model::ensure(&mut |l| eprintln!("strata: {l}"))
            .map_err(|e| anyhow::anyhow!("{e}")),
    }
}

fn endpoint(url: &str, key: Option<String>, allow_remote: bool) -> Result<Endpoint> {
    let mut ep = Endpoint::parse(url).map_err(anyhow::Error::msg)?;
    let local = ep.host == "localhost" || ep.host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback());
    if !local && !allow_remote {
        bail!(
            "{url}: the host is not this machine's loopback; give --allow-remote to load another machine"
        );
    }
    ep.api_key = key;
    Ok(ep)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Two workers: the client must never be what limits the server.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("strata-bench")
        .enable_all()
        .build()?)
}

fn write_out(out: Option<&Path>, text: &str) -> Result<()> {
    if let Some(p) = out {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn drive(t: &Target, w: &Workload) -> Result<()> {
    let ep = endpoint(&t.url, t.api_key.clone(), t.allow_remote)?;
    let limits = Limits {
        max_in_flight: t.max_in_flight,
        max_requests: t.max_requests,
        phase_time: Duration::from_secs(t.phase_time),
        request_timeout: Duration::from_secs(t.request_timeout),
        model: t.model_name.clone(),
    };
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let phases = runtime()?.block_on(run_workload(&ep, w, &limits));
    let mut r = RunResult {
        label: t.label.clone(),
        url: t.url.clone(),
        command: t.command.clone(),
        workload: w.id.clone(),
        what: w.what.clone(),
        started,
        phases,
    };
    print!("{}", markdown(&r));
    if let (true, Some(out)) = (t.append, &t.out)
        && let Ok(text) = std::fs::read_to_string(out)
    {
        let mut before: RunResult = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a bench result", out.display()))?;
        if before.workload != r.workload || before.label != r.label {
            bail!(
                "{}: holds {} on {}, not {} on {}",
                out.display(),
                before.workload,
                before.label,
                r.workload,
                r.label
            );
        }
        before
            .phases
            .retain(|p| r.phases.iter().all(|q| q.name != p.name));
        before.phases.append(&mut r.phases);
        r.phases = before.phases;
        if let (Some(a), Some(b)) = (&before.command, &r.command)
            && a != b
        {
            r.command = Some(format!("{a}; {b}"));
        }
    }
    write_out(t.out.as_deref(), &serde_json::to_string_pretty(&r)?)?;
    if r.phases
        .iter()
        .all(|p| p.requests > 0 && p.failures == p.requests)
    {
        bail!(
            "every request failed: {:?}",
            r.phases.first().and_then(|p| p.errors.first())
        );
    }
    Ok(())
}
