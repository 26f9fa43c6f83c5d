//! The data plane: multithreaded backup and restore of one disk.
//!
//! Backup: a dispatcher thread walks the disk's allocation (skipping unallocated
//! ranges, which become zero entries without a read) and hands chunk positions to N
//! worker threads; each worker reads its chunk into its own reused buffer (so N
//! reads are in flight, which matters for network sources), detects zero chunks,
//! computes the chunk id, skips chunks already stored, LZ4-compresses and
//! AES-GCM-seals new ones and stores them; the calling thread, the single writer,
//! commits index entries strictly in disk order. Restore runs the reverse. Memory is
//! bounded by [`PipelineConfig`], never by disk size. Plain threads and crossbeam
//! channels: this is CPU work, not async I/O. An incremental backup
//! ([`backup::ReadPlan::Changed`]) reads only the chunk positions [`changed`] maps
//! from changed-block tracking and takes every other entry from the previous index.
//!
//! This module does not create restore points or touch manifests; see [`crate::job`].

pub mod backup;
pub mod changed;
pub mod restore;

use crate::keys::KeyId;
use crate::repo::format::ChunkId;
use crate::repo::{RepoError, Repository};
use crate::transport::SourceError;

/// Threads and buffers of one pipeline run.
#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    /// Worker threads (hash/compress/encrypt or decrypt/decompress/verify).
    pub workers: usize,
    /// Chunk buffers in flight (bounds memory: about `buffers × chunk size`).
    pub buffers: usize,
    /// Codec for new chunks (a backup takes its repository's).
    pub codec: crate::repo::codec::Codec,
}

impl PipelineConfig {
    /// Default: one worker per core; buffers from a memory budget (bytes), at least
    /// two per worker.
    pub fn new(workers: Option<usize>, chunk_size: u32, memory_budget: u64) -> Self {
        let workers = workers
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            })
            .clamp(1, 256);
        // Each worker also holds one output buffer; keep the total within budget.
        let per = chunk_size as u64 * 2;
        let by_budget = (memory_budget / per.max(1)) as usize;
        let buffers = by_budget.max(2 * workers).min(4096);
        PipelineConfig {
            workers,
            buffers,
            codec: Default::default(),
        }
    }
}

impl PipelineConfig {
    /// At least `min` workers (a store where each worker waits on one network
    /// request at a time wants more of them than cores), with the buffers
    /// they need.
    pub fn with_min_workers(self, min: usize) -> Self {
        let workers = self.workers.max(min).min(256);
        PipelineConfig {
            workers,
            buffers: self.buffers.max(2 * workers).min(4096),
            ..self
        }
    }
}

/// Pipeline failures.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Reading the source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Repository error (I/O, damage, no space).
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A stored chunk is sealed with a key neither the keyring nor this backup knows.
    #[error("stored chunk {chunk} is sealed with data key {key} that the keyring does not know; run 'ferry verify'")]
    UnknownChunkKey {
        /// Chunk.
        chunk: ChunkId,
        /// Key.
        key: KeyId,
    },
    /// Writing the restore target failed.
    #[error("writing restore target {path} at offset {offset}: {err}")]
    Target {
        /// Target.
        path: String,
        /// Offset.
        offset: u64,
        /// Error.
        err: std::io::Error,
    },
    /// An incremental read cannot use the previous index it was given (a caller
    /// bug, or the previous point changed under the backup).
    #[error("incremental backup: {0}")]
    Incremental(String),
    /// Cancelled by the operator.
    #[error("cancelled")]
    Cancelled,
}

/// Chunk storage as the pipeline sees it. [`Repository`] implements it; tests and
/// future backends (S3) can provide their own.
pub trait ChunkStore: Sync {
    /// Key id of a stored chunk, or `None` if absent.
    fn chunk_key(&self, id: &ChunkId) -> Result<Option<KeyId>, RepoError>;
    /// Store a sealed chunk unless present; returns whether it was written.
    fn put_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<bool, RepoError>;
    /// Read a sealed chunk into `buf`.
    fn read_chunk(&self, id: &ChunkId, buf: &mut Vec<u8>) -> Result<(), RepoError>;
    /// Where a chunk lives, for error messages.
    fn chunk_location(&self, id: &ChunkId) -> std::path::PathBuf;
}

impl ChunkStore for Repository {
    fn chunk_key(&self, id: &ChunkId) -> Result<Option<KeyId>, RepoError> {
        Repository::chunk_key(self, id)
    }
    fn put_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<bool, RepoError> {
        Repository::put_chunk(self, id, data)
    }
    fn read_chunk(&self, id: &ChunkId, buf: &mut Vec<u8>) -> Result<(), RepoError> {
        Repository::read_chunk(self, id, buf)
    }
    fn chunk_location(&self, id: &ChunkId) -> std::path::PathBuf {
        self.chunk_path(id)
    }
}

/// First error wins; later ones are dropped. Setting it also raises the stop flag.
pub(crate) struct FirstError<E> {
    slot: std::sync::Mutex<Option<E>>,
    stop: std::sync::atomic::AtomicBool,
}

impl<E> FirstError<E> {
    pub(crate) fn new() -> Self {
        FirstError {
            slot: std::sync::Mutex::new(None),
            stop: std::sync::atomic::AtomicBool::new(false),
        }
    }
    pub(crate) fn set(&self, e: E) {
        let mut s = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = Some(e);
        }
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }
    pub(crate) fn take(self) -> Option<E> {
        self.slot.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}
