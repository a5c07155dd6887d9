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
