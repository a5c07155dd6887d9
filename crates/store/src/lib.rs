//! The bytes of the KV cache.
//!
//! This crate owns the arena that attention reads ([`Arena`]: f16,
//! block-major, so one block is one contiguous range a tier can copy in one
//! go) and, with issue 7/10, the host-RAM tier, the SSD tier and the
//! execution of the transfer plans that `strata-kv` makes.
//!
//! It may depend on `strata-kv` only among Strata's crates, and re-exports
//! the ids the model needs ([`BlockId`], [`TokenId`]) so that `strata-model`
//! depends on `store` alone. It decides no policy: which block goes where is
//! `kv`'s business; this crate moves bytes.

mod arena;
mod host;
pub mod ssd;

pub use arena::{Arena, ArenaError, ArenaLayout};
pub use host::{HostBlock, HostStats, HostStore};
pub use strata_kv::{BlockId, TokenId};
