//! `ferry verify`: read every restore point's manifest and indexes and every chunk
//! they reference; authenticate and check each chunk against its id. Reports every
//! damaged point and file instead of stopping at the first. Read-only, except
//! that `--repair` then moves damaged and missing chunks to `damaged/`
//! ([`Repository::quarantine_chunk`]) so the next backups store them again.

use super::format::{ChunkId, IndexEntry};
use super::{RepoError, Repository};
use crate::keys::KeyId;
use crate::keys::KeySource;
use crate::pipeline::restore::{load_chunk, KeyTable};
use crate::progress::Progress;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Verification result of one point.
#[derive(Clone, Debug, Serialize)]
pub struct PointReport {
    /// Point id.
    pub point_id: String,
    /// Source label (if the header was readable).
    pub source: Option<String>,
    /// Whether everything checked out.
    pub ok: bool,
    /// Problems: file and what is wrong.
    pub problems: Vec<Problem>,
    /// Chunks checked for this point (including ones already checked for others).
    pub chunks_referenced: u64,
    /// The point could not be checked because no usable key was available (not damage).
    pub key_unavailable: bool,
}

/// One problem.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// File concerned.
    pub file: String,
    /// What is wrong.
    pub error: String,
}

/// Whole-repository report.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Problem with the keyring, if it exists but is damaged.
    pub keyring: Option<Problem>,
    /// Per point.
    pub points: Vec<PointReport>,
    /// Unique chunks read.
    pub chunks_checked: u64,
    /// Damaged chunk files.
    pub chunks_damaged: u64,
    /// With `repair`: chunks (hex ids) moved to `damaged/` or recorded there as
    /// missing. The points that reference them mend when a backup meets the same
    /// data again.
    pub chunks_quarantined: Vec<String>,
    /// With `repair`: chunks that could not be taken out of use, and why.
    pub repair_problems: Vec<Problem>,
}

impl VerifyReport {
    /// True if damage was found (as opposed to points skipped for lack of a key).
    pub fn damaged(&self) -> bool {
        self.keyring.is_some() || self.points.iter().any(|p| !p.ok && !p.key_unavailable)
    }

    /// True if everything was checked and nothing is damaged.
    pub fn ok(&self) -> bool {
        self.keyring.is_none() && self.points.iter().all(|p| p.ok)
    }
}

/// The objects of an immutable point whose retention is missing, shorter than
/// the point records, or weaker (governance where compliance was recorded),
/// while that date has not passed.
fn retention_problems(
    repo: &Repository,
    keys: &[String],
    want: &super::backend::Retention,
) -> Vec<Problem> {
    use super::backend::RetentionMode;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if want.until <= now {
        return Vec::new();
    }
    let mut out = Vec::new();
    for k in keys {
        let file = repo.backend().location(k).display().to_string();
        let error = match repo.backend().retention(k) {
            Ok(Some(have))
                if have.until >= want.until
                    && (have.mode == want.mode || have.mode == RetentionMode::Compliance) =>
            {
                continue
            }
            Ok(Some(have)) => format!(
                "retention {} until {} is shorter or weaker than the point's {} until {}",
                have.mode,
                super::backend::format_unix(have.until),
                want.mode,
                super::backend::format_unix(want.until)
            ),
            Ok(None) => format!(
                "no retention, though the point is immutable ({} until {})",
                want.mode,
                super::backend::format_unix(want.until)
            ),
            Err(e) => format!("retention could not be read: {e}"),
        };
        out.push(Problem { file, error });
    }
    out
}

fn problem_of(e: &RepoError) -> Problem {
    let file = match e {
        RepoError::Damaged { path, .. }
        | RepoError::Io { path, .. }
        | RepoError::NoSpace { path } => path.display().to_string(),
        _ => String::new(),
    };
    Problem {
        file,
        error: e.to_string(),
    }
}

/// What was wrong with a chunk, and whether `--repair` may take it out of use:
/// only a chunk file that is itself damaged or missing, never one this key
/// source cannot open or one an I/O error kept from being read.
#[derive(Clone)]
struct Verdict {
    error: String,
    /// Set when `--repair` may take the chunk out of use: the entry and the keys
    /// to check it again with, under the exclusive lock, before moving it.
    repair: Option<(IndexEntry, Arc<PointKeys>)>,
}

/// One point's data keys and id-key, to re-check a chunk.
struct PointKeys {
    table: KeyTable,
    id_key: crate::keys::SecretKey,
}

fn repairable(e: &RepoError) -> bool {
    match e {
        RepoError::Damaged { .. } => true,
        RepoError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

impl Verdict {
    fn of(e: &RepoError, entry: &IndexEntry, keys: &Arc<PointKeys>) -> Verdict {
        Verdict {
            error: e.to_string(),
            repair: repairable(e).then(|| (*entry, keys.clone())),
        }
    }
}

/// Verify `points` (all when empty) using `keys` (keyring when usable, else each
/// point's own key). `workers` threads read chunks, under the shared lock. With
/// `repair`, damaged and missing chunks are then checked again under the
/// exclusive lock and quarantined if they still are.
pub fn verify(
    repo: &Repository,
    keys: &dyn KeySource,
    points: &[String],
    workers: usize,
    repair: bool,
    progress: &Progress,
) -> Result<VerifyReport, RepoError> {
    verify_with(repo, keys, points, workers, repair, true, progress)
}

/// [`verify`], and with `read_data` false only the manifests and indexes:
/// the chunks the points reference are counted but not read (nothing to
/// repair then). Stops early, with the points checked so far, when
/// `progress` is cancelled.
pub fn verify_with(
    repo: &Repository,
    keys: &dyn KeySource,
    points: &[String],
    workers: usize,
    repair: bool,
    read_data: bool,
    progress: &Progress,
) -> Result<VerifyReport, RepoError> {
    let lock = repo.lock(
        super::lock::LockMode::Shared,
        "verify",
        std::time::Duration::from_secs(5),
    )?;
    let (keyring, keyring_problem) = match repo.has_keyring().then(|| repo.load_keyring(keys)) {
        Some(Ok(k)) => (Some(k), None),
        Some(Err(e)) if e.is_damage() => (None, Some(problem_of(&e))),
        Some(Err(e)) => {
            tracing::info!(error = %e, "keyring not usable with this key source; using each point's own key");
            (None, None)
        }
        None => (None, None),
    };
    let ids = if points.is_empty() {
        repo.point_ids()?
    } else {
        points.to_vec()
    };
    // Chunk verdicts shared across points: each chunk is read once.
    // Keyed by chunk and the data key the index names: another point's index
    // may name another key for the same chunk id (a chunk stored again).
    let verdicts: Mutex<HashMap<(ChunkId, KeyId), Option<Verdict>>> = Mutex::new(HashMap::new());
    let mut reports = Vec::new();
    for id in ids {
        if progress.cancelled() {
            break;
        }
        let mut rep = PointReport {
            point_id: id.clone(),
            source: None,
            ok: true,
            problems: Vec::new(),
            chunks_referenced: 0,
            key_unavailable: false,
        };
        let point = match repo.open_point(&id, keys, keyring.as_ref()) {
            Ok(p) => p,
            Err(e) => {
                rep.ok = false;
                rep.key_unavailable = matches!(e, RepoError::Key(_));
                rep.problems.push(problem_of(&e));
                reports.push(rep);
                continue;
            }
        };
        rep.source = Some(point.header.source.clone());
        let table = Arc::new(PointKeys {
            table: KeyTable::new(point.keys.iter()),
            id_key: point.id_key.clone(),
        });
        let mut point_chunks: HashSet<ChunkId> = HashSet::new();
        for d in &point.body.disks {
            let mut index = match repo.open_index(&point, d.disk) {
                Ok(i) => i,
                Err(e) => {
                    rep.ok = false;
                    rep.problems.push(problem_of(&e));
                    continue;
                }
            };
            Progress::add(&progress.total, d.size);
            let mut todo: Vec<IndexEntry> = Vec::new();
            let mut seen_here: HashSet<(ChunkId, KeyId)> = HashSet::new();
            loop {
                match index.next_entry() {
                    Ok(Some(_)) if progress.cancelled() => break,
                    Ok(Some(e)) => {
                        Progress::add(&progress.done, point.body.chunk_size as u64);
                        if e.id.is_zero_marker() {
                            continue;
                        }
                        rep.chunks_referenced += 1;
                        if seen_here.insert((e.id, e.key))
                            && read_data
                            && !verdicts
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .contains_key(&(e.id, e.key))
                        {
                            todo.push(e);
                        }
                        if todo.len() >= 4096 {
                            check_batch(repo, &table, &mut todo, &verdicts, workers, progress);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        rep.ok = false;
                        rep.problems.push(Problem {
                            file: d.index.clone(),
                            error: e.to_string(),
                        });
                        break;
                    }
                }
            }
            check_batch(repo, &table, &mut todo, &verdicts, workers, progress);
            point_chunks.extend(seen_here.iter().map(|c| c.0));
            let v = verdicts.lock().unwrap_or_else(|p| p.into_inner());
            let mut bad: Vec<Problem> = seen_here
                .iter()
                .filter_map(|c| {
                    v.get(c).cloned().flatten().map(|err| Problem {
                        file: repo.chunk_path(&c.0).display().to_string(),
                        error: err.error,
                    })
                })
                .collect();
            bad.sort_by(|a, b| a.file.cmp(&b.file));
            if !bad.is_empty() {
                rep.ok = false;
                rep.problems.extend(bad);
            }
        }
        if let Some(r) = point.header.immutable {
            // A copied point's retention record is one of its objects.
            let record = super::backend::point_key(&id, super::copy::RETENTION_RECORD);
            let copied = repo.backend().exists(&record)?;
            let files: Vec<String> = std::iter::once("manifest".to_string())
                .chain(point.body.disks.iter().map(|d| d.index.clone()))
                .chain(copied.then(|| super::copy::RETENTION_RECORD.to_string()))
                .map(|f| super::backend::point_key(&id, &f))
                .chain(
                    point_chunks
                        .iter()
                        .map(|c| super::backend::chunk_key(&c.to_hex())),
                )
                .collect();
            let short = retention_problems(repo, &files, &r);
            if !short.is_empty() {
                rep.ok = false;
                rep.problems.extend(short);
            }
        }
        if rep.ok {
            tracing::info!(point = %id, "verified");
        } else {
            tracing::error!(point = %id, problems = rep.problems.len(), "damaged");
        }
        reports.push(rep);
    }
    let v = verdicts.into_inner().unwrap_or_else(|p| p.into_inner());
    drop(lock);
    let (quarantined, repair_problems) = if repair {
        let mut bad: Vec<&(IndexEntry, Arc<PointKeys>)> = v
            .values()
            .flatten()
            .filter_map(|x| x.repair.as_ref())
            .collect();
        bad.sort_by_key(|(e, _)| (e.id, e.key));
        bad.dedup_by_key(|(e, _)| e.id);
        quarantine(repo, &bad)?
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(VerifyReport {
        keyring: keyring_problem,
        points: reports,
        chunks_checked: v.len() as u64,
        chunks_damaged: v.values().filter(|x| x.is_some()).count() as u64,
        chunks_quarantined: quarantined,
        repair_problems,
    })
}

/// Under the exclusive lock (no backup is storing chunks meanwhile), read each
/// candidate again and take it out of use only if it is still damaged or
/// missing: a one-off bad read or a chunk stored again since is left alone.
/// Returns the chunks moved and the ones that could not be.
fn quarantine(
    repo: &Repository,
    bad: &[&(IndexEntry, Arc<PointKeys>)],
) -> Result<(Vec<String>, Vec<Problem>), RepoError> {
    let (mut moved, mut problems) = (Vec::new(), Vec::new());
    if bad.is_empty() {
        return Ok((moved, problems));
    }
    let _lock = match repo.lock(
        super::lock::LockMode::Exclusive,
        "verify --repair",
        std::time::Duration::from_secs(60),
    ) {
        Ok(l) => l,
        // The verification stands; only the repair waits for another run.
        Err(e) => {
            problems.push(Problem {
                file: String::new(),
                error: format!("nothing moved: {e}; run verify --repair again"),
            });
            return Ok((moved, problems));
        }
    };
    let (mut raw, mut out) = (Vec::new(), Vec::new());
    for (e, k) in bad {
        match load_chunk(repo, e, &k.table, &k.id_key, &mut raw, &mut out) {
            Ok(()) => {
                tracing::info!(chunk = %e.id.to_hex(), "chunk reads fine now; left in place");
                continue;
            }
            Err(err) if repairable(&err) => {}
            Err(err) => {
                problems.push(Problem {
                    file: repo.chunk_path(&e.id).display().to_string(),
                    error: format!("not moved: {err}"),
                });
                continue;
            }
        }
        match repo.quarantine_chunk(&e.id, e.key) {
            Ok(false) => {}
            Ok(true) => {
                tracing::warn!(chunk = %e.id.to_hex(), "damaged chunk moved to damaged/; the next backup of the same data stores it again");
                moved.push(e.id.to_hex());
            }
            Err(err) => problems.push(problem_of(&err)),
        }
    }
    Ok((moved, problems))
}

fn check_batch(
    repo: &Repository,
    keys: &Arc<PointKeys>,
    todo: &mut Vec<IndexEntry>,
    verdicts: &Mutex<HashMap<(ChunkId, KeyId), Option<Verdict>>>,
    workers: usize,
    progress: &Progress,
) {
    if todo.is_empty() {
        return;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let items = &todo[..];
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                let (mut raw, mut out) = (Vec::new(), Vec::new());
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(e) = items.get(i) else { break };
                    let verdict =
                        load_chunk(repo, e, &keys.table, &keys.id_key, &mut raw, &mut out)
                            .err()
                            .map(|err| Verdict::of(&err, e, keys));
                    Progress::add(&progress.read, raw.len() as u64);
                    verdicts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((e.id, e.key), verdict);
                }
            });
        }
    });
    todo.clear();
}
