//! The engine of one model instance: a scheduler thread that plans steps and
//! an executor thread that runs them, with at most two steps outstanding so
//! that step N+1 is planned while step N runs.
//!
//! ```text
//!   submit ──► [loop thread: Scheduler] ──Step──► [executor thread: Runner]
//!                  ▲        │ events                      │ complete/fail(epoch)
//!                  └────────┴───────────── StepResult ◄───┘
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use strata_kv::{BlockHasher, HashKey, KvCache, PoolConfig, PoolStats, Tier, TierPolicy, TokenId};
use strata_model::Tokenizer;
use tokio::sync::mpsc;

use crate::executor::{Executor, Runner, Step, StepResult};
use crate::request::{Request, RequestHandle, RequestId};
use crate::sanitizer::Sanitizer;
use crate::scheduler::{Counters, SchedTiers, Scheduler, SchedulerConfig};
use crate::session::{self, SessionId, SessionInfo, SharedRegistry};
use crate::sync::{Arc, Mutex, lock, mpsc as std_mpsc, thread};
use crate::tiers::{self, Report, TierIo, TierStats, TierStores};

/// Engine instances, numbered so a session names its model.
static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// How often a stalled scheduler looks again (for sessions' time-to-live
/// and clients that went away) while no message arrives.
const STALL_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// The most samples one request may ask for (`n`, `best_of`).
pub const MAX_SAMPLES: usize = 16;

/// Sample `i`'s seed, from the request's: a distinct, reproducible stream
/// per sample (splitmix64's mix of the two).
fn sample_seed(seed: u64, i: usize) -> u64 {
    if i == 0 {
        return seed;
    }
    let mut z = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Why the engine refused a request or could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Prompt plus requested tokens exceed the context.
    #[error(
        "this model's maximum context length is {context} tokens; the request has {prompt} prompt tokens and asks for {max_tokens} more"
    )]
    ContextExceeded {
        /// The context limit.
        context: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Requested tokens.
        max_tokens: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    /// Too many requests waiting.
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
    /// No such session (never created, or destroyed).
    #[error("{0} does not exist")]
    UnknownSession(String),
    /// A session used with a model it does not belong to.
    #[error("{session} cannot be used with model '{model}' (instance {instance})")]
    SessionOfAnotherModel {
        /// The session, with its own model.
        session: String,
        /// The model it was used with.
        model: String,
        /// That model's instance number.
        instance: u64,
    },
    /// The session already has a turn running.
    #[error("{0} already has a turn running")]
    SessionBusy(String),
    /// The configuration cannot work.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// Stop strings given to an engine that has no tokenizer.
    #[error("stop strings need a tokenizer, and this engine has none")]
    NoTokenizer,
    /// Several samples asked of a request that cannot fork.
    #[error("{0}")]
    BadSamples(String),
    /// Prompt log-probabilities asked of a session's turn (its prompt
    /// continues KV the engine kept, which has no logits to give).
    #[error("prompt log-probabilities are not available for a session's turn")]
    ScoredTurn,
}

/// How an engine instance is sized.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// KV blocks.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Context limit; clamped so one full-context sequence plus a block
    /// fits the arena.
    pub context: usize,
    /// Vocabulary size (token ids are checked against it).
    pub vocab: usize,
    /// End-of-sequence tokens.
    pub eos: Vec<TokenId>,
    /// What goes into every chain root besides the salt.
    pub model_fingerprint: Vec<u8>,
    /// The installation's hash key.
    pub hash_key: HashKey,
    /// Step budget and running limit.
    pub scheduler: SchedulerConfig,
    /// Requests waiting or running at most.
    pub queue_limit: usize,
    /// The model's name (for errors and listings).
    pub model_name: String,
    /// Idle sessions give up their pins after this long.
    pub session_ttl: std::time::Duration,
    /// Turns tokens into text for `Event::Token::text` and stop strings;
    /// without it, text is empty and stop strings are refused.
    pub tokenizer: Option<std::sync::Arc<Tokenizer>>,
}

enum Msg {
    Submit(
        RequestId,
        Box<Request>,
        mpsc::UnboundedSender<crate::Event>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        Vec<crate::scheduler::ForkSpec>,
    ),
    Done(StepResult),
    Idle(std_mpsc::Sender<()>),
    CreateSession(u64, Option<Vec<u8>>),
    DestroySession(u64, std_mpsc::Sender<bool>),
    ListSessions(std_mpsc::Sender<Vec<SessionInfo>>),
    Debug(std_mpsc::Sender<String>),
    /// What the tiers' I/O thread did.
    Tier(Report),
    /// Look again (the pool changed under the scheduler).
    Wake,
    Shutdown,
    /// The executor thread panicked (its message).
    ExecutorDied(String),
}

/// Sets its flag to false when dropped: the thread that holds it ended,
/// normally or by a panic.
struct AliveGuard(std::sync::Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Tells the scheduler when the executor thread dies by a panic (the
/// scheduler would otherwise wait for its step forever).
struct DeathNotice(std_mpsc::Sender<Msg>);

impl Drop for DeathNotice {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self
                .0
                .send(Msg::ExecutorDied("the executor thread panicked".into()));
        }
    }
}

/// What the engine reports about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Scheduler counters.
    pub counters: Counters,
    /// The KV pool's counters and gauges.
    pub pool: PoolStats,
    /// Sanitizer violations (each failed its step, or broke an invariant
    /// of the pool at a periodic check).
    pub violations: u64,
}

/// One model instance being served.
pub struct Engine {
    tx: std_mpsc::Sender<Msg>,
    next_id: AtomicU64,
    cache: KvCache,
    counters: Arc<Mutex<Counters>>,
    context: usize,
    vocab: usize,
    queue_limit: usize,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
    sanitizer: std::sync::Arc<Sanitizer>,
    instance: u64,
    name: Arc<str>,
    registry: SharedRegistry,
    next_session: AtomicU64,
    has_tokenizer: bool,
    /// False once the scheduler thread has ended (shut down, or died).
    alive: std::sync::Arc<AtomicBool>,
    /// What the tiers below the arena did.
    tier_stats: Arc<Mutex<TierStats>>,
    io: Mutex<Option<TierIo>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the scheduler and executor threads over `runner`, with no
    /// tiers below the arena.
    pub fn start<R: Runner>(runner: R, config: EngineConfig) -> Result<Self, EngineError> {
        Self::start_with_tiers(runner, config, None)
    }

    /// Starts the engine with the host and SSD tiers of `tiers` below the
    /// arena (its recovered SSD records are found by lookups at once), and
    /// their I/O thread.
    pub fn start_with_tiers<R: Runner>(
        runner: R,
        config: EngineConfig,
        tiers: Option<TierStores>,
    ) -> Result<Self, EngineError> {
        let bs = config.block_size;
        if bs == 0 || config.num_blocks < 2 {
            return Err(EngineError::Config(format!(
                "{} blocks of {bs} tokens cannot hold a sequence",
                config.num_blocks
            )));
        }
        let context = config.context.min((config.num_blocks - 1) * bs);
        let cache = KvCache::new(
            PoolConfig {
                num_blocks: config.num_blocks as u32,
                block_size: bs as u32,
            },
            BlockHasher::new(&config.hash_key, bs),
        )
        .map_err(|e| EngineError::Config(e.to_string()))?;
        let registry = SharedRegistry::default();
        let sanitizer = std::sync::Arc::new(Sanitizer::new(if config.scheduler.sanitize {
            config.scheduler.check_every
        } else {
            0
        }));
        let (tx, rx) = std_mpsc::channel::<Msg>();
        let tier_stats = Arc::new(Mutex::new(TierStats::default()));
        let mut threads = Vec::new();
        let block_bytes = runner.block_bytes();
        let tiers = tiers.filter(|t| block_bytes > 0 && (t.host.is_some() || t.ssd.is_some()));
        let (io, sched_tiers) = match tiers {
            None => (None, None),
            Some(stores) => {
                let mut g = cache.lock();
                g.set_tier_policy(TierPolicy {
                    write_back: stores.write_back,
                    write_through: stores.write_through,
                    min_chain: stores.min_chain,
                    first_tier: Some(if stores.host.is_some() {
                        Tier::Host
                    } else {
                        Tier::Ssd
                    }),
                });
                if let Some(ssd) = &stores.ssd {
                    for (hash, parent, tokens) in ssd.blocks() {
                        g.tiers_mut()
                            .insert_visible(hash, parent, &tokens, Tier::Ssd);
                    }
                }
                drop(g);
                let policy = stores.restore_policy;
                let probe = stores.ssd_probe_ns;
                let report_tx = tx.clone();
                let (io, handle) =
                    tiers::start(stores, block_bytes, tier_stats.clone(), move |r| {
                        let _ = report_tx.send(Msg::Tier(r));
                    })
                    .map_err(|e| EngineError::Config(e.to_string()))?;
                threads.push(handle);
                let st = SchedTiers::new(io.clone(), tier_stats.clone(), policy, probe);
                (Some(io), Some(st))
            }
        };
        let mut scheduler = Scheduler::new(
            cache.clone(),
            &config,
            context,
            registry.clone(),
            sanitizer.clone(),
            sched_tiers,
        );
        let (step_tx, step_rx) = std_mpsc::channel::<Step>();
        let done_tx = tx.clone();
        let notice = DeathNotice(tx.clone());
        let io_handle = io.clone();
        let mut executor = Executor::new(runner, cache.clone(), sanitizer.clone(), io);
        let exec = thread::Builder::new()
            .name("strata-executor".into())
            .spawn(move || {
                let _notice = notice;
                while let Ok(step) = step_rx.recv() {
                    if done_tx.send(Msg::Done(executor.run(step))).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let counters = Arc::new(Mutex::new(Counters::default()));
        let shared = counters.clone();
        let alive = std::sync::Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        let alive_flag = alive.clone();
        let sched = thread::Builder::new()
            .name("strata-scheduler".into())
            .spawn(move || {
                let _guard = guard;
                let mut outstanding = 0usize;
                let mut stopping = false;
                // Requests wait but no row could be planned and no step is
                // in flight: nothing changes until a message (or an idle
                // session's time-to-live) does, so wait for one instead of
                // planning empty steps in a loop.
                let mut stalled = false;
                // The last step sent had no rows.
                let mut empty_in_flight = false;
                let mut idle_waiters: Vec<std_mpsc::Sender<()>> = Vec::new();
                loop {
                    // Nothing to plan: wait for a message, or, if a paused
                    // request waits for its client and no step is in flight
                    // to wake us, poll (see `stalled`).
                    let idle = outstanding >= 2
                        || stopping
                        || (empty_in_flight && outstanding > 0)
                        || (!scheduler.has_work() && (outstanding > 0 || !scheduler.has_paused()));
                    let msg = if idle {
                        match rx.recv() {
                            Ok(m) => Some(m),
                            Err(_) => break,
                        }
                    } else if stalled {
                        match rx.recv_timeout(STALL_POLL) {
                            Ok(m) => Some(m),
                            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    } else {
                        rx.try_recv().ok()
                    };
                    match msg {
                        Some(Msg::Submit(id, req, events, unread, forks)) => {
                            scheduler.add(id, *req, events, unread, forks);
                            if stopping {
                                // Shutting down: refused as it arrives.
                                scheduler.abort_all();
                            }
                        }
                        Some(Msg::Done(r)) => {
                            outstanding -= 1;
                            scheduler.on_result(r);
                        }
                        Some(Msg::Idle(w)) => idle_waiters.push(w),
                        Some(Msg::CreateSession(id, salt)) => scheduler.create_session(id, salt),
                        Some(Msg::DestroySession(id, reply)) => {
                            let _ = reply.send(scheduler.destroy_session(id));
                        }
                        Some(Msg::Debug(reply)) => {
                            let _ = reply.send(format!(
                                "outstanding steps {outstanding}\n{}",
                                scheduler.debug_state()
                            ));
                        }
                        Some(Msg::Tier(r)) => scheduler.on_tier_report(r),
                        Some(Msg::Wake) => {}
                        Some(Msg::ListSessions(reply)) => {
                            let _ = reply.send(scheduler.session_infos());
                        }
                        Some(Msg::Shutdown) => {
                            stopping = true;
                            scheduler.abort_all();
                        }
                        Some(Msg::ExecutorDied(why)) => {
                            // No step will complete again: fail every
                            // request now and stop (new ones get Stopped).
                            // Not alive first, so a client that sees its
                            // failure also sees why.
                            alive_flag.store(false, Ordering::Release);
                            scheduler.fail_all(&why);
                            break;
                        }
                        None => {}
                    }
                    scheduler.reap_disconnected();
                    scheduler.reap_expired(std::time::Instant::now());
                    scheduler.unpin_expired();
                    stalled = false;
                    // An empty step (nothing could run, but one was in
                    // flight: it closes its epoch) is never planned on:
                    // wait for it, then plan with nothing in flight, which
                    // stalls instead (else paused requests with one waiting
                    // would have the threads pass empty steps for ever).
                    while !stopping && outstanding < 2 && !(empty_in_flight && outstanding > 0) {
                        match scheduler.plan(outstanding > 0) {
                            Ok(Some(step)) => {
                                empty_in_flight = step.seqs.is_empty();
                                if step_tx.send(step).is_err() {
                                    break;
                                }
                                outstanding += 1;
                            }
                            Ok(None) => {
                                stalled = outstanding == 0
                                    && (scheduler.has_work() || scheduler.has_paused());
                                break;
                            }
                            Err(e) => {
                                // The KV core refused an operation: a bug.
                                // Fail loudly rather than run on bad state.
                                panic!("scheduler: {e}");
                            }
                        }
                    }
                    *lock(&shared) = scheduler.counters();
                    if outstanding == 0 && scheduler.live() == 0 {
                        for w in idle_waiters.drain(..) {
                            let _ = w.send(());
                        }
                    }
                    if stopping && outstanding == 0 && scheduler.live() == 0 {
                        // Demotions still waiting go out with a last step
                        // of transfers only (write-through's newest blocks,
                        // so a restart finds them).
                        let Ok(Some(step)) = scheduler.plan(false) else {
                            break;
                        };
                        if step_tx.send(step).is_err() {
                            break;
                        }
                        outstanding += 1;
                    }
                }
            })
            .map_err(|e| EngineError::Config(e.to_string()))?;
        Ok(Self {
            tx,
            next_id: AtomicU64::new(1),
            cache,
            counters,
            context,
            vocab: config.vocab,
            queue_limit: config.queue_limit,
            threads: Mutex::new({
                // The I/O thread last: it drains what the executor sent.
                let mut all = vec![sched, exec];
                all.append(&mut threads);
                all
            }),
            tier_stats,
            io: Mutex::new(io_handle),
            sanitizer,
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            name: config.model_name.into(),
            registry,
            next_session: AtomicU64::new(1),
            has_tokenizer: config.tokenizer.is_some(),
            alive,
        })
    }

    /// Whether the engine still runs requests: false once its scheduler
    /// thread has ended (shut down, or died with its executor).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// The context limit in force (after clamping to the arena).
    pub fn context(&self) -> usize {
        self.context
    }

    /// The KV cache (for stats and whole-pool checks).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Counters and pool gauges.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            counters: *lock(&self.counters),
            pool: self.cache.lock().stats(),
            violations: self.sanitizer.violations(),
        }
    }

    /// What the tiers below the arena hold and did (`None` fields: that
    /// tier is off).
    pub fn tier_stats(&self) -> TierStats {
        lock(&self.tier_stats).clone()
    }

    /// Checks the tier stores' invariants once every tier job sent so far
    /// is done (tests; `Ok` without tiers).
    pub fn check_tiers(&self) -> Result<(), String> {
        let (tx, rx) = std_mpsc::channel();
        match lock(&self.io).as_ref() {
            Some(io) => io.send(tiers::Job::Check(tx)),
            None => return Ok(()),
        }
        rx.recv()
            .unwrap_or(Err("the tier I/O thread has stopped".into()))
    }

    /// The last sanitizer violation's message, if there was one.
    pub fn last_violation(&self) -> Option<String> {
        self.sanitizer.last()
    }

    /// Validates and queues a request; its events arrive on the handle.
    pub fn submit(&self, req: Request) -> Result<RequestHandle, EngineError> {
        let mut h = self.submit_n(req, 1)?;
        Ok(h.pop().expect("one handle for one sample"))
    }

    /// Submits a request for `n` samples of one prompt (at most
    /// [`MAX_SAMPLES`]): one handle each, in order. The prompt is computed
    /// once: when its last row samples, the request forks (the samples
    /// share its blocks; each copies the partial tail block before writing
    /// into it), and that row's logits give every sample its first token.
    /// Sample `i` seeds its sampler from the request's seed and `i` (sample
    /// 0 with the seed itself, so it is the same as `n = 1`).
    pub fn submit_n(&self, req: Request, n: usize) -> Result<Vec<RequestHandle>, EngineError> {
        if n == 0 || n > MAX_SAMPLES {
            return Err(EngineError::BadSamples(format!(
                "between 1 and {MAX_SAMPLES} samples, got {n}"
            )));
        }
        if n > 1 && (req.session.is_some() || req.prompt_logprobs.is_some()) {
            return Err(EngineError::BadSamples(
                "several samples cannot continue a session or score the prompt".into(),
            ));
        }
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(t) = req.prompt.iter().find(|t| t.get() as usize >= self.vocab) {
            return Err(EngineError::BadToken(t.get()));
        }
        let max_tokens = req.stop.max_tokens.unwrap_or(1).max(1);
        if req.prompt.len() + max_tokens > self.context {
            return Err(EngineError::ContextExceeded {
                context: self.context,
                prompt: req.prompt.len(),
                max_tokens,
            });
        }
        if !req.stop.stop_strings.is_empty() && !self.has_tokenizer {
            return Err(EngineError::NoTokenizer);
        }
        if req.prompt_logprobs.is_some() && req.session.is_some() {
            return Err(EngineError::ScoredTurn);
        }
        let c = *lock(&self.counters);
        if c.waiting >= self.queue_limit {
            return Err(EngineError::QueueFull(c.waiting));
        }
        if let Some(s) = &req.session {
            self.own_session(s)?;
            let mut r = session::lock(&self.registry);
            let held = r.tokens(s.id);
            match r.start_turn(s.id) {
                None => return Err(EngineError::UnknownSession(s.to_string())),
                Some(false) => return Err(EngineError::SessionBusy(s.to_string())),
                Some(true) => {}
            }
            // The conversation so far counts against the context too.
            if held + req.prompt.len() + max_tokens > self.context {
                r.end_turn(s.id, None);
                return Err(EngineError::ContextExceeded {
                    context: self.context,
                    prompt: held + req.prompt.len(),
                    max_tokens,
                });
            }
        }
        let mut handles = Vec::with_capacity(n);
        let mut forks = Vec::with_capacity(n - 1);
        let mut first = None;
        for i in 0..n {
            let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
            let (tx, rx) = mpsc::unbounded_channel();
            let unread = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            handles.push(RequestHandle {
                id,
                events: rx,
                unread: unread.clone(),
            });
            match i {
                0 => first = Some((id, tx, unread)),
                _ => forks.push(crate::scheduler::ForkSpec {
                    id,
                    events: tx,
                    unread,
                    seed: req.sampling.seed.map(|s| sample_seed(s, i)),
                }),
            }
        }
        let (id, tx, unread) = first.expect("n >= 1");
        let session = req.session.clone();
        if self
            .tx
            .send(Msg::Submit(id, Box::new(req), tx, unread, forks))
            .is_err()
        {
            if let Some(s) = session {
                session::lock(&self.registry).end_turn(s.id, None);
            }
            return Err(EngineError::Stopped);
        }
        Ok(handles)
    }

    /// Refuses a session of another model instance, naming both.
    fn own_session(&self, s: &SessionId) -> Result<(), EngineError> {
        if s.model == self.instance {
            return Ok(());
        }
        Err(EngineError::SessionOfAnotherModel {
            session: s.to_string(),
            model: self.name.to_string(),
            instance: self.instance,
        })
    }

    /// This engine's instance number (sessions name it).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// A new session bound to this model; its prefixes are shared only
    /// within `salt`.
    pub fn create_session(&self, salt: Option<Vec<u8>>) -> Result<SessionId, EngineError> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        session::lock(&self.registry).create(id);
        self.tx
            .send(Msg::CreateSession(id, salt))
            .map_err(|_| EngineError::Stopped)?;
        Ok(SessionId {
            model: self.instance,
            model_name: self.name.clone(),
            id,
        })
    }

    /// Ends a session. Safe while its turn runs: the turn is aborted and
    /// its blocks wait in quarantine for the steps still using them.
    pub fn destroy_session(&self, s: &SessionId) -> Result<(), EngineError> {
        self.own_session(s)?;
        if !session::lock(&self.registry).remove(s.id) {
            return Err(EngineError::UnknownSession(s.to_string()));
        }
        let (tx, rx) = std_mpsc::channel();
        self.tx
            .send(Msg::DestroySession(s.id, tx))
            .map_err(|_| EngineError::Stopped)?;
        let _ = rx.recv();
        Ok(())
    }

    /// Drops every free cached block from the prefix index (an operator's
    /// cache clear); blocks that are pinned or waiting in quarantine are
    /// never touched. Returns how many were dropped.
    pub fn clear_prefix_cache(&self) -> usize {
        let n = self.cache.lock().evict_cached(usize::MAX).len();
        // With tiers, the blocks go down (write-back) in a step of their own.
        let _ = self.tx.send(Msg::Wake);
        n
    }

    /// A dump of the scheduler's state (requests, sessions, pool), for
    /// diagnosing a stuck run.
    pub fn debug_state(&self) -> String {
        let (tx, rx) = std_mpsc::channel();
        if self.tx.send(Msg::Debug(tx)).is_err() {
            return "the engine has stopped".into();
        }
        rx.recv().unwrap_or_default()
    }

    /// The live sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let (tx, rx) = std_mpsc::channel();
        if self.tx.send(Msg::ListSessions(tx)).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    /// Blocks until no request is live and no step is in flight.
    pub fn wait_idle(&self) {
        let (tx, rx) = std_mpsc::channel();
        if self.tx.send(Msg::Idle(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Begins shutting down without waiting: every request is aborted (its
    /// client sees `FinishReason::Abort`), new ones are refused with
    /// `EngineError::Stopped`, and the threads exit once the steps in flight
    /// complete.
    pub fn abort_all(&self) {
        let _ = self.tx.send(Msg::Shutdown);
    }

    /// Aborts what is running, waits for the steps in flight, and stops the
    /// threads.
    pub fn shutdown(self) {
        self.close();
    }

    /// Stops the engine where it is shared: aborts what runs, writes the
    /// demotions still waiting, ends its threads (the tiers' stores close,
    /// and the SSD directory's lock is released). Idempotent; later
    /// requests get [`EngineError::Stopped`].
    pub fn close(&self) {
        // The I/O thread ends once every sender of its jobs is gone.
        lock(&self.io).take();
        let _ = self.tx.send(Msg::Shutdown);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
    }
}
