//! The pool's side of the tiers below the arena (issue 7/10): lookups that
//! continue down the chain into the [`TierIndex`] and hand back a restore
//! plan; restore targets that stay *restoring* until their copy lands in a
//! step; and demotions, planned here and carried out by the engine.
//!
//! ```text
//!   lookup_and_pin_tiered ──> holder: [arena hits][restore targets][...]
//!                             targets restoring: not readable, not
//!                             writable, not publishable; their hashes
//!                             pending (a second request waits for this
//!                             copy instead of making its own); the tier
//!                             entries pinned by the holder
//!   restore_landed(E, n)  ──> the first n targets are written by step E
//!                             (the executor copies their bytes in before
//!                             E's forward pass); they publish when E
//!                             completes, like any write
//!   restore_failed(i)     ──> target i's entry goes from the tier index;
//!                             targets i.. become plain blocks to compute
//!   release               ──> tier pins dropped, targets freed
//! ```
//!
//! Demotions need no pin. A demotion of a block is carried by the next
//! step the engine sends, whose executor copies the block's bytes out
//! before anything else in that step (before poisoning, restores and the
//! forward pass). The block is published or was just evicted, so no step
//! in flight writes it (published blocks are never written, and a block
//! reaches the free queue only once its last step completed); whatever
//! reuses it is planned from now on, so it is that step or a later one,
//! and the copy comes first. The tier entry stays *landing*, found by no
//! one, until the store reports the bytes written.

use super::*;
use crate::tier_index::{Tier, TierIndex};

/// When the pool plans demotions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TierPolicy {
    /// Demote a cached block when the arena evicts it (write-back).
    pub write_back: bool,
    /// Demote a block soon after it is published, while the arena still
    /// has it (write-through: it survives a restart even if never
    /// evicted).
    pub write_through: bool,
    /// Write-through only for chains of at least this many blocks (an SSD
    /// wear rule: a short chat's few blocks are cheap to recompute).
    pub min_chain: u32,
    /// The tier a demotion is recorded under until the store says where
    /// it landed.
    pub first_tier: Option<Tier>,
}

impl TierPolicy {
    fn on(&self) -> bool {
        self.first_tier.is_some() && (self.write_back || self.write_through)
    }
}

/// A block to copy out of the arena into the tiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demotion {
    /// Where its bytes are now (until the step carrying this copies them).
    pub block: BlockId,
    /// Its chain hash.
    pub hash: BlockHash,
    /// The hash before it (the chain root for a first block).
    pub parent: BlockHash,
    /// Its tokens (the exact key beside the payload).
    pub tokens: Vec<TokenId>,
}

/// A block found below the arena, to be copied into `block`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restore {
    /// The restore target, in the holder's table.
    pub block: BlockId,
    /// Its generation.
    pub generation: Generation,
    /// The tier entry's hash.
    pub hash: BlockHash,
    /// Its exact key.
    pub parent: BlockHash,
    /// Its tokens.
    pub tokens: Vec<TokenId>,
    /// The tier it was found in.
    pub tier: Tier,
}

/// What a holder restores, in chain order after its arena hits.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RestorePlan {
    /// The restores, in chain order.
    pub restores: Vec<Restore>,
}

/// One restore still outstanding for a holder.
#[derive(Clone, Debug)]
pub(super) struct Outstanding {
    block: BlockId,
    hash: BlockHash,
    tokens: Vec<TokenId>,
}

impl Outstanding {
    pub(super) fn block(&self) -> BlockId {
        self.block
    }
}

impl BlockPool {
    /// Turns the tiers on (or off) for this pool.
    pub fn set_tier_policy(&mut self, policy: TierPolicy) {
        self.tier_policy = policy;
    }

    /// The tier index (entries below the arena).
    pub fn tiers(&self) -> &TierIndex {
        &self.tier_index
    }

    /// The tier index, for the engine's reports of what the stores did.
    pub fn tiers_mut(&mut self) -> &mut TierIndex {
        &mut self.tier_index
    }

    /// How many blocks below the arena continue `seq`'s cached prefix now
    /// (a look: nothing pinned), and the tier of the first.
    pub fn peek_tiers(&self, seq: &SequenceHasher) -> Result<(usize, Option<Tier>), KvError> {
        let (table, _) = self.walk(seq)?;
        let run = self.tier_run(seq, table.last().copied(), table.len(), usize::MAX);
        Ok((run.len(), run.first().map(|r| r.2)))
    }

    /// The visible tier entries continuing the chain after `hits` arena
    /// blocks (the last one `last`), under the same cap as a hit, at most
    /// `max`: (hash, parent hash, tier) each.
    fn tier_run(
        &self,
        seq: &SequenceHasher,
        last: Option<BlockId>,
        hits: usize,
        max: usize,
    ) -> Vec<(BlockHash, BlockHash, Tier)> {
        let bs = self.bs();
        let tokens = seq.tokens();
        let cap = tokens.len().saturating_sub(1) / bs;
        let mut parent = match last {
            Some(b) => match self.blocks[b.index()].hash {
                Some(h) => h,
                None => return Vec::new(),
            },
            None => seq.root().hash(),
        };
        let mut out = Vec::new();
        for (i, &hash) in seq.hashes().iter().enumerate().take(cap).skip(hits) {
            if out.len() == max || self.pending_block(hash).is_some() {
                break;
            }
            let toks = &tokens[i * bs..(i + 1) * bs];
            let Some(tier) = self.tier_index.find(hash, parent, toks) else {
                break;
            };
            out.push((hash, parent, tier));
            parent = hash;
        }
        out
    }

    /// [`Self::lookup_and_pin`], continued below the arena: after the arena
    /// hits, up to `max_restore` blocks found in the tiers are pinned
    /// there and get restore targets, allocated all or nothing in chain
    /// order (none if the free queue cannot give them all). The holder owns
    /// the arena pins, the tier pins and the targets.
    pub fn lookup_and_pin_tiered(
        &mut self,
        tag: OwnerTag,
        seq: &SequenceHasher,
        max_restore: usize,
    ) -> Result<(HolderId, PrefixHit, RestorePlan), KvError> {
        let (h, hit) = self.lookup_and_pin(tag, seq)?;
        if max_restore == 0 || self.tier_index.is_empty() {
            return Ok((h, hit, RestorePlan::default()));
        }
        let last = self.holder(h)?.blocks.last().copied();
        let run = self.tier_run(seq, last, hit.blocks, max_restore);
        if run.is_empty() || run.len() > self.free.len() {
            return Ok((h, hit, RestorePlan::default()));
        }
        self.allocate(h, run.len())?;
        let bs = self.bs();
        let mut plan = RestorePlan::default();
        for (k, (hash, parent, tier)) in run.into_iter().enumerate() {
            let i = hit.blocks + k;
            let b = self.holders[h.slot as usize].blocks[i];
            let tokens = seq.tokens()[i * bs..(i + 1) * bs].to_vec();
            let pinned = self.tier_index.pin(hash, parent, &tokens);
            debug_assert_eq!(pinned, Some(tier), "found under the same lock");
            let blk = &mut self.blocks[b.index()];
            blk.restoring = true;
            let generation = blk.generation;
            // A second request for this block waits for this copy.
            self.pending.insert(hash, (b, generation));
            self.holders[h.slot as usize]
                .restoring
                .push_back(Outstanding {
                    block: b,
                    hash,
                    tokens: tokens.clone(),
                });
            plan.restores.push(Restore {
                block: b,
                generation,
                hash,
                parent,
                tokens,
                tier,
            });
        }
        Ok((h, hit, plan))
    }

    /// Restores still outstanding for the holder.
    pub fn restoring(&self, h: HolderId) -> Result<usize, KvError> {
        Ok(self.holder(h)?.restoring.len())
    }

    /// The holder's first `n` outstanding restores land in step `epoch`:
    /// written by it (their bytes are copied in before its forward pass),
    /// published when it completes. Returns the blocks and generations, for
    /// the step's transfers and the sanitizer.
    pub fn restore_landed(
        &mut self,
        h: HolderId,
        epoch: Epoch,
        n: usize,
    ) -> Result<Vec<(BlockId, Generation)>, KvError> {
        self.check_in_flight(epoch)?;
        let holder = self.holder_mut(h)?;
        if n > holder.restoring.len() {
            return Err(KvError::NoRoom {
                holder: h,
                room: holder.restoring.len(),
                wanted: n,
            });
        }
        let landed: Vec<Outstanding> = holder.restoring.drain(..n).collect();
        let mut tokens = Vec::with_capacity(n * self.bs());
        let mut out = Vec::with_capacity(n);
        for o in &landed {
            self.settle_restore(o)?;
            tokens.extend_from_slice(&o.tokens);
            out.push((o.block, self.blocks[o.block.index()].generation));
        }
        self.write(h, epoch, &tokens)?;
        Ok(out)
    }

    /// The holder's outstanding restore `i` (0: the first still
    /// outstanding) failed: its tier entry goes, and it and every later
    /// outstanding target become plain empty blocks for the request to
    /// compute. Earlier outstanding ones stay.
    pub fn restore_failed(&mut self, h: HolderId, i: usize) -> Result<(), KvError> {
        let holder = self.holder_mut(h)?;
        if i >= holder.restoring.len() {
            return Ok(());
        }
        let failed: Vec<Outstanding> = holder.restoring.drain(i..).collect();
        let _ = self.tier_index.restore_failed(failed[0].hash);
        for o in &failed {
            self.settle_restore(o)?;
        }
        Ok(())
    }

    /// Ends one outstanding restore: the block stops restoring, its pending
    /// entry and its tier pin go.
    fn settle_restore(&mut self, o: &Outstanding) -> Result<(), KvError> {
        let blk = &mut self.blocks[o.block.index()];
        debug_assert!(blk.restoring, "{:?} was restoring", o.block);
        blk.restoring = false;
        if self.pending.get(&o.hash) == Some(&(o.block, blk.generation)) {
            self.pending.remove(&o.hash);
        }
        let _ = self.tier_index.unpin(o.hash);
        Ok(())
    }

    /// Drops the holder's outstanding restores (a release, or a truncation
    /// below them), keeping the tier entries: nothing was wrong with them,
    /// and the targets become plain blocks.
    pub(super) fn abandon_restores(&mut self, h: HolderId) {
        let outstanding = std::mem::take(&mut self.holders[h.slot as usize].restoring);
        for o in &outstanding {
            let _ = self.settle_restore(o);
        }
    }

    /// A published block the arena is evicting: a write-back demotion, if
    /// the policy wants one and no tier has the block yet. Called before
    /// the block's record is reset.
    pub(super) fn demote_on_evict(&mut self, b: BlockId) {
        if self.tier_policy.on() && self.tier_policy.write_back {
            self.queue_demotion(b);
        }
    }

    /// A block was just published: a write-through candidate, if the
    /// policy wants them.
    pub(super) fn on_published(&mut self, b: BlockId) {
        if !(self.tier_policy.on() && self.tier_policy.write_through) {
            return;
        }
        let min = self.tier_policy.min_chain.max(1);
        if self.blocks[b.index()].depth + 1 < min {
            // Too short so far: written once the chain reaches `min`.
            return;
        }
        // This block and the ancestors the rule held back.
        let mut cur = Some(b);
        while let Some(x) = cur {
            let blk = &self.blocks[x.index()];
            let Some(hash) = blk.hash.filter(|_| blk.published) else {
                break;
            };
            if self.tier_index.contains(hash) {
                break;
            }
            self.through.push((x, blk.generation));
            let held_back = |p: &Block| p.depth + 1 < min;
            cur = blk.parent.and_then(|(p, g)| {
                let pb = &self.blocks[p.index()];
                (pb.generation == g && held_back(pb)).then_some(p)
            });
        }
    }

    /// Records a demotion of published (or just unpublished) block `b` in
    /// the tier index, landing, and queues it for the next step.
    fn queue_demotion(&mut self, b: BlockId) {
        let blk = &self.blocks[b.index()];
        let Some(hash) = blk.hash else { return };
        if blk.tainted || self.tier_index.contains(hash) {
            return;
        }
        let parent = match blk.parent {
            None => blk.root,
            Some((p, g)) => {
                let pb = &self.blocks[p.index()];
                match pb.hash {
                    Some(ph) if pb.generation == g => ph,
                    _ => return,
                }
            }
        };
        let bs = self.bs();
        let tokens: Vec<TokenId> = self.tokens[b.index() * bs..(b.index() + 1) * bs]
            .iter()
            .map(|&t| TokenId::new(t))
            .collect();
        let Some(tier) = self.tier_policy.first_tier else {
            return;
        };
        if self
            .tier_index
            .begin_demotion(hash, parent, &tokens, tier)
            .is_ok()
        {
            self.demotions.push(Demotion {
                block: b,
                hash,
                parent,
                tokens,
            });
        }
    }

    /// Whether demotions are waiting for a step to carry them.
    pub fn demotions_waiting(&self) -> bool {
        !self.demotions.is_empty() || !self.through.is_empty()
    }

    /// The demotions the next step carries: every write-back demotion
    /// queued (their blocks are being reused) and up to `through_budget`
    /// write-through ones. The caller must put them in the next step it
    /// sends (see the module's note on why that needs no pin).
    pub fn take_demotions(&mut self, through_budget: usize) -> Vec<Demotion> {
        let mut n = 0;
        let through = std::mem::take(&mut self.through);
        let mut rest = Vec::new();
        for (b, g) in through {
            if n == through_budget {
                rest.push((b, g));
                continue;
            }
            let blk = &self.blocks[b.index()];
            if blk.generation == g && blk.published {
                // Counted only if it is queued (a shared ancestor listed by
                // several chains is queued once).
                let before = self.demotions.len();
                self.queue_demotion(b);
                n += self.demotions.len() - before;
            }
        }
        self.through = rest;
        std::mem::take(&mut self.demotions)
    }
}
