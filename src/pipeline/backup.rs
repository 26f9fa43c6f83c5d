//! Backup of one disk: source → workers → ordered index writer, reading every
//! allocated chunk ([`ReadPlan::Full`]), only the chunks CBT reports allocated
//! ([`ReadPlan::Allocated`]), or only the changed ones while the others are taken
//! from the previous index without a read ([`ReadPlan::Changed`]). A network source
//! gets reader threads of its own, one per connection, that read ahead of the
//! workers.

use super::changed::ChunkSet;
use super::{ChunkStore, FirstError, PipelineConfig, PipelineError};
use crate::keys::{KeyId, SecretKey};
use crate::progress::Progress;
use crate::repo::format::{
    is_all_zero, ChunkId, ChunkSealer, IndexEntry, IndexHeader, IndexReader, IndexWriter,
};
use crate::repo::RepoError;
use crate::transport::{DiskSource, Extent};
use crossbeam_channel::{bounded, Sender};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// Chunk positions taken from the previous index without a read
    /// ([`ReadPlan::Changed`]); unchanged zero positions count as zero instead.
    pub chunks_unchanged: u64,
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
    /// without a lookup (ignored when its chunk size differs), and the base of
    /// [`ReadPlan::Changed`].
    pub previous: Option<IndexReader<P>>,
    /// Which positions to read.
    pub plan: ReadPlan,
    /// Whether a data key found on a stored chunk is known (may reload the keyring).
    pub key_known: &'a (dyn Fn(KeyId) -> bool + Sync),
    /// Chunks `verify --repair` took out of use
    /// ([`crate::repo::Repository::chunks_to_rewrite`]): a previous index entry
    /// naming one is not reused; its position is read and the chunk stored again,
    /// sealed with the data key the older indexes name for it when that key is
    /// given (so those points mend), else with this point's key.
    pub rewrite: &'a Rewrite,
    /// Threads and buffers.
    pub config: PipelineConfig,
    /// Progress and cancellation.
    pub progress: &'a Progress,
}

/// Chunks to store again, each with the data key older indexes name for it
/// (`None` when the keyring does not hold it). See [`BackupInputs::rewrite`].
pub type Rewrite = HashMap<ChunkId, Option<SecretKey>>;

/// Which chunk positions [`backup_disk`] reads.
#[derive(Clone, Debug, Default)]
pub enum ReadPlan {
    /// Every position the source reports allocated: a full backup.
    #[default]
    Full,
    /// A full backup of a disk whose allocated areas are known (CBT `*`):
    /// positions outside the set are zero without a read; the others are read
    /// unless the source itself reports them unallocated.
    Allocated(ChunkSet),
    /// An incremental backup: positions outside `changed` are unchanged since the
    /// previous point and take its index entry without a read (a zero marker stays
    /// zero); positions in `changed` are read and processed as in a full backup.
    /// Needs [`BackupInputs::previous`] with the same chunk size and disk size.
    /// Entries are used as they stream in, so the previous index's hash must equal
    /// `previous_hash` (from its authenticated manifest) once all are read, or the
    /// backup fails: a file changed after the caller verified it is never copied
    /// into a new point.
    Changed {
        /// Positions that changed since the previous point.
        changed: ChunkSet,
        /// Index hash the previous point's manifest records for that index.
        previous_hash: [u8; 32],
    },
}

impl ReadPlan {
    fn name(&self) -> &'static str {
        match self {
            ReadPlan::Full => "full",
            ReadPlan::Allocated(_) => "allocated",
            ReadPlan::Changed { .. } => "changed",
        }
    }
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
    /// Taken from the previous index without a read (never the zero marker).
    Unchanged(IndexEntry),
}

/// Put the calling reader thread under `SCHED_BATCH`. Woken by each burst of
/// network data, a normal thread preempts the worker compressing on that core,
/// and reads a few dozen KiB before sleeping again; a batch thread waits for the
/// worker's time slice and then reads what has piled up. Measured with ferry
/// pinned to one core: about 40% fewer task switches and 8% less CPU per GiB.
/// Unprivileged; if the kernel refuses, the thread keeps the normal policy.
fn batch_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` outlives the call.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if r != 0 {
        tracing::debug!(err = %std::io::Error::last_os_error(), "SCHED_BATCH refused for a reader thread");
    }
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
    if let ReadPlan::Changed { .. } = &inp.plan {
        let why = match &inp.previous {
            None => Some("no previous index was given".to_string()),
            Some(p) if p.header.chunk_size != header.chunk_size => Some(format!(
                "the previous index uses {}-byte chunks, this backup {}",
                p.header.chunk_size, header.chunk_size
            )),
            Some(p) if p.header.disk_size != header.disk_size => Some(format!(
                "the previous index covers {} bytes, the disk has {}",
                p.header.disk_size, header.disk_size
            )),
            Some(_) => None,
        };
        if let Some(why) = why {
            return Err(PipelineError::Incremental(why));
        }
    } else if let Some(p) = &inp.previous {
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
    let bytes_read = AtomicU64::new(0);
    let previous = inp.previous.take();
    let plan = std::mem::take(&mut inp.plan);
    tracing::debug!(plan = plan.name(), chunks = n, "disk pipeline starts");
    let ctx = WorkCtx {
        store: inp.store,
        id_key: inp.id_key,
        key_known: inp.key_known,
        rewrite: inp.rewrite,
        progress: inp.progress,
        sealer: ChunkSealer::with_codec(inp.data_key, inp.config.codec),
    };

    std::thread::scope(|s| {
        let errors = &errors;
        let committed = &committed;
        let bytes_read = &bytes_read;
        let plan = &plan;
        let (source, progress, rewrite) = (inp.source, inp.progress, inp.rewrite);
        {
            let res_tx = res_tx.clone();
            s.spawn(move || {
                if let Err(e) = dispatch_stage(
                    source, header, previous, plan, rewrite, &task_tx, &res_tx, errors, committed,
                    progress,
                ) {
                    errors.set(e);
                }
            });
        }
        let readers = source.read_parallelism().min(64);
        if readers <= 1 {
            // A local source: a read is a page-cache copy, CPU work like the rest,
            // so each worker reads its own chunks.
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
                        ctx.read_done(t.len, bytes_read);
                        ctx.work_and_send(&t, &buf, &mut out, &res_tx, errors);
                    }
                });
            }
        } else {
            // A network source: one reader thread per connection keeps reads in
            // flight and read ahead of the workers, which only compute; chunk
            // buffers circulate readers -> workers -> readers through `free`.
            let spare = readers.min(
                inp.config
                    .buffers
                    .saturating_sub(readers + inp.config.workers),
            );
            let nbuf = readers + inp.config.workers + spare;
            let (free_tx, free_rx) = bounded::<Vec<u8>>(nbuf);
            for _ in 0..nbuf {
                let _ = free_tx.send(Vec::new());
            }
            let (ready_tx, ready_rx) = bounded::<(Task, Vec<u8>)>(nbuf);
            for _ in 0..readers {
                let (task_rx, free_rx, free_tx, ready_tx) = (
                    task_rx.clone(),
                    free_rx.clone(),
                    free_tx.clone(),
                    ready_tx.clone(),
                );
                let ctx = &ctx;
                s.spawn(move || {
                    batch_scheduling();
                    for t in task_rx {
                        if errors.stopped() {
                            continue;
                        }
                        let Ok(mut buf) = free_rx.recv() else { return };
                        buf.resize(t.len, 0);
                        if let Err(e) = source.read_at(t.start, &mut buf) {
                            errors.set(e.into());
                            let _ = free_tx.send(buf);
                            continue;
                        }
                        ctx.read_done(t.len, bytes_read);
                        if ready_tx.send((t, buf)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop((ready_tx, free_rx));
            for _ in 0..inp.config.workers {
                let (ready_rx, free_tx, res_tx) =
                    (ready_rx.clone(), free_tx.clone(), res_tx.clone());
                let ctx = &ctx;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for (t, buf) in ready_rx {
                        if !errors.stopped() {
                            ctx.work_and_send(&t, &buf, &mut out, &res_tx, errors);
                        }
                        let _ = free_tx.send(buf);
                    }
                });
            }
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
                    Outcome::Unchanged(e) => {
                        stats.chunks_unchanged += 1;
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
    stats.bytes_read = bytes_read.load(Ordering::Relaxed);
    Ok(stats)
}

#[allow(clippy::too_many_arguments)]
fn dispatch_stage<P: Read>(
    source: &dyn DiskSource,
    header: &IndexHeader,
    mut previous: Option<IndexReader<P>>,
    plan: &ReadPlan,
    rewrite: &Rewrite,
    tasks: &Sender<Task>,
    results: &Sender<(u64, Outcome)>,
    errors: &FirstError<PipelineError>,
    committed: &AtomicU64,
    progress: &Progress,
) -> Result<(), PipelineError> {
    let n = header.entries();
    let cs = header.chunk_size as u64;
    let incremental = matches!(plan, ReadPlan::Changed { .. });
    // The source's allocation is asked lazily, only for positions that may be read:
    // an incremental does not walk the whole disk's block status.
    let mut ext: Option<Extent> = None;
    let mut ext_from: Option<u64> = None;
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
        let prev = match previous.as_mut() {
            Some(p) => match p.next_entry() {
                Ok(e) => e,
                Err(e) if incremental => {
                    return Err(PipelineError::Incremental(format!(
                        "reading the previous index ({} disk {}) failed at position {pos}: {e}",
                        p.header.point_id, p.header.disk
                    )))
                }
                Err(_) => {
                    // A damaged previous index only costs deduplication.
                    previous = None;
                    None
                }
            },
            None => None,
        };
        // A chunk taken out of use by verify --repair is read and stored again.
        let stale = prev.is_some_and(|e| rewrite.contains_key(&e.id));
        let prev = if stale { None } else { prev };
        let skip = match plan {
            ReadPlan::Full => None,
            ReadPlan::Allocated(set) => (!set.contains(pos)).then_some(Outcome::Zero),
            ReadPlan::Changed { changed, .. } => {
                if changed.contains(pos) || stale {
                    None
                } else {
                    let e = prev.ok_or_else(|| {
                        PipelineError::Incremental(format!(
                            "the previous index ended before position {pos}"
                        ))
                    })?;
                    Some(if e.id.is_zero_marker() {
                        Outcome::Zero
                    } else {
                        Outcome::Unchanged(e)
                    })
                }
            }
        };
        if let Some(o) = skip {
            if results.send((pos, o)).is_err() {
                return Ok(());
            }
            continue;
        }
        if ext_from.is_none() || ext.is_some_and(|e| e.end() <= start) {
            ext = source.next_allocated(start)?;
            ext_from = Some(start);
        }
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
    if let (ReadPlan::Changed { previous_hash, .. }, Some(p)) = (plan, previous) {
        let (point, disk) = (p.header.point_id.clone(), p.header.disk);
        let got = p.finish().map_err(|e| {
            PipelineError::Incremental(format!(
                "the previous index ({point} disk {disk}) failed its final check: {e}"
            ))
        })?;
        if &got != previous_hash {
            return Err(PipelineError::Incremental(format!(
                "the previous index ({point} disk {disk}) changed while it was read: its hash no longer matches its manifest; nothing is committed, run 'ferry verify'"
            )));
        }
    }
    Ok(())
}

struct WorkCtx<'a> {
    store: &'a dyn ChunkStore,
    id_key: &'a SecretKey,
    key_known: &'a (dyn Fn(KeyId) -> bool + Sync),
    rewrite: &'a Rewrite,
    progress: &'a Progress,
    sealer: ChunkSealer,
}

impl WorkCtx<'_> {
    /// Account `len` bytes read from the source.
    fn read_done(&self, len: usize, bytes_read: &AtomicU64) {
        Progress::add(&self.progress.read, len as u64);
        bytes_read.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Process one read chunk and hand its outcome to the writer.
    fn work_and_send(
        &self,
        t: &Task,
        data: &[u8],
        out: &mut Vec<u8>,
        results: &Sender<(u64, Outcome)>,
        errors: &FirstError<PipelineError>,
    ) {
        match self.work(t, data, out) {
            Ok(o) => {
                let _ = results.send((t.pos, o));
            }
            Err(e) => errors.set(e),
        }
    }

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
        // A quarantined chunk is sealed again with the key older indexes name.
        let older;
        let sealer = match self.rewrite.get(&id) {
            Some(Some(k)) => {
                older = ChunkSealer::with_codec(k, self.sealer.codec());
                &older
            }
            _ => &self.sealer,
        };
        sealer.seal(&id, data, out);
        if self.store.put_chunk(&id, out)? {
            Progress::add(&self.progress.written, out.len() as u64);
            Ok(Outcome::New(
                IndexEntry {
                    id,
                    key: sealer.key_id(),
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

#[cfg(test)]
mod tests {
    //! [`backup_disk`] on an in-memory disk and chunk store: what an incremental
    //! reads, and that its index equals a full backup's of the same content.
    use super::*;
    use crate::repo::format::parse_chunk_header;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::io::Cursor;
    use std::sync::Mutex;

    const CS: u32 = 256 << 10;

    struct MemDisk {
        data: Vec<u8>,
        read: AtomicU64,
        /// [`DiskSource::read_parallelism`]: above 1, the pipeline's reader threads.
        readers: usize,
        /// A read covering this offset fails.
        fail_at: Option<u64>,
        /// Bytes read by a thread under `SCHED_BATCH`.
        batch_reads: AtomicU64,
    }

    impl DiskSource for MemDisk {
        fn label(&self) -> String {
            "mem".into()
        }
        fn transport(&self) -> &'static str {
            "mem"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_parallelism(&self) -> usize {
            self.readers
        }
        fn read_at(
            &self,
            offset: u64,
            buf: &mut [u8],
        ) -> Result<(), crate::transport::SourceError> {
            if let Some(at) = self.fail_at {
                if (offset..offset + buf.len() as u64).contains(&at) {
                    return Err(crate::transport::SourceError::Io {
                        source_name: "mem".into(),
                        op: "read",
                        offset,
                        err: std::io::Error::other("connection reset"),
                    });
                }
            }
            // SAFETY: no arguments but the calling thread's id.
            if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_BATCH {
                self.batch_reads
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(())
        }
    }

    #[derive(Default)]
    struct MemStore(Mutex<HashMap<ChunkId, (KeyId, usize)>>);

    impl ChunkStore for MemStore {
        fn chunk_key(&self, id: &ChunkId) -> Result<Option<KeyId>, RepoError> {
            Ok(self.0.lock().unwrap().get(id).map(|c| c.0))
        }
        fn put_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<bool, RepoError> {
            let h = parse_chunk_header(data, data.len() as u64).unwrap();
            let mut m = self.0.lock().unwrap();
            if m.contains_key(id) {
                return Ok(false);
            }
            m.insert(*id, (h.key_id, data.len()));
            Ok(true)
        }
        fn read_chunk(&self, _: &ChunkId, _: &mut Vec<u8>) -> Result<(), RepoError> {
            unreachable!("backups never read chunks")
        }
        fn chunk_location(&self, _: &ChunkId) -> std::path::PathBuf {
            "mem".into()
        }
    }

    struct Fixture {
        store: MemStore,
        dk: SecretKey,
        id_key: SecretKey,
        /// [`BackupInputs::rewrite`].
        rewrite: Rewrite,
    }

    struct Run {
        index: Vec<u8>,
        hash: [u8; 32],
        stats: DiskStats,
        source_reads: u64,
        batch_reads: u64,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                store: MemStore::default(),
                dk: SecretKey::generate(),
                id_key: SecretKey::generate(),
                rewrite: Rewrite::new(),
            }
        }

        fn run(
            &self,
            data: &[u8],
            previous: Option<&Run>,
            plan: ReadPlan,
        ) -> Result<Run, PipelineError> {
            self.run_with(data, previous, plan, 1, None)
        }

        fn run_with(
            &self,
            data: &[u8],
            previous: Option<&Run>,
            plan: ReadPlan,
            readers: usize,
            fail_at: Option<u64>,
        ) -> Result<Run, PipelineError> {
            let src = MemDisk {
                data: data.to_vec(),
                read: AtomicU64::new(0),
                readers,
                fail_at,
                batch_reads: AtomicU64::new(0),
            };
            let header = IndexHeader {
                point_id: "p".into(),
                disk: 0,
                chunk_size: CS,
                disk_size: data.len() as u64,
            };
            let previous = previous.map(|p| {
                IndexReader::new(Cursor::new(p.index.clone()), p.index.len() as u64).unwrap()
            });
            let mut w = IndexWriter::new(Vec::new(), header.clone()).unwrap();
            let stats = backup_disk(
                BackupInputs {
                    source: &src,
                    store: &self.store,
                    data_key: &self.dk,
                    id_key: &self.id_key,
                    previous,
                    plan,
                    key_known: &|_| true,
                    rewrite: &self.rewrite,
                    config: PipelineConfig {
                        workers: 2,
                        buffers: 4,
                        codec: Default::default(),
                    },
                    progress: &Progress::default(),
                },
                &mut w,
                &header,
            )?;
            let (index, hash) = w.finish().unwrap();
            Ok(Run {
                index,
                hash,
                stats,
                source_reads: src.read.load(Ordering::Relaxed),
                batch_reads: src.batch_reads.load(Ordering::Relaxed),
            })
        }
    }

    /// 40.5 chunks: data, compressible text, and zero chunks (every fifth).
    fn disk(seed: u64) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let cs = CS as usize;
        let mut d = vec![0u8; 40 * cs + cs / 2];
        for (i, c) in d.chunks_mut(cs).enumerate() {
            match i % 5 {
                0 => {}
                1 => c
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (j % 7) as u8 + 1),
                _ => rng.fill_bytes(c),
            }
        }
        d
    }

    fn changed(extents: &[(u64, u64)], size: u64) -> ChunkSet {
        let e: Vec<Extent> = extents
            .iter()
            .map(|&(offset, len)| Extent { offset, len })
            .collect();
        ChunkSet::from_extents(&e, size, CS).0
    }

    #[test]
    fn an_incremental_reads_only_changed_chunks_and_equals_a_full_backup() {
        let f = Fixture::new();
        let mut d = disk(1);
        let size = d.len() as u64;
        let full = f.run(&d, None, ReadPlan::Full).unwrap();
        assert_eq!(full.stats.chunks_zero, 9, "{:?}", full.stats);
        let cs = CS as u64;
        // The guest writes: 4 KiB inside chunk 3, a 100-byte write straddling
        // chunks 17/18, data into the zero chunk 10, zeros over chunk 6, and the
        // short last chunk.
        d[3 * CS as usize + 5000..][..4096].fill(0xab);
        d[18 * CS as usize - 50..][..100].fill(0xcd);
        d[10 * CS as usize..][..CS as usize].fill(0x11);
        d[6 * CS as usize..][..CS as usize].fill(0);
        let last = d.len() - 10;
        d[last] ^= 0xff;
        let extents = [
            (3 * cs + 5000, 4096),
            (18 * cs - 50, 100),
            (10 * cs, cs),
            (6 * cs, cs),
            (size - 10, 1),
        ];
        let set = changed(&extents, size);
        assert_eq!(set.len(), 6);
        let inc = f
            .run(
                &d,
                Some(&full),
                ReadPlan::Changed {
                    changed: set,
                    previous_hash: full.hash,
                },
            )
            .unwrap();
        // Exactly the six changed chunks were read (the last one is half a chunk).
        let want_read = 5 * cs + cs / 2;
        assert_eq!(inc.source_reads, want_read);
        assert_eq!(inc.stats.bytes_read, want_read);
        assert_eq!(inc.stats.chunks_total, 41);
        // 9 zero chunks before; chunks 10 and 40 got data, chunk 6 became zero.
        assert_eq!(inc.stats.chunks_zero, 8);
        // 35 positions unchanged, 7 of them zero (zero stays zero, unread).
        assert_eq!(inc.stats.chunks_unchanged, 28);
        assert_eq!(inc.stats.chunks_new, 5, "{:?}", inc.stats);
        // The index is the one a full backup of the new content writes.
        let again = f.run(&d, None, ReadPlan::Full).unwrap();
        assert_eq!(inc.index, again.index);
        assert_eq!(again.source_reads, size, "this source reports no holes");
    }

    /// The chunk ids of `run`'s index, position by position.
    fn ids(run: &Run) -> Vec<ChunkId> {
        let mut r = IndexReader::new(Cursor::new(&run.index[..]), run.index.len() as u64).unwrap();
        std::iter::from_fn(|| r.next_entry().unwrap().map(|e| e.id)).collect()
    }

    #[test]
    fn chunks_taken_out_of_use_are_read_and_stored_again_not_reused() {
        let mut f = Fixture::new();
        let d = disk(2);
        let full = f.run(&d, None, ReadPlan::Full).unwrap();
        let idx = ids(&full);
        // verify --repair quarantined the chunks at positions 2 and 7.
        let gone = [idx[2], idx[7]];
        for id in &gone {
            assert!(f.store.0.lock().unwrap().remove(id).is_some());
        }
        // Each backup seals with a new data key; the mended chunks take the key
        // the older index names, so that index is whole again.
        let older = std::mem::replace(&mut f.dk, SecretKey::generate());
        f.rewrite = gone.iter().map(|id| (*id, Some(older.clone()))).collect();
        let cs = CS as u64;
        // An incremental with nothing changed still reads those two positions.
        let inc = f
            .run(
                &d,
                Some(&full),
                ReadPlan::Changed {
                    changed: changed(&[], d.len() as u64),
                    previous_hash: full.hash,
                },
            )
            .unwrap();
        assert_eq!(inc.source_reads, 2 * cs);
        assert_eq!(inc.stats.chunks_new, 2, "{:?}", inc.stats);
        assert_eq!(inc.index, full.index);
        for id in &gone {
            let stored = f.store.0.lock().unwrap().get(id).map(|c| c.0);
            assert_eq!(stored, Some(older.id), "stored again, under the older key");
        }
        // A full backup with the previous index does not take them from it either.
        for id in &gone {
            f.store.0.lock().unwrap().remove(id);
        }
        let again = f.run(&d, Some(&full), ReadPlan::Full).unwrap();
        assert_eq!(again.stats.chunks_new, 2, "{:?}", again.stats);
        assert_eq!(again.index, full.index);
    }

    #[test]
    fn reader_threads_write_the_index_workers_reading_themselves_write() {
        let d = disk(4);
        let f = Fixture::new();
        let one = f.run(&d, None, ReadPlan::Full).unwrap();
        for readers in [2, 3, 8] {
            let g = Fixture {
                store: MemStore::default(),
                dk: f.dk.clone(),
                id_key: f.id_key.clone(),
                rewrite: Rewrite::new(),
            };
            let many = g.run_with(&d, None, ReadPlan::Full, readers, None).unwrap();
            assert_eq!(many.index, one.index, "{readers} readers");
            assert_eq!(many.source_reads, d.len() as u64);
            assert_eq!(many.stats, one.stats, "{readers} readers");
            // Every read was made by a reader thread under SCHED_BATCH.
            assert_eq!(many.batch_reads, many.source_reads, "{readers} readers");
        }
        // Workers reading for themselves keep the normal policy.
        assert_eq!(one.batch_reads, 0);
        // An incremental through reader threads still reads only the changed chunk.
        let mut d2 = d.clone();
        d2[7 * CS as usize] ^= 1;
        let set = changed(&[(7 * CS as u64, 1)], d.len() as u64);
        let plan = ReadPlan::Changed {
            changed: set,
            previous_hash: one.hash,
        };
        let inc = f.run_with(&d2, Some(&one), plan, 4, None).unwrap();
        assert_eq!(inc.source_reads, CS as u64);
        assert_eq!(inc.index, f.run(&d2, None, ReadPlan::Full).unwrap().index);
    }

    #[test]
    fn a_read_error_through_reader_threads_fails_the_disk_without_hanging() {
        let f = Fixture::new();
        let d = disk(5);
        for readers in [1, 4] {
            let at = 23 * CS as u64 + 17;
            let e = f
                .run_with(&d, None, ReadPlan::Full, readers, Some(at))
                .err()
                .expect("the read error fails the backup");
            assert!(
                matches!(&e, PipelineError::Source(_))
                    && e.to_string().contains("connection reset"),
                "{readers} readers: {e}"
            );
        }
    }

    #[test]
    fn nothing_changed_reads_nothing() {
        let f = Fixture::new();
        let d = disk(2);
        let full = f.run(&d, None, ReadPlan::Full).unwrap();
        let inc = f
            .run(
                &d,
                Some(&full),
                ReadPlan::Changed {
                    changed: ChunkSet::default(),
                    previous_hash: full.hash,
                },
            )
            .unwrap();
        assert_eq!(inc.source_reads, 0);
        assert_eq!((inc.stats.chunks_new, inc.stats.bytes_new_stored), (0, 0));
        assert_eq!(inc.index, full.index);
    }

    #[test]
    fn an_incremental_refuses_a_missing_mismatched_or_altered_base() {
        let f = Fixture::new();
        let d = disk(3);
        let full = f.run(&d, None, ReadPlan::Full).unwrap();
        let plan = |h| ReadPlan::Changed {
            changed: ChunkSet::default(),
            previous_hash: h,
        };
        let e = f.run(&d, None, plan(full.hash)).err().unwrap();
        assert!(e.to_string().contains("no previous index"), "{e}");
        // A disk of another size (resized) is refused.
        let bigger = [d.clone(), vec![0u8; CS as usize]].concat();
        let e = f.run(&bigger, Some(&full), plan(full.hash)).err().unwrap();
        assert!(e.to_string().contains("covers"), "{e}");
        // A previous index that is not the one its manifest names: nothing committed.
        let e = f.run(&d, Some(&full), plan([7u8; 32])).err().unwrap();
        assert!(e.to_string().contains("changed while it was read"), "{e}");
        // An entry flipped after verification fails the final check.
        let mut tampered = Run {
            index: full.index.clone(),
            hash: full.hash,
            stats: DiskStats::default(),
            source_reads: 0,
            batch_reads: 0,
        };
        tampered.index[100] ^= 1;
        let e = f.run(&d, Some(&tampered), plan(full.hash)).err().unwrap();
        assert!(e.to_string().contains("previous index"), "{e}");
    }

    #[test]
    fn an_allocated_plan_reads_only_the_allocated_chunks() {
        let f = Fixture::new();
        let d = disk(4);
        let size = d.len() as u64;
        let cs = CS as u64;
        // CBT says only chunks 2..4 and 12 hold data.
        let set = changed(&[(2 * cs, 2 * cs), (12 * cs + 1, 1)], size);
        let run = f.run(&d, None, ReadPlan::Allocated(set)).unwrap();
        assert_eq!(run.source_reads, 3 * cs);
        assert_eq!(run.stats.chunks_zero, 41 - 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the guest writes, an incremental given extents that cover the
        /// writes (in any order, unaligned) writes the index a full backup of the
        /// new content would, and reads no chunk outside the extents.
        #[test]
        fn incremental_equals_full_for_arbitrary_writes(
            writes in proptest::collection::vec((0u64..(40 * CS as u64 + CS as u64 / 2), 1u64..(3 * CS as u64), any::<u8>()), 0..8),
            seed in 0u64..4,
        ) {
            let f = Fixture::new();
            let mut d = disk(seed);
            let size = d.len() as u64;
            let full = f.run(&d, None, ReadPlan::Full).unwrap();
            let mut extents = Vec::new();
            for &(off, len, b) in &writes {
                let end = (off + len).min(size);
                d[off as usize..end as usize].fill(b);
                extents.push((off, len));
            }
            extents.reverse();
            let set = changed(&extents, size);
            let max_read: u64 = set.ranges().iter().map(|r| (r.end - r.start) * CS as u64).sum();
            let inc = f.run(&d, Some(&full), ReadPlan::Changed { changed: set, previous_hash: full.hash }).unwrap();
            prop_assert!(inc.source_reads <= max_read);
            let again = f.run(&d, None, ReadPlan::Full).unwrap();
            prop_assert_eq!(inc.index, again.index);
        }
    }
}
