//! The seam between the agent and the code that does the work: [`JobRunner`].
//!
//! The agent owns admission (tenant known, selector says this proxy can take the
//! VM, slots), job records, progress reporting, cancellation requests and crash
//! recovery; the runner owns everything that touches vCenter, ESXi, the tenant KMS
//! and the repository: snapshot → transport → pipeline → commit → cleanup.
//!
//! # Why blocking
//! Every method is a plain blocking call; the agent runs it on a dedicated blocking
//! thread (`tokio::task::spawn_blocking`). The data plane ([`crate::job`],
//! [`crate::pipeline`]) is threads and crossbeam channels by design, and its cancel
//! signal is already [`Progress::cancel`], which every pipeline stage polls. A
//! blocking call also cannot be dropped half-way: an async future can be abandoned
//! at any `.await`, silently skipping the cleanup that must always run (remove the
//! snapshot, detach the hot-added disk). Runners that need async clients (the
//! vSphere SOAP client) use [`JobContext::runtime`] with `Handle::block_on`, which
//! is allowed on blocking threads.
//!
//! Must not: hold HTTP or SQLite state, decide admission, or return key material
//! (key sync returns ids and versions only).

use crate::config::TenantSection;
use crate::progress::Progress;
use crate::transport::select::{Mode, Policy, ProxyInfo, Selection, VmInfo};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// What the agent hands the runner for one job.
pub struct JobContext {
    /// Agent job id (also the name to give snapshots, so the sweep can find them).
    pub job_id: String,
    /// This agent as a selector candidate (modes, key provider, datastores...);
    /// `free_slots` is the number of slots reserved for this job.
    pub proxy: ProxyInfo,
    /// Transport policy of this job.
    pub policy: Policy,
    /// The tenant's configuration (repository, key source) from the agent config.
    pub tenant: TenantSection,
    /// Counters the agent reports (`total`/`done` drive bytes, rate and ETA); its
    /// `cancel` flag is the cancel signal: check [`Progress::cancelled`] often and
    /// return [`RunError::Cancelled`] after cleaning up.
    pub progress: Arc<Progress>,
    /// The agent's tokio runtime, for async clients (`runtime.block_on(...)`).
    pub runtime: tokio::runtime::Handle,
}

impl JobContext {
    /// Whether cancellation was requested (by the API or an agent shutdown).
    pub fn is_cancelled(&self) -> bool {
        self.progress.cancelled()
    }
}

/// A backup of one VM through this proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupSpec {
    /// Tenant (the repository and key source come from its config).
    pub tenant: String,
    /// The VM as the orchestrator saw it. The runner must re-read the VM's
    /// configuration from vCenter at job start and re-run
    /// [`crate::transport::select::select`] with [`JobContext::proxy`]: the VM may
    /// have changed since.
    pub vm: VmInfo,
    /// vCenter folder of the VM, if known (informational).
    pub folder: Option<String>,
    /// Transport policy of this job (also in [`JobContext::policy`]).
    pub policy: Policy,
    /// The agent's admission decision: per disk, this proxy's mode and why.
    pub selection: Selection,
    /// Retention to apply to this VM's chain after a successful backup.
    pub retention: Option<crate::repo::retention::Policy>,
    /// Force a full backup (ignore changed-block tracking).
    pub full: bool,
    /// The orchestrator's placement per disk, if it sent one.
    #[serde(default)]
    pub placement: Vec<super::api::DiskPlacement>,
    /// Quiesce policy of the VM's snapshot (jobs stored before it existed: off).
    #[serde(default)]
    pub quiesce: crate::job::quiesce::QuiescePolicy,
}

impl BackupSpec {
    /// The orchestrator's (mode, reason) per disk key.
    pub fn placed(
        &self,
    ) -> std::collections::BTreeMap<i32, (crate::transport::select::Mode, String)> {
        self.placement
            .iter()
            .map(|p| (p.disk_key, (p.mode, p.reason.clone())))
            .collect()
    }
}

/// Where a restore writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RestoreTarget {
    /// One raw image per disk in this directory on the agent host.
    Directory {
        /// Directory (created if missing).
        path: PathBuf,
    },
    /// Into new disks of an existing VM (one per restored disk, created and
    /// written through the transport the selector allows; removed again if the
    /// restore fails).
    Vm {
        /// VM managed object reference.
        moref: String,
        /// Datastore for the new disks (absent in records of older agents:
        /// the VM's first disk's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        datastore: Option<String>,
        /// Storage policy (SPBM profile id) for the new disks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        storage_policy: Option<String>,
        /// Over the VM's own disks (powered-off VM only) instead of new disks.
        #[serde(default)]
        overwrite: bool,
    },
    /// Single files and directories of one disk, copied into this directory on
    /// the agent host (file-level restore).
    Files {
        /// Directory (created if missing).
        path: PathBuf,
        /// Disk number.
        disk: u32,
        /// Partition (`None`: the only readable one).
        partition: Option<u32>,
        /// Paths inside the volume.
        paths: Vec<String>,
    },
}

/// A look at the files of a restore point's disk ([`JobRunner::browse_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesQuery {
    /// Restore point id, or `latest:<vm name>`.
    pub point: String,
    /// Disk number.
    pub disk: u32,
    /// Partition (`None`: the only readable one).
    pub partition: Option<u32>,
    /// Directory to list, or to search under.
    pub path: String,
    /// Name pattern: search instead of list.
    pub pattern: Option<String>,
    /// Most entries returned.
    pub limit: usize,
}

/// What [`JobRunner::browse_files`] found.
#[derive(Debug, Clone)]
pub struct FilesAnswer {
    /// The point read (resolved id).
    pub point_id: String,
    /// The volume read.
    pub volume: crate::files::VolumeInfo,
    /// Every volume of the disk.
    pub volumes: Vec<crate::files::VolumeInfo>,
    /// Entries listed or found.
    pub entries: Vec<crate::files::Entry>,
    /// More matched than `limit`.
    pub truncated: bool,
    /// Directories that could not be read during a search.
    pub errors: Vec<String>,
    /// Chunks fetched and decoded to answer.
    pub chunks_read: u64,
}

/// A restore through this proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// Tenant.
    pub tenant: String,
    /// Restore point id, or `latest:<vm name>`.
    pub point: String,
    /// Disk numbers to restore (all when `None`).
    pub disks: Option<Vec<u32>>,
    /// Where to.
    pub target: RestoreTarget,
}

/// A verification of a tenant's repository, or of one restore point in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySpec {
    /// Tenant (the repository and key source come from its config).
    pub tenant: String,
    /// Restore point id, or `latest:<vm name>`; `None`: every point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    /// Read and authenticate every chunk the points reference (`false`:
    /// manifests and indexes only).
    #[serde(default = "yes")]
    pub read_data: bool,
}

fn yes() -> bool {
    true
}

/// The work of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    /// Back up a VM.
    Backup(Box<BackupSpec>),
    /// Restore a point.
    Restore(RestoreSpec),
    /// Verify a repository or a point.
    Verify(VerifySpec),
}

/// How one disk went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskResult {
    /// vSphere device key (backups) or disk number (restores).
    pub disk_key: i32,
    /// Device label.
    pub label: String,
    /// Proxy that moved it (this agent's id).
    pub proxy: String,
    /// Transport used; `None` when no transport was involved (restore to a file).
    pub mode: Option<Mode>,
    /// Why this transport (the selector's reason, or the runner's note).
    pub reason: String,
    /// Bytes processed for this disk.
    pub bytes: u64,
    /// Seconds spent on this disk.
    pub seconds: f64,
    /// Error for this disk, if it failed.
    pub error: Option<String>,
    /// Backups: how the disk was read, `cbt` (only the areas changed since the
    /// previous point) or `full`; `None` for restores.
    #[serde(default)]
    pub read: Option<String>,
    /// Backups: why that read mode (the previous point used, or why a full read).
    #[serde(default)]
    pub read_reason: Option<String>,
}

impl DiskResult {
    /// Bytes per second (0 when no time was measured).
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// What a successful job produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunOutput {
    /// Per-disk results, in disk order.
    pub disks: Vec<DiskResult>,
    /// Restore point created (backup) or read (restore).
    pub point_id: Option<String>,
    /// Anything the operator should know (retention applied, CBT reset...).
    pub notes: Vec<String>,
}

/// Why a job failed. Each variant has a stable [`RunError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// Stopped on request; cleanup has run.
    #[error("cancelled")]
    Cancelled,
    /// The selector refused the VM (re-checked at job start), before any snapshot.
    #[error("{0}")]
    Refused(String),
    /// The VM, restore point or disk does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The tenant KMS or key is unusable.
    #[error("{0}")]
    Key(String),
    /// vCenter or ESXi refused or failed an operation.
    #[error("{0}")]
    Vsphere(String),
    /// Reading or writing a disk through the transport failed.
    #[error("{0}")]
    Transport(String),
    /// The repository is locked, damaged or full.
    #[error("{0}")]
    Repository(String),
    /// This agent has no job runner for the request.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

impl RunError {
    /// Stable code reported in job records and the API.
    pub fn code(&self) -> &'static str {
        match self {
            RunError::Cancelled => "cancelled",
            RunError::Refused(_) => "vm_refused",
            RunError::NotFound(_) => "not_found",
            RunError::Key(_) => "key_error",
            RunError::Vsphere(_) => "vsphere_error",
            RunError::Transport(_) => "transport_error",
            RunError::Repository(_) => "repository_error",
            RunError::Unavailable(_) => "runner_unavailable",
            RunError::Failed(_) => "job_failed",
        }
    }
}

/// A job a previous agent process left running (now recorded as failed).
#[derive(Debug, Clone, PartialEq)]
pub struct InterruptedJob {
    /// Agent job id (snapshots the runner made carry it).
    pub id: String,
    /// The job's work, if its stored spec could be read.
    pub spec: Option<JobSpec>,
    /// Unix ms when it started, if it had.
    pub started_at: Option<i64>,
}

/// What the orphan sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Per interrupted job id: what was cleaned (snapshot removed, disk detached...).
    pub jobs: Vec<(String, String)>,
    /// Other leftovers found and removed (e.g. ferry snapshots of unknown jobs).
    pub other: Vec<String>,
}

/// Current key of one tenant, as the key source reports it. Ids and versions
/// only; never key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// Tenant.
    pub tenant: String,
    /// KMS address (`host:port`), or `pem` for PEM key files.
    pub kms: String,
    /// Key name on the KMS.
    pub key_name: String,
    /// KMS object id of the current (newest) key, or the PEM key fingerprint.
    pub key_id: String,
    /// Its version.
    pub version: u64,
}

/// Result of syncing one tenant's key.
pub type KeySyncOutcome = Result<KeyStatus, RunError>;

/// The work behind the agent. Implementations must be cheap to share
/// (`Arc<dyn JobRunner>`); every method may be called from several threads at once
/// (up to the agent's slots for [`JobRunner::run`]).
pub trait JobRunner: Send + Sync + 'static {
    /// Run one job to the end, cleanup included, even on error or cancellation.
    /// Update `ctx.progress` (`total` first, then `done`) as bytes move.
    fn run(&self, ctx: &JobContext, spec: &JobSpec) -> Result<RunOutput, RunError>;

    /// Called once at agent start, before the API serves, with the jobs a dead
    /// process left running: remove their snapshots, detach hot-added disks, delete
    /// temporary files. May also remove leftovers not in the list (ferry snapshots
    /// on VMs, disks attached to this proxy). Errors are logged and recorded on
    /// the jobs; the agent starts anyway.
    fn sweep_orphans(&self, interrupted: &[InterruptedJob]) -> Result<SweepReport, RunError>;

    /// The key sync system job for these tenants: for each, ask its key source for
    /// the current key id and version (the KMS may have rotated it) and make new
    /// restore points use it. One outcome per tenant, in order.
    fn sync_keys(&self, tenants: &[TenantSection]) -> Vec<KeySyncOutcome>;

    /// What vCenter says about this proxy (its VM's host, the datastores that host
    /// sees, the key provider the proxy VM is encrypted under), read once at agent
    /// start so `/v1/info` and admission use vCenter's identifiers and current
    /// encryption rather than a possibly stale config. `Ok(None)`: nothing to
    /// discover (no vCenter, physical proxy); the config's values stand.
    fn discover_proxy(&self) -> Result<Option<ProxyFacts>, RunError> {
        Ok(None)
    }

    /// List a directory of, or search, a restore point's disk, reading only the
    /// chunks needed. Synchronous and read-only: no job record, no slot.
    fn browse_files(
        &self,
        _tenant: &TenantSection,
        _query: &FilesQuery,
    ) -> Result<FilesAnswer, RunError> {
        Err(RunError::Unavailable(
            "this agent's runner does not read files from restore points".into(),
        ))
    }

    /// What the tenant's repository holds now (points, chunks, bytes, space
    /// left). Read-only; lists the repository.
    fn repository_usage(
        &self,
        tenant: &TenantSection,
    ) -> Result<crate::repo::usage::Usage, RunError> {
        let repo = crate::repo::Repository::open(&tenant.repository)
            .map_err(|e| RunError::Repository(e.to_string()))?;
        crate::repo::usage::usage(&repo, &tenant.repository)
            .map_err(|e| RunError::Repository(e.to_string()))
    }

    /// The disaster-recovery key check of the tenant's repository with the
    /// tenant's key source as it is reachable now ([`crate::repo::keycheck`]):
    /// which points open, and which keys to obtain for the others. Read-only: a
    /// missing KMS key is reported, never created.
    fn check_keys(
        &self,
        tenant: &TenantSection,
    ) -> Result<crate::repo::keycheck::KeyCheckReport, RunError> {
        let mut t = tenant.clone();
        if let Some(k) = t.kms.as_mut() {
            k.create_key = false;
        }
        let keys = crate::keys::tenant::open_key_source(&t).map_err(|e| {
            RunError::Key(format!(
                "tenant {} ({}): {e}",
                t.name,
                crate::keys::tenant::describe(&t)
            ))
        })?;
        let repo = crate::repo::Repository::open(&t.repository)
            .map_err(|e| RunError::Repository(e.to_string()))?;
        crate::repo::keycheck::check(&repo, &*keys).map_err(|e| RunError::Repository(e.to_string()))
    }
}

/// This proxy as vCenter sees it ([`JobRunner::discover_proxy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyFacts {
    /// The proxy VM's host (moref value).
    pub host: Option<String>,
    /// Datastores that host sees (moref values, as disks name them).
    pub datastores: Vec<String>,
    /// Key provider of the proxy VM; `None` when it is not encrypted.
    pub key_provider: Option<String>,
}

/// The runner of an agent built without a job implementation: every job fails
/// with `runner_unavailable`, the sweep has nothing to do. It exists so that the
/// agent API can be deployed and probed before the VM backup job is wired in;
/// it never pretends to back anything up.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRunner;

const NO_RUNNER: &str =
    "this ferry build has no VM backup/restore job wired into the agent yet (agent::NoRunner)";

impl JobRunner for NoRunner {
    fn run(&self, _ctx: &JobContext, _spec: &JobSpec) -> Result<RunOutput, RunError> {
        Err(RunError::Unavailable(NO_RUNNER.into()))
    }
    fn sweep_orphans(&self, interrupted: &[InterruptedJob]) -> Result<SweepReport, RunError> {
        Ok(SweepReport {
            jobs: interrupted
                .iter()
                .map(|j| (j.id.clone(), "no job runner: nothing to clean".to_string()))
                .collect(),
            other: vec![],
        })
    }
    fn sync_keys(&self, tenants: &[TenantSection]) -> Vec<KeySyncOutcome> {
        tenants
            .iter()
            .map(|_| Err(RunError::Unavailable(NO_RUNNER.into())))
            .collect()
    }
}
