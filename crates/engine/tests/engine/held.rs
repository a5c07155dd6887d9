//! An engine over the fake model whose executor holds every step at a gate
//! until the test lets it go (and says whether it runs or fails): the test
//! decides what happens while a step is in flight.

use std::sync::mpsc;

use strata_engine::{Engine, Event, FinishReason, RequestHandle};
use strata_kv::TokenId;

use crate::fake::{self, FakeRunner, Gate, Gated};
use crate::fixture::assert_whole;

/// How long a test waits for the engine before calling it stuck.
const WATCHDOG: std::time::Duration = std::time::Duration::from_secs(30);

// Field order matters on a failed test: `go` drops first, so a held step
// fails instead of blocking the engine's shutdown.
pub(crate) struct Harness {
    go: mpsc::Sender<Gate>,
    entered: mpsc::Receiver<usize>,
    pub(crate) engine: Engine,
}

impl Harness {
    pub(crate) fn new(blocks: usize, bs: usize) -> Self {
        Self::with_config(blocks, bs, fake::config(blocks, bs, 64, 8))
    }

    pub(crate) fn with_config(
        blocks: usize,
        bs: usize,
        config: strata_engine::EngineConfig,
    ) -> Self {
        let (entered_tx, entered) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let engine = Engine::start(
            Gated {
                inner: FakeRunner::new(blocks, bs, 1),
                entered: entered_tx,
                go: go_rx,
            },
            config,
        )
        .unwrap();
        Self {
            go,
            entered,
            engine,
        }
    }

    /// Waits for the next step to reach the executor; it stays held.
    /// Returns its number of rows.
    pub(crate) fn held(&self) -> usize {
        // A watchdog, not a timing: a step that never comes means the
        // engine is stuck (or its scheduler thread died), and the test must
        // fail saying so rather than hang.
        match self.entered.recv_timeout(WATCHDOG) {
            Ok(rows) => rows,
            Err(e) => panic!(
                "no step reached the executor within {WATCHDOG:?} ({e}):\n{}",
                self.engine.debug_state()
            ),
        }
    }

    /// Lets the held step run, and waits until the scheduler has applied
    /// its result (so the test sees every event it caused).
    pub(crate) fn release(&self) {
        self.release_with(Gate::Run);
    }

    /// Lets the held step go as `gate` says, and waits until the scheduler
    /// has applied its result.
    pub(crate) fn release_with(&self, gate: Gate) {
        // Read before the step can run: results only grow.
        let target = self.engine.stats().counters.results + 1;
        self.go.send(gate).unwrap();
        // Polls a condition (not a timing): light, so the engine's threads
        // get the locks it reads.
        let start = std::time::Instant::now();
        while self.engine.stats().counters.results < target {
            assert!(
                start.elapsed() < WATCHDOG,
                "the step's result was never applied:\n{}",
                self.engine.debug_state()
            );
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Lets the held step go as `gate` says, without waiting for its result
    /// (a step that kills the executor has none).
    pub(crate) fn release_only(&self, gate: Gate) {
        self.go.send(gate).unwrap();
    }

    /// Waits (bounded by the watchdog) for `h`'s Finished event.
    pub(crate) fn finished(&self, h: &mut RequestHandle) -> FinishReason {
        let start = std::time::Instant::now();
        loop {
            while let Ok(e) = h.try_recv() {
                if let Event::Finished { reason, .. } = e {
                    return reason;
                }
            }
            assert!(start.elapsed() < WATCHDOG, "the request never finished");
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Runs steps until `h` has its Finished event; returns its tokens.
    pub(crate) fn run_until_done(&self, h: &mut RequestHandle) -> (Vec<TokenId>, FinishReason) {
        let mut got = Vec::new();
        loop {
            while let Ok(e) = h.try_recv() {
                match e {
                    Event::Token { id, .. } => got.push(id),
                    Event::Finished { reason, .. } => return (got, reason),
                    Event::Admitted { .. } | Event::PromptLogprobs(_) => {}
                }
            }
            self.held();
            self.release();
        }
    }

    /// Lets every remaining step run, then checks the pool is whole.
    pub(crate) fn finish(self) {
        let Harness {
            engine,
            entered,
            go,
            ..
        } = self;
        let drain = std::thread::spawn(move || {
            while entered.recv().is_ok() {
                if go.send(Gate::Run).is_err() {
                    break;
                }
            }
        });
        assert_whole(&engine);
        drop(engine);
        drain.join().unwrap();
    }
}
