//! Our Q4_1 matrix kernel: weights stay 4-bit (20 bytes per 32 weights, as
//! in the file), activations are quantized to 8 bits per block of 32.
//!
//! NOTE: written by hand because candle's Q4_1 dot product is scalar on every
//! CPU, and requantizing to Q8_0 (its fast path) costs 70% more weight
//! memory and bandwidth, which is what decode is bound by.
//!
//! ```text
//!   w = d_w * q_w + m_w   (q_w in 0..15, per block of 32)
//!   a = d_a * q_a         (q_a in -127..127, s_a = d_a * sum(q_a))
//!   dot = d_w * d_a * sum(q_w * q_a) + m_w * s_a
//! ```
//!
//! Every (row, column) dot runs the same sequence of operations whether the
//! row is computed alone or in a tile of four, so results do not depend on
//! the batch.

use half::f16;
use rayon::prelude::*;

use crate::error::ModelError;

const QK: usize = 32;

/// One block of 32 weights, in GGML's Q4_1 layout: element `j` in the low
/// nibble of `qs[j]`, element `j + 16` in its high nibble.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ41 {
    d: u16,
    m: u16,
    qs: [u8; 16],
}

/// One block of 32 quantized activations.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct ActBlock {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// A Q4_1 weight matrix, `rows x cols`, row-major by blocks.
pub(crate) struct Q41Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ41>,
}

impl Q41Matrix {
    /// Wraps GGML Q4_1 bytes of a `rows x cols` matrix.
    pub(crate) fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Result<Self, ModelError> {
        if !cols.is_multiple_of(QK) || bytes.len() != rows * cols / QK * 20 {
            return Err(ModelError::InvalidConfig(format!(
                "Q4_1 data of {} bytes does not fit {rows}x{cols}",
                bytes.len()
            )));
        }
        let blocks = bytes
            .chunks_exact(20)
            .map(|b| BlockQ41 {
                d: u16::from_le_bytes([b[0], b[1]]),
                m: u16::from_le_bytes([b[2], b[3]]),
                qs: b[4..20].try_into().expect("16 bytes"),
            })
            .collect();
        Ok(Self { rows, cols, blocks })
    }

    /// Bytes of weights.
    pub(crate) fn bytes(&self) -> usize {
        self.blocks.len() * 20
    }

    /// `x` (`m x cols`) times the transposed matrix: `m x rows`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize, pool: &rayon::ThreadPool) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.cols);
        let kb = self.cols / QK;
        let mut acts = vec![
            ActBlock {
                d: 0.0,
                s: 0.0,
                qs: [0; QK]
            };
            m * kb
        ];
        for (row, out) in x.chunks_exact(self.cols).zip(acts.chunks_exact_mut(kb)) {
            quantize_row(row, out);
        }
        // Each task owns a run of output columns for every row, written
        // column-major, then transposed.
        let cols_per_task = if m == 1 { 64 } else { 16 };
        let mut t = vec![0f32; self.rows * m];
        let kernel = |(ci, chunk): (usize, &mut [f32])| {
            let first = ci * cols_per_task;
            let ncols = chunk.len() / m;
            // Row tiles outside, columns inside: a tile's activations and the
            // task's weight rows both stay in L1 across the loop.
            for r in (0..m).step_by(4) {
                let n = (m - r).min(4);
                for j in 0..ncols {
                    let w = &self.blocks[(first + j) * kb..(first + j + 1) * kb];
                    dot_rows(
                        w,
                        &acts[r * kb..(r + n) * kb],
                        kb,
                        &mut chunk[j * m + r..j * m + r + n],
                    );
                }
            }
        };
        pool.install(|| {
            t.par_chunks_mut(cols_per_task * m)
                .enumerate()
                .for_each(kernel)
        });
        if m == 1 {
            return t;
        }
        let mut out = vec![0f32; m * self.rows];
        for c in 0..self.rows {
            for r in 0..m {
                out[r * self.rows + c] = t[c * m + r];
            }
        }
        out
    }
}

/// 8-bit quantization of one row, per block of 32 (GGML's Q8_1 rule).
fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    for (xs, b) in x.chunks_exact(QK).zip(out) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            let r = (v * id).round() as i32;
            *q = r as i8;
            sum += r;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// Dots one weight row with every activation row: `out[r]` for row `r`.
fn dot_rows(w: &[BlockQ41], acts: &[ActBlock], kb: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { avx2::dot_rows(w, acts, kb, out) };
        return;
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_scalar(w, &acts[r * kb..(r + 1) * kb]);
    }
}

fn dot_scalar(w: &[BlockQ41], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    let mut summs = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let (d, m) = (f16::from_bits(wb.d).to_f32(), f16::from_bits(wb.m).to_f32());
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (wb.qs[j] & 0x0F) as i32 * ab.qs[j] as i32;
            isum += (wb.qs[j] >> 4) as i32 * ab.qs[j + 16] as i32;
        }
        acc += d * ab.d * isum as f32;
        summs += m * ab.s;
    }
    acc + summs
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActBlock, BlockQ41};

    // NOTE: every helper carries the target features itself. An
    // `#[inline(always)]` helper without them cannot inline the intrinsics it
    // calls, which then stay real function calls (ten times slower).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_to_f32(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// The 32 weights of a block as bytes 0..15, in element order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(b: &BlockQ41) -> __m256i {
        // SAFETY: `qs` is 16 readable bytes; AVX2 is enabled by the caller.
        unsafe {
            let q = _mm_loadu_si128(b.qs.as_ptr().cast());
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            _mm256_set_m128i(hi, lo)
        }
    }

    /// One block's contribution to one row: the same instructions whether
    /// the row is alone or in a tile.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn step(w: __m256i, dw: f32, mw: f32, a: &ActBlock, acc: &mut __m256, summs: &mut f32) {
        // SAFETY: `qs` is 32 readable bytes; AVX2 and FMA are enabled.
        unsafe {
            let q = _mm256_loadu_si256(a.qs.as_ptr().cast());
            let p16 = _mm256_maddubs_epi16(w, q);
            let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d), _mm256_cvtepi32_ps(p32), *acc);
        }
        *summs += mw * a.s;
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn finish(acc: __m256, summs: f32) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s) + summs
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(w: &[BlockQ41], acts: &[ActBlock], kb: usize, out: &mut [f32]) {
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
            let (mut c0, mut c1, mut c2, mut c3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let (mut s0, mut s1, mut s2, mut s3) = (0f32, 0f32, 0f32, 0f32);
            for k in 0..kb {
                // SAFETY: features enabled by this function's attribute;
                // `k < kb` indexes inside each row's blocks.
                unsafe {
                    let b = w.get_unchecked(k);
                    let (wv, dw, mw) = (unpack(b), f16_to_f32(b.d), f16_to_f32(b.m));
                    step(wv, dw, mw, a0.get_unchecked(k), &mut c0, &mut s0);
                    step(wv, dw, mw, a1.get_unchecked(k), &mut c1, &mut s1);
                    step(wv, dw, mw, a2.get_unchecked(k), &mut c2, &mut s2);
                    step(wv, dw, mw, a3.get_unchecked(k), &mut c3, &mut s3);
                }
            }
            // SAFETY: as above.
            unsafe {
                out[r] = finish(c0, s0);
                out[r + 1] = finish(c1, s1);
                out[r + 2] = finish(c2, s2);
                out[r + 3] = finish(c3, s3);
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
                    let b = w.get_unchecked(k);
                    let (wv, dw, mw) = (unpack(b), f16_to_f32(b.d), f16_to_f32(b.m));
                    step(wv, dw, mw, a.get_unchecked(k), &mut c, &mut s);
                }
            }
            // SAFETY: as above.
            out[r] = unsafe { finish(c, s) };
            r += 1;
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
        let mut acts = vec![
            ActBlock {
                d: 0.0,
                s: 0.0,
                qs: [0; QK]
            };
            kb
        ];
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
    fn rejects_data_of_the_wrong_size() {
        assert!(Q41Matrix::from_ggml(&[0; 19], 1, 32).is_err());
        assert!(Q41Matrix::from_ggml(&[0; 20], 1, 31).is_err());
    }
}
