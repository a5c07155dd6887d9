//! Our quantized matrix kernels: weights stay as stored in the GGUF (Q4_1:
//! 20 bytes per 32 weights; Q8_0: 34 bytes), activations are quantized to 8
//! bits per block of 32, and each block's dot is an integer dot scaled once.
//!
//! NOTE: written by hand because candle's Q4_1 dot product is scalar on every
//! CPU (requantizing to its Q8_0 path costs 70% more weight bandwidth, which
//! decode is bound by), and because going through candle for the tied Q8_0
//! output layer costs a tensor copy in and out and a second thread pool that
//! competes with ours for the cores.
//!
//! ```text
//!   Q4_1:  w = d_w * q_w + m_w   (q_w in 0..15)     Q8_0:  w = d_w * q_w  (q_w in -128..127)
//!   act:   a = d_a * q_a         (q_a in -127..127, s_a = d_a * sum(q_a))
//!   per (weight row, activation row), over the blocks k in order:
//!     acc  = fma(isum_k as f32, d_w,k * d_a,k, acc)      isum_k = sum(q_w * q_a), exact
//!     macc = fma(m_w,k, s_a,k, macc)                     (Q4_1 only)
//!   dot = acc + macc
//! ```
//!
//! Weights are stored in groups of 8 rows, block by block (`[group][k]`:
//! the 8 rows' scales together, then their quants), the same bytes as the
//! file's. The kernel computes 8 weight rows against 1 to 4 activation rows
//! at a time: the 8 integer dots of one block reduce into one vector whose
//! lane i is weight row i, so the scaling is one vector `fma` for 8 pairs.
//! Every (row, column) runs the arithmetic above in its own lane whatever
//! the tile, so results do not depend on the batch, and the scalar fallback
//! gives the same bits.

use rayon::prelude::*;

use crate::error::ModelError;

const QK: usize = 32;
/// Weight rows per group.
const G: usize = 8;
/// Activation rows per tile.
pub(crate) const TILE: usize = 8;

/// One block in a canonical form: `w = d * q + m` (f16 bits for d and m).
#[derive(Clone, Copy)]
pub(crate) struct Canon {
    d: u16,
    m: u16,
    /// The quants: 0..15 for Q4_1, -128..127 for Q8_0.
    q: [i16; QK],
}

/// A weight format the kernels read.
pub(crate) trait Format: Send + Sync + 'static {
    /// GGML's name for the format, for errors.
    const NAME: &'static str;
    /// Bytes per block of 32 in the GGUF.
    const BYTES: usize;
    /// Whether blocks carry a min (`m_w * s_a` term).
    const HAS_MIN: bool;
    /// Eight rows' block `k`, packed.
    type Group: Copy + Send + Sync + 'static;
    /// Parses one block from its GGUF bytes (`BYTES` long).
    fn parse(b: &[u8]) -> Canon;
    /// Packs the same block of eight rows.
    fn pack(rows: &[Canon; G]) -> Self::Group;
    /// Row `i` of a packed group.
    fn unpack(g: &Self::Group, i: usize) -> Canon;

    /// The 8 rows' scales and mins as floats.
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn scales(g: &Self::Group) -> (Ymm, Ymm);
    /// Row `i`'s 32 weights as unsigned bytes for `maddubs`, and what the
    /// activations' signs must be multiplied by.
    ///
    /// # Safety
    /// As for `scales`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn weights(g: &Self::Group, i: usize) -> (Ymmi, Ymmi);
    /// Activations with the signs of the weights moved onto them.
    ///
    /// # Safety
    /// As for `scales`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn signed(sign: Ymmi, a: Ymmi) -> Ymmi;
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m256 as Ymm, __m256i as Ymmi};

/// The SIMD trait methods, each a call into `avx2` with the same features
/// (so everything inlines into the kernel).
macro_rules! simd_methods {
    ($scales:ident, $weights:ident, $signed:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn scales(g: &Self::Group) -> (Ymm, Ymm) {
            // SAFETY: the caller's guarantee.
            unsafe { avx2::$scales(g) }
        }
        #[cfg(target_arch = "x86_64")]
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn weights(g: &Self::Group, i: usize) -> (Ymmi, Ymmi) {
            // SAFETY: the caller's guarantee.
            unsafe { avx2::$weights(g, i) }
        }
        #[cfg(target_arch = "x86_64")]
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn signed(sign: Ymmi, a: Ymmi) -> Ymmi {
            // SAFETY: the caller's guarantee.
            unsafe { avx2::$signed(sign, a) }
        }
    };
}

/// Q4_1: per block an f16 scale and min, 32 nibbles (element `j` in the low
/// nibble of byte `j`, element `j + 16` in its high nibble).
pub(crate) struct Q41;

/// Eight Q4_1 blocks: 160 bytes, like eight of the file's.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct GroupQ41 {
    d: [u16; G],
    m: [u16; G],
    qs: [[u8; 16]; G],
}

impl Format for Q41 {
    const NAME: &'static str = "Q4_1";
    const BYTES: usize = 20;
    const HAS_MIN: bool = true;
    type Group = GroupQ41;
    fn parse(b: &[u8]) -> Canon {
        Canon {
            d: u16::from_le_bytes([b[0], b[1]]),
            m: u16::from_le_bytes([b[2], b[3]]),
            q: nibbles(b[4..20].try_into().expect("16 bytes")),
        }
    }
    fn pack(rows: &[Canon; G]) -> GroupQ41 {
        GroupQ41 {
            d: rows.map(|c| c.d),
            m: rows.map(|c| c.m),
            qs: rows.map(|c| std::array::from_fn(|j| (c.q[j] | (c.q[j + 16] << 4)) as u8)),
        }
    }
    simd_methods!(q41_scales, q41_weights, unsigned);
    fn unpack(g: &GroupQ41, i: usize) -> Canon {
        Canon {
            d: g.d[i],
            m: g.m[i],
            q: nibbles(&g.qs[i]),
        }
    }
}

/// Q4_1's 32 quants from its 16 packed bytes.
fn nibbles(b: &[u8; 16]) -> [i16; QK] {
    std::array::from_fn(|j| (if j < 16 { b[j] & 0x0F } else { b[j - 16] >> 4 }) as i16)
}

/// Q8_0: per block an f16 scale and 32 signed bytes.
pub(crate) struct Q80;

/// Eight Q8_0 blocks: 272 bytes, like eight of the file's.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct GroupQ80 {
    d: [u16; G],
    qs: [[i8; QK]; G],
}

impl Format for Q80 {
    const NAME: &'static str = "Q8_0";
    const BYTES: usize = 34;
    const HAS_MIN: bool = false;
    type Group = GroupQ80;
    fn parse(b: &[u8]) -> Canon {
        Canon {
            d: u16::from_le_bytes([b[0], b[1]]),
            m: 0,
            q: std::array::from_fn(|j| b[2 + j] as i8 as i16),
        }
    }
    fn pack(rows: &[Canon; G]) -> GroupQ80 {
        GroupQ80 {
            d: rows.map(|c| c.d),
            qs: rows.map(|c| c.q.map(|q| q as i8)),
        }
    }
    simd_methods!(q80_scales, q80_weights, sign);
    fn unpack(g: &GroupQ80, i: usize) -> Canon {
        Canon {
            d: g.d[i],
            m: 0,
            q: g.qs[i].map(i16::from),
        }
    }
}

impl Canon {
    /// The 32 quants as integers.
    fn ints(&self) -> [i32; QK] {
        self.q.map(i32::from)
    }
    fn d(&self) -> f32 {
        half::f16::from_bits(self.d).to_f32()
    }
    fn m(&self) -> f32 {
        half::f16::from_bits(self.m).to_f32()
    }
}

/// One block of 32 quantized activations.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct ActBlock {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

const ZERO_ACT: ActBlock = ActBlock {
    d: 0.0,
    s: 0.0,
    qs: [0; QK],
};

/// A quantized weight matrix, `rows x cols`, in groups of 8 rows (the last
/// group padded with zero rows).
pub(crate) struct QMatrix<F: Format> {
    rows: usize,
    cols: usize,
    /// `[group][k]`.
    groups: Vec<F::Group>,
}

/// A Q4_1 matrix.
pub(crate) type Q41Matrix = QMatrix<Q41>;
/// A Q8_0 matrix.
pub(crate) type Q80Matrix = QMatrix<Q80>;

/// The output pointer shared by the tasks of one matmul; each task writes
/// only its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements, and the matmul waits for all of
// them before the buffer is read or freed.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` is inside the buffer and no other task writes it.
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(i) = v };
    }
}

impl<F: Format> QMatrix<F> {
    /// Wraps GGML bytes of a `rows x cols` matrix.
    pub(crate) fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Result<Self, ModelError> {
        if rows == 0 || !cols.is_multiple_of(QK) || bytes.len() != rows * cols / QK * F::BYTES {
            return Err(ModelError::InvalidConfig(format!(
                "{} data of {} bytes does not fit {rows}x{cols}",
                F::NAME,
                bytes.len()
            )));
        }
        let kb = cols / QK;
        let zero = Canon {
            d: 0,
            m: 0,
            q: [0; QK],
        };
        let block = |r: usize, k: usize| {
            if r < rows {
                let at = (r * kb + k) * F::BYTES;
                F::parse(&bytes[at..at + F::BYTES])
            } else {
                zero
            }
        };
        let mut groups = Vec::with_capacity(rows.div_ceil(G) * kb);
        for g in 0..rows.div_ceil(G) {
            for k in 0..kb {
                groups.push(F::pack(&std::array::from_fn(|i| block(g * G + i, k))));
            }
        }
        Ok(Self { rows, cols, groups })
    }

    /// Dots every group of weight rows with `acts` (1 to `TILE` rows of
    /// `cols / QK` blocks each), discarding the products but their sum: the
    /// kernel alone, for measuring its peak on cache-resident data.
    pub(crate) fn dot_all_groups(&self, acts: &[ActBlock], rows: usize) -> f32 {
        let kb = self.cols / QK;
        let mut tile = [[0f32; G]; TILE];
        let mut sum = 0f32;
        for g in 0..self.rows.div_ceil(G) {
            dot_tile::<F>(
                &self.groups[g * kb..(g + 1) * kb],
                acts,
                kb,
                &mut tile[..rows],
            );
            sum += tile[0][0];
        }
        sum
    }

    /// Bytes of weights (the file's, without the padding rows).
    pub(crate) fn bytes(&self) -> usize {
        self.rows * self.cols / QK * F::BYTES
    }

    /// Row `r` of the matrix as floats (an embedding lookup).
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let kb = self.cols / QK;
        let groups = &self.groups[(r / G) * kb..(r / G + 1) * kb];
        for (g, o) in groups.iter().zip(out.chunks_exact_mut(QK)) {
            let c = F::unpack(g, r % G);
            let (d, m) = (c.d(), c.m());
            for (o, q) in o.iter_mut().zip(c.ints()) {
                *o = d * q as f32 + m;
            }
        }
    }

    /// `x` (`m x cols`) times the transposed matrix: `m x rows`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize, pool: &rayon::ThreadPool) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.cols);
        let kb = self.cols / QK;
        let mut acts = vec![ZERO_ACT; m * kb];
        let quantize = |(row, out): (&[f32], &mut [ActBlock])| quantize_row(row, out);
        if m >= 8 {
            pool.install(|| {
                x.par_chunks(self.cols)
                    .zip(acts.par_chunks_mut(kb))
                    .for_each(quantize)
            });
        } else {
            x.chunks_exact(self.cols)
                .zip(acts.chunks_exact_mut(kb))
                .for_each(quantize);
        }
        // Each task owns a run of weight groups (output columns) for every
        // row; decode rows get longer runs, the work per group being small.
        let groups_per_task = if m == 1 { 8 } else { 2 };
        let mut out = vec![0f32; m * self.rows];
        let ptr = OutPtr(out.as_mut_ptr());
        let n = self.rows;
        let ngroups = n.div_ceil(G);
        let kernel = |task: usize| {
            let g0 = task * groups_per_task;
            let g1 = (g0 + groups_per_task).min(ngroups);
            let mut tile = [[0f32; G]; TILE];
            // Row tiles outside, groups inside: a tile's activations and the
            // task's weights both stay in L1 across the loop.
            for r in (0..m).step_by(TILE) {
                let rn = (m - r).min(TILE);
                for g in g0..g1 {
                    let w = &self.groups[g * kb..(g + 1) * kb];
                    dot_tile::<F>(w, &acts[r * kb..(r + rn) * kb], kb, &mut tile[..rn]);
                    let cols = (n - g * G).min(G);
                    for (i, t) in tile[..rn].iter().enumerate() {
                        for (j, &v) in t[..cols].iter().enumerate() {
                            // SAFETY: `(r + i) * n + g * G + j` is inside `out`
                            // (r + i < m, g * G + j < n), and column g * G + j
                            // belongs to this task alone.
                            unsafe { ptr.write((r + i) * n + g * G + j, v) };
                        }
                    }
                }
            }
        };
        let tasks = ngroups.div_ceil(groups_per_task);
        pool.install(|| (0..tasks).into_par_iter().for_each(kernel));
        out
    }
}

/// `x` (`m` rows of `cols`) quantized as the kernel reads it.
pub(crate) fn quantize_rows(x: &[f32], cols: usize) -> Vec<ActBlock> {
    let kb = cols / QK;
    let mut acts = vec![ZERO_ACT; x.len() / cols * kb];
    for (row, out) in x.chunks_exact(cols).zip(acts.chunks_exact_mut(kb)) {
        quantize_row(row, out);
    }
    acts
}

/// 8-bit quantization of one row, per block of 32 (GGML's Q8_1 rule).
fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { avx2::quantize_row(x, out) };
        return;
    }
    quantize_row_scalar(x, out);
}

fn quantize_row_scalar(x: &[f32], out: &mut [ActBlock]) {
    for (xs, b) in x.chunks_exact(QK).zip(out) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Dots one group of 8 weight rows with 1 to 4 activation rows:
/// `out[r][i]` for activation row `r` and weight row `i`.
fn dot_tile<F: Format>(w: &[F::Group], acts: &[ActBlock], kb: usize, out: &mut [[f32; G]]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features the functions are compiled for.
        unsafe {
            match out.len() {
                1 => avx2::dot_tile::<F, 1>(w, acts, kb, out),
                2 => avx2::dot_tile::<F, 2>(w, acts, kb, out),
                3 => avx2::dot_tile::<F, 3>(w, acts, kb, out),
                4 => avx2::dot_tile::<F, 4>(w, acts, kb, out),
                5 => avx2::dot_tile::<F, 5>(w, acts, kb, out),
                6 => avx2::dot_tile::<F, 6>(w, acts, kb, out),
                7 => avx2::dot_tile::<F, 7>(w, acts, kb, out),
                _ => avx2::dot_tile::<F, 8>(w, acts, kb, out),
            }
        }
        return;
    }
    dot_tile_scalar::<F>(w, acts, kb, out);
}

/// The kernel's arithmetic one lane at a time (the same bits as the SIMD
/// path: `mul_add` is a fused multiply-add).
fn dot_tile_scalar<F: Format>(w: &[F::Group], acts: &[ActBlock], kb: usize, out: &mut [[f32; G]]) {
    for (r, o) in out.iter_mut().enumerate() {
        let a = &acts[r * kb..(r + 1) * kb];
        for (i, o) in o.iter_mut().enumerate() {
            let (mut acc, mut macc) = (0f32, 0f32);
            for (g, ab) in w.iter().zip(a) {
                let c = F::unpack(g, i);
                let isum: i32 = c
                    .ints()
                    .iter()
                    .zip(&ab.qs)
                    .map(|(&q, &a)| q * a as i32)
                    .sum();
                acc = (isum as f32).mul_add(c.d() * ab.d, acc);
                if F::HAS_MIN {
                    macc = c.m().mul_add(ab.s, macc);
                }
            }
            *o = acc + macc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActBlock, Format, G, GroupQ41, GroupQ80, QK};

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q41_scales(g: &GroupQ41) -> (__m256, __m256) {
        // SAFETY: `d` and `m` are 16 readable bytes each.
        unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(g.d.as_ptr().cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(g.m.as_ptr().cast())),
            )
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q41_weights(g: &GroupQ41, i: usize) -> (__m256i, __m256i) {
        // SAFETY: `qs[i]` is 16 readable bytes.
        let q = unsafe { _mm_loadu_si128(g.qs[i].as_ptr().cast()) };
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        (_mm256_set_m128i(hi, lo), _mm256_setzero_si256())
    }

    /// Unsigned weights need no sign moved.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn unsigned(_: __m256i, a: __m256i) -> __m256i {
        a
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q80_scales(g: &GroupQ80) -> (__m256, __m256) {
        // SAFETY: `d` is 16 readable bytes.
        let d = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(g.d.as_ptr().cast())) };
        (d, _mm256_setzero_ps())
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q80_weights(g: &GroupQ80, i: usize) -> (__m256i, __m256i) {
        // SAFETY: `qs[i]` is 32 readable bytes.
        let q = unsafe { _mm256_loadu_si256(g.qs[i].as_ptr().cast()) };
        (_mm256_sign_epi8(q, q), q)
    }

    /// `a` with the signs of the signed weights: |w| * (a * sign(w)) = w * a.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn sign(sign: __m256i, a: __m256i) -> __m256i {
        _mm256_sign_epi8(a, sign)
    }

    /// Lane `i` of the result is the sum of `p[i]`'s eight lanes (exact:
    /// integer adds).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn reduce8(p: &[__m256i; G]) -> __m256i {
        let h01 = _mm256_hadd_epi32(p[0], p[1]);
        let h23 = _mm256_hadd_epi32(p[2], p[3]);
        let h45 = _mm256_hadd_epi32(p[4], p[5]);
        let h67 = _mm256_hadd_epi32(p[6], p[7]);
        let h0123 = _mm256_hadd_epi32(h01, h23);
        let h4567 = _mm256_hadd_epi32(h45, h67);
        let lo = _mm256_permute2x128_si256(h0123, h4567, 0x20);
        let hi = _mm256_permute2x128_si256(h0123, h4567, 0x31);
        _mm256_add_epi32(lo, hi)
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `acts` holds `A` rows of
    /// `kb` blocks and `w` holds `kb` groups.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_tile<F: Format, const A: usize>(
        w: &[F::Group],
        acts: &[ActBlock],
        kb: usize,
        out: &mut [[f32; G]],
    ) {
        debug_assert!(w.len() == kb && acts.len() >= A * kb && out.len() >= A);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); A];
        let mut macc = [_mm256_setzero_ps(); A];
        for k in 0..kb {
            // SAFETY: `k < kb` indexes inside `w` and each row of `acts`;
            // the features are enabled by this function's attribute.
            unsafe {
                let g = w.get_unchecked(k);
                let (d, m) = F::scales(g);
                let ws: [(__m256i, __m256i); G] = std::array::from_fn(|i| F::weights(g, i));
                for r in 0..A {
                    let a = acts.get_unchecked(r * kb + k);
                    let q = _mm256_loadu_si256(a.qs.as_ptr().cast());
                    let p: [__m256i; G] = std::array::from_fn(|i| {
                        let (u, sign) = ws[i];
                        _mm256_madd_epi16(_mm256_maddubs_epi16(u, F::signed(sign, q)), ones)
                    });
                    let isum = _mm256_cvtepi32_ps(reduce8(&p));
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                    acc[r] = _mm256_fmadd_ps(isum, scale, acc[r]);
                    if F::HAS_MIN {
                        macc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s), macc[r]);
                    }
                }
            }
        }
        for r in 0..A {
            // SAFETY: `out[r]` is 8 writable floats.
            unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_add_ps(acc[r], macc[r])) };
        }
    }

    /// Per block of 32: the largest magnitude sets the scale, values round
    /// to the nearest integer (ties to even, like `round_ties_even`).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        for (xs, b) in x.chunks_exact(QK).zip(out) {
            // SAFETY: `xs` is 32 readable floats.
            let v: [__m256; 4] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) });
            let m01 = _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask));
            let m23 = _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask));
            let m = _mm256_max_ps(m01, m23);
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
            let d = _mm_cvtss_f32(m) / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let i: [__m256i; 4] = std::array::from_fn(|k| {
                _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(v[k], id),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                ))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let s = _mm_hadd_epi32(s, s);
            let s = _mm_hadd_epi32(s, s);
            // Packing interleaves 128-bit lanes; the permute restores order.
            let p = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            // SAFETY: `qs` is 32 writable bytes.
            unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), p) };
            b.d = d;
            b.s = d * _mm_cvtsi128_si32(s) as f32;
        }
    }
}
#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> (Q41Matrix, Vec<f32>) {
        // Random Q4_1 blocks and their dequantized values.
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            s >> 8
        };
        let mut bytes = Vec::new();
        let mut dense = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32((next() % 100) as f32 / 1000.0 + 0.001);
            let m = f16::from_f32(-((next() % 100) as f32) / 200.0);
            let qs: Vec<u8> = (0..16).map(|_| (next() & 0xFF) as u8).collect();
            bytes.extend_from_slice(&d.to_bits().to_le_bytes());
            bytes.extend_from_slice(&m.to_bits().to_le_bytes());
            bytes.extend_from_slice(&qs);
            let mut vals = [0f32; 32];
            for j in 0..16 {
                vals[j] = (qs[j] & 15) as f32 * d.to_f32() + m.to_f32();
                vals[j + 16] = (qs[j] >> 4) as f32 * d.to_f32() + m.to_f32();
            }
            dense.extend_from_slice(&vals);
        }
        (Q41Matrix::from_ggml(&bytes, rows, cols).unwrap(), dense)
    }

    #[test]
    fn matches_a_dense_product_and_is_batch_invariant() {
        let (rows, cols) = (70, 96);
        let (w, dense) = matrix(rows, cols, 5);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let m = 7;
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        check_product(&w, &dense, &x, m, &pool);
    }

    /// `x` (`m` rows) times `w` is close to the dense product, each row
    /// alone gives the same bits as in the batch, and the SIMD path gives
    /// the scalar path's bits for every tile height.
    fn check_product<F: Format>(
        w: &QMatrix<F>,
        dense: &[f32],
        x: &[f32],
        m: usize,
        pool: &rayon::ThreadPool,
    ) {
        let (rows, cols) = (w.rows, w.cols);
        let y = w.matmul(x, m, pool);
        for r in 0..m {
            for c in 0..rows {
                let exact: f32 = (0..cols)
                    .map(|k| x[r * cols + k] * dense[c * cols + k])
                    .sum();
                let scale: f32 = (0..cols)
                    .map(|k| (x[r * cols + k] * dense[c * cols + k]).abs())
                    .sum();
                assert!(
                    (y[r * rows + c] - exact).abs() <= 0.02 * scale + 1e-4,
                    "({r},{c}): {} vs {exact}",
                    y[r * rows + c]
                );
            }
            let alone = w.matmul(&x[r * cols..(r + 1) * cols], 1, pool);
            assert_eq!(
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y[r * rows..(r + 1) * rows]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "row {r}"
            );
        }
        simd_equals_scalar(w, x, m);
    }

    fn simd_equals_scalar<F: Format>(w: &QMatrix<F>, x: &[f32], m: usize) {
        let kb = w.cols / QK;
        let mut acts = vec![ZERO_ACT; m * kb];
        for (row, out) in x.chunks_exact(w.cols).zip(acts.chunks_exact_mut(kb)) {
            quantize_row(row, out);
        }
        for g in 0..w.rows.div_ceil(G) {
            let wg = &w.groups[g * kb..(g + 1) * kb];
            for a in 1..=TILE.min(m) {
                let mut simd = vec![[0f32; G]; a];
                let mut scalar = vec![[0f32; G]; a];
                dot_tile::<F>(wg, &acts[..a * kb], kb, &mut simd);
                dot_tile_scalar::<F>(wg, &acts[..a * kb], kb, &mut scalar);
                assert_eq!(
                    simd.concat()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    scalar
                        .concat()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "group {g}, tile of {a}"
                );
            }
        }
    }

    #[test]
    fn q8_0_matches_a_dense_product_and_is_batch_invariant() {
        let (rows, cols, m) = (37, 64, 6);
        let mut seed = 11u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        let mut bytes = Vec::new();
        let mut dense = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32((next() % 100) as f32 / 5000.0 + 0.0001);
            bytes.extend_from_slice(&d.to_bits().to_le_bytes());
            for _ in 0..QK {
                // The full range, -128 included.
                let q = (next() & 0xFF) as u8 as i8;
                bytes.push(q as u8);
                dense.push(q as f32 * d.to_f32());
            }
        }
        let w = Q80Matrix::from_ggml(&bytes, rows, cols).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 11.0)
            .collect();
        let mut row = vec![0f32; cols];
        for c in 0..rows {
            w.dequantize_row(c, &mut row);
            assert_eq!(row, dense[c * cols..(c + 1) * cols]);
        }
        check_product(&w, &dense, &x, m, &pool);
    }

    #[test]
    fn simd_quantization_equals_the_scalar_rule() {
        let x: Vec<f32> = (0..32 * 8)
            .map(|i| match i % 7 {
                0 => 0.0,
                // Exact ties after scaling, to pin the rounding rule.
                1 => 127.0 / 2.0,
                _ => ((i * 7919 % 1013) as f32 - 506.0) / 37.0,
            })
            .collect();
        let mut a = vec![ZERO_ACT; 8];
        let mut b = vec![ZERO_ACT; 8];
        quantize_row(&x, &mut a);
        quantize_row_scalar(&x, &mut b);
        for (p, q) in a.iter().zip(&b) {
            assert_eq!(
                (p.qs, p.d.to_bits(), p.s.to_bits()),
                (q.qs, q.d.to_bits(), q.s.to_bits())
            );
        }
        // An all-zero block stays zero.
        let mut z = [ZERO_ACT];
        quantize_row(&[0.0; 32], &mut z);
        assert_eq!((z[0].qs, z[0].d, z[0].s), ([0; QK], 0.0, 0.0));
    }

    #[test]
    fn rejects_data_of_the_wrong_size() {
        assert!(Q41Matrix::from_ggml(&[0; 19], 1, 32).is_err());
        assert!(Q41Matrix::from_ggml(&[0; 20], 1, 31).is_err());
    }
}
