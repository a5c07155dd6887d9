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

/// A fresh directory under the system's temp dir, unique per process and
/// per call, removed (with what is in it) on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A new, empty (not yet created) path named after `name`.
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "strata-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }

    /// The path as text, for command lines.
    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
