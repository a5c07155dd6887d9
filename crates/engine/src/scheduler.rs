//! The scheduler: synchronous, no threads of its own. It admits requests
//! (`lookup_and_pin` of the prompt's prefix, then allocation of the rest),
//! plans each step under a token budget (decode rows first, then chunks of
//! prefill), makes room when blocks run out (`room.rs`), keeps sessions'
//! turns (`turns.rs`), and turns step results into events.
//!
//! ```text
//!   a sequence's tokens:  [0 .............. T)   known (prompt + sampled)
//!                         [0 ..... computed)     KV written or planned
//!   p = samples still outstanding (0 or 1 when planning)
//!   next row: tokens[computed..] if computed < T
//!             "the token the previous step samples" if computed == T, p == 1
//! ```

mod admission;
mod plan;
mod restores;
mod results;
mod room;
mod turns;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use strata_kv::{BlockHasher, BlockId, ChainRoot, Epoch, ExtraKeys, KvCache, Lease, TokenId};
use strata_model::{SamplingParams, Tokenizer};
use tokio::sync::mpsc;

use crate::EngineConfig;
use crate::executor::StepSeq;
use crate::request::{
    CANCELLED, Event, FinishReason, MAX_PAUSE, MAX_UNREAD, RESUME_UNREAD, Request, RequestId, Usage,
};
use crate::sanitizer::Sanitizer;
use crate::session::{Session, SharedRegistry};
use crate::text::TextState;

pub(crate) use restores::SchedTiers;
use room::Room;

/// Scored rows per step, all scored prompts together: each returns a
/// whole row of logits (128 rows of SmolLM2's 49,152 are 25 MB).
const SCORE_CHUNK: usize = 128;

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
    /// With the sanitizer on, check every invariant of the KV pool after
    /// each `check_every`-th step (planning and completion; 0: never).
    pub check_every: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_step_tokens: 512,
            max_running: 64,
            sanitize: cfg!(debug_assertions),
            check_every: 64,
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
    /// Of those, nanoseconds the executor waited for the KV pool's lock.
    pub lock_wait_nanos: u64,
    /// Grammar masks computed (one per constrained sample).
    pub grammar_masks: u64,
    /// Nanoseconds spent computing them (beside the forward pass).
    pub grammar_mask_nanos: u64,
    /// Nanoseconds the scheduler held the KV pool's lock while planning.
    pub plan_lock_nanos: u64,
    /// Nanoseconds the scheduler spent planning steps and applying their
    /// results (its overhead).
    pub schedule_nanos: u64,
    /// Sequences summed over planned steps (mean batch = this / steps).
    pub batch_seqs: u64,
    /// Rows (tokens) computed.
    pub rows: u64,
    /// Requests preempted (their blocks given back, re-queued).
    pub preemptions: u64,
    /// Rows that waited a step for blocks the step in flight gives back.
    pub waits_for_blocks: u64,
    /// Idle sessions unpinned to make room.
    pub sessions_unpinned: u64,
    /// Blocks that rows and admissions were short of, beyond the free ones
    /// and those coming back, when pins were given up for them.
    pub blocks_short: u64,
    /// Preemptions made while the pool itself showed enough blocks coming
    /// back (always 0 unless the scheduler's accounting has a bug).
    pub needless_preemptions: u64,
    /// Preemptions of a request older than the one the room was made for
    /// (always 0: newer requests give way).
    pub priority_inversions: u64,
    /// Requests paused for their clients that gave their blocks or their
    /// running slot to others (of any age; counted among preemptions).
    pub gave_way: u64,
    /// Plans that found fewer free blocks than the plan before promised to
    /// its waiting rows (always 0 unless the scheduler's accounting of what
    /// comes back has a bug).
    pub broken_promises: u64,
    /// Session hand-overs whose lease the KV core refused to truncate (a
    /// bug; the session then recomputes from its cached blocks).
    pub handovers_refused: u64,
    /// Admissions deferred because the next prompt block was being filled
    /// by another request.
    pub waits_for_pending: u64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: u64,
    /// Of those, tokens found in the prefix cache (or a session's pins).
    pub cached_tokens: u64,
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
    Row(Box<StepSeq>),
    /// It needs this many more blocks than it may take now.
    NoBlocks(usize),
    /// It cannot continue.
    Failed(String),
    /// Not in this step (the step's scored rows are taken).
    Later,
}

/// A sample of a request that forks from it when its prompt's last row
/// samples (`n > 1`).
#[derive(Debug)]
pub(crate) struct ForkSpec {
    pub(crate) id: RequestId,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub(crate) unread: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Its own sampler seed (`None`: random).
    pub(crate) seed: Option<u64>,
}

struct Seq {
    id: RequestId,
    /// Samples to fork at the first sample (they share the prompt).
    forks: Vec<ForkSpec>,
    /// Its partial tail block may be shared with its forks: the next
    /// write into it copies it first.
    shared_tail: bool,
    /// Its forks wait for the step that computed its prompt to complete
    /// (no block a step in flight writes is ever shared): until then it
    /// plans no row.
    waits_fork: bool,
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
    /// Tokens sent that its client has not received yet.
    unread: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// When it ends with `Timeout`, read or not.
    deadline: Option<std::time::Instant>,
    /// Since when it has been paused for its client without a break.
    paused_since: Option<std::time::Instant>,
    /// The session this request is a turn of.
    session: Option<u64>,
    /// A turn's tokens are the conversation so far, then its prompt: joined
    /// at its first admission (after the previous turn's hand-over).
    joined: bool,
    /// `max_tokens` as asked (the limit is also clamped to the context).
    max_asked: usize,
    /// A finished turn's tokens for its session, and how many of them the
    /// lease may keep KV for: handed over once no step in flight writes
    /// into the lease.
    handover: Option<(Vec<TokenId>, usize)>,
    /// Its text and stop strings (engines with a tokenizer).
    text: Option<TextState>,
    /// Score the prompt with this many alternatives per token.
    score: Option<usize>,
    /// Prompt positions whose rows have been planned to score (a row
    /// recomputed after preemption is not scored twice).
    scored: usize,
    /// Blocks being restored from the tiers: no row until they are read.
    restore: Option<restores::Restoring>,
}

impl Seq {
    /// Whether its client has left [`MAX_UNREAD`] tokens unread: its next
    /// token waits until it reads.
    fn paused(&self) -> bool {
        self.unread() >= MAX_UNREAD
    }

    fn unread(&self) -> usize {
        self.unread.load(std::sync::atomic::Ordering::Acquire) & !CANCELLED
    }

    /// Whether, waiting, it waits for its client: it gave way while
    /// paused and its client has not yet read down to [`RESUME_UNREAD`].
    fn waits_to_resume(&self) -> bool {
        self.unread() > RESUME_UNREAD
    }

    /// Whether it still has prompt positions to score.
    fn scoring(&self) -> bool {
        self.score.is_some() && self.scored + 1 < self.prompt_len
    }

    /// Whether its next row is a decode row held back for its client (a
    /// prefill row still runs: it sends nothing).
    fn waits_for_reader(&self) -> bool {
        self.paused() && self.tokens.len().saturating_sub(self.computed) <= 1
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// A sample forked from this request at its prompt's last row: the
    /// prompt computed (by that row), its first token that row's, its
    /// blocks `lease` (shared with this one).
    fn fork(&self, f: ForkSpec, sampling: SamplingParams) -> Seq {
        Seq {
            id: f.id,
            forks: Vec::new(),
            shared_tail: true,
            waits_fork: false,
            prompt_len: self.prompt_len,
            tokens: self.tokens[..self.prompt_len].to_vec(),
            computed: self.computed,
            outstanding: 1,
            lease: None,
            root: self.root,
            sampling,
            sampler_sent: true,
            max_tokens: self.max_tokens,
            stops: self.stops.clone(),
            min_tokens: self.min_tokens,
            cached_tokens: self.cached_tokens,
            finished: false,
            events: f.events,
            unread: f.unread,
            deadline: self.deadline,
            paused_since: None,
            session: None,
            joined: true,
            max_asked: self.max_asked,
            handover: None,
            text: self.text.as_ref().map(TextState::fresh),
            score: None,
            scored: 0,
            restore: None,
        }
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
    seqs: HashMap<RequestId, Seq>,
    /// In arrival order (ids grow with arrival).
    waiting: VecDeque<RequestId>,
    /// In arrival order.
    running: Vec<RequestId>,
    retire: Vec<RequestId>,
    counters: Counters,
    /// The epoch of the latest step result.
    last_done: Epoch,
    /// Blocks allocated while planning the current step (sanitizer).
    fresh: Vec<BlockId>,
    /// Copies on write of shared tail blocks for the step being planned.
    copies: Vec<strata_kv::CowCopy>,
    /// Samples created while planning (their first tokens come from the
    /// step being planned), parked until they fork.
    forked: Vec<Seq>,
    /// Requests whose samples fork once step `Epoch` (which computes the
    /// prompt and samples every first token) has completed.
    parked: Vec<(RequestId, Vec<RequestId>, Epoch)>,
    sessions: HashMap<u64, Session>,
    registry: SharedRegistry,
    /// Idle sessions give up their pins after this long.
    session_ttl: std::time::Duration,
    tokenizer: Option<Arc<Tokenizer>>,
    sanitizer: Arc<Sanitizer>,
    /// Finished turns whose lease goes to their session at the next chance.
    handovers: Vec<turns::Handover>,
    /// Blocks promised by the last plan to rows that wait for them.
    promised: usize,
    /// Scored rows the step being planned may still take.
    score_rows: usize,
    /// The tiers below the arena, if on.
    tiers: Option<restores::SchedTiers>,
}

impl Scheduler {
    /// The hasher and block size are the pool's own; `context` is the
    /// clamped limit.
    pub(crate) fn new(
        cache: KvCache,
        engine: &EngineConfig,
        context: usize,
        registry: SharedRegistry,
        sanitizer: Arc<Sanitizer>,
        tiers: Option<SchedTiers>,
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
            copies: Vec::new(),
            forked: Vec::new(),
            parked: Vec::new(),
            sessions: HashMap::new(),
            registry,
            session_ttl: engine.session_ttl,
            tokenizer: engine.tokenizer.clone(),
            sanitizer,
            handovers: Vec::new(),
            promised: 0,
            score_rows: SCORE_CHUNK,
            tiers,
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
                "session {id}: tokens {} pinned {} turn {:?} handover {:?}",
                s.tokens.len(),
                s.lease.is_some(),
                s.turn,
                s.handover
            );
        }
        out
    }

    pub(crate) fn counters(&self) -> Counters {
        Counters {
            // Not those that gave way while paused: they wait for their
            // own clients, not in the queue `submit` bounds.
            waiting: self
                .waiting
                .iter()
                .filter(|id| !self.seqs[id].waits_to_resume())
                .count(),
            running: self.running.len(),
            ..self.counters
        }
    }

    /// Queues a request the engine has validated.
    pub(crate) fn add(
        &mut self,
        id: RequestId,
        req: Request,
        events: mpsc::UnboundedSender<Event>,
        unread: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        forks: Vec<ForkSpec>,
    ) {
        let mut root = self.hasher.root(ExtraKeys {
            model_fingerprint: &self.fingerprint,
            cache_salt: req.cache_salt.as_deref(),
        });
        let tokens = req.prompt;
        let session = req.session.map(|s| s.id);
        if let Some(sid) = session {
            let Some(s) = self.sessions.get_mut(&sid) else {
                let _ = events.send(Event::Finished {
                    reason: FinishReason::Error(format!("session {sid} was destroyed")),
                    usage: Usage::default(),
                });
                return;
            };
            root = s.root;
            // The session keeps its pins until the turn is admitted: a
            // waiting request holds none (or two waiting turns could each
            // hold what the other needs).
            s.turn = Some(id);
        }
        let max_asked = req.stop.max_tokens.unwrap_or(usize::MAX);
        let max_tokens = max_asked.min(self.context.saturating_sub(tokens.len()));
        let mut stops = req.stop.stop_token_ids.clone();
        if !req.stop.ignore_eos {
            stops.extend_from_slice(&self.eos);
        }
        let seq = Seq {
            id,
            forks,
            shared_tail: false,
            waits_fork: false,
            prompt_len: tokens.len(),
            tokens,
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
            unread,
            deadline: req.deadline,
            paused_since: None,
            session,
            joined: session.is_none(),
            max_asked,
            handover: None,
            text: self
                .tokenizer
                .as_ref()
                .map(|t| TextState::new(t.clone(), &req.stop.stop_strings)),
            score: req.prompt_logprobs,
            scored: 0,
            restore: None,
        };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
    }

    /// Whether a step could be planned now (without looking at blocks).
    pub(crate) fn has_work(&self) -> bool {
        self.demotions_waiting()
            || self.parked.iter().any(|p| p.2 <= self.last_done)
            || self
                .waiting
                .iter()
                .any(|id| !self.seqs[id].waits_to_resume())
            || self.running.iter().any(|id| {
                let s = &self.seqs[id];
                self.plannable(s) && !s.waits_for_reader()
            })
    }

    /// Whether demotions wait for a step to carry them.
    fn demotions_waiting(&self) -> bool {
        self.tiers.is_some() && self.cache.lock().demotions_waiting()
    }

    /// Whether a running request is paused for its client to read: the
    /// engine then polls (its client may read, its deadline may pass)
    /// instead of sleeping until a message.
    pub(crate) fn has_paused(&self) -> bool {
        self.running.iter().any(|id| self.seqs[id].paused())
            || self
                .waiting
                .iter()
                .any(|id| self.seqs[id].waits_to_resume())
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
        if s.waits_fork || s.restore.as_ref().is_some_and(|r| !r.ready()) {
            return false;
        }
        s.computed < s.tokens.len()
            || (s.computed == s.tokens.len()
                && s.outstanding == 1
                && s.generated() + s.outstanding < s.max_tokens)
    }

    /// Aborts every request whose client went away.
    pub(crate) fn reap_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .seqs
            .values()
            .filter(|s| {
                !s.finished
                    && (s.events.is_closed()
                        || s.unread.load(std::sync::atomic::Ordering::Acquire) & CANCELLED != 0)
            })
            .map(|s| s.id)
            .collect();
        for id in gone {
            self.counters.aborted += 1;
            self.finish(id, FinishReason::Abort);
        }
    }

    /// Ends every request whose deadline has passed, or that has been paused
    /// for its client for [`MAX_PAUSE`] (`Timeout`).
    pub(crate) fn reap_expired(&mut self, now: std::time::Instant) {
        // Paused past MAX_PAUSE counts as late too.
        // (No allocation: this runs on every turn of the scheduler loop.)
        for id in &self.running {
            let s = self.seqs.get_mut(id).expect("running requests exist");
            s.paused_since = if s.waits_for_reader() {
                Some(s.paused_since.unwrap_or(now))
            } else {
                None
            };
        }
        // A paused request that gave way waits for its client here.
        for id in &self.waiting {
            let s = self.seqs.get_mut(id).expect("waiting requests exist");
            s.paused_since = if s.paused() {
                Some(s.paused_since.unwrap_or(now))
            } else {
                None
            };
        }
        let late: Vec<RequestId> = self
            .seqs
            .values()
            .filter(|s| {
                !s.finished
                    && (s.deadline.is_some_and(|d| d <= now)
                        || s.paused_since
                            .is_some_and(|p| now.duration_since(p) >= MAX_PAUSE))
            })
            .map(|s| s.id)
            .collect();
        for id in late {
            self.counters.aborted += 1;
            self.finish(id, FinishReason::Timeout);
        }
    }

    /// Every request not finished.
    fn live_ids(&self) -> Vec<RequestId> {
        self.seqs
            .values()
            .filter(|s| !s.finished)
            .map(|s| s.id)
            .collect()
    }

    /// Aborts everything (shutdown).
    pub(crate) fn abort_all(&mut self) {
        for id in self.live_ids() {
            self.counters.aborted += 1;
            self.finish(id, FinishReason::Abort);
        }
    }

    /// Fails everything (the executor died: no step will complete).
    pub(crate) fn fail_all(&mut self, why: &str) {
        for id in self.live_ids() {
            self.finish(id, FinishReason::Error(why.to_string()));
        }
    }
}

#[cfg(test)]
mod tests;
