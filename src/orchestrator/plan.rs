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
use crate::agent::api::Info;
use crate::transport::select::{
    render_table, select, select_many, Outcome, Policy, ProxyInfo, Selection, VmInfo,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

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
}

impl Candidates {
    /// Drop an agent for the rest of a planning round.
    pub fn remove(&mut self, id: &str, why: &str) {
        if let Some(i) = self.agents.iter().position(|(a, _)| a == id) {
            self.agents.remove(i);
            self.notes.push(format!("agent {id}: {why}"));
        }
    }
}

/// The tenant's candidate agents among `agents`.
pub fn candidates(tenant: &TenantConfig, agents: &BTreeMap<String, AgentStatus>) -> Candidates {
    let mut c = Candidates::default();
    for id in &tenant.agents {
        match agents.get(id) {
            Some(AgentStatus::Up { info }) => {
                if info.id != *id {
                    c.notes.push(format!(
                        "agent {id}: reports id {:?}; fix [[agent]] id or the agent's [agent] id",
                        info.id
                    ));
                } else if !info.tenants.iter().any(|t| t.name == tenant.name) {
                    c.notes.push(format!(
                        "agent {id}: does not serve tenant {} (its [[tenant]] list lacks it)",
                        tenant.name
                    ));
                } else {
                    c.agents.push((id.clone(), (**info).clone()));
                }
            }
            Some(AgentStatus::Down { error }) => c.notes.push(format!("agent {id}: down: {error}")),
            None => c.notes.push(format!("agent {id}: not configured")),
        }
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

/// Per disk of a selection: proxy, mode and the selector's reason (for history
/// records and summaries).
pub fn disk_summaries(sel: &Selection) -> Vec<serde_json::Value> {
    sel.disks
        .iter()
        .map(|d| {
            let (proxy, mode) = match &d.outcome {
                Outcome::Assigned { proxy, mode } => (Some(proxy.clone()), Some(*mode)),
                Outcome::Refused { .. } => (None, None),
            };
            let reason = d
                .candidates
                .iter()
                .find(|c| c.accepted)
                .map(|c| c.reason.to_string())
                .unwrap_or_else(|| match &d.outcome {
                    Outcome::Refused { reason } => format!("refused: {reason}"),
                    Outcome::Assigned { .. } => String::new(),
                });
            serde_json::json!({
                "disk_key": d.disk_key,
                "label": d.label,
                "proxy": proxy,
                "mode": mode,
                "reason": reason,
            })
        })
        .collect()
}

/// Free slots per agent during planning.
pub type FreeSlots = BTreeMap<String, u32>;

/// Free slots as the agents report them.
pub fn free_slots(agents: &BTreeMap<String, AgentStatus>) -> FreeSlots {
    agents
        .iter()
        .filter_map(|(id, s)| match s {
            AgentStatus::Up { info } => Some((id.clone(), info.slots.free)),
            AgentStatus::Down { .. } => None,
        })
        .collect()
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

fn proxies(
    cands: &Candidates,
    free: &FreeSlots,
    skip: &BTreeSet<String>,
    total: bool,
) -> Vec<ProxyInfo> {
    cands
        .agents
        .iter()
        .filter(|(id, _)| !skip.contains(id))
        .map(|(id, info)| {
            let mut p = info.to_proxy_info();
            p.free_slots = if total {
                info.slots.total
            } else {
                free.get(id).copied().unwrap_or(0)
            };
            p
        })
        .collect()
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

/// Plan one VM: consume slots in `free` when it is dispatched. `skip` lists
/// agents already tried for this VM in this run.
pub fn plan_vm(
    vm: &InventoryVm,
    tenant: &TenantConfig,
    policy: &Policy,
    cands: &Candidates,
    free: &mut FreeSlots,
    skip: &BTreeSet<String>,
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
    let mut now = proxies(cands, free, skip, false);
    if now.is_empty() {
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
    let before: Vec<u32> = now.iter().map(|p| p.free_slots).collect();
    let sel = select_many(std::slice::from_ref(&vm.vm), &mut now, policy)
        .pop()
        .unwrap_or_else(|| select(&vm.vm, &now, policy));
    if sel.is_runnable() {
        let used = assigned(&sel);
        if used.len() == 1 {
            for p in &now {
                free.insert(p.id.clone(), p.free_slots);
            }
            out.decision = Decision::Dispatch {
                agent: used[0].clone(),
                note: None,
            };
            out.selection = Some(sel);
            return out;
        }
        // Spread over several proxies: undo, and try each alone.
        for (p, b) in now.iter_mut().zip(&before) {
            p.free_slots = *b;
        }
        for id in &used {
            let Some(p) = now.iter().find(|p| p.id == *id) else {
                continue;
            };
            let single = select(&vm.vm, std::slice::from_ref(p), policy);
            if single.is_runnable() {
                let n = vm.vm.disks.len() as u32;
                let f = free.entry(id.clone()).or_default();
                *f = f.saturating_sub(n);
                out.decision = Decision::Dispatch {
                    agent: id.clone(),
                    note: Some(format!(
                        "the selector spread the disks over {}; a VM is backed up through one agent (one snapshot), so all go to {id}",
                        used.join(", ")
                    )),
                };
                out.selection = Some(single);
                return out;
            }
        }
    }
    // Not now: would it run once slots free up?
    let cap = proxies(cands, free, skip, true);
    let capsel = select(&vm.vm, &cap, policy);
    let single_ok = capsel.is_runnable() && {
        let used = assigned(&capsel);
        used.len() == 1
            || used.iter().any(|id| {
                cap.iter()
                    .find(|p| p.id == *id)
                    .is_some_and(|p| select(&vm.vm, std::slice::from_ref(p), policy).is_runnable())
            })
    };
    if single_ok {
        out.decision = Decision::Deferred {
            reason: format!(
                "waiting for free slots: needs {} slot(s) on one of {}",
                vm.vm.disks.len(),
                assigned(&capsel).join(", ")
            ),
        };
        out.selection = Some(sel);
    } else if capsel.is_runnable() {
        out.decision = Decision::Refused {
            reason: format!(
                "its disks need different proxies ({}) and a VM is backed up through one agent",
                assigned(&capsel).join(", ")
            ),
        };
        out.selection = Some(capsel);
    } else {
        let reason = capsel
            .refusal_summary()
            .unwrap_or_else(|| "refused by the transport selector".into());
        // With some of the tenant's agents missing, this may change when they
        // come back: unavailable rather than refused.
        out.decision = if cands.notes.is_empty() {
            Decision::Refused { reason }
        } else {
            Decision::Unavailable {
                reason: format!(
                    "{reason}\n(agents not available: {})",
                    cands.notes.join("; ")
                ),
            }
        };
        out.selection = Some(capsel);
    }
    out
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

/// Plan a job's VMs (consuming `free`).
pub fn plan_job(
    cfg: &OrchestratorConfig,
    job: &super::config::JobConfig,
    vms: &[InventoryVm],
    agents: &BTreeMap<String, AgentStatus>,
    free: &mut FreeSlots,
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
    let plans = vms
        .iter()
        .map(|v| plan_vm(v, tenant, &job.policy, &cands, free, &BTreeSet::new()))
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
                    "  {id}: up, {} of {} slots free, modes {}, proxy VM {}, tenants {}\n",
                    info.slots.free,
                    info.slots.total,
                    info.modes
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join("+"),
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
