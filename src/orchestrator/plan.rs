//! Planning, pure: which agent backs up each VM of a job, and why, from the
//! agents' `/v1/info` (or why they are unavailable) and the job's policy.
//!
//! The transport selector decides ([`select_many`] with slot accounting, one VM
//! at a time, in inventory order); this module adds what is the orchestrator's to
//! decide:
//! - **Tenant boundary.** Candidates are the tenant's configured agents that are
//!   up and report serving the tenant. An encrypted VM (or disk) whose key
//!   provider is not the tenant's is refused: it belongs to another tenant's
//!   repository and KMS.
//! - **One agent per VM.** A VM is backed up through one agent (one snapshot). If
//!   the selector spreads its disks over several proxies (only when slots are
//!   short), the VM goes to the first of those proxies that can take every disk
//!   alone ([`select`] with that proxy only); otherwise it waits.
//! - **Refused or waiting.** A VM the selector refuses now is *deferred* when it
//!   would be runnable with the agents' total slots (it waits for slots), and
//!   *refused* otherwise, with the selector's explanation.

use super::config::{OrchestratorConfig, TenantConfig};
use super::inventory::InventoryVm;
use super::scheduler::{Allowance, Load};
use crate::agent::api::Info;
use crate::transport::select::{
    check_candidate, disk_crypto, human_secs, render_table, select, CandidateVerdict, DiskDecision,
    Mode, Outcome, Policy, ProxyInfo, Reason, Refusal, Selection, TieBreak, VmInfo,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// An agent as the planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AgentStatus {
    /// Answered `/v1/info`.
    Up {
        /// What it said.
        info: Box<Info>,
    },
    /// Did not answer (or answered wrongly).
    Down {
        /// Why.
        error: String,
    },
}

/// The candidate agents of one tenant.
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    /// Agents that are up and serve the tenant, in configuration order.
    pub agents: Vec<(String, Info)>,
    /// Why the other configured agents of the tenant are not candidates.
    pub notes: Vec<String>,
    /// The same, per agent id, for explanations.
    pub absent: Vec<(String, String)>,
}

impl Candidates {
    /// Drop an agent for the rest of a planning round.
    pub fn remove(&mut self, id: &str, why: &str) {
        if let Some(i) = self.agents.iter().position(|(a, _)| a == id) {
            self.agents.remove(i);
            self.notes.push(format!("agent {id}: {why}"));
            self.absent.push((id.to_string(), why.to_string()));
        }
    }
}

/// The tenant's candidate agents among `agents`.
pub fn candidates(tenant: &TenantConfig, agents: &BTreeMap<String, AgentStatus>) -> Candidates {
    let mut c = Candidates::default();
    for id in &tenant.agents {
        let why = match agents.get(id) {
            Some(AgentStatus::Up { info }) => {
                if info.id != *id {
                    format!(
                        "reports id {:?}; fix [[agent]] id or the agent's [agent] id",
                        info.id
                    )
                } else if !info.tenants.iter().any(|t| t.name == tenant.name) {
                    format!(
                        "does not serve tenant {} (its [[tenant]] list lacks it)",
                        tenant.name
                    )
                } else {
                    c.agents.push((id.clone(), (**info).clone()));
                    continue;
                }
            }
            Some(AgentStatus::Down { error }) => format!("down: {error}"),
            None => "not configured".to_string(),
        };
        c.notes.push(format!("agent {id}: {why}"));
        c.absent.push((id.clone(), why));
    }
    c
}

/// What happens to one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decision {
    /// Send it to `agent` now.
    Dispatch {
        /// Agent id.
        agent: String,
        /// Why not the selector's first plan, if it was changed.
        note: Option<String>,
    },
    /// Runnable, but not with the slots free now.
    Deferred {
        /// Why.
        reason: String,
    },
    /// Never runnable with these agents and policy.
    Refused {
        /// Why (the selector's explanation, or the tenant boundary).
        reason: String,
    },
    /// No candidate agent is available at all.
    Unavailable {
        /// Why (down agents and the like).
        reason: String,
    },
}

/// The plan for one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmPlan {
    /// VM name.
    pub vm: String,
    /// VM moref.
    pub moref: String,
    /// Folder.
    pub folder: String,
    /// Decision.
    pub decision: Decision,
    /// The selector's plan behind the decision (for a dispatch: the per-disk
    /// proxy, mode and reasons; for a refusal: every candidate's reason).
    pub selection: Option<Selection>,
}

/// Per disk of a selection: proxy, mode and the placement's reason (for
/// history records and summaries).
pub fn disk_summaries(sel: &Selection, waited: Duration) -> Vec<serde_json::Value> {
    sel.disks
        .iter()
        .map(|d| {
            let (proxy, mode) = match &d.outcome {
                Outcome::Assigned { proxy, mode } => (Some(proxy.clone()), Some(*mode)),
                Outcome::Refused { .. } => (None, None),
            };
            serde_json::json!({
                "disk_key": d.disk_key,
                "label": d.label,
                "proxy": proxy,
                "mode": mode,
                "reason": placement_summary(d, waited),
            })
        })
        .collect()
}

/// Whether `r` is one of the selector's rules ruling a candidate out (as
/// opposed to capacity, waiting or another candidate being preferred).
fn rules_out(r: &Reason) -> bool {
    matches!(
        r,
        Reason::NetworkModeForced { .. }
            | Reason::FailoverDisabled
            | Reason::ClearTextForbiddenEncrypted
            | Reason::ClearTextNotAllowedByPolicy
            | Reason::ModeDisabled { .. }
            | Reason::NotAVm
            | Reason::ProxyNotEncrypted { .. }
            | Reason::KeyProviderUnknown
            | Reason::KeyProviderMismatch { .. }
            | Reason::DatastoreNotVisible { .. }
            | Reason::HostNotReachable { .. }
    )
}

/// The one line an operator reads for a disk, naming every agent of the
/// tenant: the decision and why, how long the VM waited for its slot, then each
/// other agent with its most telling reason (the first mode in which it was
/// valid but not taken, else why the first mode ruled it out). Used in run
/// records, the agent's job record and log (sent as `placement`), and the demo.
pub fn placement_summary(d: &DiskDecision, waited: Duration) -> String {
    let Some(accepted) = d.candidates.iter().find(|c| c.accepted) else {
        return d.reason_summary();
    };
    let mut s = format!(
        "{} via {}: {}",
        accepted.mode, accepted.proxy, accepted.reason
    );
    if waited.as_secs() > 0 && !matches!(accepted.reason, Reason::CapacityFallback { .. }) {
        s.push_str(&format!(
            "; waited {} for a free slot",
            human_secs(waited.as_secs())
        ));
    }
    let mut seen: Vec<&str> = vec![accepted.proxy.as_str()];
    for c in &d.candidates {
        if seen.contains(&c.proxy.as_str()) {
            continue;
        }
        seen.push(&c.proxy);
        let mine: Vec<&CandidateVerdict> =
            d.candidates.iter().filter(|x| x.proxy == c.proxy).collect();
        let pick = mine
            .iter()
            .find(|x| !rules_out(&x.reason))
            .unwrap_or(&mine[0]);
        s.push_str(&format!(
            "; {} ({}): {}",
            pick.proxy, pick.mode, pick.reason
        ));
    }
    s
}

/// Slots per agent as the agents report them: `(total, free)`.
pub fn reported_slots(agents: &BTreeMap<String, AgentStatus>) -> BTreeMap<String, (u32, u32)> {
    agents
        .iter()
        .filter_map(|(id, s)| match s {
            AgentStatus::Up { info } => Some((id.clone(), (info.slots.total, info.slots.free))),
            AgentStatus::Down { .. } => None,
        })
        .collect()
}

/// The load of agents as they report themselves, before anything is dispatched
/// (`ferry orchestrator plan`).
pub fn reported_load(agents: &BTreeMap<String, AgentStatus>) -> Load {
    super::scheduler::Ledger::default().load(&reported_slots(agents))
}

/// Effective key providers of an encrypted VM and its disks (as the selector
/// counts them: a disk of an encrypted VM is encrypted).
fn providers(vm: &VmInfo) -> BTreeSet<String> {
    let norm = |s: &Option<String>| s.as_ref().filter(|p| !p.is_empty()).cloned();
    let mut out = BTreeSet::new();
    for d in &vm.disks {
        if d.encrypted || vm.encrypted {
            if let Some(p) = norm(&d.key_provider).or_else(|| norm(&vm.key_provider)) {
                out.insert(p);
            }
        }
    }
    if vm.encrypted {
        if let Some(p) = norm(&vm.key_provider) {
            out.insert(p);
        }
    }
    out
}

/// Why `vm` does not belong to `tenant`, if it does not.
pub fn foreign_provider(tenant: &TenantConfig, vm: &VmInfo) -> Option<String> {
    let own = tenant.key_provider.as_deref()?;
    let foreign: Vec<String> = providers(vm).into_iter().filter(|p| p != own).collect();
    (!foreign.is_empty()).then(|| {
        format!(
            "VM {} is encrypted under key provider {}, not tenant {}'s {own}: it belongs to another tenant's KMS and repository, so it is never backed up here (check the job's VM selection)",
            vm.name,
            foreign.join(", "),
            tenant.name
        )
    })
}

/// Proxies a selection assigns disks to, most disks first, then by id.
fn assigned(sel: &Selection) -> Vec<String> {
    let mut n: BTreeMap<String, usize> = BTreeMap::new();
    for d in &sel.disks {
        if let Outcome::Assigned { proxy, .. } = &d.outcome {
            *n.entry(proxy.clone()).or_default() += 1;
        }
    }
    let mut v: Vec<(String, usize)> = n.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter().map(|(p, _)| p).collect()
}

/// One agent that can take every disk of a VM alone (one snapshot), at its
/// total capacity, and the modes it would use per disk.
struct WholeVm {
    /// Position among the tenant's candidate agents.
    pos: usize,
    id: String,
    /// Sum of the disks' positions in the policy's mode order: lower is better.
    rank: usize,
    /// Mode per disk.
    modes: Vec<Mode>,
}

/// The agents that could take `vm` whole, each with its modes, in candidate order.
fn whole_vm_options(
    vm: &VmInfo,
    policy: &Policy,
    agents: &[(usize, &String, &Info)],
) -> Vec<WholeVm> {
    let order = policy.mode_order();
    agents
        .iter()
        .filter_map(|(pos, id, info)| {
            let mut p = info.to_proxy_info();
            p.free_slots = info.slots.total;
            let sel = select(vm, std::slice::from_ref(&p), policy);
            if !sel.is_runnable() {
                return None;
            }
            let modes: Vec<Mode> = sel
                .disks
                .iter()
                .filter_map(|d| match &d.outcome {
                    Outcome::Assigned { mode, .. } => Some(*mode),
                    Outcome::Refused { .. } => None,
                })
                .collect();
            let rank = modes
                .iter()
                .map(|m| order.iter().position(|o| o == m).unwrap_or(order.len()))
                .sum();
            Some(WholeVm {
                pos: *pos,
                id: (*id).clone(),
                rank,
                modes,
            })
        })
        .collect()
}

/// `hotadd` or `hotadd+nbdssl`: the modes an option uses, for reasons.
fn modes_text(modes: &[Mode]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for m in modes {
        if !seen.contains(&m.as_str()) {
            seen.push(m.as_str());
        }
    }
    seen.join("+")
}

/// Plan one VM against `load` (taking its slots when it is dispatched). `skip`
/// lists agents already tried for this VM in this run; `allow` is what the job's
/// wait policy grants it now.
///
/// The VM goes to the best agent that can take it whole (best: the fewest
/// steps down the policy's mode order over its disks) when that agent has room;
/// otherwise it waits for it, unless `allow` grants a lesser mode now. The
/// selection names every agent of the tenant with its reason, the busy ones
/// with who holds their slots.
pub fn plan_vm(
    vm: &InventoryVm,
    tenant: &TenantConfig,
    policy: &Policy,
    cands: &Candidates,
    load: &mut Load,
    skip: &BTreeSet<String>,
    allow: &Allowance,
) -> VmPlan {
    let mut out = VmPlan {
        vm: vm.vm.name.clone(),
        moref: vm.vm.moref.clone(),
        folder: vm.folder.clone(),
        decision: Decision::Refused {
            reason: String::new(),
        },
        selection: None,
    };
    if let Some(reason) = foreign_provider(tenant, &vm.vm) {
        out.decision = Decision::Refused { reason };
        return out;
    }
    if vm.vm.disks.is_empty() {
        out.decision = Decision::Refused {
            reason: format!("VM {} has no disks: nothing to back up", vm.vm.name),
        };
        return out;
    }
    let agents: Vec<(usize, &String, &Info)> = cands
        .agents
        .iter()
        .enumerate()
        .filter(|(_, (id, _))| !skip.contains(id))
        .map(|(i, (id, info))| (i, id, info))
        .collect();
    if agents.is_empty() {
        let mut why = cands.notes.clone();
        if !skip.is_empty() {
            why.push(format!(
                "already tried for this VM: {}",
                skip.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        out.decision = Decision::Unavailable {
            reason: format!(
                "no agent of tenant {} is available ({})",
                tenant.name,
                if why.is_empty() {
                    "none configured".into()
                } else {
                    why.join("; ")
                }
            ),
        };
        return out;
    }
    let options = whole_vm_options(&vm.vm, policy, &agents);
    let needed = vm.vm.disks.len() as u32;
    let fits = |o: &&WholeVm| load.free_of(&o.id) >= needed;
    // Best rank first; among equals more free slots, then the tenant's agent order.
    let prefer = |o: &&WholeVm| (o.rank, std::cmp::Reverse(load.free_of(&o.id)), o.pos);
    // The best option: what the VM waits for (or falls back from).
    let Some(waited_for) = options.iter().min_by_key(prefer) else {
        refuse_at_capacity(&mut out, &vm.vm, policy, cands, skip);
        return out;
    };
    let best = waited_for.rank;
    let best_fit = options
        .iter()
        .filter(|o| o.rank == best)
        .filter(fits)
        .min_by_key(prefer);
    let lesser = options
        .iter()
        .filter(|o| o.rank > best)
        .filter(fits)
        .filter(|o| allow.grant.allows(&o.id))
        .min_by_key(prefer);
    let chosen: Option<(&WholeVm, Option<Reason>)> = match (best_fit, lesser) {
        (Some(o), _) => Some((o, None)),
        (None, Some(o)) => Some((
            o,
            Some(Reason::CapacityFallback {
                busy: waited_for.id.clone(),
                busy_mode: waited_for.modes[0],
                busy_key_provider: info_of(cands, &waited_for.id)
                    .and_then(|i| i.key_provider.clone()),
                waited_secs: allow.waited.as_secs(),
                policy: allow.policy.to_string(),
            }),
        )),
        (None, None) => None,
    };
    let sel = explain(
        &vm.vm,
        policy,
        cands,
        skip,
        load,
        &options,
        chosen.as_ref(),
        waited_for,
        allow,
    );
    match chosen {
        Some((o, fallback)) => {
            load.take(&o.id, &vm.vm.name, needed);
            out.decision = Decision::Dispatch {
                agent: o.id.clone(),
                note: fallback.map(|r| format!("{} via {}: {r}", modes_text(&o.modes), o.id)),
            };
        }
        None => {
            let busy = Reason::Busy {
                free: load.free_of(&waited_for.id),
                needed,
                busy_with: load
                    .busy_with
                    .get(&waited_for.id)
                    .cloned()
                    .unwrap_or_default(),
            };
            let mut reason = format!(
                "waiting for a free slot: {} via {}: {busy}",
                modes_text(&waited_for.modes),
                waited_for.id
            );
            if let Some(l) = options.iter().filter(|o| o.rank > best).min_by_key(prefer) {
                reason.push_str(&format!(
                    "; {} via {} is valid, but policy {} waits{}",
                    modes_text(&l.modes),
                    l.id,
                    allow.policy,
                    if allow.waited.is_zero() {
                        String::new()
                    } else {
                        format!(" (waited {} so far)", human_secs(allow.waited.as_secs()))
                    }
                ));
            }
            out.decision = Decision::Deferred { reason };
        }
    }
    out.selection = Some(sel);
    out
}

fn info_of<'a>(cands: &'a Candidates, id: &str) -> Option<&'a Info> {
    cands.agents.iter().find(|(a, _)| a == id).map(|(_, i)| i)
}

/// No agent can take the VM whole even when idle: refused (or unavailable while
/// some of the tenant's agents are missing), with the selector's explanation
/// over every available agent at capacity.
fn refuse_at_capacity(
    out: &mut VmPlan,
    vm: &VmInfo,
    policy: &Policy,
    cands: &Candidates,
    skip: &BTreeSet<String>,
) {
    let cap: Vec<ProxyInfo> = cands
        .agents
        .iter()
        .filter(|(id, _)| !skip.contains(id))
        .map(|(_, info)| {
            let mut p = info.to_proxy_info();
            p.free_slots = info.slots.total;
            p
        })
        .collect();
    let mut capsel = select(vm, &cap, policy);
    let first_mode = policy.mode_order()[0];
    for d in &mut capsel.disks {
        d.candidates
            .extend(absent_verdicts(cands, skip, first_mode));
    }
    out.decision = if capsel.is_runnable() {
        Decision::Refused {
            reason: format!(
                "its disks need different proxies ({}) and a VM is backed up through one agent",
                assigned(&capsel).join(", ")
            ),
        }
    } else {
        let reason = capsel
            .refusal_summary()
            .unwrap_or_else(|| "refused by the transport selector".into());
        // With some of the tenant's agents missing, this may change when they
        // come back: unavailable rather than refused.
        if cands.notes.is_empty() && skip.is_empty() {
            Decision::Refused { reason }
        } else {
            let mut missing = cands.notes.clone();
            missing.extend(
                skip.iter()
                    .map(|a| format!("agent {a}: already tried for this VM")),
            );
            Decision::Unavailable {
                reason: format!("{reason}\n(agents not available: {})", missing.join("; ")),
            }
        }
    };
    out.selection = Some(capsel);
}

/// The tenant's agents that are not candidates now (down, not serving it,
/// already tried for this VM), as one verdict each.
fn absent_verdicts(
    cands: &Candidates,
    skip: &BTreeSet<String>,
    mode: Mode,
) -> Vec<CandidateVerdict> {
    cands
        .absent
        .iter()
        .cloned()
        .chain(skip.iter().map(|a| {
            (
                a.clone(),
                "already tried for this VM in this run".to_string(),
            )
        }))
        .map(|(id, why)| CandidateVerdict {
            proxy: id,
            proxy_key_provider: None,
            mode,
            accepted: false,
            reason: Reason::AgentUnavailable { why },
        })
        .collect()
}

/// The selection an operator reads: every disk, every agent of the tenant in
/// every mode with its reason: the selector's rules for each candidate, then
/// capacity and the wait policy on top (busy, waiting for a better mode, taken
/// as a fallback), and the agents that are not candidates now.
#[allow(clippy::too_many_arguments)]
fn explain(
    vm: &VmInfo,
    policy: &Policy,
    cands: &Candidates,
    skip: &BTreeSet<String>,
    load: &Load,
    options: &[WholeVm],
    chosen: Option<&(&WholeVm, Option<Reason>)>,
    waited_for: &WholeVm,
    allow: &Allowance,
) -> Selection {
    let order = policy.mode_order();
    let rank_of = |m: Mode| order.iter().position(|o| *o == m).unwrap_or(order.len());
    let needed = vm.disks.len() as u32;
    let option = |id: &str| options.iter().find(|o| o.id == id);
    let busy = |id: &str| Reason::Busy {
        free: load.free_of(id),
        needed,
        busy_with: load.busy_with.get(id).cloned().unwrap_or_default(),
    };
    // Why `winner` beat `loser` (both valid in the same mode).
    let rule = |winner: &WholeVm, loser: &WholeVm| {
        if winner.rank != loser.rank {
            TieBreak::ServesMoreDisks
        } else if load.free_of(&winner.id) != load.free_of(&loser.id) {
            TieBreak::MoreFreeSlots
        } else {
            TieBreak::EarlierInList
        }
    };
    let mut disks = Vec::with_capacity(vm.disks.len());
    for (di, disk) in vm.disks.iter().enumerate() {
        let mut candidates = Vec::new();
        for &mode in &order {
            for (id, info) in cands.agents.iter().filter(|(id, _)| !skip.contains(id)) {
                let proxy = info.to_proxy_info();
                let reason = if let Some(r) = check_candidate(vm, disk, &proxy, mode, policy) {
                    r
                } else if let Some(o) = option(id) {
                    match chosen {
                        Some((c, fallback)) if c.id == *id && c.modes[di] == mode => {
                            fallback.clone().unwrap_or_else(|| {
                                let runner_up = options
                                    .iter()
                                    .filter(|x| x.id != c.id && x.modes[di] == mode)
                                    .filter(|x| load.free_of(&x.id) >= needed)
                                    .min_by_key(|x| (x.rank, x.pos));
                                Reason::Chosen {
                                    rule: runner_up.map(|r| rule(c, r)),
                                }
                            })
                        }
                        Some((c, _)) if c.id == *id => Reason::HigherModeChosen {
                            chosen: c.id.clone(),
                            mode: c.modes[di],
                        },
                        _ if load.free_of(id) < needed => busy(id),
                        Some((c, _)) if rank_of(mode) > rank_of(c.modes[di]) => {
                            Reason::HigherModeChosen {
                                chosen: c.id.clone(),
                                mode: c.modes[di],
                            }
                        }
                        Some((c, _)) => Reason::BetterCandidateChosen {
                            chosen: c.id.clone(),
                            rule: rule(c, o),
                        },
                        None if o.rank > waited_for.rank => Reason::WaitingForBetterMode {
                            proxy: waited_for.id.clone(),
                            mode: waited_for.modes[di],
                            policy: allow.policy.to_string(),
                        },
                        None => busy(id),
                    }
                } else {
                    Reason::CannotTakeWholeVm
                };
                candidates.push(CandidateVerdict {
                    proxy: id.clone(),
                    proxy_key_provider: proxy.key_provider.clone().filter(|k| !k.is_empty()),
                    mode,
                    accepted: chosen.is_some_and(|(c, _)| c.id == *id && c.modes[di] == mode),
                    reason,
                });
            }
        }
        candidates.extend(absent_verdicts(cands, skip, order[0]));
        let outcome = match chosen {
            Some((c, _)) => Outcome::Assigned {
                proxy: c.id.clone(),
                mode: c.modes[di],
            },
            None => Outcome::Refused {
                reason: Refusal::WaitingForSlot {
                    proxy: waited_for.id.clone(),
                    mode: waited_for.modes[di],
                },
            },
        };
        let (encrypted, key_provider) = disk_crypto(vm, disk);
        disks.push(DiskDecision {
            disk_key: disk.key,
            label: disk.label.clone(),
            datastore: disk.datastore.clone(),
            encrypted,
            key_provider,
            outcome,
            candidates,
        });
    }
    Selection {
        vm: vm.name.clone(),
        moref: vm.moref.clone(),
        encrypted: vm.encrypted,
        key_provider: vm.key_provider.clone().filter(|k| !k.trim().is_empty()),
        refused: chosen.is_none(),
        disks,
    }
}

/// The plan of one job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobPlan {
    /// Job name.
    pub job: String,
    /// Tenant.
    pub tenant: String,
    /// vCenter.
    pub vcenter: String,
    /// Why some of the tenant's agents are not candidates.
    pub agent_notes: Vec<String>,
    /// Inventory error, if the VMs could not be listed.
    pub error: Option<String>,
    /// One plan per selected VM, in inventory order.
    pub vms: Vec<VmPlan>,
}

/// Plan a job's VMs (consuming `load`), each as if it had not waited yet.
pub fn plan_job(
    cfg: &OrchestratorConfig,
    job: &super::config::JobConfig,
    vms: &[InventoryVm],
    agents: &BTreeMap<String, AgentStatus>,
    load: &mut Load,
) -> JobPlan {
    let Some(tenant) = cfg.tenant(&job.tenant) else {
        return JobPlan {
            job: job.name.clone(),
            tenant: job.tenant.clone(),
            vcenter: job.vcenter.clone(),
            agent_notes: vec![],
            error: Some(format!("no tenant {}", job.tenant)),
            vms: vec![],
        };
    };
    let cands = candidates(tenant, agents);
    let allow = Allowance::fresh(job.lesser_mode);
    let plans = vms
        .iter()
        .map(|v| {
            plan_vm(
                v,
                tenant,
                &job.policy,
                &cands,
                load,
                &BTreeSet::new(),
                &allow,
            )
        })
        .collect();
    JobPlan {
        job: job.name.clone(),
        tenant: tenant.name.clone(),
        vcenter: job.vcenter.clone(),
        agent_notes: cands.notes,
        error: None,
        vms: plans,
    }
}

/// The whole `ferry orchestrator plan` answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanReport {
    /// Every configured agent.
    pub agents: BTreeMap<String, AgentStatus>,
    /// Every (selected) job.
    pub jobs: Vec<JobPlan>,
}

impl PlanReport {
    /// Plain text: agents, then per job the selector's table and every decision
    /// that is not a plain dispatch.
    pub fn render(&self, explain: bool) -> String {
        let mut s = String::from("AGENTS\n");
        for (id, st) in &self.agents {
            match st {
                AgentStatus::Up { info } => s.push_str(&format!(
                    "  {id}: up, {} of {} slots free, modes {} carried by {}, proxy VM {}, tenants {}\n",
                    info.slots.free,
                    info.slots.total,
                    info.modes
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join("+"),
                    info.data_path,
                    match &info.key_provider {
                        Some(k) => format!("encrypted under {k}"),
                        None => "unencrypted".into(),
                    },
                    info.tenants
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                AgentStatus::Down { error } => s.push_str(&format!("  {id}: DOWN: {error}\n")),
            }
        }
        for j in &self.jobs {
            s.push_str(&format!(
                "\nJOB {} (tenant {}, vCenter {}): {} VM(s)\n",
                j.job,
                j.tenant,
                j.vcenter,
                j.vms.len()
            ));
            if let Some(e) = &j.error {
                s.push_str(&format!("  cannot plan: {e}\n"));
                continue;
            }
            for n in &j.agent_notes {
                s.push_str(&format!("  note: {n}\n"));
            }
            let sels: Vec<Selection> = j
                .vms
                .iter()
                .filter(|v| matches!(v.decision, Decision::Dispatch { .. }))
                .filter_map(|v| v.selection.clone())
                .collect();
            if !sels.is_empty() {
                for line in render_table(&sels).lines() {
                    s.push_str(&format!("  {line}\n"));
                }
            }
            for v in &j.vms {
                let line = match &v.decision {
                    Decision::Dispatch {
                        note: Some(n),
                        agent,
                    } => format!("{} -> {agent}: {n}", v.vm),
                    Decision::Dispatch { note: None, .. } => continue,
                    Decision::Deferred { reason } => format!("{}: DEFERRED: {reason}", v.vm),
                    Decision::Refused { reason } => format!("{}: REFUSED: {reason}", v.vm),
                    Decision::Unavailable { reason } => format!("{}: UNAVAILABLE: {reason}", v.vm),
                };
                for (i, l) in line.lines().enumerate() {
                    s.push_str(if i == 0 { "  " } else { "    " });
                    s.push_str(l);
                    s.push('\n');
                }
            }
            if explain {
                for v in &j.vms {
                    if let Some(sel) = &v.selection {
                        for l in sel.explain().lines() {
                            s.push_str(&format!("  {l}\n"));
                        }
                    }
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests;
