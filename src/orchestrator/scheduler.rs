//! Capacity over time, pure: who holds each agent's slots, how long a VM has
//! waited for the best proxy/mode, and when a job's wait policy lets it take a
//! lesser mode instead of waiting ([`LesserMode`]).
//!
//! Slots are capacity over time, not a reason to change transport: a busy
//! HotAdd proxy is free again in minutes. So the planner ([`super::plan`])
//! places a VM on its best option when that option has room, and otherwise the
//! VM waits in the run's queue, unless the job's policy says a lesser mode may
//! be used now; this module answers that question and keeps the slot ledger
//! that makes an agent's free slots known before dispatching.
//!
//! Must not: do I/O, read clocks (callers pass `now` and durations), or decide
//! transports (the selector does, and stays untouched).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// When a VM may use a lesser mode (for example NBD-SSL through a shared proxy)
/// instead of waiting for its best one (HotAdd through its tenant's proxy) when
/// that one has no free slot. TOML: `lesser_mode = "never" | "after=10m" | "when-idle"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LesserMode {
    /// Always wait for the best mode (the default: "Dedicated HotAdd" means full HotAdd).
    #[default]
    Never,
    /// Use a lesser mode once the VM has waited this long.
    After(Duration),
    /// Use a lesser mode only on an agent that would otherwise sit idle, and only
    /// for a VM that would otherwise miss its backup window.
    WhenIdle,
}

impl fmt::Display for LesserMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LesserMode::Never => f.write_str("never"),
            LesserMode::After(d) => write!(f, "after={}", short_duration(*d)),
            LesserMode::WhenIdle => f.write_str("when-idle"),
        }
    }
}

/// `"10m"`, `"90s"`, `"2h"`, `"0s"`: a duration as the config writes it.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 && s < 60 {
        return format!("{}ms", d.as_millis());
    }
    match s {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl std::str::FromStr for LesserMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let norm = t.to_ascii_lowercase().replace(['_', ' '], "-");
        if norm == "never" {
            return Ok(LesserMode::Never);
        }
        if norm == "when-idle" {
            return Ok(LesserMode::WhenIdle);
        }
        let rest = norm
            .strip_prefix("after=")
            .or_else(|| norm.strip_prefix("after-"));
        if let Some(d) = rest {
            // `after=0s`: spill over at once (durations elsewhere must be > 0).
            let zero = d.starts_with('0')
                && d.trim_start_matches('0')
                    .chars()
                    .all(|c| c.is_ascii_alphabetic())
                && matches!(d.trim_start_matches('0'), "" | "s" | "ms" | "m" | "h" | "d");
            if zero {
                return Ok(LesserMode::After(Duration::ZERO));
            }
            return super::config::parse_duration(d)
                .map(LesserMode::After)
                .map_err(|e| format!("lesser_mode {t:?}: {e}"));
        }
        Err(format!(
            "lesser_mode {t:?}: expected \"never\", \"after=DURATION\" (e.g. \"after=10m\") or \"when-idle\""
        ))
    }
}

impl Serialize for LesserMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for LesserMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the queue knows about one waiting VM when its job's policy is asked.
#[derive(Debug, Clone, Copy, Default)]
pub struct WaitState {
    /// How long it has waited for its best option so far.
    pub waited: Duration,
    /// Time left in the job's backup window (`None`: no window known).
    pub window_left: Option<Duration>,
    /// Estimated time until its best option has room (`None`: no estimate yet,
    /// for example before any job of the run finished).
    pub expected_wait: Option<Duration>,
}

impl LesserMode {
    /// Whether a lesser mode may be used now, and on which agents (`None`: any
    /// with room; `Some(set)`: only those, the idle ones, for `when-idle`).
    pub fn grant(&self, w: &WaitState, idle: &BTreeSet<String>) -> Grant {
        match self {
            LesserMode::Never => Grant::No,
            LesserMode::After(d) if w.waited >= *d => Grant::AnyAgent,
            LesserMode::After(_) => Grant::No,
            LesserMode::WhenIdle => {
                let misses = match (w.window_left, w.expected_wait) {
                    (Some(left), Some(wait)) => wait > left,
                    _ => false,
                };
                if misses && !idle.is_empty() {
                    Grant::Only(idle.clone())
                } else {
                    Grant::No
                }
            }
        }
    }
}

/// The answer of [`LesserMode::grant`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Grant {
    /// Wait for the best option.
    #[default]
    No,
    /// A lesser mode may be used on any agent with room.
    AnyAgent,
    /// A lesser mode may be used on these agents only.
    Only(BTreeSet<String>),
}

impl Grant {
    /// Whether `agent` may carry a lesser mode now.
    pub fn allows(&self, agent: &str) -> bool {
        match self {
            Grant::No => false,
            Grant::AnyAgent => true,
            Grant::Only(s) => s.contains(agent),
        }
    }
}

/// What the planner is told about one VM's wait: the policy, how long it has
/// waited and what the policy grants now.
#[derive(Debug, Clone, Default)]
pub struct Allowance {
    /// The job's wait policy (named in explanations).
    pub policy: LesserMode,
    /// How long the VM has waited so far.
    pub waited: Duration,
    /// What the policy grants now.
    pub grant: Grant,
}

impl Allowance {
    /// The allowance of a VM that has not waited yet (`ferry orchestrator plan`,
    /// a run's first round): `after=0s` grants at once, the others do not.
    pub fn fresh(policy: LesserMode) -> Allowance {
        let grant = policy.grant(&WaitState::default(), &BTreeSet::new());
        Allowance {
            policy,
            waited: Duration::ZERO,
            grant,
        }
    }
}

/// Slots as the planner sees them: free per agent, and who holds them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    /// Free slots per agent.
    pub free: BTreeMap<String, u32>,
    /// VM names holding each agent's slots (jobs started elsewhere are named
    /// as such), for explanations.
    pub busy_with: BTreeMap<String, Vec<String>>,
}

impl Load {
    /// Free slots of `agent` (0 when unknown).
    pub fn free_of(&self, agent: &str) -> u32 {
        self.free.get(agent).copied().unwrap_or(0)
    }

    /// Record a dispatch of `vm` with `slots` disks to `agent`.
    pub fn take(&mut self, agent: &str, vm: &str, slots: u32) {
        let f = self.free.entry(agent.to_string()).or_default();
        *f = f.saturating_sub(slots);
        self.busy_with
            .entry(agent.to_string())
            .or_default()
            .push(vm.to_string());
    }
}

/// One dispatched job holding slots on an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// VM name.
    pub vm: String,
    /// Slots (disks).
    pub slots: u32,
    /// When it was dispatched (ms since the epoch, the caller's clock).
    pub since_ms: u64,
}

/// The orchestrator's own record of the slots its dispatches hold on each
/// agent, across concurrent runs. An agent's `/v1/info` is read once per round;
/// the ledger covers what was dispatched since, so two runs sharing an agent
/// never send it more VMs than it has slots (no 429 in normal operation).
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    held: BTreeMap<String, BTreeMap<String, Held>>,
    /// Per agent: recent job durations per disk (ms), newest last, for estimates.
    durations: BTreeMap<String, Vec<u64>>,
}

/// How many finished jobs per agent the duration estimate remembers.
const DURATIONS_KEPT: usize = 32;

impl Ledger {
    /// `key` (a run and VM) now holds `slots` on `agent`.
    pub fn hold(&mut self, agent: &str, key: &str, vm: &str, slots: u32, now_ms: u64) {
        self.held.entry(agent.to_string()).or_default().insert(
            key.to_string(),
            Held {
                vm: vm.to_string(),
                slots,
                since_ms: now_ms,
            },
        );
    }

    /// `key` released its slots on `agent`; `finished` says whether the job ran
    /// to an end (its duration then feeds the estimates).
    pub fn release(&mut self, agent: &str, key: &str, now_ms: u64, finished: bool) {
        let Some(m) = self.held.get_mut(agent) else {
            return;
        };
        if let Some(h) = m.remove(key) {
            if finished && h.slots > 0 {
                let per_disk = now_ms.saturating_sub(h.since_ms) / u64::from(h.slots);
                let d = self.durations.entry(agent.to_string()).or_default();
                d.push(per_disk);
                if d.len() > DURATIONS_KEPT {
                    d.remove(0);
                }
            }
        }
    }

    /// Slots the ledger holds on `agent`.
    pub fn used(&self, agent: &str) -> u32 {
        self.held
            .get(agent)
            .map(|m| m.values().map(|h| h.slots).sum())
            .unwrap_or(0)
    }

    /// The load for planning: per agent, `min(reported free, total - held)`,
    /// and the VMs holding its slots (those the agent reports beyond the
    /// ledger's are "N slot(s) of jobs started elsewhere").
    pub fn load(&self, reported: &BTreeMap<String, (u32, u32)>) -> Load {
        let mut out = Load::default();
        for (agent, &(total, free)) in reported {
            let held = self.used(agent);
            out.free
                .insert(agent.clone(), free.min(total.saturating_sub(held)));
            let mut names: Vec<String> = self
                .held
                .get(agent)
                .map(|m| m.values().map(|h| h.vm.clone()).collect())
                .unwrap_or_default();
            let used = total.saturating_sub(free);
            if used > held {
                names.push(format!("{} slot(s) of jobs started elsewhere", used - held));
            }
            out.busy_with.insert(agent.clone(), names);
        }
        out
    }

    /// Estimated time until `agent` has `needed` free slots, with `queued_ahead`
    /// slots of other waiting VMs before this one: the slots ahead drained at the
    /// agent's measured rate (median job time per disk, over `total` slots).
    /// `None` until a job on the agent has finished.
    pub fn expected_wait(
        &self,
        agent: &str,
        total: u32,
        free: u32,
        needed: u32,
        queued_ahead: u32,
    ) -> Option<Duration> {
        if free >= needed.saturating_add(queued_ahead) {
            return Some(Duration::ZERO);
        }
        let d = self.durations.get(agent).filter(|d| !d.is_empty())?;
        let mut sorted = d.clone();
        sorted.sort_unstable();
        let per_disk = sorted[sorted.len() / 2];
        let short = u64::from(needed.saturating_add(queued_ahead).saturating_sub(free));
        let total = u64::from(total.max(1));
        // Slots free one disk's time apart, `total` at a time.
        Some(Duration::from_millis(short.div_ceil(total) * per_disk))
    }

    /// Agents of `among` holding no slot in the ledger and none reported used:
    /// those that would sit idle.
    pub fn idle(&self, reported: &BTreeMap<String, (u32, u32)>) -> BTreeSet<String> {
        reported
            .iter()
            .filter(|(a, (total, free))| total == free && self.used(a) == 0)
            .map(|(a, _)| a.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn lesser_mode_parses_and_prints() {
        for (s, want) in [
            ("never", LesserMode::Never),
            ("after=10m", LesserMode::After(Duration::from_secs(600))),
            ("after 10m", LesserMode::After(Duration::from_secs(600))),
            ("after=0s", LesserMode::After(Duration::ZERO)),
            ("when-idle", LesserMode::WhenIdle),
            ("when idle", LesserMode::WhenIdle),
            ("When_Idle", LesserMode::WhenIdle),
        ] {
            assert_eq!(s.parse::<LesserMode>().unwrap(), want, "{s}");
        }
        assert_eq!(
            LesserMode::After(Duration::from_secs(600)).to_string(),
            "after=10m"
        );
        assert_eq!(LesserMode::After(Duration::ZERO).to_string(), "after=0s");
        assert_eq!(LesserMode::After(ms(1500)).to_string(), "after=1500ms");
        assert_eq!(
            "after=0".parse::<LesserMode>().unwrap(),
            LesserMode::After(Duration::ZERO)
        );
        for bad in [
            "",
            "sometimes",
            "after=",
            "after=ten minutes",
            "after=0x",
            "after=-1s",
        ] {
            let e = bad.parse::<LesserMode>().unwrap_err();
            assert!(e.contains("lesser_mode"), "{e}");
        }
        // Round trip through the string form.
        for m in [
            LesserMode::Never,
            LesserMode::WhenIdle,
            LesserMode::After(ms(90_000)),
        ] {
            assert_eq!(m.to_string().parse::<LesserMode>().unwrap(), m);
        }
    }

    #[test]
    fn never_waits_after_waits_for_its_time() {
        let idle = BTreeSet::new();
        let at = |waited| WaitState {
            waited,
            ..WaitState::default()
        };
        assert_eq!(
            LesserMode::Never.grant(&at(Duration::from_secs(86400)), &idle),
            Grant::No
        );
        let p = LesserMode::After(Duration::from_secs(600));
        assert_eq!(p.grant(&at(Duration::from_secs(599)), &idle), Grant::No);
        assert_eq!(
            p.grant(&at(Duration::from_secs(600)), &idle),
            Grant::AnyAgent
        );
        assert_eq!(
            LesserMode::After(Duration::ZERO).grant(&at(Duration::ZERO), &idle),
            Grant::AnyAgent
        );
    }

    #[test]
    fn when_idle_only_to_idle_agents_and_only_when_the_window_would_be_missed() {
        let idle: BTreeSet<String> = ["proxy-nbd".to_string()].into();
        let w = |left: Option<u64>, wait: Option<u64>| WaitState {
            waited: Duration::from_secs(1),
            window_left: left.map(Duration::from_secs),
            expected_wait: wait.map(Duration::from_secs),
        };
        // Fits in the window: wait.
        assert_eq!(
            LesserMode::WhenIdle.grant(&w(Some(3600), Some(600)), &idle),
            Grant::No
        );
        // No estimate or no window: wait (never guess towards a weaker mode).
        assert_eq!(
            LesserMode::WhenIdle.grant(&w(None, Some(600)), &idle),
            Grant::No
        );
        assert_eq!(
            LesserMode::WhenIdle.grant(&w(Some(60), None), &idle),
            Grant::No
        );
        // Would miss it: only the idle agents.
        let g = LesserMode::WhenIdle.grant(&w(Some(60), Some(600)), &idle);
        assert!(g.allows("proxy-nbd") && !g.allows("proxy-other"));
        // Nobody idle: wait.
        assert_eq!(
            LesserMode::WhenIdle.grant(&w(Some(60), Some(600)), &BTreeSet::new()),
            Grant::No
        );
    }

    #[test]
    fn ledger_bounds_free_slots_between_info_reads_and_names_holders() {
        let mut l = Ledger::default();
        let mut rep = BTreeMap::new();
        rep.insert("a".to_string(), (4u32, 4u32));
        rep.insert("n".to_string(), (8u32, 6u32));
        // Two dispatches since the agents were last asked.
        l.hold("a", "r1/vm-1", "vm01", 2, 0);
        l.hold("a", "r2/vm-2", "vm02", 1, 0);
        let load = l.load(&rep);
        assert_eq!(load.free_of("a"), 1);
        assert_eq!(load.busy_with["a"], vec!["vm01", "vm02"]);
        // The agent reports 2 used that the ledger does not know.
        assert_eq!(load.free_of("n"), 6);
        assert_eq!(
            load.busy_with["n"],
            vec!["2 slot(s) of jobs started elsewhere"]
        );
        assert_eq!(l.idle(&rep), BTreeSet::new());
        l.release("a", "r1/vm-1", 60_000, true);
        l.release("a", "r2/vm-2", 60_000, true);
        assert_eq!(l.used("a"), 0);
        assert_eq!(l.idle(&rep), ["a".to_string()].into());
        // Releasing what is not held changes nothing.
        l.release("a", "nope", 1, true);
        l.release("zzz", "nope", 1, true);
    }

    #[test]
    fn expected_wait_follows_measured_job_times() {
        let mut l = Ledger::default();
        assert_eq!(
            l.expected_wait("a", 4, 0, 2, 0),
            None,
            "no job finished yet"
        );
        assert_eq!(l.expected_wait("a", 4, 4, 2, 1), Some(Duration::ZERO));
        // Jobs of 2 disks took 60 s: 30 s per disk.
        for i in 0..3 {
            l.hold("a", &format!("k{i}"), "vm", 2, 0);
            l.release("a", &format!("k{i}"), 60_000, true);
        }
        // A job that failed to start does not count.
        l.hold("a", "x", "vm", 2, 0);
        l.release("a", "x", 1, false);
        // 0 free, needs 2, 6 queued ahead: 8 slots short over 4 slots = 2 rounds of 30 s.
        assert_eq!(
            l.expected_wait("a", 4, 0, 2, 6),
            Some(Duration::from_secs(60))
        );
    }
}
