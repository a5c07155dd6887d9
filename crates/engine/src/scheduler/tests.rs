//! The scheduler's policies, step by step and without threads: a simulated
//! executor runs the planned steps when the test says, so each test decides
//! exactly which step is in flight while the next one is planned (the
//! overlap), and counts what the scheduler did.

use std::collections::{HashMap, VecDeque};

use strata_kv::{BlockHasher, KvCache, PoolConfig, TokenId};
use strata_model::{Sampled, SamplingParams};
use tokio::sync::mpsc;

use super::Scheduler;
use crate::executor::{FailedRow, Step, StepResult};
use crate::request::{
    Event, FinishReason, MAX_PAUSE, MAX_UNREAD, Request, RequestId, StopConditions,
};
use crate::sanitizer::Sanitizer;
use crate::session::SharedRegistry;
use crate::{EngineConfig, SchedulerConfig};

/// A greedy request for `max_tokens` that ignores end-of-sequence.
fn request(prompt: Vec<TokenId>, max_tokens: usize, session: Option<crate::SessionId>) -> Request {
    Request {
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..StopConditions::default()
        },
        cache_salt: None,
        session,
        deadline: None,
        prompt_logprobs: None,
    }
}

/// The token "sampled" after `n` tokens: any fixed rule will do here.
fn rule(n: usize) -> TokenId {
    TokenId::new(3 + (n as u32 * 7) % 50)
}

pub(super) struct Sim {
    pub(super) sched: Scheduler,
    pub(super) cache: KvCache,
    in_flight: VecDeque<Step>,
    /// The token each sequence's latest step sampled, as the executor keeps.
    last: HashMap<RequestId, TokenId>,
    events: HashMap<RequestId, mpsc::UnboundedReceiver<Event>>,
    /// Each request's count of tokens its client has not read.
    unread: HashMap<RequestId, std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    /// Requests whose client reads nothing (the others read everything
    /// before each plan; their events stay for the test to look at).
    stalled: std::collections::HashSet<RequestId>,
    next_id: u64,
}

pub(super) fn config(blocks: usize, bs: usize) -> EngineConfig {
    EngineConfig {
        num_blocks: blocks,
        block_size: bs,
        context: 4096,
        vocab: 64,
        eos: vec![TokenId::new(2)],
        model_fingerprint: b"sim".to_vec(),
        hash_key: strata_kv::HashKey::from_bytes([9; 32]),
        scheduler: SchedulerConfig {
            max_step_tokens: 64,
            max_running: 16,
            sanitize: true,
            check_every: 1,
        },
        queue_limit: 1024,
        model_name: "sim".into(),
        session_ttl: std::time::Duration::from_secs(3600),
        tokenizer: None,
    }
}

impl Sim {
    pub(super) fn new(blocks: usize, bs: usize) -> Self {
        let config = config(blocks, bs);
        let cache = KvCache::new(
            PoolConfig {
                num_blocks: blocks as u32,
                block_size: bs as u32,
            },
            BlockHasher::new(&config.hash_key, bs),
        )
        .expect("a valid pool");
        let context = (blocks - 1) * bs;
        let sched = Scheduler::new(
            cache.clone(),
            &config,
            context,
            SharedRegistry::default(),
            std::sync::Arc::new(Sanitizer::new(1)),
            None,
        );
        Self {
            sched,
            cache,
            in_flight: VecDeque::new(),
            last: HashMap::new(),
            events: HashMap::new(),
            unread: HashMap::new(),
            stalled: std::collections::HashSet::new(),
            next_id: 1,
        }
    }

    pub(super) fn submit(&mut self, prompt: usize, seed: u32, max_tokens: usize) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let req = request(
            (0..prompt as u32)
                .map(|i| TokenId::new(3 + (i * 11 + seed * 5) % 60))
                .collect(),
            max_tokens,
            None,
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let unread = std::sync::Arc::default();
        self.unread.insert(id, std::sync::Arc::clone(&unread));
        self.sched.add(id, req, tx, unread, Vec::new());
        self.events.insert(id, rx);
        id
    }

    /// `id`'s client stops reading (or, with `false`, reads again).
    pub(super) fn stall(&mut self, id: RequestId, stalled: bool) {
        if stalled {
            self.stalled.insert(id);
        } else {
            self.stalled.remove(&id);
        }
    }

    /// Plans one step (overlapped if another is in flight); false if there
    /// was nothing to plan.
    pub(super) fn plan(&mut self) -> bool {
        for (id, u) in &self.unread {
            if !self.stalled.contains(id) {
                u.store(0, std::sync::atomic::Ordering::Release);
            }
        }
        let overlapped = !self.in_flight.is_empty();
        let before: Vec<u32> = {
            let g = self.cache.lock();
            (0..g.config().num_blocks)
                .map(|b| g.generation(strata_kv::BlockId::new(b)).get())
                .collect()
        };
        let Some(step) = self
            .sched
            .plan(overlapped)
            .expect("the KV core accepts the plan")
        else {
            return false;
        };
        let g = self.cache.lock();
        // The sanitizer's records: every block the step allocated is to be
        // poisoned first, and every row names each block of its table it
        // touches, at its current generation, writing from the block its
        // first new token goes into.
        let mut fresh: Vec<strata_kv::BlockId> = (0..g.config().num_blocks)
            .map(strata_kv::BlockId::new)
            .filter(|&b| g.generation(b).get() != before[b.index()])
            .collect();
        let mut poisoned = step.poison.clone();
        fresh.sort();
        poisoned.sort();
        assert_eq!(
            poisoned, fresh,
            "the step does not poison what it allocated"
        );
        let bs = g.config().block_size as usize;
        for row in &step.seqs {
            let n = row.known.len().max(1);
            let touched = (row.start + n).div_ceil(bs);
            let want: Vec<_> = row.table[..touched]
                .iter()
                .enumerate()
                .map(|(j, &b)| {
                    let access = if j >= row.start / bs {
                        strata_kv::Access::Write
                    } else {
                        strata_kv::Access::Read
                    };
                    (b, g.generation(b), access)
                })
                .collect();
            assert_eq!(
                row.accesses, want,
                "row {:?} records the wrong accesses",
                row.seq
            );
        }
        drop(g);
        self.in_flight.push_back(step);
        true
    }

    /// Runs the oldest step in flight as the executor would: resolves its
    /// pending inputs, "samples", completes its epoch, hands the result
    /// back.
    pub(super) fn run_oldest(&mut self) {
        let step = self.in_flight.pop_front().expect("a step in flight");
        let mut samples = Vec::new();
        let mut failed = Vec::new();
        for row in &step.seqs {
            if let Some(slot) = row.pending {
                match self.last.get(&row.seq) {
                    Some(&t) => self.cache.lock().resolve(slot, t).expect("a live slot"),
                    None => {
                        failed.push(FailedRow {
                            seq: row.seq,
                            error: "no previous sample".to_string(),
                            sampling: row.sample,
                            grammar: false,
                        });
                        continue;
                    }
                }
            }
            let n = row.start + row.known.len().max(1);
            if row.sample {
                let token = rule(n);
                self.last.insert(row.seq, token);
                samples.push((
                    row.seq,
                    Sampled {
                        token,
                        logprob: 0.0,
                        top: Vec::new(),
                    },
                ));
            }
        }
        self.cache.lock().complete(step.epoch).expect("in order");
        self.sched.on_result(StepResult {
            epoch: step.epoch,
            samples,
            scores: Vec::new(),
            failed,
            nanos: 0,
            lock_wait_nanos: 0,
            rows: 0,
            masks: 0,
            mask_nanos: 0,
        });
    }

    /// Runs every step in flight and plans until nothing is left.
    pub(super) fn run_to_end(&mut self) {
        loop {
            while self.in_flight.len() < 2 && self.plan() {}
            if self.in_flight.is_empty() {
                break;
            }
            self.run_oldest();
        }
    }

    /// The events a request has produced so far.
    pub(super) fn events(&mut self, id: RequestId) -> Vec<Event> {
        let rx = self.events.get_mut(&id).expect("a submitted request");
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
    }

    pub(super) fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    pub(super) fn preemptions(&self) -> u64 {
        self.sched.counters().preemptions
    }

    pub(super) fn free_blocks(&self) -> usize {
        self.cache.lock().free_blocks()
    }

    pub(super) fn finished_with(&mut self, id: RequestId) -> Option<FinishReason> {
        self.events(id).into_iter().find_map(|e| match e {
            Event::Finished { reason, .. } => Some(reason),
            _ => None,
        })
    }
}

/// Three requests decode in every step. When the oldest needs a block and
/// none is free, the step in flight holds every other request's blocks: a
/// victim's blocks go to quarantine, not to the free queue, so preempting
/// one more does not help this step. One victim's blocks suffice once the
/// step in flight completes; the oldest waits one step for them. Before the
/// fix, each preemption freed nothing at once and the loop preempted every
/// running request, the oldest last.
#[test]
fn preemption_takes_one_victim_and_waits_for_the_step_in_flight() {
    // 8 blocks of 4. Admission keeps a block of headroom per running
    // request, so the three prompts (7, 8, 8 tokens: 2 blocks each) leave 2
    // free; the two 8-token prompts take them at their first decode, and
    // the 7-token one needs its third block one step later, with none free.
    let mut sim = Sim::new(8, 4);
    let a = sim.submit(7, 1, 10);
    let b = sim.submit(8, 2, 10);
    let c = sim.submit(8, 3, 10);
    assert!(sim.plan()); // step 1: the three prefills
    assert!(sim.plan()); // step 2: b and c take the last free blocks
    assert_eq!(sim.free_blocks(), 0);
    sim.run_oldest(); // step 1 completes; step 2 stays in flight
    assert!(sim.plan()); // step 3: a needs a block
    assert_eq!(
        sim.preemptions(),
        1,
        "one victim's blocks are enough once the step in flight completes"
    );
    sim.run_to_end();
    for id in [a, b, c] {
        assert_eq!(
            sim.finished_with(id),
            Some(FinishReason::Length),
            "request {id:?}"
        );
    }
    assert!(
        sim.preemptions() <= 2,
        "preempted {} times in all",
        sim.preemptions()
    );
    let pool = sim.cache.lock();
    pool.check_invariants().expect("invariants");
    assert!(pool.is_whole(), "{:?}", pool.stats());
}

impl Sim {
    /// A session turn of `prompt` tokens for session `sid` (created if new).
    pub(super) fn submit_turn(
        &mut self,
        sid: u64,
        prompt: usize,
        seed: u32,
        max_tokens: usize,
    ) -> RequestId {
        if !self.sched.sessions.contains_key(&sid) {
            self.sched.create_session(sid, None);
        }
        let id = self.submit(prompt, seed, max_tokens);
        // Re-queue it as the session's turn (the engine's submit does this in one go).
        let s = self.sched.seqs.remove(&id).expect("just added");
        self.sched.waiting.retain(|&w| w != id);
        let (tx, rx) = mpsc::unbounded_channel();
        self.events.insert(id, rx);
        let session = crate::SessionId {
            model: 0,
            model_name: "sim".into(),
            id: sid,
        };
        let req = request(s.tokens, max_tokens, Some(session));
        let unread = std::sync::Arc::default();
        self.unread.insert(id, std::sync::Arc::clone(&unread));
        self.sched.add(id, req, tx, unread, Vec::new());
        id
    }

    pub(super) fn pinned(&self, sid: u64) -> bool {
        self.sched
            .session_infos()
            .iter()
            .find(|s| s.id == sid)
            .expect("a live session")
            .pinned
    }
}

/// Under block pressure, idle sessions give up their pins, least recently
/// used first, but only those whose pins give blocks back: the oldest
/// session's blocks are shared with a running request (it hit the
/// session's cached prefix), so unpinning it frees nothing. Only as many
/// sessions as the admission needs are unpinned.
#[test]
fn pressure_unpins_only_the_sessions_that_free_what_is_needed() {
    let mut sim = Sim::new(10, 4);
    for sid in [1, 2, 3] {
        let t = sim.submit_turn(sid, 8, sid as u32, 1);
        sim.run_to_end();
        assert_eq!(sim.finished_with(t), Some(FinishReason::Length));
        assert!(sim.pinned(sid));
    }
    // A running request shares session 1's two blocks.
    let r = sim.submit(11, 1, 30);
    assert!(sim.plan());
    sim.run_oldest();
    assert!(sim.plan());
    assert_eq!(sim.events(r).len(), 2, "admitted and decoding");
    // 3 blocks free; a 12-token prompt needs 3 plus a block of headroom for
    // the running request: one session's pins must go.
    assert_eq!(sim.free_blocks(), 3);
    let n = sim.submit(12, 9, 2);
    sim.run_oldest();
    assert!(sim.plan());
    assert!(
        sim.events(n)
            .iter()
            .any(|e| matches!(e, Event::Admitted { .. })),
        "admitted"
    );
    assert!(
        sim.pinned(1),
        "unpinning session 1 frees nothing: its blocks are shared"
    );
    assert!(
        !sim.pinned(2),
        "session 2 is the least recently used that helps"
    );
    assert!(sim.pinned(3), "one session's blocks were enough");
    sim.run_to_end();
}

/// Three older requests cross into a new block in the same step with none
/// free; one newer request's blocks (quarantined until the step in flight
/// completes) cover all three. Exactly one request is preempted; the three
/// wait one step. Counting only the free queue, or forgetting that a
/// victim's quarantined blocks come back, preempts one victim per row.
#[test]
fn one_victim_covers_every_row_short_in_the_same_step() {
    // 14 blocks of 4. Prompts of 3 tokens (a, b, x) cross block boundaries
    // at positions 4 and 8 (plans 3 and 7); prompts of 8 (c, d) at 8 and 12
    // (plans 2 and 6). Admission leaves 7 blocks of headroom, which the
    // crossings of plans 2, 3 and 6 use up: at plan 7, a, b and x find
    // nothing free.
    let mut sim = Sim::new(14, 4);
    let ids: Vec<RequestId> = [(3, 1), (3, 2), (3, 3), (8, 4), (8, 5)]
        .iter()
        .map(|&(len, seed)| sim.submit(len, seed, 20))
        .collect();
    assert!(sim.plan()); // plan 1: every prefill
    for _ in 2..=6 {
        assert!(sim.plan());
        sim.run_oldest();
    }
    assert_eq!(sim.free_blocks(), 0);
    assert_eq!(sim.preemptions(), 0);
    assert!(sim.plan()); // plan 7
    assert_eq!(sim.preemptions(), 1, "one victim's blocks cover three rows");
    assert!(
        sim.sched.waiting.contains(&ids[4]),
        "the newest request gave way"
    );
    sim.run_to_end();
    for id in ids {
        assert_eq!(sim.finished_with(id), Some(FinishReason::Length));
    }
    let c = sim.sched.counters();
    assert_eq!(
        (c.needless_preemptions, c.priority_inversions),
        (0, 0),
        "{c:?}"
    );
    assert!(sim.cache.lock().is_whole());
}

/// An older request still prefilling a long prompt holds most of the pool
/// while a newer one decodes and runs out of blocks. The newer one waits
/// (or gives way later); the older one is never preempted.
#[test]
fn a_newer_request_never_preempts_an_older_one() {
    let mut sim = Sim::new(152, 4);
    let x = sim.submit(600, 1, 4); // 150 blocks, prefilled 64 tokens a step
    let y = sim.submit(4, 2, 40);
    loop {
        let planned = sim.in_flight_len() < 2 && sim.plan();
        if !planned {
            if sim.in_flight_len() == 0 {
                break;
            }
            sim.run_oldest();
        }
        let finished = sim.sched.seqs.get(&x).is_none_or(|s| s.finished);
        assert!(
            finished || sim.sched.running.contains(&x),
            "the older request was preempted"
        );
    }
    assert_eq!(sim.finished_with(x), Some(FinishReason::Length));
    assert_eq!(sim.finished_with(y), Some(FinishReason::Length));
    assert_eq!(sim.sched.counters().priority_inversions, 0);
}

/// A request that cannot be admitted yet retries every step; its retries
/// must not count as lookups (the hit statistics) or pin and unpin its
/// prefix (the LRU order).
#[test]
fn a_waiting_request_looks_up_its_prefix_once() {
    let mut sim = Sim::new(12, 4);
    let a = sim.submit(28, 1, 6); // 7 blocks; with its decode, most of the pool
    assert!(sim.plan());
    let b = sim.submit(20, 2, 2); // 5 blocks + headroom: waits for a
    for _ in 0..4 {
        sim.plan();
        sim.run_oldest();
    }
    assert!(sim.sched.waiting.contains(&b), "b waited");
    sim.run_to_end();
    assert_eq!(sim.finished_with(a), Some(FinishReason::Length));
    assert_eq!(sim.finished_with(b), Some(FinishReason::Length));
    let s = sim.cache.lock().stats();
    assert_eq!(
        s.query_tokens,
        28 + 20,
        "each prompt is looked up once: {s:?}"
    );
}

/// Two idle sessions share a system prompt; neither gives it back alone,
/// both together do. A request that needs those blocks is admitted once
/// both are unpinned, instead of waiting for their time-to-live.
#[test]
fn sessions_sharing_a_prompt_give_it_back_together() {
    let mut sim = Sim::new(16, 4);
    for sid in [1, 2] {
        let t = sim.submit_turn(sid, 28, 1, 1);
        sim.run_to_end();
        assert_eq!(sim.finished_with(t), Some(FinishReason::Length));
    }
    assert!(sim.pinned(1) && sim.pinned(2));
    assert_eq!(sim.free_blocks(), 8, "6 shared blocks and one of each");
    let w = sim.submit(48, 9, 2); // 12 blocks
    assert!(sim.plan());
    assert!(
        sim.events(w)
            .iter()
            .any(|e| matches!(e, Event::Admitted { .. })),
        "admitted at once"
    );
    assert!(!sim.pinned(1) && !sim.pinned(2));
    sim.run_to_end();
    assert_eq!(sim.finished_with(w), Some(FinishReason::Length));
}

/// An older request needs a block while a newer session turn's last
/// sample is in flight: the turn's blocks become its session's pins at
/// rest next step, and giving those up beats preempting the request in
/// between. Nobody is preempted.
#[test]
fn a_turn_about_to_finish_spares_a_preemption() {
    // 7 blocks of 4: a (3 tokens) crosses a block at plan 3; v and the
    // turn w (8 tokens each) take the last free blocks at plan 2, and w's
    // last sample is in step 2.
    let mut sim = Sim::new(7, 4);
    let a = sim.submit(3, 1, 10);
    let v = sim.submit(8, 2, 10);
    let w = sim.submit_turn(1, 8, 3, 2);
    assert!(sim.plan()); // 1: prefills
    assert!(sim.plan()); // 2: v and w take the last blocks
    assert_eq!(sim.free_blocks(), 0);
    sim.run_oldest();
    assert!(sim.plan()); // 3: a is short; w finishes in step 2
    assert_eq!(
        sim.preemptions(),
        0,
        "v was preempted for blocks w gives back"
    );
    sim.run_to_end();
    for id in [a, v, w] {
        assert_eq!(sim.finished_with(id), Some(FinishReason::Length));
    }
    let c = sim.sched.counters();
    assert_eq!(c.preemptions, 0);
    assert!(c.sessions_unpinned >= 1, "{c:?}");
    assert_eq!(c.broken_promises, 0);
}

/// An admission whose prefix an idle session pins: unpinning that session
/// frees nothing the admission can use (it pins the same blocks again), so
/// another session gives way, and the headroom for running requests stays.
#[test]
fn admission_does_not_unpin_the_session_whose_prefix_it_hits() {
    let mut sim = Sim::new(11, 4);
    let s = sim.submit_turn(1, 20, 1, 1); // 5 blocks, the prefix below
    sim.run_to_end();
    let t = sim.submit_turn(2, 12, 7, 1); // 3 blocks of its own
    sim.run_to_end();
    assert_eq!(
        (sim.finished_with(s), sim.finished_with(t)),
        (Some(FinishReason::Length), Some(FinishReason::Length))
    );
    let r = sim.submit(3, 5, 20);
    // The same 20 tokens as session 1's, then 8 more (7 blocks, 5 hit).
    let w = sim.submit(28, 1, 2);
    assert!(sim.plan());
    let admitted = |sim: &mut Sim, id| {
        sim.events(id)
            .iter()
            .any(|e| matches!(e, Event::Admitted { .. }))
    };
    assert!(admitted(&mut sim, r) && admitted(&mut sim, w));
    assert!(
        sim.pinned(1),
        "session 1's blocks are the prefix w pins again"
    );
    assert!(!sim.pinned(2), "session 2 gave way");
    assert!(
        sim.free_blocks() >= 1,
        "the running request's headroom was taken"
    );
    sim.run_to_end();
    assert_eq!(sim.finished_with(w), Some(FinishReason::Length));
    assert_eq!(sim.sched.counters().preemptions, 0);
}

/// The rule itself, at the call: with nothing free or coming back, a row
/// may take blocks only from requests newer than it. An older request not
/// in this step (still prefilling, or waiting on a promise) never gives
/// way, however much it holds.
#[test]
fn only_newer_requests_give_way() {
    let mut sim = Sim::new(5, 4);
    let x = sim.submit(8, 1, 10);
    let y = sim.submit(8, 2, 10);
    assert!(sim.plan());
    sim.run_oldest();
    let cache = sim.cache.clone();
    let mut g = cache.lock();
    // Take the last free block, so that nothing is free or coming back.
    let root = sim.sched.hasher.root(strata_kv::ExtraKeys {
        model_fingerprint: b"hog",
        cache_salt: None,
    });
    let hog = g.new_lease(strata_kv::OwnerTag(0), root);
    let free = g.free_blocks();
    g.allocate(&hog, free).unwrap();
    let epoch = g.next_epoch();
    let mut room = super::room::Room::new(epoch, (0, 0));
    let now = sim.sched.make_room(&mut g, &mut room, y, 1, &[]).unwrap();
    assert!(!now, "there was nothing to take");
    assert!(sim.sched.running.contains(&x), "the older request gave way");
    assert_eq!(sim.sched.counters().preemptions, 0);
    // The older one may take from the newer.
    let mut room = super::room::Room::new(epoch, (0, 0));
    sim.sched.make_room(&mut g, &mut room, x, 1, &[]).unwrap();
    assert!(sim.sched.waiting.contains(&y), "the newer request gave way");
    g.complete(epoch).unwrap();
    drop(g);
    drop(hog);
    sim.run_to_end();
}

/// A client that stops reading pauses its request after MAX_UNREAD unread
/// tokens (the engine never buffers its whole answer), while the others
/// run; it resumes when its client reads again.
#[test]
fn a_request_whose_client_stops_reading_pauses_and_resumes() {
    let mut sim = Sim::new(64, 4);
    let slow = sim.submit(5, 1, 200);
    sim.stall(slow, true);
    let other = sim.submit(5, 2, 150);
    sim.run_to_end();
    assert_eq!(sim.finished_with(other), Some(FinishReason::Length));
    let got = sim.events(slow);
    let tokens = got
        .iter()
        .filter(|e| matches!(e, Event::Token { .. }))
        .count();
    // A row may have been planned just before the count reached the limit.
    assert!(
        (MAX_UNREAD..=MAX_UNREAD + 2).contains(&tokens),
        "{tokens} tokens sent to a client that reads nothing"
    );
    assert!(!got.iter().any(|e| matches!(e, Event::Finished { .. })));
    // Nothing to plan (no empty steps in a loop), but the engine polls.
    assert!(!sim.sched.has_work());
    assert!(
        sim.sched.has_paused(),
        "a paused request keeps the engine polling"
    );
    sim.stall(slow, false);
    sim.run_to_end();
    let rest = sim.events(slow);
    let more = rest
        .iter()
        .filter(|e| matches!(e, Event::Token { .. }))
        .count();
    assert_eq!(tokens + more, 200);
    assert!(rest.iter().any(|e| matches!(
        e,
        Event::Finished {
            reason: FinishReason::Length,
            ..
        }
    )));
    let pool = sim.cache.lock();
    pool.check_invariants().expect("invariants");
    assert!(pool.is_whole(), "{:?}", pool.stats());
}

/// A request past its deadline ends with Timeout whether its client reads
/// or not (a paused one too), and gives its blocks back.
#[test]
fn a_request_past_its_deadline_times_out_even_if_paused() {
    let mut sim = Sim::new(64, 4);
    let paused = sim.submit(5, 1, 300);
    sim.stall(paused, true);
    let waiting = sim.submit(5, 2, 10);
    let now = std::time::Instant::now();
    sim.sched.seqs.get_mut(&waiting).expect("live").deadline = Some(now);
    sim.sched.reap_expired(now);
    assert_eq!(sim.finished_with(waiting), Some(FinishReason::Timeout));
    sim.run_to_end();
    assert_eq!(sim.finished_with(paused), None, "paused, not finished");
    let later = now + std::time::Duration::from_secs(1);
    sim.sched.seqs.get_mut(&paused).expect("live").deadline = Some(later);
    sim.sched.reap_expired(now);
    assert_eq!(sim.finished_with(paused), None, "not yet");
    sim.sched.reap_expired(later);
    assert_eq!(sim.finished_with(paused), Some(FinishReason::Timeout));
    sim.run_to_end();
    let pool = sim.cache.lock();
    pool.check_invariants().expect("invariants");
    assert!(pool.is_whole(), "{:?}", pool.stats());
}

/// A request paused for MAX_PAUSE (its client read nothing meanwhile) ends
/// with Timeout: it does not hold its slot and blocks until its deadline.
/// Reading in between starts the count again.
#[test]
fn a_request_paused_too_long_times_out() {
    let mut sim = Sim::new(64, 4);
    let slow = sim.submit(5, 1, 300);
    sim.stall(slow, true);
    sim.run_to_end();
    let t0 = std::time::Instant::now();
    sim.sched.reap_expired(t0);
    sim.sched.reap_expired(t0 + MAX_PAUSE / 2);
    assert_eq!(sim.finished_with(slow), None, "paused, not yet too long");
    sim.sched.reap_expired(t0 + MAX_PAUSE);
    assert_eq!(sim.finished_with(slow), Some(FinishReason::Timeout));
    sim.run_to_end();
    let pool = sim.cache.lock();
    pool.check_invariants().expect("invariants");
    assert!(pool.is_whole(), "{:?}", pool.stats());
}
