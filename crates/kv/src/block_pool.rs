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
        let holder = &mut self.holders[h.slot as usize];
        let root = holder.root.hash();
        let mut parent = holder
            .blocks
            .last()
            .map(|&b| (b, self.blocks[b.index()].generation));
        holder.blocks.reserve(n);
        for _ in 0..n {
            self.work += 1;
            let b = self
                .free
                .pop_front()
                .expect("free queue length was checked");
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
                ..Block::empty()
            };
            let bs = self.config.block_size as usize;
            self.tokens[b.index() * bs..(b.index() + 1) * bs].fill(UNKNOWN);
            parent = Some((b, blk.generation));
            holder.blocks.push(b);
        }
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

    // ----- epochs and writes -----

    /// Issues the next step's epoch.
    pub fn next_epoch(&mut self) -> Epoch {
        self.quarantine.issue()
    }

    fn check_in_flight(&self, epoch: Epoch) -> Result<(), KvError> {
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

    fn push_free(&mut self, b: BlockId) {
        // Cached blocks queue at the back in the order they are freed; empty
        // ones go to the front, to be reused before any cached block.
        if self.blocks[b.index()].published {
            self.free.push_back(b);
        } else {
            self.free.push_front(b);
        }
    }

    // ----- release -----

    /// Releases every block of the holder, tail first (so a prefix outlives
    /// its extensions in the LRU order), and forgets the holder.
    pub fn release(&mut self, h: HolderId) -> Result<(), KvError> {
        self.holder(h)?;
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
    fn decref(&mut self, b: BlockId, last_epoch: Epoch) {
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
            blk.published = false;
            self.index.remove(&hash);
            self.stats.evictions += 1;
            out.push(Evicted { block: b, hash });
            self.free.remove(b);
            self.free.push_front(b);
        }
        out
    }

    // ----- sanitizer -----

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
        for h in self.holders.iter().filter(|h| h.live) {
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
            if blk.generation == g && (blk.hash != Some(*hash) || blk.published) {
                return Err(format!("pending entry {hash:?} -> {b:?} is wrong"));
            }
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
