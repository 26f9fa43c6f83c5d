//! Durable state of the agent and the orchestrator in SQLite (rusqlite, bundled):
//! job records, the key registry (which tenant key version was last seen on which
//! KMS) and the orchestrator's run history.
//!
//! Owns the schema and its migrations (`PRAGMA user_version`), the durability
//! settings (WAL, `synchronous = FULL`, busy timeout) and crash recovery: on open,
//! jobs and runs left `running` (or `queued`) by a process that died are marked
//! failed and handed back so the caller can clean up after them (orphan sweep).
//!
//! Must not: hold or store key material (only key ids, versions and KMS names), know
//! the shape of job specs or results (they are opaque JSON here), do network I/O.
//! Every call is short and synchronous; async callers wrap it in `spawn_blocking`.

mod console;
mod migrations;
mod records;

pub use console::{AccountRecord, AuditEntry, VmHistoryEntry};
pub use records::*;

use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// How long a writer waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Error message recorded for jobs a dead agent left running.
pub const INTERRUPTED_AGENT: &str = "interrupted: agent restarted";
/// Error message recorded for runs a dead orchestrator left running.
pub const INTERRUPTED_ORCHESTRATOR: &str = "interrupted: orchestrator restarted";
/// Error code recorded for interrupted jobs and runs.
pub const INTERRUPTED_CODE: &str = "interrupted";

/// State store errors; each names the database file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory or database cannot be created or opened.
    #[error("state database {path}: cannot open: {detail} (check that the state directory exists, is writable by the ferry user and is on a local file system)")]
    Open {
        /// Database file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The database was written by a newer ferry.
    #[error("state database {path} has schema version {found}, this ferry knows up to {known}: upgrade ferry or point state_dir elsewhere")]
    TooNew {
        /// Database file.
        path: PathBuf,
        /// `user_version` found.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// An SQLite operation failed.
    #[error("state database {path}: {op}: {source}")]
    Sqlite {
        /// Database file.
        path: PathBuf,
        /// What ferry was doing.
        op: &'static str,
        /// SQLite error.
        source: rusqlite::Error,
    },
    /// A row holds a value this build cannot interpret.
    #[error("state database {path}: {what} (the file was modified outside ferry?)")]
    Corrupt {
        /// Database file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The object does not exist.
    #[error("{what} {id} not found")]
    NotFound {
        /// Kind of object (job, run).
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The change is not allowed in the object's current state.
    #[error("{what} {id} is {state}: {message}")]
    Conflict {
        /// Kind of object.
        what: &'static str,
        /// Its id.
        id: String,
        /// Its current state.
        state: String,
        /// Why the change is refused.
        message: String,
    },
    /// Another process owns this state (an agent or orchestrator already runs
    /// with the same state directory).
    #[error("{path} is held by another process (pid {holder}): only one agent or orchestrator may use a state directory; stop the other one or give this one its own state_dir")]
    Locked {
        /// Lock file.
        path: PathBuf,
        /// Pid written by the holder, if readable.
        holder: String,
    },
    /// The caller passed an id that is already used.
    #[error("{what} {id} already exists")]
    Duplicate {
        /// Kind of object.
        what: &'static str,
        /// Its id.
        id: String,
    },
}

/// What crash recovery found when the store was opened.
#[derive(Debug, Default, Clone)]
pub struct Recovered {
    /// Jobs that were `running` or `queued`, now `failed` with
    /// [`INTERRUPTED_AGENT`] (as they are now in the database).
    pub jobs: Vec<JobRecord>,
    /// Orchestrator runs that were `running`, now `failed`.
    pub runs: Vec<RunRecord>,
}

/// The SQLite state store. Cheap calls behind one mutex-protected connection;
/// share it in an `Arc`.
pub struct StateStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, milliseconds) of a Unix-milliseconds timestamp.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

/// Exclusive ownership of a state directory for the life of a process: an
/// `flock(2)` on a lock file, released by the kernel when the holder exits (so
/// a crash never leaves a stale lock). Crash recovery is only safe under it.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl StateLock {
    /// Take the lock at `path` (created if missing), or fail at once.
    pub fn acquire(path: &Path) -> Result<StateLock, StateError> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::io::AsRawFd;
        let open_err = |detail: String| StateError::Open {
            path: path.to_path_buf(),
            detail,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_err(format!("creating {}: {e}", dir.display())))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| open_err(e.to_string()))?;
        // SAFETY: flock on a file descriptor this function owns.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(StateError::Locked {
                path: path.to_path_buf(),
                holder: holder.trim().to_string(),
            });
        }
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = writeln!(f, "{}", std::process::id());
        Ok(StateLock {
            _file: f,
            path: path.to_path_buf(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl StateStore {
    /// Open (creating if needed) the database at `path` and migrate it, without
    /// crash recovery: for readers (history, plans) next to a running owner.
    pub fn open_no_recovery(path: &Path) -> Result<StateStore, StateError> {
        let (store, _) = Self::open_inner(path, false)?;
        Ok(store)
    }

    /// Open (creating if needed) the database at `path`, migrate it, and recover
    /// from a crash: jobs and runs left `running`/`queued` become `failed` with
    /// reason "interrupted: ... restarted" and are returned. Only the owner of
    /// the state (holding its [`StateLock`]) may do this.
    pub fn open(path: &Path) -> Result<(StateStore, Recovered), StateError> {
        Self::open_inner(path, true)
    }

    fn open_inner(path: &Path, recover: bool) -> Result<(StateStore, Recovered), StateError> {
        let open_err = |detail: String| StateError::Open {
            path: path.to_path_buf(),
            detail,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| open_err(format!("creating {}: {e}", dir.display())))?;
            }
        }
        let conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        let store = StateStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        };
        store.configure()?;
        store.migrate()?;
        let recovered = if recover {
            store.recover()?
        } else {
            Recovered::default()
        };
        Ok((store, recovered))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        move |source| StateError::Sqlite {
            path: self.path.clone(),
            op,
            source,
        }
    }

    pub(crate) fn corrupt(&self, what: impl Into<String>) -> StateError {
        StateError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (every
        // statement is its own transaction or rolled back on drop).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn configure(&self) -> Result<(), StateError> {
        let c = self.lock();
        c.busy_timeout(BUSY_TIMEOUT)
            .map_err(self.sql("setting busy timeout"))?;
        let mode: String = c
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(self.sql("enabling WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(db = %self.path.display(), mode, "SQLite refused WAL mode (file system without shared memory?); using the rollback journal");
        }
        // FULL: every commit is fsynced before it returns, so a recorded state
        // change survives power loss (NORMAL could lose the last commits in WAL mode).
        c.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(self.sql("setting durability pragmas"))?;
        Ok(())
    }

    fn migrate(&self) -> Result<(), StateError> {
        let mut c = self.lock();
        let found: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.sql("reading schema version"))?;
        let known = migrations::MIGRATIONS.len() as i64;
        if found > known {
            return Err(StateError::TooNew {
                path: self.path.clone(),
                found,
                known,
            });
        }
        for (i, m) in migrations::MIGRATIONS
            .iter()
            .enumerate()
            .skip(found as usize)
        {
            let tx = c.transaction().map_err(self.sql("starting migration"))?;
            tx.execute_batch(m)
                .map_err(self.sql("applying migration"))?;
            // user_version cannot be bound as a parameter.
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                .map_err(self.sql("recording schema version"))?;
            tx.commit().map_err(self.sql("committing migration"))?;
            tracing::debug!(db = %self.path.display(), version = i + 1, "state schema migrated");
        }
        Ok(())
    }

    /// Schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StateError> {
        self.lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.sql("reading schema version"))
    }

    fn recover(&self) -> Result<Recovered, StateError> {
        let now = now_ms();
        let ids = |tx: &rusqlite::Transaction<'_>, q: &str| -> Result<Vec<String>, StateError> {
            let mut st = tx
                .prepare(q)
                .map_err(self.sql("finding interrupted work"))?;
            let rows = st
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(self.sql("finding interrupted work"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(self.sql("finding interrupted work"))
        };
        let (job_ids, run_ids) = {
            let mut c = self.lock();
            let tx = c.transaction().map_err(self.sql("starting recovery"))?;
            let job_ids = ids(
                &tx,
                "SELECT id FROM jobs WHERE state IN ('running','queued') ORDER BY created_at, rowid",
            )?;
            let run_ids = ids(
                &tx,
                "SELECT id FROM orch_runs WHERE state = 'running' ORDER BY started_at, rowid",
            )?;
            tx.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?1, error_code = ?2, error_message = ?3 WHERE state IN ('running','queued')",
                params![now, INTERRUPTED_CODE, INTERRUPTED_AGENT],
            )
            .map_err(self.sql("marking interrupted jobs failed"))?;
            tx.execute(
                "UPDATE orch_runs SET state = 'failed', finished_at = ?1, error = ?2 WHERE state = 'running'",
                params![now, INTERRUPTED_ORCHESTRATOR],
            )
            .map_err(self.sql("marking interrupted runs failed"))?;
            tx.execute(
                "UPDATE orch_run_items SET state = 'failed', error = ?1, updated_at = ?2 WHERE state IN ('pending','dispatched')",
                params![
                    format!("{INTERRUPTED_ORCHESTRATOR} (a dispatched agent job may still have finished: see agent_job_id on that agent)"),
                    now
                ],
            )
            .map_err(self.sql("marking interrupted run items failed"))?;
            tx.commit().map_err(self.sql("committing recovery"))?;
            (job_ids, run_ids)
        };
        let mut out = Recovered::default();
        for id in job_ids {
            if let Some(j) = self.get_job(&id)? {
                tracing::warn!(job = %j.id, kind = %j.kind, subject = %j.subject, "job was interrupted by a restart; marked failed");
                out.jobs.push(j);
            }
        }
        for id in run_ids {
            if let Some(r) = self.get_run(&id)? {
                tracing::warn!(run = %r.id, job = %r.job, "orchestrator run was interrupted by a restart; marked failed");
                out.runs.push(r);
            }
        }
        Ok(out)
    }

    // ---- jobs -------------------------------------------------------------------

    /// Record a new job in state `queued`.
    pub fn insert_job(&self, j: &NewJob) -> Result<JobRecord, StateError> {
        let now = now_ms();
        let n = self
            .lock()
            .execute(
                "INSERT OR IGNORE INTO jobs (id, kind, spec, tenant, subject, state, created_at, bytes_total, disks)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?8)",
                params![
                    j.id,
                    j.kind.as_str(),
                    j.spec.to_string(),
                    j.tenant,
                    j.subject,
                    now,
                    j.bytes_total as i64,
                    j.disks.to_string()
                ],
            )
            .map_err(self.sql("inserting job"))?;
        if n == 0 {
            return Err(StateError::Duplicate {
                what: "job",
                id: j.id.clone(),
            });
        }
        self.job_or_not_found(&j.id)
    }

    fn job_or_not_found(&self, id: &str) -> Result<JobRecord, StateError> {
        self.get_job(id)?.ok_or_else(|| StateError::NotFound {
            what: "job",
            id: id.to_string(),
        })
    }

    fn job_conflict(&self, id: &str, message: &str) -> StateError {
        match self.get_job(id) {
            Ok(Some(j)) => StateError::Conflict {
                what: "job",
                id: id.to_string(),
                state: j.state.as_str().to_string(),
                message: message.to_string(),
            },
            Ok(None) => StateError::NotFound {
                what: "job",
                id: id.to_string(),
            },
            Err(e) => e,
        }
    }

    /// `queued` → `running`.
    pub fn mark_running(&self, id: &str) -> Result<JobRecord, StateError> {
        let n = self
            .lock()
            .execute(
                "UPDATE jobs SET state = 'running', started_at = ?2 WHERE id = ?1 AND state = 'queued'",
                params![id, now_ms()],
            )
            .map_err(self.sql("marking job running"))?;
        if n == 0 {
            return Err(self.job_conflict(id, "only a queued job can start"));
        }
        self.job_or_not_found(id)
    }

    /// Record progress of a `running` job (no-op for jobs in other states).
    pub fn update_progress(&self, id: &str, done: u64, total: u64) -> Result<(), StateError> {
        self.lock()
            .execute(
                "UPDATE jobs SET bytes_done = ?2, bytes_total = ?3 WHERE id = ?1 AND state = 'running'",
                params![id, done as i64, total as i64],
            )
            .map_err(self.sql("recording job progress"))?;
        Ok(())
    }

    /// Move a `queued` or `running` job to a terminal state. Terminal states never
    /// change again.
    pub fn finish_job(&self, id: &str, f: &Finish) -> Result<JobRecord, StateError> {
        if !f.state.is_terminal() {
            return Err(self.corrupt(format!(
                "finish_job({id}) called with non-terminal state {}",
                f.state
            )));
        }
        let (code, message) = match &f.error {
            Some(e) => (Some(e.code.as_str()), Some(e.message.as_str())),
            None => (None, None),
        };
        let n = self
            .lock()
            .execute(
                "UPDATE jobs SET state = ?2, finished_at = ?3, bytes_done = ?4, bytes_total = ?5,
                        disks = ?6, error_code = ?7, error_message = ?8, point_id = ?9, notes = ?10
                 WHERE id = ?1 AND state IN ('queued','running')",
                params![
                    id,
                    f.state.as_str(),
                    now_ms(),
                    f.bytes_done as i64,
                    f.bytes_total as i64,
                    f.disks.to_string(),
                    code,
                    message,
                    f.point_id,
                    f.notes.to_string()
                ],
            )
            .map_err(self.sql("finishing job"))?;
        if n == 0 {
            return Err(self.job_conflict(id, "the job has already finished"));
        }
        self.job_or_not_found(id)
    }

    /// Record what the orphan sweep did for a job (any state).
    pub fn set_cleanup(&self, id: &str, cleanup: &str) -> Result<(), StateError> {
        let n = self
            .lock()
            .execute(
                "UPDATE jobs SET cleanup = ?2 WHERE id = ?1",
                params![id, cleanup],
            )
            .map_err(self.sql("recording cleanup"))?;
        if n == 0 {
            return Err(StateError::NotFound {
                what: "job",
                id: id.to_string(),
            });
        }
        Ok(())
    }

    /// One job.
    pub fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StateError> {
        let raw = self
            .lock()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                params![id],
                RawJob::from_row,
            )
            .optional()
            .map_err(self.sql("reading job"))?;
        raw.map(|r| r.decode(self)).transpose()
    }

    /// Jobs, newest first, optionally filtered; at most `limit` (1..=1000).
    pub fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StateError> {
        let limit = filter.limit.clamp(1, 1000) as i64;
        let raws: Vec<RawJob> = {
            let c = self.lock();
            let mut st = c
                .prepare(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs
                     WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR kind = ?2) AND (?3 IS NULL OR tenant = ?3)
                     ORDER BY created_at DESC, rowid DESC LIMIT ?4"
                ))
                .map_err(self.sql("listing jobs"))?;
            let rows = st
                .query_map(
                    params![
                        filter.state.map(JobState::as_str),
                        filter.kind.map(JobKind::as_str),
                        filter.tenant.as_deref(),
                        limit
                    ],
                    RawJob::from_row,
                )
                .map_err(self.sql("listing jobs"))?;
            rows.collect::<Result<_, _>>()
                .map_err(self.sql("listing jobs"))?
        };
        raws.into_iter().map(|r| r.decode(self)).collect()
    }

    /// Number of jobs in each state (every state present, zero included).
    pub fn count_by_state(&self) -> Result<Vec<(JobState, u64)>, StateError> {
        let c = self.lock();
        let mut out = Vec::new();
        for &s in JobState::ALL {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM jobs WHERE state = ?1",
                    params![s.as_str()],
                    |r| r.get(0),
                )
                .map_err(self.sql("counting jobs"))?;
            out.push((s, n.max(0) as u64));
        }
        Ok(out)
    }

    /// Bytes processed by finished jobs, per kind (a monotonic total while job
    /// records are kept).
    pub fn finished_bytes(&self) -> Result<Vec<(JobKind, u64)>, StateError> {
        let c = self.lock();
        let mut out = Vec::new();
        for &k in JobKind::ALL {
            let n: i64 = c
                .query_row(
                    "SELECT COALESCE(SUM(bytes_done), 0) FROM jobs WHERE kind = ?1 AND state IN ('succeeded','failed','cancelled')",
                    params![k.as_str()],
                    |r| r.get(0),
                )
                .map_err(self.sql("summing bytes"))?;
            out.push((k, n.max(0) as u64));
        }
        Ok(out)
    }

    // ---- key registry ------------------------------------------------------------

    /// Record that `tenant`'s key on `kms` was checked and found at `key_id` /
    /// `version`. Returns what was known before, so the caller can tell a rotation.
    pub fn record_key_check(&self, k: &KeyObservation) -> Result<KeyChange, StateError> {
        let now = now_ms();
        let mut c = self.lock();
        let tx = c.transaction().map_err(self.sql("starting key update"))?;
        let before: Option<(String, i64, i64)> = tx
            .query_row(
                "SELECT key_id, version, changed_at FROM key_registry WHERE tenant = ?1 AND kms = ?2",
                params![k.tenant, k.kms],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.sql("reading key registry"))?;
        let changed = match &before {
            Some((id, v, _)) => *id != k.key_id || *v != k.version as i64,
            None => true,
        };
        let changed_at = match (&before, changed) {
            (Some((_, _, at)), false) => *at,
            _ => now,
        };
        tx.execute(
            "INSERT INTO key_registry (tenant, kms, key_name, key_id, version, checked_at, changed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (tenant, kms) DO UPDATE SET key_name = excluded.key_name, key_id = excluded.key_id,
                 version = excluded.version, checked_at = excluded.checked_at, changed_at = excluded.changed_at",
            params![k.tenant, k.kms, k.key_name, k.key_id, k.version as i64, now, changed_at],
        )
        .map_err(self.sql("updating key registry"))?;
        tx.commit().map_err(self.sql("committing key update"))?;
        Ok(KeyChange {
            previous: before.map(|(id, v, _)| (id, v.max(0) as u64)),
            changed,
            checked_at: now,
        })
    }

    /// Every key registry entry, by tenant then KMS.
    pub fn keys(&self) -> Result<Vec<KeyEntry>, StateError> {
        let c = self.lock();
        let mut st = c
            .prepare("SELECT tenant, kms, key_name, key_id, version, checked_at, changed_at FROM key_registry ORDER BY tenant, kms")
            .map_err(self.sql("listing keys"))?;
        let rows = st
            .query_map([], |r| {
                Ok(KeyEntry {
                    tenant: r.get(0)?,
                    kms: r.get(1)?,
                    key_name: r.get(2)?,
                    key_id: r.get(3)?,
                    version: r.get::<_, i64>(4)?.max(0) as u64,
                    checked_at: r.get(5)?,
                    changed_at: r.get(6)?,
                })
            })
            .map_err(self.sql("listing keys"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sql("listing keys"))
    }

    // ---- orchestrator runs -----------------------------------------------------

    /// Record a new orchestrator run in state `running`.
    pub fn start_run(&self, id: &str, job: &str, kind: RunKind) -> Result<RunRecord, StateError> {
        let n = self
            .lock()
            .execute(
                "INSERT OR IGNORE INTO orch_runs (id, job, kind, state, started_at) VALUES (?1, ?2, ?3, 'running', ?4)",
                params![id, job, kind.as_str(), now_ms()],
            )
            .map_err(self.sql("inserting run"))?;
        if n == 0 {
            return Err(StateError::Duplicate {
                what: "run",
                id: id.to_string(),
            });
        }
        self.get_run(id)?.ok_or_else(|| StateError::NotFound {
            what: "run",
            id: id.to_string(),
        })
    }

    /// Insert or replace one item (a VM, or an agent for key sync) of a run.
    pub fn put_run_item(&self, item: &RunItem) -> Result<(), StateError> {
        self.put_run_items(std::slice::from_ref(item))
    }

    /// Insert or replace several items of runs in one transaction: one commit
    /// (one sync) for all of them. The orchestrator's dispatch rounds and
    /// polls record many VMs at once; one commit per VM made the database
    /// the bottleneck of a night with many small VMs.
    pub fn put_run_items(&self, items: &[RunItem]) -> Result<(), StateError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut c = self.lock();
        let tx = c
            .transaction()
            .map_err(self.sql("starting to record run items"))?;
        let now = now_ms();
        for item in items {
            tx.execute(
                "INSERT INTO orch_run_items (run_id, item, agent, agent_job_id, state, attempts, detail, error, bytes, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (run_id, item) DO UPDATE SET agent = excluded.agent, agent_job_id = excluded.agent_job_id,
                    state = excluded.state, attempts = excluded.attempts, detail = excluded.detail,
                    error = excluded.error, bytes = excluded.bytes, updated_at = excluded.updated_at",
                params![
                    item.run_id,
                    item.item,
                    item.agent,
                    item.agent_job_id,
                    item.state.as_str(),
                    item.attempts,
                    item.detail.to_string(),
                    item.error,
                    item.bytes as i64,
                    now
                ],
            )
            .map_err(self.sql("recording run item"))?;
        }
        tx.commit().map_err(self.sql("committing run items"))?;
        Ok(())
    }

    /// Close a run with its final state and a JSON summary.
    pub fn finish_run(
        &self,
        id: &str,
        state: RunState,
        summary: &serde_json::Value,
        error: Option<&str>,
    ) -> Result<RunRecord, StateError> {
        let n = self
            .lock()
            .execute(
                "UPDATE orch_runs SET state = ?2, finished_at = ?3, summary = ?4, error = ?5 WHERE id = ?1 AND state = 'running'",
                params![id, state.as_str(), now_ms(), summary.to_string(), error],
            )
            .map_err(self.sql("finishing run"))?;
        if n == 0 {
            return Err(match self.get_run(id)? {
                Some(r) => StateError::Conflict {
                    what: "run",
                    id: id.to_string(),
                    state: r.state.as_str().to_string(),
                    message: "the run has already finished".into(),
                },
                None => StateError::NotFound {
                    what: "run",
                    id: id.to_string(),
                },
            });
        }
        self.get_run(id)?.ok_or_else(|| StateError::NotFound {
            what: "run",
            id: id.to_string(),
        })
    }

    /// One run.
    pub fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StateError> {
        let raw = self
            .lock()
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM orch_runs WHERE id = ?1"),
                params![id],
                RawRun::from_row,
            )
            .optional()
            .map_err(self.sql("reading run"))?;
        raw.map(|r| r.decode(self)).transpose()
    }

    /// Runs, newest first, at most `limit`; only of `job` when given.
    pub fn list_runs(&self, job: Option<&str>, limit: u32) -> Result<Vec<RunRecord>, StateError> {
        let raws: Vec<RawRun> = {
            let c = self.lock();
            let mut st = c
                .prepare(&format!(
                    "SELECT {RUN_COLUMNS} FROM orch_runs WHERE (?1 IS NULL OR job = ?1)
                     ORDER BY started_at DESC, rowid DESC LIMIT ?2"
                ))
                .map_err(self.sql("listing runs"))?;
            let rows = st
                .query_map(
                    params![job, limit.clamp(1, 10_000) as i64],
                    RawRun::from_row,
                )
                .map_err(self.sql("listing runs"))?;
            rows.collect::<Result<_, _>>()
                .map_err(self.sql("listing runs"))?
        };
        raws.into_iter().map(|r| r.decode(self)).collect()
    }

    /// The newest run of `job` of `kind` that started, if any (schedules use it).
    pub fn last_run(&self, job: &str, kind: RunKind) -> Result<Option<RunRecord>, StateError> {
        let id: Option<String> = self
            .lock()
            .query_row(
                "SELECT id FROM orch_runs WHERE job = ?1 AND kind = ?2 ORDER BY started_at DESC, rowid DESC LIMIT 1",
                params![job, kind.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql("finding last run"))?;
        match id {
            Some(id) => self.get_run(&id),
            None => Ok(None),
        }
    }

    /// The items of a run, in insertion order.
    pub fn run_items(&self, run_id: &str) -> Result<Vec<RunItem>, StateError> {
        let raws: Vec<RawItem> = {
            let c = self.lock();
            let mut st = c
                .prepare(
                    "SELECT run_id, item, agent, agent_job_id, state, attempts, detail, error, bytes, updated_at
                     FROM orch_run_items WHERE run_id = ?1 ORDER BY rowid",
                )
                .map_err(self.sql("listing run items"))?;
            let rows = st
                .query_map(params![run_id], RawItem::from_row)
                .map_err(self.sql("listing run items"))?;
            rows.collect::<Result<_, _>>()
                .map_err(self.sql("listing run items"))?
        };
        raws.into_iter().map(|r| r.decode(self)).collect()
    }
}

#[cfg(test)]
mod tests;
