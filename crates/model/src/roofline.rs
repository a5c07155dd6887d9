//! The arithmetic ceiling of the roofline (8/10): what our int8 dot kernel
//! does on data that is already in cache, so that prefill can be reported
//! as a fraction of it. (The other ceiling, memory bandwidth, is measured
//! by `strata bench roofline` itself: it needs no kernel of ours.)

use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::quant::{ActBlock, Q41Matrix, TILE, quantize_rows};

/// The resident shapes tried, `(weight rows, width)`: the default model's
/// hidden width (576) and its FFN width (1,536), and a longer row. Each
/// matrix with its 8 activation rows takes 17 to 30 KB: L1 and L2.
const SHAPES: [(usize, usize); 3] = [(32, 576), (16, 1_536), (8, 3_072)];

/// The Q4_1 dot kernel's peak in GMAC/s (multiply-accumulates of one
/// weight by one activation, per second) on `threads` threads: the best of
/// [`SHAPES`], each run for `time`, every thread dotting its own Q4_1
/// matrix with 8 quantized activation rows (prefill's widest tile), all
/// of it cache-resident. The dispatch is the one the model uses (AVX2
/// where the CPU has it, else the portable kernel).
pub fn int8_kernel_peak(threads: usize, time: Duration) -> f64 {
    SHAPES
        .iter()
        .map(|&(rows, cols)| peak_for(rows, cols, threads.max(1), time))
        .fold(0.0, f64::max)
}

fn peak_for(rows: usize, cols: usize, threads: usize, time: Duration) -> f64 {
    let macs_per_pass = (rows * cols * TILE) as f64;
    let rates: Vec<f64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let (matrix, acts) = resident_data(rows, cols, t as u32);
                    let start = Instant::now();
                    let mut passes = 0u64;
                    while start.elapsed() < time {
                        for _ in 0..64 {
                            black_box(matrix.dot_all_groups(black_box(&acts), TILE));
                        }
                        passes += 64;
                    }
                    passes as f64 * macs_per_pass / start.elapsed().as_secs_f64()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(0.0))
            .collect()
    });
    // Each thread's rate, summed: a thread that starts late does not
    // dilute the others.
    rates.iter().sum::<f64>() / 1e9
}

/// A Q4_1 matrix of `rows x cols` with varied scales and nibbles, and
/// `TILE` quantized activation rows.
fn resident_data(rows: usize, cols: usize, seed: u32) -> (Q41Matrix, Vec<ActBlock>) {
    let blocks = rows * cols / 32;
    let mut bytes = Vec::with_capacity(blocks * 20);
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for _ in 0..blocks {
        let d = half::f16::from_f32(0.01 + (next() % 100) as f32 * 1e-4);
        let m = half::f16::from_f32(-0.08);
        bytes.extend_from_slice(&d.to_bits().to_le_bytes());
        bytes.extend_from_slice(&m.to_bits().to_le_bytes());
        for _ in 0..16 {
            bytes.push(next() as u8);
        }
    }
    let matrix = Q41Matrix::from_ggml(&bytes, rows, cols)
        .unwrap_or_else(|_| unreachable!("{rows}x{cols} Q4_1 is {} bytes", blocks * 20));
    let act: Vec<f32> = (0..TILE * cols)
        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    (matrix, quantize_rows(&act, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_a_finite_positive_rate() {
        let one = int8_kernel_peak(1, Duration::from_millis(20));
        assert!(one.is_finite() && one > 0.0, "{one}");
    }
}
