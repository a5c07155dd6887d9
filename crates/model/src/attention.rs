//! Paged attention over the arena, and the interface the forward pass uses
//! to store and read K and V.
//!
//! ```text
//!   row r of sequence s at position p, KV head g (query heads g*G .. g*G+G):
//!     positions 0..=p cut into spans of SPAN (fixed: they depend on p only)
//!     one task per (row, g, span):
//!       for each block of the span (via s's block table):
//!         K run of (block, layer, g): [slot][head_dim], f16 -> f32 once,
//!         dotted with the G query heads that share it
//!       span max, exp, sum, and the weighted sum of the span's V rows
//!     merge the spans in order: out = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i
//! ```
//!
//! Spans let one long row (decode at depth) use every core; because they
//! are cut by position, never by batch, each row's output is bit-identical
//! whatever else shares the batch.

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

/// Positions per attention task. Fixed, so a row's order of float operations
/// depends only on its own position, never on the batch.
pub const SPAN: usize = 256;

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
            head_dim: hd,
        } = self.shape;
        let group = heads / kv_heads;
        let width = heads * hd;
        let chunk = group * hd;
        // Results in (row, KV head, span) order; `first[i]` is the first of
        // output chunk i = row * kv_heads + kv_head.
        let mut first = Vec::with_capacity(rows.len() * kv_heads + 1);
        let mut items = 0;
        for row in rows {
            for _ in 0..kv_heads {
                first.push(items);
                items += (row.pos + 1).div_ceil(SPAN);
            }
        }
        first.push(items);
        // Per (row, head, span): G maxima, G sums, then G unnormalized outputs.
        let part = group * (hd + 2);
        let mut parts = vec![0f32; items * part];
        // Jobs: consecutive rows of one sequence (a prefill chunk) share
        // each span's K and V, widened once; every row still runs
        // `attend_span` on exactly its own positions, so its bits do not
        // depend on the job.
        let mut jobs = Vec::new();
        let mut r = 0;
        while r < rows.len() {
            let mut end = r + 1;
            while end < rows.len()
                && end - r < ROWS_PER_JOB
                && rows[end].seq == rows[r].seq
                && rows[end].pos == rows[end - 1].pos + 1
            {
                end += 1;
            }
            let n = rows[end - 1].pos + 1;
            for g in 0..kv_heads {
                for lo in (0..n).step_by(SPAN) {
                    jobs.push((r..end, g, lo));
                }
            }
            r = end;
        }
        let run = |(rs, g, lo): &(std::ops::Range<usize>, usize, usize)| {
            let (g, lo) = (*g, *lo);
            let last = rows[rs.end - 1].pos + 1;
            let hi = (lo + SPAN).min(last);
            if rs.len() <= DIRECT_ROWS {
                // Few rows: read K and V in place (no widened copy).
                let bs = self.arena.layout().block_size;
                let table = self.tables[rows[rs.start].seq];
                let (mut ks, mut vs) = (Vec::with_capacity(hi - lo), Vec::with_capacity(hi - lo));
                for p in lo..hi {
                    let (b, off) = (table[p / bs], (p % bs) * hd);
                    ks.push(&self.arena.k(b, layer, g)[off..off + hd]);
                    vs.push(&self.arena.v(b, layer, g)[off..off + hd]);
                }
                let mut out = Vec::new();
                for r in rs.clone() {
                    let n = rows[r].pos + 1;
                    if n <= lo {
                        continue;
                    }
                    let len = (lo + SPAN).min(n) - lo;
                    let qg = &q[r * width + g * chunk..r * width + (g + 1) * chunk];
                    let mut p = vec![0f32; part];
                    attend_span_f16(qg, &ks[..len], &vs[..len], group, hd, &mut p);
                    out.push((first[r * kv_heads + g] + lo / SPAN, p));
                }
                return out;
            }
            SCRATCH.with_borrow_mut(|(k, v)| {
                gather_span(
                    self.arena,
                    self.tables[rows[rs.start].seq],
                    layer,
                    g,
                    lo..hi,
                    hd,
                    k,
                    v,
                );
                let mut out = Vec::new();
                for r in rs.clone() {
                    let n = rows[r].pos + 1;
                    if n <= lo {
                        continue;
                    }
                    let len = ((lo + SPAN).min(n) - lo) * hd;
                    let qg = &q[r * width + g * chunk..r * width + (g + 1) * chunk];
                    let mut p = vec![0f32; part];
                    attend_span(qg, &k[..len], &v[..len], hd, group, hd, &mut p);
                    out.push((first[r * kv_heads + g] + lo / SPAN, p));
                }
                out
            })
        };
        let merge = |parts: &[f32], (i, o): (usize, &mut [f32])| {
            merge_spans(&parts[first[i] * part..first[i + 1] * part], group, hd, o);
        };
        let done: Vec<Vec<(usize, Vec<f32>)>> = match self.pool {
            Some(pool) => pool.install(|| jobs.par_iter().with_max_len(1).map(run).collect()),
            None => jobs.iter().map(run).collect(),
        };
        for (i, p) in done.into_iter().flatten() {
            parts[i * part..(i + 1) * part].copy_from_slice(&p);
        }
        match self.pool {
            Some(pool) => pool.install(|| {
                let parts = &parts;
                out.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|x| merge(parts, x));
            }),
            None => out
                .chunks_mut(chunk)
                .enumerate()
                .for_each(|x| merge(&parts, x)),
        }
    }
}

/// Rows of one sequence that share a job's widened K and V.
const ROWS_PER_JOB: usize = 32;

/// Jobs of at most this many rows read K and V in place instead of
/// widening the span first (decode rows, short prefill tails).
const DIRECT_ROWS: usize = 4;

/// Combines a row's span results (from [`attend_span`], in span order) into
/// its G heads' outputs.
pub fn merge_spans(parts: &[f32], group: usize, hd: usize, out: &mut [f32]) {
    let part = group * (hd + 2);
    for h in 0..group {
        let max = parts
            .chunks_exact(part)
            .map(|p| p[h])
            .fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * hd..(h + 1) * hd];
        o.fill(0.0);
        let mut sum = 0f32;
        for p in parts.chunks_exact(part) {
            let w = (p[h] - max).exp();
            sum += w * p[group + h];
            let po = &p[2 * group + h * hd..2 * group + (h + 1) * hd];
            for (x, y) in o.iter_mut().zip(po) {
                *x += w * y;
            }
        }
        let inv = 1.0 / sum;
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
}

thread_local! {
    /// Each compute thread's K and V buffers for [`gather_span`]: a span is
    /// up to 64 KiB of each, and allocating and zeroing them per job cost
    /// more than the attention itself at depth (a decode row at position
    /// 1,536 runs 540 jobs).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The paged side of a job: the K and V rows of positions `span` of one KV
/// head, gathered from the blocks and widened to f32 into the first
/// `span.len() * hd` values of `k` and `v` (grown if short, never cleared:
/// every value read is written first).
#[allow(clippy::too_many_arguments)]
fn gather_span(
    arena: &Arena,
    table: &[BlockId],
    layer: usize,
    kv_head: usize,
    span: std::ops::Range<usize>,
    hd: usize,
    k: &mut Vec<f32>,
    v: &mut Vec<f32>,
) {
    let bs = arena.layout().block_size;
    let n = span.len();
    if k.len() < n * hd {
        k.resize(n * hd, 0.0);
        v.resize(n * hd, 0.0);
    }
    let first = span.start / bs;
    for (j, &block) in (first..).zip(&table[first..span.end.div_ceil(bs)]) {
        let s0 = span.start.max(j * bs) - j * bs;
        let s1 = span.end.min((j + 1) * bs) - j * bs;
        let at = (j * bs + s0 - span.start) * hd;
        let len = (s1 - s0) * hd;
        widen(
            &arena.k(block, layer, kv_head)[s0 * hd..s1 * hd],
            &mut k[at..at + len],
        );
        widen(
            &arena.v(block, layer, kv_head)[s0 * hd..s1 * hd],
            &mut v[at..at + len],
        );
    }
}

/// f16 to f32.
fn widen(src: &[half::f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has the features.
        unsafe { avx2::widen(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Attention of `group` query heads (`q`, head after head, `hd` each) over
/// one span of positions of their KV head: row `s` of K is
/// `k[s * stride..s * stride + hd]`, likewise for V. Writes the G maxima of
/// the scaled scores, the G sums of their exponentials and the G
/// unnormalized outputs to `part` (`group * (hd + 2)` values), for
/// [`merge_spans`].
///
/// Public so that a test's reference store runs the same float operations
/// in the same order, and differs only in where K and V live.
pub fn attend_span(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    group: usize,
    hd: usize,
    part: &mut [f32],
) {
    let n = if k.is_empty() {
        0
    } else {
        (k.len() - hd) / stride + 1
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; group * n];
    let (stats, o) = part.split_at_mut(2 * group);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && hd.is_multiple_of(8)
    {
        // SAFETY: the CPU has the features, and hd is a multiple of 8.
        unsafe {
            let rows = avx2::F32Rows { data: k, stride, n };
            avx2::scores(&rows, q, group, hd, scale, &mut scores);
            for h in 0..group {
                let sc = &mut scores[h * n..(h + 1) * n];
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                stats[h] = max;
                stats[group + h] = avx2::exp_sum(sc, max);
            }
            let rows = avx2::F32Rows { data: v, stride, n };
            avx2::weighted_sum(&rows, &scores, group, hd, o);
        }
        return;
    }
    for s in 0..n {
        let kr = &k[s * stride..s * stride + hd];
        for h in 0..group {
            let d: f32 = q[h * hd..(h + 1) * hd]
                .iter()
                .zip(kr)
                .map(|(a, b)| a * b)
                .sum();
            scores[h * n + s] = d * scale;
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
        stats[h] = max;
        stats[group + h] = sum;
    }
    o.fill(0.0);
    for s in 0..n {
        let vr = &v[s * stride..s * stride + hd];
        for h in 0..group {
            let w = scores[h * n + s];
            for (x, y) in o[h * hd..(h + 1) * hd].iter_mut().zip(vr) {
                *x += w * y;
            }
        }
    }
}

/// [`attend_span`] over K and V rows read in place as f16, one slice of
/// `hd` values per position (so rows may sit in different blocks): the same
/// float operations in the same order on the same values (f16 widens to
/// f32 exactly), hence the same bits, without copying the span first. For
/// jobs of one or a few rows, where widening a whole span would cost more
/// than the dot products.
pub fn attend_span_f16(
    q: &[f32],
    k: &[&[half::f16]],
    v: &[&[half::f16]],
    group: usize,
    hd: usize,
    part: &mut [f32],
) {
    let n = k.len().min(v.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
        && hd.is_multiple_of(8)
        && k[..n].iter().chain(&v[..n]).all(|r| r.len() >= hd)
    {
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scores = vec![0f32; group * n];
        let (stats, o) = part.split_at_mut(2 * group);
        // SAFETY: the CPU has the features; every row has hd values.
        unsafe {
            avx2::scores(&avx2::F16Rows(&k[..n]), q, group, hd, scale, &mut scores);
            for h in 0..group {
                let sc = &mut scores[h * n..(h + 1) * n];
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                stats[h] = max;
                stats[group + h] = avx2::exp_sum(sc, max);
            }
            avx2::weighted_sum(&avx2::F16Rows(&v[..n]), &scores, group, hd, o);
        }
        return;
    }
    // Elsewhere: widen, then the plain path.
    let mut kw = vec![0f32; n * hd];
    let mut vw = vec![0f32; n * hd];
    for (i, (kr, vr)) in k.iter().zip(v).take(n).enumerate() {
        widen(&kr[..hd], &mut kw[i * hd..(i + 1) * hd]);
        widen(&vr[..hd], &mut vw[i * hd..(i + 1) * hd]);
    }
    attend_span(q, &kw, &vw, hd, group, hd, part);
}

/// SiLU-gated product, `a = g * sigmoid(g) * u`, for the FFN.
pub(crate) fn swiglu(g: &[f32], u: &[f32], a: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features.
        unsafe { avx2::swiglu(g, u, a) };
        return;
    }
    for ((a, gv), uv) in a.iter_mut().zip(g).zip(u) {
        *a = gv / (1.0 + (-gv).exp()) * uv;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    /// f16 to f32, eight at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn widen(src: &[f16], dst: &mut [f32]) {
        let mut s8 = src.chunks_exact(8);
        let mut d8 = dst.chunks_exact_mut(8);
        for (s, d) in (&mut s8).zip(&mut d8) {
            // SAFETY: 8 readable f16 and 8 writable f32.
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast());
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        for (s, d) in s8.remainder().iter().zip(d8.into_remainder()) {
            *d = s.to_f32();
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Four [`hsum`]s at once, lane i of the result being `hsum(acc[i])`
    /// with the same additions in the same order (so the same bits).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum4(acc: [__m256; 4]) -> __m128 {
        let x = acc.map(|a| _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
        // Transpose, so lane i of c[j] is lane j of x[i].
        let t0 = _mm_unpacklo_ps(x[0], x[1]);
        let t1 = _mm_unpacklo_ps(x[2], x[3]);
        let t2 = _mm_unpackhi_ps(x[0], x[1]);
        let t3 = _mm_unpackhi_ps(x[2], x[3]);
        let c0 = _mm_movelh_ps(t0, t1);
        let c1 = _mm_movehl_ps(t1, t0);
        let c2 = _mm_movelh_ps(t2, t3);
        let c3 = _mm_movehl_ps(t3, t2);
        // (x0 + x2) + (x1 + x3), as hsum adds.
        _mm_add_ps(_mm_add_ps(c0, c2), _mm_add_ps(c1, c3))
    }

    /// `e^x` for each lane (Cephes' single-precision polynomial; relative
    /// error about 2e-7 over the range softmax uses).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.376_26));
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.336_55));
        let fx = _mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        );
        let fx = _mm256_floor_ps(fx);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(x, x),
            _mm256_add_ps(x, _mm256_set1_ps(1.0)),
        );
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    /// K or V rows of one span, as the kernels read them: contiguous f32
    /// at a stride (a widened span), or f16 rows read in place.
    pub(super) trait Rows {
        /// Rows.
        fn count(&self) -> usize;
        /// Whether every row has `hd` readable values.
        fn fits(&self, hd: usize) -> bool;
        /// Eight values of row `s` from column `c`, as f32.
        ///
        /// # Safety
        /// `s < count()` and `c + 8 <= hd` for an `hd` that `fits`.
        unsafe fn load8(&self, s: usize, c: usize) -> __m256;
    }

    /// `n` rows of f32 at `stride`.
    pub(super) struct F32Rows<'a> {
        pub(super) data: &'a [f32],
        pub(super) stride: usize,
        pub(super) n: usize,
    }

    impl Rows for F32Rows<'_> {
        fn count(&self) -> usize {
            self.n
        }

        fn fits(&self, hd: usize) -> bool {
            self.n == 0 || self.data.len() >= (self.n - 1) * self.stride + hd
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(&self, s: usize, c: usize) -> __m256 {
            // SAFETY: the caller's promise, with `fits`.
            unsafe { _mm256_loadu_ps(self.data.as_ptr().add(s * self.stride + c)) }
        }
    }

    /// Rows of f16, one slice each (they may sit in different blocks).
    pub(super) struct F16Rows<'a>(pub(super) &'a [&'a [f16]]);

    impl Rows for F16Rows<'_> {
        fn count(&self) -> usize {
            self.0.len()
        }

        fn fits(&self, hd: usize) -> bool {
            self.0.iter().all(|r| r.len() >= hd)
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(&self, s: usize, c: usize) -> __m256 {
            // SAFETY: the caller's promise, with `fits`: 8 readable f16.
            unsafe {
                _mm256_cvtph_ps(_mm_loadu_si128(
                    self.0.get_unchecked(s).as_ptr().add(c).cast(),
                ))
            }
        }
    }

    /// Scaled scores of the K rows against the G query heads, into
    /// `scores[h * n + s]`.
    ///
    /// Four positions at a time, each with its own accumulator, so the
    /// FMA chains overlap; the four dots are reduced together in exactly
    /// [`hsum`]'s order ([`hsum4`]), so every score has the same bits as
    /// one dot at a time would give, whichever rows they come from.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scores<R: Rows>(
        k: &R,
        q: &[f32],
        group: usize,
        hd: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let n = k.count();
        assert!(
            hd.is_multiple_of(8)
                && k.fits(hd)
                && q.len() >= group * hd
                && scores.len() >= group * n,
            "attention scores: slices too short for their shape"
        );
        let scale4 = _mm_set1_ps(scale);
        for h in 0..group {
            let qh = &q[h * hd..(h + 1) * hd];
            let mut s = 0;
            while s + 4 <= n {
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in (0..hd).step_by(8) {
                    // SAFETY: s + j < n and c + 8 <= hd (asserted fits).
                    unsafe {
                        let qv = _mm256_loadu_ps(qh.as_ptr().add(c));
                        for (j, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(qv, k.load8(s + j, c), *a);
                        }
                    }
                }
                // SAFETY: h * n + s + 4 <= group * n <= scores.len().
                unsafe {
                    _mm_storeu_ps(
                        scores.as_mut_ptr().add(h * n + s),
                        _mm_mul_ps(hsum4(acc), scale4),
                    );
                }
                s += 4;
            }
            for s in s..n {
                let mut acc = _mm256_setzero_ps();
                for c in (0..hd).step_by(8) {
                    // SAFETY: as above.
                    unsafe {
                        acc =
                            _mm256_fmadd_ps(_mm256_loadu_ps(qh.as_ptr().add(c)), k.load8(s, c), acc)
                    };
                }
                scores[h * n + s] = hsum(acc) * scale;
            }
        }
    }

    /// `x = exp(x - max)` in place, eight lanes at a time; returns the sum.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn exp_sum(x: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: 8 readable and writable floats.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        let mut sum = hsum(acc);
        for v in chunks.into_remainder() {
            let mut lane = [0f32; 8];
            lane[0] = *v - max;
            // SAFETY: 8 readable and writable floats.
            unsafe {
                let e = exp(_mm256_loadu_ps(lane.as_ptr()));
                _mm256_storeu_ps(lane.as_mut_ptr(), e);
            }
            *v = lane[0];
            sum += lane[0];
        }
        sum
    }

    /// `o[h] = sum_s scores[h * n + s] * v[s]` over the V rows.
    ///
    /// Each head's output is accumulated in registers, 64 dimensions (8
    /// vectors) at a time, over all positions; every element still sums
    /// its terms in position order from zero, so the bits are those of a
    /// plain loop.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn weighted_sum<R: Rows>(
        v: &R,
        scores: &[f32],
        group: usize,
        hd: usize,
        o: &mut [f32],
    ) {
        let n = v.count();
        o.fill(0.0);
        assert!(
            hd.is_multiple_of(8)
                && v.fits(hd)
                && scores.len() >= group * n
                && o.len() >= group * hd,
            "attention weighted sum: slices too short for their shape"
        );
        for h in 0..group {
            let w = &scores[h * n..(h + 1) * n];
            let mut d = 0;
            while d + 64 <= hd {
                // SAFETY: shapes asserted above; d + 64 <= hd.
                unsafe { tile::<R, 8>(v, w, &mut o[h * hd + d..], d) };
                d += 64;
            }
            while d < hd {
                // SAFETY: as above; d + 8 <= hd.
                unsafe { tile::<R, 1>(v, w, &mut o[h * hd + d..], d) };
                d += 8;
            }
        }
    }

    /// `o[..8 * NV] = sum_s w[s] * v[s][d..d + 8 * NV]`, in registers.
    ///
    /// # Safety
    /// `v` fits `d + 8 * NV` values per row and has at least `w.len()`
    /// rows; `o` has `8 * NV` writable floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<R: Rows, const NV: usize>(v: &R, w: &[f32], o: &mut [f32], d: usize) {
        let mut acc = [_mm256_setzero_ps(); NV];
        for (s, &ws) in w.iter().enumerate() {
            let wv = _mm256_set1_ps(ws);
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's promise.
                unsafe { *a = _mm256_fmadd_ps(wv, v.load8(s, d + 8 * j), *a) };
            }
        }
        for (j, a) in acc.iter().enumerate() {
            // SAFETY: the caller's promise.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * j), *a) };
        }
    }

    /// `a = g / (1 + e^-g) * u`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn swiglu(g: &[f32], u: &[f32], a: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let n8 = a.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 <= len of each slice.
            unsafe {
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
                _mm256_storeu_ps(
                    a.as_mut_ptr().add(i),
                    _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))),
                );
            }
        }
        for i in n8..a.len() {
            a[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    /// A small deterministic generator (values in about [-2, 2]).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 22) as f32 - 2.0
            })
            .collect()
    }

    /// In-place f16 rows give the bits of the widened copy, for every
    /// length (tile and remainder paths), group and head size.
    #[test]
    fn attention_over_f16_rows_equals_the_widened_span_bit_for_bit() {
        for &(group, hd) in &[(1, 8), (2, 16), (3, 64), (4, 72)] {
            for n in [1, 2, 3, 4, 5, 7, 17, 64, 255, 256] {
                let seed = (group * 1000 + hd * 10 + n) as u64;
                let q = values(seed, group * hd);
                let k: Vec<f16> = values(seed + 1, n * hd)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                let v: Vec<f16> = values(seed + 2, n * hd)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                let kw: Vec<f32> = k.iter().map(|x| x.to_f32()).collect();
                let vw: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
                let part = group * (hd + 2);
                let mut want = vec![0f32; part];
                attend_span(&q, &kw, &vw, hd, group, hd, &mut want);
                let krows: Vec<&[f16]> = k.chunks_exact(hd).collect();
                let vrows: Vec<&[f16]> = v.chunks_exact(hd).collect();
                let mut got = vec![0f32; part];
                attend_span_f16(&q, &krows, &vrows, group, hd, &mut got);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "group {group} hd {hd} n {n}");
            }
        }
    }
}
