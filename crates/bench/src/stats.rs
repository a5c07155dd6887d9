//! Percentiles and the summary of one distribution.

use serde::{Deserialize, Serialize};

/// The `p`th percentile (0 to 100) of `values`, by linear interpolation
/// between the two nearest ranks (numpy's default, which vLLM's and
/// SGLang's benchmarks report): the 50th of `[1, 2, 3, 4]` is 2.5. `None`
/// for no values; NaNs are not expected and sort last.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

/// A distribution's count, mean and the percentiles the report shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Dist {
    /// How many values.
    pub n: usize,
    /// Their mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// The largest.
    pub max: f64,
}

impl Dist {
    /// The summary of `values` (all zeros for none).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let at = |p| percentile(values, p).unwrap_or(0.0);
        Self {
            n: values.len(),
            mean: values.iter().sum::<f64>() / values.len() as f64,
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: at(100.0),
        }
    }
}

/// The median of `values` (0 for none).
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0).unwrap_or(0.0)
}
