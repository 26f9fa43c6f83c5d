//! Durable file-system primitives: atomic file replacement (temp file, fsync, rename,
//! directory fsync), directory fsync and `syncfs(2)`. No repository knowledge.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// fsync a directory so renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `data` to `path` atomically: write `tmp`, fsync, rename over `path`, fsync
/// the parent directory. `tmp` must be on the same file system.
pub fn atomic_write(tmp: &Path, path: &Path, data: &[u8]) -> io::Result<()> {
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(tmp, path)?;
        fsync_dir(path.parent().unwrap_or(Path::new(".")))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    res
}

/// Flush every dirty page and inode of the file system holding `dir` to stable
/// storage, reporting write-back errors (Linux >= 5.8 reports them per file system).
pub fn syncfs(dir: &Path) -> io::Result<()> {
    let f = File::open(dir)?;
    // SAFETY: syncfs takes a valid open file descriptor and no pointers.
    let r = unsafe { libc::syncfs(f.as_raw_fd()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether an I/O error means "out of space" (ENOSPC or EDQUOT).
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        atomic_write(&d.path().join("f.tmp"), &p, b"one").unwrap();
        atomic_write(&d.path().join("f.tmp"), &p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!d.path().join("f.tmp").exists());
        syncfs(d.path()).unwrap();
    }
}
