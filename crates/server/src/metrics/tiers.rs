//! The tiers' metrics, read at each scrape: per-tier occupancy (bytes,
//! blocks, capacity), hits and misses, bytes moved each way, restore and
//! demotion time histograms, records dropped as corrupt, write failures,
//! disk-full events.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use strata_engine::{Histogram, TierStats};

/// Reads the tiers at each scrape (nothing before the model is loaded).
pub(crate) type TierSource = Arc<OnceLock<Box<dyn Fn() -> TierStats + Send + Sync>>>;

pub(super) struct TierCollector(pub(super) TierSource);

impl std::fmt::Debug for TierCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TierCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: &'static str,
}

/// One metric with a value per tier that is on.
fn per_tier(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    counter: bool,
    values: &[(&'static str, f64)],
) -> std::fmt::Result {
    if values.is_empty() {
        return Ok(());
    }
    let kind = if counter {
        MetricType::Counter
    } else {
        MetricType::Gauge
    };
    let mut d = e.encode_descriptor(name, help, None, kind)?;
    for &(tier, v) in values {
        let label = TierLabel { tier };
        let m = d.encode_family(&label)?;
        if counter {
            ConstCounter::new(v).encode(m)?;
        } else {
            ConstGauge::new(v).encode(m)?;
        }
    }
    Ok(())
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn histogram(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &Histogram,
) -> std::fmt::Result {
    let mut buckets: Vec<(f64, u64)> = Histogram::BOUNDS
        .iter()
        .copied()
        .zip(h.counts.iter().copied())
        .collect();
    buckets.push((f64::INFINITY, *h.counts.last().unwrap_or(&0)));
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(h.sum, h.count(), &buckets, None)
}

impl Collector for TierCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(read) = self.0.get() else {
            return Ok(());
        };
        let t = read();
        let mut tiers: Vec<(&'static str, [f64; 7])> = Vec::new();
        if let Some(h) = t.host {
            tiers.push((
                "host",
                [
                    h.bytes as f64,
                    h.blocks as f64,
                    t.host_capacity as f64,
                    h.hits as f64,
                    h.misses as f64,
                    h.written as f64,
                    h.evictions as f64,
                ],
            ));
        }
        if let Some(s) = t.ssd {
            tiers.push((
                "ssd",
                [
                    s.bytes as f64,
                    s.blocks as f64,
                    t.ssd_capacity as f64,
                    s.hits as f64,
                    s.misses as f64,
                    s.written as f64,
                    s.evictions as f64,
                ],
            ));
        }
        let col = |i: usize| tiers.iter().map(|(n, v)| (*n, v[i])).collect::<Vec<_>>();
        per_tier(
            &mut e,
            "strata:tier_bytes",
            "Bytes a tier holds.",
            false,
            &col(0),
        )?;
        per_tier(
            &mut e,
            "strata:tier_blocks",
            "Blocks a tier holds.",
            false,
            &col(1),
        )?;
        per_tier(
            &mut e,
            "strata:tier_capacity_bytes",
            "A tier's byte bound.",
            false,
            &col(2),
        )?;
        per_tier(
            &mut e,
            "strata:tier_hits",
            "Blocks a tier served to restores.",
            true,
            &col(3),
        )?;
        per_tier(
            &mut e,
            "strata:tier_misses",
            "Blocks asked of a tier and not served.",
            true,
            &col(4),
        )?;
        per_tier(
            &mut e,
            "strata:tier_writes",
            "Writes to a tier (SSD: records; host: blocks).",
            true,
            &col(5),
        )?;
        per_tier(
            &mut e,
            "strata:tier_evictions",
            "Evictions to stay within a tier's bound.",
            true,
            &col(6),
        )?;
        if tiers.is_empty() {
            return Ok(());
        }
        counter(
            &mut e,
            "strata:tier_bytes_demoted",
            "Bytes copied out of the arena into the tiers.",
            t.bytes_down,
        )?;
        counter(
            &mut e,
            "strata:tier_bytes_restored",
            "Bytes restored into the arena.",
            t.bytes_up,
        )?;
        counter(
            &mut e,
            "strata:tier_restored_blocks",
            "Blocks restored into the arena.",
            t.restored_blocks,
        )?;
        counter(
            &mut e,
            "strata:tier_restore_misses",
            "Restores cut short by a miss or a bad block (the rest recomputed).",
            t.restore_misses,
        )?;
        counter(
            &mut e,
            "strata:tier_recomputed_runs",
            "Runs of tier blocks recomputed because restoring measured slower.",
            t.recomputed_runs,
        )?;
        counter(
            &mut e,
            "strata:tier_demotions_failed",
            "Demoted blocks no tier took.",
            t.demotions_failed,
        )?;
        counter(
            &mut e,
            "strata:tier_dropped_blocks",
            "Blocks that left every tier.",
            t.dropped,
        )?;
        if let Some(s) = t.ssd {
            counter(
                &mut e,
                "strata:ssd_corrupt_dropped",
                "SSD records dropped because a block failed its checksum.",
                s.corrupt_dropped,
            )?;
            counter(
                &mut e,
                "strata:ssd_write_failures",
                "SSD records that failed to write (never visible).",
                s.write_failures,
            )?;
            counter(
                &mut e,
                "strata:ssd_read_failures",
                "SSD reads that failed (their record dropped).",
                s.read_failures,
            )?;
            counter(
                &mut e,
                "strata:ssd_disk_full",
                "SSD writes refused for space.",
                t.disk_full,
            )?;
        }
        histogram(
            &mut e,
            "strata:tier_restore_seconds",
            "Time to read one restore's blocks from the tiers.",
            &t.restore_seconds,
        )?;
        histogram(
            &mut e,
            "strata:tier_demotion_seconds",
            "Time to write one step's demoted blocks to the tiers.",
            &t.demotion_seconds,
        )?;
        Ok(())
    }
}
