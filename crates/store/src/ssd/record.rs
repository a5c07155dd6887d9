//! The byte format of one SSD record: a run of consecutive blocks of one
//! chain (see `docs/ssd-format.md`). Everything is little-endian.
//!
//! ```text
//! header   magic "STRATAKV" | version u32 | header_len u32
//!          fingerprint_len u32 | fingerprint bytes (model and KV layout)
//!          block_tokens u32 | blocks u32 | block_bytes u64
//!          parent hash u128
//!          per block: hash u128 | tokens u32 x block_tokens | payload blake3 [32]
//!          header blake3 [32] (of every header byte before it)
//! payload  blocks x block_bytes
//! ```
//!
//! The header's own checksum lets recovery trust a record's index entry
//! without reading its payload; each block's checksum lets a restore read
//! and verify one block of a record alone. A torn write (a short file, a
//! zero-filled tail) fails the length check or a checksum.

use strata_kv::{BlockHash, TokenId};

/// The first bytes of every record.
pub const MAGIC: &[u8; 8] = b"STRATAKV";
/// The largest payload a block may have (a default-model block is 92 KB).
pub(super) const MAX_BLOCK_BYTES: usize = 64 << 20;
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;

/// Why bytes are not a record this build can serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not a record (wrong magic), or a truncated one.
    #[error("not a record: {0}")]
    Malformed(String),
    /// A record of another format version.
    #[error("format version {0}, this build reads {VERSION}")]
    Version(u32),
    /// A checksum does not match: the bytes are corrupt.
    #[error("checksum mismatch in {0}")]
    Corrupt(&'static str),
    /// A record of another model or KV layout (never a hit).
    #[error("made for another model or KV layout")]
    OtherModel,
}

/// One block of a record: its chain hash and the exact tokens it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockKey {
    /// Its chain hash.
    pub hash: BlockHash,
    /// The exact tokens it holds.
    pub tokens: Vec<TokenId>,
}

/// A record's header, read and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The hash of the block before the first (the chain root's, for a
    /// chain's first block).
    pub parent: BlockHash,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Payload bytes per block.
    pub block_bytes: usize,
    /// The blocks, in chain order.
    pub blocks: Vec<BlockKey>,
    /// Each block's payload checksum.
    sums: Vec<[u8; 32]>,
    /// Where the payload starts.
    pub payload_at: usize,
}

impl Header {
    /// The record's length in bytes.
    pub fn record_len(&self) -> usize {
        self.payload_at + self.blocks.len() * self.block_bytes
    }

    /// Where block `i`'s payload lies in the record.
    pub fn block_range(&self, i: usize) -> std::ops::Range<usize> {
        let at = self.payload_at + i * self.block_bytes;
        at..at + self.block_bytes
    }

    /// Checks block `i`'s payload against its checksum.
    pub fn verify_block(&self, i: usize, payload: &[u8]) -> Result<(), RecordError> {
        if payload.len() != self.block_bytes {
            return Err(RecordError::Malformed(format!(
                "block {i} holds {} bytes, not {}",
                payload.len(),
                self.block_bytes
            )));
        }
        if blake3::hash(payload).as_bytes() != &self.sums[i] {
            return Err(RecordError::Corrupt("a block's payload"));
        }
        Ok(())
    }
}

/// Encodes a record of `blocks` (consecutive, after `parent`) whose
/// payloads are `payloads` (one slice of `block_bytes` per block); refuses
/// blocks of mixed sizes and a header past [`MAX_HEADER`].
pub fn encode(
    fingerprint: &[u8],
    parent: BlockHash,
    block_tokens: usize,
    blocks: &[BlockKey],
    payloads: &[&[u8]],
) -> Result<Vec<u8>, RecordError> {
    let block_bytes = payloads.first().map_or(0, |p| p.len());
    let shape_ok = blocks.len() == payloads.len()
        && blocks.iter().all(|b| b.tokens.len() == block_tokens)
        && payloads.iter().all(|p| p.len() == block_bytes);
    if !shape_ok {
        return Err(RecordError::Malformed(
            "a record needs one payload per block, all full and of one size".into(),
        ));
    }
    let header =
        16 + 4 + fingerprint.len() + 16 + 16 + blocks.len() * (16 + 4 * block_tokens + 32) + 32;
    if header > MAX_HEADER {
        return Err(RecordError::Malformed(format!(
            "a header of {header} bytes"
        )));
    }
    let mut h = Vec::new();
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // header_len, set below
    h.extend_from_slice(&(fingerprint.len() as u32).to_le_bytes());
    h.extend_from_slice(fingerprint);
    h.extend_from_slice(&(block_tokens as u32).to_le_bytes());
    h.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    h.extend_from_slice(&(block_bytes as u64).to_le_bytes());
    h.extend_from_slice(&parent.bits().to_le_bytes());
    for (b, p) in blocks.iter().zip(payloads) {
        h.extend_from_slice(&b.hash.bits().to_le_bytes());
        for t in &b.tokens {
            h.extend_from_slice(&t.get().to_le_bytes());
        }
        h.extend_from_slice(blake3::hash(p).as_bytes());
    }
    let len = (h.len() + 32) as u32;
    h[12..16].copy_from_slice(&len.to_le_bytes());
    let sum = blake3::hash(&h);
    h.extend_from_slice(sum.as_bytes());
    for p in payloads {
        h.extend_from_slice(p);
    }
    Ok(h)
}

/// A cursor over header bytes that refuses to read past them.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| RecordError::Malformed("the header is cut short".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u128(&mut self) -> Result<u128, RecordError> {
        Ok(u128::from_le_bytes(
            self.take(16)?.try_into().expect("16 bytes"),
        ))
    }
}

/// The most header bytes a record may claim (a corrupt length must not
/// make a reader allocate gigabytes).
pub(super) const MAX_HEADER: usize = 1 << 20;

/// The length of the header that `start` (a record's first bytes, at
/// least 16) announces.
pub(super) fn header_len(start: &[u8]) -> Result<usize, RecordError> {
    if start.len() < 16 || &start[..8] != MAGIC {
        return Err(RecordError::Malformed("no magic".into()));
    }
    let version = u32::from_le_bytes(start[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(RecordError::Version(version));
    }
    let len = u32::from_le_bytes(start[12..16].try_into().expect("4 bytes")) as usize;
    if !(16 + 32..=MAX_HEADER).contains(&len) {
        return Err(RecordError::Malformed(format!("a header of {len} bytes")));
    }
    Ok(len)
}

/// Reads and verifies a header (`bytes` holds at least the header) made
/// for `fingerprint`.
pub fn decode_header(bytes: &[u8], fingerprint: &[u8]) -> Result<Header, RecordError> {
    decode(bytes, Some(fingerprint)).map(|(h, _)| h)
}

/// Reads and verifies a header made for any model, with its fingerprint
/// (inspection tools: `strata cache stats|verify`).
pub fn decode_header_any(bytes: &[u8]) -> Result<(Header, Vec<u8>), RecordError> {
    decode(bytes, None)
}

fn decode(bytes: &[u8], fingerprint: Option<&[u8]>) -> Result<(Header, Vec<u8>), RecordError> {
    let len = header_len(bytes)?;
    if bytes.len() < len {
        return Err(RecordError::Malformed("the header is cut short".into()));
    }
    let (body, sum) = bytes[..len].split_at(len - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(RecordError::Corrupt("the header"));
    }
    let mut r = Reader { b: body, at: 16 };
    let fp_len = r.u32()? as usize;
    let fp = r.take(fp_len)?.to_vec();
    if fingerprint.is_some_and(|f| f != fp) {
        return Err(RecordError::OtherModel);
    }
    let block_tokens = r.u32()? as usize;
    let n = r.u32()? as usize;
    let block_bytes = usize::try_from(r.u64()?)
        .ok()
        // No model's block is near this; a crafted header claiming more
        // would make a reader allocate it.
        .filter(|&b| b <= MAX_BLOCK_BYTES)
        .filter(|&b| b.checked_mul(n).and_then(|p| p.checked_add(len)).is_some())
        .ok_or_else(|| RecordError::Malformed("a payload too large".into()))?;
    let parent = BlockHash::from_bits(r.u128()?);
    let mut blocks = Vec::new();
    let mut sums = Vec::new();
    for _ in 0..n {
        let hash = BlockHash::from_bits(r.u128()?);
        let mut tokens = Vec::with_capacity(block_tokens.min(4096));
        for _ in 0..block_tokens {
            tokens.push(TokenId::new(r.u32()?));
        }
        blocks.push(BlockKey { hash, tokens });
        sums.push(r.take(32)?.try_into().expect("32 bytes"));
    }
    if r.at != body.len() {
        return Err(RecordError::Malformed("bytes left in the header".into()));
    }
    Ok((
        Header {
            parent,
            block_tokens,
            block_bytes,
            blocks,
            sums,
            payload_at: len,
        },
        fp,
    ))
}
