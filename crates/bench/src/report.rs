//! Results: one phase's summary, a run's file (JSON), and its Markdown
//! table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::client::Outcome;
use crate::run::by_tag;
use crate::stats::Dist;

/// One phase, summarized. Latencies in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseResult {
    /// The phase's name.
    pub name: String,
    /// Requests that ended (successes and failures).
    pub requests: usize,
    /// Requests that failed.
    pub failures: usize,
    /// The first few failures' messages.
    pub errors: Vec<String>,
    /// Requests of the plan never sent (time limit or request cap).
    pub not_sent: usize,
    /// The most requests in flight at once.
    pub peak_in_flight: usize,
    /// Wall time of the phase, in seconds.
    pub duration_s: f64,
    /// Time to first token.
    pub ttft_ms: Dist,
    /// TTFT per request tag.
    pub ttft_by_tag_ms: BTreeMap<String, Dist>,
    /// Gaps between tokens.
    pub itl_ms: Dist,
    /// Whole requests.
    pub e2e_ms: Dist,
    /// Each request's decode rate after its first token.
    pub decode_tok_s: Dist,
    /// Output tokens of the successful requests.
    pub output_tokens: u64,
    /// Output tokens per second of wall time.
    pub output_tok_s: f64,
    /// Successful requests per second of wall time.
    pub req_s: f64,
    /// Prompt tokens the server reported.
    pub prompt_tokens: u64,
    /// Prompt tokens it reported cached (`None`: it reports none).
    pub cached_tokens: Option<u64>,
    /// The arrival rate of an open-loop phase.
    pub rate: Option<f64>,
}

impl PhaseResult {
    /// The summary of a phase's outcomes over `wall` seconds.
    pub fn of(name: &str, outcomes: &[Outcome], wall: f64) -> Self {
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
        let ms = |v: Vec<f64>| Dist::of(&v.iter().map(|x| x * 1e3).collect::<Vec<_>>());
        let output_tokens: u64 = ok.iter().map(|o| o.output_tokens).sum();
        let cached: Vec<u64> = ok.iter().filter_map(|o| o.cached_tokens).collect();
        let wall = wall.max(1e-9);
        Self {
            name: name.to_string(),
            requests: outcomes.len(),
            failures: outcomes.len() - ok.len(),
            errors: outcomes
                .iter()
                .filter_map(|o| o.error.clone())
                .take(3)
                .collect(),
            not_sent: 0,
            peak_in_flight: 0,
            duration_s: wall,
            ttft_ms: ms(ok.iter().filter_map(|o| o.ttft).collect()),
            ttft_by_tag_ms: by_tag(outcomes)
                .into_iter()
                .map(|(k, v)| (k, Dist::of(&v)))
                .collect(),
            itl_ms: ms(ok.iter().flat_map(|o| o.itl.iter().copied()).collect()),
            e2e_ms: ms(ok.iter().map(|o| o.e2e).collect()),
            decode_tok_s: Dist::of(
                &ok.iter()
                    .filter_map(|o| o.decode_rate())
                    .collect::<Vec<_>>(),
            ),
            output_tokens,
            output_tok_s: output_tokens as f64 / wall,
            req_s: ok.len() as f64 / wall,
            prompt_tokens: ok.iter().filter_map(|o| o.prompt_tokens).sum(),
            cached_tokens: (!cached.is_empty()).then(|| cached.iter().sum()),
            rate: None,
        }
    }
}

impl PhaseResult {
    /// Whether an open-loop phase was sustained: every request sent and
    /// answered, TTFT p99 within `bound_ms`, and no queue building up (the
    /// last third of the arrivals waited no more than 1.5 times the first
    /// third, plus half a second).
    pub fn sustained(&self, bound_ms: f64) -> bool {
        let growing = match (
            self.ttft_by_tag_ms.get("first third"),
            self.ttft_by_tag_ms.get("last third"),
        ) {
            (Some(a), Some(b)) => b.mean > 1.5 * a.mean + 500.0,
            _ => false,
        };
        self.requests > 0
            && self.failures == 0
            && self.not_sent == 0
            && self.ttft_ms.p99 <= bound_ms
            && !growing
    }

    /// Whether its figures stand: nothing failed and nothing went unsent.
    pub fn clean(&self) -> bool {
        self.failures == 0 && self.not_sent == 0
    }
}

/// What `strata bench run` writes: one workload against one server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// The server's label (like `strata` or `llama-server`).
    pub label: String,
    /// The endpoint.
    pub url: String,
    /// The server's command line, as the harness gives it.
    pub command: Option<String>,
    /// The workload's id.
    pub workload: String,
    /// What it measures.
    pub what: String,
    /// Seconds since the Unix epoch at the start.
    pub started: u64,
    /// Its phases.
    pub phases: Vec<PhaseResult>,
}

/// A Markdown table of a run: a row per phase.
pub fn markdown(r: &RunResult) -> String {
    let mut s = format!("### {} on {}: {}\n\n", r.workload, r.label, r.what);
    s.push_str("| phase | ok/failed | TTFT p50/p90/p99 ms | ITL p50/p99 ms | E2E p50 ms | decode tok/s (p50) | out tok/s | req/s | cached/prompt tokens |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for p in &r.phases {
        let cached = p.cached_tokens.map_or_else(
            || format!("-/{}", p.prompt_tokens),
            |c| format!("{c}/{}", p.prompt_tokens),
        );
        let _ = writeln!(
            s,
            "| {} | {}/{} | {:.0}/{:.0}/{:.0} | {:.1}/{:.1} | {:.0} | {:.1} | {:.1} | {:.2} | {} |",
            p.name,
            p.requests - p.failures,
            p.failures,
            p.ttft_ms.p50,
            p.ttft_ms.p90,
            p.ttft_ms.p99,
            p.itl_ms.p50,
            p.itl_ms.p99,
            p.e2e_ms.p50,
            p.decode_tok_s.p50,
            p.output_tok_s,
            p.req_s,
            cached
        );
    }
    for p in &r.phases {
        for e in &p.errors {
            let _ = writeln!(s, "\n- {}: {e}", p.name);
        }
    }
    s.push('\n');
    s
}
