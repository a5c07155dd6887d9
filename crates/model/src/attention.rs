//! Paged attention over the arena, and the interface the forward pass uses
//! to store and read K and V.
//!
//! ```text
//!   row r of sequence s at position p, KV head g (query heads g*G .. g*G+G):
//!     for each block j <= p / B of s's block table:
//!       K run of (block, layer, g): [slot][head_dim], converted once to f32,
//!       dotted with the G query heads that share it
//!     softmax over positions 0..=p, then the same walk over V
//! ```
//!
//! Each (row, KV head) is computed on its own, in a fixed order, so a row's
//! output is bit-identical whatever else shares the batch.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use strata_store::{Arena, BlockId};

/// One row of a batch: which sequence it belongs to and its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    /// Index of the row's sequence in the batch.
    pub seq: usize,
    /// Absolute position of the row's token.
    pub pos: usize,
}

/// Where the forward pass keeps K and V. The paged arena in production; a
/// contiguous reference in tests.
pub trait KvStore {
    /// Stores the K and V (each `kv_heads * head_dim` values) of `row` for
    /// `layer`.
    fn store(&mut self, layer: usize, row: Row, k: &[f32], v: &[f32]);

    /// Attention of every row over its sequence's positions `0..=pos`: `q` is
    /// `rows x heads*head_dim`; `out` receives the same shape.
    fn attend(&self, layer: usize, rows: &[Row], q: &[f32], out: &mut [f32]);
}

/// Shape facts attention needs.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

/// The arena seen through the block tables of one batch.
pub struct PagedKv<'a> {
    arena: &'a mut Arena,
    tables: Vec<&'a [BlockId]>,
    shape: AttnShape,
    pool: Option<&'a rayon::ThreadPool>,
}

impl<'a> PagedKv<'a> {
    /// A view of `arena` where sequence `i` of the batch owns `tables[i]`.
    pub fn new(
        arena: &'a mut Arena,
        tables: Vec<&'a [BlockId]>,
        shape: AttnShape,
        pool: Option<&'a rayon::ThreadPool>,
    ) -> Self {
        Self {
            arena,
            tables,
            shape,
            pool,
        }
    }
}

impl KvStore for PagedKv<'_> {
    fn store(&mut self, layer: usize, row: Row, k: &[f32], v: &[f32]) {
        let bs = self.arena.layout().block_size;
        let block = self.tables[row.seq][row.pos / bs];
        self.arena.write(block, layer, row.pos % bs, k, v);
    }

    fn attend(&self, layer: usize, rows: &[Row], q: &[f32], out: &mut [f32]) {
        let AttnShape {
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        let group = heads / kv_heads;
        let width = heads * head_dim;
        // One task per (row, KV head): it writes the G heads of that group.
        let chunk = group * head_dim;
        let run = |(i, o): (usize, &mut [f32])| {
            let (r, g) = (i / kv_heads, i % kv_heads);
            let row = rows[r];
            let qg = &q[r * width + g * chunk..r * width + (g + 1) * chunk];
            attend_group(
                self.arena,
                self.tables[row.seq],
                layer,
                g,
                row.pos,
                qg,
                group,
                head_dim,
                o,
            );
        };
        match self.pool {
            Some(pool) => pool.install(|| out.par_chunks_mut(chunk).enumerate().for_each(run)),
            None => out.chunks_mut(chunk).enumerate().for_each(run),
        }
    }
}

/// Attention of `group` query heads (`q`, head after head) over positions
/// `0..=pos` of one KV head, written to `out`.
#[allow(clippy::too_many_arguments)]
fn attend_group(
    arena: &Arena,
    table: &[BlockId],
    layer: usize,
    kv_head: usize,
    pos: usize,
    q: &[f32],
    group: usize,
    hd: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features this copy is compiled for.
        return unsafe { attend_group_avx2(arena, table, layer, kv_head, pos, q, group, hd, out) };
    }
    attend_group_body(arena, table, layer, kv_head, pos, q, group, hd, out)
}

/// The same code compiled for AVX2+FMA, so its loops vectorize 8-wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group_avx2(
    arena: &Arena,
    table: &[BlockId],
    layer: usize,
    kv_head: usize,
    pos: usize,
    q: &[f32],
    group: usize,
    hd: usize,
    out: &mut [f32],
) {
    attend_group_body(arena, table, layer, kv_head, pos, q, group, hd, out)
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent lanes, summed in a fixed order: vectorizes, and the
    // result does not depend on anything but the two inputs.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_group_body(
    arena: &Arena,
    table: &[BlockId],
    layer: usize,
    kv_head: usize,
    pos: usize,
    q: &[f32],
    group: usize,
    hd: usize,
    out: &mut [f32],
) {
    let bs = arena.layout().block_size;
    let n = pos + 1;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; group * n];
    let mut buf = vec![0f32; bs * hd];
    for (j, &block) in table[..n.div_ceil(bs)].iter().enumerate() {
        let slots = (n - j * bs).min(bs);
        to_f32(
            &arena.k(block, layer, kv_head)[..slots * hd],
            &mut buf[..slots * hd],
        );
        for s in 0..slots {
            let k = &buf[s * hd..(s + 1) * hd];
            for h in 0..group {
                scores[h * n + j * bs + s] = dot(&q[h * hd..(h + 1) * hd], k) * scale;
            }
        }
    }
    for h in 0..group {
        let sc = &mut scores[h * n..(h + 1) * n];
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in sc.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in sc.iter_mut() {
            *x *= inv;
        }
    }
    out.fill(0.0);
    for (j, &block) in table[..n.div_ceil(bs)].iter().enumerate() {
        let slots = (n - j * bs).min(bs);
        to_f32(
            &arena.v(block, layer, kv_head)[..slots * hd],
            &mut buf[..slots * hd],
        );
        for s in 0..slots {
            let v = &buf[s * hd..(s + 1) * hd];
            for h in 0..group {
                let w = scores[h * n + j * bs + s];
                for (o, x) in out[h * hd..(h + 1) * hd].iter_mut().zip(v) {
                    *o += w * x;
                }
            }
        }
    }
}

#[inline(always)]
fn to_f32(src: &[f16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}
