//! A straightforward contiguous reference for the KV store: each sequence
//! keeps its K and V in plain vectors (rounded through f16 like the arena,
//! or kept in f32), and attention is computed head by head with no paging
//! and no GQA sharing of reads.
//!
//! NOTE: the dot product and the softmax use the same order of float
//! operations as the paged kernel. The model quantizes activations to 8 bits
//! before every matmul, so any reordering of a sum flips some roundings and
//! moves logits by a few thousandths; with the same order, what differs is
//! only where K and V live, which is what this reference checks.

use half::f16;
use strata_model::{AttnShape, KvStore, Row};

pub(crate) struct ContiguousKv {
    shape: AttnShape,
    round_f16: bool,
    /// [seq][layer] -> (positions x kv_width) for K and V.
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
}

impl ContiguousKv {
    pub(crate) fn new(shape: AttnShape, layers: usize, seqs: usize, round_f16: bool) -> Self {
        Self {
            shape,
            round_f16,
            k: vec![vec![Vec::new(); layers]; seqs],
            v: vec![vec![Vec::new(); layers]; seqs],
        }
    }
}

fn put(store: &mut Vec<f32>, pos: usize, width: usize, x: &[f32], round: bool) {
    if store.len() < (pos + 1) * width {
        store.resize((pos + 1) * width, f32::NAN);
    }
    for (d, s) in store[pos * width..(pos + 1) * width].iter_mut().zip(x) {
        *d = if round {
            f16::from_f32(*s).to_f32()
        } else {
            *s
        };
    }
}

impl KvStore for ContiguousKv {
    fn store(&mut self, layer: usize, row: Row, k: &[f32], v: &[f32]) {
        let w = self.shape.kv_heads * self.shape.head_dim;
        put(&mut self.k[row.seq][layer], row.pos, w, k, self.round_f16);
        put(&mut self.v[row.seq][layer], row.pos, w, v, self.round_f16);
    }

    fn attend(&self, layer: usize, rows: &[Row], q: &[f32], out: &mut [f32]) {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: hd,
        } = self.shape;
        let kw = kv_heads * hd;
        for (r, row) in rows.iter().enumerate() {
            let (ks, vs) = (&self.k[row.seq][layer], &self.v[row.seq][layer]);
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let qh = &q[r * heads * hd + h * hd..r * heads * hd + (h + 1) * hd];
                let scores: Vec<f32> = (0..=row.pos)
                    .map(|t| {
                        let kt = &ks[t * kw + g * hd..t * kw + (g + 1) * hd];
                        dot(qh, kt) * (1.0 / (hd as f32).sqrt())
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                let inv = 1.0 / sum;
                for e in &mut exps {
                    *e *= inv;
                }
                let o = &mut out[r * heads * hd + h * hd..r * heads * hd + (h + 1) * hd];
                o.fill(0.0);
                for (t, e) in exps.iter().enumerate() {
                    let vt = &vs[t * kw + g * hd..t * kw + (g + 1) * hd];
                    for (x, y) in o.iter_mut().zip(vt) {
                        *x += e * y;
                    }
                }
            }
        }
    }
}

/// Eight lanes summed pairwise, as the paged kernel does.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a
        .chunks_exact(8)
        .remainder()
        .iter()
        .zip(b.chunks_exact(8).remainder())
    {
        s += x * y;
    }
    s
}
