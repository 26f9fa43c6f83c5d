//! What the console shows, as plain data: the world as the orchestrator sees
//! it (inventory, plan with every reason, agents, history, keys) gathered into
//! one [`Snapshot`], and the rows each page needs, already cut to what a
//! [`Principal`] may see. Pages (`super::pages`) only format these; the JSON
//! API serialises the same rows, so pages and JSON cannot disagree about
//! tenant boundaries.
//!
//! Must not render HTML or take requests.

use super::auth::Principal;
use crate::agent::api::{Info, KeySyncResponse};
use crate::orchestrator::config::Schedule;
use crate::orchestrator::inventory::InventoryVm;
use crate::orchestrator::plan::{AgentStatus, Decision, PlanReport};
use crate::orchestrator::run::Inventories;
use crate::orchestrator::Orchestrator;
use crate::state::{now_ms, ItemState, KeyEntry, RunKind, RunState, VmHistoryEntry};
use crate::transport::select::{Outcome, Refusal, Selection};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Everything the console shows, read at one moment.
pub struct Snapshot {
    /// When it was read (Unix ms).
    pub taken_ms: i64,
    /// The plan of every job against the agents as they were.
    pub plan: PlanReport,
    /// Every VM of every vCenter, with its tenant, jobs and last result.
    pub vms: Vec<VmRow>,
    /// Inventory errors per vCenter.
    pub inventory_errors: Vec<String>,
    /// Per tenant: KMS reachability from the newest key sync.
    pub kms: BTreeMap<String, KmsState>,
    /// The key registry.
    pub keys: Vec<KeyEntry>,
    /// Tenant names, in configuration order.
    pub tenants: Vec<String>,
}

/// One VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmRow {
    /// Managed object reference (the console's id of the VM).
    pub moref: String,
    /// Name.
    pub name: String,
    /// Folder.
    pub folder: String,
    /// Host.
    pub host: String,
    /// The tenant it belongs to: that of the first job selecting it; `None`:
    /// no job selects it, so only the provider sees it (a tenant's key
    /// provider alone does not make a VM the tenant's: the provider's own
    /// HotAdd proxy VMs are encrypted under it too).
    pub tenant: Option<String>,
    /// For a VM no job selects: the tenant whose key provider encrypts it (a
    /// hint for the provider).
    pub key_provider_tenant: Option<String>,
    /// Jobs selecting it.
    pub jobs: Vec<String>,
    /// Encrypted.
    pub encrypted: bool,
    /// Key provider.
    pub key_provider: Option<String>,
    /// Disks: label and datastore.
    pub disks: Vec<(String, String)>,
    /// Its newest backup run item, if any.
    pub last: Option<LastResult>,
    /// When its newest successful backup run started (Unix ms).
    pub last_success_ms: Option<i64>,
    /// Protected (a job selects it), and whether it has a point inside its
    /// schedule's window.
    pub status: VmStatus,
}

/// A VM's newest result.
#[derive(Debug, Clone, Serialize)]
pub struct LastResult {
    /// Run id.
    pub run_id: String,
    /// Job.
    pub job: String,
    /// Item state.
    pub state: String,
    /// When the run started (Unix ms).
    pub started_ms: i64,
    /// Why it failed.
    pub error: Option<String>,
    /// Bytes read.
    pub bytes: u64,
}

/// Protection status of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    /// No job selects it.
    Unprotected,
    /// Its newest backup failed (or was refused).
    Failed,
    /// Protected, but no successful backup inside its schedule's window.
    Missed,
    /// Protected and backed up inside its window (or no schedule: on demand).
    Protected,
    /// Protected; never backed up yet.
    Never,
}

impl VmStatus {
    /// As shown.
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Unprotected => "unprotected",
            VmStatus::Failed => "failed",
            VmStatus::Missed => "missed window",
            VmStatus::Protected => "protected",
            VmStatus::Never => "not backed up yet",
        }
    }
}

/// A tenant's KMS as the newest key sync saw it.
#[derive(Debug, Clone, Serialize)]
pub struct KmsState {
    /// Reachable and the key found.
    pub ok: bool,
    /// Through which agent, and what it said.
    pub detail: String,
    /// When (Unix ms of the key sync run).
    pub at_ms: i64,
}

/// How long a schedule may go without a point before the VM counts as
/// "missed": its interval (one day for daily) plus one hour.
pub fn schedule_window(s: &Schedule) -> Duration {
    let period = match s {
        Schedule::Every(d) => *d,
        Schedule::Daily(_) => Duration::from_secs(86_400),
    };
    period + Duration::from_secs(3600)
}

/// The status of a VM from its jobs' schedules, newest item and newest success.
pub fn vm_status(
    schedules: &[Option<&Schedule>],
    last_state: Option<ItemState>,
    last_success_ms: Option<i64>,
    now_ms: i64,
) -> VmStatus {
    if schedules.is_empty() {
        return VmStatus::Unprotected;
    }
    match last_state {
        None => return VmStatus::Never,
        Some(ItemState::Failed | ItemState::Refused | ItemState::Cancelled) => {
            return VmStatus::Failed
        }
        _ => {}
    }
    let window = schedules.iter().flatten().map(|s| schedule_window(s)).min();
    match (window, last_success_ms) {
        (None, Some(_)) => VmStatus::Protected,
        (_, None) => VmStatus::Never,
        (Some(w), Some(t)) if now_ms.saturating_sub(t) > w.as_millis() as i64 => VmStatus::Missed,
        _ => VmStatus::Protected,
    }
}

impl Snapshot {
    /// Read everything now: the plan (agents' /v1/info, inventory), every
    /// vCenter's VMs, the newest result per VM, the key registry and the newest
    /// key sync.
    pub async fn read(o: &Orchestrator) -> Snapshot {
        let cfg = o.config().clone();
        // Each vCenter's inventory is read once: the plan and the VM list share it.
        let mut inventories = Inventories::new();
        for vc in &cfg.vcenters {
            let read = o.inventory().vms(vc).await.map_err(|e| e.to_string());
            inventories.insert(vc.name.clone(), read);
        }
        let plan = match o.plan_over(&[], &inventories).await {
            Ok(p) => p,
            Err(e) => PlanReport {
                agents: BTreeMap::new(),
                jobs: vec![crate::orchestrator::plan::JobPlan {
                    job: "-".into(),
                    tenant: "-".into(),
                    vcenter: "-".into(),
                    agent_notes: vec![],
                    error: Some(e.to_string()),
                    vms: vec![],
                }],
            },
        };
        let mut inventory: Vec<InventoryVm> = Vec::new();
        let mut inventory_errors = Vec::new();
        for read in inventories.into_values() {
            match read {
                Ok(v) => inventory.extend(v),
                // The error names its vCenter.
                Err(e) => inventory_errors.push(e),
            }
        }
        let store = o.store().clone();
        let db = tokio::task::spawn_blocking(move || {
            let latest = store.latest_vm_items()?;
            let ok = store.last_vm_successes()?;
            let keys = store.keys()?;
            let sync =
                match store.last_run(crate::orchestrator::run::KEY_SYNC_JOB, RunKind::KeySync)? {
                    Some(r) => Some((r.started_at, store.run_items(&r.id)?)),
                    None => None,
                };
            Ok::<_, crate::state::StateError>((latest, ok, keys, sync))
        })
        .await;
        let (latest, ok, keys, sync) = match db {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                inventory_errors.push(format!("state database: {e}"));
                Default::default()
            }
            Err(e) => {
                inventory_errors.push(format!("state database: {e}"));
                Default::default()
            }
        };
        let now = now_ms();
        let vms = vm_rows(&cfg, &plan, &inventory, &latest, &ok, now);
        let mut kms = BTreeMap::new();
        if let Some((at_ms, items)) = sync {
            for it in items {
                let Ok(resp) = serde_json::from_value::<KeySyncResponse>(it.detail.clone()) else {
                    continue;
                };
                for r in resp.results {
                    let agent = it.agent.clone().unwrap_or_else(|| it.item.clone());
                    let state = match &r.error {
                        None => KmsState {
                            ok: true,
                            detail: format!(
                                "agent {agent}: key {} version {}",
                                r.key_name.as_deref().unwrap_or("-"),
                                r.version.map(|v| v.to_string()).unwrap_or("-".into())
                            ),
                            at_ms,
                        },
                        Some(e) => KmsState {
                            ok: false,
                            detail: format!("agent {agent}: {}: {}", e.code, e.message),
                            at_ms,
                        },
                    };
                    // One failing agent does not hide another that reached it.
                    let keep = kms.get(&r.tenant).is_some_and(|k: &KmsState| k.ok);
                    if !keep {
                        kms.insert(r.tenant.clone(), state);
                    }
                }
            }
        }
        Snapshot {
            taken_ms: now,
            plan,
            vms,
            inventory_errors,
            kms,
            keys,
            tenants: cfg.tenants.iter().map(|t| t.name.clone()).collect(),
        }
    }

    /// The VMs `p` may see.
    pub fn vms_for<'a>(&'a self, p: &'a Principal) -> impl Iterator<Item = &'a VmRow> + 'a {
        self.vms.iter().filter(move |v| match &v.tenant {
            Some(t) => p.sees(t),
            None => p.is_provider(),
        })
    }

    /// One VM, if `p` may see it.
    pub fn vm_for<'a>(&'a self, p: &Principal, moref: &str) -> Option<&'a VmRow> {
        self.vms.iter().find(|v| {
            v.moref == moref
                && match &v.tenant {
                    Some(t) => p.sees(t),
                    None => p.is_provider(),
                }
        })
    }

    /// The tenants `p` may see.
    pub fn tenants_for<'a>(&'a self, p: &'a Principal) -> impl Iterator<Item = &'a String> + 'a {
        self.tenants.iter().filter(move |t| p.sees(t))
    }

    /// The agents `p` may see: a tenant account sees the agents that serve its
    /// tenant, and of them only its own tenant in their tenant lists.
    pub fn agents_for(&self, p: &Principal) -> Vec<AgentRow> {
        self.plan
            .agents
            .iter()
            .filter_map(|(id, st)| match st {
                AgentStatus::Up { info } => {
                    let tenants: Vec<String> = info
                        .tenants
                        .iter()
                        .map(|t| t.name.clone())
                        .filter(|t| p.sees(t))
                        .collect();
                    if !p.is_provider() && tenants.is_empty() {
                        return None;
                    }
                    Some(AgentRow::up(id, info, tenants))
                }
                AgentStatus::Down { error } => p.is_provider().then(|| AgentRow {
                    id: id.clone(),
                    up: false,
                    detail: error.clone(),
                    ..AgentRow::default()
                }),
            })
            .collect()
    }

    /// Every disk decision `p` may see, with the filters of the plan page.
    pub fn plan_rows(&self, p: &Principal, f: &PlanFilter) -> Vec<PlanRow> {
        let mut out = Vec::new();
        for j in &self.plan.jobs {
            if !p.sees(&j.tenant) || f.tenant.as_ref().is_some_and(|t| *t != j.tenant) {
                continue;
            }
            for v in &j.vms {
                let (decision, agent, note) = decision_text(&v.decision);
                let Some(sel) = &v.selection else {
                    if f.mode.is_none() {
                        out.push(PlanRow {
                            tenant: j.tenant.clone(),
                            job: j.job.clone(),
                            vm: v.vm.clone(),
                            moref: v.moref.clone(),
                            disk: "-".into(),
                            proxy: agent.unwrap_or_default(),
                            mode: String::new(),
                            decision: decision.into(),
                            reason: note.unwrap_or_default(),
                            refused: matches!(decision, "refused" | "unavailable"),
                            candidates: vec![],
                        });
                    }
                    continue;
                };
                for d in &sel.disks {
                    let (proxy, mode) = match &d.outcome {
                        Outcome::Assigned { proxy, mode } => {
                            (proxy.clone(), mode.as_str().to_string())
                        }
                        Outcome::Refused {
                            reason: Refusal::WaitingForSlot { proxy, .. },
                        } => (format!("{proxy} (waiting)"), String::new()),
                        Outcome::Refused { .. } => (String::new(), String::new()),
                    };
                    // Waiting for a slot is not a refusal: the VM runs later.
                    let refused = matches!(decision, "refused" | "unavailable");
                    if f.refused_only && !refused {
                        continue;
                    }
                    if f.mode.as_ref().is_some_and(|m| *m != mode) {
                        continue;
                    }
                    let waiting = matches!(
                        d.outcome,
                        Outcome::Refused {
                            reason: Refusal::WaitingForSlot { .. }
                        }
                    );
                    let reason = match &note {
                        // The plan's own words for a wait say more than the
                        // disk's "refused: waiting for a free slot".
                        Some(n) if waiting => n.clone(),
                        Some(n) => format!("{} ({decision}: {n})", d.reason_summary()),
                        None => d.reason_summary(),
                    };
                    out.push(PlanRow {
                        tenant: j.tenant.clone(),
                        job: j.job.clone(),
                        vm: v.vm.clone(),
                        moref: v.moref.clone(),
                        disk: d.label.clone(),
                        proxy,
                        mode,
                        decision: decision.into(),
                        reason,
                        refused,
                        candidates: d
                            .candidates
                            .iter()
                            .map(|c| Candidate {
                                proxy: c.proxy.clone(),
                                proxy_key_provider: c.proxy_key_provider.clone(),
                                mode: c.mode.as_str().to_string(),
                                accepted: c.accepted,
                                reason: c.reason.to_string(),
                            })
                            .collect(),
                    });
                }
            }
        }
        out
    }

    /// The selector's plan for one VM (from the first job that plans it).
    pub fn selection(&self, moref: &str) -> Option<&Selection> {
        self.plan
            .jobs
            .iter()
            .flat_map(|j| &j.vms)
            .find(|v| v.moref == moref)
            .and_then(|v| v.selection.as_ref())
    }

    /// The tenant's key entries and KMS state, for tenants `p` may see.
    pub fn keys_for(&self, p: &Principal) -> Vec<TenantKeys> {
        self.tenants_for(p)
            .map(|t| TenantKeys {
                tenant: t.clone(),
                kms: self.kms.get(t).cloned(),
                keys: self
                    .keys
                    .iter()
                    .filter(|k| k.tenant == *t)
                    .cloned()
                    .collect(),
            })
            .collect()
    }
}

/// Decision kind, agent and note of a VM's plan.
fn decision_text(d: &Decision) -> (&'static str, Option<String>, Option<String>) {
    match d {
        Decision::Dispatch { agent, note } => ("dispatch", Some(agent.clone()), note.clone()),
        Decision::Deferred { reason } => ("deferred", None, Some(reason.clone())),
        Decision::Refused { reason } => ("refused", None, Some(reason.clone())),
        Decision::Unavailable { reason } => ("unavailable", None, Some(reason.clone())),
    }
}

/// Every VM with its tenant, jobs and last result (pure).
pub fn vm_rows(
    cfg: &crate::orchestrator::OrchestratorConfig,
    plan: &PlanReport,
    inventory: &[InventoryVm],
    latest: &[VmHistoryEntry],
    successes: &[(String, i64)],
    now: i64,
) -> Vec<VmRow> {
    let mut jobs_of: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    for j in &plan.jobs {
        for v in &j.vms {
            jobs_of
                .entry(v.moref.as_str())
                .or_default()
                .push((j.job.as_str(), j.tenant.as_str()));
        }
    }
    let latest: HashMap<&str, &VmHistoryEntry> =
        latest.iter().map(|e| (e.item.item.as_str(), e)).collect();
    let ok: HashMap<&str, i64> = successes.iter().map(|(m, t)| (m.as_str(), *t)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for iv in inventory {
        if !seen.insert(iv.vm.moref.clone()) {
            continue;
        }
        let jobs = jobs_of
            .get(iv.vm.moref.as_str())
            .cloned()
            .unwrap_or_default();
        let tenant = jobs.first().map(|(_, t)| t.to_string());
        let key_provider_tenant = iv.vm.key_provider.as_deref().and_then(|kp| {
            cfg.tenants
                .iter()
                .find(|t| t.key_provider.as_deref() == Some(kp))
                .map(|t| t.name.clone())
        });
        let schedules: Vec<Option<&Schedule>> = jobs
            .iter()
            .filter_map(|(j, _)| cfg.jobs.iter().find(|c| c.name == *j))
            .map(|c| c.schedule.as_ref())
            .collect();
        let last = latest.get(iv.vm.moref.as_str()).map(|e| LastResult {
            run_id: e.item.run_id.clone(),
            job: e.job.clone(),
            state: e.item.state.as_str().to_string(),
            started_ms: e.started_at,
            error: e.item.error.clone(),
            bytes: e.item.bytes,
        });
        let last_state = latest.get(iv.vm.moref.as_str()).and_then(|e| {
            // A VM of a run still going counts by its result before.
            (e.item.state != ItemState::Pending && e.item.state != ItemState::Dispatched)
                .then_some(e.item.state)
        });
        let last_success_ms = ok.get(iv.vm.moref.as_str()).copied();
        let last_state = last_state.or(last_success_ms.map(|_| ItemState::Succeeded));
        out.push(VmRow {
            moref: iv.vm.moref.clone(),
            name: iv.vm.name.clone(),
            folder: iv.folder.clone(),
            host: iv.vm.host.clone(),
            status: vm_status(&schedules, last_state, last_success_ms, now),
            tenant,
            key_provider_tenant: if jobs.is_empty() {
                key_provider_tenant
            } else {
                None
            },
            jobs: jobs.iter().map(|(j, _)| j.to_string()).collect(),
            encrypted: iv.vm.encrypted,
            key_provider: iv.vm.key_provider.clone(),
            disks: iv
                .vm
                .disks
                .iter()
                .map(|d| (d.label.clone(), d.datastore.clone()))
                .collect(),
            last,
            last_success_ms,
        });
    }
    out
}

/// An agent as the agents page shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentRow {
    /// Agent id.
    pub id: String,
    /// Answered `/v1/info`.
    pub up: bool,
    /// Version.
    pub version: String,
    /// Modes it offers.
    pub modes: Vec<String>,
    /// Data path (vddk / native).
    pub data_path: String,
    /// The proxy VM's key provider.
    pub key_provider: Option<String>,
    /// The proxy VM's host.
    pub host: Option<String>,
    /// Slots in use and total.
    pub slots_used: u32,
    /// Slots total.
    pub slots_total: u32,
    /// Tenants it serves (those the viewer may see).
    pub tenants: Vec<String>,
    /// Why it is down.
    pub detail: String,
}

impl AgentRow {
    fn up(id: &str, info: &Info, tenants: Vec<String>) -> AgentRow {
        AgentRow {
            id: id.to_string(),
            up: true,
            version: info.version.clone(),
            modes: info.modes.iter().map(|m| m.as_str().to_string()).collect(),
            data_path: info.data_path.clone(),
            key_provider: info.key_provider.clone(),
            host: info.host.clone(),
            slots_used: info.slots.used,
            slots_total: info.slots.total,
            tenants,
            detail: String::new(),
        }
    }
}

/// Filters of the plan page (query string).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct PlanFilter {
    /// Only this tenant.
    #[serde(deserialize_with = "empty_none")]
    pub tenant: Option<String>,
    /// Only disks in this mode (`hotadd`, `nbdssl`, ...).
    #[serde(deserialize_with = "empty_none")]
    pub mode: Option<String>,
    /// Only refused (or not dispatchable) disks.
    #[serde(deserialize_with = "bool_flag")]
    pub refused_only: bool,
    /// Which page of [`PLAN_PAGE`] rows (from 1); the page shows page 1
    /// without it, the JSON every row.
    #[serde(deserialize_with = "page_number")]
    pub page: Option<usize>,
}

/// Rows per plan page (the whole plan of 500 VMs is ~0.9 MB of HTML).
pub const PLAN_PAGE: usize = 200;

impl PlanFilter {
    /// The query string of these filters at `page` (for page links).
    pub fn query(&self, page: usize) -> String {
        let esc = |s: &str| {
            let mut o = String::new();
            for b in s.bytes() {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    o.push(b as char);
                } else {
                    o.push_str(&format!("%{b:02X}"));
                }
            }
            o
        };
        let mut q = Vec::new();
        if let Some(t) = &self.tenant {
            q.push(format!("tenant={}", esc(t)));
        }
        if let Some(m) = &self.mode {
            q.push(format!("mode={}", esc(m)));
        }
        if self.refused_only {
            q.push("refused_only=1".into());
        }
        q.push(format!("page={page}"));
        q.join("&")
    }
}

/// One page of `rows` (1-based, clamped to the last page) and how many pages
/// there are.
pub fn page_of<T>(rows: &[T], page: usize, per: usize) -> (&[T], usize, usize) {
    let pages = rows.len().div_ceil(per.max(1)).max(1);
    let page = page.clamp(1, pages);
    let start = ((page - 1) * per).min(rows.len());
    let end = (start + per).min(rows.len());
    (&rows[start..end], page, pages)
}

fn page_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let s: Option<String> = serde::Deserialize::deserialize(d)?;
    Ok(s.and_then(|s| s.trim().parse().ok()).filter(|n| *n >= 1))
}

fn empty_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s: Option<String> = serde::Deserialize::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()))
}

fn bool_flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let s: Option<String> = serde::Deserialize::deserialize(d)?;
    Ok(matches!(s.as_deref(), Some("1" | "on" | "true" | "yes")))
}

/// One disk of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRow {
    /// Tenant.
    pub tenant: String,
    /// Job.
    pub job: String,
    /// VM name.
    pub vm: String,
    /// VM moref.
    pub moref: String,
    /// Disk label.
    pub disk: String,
    /// Chosen proxy.
    pub proxy: String,
    /// Chosen mode.
    pub mode: String,
    /// dispatch / deferred / refused / unavailable.
    pub decision: String,
    /// Why (the selector's summary, as `plan --explain`).
    pub reason: String,
    /// No transport now.
    pub refused: bool,
    /// Every candidate and why it was or was not taken.
    pub candidates: Vec<Candidate>,
}

/// One candidate (proxy, mode) of a disk.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// Proxy.
    pub proxy: String,
    /// Its key provider.
    pub proxy_key_provider: Option<String>,
    /// Mode.
    pub mode: String,
    /// Taken.
    pub accepted: bool,
    /// Why.
    pub reason: String,
}

/// Keys of one tenant.
#[derive(Debug, Clone, Serialize)]
pub struct TenantKeys {
    /// Tenant.
    pub tenant: String,
    /// Its KMS as the newest key sync saw it.
    pub kms: Option<KmsState>,
    /// Key registry entries (ids and versions, never key material).
    pub keys: Vec<KeyEntry>,
}

/// One point or attempt of a VM, for its page.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    /// Run.
    pub run_id: String,
    /// Job.
    pub job: String,
    /// Item state.
    pub state: String,
    /// Run start (Unix ms).
    pub started_ms: i64,
    /// Seconds from the run's start to the item's last update, once finished.
    pub duration_s: Option<f64>,
    /// Agent.
    pub agent: Option<String>,
    /// Agent job.
    pub agent_job_id: Option<String>,
    /// Bytes read.
    pub bytes: u64,
    /// Restore point made.
    pub point: Option<String>,
    /// Per disk: label, proxy, mode, bytes, reason.
    pub disks: Vec<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
    /// Snapshot note.
    pub snapshot: Option<String>,
}

/// `row` brought up to date with its fresh history (the snapshot may be a few
/// seconds older than a backup that just finished).
pub fn refresh_row(
    cfg: &crate::orchestrator::OrchestratorConfig,
    row: &VmRow,
    h: &[VmHistoryEntry],
    now: i64,
) -> VmRow {
    let mut r = row.clone();
    let newest_ok = h
        .iter()
        .filter(|e| e.item.state == ItemState::Succeeded)
        .map(|e| e.started_at)
        .max();
    if newest_ok > r.last_success_ms {
        r.last_success_ms = newest_ok;
    }
    let last_state = h
        .iter()
        .find(|e| !matches!(e.item.state, ItemState::Pending | ItemState::Dispatched))
        .map(|e| e.item.state);
    let schedules: Vec<Option<&Schedule>> = r
        .jobs
        .iter()
        .filter_map(|j| cfg.jobs.iter().find(|c| c.name == *j))
        .map(|c| c.schedule.as_ref())
        .collect();
    r.status = vm_status(&schedules, last_state, r.last_success_ms, now);
    r
}

/// A VM's history rows (pure).
pub fn history_rows(h: &[VmHistoryEntry]) -> Vec<HistoryRow> {
    h.iter()
        .map(|e| {
            let d = &e.item.detail;
            let finished = !matches!(e.item.state, ItemState::Pending | ItemState::Dispatched);
            HistoryRow {
                run_id: e.item.run_id.clone(),
                job: e.job.clone(),
                state: e.item.state.as_str().to_string(),
                started_ms: e.started_at,
                duration_s: finished
                    .then(|| (e.item.updated_at - e.started_at).max(0) as f64 / 1000.0),
                agent: e.item.agent.clone(),
                agent_job_id: e.item.agent_job_id.clone(),
                bytes: e.item.bytes,
                point: d.get("point").and_then(|p| p.as_str()).map(str::to_string),
                disks: d
                    .get("result")
                    .and_then(|r| r.as_array())
                    .cloned()
                    .unwrap_or_default(),
                error: e.item.error.clone(),
                snapshot: d
                    .get("snapshot")
                    .and_then(|p| p.as_str())
                    .map(str::to_string),
            }
        })
        .collect()
}

/// A running run's item with live progress.
#[derive(Debug, Clone, Serialize)]
pub struct RunningItem {
    /// Run.
    pub run_id: String,
    /// Job.
    pub job: String,
    /// Tenant.
    pub tenant: String,
    /// VM moref.
    pub moref: String,
    /// VM name.
    pub vm: String,
    /// pending / dispatched / succeeded / ...
    pub state: String,
    /// Agent.
    pub agent: Option<String>,
    /// Bytes read so far.
    pub bytes_done: u64,
    /// Bytes to read (0 until known).
    pub bytes_total: u64,
    /// Bytes per second.
    pub rate: f64,
    /// Seconds left.
    pub eta_s: Option<f64>,
    /// Waiting for a slot, and why.
    pub waiting: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The newest disaster-recovery key check of a tenant, as an agent ran it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyCheck {
    /// The agent that ran it.
    pub agent: String,
    /// Its report.
    pub report: crate::agent::api::KeyCheckResponse,
}

/// One tenant's repository as the agents serving it report it (the
/// overview's "Repositories").
#[derive(Debug, Clone, Serialize)]
pub struct RepoRow {
    /// Tenant.
    pub tenant: String,
    /// Agents that reported this repository (several share an S3 bucket).
    pub agents: Vec<String>,
    /// `local` or `s3`; `None` when it could not be read.
    pub backend: Option<String>,
    /// Where it is stored.
    pub location: String,
    /// Committed restore points.
    pub points: Option<u64>,
    /// Bytes stored.
    pub stored_bytes: Option<u64>,
    /// File system size (local directories).
    pub fs_total_bytes: Option<u64>,
    /// Space left on it.
    pub fs_free_bytes: Option<u64>,
    /// When the agent measured it (RFC 3339).
    pub measured_at: String,
    /// Why it could not be read (or the agent could not be asked).
    pub error: Option<String>,
}

/// How long one agent may take to report its repositories.
const REPO_TIMEOUT: Duration = Duration::from_secs(10);

/// Every configured agent's repositories, one row per tenant and place: an S3
/// location reported by several agents is one row naming them all; a local
/// directory is one row per agent (the same path on two proxies is two
/// repositories). Agents that cannot be asked give no rows; their error is
/// returned beside.
pub async fn repositories(o: &Orchestrator) -> (Vec<RepoRow>, Vec<String>) {
    let ids: Vec<String> = o.config().agents.iter().map(|a| a.id.clone()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        if let Some(api) = o.agent(&id) {
            tasks.spawn(async move {
                let r = tokio::time::timeout(REPO_TIMEOUT, api.repositories()).await;
                (id, r)
            });
        }
    }
    let mut got = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(x) = r {
            got.push(x);
        }
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rows: Vec<RepoRow> = Vec::new();
    let mut errors = Vec::new();
    for (agent, r) in got {
        let list = match r {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                errors.push(e.to_string());
                continue;
            }
            Err(_) => {
                errors.push(format!(
                    "agent {agent}: no repository report within {}s",
                    REPO_TIMEOUT.as_secs()
                ));
                continue;
            }
        };
        for u in list.repositories {
            let shared = u.backend.as_deref() == Some("s3");
            if shared {
                if let Some(row) = rows
                    .iter_mut()
                    .find(|r| r.tenant == u.tenant && r.location == u.location && r.error.is_none())
                {
                    row.agents.push(agent.clone());
                    continue;
                }
            }
            rows.push(RepoRow {
                tenant: u.tenant,
                agents: vec![agent.clone()],
                backend: u.backend,
                location: u.location,
                points: u.points,
                stored_bytes: u.stored_bytes,
                fs_total_bytes: u.filesystem_total_bytes,
                fs_free_bytes: u.filesystem_free_bytes,
                measured_at: u.measured_at,
                error: u.error.map(|e| format!("{}: {}", e.code, e.message)),
            });
        }
    }
    rows.sort_by(|a, b| a.tenant.cmp(&b.tenant).then(a.location.cmp(&b.location)));
    (rows, errors)
}

/// The running backup runs and their items, cut to what `p` may see, with
/// live progress from the agents for dispatched items.
pub async fn running(o: &Orchestrator, p: &Principal) -> Result<Vec<RunningItem>, String> {
    let store = o.store().clone();
    let runs = tokio::task::spawn_blocking(move || {
        let runs = store.list_runs(None, 200)?;
        let mut out = Vec::new();
        for r in runs
            .into_iter()
            .filter(|r| r.state == RunState::Running && r.kind == RunKind::Backup)
        {
            let items = store.run_items(&r.id)?;
            out.push((r, items));
        }
        Ok::<_, crate::state::StateError>(out)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (run, items) in runs {
        let Some(job) = o.config().jobs.iter().find(|j| j.name == run.job) else {
            continue;
        };
        if !p.sees(&job.tenant) {
            continue;
        }
        for it in items {
            let d = &it.detail;
            let mut row = RunningItem {
                run_id: run.id.clone(),
                job: run.job.clone(),
                tenant: job.tenant.clone(),
                moref: it.item.clone(),
                vm: d
                    .get("vm")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string(),
                state: it.state.as_str().to_string(),
                agent: it.agent.clone(),
                bytes_done: it.bytes,
                bytes_total: d.get("bytes_total").and_then(|v| v.as_u64()).unwrap_or(0),
                rate: 0.0,
                eta_s: None,
                waiting: d
                    .get("waiting")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                error: it.error.clone(),
            };
            if let (ItemState::Dispatched, Some(a), Some(jid)) =
                (it.state, &it.agent, &it.agent_job_id)
            {
                if let Some(api) = o.agent(a) {
                    if let Ok(Ok(j)) =
                        tokio::time::timeout(Duration::from_secs(3), api.job(jid)).await
                    {
                        row.bytes_done = j.bytes_done;
                        row.bytes_total = j.bytes_total;
                        row.rate = j.rate_bytes_per_sec;
                        row.eta_s = j.eta_secs;
                    }
                }
            }
            out.push(row);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn status_from_schedule_and_results() {
        let every6 = Schedule::Every(Duration::from_secs(6 * 3600));
        let daily = Schedule::Daily("02:00".into());
        let now = 100 * H;
        assert_eq!(vm_status(&[], None, None, now), VmStatus::Unprotected);
        assert_eq!(
            vm_status(&[Some(&every6)], None, None, now),
            VmStatus::Never
        );
        assert_eq!(
            vm_status(
                &[Some(&every6)],
                Some(ItemState::Failed),
                Some(now - H),
                now
            ),
            VmStatus::Failed
        );
        assert_eq!(
            vm_status(
                &[Some(&every6)],
                Some(ItemState::Succeeded),
                Some(now - 6 * H),
                now
            ),
            VmStatus::Protected,
            "inside interval + 1 h"
        );
        assert_eq!(
            vm_status(
                &[Some(&every6)],
                Some(ItemState::Succeeded),
                Some(now - 8 * H),
                now
            ),
            VmStatus::Missed
        );
        assert_eq!(
            vm_status(
                &[Some(&daily)],
                Some(ItemState::Succeeded),
                Some(now - 20 * H),
                now
            ),
            VmStatus::Protected
        );
        assert_eq!(
            vm_status(
                &[Some(&daily), Some(&every6)],
                Some(ItemState::Succeeded),
                Some(now - 20 * H),
                now
            ),
            VmStatus::Missed,
            "the tightest schedule counts"
        );
        assert_eq!(
            vm_status(&[None], Some(ItemState::Succeeded), Some(0), now),
            VmStatus::Protected,
            "on demand only: never missed"
        );
    }

    #[test]
    fn plan_filter_parses_form_values() {
        let f: PlanFilter = serde_urlencoded_like("tenant=&mode=hotadd&refused_only=on");
        assert_eq!(f.tenant, None);
        assert_eq!(f.mode.as_deref(), Some("hotadd"));
        assert!(f.refused_only);
        assert_eq!(f.page, None);
        assert_eq!(f.query(3), "mode=hotadd&refused_only=1&page=3");
        let f: PlanFilter = serde_urlencoded_like("tenant=a b&page=2");
        assert_eq!(f.page, Some(2));
        assert_eq!(f.query(1), "tenant=a%20b&page=1");
        for bad in ["page=0", "page=-1", "page=x", "page="] {
            assert_eq!(serde_urlencoded_like(bad).page, None, "{bad}");
        }
    }

    #[test]
    fn pages_cut_rows_and_clamp() {
        let rows: Vec<u32> = (0..450).collect();
        let (p, n, of) = page_of(&rows, 1, 200);
        assert_eq!((p.len(), p[0], n, of), (200, 0, 1, 3));
        let (p, n, _) = page_of(&rows, 3, 200);
        assert_eq!((p.len(), p[0], n), (50, 400, 3));
        let (p, n, _) = page_of(&rows, 99, 200);
        assert_eq!((p.len(), n), (50, 3));
        let none: Vec<u32> = vec![];
        let (p, n, of) = page_of(&none, 5, 200);
        assert_eq!((p.len(), n, of), (0, 1, 1));
    }

    fn serde_urlencoded_like(q: &str) -> PlanFilter {
        let m: serde_json::Map<String, serde_json::Value> = q
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        serde_json::from_value(serde_json::Value::Object(m)).unwrap()
    }
}
