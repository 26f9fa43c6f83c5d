//! [`FileSource`]: a raw disk image or block device read with `pread`, with
//! `SEEK_DATA`/`SEEK_HOLE` for sparse detection on regular files.

use super::{DiskSource, Extent, SourceError};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

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
