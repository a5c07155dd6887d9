//! The arena: every block's K and V for every layer, in f16.
//!
//! ```text
//!   block b:  [layer 0: [K: [kv_head][slot][head_dim]] [V: same]] [layer 1: ...] ...
//! ```
//!
//! Block-major, so block `b` is one contiguous range (a tier copies it in
//! one go); within a block, the slots of one (layer, K|V, head) are
//! contiguous, which is what attention streams through.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use strata_kv::BlockId;

/// The arena's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaLayout {
    /// Blocks in the arena.
    pub num_blocks: usize,
    /// Transformer layers.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl ArenaLayout {
    /// f16 elements in one (layer, K|V, head) run of a block.
    pub const fn head_run(&self) -> usize {
        self.block_size * self.head_dim
    }

    /// f16 elements in one block.
    pub const fn block_elems(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.head_run()
    }

    /// Bytes in one block.
    pub const fn block_bytes(&self) -> usize {
        self.block_elems() * 2
    }

    /// Bytes in the whole arena.
    pub const fn total_bytes(&self) -> usize {
        self.block_bytes() * self.num_blocks
    }

    /// Bytes of K and V per token.
    pub const fn bytes_per_token(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.head_dim * 2
    }

    fn run_start(&self, block: BlockId, layer: usize, kv: usize, head: usize) -> usize {
        block.index() * self.block_elems()
            + ((layer * 2 + kv) * self.kv_heads + head) * self.head_run()
    }
}

/// What can go wrong creating an arena.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArenaError {
    /// A zero dimension, or a size that overflows.
    #[error("invalid arena layout {0:?}")]
    InvalidLayout(ArenaLayout),
}

/// The KV arena. The model reads and writes it only at the blocks its block
/// tables name.
pub struct Arena {
    layout: ArenaLayout,
    /// f16 bits. Zero-initialized through the allocator, so pages are only
    /// committed as blocks are first written.
    data: Vec<u16>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

const K: usize = 0;
const V: usize = 1;

impl Arena {
    /// An arena of zeros.
    pub fn new(layout: ArenaLayout) -> Result<Self, ArenaError> {
        let ArenaLayout {
            num_blocks,
            layers,
            kv_heads,
            block_size,
            head_dim,
        } = layout;
        let elems = [num_blocks, layers, 2, kv_heads, block_size, head_dim]
            .iter()
            .try_fold(
                1usize,
                |acc, &d| if d == 0 { None } else { acc.checked_mul(d) },
            )
            .filter(|&n| n.checked_mul(2).is_some())
            .ok_or(ArenaError::InvalidLayout(layout))?;
        Ok(Self {
            layout,
            data: vec![0u16; elems],
        })
    }

    /// The arena's shape.
    pub fn layout(&self) -> ArenaLayout {
        self.layout
    }

    /// Writes one token's K and V (each `kv_heads * head_dim` values, head
    /// after head) for `layer` into `slot` of `block`.
    pub fn write(&mut self, block: BlockId, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let l = self.layout;
        debug_assert!(
            slot < l.block_size && k.len() == l.kv_heads * l.head_dim && v.len() == k.len()
        );
        for (kv, src) in [(K, k), (V, v)] {
            for h in 0..l.kv_heads {
                let start = l.run_start(block, layer, kv, h) + slot * l.head_dim;
                let dst = self.data[start..start + l.head_dim].reinterpret_cast_mut::<f16>();
                dst.convert_from_f32_slice(&src[h * l.head_dim..(h + 1) * l.head_dim]);
            }
        }
    }

    /// The K values of `head` in `layer` for every slot of `block`:
    /// `block_size * head_dim` values, slot after slot.
    pub fn k(&self, block: BlockId, layer: usize, head: usize) -> &[f16] {
        self.run(block, layer, K, head)
    }

    /// The V values, laid out as [`Self::k`].
    pub fn v(&self, block: BlockId, layer: usize, head: usize) -> &[f16] {
        self.run(block, layer, V, head)
    }

    fn run(&self, block: BlockId, layer: usize, kv: usize, head: usize) -> &[f16] {
        let start = self.layout.run_start(block, layer, kv, head);
        self.data[start..start + self.layout.head_run()].reinterpret_cast::<f16>()
    }

    /// The whole block, as one contiguous range.
    pub fn block(&self, block: BlockId) -> &[f16] {
        let n = self.layout.block_elems();
        self.data[block.index() * n..(block.index() + 1) * n].reinterpret_cast::<f16>()
    }

    /// A block's bytes (little-endian f16), for a demotion to copy out.
    pub fn block_bytes(&self, block: BlockId, out: &mut Vec<u8>) {
        let n = self.layout.block_elems();
        let src = &self.data[block.index() * n..(block.index() + 1) * n];
        out.clear();
        out.reserve(n * 2);
        for v in src {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Overwrites a block with `bytes` from [`Self::block_bytes`] (a
    /// restore). Refuses a payload of another size.
    pub fn write_block_bytes(&mut self, block: BlockId, bytes: &[u8]) -> Result<(), String> {
        let n = self.layout.block_elems();
        if bytes.len() != n * 2 {
            return Err(format!(
                "a restore payload of {} bytes for blocks of {}",
                bytes.len(),
                n * 2
            ));
        }
        let dst = &mut self.data[block.index() * n..(block.index() + 1) * n];
        for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
            *d = u16::from_le_bytes([c[0], c[1]]);
        }
        Ok(())
    }

    /// Copies the first `slots` slots of every (layer, K|V, head) run of
    /// `src` into `dst` (copy on write of a shared partial block).
    pub fn copy_slots(&mut self, src: BlockId, dst: BlockId, slots: usize) {
        let l = self.layout;
        let len = slots.min(l.block_size) * l.head_dim;
        for layer in 0..l.layers {
            for kv in [K, V] {
                for h in 0..l.kv_heads {
                    let s = l.run_start(src, layer, kv, h);
                    let d = l.run_start(dst, layer, kv, h);
                    self.data.copy_within(s..s + len, d);
                }
            }
        }
    }

    /// Fills a block with NaN, so a read of a block that was reallocated
    /// shows up in the logits (the sanitizer's poison).
    pub fn poison(&mut self, block: BlockId) {
        let n = self.layout.block_elems();
        self.data[block.index() * n..(block.index() + 1) * n].fill(f16::NAN.to_bits());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> ArenaLayout {
        ArenaLayout {
            num_blocks: 3,
            layers: 2,
            kv_heads: 2,
            block_size: 4,
            head_dim: 3,
        }
    }

    #[test]
    fn writes_land_in_their_block_layer_head_and_slot_only() {
        let mut a = Arena::new(layout()).unwrap();
        let k: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let v: Vec<f32> = (0..6).map(|x| -(x as f32)).collect();
        a.write(BlockId::new(1), 1, 2, &k, &v);
        assert_eq!(
            a.k(BlockId::new(1), 1, 1)[2 * 3..3 * 3]
                .iter()
                .map(|x| x.to_f32())
                .collect::<Vec<_>>(),
            [3.0, 4.0, 5.0]
        );
        assert_eq!(
            a.v(BlockId::new(1), 1, 0)[2 * 3..3 * 3]
                .iter()
                .map(|x| x.to_f32())
                .collect::<Vec<_>>(),
            [0.0, -1.0, -2.0]
        );
        let nonzero = |b: usize| {
            a.block(BlockId::new(b as u32))
                .iter()
                .filter(|x| x.to_f32() != 0.0)
                .count()
        };
        assert_eq!(
            (nonzero(0), nonzero(1), nonzero(2)),
            (0, 10, 0),
            "one token of one layer: 5 + 5 non-zero values"
        );
        assert_eq!(a.block(BlockId::new(0)).len(), layout().block_elems());
    }

    #[test]
    fn copy_slots_and_poison() {
        let mut a = Arena::new(layout()).unwrap();
        let kv = vec![1.5f32; 6];
        for slot in 0..4 {
            a.write(BlockId::new(0), 0, slot, &kv, &kv);
        }
        a.copy_slots(BlockId::new(0), BlockId::new(2), 2);
        let copied = a.k(BlockId::new(2), 0, 1);
        assert!(
            copied[..6].iter().all(|x| x.to_f32() == 1.5)
                && copied[6..].iter().all(|x| x.to_f32() == 0.0)
        );
        a.poison(BlockId::new(1));
        assert!(a.block(BlockId::new(1)).iter().all(|x| x.is_nan()));
        assert!(!a.block(BlockId::new(2)).iter().any(|x| x.is_nan()));
    }

    #[test]
    fn rejects_a_zero_dimension() {
        let bad = ArenaLayout {
            head_dim: 0,
            ..layout()
        };
        assert_eq!(Arena::new(bad).unwrap_err(), ArenaError::InvalidLayout(bad));
    }
}
