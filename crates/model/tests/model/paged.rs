//! Paged attention against the contiguous reference, batch invariance, and
//! prefix sharing, on the tiny random-weight model (and the real one).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strata_model::{AttnShape, Gguf, LlamaModel, LoadOptions, Logits, SeqInput};
use strata_store::{Arena, BlockId, TokenId};
use strata_testkit::tiny_model::{self, TinyConfig};

use crate::reference::ContiguousKv;

pub(crate) fn tiny(seed: u64) -> LlamaModel {
    let path = tiny_model::path(TinyConfig {
        seed,
        ..TinyConfig::default()
    });
    LlamaModel::load(
        &mut Gguf::open(&path).unwrap(),
        LoadOptions {
            threads: 2,
            requantize: false,
        },
    )
    .unwrap()
}

pub(crate) fn shape(m: &LlamaModel) -> AttnShape {
    let c = m.config();
    AttnShape {
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
    }
}

fn close(a: &[f32], b: &[f32], what: &str) {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        a.len() == b.len() && diff <= 1e-3 * scale,
        "{what}: max |diff| {diff} vs 1e-3 of {scale}"
    );
}

/// Random batch compositions (several sequences, each fed in random chunks,
/// so prefill and decode rows mix) over scattered block tables: the paged
/// forward's logits equal the contiguous reference's (K/V rounded through
/// f16 there too) within 1e-3 of the largest logit.
pub(crate) fn paged_equals_contiguous(model: &LlamaModel, scenarios: u64, max_len: usize) {
    let vocab = model.config().vocab as u32;
    for seed in 0..scenarios {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bs = [1usize, 4, 16][rng.random_range(0..3)];
        let nseq = rng.random_range(1..=4);
        let prompts: Vec<Vec<TokenId>> = (0..nseq)
            .map(|_| {
                (0..rng.random_range(1..=max_len))
                    .map(|_| TokenId::new(rng.random_range(0..vocab)))
                    .collect()
            })
            .collect();
        let need: Vec<usize> = prompts.iter().map(|p| p.len().div_ceil(bs)).collect();
        let mut ids: Vec<u32> = (0..need.iter().sum::<usize>() as u32 + 3).collect();
        ids.shuffle(&mut rng);
        let mut tables = Vec::new();
        let mut it = ids.iter();
        for &n in &need {
            tables.push(
                it.by_ref()
                    .take(n)
                    .map(|&i| BlockId::new(i))
                    .collect::<Vec<_>>(),
            );
        }
        let mut arena = Arena::new(model.arena_layout(ids.len(), bs)).unwrap();
        let mut reference = ContiguousKv::new(shape(model), model.config().layers, nseq, true);
        let mut done = vec![0usize; nseq];
        while done.iter().zip(&prompts).any(|(d, p)| d < &p.len()) {
            let mut batch = Vec::new();
            for s in 0..nseq {
                if done[s] < prompts[s].len() {
                    let n = rng.random_range(1..=(prompts[s].len() - done[s]).min(8));
                    batch.push((s, done[s], n));
                }
            }
            let inputs: Vec<SeqInput> = batch
                .iter()
                .map(|&(s, start, n)| SeqInput {
                    tokens: &prompts[s][start..start + n],
                    start,
                    block_table: &tables[s],
                    logits: Logits::Last,
                })
                .collect();
            let paged = model.forward(&mut arena, &inputs).unwrap();
            // The reference numbers sequences by their index in the scenario.
            let mut ref_out = Vec::new();
            for &(s, start, n) in &batch {
                let one = [SeqInput {
                    tokens: &prompts[s][start..start + n],
                    start,
                    block_table: &[],
                    logits: Logits::Last,
                }];
                let mut view = SeqView {
                    inner: &mut reference,
                    seq: s,
                };
                ref_out.push(model.forward_with(&one, &mut view).unwrap().remove(0));
            }
            for ((p, r), &(s, start, n)) in paged.iter().zip(&ref_out).zip(&batch) {
                close(
                    p,
                    r,
                    &format!(
                        "scenario {seed}, sequence {s}, tokens {start}..{}",
                        start + n
                    ),
                );
            }
            for &(s, _, n) in &batch {
                done[s] += n;
            }
        }
    }
}

/// Runs a one-sequence batch against sequence `seq` of a multi-sequence
/// reference store.
struct SeqView<'a> {
    inner: &'a mut ContiguousKv,
    seq: usize,
}

impl strata_model::KvStore for SeqView<'_> {
    fn store(&mut self, layer: usize, row: strata_model::Row, k: &[f32], v: &[f32]) {
        self.inner.store(
            layer,
            strata_model::Row {
                seq: self.seq,
                ..row
            },
            k,
            v,
        );
    }
    fn attend(&self, layer: usize, rows: &[strata_model::Row], q: &[f32], out: &mut [f32]) {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| strata_model::Row {
                seq: self.seq,
                ..*r
            })
            .collect();
        self.inner.attend(layer, &rows, q, out);
    }
}

#[test]
fn tiny_paged_equals_contiguous() {
    paged_equals_contiguous(&tiny(1), 40, 40);
}

/// A row's logits are bit-identical whatever else shares its batch.
pub(crate) fn batch_invariance(model: &LlamaModel, len: usize) {
    let vocab = model.config().vocab as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let bs = 16;
    let prompt: Vec<TokenId> = (0..len)
        .map(|_| TokenId::new(rng.random_range(0..vocab)))
        .collect();
    let blocks = len.div_ceil(bs) + 1;
    let others: Vec<Vec<TokenId>> = (0..3)
        .map(|i| {
            (0..5 + 7 * i)
                .map(|_| TokenId::new(rng.random_range(0..vocab)))
                .collect()
        })
        .collect();
    let run = |with_others: bool| {
        let mut arena = Arena::new(model.arena_layout(blocks * 5, bs)).unwrap();
        let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
        let other_tables: Vec<Vec<BlockId>> = (1..4)
            .map(|k| {
                (0..blocks as u32)
                    .map(|i| BlockId::new(k * blocks as u32 + i))
                    .collect()
            })
            .collect();
        let mut outs = Vec::new();
        // Prefill in one step, then two decode steps.
        let steps = [(0, len - 2), (len - 2, 1), (len - 1, 1)];
        for (start, n) in steps {
            let mut batch = vec![SeqInput {
                tokens: &prompt[start..start + n],
                start,
                block_table: &table,
                logits: Logits::Last,
            }];
            if with_others {
                for (o, t) in others.iter().zip(&other_tables) {
                    let m = o.len().min(n + 2);
                    batch.push(SeqInput {
                        tokens: &o[..m],
                        start: 0,
                        block_table: t,
                        logits: Logits::Last,
                    });
                }
                batch.rotate_left(1); // our row is not first
            }
            let out = model.forward(&mut arena, &batch).unwrap();
            outs.push(if with_others {
                out[out.len() - 1].clone()
            } else {
                out[0].clone()
            });
        }
        outs
    };
    let alone = run(false);
    let busy = run(true);
    for (i, (a, b)) in alone.iter().zip(&busy).enumerate() {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "step {i}: logits differ inside a busy batch"
        );
    }
}

#[test]
fn tiny_batch_invariance() {
    batch_invariance(&tiny(1), 37);
}

/// Two sequences sharing prefix blocks (the second computes only its
/// suffix, reading the first one's blocks) get the same logits as each
/// computed alone.
pub(crate) fn sharing_is_invisible(model: &LlamaModel, prefix_blocks: usize) {
    let vocab = model.config().vocab as u32;
    let bs = 16;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut random = |n: usize| -> Vec<TokenId> {
        (0..n)
            .map(|_| TokenId::new(rng.random_range(0..vocab)))
            .collect()
    };
    let prefix = random(prefix_blocks * bs);
    let a: Vec<TokenId> = prefix.iter().copied().chain(random(9)).collect();
    let b: Vec<TokenId> = prefix.iter().copied().chain(random(5)).collect();
    let n = prefix_blocks + 1;
    let alone = |p: &[TokenId]| {
        let mut arena = Arena::new(model.arena_layout(n, bs)).unwrap();
        let table: Vec<BlockId> = (0..n as u32).map(BlockId::new).collect();
        model
            .forward(
                &mut arena,
                &[SeqInput {
                    tokens: p,
                    start: 0,
                    block_table: &table,
                    logits: Logits::Last,
                }],
            )
            .unwrap()
            .remove(0)
    };
    let mut arena = Arena::new(model.arena_layout(2 * n, bs)).unwrap();
    let ta: Vec<BlockId> = (0..n as u32).map(BlockId::new).collect();
    let mut tb: Vec<BlockId> = ta[..prefix_blocks].to_vec();
    tb.push(BlockId::new(n as u32));
    let la = model
        .forward(
            &mut arena,
            &[SeqInput {
                tokens: &a,
                start: 0,
                block_table: &ta,
                logits: Logits::Last,
            }],
        )
        .unwrap()
        .remove(0);
    let lb = model
        .forward(
            &mut arena,
            &[SeqInput {
                tokens: &b[prefix.len()..],
                start: prefix.len(),
                block_table: &tb,
                logits: Logits::Last,
            }],
        )
        .unwrap()
        .remove(0);
    let (sa, sb) = (alone(&a), alone(&b));
    assert!(
        la.iter().zip(&sa).all(|(x, y)| x.to_bits() == y.to_bits()),
        "the sequence that filled the prefix changed"
    );
    close(&lb, &sb, "the sequence reading a shared prefix");
}

#[test]
fn tiny_sharing_is_invisible() {
    sharing_is_invisible(&tiny(1), 2);
}

/// [`Logits::All`] returns every row's logits: the last row's are exactly
/// what [`Logits::Last`] returns in the same step, and each row's are the
/// logits of that prefix computed a token at a time.
pub(crate) fn all_rows_are_each_prefix(model: &LlamaModel, len: usize) {
    let c = model.config();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let prompt: Vec<TokenId> = (0..len)
        .map(|_| TokenId::new(rng.random_range(0..c.vocab as u32)))
        .collect();
    let bs = 4;
    let blocks = len.div_ceil(bs);
    let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
    let step = |logits| {
        let mut arena = Arena::new(model.arena_layout(blocks, bs)).unwrap();
        let input = SeqInput {
            tokens: &prompt,
            start: 0,
            block_table: &table,
            logits,
        };
        model.forward(&mut arena, &[input]).unwrap().remove(0)
    };
    let all = step(Logits::All);
    assert_eq!(all.len(), len * c.vocab, "a row of logits per token");
    let last = step(Logits::Last);
    assert!(
        all[(len - 1) * c.vocab..]
            .iter()
            .zip(&last)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "the last row differs from Logits::Last"
    );
    let mut arena = Arena::new(model.arena_layout(blocks, bs)).unwrap();
    for i in 0..len {
        let input = SeqInput {
            tokens: &prompt[i..=i],
            start: i,
            block_table: &table,
            logits: Logits::Last,
        };
        let one = model.forward(&mut arena, &[input]).unwrap().remove(0);
        close(
            &all[i * c.vocab..(i + 1) * c.vocab],
            &one,
            &format!("row {i} against the prefix decoded a token at a time"),
        );
    }
    let none = SeqInput {
        tokens: &prompt,
        start: 0,
        block_table: &table,
        logits: Logits::None,
    };
    assert!(model.forward(&mut arena, &[none]).unwrap().is_empty());
}

#[test]
fn tiny_all_rows_are_each_prefix() {
    all_rows_are_each_prefix(&tiny(1), 23);
}
