//! [`VddkSource`] (a [`DiskSource`]) and [`VddkTarget`] (a [`DiskTarget`]): the
//! VDDK disk behind the traits the backup and restore pipelines already use, with
//! the same semantics as the file and HotAdd implementations.
//!
//! Owns: mapping [`VddkError`] into [`SourceError`]/`io::Error` with the disk,
//! the mode and VDDK's code and text; a cache of the last allocation window so
//! `next_allocated` does not re-ask VDDK for every extent.
//!
//! Must not: open connections or choose a transport (the job does, through
//! [`super::session`]).

use super::disk::VddkDisk;
use super::error::VddkError;
use super::session::Connection;
use crate::transport::{DiskSource, DiskTarget, Extent, SourceError};
use std::sync::{Arc, Mutex};

/// Bytes asked of `QueryAllocatedBlocks` per `next_allocated` window (the most
/// one call covers: 524288 chunks of 64 KiB).
pub const ALLOC_WINDOW: u64 = super::ffi::MAX_CHUNK_NUMBER * super::disk::CHUNK_BYTES;

/// The [`VddkError`] inside a [`SourceError`] built by this module (e.g. to tell
/// a [`VddkError::ModeMismatch`] from other failures and take the selector's next
/// decision), if there is one.
pub fn vddk_error(e: &SourceError) -> Option<&VddkError> {
    let io = match e {
        SourceError::Io { err, .. } | SourceError::Open { err, .. } => err,
        SourceError::OutOfRange { .. } => return None,
    };
    let inner = io.get_ref()?;
    inner.downcast_ref::<VddkError>().or_else(|| {
        inner
            .downcast_ref::<super::error::WithContext>()
            .map(|w| &w.err)
    })
}

/// The allocation answer for `[start, end)`.
struct AllocWindow {
    start: u64,
    end: u64,
    extents: Vec<Extent>,
}

fn label(disk: &VddkDisk) -> String {
    format!("vddk:{}:{}", disk.mode(), disk.path())
}

fn open_error(path: &str, mode: &str, e: VddkError) -> SourceError {
    SourceError::Open {
        path: path.to_string(),
        err: e.into_io(&format!("VDDK transport {mode}")),
    }
}

/// A disk read through VDDK (backups).
pub struct VddkSource {
    disk: VddkDisk,
    cache: Mutex<Option<AllocWindow>>,
}

impl VddkSource {
    /// Open `path` read-only on `conn` (whose mode VDDK must confirm).
    pub fn open(conn: &Arc<Connection>, path: &str) -> Result<VddkSource, SourceError> {
        let disk = VddkDisk::open(conn, path, true)
            .map_err(|e| open_error(path, conn.mode().as_str(), e))?;
        Ok(VddkSource {
            disk,
            cache: Mutex::new(None),
        })
    }

    /// The underlying disk.
    pub fn disk(&self) -> &VddkDisk {
        &self.disk
    }

    /// Narrow areas (e.g. from `QueryChangedDiskAreas`) to their allocated parts,
    /// sorted and merged. Without allocation information the areas come back as
    /// given (clipped to the disk).
    pub fn allocated_in(&self, areas: &[Extent]) -> Result<Vec<Extent>, SourceError> {
        let mut out = Vec::new();
        for a in areas {
            out.extend(
                self.disk
                    .allocated(a.offset, a.len)
                    .map_err(|e| self.io_error("query allocated blocks", a.offset, e))?,
            );
        }
        Ok(super::disk::merge_extents(out))
    }

    fn io_error(&self, op: &'static str, offset: u64, e: VddkError) -> SourceError {
        SourceError::Io {
            source_name: label(&self.disk),
            op,
            offset,
            err: std::io::Error::other(e),
        }
    }
}

impl DiskSource for VddkSource {
    fn label(&self) -> String {
        label(&self.disk)
    }
    fn transport(&self) -> &'static str {
        self.disk.mode().as_str()
    }
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn next_allocated(&self, from: u64) -> Result<Option<Extent>, SourceError> {
        let size = self.disk.size();
        let mut at = from;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        while at < size {
            if let Some(w) = cache.as_ref().filter(|w| w.start <= at && at < w.end) {
                if let Some(e) = w.extents.iter().find(|e| e.end() > at) {
                    let offset = e.offset.max(at);
                    return Ok(Some(Extent {
                        offset,
                        len: e.end() - offset,
                    }));
                }
                at = w.end;
                continue;
            }
            let len = ALLOC_WINDOW.min(size - at);
            let extents = self
                .disk
                .allocated(at, len)
                .map_err(|e| self.io_error("query allocated blocks", at, e))?;
            *cache = Some(AllocWindow {
                start: at,
                end: at + len,
                extents,
            });
        }
        Ok(None)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.disk.size())
        {
            return Err(SourceError::OutOfRange {
                source_name: self.label(),
                offset,
                len: buf.len(),
                size: self.disk.size(),
            });
        }
        self.disk
            .read_at(offset, buf)
            .map_err(|e| self.io_error("read", offset, e))
    }
}

/// A disk written through VDDK (restores into a new or existing virtual disk).
pub struct VddkTarget {
    disk: VddkDisk,
    zero_filled: bool,
}

impl VddkTarget {
    /// Open `path` read-write on a read-write `conn`. `zero_filled`: the disk was
    /// just created, so zero chunks need no write.
    pub fn open(
        conn: &Arc<Connection>,
        path: &str,
        zero_filled: bool,
    ) -> Result<VddkTarget, SourceError> {
        let disk = VddkDisk::open(conn, path, false)
            .map_err(|e| open_error(path, conn.mode().as_str(), e))?;
        Ok(VddkTarget { disk, zero_filled })
    }

    /// The underlying disk.
    pub fn disk(&self) -> &VddkDisk {
        &self.disk
    }
}

impl DiskTarget for VddkTarget {
    fn label(&self) -> String {
        label(&self.disk)
    }
    fn transport(&self) -> &'static str {
        self.disk.mode().as_str()
    }
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn zero_filled(&self) -> bool {
        self.zero_filled
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.disk
            .write_at(offset, data)
            .map_err(|e| e.into_io(&format!("{} at offset {offset}", self.label())))
    }
    fn flush(&self) -> std::io::Result<()> {
        self.disk
            .flush()
            .map_err(|e| e.into_io(&format!("{} flush", self.label())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vddk_errors_are_found_inside_source_errors() {
        let mm = || VddkError::ModeMismatch {
            disk: "[ds1] vm/vm.vmdk".into(),
            asked: "hotadd".into(),
            got: "nbdssl".into(),
        };
        let e = open_error("[ds1] vm/vm.vmdk", "hotadd", mm());
        assert!(matches!(
            vddk_error(&e),
            Some(VddkError::ModeMismatch { .. })
        ));
        let msg = e.to_string();
        assert!(
            msg.contains("[ds1] vm/vm.vmdk") && msg.contains("\"nbdssl\""),
            "{msg}"
        );
        let e = SourceError::Io {
            source_name: "vddk:nbdssl:x".into(),
            op: "read",
            offset: 0,
            err: std::io::Error::other(VddkError::Vix {
                call: "VixDiskLib_ReadAsync",
                code: 16007,
                text: "out of bounds".into(),
            }),
        };
        assert_eq!(vddk_error(&e).and_then(|v| v.vix_code()), Some(16007));
        assert!(
            e.to_string().contains("VIX error 16007 (out of bounds)"),
            "{e}"
        );
        let e = SourceError::OutOfRange {
            source_name: "x".into(),
            offset: 0,
            len: 1,
            size: 0,
        };
        assert!(vddk_error(&e).is_none());
    }
}
