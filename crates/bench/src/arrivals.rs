//! Open-loop arrivals: a Poisson process of a given rate, from a seed, so
//! that two servers (or two runs) get the same request times.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The first `count` arrival times, in seconds from the start, of a Poisson
/// process of `rate` requests per second: exponential gaps of mean
/// `1 / rate`, drawn from `seed`. A rate of infinity sends everything at
/// time 0; a rate that is not positive sends nothing.
pub fn poisson(rate: f64, count: usize, seed: u64) -> Vec<f64> {
    if rate == f64::INFINITY {
        return vec![0.0; count];
    }
    if !(rate > 0.0 && rate.is_finite()) {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = 0.0;
    (0..count)
        .map(|_| {
            // 1 - u is in (0, 1]: its logarithm is finite.
            let u: f64 = rng.random();
            t += -(1.0 - u).ln() / rate;
            t
        })
        .collect()
}
