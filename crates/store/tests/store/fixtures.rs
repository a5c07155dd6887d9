//! Committed record files of the format: a record this build writes must
//! stay byte for byte what `fixtures/v1.rec` holds (a format change must
//! bump the version), older records keep loading and serving, and a record
//! of a version this build does not know is refused clearly and removed.
//!
//! `STRATA_WRITE_FIXTURES=1 cargo test -p strata-store fixtures` rewrites
//! them (only when the format version changes, with a new file name).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_store::ssd::{BlockKey, RealIo, RecordError, SsdStore, decode_header, encode};

use crate::ssd::{FP, TempDir, block, config, get};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/store/fixtures")
        .join(name)
}

/// Chain 1's blocks 0..3 as one record, as this build encodes it.
fn v1_record() -> Vec<u8> {
    let blocks: Vec<_> = (0..3).map(|i| block(1, i)).collect();
    let keys: Vec<BlockKey> = blocks.iter().map(|b| b.0.clone()).collect();
    let payloads: Vec<&[u8]> = blocks.iter().map(|b| &b.2[..]).collect();
    encode(FP, blocks[0].1, 4, &keys, &payloads).unwrap()
}

/// The same record claiming format version 2, its header checksum redone
/// (so only the version is wrong).
fn v2_record() -> Vec<u8> {
    let mut b = v1_record();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let sum = *blake3::hash(&b[..len - 32]).as_bytes();
    b[len - 32..len].copy_from_slice(&sum);
    b
}

#[test]
fn the_committed_fixtures_are_what_this_build_writes_and_reads() {
    if std::env::var_os("STRATA_WRITE_FIXTURES").is_some() {
        std::fs::write(fixture("v1.rec"), v1_record()).unwrap();
        std::fs::write(fixture("v2-unknown.rec"), v2_record()).unwrap();
    }
    let v1 = std::fs::read(fixture("v1.rec")).unwrap();
    assert_eq!(
        v1,
        v1_record(),
        "the byte format changed: bump record::VERSION and add a fixture of the new version"
    );
    let v2 = std::fs::read(fixture("v2-unknown.rec")).unwrap();
    assert_eq!(decode_header(&v2, FP), Err(RecordError::Version(2)));
}

#[test]
fn an_older_record_keeps_loading_and_an_unknown_version_is_removed() {
    let d = TempDir::new("fixtures");
    let records = d.0.join("records");
    // A tier's directory, then the fixtures in it.
    drop(SsdStore::open(config(&d.0, 1 << 20), Arc::new(RealIo)).unwrap());
    std::fs::copy(fixture("v1.rec"), records.join("0000000000000001.rec")).unwrap();
    std::fs::copy(
        fixture("v2-unknown.rec"),
        records.join("0000000000000002.rec"),
    )
    .unwrap();
    let (mut s, r) = SsdStore::open(config(&d.0, 1 << 20), Arc::new(RealIo)).unwrap();
    assert_eq!((r.records, r.corrupt_removed), (1, 1), "{r:?}");
    for i in 0..3 {
        assert!(
            get(&mut s, 1, i).is_some(),
            "the v1 record serves block {i}"
        );
    }
    assert!(!records.join("0000000000000002.rec").exists());
    // New records do not reuse the fixture's id.
    let blocks: Vec<_> = (0..1).map(|i| block(7, i)).collect();
    let keys: Vec<BlockKey> = blocks.iter().map(|b| b.0.clone()).collect();
    assert!(s.put(blocks[0].1, &keys, &[&blocks[0].2[..]]).unwrap());
    assert!(records.join("0000000000000001.rec").exists());
}
