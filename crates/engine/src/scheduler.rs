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
use std::sync::Arc;

use strata_kv::{
    Access, BlockHasher, BlockId, ChainRoot, Epoch, ExtraKeys, Generation, KvCache, KvError, Lease,
    OwnerTag, PoolGuard, TokenId,
};
use strata_model::{SamplingParams, Tokenizer};
use tokio::sync::mpsc;

use crate::EngineConfig;
use crate::executor::{Step, StepResult, StepSeq};
use crate::request::{Event, FinishReason, Request, Usage};
use crate::session::{self, Session, SessionInfo, SharedRegistry};
use crate::text::TextState;

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
    /// Steps whose results have been applied.
    pub results: u64,
    /// Nanoseconds the executor spent running steps (forward and sampling).
    pub step_nanos: u64,
    /// Nanoseconds the scheduler spent planning steps and applying their
    /// results (its overhead).
    pub schedule_nanos: u64,
    /// Sequences summed over planned steps (mean batch = this / steps).
    pub batch_seqs: u64,
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
    /// The session this request is a turn of.
    session: Option<u64>,
    /// Its text and stop strings (engines with a tokenizer).
    text: Option<TextState>,
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
    sessions: HashMap<u64, Session>,
    registry: SharedRegistry,
    /// Idle sessions give up their pins after this long.
    session_ttl: std::time::Duration,
    tokenizer: Option<Arc<Tokenizer>>,
}

impl Scheduler {
    /// The hasher and block size are the pool's own; `context` is the
    /// clamped limit.
    pub(crate) fn new(
        cache: KvCache,
        engine: &EngineConfig,
        context: usize,
        registry: SharedRegistry,
    ) -> Self {
        let (hasher, block_size) = {
            let g = cache.lock();
            (g.hasher().clone(), g.config().block_size as usize)
        };
        Self {
            cache,
            hasher,
            fingerprint: engine.model_fingerprint.clone(),
            block_size,
            context,
            eos: engine.eos.clone(),
            config: engine.scheduler,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            retire: Vec::new(),
            counters: Counters::default(),
            last_done: Epoch::ZERO,
            fresh: Vec::new(),
            accesses: Vec::new(),
            sessions: HashMap::new(),
            registry,
            session_ttl: engine.session_ttl,
            tokenizer: engine.tokenizer.clone(),
        }
    }

    /// Requests, sessions and pool, one line each.
    pub(crate) fn debug_state(&self) -> String {
        use std::fmt::Write;
        let g = self.cache.lock();
        let mut out = format!("{:?}\n", g.stats());
        for (what, ids) in [
            ("waiting", self.waiting.iter().copied().collect::<Vec<_>>()),
            ("running", self.running.clone()),
        ] {
            for id in ids {
                let s = &self.seqs[&id];
                let lease = s.lease.as_ref().map(|l| {
                    (
                        g.table(l.id()).map(<[_]>::len).unwrap_or(0),
                        g.len_tokens(l.id()).unwrap_or(0),
                    )
                });
                let _ = writeln!(
                    out,
                    "{what} {id}: tokens {} computed {} outstanding {} lease (blocks, slots) {lease:?} session {:?}",
                    s.tokens.len(),
                    s.computed,
                    s.outstanding,
                    s.session
                );
            }
        }
        for (id, s) in &self.sessions {
            let _ = writeln!(
                out,
                "session {id}: tokens {} pinned {} turn {:?}",
                s.tokens.len(),
                s.lease.is_some(),
                s.turn
            );
        }
        out
    }

    /// A new session with an empty conversation.
    pub(crate) fn create_session(&mut self, id: u64, salt: Option<Vec<u8>>) {
        let root = self.hasher.root(ExtraKeys {
            model_fingerprint: &self.fingerprint,
            cache_salt: salt.as_deref(),
        });
        self.sessions.insert(
            id,
            Session {
                tokens: Vec::new(),
                root,
                lease: None,
                turn: None,
                last_used: std::time::Instant::now(),
            },
        );
    }

    /// Ends a session; a running turn is aborted (its blocks wait in
    /// quarantine for the steps still using them).
    pub(crate) fn destroy_session(&mut self, id: u64) -> bool {
        let Some(s) = self.sessions.get(&id) else {
            return false;
        };
        if let Some(turn) = s.turn {
            self.counters.aborted += 1;
            self.finish(turn, FinishReason::Abort);
        }
        self.sessions.remove(&id);
        true
    }

    /// The live sessions.
    pub(crate) fn session_infos(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self
            .sessions
            .iter()
            .map(|(&id, s)| SessionInfo {
                id,
                tokens: s.tokens.len(),
                pinned: s.lease.is_some()
                    || s.turn
                        .and_then(|t| self.seqs.get(&t))
                        .is_some_and(|q| q.lease.is_some()),
                busy: s.turn.is_some(),
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Unpins sessions idle for longer than the time-to-live: their full
    /// blocks stay cached, the partial tail is recomputed next turn.
    pub(crate) fn unpin_expired(&mut self) {
        let now = std::time::Instant::now();
        for s in self.sessions.values_mut() {
            if s.turn.is_none() && now.duration_since(s.last_used) >= self.session_ttl {
                s.lease = None;
            }
        }
    }

    /// Under block pressure: unpins the least recently used idle session.
    fn unpin_one_idle(&mut self, g: &mut PoolGuard<'_>) -> Result<bool, KvError> {
        // Pins at rest in a session: idle, or its turn not admitted yet.
        let lru = self
            .sessions
            .values_mut()
            .filter(|s| s.lease.is_some())
            .min_by_key(|s| s.last_used);
        match lru.and_then(|s| s.lease.take()) {
            Some(lease) => {
                g.release(lease)?;
                Ok(true)
            }
            None => Ok(false),
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
        let mut root = self.hasher.root(ExtraKeys {
            model_fingerprint: &self.fingerprint,
            cache_salt: req.cache_salt.as_deref(),
        });
        let mut tokens = req.prompt;
        let lease = None;
        let session = req.session.map(|s| s.id);
        if let Some(sid) = session {
            let Some(s) = self.sessions.get_mut(&sid) else {
                let _ = events.send(Event::Finished {
                    reason: FinishReason::Error(format!("session {sid} was destroyed")),
                    usage: Usage::default(),
                });
                return;
            };
            let mut all = s.tokens.clone();
            all.extend_from_slice(&tokens);
            tokens = all;
            root = s.root;
            // The session keeps its pins until the turn is admitted: a
            // waiting request holds none (or two waiting turns could each
            // hold what the other needs).
            s.turn = Some(id);
        }
        if tokens.len() >= self.context {
            // A session's conversation can outgrow the context.
            if let Some(sid) = session {
                self.end_turn(sid, None, None);
            }
            let _ = events.send(Event::Finished {
                reason: FinishReason::Error(format!(
                    "the conversation has {} tokens; this model's maximum context length is {} tokens",
                    tokens.len(),
                    self.context
                )),
                usage: Usage::default(),
            });
            return;
        }
        let max_tokens = req
            .stop
            .max_tokens
            .unwrap_or(usize::MAX)
            .min(self.context - tokens.len());
        let mut stops = req.stop.stop_token_ids.clone();
        if !req.stop.ignore_eos {
            stops.extend_from_slice(&self.eos);
        }
        let seq = Seq {
            id,
            prompt_len: tokens.len(),
            tokens,
            computed: 0,
            outstanding: 0,
            lease,
            root,
            sampling: req.sampling,
            sampler_sent: false,
            max_tokens,
            stops,
            min_tokens: req.stop.min_tokens,
            cached_tokens: None,
            finished: false,
            events,
            session,
            text: self
                .tokenizer
                .as_ref()
                .map(|t| TextState::new(t.clone(), &req.stop.stop_strings)),
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

    /// Whether `s` has a row to compute: prompt tokens not yet computed,
    /// or the token being sampled, if another token will be wanted after
    /// it (a row past `max_tokens` would be computed only to be thrown
    /// away, and on 2 cores it would delay the next request).
    fn plannable(&self, s: &Seq) -> bool {
        s.computed < s.tokens.len()
            || (s.computed == s.tokens.len()
                && s.outstanding == 1
                && s.generated() + s.outstanding < s.max_tokens)
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
        let t0 = std::time::Instant::now();
        let cache = self.cache.clone();
        let mut g = cache.lock();
        let epoch = g.next_epoch();
        let mut budget = self.config.max_step_tokens;
        let mut seqs = Vec::new();
        let preemptions_before = self.counters.preemptions;
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
                        // Out of blocks: an idle session's pins go first.
                        if self.unpin_one_idle(&mut g)? {
                            continue;
                        }
                        // Then the newest running request not in this step
                        // gives its blocks back (maybe this one).
                        let victim = *self
                            .running
                            .iter()
                            .rev()
                            .find(|v| !seqs.iter().any(|r| r.seq == **v))
                            .expect("the current request is not in the step yet");
                        self.preempt(&mut g, victim)?;
                        if victim == id {
                            continue;
                        }
                    }
                }
            }
        }
        // Admission, first come first served; not in a step that had to
        // preempt (the blocks just freed are for the running requests).
        let preempted = self.counters.preemptions > preemptions_before;
        while !preempted && budget > 0 && self.running.len() < self.config.max_running {
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
        self.counters.batch_seqs += seqs.len() as u64;
        self.counters.schedule_nanos += t0.elapsed().as_nanos() as u64;
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
        // A session's turn takes the session's pinned blocks.
        let carried = s
            .session
            .and_then(|sid| self.sessions.get_mut(&sid))
            .and_then(|x| x.lease.take());
        let s = self.seqs.get_mut(&id).expect("waiting requests exist");
        let from_session = carried.is_some();
        let (lease, hit_blocks, hit_tokens) = match carried {
            Some(lease) => {
                let t = g.len_tokens(lease.id())?;
                let b = g.table(lease.id())?.len();
                (lease, b, t)
            }
            None => {
                let mut seq = self.hasher.sequence(s.root);
                seq.extend(&s.tokens);
                let (lease, hit) = g.lookup_and_pin(OwnerTag(id), &seq)?;
                if hit.pending.is_some() {
                    self.counters.waits_for_pending += 1;
                    return Ok(false);
                }
                (lease, hit.blocks, hit.tokens)
            }
        };
        let need = s.tokens.len().div_ceil(self.block_size) - hit_blocks;
        // Keep a block of headroom per running request for its decode, so
        // a new admission does not force the next step to preempt.
        let reserve = self.running.len();
        loop {
            let short = g.free_blocks() < need + reserve;
            let result = if short {
                Err(KvError::OutOfBlocks {
                    needed: need + reserve,
                    free: g.free_blocks(),
                })
            } else {
                g.allocate(&lease, need)
            };
            match result {
                Ok(_) => break,
                Err(KvError::OutOfBlocks { .. }) => {
                    if self.unpin_one_idle(g)? {
                        continue;
                    }
                    // Wait, holding nothing; a session's pins go back to
                    // the session (where pressure may take them).
                    if from_session {
                        let sid = self.seqs[&id].session.expect("a session's turn");
                        if let Some(x) = self.sessions.get_mut(&sid) {
                            x.lease = Some(lease);
                        }
                    }
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        if self.config.sanitize {
            self.fresh
                .extend_from_slice(&g.table(lease.id())?[hit_blocks..]);
        }
        let s = self.seqs.get_mut(&id).expect("waiting requests exist");
        s.computed = hit_tokens;
        s.lease = Some(lease);
        if s.cached_tokens.is_none() {
            s.cached_tokens = Some(hit_tokens);
            let _ = s.events.send(Event::Admitted {
                cached_tokens: hit_tokens,
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

    /// Gives a running request's blocks back (at once, so this step's
    /// allocations can use them) and re-queues it in its place.
    fn preempt(&mut self, g: &mut PoolGuard<'_>, id: u64) -> Result<(), KvError> {
        let s = self.seqs.get_mut(&id).expect("running requests exist");
        if let Some(lease) = s.lease.take() {
            g.release(lease)?;
        }
        s.computed = 0;
        self.running.retain(|&r| r != id);
        let at = self.waiting.partition_point(|&w| w < id);
        self.waiting.insert(at, id);
        self.counters.preemptions += 1;
        Ok(())
    }

    /// Applies a step's results: tokens to clients, finished requests.
    pub(crate) fn on_result(&mut self, r: StepResult) {
        assert!(
            r.epoch > self.last_done,
            "step results arrive in epoch order"
        );
        self.last_done = r.epoch;
        self.counters.results += 1;
        self.counters.step_nanos += r.nanos;
        let t0 = std::time::Instant::now();
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
            let past_min = s.generated() >= s.min_tokens;
            let delta = s
                .text
                .as_mut()
                .map(|t| t.push(sampled.token, past_min))
                .unwrap_or_default();
            let reason = if delta.stopped || (past_min && s.stops.contains(&sampled.token)) {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.max_tokens || s.tokens.len() >= self.context {
                Some(FinishReason::Length)
            } else {
                None
            };
            let mut text = delta.text;
            if let Some(t) = s
                .text
                .as_mut()
                .filter(|_| reason.is_some() && !delta.stopped)
            {
                text.push_str(&t.finish());
            }
            let _ = s.events.send(Event::Token {
                id: sampled.token,
                logprob: sampled.logprob,
                top: sampled.top,
                text,
            });
            if let Some(reason) = reason {
                self.finish(id, reason);
            }
        }
        self.counters.schedule_nanos += t0.elapsed().as_nanos() as u64;
    }

    fn finish(&mut self, id: u64, reason: FinishReason) {
        let s = self.seqs.get_mut(&id).expect("finishing a known request");
        s.finished = true;
        if let Some(sid) = s.session {
            // A completed turn hands its blocks and tokens to the session;
            // an aborted or failed one leaves the session as it was.
            let (tokens, lease) = match reason {
                FinishReason::Stop | FinishReason::Length => {
                    (Some(s.tokens.clone()), s.lease.take())
                }
                _ => (None, None),
            };
            self.end_turn(sid, tokens, lease);
        }
        let s = self.seqs.get_mut(&id).expect("finishing a known request");
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

    /// A session's turn is over: it keeps `tokens` and `lease` if given.
    fn end_turn(&mut self, sid: u64, tokens: Option<Vec<TokenId>>, lease: Option<Lease>) {
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.turn = None;
            s.last_used = std::time::Instant::now();
            if let Some(t) = tokens {
                s.tokens = t;
                s.lease = lease;
            }
        }
        session::lock(&self.registry).end_turn(sid);
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
