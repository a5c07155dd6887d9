//! A fake model for stress runs: its "KV" is the token id stored in each
//! slot, and its next token is a hash of every slot it reads through the
//! block table. A block reused while still needed, a stale table, or a read
//! of a poisoned block changes the hash, so the output is wrong, and the
//! test sees it. It can also inject faults: failed steps and random delays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strata_engine::{RequestId, Runner};
use strata_kv::{BlockId, TokenId};
use strata_model::{Logits, SeqInput};

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

/// Token ids of the tiny model's vocabulary that are text: its twelve
/// merges (" t", "he", " the", ...), then single letters. `FakeRunner::words`
/// maps the fake rule's outputs onto them, so its text has multi-character
/// tokens (for stop strings).
pub(crate) fn words() -> Vec<TokenId> {
    let merges = 259..271u32;
    let letters = (b'a'..=b'z').chain(b'A'..=b'Z').map(|b| 3 + b as u32);
    merges
        .chain(letters)
        .take(VOCAB)
        .map(TokenId::new)
        .collect()
}

/// The fake rule's next token, mapped onto [`words`].
pub(crate) fn next_word(history: &[TokenId]) -> TokenId {
    words()[next_token(history).get() as usize]
}

/// A failed forward call: the requests in it, each with its row's first
/// position.
pub(crate) type FailedCall = Vec<(RequestId, usize)>;

pub(crate) struct FakeRunner {
    bs: usize,
    /// Sampled tokens are mapped through this (see [`words`]).
    map: Option<Vec<TokenId>>,
    /// Logits per row.
    vocab: usize,
    slots: Vec<u32>,
    rng: ChaCha8Rng,
    /// Probability that a step fails.
    pub(crate) fail_rate: f64,
    /// Up to this many spin-loop rounds of delay per step.
    pub(crate) max_delay: u32,
    pub(crate) failures: Arc<AtomicU64>,
    /// Every failed forward call.
    pub(crate) failed_calls: Arc<std::sync::Mutex<Vec<FailedCall>>>,
    /// The requests of the next forward call.
    rows: Vec<RequestId>,
}

impl FakeRunner {
    pub(crate) fn new(blocks: usize, bs: usize, seed: u64) -> Self {
        Self {
            bs,
            map: None,
            vocab: VOCAB,
            slots: vec![POISON; blocks * bs],
            rng: ChaCha8Rng::seed_from_u64(seed),
            fail_rate: 0.0,
            max_delay: 0,
            failures: Arc::new(AtomicU64::new(0)),
            failed_calls: Arc::default(),
            rows: Vec::new(),
        }
    }

    /// Samples the tiny model's text tokens ([`next_word`]) over its
    /// whole vocabulary, for engines with its tokenizer.
    pub(crate) fn with_words(blocks: usize, bs: usize, seed: u64) -> Self {
        Self {
            map: Some(words()),
            vocab: strata_testkit::tiny_model::vocab().len(),
            ..Self::new(blocks, bs, seed)
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
            let call = self
                .rows
                .iter()
                .zip(batch)
                .map(|(&id, s)| (id, s.start))
                .collect();
            self.failed_calls.lock().unwrap().push(call);
            return Err("injected failure".into());
        }
        let mut out = Vec::new();
        for s in batch {
            for (i, t) in s.tokens.iter().enumerate() {
                let at = self.slot(s.block_table, s.start + i);
                self.slots[at] = t.get();
            }
            let end = s.start + s.tokens.len();
            let rows = match s.logits {
                Logits::None => continue,
                Logits::Last => end - 1..end,
                Logits::All => s.start..end,
            };
            let history: Vec<TokenId> = (0..end)
                .map(|p| TokenId::new(self.slots[self.slot(s.block_table, p)]))
                .collect();
            let mut l = vec![0f32; self.vocab * rows.len()];
            for (i, r) in rows.enumerate() {
                let next = next_token(&history[..=r]);
                let next = self.map.as_ref().map_or(next, |m| m[next.get() as usize]);
                l[i * self.vocab + next.get() as usize] = 1.0;
            }
            out.push(l);
        }
        Ok(out)
    }

    fn poison(&mut self, block: BlockId) {
        let b = block.index() * self.bs;
        self.slots[b..b + self.bs].fill(POISON);
    }

    fn rows(&mut self, requests: &[RequestId]) {
        self.rows = requests.to_vec();
    }

    // Its "KV" moves through the tiers as the token ids in the slots, so a
    // restore of the wrong bytes changes what the rule reads.
    fn block_bytes(&self) -> usize {
        self.bs * 4
    }

    fn read_block(&self, block: BlockId, out: &mut Vec<u8>) {
        let b = block.index() * self.bs;
        out.clear();
        for t in &self.slots[b..b + self.bs] {
            out.extend_from_slice(&t.to_le_bytes());
        }
    }

    fn write_block(&mut self, block: BlockId, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() != self.bs * 4 {
            return Err(format!(
                "{} bytes for a block of {}",
                bytes.len(),
                self.bs * 4
            ));
        }
        let b = block.index() * self.bs;
        for (s, c) in self.slots[b..b + self.bs]
            .iter_mut()
            .zip(bytes.chunks_exact(4))
        {
            *s = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

/// What a held step does once the test lets it go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Runs as usual.
    Run,
    /// Fails (the model returns an error).
    Fail,
    /// Runs, but returns one logits row fewer than asked for.
    FewerLogits,
    /// Panics (the executor thread dies).
    Panic,
}

/// Holds each step at the executor until the test lets it run: the test
/// chooses the interleaving of planning, completion and release, and which
/// step fails.
pub(crate) struct Gated<R> {
    pub(crate) inner: R,
    pub(crate) entered: std::sync::mpsc::Sender<usize>,
    pub(crate) go: std::sync::mpsc::Receiver<Gate>,
}

impl<R: Runner> Runner for Gated<R> {
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String> {
        let _ = self.entered.send(batch.len());
        match self.go.recv() {
            Err(_) => Err("the test ended".into()),
            Ok(Gate::Run) => self.inner.forward(batch),
            Ok(Gate::Fail) => Err("injected failure".into()),
            Ok(Gate::FewerLogits) => {
                let mut out = self.inner.forward(batch)?;
                out.pop();
                Ok(out)
            }
            Ok(Gate::Panic) => panic!("injected panic in the model"),
        }
    }

    fn poison(&mut self, block: BlockId) {
        self.inner.poison(block);
    }

    fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<(), String> {
        self.inner.copy_block(src, dst)
    }

    fn rows(&mut self, requests: &[RequestId]) {
        self.inner.rows(requests);
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
            check_every: 1,
        },
        queue_limit: 1 << 20,
        model_name: "fake".into(),
        session_ttl: std::time::Duration::from_secs(3600),
        tokenizer: None,
    }
}
