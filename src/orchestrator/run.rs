//! Running the plan: dispatch VMs to agents (respecting their slots), retry on
//! another valid agent when one is down or refuses, poll the agents' jobs,
//! record the history in SQLite, run the key sync system job, and schedule it
//! all.
//!
//! Must not: hold tenant key material (agents do the key work; the orchestrator
//! only records key ids and versions), decide transports (the planner and the
//! agents' own selector do).

use super::client::{AgentApi, ClientError, ClientSetupError, HttpAgent};
use super::config::{JobConfig, OrchestratorConfig, Schedule};
use super::inventory::{Inventory, InventoryVm};

/// Inventories read for one plan, by vCenter name: the VMs, or why they could
/// not be read.
pub type Inventories = BTreeMap<String, Result<Vec<InventoryVm>, String>>;
use super::dispatch::{DispatchStats, Dispatcher, Footprint};
use super::plan::{
    candidates, plan_job, plan_vm, reported_load, reported_slots, AgentStatus, Decision, JobPlan,
    PlanReport,
};
use super::schedule::{is_due, select_vms};
use super::scheduler::{Allowance, Grant, Ledger, LesserMode, WaitState};
use crate::agent::api::{BackupRequest, PolicySpec, VmSpec};
use crate::state::{
    now_ms, rfc3339_ms, ItemState, JobState, KeyObservation, Recovered, RunItem, RunKind, RunState,
    StateError, StateStore,
};
use crate::transport::select::{Outcome, Refusal};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// Name under which key sync runs are recorded.
pub const KEY_SYNC_JOB: &str = "key-sync";
/// File name of the orchestrator's database inside `state_dir`.
pub const STATE_FILE: &str = "orchestrator.sqlite";
/// File name of the lock a running orchestrator holds inside `state_dir`.
pub const LOCK_FILE: &str = "orchestrator.lock";

/// Orchestrator errors.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// An agent client cannot be built.
    #[error(transparent)]
    Setup(#[from] ClientSetupError),
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The request does not match the configuration.
    #[error("{0}")]
    Config(String),
    /// A background task failed.
    #[error("orchestrator task: {0}")]
    Task(String),
}

/// One item of a run, for output.
#[derive(Debug, Clone, Serialize)]
pub struct ItemSummary {
    /// VM moref, or agent id for key sync.
    pub item: String,
    /// Agent.
    pub agent: Option<String>,
    /// Job id on the agent.
    pub agent_job_id: Option<String>,
    /// State.
    pub state: ItemState,
    /// Dispatch attempts.
    pub attempts: u32,
    /// Bytes moved.
    pub bytes: u64,
    /// Error.
    pub error: Option<String>,
    /// Plan and results (VM name, folder, per-disk proxy, mode, reason...).
    pub detail: serde_json::Value,
}

/// A run, for output.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Run id.
    pub run_id: String,
    /// Job name (or `key-sync`).
    pub job: String,
    /// Kind.
    pub kind: RunKind,
    /// State.
    pub state: RunState,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub finished_at: Option<String>,
    /// Run-level error.
    pub error: Option<String>,
    /// Items.
    pub items: Vec<ItemSummary>,
}

impl RunSummary {
    /// Plain text: one line per item.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{} run {} ({}): {}",
            self.kind, self.run_id, self.job, self.state
        );
        if let Some(e) = &self.error {
            s.push_str(&format!(" - {e}"));
        }
        s.push('\n');
        for i in &self.items {
            let name = i.detail["vm"].as_str().unwrap_or(&i.item);
            let modes: Vec<String> = i.detail["result"]
                .as_array()
                .or_else(|| i.detail["plan"].as_array())
                .map(|d| {
                    d.iter()
                        .map(|x| format!("{}:{}", x["disk_key"], x["mode"].as_str().unwrap_or("-")))
                        .collect()
                })
                .unwrap_or_default();
            // "crash-consistent (policy prefer: ...)" -> "crash-consistent".
            let snapshot = i.detail["snapshot"]
                .as_str()
                .and_then(|n| n.split_whitespace().next())
                .map(|c| format!(" {c}"))
                .unwrap_or_default();
            s.push_str(&format!(
                "  {name:<20} {:<10} {:<14} {:<9} {:>12} B  {}{}\n",
                i.state.as_str(),
                i.agent.as_deref().unwrap_or("-"),
                if modes.is_empty() {
                    "-".to_string()
                } else {
                    modes.join(",")
                } + &snapshot,
                i.bytes,
                i.attempts,
                i.error
                    .as_deref()
                    .map(|e| format!(" attempt(s); {}", e.lines().next().unwrap_or("")))
                    .unwrap_or_else(|| " attempt(s)".into())
            ));
        }
        s
    }
}

/// The orchestrator.
pub struct Orchestrator {
    cfg: Arc<OrchestratorConfig>,
    inventory: Arc<dyn Inventory>,
    agents: BTreeMap<String, Arc<dyn AgentApi>>,
    store: Arc<StateStore>,
    active: Mutex<BTreeSet<String>>,
    /// Slots this orchestrator's dispatches hold, across concurrent runs.
    ledger: Mutex<Ledger>,
    /// The dispatch queue of every run: per tenant, round-robin, snapshot caps,
    /// agents in back-off.
    dispatcher: Mutex<Dispatcher>,
    /// Runs whose VMs are in the dispatch queue or running, by run id.
    runs: Mutex<BTreeMap<String, Arc<RunCtx>>>,
    /// Held while a dispatch round runs (one at a time, whichever run calls it).
    round: tokio::sync::Mutex<RoundClock>,
    /// Bumped whenever something that may let a waiting VM go happens (a VM
    /// queued, a job ended): a round with nothing new to look at is skipped.
    changes: std::sync::atomic::AtomicU64,
    _lock: Option<crate::state::StateLock>,
}

/// When the last dispatch round ran, and what it had seen.
#[derive(Default)]
struct RoundClock {
    last: Option<tokio::time::Instant>,
    changes: u64,
}

/// A run whose VMs are being dispatched and polled: what a dispatch round
/// needs to place its VMs.
struct RunCtx {
    run_id: String,
    job: JobConfig,
    tenant: super::config::TenantConfig,
    /// End of the job's backup window (ms since the epoch).
    window_end: u64,
    items: tokio::sync::Mutex<Vec<Item>>,
}

/// A run's place in the orchestrator's dispatch. Dropped when the run ends,
/// or when its task is aborted (the scheduler stopping), it takes the run's
/// VMs out of the queue and off the snapshot caps, so that no round ever
/// dispatches a VM of a run that is over.
struct RunRegistration<'a> {
    orch: &'a Orchestrator,
    run_id: String,
    keys: Vec<String>,
}

impl Drop for RunRegistration<'_> {
    fn drop(&mut self) {
        self.orch.lock_runs().remove(&self.run_id);
        let mut d = self.orch.lock_dispatcher();
        for k in &self.keys {
            d.dequeue(k);
            d.finish(k);
        }
        drop(d);
        self.orch.changed();
    }
}

/// What became of a VM offered in a dispatch round.
enum Placed {
    /// Sent to an agent, which accepted it.
    Dispatched,
    /// It waits in the queue.
    Waits,
    /// It left the queue (refused, failed).
    Gone,
}

/// The ledger's key of a run's VM.
fn ledger_key(run_id: &str, it: &Item) -> String {
    format!("{run_id}/{}", it.inv.vm.moref)
}

/// The agent a deferred plan waits for.
fn waited_for(plan: &super::plan::VmPlan) -> Option<String> {
    plan.selection
        .as_ref()?
        .disks
        .iter()
        .find_map(|d| match &d.outcome {
            Outcome::Refused {
                reason: Refusal::WaitingForSlot { proxy, .. },
            } => Some(proxy.clone()),
            _ => None,
        })
}

/// Per disk, the orchestrator's placement reason, carried to the agent so its
/// job record and log say the same as `plan --explain`.
fn placement_reasons(
    sel: &crate::transport::select::Selection,
    waited: std::time::Duration,
) -> Vec<crate::agent::api::DiskPlacement> {
    sel.disks
        .iter()
        .filter_map(|d| match &d.outcome {
            Outcome::Assigned { proxy, mode } => Some(crate::agent::api::DiskPlacement {
                disk_key: d.disk_key,
                proxy: proxy.clone(),
                mode: *mode,
                reason: super::plan::placement_summary(d, waited),
            }),
            Outcome::Refused { .. } => None,
        })
        .collect()
}

fn new_run_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    let f = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let mut r = [0u8; 4];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut r);
    format!(
        "run-{}-{}",
        now.format(&f).unwrap_or_else(|_| "00000000T000000Z".into()),
        hex::encode(r)
    )
}

/// A VM being worked on in a run.
struct Item {
    inv: InventoryVm,
    state: ItemState,
    agent: Option<String>,
    agent_job_id: Option<String>,
    attempts: u32,
    tried: BTreeSet<String>,
    error: Option<String>,
    bytes: u64,
    note: Option<String>,
    waiting: Option<String>,
    /// When it started waiting for a slot (ms since the epoch).
    waiting_since: Option<u64>,
    /// How long it waited for a slot before its dispatch, in ms.
    waited_ms: u64,
    /// What it waited for, by kind (`slot`, `host esx-01`, `datastore ds-a`,
    /// `agent proxy-a busy`), recorded as `waited_for`.
    wait_reasons: BTreeSet<String>,
    /// The kind of what it waits for now.
    wait_kind: Option<String>,
    /// When its progress (bytes) was last recorded, ms since the epoch.
    progress_recorded_ms: u64,
    selector: serde_json::Value,
    plan: serde_json::Value,
    result: serde_json::Value,
    poll_failures: u32,
    /// The quiesce policy sent to the agent.
    quiesce: Option<crate::job::quiesce::QuiescePolicy>,
    /// How the agent took the snapshot (its job's `snapshot:` note).
    snapshot: Option<String>,
    /// The restore point the agent's job made.
    point: Option<String>,
    /// Bytes the agent's job has to read (0 until it knows).
    bytes_total: u64,
}

impl Item {
    fn new(inv: InventoryVm) -> Item {
        Item {
            inv,
            state: ItemState::Pending,
            agent: None,
            agent_job_id: None,
            attempts: 0,
            tried: BTreeSet::new(),
            error: None,
            bytes: 0,
            note: None,
            waiting: None,
            waiting_since: None,
            waited_ms: 0,
            wait_reasons: BTreeSet::new(),
            wait_kind: None,
            progress_recorded_ms: 0,
            selector: serde_json::Value::Null,
            plan: serde_json::Value::Null,
            result: serde_json::Value::Null,
            poll_failures: 0,
            quiesce: None,
            snapshot: None,
            point: None,
            bytes_total: 0,
        }
    }
    fn record(&self, run_id: &str) -> RunItem {
        RunItem {
            run_id: run_id.to_string(),
            item: self.inv.vm.moref.clone(),
            agent: self.agent.clone(),
            agent_job_id: self.agent_job_id.clone(),
            state: self.state,
            attempts: self.attempts,
            detail: serde_json::json!({
                "vm": self.inv.vm.name,
                "folder": self.inv.folder,
                "note": self.note,
                "waiting": self.waiting,
                "waited_ms": self.waited_ms,
                "waited_for": self.wait_reasons,
                "tried": self.tried,
                "selector": self.selector,
                "plan": self.plan,
                "result": self.result,
                "quiesce": self.quiesce,
                "snapshot": self.snapshot,
                "point": self.point,
                "bytes_total": self.bytes_total,
            }),
            error: self.error.clone(),
            bytes: self.bytes,
            updated_at: 0,
        }
    }
    /// How long it has waited for a slot at `now` (ms since the epoch).
    fn waited(&self, now: u64) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.waiting_since
                .map(|w| now.saturating_sub(w))
                .unwrap_or(0),
        )
    }
    fn open(&self) -> bool {
        matches!(self.state, ItemState::Pending | ItemState::Dispatched)
    }
    /// Where its snapshot lands, for the caps per host and datastore.
    fn footprint(&self, vcenter: &str) -> Footprint {
        Footprint {
            vcenter: vcenter.to_string(),
            host: self.inv.vm.host.clone(),
            datastores: self
                .inv
                .vm
                .disks
                .iter()
                .map(|d| d.datastore.clone())
                .filter(|d| !d.is_empty())
                .collect(),
        }
    }
    /// Mark it waiting for `reason` (logged once at info when it starts to
    /// wait, and again when the reason's kind is new).
    fn wait(&mut self, kind: &str, reason: String) {
        let new_kind = self.wait_reasons.insert(kind.to_string());
        if self.waiting.is_none() || new_kind {
            tracing::info!(vm = %self.inv.vm.name, reason = %reason, "waiting");
        }
        self.waiting = Some(reason);
        self.wait_kind = Some(kind.to_string());
        self.waiting_since.get_or_insert(now_ms() as u64);
    }
    /// What decides whether a planner answer for it holds for another VM in
    /// the same round: the same tenant and job, the same disks (datastores,
    /// encryption), host and agents already tried.
    fn signature(&self, job: &str) -> String {
        let v = &self.inv.vm;
        let mut s = format!(
            "{job}|{}|{}|{:?}|{:?}",
            v.host, v.encrypted, v.key_provider, self.tried
        );
        for d in &v.disks {
            s.push_str(&format!(
                "|{}:{}:{:?}",
                d.datastore, d.encrypted, d.key_provider
            ));
        }
        s
    }
}

impl Orchestrator {
    /// An orchestrator over explicit agent clients (tests use scripted ones).
    pub fn new(
        cfg: OrchestratorConfig,
        inventory: Arc<dyn Inventory>,
        agents: Vec<Arc<dyn AgentApi>>,
        store: Arc<StateStore>,
    ) -> Orchestrator {
        let caps = cfg.dispatch.caps();
        Orchestrator {
            cfg: Arc::new(cfg),
            inventory,
            agents: agents
                .into_iter()
                .map(|a| (a.id().to_string(), a))
                .collect(),
            store,
            active: Mutex::new(BTreeSet::new()),
            dispatcher: Mutex::new(Dispatcher::new(caps)),
            runs: Mutex::new(BTreeMap::new()),
            round: tokio::sync::Mutex::new(RoundClock::default()),
            changes: std::sync::atomic::AtomicU64::new(0),
            ledger: Mutex::new(Ledger::default()),
            _lock: None,
        }
    }

    fn clients(cfg: &OrchestratorConfig) -> Result<Vec<Arc<dyn AgentApi>>, OrchestratorError> {
        let mut agents: Vec<Arc<dyn AgentApi>> = Vec::new();
        for a in &cfg.agents {
            agents.push(Arc::new(HttpAgent::new(
                a,
                cfg.orchestrator.request_timeout,
            )?));
        }
        Ok(agents)
    }

    /// For `plan` and `history`: the HTTPS agent clients and the state database
    /// opened without taking ownership (no lock, no crash recovery), so it is
    /// safe next to a running orchestrator. Must not be used to run jobs.
    pub async fn open_reader(
        cfg: OrchestratorConfig,
        inventory: Arc<dyn Inventory>,
    ) -> Result<Orchestrator, OrchestratorError> {
        let agents = Self::clients(&cfg)?;
        let path = cfg.orchestrator.state_dir.join(STATE_FILE);
        let store = tokio::task::spawn_blocking(move || StateStore::open_no_recovery(&path))
            .await
            .map_err(|e| OrchestratorError::Task(e.to_string()))??;
        Ok(Orchestrator::new(cfg, inventory, agents, Arc::new(store)))
    }

    /// For `run`: build the HTTPS agent clients, take the state directory's
    /// lock (one running orchestrator per state directory) and open the state
    /// database, marking runs a dead orchestrator left running as failed.
    pub async fn open(
        cfg: OrchestratorConfig,
        inventory: Arc<dyn Inventory>,
    ) -> Result<(Orchestrator, Recovered), OrchestratorError> {
        let agents = Self::clients(&cfg)?;
        let lock = crate::state::StateLock::acquire(&cfg.orchestrator.state_dir.join(LOCK_FILE))?;
        let path = cfg.orchestrator.state_dir.join(STATE_FILE);
        let (store, recovered) = tokio::task::spawn_blocking(move || StateStore::open(&path))
            .await
            .map_err(|e| OrchestratorError::Task(e.to_string()))??;
        let mut o = Orchestrator::new(cfg, inventory, agents, Arc::new(store));
        o._lock = Some(lock);
        Ok((o, recovered))
    }

    /// The configuration.
    pub fn config(&self) -> &OrchestratorConfig {
        &self.cfg
    }

    /// The state store (history, key registry).
    pub fn store(&self) -> &Arc<StateStore> {
        &self.store
    }

    /// The inventory seam (the console reads VMs through it).
    pub fn inventory(&self) -> &Arc<dyn Inventory> {
        &self.inventory
    }

    /// The client of agent `id`, if configured.
    pub fn agent(&self, id: &str) -> Option<Arc<dyn AgentApi>> {
        self.agents.get(id).cloned()
    }

    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateStore) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, OrchestratorError> {
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| OrchestratorError::Task(e.to_string()))?
            .map_err(OrchestratorError::from)
    }

    /// Record several run items in one commit.
    async fn put_all(&self, records: Vec<RunItem>) {
        if records.is_empty() {
            return;
        }
        if let Err(e) = self.db(move |s| s.put_run_items(&records)).await {
            tracing::error!(error = %e, "cannot record run items");
        }
    }

    /// Ask every agent for `/v1/info`, concurrently.
    pub async fn agent_statuses(&self) -> BTreeMap<String, AgentStatus> {
        let mut set = tokio::task::JoinSet::new();
        for (id, a) in &self.agents {
            let a = a.clone();
            let id = id.clone();
            set.spawn(async move { (id, a.info().await) });
        }
        let mut out = BTreeMap::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok((id, Ok(info))) => {
                    out.insert(
                        id,
                        AgentStatus::Up {
                            info: Box::new(info),
                        },
                    );
                }
                Ok((id, Err(e))) => {
                    tracing::warn!(agent = %id, error = %e, "agent not available");
                    out.insert(
                        id,
                        AgentStatus::Down {
                            error: e.to_string(),
                        },
                    );
                }
                Err(e) => tracing::error!(error = %e, "info task failed"),
            }
        }
        out
    }

    fn jobs(&self, only: &[String]) -> Result<Vec<JobConfig>, OrchestratorError> {
        for n in only {
            if !self.cfg.jobs.iter().any(|j| j.name == *n) {
                return Err(OrchestratorError::Config(format!(
                    "no [[job]] named {n:?} in {} (defined: {})",
                    self.cfg.path.display(),
                    self.cfg
                        .jobs
                        .iter()
                        .map(|j| j.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(self
            .cfg
            .jobs
            .iter()
            .filter(|j| only.is_empty() || only.contains(&j.name))
            .cloned()
            .collect())
    }

    /// Plan every job (or those named) against the agents as they are now.
    /// Changes nothing anywhere. Each vCenter's inventory is read once,
    /// however many jobs use it.
    pub async fn plan(&self, only: &[String]) -> Result<PlanReport, OrchestratorError> {
        let jobs = self.jobs(only)?;
        let mut inventories = Inventories::new();
        for job in &jobs {
            let Some(vc) = self.cfg.vcenter(&job.vcenter) else {
                continue;
            };
            if !inventories.contains_key(&vc.name) {
                let read = self.inventory.vms(vc).await.map_err(|e| e.to_string());
                inventories.insert(vc.name.clone(), read);
            }
        }
        self.plan_over(only, &inventories).await
    }

    /// [`Orchestrator::plan`] over inventories already read (by vCenter name),
    /// for callers that need the VMs too (the console's snapshot). A vCenter
    /// missing from `inventories` plans as unavailable.
    pub async fn plan_over(
        &self,
        only: &[String],
        inventories: &Inventories,
    ) -> Result<PlanReport, OrchestratorError> {
        let jobs = self.jobs(only)?;
        let agents = self.agent_statuses().await;
        let mut load = reported_load(&agents);
        let mut out = Vec::new();
        for job in &jobs {
            if self.cfg.vcenter(&job.vcenter).is_none() {
                continue;
            }
            match inventories.get(&job.vcenter) {
                Some(Ok(inv)) => {
                    let vms = select_vms(job, inv);
                    out.push(plan_job(&self.cfg, job, &vms, &agents, &mut load));
                }
                other => out.push(JobPlan {
                    job: job.name.clone(),
                    tenant: job.tenant.clone(),
                    vcenter: job.vcenter.clone(),
                    agent_notes: vec![],
                    error: Some(match other {
                        Some(Err(e)) => e.clone(),
                        _ => format!("vCenter {}: its inventory was not read", job.vcenter),
                    }),
                    vms: vec![],
                }),
            }
        }
        Ok(PlanReport { agents, jobs: out })
    }

    /// A run as recorded.
    pub async fn summary(&self, run_id: &str) -> Result<RunSummary, OrchestratorError> {
        let id = run_id.to_string();
        let (run, items) = self
            .db(move |s| Ok((s.get_run(&id)?, s.run_items(&id)?)))
            .await?;
        let run = run.ok_or_else(|| OrchestratorError::Config(format!("no run {run_id}")))?;
        Ok(RunSummary {
            run_id: run.id,
            job: run.job,
            kind: run.kind,
            state: run.state,
            started_at: rfc3339_ms(run.started_at),
            finished_at: run.finished_at.map(rfc3339_ms),
            error: run.error,
            items: items
                .into_iter()
                .map(|i| ItemSummary {
                    item: i.item,
                    agent: i.agent,
                    agent_job_id: i.agent_job_id,
                    state: i.state,
                    attempts: i.attempts,
                    bytes: i.bytes,
                    error: i.error,
                    detail: i.detail,
                })
                .collect(),
        })
    }

    /// Run one job now: every selected VM is dispatched, polled to the end and
    /// recorded.
    pub async fn run_job(&self, job: &JobConfig) -> Result<RunSummary, OrchestratorError> {
        self.run_job_as(new_run_id(), job, None).await
    }

    /// Back up one VM (by moref) of job `job` now, in the background, as a run
    /// of that job (same agents, policy, retention and history): returns the
    /// new run's id at once. For the console's "back up now".
    pub fn start_vm_backup(
        self: &Arc<Self>,
        job: &str,
        moref: &str,
    ) -> Result<String, OrchestratorError> {
        let job = self.jobs(&[job.to_string()])?.remove(0);
        let run_id = new_run_id();
        let (me, rid, moref) = (self.clone(), run_id.clone(), moref.to_string());
        tokio::spawn(async move {
            if let Err(e) = me.run_job_as(rid, &job, Some(&moref)).await {
                tracing::error!(job = %job.name, vm = %moref, error = %e, "run failed");
            }
        });
        Ok(run_id)
    }

    /// Run `job` as run `run_id`; only the VM `only` (a moref) when given.
    async fn run_job_as(
        &self,
        run_id: String,
        job: &JobConfig,
        only: Option<&str>,
    ) -> Result<RunSummary, OrchestratorError> {
        let (rid, name) = (run_id.clone(), job.name.clone());
        self.db(move |s| s.start_run(&rid, &name, RunKind::Backup))
            .await?;
        self.lock_active().insert(run_id.clone());
        tracing::info!(run = %run_id, job = %job.name, "backup run started");
        let outcome = self.run_job_inner(&run_id, job, only).await;
        let (state, error, counts) = match outcome {
            Ok(counts) => (
                if counts.get("succeeded").copied().unwrap_or(0) == counts.values().sum::<u64>() {
                    RunState::Succeeded
                } else {
                    RunState::Failed
                },
                None,
                counts,
            ),
            Err(e) => (RunState::Failed, Some(e), BTreeMap::new()),
        };
        let rid = run_id.clone();
        let summary = serde_json::json!({ "items": counts });
        let err = error.clone();
        self.db(move |s| s.finish_run(&rid, state, &summary, err.as_deref()))
            .await?;
        self.lock_active().remove(&run_id);
        match &error {
            None => tracing::info!(run = %run_id, job = %job.name, %state, "backup run finished"),
            Some(e) => {
                tracing::error!(run = %run_id, job = %job.name, error = %e, "backup run failed")
            }
        }
        self.summary(&run_id).await
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run_job_inner(
        &self,
        run_id: &str,
        job: &JobConfig,
        only: Option<&str>,
    ) -> Result<BTreeMap<String, u64>, String> {
        let o = &self.cfg.orchestrator;
        let tenant = self
            .cfg
            .tenant(&job.tenant)
            .ok_or_else(|| format!("no tenant {}", job.tenant))?
            .clone();
        let vc = self
            .cfg
            .vcenter(&job.vcenter)
            .ok_or_else(|| format!("no vCenter {}", job.vcenter))?
            .clone();
        let inv = self
            .inventory
            .vms(&vc)
            .await
            .map_err(|e| format!("inventory: {e}"))?;
        let items: Vec<Item> = select_vms(job, &inv)
            .into_iter()
            .filter(|v| only.is_none_or(|m| v.vm.moref == m))
            .map(Item::new)
            .collect();
        if let (Some(m), true) = (only, items.is_empty()) {
            return Err(format!(
                "VM {m} is not (or no longer) selected by job {}",
                job.name
            ));
        }
        tracing::info!(run = %run_id, vms = items.len(), "VMs selected");
        self.put_all(items.iter().map(|it| it.record(run_id)).collect())
            .await;
        let deadline = tokio::time::Instant::now() + o.run_timeout;
        let window_end = now_ms() as u64 + job.window.unwrap_or(o.run_timeout).as_millis() as u64;
        let keys: Vec<String> = items.iter().map(|it| ledger_key(run_id, it)).collect();
        let footprints: Vec<Footprint> =
            items.iter().map(|it| it.footprint(&job.vcenter)).collect();
        let ctx = Arc::new(RunCtx {
            run_id: run_id.to_string(),
            job: job.clone(),
            tenant: tenant.clone(),
            window_end,
            items: tokio::sync::Mutex::new(items),
        });
        // The run is known before its VMs are queued: a round never meets a
        // queued VM of a run it does not know.
        self.lock_runs().insert(run_id.to_string(), ctx.clone());
        // Leaves the queue however the run ends (also when its task is aborted).
        let _registered = RunRegistration {
            orch: self,
            run_id: run_id.to_string(),
            keys: keys.clone(),
        };
        {
            // Every VM joins its tenant's queue, in inventory order.
            let mut d = self.lock_dispatcher();
            for (key, f) in keys.iter().zip(footprints) {
                d.enqueue(&tenant.name, key, f);
            }
        }
        self.changed();
        loop {
            self.dispatch_round().await;
            let mut items = ctx.items.lock().await;
            if !items.iter().any(Item::open) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut records = Vec::new();
                for it in items.iter_mut().filter(|i| i.open()) {
                    let key = ledger_key(run_id, it);
                    if let Some(agent) = &it.agent {
                        self.lock_ledger()
                            .release(agent, &key, now_ms() as u64, false);
                    }
                    {
                        let mut d = self.lock_dispatcher();
                        d.dequeue(&key);
                        d.finish(&key);
                    }
                    it.state = ItemState::Failed;
                    it.error = Some(format!(
                        "run timeout ({:?}) reached{}",
                        o.run_timeout,
                        it.agent_job_id
                            .as_ref()
                            .map(|j| format!("; agent job {j} may still finish"))
                            .unwrap_or_default()
                    ));
                    records.push(it.record(run_id));
                }
                self.put_all(records).await;
                break;
            }
            drop(items);
            tokio::time::sleep(o.poll_interval).await;
            let mut items = ctx.items.lock().await;
            let mut records = Vec::new();
            let now = now_ms() as u64;
            for (i, changed) in self.poll_all(&mut items).await {
                let it = &mut items[i];
                // Progress alone is recorded at most once a second per VM;
                // an end at once. All in one commit.
                if changed && (!it.open() || now.saturating_sub(it.progress_recorded_ms) >= 1000) {
                    if !it.open() {
                        let key = ledger_key(run_id, it);
                        if let Some(agent) = &it.agent {
                            self.lock_ledger().release(
                                agent,
                                &key,
                                now_ms() as u64,
                                it.state == ItemState::Succeeded,
                            );
                            let mut d = self.lock_dispatcher();
                            d.finish(&key);
                            d.agent_freed(agent);
                        }
                        self.changed();
                    }
                    it.progress_recorded_ms = now;
                    records.push(it.record(run_id));
                }
            }
            self.put_all(records).await;
        }
        let items = ctx.items.lock().await;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for it in items.iter() {
            *counts.entry(it.state.as_str().to_string()).or_default() += 1;
            log_outcome(run_id, &tenant.name, it);
        }
        Ok(counts)
    }

    fn lock_ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_dispatcher(&self) -> std::sync::MutexGuard<'_, Dispatcher> {
        self.dispatcher.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_runs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<RunCtx>>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Something happened that may let a waiting VM go.
    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Dispatch counters since the orchestrator started: VMs dispatched, busy
    /// answers (`429`) from agents, VMs held back by a snapshot cap, and the
    /// most VMs that ran at once per host and per datastore.
    pub fn dispatch_stats(&self) -> DispatchStats {
        self.lock_dispatcher().stats().clone()
    }

    /// One dispatch round over the queue of every run: fresh `/v1/info`
    /// answers, then the waiting VMs offered to the planner round-robin across
    /// tenants ([`super::dispatch::Round`]), as long as their tenant's agents
    /// have room and no snapshot cap holds them back. One round at a time;
    /// skipped when the last one ran less than `poll_interval` ago and nothing
    /// happened since.
    async fn dispatch_round(&self) {
        // Wait for a round in progress: it may have started before what
        // this caller saw happen (a job ending).
        let mut clock = self.round.lock().await;
        let changes = self.changes.load(std::sync::atomic::Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        if let Some(last) = clock.last {
            if changes == clock.changes
                && started.duration_since(last) < self.cfg.orchestrator.poll_interval
            {
                return;
            }
        }
        clock.last = Some(started);
        clock.changes = changes;
        if self.lock_dispatcher().queued_len() == 0 {
            return;
        }
        let runs: Vec<Arc<RunCtx>> = self.lock_runs().values().cloned().collect();
        let statuses = self.agent_statuses().await;
        let mut reported = reported_slots(&statuses);
        for a in self.lock_dispatcher().agents_backing_off(now_ms() as u64) {
            if let Some(r) = reported.get_mut(&a) {
                r.1 = 0;
            }
        }
        let mut cands: Vec<super::plan::Candidates> = runs
            .iter()
            .map(|r| candidates(&r.tenant, &statuses))
            .collect();
        let mut guards = Vec::with_capacity(runs.len());
        for r in &runs {
            guards.push(r.items.lock().await);
        }
        // Where each pending VM is: (run, item).
        let mut index: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (ri, g) in guards.iter().enumerate() {
            for (ii, it) in g.iter().enumerate() {
                if it.state == ItemState::Pending {
                    index.insert(ledger_key(&runs[ri].run_id, it), (ri, ii));
                }
            }
        }
        // Within a round free slots only shrink (no job of ours ends while
        // the round holds every run's items), so a VM like one that had to
        // wait waits too, without asking the planner again.
        let mut deferred: BTreeMap<String, (String, String)> = BTreeMap::new();
        // What changed, recorded in one commit at the end of the round (while
        // the round still holds the items: no older record can overwrite a
        // newer one).
        let mut records: Vec<RunItem> = Vec::new();
        let mut round = self.lock_dispatcher().round();
        loop {
            let offer = round.next(&self.lock_dispatcher());
            let Some(offer) = offer else { break };
            let Some(&(ri, ii)) = index.get(&offer.key) else {
                let run = offer.key.split_once('/').map(|(r, _)| r).unwrap_or("");
                if runs.iter().any(|r| r.run_id == run) {
                    // A VM of a run this round knows that is not pending
                    // any more: it has no business in the queue.
                    self.lock_dispatcher().dequeue(&offer.key);
                    round.gone();
                } else {
                    // A run that started after this round took its list.
                    round.waits();
                }
                continue;
            };
            let ctx = &runs[ri];
            let it = &mut guards[ri][ii];
            let needed = it.inv.vm.disks.len() as u32;
            let room = {
                let load = self.lock_ledger().load(&reported);
                let free: Vec<u32> = cands[ri]
                    .agents
                    .iter()
                    .filter(|(a, _)| !it.tried.contains(a))
                    .map(|(a, _)| load.free_of(a))
                    .collect();
                let fits_ever = cands[ri]
                    .agents
                    .iter()
                    .any(|(_, info)| info.slots.total >= needed);
                // Whether any agent of the tenant has room at all, whatever
                // this VM was refused by: only then is the tenant full.
                let tenant_room = cands[ri].agents.iter().any(|(a, _)| load.free_of(a) > 0);
                (
                    free.iter().any(|f| *f > 0),
                    free.iter().any(|f| *f >= needed),
                    fits_ever,
                    tenant_room,
                )
            };
            if !cands[ri].agents.is_empty() && !room.0 {
                if it.waiting.is_none() {
                    let why = if room.3 {
                        format!(
                            "waiting for a free slot: the agents of tenant {} that did not refuse this VM are busy",
                            ctx.tenant.name
                        )
                    } else {
                        format!(
                            "waiting for a free slot: every agent of tenant {} is busy",
                            ctx.tenant.name
                        )
                    };
                    it.wait("slot", why);
                    records.push(it.record(&ctx.run_id));
                }
                // A VM that only its refusing agents could take now must not
                // hold back the tenant's other VMs, which those agents may take.
                if room.3 {
                    round.waits();
                } else {
                    round.tenant_full();
                }
                continue;
            }
            let sig = it.signature(&ctx.job.name);
            let memo = ctx.job.lesser_mode == LesserMode::Never;
            if memo && ((room.2 && !room.1) || deferred.contains_key(&sig)) {
                let (kind, reason) = deferred.get(&sig).cloned().unwrap_or_else(|| {
                    (
                        "slot".to_string(),
                        format!(
                            "waiting for a free slot: no agent of tenant {} has {needed} free",
                            ctx.tenant.name
                        ),
                    )
                });
                if it.waiting.as_deref() != Some(reason.as_str()) {
                    it.wait(&kind, reason);
                    records.push(it.record(&ctx.run_id));
                }
                round.waits();
                continue;
            }
            let placed = self.place(ctx, it, &mut cands[ri], &mut reported).await;
            records.push(it.record(&ctx.run_id));
            match placed {
                Placed::Dispatched => {
                    if !self.lock_dispatcher().start(&offer.key) {
                        tracing::warn!(vm = %it.inv.vm.name, "dispatched VM was not in the queue any more");
                    }
                    round.dispatched();
                }
                Placed::Waits => {
                    if memo {
                        if let (Some(kind), Some(reason)) = (&it.wait_kind, &it.waiting) {
                            deferred.insert(sig, (kind.clone(), reason.clone()));
                        }
                    }
                    round.waits();
                }
                Placed::Gone => {
                    self.lock_dispatcher().dequeue(&offer.key);
                    round.gone();
                }
            }
        }
        for (key, why) in round.blocked() {
            if let Some(&(ri, ii)) = index.get(key) {
                let it = &mut guards[ri][ii];
                let reason = why.to_string();
                if it.waiting.as_deref() != Some(reason.as_str()) {
                    it.wait(&why.kind(), reason);
                    records.push(it.record(&runs[ri].run_id));
                }
            }
        }
        self.lock_dispatcher().end_round(round);
        self.put_all(records).await;
    }

    /// Plan one pending VM against the load now and hold its slots in the
    /// ledger when it is to be dispatched: what the job's wait policy grants
    /// it (after `waited`, or, for `when-idle`, when its wait would outlast the
    /// window and an agent sits idle).
    fn plan_now(
        &self,
        ctx: &RunCtx,
        it: &Item,
        cands: &super::plan::Candidates,
        reported: &BTreeMap<String, (u32, u32)>,
    ) -> super::plan::VmPlan {
        let (job, tenant) = (&ctx.job, &ctx.tenant);
        let now = now_ms() as u64;
        let waited = it.waited(now);
        let mut ledger = self.lock_ledger();
        let mut wait = WaitState {
            waited,
            window_left: Some(std::time::Duration::from_millis(
                ctx.window_end.saturating_sub(now),
            )),
            expected_wait: None,
        };
        let idle = ledger.idle(reported);
        let mut allow = Allowance {
            policy: job.lesser_mode,
            waited,
            grant: job.lesser_mode.grant(&wait, &idle),
        };
        let load = ledger.load(reported);
        let plan_with = |allow: &Allowance| {
            plan_vm(
                &it.inv,
                tenant,
                &job.policy,
                cands,
                &mut load.clone(),
                &it.tried,
                allow,
            )
        };
        let mut plan = plan_with(&allow);
        if job.lesser_mode == LesserMode::WhenIdle
            && matches!(plan.decision, Decision::Deferred { .. })
        {
            // The estimate needs the agent it waits for: ask again with it.
            if let Some(agent) = waited_for(&plan) {
                let (total, free) = reported.get(&agent).copied().unwrap_or((0, 0));
                let free = load.free_of(&agent).min(free);
                wait.expected_wait =
                    ledger.expected_wait(&agent, total, free, it.inv.vm.disks.len() as u32, 0);
                allow.grant = job.lesser_mode.grant(&wait, &idle);
                if allow.grant != Grant::No {
                    plan = plan_with(&allow);
                }
            }
        }
        if let Decision::Dispatch { agent, .. } = &plan.decision {
            ledger.hold(
                agent,
                &ledger_key(&ctx.run_id, it),
                &it.inv.vm.name,
                it.inv.vm.disks.len() as u32,
                now,
            );
        }
        plan
    }

    /// Try to dispatch one pending VM offered by the round: the planner's
    /// decision for this moment is sent as it is (ferry decides, the agent
    /// obeys); the VM is left pending when it must wait.
    async fn place(
        &self,
        ctx: &RunCtx,
        it: &mut Item,
        cands: &mut super::plan::Candidates,
        reported: &mut BTreeMap<String, (u32, u32)>,
    ) -> Placed {
        let (run_id, job, tenant) = (ctx.run_id.as_str(), &ctx.job, &ctx.tenant);
        let max = self.cfg.orchestrator.dispatch_attempts;
        loop {
            let plan = self.plan_now(ctx, it, cands, reported);
            let waited = it.waited(now_ms() as u64);
            if let Some(sel) = &plan.selection {
                it.selector = serde_json::Value::Array(super::plan::disk_summaries(sel, waited));
            }
            match plan.decision {
                Decision::Deferred { reason } => {
                    it.wait("slot", reason);
                    return Placed::Waits;
                }
                Decision::Refused { reason } => {
                    it.state = ItemState::Refused;
                    it.error = Some(reason);
                    return Placed::Gone;
                }
                Decision::Unavailable { reason } => {
                    it.state = ItemState::Failed;
                    it.error = Some(match &it.error {
                        Some(last) => format!("{reason}; last dispatch error: {last}"),
                        None => reason,
                    });
                    return Placed::Gone;
                }
                Decision::Dispatch { agent, note } => {
                    let key = ledger_key(run_id, it);
                    let Some(api) = self.agents.get(&agent).cloned() else {
                        self.lock_ledger()
                            .release(&agent, &key, now_ms() as u64, false);
                        cands.remove(&agent, "no client for this agent");
                        continue;
                    };
                    let quiesce = job.quiesce_for(&it.inv.vm.name);
                    let req = BackupRequest {
                        tenant: tenant.name.clone(),
                        vm: VmSpec::from_vm_info(
                            &it.inv.vm,
                            Some(&it.inv.folder)
                                .filter(|f| !f.is_empty())
                                .map(|f| f.as_str()),
                        ),
                        policy: Some(PolicySpec::from(&job.policy)),
                        retention: job.retention.clone(),
                        full: job.full,
                        placement: plan
                            .selection
                            .as_ref()
                            .map(|s| placement_reasons(s, waited)),
                        // Off is the agents' default: agents older than the
                        // field still accept the request.
                        quiesce: quiesce.asks_quiesce().then_some(quiesce),
                    };
                    it.quiesce = Some(quiesce);
                    it.attempts += 1;
                    match api.start_backup(&req).await {
                        Ok(j) => {
                            it.waited_ms = it.waited(now_ms() as u64).as_millis() as u64;
                            tracing::info!(run = %run_id, tenant = %tenant.name, vm = %it.inv.vm.name, agent = %agent, job = %j.id, waited_ms = it.waited_ms, "dispatched");
                            self.lock_dispatcher().agent_freed(&agent);
                            it.state = ItemState::Dispatched;
                            it.agent = Some(agent);
                            it.agent_job_id = Some(j.id);
                            it.plan = serde_json::to_value(&j.disks).unwrap_or_default();
                            it.note = note;
                            it.waiting = None;
                            it.error = None;
                            return Placed::Dispatched;
                        }
                        Err(e) => {
                            self.lock_ledger()
                                .release(&agent, &key, now_ms() as u64, false);
                            it.error = Some(e.to_string());
                            match &e {
                                ClientError::Api { status: 429, .. } => {
                                    // Busy, not broken: the ledger was wrong
                                    // (jobs started elsewhere). The agent counts
                                    // as full until one of our jobs there ends
                                    // or its back-off passes; the VM keeps its
                                    // place in the queue, no attempt used.
                                    it.attempts -= 1;
                                    self.agent_busy(&agent, &api, reported, it, &e).await;
                                    return Placed::Waits;
                                }
                                ClientError::Api { code, .. }
                                    if code == "vm_refused" || code == "exceeds_slots" =>
                                {
                                    tracing::info!(vm = %it.inv.vm.name, agent = %agent, error = %e, "dispatch refused; trying another agent");
                                }
                                ClientError::Api { status: 400, .. } => {
                                    tracing::info!(vm = %it.inv.vm.name, agent = %agent, error = %e, "dispatch rejected");
                                    it.state = ItemState::Failed;
                                    return Placed::Gone;
                                }
                                _ => {
                                    tracing::info!(vm = %it.inv.vm.name, agent = %agent, error = %e, "dispatch failed; trying another agent");
                                    cands.remove(&agent, &e.to_string())
                                }
                            }
                            it.tried.insert(agent);
                            if it.attempts >= max {
                                it.state = ItemState::Failed;
                                it.error = Some(format!(
                                    "gave up after {} dispatch attempt(s) ({}); last error: {e}",
                                    it.attempts,
                                    it.tried.iter().cloned().collect::<Vec<_>>().join(", ")
                                ));
                                return Placed::Gone;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Agent `agent` answered busy (`429`) to a dispatch the ledger gave room
    /// for: refresh what it reports, count it as full for a back-off with
    /// jitter (or until one of our jobs on it ends), and say so once at info.
    async fn agent_busy(
        &self,
        agent: &str,
        api: &Arc<dyn AgentApi>,
        reported: &mut BTreeMap<String, (u32, u32)>,
        it: &mut Item,
        e: &ClientError,
    ) {
        let jitter: f64 = rand::Rng::gen(&mut rand::thread_rng());
        let backoff = self
            .lock_dispatcher()
            .busy(agent, now_ms() as u64, None, jitter);
        let held = self.lock_ledger().used(agent);
        let now = match api.info().await {
            Ok(info) => {
                reported.insert(agent.to_string(), (info.slots.total, 0));
                format!(
                    "it reports {} of {} slot(s) free, this orchestrator holds {held}",
                    info.slots.free, info.slots.total
                )
            }
            Err(ie) => {
                if let Some(r) = reported.get_mut(agent) {
                    r.1 = 0;
                }
                format!("its /v1/info failed too: {ie}")
            }
        };
        tracing::info!(
            vm = %it.inv.vm.name, agent = %agent, error = %e, backoff_ms = backoff.as_millis() as u64,
            "agent answered busy although the slot ledger gave it room ({now}); it counts as full until one of our jobs there ends or the back-off passes, and the VM keeps its place in the queue"
        );
        it.wait(
            &format!("agent {agent} busy"),
            format!(
                "agent {agent} answered busy ({now}); waiting for one of its jobs to end or {} ms",
                backoff.as_millis()
            ),
        );
    }

    /// Poll the agent jobs of every dispatched VM of `items` at once; true
    /// per VM when something changed.
    async fn poll_all(&self, items: &mut [Item]) -> Vec<(usize, bool)> {
        let mut set = tokio::task::JoinSet::new();
        for (i, it) in items.iter().enumerate() {
            if it.state != ItemState::Dispatched {
                continue;
            }
            let (Some(agent), Some(job_id)) = (&it.agent, &it.agent_job_id) else {
                continue;
            };
            let Some(api) = self.agents.get(agent).cloned() else {
                continue;
            };
            let job_id = job_id.clone();
            set.spawn(async move {
                let r = api.job(&job_id).await;
                (i, r)
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok((i, answer)) => out.push((i, self.absorb_poll(&mut items[i], answer))),
                Err(e) => tracing::error!(error = %e, "poll task failed"),
            }
        }
        out.sort_unstable_by_key(|(i, _)| *i);
        out
    }

    /// Take in what polling a dispatched VM's agent job answered; true when
    /// something changed.
    fn absorb_poll(
        &self,
        it: &mut Item,
        answer: Result<crate::agent::api::Job, ClientError>,
    ) -> bool {
        let (Some(agent), Some(job_id)) = (it.agent.clone(), it.agent_job_id.clone()) else {
            return false;
        };
        match answer {
            Ok(j) => {
                it.poll_failures = 0;
                let before = (it.state, it.bytes);
                it.bytes = j.bytes_done;
                it.bytes_total = j.bytes_total;
                let state = match j.state {
                    JobState::Succeeded => Some(ItemState::Succeeded),
                    JobState::Failed => Some(ItemState::Failed),
                    JobState::Cancelled => Some(ItemState::Cancelled),
                    JobState::Queued | JobState::Running => None,
                };
                if let Some(s) = state {
                    it.state = s;
                    it.result = serde_json::to_value(&j.disks).unwrap_or_default();
                    it.point = j.point_id.clone();
                    it.snapshot = j
                        .notes
                        .iter()
                        .find(|n| n.starts_with("snapshot: "))
                        .map(|n| n.trim_start_matches("snapshot: ").to_string());
                    it.error = j.error.map(|e| format!("{}: {}", e.code, e.message));
                    tracing::debug!(vm = %it.inv.vm.name, agent = %agent, job = %job_id, state = %s, "agent job finished");
                }
                before != (it.state, it.bytes)
            }
            Err(ClientError::Api { code, message, .. }) if code == "job_not_found" => {
                it.state = ItemState::Failed;
                it.error = Some(format!(
                    "agent {agent} no longer knows job {job_id}: {message}"
                ));
                true
            }
            Err(e) => {
                it.poll_failures += 1;
                tracing::info!(vm = %it.inv.vm.name, agent = %agent, error = %e, failures = it.poll_failures, "cannot poll agent job");
                if it.poll_failures >= self.cfg.orchestrator.max_poll_failures {
                    it.state = ItemState::Failed;
                    it.error = Some(format!(
                        "agent {agent} unreachable while job {job_id} ran ({e}); the job may still finish there: check GET /v1/jobs/{job_id} on the agent"
                    ));
                    return true;
                }
                false
            }
        }
    }

    /// The key sync system job: every agent syncs its tenants' keys with their
    /// KMSes; the orchestrator records key ids and versions (never key material)
    /// and reports rotations.
    pub async fn sync_keys(&self) -> Result<RunSummary, OrchestratorError> {
        let run_id = new_run_id();
        let rid = run_id.clone();
        self.db(move |s| s.start_run(&rid, KEY_SYNC_JOB, RunKind::KeySync))
            .await?;
        self.lock_active().insert(run_id.clone());
        let mut ok = true;
        let mut rotated = 0u64;
        for (id, api) in &self.agents {
            let mut item = RunItem {
                run_id: run_id.clone(),
                item: id.clone(),
                agent: Some(id.clone()),
                agent_job_id: None,
                state: ItemState::Succeeded,
                attempts: 1,
                detail: serde_json::Value::Null,
                error: None,
                bytes: 0,
                updated_at: 0,
            };
            match api.sync_keys().await {
                Ok(resp) => {
                    let mut failed = Vec::new();
                    for r in &resp.results {
                        if let Some(e) = &r.error {
                            failed.push(format!("{}: {}: {}", r.tenant, e.code, e.message));
                            continue;
                        }
                        if let (Some(kms), Some(key_id), Some(version)) =
                            (&r.kms, &r.key_id, r.version)
                        {
                            let obs = KeyObservation {
                                tenant: r.tenant.clone(),
                                kms: kms.clone(),
                                key_name: r.key_name.clone().unwrap_or_default(),
                                key_id: key_id.clone(),
                                version,
                            };
                            let change = self.db(move |s| s.record_key_check(&obs)).await?;
                            if r.rotated || (change.changed && change.previous.is_some()) {
                                rotated += 1;
                                tracing::info!(agent = %id, tenant = %r.tenant, kms = %kms, key_id = %key_id, version, "tenant key rotated");
                            }
                        }
                    }
                    item.detail = serde_json::to_value(&resp).unwrap_or_default();
                    if !failed.is_empty() {
                        ok = false;
                        item.state = ItemState::Failed;
                        item.error = Some(failed.join("; "));
                    }
                }
                Err(e) => {
                    ok = false;
                    item.state = ItemState::Failed;
                    item.error = Some(e.to_string());
                }
            }
            self.db(move |s| s.put_run_item(&item)).await?;
        }
        let rid = run_id.clone();
        let state = if ok {
            RunState::Succeeded
        } else {
            RunState::Failed
        };
        let summary = serde_json::json!({"agents": self.agents.len(), "rotated": rotated});
        self.db(move |s| s.finish_run(&rid, state, &summary, None))
            .await?;
        self.lock_active().remove(&run_id);
        tracing::info!(run = %run_id, %state, rotated, "key sync finished");
        self.summary(&run_id).await
    }

    /// Run the key sync (if `key_sync`) and every job (or those named) once,
    /// now, whatever their schedules; jobs run concurrently. Summaries in order:
    /// key sync first, then jobs in configuration order.
    pub async fn run_once(
        self: &Arc<Self>,
        only: &[String],
        key_sync: bool,
    ) -> Result<Vec<RunSummary>, OrchestratorError> {
        let jobs = self.jobs(only)?;
        let mut out = Vec::new();
        if key_sync {
            out.push(self.sync_keys().await?);
        }
        let mut set = tokio::task::JoinSet::new();
        for (i, job) in jobs.into_iter().enumerate() {
            let me = self.clone();
            set.spawn(async move { (i, me.run_job(&job).await) });
        }
        let mut runs = Vec::new();
        while let Some(r) = set.join_next().await {
            let (i, r) = r.map_err(|e| OrchestratorError::Task(e.to_string()))?;
            runs.push((i, r?));
        }
        runs.sort_by_key(|(i, _)| *i);
        out.extend(runs.into_iter().map(|(_, r)| r));
        Ok(out)
    }

    /// The scheduler: start every job when its schedule says so and the key sync
    /// every `[key_sync] every`, until `shutdown` completes. Runs still going
    /// then are stopped and recorded as failed (their agent jobs keep running on
    /// the agents).
    pub async fn run_scheduled(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), OrchestratorError> {
        tokio::pin!(shutdown);
        let mut tasks: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
        let key_sync = Schedule::Every(self.cfg.key_sync.every);
        loop {
            tasks.retain(|_, h| !h.is_finished());
            let now = now_ms();
            for job in &self.cfg.jobs {
                if tasks.contains_key(&job.name) || job.schedule.is_none() {
                    continue;
                }
                let name = job.name.clone();
                let last = self
                    .db(move |s| s.last_run(&name, RunKind::Backup))
                    .await?
                    .map(|r| r.started_at);
                if is_due(job.schedule.as_ref(), last, now) {
                    let me = self.clone();
                    let job = job.clone();
                    tasks.insert(
                        job.name.clone(),
                        tokio::spawn(async move {
                            if let Err(e) = me.run_job(&job).await {
                                tracing::error!(job = %job.name, error = %e, "run failed");
                            }
                        }),
                    );
                }
            }
            if self.cfg.key_sync.enabled && !tasks.contains_key(KEY_SYNC_JOB) {
                let last = self
                    .db(|s| s.last_run(KEY_SYNC_JOB, RunKind::KeySync))
                    .await?
                    .map(|r| r.started_at);
                if is_due(Some(&key_sync), last, now) {
                    let me = self.clone();
                    tasks.insert(
                        KEY_SYNC_JOB.into(),
                        tokio::spawn(async move {
                            if let Err(e) = me.sync_keys().await {
                                tracing::error!(error = %e, "key sync failed");
                            }
                        }),
                    );
                }
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(self.cfg.orchestrator.schedule_tick) => {}
            }
        }
        tracing::info!("orchestrator stopping");
        for (_, h) in tasks {
            h.abort();
            let _ = h.await;
        }
        let active: Vec<String> = self.lock_active().iter().cloned().collect();
        for id in active {
            let rid = id.clone();
            let r = self
                .db(move |s| {
                    s.finish_run(
                        &rid,
                        RunState::Failed,
                        &serde_json::json!({}),
                        Some("orchestrator stopped before the run finished; dispatched agent jobs keep running on their agents"),
                    )
                })
                .await;
            if let Err(e) = r {
                tracing::error!(run = %id, error = %e, "cannot record the stopped run");
            }
        }
        Ok(())
    }
}

/// The one log line of a VM's outcome in a run: info when it succeeded, a
/// warning (with the reason) when it needs attention. Retries on the way are
/// info lines of their own.
fn log_outcome(run_id: &str, tenant: &str, it: &Item) {
    let agent = it.agent.as_deref().unwrap_or("-");
    let job = it.agent_job_id.as_deref().unwrap_or("-");
    let vm = &it.inv.vm.name;
    match it.state {
        ItemState::Succeeded => tracing::info!(
            run = %run_id, tenant, vm = %vm, agent, job, bytes = it.bytes,
            waited_ms = it.waited_ms, "VM backed up"
        ),
        state => tracing::warn!(
            run = %run_id, tenant, vm = %vm, agent, job, state = state.as_str(),
            attempts = it.attempts, error = it.error.as_deref().unwrap_or("-"),
            "VM not backed up"
        ),
    }
}
