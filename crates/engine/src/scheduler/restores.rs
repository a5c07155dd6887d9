//! Restores from the tiers, the scheduler's side: whether a run of blocks
//! found below the arena is worth restoring (measured cost of a restore
//! against measured cost of recomputing), the fetch sent to the I/O
//! thread, its report, and the landing of the payloads in the step that
//! then reads them.
//!
//! ```text
//!   admit:   lookup_and_pin_tiered ─► targets restoring ─► Fetch ─► I/O thread
//!   report:  Fetched(payloads) ─► (restore_failed at the first miss)
//!   plan:    restore_landed(E, n) ─► step E copies the payloads in, then
//!            computes the rest of the prompt over them
//! ```

use strata_kv::{Access, BlockId, Epoch, Generation, KvError, PoolGuard, RestorePlan, Tier};

use super::Scheduler;
use crate::request::{Event, RequestId};
use crate::sync::lock;
use crate::tiers::{FetchKey, Job, Report, TierIo, TierStats};

/// A request's restore in progress.
#[derive(Debug)]
pub(super) struct Restoring {
    /// Matches the report to this restore (not an earlier one of the same
    /// request, preempted since).
    token: u64,
    /// The payloads, once the I/O thread has read them (up to the first
    /// block it could not serve).
    fetched: Option<Vec<Vec<u8>>>,
}

impl Restoring {
    pub(super) fn ready(&self) -> bool {
        self.fetched.is_some()
    }
}

/// The tiers as the scheduler sees them: the I/O thread, the policy's
/// measurements, and the restores the step being planned carries.
pub(crate) struct SchedTiers {
    io: TierIo,
    stats: crate::sync::Arc<crate::sync::Mutex<TierStats>>,
    /// Decide by measured cost (else restore whatever is found).
    policy: bool,
    next_token: u64,
    /// Measured nanoseconds per restored block, per tier (EWMA).
    restore_ns: [Option<f64>; 2],
    /// Measured nanoseconds per prefill row (EWMA).
    row_ns: Option<f64>,
    /// Restores for the step being planned.
    pub(super) step_restores: Vec<(BlockId, Vec<u8>)>,
    /// Runs the policy chose to recompute.
    declined: u64,
    /// The I/O thread died: no tier is used again.
    dead: bool,
}

/// One run in this many that the policy would recompute is restored
/// anyway, to measure the tier again.
const EXPLORE_EVERY: u64 = 16;

/// Weight of the newest sample in the moving averages.
const EWMA: f64 = 0.2;

fn ewma(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |o| o + EWMA * (sample - o)))
}

fn slot(t: Tier) -> usize {
    match t {
        Tier::Host => 0,
        Tier::Ssd => 1,
    }
}

impl SchedTiers {
    pub(crate) fn new(
        io: TierIo,
        stats: crate::sync::Arc<crate::sync::Mutex<TierStats>>,
        policy: bool,
        probe_ns: Option<f64>,
    ) -> Self {
        Self {
            io,
            stats,
            policy,
            next_token: 1,
            restore_ns: [None, probe_ns],
            row_ns: None,
            step_restores: Vec::new(),
            declined: 0,
            dead: false,
        }
    }

    /// Whether restoring `blocks` blocks of `bs` tokens from `tier` is
    /// estimated faster than computing them. Until both costs are
    /// measured, it restores (a restore that turns out slow is measured,
    /// and the next run is decided on that).
    fn worth(&mut self, tier: Tier, blocks: usize, bs: usize) -> bool {
        if self.dead {
            return false;
        }
        if !self.policy {
            return true;
        }
        let faster = match (self.restore_ns[slot(tier)], self.row_ns) {
            (Some(r), Some(c)) => r * (blocks as f64) < c * ((blocks * bs) as f64),
            _ => true,
        };
        if faster {
            return true;
        }
        // Now and then restore anyway, so a disk that was slow once (a
        // cold read, a busy moment) is measured again, not shunned for good.
        self.declined += 1;
        self.declined.is_multiple_of(EXPLORE_EVERY)
    }

    /// A step ran `rows` rows in `nanos`.
    pub(super) fn measured_step(&mut self, rows: usize, nanos: u64) {
        // Steps of a few rows are dominated by fixed costs, not by rows.
        if rows >= 16 {
            self.row_ns = ewma(self.row_ns, nanos as f64 / rows as f64);
        }
    }
}

impl Scheduler {
    /// How many tier blocks the request's lookup may restore: all of the
    /// run found, if restoring it beats recomputing, else none.
    pub(super) fn max_restore(
        &mut self,
        g: &PoolGuard<'_>,
        seq: &strata_kv::SequenceHasher,
    ) -> Result<usize, KvError> {
        let bs = self.block_size;
        let Some(t) = self.tiers.as_mut() else {
            return Ok(0);
        };
        let (run, tier) = g.peek_tiers(seq)?;
        let Some(tier) = tier else { return Ok(0) };
        if t.worth(tier, run, bs) {
            Ok(run)
        } else {
            lock(&t.stats).recomputed_runs += 1;
            Ok(0)
        }
    }

    /// Sends a lookup's restore plan to the I/O thread.
    pub(super) fn start_restore(&mut self, id: RequestId, plan: RestorePlan) -> Option<Restoring> {
        let t = self.tiers.as_mut()?;
        if plan.restores.is_empty() {
            return None;
        }
        let token = t.next_token;
        t.next_token += 1;
        let keys = plan
            .restores
            .into_iter()
            .map(|r| FetchKey {
                hash: r.hash,
                parent: r.parent,
                tokens: r.tokens,
                tier: r.tier,
            })
            .collect();
        t.io.send(Job::Fetch { id, token, keys });
        Some(Restoring {
            token,
            fetched: None,
        })
    }

    /// Applies what the I/O thread reports.
    pub(crate) fn on_tier_report(&mut self, r: Report) {
        let cache = self.cache.clone();
        let mut g = cache.lock();
        match r {
            Report::Died => {
                tracing::error!("the tier I/O thread died: running on without tiers");
                if let Some(t) = self.tiers.as_mut() {
                    t.dead = true;
                }
                g.set_tier_policy(strata_kv::TierPolicy::default());
                // Restores waiting for it are misses: those requests compute.
                for s in self.seqs.values_mut() {
                    if let Some(r) = s.restore.as_mut().filter(|r| !r.ready()) {
                        if let Some(lease) = &s.lease {
                            g.restore_failed(lease, 0)
                                .expect("the restoring request's lease is live");
                        }
                        r.fetched = Some(Vec::new());
                    }
                }
            }
            Report::Located(list) => {
                let idx = g.tiers_mut();
                for (hash, tier) in list {
                    idx.located(hash, tier);
                }
            }
            Report::Fetched {
                id,
                token,
                payloads,
                complete,
                nanos,
                tier,
            } => {
                if let Some(t) = self.tiers.as_mut()
                    && !payloads.is_empty()
                {
                    let k = slot(tier);
                    t.restore_ns[k] = ewma(t.restore_ns[k], nanos as f64);
                }
                let Some(s) = self.seqs.get_mut(&id) else {
                    return;
                };
                let Some(r) = s.restore.as_mut().filter(|r| r.token == token) else {
                    return;
                };
                if !complete && let Some(lease) = &s.lease {
                    // Truncated here: the rest is computed.
                    g.restore_failed(lease, payloads.len())
                        .expect("the restoring request's lease is live");
                }
                r.fetched = Some(payloads);
            }
        }
    }

    /// Lands a request's fetched restores in step `epoch`: their blocks are
    /// written by it (the executor copies the payloads in first), and the
    /// request's prefill goes on after them. Returns the sanitizer's
    /// accesses for them (writes at the targets' generations).
    pub(super) fn land_restores(
        &mut self,
        g: &mut PoolGuard<'_>,
        id: RequestId,
        epoch: Epoch,
    ) -> Result<Vec<(BlockId, Generation, Access)>, KvError> {
        let bs = self.block_size;
        let s = self.seqs.get_mut(&id).expect("running requests exist");
        let Some(payloads) = s.restore.take().and_then(|r| r.fetched) else {
            return Ok(Vec::new());
        };
        let n = payloads.len();
        let lease = s.lease.as_ref().expect("running requests hold a lease");
        let landed = if n > 0 {
            g.restore_landed(lease, epoch, n)?
        } else {
            Vec::new()
        };
        s.computed += n * bs;
        let cached = s.computed;
        self.counters.cached_tokens += (n * bs) as u64;
        if s.cached_tokens.is_none() {
            s.cached_tokens = Some(cached);
            let _ = s.events.send(Event::Admitted {
                cached_tokens: cached,
            });
        }
        let t = self
            .tiers
            .as_mut()
            .expect("only a scheduler with tiers restores");
        let mut accesses = Vec::with_capacity(n);
        for ((b, gen_), bytes) in landed.into_iter().zip(payloads) {
            t.step_restores.push((b, bytes));
            accesses.push((b, gen_, Access::Write));
        }
        Ok(accesses)
    }
}
