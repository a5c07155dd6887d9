//! Test-only helpers shared by Strata's crates (a dev-dependency, never
//! shipped): fixtures for the KV core and the tiny random-weight GGUF
//! writer. The engine's fake model is in the engine's own tests (it
//! implements the engine's `Runner`).

use strata_kv::{BlockHasher, ChainRoot, ExtraKeys, HashKey, TokenId};

/// The hash key tests use.
pub fn test_key() -> HashKey {
    HashKey::from_bytes(*b"strata-testkit-fixed-hash-key!!!")
}

/// A hasher for `block_size` with the test key.
pub fn hasher(block_size: usize) -> BlockHasher {
    BlockHasher::new(&test_key(), block_size)
}

/// The chain root for a test model, with an optional salt.
pub fn root(hasher: &BlockHasher, salt: Option<&[u8]>) -> ChainRoot {
    hasher.root(ExtraKeys {
        model_fingerprint: b"testkit-model",
        cache_salt: salt,
    })
}

/// Token ids from integers.
pub fn tokens(ids: impl IntoIterator<Item = u32>) -> Vec<TokenId> {
    ids.into_iter().map(TokenId::new).collect()
}

pub mod tiny_model;
