//! Row types of the state store and their decoding from SQLite rows. Decoding is
//! strict: an unknown state string or broken JSON is a typed error, never a panic.

use super::{StateError, StateStore};
use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The stored (and serialized) name.
            pub fn as_str(self) -> &'static str { match self { $($name::$v => $s),+ } }
            /// Parse a stored name.
            pub fn parse(s: &str) -> Option<$name> { match s { $($s => Some($name::$v),)+ _ => None } }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

string_enum!(
    /// What a job does.
    JobKind {
        /// Back up a VM.
        Backup = "backup",
        /// Restore from a restore point.
        Restore = "restore",
        /// Verify a tenant's repository, or one restore point.
        Verify = "verify",
    }
);

string_enum!(
    /// Life cycle of a job: `queued` → `running` → one of the terminal states.
    JobState {
        /// Accepted, not started.
        Queued = "queued",
        /// The runner is working on it.
        Running = "running",
        /// Finished without error.
        Succeeded = "succeeded",
        /// Finished with an error (including "interrupted: agent restarted").
        Failed = "failed",
        /// Stopped on request (cancel, or agent shutdown).
        Cancelled = "cancelled",
    }
);

impl JobState {
    /// Whether the state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

string_enum!(
    /// What an orchestrator run did.
    RunKind {
        /// Backups of a configured job's VMs.
        Backup = "backup",
        /// The key sync system job over every agent.
        KeySync = "key_sync",
    }
);

string_enum!(
    /// State of an orchestrator run.
    RunState {
        /// In progress.
        Running = "running",
        /// Every item succeeded.
        Succeeded = "succeeded",
        /// At least one item failed or was refused.
        Failed = "failed",
    }
);

string_enum!(
    /// State of one item (VM or agent) of an orchestrator run.
    ItemState {
        /// Not dispatched yet (waiting for a slot).
        Pending = "pending",
        /// Sent to an agent; being polled.
        Dispatched = "dispatched",
        /// Done.
        Succeeded = "succeeded",
        /// Failed (on the agent, or no agent could take it).
        Failed = "failed",
        /// Cancelled on the agent.
        Cancelled = "cancelled",
        /// Refused by the selector before any snapshot.
        Refused = "refused",
    }
);

/// A typed job error: a stable code and an operator-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable machine-readable code.
    pub code: String,
    /// What went wrong and what to do.
    pub message: String,
}

/// A job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Unique id.
    pub id: String,
    /// Backup or restore.
    pub kind: JobKind,
    /// The request, as JSON.
    pub spec: serde_json::Value,
    /// Tenant.
    pub tenant: String,
    /// VM name (backups), restore point (restores), or the point or
    /// `repository` (verifies).
    pub subject: String,
    /// Per-disk plan, as JSON.
    pub disks: serde_json::Value,
    /// Expected bytes, if known.
    pub bytes_total: u64,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Finish {
    /// Terminal state.
    pub state: JobState,
    /// Bytes done.
    pub bytes_done: u64,
    /// Bytes total.
    pub bytes_total: u64,
    /// Per-disk results, as JSON.
    pub disks: serde_json::Value,
    /// Runner notes, as JSON (an array of strings).
    pub notes: serde_json::Value,
    /// Error, for failed and cancelled jobs.
    pub error: Option<ErrorInfo>,
    /// Restore point made (backup) or read (restore).
    pub point_id: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Unique id.
    pub id: String,
    /// Backup or restore.
    pub kind: JobKind,
    /// The request, as JSON.
    pub spec: serde_json::Value,
    /// Tenant.
    pub tenant: String,
    /// VM name or restore point.
    pub subject: String,
    /// Current state.
    pub state: JobState,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub started_at: Option<i64>,
    /// Unix ms.
    pub finished_at: Option<i64>,
    /// Bytes done (last recorded).
    pub bytes_done: u64,
    /// Bytes total.
    pub bytes_total: u64,
    /// Per-disk plan or results, as JSON.
    pub disks: serde_json::Value,
    /// Runner notes, as JSON.
    pub notes: serde_json::Value,
    /// Error of a failed or cancelled job.
    pub error: Option<ErrorInfo>,
    /// What the orphan sweep did after an interruption.
    pub cleanup: Option<String>,
    /// Restore point.
    pub point_id: Option<String>,
}

/// Filter for [`StateStore::list_jobs`].
#[derive(Debug, Clone)]
pub struct JobFilter {
    /// Only this state.
    pub state: Option<JobState>,
    /// Only this kind.
    pub kind: Option<JobKind>,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// At most this many (clamped to 1..=1000).
    pub limit: u32,
}

impl Default for JobFilter {
    fn default() -> Self {
        JobFilter {
            state: None,
            kind: None,
            tenant: None,
            limit: 100,
        }
    }
}

pub(super) const JOB_COLUMNS: &str = "id, kind, spec, tenant, subject, state, created_at, started_at, finished_at, bytes_done, bytes_total, disks, error_code, error_message, cleanup, point_id, notes";

pub(super) struct RawJob {
    id: String,
    kind: String,
    spec: String,
    tenant: String,
    subject: String,
    state: String,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    bytes_done: i64,
    bytes_total: i64,
    disks: String,
    error_code: Option<String>,
    error_message: Option<String>,
    cleanup: Option<String>,
    point_id: Option<String>,
    notes: String,
}

fn json(
    store: &StateStore,
    what: &str,
    id: &str,
    text: &str,
) -> Result<serde_json::Value, StateError> {
    serde_json::from_str(text)
        .map_err(|e| store.corrupt(format!("{what} of {id} is not JSON: {e}")))
}

impl RawJob {
    pub(super) fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawJob> {
        Ok(RawJob {
            id: r.get(0)?,
            kind: r.get(1)?,
            spec: r.get(2)?,
            tenant: r.get(3)?,
            subject: r.get(4)?,
            state: r.get(5)?,
            created_at: r.get(6)?,
            started_at: r.get(7)?,
            finished_at: r.get(8)?,
            bytes_done: r.get(9)?,
            bytes_total: r.get(10)?,
            disks: r.get(11)?,
            error_code: r.get(12)?,
            error_message: r.get(13)?,
            cleanup: r.get(14)?,
            point_id: r.get(15)?,
            notes: r.get(16)?,
        })
    }

    pub(super) fn decode(self, store: &StateStore) -> Result<JobRecord, StateError> {
        let kind = JobKind::parse(&self.kind).ok_or_else(|| {
            store.corrupt(format!("job {} has unknown kind {:?}", self.id, self.kind))
        })?;
        let state = JobState::parse(&self.state).ok_or_else(|| {
            store.corrupt(format!(
                "job {} has unknown state {:?}",
                self.id, self.state
            ))
        })?;
        let error = match (self.error_code, self.error_message) {
            (None, None) => None,
            (code, message) => Some(ErrorInfo {
                code: code.unwrap_or_else(|| "error".into()),
                message: message.unwrap_or_default(),
            }),
        };
        Ok(JobRecord {
            spec: json(store, "spec", &self.id, &self.spec)?,
            disks: json(store, "disks", &self.id, &self.disks)?,
            notes: json(store, "notes", &self.id, &self.notes)?,
            id: self.id,
            kind,
            tenant: self.tenant,
            subject: self.subject,
            state,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            bytes_done: self.bytes_done.max(0) as u64,
            bytes_total: self.bytes_total.max(0) as u64,
            error,
            cleanup: self.cleanup,
            point_id: self.point_id,
        })
    }
}

/// A key check result to record (names and versions only, never key material).
#[derive(Debug, Clone)]
pub struct KeyObservation {
    /// Tenant.
    pub tenant: String,
    /// KMS address or key source name.
    pub kms: String,
    /// Key name on the KMS.
    pub key_name: String,
    /// KMS object id of the current key.
    pub key_id: String,
    /// Its version.
    pub version: u64,
}

/// What [`StateStore::record_key_check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// Key id and version known before, if any.
    pub previous: Option<(String, u64)>,
    /// True when the key id or version differs from before (or is new).
    pub changed: bool,
    /// Unix ms of this check.
    pub checked_at: i64,
}

/// One key registry entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyEntry {
    /// Tenant.
    pub tenant: String,
    /// KMS address or key source name.
    pub kms: String,
    /// Key name.
    pub key_name: String,
    /// KMS object id.
    pub key_id: String,
    /// Version last seen.
    pub version: u64,
    /// Unix ms of the last check.
    pub checked_at: i64,
    /// Unix ms when this key id/version was first seen.
    pub changed_at: i64,
}

/// An orchestrator run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// Unique id.
    pub id: String,
    /// Configured job name (or `key-sync`).
    pub job: String,
    /// Backup or key sync.
    pub kind: RunKind,
    /// State.
    pub state: RunState,
    /// Unix ms.
    pub started_at: i64,
    /// Unix ms.
    pub finished_at: Option<i64>,
    /// Counts and notes, as JSON.
    pub summary: serde_json::Value,
    /// Run-level error.
    pub error: Option<String>,
}

pub(super) const RUN_COLUMNS: &str =
    "id, job, kind, state, started_at, finished_at, summary, error";

pub(super) struct RawRun {
    id: String,
    job: String,
    kind: String,
    state: String,
    started_at: i64,
    finished_at: Option<i64>,
    summary: String,
    error: Option<String>,
}

impl RawRun {
    pub(super) fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
        Ok(RawRun {
            id: r.get(0)?,
            job: r.get(1)?,
            kind: r.get(2)?,
            state: r.get(3)?,
            started_at: r.get(4)?,
            finished_at: r.get(5)?,
            summary: r.get(6)?,
            error: r.get(7)?,
        })
    }

    pub(super) fn decode(self, store: &StateStore) -> Result<RunRecord, StateError> {
        Ok(RunRecord {
            kind: RunKind::parse(&self.kind).ok_or_else(|| {
                store.corrupt(format!("run {} has unknown kind {:?}", self.id, self.kind))
            })?,
            state: RunState::parse(&self.state).ok_or_else(|| {
                store.corrupt(format!(
                    "run {} has unknown state {:?}",
                    self.id, self.state
                ))
            })?,
            summary: json(store, "summary", &self.id, &self.summary)?,
            id: self.id,
            job: self.job,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
        })
    }
}

/// One item (VM, or agent for key sync) of an orchestrator run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunItem {
    /// Run.
    pub run_id: String,
    /// VM moref, or agent id.
    pub item: String,
    /// Agent it went to.
    pub agent: Option<String>,
    /// Job id on that agent.
    pub agent_job_id: Option<String>,
    /// State.
    pub state: ItemState,
    /// Dispatch attempts so far.
    pub attempts: u32,
    /// Plan (per-disk proxy, mode, reason) and results, as JSON.
    pub detail: serde_json::Value,
    /// Error.
    pub error: Option<String>,
    /// Bytes moved.
    pub bytes: u64,
    /// Unix ms of the last update.
    pub updated_at: i64,
}

pub(super) struct RawItem {
    run_id: String,
    item: String,
    agent: Option<String>,
    agent_job_id: Option<String>,
    state: String,
    attempts: i64,
    detail: String,
    error: Option<String>,
    bytes: i64,
    updated_at: i64,
}

impl RawItem {
    pub(super) fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawItem> {
        Ok(RawItem {
            run_id: r.get(0)?,
            item: r.get(1)?,
            agent: r.get(2)?,
            agent_job_id: r.get(3)?,
            state: r.get(4)?,
            attempts: r.get(5)?,
            detail: r.get(6)?,
            error: r.get(7)?,
            bytes: r.get(8)?,
            updated_at: r.get(9)?,
        })
    }

    pub(super) fn decode(self, store: &StateStore) -> Result<RunItem, StateError> {
        let what = format!("{}/{}", self.run_id, self.item);
        Ok(RunItem {
            state: ItemState::parse(&self.state).ok_or_else(|| {
                store.corrupt(format!(
                    "run item {what} has unknown state {:?}",
                    self.state
                ))
            })?,
            detail: json(store, "detail", &what, &self.detail)?,
            run_id: self.run_id,
            item: self.item,
            agent: self.agent,
            agent_job_id: self.agent_job_id,
            attempts: self.attempts.clamp(0, u32::MAX as i64) as u32,
            error: self.error,
            bytes: self.bytes.max(0) as u64,
            updated_at: self.updated_at,
        })
    }
}
