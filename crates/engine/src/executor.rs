//! The executor: runs steps in order on its own thread, samples, and
//! reports each step's epoch to the KV core (complete or fail) before the
//! next step starts.

use std::collections::HashMap;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use strata_kv::{Access, BlockId, Epoch, Generation, KvCache, SlotRef, TokenId};
use strata_model::{LlamaModel, Sampled, Sampler, SamplingParams, SeqInput};
use strata_store::Arena;

/// What runs the forward pass: the model over its arena, or a test double.
pub trait Runner: Send + 'static {
    /// Logits of the last row of every sequence with `logits` set, in order.
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String>;

    /// Makes a freshly allocated block's contents unreadable (the
    /// sanitizer's poison), so a stale read shows up in the output.
    fn poison(&mut self, _block: BlockId) {}
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

    fn poison(&mut self, block: BlockId) {
        self.arena.poison(block);
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
    /// Known input tokens (empty when `pending` is set, until the executor
    /// resolves it).
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
    /// Sanitizer: blocks allocated for this step, to poison first.
    pub(crate) poison: Vec<BlockId>,
    /// Sanitizer: every (block, generation) the step reads or writes.
    pub(crate) accesses: Vec<(BlockId, Generation, Access)>,
}

/// What a step produced.
#[derive(Debug)]
pub(crate) struct StepResult {
    pub(crate) epoch: Epoch,
    pub(crate) samples: Vec<(u64, Sampled)>,
    /// Sequences of the step that failed, with why.
    pub(crate) failed: Vec<(u64, String)>,
    /// Time spent running it.
    pub(crate) nanos: u64,
}

/// Per-sequence state that lives with the executor.
pub(crate) struct Executor<R> {
    runner: R,
    cache: KvCache,
    samplers: HashMap<u64, Sampler>,
    /// The token each sequence's latest step sampled.
    last: HashMap<u64, TokenId>,
    /// Sanitizer violations seen.
    violations: Arc<AtomicU64>,
}

impl<R: Runner> Executor<R> {
    pub(crate) fn new(runner: R, cache: KvCache, violations: Arc<AtomicU64>) -> Self {
        Self {
            runner,
            cache,
            samplers: HashMap::new(),
            last: HashMap::new(),
            violations,
        }
    }

    /// The sanitizer's check of the step's accesses against the pool.
    fn validate(
        &self,
        epoch: Epoch,
        accesses: &[(BlockId, Generation, Access)],
    ) -> Result<(), String> {
        if accesses.is_empty() {
            return Ok(());
        }
        self.cache.lock().validate(epoch, accesses).map_err(|e| {
            self.violations.fetch_add(1, Ordering::Relaxed);
            e.to_string()
        })
    }

    /// Runs one step and reports its epoch to the KV core.
    pub(crate) fn run(&mut self, step: Step) -> StepResult {
        let t0 = std::time::Instant::now();
        for id in &step.retire {
            self.samplers.remove(id);
            self.last.remove(id);
        }
        let mut failed = Vec::new();
        // A pending input becomes known: the previous step's sample,
        // recorded in its slot; rows whose sample is missing fail.
        let mut seqs = step.seqs;
        seqs.retain_mut(|s| {
            let Some(slot) = s.pending else {
                return true;
            };
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
                Ok(t) => {
                    s.known.push(t);
                    true
                }
                Err(e) => {
                    failed.push((s.seq, e));
                    false
                }
            }
        });
        let rows: Vec<&StepSeq> = seqs.iter().collect();
        let batch: Vec<SeqInput<'_>> = rows
            .iter()
            .map(|s| SeqInput {
                tokens: &s.known,
                start: s.start,
                block_table: &s.table,
                logits: s.sample,
            })
            .collect();
        for &b in &step.poison {
            self.runner.poison(b);
        }
        let logits = if batch.is_empty() {
            Ok(Vec::new())
        } else {
            self.validate(step.epoch, &step.accesses)
                .and_then(|()| self.runner.forward(&batch))
                .and_then(|l| self.validate(step.epoch, &step.accesses).map(|()| l))
        };
        let mut samples = Vec::new();
        match logits {
            Ok(logits) => {
                let mut it = logits.into_iter();
                for s in rows.iter().filter(|s| s.sample) {
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
                for s in &rows {
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
            nanos: t0.elapsed().as_nanos() as u64,
        }
    }
}
