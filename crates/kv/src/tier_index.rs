//! What the tiers below the arena hold (issue 7/10): one entry per block
//! hash, with its tier, its exact key (parent hash and tokens), its pins,
//! and whether its bytes have landed. Policy only: no bytes, no I/O.
//!
//! The rules (each a bug some server shipped, see `../shared/peers.md`):
//! - an entry is *landing* from the moment a demotion is planned until
//!   `demotion_landed` says its bytes are there; only then is it
//!   *visible*, and only a visible entry under the exact key is ever found
//!   (a failed or in-flight write is never a hit);
//! - a found entry is pinned by the request restoring it; an eviction of a
//!   pinned entry waits for its last pin (the restore never reads a
//!   record that was taken from under it), and the entry is found by no
//!   one meanwhile;
//! - a failed write removes the entry; so does a failed restore's report
//!   (`restore_failed`), so the next lookup recomputes instead.

use std::collections::HashMap;

use crate::{BlockHash, TokenId};

/// A tier below the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Host RAM.
    Host,
    /// The SSD directory.
    Ssd,
}

/// Whether an entry's bytes are there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Landing {
    /// Being written: not found by lookups.
    Landing,
    /// Written and verified by the store: found under its exact key.
    Visible,
}

#[derive(Clone, Debug)]
struct Entry {
    tier: Tier,
    parent: BlockHash,
    tokens: Vec<TokenId>,
    state: Landing,
    pins: u32,
    /// Evicted while pinned: gone at its last unpin, found by no one.
    doomed: bool,
}

/// Why a tier operation was refused (a caller's bug or a race it must
/// handle: never a panic).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    /// The hash already has an entry (a second copy is never planned).
    #[error("{0:?} already has a tier entry")]
    Exists(BlockHash),
    /// No such entry (or not in the state the operation needs).
    #[error("{0:?} has no {1} tier entry")]
    Missing(BlockHash, &'static str),
}

/// Every tier's entries.
#[derive(Debug, Default)]
pub struct TierIndex {
    entries: HashMap<BlockHash, Entry>,
}

impl TierIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// A demotion of `hash` (after `parent`, holding `tokens`) to `tier`
    /// is planned: the entry is landing until [`Self::demotion_landed`].
    pub fn begin_demotion(
        &mut self,
        hash: BlockHash,
        parent: BlockHash,
        tokens: &[TokenId],
        tier: Tier,
    ) -> Result<(), TierError> {
        if self.insert(hash, parent, tokens, tier, Landing::Landing) {
            Ok(())
        } else {
            Err(TierError::Exists(hash))
        }
    }

    /// A new entry in `state`, unless the hash has one (`false`).
    fn insert(
        &mut self,
        hash: BlockHash,
        parent: BlockHash,
        tokens: &[TokenId],
        tier: Tier,
        state: Landing,
    ) -> bool {
        if self.entries.contains_key(&hash) {
            return false;
        }
        self.entries.insert(
            hash,
            Entry {
                tier,
                parent,
                tokens: tokens.to_vec(),
                state,
                pins: 0,
                doomed: false,
            },
        );
        true
    }

    /// The store wrote `hash`'s bytes (`ok`) or failed to: visible, or
    /// gone.
    pub fn demotion_landed(&mut self, hash: BlockHash, ok: bool) -> Result<(), TierError> {
        let e = self
            .entries
            .get_mut(&hash)
            .filter(|e| e.state == Landing::Landing)
            .ok_or(TierError::Missing(hash, "landing"))?;
        if ok && !e.doomed {
            e.state = Landing::Visible;
        } else {
            self.entries.remove(&hash);
        }
        Ok(())
    }

    /// The tier holding `hash` under exactly this key, visible and not
    /// being evicted, if any.
    pub fn find(&self, hash: BlockHash, parent: BlockHash, tokens: &[TokenId]) -> Option<Tier> {
        self.entries
            .get(&hash)
            .filter(|e| {
                e.state == Landing::Visible && !e.doomed && e.parent == parent && e.tokens == tokens
            })
            .map(|e| e.tier)
    }

    /// Finds and pins `hash` for a restore (see [`Self::find`]).
    pub fn pin(&mut self, hash: BlockHash, parent: BlockHash, tokens: &[TokenId]) -> Option<Tier> {
        let tier = self.find(hash, parent, tokens)?;
        self.entries.get_mut(&hash).expect("just found").pins += 1;
        Some(tier)
    }

    /// A restore is done with `hash` (landed or not).
    pub fn unpin(&mut self, hash: BlockHash) -> Result<(), TierError> {
        let e = self
            .entries
            .get_mut(&hash)
            .filter(|e| e.pins > 0)
            .ok_or(TierError::Missing(hash, "pinned"))?;
        e.pins -= 1;
        if e.pins == 0 && e.doomed {
            self.entries.remove(&hash);
        }
        Ok(())
    }

    /// A restore of `hash` failed (its bytes did not verify): the entry is
    /// gone, now or at its last pin, and the caller recomputes.
    pub fn restore_failed(&mut self, hash: BlockHash) -> Result<(), TierError> {
        self.evict(hash).map(|_| ())
    }

    /// The store dropped (or wants to drop) `hash`: gone now if nothing
    /// pins it (`true`), else at its last unpin, found by no one meanwhile.
    pub fn evict(&mut self, hash: BlockHash) -> Result<bool, TierError> {
        let e = self
            .entries
            .get_mut(&hash)
            .ok_or(TierError::Missing(hash, "any"))?;
        if e.pins == 0 && e.state == Landing::Visible {
            self.entries.remove(&hash);
            Ok(true)
        } else {
            // Pinned, or still landing (its landing report removes it).
            e.doomed = true;
            Ok(false)
        }
    }

    /// A block a tier already holds (found by recovery at start): visible
    /// at once. A hash already here keeps its entry.
    pub fn insert_visible(
        &mut self,
        hash: BlockHash,
        parent: BlockHash,
        tokens: &[TokenId],
        tier: Tier,
    ) -> bool {
        self.insert(hash, parent, tokens, tier, Landing::Visible)
    }

    /// Where the stores now hold `hash`: the fastest tier holding it, or
    /// nowhere. A landing entry becomes visible (or goes); a visible one
    /// moves (or is evicted, see [`Self::evict`]). Unknown hashes are
    /// ignored (an entry a restore report already removed).
    pub fn located(&mut self, hash: BlockHash, tier: Option<Tier>) {
        let Some(e) = self.entries.get_mut(&hash) else {
            return;
        };
        match (e.state, tier) {
            (Landing::Landing, Some(t)) => {
                e.tier = t;
                let _ = self.demotion_landed(hash, true);
            }
            (Landing::Landing, None) => {
                let _ = self.demotion_landed(hash, false);
            }
            (Landing::Visible, Some(t)) => e.tier = t,
            (Landing::Visible, None) => {
                let _ = self.evict(hash);
            }
        }
    }

    /// Whether `hash` has an entry of any kind (a demotion of it is never
    /// planned twice).
    pub fn contains(&self, hash: BlockHash) -> bool {
        self.entries.contains_key(&hash)
    }

    /// Entries in `tier` (landing ones included).
    pub fn len(&self, tier: Tier) -> usize {
        self.entries.values().filter(|e| e.tier == tier).count()
    }

    /// Whether there are no entries at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry's pins (tests: a finished workload leaves none).
    pub fn pins(&self) -> u64 {
        self.entries.values().map(|e| e.pins as u64).sum()
    }

    /// Checks the rules that hold between operations.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (h, e) in &self.entries {
            if e.state == Landing::Landing && e.pins > 0 {
                return Err(format!("{h:?} is pinned while landing"));
            }
            if e.doomed && e.pins == 0 && e.state == Landing::Visible {
                return Err(format!("{h:?} is doomed with no pin left, yet still here"));
            }
        }
        Ok(())
    }
}
