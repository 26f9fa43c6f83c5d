//! `ferry repo copy`: backup copies (3-2-1). Restore points go from one
//! repository to another (a local directory to S3, S3 to another site...) as
//! the bytes they are: the target is a replica of the source (same repository
//! id, id-key and keyring), so chunk ids, keys and the tenant's KMS stay the
//! same and a later copy sends only what the target lacks.
//!
//! Needs no keys: indexes are read for their chunk ids with their own checksums
//! verified, chunks are copied sealed. Each point is committed at the target as
//! a backup is (its chunks, then its indexes, then its manifest), so a copy
//! that is interrupted leaves no half point there, and the next copy resumes:
//! chunks already at the target are not sent again. Every object written is
//! checked against the target's listing (present, same size) before the point's
//! manifest goes in. Owns the copy order only; what the bytes mean is
//! [`crate::repo::format`]'s.
//!
//! Retention is the target's own: copied objects get the target's immutability
//! setting (a date from now), never the source's, and since a copied manifest
//! stays byte for byte the source's (its header is authenticated with the
//! point's data key, which a copy does not hold), each copied point gets a
//! record of what the target gave it, `points/<id>/retention`, written
//! before the manifest and read in place of the manifest's `immutable` by
//! [`Repository::read_manifest`] (prune, verify, points list, incrementals).

use super::backend::{self, Backend};
use super::format::{self, ChunkId, RepoConfig};
use super::lock::LockMode;
use super::{keyring, RepoError, Repository, Result};
use crate::progress::Progress;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::time::Duration;

/// The name of a copied point's retention record (a point file).
pub const RETENTION_RECORD: &str = "retention";

/// `points/<id>/retention`: the retention a copy gave a point's objects at this
/// repository (`null`: none), JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RetentionRecord {
    /// Object Lock retention of the point's objects here.
    pub immutable: Option<backend::Retention>,
}

/// The retention record of point `id` in `store`: `None` when the point was not
/// copied here (its manifest's own `immutable` stands), `Some(r)` when it was.
pub fn read_retention_record(
    store: &dyn Backend,
    id: &str,
) -> Result<Option<Option<backend::Retention>>> {
    let key = backend::point_key(id, RETENTION_RECORD);
    let Some(b) = store.read(&key, 64 << 10)? else {
        return Ok(None);
    };
    let r: RetentionRecord = serde_json::from_slice(&b).map_err(|e| RepoError::Damaged {
        path: store.location(&key),
        source: format::FormatError::BadField {
            what: "copied point's retention record",
            detail: e.to_string(),
        },
    })?;
    Ok(Some(r.immutable))
}

/// The points of a listing of `points/` that have a retention record.
pub fn points_with_record(listing: &[backend::ObjectInfo]) -> HashSet<String> {
    listing
        .iter()
        .filter_map(|o| {
            let (id, name) = o.key.strip_prefix("points/")?.split_once('/')?;
            (name == RETENTION_RECORD).then(|| id.to_string())
        })
        .collect()
}

/// What a copy did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyReport {
    /// Points copied by this run.
    pub points_copied: Vec<String>,
    /// Points asked for that the target already had.
    pub points_present: Vec<String>,
    /// Chunks sent.
    pub chunks_copied: u64,
    /// Bytes of chunks sent.
    pub chunk_bytes_copied: u64,
    /// Chunks the copied points reference that the target already had.
    pub chunks_present: u64,
    /// Whether the target was a new, empty location made a replica by this run.
    pub target_created: bool,
    /// Whether the target's keyring was replaced by the source's newer one.
    pub keyring_updated: bool,
    /// The retention the copied points' objects got at the target (the
    /// target's setting), when it keeps points immutable.
    pub immutable: Option<backend::Retention>,
}

/// Copy `points` (all when empty) from `src` to the repository `dst`: an empty
/// location (it becomes a replica of `src`) or an earlier copy of `src`.
///
/// `immutability`: when given, the target's setting for immutable points
/// becomes this (checked against its store first) before anything is copied;
/// otherwise the target keeps its own (a new replica starts without one: the
/// source's setting is the source's). Copied points are retained by it.
pub fn copy_points(
    src: &Repository,
    dst: Box<dyn Backend>,
    points: &[String],
    immutability: Option<format::Immutability>,
    lock_wait: Duration,
    progress: &Progress,
) -> Result<CopyReport> {
    let mut rep = CopyReport::default();
    let _src_lock = src.lock(LockMode::Shared, "copy (source)", lock_wait)?;
    if immutability.is_some() {
        // Refuse before a new replica is made on a store that cannot.
        dst.check_object_lock()?;
    }
    let mut dst = prepare_target(src, dst, &mut rep)?;
    if immutability.is_some() && dst.config.immutability != immutability {
        dst.set_immutability(immutability)?;
    }
    let _dst_lock = dst.lock_for_writing("copy (target)", lock_wait)?;
    rep.keyring_updated |= sync_keyring(src, &dst)?;

    let have_points: HashSet<String> = dst.point_ids()?.into_iter().collect();
    let wanted: Vec<String> = if points.is_empty() {
        src.point_ids()?
    } else {
        let all: HashSet<String> = src.point_ids()?.into_iter().collect();
        let mut v = Vec::new();
        for p in points {
            let id = src.resolve_point(p)?;
            if !all.contains(&id) {
                return Err(RepoError::PointNotFound(id));
            }
            v.push(id);
        }
        v.sort();
        v.dedup();
        v
    };
    let mut have_chunks: HashMap<String, u64> = dst
        .backend()
        .list("chunks/")?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    for id in wanted {
        if progress.cancelled() {
            return Err(RepoError::Cancelled);
        }
        if have_points.contains(&id) {
            rep.points_present.push(id);
            continue;
        }
        copy_point(src, &dst, &id, &mut have_chunks, &mut rep, progress)?;
        tracing::info!(point = %id, "restore point copied");
        rep.points_copied.push(id);
    }
    Ok(rep)
}

/// Open the target, making an empty location a replica of `src` (keyring,
/// then config: a location with a config is a repository).
fn prepare_target(
    src: &Repository,
    dst: Box<dyn Backend>,
    rep: &mut CopyReport,
) -> Result<Repository> {
    match dst.read("config", 64 << 20)? {
        Some(b) => {
            let theirs: RepoConfig =
                format::decode_config(&b).map_err(|source| RepoError::Damaged {
                    path: dst.location("config"),
                    source,
                })?;
            if theirs.repo_id != src.config.repo_id {
                return Err(RepoError::Invalid(format!(
                    "{} holds another repository (id {}, this one is {}): a copy goes to an empty location or to an earlier copy of the same repository",
                    dst.location("").display(),
                    theirs.repo_id,
                    src.config.repo_id
                )));
            }
            Repository::open_in(dst)
        }
        None => {
            if !dst.is_empty()? {
                return Err(RepoError::AlreadyExists(dst.location("")));
            }
            dst.prepare()?;
            let kr = src.backend().read("keyring", 64 << 20)?.ok_or_else(|| {
                RepoError::Invalid(format!("{} has no keyring to copy", src.root().display()))
            })?;
            dst.replace("keyring", &kr)?;
            // The target's retention is its own decision (copy_points sets
            // it when asked), never inherited.
            let mut config = src.config.clone();
            config.immutability = None;
            dst.replace("config", &format::encode_config(&config))?;
            dst.sync()?;
            rep.target_created = true;
            Repository::open_in(dst)
        }
    }
}

/// Replace the target's keyring with the source's when the source's is newer
/// (a higher generation); both are the same chain, so nothing is lost.
fn sync_keyring(src: &Repository, dst: &Repository) -> Result<bool> {
    let Some(b) = src.backend().read("keyring", 64 << 20)? else {
        return Ok(false);
    };
    let (theirs, _) = keyring::decode_header(&b).map_err(|source| RepoError::Damaged {
        path: src.backend().location("keyring"),
        source,
    })?;
    let newer = match dst.keyring_header() {
        Ok(mine) => theirs.generation > mine.generation,
        Err(_) => true,
    };
    if newer {
        let _l = dst.backend().lock(
            "keyring",
            LockMode::Exclusive,
            "copy keyring",
            Duration::from_secs(60),
        )?;
        dst.backend().replace("keyring", &b)?;
    }
    Ok(newer)
}

fn copy_point(
    src: &Repository,
    dst: &Repository,
    id: &str,
    have_chunks: &mut HashMap<String, u64>,
    rep: &mut CopyReport,
    progress: &Progress,
) -> Result<()> {
    // The manifest first read, last written.
    let (manifest, _, _) = src.read_manifest(id)?;
    let files = src.point_files(id)?;
    // A target with immutable points retains what it receives (and what the
    // point references that it already had) by its own setting.
    let retention = dst.point_retention(time::OffsetDateTime::now_utc().unix_timestamp());
    rep.immutable = retention;
    let mut stage = dst.stage_point(id, retention)?;
    let mut sent: Vec<(String, u64)> = Vec::new();
    let mut buf = Vec::new();
    // A copy of a copy: the source's record is the source's; the target's
    // own is written below.
    for name in files.iter().filter(|n| *n != RETENTION_RECORD) {
        let (mut f, len) = src.open_point_file(id, name)?;
        if name.ends_with(".idx") {
            let ids = index_chunks(
                src,
                id,
                name,
                f.try_clone()
                    .map_err(|e| RepoError::io(src.point_dir(id).join(name), e))?,
                len,
            )?;
            Progress::add(&progress.total, ids.len() as u64);
            for c in ids {
                let key = backend::chunk_key(&c.to_hex());
                if have_chunks.contains_key(&key) {
                    if let Some(r) = &retention {
                        dst.extend_chunk_retention(&c, r)?;
                    }
                    rep.chunks_present += 1;
                    Progress::add(&progress.read, 1);
                    continue;
                }
                src.read_chunk(&c, &mut buf)?;
                match &retention {
                    Some(r) => dst.put_chunk_retained(&c, &buf, r)?,
                    None => dst.put_chunk(&c, &buf)?,
                };
                rep.chunks_copied += 1;
                rep.chunk_bytes_copied += buf.len() as u64;
                Progress::add(&progress.read, 1);
                Progress::add(&progress.written, buf.len() as u64);
                sent.push((key.clone(), buf.len() as u64));
                have_chunks.insert(key, buf.len() as u64);
            }
        }
        std::io::Seek::rewind(&mut f).map_err(|e| RepoError::io(src.point_dir(id), e))?;
        let mut out = stage.create_file(name)?;
        let n = std::io::copy(&mut f.take(len), &mut out)
            .map_err(|e| RepoError::io(dst.point_dir(id).join(name), e))?;
        if n != len {
            return Err(RepoError::Invalid(format!(
                "{}: read {n} of {len} bytes",
                src.point_dir(id).join(name).display()
            )));
        }
        stage.finish_file(name, out)?;
    }
    // What the target gave this point, read in place of the manifest's date.
    let record = serde_json::to_vec(&RetentionRecord {
        immutable: retention,
    })
    .expect("a retention record serializes");
    let mut out = stage.create_file(RETENTION_RECORD)?;
    std::io::Write::write_all(&mut out, &record)
        .map_err(|e| RepoError::io(dst.point_dir(id).join(RETENTION_RECORD), e))?;
    stage.finish_file(RETENTION_RECORD, out)?;
    dst.sync_all()?;
    // Check what the target now holds before the point becomes visible there.
    let listed: HashMap<String, u64> = dst
        .backend()
        .list("chunks/")?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    for (key, len) in &sent {
        if listed.get(key) != Some(len) {
            return Err(RepoError::Remote {
                object: dst.backend().location(key).display().to_string(),
                detail: format!(
                    "after the copy the target lists it with size {:?}, expected {len}; nothing was committed, run the copy again",
                    listed.get(key)
                ),
            });
        }
    }
    stage.commit(&manifest)?;
    Ok(())
}

/// The chunk ids an index names, each once (zero markers skipped).
fn index_chunks(
    src: &Repository,
    id: &str,
    name: &str,
    f: std::fs::File,
    len: u64,
) -> Result<Vec<ChunkId>> {
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    super::scan_index(&src.point_dir(id).join(name), f, len, |e| {
        if !e.id.is_zero_marker() && seen.insert(e.id) {
            ids.push(e.id);
        }
    })?;
    Ok(ids)
}
