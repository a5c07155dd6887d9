//! Prometheus metrics at `GET /metrics`, named as vLLM names them where the
//! meaning matches (so existing dashboards carry over), plus Strata's own
//! under `strata:`.
//!
//! Request-level histograms are recorded as responses are produced; the
//! engine's counters and gauges are read at each scrape.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use strata_engine::EngineStats;

mod tiers;

pub(crate) use tiers::TierSource;

/// The label of `vllm:request_success`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Reason {
    /// `stop`, `length`, `abort`, `error`.
    pub(crate) finished_reason: &'static str,
}

/// The request-level metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Time to first token.
    pub(crate) ttft: Histogram,
    /// Time between consecutive tokens of a request.
    pub(crate) itl: Histogram,
    /// Arrival to last token.
    pub e2e: Histogram,
    /// Arrival to admission.
    pub(crate) queue: Histogram,
    /// Requests finished, by reason.
    pub(crate) finished: Family<Reason, Counter>,
    /// Prompt tokens of finished requests.
    pub(crate) prompt_tokens: Counter,
    /// Generated tokens.
    pub(crate) generation_tokens: Counter,
}

/// Reads the engine at each scrape (nothing before the model is loaded).
type StatsSource = Arc<OnceLock<Box<dyn Fn() -> EngineStats + Send + Sync>>>;

struct EngineCollector(StatsSource);

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCollector")
    }
}

fn counter<N: prometheus_client::encoding::EncodeCounterValue>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: N,
) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for EngineCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(read) = self.0.get() else {
            return Ok(());
        };
        let s = read();
        let c = s.counters;
        let p = s.pool;
        gauge(
            &mut e,
            "vllm:num_requests_running",
            "Requests running (admitted, holding KV blocks).",
            c.running as f64,
        )?;
        gauge(
            &mut e,
            "vllm:num_requests_waiting",
            "Requests waiting for admission.",
            c.waiting as f64,
        )?;
        let used = (p.owned + p.quarantined) as f64 / p.total.max(1) as f64;
        gauge(
            &mut e,
            "vllm:kv_cache_usage_perc",
            "KV cache usage: blocks held by requests, sessions or in-flight steps (1 = full). Free cached blocks count as free.",
            used,
        )?;
        counter(
            &mut e,
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            p.query_tokens,
        )?;
        counter(
            &mut e,
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            p.hit_tokens,
        )?;
        counter(
            &mut e,
            "strata:admitted_prompt_tokens",
            "Prompt tokens of admitted requests.",
            c.prompt_tokens,
        )?;
        counter(
            &mut e,
            "strata:cached_prompt_tokens",
            "Of those, tokens not computed: found in the arena or a session's pins, or restored from a tier.",
            c.cached_tokens,
        )?;
        counter(
            &mut e,
            "vllm:num_preemptions",
            "Requests preempted (blocks given back, recomputed later).",
            c.preemptions,
        )?;
        gauge(
            &mut e,
            "strata:kv_blocks_total",
            "KV blocks in the arena.",
            p.total as f64,
        )?;
        gauge(
            &mut e,
            "strata:kv_blocks_free",
            "KV blocks free (cached or empty).",
            p.free as f64,
        )?;
        gauge(
            &mut e,
            "strata:kv_blocks_cached",
            "Free KV blocks that still hold a cached prefix.",
            p.cached as f64,
        )?;
        gauge(
            &mut e,
            "strata:kv_blocks_owned",
            "KV blocks pinned by requests or sessions.",
            p.owned as f64,
        )?;
        gauge(
            &mut e,
            "strata:kv_blocks_quarantined",
            "KV blocks released but still read by a step in flight.",
            p.quarantined as f64,
        )?;
        counter(
            &mut e,
            "strata:kv_evictions",
            "Cached blocks evicted to make room.",
            p.evictions,
        )?;
        counter(&mut e, "strata:steps", "Steps run.", c.results)?;
        counter(
            &mut e,
            "strata:overlapped_steps",
            "Steps planned while another was running.",
            c.overlapped_steps,
        )?;
        counter(
            &mut e,
            "strata:step_rows",
            "Token rows computed (prefill and decode).",
            c.rows,
        )?;
        counter(
            &mut e,
            "strata:step_sequences",
            "Sequences summed over steps (mean batch = this / steps).",
            c.batch_seqs,
        )?;
        counter(
            &mut e,
            "strata:step_seconds",
            "Seconds the executor spent running steps.",
            c.step_nanos as f64 / 1e9,
        )?;
        counter(
            &mut e,
            "strata:scheduler_seconds",
            "Seconds the scheduler spent planning and applying results.",
            c.schedule_nanos as f64 / 1e9,
        )?;
        counter(
            &mut e,
            "strata:grammar_masks",
            "Grammar masks computed (one per token sampled under structured output).",
            c.grammar_masks,
        )?;
        counter(
            &mut e,
            "strata:grammar_mask_seconds",
            "Seconds spent computing grammar masks (beside the forward pass, on a thread of their own).",
            c.grammar_mask_nanos as f64 / 1e9,
        )?;
        counter(
            &mut e,
            "strata:pool_lock_wait_seconds",
            "Seconds the executor waited for the KV pool's lock (the scheduler plans under it).",
            c.lock_wait_nanos as f64 / 1e9,
        )?;
        counter(
            &mut e,
            "strata:block_waits",
            "Rows that waited a step for blocks the step in flight gives back.",
            c.waits_for_blocks,
        )?;
        counter(
            &mut e,
            "strata:sessions_unpinned",
            "Idle sessions unpinned to make room under block pressure.",
            c.sessions_unpinned,
        )?;
        counter(
            &mut e,
            "strata:sanitizer_violations",
            "KV sanitizer violations (each failed its step, or broke an invariant of the pool).",
            s.violations,
        )?;
        Ok(())
    }
}

impl Metrics {
    /// The metrics of one server; `stats` is set once the model is loaded.
    pub(crate) fn new(stats: StatsSource, tiers: TierSource) -> Self {
        let mut registry = Registry::default();
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let ttft = latency();
        let itl = latency();
        let e2e = latency();
        let queue = latency();
        let finished = Family::<Reason, Counter>::default();
        let prompt_tokens = Counter::default();
        let generation_tokens = Counter::default();
        registry.register(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            ttft.clone(),
        );
        registry.register(
            "vllm:inter_token_latency_seconds",
            "Time between tokens of a request.",
            itl.clone(),
        );
        registry.register(
            "vllm:e2e_request_latency_seconds",
            "Arrival to last token.",
            e2e.clone(),
        );
        registry.register(
            "vllm:request_queue_time_seconds",
            "Arrival to admission.",
            queue.clone(),
        );
        registry.register(
            "vllm:request_success",
            "Requests finished, by reason.",
            finished.clone(),
        );
        registry.register(
            "vllm:prompt_tokens",
            "Prompt tokens of finished requests.",
            prompt_tokens.clone(),
        );
        registry.register(
            "vllm:generation_tokens",
            "Generated tokens.",
            generation_tokens.clone(),
        );
        registry.register_collector(Box::new(EngineCollector(stats)));
        registry.register_collector(Box::new(tiers::TierCollector(tiers)));
        Self {
            registry,
            ttft,
            itl,
            e2e,
            queue,
            finished,
            prompt_tokens,
            generation_tokens,
        }
    }

    /// The text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
