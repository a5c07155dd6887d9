//! A tiny-model engine, solo reference runs, and whole-pool checks.

use std::sync::Arc;

use strata_engine::{
    Engine, EngineConfig, Event, FinishReason, ModelRunner, Request, SchedulerConfig,
    StopConditions, Usage,
};
use strata_kv::TokenId;
use strata_model::{
    Gguf, LlamaModel, LoadOptions, Logits, Sampled, SamplingParams, SeqInput, Tokenizer,
};
use strata_store::{Arena, BlockId};
use strata_testkit::tiny_model::{self, TinyConfig};

pub(crate) fn model(seed: u64) -> Arc<LlamaModel> {
    let path = tiny_model::path(TinyConfig {
        seed,
        ..TinyConfig::default()
    });
    Arc::new(
        LlamaModel::load(
            &mut Gguf::open(&path).unwrap(),
            LoadOptions {
                threads: 1,
                requantize: false,
            },
        )
        .unwrap(),
    )
}

/// The tiny model's tokenizer (the same for every seed).
pub(crate) fn tokenizer() -> Arc<Tokenizer> {
    let g = Gguf::open(&tiny_model::path(TinyConfig::default())).unwrap();
    Arc::new(Tokenizer::from_gguf(g.content()).unwrap())
}

pub(crate) struct Setup {
    pub(crate) blocks: usize,
    pub(crate) block_size: usize,
    pub(crate) step_tokens: usize,
    pub(crate) max_running: usize,
    pub(crate) name: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            blocks: 256,
            block_size: 4,
            step_tokens: 64,
            max_running: 16,
            name: "a",
        }
    }
}

pub(crate) fn engine(m: &Arc<LlamaModel>, s: Setup) -> Engine {
    engine_tiered(m, s, None)
}

/// [`engine`], with tiers below the arena.
pub(crate) fn engine_tiered(
    m: &Arc<LlamaModel>,
    s: Setup,
    tiers: Option<strata_engine::TierStores>,
) -> Engine {
    let arena = Arena::new(m.arena_layout(s.blocks, s.block_size)).unwrap();
    Engine::start_with_tiers(
        ModelRunner::new(m.clone(), arena),
        EngineConfig {
            num_blocks: s.blocks,
            block_size: s.block_size,
            context: m.config().context_length,
            vocab: m.config().vocab,
            eos: vec![TokenId::new(2)],
            model_fingerprint: m.fingerprint(s.block_size),
            hash_key: strata_testkit::test_key(),
            scheduler: SchedulerConfig {
                max_step_tokens: s.step_tokens,
                max_running: s.max_running,
                sanitize: true,
                check_every: 1,
            },
            queue_limit: 1024,
            model_name: format!("tiny-{}", s.name),
            session_ttl: std::time::Duration::from_secs(3600),
            tokenizer: Some(tokenizer()),
        },
        tiers,
    )
    .unwrap()
}

/// A greedy request for `n` tokens that ignores end-of-sequence.
pub(crate) fn greedy(prompt: Vec<TokenId>, n: usize) -> Request {
    Request {
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: Some(n),
            ignore_eos: true,
            ..StopConditions::default()
        },
        cache_salt: None,
        session: None,
        deadline: None,
        prompt_logprobs: None,
    }
}

/// The tokens of a request run alone, one forward call per token, over a
/// contiguous block table: what the engine must reproduce bit for bit.
pub(crate) fn solo(m: &LlamaModel, prompt: &[TokenId], n: usize) -> Vec<TokenId> {
    let bs = 16;
    let blocks = (prompt.len() + n).div_ceil(bs);
    let mut arena = Arena::new(m.arena_layout(blocks, bs)).unwrap();
    let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
    let argmax = |l: &[f32]| {
        let mut best = 0;
        for (i, v) in l.iter().enumerate() {
            if *v > l[best] {
                best = i;
            }
        }
        TokenId::new(best as u32)
    };
    let mut logits = m
        .forward(
            &mut arena,
            &[SeqInput {
                tokens: prompt,
                start: 0,
                block_table: &table,
                logits: Logits::Last,
            }],
        )
        .unwrap()
        .remove(0);
    let mut out = Vec::new();
    for i in 0..n {
        let t = argmax(&logits);
        out.push(t);
        if i + 1 == n {
            break;
        }
        logits = m
            .forward(
                &mut arena,
                &[SeqInput {
                    tokens: &[t],
                    start: prompt.len() + i,
                    block_table: &table,
                    logits: Logits::Last,
                }],
            )
            .unwrap()
            .remove(0);
    }
    out
}

/// What a finished request produced.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) tokens: Vec<TokenId>,
    pub(crate) reason: FinishReason,
    pub(crate) usage: Usage,
    pub(crate) cached: usize,
    /// Prompt scores, when asked for.
    pub(crate) scores: Vec<Sampled>,
}

pub(crate) fn outcome(events: Vec<Event>) -> Outcome {
    let mut tokens = Vec::new();
    let mut cached = None;
    let mut scores = Vec::new();
    for e in events {
        match e {
            Event::PromptLogprobs(v) => {
                assert!(tokens.is_empty(), "prompt scores after a token");
                scores.extend(v);
            }
            Event::Admitted { cached_tokens } => {
                assert!(cached.is_none(), "admitted twice");
                cached = Some(cached_tokens);
            }
            Event::Token { id, .. } => tokens.push(id),
            Event::Finished { reason, usage } => {
                assert_eq!(usage.completion_tokens, tokens.len());
                return Outcome {
                    tokens,
                    reason,
                    usage,
                    cached: cached.unwrap_or(0),
                    scores,
                };
            }
        }
    }
    panic!("the request never finished");
}

/// Waits for the engine to go idle, then checks the pool is whole: no
/// holders, every epoch complete, every block free, invariants hold.
pub(crate) fn assert_whole(e: &Engine) {
    e.wait_idle();
    let pool = e.cache().lock();
    pool.check_invariants().unwrap();
    let s = pool.stats();
    assert_eq!(s.issued, s.completed, "epochs in flight: {s:?}");
    assert_eq!(pool.live_holders(), 0, "holders left: {s:?}");
    assert_eq!((s.free, s.owned, s.quarantined), (s.total, 0, 0), "{s:?}");
    assert!(pool.is_whole(), "{s:?}");
    drop(pool);
    assert_eq!(e.stats().violations, 0);
}

/// Prompt tokens from a seed: a shared head of `shared` tokens, then a
/// distinct tail.
pub(crate) fn prompt(shared: usize, len: usize, seed: u32) -> Vec<TokenId> {
    (0..len as u32)
        .map(|i| {
            let x = if (i as usize) < shared {
                i
            } else {
                i.wrapping_mul(31).wrapping_add(seed * 97)
            };
            TokenId::new(3 + x % 250)
        })
        .collect()
}
