//! [`FileSource`]: a raw disk image or block device read with `pread`, with
//! `SEEK_DATA`/`SEEK_HOLE` for sparse detection on regular files; and
//! [`FileTarget`]: a restore's new sparse image or existing block device (or a
//! hot-added disk's device), written with `pwrite`, block-aligned writes through
//! an `O_DIRECT` handle where the file system has one.

use super::{DiskSource, DiskTarget, Extent, SourceError};
use crate::repo::fsutil::{start_writeback, DIRECT_ALIGN};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A raw image file or block device.
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
    sparse_aware: bool,
}

impl FileSource {
    /// Open read-only.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let err = |err| SourceError::Open {
            path: path.display().to_string(),
            err,
        };
        let file = File::open(path).map_err(err)?;
        let md = file.metadata().map_err(err)?;
        let (size, sparse_aware) = if md.file_type().is_block_device() {
            let mut f = &file;
            (
                std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(err)?,
                false,
            )
        } else {
            (md.len(), true)
        };
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            size,
            sparse_aware,
        })
    }

    fn lseek(&self, off: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an owned, open descriptor; no memory is passed.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

impl DiskSource for FileSource {
    fn label(&self) -> String {
        self.path.display().to_string()
    }
    fn transport(&self) -> &'static str {
        "file"
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn next_allocated(&self, from: u64) -> Result<Option<Extent>, SourceError> {
        if from >= self.size {
            return Ok(None);
        }
        if !self.sparse_aware {
            return Ok(Some(Extent {
                offset: from,
                len: self.size - from,
            }));
        }
        let io = |err| SourceError::Io {
            source_name: self.label(),
            op: "lseek",
            offset: from,
            err,
        };
        let data = match self.lseek(from, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(None),
            // File systems without SEEK_DATA support: treat everything as data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(Some(Extent {
                    offset: from,
                    len: self.size - from,
                }))
            }
            Err(e) => return Err(io(e)),
        };
        if data >= self.size {
            return Ok(None);
        }
        let hole = self
            .lseek(data, libc::SEEK_HOLE)
            .map_err(io)?
            .unwrap_or(self.size)
            .min(self.size);
        Ok(Some(Extent {
            offset: data,
            len: hole - data,
        }))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(SourceError::OutOfRange {
                source_name: self.label(),
                offset,
                len: buf.len(),
                size: self.size,
            });
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|err| SourceError::Io {
                source_name: self.label(),
                op: "read",
                offset,
                err,
            })
    }
}

/// Where a restore writes: a file or block device (see the module documentation).
pub struct FileTarget {
    file: File,
    /// The same file opened with `O_DIRECT`, when the file system supports it:
    /// block-aligned writes go there, bypassing the page cache.
    direct: Option<File>,
    path: PathBuf,
    size: u64,
    zero_filled: bool,
    transport: &'static str,
    /// Bytes written through the page cache since the last write-back hint.
    since_hint: AtomicU64,
}

/// Buffered bytes after which write-back is started (keeps the disk busy while
/// the restore decodes, instead of flushing everything at the final fsync).
const WRITEBACK_HINT: u64 = 64 << 20;

/// Whether `path` is a block device.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

impl FileTarget {
    /// Create `path` as a new sparse file of `size` bytes; refuses to overwrite an
    /// existing file. Reads as zeroes where not written.
    pub fn create(path: &Path, size: u64) -> std::io::Result<FileTarget> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        file.set_len(size)?;
        Ok(Self::with_direct(file, path, size, true))
    }

    /// Open an existing file or block device of at least `size` bytes for writing.
    /// `zero_filled`: the caller knows it reads as zeroes (a freshly created
    /// virtual disk); otherwise zero chunks are written too.
    pub fn open_existing(path: &Path, size: u64, zero_filled: bool) -> std::io::Result<FileTarget> {
        let file = OpenOptions::new().write(true).open(path)?;
        let have = {
            let mut f = &file;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))?
        };
        if have < size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} has {have} bytes, the disk needs {size}", path.display()),
            ));
        }
        Ok(Self::with_direct(file, path, have, zero_filled))
    }

    fn with_direct(file: File, path: &Path, size: u64, zero_filled: bool) -> FileTarget {
        // File systems without O_DIRECT (tmpfs) use buffered I/O only.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        FileTarget {
            file,
            direct,
            path: path.to_path_buf(),
            size,
            zero_filled,
            transport: "file",
            since_hint: AtomicU64::new(0),
        }
    }

    /// Report `transport` (e.g. "hotadd") instead of "file".
    pub fn with_transport(mut self, transport: &'static str) -> FileTarget {
        self.transport = transport;
        self
    }

    /// The path written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl DiskTarget for FileTarget {
    fn label(&self) -> String {
        self.path.display().to_string()
    }
    fn transport(&self) -> &'static str {
        self.transport
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn zero_filled(&self) -> bool {
        self.zero_filled
    }
    /// The block-aligned part through the `O_DIRECT` handle when there is one and
    /// the buffer is 4096-aligned (the pipeline's are), the rest (a short last
    /// chunk, or an unaligned buffer) through the buffered one.
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match &self.direct {
            Some(d)
                if (offset as usize).is_multiple_of(DIRECT_ALIGN)
                    && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) =>
            {
                let n = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
                if n > 0 {
                    d.write_all_at(&data[..n], offset)?;
                }
                if n < data.len() {
                    self.file.write_all_at(&data[n..], offset + n as u64)?;
                }
                Ok(())
            }
            _ => {
                self.file.write_all_at(data, offset)?;
                if self.direct.is_none() {
                    let since = self
                        .since_hint
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if since + data.len() as u64 >= WRITEBACK_HINT {
                        self.since_hint.store(0, Ordering::Relaxed);
                        start_writeback(&self.file);
                    }
                }
                Ok(())
            }
        }
    }
    fn flush(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_extents_and_reads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], 40 << 20).unwrap();
        drop(f);
        let s = FileSource::open(&p).unwrap();
        assert_eq!(s.size(), 64 << 20);
        let e = s.next_allocated(0).unwrap().unwrap();
        assert!(e.offset <= 8 << 20 && e.end() >= (8 << 20) + 4096, "{e:?}");
        let e2 = s.next_allocated(e.end()).unwrap().unwrap();
        assert!(e2.offset <= 40 << 20 && e2.offset > e.offset);
        let mut b = [0u8; 16];
        s.read_at(40 << 20, &mut b).unwrap();
        assert_eq!(b, [2u8; 16]);
        assert!(s.read_at((64 << 20) - 8, &mut b).is_err());
    }
}
