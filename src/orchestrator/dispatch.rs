//! Fair dispatch, pure: the orchestrator-wide queue of VMs waiting to be
//! dispatched, kept per tenant and handed out round-robin across tenants
//! ([`Round`]); the snapshot caps per host and per datastore (a VM counts
//! against its host and every datastore of its disks from its dispatch until
//! its agent job ends: snapshots stun VMs, providers cap them); and the back-off
//! of an agent that answered busy (`429`) although the slot ledger said it had
//! room ([`Dispatcher::busy`]).
//!
//! This module decides *when* and *in what order* a waiting VM is offered to the
//! planner, never *where* or *how*: which agent and mode take the VM stays the
//! planner's and the transport selector's decision ([`super::plan`],
//! [`super::scheduler`]). One tenant's 2,000 VMs never starve another's 20: a
//! round gives every tenant one dispatch in turn, and the next round starts with
//! the tenant after the last one served.
//!
//! Must not: do I/O, read clocks or random numbers (callers pass `now_ms` and a
//! jitter fraction), or decide transports.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

/// Snapshot caps (`[dispatch]` in the orchestrator's configuration); `0` means
/// no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// VMs with a running backup (a snapshot) per ESXi host.
    pub per_host: u32,
    /// VMs with a running backup per datastore (a VM counts once per datastore
    /// holding one of its disks).
    pub per_datastore: u32,
}

/// Where a VM's snapshot lands: its host and the datastores of its disks, each
/// scoped by vCenter (two vCenters may both have an `esx-01`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Footprint {
    /// vCenter name (configuration).
    pub vcenter: String,
    /// ESXi host name.
    pub host: String,
    /// Datastores of the VM's disks.
    pub datastores: BTreeSet<String>,
}

/// Why a VM may not be dispatched now although it is next in line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    /// Its host already has `running` backups, the cap.
    Host {
        /// Host name.
        host: String,
        /// Backups running on it.
        running: u32,
        /// `max_snapshots_per_host`.
        cap: u32,
    },
    /// One of its datastores already has `running` backups, the cap.
    Datastore {
        /// Datastore name.
        datastore: String,
        /// Backups running on it.
        running: u32,
        /// `max_snapshots_per_datastore`.
        cap: u32,
    },
}

impl Blocked {
    /// A short, stable kind for counting waits: `host esx-01` / `datastore ds-a`.
    pub fn kind(&self) -> String {
        match self {
            Blocked::Host { host, .. } => format!("host {host}"),
            Blocked::Datastore { datastore, .. } => format!("datastore {datastore}"),
        }
    }
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocked::Host { host, running, cap } => write!(
                f,
                "waiting for host {host}: {running} backup(s) with a snapshot running there, max_snapshots_per_host = {cap}"
            ),
            Blocked::Datastore {
                datastore,
                running,
                cap,
            } => write!(
                f,
                "waiting for datastore {datastore}: {running} backup(s) with a snapshot running there, max_snapshots_per_datastore = {cap}"
            ),
        }
    }
}

/// One waiting VM.
#[derive(Debug, Clone)]
struct Waiting {
    key: String,
    footprint: Footprint,
}

/// Back-off of one agent after busy answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    /// No dispatch to the agent before this (ms since the epoch).
    until_ms: u64,
    /// Busy answers in a row.
    strikes: u32,
}

/// First back-off after a busy answer.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The orchestrator-wide dispatch state: per-tenant queues, running VMs'
/// footprints against the caps, agents in back-off, and counters.
#[derive(Debug, Clone, Default)]
pub struct Dispatcher {
    caps: Caps,
    /// Tenants in the order they first queued (the round-robin ring).
    ring: Vec<String>,
    /// The tenant the next round starts with (index into `ring`).
    next: usize,
    queues: BTreeMap<String, VecDeque<Waiting>>,
    /// Tenant and footprint of each queued key (offers look them up by key:
    /// no walk along a queue of thousands).
    queued: BTreeMap<String, (String, Footprint)>,
    running: BTreeMap<String, Footprint>,
    on_host: BTreeMap<(String, String), u32>,
    on_datastore: BTreeMap<(String, String), u32>,
    backoff: BTreeMap<String, Backoff>,
    stats: DispatchStats,
}

/// Counters of a dispatcher's life, for logs, `ferry-sim night` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DispatchStats {
    /// VMs dispatched.
    pub dispatched: u64,
    /// Busy answers (`429`) from agents.
    pub busy_answers: u64,
    /// Offers held back by a cap, per kind (`host esx-01`, `datastore ds-a`).
    pub cap_waits: BTreeMap<String, u64>,
    /// Highest number of VMs running at once per host (`vcenter/host`).
    pub peak_per_host: BTreeMap<String, u32>,
    /// Highest number of VMs running at once per datastore (`vcenter/datastore`).
    pub peak_per_datastore: BTreeMap<String, u32>,
}

impl Dispatcher {
    /// An empty dispatcher with these caps.
    pub fn new(caps: Caps) -> Dispatcher {
        Dispatcher {
            caps,
            ..Dispatcher::default()
        }
    }

    /// The caps.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Counters so far.
    pub fn stats(&self) -> &DispatchStats {
        &self.stats
    }

    /// Queue `key` (a run's VM) at the end of `tenant`'s queue. A key already
    /// queued or running is left as it is.
    pub fn enqueue(&mut self, tenant: &str, key: &str, footprint: Footprint) {
        if self.queued.contains_key(key) || self.running.contains_key(key) {
            return;
        }
        if !self.ring.iter().any(|t| t == tenant) {
            self.ring.push(tenant.to_string());
        }
        self.queued
            .insert(key.to_string(), (tenant.to_string(), footprint.clone()));
        self.queues
            .entry(tenant.to_string())
            .or_default()
            .push_back(Waiting {
                key: key.to_string(),
                footprint,
            });
    }

    /// Take `key` out of the queue without dispatching it (refused, failed,
    /// run over). Returns whether it was queued.
    pub fn dequeue(&mut self, key: &str) -> bool {
        let Some((tenant, _)) = self.queued.remove(key) else {
            return false;
        };
        if let Some(q) = self.queues.get_mut(&tenant) {
            q.retain(|w| w.key != key);
        }
        true
    }

    /// Whether `key` waits in the queue.
    pub fn is_queued(&self, key: &str) -> bool {
        self.queued.contains_key(key)
    }

    /// VMs waiting, over all tenants.
    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }

    /// VMs dispatched and not yet finished.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Why `footprint` may not start now, if a cap holds it back.
    pub fn blocked(&self, footprint: &Footprint) -> Option<Blocked> {
        let cap = self.caps.per_host;
        if cap > 0 {
            let running = self
                .on_host
                .get(&(footprint.vcenter.clone(), footprint.host.clone()))
                .copied()
                .unwrap_or(0);
            if running >= cap {
                return Some(Blocked::Host {
                    host: footprint.host.clone(),
                    running,
                    cap,
                });
            }
        }
        let cap = self.caps.per_datastore;
        if cap > 0 {
            for ds in &footprint.datastores {
                let running = self
                    .on_datastore
                    .get(&(footprint.vcenter.clone(), ds.clone()))
                    .copied()
                    .unwrap_or(0);
                if running >= cap {
                    return Some(Blocked::Datastore {
                        datastore: ds.clone(),
                        running,
                        cap,
                    });
                }
            }
        }
        None
    }

    /// `key` was dispatched (sent to an agent, which accepted it): it leaves the
    /// queue and counts against its host and datastores until [`Self::finish`].
    /// Returns false (and changes nothing) when a cap forbids it — callers
    /// offer only what [`Round::next`] gave them, so that does not happen.
    pub fn start(&mut self, key: &str) -> bool {
        let Some((tenant, footprint)) = self.queued.get(key).cloned() else {
            return false;
        };
        if self.blocked(&footprint).is_some() {
            return false;
        }
        let Some(pos) = self
            .queues
            .get(&tenant)
            .and_then(|q| q.iter().position(|w| w.key == key))
        else {
            return false;
        };
        let Some(w) = self.queues.get_mut(&tenant).and_then(|q| q.remove(pos)) else {
            return false;
        };
        self.queued.remove(key);
        let host = (w.footprint.vcenter.clone(), w.footprint.host.clone());
        let n = self.on_host.entry(host.clone()).or_default();
        *n += 1;
        let peak = self
            .stats
            .peak_per_host
            .entry(format!("{}/{}", host.0, host.1))
            .or_default();
        *peak = (*peak).max(*n);
        for ds in &w.footprint.datastores {
            let k = (w.footprint.vcenter.clone(), ds.clone());
            let n = self.on_datastore.entry(k).or_default();
            *n += 1;
            let peak = self
                .stats
                .peak_per_datastore
                .entry(format!("{}/{ds}", w.footprint.vcenter))
                .or_default();
            *peak = (*peak).max(*n);
        }
        self.stats.dispatched += 1;
        self.running.insert(key.to_string(), w.footprint);
        true
    }

    /// `key`'s agent job ended (or was given up): its host and datastores
    /// count one backup less. Returns whether it was running.
    pub fn finish(&mut self, key: &str) -> bool {
        let Some(f) = self.running.remove(key) else {
            return false;
        };
        let dec = |m: &mut BTreeMap<(String, String), u32>, k: (String, String)| {
            if let Some(n) = m.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&k);
                }
            }
        };
        dec(&mut self.on_host, (f.vcenter.clone(), f.host.clone()));
        for ds in &f.datastores {
            dec(&mut self.on_datastore, (f.vcenter.clone(), ds.clone()));
        }
        true
    }

    /// Running VMs per host (`vcenter/host`) now.
    pub fn running_per_host(&self) -> BTreeMap<String, u32> {
        self.on_host
            .iter()
            .map(|((v, h), n)| (format!("{v}/{h}"), *n))
            .collect()
    }

    /// Running VMs per datastore (`vcenter/datastore`) now.
    pub fn running_per_datastore(&self) -> BTreeMap<String, u32> {
        self.on_datastore
            .iter()
            .map(|((v, d), n)| (format!("{v}/{d}"), *n))
            .collect()
    }

    /// Agent `agent` answered busy (`429`) although the ledger gave it room:
    /// the ledger was wrong (jobs started elsewhere). No dispatch goes to it
    /// until a job of ours on it ends ([`Self::agent_freed`]) or the back-off
    /// passes: `BACKOFF_BASE` doubled per busy answer in a row, at most
    /// `BACKOFF_MAX`, at least the agent's `Retry-After`, stretched by
    /// `jitter` (0.0–1.0, up to half again) so that orchestrators and runs do
    /// not come back in step. Returns the back-off.
    pub fn busy(
        &mut self,
        agent: &str,
        now_ms: u64,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Duration {
        self.stats.busy_answers += 1;
        let strikes = self.backoff.get(agent).map(|b| b.strikes).unwrap_or(0) + 1;
        let exp = BACKOFF_BASE
            .saturating_mul(1u32 << (strikes - 1).min(16))
            .min(BACKOFF_MAX);
        let base = exp.max(retry_after.unwrap_or(Duration::ZERO).min(BACKOFF_MAX));
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let wait = base + base.mul_f64(jitter / 2.0);
        self.backoff.insert(
            agent.to_string(),
            Backoff {
                until_ms: now_ms.saturating_add(wait.as_millis() as u64),
                strikes,
            },
        );
        wait
    }

    /// A job of ours on `agent` ended (a slot is free for sure) or the agent
    /// accepted a dispatch: its back-off ends.
    pub fn agent_freed(&mut self, agent: &str) {
        self.backoff.remove(agent);
    }

    /// Whether `agent` is in back-off at `now_ms`, and until when.
    pub fn backing_off(&self, agent: &str, now_ms: u64) -> Option<u64> {
        self.backoff
            .get(agent)
            .filter(|b| b.until_ms > now_ms)
            .map(|b| b.until_ms)
    }

    /// Agents in back-off at `now_ms`: the planner counts them as full.
    pub fn agents_backing_off(&self, now_ms: u64) -> BTreeSet<String> {
        self.backoff
            .iter()
            .filter(|(_, b)| b.until_ms > now_ms)
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Start a round over the VMs queued now (see [`Round`]).
    pub fn round(&self) -> Round {
        let n = self.ring.len();
        let mut lists = Vec::with_capacity(n);
        for i in 0..n {
            let t = &self.ring[(self.next + i) % n];
            let keys: VecDeque<String> = self
                .queues
                .get(t)
                .map(|q| q.iter().map(|w| w.key.clone()).collect())
                .unwrap_or_default();
            if !keys.is_empty() {
                lists.push((t.clone(), keys));
            }
        }
        Round {
            lists,
            pos: 0,
            offered: None,
            last_served: None,
            blocked: Vec::new(),
        }
    }

    /// End a round: the next one starts with the tenant after the last one
    /// served (or where this one started, if nobody was served); the VMs a cap
    /// held back are counted in [`DispatchStats::cap_waits`].
    pub fn end_round(&mut self, round: Round) {
        for (_, b) in &round.blocked {
            *self.stats.cap_waits.entry(b.kind()).or_default() += 1;
        }
        if let Some(t) = round.last_served {
            if let Some(i) = self.ring.iter().position(|x| *x == t) {
                self.next = (i + 1) % self.ring.len().max(1);
            }
        }
    }

    fn footprint(&self, key: &str) -> Option<&Footprint> {
        self.queued.get(key).map(|(_, f)| f)
    }
}

/// One VM offered to the planner by [`Round::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Tenant.
    pub tenant: String,
    /// The run's key of the VM.
    pub key: String,
}

/// One pass over the queue, round-robin across tenants. The caller loops:
/// [`Round::next`] offers the current tenant's next VM that no cap holds back
/// (the ones held back are listed by [`Round::blocked`] with why); the
/// caller plans it and reports [`Round::dispatched`] (the tenant's turn ends,
/// the next tenant's begins), [`Round::waits`] (the same tenant offers its next
/// VM: a VM that cannot go now does not hold back the ones behind it),
/// [`Round::gone`] (it left the queue: refused, failed) or
/// [`Round::tenant_full`] (none of the tenant's agents has room: its turn is
/// over for this round). The round ends when no tenant has anything left to
/// offer; hand it back to [`Dispatcher::end_round`].
#[derive(Debug, Clone)]
pub struct Round {
    /// Per tenant with VMs to offer, in turn order: keys not yet offered.
    lists: Vec<(String, VecDeque<String>)>,
    /// Whose turn it is (index into `lists`).
    pos: usize,
    offered: Option<Offer>,
    last_served: Option<String>,
    blocked: Vec<(String, Blocked)>,
}

impl Round {
    /// The next VM to offer, or `None` when the round is over.
    pub fn next(&mut self, d: &Dispatcher) -> Option<Offer> {
        while !self.lists.is_empty() {
            if self.pos >= self.lists.len() {
                self.pos = 0;
            }
            let (tenant, keys) = &mut self.lists[self.pos];
            let Some(key) = keys.pop_front() else {
                self.lists.remove(self.pos);
                continue;
            };
            // Still queued? (A VM can leave between rounds' offers.)
            let Some(f) = d.footprint(&key) else {
                continue;
            };
            if let Some(b) = d.blocked(f) {
                self.blocked.push((key, b));
                continue;
            }
            let o = Offer {
                tenant: tenant.clone(),
                key,
            };
            self.offered = Some(o.clone());
            return Some(o);
        }
        None
    }

    /// The offered VM was dispatched: call [`Dispatcher::start`] too. The
    /// tenant's turn ends.
    pub fn dispatched(&mut self) {
        if let Some(o) = self.offered.take() {
            self.last_served = Some(o.tenant);
            self.pos += 1;
        }
    }

    /// The offered VM waits (no room for it now): the same tenant offers its
    /// next VM.
    pub fn waits(&mut self) {
        self.offered = None;
    }

    /// The offered VM left the queue (refused, failed): call
    /// [`Dispatcher::dequeue`] too. The same tenant offers its next VM.
    pub fn gone(&mut self) {
        self.offered = None;
    }

    /// None of the offered VM's tenant's agents has room now: the rest of the
    /// tenant's queue waits for the next round.
    pub fn tenant_full(&mut self) {
        if let Some(o) = self.offered.take() {
            if let Some(i) = self.lists.iter().position(|(t, _)| *t == o.tenant) {
                self.lists.remove(i);
                if self.pos > i {
                    self.pos -= 1;
                }
            }
        }
    }

    /// VMs a cap held back in this round so far, with why.
    pub fn blocked(&self) -> &[(String, Blocked)] {
        &self.blocked
    }
}

#[cfg(test)]
mod tests;
