//! The checks: the sanitizer's validation of a step's accesses, and the
//! pool's invariants (tests call `check_invariants` after every mutation,
//! the engine's sanitizer every N steps).

use super::*;

impl BlockPool {
    /// Checks a step's recorded `(block, generation)` accesses: each block
    /// must still be at that generation and either held or waiting in
    /// quarantine for a step no earlier than `step`; no failed step may have
    /// written it; and a write goes only into an unpublished block with at
    /// most one holder (invariant 6; none is a finished request's wasted row,
    /// its block in quarantine for this step).
    pub fn validate(
        &self,
        step: Epoch,
        accesses: &[(BlockId, Generation, Access)],
    ) -> Result<(), KvError> {
        for &(b, recorded, access) in accesses {
            let Some(blk) = self.blocks.get(b.index()) else {
                return Err(self.violation(step, b, recorded, access, "no such block"));
            };
            let reason = if blk.generation != recorded {
                "reallocated since the step was planned"
            } else if blk.state == BlockState::Free {
                "free: no holder and no step in flight keeps it"
            } else if blk.state == BlockState::Quarantined && blk.last_use < step {
                "waiting in quarantine for an earlier step only"
            } else if blk.tainted {
                "written by a failed step"
            } else if blk.restoring {
                "restoring: its copy has not landed"
            } else if access == Access::Write && blk.published {
                "published: shared content is never written"
            } else if access == Access::Write && blk.refcount > 1 {
                "held by more than one holder"
            } else {
                continue;
            };
            return Err(self.violation(step, b, recorded, access, reason));
        }
        Ok(())
    }

    fn violation(
        &self,
        step: Epoch,
        b: BlockId,
        recorded: Generation,
        access: Access,
        reason: &'static str,
    ) -> KvError {
        let blk = self.blocks.get(b.index());
        let owners = self
            .holders
            .iter()
            .filter(|h| h.live && h.blocks.contains(&b))
            .map(|h| h.tag)
            .collect();
        KvError::Violation(Box::new(Violation {
            reason,
            step,
            access,
            block: b,
            recorded,
            current: blk.map_or(Generation::ZERO, |x| x.generation),
            state: blk.map_or(BlockState::Free, |x| x.state),
            last_use: blk.map_or(Epoch::ZERO, |x| x.last_use),
            completed: self.quarantine.completed(),
            owners,
        }))
    }

    // ----- invariants -----

    /// Whether the pool is whole: no live holder, no epoch in flight, every
    /// block free.
    pub fn is_whole(&self) -> bool {
        self.live_holders() == 0
            && self.quarantine.issued() == self.quarantine.completed()
            && self.free.len() == self.blocks.len()
    }

    /// Checks the invariants listed on [`BlockPool`]. O(pool size): tests call
    /// it after every mutation; the server never does.
    pub fn check_invariants(&self) -> Result<(), String> {
        let bs = self.bs();
        let completed = self.quarantine.completed();
        self.free.check()?;
        let mut in_free = vec![false; self.blocks.len()];
        for b in self.free.iter() {
            if std::mem::replace(&mut in_free[b.index()], true) {
                return Err(format!("{b:?} is in the free queue twice"));
            }
        }
        let mut holders_of = vec![0u32; self.blocks.len()];
        let mut restoring_of = vec![0u32; self.blocks.len()];
        let mut tier_pins = 0u64;
        for h in self.holders.iter().filter(|h| h.live) {
            tier_pins += h.restoring.len() as u64;
            for o in &h.restoring {
                restoring_of[o.block().index()] += 1;
                let at = h.blocks.iter().position(|&b| b == o.block());
                if at.is_none_or(|i| i * bs < h.tokens) {
                    return Err(format!(
                        "{:?}'s restore target {:?} is not past its tokens",
                        h.tag,
                        o.block()
                    ));
                }
            }
            if h.tokens > h.blocks.len() * bs {
                return Err(format!(
                    "holder {:?} claims {} tokens in {} blocks",
                    h.tag,
                    h.tokens,
                    h.blocks.len()
                ));
            }
            for (i, &b) in h.blocks.iter().enumerate() {
                holders_of[b.index()] += 1;
                let blk = &self.blocks[b.index()];
                let expected = (i > 0).then(|| {
                    (
                        h.blocks[i - 1],
                        self.blocks[h.blocks[i - 1].index()].generation,
                    )
                });
                if blk.parent != expected {
                    return Err(format!(
                        "{b:?} at position {i} of {:?} does not chain to its predecessor",
                        h.tag
                    ));
                }
                if (i + 1) * bs <= h.tokens && blk.filled as usize != bs {
                    return Err(format!(
                        "{b:?} lies inside {:?}'s tokens but is not full",
                        h.tag
                    ));
                }
            }
        }
        let (mut free, mut owned, mut quarantined, mut published) = (0, 0, 0, 0);
        for (i, blk) in self.blocks.iter().enumerate() {
            let b = BlockId::new(i as u32);
            if blk.refcount != holders_of[i] {
                return Err(format!(
                    "{b:?} has refcount {} but {} holders (invariant 4)",
                    blk.refcount, holders_of[i]
                ));
            }
            if blk.restoring != (restoring_of[i] == 1)
                || restoring_of[i] > 1
                || (blk.restoring && (blk.refcount != 1 || blk.filled != 0))
            {
                return Err(format!(
                    "{b:?}: restoring {} but {} outstanding restores name it (refcount {}, filled {})",
                    blk.restoring, restoring_of[i], blk.refcount, blk.filled
                ));
            }
            match blk.state {
                BlockState::Free => {
                    free += 1;
                    if !in_free[i] || blk.refcount != 0 || blk.last_use > completed {
                        return Err(format!(
                            "free {b:?} breaks invariant 2 (in queue {}, refcount {}, last use {:?}, completed {completed:?})",
                            in_free[i], blk.refcount, blk.last_use
                        ));
                    }
                }
                BlockState::Owned => {
                    owned += 1;
                    if in_free[i] || blk.refcount == 0 {
                        return Err(format!(
                            "owned {b:?} is in the free queue or has refcount 0"
                        ));
                    }
                }
                BlockState::Quarantined => {
                    quarantined += 1;
                    if in_free[i] || blk.refcount != 0 || blk.last_use <= completed {
                        return Err(format!(
                            "quarantined {b:?} breaks its rules (last use {:?}, completed {completed:?})",
                            blk.last_use
                        ));
                    }
                    if !self.quarantine.holds(blk.last_use, b, blk.quarantines) {
                        return Err(format!(
                            "quarantined {b:?} is not in the bucket of its last use {:?}",
                            blk.last_use
                        ));
                    }
                }
            }
            if blk.published {
                published += 1;
                let hash = blk
                    .hash
                    .ok_or_else(|| format!("published {b:?} has no hash"))?;
                if self.index.get(&hash) != Some(&b) {
                    return Err(format!(
                        "published {b:?} is not indexed under its hash (invariant 3)"
                    ));
                }
                if blk.filled as usize != bs
                    || blk.unknown != 0
                    || blk.tainted
                    || blk.fill_epoch > completed
                {
                    return Err(format!(
                        "published {b:?} is incomplete, failed or not yet completed (invariant 3/6)"
                    ));
                }
            }
            if blk.unknown as usize
                != self.tokens[i * bs..i * bs + blk.filled as usize]
                    .iter()
                    .filter(|&&t| t == UNKNOWN)
                    .count()
            {
                return Err(format!("{b:?} miscounts its pending tokens"));
            }
        }
        if free + owned + quarantined != self.blocks.len() || free != self.free.len() {
            return Err(format!(
                "states do not add up: {free} free + {owned} owned + {quarantined} quarantined != {} (invariant 1)",
                self.blocks.len()
            ));
        }
        if owned != self.owned || quarantined != self.quarantined {
            return Err(format!(
                "gauges drifted: owned {} vs {owned}, quarantined {} vs {quarantined}",
                self.owned, self.quarantined
            ));
        }
        if published != self.index.len() {
            return Err(format!(
                "{} index entries but {published} published blocks (invariant 3)",
                self.index.len()
            ));
        }
        for (hash, &b) in &self.index {
            if self.blocks[b.index()].hash != Some(*hash) {
                return Err(format!(
                    "index entry {hash:?} points at {b:?}, whose hash differs"
                ));
            }
            let blk = &self.blocks[b.index()];
            if let Some((p, g)) = blk.parent {
                let pb = &self.blocks[p.index()];
                if pb.generation != g || !pb.published {
                    return Err(format!(
                        "published {b:?} hangs under {p:?}, which is not published at {g:?} (invariant 7)"
                    ));
                }
            }
        }
        let mut rank = vec![usize::MAX; self.blocks.len()];
        for (i, b) in self.free.iter().enumerate() {
            rank[b.index()] = i;
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            if !blk.published || rank[i] == usize::MAX {
                continue;
            }
            if let Some((p, g)) = blk.parent
                && self.blocks[p.index()].generation == g
                && self.blocks[p.index()].published
                && rank[p.index()] != usize::MAX
                && rank[p.index()] < rank[i]
            {
                return Err(format!(
                    "free b{i} would outlive its parent {p:?}: evicted after it (invariant 8)"
                ));
            }
        }
        for (hash, &(b, g)) in &self.pending {
            let blk = &self.blocks[b.index()];
            if blk.generation == g && !blk.restoring && (blk.hash != Some(*hash) || blk.published) {
                return Err(format!("pending entry {hash:?} -> {b:?} is wrong"));
            }
        }
        self.tier_index.check_invariants()?;
        if self.tier_index.pins() != tier_pins {
            return Err(format!(
                "the tier index holds {} pins but holders' restores {tier_pins}",
                self.tier_index.pins()
            ));
        }
        if self.live_holders() == 0
            && self.quarantine.issued() == completed
            && free != self.blocks.len()
        {
            return Err(format!(
                "no holder and nothing in flight, but only {free} of {} blocks free (invariant 5)",
                self.blocks.len()
            ));
        }
        Ok(())
    }
}
