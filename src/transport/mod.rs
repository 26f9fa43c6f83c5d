//! Where disk blocks come from and where restores write them: the [`DiskSource`]
//! and [`DiskTarget`] traits and their implementations, and [`select`], the pure
//! key-provider-aware choice of proxy and transport mode.
//!
//! Sources: [`file::FileSource`] (raw images and block devices),
//! [`hotadd::HotAddSource`] (a snapshot disk hot-added to this proxy VM) and
//! [`nbd::NbdSource`] (NBD and NBD-SSL). Targets: [`file::FileTarget`] (a new
//! sparse file, an existing block device), [`hotadd::HotAddTarget`] (a new virtual
//! disk hot-added to this proxy VM) and [`nbd::NbdTarget`] (a writable NBD(-SSL)
//! export, a vSphere write ticket). This module must not know about repositories
//! or encryption.

pub mod file;
pub mod hotadd;
pub mod nbd;
pub mod select;
pub mod vddk;

/// A byte range of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Start offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Extent {
    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Errors from a disk source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// I/O error reading the source.
    #[error("{source_name}: {op} at offset {offset}: {err}")]
    Io {
        /// Source label.
        source_name: String,
        /// Operation.
        op: &'static str,
        /// Offset.
        offset: u64,
        /// Error.
        err: std::io::Error,
    },
    /// Source cannot be opened.
    #[error("cannot open {path}: {err}")]
    Open {
        /// Path or URI.
        path: String,
        /// Error.
        err: std::io::Error,
    },
    /// Read beyond the end of the disk.
    #[error("{source_name}: read of {len} bytes at {offset} is beyond the disk size {size}")]
    OutOfRange {
        /// Source label.
        source_name: String,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Disk size.
        size: u64,
    },
}

/// A readable disk: a raw image, a block device, an NBD export, a hot-added disk.
///
/// `read_at` may be called from several threads at once.
pub trait DiskSource: Send + Sync {
    /// Label for logs and manifests.
    fn label(&self) -> String;
    /// Transport name recorded in manifests ("file", "nbdssl", "hotadd", ...).
    fn transport(&self) -> &'static str;
    /// Disk size in bytes.
    fn size(&self) -> u64;
    /// The first allocated extent that ends after `from`, or `None` if nothing after
    /// `from` is allocated. Sources that cannot tell return everything from `from`
    /// to the end as allocated (the default).
    fn next_allocated(&self, from: u64) -> Result<Option<Extent>, SourceError> {
        let size = self.size();
        Ok((from < size).then_some(Extent {
            offset: from,
            len: size - from,
        }))
    }
    /// Fill `buf` from `offset`; the range must lie inside the disk.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;
    /// Reads this source serves best in flight at once (network sources: their
    /// connections). Above 1, the backup pipeline runs this many reader threads
    /// that read ahead of its workers, so the network's latency overlaps the CPU
    /// work even on a one-core proxy; at 1, each worker reads its own chunks.
    fn read_parallelism(&self) -> usize {
        1
    }
}

/// A writable disk a restore writes into: a new raw image, a block device, a
/// writable NBD export, a hot-added virtual disk's device.
///
/// `write_at` may be called from several threads at once, always for disjoint
/// ranges. Errors are plain I/O errors; the caller names the target and offset.
pub trait DiskTarget: Send + Sync {
    /// Label for logs and errors (never a credential such as an NBD ticket).
    fn label(&self) -> String;
    /// Transport name ("file", "hotadd", "nbdssl", "nbd").
    fn transport(&self) -> &'static str;
    /// Size in bytes (at least the size of the disk restored into it).
    fn size(&self) -> u64;
    /// Whether every byte not written reads as zero (a new sparse file, a freshly
    /// created virtual disk): the restore then skips zero chunks instead of
    /// writing them.
    fn zero_filled(&self) -> bool;
    /// How many writes are worth having in flight (NBD connections); default 1.
    fn parallel_writes(&self) -> usize {
        1
    }
    /// Write all of `data` at `offset` (inside the target).
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Make everything written so far durable.
    fn flush(&self) -> std::io::Result<()>;
}
