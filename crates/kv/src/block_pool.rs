//! The block pool: every block's state, refcount, epoch window and content
//! record; the prefix index; the free queue; the holders.
//!
//! This is a plain single-owner state machine (`&mut self` everywhere). For
//! use from several threads, wrap it in [`crate::KvCache`], which adds the
//! lock and the RAII guards; see there for the concurrency choice.
//!
//! A request's life, as the pool sees it:
//!
//! ```text
//!   lookup_and_pin ──> holder with the hit blocks (pinned, refcount +1)
//!   allocate(n)    ──> n fresh blocks appended to the holder's table
//!   next_epoch     ──> E
//!   write(E, ...)  ──> slots assigned; a block whose last slot E writes is
//!                      "filled by E" and findable as pending
//!   touch(E)       ──> E reads the holder's blocks
//!   release        ──> refcount -1, tail first; a block whose window has not
//!                      closed goes to quarantine, else to the free queue
//!   complete(E)    ──> publish the blocks filled by steps <= E (under a
//!                      published parent only), then reclaim quarantined
//!                      blocks whose last use <= E
//! ```

use rustc_hash::FxHashMap;

use crate::block_hash::{BlockHasher, ChainRoot, SequenceHasher};
use crate::error::{Access, BlockState, KvError, Violation};
use crate::free_queue::FreeQueue;
use crate::ids::{BlockHash, BlockId, Epoch, Generation, HolderId, OwnerTag, TokenId};
use crate::quarantine::Quarantine;
use crate::tier_index::TierIndex;

pub use tiers::{Demotion, Restore, RestorePlan, TierPolicy};

/// The pool's fixed shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Blocks in the arena.
    pub num_blocks: u32,
    /// Token slots per block.
    pub block_size: u32,
}

/// Marks a slot whose token is not known yet. Token ids are checked to never
/// take this value.
const UNKNOWN: u32 = u32::MAX;

/// A slot whose token a step will sample: resolved with [`BlockPool::resolve`].
///
/// It can be made only by the pool that assigned the slot, and only that
/// pool resolves it: another pool's block with the same index and
/// generation is a different block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SlotRef {
    /// The block holding the slot.
    pub block: BlockId,
    /// Its generation when the slot was assigned.
    pub generation: Generation,
    /// The slot within the block.
    pub slot: u32,
    /// The pool that assigned it.
    pool: PoolId,
}

/// Which pool minted a [`SlotRef`]: a process-wide counter, so no two pools
/// share one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct PoolId(u64);

impl PoolId {
    fn fresh() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// What releasing a holder now would give back (see
/// [`BlockPool::release_yield`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ReleaseYield {
    /// Blocks only this holder holds whose window has closed: free at once.
    pub now: usize,
    /// Blocks only this holder holds that a step in flight still uses: they
    /// wait in quarantine until it completes.
    pub later: usize,
}

/// The outcome of [`BlockPool::lookup_and_pin`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PrefixHit {
    /// Leading blocks found and pinned.
    pub blocks: usize,
    /// Tokens they cover (`blocks * block_size`).
    pub tokens: usize,
    /// The next block of the prompt is being filled by another sequence
    /// right now: waiting for its publication beats computing it again.
    pub pending: Option<BlockHash>,
}

/// The outcome of [`BlockPool::peek_prefix`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PrefixPeek {
    /// What a lookup would hit now.
    pub hit: PrefixHit,
    /// The blocks it would pin.
    pub blocks: Vec<BlockId>,
    /// Of those, the ones in the free queue now (pinning them takes them
    /// out of it).
    pub free: usize,
}

/// A cached block whose hash left the index to make room.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Evicted {
    /// The block (now reallocated, or now empty).
    pub block: BlockId,
    /// The hash it was cached under.
    pub hash: BlockHash,
}

/// A copy the store must perform before the step writes into `dst`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CowCopy {
    /// The shared partial block.
    pub src: BlockId,
    /// Its private copy, now in the holder's table.
    pub dst: BlockId,
    /// Slots to copy.
    pub slots: u32,
}

/// Counters and gauges of the pool.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PoolStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks in the free queue.
    pub free: usize,
    /// Blocks with a holder.
    pub owned: usize,
    /// Blocks waiting for their last epoch.
    pub quarantined: usize,
    /// Blocks in the prefix index.
    pub cached: usize,
    /// Prompt tokens looked up.
    pub query_tokens: u64,
    /// Prompt tokens found cached.
    pub hit_tokens: u64,
    /// Cached blocks whose hash left the index.
    pub evictions: u64,
    /// Last issued epoch.
    pub issued: Epoch,
    /// Last completed epoch.
    pub completed: Epoch,
}

/// One block's metadata.
#[derive(Clone)]
struct Block {
    state: BlockState,
    refcount: u32,
    generation: Generation,
    /// The last epoch that referenced the block (read or write).
    last_use: Epoch,
    /// Slots assigned so far.
    filled: u32,
    /// Assigned slots whose token is still pending.
    unknown: u32,
    /// The epoch that assigned the latest slot: once full, the block is
    /// "filled by" this epoch and publishable when it completes.
    fill_epoch: Epoch,
    /// The chain hash, once the block is full and every token is known.
    hash: Option<BlockHash>,
    /// The hash is in the index, pointing here.
    published: bool,
    /// A step that wrote into it failed: its content is garbage, never publish.
    tainted: bool,
    /// The previous block of its chain, at the generation it had then.
    parent: Option<(BlockId, Generation)>,
    /// A copy on write's source, whose KV its first slots are a copy of,
    /// and the step that copies it.
    source: Option<(BlockId, Generation, Epoch)>,
    /// How many times it entered quarantine: tells its current quarantine
    /// entry from stale ones.
    quarantines: u32,
    /// The chain root, used as the parent hash of a chain's first block.
    root: BlockHash,
    /// A restore target whose copy has not landed: not readable, writable
    /// or publishable (see `tiers.rs`).
    restoring: bool,
    /// Its position in its chain (0: the first block).
    depth: u32,
}

impl Block {
    fn empty() -> Self {
        Self {
            state: BlockState::Free,
            refcount: 0,
            generation: Generation::ZERO,
            last_use: Epoch::ZERO,
            filled: 0,
            unknown: 0,
            fill_epoch: Epoch::ZERO,
            hash: None,
            published: false,
            tainted: false,
            parent: None,
            source: None,
            quarantines: 0,
            root: BlockHash::from_bits(0),
            restoring: false,
            depth: 0,
        }
    }

    /// Whether its KV was computed over, or copied from, what the failed
    /// step `failed` wrote: a tainted parent, or a tainted source copied by
    /// a later step (a source tainted by a write after the copy was taken
    /// does not matter). Asked of writes in flight after the failed step,
    /// which were planned on top of what it wrote.
    fn built_on_taint(&self, blocks: &[Block], failed: Epoch) -> bool {
        let tainted = |(p, g): (BlockId, Generation)| {
            let pb = &blocks[p.index()];
            pb.generation == g && pb.tainted
        };
        self.parent.is_some_and(tainted)
            || self
                .source
                .is_some_and(|(p, g, copied)| copied > failed && tainted((p, g)))
    }
}

/// A holder's record: a sequence's block table, a session, a pin.
struct Holder {
    generation: u32,
    live: bool,
    tag: OwnerTag,
    root: ChainRoot,
    blocks: Vec<BlockId>,
    /// Slots assigned in `blocks` (the sequence length in the arena).
    tokens: usize,
    /// The latest epoch that read or wrote through this holder.
    last_epoch: Epoch,
    /// Restores not landed yet, in chain order (see `tiers.rs`).
    restoring: std::collections::VecDeque<tiers::Outstanding>,
}

/// The block pool.
///
/// # Invariants
/// Checked by [`BlockPool::check_invariants`]:
/// 1. Every block is in exactly one state; free + owned + quarantined = total.
/// 2. The free queue holds exactly the refcount-0 blocks whose last use has
///    completed.
/// 3. The index maps a hash only to a published block whose content is
///    complete and whose hash it is, and each block is under at most one hash.
/// 4. Each block's refcount equals the number of live holders' table entries
///    that reference it.
/// 5. With no live holder and no epoch in flight, every block is free.
/// 6. Published blocks are full and never written again: `write` refuses any
///    block that is published, full, failed, or held more than once.
/// 7. Clean chains: a published block's parent is the root or a block
///    published at the generation it recorded; no failed step wrote it or
///    any block above it.
/// 8. LRU order: of two free published blocks where one extends the other,
///    the extension is nearer the front (a prefix outlives its extensions).
pub struct BlockPool {
    id: PoolId,
    config: PoolConfig,
    hasher: BlockHasher,
    blocks: Vec<Block>,
    /// Token ids, `block_size` per block; `UNKNOWN` where pending.
    tokens: Vec<u32>,
    free: FreeQueue,
    index: FxHashMap<BlockHash, BlockId>,
    /// Blocks being filled by in-flight steps, findable so others can wait.
    pending: FxHashMap<BlockHash, (BlockId, Generation)>,
    quarantine: Quarantine,
    holders: Vec<Holder>,
    free_holder_slots: Vec<u32>,
    owned: usize,
    quarantined: usize,
    stats: PoolStats,
    /// Block records touched, for showing that operations are O(1) per block.
    work: u64,
    /// What the tiers below the arena hold (see `tiers.rs`).
    tier_index: TierIndex,
    tier_policy: TierPolicy,
    /// Demotions planned, for the next step to carry.
    demotions: Vec<Demotion>,
    /// Published blocks waiting for a write-through demotion.
    through: Vec<(BlockId, Generation)>,
}

impl std::fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockPool")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl BlockPool {
    /// A pool of `config.num_blocks` empty blocks, all free. `hasher` must
    /// be the one request hashes are computed with.
    pub fn new(config: PoolConfig, hasher: BlockHasher) -> Result<Self, KvError> {
        if config.num_blocks == 0 || config.num_blocks == u32::MAX {
            return Err(KvError::InvalidConfig(format!(
                "num_blocks must be in 1..{}, got {}",
                u32::MAX,
                config.num_blocks
            )));
        }
        if config.block_size as usize != hasher.block_size() {
            return Err(KvError::InvalidConfig(format!(
                "block size {} differs from the hasher's {}",
                config.block_size,
                hasher.block_size()
            )));
        }
        let n = config.num_blocks as usize;
        let mut free = FreeQueue::new(n);
        for i in 0..config.num_blocks {
            free.push_back(BlockId::new(i));
        }
        Ok(Self {
            id: PoolId::fresh(),
            config,
            hasher,
            blocks: vec![Block::empty(); n],
            tokens: vec![UNKNOWN; n * config.block_size as usize],
            free,
            index: FxHashMap::default(),
            pending: FxHashMap::default(),
            quarantine: Quarantine::new(),
            holders: Vec::new(),
            free_holder_slots: Vec::new(),
            owned: 0,
            quarantined: 0,
            stats: PoolStats {
                total: n,
                ..PoolStats::default()
            },
            work: 0,
            tier_index: TierIndex::new(),
            tier_policy: TierPolicy::default(),
            demotions: Vec::new(),
            through: Vec::new(),
        })
    }

    /// The pool's shape.
    pub fn config(&self) -> PoolConfig {
        self.config
    }

    /// The hasher requests must use.
    pub fn hasher(&self) -> &BlockHasher {
        &self.hasher
    }

    fn bs(&self) -> usize {
        self.config.block_size as usize
    }

    /// Current counters and gauges.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            free: self.free.len(),
            owned: self.owned,
            quarantined: self.quarantined,
            cached: self.index.len(),
            issued: self.quarantine.issued(),
            completed: self.quarantine.completed(),
            ..self.stats
        }
    }

    /// Blocks in the free queue (cached or empty).
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Block records touched so far (an operation-cost counter for benches).
    pub fn work(&self) -> u64 {
        self.work
    }

    /// Free blocks front to back: the order allocation takes them.
    pub fn free_queue(&self) -> Vec<BlockId> {
        self.free.iter().collect()
    }

    /// A block's state (tests and diagnostics).
    pub fn block_state(&self, b: BlockId) -> BlockState {
        self.blocks[b.index()].state
    }

    /// A block's refcount (tests and diagnostics).
    pub fn refcount(&self, b: BlockId) -> u32 {
        self.blocks[b.index()].refcount
    }

    /// A block's generation, for the sanitizer's step records.
    pub fn generation(&self, b: BlockId) -> Generation {
        self.blocks[b.index()].generation
    }

    /// The block cached under `hash`, if any.
    pub fn cached(&self, hash: BlockHash) -> Option<BlockId> {
        self.index.get(&hash).copied()
    }

    /// Whether `hash` is being filled by an in-flight step.
    pub fn is_pending(&self, hash: BlockHash) -> bool {
        self.pending_block(hash).is_some()
    }

    fn pending_block(&self, hash: BlockHash) -> Option<BlockId> {
        let &(b, g) = self.pending.get(&hash)?;
        let blk = &self.blocks[b.index()];
        (blk.generation == g && !blk.tainted && !blk.published).then_some(b)
    }

    // ----- holders -----

    fn holder(&self, h: HolderId) -> Result<&Holder, KvError> {
        match self.holders.get(h.slot as usize) {
            Some(x) if x.live && x.generation == h.generation => Ok(x),
            _ => Err(KvError::UnknownHolder(h)),
        }
    }

    fn holder_mut(&mut self, h: HolderId) -> Result<&mut Holder, KvError> {
        match self.holders.get_mut(h.slot as usize) {
            Some(x) if x.live && x.generation == h.generation => Ok(x),
            _ => Err(KvError::UnknownHolder(h)),
        }
    }

    /// A new holder with an empty block table, whose chain starts at `root`.
    pub fn new_holder(&mut self, tag: OwnerTag, root: ChainRoot) -> HolderId {
        let fresh = |generation| Holder {
            generation,
            live: true,
            tag,
            root,
            blocks: Vec::new(),
            tokens: 0,
            last_epoch: Epoch::ZERO,
            restoring: std::collections::VecDeque::new(),
        };
        if let Some(slot) = self.free_holder_slots.pop() {
            let h = &mut self.holders[slot as usize];
            let generation = h.generation.wrapping_add(1);
            *h = fresh(generation);
            HolderId { slot, generation }
        } else {
            let slot = self.holders.len() as u32;
            self.holders.push(fresh(0));
            HolderId {
                slot,
                generation: 0,
            }
        }
    }

    /// The holder's block table.
    pub fn table(&self, h: HolderId) -> Result<&[BlockId], KvError> {
        Ok(&self.holder(h)?.blocks)
    }

    /// Slots assigned in the holder's blocks.
    pub fn len_tokens(&self, h: HolderId) -> Result<usize, KvError> {
        Ok(self.holder(h)?.tokens)
    }

    /// Whether `h` names a live holder.
    pub fn is_live(&self, h: HolderId) -> bool {
        self.holder(h).is_ok()
    }

    /// Live holders (diagnostics and whole-pool checks).
    pub fn live_holders(&self) -> usize {
        self.holders.iter().filter(|h| h.live).count()
    }

    // ----- lookup -----

    /// Finds the longest cached prefix of `seq` and pins it, in one step:
    /// there is no moment at which a found block is unpinned.
    ///
    /// Returns a new holder whose table is the hit. A complete hit is capped
    /// at `floor((len - 1) / block_size)` blocks, so the last prompt token is
    /// always computed (its logits are needed) in a block of its own. Each
    /// hit is confirmed structurally (root or parent block and generation,
    /// exact tokens), not by its hash alone. A published block still in
    /// quarantine may be hit: pinning takes it out.
    pub fn lookup_and_pin(
        &mut self,
        tag: OwnerTag,
        seq: &SequenceHasher,
    ) -> Result<(HolderId, PrefixHit), KvError> {
        let (table, pending) = self.walk(seq)?;
        for &b in &table {
            self.work += 1;
            self.pin(b);
        }
        let bs = self.bs();
        let hit = PrefixHit {
            blocks: table.len(),
            tokens: table.len() * bs,
            pending,
        };
        let holder = self.new_holder(tag, seq.root());
        let h = self
            .holder_mut(holder)
            .expect("a holder just created is live");
        h.tokens = hit.tokens;
        h.blocks = table;
        self.stats.query_tokens += seq.tokens().len() as u64;
        self.stats.hit_tokens += hit.tokens as u64;
        Ok((holder, hit))
    }

    /// What [`Self::lookup_and_pin`] would find now, without pinning or
    /// counting anything: for a request deciding whether it can be admitted
    /// at all (a request that waits must not disturb the LRU order or the
    /// hit statistics each time it retries). The answer holds only until
    /// the pool changes.
    pub fn peek_prefix(&self, seq: &SequenceHasher) -> Result<PrefixPeek, KvError> {
        let (table, pending) = self.walk(seq)?;
        let free = table
            .iter()
            .filter(|&&b| self.blocks[b.index()].state == BlockState::Free)
            .count();
        Ok(PrefixPeek {
            hit: PrefixHit {
                blocks: table.len(),
                tokens: table.len() * self.bs(),
                pending,
            },
            blocks: table,
            free,
        })
    }

    /// The longest confirmed cached prefix of `seq` (capped so its last
    /// token is computed), and the next block's hash if it is pending.
    fn walk(&self, seq: &SequenceHasher) -> Result<(Vec<BlockId>, Option<BlockHash>), KvError> {
        if seq.hasher_fingerprint() != self.hasher.fingerprint() {
            return Err(KvError::ForeignHasher);
        }
        let bs = self.bs();
        let tokens = seq.tokens();
        let hashes = seq.hashes();
        let cap = tokens.len().saturating_sub(1) / bs;
        let root = seq.root();
        let mut table = Vec::with_capacity(cap.min(hashes.len()));
        let mut parent: Option<(BlockId, Generation)> = None;
        let mut pending = None;
        for (i, &hash) in hashes.iter().enumerate().take(cap) {
            let Some(b) = self.confirmed_hit(hash, root, parent, &tokens[i * bs..(i + 1) * bs])
            else {
                pending = self.pending_block(hash).map(|_| hash);
                break;
            };
            parent = Some((b, self.blocks[b.index()].generation));
            table.push(b);
        }
        Ok((table, pending))
    }

    /// The block cached under `hash`, if it really continues the chain:
    /// the right parent (or root), the exact tokens.
    fn confirmed_hit(
        &self,
        hash: BlockHash,
        root: ChainRoot,
        parent: Option<(BlockId, Generation)>,
        tokens: &[TokenId],
    ) -> Option<BlockId> {
        let b = *self.index.get(&hash)?;
        let blk = &self.blocks[b.index()];
        debug_assert!(
            blk.published && blk.hash == Some(hash),
            "index entry of {b:?} is stale"
        );
        if blk.parent != parent || (parent.is_none() && blk.root != root.hash()) {
            return None;
        }
        let bs = self.bs();
        let stored = &self.tokens[b.index() * bs..(b.index() + 1) * bs];
        stored
            .iter()
            .zip(tokens)
            .all(|(&s, t)| s == t.get())
            .then_some(b)
    }

    fn pin(&mut self, b: BlockId) {
        let blk = &mut self.blocks[b.index()];
        match blk.state {
            BlockState::Free => {
                self.free.remove(b);
                self.owned += 1;
            }
            BlockState::Quarantined => {
                // Its bucket entry goes stale; reclamation skips held blocks.
                self.quarantined -= 1;
                self.owned += 1;
            }
            BlockState::Owned => {}
        }
        blk.state = BlockState::Owned;
        blk.refcount += 1;
    }

    // ----- allocation -----

    /// Appends `n` fresh blocks to the holder's table, all or nothing.
    ///
    /// Takes the least recently freed blocks; a cached one leaves the index
    /// and is reported. Never takes a pinned, owned or quarantined block
    /// (they are not in the free queue), and never waits.
    pub fn allocate(&mut self, h: HolderId, n: usize) -> Result<Vec<Evicted>, KvError> {
        self.holder(h)?;
        if n > self.free.len() {
            return Err(KvError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        let mut evicted = Vec::new();
        let root = self.holders[h.slot as usize].root.hash();
        let mut parent = self.holders[h.slot as usize]
            .blocks
            .last()
            .map(|&b| (b, self.blocks[b.index()].generation));
        let mut fresh = Vec::with_capacity(n);
        for _ in 0..n {
            self.work += 1;
            let b = self
                .free
                .pop_front()
                .expect("free queue length was checked");
            if self.blocks[b.index()].published {
                self.demote_on_evict(b);
            }
            let depth = parent.map_or(0, |(p, _)| self.blocks[p.index()].depth + 1);
            let blk = &mut self.blocks[b.index()];
            if let Some(hash) = blk.hash {
                if blk.published {
                    self.index.remove(&hash);
                    evicted.push(Evicted { block: b, hash });
                    self.stats.evictions += 1;
                } else if self.pending.get(&hash) == Some(&(b, blk.generation)) {
                    self.pending.remove(&hash);
                }
            }
            blk.generation.bump();
            *blk = Block {
                state: BlockState::Owned,
                refcount: 1,
                generation: blk.generation,
                quarantines: blk.quarantines,
                parent,
                root,
                depth,
                ..Block::empty()
            };
            let bs = self.config.block_size as usize;
            self.tokens[b.index() * bs..(b.index() + 1) * bs].fill(UNKNOWN);
            parent = Some((b, blk.generation));
            fresh.push(b);
        }
        self.holders[h.slot as usize].blocks.extend(fresh);
        self.owned += n;
        Ok(evicted)
    }

    /// Forks a holder: a new holder sharing every block of `h` that holds
    /// tokens (refcount +1 each; empty blocks allocated ahead stay `h`'s).
    /// A write into a shared partial block needs [`Self::copy_on_write`].
    pub fn fork(&mut self, h: HolderId, tag: OwnerTag) -> Result<HolderId, KvError> {
        let bs = self.bs();
        let src = self.holder(h)?;
        let used = src.tokens.div_ceil(bs);
        let (root, blocks, tokens, last_epoch) = (
            src.root,
            src.blocks[..used].to_vec(),
            src.tokens,
            src.last_epoch,
        );
        for &b in &blocks {
            self.work += 1;
            self.pin(b);
        }
        let new = self.new_holder(tag, root);
        let holder = self.holder_mut(new).expect("a holder just created is live");
        holder.blocks = blocks;
        holder.tokens = tokens;
        holder.last_epoch = last_epoch;
        Ok(new)
    }

    /// If the block the holder writes next is a shared partial block, gives
    /// the holder a private copy of it, read and written by step `epoch`;
    /// returns the copy for the store to perform in that step.
    pub fn copy_on_write(&mut self, h: HolderId, epoch: Epoch) -> Result<Option<CowCopy>, KvError> {
        self.check_in_flight(epoch)?;
        let bs = self.bs();
        let holder = self.holder(h)?;
        let (pos, tokens) = (holder.tokens / bs, holder.tokens);
        if tokens % bs == 0 {
            return Ok(None);
        }
        let src = holder.blocks[pos];
        let s = &self.blocks[src.index()];
        if s.refcount == 1 {
            return Ok(None);
        }
        if s.unknown > 0 {
            return Err(KvError::PendingTokens(src));
        }
        let (filled, parent, root, s_generation, s_tainted) =
            (s.filled, s.parent, s.root, s.generation, s.tainted);
        // Allocate into a scratch holder so the table keeps its order.
        let scratch = self.new_holder(OwnerTag::default(), ChainRoot::from_hash(root));
        if let Err(e) = self.allocate(scratch, 1) {
            self.release(scratch).expect("the scratch holder is live");
            return Err(e);
        }
        let dst = self.holders[scratch.slot as usize]
            .blocks
            .pop()
            .expect("one block allocated");
        self.release(scratch).expect("the scratch holder is live");
        let src_generation = s_generation;
        let d = &mut self.blocks[dst.index()];
        d.filled = filled;
        d.parent = parent;
        d.source = Some((src, src_generation, epoch));
        // A copy of garbage is garbage: never written on, never published.
        d.tainted = s_tainted;
        d.fill_epoch = epoch;
        d.last_use = epoch;
        let generation = d.generation;
        self.tokens.copy_within(
            src.index() * bs..src.index() * bs + filled as usize,
            dst.index() * bs,
        );
        self.quarantine
            .bucket_mut(epoch)
            .written
            .push((dst, generation));
        let holder = self.holder_mut(h).expect("checked above");
        holder.blocks[pos] = dst;
        holder.last_epoch = holder.last_epoch.max(epoch);
        // An empty block allocated ahead now follows the copy. Only this
        // holder has it: forks share blocks that hold tokens, hits are full.
        if let Some(&next) = holder.blocks.get(pos + 1) {
            debug_assert_eq!(self.blocks[next.index()].refcount, 1);
            self.blocks[next.index()].parent = Some((dst, generation));
        }
        self.decref(src, epoch);
        Ok(Some(CowCopy {
            src,
            dst,
            slots: filled,
        }))
    }
}

mod checks;
mod release;
mod tiers;
mod writes;
