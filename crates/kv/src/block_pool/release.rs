//! Giving blocks back: a holder's release (tail first, each block into
//! quarantine or the free queue by its own window), truncation to known
//! good content, what a release or a completion would give back (for the
//! scheduler's room), and trimming the cache.

use super::*;

impl BlockPool {
    /// Releases every block of the holder, tail first (so a prefix outlives
    /// its extensions in the LRU order), and forgets the holder.
    pub fn release(&mut self, h: HolderId) -> Result<(), KvError> {
        self.holder(h)?;
        self.abandon_restores(h);
        let holder = &mut self.holders[h.slot as usize];
        holder.live = false;
        let blocks = std::mem::take(&mut holder.blocks);
        let last_epoch = holder.last_epoch;
        for &b in blocks.iter().rev() {
            self.decref(b, last_epoch);
        }
        self.free_holder_slots.push(h.slot);
        Ok(())
    }

    /// Shortens the holder to at most `tokens` tokens, keeping only content
    /// known good, and returns how many it kept. Every step that used the
    /// holder must have completed.
    ///
    /// Blocks from the first one a failed step wrote are dropped; a kept
    /// partial block is cut back to its first `tokens % block_size` slots if
    /// only this holder has it and it is unpublished, and dropped otherwise.
    /// Dropped blocks are released tail first (cached ones stay cached).
    ///
    /// ```text
    ///   before: [ b0 full ][ b1 full ][ b2 ..x.. ][ b3 ]     tokens = 10
    ///   truncate(7), bs 4:  [ b0 ][ b1: 3 slots ]            b2, b3 released
    /// ```
    pub fn truncate(&mut self, h: HolderId, tokens: usize) -> Result<usize, KvError> {
        let bs = self.bs();
        let completed = self.quarantine.completed();
        let holder = self.holder(h)?;
        if !holder.restoring.is_empty() {
            // Cut below what restores: they become plain blocks first.
            self.abandon_restores(h);
        }
        let holder = self.holder(h)?;
        if holder.last_epoch > completed {
            return Err(KvError::HolderInFlight {
                holder: h,
                last_epoch: holder.last_epoch,
                completed,
            });
        }
        let mut keep = tokens.min(holder.tokens);
        // Good content ends at the first block a failed step wrote, and at
        // the first slot whose token never arrived (a row that never ran).
        for (i, &b) in holder.blocks.iter().enumerate().take(keep.div_ceil(bs)) {
            let blk = &self.blocks[b.index()];
            if blk.tainted {
                keep = keep.min(i * bs);
                break;
            }
            if blk.unknown > 0 {
                let slots = &self.tokens[b.index() * bs..b.index() * bs + blk.filled as usize];
                let first = slots.iter().position(|&t| t == UNKNOWN).unwrap_or(bs);
                keep = keep.min(i * bs + first);
                break;
            }
        }
        if keep % bs != 0 {
            let blk = &self.blocks[holder.blocks[keep / bs].index()];
            if blk.published || blk.refcount > 1 {
                keep -= keep % bs;
            }
        }
        let last_epoch = holder.last_epoch;
        let kept_blocks = keep.div_ceil(bs);
        let cut: Vec<BlockId> = holder.blocks[kept_blocks..].to_vec();
        if keep % bs != 0 {
            // Cut the kept partial block back; its slots past `keep` are
            // written again by whoever extends the holder. Its content is
            // new from here, so it takes a new generation: blocks computed
            // over its old content no longer chain to it, and references to
            // its old slots are stale.
            let b = holder.blocks[keep / bs];
            let filled = keep % bs;
            let start = b.index() * bs;
            let blk = &mut self.blocks[b.index()];
            if blk.filled as usize > filled {
                if let Some(hash) = blk.hash.take()
                    && self.pending.get(&hash) == Some(&(b, blk.generation))
                {
                    self.pending.remove(&hash);
                }
                blk.filled = filled as u32;
                blk.unknown = 0;
                blk.generation.bump();
                self.tokens[start + filled..start + bs].fill(UNKNOWN);
            }
        }
        let holder = &mut self.holders[h.slot as usize];
        holder.blocks.truncate(kept_blocks);
        holder.tokens = keep;
        for &b in cut.iter().rev() {
            self.decref(b, last_epoch);
        }
        Ok(keep)
    }

    /// What releasing the holder now would give back: the blocks only it
    /// holds, split into those free at once and those a step in flight still
    /// uses (they come back when it completes). Shared blocks give nothing.
    pub fn release_yield(&self, h: HolderId) -> Result<ReleaseYield, KvError> {
        self.release_yield_of(&[h], &[])
    }

    /// What releasing all of `holders` together would give back: the blocks
    /// no one else holds (two sessions sharing a system prompt give it back
    /// together, though neither does alone), less `keep` (blocks about to be
    /// pinned again, say by the admission the room is made for).
    pub fn release_yield_of(
        &self,
        holders: &[HolderId],
        keep: &[BlockId],
    ) -> Result<ReleaseYield, KvError> {
        let completed = self.quarantine.completed();
        // Per block: how many of these holders hold it, and the latest step
        // of those holders.
        let mut held: FxHashMap<BlockId, (u32, Epoch)> = FxHashMap::default();
        for &h in holders {
            let holder = self.holder(h)?;
            for &b in &holder.blocks {
                let e = held.entry(b).or_insert((0, Epoch::ZERO));
                e.0 += 1;
                e.1 = e.1.max(holder.last_epoch);
            }
        }
        let mut y = ReleaseYield::default();
        for (b, (n, last)) in held {
            let blk = &self.blocks[b.index()];
            if blk.refcount != n || keep.contains(&b) {
                continue;
            }
            if blk.last_use.max(last) <= completed {
                y.now += 1;
            } else {
                y.later += 1;
            }
        }
        Ok(y)
    }

    /// Blocks waiting in quarantine whose window closes once `epoch`
    /// completes: what comes back to the free queue then.
    pub fn returning_by(&self, epoch: Epoch) -> usize {
        self.quarantine
            .released_until(epoch)
            .filter(|&(_, b, n)| {
                let blk = &self.blocks[b.index()];
                blk.state == BlockState::Quarantined && blk.quarantines == n
            })
            .count()
    }

    /// Drops one reference; the block's window becomes the later of its own
    /// and this holder's last epoch.
    pub(super) fn decref(&mut self, b: BlockId, last_epoch: Epoch) {
        self.work += 1;
        let completed = self.quarantine.completed();
        let blk = &mut self.blocks[b.index()];
        debug_assert!(blk.refcount > 0 && blk.state == BlockState::Owned);
        blk.last_use = blk.last_use.max(last_epoch);
        blk.refcount -= 1;
        if blk.refcount > 0 {
            return;
        }
        self.owned -= 1;
        if blk.last_use > completed {
            blk.state = BlockState::Quarantined;
            blk.quarantines = blk.quarantines.wrapping_add(1);
            let (last_use, n) = (blk.last_use, blk.quarantines);
            self.quarantined += 1;
            self.quarantine.bucket_mut(last_use).released.push((b, n));
        } else {
            blk.state = BlockState::Free;
            self.push_free(b);
        }
    }

    // ----- cache maintenance -----

    /// Drops up to `limit` free cached blocks from the index, coldest first
    /// (a cache clear or a memory-pressure trim). Never touches a block that
    /// is owned or quarantined.
    pub fn evict_cached(&mut self, limit: usize) -> Vec<Evicted> {
        let mut out = Vec::new();
        let mut cur = self.free.front();
        while let Some(b) = cur {
            if out.len() == limit {
                break;
            }
            cur = self.free.next(b);
            self.work += 1;
            let blk = &mut self.blocks[b.index()];
            if !blk.published {
                continue;
            }
            let hash = blk.hash.expect("a published block has a hash");
            // An eviction like any other: with write-back on, the block
            // goes down to the tiers (the staging bound caps how much).
            self.demote_on_evict(b);
            let blk = &mut self.blocks[b.index()];
            blk.published = false;
            self.index.remove(&hash);
            self.stats.evictions += 1;
            out.push(Evicted { block: b, hash });
            self.free.remove(b);
            self.free.push_front(b);
        }
        out
    }
}
