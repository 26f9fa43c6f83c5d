//! Restore (and read-back verification) of one disk: index → workers that read,
//! authenticate, decompress and check chunks → positional writes to the target
//! ([`DiskTarget`]: a file, a block device, an NBD export, a hot-added disk), then
//! one flush. Zero chunks are skipped when the target reads as zeroes.

use super::{ChunkStore, FirstError, PipelineConfig, PipelineError};
use crate::keys::{KeyId, SecretKey};
use crate::progress::Progress;
use crate::repo::format::{self, IndexEntry, IndexReader};
use crate::repo::RepoError;
use crate::transport::DiskTarget;
use aes_gcm::Aes256Gcm;
use crossbeam_channel::bounded;
use std::collections::HashMap;
use std::io::Read;

/// Most writer threads, whatever the target asks for.
const MAX_WRITERS: usize = 16;

/// Restore counters.
#[derive(Clone, Debug, Default)]
pub struct RestoreStats {
    /// Chunk positions.
    pub chunks_total: u64,
    /// Zero positions.
    pub chunks_zero: u64,
    /// Bytes written to the target (excluding skipped holes).
    pub bytes_written: u64,
}

/// Data keys prepared for decryption.
pub struct KeyTable {
    ciphers: HashMap<KeyId, Aes256Gcm>,
}

impl KeyTable {
    /// Build from data keys.
    pub fn new<'k>(keys: impl IntoIterator<Item = &'k SecretKey>) -> Self {
        KeyTable {
            ciphers: keys
                .into_iter()
                .map(|k| (k.id, format::cipher_for(k)))
                .collect(),
        }
    }
    /// Cipher for a key id.
    pub fn get(&self, id: KeyId) -> Option<&Aes256Gcm> {
        self.ciphers.get(&id)
    }
}

/// Read, authenticate and decode one chunk into `out` (`raw` is scratch).
pub fn load_chunk(
    store: &dyn ChunkStore,
    entry: &IndexEntry,
    keys: &KeyTable,
    id_key: &SecretKey,
    raw: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), RepoError> {
    store.read_chunk(&entry.id, raw)?;
    let len = format::parse_chunk_header(raw, raw.len() as u64)
        .map_err(|source| RepoError::Damaged {
            path: store.chunk_location(&entry.id),
            source,
        })?
        .plain_len as usize;
    out.clear();
    out.resize(len, 0);
    decode_loaded(store, entry, keys, id_key, raw, out)
}

/// Decode an already read chunk file `raw` into `out` (exactly the expected length).
fn decode_loaded(
    store: &dyn ChunkStore,
    entry: &IndexEntry,
    keys: &KeyTable,
    id_key: &SecretKey,
    raw: &mut [u8],
    out: &mut [u8],
) -> Result<(), RepoError> {
    let damaged = |source| RepoError::Damaged {
        path: store.chunk_location(&entry.id),
        source,
    };
    let h =
        format::open_chunk_into(raw, &entry.id, |k| keys.get(k), id_key, out).map_err(
            |e| match e {
                format::FormatError::UnknownKey(key) => RepoError::MissingDataKey {
                    chunk: entry.id,
                    key,
                },
                other => damaged(other),
            },
        )?;
    if h.key_id != entry.key {
        return Err(damaged(format::FormatError::BadField {
            what: "chunk key id",
            detail: format!("index says {}, chunk says {}", entry.key, h.key_id),
        }));
    }
    Ok(())
}

use crate::repo::fsutil::aligned_window as aligned;

/// Restore one disk from an authenticated index into `target`, then flush it.
///
/// The calling thread reads the index and feeds N decode workers; the target's
/// [`DiskTarget::parallel_writes`] writer threads do every write (one for files:
/// concurrent `pwrite`s to one file only contend on its inode lock; one per
/// connection for NBD, where each write waits for its reply). Decoded chunks travel
/// in a fixed pool of reused, 4096-aligned buffers.
pub fn restore_disk<R: Read + Send>(
    store: &dyn ChunkStore,
    mut index: IndexReader<R>,
    keys: &KeyTable,
    id_key: &SecretKey,
    target: &dyn DiskTarget,
    config: PipelineConfig,
    progress: &Progress,
) -> Result<RestoreStats, PipelineError> {
    let target_err = |offset: u64, err: std::io::Error| PipelineError::Target {
        path: target.label(),
        offset,
        err,
    };
    if target.size() < index.header.disk_size {
        return Err(target_err(
            0,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the target has {} bytes, the disk needs {}",
                    target.size(),
                    index.header.disk_size
                ),
            ),
        ));
    }
    let skip_zeros = target.zero_filled();
    let writers = target.parallel_writes().clamp(1, MAX_WRITERS);
    let header = index.header.clone();
    let cs = header.chunk_size as u64;
    let (tx, rx) = bounded::<(u64, IndexEntry)>(config.buffers);
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(config.buffers);
    for _ in 0..config.buffers {
        pool_tx
            .send(Vec::with_capacity(header.chunk_size as usize))
            .expect("pool has room");
    }
    // (offset, buffer or None for zeros, length)
    let (wtx, wrx) = bounded::<(u64, Option<Vec<u8>>, usize)>(config.buffers);
    let errors = FirstError::<PipelineError>::new();
    let mut zero_buf = Vec::new();
    let zeros: &[u8] = aligned(&mut zero_buf, header.chunk_size as usize);
    let mut stats = RestoreStats {
        chunks_total: header.entries(),
        ..Default::default()
    };
    let written = std::sync::atomic::AtomicU64::new(0);
    let zero_count = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        let errors = &errors;
        for _ in 0..config.workers {
            let (rx, wtx, pool_rx) = (rx.clone(), wtx.clone(), pool_rx.clone());
            let (header, zero_count) = (&header, &zero_count);
            s.spawn(move || {
                let mut raw = Vec::new();
                for (pos, e) in rx {
                    if errors.stopped() {
                        continue;
                    }
                    let len = header.chunk_len(pos);
                    let off = pos * cs;
                    if e.id.is_zero_marker() {
                        zero_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if skip_zeros {
                            Progress::add(&progress.done, len as u64);
                        } else {
                            let _ = wtx.send((off, None, len));
                        }
                        continue;
                    }
                    let Ok(mut out) = pool_rx.recv() else { return };
                    if let Err(err) = store.read_chunk(&e.id, &mut raw).and_then(|_| {
                        decode_loaded(store, &e, keys, id_key, &mut raw, aligned(&mut out, len))
                    }) {
                        errors.set(err.into());
                        continue;
                    }
                    Progress::add(&progress.read, raw.len() as u64);
                    let _ = wtx.send((off, Some(out), len));
                }
            });
        }
        drop(rx);
        drop(wtx);
        for _ in 0..writers {
            let (written, pool_tx, wrx, target_err) =
                (&written, pool_tx.clone(), wrx.clone(), &target_err);
            s.spawn(move || {
                for (off, mut buf, len) in wrx {
                    if !errors.stopped() {
                        let data: &[u8] = match buf.as_mut() {
                            Some(b) => aligned(b, len),
                            None => &zeros[..len],
                        };
                        match target.write_at(off, data) {
                            Ok(()) => {
                                written.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                                Progress::add(&progress.written, len as u64);
                                Progress::add(&progress.done, len as u64);
                            }
                            Err(err) => errors.set(target_err(off, err)),
                        }
                    }
                    if let Some(b) = buf {
                        let _ = pool_tx.send(b);
                    }
                }
            });
        }
        drop(wrx);
        drop(pool_tx);
        let mut pos = 0u64;
        loop {
            if errors.stopped() {
                break;
            }
            if progress.cancelled() {
                errors.set(PipelineError::Cancelled);
                break;
            }
            match index.next_entry() {
                Ok(Some(e)) => {
                    if tx.send((pos, e)).is_err() {
                        break;
                    }
                    pos += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    errors.set(PipelineError::Repo(RepoError::Invalid(format!(
                        "index: {e}"
                    ))));
                    break;
                }
            }
        }
        drop(tx);
    });
    if let Some(e) = errors.take() {
        return Err(e);
    }
    target.flush().map_err(|err| target_err(0, err))?;
    stats.bytes_written = written.into_inner();
    stats.chunks_zero = zero_count.into_inner();
    Ok(stats)
}
