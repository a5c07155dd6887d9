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

    /// `n` consecutive ranges of `len` bytes of `path` from `at`, one
    /// buffer each (a run of blocks of one record, read without a copy).
    fn read_blocks(&self, path: &Path, at: u64, len: usize, n: usize) -> io::Result<Vec<Vec<u8>>> {
        (0..n)
            .map(|k| self.read_at(path, at + (k * len) as u64, len))
            .collect()
    }
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

    fn read_blocks(&self, path: &Path, at: u64, len: usize, n: usize) -> io::Result<Vec<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path)?;
        let mut out = Vec::with_capacity(n);
        for k in 0..n {
            // One pread of exactly a block into its own buffer (read_to_end
            // would read it in growing pieces of 8 KiB and up).
            let mut v = vec![0u8; len];
            f.read_exact_at(&mut v, at + (k * len) as u64)?;
            out.push(v);
        }
        Ok(out)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            // A file removed while the directory is listed is not an error.
            let m = match e.metadata() {
                Ok(m) => m,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            if m.is_file() {
                out.push((e.path(), m.len()));
            }
        }
        out.sort();
        Ok(out)
    }
}
