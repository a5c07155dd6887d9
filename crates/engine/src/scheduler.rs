//! The scheduler: synchronous, no threads of its own. It admits requests
//! (`lookup_and_pin` of the prompt's prefix, then allocation of the rest),
//! plans each step under a token budget (decode rows first, then chunks of
//! prefill), preempts the newest request when decode runs out of blocks,
//! and turns step results into events.
//!
//! ```text
//!   a sequence's tokens:  [0 .............. T)   known (prompt + sampled)
//!                         [0 ..... computed)     KV written or planned
//!   p = samples still outstanding (0 or 1 when planning)
//!   next row: tokens[computed..] if computed < T
//!             "the token the previous step samples" if computed == T, p == 1
//! ```

use std::collections::{HashMap, VecDeque};

use strata_kv::{
    Access, BlockHasher, BlockId, ChainRoot, Epoch, ExtraKeys, Generation, KvCache, KvError, Lease,
    OwnerTag, PoolGuard, TokenId,
};
use strata_model::SamplingParams;
use tokio::sync::mpsc;

use crate::executor::{Step, StepResult, StepSeq};
use crate::request::{Event, FinishReason, Request, Usage};

/// Scheduling limits.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Tokens (decode rows plus prefill) per step.
    pub max_step_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// The sanitizer: record each step's (block, generation) accesses for
    /// the executor to validate, and poison blocks as they are allocated.
    pub sanitize: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_step_tokens: 512,
            max_running: 64,
            sanitize: cfg!(debug_assertions),
        }
    }
}

/// Counters the server exports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Steps planned.
    pub steps: u64,
    /// Steps planned while another step was running.
    pub overlapped_steps: u64,
    /// Rows (tokens) computed.
    pub rows: u64,
    /// Requests preempted (their blocks given back, re-queued).
    pub preemptions: u64,
    /// Admissions deferred because the next prompt block was being filled
    /// by another request.
    pub waits_for_pending: u64,
    /// Requests finished (any reason).
    pub finished: u64,
    /// Requests aborted.
    pub aborted: u64,
    /// Requests waiting.
    pub waiting: usize,
    /// Requests running.
    pub running: usize,
}

/// What planning one request's row gave.
enum Planned {
    Row(StepSeq),
    /// No block could be allocated for it.
    NoBlocks,
    /// It cannot continue.
    Failed(String),
}

struct Seq {
    id: u64,
    prompt_len: usize,
    tokens: Vec<TokenId>,
    computed: usize,
    /// Samples of planned steps not back yet.
    outstanding: usize,
    lease: Option<Lease>,
    root: ChainRoot,
    sampling: SamplingParams,
    sampler_sent: bool,
    max_tokens: usize,
    stops: Vec<TokenId>,
    min_tokens: usize,
    cached_tokens: Option<usize>,
    finished: bool,
    events: mpsc::UnboundedSender<Event>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The scheduler of one model instance.
pub(crate) struct Scheduler {
    cache: KvCache,
    hasher: BlockHasher,
    fingerprint: Vec<u8>,
    block_size: usize,
    context: usize,
    eos: Vec<TokenId>,
    config: SchedulerConfig,
    seqs: HashMap<u64, Seq>,
    /// In arrival order (ids grow with arrival).
    waiting: VecDeque<u64>,
    /// In arrival order.
    running: Vec<u64>,
    retire: Vec<u64>,
    counters: Counters,
    /// The epoch of the latest step result.
    last_done: Epoch,
    /// Blocks allocated while planning the current step (sanitizer).
    fresh: Vec<BlockId>,
    /// The current step's accesses (sanitizer).
    accesses: Vec<(BlockId, Generation, Access)>,
}

impl Scheduler {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cache: KvCache,
        hasher: BlockHasher,
        fingerprint: Vec<u8>,
        block_size: usize,
        context: usize,
        eos: Vec<TokenId>,
        config: SchedulerConfig,
    ) -> Self {
        Self {
            cache,
            hasher,
            fingerprint,
            block_size,
            context,
            eos,
            config,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            retire: Vec::new(),
            counters: Counters::default(),
            last_done: Epoch::ZERO,
            fresh: Vec::new(),
            accesses: Vec::new(),
        }
    }

    pub(crate) fn counters(&self) -> Counters {
        Counters {
            waiting: self.waiting.len(),
            running: self.running.len(),
            ..self.counters
        }
    }

    /// Queues a request the engine has validated.
    pub(crate) fn add(&mut self, id: u64, req: Request, events: mpsc::UnboundedSender<Event>) {
        let root = self.hasher.root(ExtraKeys {
            model_fingerprint: &self.fingerprint,
            cache_salt: req.cache_salt.as_deref(),
        });
        let max_tokens = req
            .stop
            .max_tokens
            .unwrap_or(usize::MAX)
            .min(self.context - req.prompt.len());
        let mut stops = req.stop.stop_token_ids.clone();
        if !req.stop.ignore_eos {
            stops.extend_from_slice(&self.eos);
        }
        let seq = Seq {
            id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            computed: 0,
            outstanding: 0,
            lease: None,
            root,
            sampling: req.sampling,
            sampler_sent: false,
            max_tokens,
            stops,
            min_tokens: req.stop.min_tokens,
            cached_tokens: None,
            finished: false,
            events,
        };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
    }

    /// Whether a step could be planned now (without looking at blocks).
    pub(crate) fn has_work(&self) -> bool {
        !self.waiting.is_empty() || self.running.iter().any(|id| self.plannable(&self.seqs[id]))
    }

    /// Live requests (not finished).
    pub(crate) fn live(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    fn plannable(&self, s: &Seq) -> bool {
        s.computed < s.tokens.len() || (s.computed == s.tokens.len() && s.outstanding == 1)
    }

    /// Aborts every request whose client went away.
    pub(crate) fn reap_disconnected(&mut self) {
        let gone: Vec<u64> = self
            .seqs
            .values()
            .filter(|s| !s.finished && s.events.is_closed())
            .map(|s| s.id)
            .collect();
        for id in gone {
            self.counters.aborted += 1;
            self.finish(id, FinishReason::Abort);
        }
    }

    /// Aborts everything (shutdown).
    pub(crate) fn abort_all(&mut self) {
        let ids: Vec<u64> = self
            .seqs
            .values()
            .filter(|s| !s.finished)
            .map(|s| s.id)
            .collect();
        for id in ids {
            self.counters.aborted += 1;
            self.finish(id, FinishReason::Abort);
        }
    }

    /// Plans the next step, or `None` if there is nothing to run.
    pub(crate) fn plan(&mut self, overlapped: bool) -> Result<Option<Step>, KvError> {
        if !self.has_work() {
            return Ok(None);
        }
        let cache = self.cache.clone();
        let mut g = cache.lock();
        let epoch = g.next_epoch();
        let mut budget = self.config.max_step_tokens;
        let mut seqs = Vec::new();
        // Decode rows first (one token each), oldest first; then prefill.
        for decode in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let id = self.running[i];
                let s = &self.seqs[&id];
                let remaining = s.tokens.len().saturating_sub(s.computed);
                let is_decode = remaining <= 1;
                if !self.plannable(s)
                    || is_decode != decode
                    || seqs.iter().any(|r: &StepSeq| r.seq == id)
                {
                    i += 1;
                    continue;
                }
                match self.plan_row(&mut g, id, epoch, budget)? {
                    Planned::Row(row) => {
                        budget -= row.known.len().max(1);
                        seqs.push(row);
                        i += 1;
                    }
                    Planned::Failed(e) => self.finish(id, FinishReason::Error(e)),
                    Planned::NoBlocks => {
                        // Out of blocks: the newest running request not in
                        // this step gives its blocks back (maybe this one).
                        let victim = *self
                            .running
                            .iter()
                            .rev()
                            .find(|v| !seqs.iter().any(|r| r.seq == **v))
                            .expect("the current request is not in the step yet");
                        self.preempt(victim);
                        if victim == id {
                            continue;
                        }
                    }
                }
            }
        }
        // Admission, first come first served.
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            if !self.admit(&mut g, id)? {
                break;
            }
            self.waiting.pop_front();
            let at = self.running.partition_point(|&r| r < id);
            self.running.insert(at, id);
            match self.plan_row(&mut g, id, epoch, budget)? {
                Planned::Row(row) => {
                    budget -= row.known.len().max(1);
                    seqs.push(row);
                }
                Planned::Failed(e) => self.finish(id, FinishReason::Error(e)),
                Planned::NoBlocks => {}
            }
        }
        drop(g);
        self.counters.steps += 1;
        self.counters.overlapped_steps += overlapped as u64;
        self.counters.rows += (self.config.max_step_tokens - budget) as u64;
        Ok(Some(Step {
            epoch,
            seqs,
            retire: std::mem::take(&mut self.retire),
            poison: std::mem::take(&mut self.fresh),
            accesses: std::mem::take(&mut self.accesses),
        }))
    }

    /// Looks up and pins the prefix of a waiting request, then allocates
    /// blocks for the rest of its known tokens. `false`: it must wait (its
    /// pins are dropped).
    fn admit(&mut self, g: &mut PoolGuard<'_>, id: u64) -> Result<bool, KvError> {
        let s = self.seqs.get_mut(&id).expect("waiting requests exist");
        if s.outstanding > 0 {
            // Preempted with a sample still coming back: wait for it.
            return Ok(false);
        }
        let mut seq = self.hasher.sequence(s.root);
        seq.extend(&s.tokens);
        let (lease, hit) = g.lookup_and_pin(OwnerTag(id), &seq)?;
        if hit.pending.is_some() {
            self.counters.waits_for_pending += 1;
            return Ok(false);
        }
        let need = s.tokens.len().div_ceil(self.block_size) - hit.blocks;
        match g.allocate(&lease, need) {
            Ok(_) => {}
            Err(KvError::OutOfBlocks { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
        if self.config.sanitize {
            self.fresh
                .extend_from_slice(&g.table(lease.id())?[hit.blocks..]);
        }
        s.computed = hit.tokens;
        s.lease = Some(lease);
        if s.cached_tokens.is_none() {
            s.cached_tokens = Some(hit.tokens);
            let _ = s.events.send(Event::Admitted {
                cached_tokens: hit.tokens,
            });
        }
        Ok(true)
    }

    /// The row of running request `id` in this step, writing its tokens
    /// into its blocks.
    fn plan_row(
        &mut self,
        g: &mut PoolGuard<'_>,
        id: u64,
        epoch: Epoch,
        budget: usize,
    ) -> Result<Planned, KvError> {
        let bs = self.block_size;
        let s = self.seqs.get_mut(&id).expect("running requests exist");
        let lease = s.lease.as_ref().expect("running requests hold a lease");
        let pending = s.computed == s.tokens.len();
        let n = if pending {
            1
        } else {
            (s.tokens.len() - s.computed).min(budget)
        };
        let have = g.table(lease.id())?.len();
        let need = (s.computed + n).div_ceil(bs).saturating_sub(have);
        if need > 0 {
            match g.allocate(lease, need) {
                Ok(_) => {}
                Err(KvError::OutOfBlocks { .. }) => return Ok(Planned::NoBlocks),
                Err(e) => return Err(e),
            }
            if self.config.sanitize {
                self.fresh.extend_from_slice(&g.table(lease.id())?[have..]);
            }
        }
        let start = s.computed;
        let written = if pending {
            g.write_pending(lease, epoch)
                .map(|slot| (Some(slot), Vec::new()))
        } else {
            let chunk = s.tokens[start..start + n].to_vec();
            g.write(lease, epoch, &chunk).map(|_| (None, chunk))
        };
        let (slot, known) = match written {
            Ok(x) => x,
            // A step that wrote this block failed after this request's
            // previous row was planned (the overlap): the request fails
            // with it, here instead of when that step's result arrives.
            Err(e @ KvError::WriteRule { .. }) => {
                return Ok(Planned::Failed(format!(
                    "a step carrying this request failed ({e})"
                )));
            }
            Err(e) => return Err(e),
        };
        s.computed += n;
        let sample = s.computed >= s.tokens.len();
        if sample {
            s.outstanding += 1;
        }
        let sampler = (sample && !s.sampler_sent).then(|| {
            s.sampler_sent = true;
            (s.sampling.clone(), s.tokens[..s.prompt_len].to_vec())
        });
        // Stop tokens may not be sampled before `min_tokens`.
        let produced = s.generated() + s.outstanding - sample as usize;
        let suppress = if sample && produced < s.min_tokens {
            s.stops.clone()
        } else {
            Vec::new()
        };
        let table = g.table(lease.id())?.to_vec();
        if self.config.sanitize {
            let end = (start + n).div_ceil(bs);
            for (j, &b) in table[..end].iter().enumerate() {
                let access = if j >= start / bs {
                    Access::Write
                } else {
                    Access::Read
                };
                self.accesses.push((b, g.generation(b), access));
            }
        }
        Ok(Planned::Row(StepSeq {
            seq: id,
            start,
            pending: slot,
            known,
            table,
            sample,
            suppress,
            sampler,
        }))
    }

    /// Gives a running request's blocks back and re-queues it in its place.
    fn preempt(&mut self, id: u64) {
        let s = self.seqs.get_mut(&id).expect("running requests exist");
        s.lease = None;
        s.computed = 0;
        self.running.retain(|&r| r != id);
        let at = self.waiting.partition_point(|&w| w < id);
        self.waiting.insert(at, id);
        self.counters.preemptions += 1;
    }

    /// Applies a step's results: tokens to clients, finished requests.
    pub(crate) fn on_result(&mut self, r: StepResult) {
        assert!(
            r.epoch > self.last_done,
            "step results arrive in epoch order"
        );
        self.last_done = r.epoch;
        for (id, e) in r.failed {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.outstanding = s.outstanding.saturating_sub(1);
                if !s.finished {
                    self.finish(id, FinishReason::Error(e));
                }
                self.forget_if_done(id);
            }
        }
        for (id, sampled) in r.samples {
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            s.outstanding -= 1;
            if s.finished {
                // A row planned before the request ended: discarded.
                self.forget_if_done(id);
                continue;
            }
            s.tokens.push(sampled.token);
            let _ = s.events.send(Event::Token {
                id: sampled.token,
                logprob: sampled.logprob,
                top: sampled.top,
            });
            let stop =
                s.generated() > s.min_tokens.saturating_sub(1) && s.stops.contains(&sampled.token);
            let reason = if stop {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.max_tokens || s.tokens.len() >= self.context {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                self.finish(id, reason);
            }
        }
    }

    fn finish(&mut self, id: u64, reason: FinishReason) {
        let s = self.seqs.get_mut(&id).expect("finishing a known request");
        s.finished = true;
        // Blocks a planned step still uses wait in quarantine for its epoch.
        s.lease = None;
        let usage = Usage {
            prompt_tokens: s.prompt_len,
            cached_tokens: s.cached_tokens.unwrap_or(0),
            completion_tokens: s.generated(),
        };
        let _ = s.events.send(Event::Finished { reason, usage });
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        self.counters.finished += 1;
        if s.sampler_sent {
            self.retire.push(id);
        }
        self.forget_if_done(id);
    }

    fn forget_if_done(&mut self, id: u64) {
        if self
            .seqs
            .get(&id)
            .is_some_and(|s| s.finished && s.outstanding == 0)
        {
            self.seqs.remove(&id);
        }
    }
}
