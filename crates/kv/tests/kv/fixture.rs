//! A small pool plus helpers that check the invariants after every mutation.

use strata_kv::{
    BlockHasher, BlockPool, ChainRoot, Epoch, HolderId, OwnerTag, PoolConfig, PrefixHit,
    SequenceHasher, TokenId,
};

pub(crate) struct Fixture {
    pub(crate) pool: BlockPool,
    pub(crate) hasher: BlockHasher,
    pub(crate) root: ChainRoot,
}

impl Fixture {
    pub(crate) fn new(num_blocks: u32, block_size: u32) -> Self {
        let hasher = strata_testkit::hasher(block_size as usize);
        let root = strata_testkit::root(&hasher, None);
        let pool = BlockPool::new(
            PoolConfig {
                num_blocks,
                block_size,
            },
            hasher.clone(),
        )
        .unwrap();
        Self { pool, hasher, root }
    }

    pub(crate) fn seq(&self, tokens: &[TokenId]) -> SequenceHasher {
        let mut s = self.hasher.sequence(self.root);
        s.extend(tokens);
        s
    }

    pub(crate) fn check(&self) {
        if let Err(e) = self.pool.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }

    pub(crate) fn lookup(&mut self, tag: u64, tokens: &[TokenId]) -> (HolderId, PrefixHit) {
        let seq = self.seq(tokens);
        let r = self.pool.lookup_and_pin(OwnerTag(tag), &seq).unwrap();
        self.check();
        r
    }

    /// Looks up, allocates the rest and writes every token in one new step
    /// (a whole prefill). Returns the holder and the step's epoch.
    pub(crate) fn prefill(&mut self, tag: u64, tokens: &[TokenId]) -> (HolderId, Epoch) {
        let (h, hit) = self.lookup(tag, tokens);
        let bs = self.pool.config().block_size as usize;
        let need = tokens.len().div_ceil(bs) - hit.blocks;
        self.pool.allocate(h, need).unwrap();
        self.check();
        let e = self.pool.next_epoch();
        self.pool.write(h, e, &tokens[hit.tokens..]).unwrap();
        self.check();
        (h, e)
    }

    pub(crate) fn complete(&mut self, e: Epoch) {
        self.pool.complete(e).unwrap();
        self.check();
    }

    pub(crate) fn release(&mut self, h: HolderId) {
        self.pool.release(h).unwrap();
        self.check();
    }
}
