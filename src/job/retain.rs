//! The chunk store of a backup into a repository with immutable restore points
//! (S3 Object Lock): every chunk the point references ends up retained at
//! least until the point's retention date.
//!
//! New chunks are written with the retention; chunks found already stored
//! (deduplicated across the repository) get theirs extended on the spot; chunks
//! reused from the previous point of the chain are extended at commit, and only
//! when that point's retention ends before this one's (retention dates are
//! rounded to 7-day generations, so within one generation an incremental
//! extends nothing it took from its parent). Owns that bookkeeping only.

use crate::keys::KeyId;
use crate::pipeline::ChunkStore;
use crate::repo::backend::Retention;
use crate::repo::format::ChunkId;
use crate::repo::{RepoError, Repository};
use std::collections::HashSet;
use std::sync::Mutex;

/// A [`ChunkStore`] that retains what the point references.
pub struct RetainingStore<'a> {
    repo: &'a Repository,
    retention: Retention,
    /// Chunks written or extended by this backup: retained already.
    done: Mutex<HashSet<ChunkId>>,
}

impl<'a> RetainingStore<'a> {
    /// A store writing into `repo` with `retention`.
    pub fn new(repo: &'a Repository, retention: Retention) -> Self {
        RetainingStore {
            repo,
            retention,
            done: Mutex::new(HashSet::new()),
        }
    }

    /// Whether this backup already retained `id`.
    fn retained(&self, id: &ChunkId) -> bool {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn mark(&self, id: ChunkId) {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
    }

    /// At commit: extend the retention of the chunks `ids` (every chunk the
    /// point's indexes name) that this backup did not write or extend, unless
    /// the parent point's retention already reaches this one's. Returns how
    /// many were extended.
    pub fn retain_rest(
        &self,
        ids: impl IntoIterator<Item = ChunkId>,
        parent_until: Option<i64>,
    ) -> Result<u64, RepoError> {
        if parent_until.is_some_and(|p| p >= self.retention.until) {
            return Ok(0);
        }
        let mut n = 0;
        for id in ids {
            if !self.retained(&id) {
                self.repo.extend_chunk_retention(&id, &self.retention)?;
                self.mark(id);
                n += 1;
            }
        }
        Ok(n)
    }
}

impl ChunkStore for RetainingStore<'_> {
    fn chunk_key(&self, id: &ChunkId) -> Result<Option<KeyId>, RepoError> {
        let k = self.repo.chunk_key(id)?;
        if k.is_some() && !self.retained(id) {
            self.repo.extend_chunk_retention(id, &self.retention)?;
            self.mark(*id);
        }
        Ok(k)
    }
    fn put_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<bool, RepoError> {
        let written = self.repo.put_chunk_retained(id, data, &self.retention)?;
        if written {
            self.mark(*id);
        }
        Ok(written)
    }
    fn read_chunk(&self, id: &ChunkId, buf: &mut Vec<u8>) -> Result<(), RepoError> {
        self.repo.read_chunk(id, buf)
    }
    fn chunk_location(&self, id: &ChunkId) -> std::path::PathBuf {
        self.repo.chunk_path(id)
    }
}
