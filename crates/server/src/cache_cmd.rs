//! `strata cache stats|verify|clear [DIR]`: the SSD tier's directory seen
//! from outside a server.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use strata_store::ssd;

use crate::cli::CacheCommand;

/// The SSD tier's default directory.
pub fn default_ssd_dir() -> PathBuf {
    strata_model::default_model::cache_dir().join("kv")
}

/// Runs one `strata cache` command; its report, or why it failed.
pub fn run(cmd: &CacheCommand) -> Result<String, String> {
    let (CacheCommand::Stats { dir } | CacheCommand::Verify { dir } | CacheCommand::Clear { dir }) =
        cmd;
    let dir = dir.clone().unwrap_or_else(default_ssd_dir);
    if !dir.join("records").is_dir() {
        return Err(format!(
            "{} is not an SSD tier's directory (no records/)",
            dir.display()
        ));
    }
    match cmd {
        CacheCommand::Clear { .. } => {
            let (n, bytes) = ssd::clear(&dir).map_err(|e| e.to_string())?;
            Ok(format!(
                "{}: removed {n} files ({bytes} bytes)",
                dir.display()
            ))
        }
        CacheCommand::Stats { .. } => report(&dir, false).map(|(out, _)| out),
        CacheCommand::Verify { .. } => {
            // Fails (a non-zero exit) if any record does not verify.
            let (out, clean) = report(&dir, true)?;
            if clean { Ok(out) } else { Err(out) }
        }
    }
}

/// The report, and whether every record verified.
fn report(dir: &Path, verify: bool) -> Result<(String, bool), String> {
    let i = ssd::inspect(dir, verify).map_err(|e| e.to_string())?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}{}",
        dir.display(),
        if i.in_use {
            " (in use by a server)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "records: {}  blocks: {}  bytes: {}",
        i.records, i.blocks, i.bytes
    );
    for (fp, (n, bytes)) in &i.models {
        let _ = writeln!(s, "  model fp_{fp}: {n} records, {bytes} bytes");
    }
    if i.temporary > 0 {
        let _ = writeln!(
            s,
            "temporary files: {} (removed at the next start)",
            i.temporary
        );
    }
    if verify {
        let _ = writeln!(s, "verified blocks: {}", i.verified_blocks);
    }
    for (p, why) in &i.bad {
        let _ = writeln!(s, "bad: {}: {why}", p.display());
    }
    if verify {
        let _ = writeln!(
            s,
            "{}",
            if i.bad.is_empty() {
                "ok: every record verifies"
            } else {
                "FAILED: records above do not verify (a server drops them when it meets them)"
            }
        );
    }
    Ok((s, i.bad.is_empty()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use strata_kv::{BlockHash, TokenId};
    use strata_store::ssd::{BlockKey, RealIo, SsdConfig, SsdStore};

    use super::*;

    /// `verify` fails (a non-zero exit) on a payload that does not verify,
    /// though its header does; `stats`, which reads headers only, does not
    /// (before the fix, verify's exit came from a headers-only look).
    #[test]
    fn verify_fails_on_a_bad_payload_and_stats_does_not() {
        let dir = strata_testkit::TempDir::new("cache-verify");
        {
            let (mut s, _) = SsdStore::open(
                SsdConfig {
                    dir: dir.0.clone(),
                    capacity: 1 << 20,
                    fingerprint: b"fp".to_vec(),
                    sync: false,
                },
                Arc::new(RealIo),
            )
            .unwrap();
            let key = BlockKey {
                hash: BlockHash::from_bits(7),
                tokens: (0..4).map(TokenId::new).collect(),
            };
            s.put(BlockHash::from_bits(1), &[key], &[&[5u8; 128][..]])
                .unwrap();
        }
        let cmd = |f: fn(Option<PathBuf>) -> CacheCommand| run(&f(Some(dir.0.clone())));
        let verify = |d| CacheCommand::Verify { dir: d };
        let stats = |d| CacheCommand::Stats { dir: d };
        assert!(cmd(verify).is_ok());
        let rec = std::fs::read_dir(dir.0.join("records"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut b = std::fs::read(&rec).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        std::fs::write(&rec, b).unwrap();
        let out = cmd(verify).expect_err("a bad payload fails verify");
        assert!(out.contains("FAILED"), "{out}");
        assert!(cmd(stats).is_ok());
    }
}
