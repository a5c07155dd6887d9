//! The bytes of the KV cache.
//!
//! This crate will own the arena that attention reads (f16, block-major:
//! `[block][layer][K|V][kv_head][slot][head_dim]`, so one block is one
//! contiguous range a tier can copy in one go), the host-RAM tier, the SSD
//! tier (record format, checksums, recovery after a restart), and the
//! execution of the transfer plans that `strata-kv` makes.
//!
//! It may depend on `strata-kv` only among Strata's crates. It decides no
//! policy: which block goes where is `kv`'s plan; this crate moves bytes.
//!
//! Status: filled by issue 2/6 (the arena) and 5/6 (the tiers).
