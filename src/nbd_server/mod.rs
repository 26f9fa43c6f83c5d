//! NBD server side: what an exported disk must provide ([`ExportBackend`]) and how
//! export names are resolved ([`ExportProvider`]). The serving loop (fixed newstyle
//! handshake, STARTTLS, structured replies, block status) builds on these traits and
//! serves both `ferry export` (a restore point, decrypted on demand) and the mock
//! ESXi host (snapshot disks by ticket).
//!
//! Must not know where the bytes come from: backends own that.

use std::sync::Arc;

/// A read-only disk served over NBD. Calls may come from several threads at once.
pub trait ExportBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the range lies inside the disk (the server checks).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Allocation of the range starting at `offset` (at most `len` bytes): runs of
    /// `(length, flags)` in order from `offset`, where flags are NBD
    /// `base:allocation` bits (1 = hole, 2 = reads as zeroes). May describe less than
    /// `len` but at least one byte. Backends that cannot tell return one data run.
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u32)>> {
        let _ = offset;
        Ok(vec![(len, 0)])
    }
}

/// Why an export name was refused (unknown, expired ticket, not allowed...). The
/// text goes back to the client in the NBD option error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExportRefused(pub String);

/// Resolves the export name a client asks for (a ticket, a disk number...) to a
/// backend.
pub trait ExportProvider: Send + Sync {
    /// The backend for `name`, or why not.
    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>, ExportRefused>;
}
