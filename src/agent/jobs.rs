//! Job manager of one agent: slot accounting, job records, running jobs on the
//! [`JobRunner`] (one blocking thread each), progress flushing, cancellation,
//! draining at shutdown, and turning records into API views.
//!
//! Must not: parse HTTP, check tokens, or do the work of a job (the runner does).

use super::api::{DiskView, Job, JobError};
use super::error::{ApiError, ErrorCode};
use super::runner::{DiskResult, JobContext, JobRunner, JobSpec, RunError, RunOutput};
use super::Settings;
use crate::progress::Progress;
use crate::state::{
    rfc3339_ms, ErrorInfo, Finish, JobKind, JobRecord, JobState, NewJob, StateStore,
};
use crate::transport::select::{DiskDecision, Outcome, ProxyInfo, Selection};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often running jobs' progress is written to the state database.
const PROGRESS_FLUSH: Duration = Duration::from_secs(2);
/// `Retry-After` when slots are full.
const RETRY_AFTER_SECS: u32 = 30;

/// Run a blocking state-store call off the async workers.
pub(crate) async fn db<T, F>(store: &Arc<StateStore>, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&StateStore) -> Result<T, crate::state::StateError> + Send + 'static,
{
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| ApiError::internal(format!("state task failed: {e}")))?
        .map_err(ApiError::from)
}

struct Live {
    kind: JobKind,
    progress: Arc<Progress>,
    slots: u32,
    running: bool,
    cancel_reason: Option<&'static str>,
    /// The job's outcome is decided and being recorded: a cancel now is too
    /// late (409), and its slots are already free.
    finishing: bool,
}

#[derive(Default)]
struct Inner {
    used: u32,
    live: HashMap<String, Live>,
}

/// A job to admit.
pub(crate) struct Admission {
    pub kind: JobKind,
    pub tenant: String,
    pub subject: String,
    pub spec: JobSpec,
    pub plan: Vec<DiskView>,
    pub slots: u32,
}

/// The job manager (shared by the HTTP handlers).
pub(crate) struct Jobs {
    store: Arc<StateStore>,
    runner: Arc<dyn JobRunner>,
    settings: Arc<Settings>,
    runtime: tokio::runtime::Handle,
    inner: Mutex<Inner>,
    draining: AtomicBool,
    changed: tokio::sync::Notify,
}

/// A short unique job id: UTC time then random hex, so ids sort by creation.
fn new_job_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    let f = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let mut r = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut r);
    format!(
        "job-{}-{}",
        now.format(&f).unwrap_or_else(|_| "00000000T000000Z".into()),
        hex::encode(r)
    )
}

/// The per-disk reason an operator wants: why this mode, and why not the
/// modes ranked before it.
pub(crate) fn disk_reason(d: &DiskDecision) -> String {
    let chosen = d.candidates.iter().find(|c| c.accepted);
    let Some(chosen) = chosen else {
        return match &d.outcome {
            Outcome::Refused { reason } => format!("refused: {reason}"),
            Outcome::Assigned { .. } => String::new(),
        };
    };
    let mut s = format!("{} via {}: {}", chosen.mode, chosen.proxy, chosen.reason);
    for c in d.candidates.iter().take_while(|c| c.mode != chosen.mode) {
        s.push_str(&format!("; {} not possible: {}", c.mode, c.reason));
    }
    s
}

/// Disk views of an admission selection, with the orchestrator's reasons
/// where it placed a disk in the same mode.
pub(crate) fn plan_of(
    sel: &Selection,
    placed: &std::collections::BTreeMap<i32, (crate::transport::select::Mode, String)>,
) -> Vec<DiskView> {
    sel.disks
        .iter()
        .map(|d| {
            let (proxy, mode) = match &d.outcome {
                Outcome::Assigned { proxy, mode } => (proxy.clone(), Some(*mode)),
                Outcome::Refused { .. } => (String::new(), None),
            };
            DiskView {
                disk_key: d.disk_key,
                label: d.label.clone(),
                proxy,
                mode,
                reason: d.placed_or(
                    placed.get(&d.disk_key).map(|(m, r)| (*m, r.as_str())),
                    disk_reason(d),
                ),
                bytes: 0,
                rate_bytes_per_sec: 0.0,
                error: None,
                read: None,
                read_reason: None,
            }
        })
        .collect()
}

fn finite(x: f64) -> f64 {
    if x.is_finite() && x >= 0.0 {
        x
    } else {
        0.0
    }
}

fn disk_view(d: &DiskResult) -> DiskView {
    DiskView {
        disk_key: d.disk_key,
        label: d.label.clone(),
        proxy: d.proxy.clone(),
        mode: d.mode,
        reason: d.reason.clone(),
        bytes: d.bytes,
        rate_bytes_per_sec: finite(d.rate()),
        error: d.error.clone(),
        read: d.read.clone(),
        read_reason: d.read_reason.clone(),
    }
}

impl Jobs {
    pub(crate) fn new(
        store: Arc<StateStore>,
        runner: Arc<dyn JobRunner>,
        settings: Arc<Settings>,
        runtime: tokio::runtime::Handle,
    ) -> Jobs {
        Jobs {
            store,
            runner,
            settings,
            runtime,
            inner: Mutex::new(Inner::default()),
            draining: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (total, used) slots.
    pub(crate) fn slots(&self) -> (u32, u32) {
        (self.settings.slots, self.lock().used)
    }

    /// Number of jobs the runner is working on.
    pub(crate) fn running(&self) -> usize {
        self.lock().live.values().filter(|l| l.running).count()
    }

    /// Bytes done so far by live jobs of `kind` (for the bytes-moved metric).
    pub(crate) fn live_bytes(&self, kind: JobKind) -> u64 {
        self.lock()
            .live
            .values()
            .filter(|l| l.kind == kind)
            .map(|l| l.progress.snapshot().done)
            .sum()
    }

    /// Whether the agent is draining for shutdown.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// This agent as a selector candidate with `free_slots` slots.
    pub(crate) fn proxy_info(&self, free_slots: u32) -> ProxyInfo {
        let s = &self.settings;
        ProxyInfo {
            id: s.id.clone(),
            is_vm: s.is_vm,
            host: s.host.clone(),
            reachable_hosts: match &s.reachable_hosts {
                None => crate::transport::select::HostReach::Any,
                Some(h) => crate::transport::select::HostReach::Hosts(h.clone()),
            },
            datastores: s.datastores.clone(),
            key_provider: s.key_provider.clone(),
            modes: s.modes.clone(),
            free_slots,
        }
    }

    /// Reserve slots, record the job and start it. Errors: 503 while draining,
    /// 422 when the job can never fit, 429 when slots are busy.
    pub(crate) async fn submit(self: &Arc<Self>, a: Admission) -> Result<JobRecord, ApiError> {
        if self.draining() {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the agent is shutting down; send the job to another agent",
            )
            .retry_after(RETRY_AFTER_SECS));
        }
        let total = self.settings.slots;
        if a.slots > total {
            return Err(ApiError::new(
                ErrorCode::ExceedsSlots,
                format!(
                    "the job needs {} slots (one per disk) and agent {} has {total} in total; raise [agent] slots or use another agent",
                    a.slots, self.settings.id
                ),
            ));
        }
        let id = new_job_id();
        let progress = Arc::new(Progress::default());
        {
            let mut g = self.lock();
            if g.used + a.slots > total {
                let free = total - g.used;
                return Err(ApiError::new(
                    ErrorCode::NoFreeSlots,
                    format!(
                        "agent {} has {free} of {total} slots free and the job needs {}; retry later or use another agent",
                        self.settings.id, a.slots
                    ),
                )
                .retry_after(RETRY_AFTER_SECS));
            }
            g.used += a.slots;
            g.live.insert(
                id.clone(),
                Live {
                    kind: a.kind,
                    progress: progress.clone(),
                    slots: a.slots,
                    running: false,
                    cancel_reason: None,
                    finishing: false,
                },
            );
        }
        let new = NewJob {
            id: id.clone(),
            kind: a.kind,
            spec: serde_json::to_value(&a.spec).map_err(ApiError::internal)?,
            tenant: a.tenant.clone(),
            subject: a.subject.clone(),
            disks: serde_json::to_value(&a.plan).map_err(ApiError::internal)?,
            bytes_total: 0,
        };
        let rec = match db(&self.store, move |s| s.insert_job(&new)).await {
            Ok(r) => r,
            Err(e) => {
                self.release(&id);
                return Err(e);
            }
        };
        tracing::info!(job = %id, kind = %a.kind, tenant = %a.tenant, subject = %a.subject, slots = a.slots, "job accepted");
        let me = self.clone();
        let spec = a.spec;
        let plan = a.plan;
        let slots = a.slots;
        self.runtime.spawn(async move {
            me.drive(id, spec, plan, slots, progress).await;
        });
        Ok(rec)
    }

    /// The outcome is decided: from now on a cancel answers 409, and the
    /// job's slots are free (before its record is written, so that a client
    /// that sees the job finished also sees its slots free). Returns the
    /// cancellation asked before this point, if any.
    fn finishing(&self, id: &str) -> Option<&'static str> {
        let mut g = self.lock();
        let l = g.live.get_mut(id)?;
        l.finishing = true;
        let (slots, reason) = (std::mem::take(&mut l.slots), l.cancel_reason);
        g.used = g.used.saturating_sub(slots);
        drop(g);
        self.changed.notify_waiters();
        reason
    }

    fn release(&self, id: &str) {
        let mut g = self.lock();
        if let Some(l) = g.live.remove(id) {
            g.used = g.used.saturating_sub(l.slots);
        }
        drop(g);
        self.changed.notify_waiters();
    }

    fn cancel_reason(&self, id: &str) -> Option<&'static str> {
        self.lock().live.get(id).and_then(|l| l.cancel_reason)
    }

    async fn drive(
        self: Arc<Self>,
        id: String,
        spec: JobSpec,
        plan: Vec<DiskView>,
        slots: u32,
        progress: Arc<Progress>,
    ) {
        let tenant_name = match &spec {
            JobSpec::Backup(b) => b.tenant.clone(),
            JobSpec::Restore(r) => r.tenant.clone(),
            JobSpec::Verify(v) => v.tenant.clone(),
        };
        let result: Result<RunOutput, RunError> = if self.cancel_reason(&id).is_some() {
            Err(RunError::Cancelled)
        } else {
            let jid = id.clone();
            match db(&self.store, move |s| s.mark_running(&jid)).await {
                Err(e) => Err(RunError::Failed(format!("cannot record job start: {e}"))),
                Ok(_) => {
                    if let Some(l) = self.lock().live.get_mut(&id) {
                        l.running = true;
                    }
                    self.execute(&id, &tenant_name, spec, slots, progress.clone())
                        .await
                }
            }
        };
        let snap = progress.snapshot();
        let cancel_reason = self.finishing(&id);
        let (state, error, disks, point_id, notes) = match result {
            Ok(out) => {
                let disks: Vec<DiskView> = if out.disks.is_empty() {
                    plan
                } else {
                    out.disks.iter().map(disk_view).collect()
                };
                (JobState::Succeeded, None, disks, out.point_id, out.notes)
            }
            Err(e) => {
                let cancelled = matches!(e, RunError::Cancelled) || cancel_reason.is_some();
                let (state, code, message) = if cancelled {
                    let why = cancel_reason.unwrap_or("cancelled by the runner");
                    let msg = if matches!(e, RunError::Cancelled) {
                        format!("cancelled: {why}")
                    } else {
                        format!("cancelled: {why} (runner: {e})")
                    };
                    (JobState::Cancelled, "cancelled".to_string(), msg)
                } else {
                    (JobState::Failed, e.code().to_string(), e.to_string())
                };
                (
                    state,
                    Some(ErrorInfo { code, message }),
                    plan,
                    None,
                    Vec::new(),
                )
            }
        };
        let fin = Finish {
            state,
            bytes_done: snap.done,
            bytes_total: snap.total.max(snap.done),
            disks: serde_json::to_value(&disks).unwrap_or_else(|_| serde_json::json!([])),
            notes: serde_json::to_value(&notes).unwrap_or_else(|_| serde_json::json!([])),
            error,
            point_id,
        };
        let jid = id.clone();
        match db(&self.store, move |s| s.finish_job(&jid, &fin)).await {
            Ok(r) => match &r.error {
                // One line per job outcome, with everything an operator greps for.
                None => tracing::info!(
                    agent = %self.settings.id, job = %id, kind = %r.kind, tenant = %r.tenant,
                    subject = %r.subject, state = %r.state, bytes = r.bytes_done, "job finished"
                ),
                Some(e) => tracing::warn!(
                    agent = %self.settings.id, job = %id, kind = %r.kind, tenant = %r.tenant,
                    subject = %r.subject, state = %r.state, code = %e.code, error = %e.message,
                    "job finished"
                ),
            },
            Err(e) => {
                tracing::error!(job = %id, error = %e, "cannot record the end of the job; it stays 'running' until the next agent start marks it interrupted")
            }
        }
        self.release(&id);
    }

    async fn execute(
        &self,
        id: &str,
        tenant_name: &str,
        spec: JobSpec,
        slots: u32,
        progress: Arc<Progress>,
    ) -> Result<RunOutput, RunError> {
        let tenant = self
            .settings
            .tenants
            .iter()
            .find(|t| t.name == tenant_name)
            .cloned()
            .ok_or_else(|| RunError::Failed(format!("tenant {tenant_name} vanished")))?;
        let policy = match &spec {
            JobSpec::Backup(b) => b.policy.clone(),
            JobSpec::Restore(_) | JobSpec::Verify(_) => self.settings.policy.clone(),
        };
        let ctx = JobContext {
            job_id: id.to_string(),
            proxy: self.proxy_info(slots),
            policy,
            tenant,
            progress: progress.clone(),
            runtime: self.runtime.clone(),
        };
        let runner = self.runner.clone();
        let mut task = tokio::task::spawn_blocking(move || runner.run(&ctx, &spec));
        let mut tick = tokio::time::interval(PROGRESS_FLUSH);
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut task => {
                    return match r {
                        Ok(r) => r,
                        Err(e) => Err(RunError::Failed(format!("the job runner crashed: {e}"))),
                    };
                }
                _ = tick.tick() => {
                    let snap = progress.snapshot();
                    let jid = id.to_string();
                    if let Err(e) = db(&self.store, move |s| s.update_progress(&jid, snap.done, snap.total)).await {
                        tracing::warn!(job = %id, error = %e, "cannot record progress");
                    }
                }
            }
        }
    }

    /// Request cancellation. Errors: 404 unknown job, 409 finished job.
    pub(crate) async fn cancel(&self, id: &str, reason: &'static str) -> Result<(), ApiError> {
        {
            let mut g = self.lock();
            if let Some(l) = g.live.get_mut(id).filter(|l| !l.finishing) {
                if l.cancel_reason.is_none() {
                    l.cancel_reason = Some(reason);
                }
                l.progress.request_cancel();
                tracing::info!(job = %id, reason, "cancellation requested");
                return Ok(());
            }
        }
        let jid = id.to_string();
        match db(&self.store, move |s| s.get_job(&jid)).await? {
            None => Err(ApiError::new(
                ErrorCode::JobNotFound,
                format!("no job {id} on agent {}", self.settings.id),
            )),
            Some(j) if j.state.is_terminal() => Err(ApiError::new(
                ErrorCode::JobFinished,
                format!("job {id} has already finished ({})", j.state),
            )),
            // Running in the database but not live here: only between the end of
            // a job and the removal of its live entry; it is finishing.
            Some(j) => Err(ApiError::new(
                ErrorCode::JobFinished,
                format!("job {id} is finishing ({})", j.state),
            )),
        }
    }

    /// Stop taking work and cancel every job.
    pub(crate) fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let mut g = self.lock();
        for (id, l) in g.live.iter_mut() {
            if l.cancel_reason.is_none() {
                l.cancel_reason = Some("agent shutting down");
            }
            l.progress.request_cancel();
            tracing::info!(job = %id, "cancelling for shutdown");
        }
    }

    /// Wait until no job is live, at most `grace`. Returns the ids still live.
    pub(crate) async fn wait_idle(&self, grace: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let left: Vec<String> = self.lock().live.keys().cloned().collect();
            if left.is_empty() {
                return left;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.lock().live.keys().cloned().collect();
            }
        }
    }

    /// The API view of a record, with live progress when the job is running here.
    pub(crate) fn view(&self, r: &JobRecord) -> Job {
        let live = {
            let g = self.lock();
            g.live
                .get(&r.id)
                .map(|l| (l.progress.snapshot(), l.cancel_reason.is_some()))
        };
        let disks: Vec<DiskView> = serde_json::from_value(r.disks.clone()).unwrap_or_default();
        let notes: Vec<String> = serde_json::from_value(r.notes.clone()).unwrap_or_default();
        let (done, total, rate, eta, cancel_requested) = match (live, r.state.is_terminal()) {
            (Some((snap, c)), false) => {
                let rate = if r.state == JobState::Running {
                    finite(snap.rate)
                } else {
                    0.0
                };
                let eta = if r.state == JobState::Running && snap.total > 0 && rate > 0.0 {
                    snap.eta_secs.map(finite)
                } else {
                    None
                };
                (snap.done, snap.total.max(snap.done), rate, eta, c)
            }
            _ => {
                let secs = match (r.started_at, r.finished_at) {
                    (Some(s), Some(f)) if f > s => (f - s) as f64 / 1000.0,
                    _ => 0.0,
                };
                let rate = if secs > 0.0 {
                    r.bytes_done as f64 / secs
                } else {
                    0.0
                };
                (r.bytes_done, r.bytes_total, finite(rate), None, false)
            }
        };
        Job {
            id: r.id.clone(),
            kind: r.kind,
            state: r.state,
            tenant: r.tenant.clone(),
            subject: r.subject.clone(),
            created_at: rfc3339_ms(r.created_at),
            started_at: r.started_at.map(rfc3339_ms),
            finished_at: r.finished_at.map(rfc3339_ms),
            bytes_done: done,
            bytes_total: total,
            rate_bytes_per_sec: rate,
            eta_secs: eta,
            cancel_requested,
            disks,
            error: r.error.as_ref().map(|e| JobError {
                code: e.code.clone(),
                message: e.message.clone(),
            }),
            cleanup: r.cleanup.clone(),
            point_id: r.point_id.clone(),
            notes,
        }
    }
}
