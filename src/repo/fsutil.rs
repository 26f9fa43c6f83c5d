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

/// Ask the kernel to start writing `f`'s dirty pages back now, without waiting.
/// Overlaps disk writes with computation so a later fsync/syncfs has less to wait
/// for. Purely a hint: errors are ignored here and reported by the later sync.
pub fn start_writeback(f: &File) {
    // SAFETY: sync_file_range on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Create `dst` with `data` without it ever being visible half-written: an unnamed
/// `O_TMPFILE` inode in `dir` is written, hinted for write-back, and linked to `dst`.
/// Fails with `AlreadyExists` if `dst` exists (it is never replaced).
///
/// (Writing chunks with `O_DIRECT` was measured and rejected: synchronous device
/// writes stall the workers and the backup got slower.)
pub fn link_new_file(dir: &Path, dst: &Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    let cdir = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: open with a valid NUL-terminated path; the fd is owned by `f` below.
    let fd = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly opened, owned descriptor.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(data)?;
    start_writeback(&f);
    let proc_path =
        std::ffi::CString::new(format!("/proc/self/fd/{fd}")).map_err(io::Error::other)?;
    let cdst = std::ffi::CString::new(dst.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: both paths are valid NUL-terminated strings.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            libc::AT_FDCWD,
            cdst.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Block size for `O_DIRECT` buffers, offsets and lengths.
pub const DIRECT_ALIGN: usize = 4096;

/// The `len`-byte window of `buf` starting on a [`DIRECT_ALIGN`] boundary (grows
/// `buf` as needed).
pub fn aligned_window(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + DIRECT_ALIGN {
        buf.resize(len + DIRECT_ALIGN, 0);
    }
    let off = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    &mut buf[off..off + len]
}

/// Fallback of [`link_new_file`]: write the named file `tmp`, then hard-link it to
/// `dst` (never replacing it). The caller removes `tmp`.
pub fn write_then_link(tmp: &Path, dst: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create(tmp)?;
    f.write_all(data)?;
    start_writeback(&f);
    drop(f);
    std::fs::hard_link(tmp, dst)
}

/// Whether an error means the file system does not support an operation (O_TMPFILE).
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
    )
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
        let q = d.path().join("g");
        link_new_file(d.path(), &q, b"data").unwrap();
        assert_eq!(std::fs::read(&q).unwrap(), b"data");
        let e = link_new_file(d.path(), &q, b"other").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&q).unwrap(), b"data");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!d.path().join("f.tmp").exists());
        syncfs(d.path()).unwrap();
    }
}
