//! The in-flight window: one bucket per issued but not yet completed epoch,
//! holding the blocks released while that epoch may still touch them and the
//! blocks that epoch writes.
//!
//! ```text
//!   completed          issued
//!       |  e+1   e+2    |
//!       v [----][----]  v     bucket k belongs to epoch completed + 1 + k
//! ```
//!
//! A block released with last use `L` (a step not yet completed) waits in
//! bucket `L`. Each block waits for *its own* last use: completing an earlier
//! epoch never reclaims a block a later epoch still touches, however the
//! completions interleave (the oMLX bug anchored every block to the first
//! completion).

use std::collections::VecDeque;

use crate::ids::{BlockId, Epoch, Generation};

/// What one in-flight epoch leaves to do when it completes.
#[derive(Default)]
pub(crate) struct EpochBucket {
    /// Blocks released whose last use is this epoch, in release order, each
    /// with the block's quarantine count at that release. An entry is stale
    /// once the block is pinned again (and maybe released again, with a
    /// higher count); the pool reclaims only current entries, so a block
    /// re-released into the same bucket takes its place in release order by
    /// its latest release.
    pub(crate) released: Vec<(BlockId, u32)>,
    /// Blocks this epoch writes into, with the generation written, in write
    /// order (so a chain's parent precedes its child).
    pub(crate) written: Vec<(BlockId, Generation)>,
}

/// The ring of in-flight epochs.
///
/// # Invariants
/// - `buckets.len() == issued - completed`.
pub(crate) struct Quarantine {
    completed: Epoch,
    buckets: VecDeque<EpochBucket>,
}

impl Quarantine {
    pub(crate) fn new() -> Self {
        Self {
            completed: Epoch::ZERO,
            buckets: VecDeque::new(),
        }
    }

    pub(crate) fn completed(&self) -> Epoch {
        self.completed
    }

    pub(crate) fn issued(&self) -> Epoch {
        Epoch::new(self.completed.get() + self.buckets.len() as u64)
    }

    pub(crate) fn in_flight(&self, e: Epoch) -> bool {
        e > self.completed && e <= self.issued()
    }

    /// Issues the next epoch.
    pub(crate) fn issue(&mut self) -> Epoch {
        self.buckets.push_back(EpochBucket::default());
        self.issued()
    }

    /// The bucket of an in-flight epoch.
    pub(crate) fn bucket_mut(&mut self, e: Epoch) -> &mut EpochBucket {
        debug_assert!(
            self.in_flight(e),
            "{e:?} is not in flight: checking it is the caller's job"
        );
        let k = (e.get() - self.completed.get() - 1) as usize;
        &mut self.buckets[k]
    }

    /// Retires the oldest in-flight epoch, returning it and its bucket.
    pub(crate) fn retire_next(&mut self) -> Option<(Epoch, EpochBucket)> {
        let bucket = self.buckets.pop_front()?;
        self.completed = self.completed.next();
        Some((self.completed, bucket))
    }

    /// Every write of the epochs still in flight, in epoch order and, within
    /// an epoch, in write order.
    pub(crate) fn in_flight_writes(&self) -> impl Iterator<Item = (BlockId, Generation)> + '_ {
        self.buckets.iter().flat_map(|b| b.written.iter().copied())
    }

    /// Entries released into the buckets of epochs up to `e`: what comes
    /// back (the current ones) once `e` completes.
    pub(crate) fn released_until(
        &self,
        e: Epoch,
    ) -> impl Iterator<Item = (Epoch, BlockId, u32)> + '_ {
        let first = self.completed.get() + 1;
        self.buckets
            .iter()
            .enumerate()
            .take_while(move |(k, _)| first + (*k as u64) <= e.get())
            .flat_map(move |(k, b)| {
                let epoch = Epoch::new(first + k as u64);
                b.released.iter().map(move |&(x, n)| (epoch, x, n))
            })
    }

    /// Whether `b` waits in the bucket of epoch `e` under release count `n`
    /// (invariant checks).
    pub(crate) fn holds(&self, e: Epoch, b: BlockId, n: u32) -> bool {
        self.in_flight(e)
            && self.buckets[(e.get() - self.completed.get() - 1) as usize]
                .released
                .contains(&(b, n))
    }
}
