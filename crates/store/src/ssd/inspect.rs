//! Looking at an SSD tier's directory from outside a server: what it holds
//! (`strata cache stats`), whether every byte verifies (`strata cache
//! verify`), and emptying it (`strata cache clear`). Inspection changes
//! nothing and works while a server holds the directory; clearing takes
//! the directory's lock, so it refuses while a server uses it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::record::{self, RecordError, decode_header_any};
use super::{Io, RealIo, SsdError};

/// What a directory holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    /// Records whose header verifies.
    pub records: usize,
    /// Blocks in them.
    pub blocks: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Per model fingerprint (a short hash of it): records and bytes.
    pub models: BTreeMap<String, (usize, u64)>,
    /// Temporary files (writes that never finished; the next open removes
    /// them).
    pub temporary: usize,
    /// Records that do not verify, with why (the next open or read removes
    /// them).
    pub bad: Vec<(PathBuf, String)>,
    /// Blocks whose payload was read and verified (with `verify`).
    pub verified_blocks: usize,
    /// Whether a server holds the directory now.
    pub in_use: bool,
}

/// Looks at `dir`; with `verify`, reads every payload and checks every
/// block's checksum too.
pub fn inspect(dir: &Path, verify: bool) -> Result<Inspection, SsdError> {
    let io = RealIo;
    let records = dir.join("records");
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| SsdError::Io { path, error }
    };
    let mut out = Inspection {
        in_use: held(dir),
        ..Inspection::default()
    };
    for (path, size) in io.list(&records).map_err(err(&records))? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.ends_with(".rec") {
            out.temporary += 1;
            continue;
        }
        match check(&io, &path, size, verify) {
            Ok((blocks, fp)) => {
                out.records += 1;
                out.blocks += blocks;
                out.bytes += size;
                out.verified_blocks += if verify { blocks } else { 0 };
                let key = blake3::hash(&fp).to_hex()[..12].to_string();
                let m = out.models.entry(key).or_default();
                m.0 += 1;
                m.1 += size;
            }
            Err(e) => out.bad.push((path, e.to_string())),
        }
    }
    Ok(out)
}

fn check(
    io: &RealIo,
    path: &Path,
    size: u64,
    verify: bool,
) -> Result<(usize, Vec<u8>), RecordError> {
    let io_err = |e: std::io::Error| RecordError::Malformed(e.to_string());
    let start = io.read_at(path, 0, 16).map_err(io_err)?;
    let len = record::header_len(&start)?;
    let bytes = io.read_at(path, 0, len).map_err(io_err)?;
    let (header, fp) = decode_header_any(&bytes)?;
    if header.record_len() as u64 != size {
        return Err(RecordError::Malformed(format!(
            "{size} bytes where the header says {}",
            header.record_len()
        )));
    }
    if verify {
        for i in 0..header.blocks.len() {
            let r = header.block_range(i);
            let payload = io.read_at(path, r.start as u64, r.len()).map_err(io_err)?;
            header.verify_block(i, &payload)?;
        }
    }
    Ok((header.blocks.len(), fp))
}

/// Whether a server holds `dir`'s lock now.
fn held(dir: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("LOCK"))
    else {
        return false;
    };
    match f.try_lock() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(_) => false,
    }
}

/// Removes every record and temporary file of `dir` under its lock:
/// refuses while a server uses it. Returns files and bytes removed.
pub fn clear(dir: &Path) -> Result<(usize, u64), SsdError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| SsdError::Io { path, error }
    };
    let lock_path = dir.join("LOCK");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(&lock_path)
        .map_err(err(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(SsdError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => return Err(err(&lock_path)(e)),
    }
    let records = dir.join("records");
    // Only a tier's own directory, never through a link.
    let ours = std::fs::symlink_metadata(&records).is_ok_and(|m| m.is_dir())
        && std::fs::symlink_metadata(dir.join(super::MARKER)).is_ok();
    if !ours {
        return Err(SsdError::NotOurs(
            records,
            "is not an SSD tier's records directory",
        ));
    }
    let (mut n, mut bytes) = (0, 0);
    for (path, size) in RealIo.list(&records).map_err(err(&records))? {
        RealIo.remove(&path).map_err(err(&path))?;
        n += 1;
        bytes += size;
    }
    Ok((n, bytes))
}
