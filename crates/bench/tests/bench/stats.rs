use proptest::prelude::*;
use strata_bench::arrivals::poisson;
use strata_bench::stats::{Dist, percentile};

#[test]
fn percentiles_interpolate_between_ranks() {
    let v = [4.0, 1.0, 3.0, 2.0];
    assert_eq!(percentile(&v, 50.0), Some(2.5));
    assert_eq!(percentile(&v, 0.0), Some(1.0));
    assert_eq!(percentile(&v, 100.0), Some(4.0));
    assert_eq!(percentile(&v, 25.0), Some(1.75));
    assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    assert_eq!(percentile(&[], 50.0), None);
    assert_eq!(percentile(&v, 101.0), None);
    assert_eq!(percentile(&v, -1.0), None);
    // p99 of 1..=100 is 99.01, not 100 (nearest-rank would give 99).
    let h: Vec<f64> = (1..=100).map(f64::from).collect();
    assert!((percentile(&h, 99.0).unwrap() - 99.01).abs() < 1e-9);
    let d = Dist::of(&h);
    assert_eq!((d.n, d.mean, d.p50, d.max), (100, 50.5, 50.5, 100.0));
}

proptest! {
    #[test]
    fn percentiles_are_monotone_and_within_range(
        v in prop::collection::vec(-1e6f64..1e6, 1..60),
        a in 0f64..100.0,
        b in 0f64..100.0,
    ) {
        let (lo, hi) = (a.min(b), a.max(b));
        let (pl, ph) = (percentile(&v, lo).unwrap(), percentile(&v, hi).unwrap());
        prop_assert!(pl <= ph);
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        prop_assert!(min <= pl && ph <= max);
        // At a whole rank, it is that element of the sorted values.
        let mut s = v.clone();
        s.sort_by(f64::total_cmp);
        let k = (s.len() - 1) / 2;
        if s.len() > 1 {
            let p = k as f64 * 100.0 / (s.len() - 1) as f64;
            prop_assert!((percentile(&v, p).unwrap() - s[k]).abs() <= 1e-9 * s[k].abs().max(1.0));
        }
    }
}

#[test]
fn poisson_arrivals_are_seeded_increasing_and_of_the_rate() {
    let a = poisson(4.0, 20_000, 7);
    assert_eq!(
        a,
        poisson(4.0, 20_000, 7),
        "the same seed gives the same times"
    );
    assert_ne!(a, poisson(4.0, 20_000, 8), "another seed gives others");
    assert_eq!(a.len(), 20_000);
    assert!(a.windows(2).all(|w| w[1] > w[0]), "strictly increasing");
    assert!(a[0] > 0.0);
    let mean_gap = a[a.len() - 1] / a.len() as f64;
    assert!(
        (mean_gap - 0.25).abs() < 0.25 * 0.03,
        "mean gap {mean_gap}, not 1/4 s"
    );
    // Exponential gaps: their standard deviation equals their mean.
    let gaps: Vec<f64> = std::iter::once(a[0])
        .chain(a.windows(2).map(|w| w[1] - w[0]))
        .collect();
    let var = gaps.iter().map(|g| (g - mean_gap).powi(2)).sum::<f64>() / gaps.len() as f64;
    assert!((var.sqrt() - 0.25).abs() < 0.25 * 0.05, "sd {}", var.sqrt());
    // Twice the rate, half the time.
    let b = poisson(8.0, 20_000, 7);
    assert!((b[b.len() - 1] * 2.0 - a[a.len() - 1]).abs() < 1e-6 * a[a.len() - 1]);
    assert_eq!(poisson(f64::INFINITY, 3, 1), vec![0.0; 3]);
    assert!(poisson(0.0, 3, 1).is_empty());
    assert!(poisson(f64::NAN, 3, 1).is_empty());
}
