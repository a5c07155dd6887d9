//! Errors of the KV core: capacity results, misuse of the API (which the
//! engine must never do, reported instead of panicking), and the sanitizer's
//! violations.

use crate::ids::{BlockId, Epoch, Generation, HolderId, OwnerTag};

/// What a block is doing right now (see the crate docs for the states).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BlockState {
    /// Refcount 0, in the LRU free queue, possibly still cached.
    Free,
    /// Refcount at least 1.
    Owned,
    /// Refcount 0, but a step that may still touch it has not completed.
    Quarantined,
}

/// The errors of `kv`. Every variant carries the figures needed to act on it.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum KvError {
    /// Not enough free blocks; nothing was allocated.
    #[error("not enough KV blocks: needed {needed}, {free} free")]
    OutOfBlocks {
        /// Blocks asked for.
        needed: usize,
        /// Blocks that were free.
        free: usize,
    },
    /// The holder was released (or never existed).
    #[error("unknown holder {0:?}: released, or never created")]
    UnknownHolder(HolderId),
    /// An epoch outside the in-flight window `(completed, issued]`.
    #[error(
        "epoch {epoch:?} is not in flight (completed up to {completed:?}, issued up to {issued:?})"
    )]
    EpochNotInFlight {
        /// The epoch given.
        epoch: Epoch,
        /// The last completed epoch.
        completed: Epoch,
        /// The last issued epoch.
        issued: Epoch,
    },
    /// A write into a block that is published, shared or failed.
    #[error("write rule: {block:?} cannot be written ({reason})")]
    WriteRule {
        /// The block.
        block: BlockId,
        /// Why it may not be written.
        reason: &'static str,
    },
    /// A write past the blocks the holder has allocated.
    #[error("holder {holder:?} has room for {room} more tokens, {wanted} were written")]
    NoRoom {
        /// The holder.
        holder: HolderId,
        /// Free slots in its blocks.
        room: usize,
        /// Tokens written.
        wanted: usize,
    },
    /// A slot reference to a block that has been reallocated since.
    #[error("stale slot reference to {block:?}: generation {recorded:?}, now {current:?}")]
    StaleSlot {
        /// The block.
        block: BlockId,
        /// The generation in the reference.
        recorded: Generation,
        /// The block's generation now.
        current: Generation,
    },
    /// A slot whose token was already resolved.
    #[error("slot {slot} of {block:?} already holds a token")]
    SlotAlreadyResolved {
        /// The block.
        block: BlockId,
        /// The slot within it.
        slot: usize,
    },
    /// A token id the pool reserves (`u32::MAX`).
    #[error("token id {0} is reserved")]
    ReservedToken(u32),
    /// A copy on write of a block whose tokens are not all known yet.
    #[error("{0:?} has tokens still pending; copy it once they are resolved")]
    PendingTokens(BlockId),
    /// Hashes made with another key or block size than the pool's.
    #[error("the sequence was hashed with a different hasher than the pool's")]
    ForeignHasher,
    /// A lease of another cache (another model instance) was used here.
    #[error("holder {0:?} belongs to another KV cache")]
    ForeignLease(HolderId),
    /// A slot reference minted by another pool was resolved here.
    #[error("the slot reference to {0:?} was made by another KV pool")]
    ForeignSlot(BlockId),
    /// An operation that needs every step that used the holder to have
    /// completed (truncation) was asked for too early.
    #[error(
        "holder {holder:?} was used by step {last_epoch:?}, which has not completed (completed up to {completed:?})"
    )]
    HolderInFlight {
        /// The holder.
        holder: HolderId,
        /// The last step that used it.
        last_epoch: Epoch,
        /// The last completed step.
        completed: Epoch,
    },
    /// A pool configuration that cannot work.
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(String),
    /// The sanitizer found a step touching a block it may not touch.
    #[error(transparent)]
    Violation(Box<Violation>),
}

/// How a step touches a block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// Attention reads it.
    Read,
    /// The step writes K and V into it.
    Write,
}

/// A sanitizer violation: a step refers to a block that it may no longer
/// touch. It names everything needed to find the culprit.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error(
    "KV sanitizer: step {step:?} {access:?} {block:?}: {reason}; recorded at generation {recorded:?}, \
     the block is at generation {current:?}, state {state:?}, last used by {last_use:?} \
     (completed up to {completed:?}); holders now: {owners:?}"
)]
pub struct Violation {
    /// What rule the access breaks.
    pub reason: &'static str,
    /// The step's epoch.
    pub step: Epoch,
    /// Read or write.
    pub access: Access,
    /// The block.
    pub block: BlockId,
    /// The generation the step recorded.
    pub recorded: Generation,
    /// The block's generation now.
    pub current: Generation,
    /// The block's state now.
    pub state: BlockState,
    /// The last epoch that used the block.
    pub last_use: Epoch,
    /// The last completed epoch.
    pub completed: Epoch,
    /// Tags of the holders that reference the block now.
    pub owners: Vec<OwnerTag>,
}
