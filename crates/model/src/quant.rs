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
//!   Q4_1:  w = d_w * q_w + m_w   (q_w in 0..15)     Q8_0:  w = d_w * q_w  (q_w in -127..127)
//!   act:   a = d_a * q_a         (q_a in -127..127, s_a = d_a * sum(q_a))
//!   dot = d_w * d_a * sum(q_w * q_a) [+ m_w * s_a for Q4_1]
//! ```
//!
//! Every (row, column) dot runs the same sequence of operations whether the
//! row is computed alone or in a tile of four, and whichever task computes
//! it, so results do not depend on the batch.

use half::f16;
use rayon::prelude::*;

use crate::error::ModelError;

const QK: usize = 32;

/// One block of 32 weights, in GGML's Q4_1 layout: element `j` in the low
/// nibble of `qs[j]`, element `j + 16` in its high nibble.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ41 {
    d: u16,
    m: u16,
    qs: [u8; 16],
}

/// One block of 32 weights in GGML's Q8_0 layout.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ80 {
    d: u16,
    qs: [i8; QK],
}

#[cfg(target_arch = "x86_64")]
use avx2::Simd as SimdBlock;

/// Elsewhere there is only the scalar kernel.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait SimdBlock {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> SimdBlock for T {}

/// A block format the kernels can read.
pub(crate) trait WeightBlock: SimdBlock + Copy + Send + Sync + 'static {
    /// GGML's name for the format, for errors.
    const NAME: &'static str;
    /// Bytes per block in the GGUF.
    const BYTES: usize;
    /// Parses one block from its GGUF bytes (`BYTES` long).
    fn parse(b: &[u8]) -> Self;
    /// The block's 32 weights as `(q, d, m)` with `w = d * q + m`.
    fn scalar(&self) -> ([i32; QK], f32, f32);
    /// The block's 32 weights as floats.
    fn dequantize(&self, out: &mut [f32]) {
        let (q, d, m) = self.scalar();
        for (o, q) in out.iter_mut().zip(q) {
            *o = d * q as f32 + m;
        }
    }
}

impl WeightBlock for BlockQ41 {
    const NAME: &'static str = "Q4_1";
    const BYTES: usize = 20;
    fn parse(b: &[u8]) -> Self {
        Self {
            d: u16::from_le_bytes([b[0], b[1]]),
            m: u16::from_le_bytes([b[2], b[3]]),
            qs: b[4..20].try_into().expect("16 bytes"),
        }
    }
    fn scalar(&self) -> ([i32; QK], f32, f32) {
        let mut q = [0; QK];
        for j in 0..16 {
            q[j] = (self.qs[j] & 0x0F) as i32;
            q[j + 16] = (self.qs[j] >> 4) as i32;
        }
        let f = |b| f16::from_bits(b).to_f32();
        (q, f(self.d), f(self.m))
    }
}

impl WeightBlock for BlockQ80 {
    const NAME: &'static str = "Q8_0";
    const BYTES: usize = 34;
    fn parse(b: &[u8]) -> Self {
        let mut qs = [0i8; QK];
        for (q, &x) in qs.iter_mut().zip(&b[2..34]) {
            *q = x as i8;
        }
        Self {
            d: u16::from_le_bytes([b[0], b[1]]),
            qs,
        }
    }
    fn scalar(&self) -> ([i32; QK], f32, f32) {
        (self.qs.map(i32::from), f16::from_bits(self.d).to_f32(), 0.0)
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

/// A quantized weight matrix, `rows x cols`, row-major by blocks.
pub(crate) struct QMatrix<B> {
    rows: usize,
    cols: usize,
    blocks: Vec<B>,
}

/// A Q4_1 matrix.
pub(crate) type Q41Matrix = QMatrix<BlockQ41>;
/// A Q8_0 matrix.
pub(crate) type Q80Matrix = QMatrix<BlockQ80>;

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

impl<B: WeightBlock> QMatrix<B> {
    /// Wraps GGML bytes of a `rows x cols` matrix.
    pub(crate) fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Result<Self, ModelError> {
        if !cols.is_multiple_of(QK) || bytes.len() != rows * cols / QK * B::BYTES {
            return Err(ModelError::InvalidConfig(format!(
                "{} data of {} bytes does not fit {rows}x{cols}",
                B::NAME,
                bytes.len()
            )));
        }
        let blocks = bytes.chunks_exact(B::BYTES).map(B::parse).collect();
        Ok(Self { rows, cols, blocks })
    }

    /// Bytes of weights.
    pub(crate) fn bytes(&self) -> usize {
        self.blocks.len() * B::BYTES
    }

    /// Row `r` of the matrix as floats (an embedding lookup).
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let kb = self.cols / QK;
        for (b, o) in self.blocks[r * kb..(r + 1) * kb]
            .iter()
            .zip(out.chunks_exact_mut(QK))
        {
            b.dequantize(o);
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
        // Each task owns a run of output columns for every row.
        let cols_per_task = if m == 1 { 64 } else { 16 };
        let mut out = vec![0f32; m * self.rows];
        let ptr = OutPtr(out.as_mut_ptr());
        let n = self.rows;
        let kernel = |task: usize| {
            let first = task * cols_per_task;
            let last = (first + cols_per_task).min(n);
            let mut tile = [0f32; 4];
            // Row tiles outside, columns inside: a tile's activations and the
            // task's weight rows both stay in L1 across the loop.
            for r in (0..m).step_by(4) {
                let rn = (m - r).min(4);
                for c in first..last {
                    let w = &self.blocks[c * kb..(c + 1) * kb];
                    dot_rows(w, &acts[r * kb..(r + rn) * kb], kb, &mut tile[..rn]);
                    for (i, &v) in tile[..rn].iter().enumerate() {
                        // SAFETY: `(r + i) * n + c` is inside `out` (r + i < m,
                        // c < n), and column `c` belongs to this task alone.
                        unsafe { ptr.write((r + i) * n + c, v) };
                    }
                }
            }
        };
        let tasks = n.div_ceil(cols_per_task);
        pool.install(|| (0..tasks).into_par_iter().for_each(kernel));
        out
    }
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

/// Dots one weight row with every activation row: `out[r]` for row `r`.
fn dot_rows<B: WeightBlock>(w: &[B], acts: &[ActBlock], kb: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { avx2::dot_rows(w, acts, kb, out) };
        return;
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_scalar(w, &acts[r * kb..(r + 1) * kb]);
    }
}

fn dot_scalar<B: WeightBlock>(w: &[B], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    let mut summs = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let (q, d, m) = wb.scalar();
        let isum: i32 = q.iter().zip(&ab.qs).map(|(&w, &a)| w * a as i32).sum();
        acc += d * ab.d * isum as f32;
        summs += m * ab.s;
    }
    acc + summs
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActBlock, BlockQ41, BlockQ80, QK};

    // NOTE: every helper carries the target features itself. An
    // `#[inline(always)]` helper without them cannot inline the intrinsics it
    // calls, which then stay real function calls (ten times slower).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16_to_f32(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// A weight block ready for `maddubs`: 32 unsigned bytes, and what the
    /// activations' signs must be multiplied by.
    #[derive(Clone, Copy)]
    pub(crate) struct Unpacked {
        u: __m256i,
        sign: __m256i,
        d: f32,
        m: f32,
    }

    /// How the kernel reads one block format.
    pub(crate) trait Simd {
        /// Whether blocks carry a min (`m_w * s_a` term).
        const HAS_MIN: bool;
        /// # Safety
        /// The CPU supports AVX2, FMA and F16C.
        unsafe fn unpack(&self) -> Unpacked;
        /// # Safety
        /// As for `unpack`.
        unsafe fn signed(u: &Unpacked, a: __m256i) -> __m256i;
    }

    impl Simd for BlockQ41 {
        const HAS_MIN: bool = true;
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn unpack(&self) -> Unpacked {
            // SAFETY: `qs` is 16 readable bytes.
            let q = unsafe { _mm_loadu_si128(self.qs.as_ptr().cast()) };
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            Unpacked {
                u: _mm256_set_m128i(hi, lo),
                sign: _mm256_setzero_si256(),
                d: f16_to_f32(self.d),
                m: f16_to_f32(self.m),
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn signed(_: &Unpacked, a: __m256i) -> __m256i {
            a
        }
    }

    impl Simd for BlockQ80 {
        const HAS_MIN: bool = false;
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn unpack(&self) -> Unpacked {
            // SAFETY: `qs` is 32 readable bytes.
            let q = unsafe { _mm256_loadu_si256(self.qs.as_ptr().cast()) };
            Unpacked {
                u: _mm256_sign_epi8(q, q),
                sign: q,
                d: f16_to_f32(self.d),
                m: 0.0,
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn signed(u: &Unpacked, a: __m256i) -> __m256i {
            _mm256_sign_epi8(a, u.sign)
        }
    }

    /// One block's contribution to one row: the same instructions whether
    /// the row is alone or in a tile.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn step<B: Simd>(w: &Unpacked, a: &ActBlock, acc: &mut __m256, summs: &mut f32) {
        // SAFETY: `qs` is 32 readable bytes.
        let q = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
        // SAFETY: AVX2 is enabled.
        let q = unsafe { B::signed(w, q) };
        let p16 = _mm256_maddubs_epi16(w.u, q);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        *acc = _mm256_fmadd_ps(_mm256_set1_ps(w.d * a.d), _mm256_cvtepi32_ps(p32), *acc);
        if B::HAS_MIN {
            *summs += w.m * a.s;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn finish(acc: __m256, summs: f32) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s) + summs
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows<B: Simd>(w: &[B], acts: &[ActBlock], kb: usize, out: &mut [f32]) {
        let rows = out.len();
        debug_assert!(w.len() == kb && acts.len() >= rows * kb);
        let mut r = 0;
        // Tiles of four rows share each unpacked weight block; the
        // accumulators are plain locals so they live in registers.
        while r + 4 <= rows {
            let (a0, a1, a2, a3) = (
                &acts[r * kb..],
                &acts[(r + 1) * kb..],
                &acts[(r + 2) * kb..],
                &acts[(r + 3) * kb..],
            );
            let mut c = [_mm256_setzero_ps(); 4];
            let mut s = [0f32; 4];
            for k in 0..kb {
                // SAFETY: features enabled by this function's attribute;
                // `k < kb` indexes inside each row's blocks.
                unsafe {
                    let u = w.get_unchecked(k).unpack();
                    step::<B>(&u, a0.get_unchecked(k), &mut c[0], &mut s[0]);
                    step::<B>(&u, a1.get_unchecked(k), &mut c[1], &mut s[1]);
                    step::<B>(&u, a2.get_unchecked(k), &mut c[2], &mut s[2]);
                    step::<B>(&u, a3.get_unchecked(k), &mut c[3], &mut s[3]);
                }
            }
            for i in 0..4 {
                out[r + i] = finish(c[i], s[i]);
            }
            r += 4;
        }
        while r < rows {
            let a = &acts[r * kb..(r + 1) * kb];
            let mut c = _mm256_setzero_ps();
            let mut s = 0f32;
            for k in 0..kb {
                // SAFETY: as above.
                unsafe {
                    let u = w.get_unchecked(k).unpack();
                    step::<B>(&u, a.get_unchecked(k), &mut c, &mut s);
                }
            }
            out[r] = finish(c, s);
            r += 1;
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
        let y = w.matmul(&x, m, &pool);
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
            // Alone, the row gives bit-identical results.
            let alone = w.matmul(&x[r * cols..(r + 1) * cols], 1, &pool);
            assert!(
                alone
                    .iter()
                    .zip(&y[r * rows..(r + 1) * rows])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {r}"
            );
        }
        // The SIMD path agrees with the scalar one.
        let kb = cols / QK;
        let mut acts = vec![ZERO_ACT; kb];
        quantize_row(&x[..cols], &mut acts);
        for (c, &simd) in y.iter().take(rows).enumerate() {
            let s = dot_scalar(&w.blocks[c * kb..(c + 1) * kb], &acts);
            assert!(
                (s - simd).abs() <= 1e-4 * s.abs().max(1.0),
                "column {c}: scalar {s}, simd {simd}"
            );
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
        let y = w.matmul(&x, m, &pool);
        let mut row = vec![0f32; cols];
        for c in 0..rows {
            w.dequantize_row(c, &mut row);
            assert_eq!(row, dense[c * cols..(c + 1) * cols]);
        }
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
            let alone = w.matmul(&x[r * cols..(r + 1) * cols], 1, &pool);
            assert_eq!(
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y[r * rows..(r + 1) * rows]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "row {r}"
            );
        }
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
