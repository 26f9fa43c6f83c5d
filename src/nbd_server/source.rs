//! [`SourceBackend`]: any [`DiskSource`] (a raw image, a block device, even another
//! NBD export) served as an [`ExportBackend`]; its allocated extents become
//! `base:allocation` block status, everything else a hole that reads as zeroes.

use super::ExportBackend;
use crate::transport::nbd::proto::{STATE_HOLE, STATE_ZERO};
use crate::transport::{DiskSource, SourceError};

/// A disk source as an export backend.
pub struct SourceBackend<S: DiskSource>(pub S);

fn io(e: SourceError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl<S: DiskSource> ExportBackend for SourceBackend<S> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf).map_err(io)
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u32)>> {
        let end = offset.saturating_add(len).min(self.0.size());
        if offset >= end {
            return Ok(vec![(len.max(1), 0)]);
        }
        Ok(match self.0.next_allocated(offset).map_err(io)? {
            None => vec![(end - offset, STATE_HOLE | STATE_ZERO)],
            Some(e) if e.offset > offset => {
                let hole = (e.offset.min(end)) - offset;
                let mut v = vec![(hole, STATE_HOLE | STATE_ZERO)];
                if e.offset < end {
                    v.push((e.end().min(end) - e.offset, 0));
                }
                v
            }
            Some(e) => vec![(e.end().min(end) - offset, 0)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::file::FileSource;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_sparse_file_reports_its_holes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 1 << 20], 2 << 20).unwrap();
        drop(f);
        let b = SourceBackend(FileSource::open(&p).unwrap());
        assert_eq!(b.size(), 8 << 20);
        assert_eq!(
            b.block_status(0, 8 << 20).unwrap(),
            vec![(2 << 20, 3), (1 << 20, 0)]
        );
        assert_eq!(b.block_status(2 << 20, 512).unwrap(), vec![(512, 0)]);
        assert_eq!(
            b.block_status(3 << 20, 8 << 20).unwrap(),
            vec![(5 << 20, 3)]
        );
        let mut buf = [0u8; 4];
        b.read_at(2 << 20, &mut buf).unwrap();
        assert_eq!(buf, [1; 4]);
    }
}
