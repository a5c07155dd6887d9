//! Steps writing into blocks, and what their completion or failure does:
//! slots assigned (known tokens, or pending ones resolved later), a full
//! block's chain hash, publication under a published parent (clean chains),
//! `complete` (publish, then reclaim) and `fail` (taint what the step wrote
//! and what later steps built on it).

use super::*;

impl BlockPool {
    /// Issues the next step's epoch.
    pub fn next_epoch(&mut self) -> Epoch {
        self.quarantine.issue()
    }

    pub(super) fn check_in_flight(&self, epoch: Epoch) -> Result<(), KvError> {
        if self.quarantine.in_flight(epoch) {
            Ok(())
        } else {
            Err(KvError::EpochNotInFlight {
                epoch,
                completed: self.quarantine.completed(),
                issued: self.quarantine.issued(),
            })
        }
    }

    /// Records that step `epoch` reads every block of the holder, so none of
    /// them can be reused before it completes.
    pub fn touch(&mut self, h: HolderId, epoch: Epoch) -> Result<(), KvError> {
        self.check_in_flight(epoch)?;
        let holder = self.holder_mut(h)?;
        holder.last_epoch = holder.last_epoch.max(epoch);
        Ok(())
    }

    /// Step `epoch` writes `tokens` (known now) into the holder's next slots.
    /// Returns the position of the first one.
    pub fn write(
        &mut self,
        h: HolderId,
        epoch: Epoch,
        tokens: &[TokenId],
    ) -> Result<usize, KvError> {
        if let Some(t) = tokens.iter().find(|t| t.get() == UNKNOWN) {
            return Err(KvError::ReservedToken(t.get()));
        }
        self.write_slots(h, epoch, tokens.len(), |i| tokens[i].get())
    }

    /// Step `epoch` writes one token that the step before samples (a decode
    /// row planned ahead). Resolve it with [`Self::resolve`] once known.
    pub fn write_pending(&mut self, h: HolderId, epoch: Epoch) -> Result<SlotRef, KvError> {
        let pos = self.write_slots(h, epoch, 1, |_| UNKNOWN)?;
        let bs = self.bs();
        let b = self.holders[h.slot as usize].blocks[pos / bs];
        Ok(SlotRef {
            block: b,
            generation: self.blocks[b.index()].generation,
            slot: (pos % bs) as u32,
            pool: self.id,
        })
    }

    fn write_slots(
        &mut self,
        h: HolderId,
        epoch: Epoch,
        count: usize,
        token: impl Fn(usize) -> u32,
    ) -> Result<usize, KvError> {
        self.check_in_flight(epoch)?;
        let bs = self.bs();
        let holder = self.holder(h)?;
        let start = holder.tokens;
        let room = holder.blocks.len() * bs - start;
        if count > room {
            return Err(KvError::NoRoom {
                holder: h,
                room,
                wanted: count,
            });
        }
        // Check the write rule for every target block before changing anything.
        let first = start / bs;
        let last = (start + count).div_ceil(bs);
        for &b in &holder.blocks[first..last] {
            let blk = &self.blocks[b.index()];
            let reason = if blk.published {
                "published"
            } else if blk.restoring {
                "restoring: its copy has not landed"
            } else if blk.refcount != 1 {
                "held by more than one holder"
            } else if blk.tainted {
                "written by a failed step"
            } else if blk.filled as usize == bs {
                "full"
            } else {
                continue;
            };
            return Err(KvError::WriteRule { block: b, reason });
        }
        let targets: Vec<BlockId> = holder.blocks[first..last].to_vec();
        for (k, &b) in targets.iter().enumerate() {
            self.work += 1;
            let block_start = (first + k) * bs;
            let lo = start.max(block_start);
            let hi = (start + count).min(block_start + bs);
            for pos in lo..hi {
                let t = token(pos - start);
                self.tokens[b.index() * bs + pos - block_start] = t;
                if t == UNKNOWN {
                    self.blocks[b.index()].unknown += 1;
                }
            }
            let blk = &mut self.blocks[b.index()];
            blk.filled = (hi - block_start) as u32;
            blk.fill_epoch = epoch;
            blk.last_use = blk.last_use.max(epoch);
            let generation = blk.generation;
            self.quarantine
                .bucket_mut(epoch)
                .written
                .push((b, generation));
            self.on_content_change(b);
        }
        let holder = self.holder_mut(h).expect("checked above");
        holder.tokens = start + count;
        holder.last_epoch = holder.last_epoch.max(epoch);
        Ok(start)
    }

    /// Gives a pending slot its token. A reference to a block reallocated
    /// since is refused (a destroyed sequence's row cannot feed another), and
    /// so is one minted by another pool.
    pub fn resolve(&mut self, slot: SlotRef, token: TokenId) -> Result<(), KvError> {
        if slot.pool != self.id {
            return Err(KvError::ForeignSlot(slot.block));
        }
        if token.get() == UNKNOWN {
            return Err(KvError::ReservedToken(token.get()));
        }
        let bs = self.bs();
        let blk = self
            .blocks
            .get(slot.block.index())
            .filter(|_| (slot.slot as usize) < bs);
        let Some(blk) = blk else {
            return Err(KvError::StaleSlot {
                block: slot.block,
                recorded: slot.generation,
                current: Generation::ZERO,
            });
        };
        if blk.generation != slot.generation {
            return Err(KvError::StaleSlot {
                block: slot.block,
                recorded: slot.generation,
                current: blk.generation,
            });
        }
        let cell = &mut self.tokens[slot.block.index() * bs + slot.slot as usize];
        if *cell != UNKNOWN || slot.slot >= blk.filled {
            return Err(KvError::SlotAlreadyResolved {
                block: slot.block,
                slot: slot.slot as usize,
            });
        }
        *cell = token.get();
        self.blocks[slot.block.index()].unknown -= 1;
        self.on_content_change(slot.block);
        Ok(())
    }

    /// After a write or a resolve: a block now full with every token known
    /// gets its hash; if its step is in flight it becomes findable as
    /// pending, and if its step already completed it is published now.
    fn on_content_change(&mut self, b: BlockId) {
        let blk = &self.blocks[b.index()];
        if blk.filled as usize != self.bs() || blk.unknown > 0 || blk.tainted {
            return;
        }
        let Some(hash) = self.compute_hash(b) else {
            return;
        };
        let generation = self.blocks[b.index()].generation;
        let parent_tainted = self.blocks[b.index()].parent.is_some_and(|(p, g)| {
            let pb = &self.blocks[p.index()];
            pb.generation == g && pb.tainted
        });
        if parent_tainted {
            // Computed over a failed step's KV: garbage, whatever its own
            // step does. (A copy's source is not asked here: a source tainted
            // now may have been written after the copy was taken; `fail`
            // judges copies while both steps are in flight.)
            self.taint(b, generation);
            return;
        }
        if self.blocks[b.index()].fill_epoch <= self.quarantine.completed() {
            self.publish(b, generation);
        } else if self.pending_block(hash).is_none() && !self.index.contains_key(&hash) {
            self.pending.insert(hash, (b, generation));
        }
    }

    /// Whether the block's parent is the root or is published at the
    /// generation the block recorded.
    fn parent_published(&self, b: BlockId) -> bool {
        match self.blocks[b.index()].parent {
            None => true,
            Some((p, g)) => {
                let pb = &self.blocks[p.index()];
                pb.generation == g && pb.published
            }
        }
    }

    /// The block's chain hash, computed once it is full and known.
    fn compute_hash(&mut self, b: BlockId) -> Option<BlockHash> {
        let blk = &self.blocks[b.index()];
        if let Some(h) = blk.hash {
            return Some(h);
        }
        let parent_hash = match blk.parent {
            None => blk.root,
            Some((p, g)) => {
                let pb = &self.blocks[p.index()];
                // A parent reallocated meanwhile breaks the chain: never publish.
                if pb.generation != g {
                    return None;
                }
                pb.hash?
            }
        };
        let bs = self.bs();
        let toks: Vec<TokenId> = self.tokens[b.index() * bs..(b.index() + 1) * bs]
            .iter()
            .map(|&t| TokenId::new(t))
            .collect();
        let hash = self.hasher.hash_block(parent_hash, &toks);
        self.blocks[b.index()].hash = Some(hash);
        Some(hash)
    }

    /// Enters a completed, full, known block into the index, unless the hash
    /// is there already (then the first block stays and this one remains
    /// uncached).
    fn publish(&mut self, b: BlockId, generation: Generation) {
        let blk = &self.blocks[b.index()];
        if blk.generation != generation
            || blk.published
            || blk.tainted
            || blk.filled as usize != self.bs()
            || blk.unknown > 0
            || blk.fill_epoch > self.quarantine.completed()
        {
            return;
        }
        self.work += 1;
        let Some(hash) = self.compute_hash(b) else {
            return;
        };
        if self.pending.get(&hash) == Some(&(b, generation)) {
            self.pending.remove(&hash);
        }
        // Clean chains: only under a parent that is itself in the index at
        // the generation this block recorded. A duplicate's children, or
        // anything below a failed step's blocks, stay uncached: in the index
        // they would take the hash from the correct chain.
        if !self.parent_published(b) || self.index.contains_key(&hash) {
            return;
        }
        self.index.insert(hash, b);
        let blk = &mut self.blocks[b.index()];
        blk.published = true;
        if blk.state == BlockState::Free {
            // It was reclaimed as empty (front); cached blocks live at the back.
            self.free.remove(b);
            self.free.push_back(b);
        }
        self.on_published(b);
    }

    /// Every step up to `epoch` has finished: publish the blocks those steps
    /// filled, then reclaim the quarantined blocks whose window closed.
    ///
    /// NOTE: publishing first matters for the LRU order. A block reclaimed
    /// and published by the same completion (a request aborted mid-prefill,
    /// or a wasted row that fills the tail) must join the queue's back in
    /// release order, tail first; reclaimed while still unpublished it would
    /// go to the front, and publishing it afterwards would append the chain
    /// parent first, so a child would outlive its parent.
    pub fn complete(&mut self, epoch: Epoch) -> Result<(), KvError> {
        self.check_in_flight(epoch)?;
        while self.quarantine.completed() < epoch {
            let (e, bucket) = self.quarantine.retire_next().expect("epoch is in flight");
            for &(b, g) in &bucket.written {
                self.publish(b, g);
            }
            self.reclaim(e, &bucket.released);
        }
        Ok(())
    }

    /// Step `epoch` failed (every step before it finished): reclaim as
    /// [`Self::complete`] does, but publish nothing `epoch` wrote; the blocks
    /// it wrote are marked failed and will never be published.
    pub fn fail(&mut self, epoch: Epoch) -> Result<(), KvError> {
        self.check_in_flight(epoch)?;
        if epoch.get() > self.quarantine.completed().get() + 1 {
            self.complete(Epoch::new(epoch.get() - 1))?;
        }
        let (e, bucket) = self.quarantine.retire_next().expect("epoch is in flight");
        for &(b, g) in &bucket.written {
            self.taint(b, g);
        }
        // Steps already planned on top of the failed one (the overlap) wrote
        // below its blocks: what they wrote there is garbage too. Buckets are
        // in epoch order and each in write order, so a chain's parent is
        // seen before its child.
        let later: Vec<(BlockId, Generation)> = self
            .quarantine
            .in_flight_writes()
            .filter(|&(b, g)| {
                let blk = &self.blocks[b.index()];
                blk.generation == g && !blk.published
            })
            .collect();
        for (b, g) in later {
            self.work += 1;
            if self.blocks[b.index()].built_on_taint(&self.blocks, e) {
                self.taint(b, g);
            }
        }
        self.reclaim(e, &bucket.released);
        Ok(())
    }

    /// Marks a block a failed step wrote (or built on): never published,
    /// never written again, never read by a later step (the sanitizer).
    fn taint(&mut self, b: BlockId, g: Generation) {
        self.work += 1;
        let blk = &mut self.blocks[b.index()];
        if blk.generation != g || blk.published {
            return;
        }
        blk.tainted = true;
        if let Some(hash) = blk.hash
            && self.pending.get(&hash) == Some(&(b, g))
        {
            self.pending.remove(&hash);
        }
    }

    fn reclaim(&mut self, e: Epoch, released: &[(BlockId, u32)]) {
        for &(b, n) in released {
            self.work += 1;
            let blk = &mut self.blocks[b.index()];
            // Stale entries: pinned again since (and maybe re-released, with
            // a later entry), or already reclaimed.
            if blk.state != BlockState::Quarantined || blk.quarantines != n {
                continue;
            }
            debug_assert_eq!(blk.refcount, 0);
            debug_assert!(blk.last_use <= e);
            blk.state = BlockState::Free;
            self.quarantined -= 1;
            self.push_free(b);
        }
    }

    pub(super) fn push_free(&mut self, b: BlockId) {
        // Cached blocks queue at the back in the order they are freed; empty
        // ones go to the front, to be reused before any cached block.
        if self.blocks[b.index()].published {
            self.free.push_back(b);
        } else {
            self.free.push_front(b);
        }
    }
}
