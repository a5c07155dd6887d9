//! The file operations the SSD tier makes, behind a trait so tests can fail
//! any one of them (crash safety: every write, fsync and rename in turn).

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What the SSD tier asks of the file system.
pub trait Io: Send + Sync {
    /// Creates `path` (mode 0600; it must not exist) holding `bytes`,
    /// synced to the medium when `sync`.
    fn write_new(&self, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()>;
    /// Renames `from` to `to` (atomic within one directory).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// `len` bytes of `path` from `at` (fewer at its end).
    fn read_at(&self, path: &Path, at: u64, len: usize) -> io::Result<Vec<u8>>;
    /// The files of `dir` with their sizes.
    fn list(&self, dir: &Path) -> io::Result<Vec<(PathBuf, u64)>>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealIo;

impl Io for RealIo {
    fn write_new(&self, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_data()?;
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn read_at(&self, path: &Path, at: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(path)?;
        f.seek(SeekFrom::Start(at))?;
        let mut out = Vec::with_capacity(len);
        f.take(len as u64).read_to_end(&mut out)?;
        Ok(out)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_file() {
                out.push((e.path(), m.len()));
            }
        }
        out.sort();
        Ok(out)
    }
}
