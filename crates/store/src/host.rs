//! The host-RAM tier: a strictly byte-bounded store of block payloads keyed
//! by chain hash, each with its exact key (parent hash and tokens) beside
//! it, least recently used first out.
//!
//! On the CPU backend this RAM is the arena's own, so the server turns it
//! off by default (size the arena instead); on a GPU backend it is the
//! pinned host memory restores copy from. Like the SSD tier it decides no
//! policy and reports what it dropped, for the tier index.

use std::collections::{BTreeMap, HashMap};

use strata_kv::{BlockHash, TokenId};

struct Entry {
    parent: BlockHash,
    tokens: Vec<TokenId>,
    payload: Vec<u8>,
    /// Its position in the LRU order.
    tick: u64,
}

/// A block with its exact key and payload (what the host tier evicts, for
/// its owner to spill to SSD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBlock {
    /// Its chain hash.
    pub hash: BlockHash,
    /// The hash before it.
    pub parent: BlockHash,
    /// Its tokens.
    pub tokens: Vec<TokenId>,
    /// Its bytes.
    pub payload: Vec<u8>,
}

/// Counters and gauges of the host tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Blocks held.
    pub blocks: usize,
    /// Bytes they take (payload and key).
    pub bytes: u64,
    /// Blocks served.
    pub hits: u64,
    /// Blocks asked for and not served.
    pub misses: u64,
    /// Blocks written.
    pub written: u64,
    /// Blocks evicted to stay within capacity.
    pub evictions: u64,
}

/// The host-RAM tier.
pub struct HostStore {
    capacity: u64,
    entries: HashMap<BlockHash, Entry>,
    lru: BTreeMap<u64, BlockHash>,
    clock: u64,
    used: u64,
    stats: HostStats,
}

impl std::fmt::Debug for HostStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStore")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish()
    }
}

/// What one entry costs against the bound: its payload and its key.
fn cost(tokens: usize, payload: usize) -> u64 {
    (payload + tokens * 4 + 16) as u64
}

impl HostStore {
    /// An empty store of at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            used: 0,
            stats: HostStats::default(),
        }
    }

    /// Stores `payload` as block `hash` (after `parent`, holding `tokens`),
    /// evicting the least recently used blocks first. Returns the evicted
    /// blocks with their payloads (the caller may spill them to SSD), or
    /// `None` if it does not fit at all. A hash already held is refreshed,
    /// not stored twice.
    pub fn put(
        &mut self,
        hash: BlockHash,
        parent: BlockHash,
        tokens: &[TokenId],
        payload: Vec<u8>,
    ) -> Option<Vec<HostBlock>> {
        let c = cost(tokens.len(), payload.len());
        if c > self.capacity {
            return None;
        }
        if let Some(old) = self.remove(hash) {
            drop(old);
        }
        let mut evicted = Vec::new();
        while self.used + c > self.capacity {
            let (_, victim) = self.lru.pop_first().expect("used > 0 means entries");
            let e = self.entries.remove(&victim).expect("the LRU names entries");
            self.used -= cost(e.tokens.len(), e.payload.len());
            self.stats.evictions += 1;
            evicted.push(HostBlock {
                hash: victim,
                parent: e.parent,
                tokens: e.tokens,
                payload: e.payload,
            });
        }
        self.clock += 1;
        self.lru.insert(self.clock, hash);
        self.entries.insert(
            hash,
            Entry {
                parent,
                tokens: tokens.to_vec(),
                payload,
                tick: self.clock,
            },
        );
        self.used += c;
        self.stats.written += 1;
        Some(evicted)
    }

    /// A copy of block `hash`'s payload, if held under exactly this key.
    pub fn get(
        &mut self,
        hash: BlockHash,
        parent: BlockHash,
        tokens: &[TokenId],
    ) -> Option<Vec<u8>> {
        let Some(e) = self
            .entries
            .get_mut(&hash)
            .filter(|e| e.parent == parent && e.tokens == tokens)
        else {
            self.stats.misses += 1;
            return None;
        };
        self.lru.remove(&e.tick);
        self.clock += 1;
        e.tick = self.clock;
        self.lru.insert(self.clock, hash);
        self.stats.hits += 1;
        Some(e.payload.clone())
    }

    /// Whether `hash` is held (a look, not a hit).
    pub fn contains(&self, hash: BlockHash) -> bool {
        self.entries.contains_key(&hash)
    }

    /// Removes `hash`, returning its payload.
    pub fn remove(&mut self, hash: BlockHash) -> Option<Vec<u8>> {
        let e = self.entries.remove(&hash)?;
        self.lru.remove(&e.tick);
        self.used -= cost(e.tokens.len(), e.payload.len());
        Some(e.payload)
    }

    /// Counters, with the current occupancy.
    pub fn stats(&self) -> HostStats {
        HostStats {
            blocks: self.entries.len(),
            bytes: self.used,
            ..self.stats
        }
    }

    /// The byte bound.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Checks the accounting and the bound (tests call it after every
    /// mutation).
    pub fn check_invariants(&self) -> Result<(), String> {
        let sum: u64 = self
            .entries
            .values()
            .map(|e| cost(e.tokens.len(), e.payload.len()))
            .sum();
        if sum != self.used || self.used > self.capacity {
            return Err(format!(
                "used {} but entries cost {sum} (capacity {})",
                self.used, self.capacity
            ));
        }
        if self.lru.len() != self.entries.len()
            || self
                .lru
                .iter()
                .any(|(t, h)| self.entries.get(h).is_none_or(|e| e.tick != *t))
        {
            return Err("the LRU order and the entries disagree".into());
        }
        Ok(())
    }
}
