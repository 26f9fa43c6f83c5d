//! [`NbdTarget`]: a writable NBD or NBD-SSL export as a restore target (a vSphere
//! write ticket for a VM's new disk, or any writable NBD server). Writes go through
//! the same connection pool as [`NbdSource`] reads (several in flight, a dropped
//! connection re-opened and the write re-sent: writes of the same bytes to the same
//! place are idempotent); the final flush asks the server to make them durable.
//!
//! Must not: log or put the export name in errors (callers pass a label without the
//! ticket), write to a read-only export (refused at connect).

use super::{proto, NbdSource};
use crate::transport::{DiskSource, DiskTarget, SourceError};
use std::io;

/// A writable NBD export.
pub struct NbdTarget {
    inner: NbdSource,
    zero_filled: bool,
}

impl NbdTarget {
    /// Connect `connections` times to a writable export (fewer when the server
    /// does not allow several connections); `label` names it in logs and errors.
    /// `zero_filled`: the caller knows the export reads as zeroes (a virtual disk
    /// just created), so zero chunks are not sent. A read-only export is refused.
    pub fn connect(
        uri: &str,
        label: &str,
        connections: usize,
        zero_filled: bool,
    ) -> Result<NbdTarget, SourceError> {
        let inner = NbdSource::connect_labeled(uri, label, connections)?;
        if inner.flags & proto::TFLAG_READ_ONLY != 0 {
            return Err(SourceError::Open {
                path: label.to_string(),
                err: io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the NBD server exports this disk read-only; a restore needs a writable export (a write ticket)",
                ),
            });
        }
        if inner.flags & proto::TFLAG_SEND_FLUSH == 0 {
            tracing::warn!(
                target = label,
                "the NBD server does not take FLUSH: the restore's durability rests on the server"
            );
        }
        Ok(NbdTarget { inner, zero_filled })
    }
}

fn io_err(e: SourceError) -> io::Error {
    io::Error::other(e.to_string())
}

impl DiskTarget for NbdTarget {
    fn label(&self) -> String {
        self.inner.label.clone()
    }
    fn transport(&self) -> &'static str {
        self.inner.transport()
    }
    fn size(&self) -> u64 {
        self.inner.size
    }
    fn zero_filled(&self) -> bool {
        self.zero_filled
    }
    fn parallel_writes(&self) -> usize {
        self.inner
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .max
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.inner.size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write of {} bytes at {offset} is beyond the export size {}",
                    data.len(),
                    self.inner.size
                ),
            ));
        }
        self.inner
            .with_conn(offset, "write", |c| c.write(offset, data))
            .map_err(io_err)
    }
    fn flush(&self) -> io::Result<()> {
        if self.inner.flags & proto::TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        // One flush covers every connection when the server allows several
        // (NBD_FLAG_CAN_MULTI_CONN); otherwise there is only one.
        self.inner
            .with_conn(0, "flush", |c| c.flush())
            .map_err(io_err)
    }
}
