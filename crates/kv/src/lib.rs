//! The KV core of Strata: what a block is, who holds it, when it may be
//! reused, and when its content may be shared.
//!
//! This crate is pure bookkeeping. It knows nothing of tensors, files, async
//! runtimes or JSON, spawns no threads, and fails only with capacity results,
//! API misuse reports and the sanitizer's violations. The bytes live in
//! `strata-store`; the engine drives the pool step by step.
//!
//! The design, and the four bugs of other servers it makes impossible, are
//! in `shared/design.md` ("The KV core"). In short:
//!
//! - A block is *free* (refcount 0, in the LRU queue, maybe cached), *owned*
//!   (refcount >= 1) or *quarantined* (refcount 0 but a step that may touch
//!   it is still running). See [`BlockPool`].
//! - [`BlockPool::lookup_and_pin`] finds and pins in one step; the pins are
//!   a holder, released as a whole ([`KvCache`] wraps holders in RAII
//!   [`Lease`]s).
//! - Every step has an [`Epoch`]; a block's window is its own last use, and
//!   `complete(E)` reclaims and then publishes.
//! - Block hashes are keyed and chained ([`BlockHasher`]); a hit is also
//!   confirmed structurally.
//!
//! Concurrency: the pool is a single-owner state machine; [`KvCache`] puts
//! it behind a lock that is never held across a blocking call, and makes
//! lease drops lock-free messages (see `kv_cache.rs`).

mod block_hash;
mod block_pool;
mod error;
mod free_queue;
mod ids;
mod kv_cache;
mod quarantine;
mod sync;
mod tier_index;

pub use block_hash::{BlockHasher, ChainRoot, ExtraKeys, HashKey, MAX_BLOCK_SIZE, SequenceHasher};
pub use block_pool::{
    BlockPool, CowCopy, Demotion, Evicted, PoolConfig, PoolStats, PrefixHit, PrefixPeek,
    ReleaseYield, Restore, RestorePlan, SlotRef, TierPolicy,
};
pub use error::{Access, BlockState, KvError, Violation};
pub use ids::{BlockHash, BlockId, Epoch, Generation, HolderId, OwnerTag, TokenId};
pub use kv_cache::{KvCache, Lease, PoolGuard};
pub use tier_index::{Landing, Tier, TierError, TierIndex};
