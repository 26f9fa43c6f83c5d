//! Random access to a disk for the file-system readers: the [`ReadAt`] seam (a
//! restore point's disk, or a raw image file for tests and local images), and
//! [`Window`], a `Read + Seek` view of one byte range (a partition) that the
//! file-system crates read through.
//!
//! Must not: know about repositories, keys or file systems. Writing is refused
//! (the FAT crate asks for a writable device; a restore point is read-only).

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

/// A disk readable at any offset.
pub trait ReadAt: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A raw disk image file.
pub struct ImageFile {
    file: std::fs::File,
    size: u64,
}

impl ImageFile {
    /// Open `path` read-only.
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(ImageFile { file, size })
    }
}

impl ReadAt for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read beyond the end of the disk",
    )
}

/// `len` bytes of a disk from `start`, as a seekable stream (position 0 is
/// `start`). Reads never go past the window; writes are refused.
#[derive(Clone)]
pub struct Window {
    disk: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
    pos: u64,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("start", &self.start)
            .field("len", &self.len)
            .field("pos", &self.pos)
            .finish()
    }
}

impl Window {
    /// The window `[start, start + len)` of `disk`, clipped to the disk's size.
    pub fn new(disk: Arc<dyn ReadAt>, start: u64, len: u64) -> Self {
        let size = disk.size();
        let start = start.min(size);
        let len = len.min(size - start);
        Window {
            disk,
            start,
            len,
            pos: 0,
        }
    }

    /// The whole disk.
    pub fn whole(disk: Arc<dyn ReadAt>) -> Self {
        let len = disk.size();
        Window::new(disk, 0, len)
    }

    /// Length of the window.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fill `buf` from window offset `offset` (an error past the end).
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(eof)?;
        if end > self.len {
            return Err(eof());
        }
        self.disk.read_at(self.start + offset, buf)
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.disk.read_at(self.start + self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let pos = base.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the volume",
            )
        })?;
        self.pos = pos;
        Ok(pos)
    }
}

impl Write for Window {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a restore point is read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_reads_only_its_range() {
        let disk: Arc<dyn ReadAt> = Arc::new((0u8..=255).collect::<Vec<u8>>());
        let mut w = Window::new(disk, 10, 20);
        let mut b = [0u8; 8];
        assert_eq!(w.read(&mut b).unwrap(), 8);
        assert_eq!(b[0], 10);
        assert_eq!(w.seek(SeekFrom::End(-4)).unwrap(), 16);
        let mut rest = Vec::new();
        w.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, vec![26, 27, 28, 29]);
        assert!(w.seek(SeekFrom::Current(-100)).is_err());
        assert!(w.read_exact_at(18, &mut [0u8; 4]).is_err());
        assert!(w.write(b"x").is_err());
    }

    #[test]
    fn window_is_clipped_to_the_disk() {
        let disk: Arc<dyn ReadAt> = Arc::new(vec![1u8; 100]);
        assert_eq!(Window::new(disk.clone(), 90, 50).len(), 10);
        assert_eq!(Window::new(disk, 500, 50).len(), 0);
    }
}
