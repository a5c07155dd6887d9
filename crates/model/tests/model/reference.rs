//! A straightforward contiguous reference for the KV store: each sequence
//! keeps its K and V in plain vectors (rounded through f16 like the arena,
//! or kept in f32), indexed by position, with no blocks, block tables or
//! gathering.
//!
//! NOTE: the attention math itself is the crate's own `attend_span` and
//! `merge_spans` over the same spans. The model quantizes activations to 8
//! bits before every matmul, so any reordering of a sum flips some roundings
//! and moves logits by a few thousandths; with the same math, what differs
//! is only where K and V live and how they are found, which is what this
//! reference checks.

use half::f16;
use strata_model::{AttnShape, KvStore, Row, SPAN, attend_span, merge_spans};

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
        let group = heads / kv_heads;
        let part = group * (hd + 2);
        for (r, row) in rows.iter().enumerate() {
            let (ks, vs) = (&self.k[row.seq][layer], &self.v[row.seq][layer]);
            let n = row.pos + 1;
            for g in 0..kv_heads {
                let at = r * heads * hd + g * group * hd;
                let qg = &q[at..at + group * hd];
                // The same spans as the paged store, read straight from the
                // contiguous rows (stride: all KV heads of a position).
                let mut parts = Vec::new();
                for lo in (0..n).step_by(SPAN) {
                    let hi = (lo + SPAN).min(n);
                    let mut p = vec![0f32; part];
                    let (k, v) = (
                        &ks[lo * kw + g * hd..(hi - 1) * kw + (g + 1) * hd],
                        &vs[lo * kw + g * hd..(hi - 1) * kw + (g + 1) * hd],
                    );
                    attend_span(qg, k, v, kw, group, hd, &mut p);
                    parts.extend_from_slice(&p);
                }
                merge_spans(&parts, group, hd, &mut out[at..at + group * hd]);
            }
        }
    }
}
