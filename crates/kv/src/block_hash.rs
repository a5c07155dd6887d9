//! The chained block hash.
//!
//! ```text
//!   root  = H(k_root,      len(fingerprint) ‖ fingerprint ‖ salt? ‖ len(salt) ‖ salt)
//!   h[0]  = H(root   ‖ s,  tokens[0 .. B])
//!   h[i]  = H(h[i-1] ‖ s,  tokens[i*B .. (i+1)*B])
//! ```
//!
//! `H(key, input)` is keyed BLAKE3 truncated to 128 bits. `k_root` and the
//! 128-bit `s` are derived from a per-installation secret, so nobody without
//! the secret can compute, let alone craft colliding, hashes. The extra keys
//! (model fingerprint, cache salt) are folded in at the root, length-prefixed,
//! so distinct `(salt, tokens)` pairs cannot collide by concatenation; a salt
//! of `None` and a salt of `Some("")` are different roots. Only full blocks
//! are hashed, and a chain always starts at position 0, so a hash also fixes
//! the absolute positions of its tokens.
//!
//! NOTE: the parent hash goes into the *key*, not the input, so a block of
//! 16 tokens (64 bytes) costs one BLAKE3 compression instead of two: the
//! input `parent ‖ tokens` would be 80 bytes. Half of every key is the secret
//! `s`, so a key stays unknown to anyone who sees stored hashes (the SSD
//! tier's records carry them); the chain is a PRF cascade under that secret.
//!
//! NOTE: a hash match is never trusted alone. The pool also confirms every
//! hit structurally (parent block and generation, exact tokens), so even a
//! collision could not serve wrong KV; the keyed hash makes it unreachable in
//! the first place.

use crate::ids::{BlockHash, TokenId};

/// The per-installation secret the hash is keyed with. It is kept beside the
/// SSD tier so that persisted hashes stay valid across restarts.
#[derive(Clone)]
pub struct HashKey([u8; 32]);

impl HashKey {
    /// Wraps 32 secret bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The secret bytes, for persisting them.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

/// What besides the tokens decides whether cached KV may be reused.
#[derive(Clone, Copy, Debug)]
pub struct ExtraKeys<'a> {
    /// Covers everything that changes the KV bytes (weights, requantization,
    /// RoPE, KV dtype, block size and layout, format version).
    pub model_fingerprint: &'a [u8],
    /// Prefixes are shared only between requests with the same salt.
    pub cache_salt: Option<&'a [u8]>,
}

/// The start of a hash chain: one per (model fingerprint, cache salt).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ChainRoot(BlockHash);

impl ChainRoot {
    pub(crate) const fn from_hash(hash: BlockHash) -> Self {
        Self(hash)
    }

    /// The root's hash value, which is the "parent" of a chain's first block.
    pub const fn hash(self) -> BlockHash {
        self.0
    }
}

/// Computes roots and block hashes. Cheap to clone.
#[derive(Clone)]
pub struct BlockHasher {
    root_key: [u8; 32],
    /// The secret half of every block key.
    block_secret: [u8; 16],
    block_size: usize,
    /// Identifies the key and block size without revealing the key, so the
    /// pool can refuse hashes made by another hasher.
    fingerprint: u64,
}

impl std::fmt::Debug for BlockHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHasher")
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

fn truncate(hash: blake3::Hash) -> BlockHash {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash.as_bytes()[..16]);
    BlockHash::from_bits(u128::from_le_bytes(bytes))
}

/// Upper bound on block size, so a block's hash input fits a stack buffer.
pub const MAX_BLOCK_SIZE: usize = 256;

impl BlockHasher {
    /// A hasher for blocks of `block_size` tokens keyed by `key`.
    ///
    /// # Panics
    /// If `block_size` is 0 or above [`MAX_BLOCK_SIZE`]: the pool's
    /// configuration is validated before it gets here, so that is a bug.
    pub fn new(key: &HashKey, block_size: usize) -> Self {
        assert!(
            (1..=MAX_BLOCK_SIZE).contains(&block_size),
            "block size {block_size} out of range: validating it is the caller's job"
        );
        // Separately derived secrets give the root and the blocks their own
        // domains, at no per-block cost.
        let root_key = *blake3::keyed_hash(&key.0, b"strata.kv.root.v1").as_bytes();
        let mut block_secret = [0u8; 16];
        block_secret
            .copy_from_slice(&blake3::keyed_hash(&key.0, b"strata.kv.block.v1").as_bytes()[..16]);
        let id = blake3::keyed_hash(&key.0, &(block_size as u64).to_le_bytes());
        let fingerprint = u64::from_le_bytes(id.as_bytes()[..8].try_into().expect("8 bytes"));
        Self {
            root_key,
            block_secret,
            block_size,
            fingerprint,
        }
    }

    /// Identifies this hasher's key and block size.
    pub const fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Tokens per block.
    pub const fn block_size(&self) -> usize {
        self.block_size
    }

    /// The root of the chains for these extra keys.
    pub fn root(&self, extra: ExtraKeys<'_>) -> ChainRoot {
        let mut h = blake3::Hasher::new_keyed(&self.root_key);
        h.update(&(extra.model_fingerprint.len() as u64).to_le_bytes());
        h.update(extra.model_fingerprint);
        match extra.cache_salt {
            None => {
                h.update(&[0]);
            }
            Some(salt) => {
                h.update(&[1]);
                h.update(&(salt.len() as u64).to_le_bytes());
                h.update(salt);
            }
        }
        ChainRoot(truncate(h.finalize()))
    }

    /// The hash of one full block whose parent hash is `parent` (the root's
    /// hash for a chain's first block).
    ///
    /// # Panics
    /// If `tokens` is not exactly one block: only full blocks are hashed, and
    /// callers slice them by `block_size`, so anything else is a bug.
    pub fn hash_block(&self, parent: BlockHash, tokens: &[TokenId]) -> BlockHash {
        assert_eq!(tokens.len(), self.block_size, "only full blocks are hashed");
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&parent.bits().to_le_bytes());
        key[16..].copy_from_slice(&self.block_secret);
        let mut buf = [0u8; 4 * MAX_BLOCK_SIZE];
        for (chunk, t) in buf.chunks_exact_mut(4).zip(tokens) {
            chunk.copy_from_slice(&t.get().to_le_bytes());
        }
        truncate(blake3::keyed_hash(&key, &buf[..4 * tokens.len()]))
    }

    /// Hashes of every full block of `tokens`, chained from `root`.
    pub fn prefix_hashes(&self, root: ChainRoot, tokens: &[TokenId]) -> Vec<BlockHash> {
        let mut out = Vec::with_capacity(tokens.len() / self.block_size);
        let mut parent = root.hash();
        for block in tokens.chunks_exact(self.block_size) {
            parent = self.hash_block(parent, block);
            out.push(parent);
        }
        out
    }

    /// An incremental hasher for one sequence, fed as tokens arrive.
    pub fn sequence(&self, root: ChainRoot) -> SequenceHasher {
        SequenceHasher {
            hasher: self.clone(),
            root,
            tokens: Vec::new(),
            hashes: Vec::new(),
        }
    }
}

/// A sequence's tokens and the hashes of its full blocks, kept up to date as
/// tokens arrive so each block is hashed exactly once per request.
#[derive(Clone, Debug)]
pub struct SequenceHasher {
    hasher: BlockHasher,
    root: ChainRoot,
    tokens: Vec<TokenId>,
    hashes: Vec<BlockHash>,
}

impl SequenceHasher {
    /// Appends tokens, hashing every block they complete.
    pub fn extend(&mut self, tokens: &[TokenId]) {
        let bs = self.hasher.block_size;
        self.tokens.extend_from_slice(tokens);
        while (self.hashes.len() + 1) * bs <= self.tokens.len() {
            let i = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or(self.root.hash());
            let h = self
                .hasher
                .hash_block(parent, &self.tokens[i * bs..(i + 1) * bs]);
            self.hashes.push(h);
        }
    }

    /// The fingerprint of the hasher that made these hashes.
    pub const fn hasher_fingerprint(&self) -> u64 {
        self.hasher.fingerprint
    }

    /// The chain root this sequence hashes from.
    pub const fn root(&self) -> ChainRoot {
        self.root
    }

    /// Every token so far.
    pub fn tokens(&self) -> &[TokenId] {
        &self.tokens
    }

    /// Hashes of the full blocks so far.
    pub fn hashes(&self) -> &[BlockHash] {
        &self.hashes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: &[u32]) -> Vec<TokenId> {
        v.iter().copied().map(TokenId::new).collect()
    }

    fn hasher(bs: usize) -> BlockHasher {
        BlockHasher::new(&HashKey::from_bytes([7; 32]), bs)
    }

    #[test]
    fn chain_depends_on_every_earlier_token_and_on_the_root() {
        let h = hasher(2);
        let root = h.root(ExtraKeys {
            model_fingerprint: b"m",
            cache_salt: None,
        });
        let a = h.prefix_hashes(root, &toks(&[1, 2, 3, 4]));
        let b = h.prefix_hashes(root, &toks(&[1, 9, 3, 4]));
        assert_eq!(a.len(), 2);
        assert_ne!(a[0], b[0]);
        assert_ne!(
            a[1], b[1],
            "the second block's hash must depend on the first block"
        );
        let salted = h.root(ExtraKeys {
            model_fingerprint: b"m",
            cache_salt: Some(b""),
        });
        assert_ne!(
            salted, root,
            "no salt and an empty salt are different roots"
        );
        let other_model = h.root(ExtraKeys {
            model_fingerprint: b"n",
            cache_salt: None,
        });
        assert_ne!(h.prefix_hashes(other_model, &toks(&[1, 2]))[0], a[0]);
    }

    #[test]
    fn length_prefixing_separates_fingerprint_and_salt() {
        let h = hasher(4);
        let r1 = h.root(ExtraKeys {
            model_fingerprint: b"ab",
            cache_salt: Some(b"c"),
        });
        let r2 = h.root(ExtraKeys {
            model_fingerprint: b"a",
            cache_salt: Some(b"bc"),
        });
        assert_ne!(r1, r2);
    }

    #[test]
    fn the_key_matters() {
        let a = BlockHasher::new(&HashKey::from_bytes([1; 32]), 2);
        let b = BlockHasher::new(&HashKey::from_bytes([2; 32]), 2);
        let ex = ExtraKeys {
            model_fingerprint: b"m",
            cache_salt: None,
        };
        assert_ne!(a.root(ex), b.root(ex));
    }

    #[test]
    fn incremental_equals_one_shot_and_ignores_partial_blocks() {
        let h = hasher(3);
        let root = h.root(ExtraKeys {
            model_fingerprint: b"m",
            cache_salt: None,
        });
        let all = toks(&(0..11).collect::<Vec<_>>());
        let mut s = h.sequence(root);
        for chunk in all.chunks(2) {
            s.extend(chunk);
        }
        assert_eq!(s.hashes(), h.prefix_hashes(root, &all).as_slice());
        assert_eq!(
            s.hashes().len(),
            3,
            "11 tokens are 3 full blocks of 3; the rest is not hashed"
        );
        assert_eq!(s.tokens(), all.as_slice());
    }
}
