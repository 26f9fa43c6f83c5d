//! Instant access: one disk of a restore point as a read-only NBD export
//! ([`PointExport`], an [`ExportBackend`]), decrypted and decompressed on demand.
//!
//! Opening authenticates the manifest, unwraps the point's data keys (keyring or the
//! point's own wrapped key), verifies the disk index against the manifest and keeps
//! its entries in memory (48 bytes per chunk: 48 MiB for 1 TiB at 1 MiB chunks).
//! Reads fetch, authenticate, decrypt and decompress the chunks they touch through a
//! small bounded cache of decoded chunks (one decode per chunk even when several
//! requests want it at once); zero chunks are never read and are reported as holes
//! that read as zeroes in `base:allocation` block status. A shared repository lock
//! is held while the export is open, so prune cannot remove its chunks.
//!
//! Plaintext lives in memory only (the cache); nothing is written anywhere. This
//! module does not speak NBD: [`crate::nbd_server`] does. `ferry files` and
//! `ferry mount` read through the same [`PointExport`].

use crate::keys::{KeySource, SecretKey};
use crate::nbd_server::{ExportBackend, ExportProvider, ExportRefused};
use crate::pipeline::restore::{load_chunk, KeyTable};
use crate::repo::format::{ChunkId, FormatError, IndexEntry};
use crate::repo::lock::{LockMode, RepoLock};
use crate::repo::{RepoError, Repository};
use crate::transport::nbd::proto::{STATE_HOLE, STATE_ZERO};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Settings of an export.
#[derive(Clone, Copy, Debug)]
pub struct ExportOptions {
    /// Memory for decoded chunks (at least 4 chunks are kept whatever this says).
    pub cache_bytes: u64,
    /// How long to wait for the repository lock (a running prune holds it).
    pub lock_wait: Duration,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            cache_bytes: 64 << 20,
            lock_wait: Duration::from_secs(10),
        }
    }
}

/// Counters of an export (for logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportStats {
    /// Chunks read from the repository and decoded.
    pub chunks_decoded: u64,
    /// Chunk lookups served from the cache.
    pub cache_hits: u64,
}

type Decoded = Arc<Vec<u8>>;

/// One cache slot; its mutex makes concurrent misses on one chunk decode it once.
#[derive(Default)]
struct Slot(Mutex<Option<Decoded>>);

/// A small LRU of decoded chunks, keyed by chunk id (identical chunks share a slot).
struct ChunkCache {
    capacity: usize,
    slots: Mutex<Vec<(ChunkId, Arc<Slot>, u64)>>,
    tick: AtomicU64,
}

impl ChunkCache {
    fn new(capacity: usize) -> Self {
        ChunkCache {
            capacity: capacity.max(1),
            slots: Mutex::new(Vec::new()),
            tick: AtomicU64::new(0),
        }
    }

    /// The decoded chunk `id`, loading it with `load` on a miss. Returns whether it
    /// was a hit.
    fn get(
        &self,
        id: &ChunkId,
        load: impl FnOnce() -> Result<Vec<u8>, RepoError>,
    ) -> Result<(Decoded, bool), RepoError> {
        let now = self.tick.fetch_add(1, Ordering::Relaxed);
        let slot = {
            let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = s.iter_mut().find(|e| &e.0 == id) {
                e.2 = now;
                e.1.clone()
            } else {
                if s.len() >= self.capacity {
                    // Evict the least recently used; a reader still holding it keeps
                    // its copy alive until it is done.
                    if let Some(i) = (0..s.len()).min_by_key(|&i| s[i].2) {
                        s.swap_remove(i);
                    }
                }
                let slot = Arc::new(Slot::default());
                s.push((*id, slot.clone(), now));
                slot
            }
        };
        let mut g = slot.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = g.as_ref() {
            return Ok((d.clone(), true));
        }
        let d = Arc::new(load()?);
        *g = Some(d.clone());
        Ok((d, false))
    }
}

/// One disk of a restore point, readable at any offset.
pub struct PointExport {
    repo: Repository,
    _lock: RepoLock,
    point_id: String,
    disk: u32,
    size: u64,
    chunk_size: u64,
    entries: Vec<IndexEntry>,
    keys: KeyTable,
    id_key: SecretKey,
    cache: ChunkCache,
    decoded: AtomicU64,
    hits: AtomicU64,
}

impl PointExport {
    /// Open disk `disk` of point `point_id` with the tenant keys in `keys` (the
    /// keyring is used when it opens, else the point's own wrapped key).
    pub fn open(
        repo: Repository,
        keys: &dyn KeySource,
        point_id: &str,
        disk: u32,
        opts: ExportOptions,
    ) -> Result<PointExport, RepoError> {
        let lock = repo.lock(LockMode::Shared, "export", opts.lock_wait)?;
        let keyring = crate::job::try_keyring(&repo, keys);
        let point = repo.open_point(point_id, keys, keyring.as_ref())?;
        let mut index = repo.open_index(&point, disk)?;
        let header = index.header.clone();
        let index_err = |e: crate::repo::format::IndexReadError| match e {
            crate::repo::format::IndexReadError::Io(e) => {
                RepoError::io(repo.point_dir(point_id), e)
            }
            crate::repo::format::IndexReadError::Format(source) => RepoError::Damaged {
                path: repo.point_dir(point_id),
                source,
            },
        };
        let n = header.entries();
        // The count is bounded by the authenticated index header and file size.
        let mut entries = Vec::with_capacity(n.min(1 << 24) as usize);
        while let Some(e) = index.next_entry().map_err(index_err)? {
            entries.push(e);
        }
        // The whole stream we kept must match its checksum (and thus the manifest).
        index.finish().map_err(index_err)?;
        let chunk_size = header.chunk_size as u64;
        let capacity = (opts.cache_bytes / chunk_size).clamp(4, 4096) as usize;
        let data = entries.iter().filter(|e| !e.id.is_zero_marker()).count();
        tracing::info!(
            point = point_id,
            disk,
            size = header.disk_size,
            chunks = n,
            data_chunks = data,
            cache_chunks = capacity,
            "restore point disk opened for export"
        );
        Ok(PointExport {
            keys: KeyTable::new(point.keys.iter()),
            id_key: point.id_key.clone(),
            point_id: point_id.to_string(),
            disk,
            size: header.disk_size,
            chunk_size,
            entries,
            cache: ChunkCache::new(capacity),
            decoded: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            repo,
            _lock: lock,
        })
    }

    /// The point exported.
    pub fn point_id(&self) -> &str {
        &self.point_id
    }

    /// The disk number exported.
    pub fn disk(&self) -> u32 {
        self.disk
    }

    /// Bytes per chunk of this disk (the unit the chunk counters count).
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The export name ferry gives this disk: `<point id>-disk<N>`.
    pub fn export_name(&self) -> String {
        format!("{}-disk{}", self.point_id, self.disk)
    }

    /// Counters so far.
    pub fn stats(&self) -> ExportStats {
        ExportStats {
            chunks_decoded: self.decoded.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
        }
    }

    fn chunk_len(&self, pos: u64) -> u64 {
        (self.size - pos * self.chunk_size).min(self.chunk_size)
    }

    /// The decoded chunk at position `pos` (not a zero chunk).
    fn chunk(&self, pos: u64, entry: &IndexEntry) -> Result<Decoded, RepoError> {
        let want = self.chunk_len(pos) as usize;
        let (d, hit) = self.cache.get(&entry.id, || {
            let (mut raw, mut out) = (Vec::new(), Vec::new());
            load_chunk(
                &self.repo,
                entry,
                &self.keys,
                &self.id_key,
                &mut raw,
                &mut out,
            )?;
            Ok(out)
        })?;
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.decoded.fetch_add(1, Ordering::Relaxed);
        }
        if d.len() != want {
            return Err(RepoError::Damaged {
                path: self.repo.chunk_path(&entry.id),
                source: FormatError::BadField {
                    what: "chunk length",
                    detail: format!("{} bytes where the index needs {want}", d.len()),
                },
            });
        }
        Ok(d)
    }
}

fn io_err(e: RepoError) -> std::io::Error {
    if e.is_damage() {
        tracing::error!(error = %e, "damaged data while serving an export");
    }
    std::io::Error::other(e.to_string())
}

impl ExportBackend for PointExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| std::io::Error::other("read beyond the end of the disk"))?;
        let mut at = offset;
        while at < end {
            let pos = at / self.chunk_size;
            let within = at - pos * self.chunk_size;
            let n = (self.chunk_len(pos) - within).min(end - at) as usize;
            let dst = &mut buf[(at - offset) as usize..(at - offset) as usize + n];
            let entry = &self.entries[pos as usize];
            if entry.id.is_zero_marker() {
                dst.fill(0);
            } else {
                let d = self.chunk(pos, entry).map_err(io_err)?;
                dst.copy_from_slice(&d[within as usize..within as usize + n]);
            }
            at += n as u64;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u32)>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut runs: Vec<(u64, u32)> = Vec::new();
        let mut at = offset;
        while at < end && runs.len() < 4096 {
            let pos = at / self.chunk_size;
            let chunk_end = (pos * self.chunk_size + self.chunk_len(pos)).min(end);
            let flags = if self.entries[pos as usize].id.is_zero_marker() {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            let l = chunk_end - at;
            match runs.last_mut() {
                Some(r) if r.1 == flags => r.0 += l,
                _ => runs.push((l, flags)),
            }
            at = chunk_end;
        }
        if runs.is_empty() {
            runs.push((len.max(1), 0));
        }
        Ok(runs)
    }
}

/// File-level restore ([`crate::files`]) reads a point's disk through the same
/// on-demand chunk path as an NBD client.
impl crate::files::ReadAt for PointExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        ExportBackend::read_at(self, offset, buf)
    }
}

/// Serves one [`PointExport`] under its name and as the default export ("").
pub struct PointExportProvider {
    name: String,
    export: Arc<PointExport>,
}

impl PointExportProvider {
    /// Serve `export` as [`PointExport::export_name`].
    pub fn new(export: Arc<PointExport>) -> Self {
        PointExportProvider {
            name: export.export_name(),
            export,
        }
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl ExportProvider for PointExportProvider {
    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>, ExportRefused> {
        if name.is_empty() || name == self.name {
            Ok(self.export.clone())
        } else {
            Err(ExportRefused(format!(
                "this server exports only {:?} (or the default export \"\")",
                self.name
            )))
        }
    }
    fn list(&self) -> Option<Vec<String>> {
        Some(vec![self.name.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_decodes_a_chunk_once() {
        let c = ChunkCache::new(2);
        let id = |b: u8| ChunkId([b; 32]);
        let loads = AtomicU64::new(0);
        let load = |v: u8| {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok(vec![v; 4])
        };
        assert!(!c.get(&id(1), || load(1)).unwrap().1);
        assert!(c.get(&id(1), || load(1)).unwrap().1);
        c.get(&id(2), || load(2)).unwrap();
        c.get(&id(1), || load(1)).unwrap(); // 1 is now the most recent
        c.get(&id(3), || load(3)).unwrap(); // evicts 2
        assert_eq!(c.slots.lock().unwrap().len(), 2);
        assert!(c.get(&id(1), || load(1)).unwrap().1);
        assert!(!c.get(&id(2), || load(2)).unwrap().1);
        assert_eq!(loads.load(Ordering::SeqCst), 4);
        // A failed load leaves nothing behind; the next caller retries.
        let e = c.get(&id(9), || Err(RepoError::Invalid("boom".into())));
        assert!(e.is_err());
        assert_eq!(c.get(&id(9), || load(9)).unwrap().0[0], 9);
        // Many threads missing the same chunk decode it once.
        let c = ChunkCache::new(4);
        let n = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    c.get(&id(5), || {
                        n.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        Ok(vec![5; 4])
                    })
                    .unwrap()
                });
            }
        });
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
