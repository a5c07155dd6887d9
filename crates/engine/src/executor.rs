//! The executor: runs steps in order on its own thread, samples, and
//! reports each step's epoch to the KV core (complete or fail) before the
//! next step starts.
//!
//! A step fails as a whole: the model returned an error, the sanitizer
//! found a violation, or the logits do not match the rows that sample.
//! Every request with a row in a failed step fails, and so do its rows in
//! the next step, already planned on top of the failed one (they would
//! compute over what it failed to write); the KV core taints what those
//! rows' blocks hold, so none of it is ever read, kept or published.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use strata_kv::{
    Access, BlockId, Demotion, Epoch, Generation, KvCache, PoolGuard, SlotRef, TokenId,
};
use strata_model::{Constraint, LlamaModel, Logits, Sampled, Sampler, SamplingParams, SeqInput};
use strata_store::Arena;

use crate::request::RequestId;
use crate::sanitizer::Sanitizer;
use crate::tiers::{DemotedBytes, Job, TierIo};

/// What runs the forward pass: the model over its arena, or a test double.
pub trait Runner: Send + 'static {
    /// Logits of every sequence that asks for them, in order: its last
    /// row's, or all its rows' one after another ([`Logits`]).
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String>;

    /// Makes a freshly allocated block's contents unreadable (the
    /// sanitizer's poison), so a stale read shows up in the output.
    fn poison(&mut self, _block: BlockId) {}

    /// The requests whose rows the next `forward` call carries, in batch
    /// order (for test doubles that account for outcomes, and diagnostics).
    fn rows(&mut self, _requests: &[RequestId]) {}

    /// Bytes of one block's KV as the tiers store it (0: this runner's KV
    /// cannot move, and the tiers stay off).
    fn block_bytes(&self) -> usize {
        0
    }

    /// Copies a block's KV out (a demotion).
    fn read_block(&self, _block: BlockId, _out: &mut Vec<u8>) {}

    /// Copies a block's KV into another (a copy on write of a shared tail
    /// block; the slots past those it holds are never read before they are
    /// written). By default through [`Self::read_block`] and
    /// [`Self::write_block`]; a runner whose KV cannot move copies nothing.
    fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<(), String> {
        let mut bytes = Vec::new();
        self.read_block(src, &mut bytes);
        if bytes.is_empty() {
            return Ok(());
        }
        self.write_block(dst, &bytes)
    }

    /// Overwrites a block's KV with bytes [`Self::read_block`] gave (a
    /// restore).
    fn write_block(&mut self, _block: BlockId, _bytes: &[u8]) -> Result<(), String> {
        Err("this runner's KV cannot be restored".into())
    }
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

    fn block_bytes(&self) -> usize {
        self.arena.layout().block_elems() * 2
    }

    fn read_block(&self, block: BlockId, out: &mut Vec<u8>) {
        self.arena.block_bytes(block, out);
    }

    fn write_block(&mut self, block: BlockId, bytes: &[u8]) -> Result<(), String> {
        self.arena.write_block_bytes(block, bytes)
    }
}

/// One sequence's part of a step.
#[derive(Clone, Debug)]
pub(crate) struct StepSeq {
    pub(crate) seq: RequestId,
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
    /// Sanitizer: every (block, generation) this row reads or writes.
    pub(crate) accesses: Vec<(BlockId, Generation, Access)>,
    /// Prompt tokens this row scores.
    pub(crate) score: Option<Score>,
    /// Samples forked from this sequence at this row (`n > 1`): each
    /// samples its first token from this row's logits, with the sampler
    /// given.
    pub(crate) fanout: Vec<(RequestId, (SamplingParams, Vec<TokenId>))>,
}

/// The prompt tokens a row scores: input row `first_row + i` gives the
/// log-probability of `targets[i]` (the token after it).
#[derive(Clone, Debug)]
pub(crate) struct Score {
    /// Alternatives per token.
    pub(crate) top: usize,
    pub(crate) first_row: usize,
    pub(crate) targets: Vec<TokenId>,
}

impl StepSeq {
    fn logits(&self) -> Logits {
        if self.score.is_some() {
            Logits::All
        } else if self.sample {
            Logits::Last
        } else {
            Logits::None
        }
    }
}

/// A planned step.
#[derive(Debug)]
pub(crate) struct Step {
    pub(crate) epoch: Epoch,
    pub(crate) seqs: Vec<StepSeq>,
    /// Sequences that will not appear again: drop their sampler state.
    pub(crate) retire: Vec<RequestId>,
    /// Sanitizer: blocks allocated for this step, to poison first.
    pub(crate) poison: Vec<BlockId>,
    /// Blocks to copy out to the tiers, before anything else in the step
    /// (they may be reused by this step).
    pub(crate) demotions: Vec<Demotion>,
    /// Restored payloads to copy in, after poisoning and before the
    /// forward pass that reads them.
    pub(crate) restores: Vec<(BlockId, Vec<u8>)>,
    /// Copies on write of shared tail blocks, after poisoning and before
    /// the forward pass that writes into the copies.
    pub(crate) copies: Vec<strata_kv::CowCopy>,
}

/// A row of a step that produced no sample.
#[derive(Debug)]
pub(crate) struct FailedRow {
    pub(crate) seq: RequestId,
    pub(crate) error: String,
    /// The row was to sample (a sample the scheduler waits for).
    pub(crate) sampling: bool,
    /// Its grammar reached a dead end or failed (the request's own
    /// grammar, not the step).
    pub(crate) grammar: bool,
}

/// What a step produced.
#[derive(Debug)]
pub(crate) struct StepResult {
    pub(crate) epoch: Epoch,
    pub(crate) samples: Vec<(RequestId, Sampled)>,
    /// Prompt scores, per row that asked for them.
    pub(crate) scores: Vec<(RequestId, Vec<Sampled>)>,
    /// Rows of the step that failed, with why.
    pub(crate) failed: Vec<FailedRow>,
    /// Time spent running it.
    pub(crate) nanos: u64,
    /// Of that, time spent waiting for the pool lock.
    pub(crate) lock_wait_nanos: u64,
    /// Rows (tokens) the forward pass computed.
    pub(crate) rows: usize,
    /// Grammar masks computed for this step's samples, and their time
    /// (beside the forward pass, on a thread of their own).
    pub(crate) masks: u64,
    pub(crate) mask_nanos: u64,
}

/// Per-sequence state that lives with the executor.
pub(crate) struct Executor<R> {
    runner: R,
    cache: KvCache,
    samplers: HashMap<RequestId, Sampler>,
    /// Sequences whose output a grammar constrains.
    constraints: HashMap<RequestId, Constraint>,
    /// The token each sequence's latest step sampled.
    last: HashMap<RequestId, TokenId>,
    /// Sequences whose rows failed in the previous step: their rows in this
    /// step were planned on top of it and fail too.
    doomed: HashSet<RequestId>,
    sanitizer: Arc<Sanitizer>,
    lock_wait: u64,
    /// Where demoted bytes go.
    io: Option<TierIo>,
}

impl<R: Runner> Executor<R> {
    pub(crate) fn new(
        runner: R,
        cache: KvCache,
        sanitizer: Arc<Sanitizer>,
        io: Option<TierIo>,
    ) -> Self {
        Self {
            runner,
            cache,
            samplers: HashMap::new(),
            constraints: HashMap::new(),
            last: HashMap::new(),
            doomed: HashSet::new(),
            sanitizer,
            lock_wait: 0,
            io,
        }
    }

    /// A step's transfers, in their fixed order: demotions copy out first
    /// (this step may reuse their blocks), then poison (fresh blocks), then
    /// restores copy in (so poison never overwrites a restore), all before
    /// the forward pass that reads them. A restore that cannot be written
    /// fails the step.
    fn transfers(
        &mut self,
        demotions: &[Demotion],
        poison: &[BlockId],
        copies: &[strata_kv::CowCopy],
        restores: &[(BlockId, Vec<u8>)],
    ) -> Result<(), String> {
        if !demotions.is_empty() {
            let batch: Vec<DemotedBytes> = demotions
                .iter()
                .map(|d| {
                    let mut bytes = Vec::new();
                    self.runner.read_block(d.block, &mut bytes);
                    DemotedBytes {
                        demotion: d.clone(),
                        bytes,
                    }
                })
                .collect();
            if let Some(io) = &self.io {
                // Block by block: what fits the staging bound goes; the
                // rest (the disk is behind) is not written, a miss later.
                let (fits, over): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|d| io.reserve(d.bytes.len() as u64));
                if !fits.is_empty() {
                    io.send(Job::Demote(fits));
                }
                if !over.is_empty() {
                    io.send(Job::Dropped(
                        over.into_iter().map(|d| d.demotion.hash).collect(),
                    ));
                }
            }
        }
        for &b in poison {
            self.runner.poison(b);
        }
        for c in copies {
            self.runner.copy_block(c.src, c.dst)?;
        }
        for (b, bytes) in restores {
            self.runner.write_block(*b, bytes)?;
        }
        Ok(())
    }

    /// The sanitizer's check of the rows' accesses against the pool.
    fn validate(&mut self, epoch: Epoch, rows: &[StepSeq]) -> Result<(), String> {
        if rows.iter().all(|r| r.accesses.is_empty()) {
            return Ok(());
        }
        let checked = {
            let g = lock_counted(&self.cache, &mut self.lock_wait);
            rows.iter().try_for_each(|r| g.validate(epoch, &r.accesses))
        };
        checked.map_err(|e| {
            let msg = e.to_string();
            self.sanitizer.report(&msg);
            msg
        })
    }

    /// Runs one step and reports its epoch to the KV core.
    pub(crate) fn run(&mut self, step: Step) -> StepResult {
        let t0 = Instant::now();
        self.lock_wait = 0;
        for id in &step.retire {
            self.samplers.remove(id);
            self.constraints.remove(id);
            self.last.remove(id);
        }
        let mut failed = Vec::new();
        // Forks whose first sample this step's rows give (n > 1).
        let fanouts: Vec<(RequestId, Vec<RequestId>)> = step
            .seqs
            .iter()
            .filter(|r| !r.fanout.is_empty())
            .map(|r| (r.seq, r.fanout.iter().map(|(id, _)| *id).collect()))
            .collect();
        let doomed = std::mem::take(&mut self.doomed);
        let mut rows = step.seqs;
        rows.retain(|r| {
            if doomed.contains(&r.seq) {
                failed.push(FailedRow {
                    seq: r.seq,
                    error: "a step this row builds on failed".into(),
                    sampling: r.sample,
                    grammar: false,
                });
            }
            !doomed.contains(&r.seq)
        });
        // A pending input becomes known: the previous step's sample,
        // recorded in its slot, all under one lock; rows whose sample is
        // missing fail.
        let mut unresolved = Vec::new();
        {
            let last = &self.last;
            let mut g = lock_counted(&self.cache, &mut self.lock_wait);
            rows.retain_mut(|r| {
                let Some(slot) = r.pending else {
                    return true;
                };
                let resolved = match last.get(&r.seq) {
                    Some(&t) => g.resolve(slot, t).map(|()| t).map_err(|e| e.to_string()),
                    None => Err("the step that sampled its previous token failed".into()),
                };
                match resolved {
                    Ok(t) => {
                        r.known.push(t);
                        true
                    }
                    Err(error) => {
                        failed.push(FailedRow {
                            seq: r.seq,
                            error,
                            sampling: r.sample,
                            grammar: false,
                        });
                        unresolved.push(r.seq);
                        false
                    }
                }
            });
        }
        // A row that could not take its input computes nothing; the next
        // step's row, already planned on top of it, must not run on the
        // sample before it or on the slot it never wrote.
        for seq in unresolved {
            self.last.remove(&seq);
            self.doomed.insert(seq);
        }
        // A sequence's sampler (and grammar) exists from its first sample.
        for r in rows.iter().filter(|r| r.sample) {
            if !self.samplers.contains_key(&r.seq) {
                let (params, prompt) = r.sampler.clone().unwrap_or_default();
                if let Some(g) = &params.grammar {
                    self.constraints.insert(r.seq, g.start());
                }
                self.samplers.insert(r.seq, Sampler::new(params, &prompt));
            }
        }
        // The masks of this step's constrained samples depend only on the
        // tokens sampled before it, all known now: they are computed on a
        // thread of their own while the forward pass runs, and are ready
        // (or nearly) when its logits are.
        let masked: Vec<RequestId> = rows
            .iter()
            .filter(|r| r.sample && self.constraints.contains_key(&r.seq))
            .map(|r| r.seq)
            .collect();
        let constraints = std::mem::take(&mut self.constraints);
        let moved = self.transfers(&step.demotions, &step.poison, &step.copies, &step.restores);
        let (outcome, constraints) = std::thread::scope(|scope| {
            let mut constraints = Some(constraints);
            let masks = (!masked.is_empty()).then(|| {
                let (masked, mut constraints) = (&masked, constraints.take().expect("taken once"));
                scope.spawn(move || {
                    for id in masked {
                        if let Some(c) = constraints.get_mut(id) {
                            c.compute_mask();
                        }
                    }
                    constraints
                })
            });
            let outcome = if let Err(e) = moved {
                Err(e)
            } else if rows.is_empty() {
                Ok(Vec::new())
            } else {
                self.validate(step.epoch, &rows)
                    .and_then(|()| self.forward(&rows))
                    .and_then(|l| self.validate(step.epoch, &rows).map(|()| l))
            };
            let constraints = match masks {
                Some(h) => h.join().expect("llguidance catches its own panics"),
                None => constraints.expect("not taken"),
            };
            (outcome, constraints)
        });
        self.constraints = constraints;
        let (mut masks, mut mask_nanos) = (0, 0);
        let mut samples = Vec::new();
        let mut scores = Vec::new();
        let epoch = step.epoch;
        let computed_rows = if outcome.is_ok() {
            rows.iter().map(|r| r.known.len()).sum()
        } else {
            0
        };
        match outcome {
            Ok(logits) => {
                let with_logits = rows.iter().filter(|r| r.logits() != Logits::None);
                for (r, mut l) in with_logits.zip(logits) {
                    if let Some(sc) = &r.score {
                        let vocab = l.len() / r.known.len();
                        let row = |i: usize| &l[(sc.first_row + i) * vocab..][..vocab];
                        let scored = sc.targets.iter().enumerate();
                        scores.push((
                            r.seq,
                            scored
                                .map(|(i, &t)| strata_model::score(row(i), t, sc.top))
                                .collect(),
                        ));
                        if r.sample {
                            // The last row samples.
                            l = l.split_off(l.len() - vocab);
                        }
                    }
                    if !r.sample {
                        continue;
                    }
                    for t in &r.suppress {
                        if let Some(x) = l.get_mut(t.get() as usize) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                    // The row's own sample, then its forks' (n > 1) from the
                    // same logits, each with its own sampler and grammar.
                    let own = (r.seq, r.sampler.clone());
                    let forks = r.fanout.iter().map(|(id, init)| (*id, Some(init.clone())));
                    for (seq, init) in std::iter::once(own).chain(forks) {
                        let sampler = self.samplers.entry(seq).or_insert_with(|| {
                            let (params, prompt) = init.clone().unwrap_or_default();
                            if let Some(g) = &params.grammar {
                                self.constraints.insert(seq, g.start());
                            }
                            Sampler::new(params, &prompt)
                        });
                        let sampled = match self.constraints.get_mut(&seq) {
                            None => Ok(sampler.sample(&l)),
                            Some(c) => {
                                c.compute_mask();
                                masks += 1;
                                mask_nanos += c.mask_nanos();
                                let sampled = c.mask().and_then(|m| {
                                    sampler.sample_masked(&l, Some(m)).ok_or_else(|| {
                                        "the grammar reached a dead end: no token may continue it here (min_tokens or ignore_eos can forbid its only ending)".to_string()
                                    })
                                });
                                sampled.and_then(|s| c.commit(s.token).map(|()| s))
                            }
                        };
                        match sampled {
                            Ok(s) => {
                                self.last.insert(seq, s.token);
                                samples.push((seq, s));
                            }
                            Err(error) => {
                                self.last.remove(&seq);
                                self.doomed.insert(seq);
                                failed.push(FailedRow {
                                    seq,
                                    error,
                                    sampling: true,
                                    grammar: true,
                                });
                            }
                        }
                    }
                }
                let mut g = lock_counted(&self.cache, &mut self.lock_wait);
                g.complete(epoch)
                    .expect("steps complete in the order their epochs were issued");
                check(&self.sanitizer, &g, epoch);
            }
            Err(e) => {
                for r in &rows {
                    self.last.remove(&r.seq);
                    self.doomed.insert(r.seq);
                    failed.push(FailedRow {
                        seq: r.seq,
                        error: format!("step failed: {e}"),
                        sampling: r.sample,
                        grammar: false,
                    });
                }
                let mut g = lock_counted(&self.cache, &mut self.lock_wait);
                g.fail(epoch)
                    .expect("steps fail in the order their epochs were issued");
                check(&self.sanitizer, &g, epoch);
            }
        }
        // A row that failed before sampling leaves its forks without their
        // first token: they fail with it.
        for (parent, kids) in fanouts {
            if !failed.iter().any(|f| f.seq == parent && !f.grammar) {
                continue;
            }
            for k in kids {
                if failed.iter().any(|f| f.seq == k) || samples.iter().any(|(s, _)| *s == k) {
                    continue;
                }
                self.last.remove(&k);
                self.doomed.insert(k);
                failed.push(FailedRow {
                    seq: k,
                    error: "the step that computed its prompt failed".into(),
                    sampling: true,
                    grammar: false,
                });
            }
        }
        StepResult {
            epoch,
            samples,
            scores,
            failed,
            nanos: t0.elapsed().as_nanos() as u64,
            lock_wait_nanos: self.lock_wait,
            rows: computed_rows,
            masks,
            mask_nanos,
        }
    }

    /// The forward pass, refusing logits that do not match the rows that
    /// sample (a model that returns fewer would leave a row without its
    /// sample, or give it another row's).
    fn forward(&mut self, rows: &[StepSeq]) -> Result<Vec<Vec<f32>>, String> {
        let batch: Vec<SeqInput<'_>> = rows
            .iter()
            .map(|r| SeqInput {
                tokens: &r.known,
                start: r.start,
                block_table: &r.table,
                logits: r.logits(),
            })
            .collect();
        let ids: Vec<RequestId> = rows.iter().map(|r| r.seq).collect();
        self.runner.rows(&ids);
        let logits = self.runner.forward(&batch)?;
        let wanted: Vec<&StepSeq> = rows.iter().filter(|r| r.logits() != Logits::None).collect();
        if logits.len() != wanted.len() {
            return Err(format!(
                "the model returned logits for {} sequences, {} asked",
                logits.len(),
                wanted.len()
            ));
        }
        // Every row of logits has one width; a sequence that asked for all
        // its rows got that many.
        let rows = |r: &StepSeq| match r.logits() {
            Logits::All => r.known.len(),
            _ => 1,
        };
        let vocab = wanted
            .first()
            .map_or(0, |r| logits[0].len() / rows(r).max(1));
        for (r, l) in wanted.iter().zip(&logits) {
            if vocab == 0 || l.len() != rows(r) * vocab {
                return Err(format!(
                    "the model returned {} logits for {} rows of {vocab}",
                    l.len(),
                    rows(r)
                ));
            }
        }
        Ok(logits)
    }
}

/// Locks the pool, adding the wait to `wait` (the scheduler plans under the
/// same lock).
fn lock_counted<'a>(cache: &'a KvCache, wait: &mut u64) -> PoolGuard<'a> {
    let t = Instant::now();
    let g = cache.lock();
    *wait += t.elapsed().as_nanos() as u64;
    g
}

/// The sanitizer's periodic whole-pool check, after a step's completion.
fn check(sanitizer: &Sanitizer, g: &PoolGuard<'_>, epoch: Epoch) {
    if sanitizer.due(epoch.get())
        && let Err(e) = g.check_invariants()
    {
        sanitizer.report(&format!("KV invariants after step {epoch:?}: {e}"));
    }
}

#[cfg(test)]
mod tests;
