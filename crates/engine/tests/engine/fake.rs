//! A fake model for stress runs: its "KV" is the token id stored in each
//! slot, and its next token is a hash of every slot it reads through the
//! block table. A block reused while still needed, a stale table, or a read
//! of a poisoned block changes the hash, so the output is wrong, and the
//! test sees it. It can also inject faults: failed steps and random delays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strata_engine::Runner;
use strata_kv::{BlockId, TokenId};
use strata_model::SeqInput;

const POISON: u32 = u32::MAX;

pub(crate) const VOCAB: usize = 64;

/// The token that follows `history`.
pub(crate) fn next_token(history: &[TokenId]) -> TokenId {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for t in history {
        h = (h ^ t.get() as u64).wrapping_mul(0x0100_0000_01b3);
    }
    TokenId::new(((h >> 29) % VOCAB as u64) as u32)
}

pub(crate) struct FakeRunner {
    bs: usize,
    slots: Vec<u32>,
    rng: ChaCha8Rng,
    /// Probability that a step fails.
    pub(crate) fail_rate: f64,
    /// Up to this many spin-loop rounds of delay per step.
    pub(crate) max_delay: u32,
    pub(crate) failures: Arc<AtomicU64>,
}

impl FakeRunner {
    pub(crate) fn new(blocks: usize, bs: usize, seed: u64) -> Self {
        Self {
            bs,
            slots: vec![POISON; blocks * bs],
            rng: ChaCha8Rng::seed_from_u64(seed),
            fail_rate: 0.0,
            max_delay: 0,
            failures: Arc::new(AtomicU64::new(0)),
        }
    }

    fn slot(&self, table: &[BlockId], pos: usize) -> usize {
        table[pos / self.bs].index() * self.bs + pos % self.bs
    }
}

impl Runner for FakeRunner {
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String> {
        if self.max_delay > 0 {
            // Mostly short; now and then long enough for the scheduler to
            // plan the next step meanwhile.
            let long = if self.rng.random_bool(0.05) { 100 } else { 1 };
            let n = self.rng.random_range(0..self.max_delay) * long;
            for i in 0..n {
                std::hint::black_box(i);
            }
        }
        if self.fail_rate > 0.0 && self.rng.random_bool(self.fail_rate) {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return Err("injected failure".into());
        }
        let mut out = Vec::new();
        for s in batch {
            for (i, t) in s.tokens.iter().enumerate() {
                let at = self.slot(s.block_table, s.start + i);
                self.slots[at] = t.get();
            }
            if s.logits {
                let end = s.start + s.tokens.len();
                let history: Vec<TokenId> = (0..end)
                    .map(|p| TokenId::new(self.slots[self.slot(s.block_table, p)]))
                    .collect();
                let mut l = vec![0f32; VOCAB];
                l[next_token(&history).get() as usize] = 1.0;
                out.push(l);
            }
        }
        Ok(out)
    }

    fn poison(&mut self, block: BlockId) {
        let b = block.index() * self.bs;
        self.slots[b..b + self.bs].fill(POISON);
    }
}

/// Holds each step at the executor until the test lets it run: the test
/// chooses the interleaving of planning, completion and release.
pub(crate) struct Gated<R> {
    pub(crate) inner: R,
    pub(crate) entered: std::sync::mpsc::Sender<usize>,
    pub(crate) go: std::sync::mpsc::Receiver<()>,
}

impl<R: Runner> Runner for Gated<R> {
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String> {
        let _ = self.entered.send(batch.len());
        if self.go.recv().is_err() {
            return Err("the test ended".into());
        }
        self.inner.forward(batch)
    }

    fn poison(&mut self, block: BlockId) {
        self.inner.poison(block);
    }
}

/// An engine configuration for the fake model, sanitizer on.
pub(crate) fn config(
    blocks: usize,
    bs: usize,
    step_tokens: usize,
    max_running: usize,
) -> strata_engine::EngineConfig {
    strata_engine::EngineConfig {
        num_blocks: blocks,
        block_size: bs,
        context: 4096,
        vocab: VOCAB,
        eos: vec![TokenId::new(2)],
        model_fingerprint: b"fake".to_vec(),
        hash_key: strata_testkit::test_key(),
        scheduler: strata_engine::SchedulerConfig {
            max_step_tokens: step_tokens,
            max_running,
            sanitize: true,
        },
        queue_limit: 1 << 20,
        model_name: "fake".into(),
        session_ttl: std::time::Duration::from_secs(3600),
        tokenizer: None,
    }
}
