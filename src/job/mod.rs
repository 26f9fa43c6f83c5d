//! One backup or restore, start to cleanup: locking, keys, the pipeline per disk,
//! and the atomic commit of a restore point.
//!
//! A backup unwraps the keyring once (id-key and known data keys), registers its
//! fresh data key in the keyring *before* writing any chunk (so every stored chunk's
//! key is always recoverable), runs the pipeline per disk into a temporary point
//! directory, makes chunks durable, writes the manifest and renames the directory
//! into place. Any failure or cancellation removes the temporary directory; chunks
//! already written are garbage for `prune`. This module holds no transport logic.
//!
//! A disk with changed-block tracking ([`DiskInput::read`]) is read incrementally
//! when the previous point of the same source holds the same disk with a change id
//! ([`incremental::choose_base`]): only the areas the tracker reports changed since
//! then are read, every other chunk position is the previous point's. Otherwise,
//! or when the tracker cannot answer, it is read in full, and the manifest records
//! which and why.

mod files;
pub mod incremental;
pub mod quiesce;
mod retain;
pub mod runner;
pub mod vm;
pub mod vm_restore;

use crate::keys::{KeyId, KeySource, SecretKey};
use crate::pipeline::backup::{backup_disk, BackupInputs, DiskStats, ReadPlan};
use crate::pipeline::changed::ChunkSet;
use crate::pipeline::restore::{restore_disk, KeyTable, RestoreStats};
use crate::pipeline::{PipelineConfig, PipelineError};
use crate::progress::Progress;
use crate::repo::format::{IndexHeader, IndexReader, IndexWriter};
use crate::repo::keyring::{DataKeyInfo, Keyring};
use crate::repo::lock::LockMode;
use crate::repo::manifest::{
    self, DiskRecord, DiskSummary, ManifestBody, ManifestHeader, ReadMode, SnapshotRecord,
};
use crate::repo::{now_rfc3339, OpenPoint, RepoError, Repository};
use crate::transport::file::FileTarget;
use crate::transport::DiskSource;
use incremental::{Current, FullReason, Previous, ReadRequest, TrackerError};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// Job failures.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Repository problem.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Data plane problem.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// Key problem.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// Bad request.
    #[error("{0}")]
    Invalid(String),
}

impl JobError {
    /// Whether the failure is a cancellation.
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            JobError::Pipeline(PipelineError::Cancelled) | JobError::Repo(RepoError::Cancelled)
        )
    }
}

/// One disk to back up.
pub struct DiskInput {
    /// The source.
    pub source: Box<dyn DiskSource>,
    /// Label stored in the manifest.
    pub label: String,
    /// Why this transport (recorded in the manifest).
    pub transport_reason: String,
    /// CBT change id at snapshot time, if any (recorded in the manifest; the next
    /// backup asks for the changes since it).
    pub change_id: Option<String>,
    /// Changed-block tracking, for an incremental read; `Default` reads in full.
    pub read: ReadRequest,
}

/// A backup request.
pub struct BackupRequest {
    /// Source name (VM or image set), kept for display and `latest:NAME`.
    pub source_name: String,
    /// The VM's identity (`<vCenter instance UUID>/<VM instance UUID>`): when
    /// set, the chain (parent, CBT base, retention) follows it instead of the
    /// name, so a renamed VM continues its chain and a new VM that takes an old
    /// name starts its own. `None` for images: the chain follows the name.
    pub identity: Option<String>,
    /// Disks in order (disk numbers 0, 1, ...).
    pub disks: Vec<DiskInput>,
    /// Threads and buffers.
    pub pipeline: PipelineConfig,
    /// Wait this long for the repository lock.
    pub lock_wait: Duration,
    /// How the VM snapshot was taken (recorded in the manifest); `None` for
    /// images.
    pub snapshot: Option<SnapshotRecord>,
}

/// What a backup did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BackupReport {
    /// New point id.
    pub point_id: String,
    /// Parent point, if deduplicated against one.
    pub parent: Option<String>,
    /// The chain the point belongs to (its manifest's
    /// [`crate::repo::manifest::ManifestHeader::chain_key`]): the VM identity,
    /// or the source name. Retention after the backup applies to it.
    pub chain: String,
    /// Per-disk results.
    pub disks: Vec<DiskRecord>,
    /// Seconds taken.
    pub seconds: f64,
}

fn new_point_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year][month][day]T[hour][minute][second].[subsecond digits:3]Z"
    );
    let mut r = [0u8; 4];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut r);
    format!(
        "{}-{}",
        now.format(&fmt)
            .unwrap_or_else(|_| "00000000T000000.000Z".into()),
        hex::encode(r)
    )
}

/// Removes the temporary point directory unless committed.
/// Run a backup of `req` into `repo`, wrapping the new data key with `keys`.
pub fn backup(
    repo: &Repository,
    keys: &dyn KeySource,
    req: BackupRequest,
    progress: &Progress,
) -> Result<BackupReport, JobError> {
    let started = std::time::Instant::now();
    if req.disks.is_empty() {
        return Err(JobError::Invalid(
            "nothing to back up: no disks given".into(),
        ));
    }
    let _lock = repo.lock_for_writing("backup", req.lock_wait)?;
    let point_id = new_point_id();
    let span = tracing::info_span!("backup", point = %point_id, source = %req.source_name);
    let _g = span.enter();
    let key_ref = keys.current_key()?;
    let dk = SecretKey::generate();
    // Wrap first: a key store that is down fails the job before anything is written.
    let wrapped = keys.wrap(dk.expose())?;
    let keyring = repo.update_keyring(keys, |kr| {
        kr.body.keys.insert(
            dk.id,
            DataKeyInfo {
                created: now_rfc3339(),
                point: point_id.clone(),
                wrapped_by: key_ref.clone(),
            },
        );
        kr.keys.push(dk.clone());
        Ok(())
    })?;
    tracing::info!(key = %key_ref, data_key = %dk.id, "data key registered in keyring");
    // Key-loss protection: the keyring (authenticated by the tenant key) says
    // whether the provider's recovery key wraps this point's data key too.
    let recovery_wrapped = match &keyring.header.recovery {
        Some(r) => {
            let w = r.wrap(dk.expose())?;
            tracing::info!(recovery = %r.describe(), "data key also wrapped by the provider's recovery key");
            Some(w)
        }
        None => None,
    };
    let keyring = Mutex::new(keyring);
    let key_known = |k: KeyId| -> bool {
        let mut kr = keyring.lock().unwrap_or_else(|p| p.into_inner());
        if kr.key(k).is_some() {
            return true;
        }
        // A concurrent backup may have registered it since we loaded the keyring.
        match repo.load_keyring(keys) {
            Ok(fresh) => {
                *kr = fresh;
                kr.key(k).is_some()
            }
            Err(_) => false,
        }
    };
    let id_key = keyring
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .id_key
        .clone();

    let parent = repo.chain_head(req.identity.as_deref(), &req.source_name)?;
    let mut parent_err = None;
    let parent_open = match &parent {
        Some(h) => {
            let kr = keyring.lock().unwrap_or_else(|p| p.into_inner());
            match repo.open_point(&h.point_id, keys, Some(&kr)) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(parent = %h.point_id, error = %e, "previous point unreadable; backing up without it");
                    parent_err = Some((h.point_id.clone(), e.to_string()));
                    None
                }
            }
        }
        None => None,
    };

    let rewrite: crate::pipeline::backup::Rewrite = {
        let kr = keyring.lock().unwrap_or_else(|p| p.into_inner());
        repo.chunks_to_rewrite()?
            .into_iter()
            .map(|(id, k)| {
                // The keyring normally holds it; a point's manifest always does.
                let from_parent = || parent_open.as_ref().and_then(|p| p.key(k));
                (id, kr.key(k).or_else(from_parent).cloned())
            })
            .collect()
    };
    if !rewrite.is_empty() {
        tracing::warn!(
            chunks = rewrite.len(),
            "chunks taken out of use by verify --repair: positions that referenced them are read and stored again"
        );
    }
    let chunk_size = repo.config.chunk_size;
    // Immutable points (S3 Object Lock): everything the point references is
    // retained until one date, recorded in its manifest.
    let retention = repo.point_retention(time::OffsetDateTime::now_utc().unix_timestamp());
    let retaining = retention.map(|r| retain::RetainingStore::new(repo, r));
    let store: &dyn crate::pipeline::ChunkStore = match &retaining {
        Some(r) => r,
        None => repo,
    };
    // The point's files are staged; dropped on any error before the commit.
    let mut stage = repo.stage_point(&point_id, retention)?;
    let total: u64 = req.disks.iter().map(|d| d.source.size()).sum();
    Progress::add(&progress.total, total);

    let mut records = Vec::new();
    let mut all_keys: BTreeSet<KeyId> = BTreeSet::new();
    for (n, d) in req.disks.iter().enumerate() {
        let n = n as u32;
        let dspan = tracing::info_span!("disk", disk = n, label = %d.label, transport = d.source.transport());
        let _dg = dspan.enter();
        let header = IndexHeader {
            point_id: point_id.clone(),
            disk: n,
            chunk_size,
            disk_size: d.source.size(),
        };
        let index_name = format!("disk-{n}.idx");
        let ipath = repo.point_dir(&point_id).join(&index_name);
        let file = stage.create_file(&index_name)?;
        let mut iw = IndexWriter::new(BufWriter::with_capacity(1 << 20, file), header.clone())
            .map_err(|e| RepoError::io(&ipath, e))?;
        let dp = plan_disk(
            repo,
            &req.source_name,
            parent_open.as_ref(),
            parent_err.as_ref(),
            d,
            n,
            chunk_size,
            progress,
        )?;
        let stats: DiskStats = backup_disk(
            BackupInputs {
                source: d.source.as_ref(),
                store,
                data_key: &dk,
                id_key: &id_key,
                previous: dp.previous,
                plan: dp.plan,
                key_known: &key_known,
                rewrite: &rewrite,
                config: crate::pipeline::PipelineConfig {
                    codec: repo.config.compression,
                    ..req.pipeline
                }
                .with_min_workers(repo.backend().min_workers()),
                progress,
            },
            &mut iw,
            &header,
        )?;
        let (bw, hash) = iw.finish().map_err(|e| RepoError::io(&ipath, e))?;
        let f = bw
            .into_inner()
            .map_err(|e| RepoError::io(&ipath, e.into_error()))?;
        if let Some(r) = &retaining {
            // Chunks taken from the parent point: retained as long as that
            // point only; extend them when this point's date is later.
            let parent_until = parent
                .as_ref()
                .and_then(|p| p.immutable)
                .filter(|p| Some(p.mode) == retention.map(|r| r.mode))
                .map(|p| p.until);
            let mut ids = Vec::new();
            let mut rf = f.try_clone().map_err(|e| RepoError::io(&ipath, e))?;
            std::io::Seek::rewind(&mut rf).map_err(|e| RepoError::io(&ipath, e))?;
            crate::repo::scan_index(&ipath, rf, file_len(&f, &ipath)?, |e| {
                if !e.id.is_zero_marker() {
                    ids.push(e.id);
                }
            })?;
            let n = r.retain_rest(ids, parent_until)?;
            tracing::info!(extended = n, "retention of reused chunks extended");
        }
        stage.finish_file(&index_name, f)?;
        all_keys.extend(stats.keys.iter().copied());
        tracing::info!(
            read_mode = %dp.read,
            new = stats.chunks_new,
            reused = stats.chunks_reused,
            unchanged = stats.chunks_unchanged,
            zero = stats.chunks_zero,
            read = stats.bytes_read,
            stored = stats.bytes_new_stored,
            "disk done"
        );
        records.push(DiskRecord {
            disk: n,
            index: index_name,
            index_blake3: hex::encode(hash),
            size: header.disk_size,
            chunks_total: stats.chunks_total,
            chunks_zero: stats.chunks_zero,
            chunks_new: stats.chunks_new,
            bytes_new_stored: stats.bytes_new_stored,
            bytes_read: stats.bytes_read,
            change_id: d.change_id.clone(),
            transport: d.source.transport().to_string(),
            transport_reason: d.transport_reason.clone(),
            read: dp.read,
            read_reason: dp.reason,
            changed_bytes: dp.changed_bytes,
            chunks_unchanged: stats.chunks_unchanged,
        });
    }
    if progress.cancelled() {
        return Err(PipelineError::Cancelled.into());
    }

    // Commit: chunks durable, then manifest, then the directory rename.
    repo.sync_all()?;
    let kr = keyring.lock().unwrap_or_else(|p| p.into_inner());
    let mut point_keys = vec![dk.clone()];
    for k in &all_keys {
        if *k == dk.id {
            continue;
        }
        // Unchanged chunks of an incremental carry older data keys; the previous
        // point's manifest holds each of them even when the keyring does not.
        let key = kr
            .key(*k)
            .or_else(|| parent_open.as_ref().and_then(|p| p.key(*k)))
            .ok_or_else(|| {
                JobError::Invalid(format!(
                    "data key {k} vanished from the keyring during the backup"
                ))
            })?;
        point_keys.push(key.clone());
    }
    drop(kr);
    let now = time::OffsetDateTime::now_utc();
    let header = ManifestHeader {
        point_id: point_id.clone(),
        created: now_rfc3339(),
        created_unix: now.unix_timestamp(),
        source: req.source_name.clone(),
        identity: req.identity.clone(),
        parent: parent.as_ref().map(|p| p.point_id.clone()),
        disks: req
            .disks
            .iter()
            .zip(&records)
            .map(|(d, r)| DiskSummary {
                disk: r.disk,
                size: r.size,
                label: d.label.clone(),
            })
            .collect(),
        data_key_id: dk.id,
        wrapped_key: wrapped,
        recovery_wrapped_key: recovery_wrapped,
        snapshot: req.snapshot.clone(),
        immutable: retention,
    };
    let body = ManifestBody {
        chunk_size,
        disks: records.clone(),
    };
    let bytes = manifest::encode(&header, &body, &point_keys, &id_key, &dk);
    stage.commit(&bytes)?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "restore point committed"
    );
    Ok(BackupReport {
        point_id,
        parent: parent.map(|p| p.point_id),
        chain: req.identity.unwrap_or(req.source_name),
        disks: records,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// How one disk is read: the pipeline plan, the previous index (base of an
/// incremental, or for deduplication) and what the manifest records about it.
struct DiskPlan {
    plan: ReadPlan,
    previous: Option<IndexReader<BufReader<File>>>,
    read: ReadMode,
    reason: String,
    changed_bytes: Option<u64>,
}

/// Decide how disk `n` (`d`) is read: incrementally from the previous point when
/// [`incremental::choose_base`] finds a base and the tracker answers, else in full
/// (with CBT's allocated areas when the tracker has them), logging why.
#[allow(clippy::too_many_arguments)]
fn plan_disk(
    repo: &Repository,
    source: &str,
    parent: Option<&OpenPoint>,
    parent_err: Option<&(String, String)>,
    d: &DiskInput,
    n: u32,
    chunk_size: u32,
    progress: &Progress,
) -> Result<DiskPlan, JobError> {
    let size = d.source.size();
    let previous = match (parent, parent_err) {
        (Some(p), _) => Ok(Some(Previous {
            point_id: &p.header.point_id,
            chunk_size: p.body.chunk_size,
            summaries: &p.header.disks,
            records: &p.body.disks,
        })),
        (None, Some((id, e))) => Err((id.as_str(), e.as_str())),
        (None, None) => Ok(None),
    };
    let now = Current {
        label: &d.label,
        size,
        chunk_size,
        change_id: d.change_id.as_deref(),
    };
    let chosen = incremental::choose_base(
        &d.read,
        source,
        previous.as_ref().map(Option::as_ref).map_err(|e| *e),
        &now,
    );
    let why_full = match (chosen, parent, d.read.tracker.as_ref()) {
        (Ok(base), Some(p), Some(tracker)) => match repo.open_index(p, base.disk) {
            Err(e) => FullReason::PreviousIndex {
                point: base.point_id.clone(),
                error: e.to_string(),
            },
            Ok(reader) => {
                if progress.cancelled() {
                    return Err(PipelineError::Cancelled.into());
                }
                match tracker.changed_since(&base.change_id) {
                    Ok(extents) => {
                        let (changed, sum) = ChunkSet::from_extents(&extents, size, chunk_size);
                        if sum.out_of_order || sum.beyond_disk > 0 {
                            tracing::warn!(areas = sum.extents, beyond_disk = sum.beyond_disk, out_of_order = sum.out_of_order, "CBT answered unsorted, overlapping or out-of-range areas; normalised");
                        }
                        tracing::info!(base = %base.point_id, change_id = %base.change_id, areas = sum.extents, changed_bytes = sum.bytes, chunks = changed.len(), "incremental read: only the changed chunks");
                        return Ok(DiskPlan {
                            plan: ReadPlan::Changed {
                                changed,
                                previous_hash: base.index_hash,
                            },
                            previous: Some(reader),
                            read: ReadMode::Cbt,
                            reason: format!(
                                "changed areas since restore point {} (changeId {})",
                                base.point_id, base.change_id
                            ),
                            changed_bytes: Some(sum.bytes),
                        });
                    }
                    Err(TrackerError::UnknownChangeId(error)) => FullReason::CbtReset {
                        change_id: base.change_id.clone(),
                        error,
                    },
                    Err(TrackerError::Failed(error)) => FullReason::CbtFailed {
                        change_id: base.change_id.clone(),
                        error,
                    },
                }
            }
        },
        (Ok(_), _, _) => FullReason::NoTracking,
        (Err(r), _, _) => r,
    };
    let reason = why_full.to_string();
    match &why_full {
        FullReason::Requested(_) | FullReason::NoTracking | FullReason::NoPrevious { .. } => {
            tracing::info!(%reason, "reading the disk in full")
        }
        _ => tracing::warn!(%reason, "incremental not possible; reading the disk in full"),
    }
    // Deduplication against the previous point's disk of the same number.
    let previous = match parent {
        Some(p) if p.body.disks.iter().any(|x| x.disk == n) => match repo.open_index(p, n) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "previous index unusable; no deduplication against it");
                None
            }
        },
        _ => None,
    };
    // CBT's allocated areas ("*") spare reading what was never written, where the
    // source cannot tell (a hot-added block device).
    let plan = match (&d.read.tracker, &d.change_id) {
        (Some(t), Some(_)) => match t.allocated() {
            Ok(areas) => {
                let (set, sum) = ChunkSet::from_extents(&areas, size, chunk_size);
                tracing::info!(
                    allocated_bytes = sum.bytes,
                    chunks = set.len(),
                    "full read of the areas CBT reports allocated"
                );
                ReadPlan::Allocated(set)
            }
            Err(e) => {
                tracing::warn!(error = %e, "CBT cannot list the allocated areas; reading what the source reports allocated");
                ReadPlan::Full
            }
        },
        _ => ReadPlan::Full,
    };
    Ok(DiskPlan {
        plan,
        previous,
        read: ReadMode::Full,
        reason,
        changed_bytes: None,
    })
}

/// Open the keyring if possible; `None` (with a log line) when it is missing or the
/// key source cannot open it, so callers fall back to each point's own key.
pub fn try_keyring(repo: &Repository, keys: &dyn KeySource) -> Option<Keyring> {
    if !repo.has_keyring() {
        return None;
    }
    match repo.load_keyring(keys) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::info!(error = %e, "keyring not usable; using each restore point's own key");
            None
        }
    }
}

/// Restore disk `disk` of point `point_id` to `target_path` (file or block device).
pub fn restore(
    repo: &Repository,
    keys: &dyn KeySource,
    point_id: &str,
    disk: u32,
    target_path: &Path,
    pipeline: PipelineConfig,
    progress: &Progress,
) -> Result<RestoreStats, JobError> {
    restore_to(
        repo,
        keys,
        point_id,
        disk,
        target_path,
        pipeline,
        progress,
        true,
    )
}

/// [`restore`] into a new regular file only: whatever exists at `target_path`
/// (a file, a symlink, a device node) is refused, and the file is created with
/// `O_EXCL`, so a symlink placed there (even between a check and the open) is
/// never followed. For restores a remote request names (the agent API).
pub fn restore_new_file(
    repo: &Repository,
    keys: &dyn KeySource,
    point_id: &str,
    disk: u32,
    target_path: &Path,
    pipeline: PipelineConfig,
    progress: &Progress,
) -> Result<RestoreStats, JobError> {
    restore_to(
        repo,
        keys,
        point_id,
        disk,
        target_path,
        pipeline,
        progress,
        false,
    )
}

#[allow(clippy::too_many_arguments)]
fn restore_to(
    repo: &Repository,
    keys: &dyn KeySource,
    point_id: &str,
    disk: u32,
    target_path: &Path,
    pipeline: PipelineConfig,
    progress: &Progress,
    devices: bool,
) -> Result<RestoreStats, JobError> {
    let _lock = repo.lock(LockMode::Shared, "restore", Duration::from_secs(5))?;
    let span = tracing::info_span!("restore", point = %point_id, disk);
    let _g = span.enter();
    let keyring = try_keyring(repo, keys);
    let point = repo.open_point(point_id, keys, keyring.as_ref())?;
    let index = repo.open_index(&point, disk)?;
    let size = index.header.disk_size;
    Progress::add(&progress.total, size);
    let is_block = devices && crate::transport::file::is_block_device(target_path);
    let target = if is_block {
        FileTarget::open_existing(target_path, size, false).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidInput {
                JobError::Invalid(format!("block device {e}"))
            } else {
                RepoError::io(target_path, e).into()
            }
        })?
    } else {
        if fs::symlink_metadata(target_path).is_ok() {
            return Err(JobError::Invalid(format!(
                "{} exists; refusing to overwrite a file (remove it or restore to a new path)",
                target_path.display()
            )));
        }
        FileTarget::create(target_path, size).map_err(|e| RepoError::io(target_path, e))?
    };
    let table = KeyTable::new(point.keys.iter());
    let res = restore_disk(
        repo,
        index,
        &table,
        &point.id_key,
        &target,
        pipeline.with_min_workers(repo.backend().min_workers()),
        progress,
    );
    if res.is_err() && !is_block {
        // Never leave a half-restored file that looks complete.
        let partial = target_path.with_extension("partial");
        let _ = fs::rename(target_path, &partial);
        tracing::error!(kept = %partial.display(), "restore failed; partial output renamed");
    }
    Ok(res?)
}

/// The length of a written index file.
fn file_len(f: &File, path: &Path) -> Result<u64, RepoError> {
    f.metadata()
        .map(|m| m.len())
        .map_err(|e| RepoError::io(path, e))
}
