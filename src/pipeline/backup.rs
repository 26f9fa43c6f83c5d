//! Backup of one disk: source → workers → ordered index writer.

use super::{ChunkStore, FirstError, PipelineConfig, PipelineError};
use crate::keys::{KeyId, SecretKey};
use crate::progress::Progress;
use crate::repo::format::{
    is_all_zero, ChunkId, ChunkSealer, IndexEntry, IndexHeader, IndexReader, IndexWriter,
};
use crate::repo::RepoError;
use crate::transport::{DiskSource, Extent};
use crossbeam_channel::{bounded, Sender};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// What happened to one disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Chunk positions.
    pub chunks_total: u64,
    /// All-zero (or unallocated) positions.
    pub chunks_zero: u64,
    /// Chunks newly stored.
    pub chunks_new: u64,
    /// Chunks already stored (deduplicated).
    pub chunks_reused: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of new chunk files.
    pub bytes_new_stored: u64,
    /// Data keys the index references.
    pub keys: BTreeSet<KeyId>,
}

/// Inputs of [`backup_disk`].
pub struct BackupInputs<'a, P: Read + Send> {
    /// Where blocks come from.
    pub source: &'a dyn DiskSource,
    /// Where chunks go.
    pub store: &'a dyn ChunkStore,
    /// The point's data key (seals new chunks).
    pub data_key: &'a SecretKey,
    /// The repository id-key.
    pub id_key: &'a SecretKey,
    /// Previous index of the same disk (authenticated by the caller), for dedupe
    /// without a lookup; must use the same chunk size.
    pub previous: Option<IndexReader<P>>,
    /// Whether a data key found on a stored chunk is known (may reload the keyring).
    pub key_known: &'a (dyn Fn(KeyId) -> bool + Sync),
    /// Threads and buffers.
    pub config: PipelineConfig,
    /// Progress and cancellation.
    pub progress: &'a Progress,
}

/// One allocated chunk position for a worker to read and process.
struct Task {
    pos: u64,
    start: u64,
    len: usize,
    prev: Option<IndexEntry>,
}

enum Outcome {
    Zero,
    Reused(IndexEntry),
    New(IndexEntry, u64),
}

/// How far (in chunk positions) the reader may run ahead of the writer.
const WINDOW: u64 = 1 << 16;

/// Back up one disk, writing its index entries in order to `index`.
pub fn backup_disk<W: Write, P: Read + Send>(
    mut inp: BackupInputs<'_, P>,
    index: &mut IndexWriter<W>,
    header: &IndexHeader,
) -> Result<DiskStats, PipelineError> {
    let n = header.entries();
    if let Some(p) = &inp.previous {
        if p.header.chunk_size != header.chunk_size {
            inp.previous = None;
        }
    }
    let (task_tx, task_rx) = bounded::<Task>(inp.config.buffers);
    let (res_tx, res_rx) = bounded::<(u64, Outcome)>(inp.config.buffers * 4 + 64);
    let errors = FirstError::<PipelineError>::new();
    let committed = AtomicU64::new(0);
    let mut stats = DiskStats {
        chunks_total: n,
        ..Default::default()
    };
    let read_before = inp.progress.read.load(Ordering::Relaxed);
    let previous = inp.previous.take();
    let ctx = WorkCtx {
        store: inp.store,
        id_key: inp.id_key,
        key_known: inp.key_known,
        progress: inp.progress,
        sealer: ChunkSealer::new(inp.data_key),
    };

    std::thread::scope(|s| {
        let errors = &errors;
        let committed = &committed;
        let (source, progress) = (inp.source, inp.progress);
        {
            let res_tx = res_tx.clone();
            s.spawn(move || {
                if let Err(e) = dispatch_stage(
                    source, header, previous, &task_tx, &res_tx, errors, committed, progress,
                ) {
                    errors.set(e);
                }
            });
        }
        for _ in 0..inp.config.workers {
            let (task_rx, res_tx) = (task_rx.clone(), res_tx.clone());
            let ctx = &ctx;
            s.spawn(move || {
                // Each worker owns its two buffers for the whole disk: memory is
                // workers x (chunk + sealed chunk), whatever the disk size.
                let (mut buf, mut out) =
                    (Vec::with_capacity(header.chunk_size as usize), Vec::new());
                for t in task_rx {
                    if errors.stopped() {
                        continue;
                    }
                    buf.resize(t.len, 0);
                    if let Err(e) = source.read_at(t.start, &mut buf) {
                        errors.set(e.into());
                        continue;
                    }
                    Progress::add(&progress.read, t.len as u64);
                    match ctx.work(&t, &buf, &mut out) {
                        Ok(o) => {
                            let _ = res_tx.send((t.pos, o));
                        }
                        Err(e) => errors.set(e),
                    }
                }
            });
        }
        drop(res_tx);
        drop(task_rx);
        // The writer: this thread.
        let mut pending: BTreeMap<u64, Outcome> = BTreeMap::new();
        let mut next = 0u64;
        for (pos, o) in res_rx.iter() {
            if errors.stopped() {
                continue;
            }
            pending.insert(pos, o);
            while let Some(o) = pending.remove(&next) {
                let entry = match o {
                    Outcome::Zero => {
                        stats.chunks_zero += 1;
                        IndexEntry::ZERO
                    }
                    Outcome::Reused(e) => {
                        stats.chunks_reused += 1;
                        stats.keys.insert(e.key);
                        e
                    }
                    Outcome::New(e, stored) => {
                        stats.chunks_new += 1;
                        stats.bytes_new_stored += stored;
                        stats.keys.insert(e.key);
                        e
                    }
                };
                if let Err(e) = index.push(&entry) {
                    errors.set(RepoError::io("index", e).into());
                    break;
                }
                Progress::add(&inp.progress.done, header.chunk_len(next) as u64);
                next += 1;
                committed.store(next, Ordering::Release);
            }
        }
        if !errors.stopped() && next != n {
            errors.set(PipelineError::Cancelled);
        }
    });
    if let Some(e) = errors.take() {
        return Err(e);
    }
    stats.bytes_read = inp.progress.read.load(Ordering::Relaxed) - read_before;
    Ok(stats)
}

#[allow(clippy::too_many_arguments)]
fn dispatch_stage<P: Read>(
    source: &dyn DiskSource,
    header: &IndexHeader,
    mut previous: Option<IndexReader<P>>,
    tasks: &Sender<Task>,
    results: &Sender<(u64, Outcome)>,
    errors: &FirstError<PipelineError>,
    committed: &AtomicU64,
    progress: &Progress,
) -> Result<(), PipelineError> {
    let n = header.entries();
    let cs = header.chunk_size as u64;
    let mut ext: Option<Extent> = source.next_allocated(0)?;
    for pos in 0..n {
        if errors.stopped() {
            return Ok(());
        }
        if progress.cancelled() {
            return Err(PipelineError::Cancelled);
        }
        while pos >= committed.load(Ordering::Acquire) + WINDOW {
            if errors.stopped() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let start = pos * cs;
        let len = header.chunk_len(pos);
        let end = start + len as u64;
        while let Some(e) = ext {
            if e.end() <= start {
                ext = source.next_allocated(start)?;
            } else {
                break;
            }
        }
        let prev = match previous.as_mut() {
            Some(p) => match p.next_entry() {
                Ok(e) => e,
                Err(_) => {
                    // A damaged previous index only costs deduplication.
                    previous = None;
                    None
                }
            },
            None => None,
        };
        let allocated = matches!(ext, Some(e) if e.offset < end);
        if !allocated {
            if results.send((pos, Outcome::Zero)).is_err() {
                return Ok(());
            }
            continue;
        }
        if tasks
            .send(Task {
                pos,
                start,
                len,
                prev,
            })
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

struct WorkCtx<'a> {
    store: &'a dyn ChunkStore,
    id_key: &'a SecretKey,
    key_known: &'a (dyn Fn(KeyId) -> bool + Sync),
    progress: &'a Progress,
    sealer: ChunkSealer,
}

impl WorkCtx<'_> {
    fn existing(&self, id: &ChunkId) -> Result<Option<IndexEntry>, PipelineError> {
        match self.store.chunk_key(id)? {
            None => Ok(None),
            Some(k) if k == self.sealer.key_id() || (self.key_known)(k) => {
                Ok(Some(IndexEntry { id: *id, key: k }))
            }
            Some(k) => Err(PipelineError::UnknownChunkKey { chunk: *id, key: k }),
        }
    }

    fn work(&self, t: &Task, data: &[u8], out: &mut Vec<u8>) -> Result<Outcome, PipelineError> {
        if is_all_zero(data) {
            return Ok(Outcome::Zero);
        }
        let id = ChunkId::compute(self.id_key, data);
        if let Some(p) = t.prev {
            if p.id == id {
                return Ok(Outcome::Reused(p));
            }
        }
        if let Some(e) = self.existing(&id)? {
            return Ok(Outcome::Reused(e));
        }
        self.sealer.seal(&id, data, out);
        if self.store.put_chunk(&id, out)? {
            Progress::add(&self.progress.written, out.len() as u64);
            Ok(Outcome::New(
                IndexEntry {
                    id,
                    key: self.sealer.key_id(),
                },
                out.len() as u64,
            ))
        } else {
            // Another writer stored the same chunk first: reference its copy.
            self.existing(&id)?.map(Outcome::Reused).ok_or_else(|| {
                PipelineError::Repo(RepoError::Invalid(format!(
                    "chunk {id} vanished while being stored"
                )))
            })
        }
    }
}
