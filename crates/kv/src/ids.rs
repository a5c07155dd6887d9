//! Newtype identifiers: nothing in the public API of `kv` is a bare integer.

use std::fmt;

/// Index of a block in the arena (and in the pool's metadata table).
///
/// A `BlockId` names a *place*; what is in that place changes each time the
/// block is reallocated, which its [`Generation`] records.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

impl BlockId {
    /// Wraps an arena index.
    pub const fn new(index: u32) -> Self {
        Self(index)
    }

    /// The arena index, for the store that addresses bytes with it.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// How many times a block has been (re)allocated. The sanitizer records
/// `(BlockId, Generation)` pairs so that a stale reference to a recycled
/// block is detected instead of silently reading someone else's KV.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Generation(u32);

impl Generation {
    /// The generation of a block that was never allocated.
    pub const ZERO: Self = Self(0);

    /// Creates a generation value (tests and persisted records).
    pub const fn new(value: u32) -> Self {
        Self(value)
    }

    /// The raw counter.
    pub const fn get(self) -> u32 {
        self.0
    }

    pub(crate) fn bump(&mut self) {
        self.0 = self.0.wrapping_add(1);
    }
}

/// A 128-bit chained block hash (see [`crate::BlockHasher`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(u128);

impl BlockHash {
    /// Wraps raw hash bits (persisted records, tests).
    pub const fn from_bits(bits: u128) -> Self {
        Self(bits)
    }

    /// The raw bits, for persistence.
    pub const fn bits(self) -> u128 {
        self.0
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits are plenty to tell hashes apart in a log.
        write!(f, "h{:08x}", (self.0 >> 96) as u32)
    }
}

/// The number of a forward step. Epochs are issued in increasing order and
/// complete in that same order; `Epoch::ZERO` precedes every step.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(u64);

impl Epoch {
    /// Before any step: a block whose last use is `ZERO` was never touched by a step.
    pub const ZERO: Self = Self(0);

    /// Creates an epoch value.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The raw counter.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The epoch after this one.
    #[must_use]
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// A token id of the model's vocabulary.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId(u32);

impl TokenId {
    /// Wraps a vocabulary index.
    pub const fn new(id: u32) -> Self {
        Self(id)
    }

    /// The vocabulary index.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// A tag the engine attaches to a holder (a request or session id), reported
/// by the sanitizer when a violation names the owners of a block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct OwnerTag(pub u64);

/// A holder of block references: a sequence's block table, a session, a pin
/// guard or a tier copy in progress.
///
/// Ids carry a generation so a released holder's id can never be confused
/// with a later holder that reuses its slot (a session destroyed during its
/// step cannot feed another sequence: its id is simply unknown afterwards).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HolderId {
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

impl fmt::Debug for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "H{}.{}", self.slot, self.generation)
    }
}
