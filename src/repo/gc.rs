//! `ferry prune`: apply a retention policy per source chain, delete dropped points,
//! and garbage-collect unreferenced chunks and `tmp/` debris. Runs under the
//! exclusive lock and needs no keys; given keys, it also drops from the keyring the
//! data keys no remaining point references. Refuses to collect garbage when any
//! remaining index is damaged, so damage can never get live chunks deleted.

use super::format::ChunkId;
use super::lock::LockMode;
use super::retention::{self, Decision, Policy};
use super::{RepoError, Repository};
use crate::keys::{KeyId, KeySource};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// What prune did (or would do, in a dry run).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    /// Per-point decisions, grouped by chain (labelled by the chain's newest
    /// source name, with the VM identity when the chain has one).
    pub decisions: BTreeMap<String, Vec<Decision>>,
    /// Points removed.
    pub points_removed: Vec<String>,
    /// Chunks that are (or would be) deleted.
    pub chunks_deleted: u64,
    /// Bytes freed (or that would be).
    pub bytes_freed: u64,
    /// Chunks kept.
    pub chunks_kept: u64,
    /// Data keys dropped from the keyring (or that would be): no remaining point
    /// references them. `None` when no keys were given (the keyring is sealed).
    pub keyring_keys_dropped: Option<u64>,
    /// Why the keyring was not compacted although keys were given.
    pub keyring_note: Option<String>,
    /// Whether nothing was changed.
    pub dry_run: bool,
}

/// Prune the repository: apply `policy` to every chain (source), then collect
/// unreferenced chunks.
pub fn prune(
    repo: &Repository,
    policy: &Policy,
    keys: Option<&dyn KeySource>,
    dry_run: bool,
    lock_wait: Duration,
) -> Result<PruneReport, RepoError> {
    prune_chain(repo, policy, None, keys, dry_run, lock_wait)
}

/// Like [`prune`], but apply `policy` only to the chain whose key is `source`
/// (a VM's retention after its backup: its identity, or the name for images
/// and older points; see [`crate::repo::manifest::ManifestHeader::chain_key`])
/// when given; other chains keep every point.
/// With `keys`, the keyring is compacted too (under the same exclusive lock, so
/// no backup can be registering a new data key meanwhile).
pub fn prune_chain(
    repo: &Repository,
    policy: &Policy,
    source: Option<&str>,
    keys: Option<&dyn KeySource>,
    dry_run: bool,
    lock_wait: Duration,
) -> Result<PruneReport, RepoError> {
    if policy.is_empty() {
        return Err(RepoError::Invalid("no keep rule given (--keep-last/--keep-daily/--keep-weekly/--keep-monthly); refusing to delete every point".into()));
    }
    let _lock = repo.lock(
        LockMode::Exclusive,
        if dry_run { "prune --dry-run" } else { "prune" },
        lock_wait,
    )?;
    let mut rep = PruneReport {
        dry_run,
        ..Default::default()
    };
    // Chains by their key (the VM identity, or the source name for images and
    // older points), each labelled with its newest name for the report.
    let mut chains: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    let mut point_keys: BTreeMap<String, KeyId> = BTreeMap::new();
    // Immutable points (S3 Object Lock) stay until their retention date.
    let mut locked: BTreeMap<String, i64> = BTreeMap::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for p in repo.list_points()? {
        match p.header {
            Ok(h) => {
                point_keys.insert(p.id.clone(), h.data_key_id);
                if let Some(r) = h.immutable.filter(|r| r.until > now) {
                    locked.insert(p.id.clone(), r.until);
                }
                let key = h.chain_key().to_string();
                let label = match &h.identity {
                    Some(id) => format!("{} ({id})", h.source),
                    None => h.source.clone(),
                };
                labels.insert(key.clone(), label); // points are listed oldest first
                chains.entry(key).or_default().push((p.id, h.created_unix))
            }
            Err(e) => return Err(e), // never guess about a point we cannot read
        }
    }
    let mut remove = Vec::new();
    for (key, pts) in &chains {
        if source.is_some_and(|s| s != key) {
            continue;
        }
        let mut d = retention::apply(policy, pts);
        for d in d.iter_mut().filter(|d| !d.keep) {
            if let Some(until) = locked.get(&d.point_id) {
                d.keep = true;
                d.reasons.push(format!(
                    "immutable until {}",
                    super::backend::format_unix(*until)
                ));
            }
        }
        remove.extend(d.iter().filter(|d| !d.keep).map(|d| d.point_id.clone()));
        rep.decisions
            .insert(labels.get(key).cloned().unwrap_or_else(|| key.clone()), d);
    }
    let removed: HashSet<&String> = remove.iter().collect();
    // Mark: every chunk referenced by a point that stays, and the data keys
    // those points were made with or reference.
    let mut live: HashSet<ChunkId> = HashSet::new();
    let mut live_keys: HashSet<KeyId> = HashSet::new();
    for (id, files) in repo.points_with_files()? {
        if removed.contains(&id) {
            continue;
        }
        live_keys.extend(point_keys.get(&id));
        for name in files {
            if !name.ends_with(".idx") {
                continue;
            }
            let p = repo.point_dir(&id).join(&name);
            let (f, len) = repo.open_point_file(&id, &name)?;
            let mut ids = Vec::new();
            super::scan_index(&p, f, len, |e| {
                if !e.id.is_zero_marker() {
                    ids.push(e.id);
                    live_keys.insert(e.key);
                }
            })?;
            live.extend(ids);
        }
    }
    // Remove dropped points first (so a crash mid-sweep never leaves a point whose
    // chunks are gone): each disappears at once (its manifest goes first), then
    // what interrupted backups left behind goes.
    if !dry_run {
        for id in &remove {
            repo.remove_point(id)?;
            tracing::info!(point = %id, "restore point removed");
        }
        repo.backend().collect_debris()?;
    }
    rep.points_removed = remove;
    // Sweep.
    for o in repo.backend().list("chunks/")? {
        let name = o.key.rsplit('/').next().unwrap_or(&o.key);
        match ChunkId::from_hex(name) {
            Some(id) if live.contains(&id) => rep.chunks_kept += 1,
            _ => {
                rep.chunks_deleted += 1;
                rep.bytes_freed += o.size;
                if !dry_run {
                    repo.backend().delete(&o.key)?;
                }
            }
        }
    }
    if !dry_run {
        repo.sync_all()?;
    }
    if let Some(keys) = keys {
        match compact_keyring(repo, keys, &live_keys, dry_run) {
            Ok(n) => rep.keyring_keys_dropped = Some(n),
            // The points and chunks are pruned; an unusable key only leaves the
            // keyring as it was.
            Err(e) => {
                tracing::warn!(error = %e, "keyring not compacted");
                rep.keyring_note = Some(format!("keyring not compacted: {e}"));
            }
        }
    }
    tracing::info!(
        removed = rep.points_removed.len(),
        chunks_deleted = rep.chunks_deleted,
        bytes = rep.bytes_freed,
        keys_dropped = rep.keyring_keys_dropped,
        dry_run,
        "prune done"
    );
    Ok(rep)
}

/// Drop from the keyring every data key not in `live`; returns how many were (or
/// would be) dropped. The keyring is rewritten only when something goes. Must run
/// under the exclusive repository lock.
fn compact_keyring(
    repo: &Repository,
    keys: &dyn KeySource,
    live: &HashSet<KeyId>,
    dry_run: bool,
) -> Result<u64, RepoError> {
    if !repo.has_keyring() {
        return Ok(0);
    }
    let dead = |kr: &super::keyring::Keyring| {
        kr.keys.iter().filter(|k| !live.contains(&k.id)).count() as u64
    };
    let n = dead(&repo.load_keyring(keys)?);
    if n == 0 || dry_run {
        return Ok(n);
    }
    let mut dropped = 0;
    repo.update_keyring(keys, |kr| {
        dropped = dead(kr);
        kr.body.keys.retain(|k, _| live.contains(k));
        kr.keys.retain(|k| live.contains(&k.id));
        Ok(())
    })?;
    tracing::info!(
        dropped,
        kept = live.len(),
        "data keys no point references dropped from the keyring"
    );
    Ok(dropped)
}
