//! The executor: runs steps in order on its own thread, samples, and
//! reports each step's epoch to the KV core (complete or fail) before the
//! next step starts.

use std::collections::HashMap;
use std::sync::Arc;

use strata_kv::{BlockId, Epoch, KvCache, SlotRef, TokenId};
use strata_model::{LlamaModel, Sampled, Sampler, SamplingParams, SeqInput};
use strata_store::Arena;

/// What runs the forward pass: the model over its arena, or a test double.
pub trait Runner: Send + 'static {
    /// Logits of the last row of every sequence with `logits` set, in order.
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String>;
}

/// The real model over its KV arena.
pub struct ModelRunner {
    model: Arc<LlamaModel>,
    arena: Arena,
}

impl ModelRunner {
    /// Runs `model` over `arena`.
    pub fn new(model: Arc<LlamaModel>, arena: Arena) -> Self {
        Self { model, arena }
    }
}

impl Runner for ModelRunner {
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String> {
        self.model
            .forward(&mut self.arena, batch)
            .map_err(|e| e.to_string())
    }
}

/// One sequence's part of a step.
#[derive(Clone, Debug)]
pub(crate) struct StepSeq {
    pub(crate) seq: u64,
    /// Position of the first input.
    pub(crate) start: usize,
    /// The input is the token the previous step sampled for `seq`, to be
    /// recorded in this slot.
    pub(crate) pending: Option<SlotRef>,
    /// Known input tokens (empty when `pending` is set).
    pub(crate) known: Vec<TokenId>,
    pub(crate) table: Vec<BlockId>,
    /// Sample a token from the last row.
    pub(crate) sample: bool,
    /// Tokens that may not be sampled now (stop tokens before `min_tokens`).
    pub(crate) suppress: Vec<TokenId>,
    /// The sampler to create the first time the sequence samples.
    pub(crate) sampler: Option<(SamplingParams, Vec<TokenId>)>,
}

/// A planned step.
#[derive(Debug)]
pub(crate) struct Step {
    pub(crate) epoch: Epoch,
    pub(crate) seqs: Vec<StepSeq>,
    /// Sequences that will not appear again: drop their sampler state.
    pub(crate) retire: Vec<u64>,
}

/// What a step produced.
#[derive(Debug)]
pub(crate) struct StepResult {
    pub(crate) epoch: Epoch,
    pub(crate) samples: Vec<(u64, Sampled)>,
    /// Sequences of the step that failed, with why.
    pub(crate) failed: Vec<(u64, String)>,
}

/// Per-sequence state that lives with the executor.
pub(crate) struct Executor<R> {
    runner: R,
    cache: KvCache,
    samplers: HashMap<u64, Sampler>,
    /// The token each sequence's latest step sampled.
    last: HashMap<u64, TokenId>,
}

impl<R: Runner> Executor<R> {
    pub(crate) fn new(runner: R, cache: KvCache) -> Self {
        Self {
            runner,
            cache,
            samplers: HashMap::new(),
            last: HashMap::new(),
        }
    }

    /// Runs one step and reports its epoch to the KV core.
    pub(crate) fn run(&mut self, step: Step) -> StepResult {
        for id in &step.retire {
            self.samplers.remove(id);
            self.last.remove(id);
        }
        let mut failed = Vec::new();
        let mut rows: Vec<(&StepSeq, Vec<TokenId>)> = Vec::with_capacity(step.seqs.len());
        for s in &step.seqs {
            let Some(slot) = s.pending else {
                rows.push((s, s.known.clone()));
                continue;
            };
            // The previous step's sample; absent if that step failed.
            let resolved = match self.last.get(&s.seq) {
                Some(&t) => self
                    .cache
                    .lock()
                    .resolve(slot, t)
                    .map(|()| t)
                    .map_err(|e| e.to_string()),
                None => Err("the step that sampled its previous token failed".into()),
            };
            match resolved {
                Ok(t) => rows.push((s, vec![t])),
                Err(e) => failed.push((s.seq, e)),
            }
        }
        let batch: Vec<SeqInput<'_>> = rows
            .iter()
            .map(|(s, tokens)| SeqInput {
                tokens,
                start: s.start,
                block_table: &s.table,
                logits: s.sample,
            })
            .collect();
        let logits = if batch.is_empty() {
            Ok(Vec::new())
        } else {
            self.runner.forward(&batch)
        };
        let mut samples = Vec::new();
        match logits {
            Ok(logits) => {
                let mut it = logits.into_iter();
                for (s, _) in rows.iter().filter(|(s, _)| s.sample) {
                    let Some(mut l) = it.next() else {
                        failed.push((s.seq, "the model returned too few logits".into()));
                        continue;
                    };
                    for t in &s.suppress {
                        if let Some(x) = l.get_mut(t.get() as usize) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                    let sampler = self.samplers.entry(s.seq).or_insert_with(|| {
                        let (params, prompt) = s.sampler.clone().unwrap_or_default();
                        Sampler::new(params, &prompt)
                    });
                    let sampled = sampler.sample(&l);
                    self.last.insert(s.seq, sampled.token);
                    samples.push((s.seq, sampled));
                }
                self.cache
                    .lock()
                    .complete(step.epoch)
                    .expect("steps complete in the order their epochs were issued");
            }
            Err(e) => {
                for (s, _) in &rows {
                    self.last.remove(&s.seq);
                    failed.push((s.seq, format!("step failed: {e}")));
                }
                self.cache
                    .lock()
                    .fail(step.epoch)
                    .expect("steps fail in the order their epochs were issued");
            }
        }
        StepResult {
            epoch: step.epoch,
            samples,
            failed,
        }
    }
}
