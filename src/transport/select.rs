//! Transport selector: decides, for every disk of a VM, which proxy and which
//! transport mode (HotAdd, NBD-SSL, clear-text NBD) a backup will use, or refuses
//! the VM, and explains every decision candidate by candidate.
//!
//! Owns: the key-provider-aware selection rules, slot accounting within a plan,
//! tie-breaks, and the plain-text rendering of a plan. Must not: do any I/O, talk
//! to vCenter, take snapshots, log, or read clocks/environment. It is a pure
//! function of its inputs, so the same inputs always give the same plan.
//!
//! # Rules (in the order they are applied)
//!
//! * **Effective disk encryption.** A disk counts as encrypted if the disk *or* the
//!   VM is encrypted (conservative: an unencrypted disk of an encrypted VM is
//!   treated as encrypted). Its key provider is the disk's own `key_provider` when
//!   set, else the VM's. Empty strings count as "not set".
//! * **Mode order** comes from [`Policy::preferred`]:
//!   `None`/`Some(HotAdd)` → automatic: HotAdd, then NBD-SSL, then NBD, where the
//!   two network modes are only used when [`Policy::failover_to_network`] is set.
//!   `Some(NbdSsl)` → network forced: NBD-SSL, then NBD; HotAdd is never used.
//!   `Some(Nbd)` → network forced, clear text first: NBD, then NBD-SSL. With a
//!   forced network mode `failover_to_network` is irrelevant.
//! * **Per candidate (proxy, mode)**, the first failing check is reported:
//!   policy (network forced / failover disabled / clear text forbidden for an
//!   encrypted disk / clear text not allowed) → mode enabled on the proxy →
//!   HotAdd: proxy is a VM → for an encrypted disk: proxy VM encrypted → disk key
//!   provider known → same key provider (exact string match) → datastore visible;
//!   NBD modes: proxy reaches the VM's host → a free slot.
//!   Clear-text NBD is never used for an encrypted VM or disk, whatever the policy.
//!   An encrypted proxy may hot-add an unencrypted disk.
//! * **Choice per disk**: the first mode (in mode order) with a valid candidate
//!   wins. Among valid candidates of that mode the tie-breaks are, in order:
//!   1. the proxy already carries another disk of this VM (keeps a VM on one
//!      proxy),
//!   2. the proxy can take more of this VM's remaining disks in this mode
//!      (`min(disks it is valid for, free slots)`),
//!   3. more free slots,
//!   4. lower proxy id (byte order), 5. earlier in the proxy list.
//! * **Look-ahead**: a candidate is skipped ([`Reason::WouldStrandOtherDisk`]) if
//!   taking its slot would leave a later disk of the same VM with no possible
//!   proxy (checked with a small bipartite matching). So a VM is refused only when
//!   no complete assignment of its disks exists.
//! * **Whole-VM refusal**: if any disk has no valid candidate, the whole VM is
//!   refused (a partial backup is not a backup); the other disks are marked
//!   [`Refusal::OtherDiskRefused`] and their would-be choice
//!   [`Reason::VmRefused`]. A refused VM consumes no slots. This is decided
//!   before any snapshot: see [`Selection::is_runnable`] and
//!   [`Selection::refusal_summary`]. A VM without disks is runnable (nothing to
//!   move).
//! * **Slots**: one slot per disk. [`select`] reads slots without changing them;
//!   [`select_many`] plans VMs in the given order and decrements
//!   [`ProxyInfo::free_slots`] as it assigns, so earlier VMs have priority.
//!   Disks of one VM may end up on different proxies or modes when no single
//!   proxy can take them all.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A transport mode. Serialized with VDDK's names: `hotadd`, `nbdssl`, `nbd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The proxy VM attaches the snapshot disk (SCSI hot-add).
    HotAdd,
    /// Network block device over TLS through the ESXi host.
    NbdSsl,
    /// Network block device in clear text (unencrypted VMs only).
    Nbd,
}

impl Mode {
    /// All modes in default preference order.
    pub const ALL: [Mode; 3] = [Mode::HotAdd, Mode::NbdSsl, Mode::Nbd];

    /// VDDK-style name (`hotadd`, `nbdssl`, `nbd`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::HotAdd => "hotadd",
            Mode::NbdSsl => "nbdssl",
            Mode::Nbd => "nbd",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One virtual disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// vSphere device key (e.g. 2000).
    pub key: i32,
    /// Device label (e.g. "Hard disk 1").
    pub label: String,
    /// Datastore holding the disk.
    pub datastore: String,
    /// Whether the disk itself is encrypted.
    pub encrypted: bool,
    /// Key provider of the disk's key, when it differs from or refines the VM's.
    #[serde(default)]
    pub key_provider: Option<String>,
}

/// A VM to back up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Display name.
    pub name: String,
    /// Managed object reference (e.g. "vm-42").
    pub moref: String,
    /// ESXi host the VM runs on.
    pub host: String,
    /// Whether the VM (home) is encrypted.
    pub encrypted: bool,
    /// Key provider of the VM's key.
    #[serde(default)]
    pub key_provider: Option<String>,
    /// The VM's disks.
    pub disks: Vec<DiskInfo>,
}

/// Which ESXi hosts a proxy can reach for NBD / NBD-SSL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostReach {
    /// Every host.
    Any,
    /// Only these hosts (exact names).
    Hosts(Vec<String>),
}

impl HostReach {
    /// Whether `host` is reachable.
    pub fn reaches(&self, host: &str) -> bool {
        match self {
            HostReach::Any => true,
            HostReach::Hosts(h) => h.iter().any(|x| x == host),
        }
    }
}

/// A candidate backup proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyInfo {
    /// Unique proxy id; also the last tie-break (lower wins).
    pub id: String,
    /// Whether the proxy is a VM (required for HotAdd).
    pub is_vm: bool,
    /// ESXi host the proxy VM runs on (informational).
    #[serde(default)]
    pub host: Option<String>,
    /// Hosts reachable for NBD / NBD-SSL.
    pub reachable_hosts: HostReach,
    /// Datastores the proxy's host sees (for HotAdd).
    #[serde(default)]
    pub datastores: Vec<String>,
    /// Key provider the proxy VM itself is encrypted under; `None` = unencrypted.
    #[serde(default)]
    pub key_provider: Option<String>,
    /// Modes enabled on this proxy.
    pub modes: Vec<Mode>,
    /// Free task slots (one per disk).
    pub free_slots: u32,
}

/// Job policy for transport selection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Allow NBD-SSL / NBD when HotAdd is impossible (automatic mode only).
    pub failover_to_network: bool,
    /// Allow clear-text NBD for unencrypted VMs. Never applies to encrypted ones.
    pub allow_cleartext_nbd: bool,
    /// `None`/`HotAdd`: automatic; `NbdSsl` or `Nbd`: force network, that mode first.
    #[serde(default)]
    pub preferred: Option<Mode>,
}

impl Default for Policy {
    /// Failover allowed (as in Veeam), clear text off, automatic mode.
    fn default() -> Self {
        Policy {
            failover_to_network: true,
            allow_cleartext_nbd: false,
            preferred: None,
        }
    }
}

impl Policy {
    fn automatic(&self) -> bool {
        matches!(self.preferred, None | Some(Mode::HotAdd))
    }

    /// Every mode in the order candidates are tried and listed. Modes excluded by
    /// the policy are at the end and are rejected for every candidate.
    pub fn mode_order(&self) -> [Mode; 3] {
        match self.preferred {
            None | Some(Mode::HotAdd) => [Mode::HotAdd, Mode::NbdSsl, Mode::Nbd],
            Some(Mode::NbdSsl) => [Mode::NbdSsl, Mode::Nbd, Mode::HotAdd],
            Some(Mode::Nbd) => [Mode::Nbd, Mode::NbdSsl, Mode::HotAdd],
        }
    }

    /// Why the policy alone excludes `mode` for a disk, if it does.
    fn excludes(&self, mode: Mode, encrypted: bool) -> Option<Reason> {
        match mode {
            Mode::HotAdd if !self.automatic() => Some(Reason::NetworkModeForced {
                preferred: self.preferred.unwrap_or(Mode::NbdSsl),
            }),
            Mode::HotAdd => None,
            Mode::NbdSsl if self.automatic() && !self.failover_to_network => {
                Some(Reason::FailoverDisabled)
            }
            Mode::NbdSsl => None,
            Mode::Nbd if encrypted => Some(Reason::ClearTextForbiddenEncrypted),
            Mode::Nbd if !self.allow_cleartext_nbd => Some(Reason::ClearTextNotAllowedByPolicy),
            Mode::Nbd if self.automatic() && !self.failover_to_network => {
                Some(Reason::FailoverDisabled)
            }
            Mode::Nbd => None,
        }
    }
}

/// Which tie-break rule decided between two valid candidates of the same mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TieBreak {
    /// The winner already carries another disk of this VM.
    AlreadyServesVm,
    /// The winner can take more of this VM's remaining disks.
    ServesMoreDisks,
    /// The winner has more free slots.
    MoreFreeSlots,
    /// All else equal, the winner has the lower proxy id.
    LowerId,
    /// All else equal (same id), the winner comes first in the proxy list.
    EarlierInList,
}

impl fmt::Display for TieBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TieBreak::AlreadyServesVm => "it already carries another disk of this VM",
            TieBreak::ServesMoreDisks => "it can take more of this VM's disks",
            TieBreak::MoreFreeSlots => "it has more free slots",
            TieBreak::LowerId => "all else being equal, it has the lower proxy id",
            TieBreak::EarlierInList => "all else being equal, it comes first in the proxy list",
        })
    }
}

/// Why a candidate (proxy, mode) was or was not taken for a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// Taken. `rule` is what beat the runner-up of the same mode, if any.
    Chosen {
        /// Deciding tie-break against the runner-up; `None` if it was the only one.
        rule: Option<TieBreak>,
    },
    /// Valid, but another proxy of the same mode won a tie-break.
    BetterCandidateChosen {
        /// The proxy that was taken.
        chosen: String,
        /// The deciding rule.
        rule: TieBreak,
    },
    /// Valid, but a mode earlier in the policy's order was taken.
    HigherModeChosen {
        /// The proxy that was taken.
        chosen: String,
        /// Its mode.
        mode: Mode,
    },
    /// Valid, but taking it would leave another disk of this VM with no proxy.
    WouldStrandOtherDisk,
    /// Would have been taken, but the whole VM is refused because of another disk.
    VmRefused {
        /// Device key of the refused disk.
        disk_key: i32,
        /// Its label.
        label: String,
    },
    /// The policy forces a network mode, so HotAdd is not used.
    NetworkModeForced {
        /// The forced mode.
        preferred: Mode,
    },
    /// Failover to network transport is disabled by policy.
    FailoverDisabled,
    /// Clear-text NBD is never used for an encrypted VM or disk.
    ClearTextForbiddenEncrypted,
    /// Clear-text NBD is not allowed by policy.
    ClearTextNotAllowedByPolicy,
    /// The mode is not enabled on the proxy.
    ModeDisabled {
        /// The mode.
        mode: Mode,
    },
    /// HotAdd needs a VM proxy.
    NotAVm,
    /// The disk is encrypted but the proxy VM is not.
    ProxyNotEncrypted {
        /// The disk's key provider, if known.
        disk_provider: Option<String>,
    },
    /// The disk is encrypted but its key provider is unknown.
    KeyProviderUnknown,
    /// Proxy VM and disk are encrypted under different key providers.
    KeyProviderMismatch {
        /// The proxy VM's key provider.
        proxy_provider: String,
        /// The disk's key provider.
        disk_provider: String,
    },
    /// The proxy's host does not see the disk's datastore.
    DatastoreNotVisible {
        /// The datastore.
        datastore: String,
    },
    /// The proxy cannot reach the VM's host.
    HostNotReachable {
        /// The VM's host.
        host: String,
    },
    /// The proxy has no free slot left.
    NoFreeSlots,
    /// Valid, but the proxy's slots are taken by earlier jobs (the
    /// orchestrator's scheduler, which knows who holds them, says so).
    Busy {
        /// Slots free on it now.
        free: u32,
        /// Slots this VM needs (one per disk, all on one agent).
        needed: u32,
        /// Who holds its slots (VM names; jobs started elsewhere counted).
        busy_with: Vec<String>,
    },
    /// Taken, but only because the better mode's proxy had no free slot and
    /// the job's wait policy allowed a lesser mode.
    CapacityFallback {
        /// The proxy of the better mode that was busy.
        busy: String,
        /// Its mode.
        busy_mode: Mode,
        /// Its key provider (`None`: unencrypted proxy VM).
        busy_key_provider: Option<String>,
        /// How long the VM waited for it, in seconds.
        waited_secs: u64,
        /// The wait policy that allowed the lesser mode (e.g. `after=10m`).
        policy: String,
    },
    /// Valid, but the job waits for a better mode on a busy proxy.
    WaitingForBetterMode {
        /// The proxy it waits for.
        proxy: String,
        /// That proxy's mode.
        mode: Mode,
        /// The wait policy (e.g. `never`).
        policy: String,
    },
    /// Valid for this disk, but this agent cannot take every disk of the VM, and
    /// a VM is backed up through one agent (one snapshot).
    CannotTakeWholeVm,
    /// The agent is not a candidate now (down, or not serving the tenant).
    AgentUnavailable {
        /// Why.
        why: String,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Chosen { rule: None } => {
                write!(f, "chosen: the only valid candidate for this mode")
            }
            Reason::Chosen { rule: Some(r) } => write!(f, "chosen: {r}"),
            Reason::BetterCandidateChosen { chosen, rule } => {
                write!(f, "valid, but {chosen} was preferred because {rule}")
            }
            Reason::HigherModeChosen { chosen, mode } => write!(
                f,
                "valid, but {mode} via {chosen} comes earlier in the policy's mode order"
            ),
            Reason::WouldStrandOtherDisk => write!(
                f,
                "valid, but taking its slot would leave another disk of this VM without any proxy"
            ),
            Reason::VmRefused { disk_key, label } => write!(
                f,
                "would have been chosen, but the whole VM is refused because disk {disk_key} \"{label}\" has no valid transport"
            ),
            Reason::NetworkModeForced { preferred } => write!(
                f,
                "policy forces network transport ({preferred}), so HotAdd is not used"
            ),
            Reason::FailoverDisabled => {
                write!(f, "failover to network transport is disabled by policy")
            }
            Reason::ClearTextForbiddenEncrypted => {
                write!(f, "clear-text NBD is never used for an encrypted VM or disk")
            }
            Reason::ClearTextNotAllowedByPolicy => {
                write!(f, "clear-text NBD is not allowed by policy")
            }
            Reason::ModeDisabled { mode } => write!(f, "{mode} is not enabled on this proxy"),
            Reason::NotAVm => write!(f, "HotAdd needs a proxy that is a VM, and this one is not"),
            Reason::ProxyNotEncrypted {
                disk_provider: Some(p),
            } => write!(
                f,
                "the proxy VM is not encrypted, so it cannot hot-add a disk encrypted under key provider '{p}'"
            ),
            Reason::ProxyNotEncrypted {
                disk_provider: None,
            } => write!(
                f,
                "the proxy VM is not encrypted, so it cannot hot-add an encrypted disk"
            ),
            Reason::KeyProviderUnknown => write!(
                f,
                "the disk is encrypted but its key provider is unknown, so a same-key-provider HotAdd cannot be verified"
            ),
            Reason::KeyProviderMismatch {
                proxy_provider,
                disk_provider,
            } => write!(
                f,
                "key provider mismatch: the proxy VM is encrypted under '{proxy_provider}' but the disk under '{disk_provider}', and vSphere would fail the hot-add with a crypto fault"
            ),
            Reason::DatastoreNotVisible { datastore } => {
                write!(f, "the proxy's host cannot see datastore '{datastore}'")
            }
            Reason::HostNotReachable { host } => {
                write!(f, "the proxy cannot reach the VM's host '{host}'")
            }
            Reason::NoFreeSlots => write!(f, "the proxy has no free task slot left"),
            Reason::Busy {
                free,
                needed,
                busy_with,
            } => {
                write!(
                    f,
                    "busy until its earlier jobs finish ({free} slot(s) free, this VM needs {needed}"
                )?;
                if !busy_with.is_empty() {
                    write!(f, "; slots taken by {}", busy_with.join(", "))?;
                }
                write!(f, ")")
            }
            Reason::CapacityFallback {
                busy,
                busy_mode,
                busy_key_provider,
                waited_secs,
                policy,
            } => write!(
                f,
                "{busy} ({busy_mode}, {}) had no free slot for {}; policy {policy}",
                busy_key_provider.as_deref().unwrap_or("unencrypted"),
                human_secs(*waited_secs)
            ),
            Reason::WaitingForBetterMode {
                proxy,
                mode,
                policy,
            } => write!(
                f,
                "valid, but the job waits for {mode} via {proxy} (policy {policy})"
            ),
            Reason::CannotTakeWholeVm => write!(
                f,
                "valid for this disk, but this agent cannot take every disk of the VM, and a VM is backed up through one agent"
            ),
            Reason::AgentUnavailable { why } => write!(f, "not a candidate now: {why}"),
        }
    }
}

/// `"14 min"`, `"40 s"`, `"2 h 5 min"`: a wait as an operator reads it.
pub fn human_secs(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
    }
}

/// Why a disk got no transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Refusal {
    /// No proxy is configured at all.
    NoProxies,
    /// No candidate passed every check (see the disk's candidate list).
    NoValidCandidate {
        /// Modes the policy allowed for this disk, in order.
        modes_considered: Vec<Mode>,
        /// True when network modes were excluded only because failover is off.
        failover_disabled: bool,
    },
    /// This disk could be served, but another disk of the VM cannot.
    OtherDiskRefused {
        /// Device key of the refused disk.
        disk_key: i32,
        /// Its label.
        label: String,
    },
    /// Not now: the VM waits for a free slot on this proxy and mode (decided by
    /// the orchestrator's scheduler, never by the selector itself).
    WaitingForSlot {
        /// The proxy it waits for.
        proxy: String,
        /// The mode it will use there.
        mode: Mode,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoProxies => write!(f, "no proxies are configured"),
            Refusal::NoValidCandidate {
                modes_considered,
                failover_disabled,
            } => {
                let modes: Vec<&str> = modes_considered.iter().map(|m| m.as_str()).collect();
                write!(f, "no candidate proxy qualifies for {}", modes.join(" or "))?;
                if *failover_disabled {
                    write!(
                        f,
                        "; failover to network transport is disabled by policy, so NBD-SSL was not considered"
                    )?;
                }
                Ok(())
            }
            Refusal::OtherDiskRefused { disk_key, label } => write!(
                f,
                "the whole VM is refused because disk {disk_key} \"{label}\" has no valid transport"
            ),
            Refusal::WaitingForSlot { proxy, mode } => {
                write!(f, "waiting for a free slot on {proxy} ({mode})")
            }
        }
    }
}

/// Result for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Back the disk up through `proxy` with `mode`.
    Assigned {
        /// Proxy id.
        proxy: String,
        /// Transport mode.
        mode: Mode,
    },
    /// No transport for this disk.
    Refused {
        /// Why.
        reason: Refusal,
    },
}

/// One (proxy, mode) pair considered for a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateVerdict {
    /// Proxy id.
    pub proxy: String,
    /// The proxy VM's key provider (`None` = unencrypted), for the explanation.
    pub proxy_key_provider: Option<String>,
    /// Mode considered.
    pub mode: Mode,
    /// Whether this candidate was taken.
    pub accepted: bool,
    /// Why (first failing check, or the selection reason).
    pub reason: Reason,
}

/// Decision for one disk, with every candidate explained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDecision {
    /// Device key.
    pub disk_key: i32,
    /// Device label.
    pub label: String,
    /// Datastore.
    pub datastore: String,
    /// Effective encryption (disk or VM encrypted).
    pub encrypted: bool,
    /// Effective key provider (disk's, else VM's); `None` if unencrypted or unknown.
    pub key_provider: Option<String>,
    /// What was decided.
    pub outcome: Outcome,
    /// Every proxy × every mode, in mode order then proxy list order.
    pub candidates: Vec<CandidateVerdict>,
}

impl DiskDecision {
    /// The orchestrator's reason for this disk when it placed it in the mode
    /// this decision took, so the agent's job record and log say what
    /// `orchestrator plan --explain` said; `own` otherwise (no placement, or the
    /// agent decided differently, for example after vCenter changed).
    pub fn placed_or(&self, placed: Option<(Mode, &str)>, own: String) -> String {
        match (&self.outcome, placed) {
            (Outcome::Assigned { mode, .. }, Some((m, reason))) if *mode == m => reason.to_string(),
            _ => own,
        }
    }

    /// One line for manifests and job logs: the decision, the accepted candidate's
    /// reason, and why every earlier mode was not used (e.g. "nbdssl via px-shared:
    /// chosen; hotadd not used: px-a: proxy VM and disk are encrypted under
    /// different key providers ...").
    pub fn reason_summary(&self) -> String {
        let Outcome::Assigned { proxy, mode } = &self.outcome else {
            if let Outcome::Refused { reason } = &self.outcome {
                return format!("refused: {reason}");
            }
            unreachable!()
        };
        let mut s = format!("{mode} via {proxy}");
        if let Some(c) = self.candidates.iter().find(|c| c.accepted) {
            s.push_str(&format!(": {}", c.reason));
        }
        let mut earlier: Vec<Mode> = Vec::new();
        for c in &self.candidates {
            if c.mode == *mode {
                break;
            }
            if !earlier.contains(&c.mode) {
                earlier.push(c.mode);
            }
        }
        for m in earlier {
            let why: Vec<String> = self
                .candidates
                .iter()
                .filter(|c| c.mode == m)
                .map(|c| format!("{}: {}", c.proxy, c.reason))
                .collect();
            s.push_str(&format!("; {m} not used ({})", why.join("; ")));
        }
        s
    }
}

/// The plan for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// VM name.
    pub vm: String,
    /// VM moref.
    pub moref: String,
    /// Whether the VM is encrypted.
    pub encrypted: bool,
    /// VM's key provider.
    pub key_provider: Option<String>,
    /// True if any disk is refused; then the whole VM must not be snapshotted.
    pub refused: bool,
    /// One decision per disk, in the VM's disk order.
    pub disks: Vec<DiskDecision>,
}

impl Selection {
    /// Whether the job may go ahead (snapshot and back up).
    pub fn is_runnable(&self) -> bool {
        !self.refused
    }

    /// For a refused VM: an operator-readable explanation naming each disk that has
    /// no transport and every candidate with its key provider and rejection reason.
    pub fn refusal_summary(&self) -> Option<String> {
        if !self.refused {
            return None;
        }
        let mut s = format!("VM {} ({}) refused before snapshot:", self.vm, self.moref);
        for d in &self.disks {
            if let Outcome::Refused { reason } = &d.outcome {
                if matches!(reason, Refusal::OtherDiskRefused { .. }) {
                    continue;
                }
                s.push_str(&format!("\n  {}: {reason}.", disk_heading(d)));
                for c in &d.candidates {
                    s.push_str(&format!("\n    - {}", candidate_line(c)));
                }
            }
        }
        Some(s)
    }

    /// Full explanation: every disk and every candidate.
    pub fn explain(&self) -> String {
        let mut s = format!(
            "VM {} ({}), {}: {}",
            self.vm,
            self.moref,
            crypto_text(self.encrypted, self.key_provider.as_deref()),
            if !self.refused {
                "runnable"
            } else if self.disks.iter().all(|d| {
                matches!(
                    d.outcome,
                    Outcome::Refused {
                        reason: Refusal::WaitingForSlot { .. }
                    }
                )
            }) {
                "WAITING for a slot"
            } else {
                "REFUSED"
            }
        );
        for d in &self.disks {
            let what = match &d.outcome {
                Outcome::Assigned { proxy, mode } => format!("{mode} via {proxy}"),
                Outcome::Refused { reason } => format!("refused: {reason}"),
            };
            s.push_str(&format!("\n  {}: {what}", disk_heading(d)));
            for c in &d.candidates {
                let mark = if c.accepted { "[x]" } else { "[ ]" };
                s.push_str(&format!("\n    {mark} {}", candidate_line(c)));
            }
        }
        s
    }
}

fn crypto_text(encrypted: bool, provider: Option<&str>) -> String {
    match (encrypted, provider) {
        (false, _) => "unencrypted".to_string(),
        (true, Some(p)) => format!("encrypted (key provider {p})"),
        (true, None) => "encrypted (key provider unknown)".to_string(),
    }
}

fn disk_heading(d: &DiskDecision) -> String {
    format!(
        "disk {} \"{}\" on {}, {}",
        d.disk_key,
        d.label,
        d.datastore,
        crypto_text(d.encrypted, d.key_provider.as_deref())
    )
}

fn candidate_line(c: &CandidateVerdict) -> String {
    let kp = match &c.proxy_key_provider {
        Some(p) => format!("key provider {p}"),
        None => "unencrypted".to_string(),
    };
    format!("{} ({kp}) {}: {}", c.proxy, c.mode, c.reason)
}

/// Render a plain-text table (VM, disk, proxy, mode, decision) for `plan` /
/// `--dry-run` output. Columns are padded; the last column is not.
pub fn render_table(selections: &[Selection]) -> String {
    let mut rows: Vec<[String; 5]> = vec![[
        "VM".into(),
        "DISK".into(),
        "PROXY".into(),
        "MODE".into(),
        "DECISION".into(),
    ]];
    for s in selections {
        if s.disks.is_empty() {
            rows.push([
                s.vm.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "no disks".into(),
            ]);
        }
        for d in &s.disks {
            let disk = format!("{} {}", d.disk_key, d.label);
            let row = match &d.outcome {
                Outcome::Assigned { proxy, mode } => {
                    let why = d
                        .candidates
                        .iter()
                        .find(|c| c.accepted)
                        .map(|c| c.reason.to_string())
                        .unwrap_or_default();
                    [s.vm.clone(), disk, proxy.clone(), mode.to_string(), why]
                }
                Outcome::Refused { reason } => [
                    s.vm.clone(),
                    disk,
                    "-".into(),
                    "-".into(),
                    format!("REFUSED: {reason}"),
                ],
            };
            rows.push(row);
        }
    }
    let mut w = [0usize; 4];
    for r in &rows {
        for (i, wi) in w.iter_mut().enumerate() {
            *wi = (*wi).max(r[i].chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        for (i, wi) in w.iter().enumerate() {
            out.push_str(&r[i]);
            out.push_str(&" ".repeat(wi - r[i].chars().count() + 2));
        }
        out.push_str(&r[4]);
        out.push('\n');
    }
    out
}

/// Plan one VM against `proxies` without consuming their slots.
pub fn select(vm: &VmInfo, proxies: &[ProxyInfo], policy: &Policy) -> Selection {
    let mut slots: Vec<u32> = proxies.iter().map(|p| p.free_slots).collect();
    select_vm(vm, proxies, &mut slots, policy)
}

/// Plan several VMs in order, decrementing each proxy's `free_slots` by the disks
/// assigned to it. Refused VMs consume nothing.
pub fn select_many(vms: &[VmInfo], proxies: &mut [ProxyInfo], policy: &Policy) -> Vec<Selection> {
    let mut slots: Vec<u32> = proxies.iter().map(|p| p.free_slots).collect();
    let out = vms
        .iter()
        .map(|vm| select_vm(vm, proxies, &mut slots, policy))
        .collect();
    for (p, s) in proxies.iter_mut().zip(slots) {
        p.free_slots = s;
    }
    out
}

fn norm(s: &Option<String>) -> Option<String> {
    s.as_ref()
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(str::to_string)
}

/// Effective (encrypted, key provider) of a disk: encrypted when the disk or
/// the VM is, under the disk's own provider, else the VM's.
pub fn disk_crypto(vm: &VmInfo, disk: &DiskInfo) -> (bool, Option<String>) {
    let encrypted = disk.encrypted || vm.encrypted;
    if !encrypted {
        return (false, None);
    }
    (
        true,
        norm(&disk.key_provider).or_else(|| norm(&vm.key_provider)),
    )
}

/// Every rule but slots for one candidate (`proxy` in `mode`) of `disk` of
/// `vm`: `None` when it is valid, else the first failing check. The
/// orchestrator's scheduler explains waiting and capacity on top of this.
pub fn check_candidate(
    vm: &VmInfo,
    disk: &DiskInfo,
    proxy: &ProxyInfo,
    mode: Mode,
    policy: &Policy,
) -> Option<Reason> {
    static_check(vm, disk, &disk_crypto(vm, disk), proxy, mode, policy)
}

/// Every check except slots; `None` = statically valid.
fn static_check(
    vm: &VmInfo,
    disk: &DiskInfo,
    crypto: &(bool, Option<String>),
    proxy: &ProxyInfo,
    mode: Mode,
    policy: &Policy,
) -> Option<Reason> {
    let (encrypted, disk_kp) = crypto;
    if let Some(r) = policy.excludes(mode, *encrypted) {
        return Some(r);
    }
    if !proxy.modes.contains(&mode) {
        return Some(Reason::ModeDisabled { mode });
    }
    match mode {
        Mode::HotAdd => {
            if !proxy.is_vm {
                return Some(Reason::NotAVm);
            }
            if *encrypted {
                match (norm(&proxy.key_provider), disk_kp) {
                    (None, dp) => {
                        return Some(Reason::ProxyNotEncrypted {
                            disk_provider: dp.clone(),
                        })
                    }
                    (Some(_), None) => return Some(Reason::KeyProviderUnknown),
                    (Some(pp), Some(dp)) if &pp != dp => {
                        return Some(Reason::KeyProviderMismatch {
                            proxy_provider: pp,
                            disk_provider: dp.clone(),
                        })
                    }
                    _ => {}
                }
            }
            if !proxy.datastores.iter().any(|d| d == &disk.datastore) {
                return Some(Reason::DatastoreNotVisible {
                    datastore: disk.datastore.clone(),
                });
            }
        }
        Mode::NbdSsl | Mode::Nbd => {
            if !proxy.reachable_hosts.reaches(&vm.host) {
                return Some(Reason::HostNotReachable {
                    host: vm.host.clone(),
                });
            }
        }
    }
    None
}

/// Can every disk in `needs` (each a list of proxies it may use) get a slot from `cap`?
fn feasible(needs: &[Vec<usize>], cap: &[u32]) -> bool {
    fn augment(
        d: usize,
        needs: &[Vec<usize>],
        cap: &[u32],
        held: &mut [Vec<usize>],
        seen: &mut [bool],
    ) -> bool {
        for &p in &needs[d] {
            if seen[p] {
                continue;
            }
            seen[p] = true;
            if (held[p].len() as u64) < u64::from(cap[p]) {
                held[p].push(d);
                return true;
            }
            for k in 0..held[p].len() {
                let other = held[p][k];
                if augment(other, needs, cap, held, seen) {
                    held[p][k] = d;
                    return true;
                }
            }
        }
        false
    }
    let mut held: Vec<Vec<usize>> = vec![Vec::new(); cap.len()];
    for d in 0..needs.len() {
        let mut seen = vec![false; cap.len()];
        if !augment(d, needs, cap, &mut held, &mut seen) {
            return false;
        }
    }
    true
}

type RankKey<'a> = (
    bool,
    std::cmp::Reverse<u32>,
    std::cmp::Reverse<u32>,
    &'a str,
    usize,
);

fn decisive_rule(winner: &RankKey<'_>, loser: &RankKey<'_>) -> TieBreak {
    if winner.0 != loser.0 {
        TieBreak::AlreadyServesVm
    } else if winner.1 != loser.1 {
        TieBreak::ServesMoreDisks
    } else if winner.2 != loser.2 {
        TieBreak::MoreFreeSlots
    } else if winner.3 != loser.3 {
        TieBreak::LowerId
    } else {
        TieBreak::EarlierInList
    }
}

fn select_vm(vm: &VmInfo, proxies: &[ProxyInfo], slots: &mut [u32], policy: &Policy) -> Selection {
    let order = policy.mode_order();
    let np = proxies.len();
    let cryptos: Vec<(bool, Option<String>)> =
        vm.disks.iter().map(|d| disk_crypto(vm, d)).collect();
    // stat[d][p][mi]: static verdict of proxy p in mode order[mi] for disk d.
    let stat: Vec<Vec<[Option<Reason>; 3]>> = vm
        .disks
        .iter()
        .zip(&cryptos)
        .map(|(disk, c)| {
            proxies
                .iter()
                .map(|p| order.map(|m| static_check(vm, disk, c, p, m, policy)))
                .collect()
        })
        .collect();
    let needs: Vec<Vec<usize>> = stat
        .iter()
        .map(|per_p| {
            (0..np)
                .filter(|&p| per_p[p].iter().any(|r| r.is_none()))
                .collect()
        })
        .collect();

    let mut work: Vec<u32> = slots.to_vec();
    let mut used = vec![false; np];
    let mut decisions = Vec::with_capacity(vm.disks.len());

    for (d, disk) in vm.disks.iter().enumerate() {
        let serves = |p: usize, mi: usize, work: &[u32]| -> u32 {
            let n = stat[d..].iter().filter(|s| s[p][mi].is_none()).count() as u32;
            n.min(work[p])
        };
        // Ranked slot-valid candidates: mode order, then tie-break key.
        let mut ranked: Vec<(usize, usize)> = Vec::new();
        let mut keys: Vec<Vec<(usize, RankKey<'_>)>> = vec![Vec::new(); 3];
        for (mi, mode_keys) in keys.iter_mut().enumerate() {
            for p in 0..np {
                if stat[d][p][mi].is_none() && work[p] > 0 {
                    let key = (
                        !used[p],
                        std::cmp::Reverse(serves(p, mi, &work)),
                        std::cmp::Reverse(work[p]),
                        proxies[p].id.as_str(),
                        p,
                    );
                    mode_keys.push((p, key));
                }
            }
            mode_keys.sort_by(|a, b| a.1.cmp(&b.1));
            ranked.extend(mode_keys.iter().map(|(p, _)| (mi, *p)));
        }
        // Look-ahead: first candidate that keeps the VM's later disks servable.
        let rest = &needs[d + 1..];
        let mut chosen_at = None;
        for (i, &(_, p)) in ranked.iter().enumerate() {
            work[p] -= 1;
            let ok = feasible(rest, &work);
            work[p] += 1;
            if ok {
                chosen_at = Some(i);
                break;
            }
        }
        // If nothing keeps the rest feasible the VM is refused anyway; take the best.
        let stranded: &[(usize, usize)] = match chosen_at {
            Some(i) => &ranked[..i],
            None => &[],
        };
        let chosen = match chosen_at {
            Some(i) => Some(ranked[i]),
            None => ranked.first().copied(),
        };

        let mut candidates = Vec::with_capacity(np * 3);
        for (mi, &mode) in order.iter().enumerate() {
            for (p, proxy) in proxies.iter().enumerate() {
                let reason = if let Some(r) = &stat[d][p][mi] {
                    r.clone()
                } else if work[p] == 0 {
                    Reason::NoFreeSlots
                } else if let Some((cmi, cp)) = chosen {
                    let key_of = |q: usize| &keys[mi].iter().find(|(x, _)| *x == q).unwrap().1;
                    if (cmi, cp) == (mi, p) {
                        let runner_up = keys[mi]
                            .iter()
                            .map(|(q, _)| *q)
                            .find(|&q| q != cp && !stranded.contains(&(mi, q)));
                        Reason::Chosen {
                            rule: runner_up.map(|q| decisive_rule(key_of(cp), key_of(q))),
                        }
                    } else if stranded.contains(&(mi, p)) {
                        Reason::WouldStrandOtherDisk
                    } else if cmi == mi {
                        Reason::BetterCandidateChosen {
                            chosen: proxies[cp].id.clone(),
                            rule: decisive_rule(key_of(cp), key_of(p)),
                        }
                    } else {
                        Reason::HigherModeChosen {
                            chosen: proxies[cp].id.clone(),
                            mode: order[cmi],
                        }
                    }
                } else {
                    // Unreachable: a slot-valid candidate means `chosen` is set.
                    Reason::NoFreeSlots
                };
                candidates.push(CandidateVerdict {
                    proxy: proxy.id.clone(),
                    proxy_key_provider: norm(&proxy.key_provider),
                    mode,
                    accepted: matches!(reason, Reason::Chosen { .. }),
                    reason,
                });
            }
        }

        let outcome = match chosen {
            Some((mi, p)) => {
                work[p] -= 1;
                used[p] = true;
                Outcome::Assigned {
                    proxy: proxies[p].id.clone(),
                    mode: order[mi],
                }
            }
            None if np == 0 => Outcome::Refused {
                reason: Refusal::NoProxies,
            },
            None => {
                let enc = cryptos[d].0;
                Outcome::Refused {
                    reason: Refusal::NoValidCandidate {
                        modes_considered: order
                            .iter()
                            .copied()
                            .filter(|&m| policy.excludes(m, enc).is_none())
                            .collect(),
                        failover_disabled: policy.automatic() && !policy.failover_to_network,
                    },
                }
            }
        };
        decisions.push(DiskDecision {
            disk_key: disk.key,
            label: disk.label.clone(),
            datastore: disk.datastore.clone(),
            encrypted: cryptos[d].0,
            key_provider: cryptos[d].1.clone(),
            outcome,
            candidates,
        });
    }

    let first_refused = decisions
        .iter()
        .find(|d| matches!(d.outcome, Outcome::Refused { .. }))
        .map(|d| (d.disk_key, d.label.clone()));
    let refused = first_refused.is_some();
    if let Some((disk_key, label)) = first_refused {
        for d in decisions.iter_mut() {
            if matches!(d.outcome, Outcome::Assigned { .. }) {
                d.outcome = Outcome::Refused {
                    reason: Refusal::OtherDiskRefused {
                        disk_key,
                        label: label.clone(),
                    },
                };
                for c in d.candidates.iter_mut().filter(|c| c.accepted) {
                    c.accepted = false;
                    c.reason = Reason::VmRefused {
                        disk_key,
                        label: label.clone(),
                    };
                }
            }
        }
    } else {
        slots.copy_from_slice(&work);
    }

    Selection {
        vm: vm.name.clone(),
        moref: vm.moref.clone(),
        encrypted: vm.encrypted,
        key_provider: norm(&vm.key_provider),
        refused,
        disks: decisions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const A: &str = "KMS-A";
    const B: &str = "KMS-B";

    fn s(x: &str) -> String {
        x.to_string()
    }

    fn disk(key: i32, ds: &str, encrypted: bool, kp: Option<&str>) -> DiskInfo {
        DiskInfo {
            key,
            label: format!("Hard disk {}", key - 1999),
            datastore: s(ds),
            encrypted,
            key_provider: kp.map(s),
        }
    }

    fn vm(name: &str, encrypted: bool, kp: Option<&str>, disks: Vec<DiskInfo>) -> VmInfo {
        VmInfo {
            name: s(name),
            moref: format!("vm-{name}"),
            host: s("esx-1"),
            encrypted,
            key_provider: kp.map(s),
            disks,
        }
    }

    fn hotadd_proxy(id: &str, kp: Option<&str>, ds: &[&str], slots: u32) -> ProxyInfo {
        ProxyInfo {
            id: s(id),
            is_vm: true,
            host: Some(s("esx-1")),
            reachable_hosts: HostReach::Any,
            datastores: ds.iter().map(|d| s(d)).collect(),
            key_provider: kp.map(s),
            modes: vec![Mode::HotAdd],
            free_slots: slots,
        }
    }

    fn nbd_proxy(id: &str, slots: u32) -> ProxyInfo {
        ProxyInfo {
            id: s(id),
            is_vm: false,
            host: None,
            reachable_hosts: HostReach::Any,
            datastores: vec![],
            key_provider: None,
            modes: vec![Mode::NbdSsl, Mode::Nbd],
            free_slots: slots,
        }
    }

    fn policy(failover: bool, cleartext: bool, preferred: Option<Mode>) -> Policy {
        Policy {
            failover_to_network: failover,
            allow_cleartext_nbd: cleartext,
            preferred,
        }
    }

    fn assigned(d: &DiskDecision) -> Option<(&str, Mode)> {
        match &d.outcome {
            Outcome::Assigned { proxy, mode } => Some((proxy.as_str(), *mode)),
            Outcome::Refused { .. } => None,
        }
    }

    // ---------- independent oracle (re-implements the rules from the module doc) ----------

    fn eff(vm: &VmInfo, d: &DiskInfo) -> (bool, Option<String>) {
        let enc = vm.encrypted || d.encrypted;
        let kp = d
            .key_provider
            .clone()
            .filter(|x| !x.is_empty())
            .or_else(|| vm.key_provider.clone().filter(|x| !x.is_empty()));
        (enc, if enc { kp } else { None })
    }

    fn oracle_valid(vm: &VmInfo, d: &DiskInfo, p: &ProxyInfo, m: Mode, pol: &Policy) -> bool {
        let (enc, kp) = eff(vm, d);
        let auto = matches!(pol.preferred, None | Some(Mode::HotAdd));
        if !p.modes.contains(&m) {
            return false;
        }
        let reach = p.reachable_hosts.reaches(&vm.host);
        match m {
            Mode::HotAdd => {
                auto && p.is_vm
                    && p.datastores.contains(&d.datastore)
                    && (!enc || (kp.is_some() && p.key_provider == kp))
            }
            Mode::NbdSsl => (!auto || pol.failover_to_network) && reach,
            Mode::Nbd => {
                !enc && pol.allow_cleartext_nbd && (!auto || pol.failover_to_network) && reach
            }
        }
    }

    fn rank(m: Mode, pol: &Policy) -> usize {
        pol.mode_order().iter().position(|&x| x == m).unwrap()
    }

    /// Every complete, slot-respecting assignment of the VM's disks: (proxy idx, mode) per disk.
    fn all_assignments(
        vm: &VmInfo,
        proxies: &[ProxyInfo],
        pol: &Policy,
    ) -> Vec<Vec<(usize, Mode)>> {
        fn rec(
            i: usize,
            vm: &VmInfo,
            proxies: &[ProxyInfo],
            pol: &Policy,
            used: &mut Vec<u32>,
            cur: &mut Vec<(usize, Mode)>,
            out: &mut Vec<Vec<(usize, Mode)>>,
        ) {
            if i == vm.disks.len() {
                out.push(cur.clone());
                return;
            }
            for (p, px) in proxies.iter().enumerate() {
                if used[p] >= px.free_slots {
                    continue;
                }
                for m in Mode::ALL {
                    if oracle_valid(vm, &vm.disks[i], px, m, pol) {
                        used[p] += 1;
                        cur.push((p, m));
                        rec(i + 1, vm, proxies, pol, used, cur, out);
                        cur.pop();
                        used[p] -= 1;
                    }
                }
            }
        }
        let mut out = Vec::new();
        rec(
            0,
            vm,
            proxies,
            pol,
            &mut vec![0; proxies.len()],
            &mut Vec::new(),
            &mut out,
        );
        out
    }

    /// Invariants every selection must satisfy (slots are those before this VM).
    fn check_vm(vm: &VmInfo, proxies: &[ProxyInfo], pol: &Policy, sel: &Selection, ctx: &str) {
        assert_eq!(sel.disks.len(), vm.disks.len(), "{ctx}");
        let any_refused = sel.disks.iter().any(|d| assigned(d).is_none());
        assert_eq!(sel.refused, any_refused, "{ctx}: refused flag");
        assert_eq!(sel.is_runnable(), !any_refused, "{ctx}");
        assert_eq!(sel.refusal_summary().is_some(), sel.refused, "{ctx}");
        if sel.refused {
            assert!(
                sel.disks.iter().all(|d| assigned(d).is_none()),
                "{ctx}: partial VM"
            );
        }
        let mut used: HashMap<&str, u32> = HashMap::new();
        for (d, dec) in vm.disks.iter().zip(&sel.disks) {
            assert_eq!(dec.disk_key, d.key, "{ctx}");
            // Every proxy x every mode appears exactly once.
            assert_eq!(
                dec.candidates.len(),
                proxies.len() * 3,
                "{ctx}: candidate count"
            );
            for p in proxies {
                for m in Mode::ALL {
                    let n = dec
                        .candidates
                        .iter()
                        .filter(|c| c.proxy == p.id && c.mode == m)
                        .count();
                    assert_eq!(n, 1, "{ctx}: candidate {} {m} listed {n} times", p.id);
                }
            }
            let accepted: Vec<&CandidateVerdict> =
                dec.candidates.iter().filter(|c| c.accepted).collect();
            let (enc, kp) = eff(vm, d);
            assert_eq!(dec.encrypted, enc, "{ctx}");
            // Candidate verdict consistency with the oracle: rejected for a static reason
            // <=> statically invalid.
            for c in &dec.candidates {
                let p = proxies.iter().find(|p| p.id == c.proxy).unwrap();
                let valid = oracle_valid(vm, d, p, c.mode, pol);
                let static_reject = !matches!(
                    c.reason,
                    Reason::Chosen { .. }
                        | Reason::BetterCandidateChosen { .. }
                        | Reason::HigherModeChosen { .. }
                        | Reason::WouldStrandOtherDisk
                        | Reason::VmRefused { .. }
                        | Reason::NoFreeSlots
                );
                assert_eq!(
                    valid, !static_reject,
                    "{ctx}: {} {} {:?}",
                    c.proxy, c.mode, c.reason
                );
                assert!(!c.reason.to_string().is_empty());
                if let Reason::KeyProviderMismatch {
                    proxy_provider,
                    disk_provider,
                } = &c.reason
                {
                    assert_ne!(proxy_provider, disk_provider, "{ctx}");
                }
            }
            match assigned(dec) {
                Some((pid, mode)) => {
                    assert_eq!(accepted.len(), 1, "{ctx}: exactly one accepted");
                    assert_eq!(
                        (accepted[0].proxy.as_str(), accepted[0].mode),
                        (pid, mode),
                        "{ctx}"
                    );
                    let p = proxies.iter().find(|p| p.id == pid).unwrap();
                    assert!(p.modes.contains(&mode), "{ctx}: disabled mode used");
                    let u = used.entry(p.id.as_str()).or_insert(0);
                    *u += 1;
                    assert!(*u <= p.free_slots, "{ctx}: slot overrun on {}", p.id);
                    match mode {
                        Mode::HotAdd => {
                            assert!(p.is_vm, "{ctx}: HotAdd on non-VM");
                            assert!(p.datastores.contains(&d.datastore), "{ctx}");
                            if enc {
                                assert!(
                                    p.key_provider.is_some(),
                                    "{ctx}: encrypted disk to unencrypted proxy"
                                );
                                assert_eq!(
                                    p.key_provider, kp,
                                    "{ctx}: HotAdd across key providers"
                                );
                                assert!(kp.is_some(), "{ctx}");
                            }
                            assert!(matches!(pol.preferred, None | Some(Mode::HotAdd)), "{ctx}");
                        }
                        Mode::Nbd => {
                            assert!(
                                !enc && !vm.encrypted && !d.encrypted,
                                "{ctx}: clear text for encrypted"
                            );
                            assert!(pol.allow_cleartext_nbd, "{ctx}");
                        }
                        Mode::NbdSsl => {}
                    }
                    if mode != Mode::HotAdd {
                        assert!(p.reachable_hosts.reaches(&vm.host), "{ctx}");
                        if matches!(pol.preferred, None | Some(Mode::HotAdd)) {
                            assert!(pol.failover_to_network, "{ctx}: network without failover");
                        }
                    }
                }
                None => assert!(accepted.is_empty(), "{ctx}: accepted on refused disk"),
            }
        }

        // Exact oracle: refused iff no complete assignment; else each disk gets the best
        // mode among complete assignments consistent with the choices before it.
        let all = all_assignments(vm, proxies, pol);
        assert_eq!(
            sel.refused,
            all.is_empty(),
            "{ctx}: refused iff no valid option"
        );
        if !sel.refused {
            let idx = |id: &str| proxies.iter().position(|p| p.id == id).unwrap();
            let mut prefix: Vec<(usize, Mode)> = Vec::new();
            for dec in &sel.disks {
                let (pid, mode) = assigned(dec).unwrap();
                let best = all
                    .iter()
                    .filter(|a| a.starts_with(&prefix))
                    .map(|a| rank(a[prefix.len()].1, pol))
                    .min()
                    .expect("prefix must stay completable");
                assert_eq!(
                    rank(mode, pol),
                    best,
                    "{ctx}: disk {} not on best mode",
                    dec.disk_key
                );
                prefix.push((idx(pid), mode));
                // HotAdd chosen whenever possible (within the completion).
                if best == rank(Mode::HotAdd, pol) {
                    assert_eq!(mode, Mode::HotAdd, "{ctx}");
                }
            }
        }
    }

    fn check_many(
        vms: &[VmInfo],
        proxies: &[ProxyInfo],
        pol: &Policy,
    ) -> (Vec<Selection>, Vec<ProxyInfo>) {
        let mut after = proxies.to_vec();
        let sels = select_many(vms, &mut after, pol);
        let mut cur = proxies.to_vec();
        for (v, sel) in vms.iter().zip(&sels) {
            check_vm(v, &cur, pol, sel, &v.name);
            assert_eq!(
                sel,
                &select(v, &cur, pol),
                "select_many == select with running slots"
            );
            for d in &sel.disks {
                if let Some((pid, _)) = assigned(d) {
                    cur.iter_mut().find(|p| p.id == pid).unwrap().free_slots -= 1;
                }
            }
        }
        assert_eq!(after, cur, "slots decremented exactly by assigned disks");
        (sels, after)
    }

    // ---------- exhaustive matrix ----------

    fn subsets() -> Vec<Vec<Mode>> {
        (0..8u8)
            .map(|b| {
                Mode::ALL
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| b & (1 << i) != 0)
                    .map(|(_, m)| *m)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn exhaustive_matrix_one_disk() {
        let kps = [None, Some(A), Some(B)];
        let prefs = [
            None,
            Some(Mode::HotAdd),
            Some(Mode::NbdSsl),
            Some(Mode::Nbd),
        ];
        let mut cases = 0u64;
        let mut seen_modes: HashMap<Option<Mode>, u64> = HashMap::new();
        for vm_enc in [false, true] {
            for vm_kp in [None, Some(A)] {
                for disk_enc in [false, true] {
                    for disk_kp in kps {
                        for proxy_kp in kps {
                            for is_vm in [false, true] {
                                for ds_visible in [false, true] {
                                    for reach in [false, true] {
                                        for modes in subsets() {
                                            for slots in [0, 1] {
                                                for failover in [false, true] {
                                                    for cleartext in [false, true] {
                                                        for pref in prefs {
                                                            for shared in [false, true] {
                                                                let v = vm(
                                                                    "v",
                                                                    vm_enc,
                                                                    vm_kp,
                                                                    vec![disk(
                                                                        2000, "ds1", disk_enc,
                                                                        disk_kp,
                                                                    )],
                                                                );
                                                                let mut p = ProxyInfo {
                                                                    id: s("px"),
                                                                    is_vm,
                                                                    host: None,
                                                                    reachable_hosts: if reach {
                                                                        HostReach::Any
                                                                    } else {
                                                                        HostReach::Hosts(vec![s(
                                                                            "esx-9",
                                                                        )])
                                                                    },
                                                                    datastores: if ds_visible {
                                                                        vec![s("ds0"), s("ds1")]
                                                                    } else {
                                                                        vec![s("ds0")]
                                                                    },
                                                                    key_provider: proxy_kp.map(s),
                                                                    modes: modes.clone(),
                                                                    free_slots: slots,
                                                                };
                                                                let mut ps = vec![p.clone()];
                                                                if shared {
                                                                    ps.push(nbd_proxy("shared", 1));
                                                                }
                                                                let pol = policy(
                                                                    failover, cleartext, pref,
                                                                );
                                                                let sel = select(&v, &ps, &pol);
                                                                let ctx =
                                                                    format!("{v:?} {ps:?} {pol:?}");
                                                                check_vm(&v, &ps, &pol, &sel, &ctx);
                                                                *seen_modes
                                                                    .entry(
                                                                        assigned(&sel.disks[0])
                                                                            .map(|x| x.1),
                                                                    )
                                                                    .or_default() += 1;
                                                                // select() must not consume slots.
                                                                p.free_slots = slots;
                                                                assert_eq!(ps[0], p);
                                                                cases += 1;
                                                            }
                                                        }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 2 * 2 * 2 * 3 * 3 * 2 * 2 * 2 * 8 * 2 * 2 * 2 * 4 * 2);
        // The matrix really exercises every outcome.
        for k in [
            None,
            Some(Mode::HotAdd),
            Some(Mode::NbdSsl),
            Some(Mode::Nbd),
        ] {
            assert!(
                seen_modes.get(&k).copied().unwrap_or(0) > 0,
                "outcome {k:?} never produced"
            );
        }
    }

    // ---------- randomized multi-disk / multi-proxy / multi-VM with brute-force oracle ----------

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
            xs[(self.next() % xs.len() as u64) as usize]
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn flip(&mut self) -> bool {
            self.below(2) == 0
        }
    }

    #[test]
    fn randomized_multi_disk_matches_bruteforce() {
        let mut r = Lcg(0x5eed);
        let kps = [None, Some(A), Some(B)];
        let dss = ["ds1", "ds2", "ds3"];
        let mut seen = [0u32; 6];
        for case in 0..4000 {
            let nproxies = 1 + r.next() % 3;
            let proxies: Vec<ProxyInfo> = (0..nproxies)
                .map(|i| ProxyInfo {
                    id: format!("p{}{i}", r.next() % 3), // unique, but id order != list order
                    is_vm: r.below(4) != 0,
                    host: None,
                    reachable_hosts: if r.below(4) == 0 {
                        HostReach::Hosts(vec![s("esx-2")])
                    } else {
                        HostReach::Any
                    },
                    datastores: dss.iter().filter(|_| r.flip()).map(|d| s(d)).collect(),
                    key_provider: r.pick(&kps).map(s),
                    modes: Mode::ALL
                        .iter()
                        .copied()
                        .filter(|_| r.below(4) != 0)
                        .collect(),
                    free_slots: (r.next() % 3) as u32 + u32::from(i == 0),
                })
                .collect();
            let nvms = 1 + r.next() % 3;
            let vms: Vec<VmInfo> = (0..nvms)
                .map(|i| {
                    let enc = r.below(3) != 0;
                    let kp = if enc {
                        r.pick(&[Some(A), Some(B), Some(A), None])
                    } else {
                        None
                    };
                    let nd = 1 + r.next() % 3;
                    let disks = (0..nd)
                        .map(|k| {
                            let de = enc || r.below(5) == 0;
                            let dkp = if r.below(4) == 0 { r.pick(&kps) } else { None };
                            disk(2000 + k as i32, r.pick(&dss), de, dkp)
                        })
                        .collect();
                    let mut v = vm(&format!("c{case}v{i}"), enc, kp, disks);
                    if r.below(5) == 0 {
                        v.host = s("esx-2");
                    }
                    v
                })
                .collect();
            let pol = policy(
                r.flip(),
                r.flip(),
                r.pick(&[
                    None,
                    None,
                    Some(Mode::HotAdd),
                    Some(Mode::NbdSsl),
                    Some(Mode::Nbd),
                ]),
            );
            let (sels, _) = check_many(&vms, &proxies, &pol);
            for sel in &sels {
                seen[0] += u32::from(sel.refused);
                seen[1] += u32::from(!sel.refused);
                for c in sel.disks.iter().flat_map(|d| &d.candidates) {
                    seen[2] += u32::from(c.reason == Reason::WouldStrandOtherDisk);
                    seen[3] += u32::from(matches!(c.reason, Reason::VmRefused { .. }));
                    seen[4] += u32::from(matches!(c.reason, Reason::BetterCandidateChosen { .. }));
                    seen[5] += u32::from(matches!(c.reason, Reason::KeyProviderMismatch { .. }));
                }
            }
        }
        // The generator really reaches refusals, look-ahead skips and tie-breaks.
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }

    #[test]
    fn feasibility_matching() {
        assert!(feasible(&[], &[]));
        assert!(feasible(&[vec![0, 1], vec![0]], &[1, 1]));
        assert!(!feasible(&[vec![0], vec![0]], &[1, 5]));
        assert!(feasible(&[vec![0], vec![0]], &[2]));
        assert!(!feasible(&[vec![]], &[3]));
        assert!(feasible(&[vec![0, 1], vec![1, 2], vec![0]], &[1, 1, 1]));
    }

    // ---------- whitepaper scenarios ----------

    fn tenant_vms() -> Vec<VmInfo> {
        // Interleaved so both tenants compete in the same batch.
        (1..=10)
            .flat_map(|i| {
                [
                    vm(
                        &format!("a{i:02}"),
                        true,
                        Some(A),
                        vec![disk(2000, "ds-a", true, None)],
                    ),
                    vm(
                        &format!("b{i:02}"),
                        true,
                        Some(B),
                        vec![disk(2000, "ds-b", true, None)],
                    ),
                ]
            })
            .collect()
    }

    fn tenant_proxies(slots: u32) -> Vec<ProxyInfo> {
        // Both HotAdd proxies see every datastore: only the key provider keeps them apart.
        vec![
            hotadd_proxy("proxy-a", Some(A), &["ds-a", "ds-b"], slots),
            hotadd_proxy("proxy-b", Some(B), &["ds-a", "ds-b"], slots),
            nbd_proxy("shared-nbd", 100),
        ]
    }

    fn tenant_of(name: &str) -> char {
        name.chars().next().unwrap()
    }

    #[test]
    fn whitepaper_each_tenant_hotadds_on_its_own_proxy_overflow_to_nbdssl() {
        let vms = tenant_vms();
        let pol = policy(true, true, None); // clear text allowed: still never used for these VMs
        let (sels, after) = check_many(&vms, &tenant_proxies(8), &pol);
        let mut count: HashMap<(char, &str, Mode), u32> = HashMap::new();
        for sel in &sels {
            assert!(sel.is_runnable());
            let (p, m) = assigned(&sel.disks[0]).unwrap();
            *count.entry((tenant_of(&sel.vm), p, m)).or_default() += 1;
            // Explanation names the other tenant's proxy and why.
            let other = if tenant_of(&sel.vm) == 'a' {
                "proxy-b"
            } else {
                "proxy-a"
            };
            let c = sel.disks[0]
                .candidates
                .iter()
                .find(|c| c.proxy == other && c.mode == Mode::HotAdd)
                .unwrap();
            assert!(
                matches!(c.reason, Reason::KeyProviderMismatch { .. }),
                "{:?}",
                c.reason
            );
        }
        let expect: HashMap<(char, &str, Mode), u32> = [
            (('a', "proxy-a", Mode::HotAdd), 8),
            (('a', "shared-nbd", Mode::NbdSsl), 2),
            (('b', "proxy-b", Mode::HotAdd), 8),
            (('b', "shared-nbd", Mode::NbdSsl), 2),
        ]
        .into_iter()
        .collect();
        assert_eq!(count, expect);
        // The first 8 of each tenant get HotAdd (VM order is priority).
        assert_eq!(
            assigned(&sels[14].disks[0]),
            Some(("proxy-a", Mode::HotAdd))
        );
        assert_eq!(
            assigned(&sels[16].disks[0]),
            Some(("shared-nbd", Mode::NbdSsl))
        );
        // Overflow disks explain that the right proxy was full.
        let c = sels[16].disks[0]
            .candidates
            .iter()
            .find(|c| c.proxy == "proxy-a" && c.mode == Mode::HotAdd)
            .unwrap();
        assert_eq!(c.reason, Reason::NoFreeSlots);
        assert_eq!(
            after.iter().map(|p| p.free_slots).collect::<Vec<_>>(),
            vec![0, 0, 96]
        );
    }

    #[test]
    fn whitepaper_enough_slots_all_hotadd_nothing_crosses() {
        let (sels, after) = check_many(&tenant_vms(), &tenant_proxies(10), &Policy::default());
        for sel in &sels {
            let want = if tenant_of(&sel.vm) == 'a' {
                "proxy-a"
            } else {
                "proxy-b"
            };
            assert_eq!(
                assigned(&sel.disks[0]),
                Some((want, Mode::HotAdd)),
                "{}",
                sel.vm
            );
        }
        assert_eq!(
            after.iter().map(|p| p.free_slots).collect::<Vec<_>>(),
            vec![0, 0, 100]
        );
    }

    #[test]
    fn whitepaper_proxy_b_absent_failover_disabled_refuses_b_vms() {
        let mut proxies = tenant_proxies(10);
        proxies.remove(1);
        let pol = policy(false, true, None);
        let (sels, after) = check_many(&tenant_vms(), &proxies, &pol);
        for sel in &sels {
            if tenant_of(&sel.vm) == 'a' {
                assert_eq!(assigned(&sel.disks[0]), Some(("proxy-a", Mode::HotAdd)));
                continue;
            }
            assert!(!sel.is_runnable(), "{}", sel.vm);
            let summary = sel.refusal_summary().unwrap();
            for needle in [
                "refused before snapshot",
                "proxy-a (key provider KMS-A) hotadd",
                "KMS-B",
                "shared-nbd (unencrypted) hotadd",
                "failover to network transport is disabled",
            ] {
                assert!(
                    summary.contains(needle),
                    "missing {needle:?} in:\n{summary}"
                );
            }
            assert_eq!(
                sel.disks[0].outcome,
                Outcome::Refused {
                    reason: Refusal::NoValidCandidate {
                        modes_considered: vec![Mode::HotAdd],
                        failover_disabled: true
                    }
                }
            );
        }
        assert_eq!(after[0].free_slots, 0);
        assert_eq!(after[1].free_slots, 100, "refused VMs consume no slots");
    }

    #[test]
    fn whitepaper_proxy_b_down_failover_allowed_goes_nbdssl_never_cleartext() {
        let mut proxies = tenant_proxies(10);
        proxies[1].free_slots = 0; // down / saturated
        let (sels, _) = check_many(
            &tenant_vms(),
            &proxies,
            &policy(true, true, Some(Mode::HotAdd)),
        );
        for sel in sels.iter().filter(|s| tenant_of(&s.vm) == 'b') {
            assert_eq!(assigned(&sel.disks[0]), Some(("shared-nbd", Mode::NbdSsl)));
            let c = sel.disks[0]
                .candidates
                .iter()
                .find(|c| c.mode == Mode::Nbd && c.proxy == "shared-nbd")
                .unwrap();
            assert_eq!(c.reason, Reason::ClearTextForbiddenEncrypted);
        }
    }

    #[test]
    fn wrong_kms_only_refusal_names_every_proxy_and_provider() {
        let v = vm("enc", true, Some(A), vec![disk(2000, "ds1", true, None)]);
        let proxies = vec![
            hotadd_proxy("px-b", Some(B), &["ds1"], 4),
            hotadd_proxy("px-c", Some("KMS-C"), &["ds1"], 4),
            hotadd_proxy("px-plain", None, &["ds1"], 4),
        ];
        let sel = select(&v, &proxies, &policy(false, false, None));
        check_vm(&v, &proxies, &policy(false, false, None), &sel, "wrong kms");
        let text = sel.refusal_summary().unwrap();
        for needle in [
            "px-b (key provider KMS-B)",
            "px-c (key provider KMS-C)",
            "px-plain (unencrypted)",
            "'KMS-A'",
            "not encrypted",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn mixed_unencrypted_vms_hotadd_anywhere_then_network() {
        let proxies = vec![
            hotadd_proxy("proxy-a", Some(A), &["ds-a", "ds-plain"], 2),
            hotadd_proxy("proxy-b", Some(B), &["ds-b", "ds-plain"], 3),
            nbd_proxy("shared-nbd", 10),
        ];
        let vms: Vec<VmInfo> = (0..7)
            .map(|i| {
                vm(
                    &format!("u{i}"),
                    false,
                    None,
                    vec![disk(2000, "ds-plain", false, None)],
                )
            })
            .collect();
        // Clear text allowed: overflow goes to plain NBD? No: NBD-SSL ranks before NBD.
        let (sels, after) = check_many(&vms, &proxies, &policy(true, true, None));
        let got: Vec<_> = sels
            .iter()
            .map(|s| assigned(&s.disks[0]).unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                ("proxy-b", Mode::HotAdd), // 3 free > 2 free
                ("proxy-a", Mode::HotAdd), // 2 == 2, lower id
                ("proxy-b", Mode::HotAdd),
                ("proxy-a", Mode::HotAdd),
                ("proxy-b", Mode::HotAdd),
                ("shared-nbd", Mode::NbdSsl),
                ("shared-nbd", Mode::NbdSsl),
            ]
        );
        assert_eq!(
            sels[0].disks[0]
                .candidates
                .iter()
                .find(|c| c.accepted)
                .unwrap()
                .reason,
            Reason::Chosen {
                rule: Some(TieBreak::MoreFreeSlots)
            }
        );
        assert_eq!(
            sels[1].disks[0]
                .candidates
                .iter()
                .find(|c| c.accepted)
                .unwrap()
                .reason,
            Reason::Chosen {
                rule: Some(TieBreak::LowerId)
            }
        );
        assert_eq!(after[2].free_slots, 8);
        // Forced clear text for unencrypted VMs, NBD-SSL for an encrypted one.
        let mut shared_only = vec![nbd_proxy("shared-nbd", 10)];
        let enc = vm("e", true, Some(A), vec![disk(2000, "ds-a", true, None)]);
        let (sels, _) = check_many(
            &[vms[0].clone(), enc],
            &shared_only,
            &policy(false, true, Some(Mode::Nbd)),
        );
        assert_eq!(assigned(&sels[0].disks[0]), Some(("shared-nbd", Mode::Nbd)));
        assert_eq!(
            assigned(&sels[1].disks[0]),
            Some(("shared-nbd", Mode::NbdSsl))
        );
        // Clear text when NBD-SSL is disabled on the proxy and policy allows it.
        shared_only[0].modes = vec![Mode::Nbd];
        let (sels, _) = check_many(&vms[..1], &shared_only, &policy(true, true, None));
        assert_eq!(assigned(&sels[0].disks[0]), Some(("shared-nbd", Mode::Nbd)));
        let (sels, _) = check_many(&vms[..1], &shared_only, &policy(true, false, None));
        assert!(sels[0].refused);
    }

    #[test]
    fn forced_nbdssl_skips_valid_hotadd() {
        let v = vm("u", false, None, vec![disk(2000, "ds1", false, None)]);
        let proxies = vec![hotadd_proxy("ha", None, &["ds1"], 1), nbd_proxy("net", 1)];
        let pol = policy(false, true, Some(Mode::NbdSsl));
        let sel = select(&v, &proxies, &pol);
        check_vm(&v, &proxies, &pol, &sel, "forced");
        assert_eq!(assigned(&sel.disks[0]), Some(("net", Mode::NbdSsl)));
        let c = sel.disks[0]
            .candidates
            .iter()
            .find(|c| c.proxy == "ha" && c.mode == Mode::HotAdd)
            .unwrap();
        assert_eq!(
            c.reason,
            Reason::NetworkModeForced {
                preferred: Mode::NbdSsl
            }
        );
        // Lower-ranked valid mode says why it was not used.
        let c = sel.disks[0]
            .candidates
            .iter()
            .find(|c| c.proxy == "net" && c.mode == Mode::Nbd)
            .unwrap();
        assert_eq!(
            c.reason,
            Reason::HigherModeChosen {
                chosen: s("net"),
                mode: Mode::NbdSsl
            }
        );
    }

    #[test]
    fn vm_disks_stay_on_one_proxy() {
        let v = vm(
            "m",
            false,
            None,
            (0..3).map(|k| disk(2000 + k, "ds1", false, None)).collect(),
        );
        let proxies = vec![
            hotadd_proxy("p1", None, &["ds1"], 3),
            hotadd_proxy("p2", None, &["ds1"], 4),
        ];
        let sel = select(&v, &proxies, &Policy::default());
        check_vm(&v, &proxies, &Policy::default(), &sel, "sticky");
        for d in &sel.disks {
            assert_eq!(assigned(d), Some(("p2", Mode::HotAdd)));
        }
        let r = &sel.disks[1]
            .candidates
            .iter()
            .find(|c| c.accepted)
            .unwrap()
            .reason;
        assert_eq!(
            r,
            &Reason::Chosen {
                rule: Some(TieBreak::AlreadyServesVm)
            }
        );
        // A proxy that can take all disks beats one with more slots that sees only one.
        let v = vm(
            "m2",
            false,
            None,
            vec![
                disk(2000, "ds1", false, None),
                disk(2001, "ds2", false, None),
            ],
        );
        let proxies = vec![
            hotadd_proxy("big", None, &["ds1"], 9),
            hotadd_proxy("both", None, &["ds1", "ds2"], 2),
        ];
        let sel = select(&v, &proxies, &Policy::default());
        assert_eq!(assigned(&sel.disks[0]), Some(("both", Mode::HotAdd)));
        assert_eq!(assigned(&sel.disks[1]), Some(("both", Mode::HotAdd)));
        let c = sel.disks[0]
            .candidates
            .iter()
            .find(|c| c.proxy == "big" && c.mode == Mode::HotAdd)
            .unwrap();
        assert_eq!(
            c.reason,
            Reason::BetterCandidateChosen {
                chosen: s("both"),
                rule: TieBreak::ServesMoreDisks
            }
        );
    }

    #[test]
    fn lookahead_avoids_stranding_a_later_disk() {
        // Plain greedy would give disk 1 to p1 (lower id) and strand disk 2 (only p1 sees ds2).
        let v = vm(
            "la",
            false,
            None,
            vec![
                disk(2000, "ds1", false, None),
                disk(2001, "ds2", false, None),
            ],
        );
        let proxies = vec![
            hotadd_proxy("p1", None, &["ds1", "ds2"], 1),
            hotadd_proxy("p2", None, &["ds1"], 1),
        ];
        let pol = policy(false, false, None);
        let sel = select(&v, &proxies, &pol);
        check_vm(&v, &proxies, &pol, &sel, "lookahead");
        assert_eq!(assigned(&sel.disks[0]), Some(("p2", Mode::HotAdd)));
        assert_eq!(assigned(&sel.disks[1]), Some(("p1", Mode::HotAdd)));
        let c = sel.disks[0]
            .candidates
            .iter()
            .find(|c| c.proxy == "p1" && c.mode == Mode::HotAdd)
            .unwrap();
        assert_eq!(c.reason, Reason::WouldStrandOtherDisk);
    }

    #[test]
    fn one_refused_disk_refuses_whole_vm_and_frees_slots() {
        let v = vm(
            "half",
            true,
            Some(A),
            vec![
                disk(2000, "ds-a", true, None),
                disk(2001, "ds-a", true, Some(B)),
            ], // 2nd disk under KMS-B
        );
        let mut proxies = vec![hotadd_proxy("proxy-a", Some(A), &["ds-a"], 5)];
        let pol = policy(false, false, None);
        let sels = select_many(std::slice::from_ref(&v), &mut proxies, &pol);
        let sel = &sels[0];
        assert!(sel.refused);
        assert_eq!(proxies[0].free_slots, 5);
        assert_eq!(
            sel.disks[0].outcome,
            Outcome::Refused {
                reason: Refusal::OtherDiskRefused {
                    disk_key: 2001,
                    label: s("Hard disk 2")
                }
            }
        );
        assert!(matches!(
            sel.disks[0].candidates[0].reason,
            Reason::VmRefused { disk_key: 2001, .. }
        ));
        assert_eq!(
            sel.disks[1].candidates[0].reason,
            Reason::KeyProviderMismatch {
                proxy_provider: s(A),
                disk_provider: s(B)
            }
        );
        let text = sel.refusal_summary().unwrap();
        assert!(
            text.contains("disk 2001") && !text.contains("disk 2000"),
            "{text}"
        );
    }

    #[test]
    fn disk_key_provider_overrides_vm_and_vm_encryption_covers_plain_disk() {
        let proxies = vec![
            hotadd_proxy("proxy-a", Some(A), &["ds"], 5),
            hotadd_proxy("proxy-b", Some(B), &["ds"], 5),
        ];
        let v = vm("o", true, Some(A), vec![disk(2000, "ds", true, Some(B))]);
        assert_eq!(
            assigned(&select(&v, &proxies, &Policy::default()).disks[0]),
            Some(("proxy-b", Mode::HotAdd))
        );
        // Unencrypted disk of an encrypted VM is treated as encrypted under the VM's provider.
        let v = vm("o2", true, Some(B), vec![disk(2000, "ds", false, None)]);
        let sel = select(&v, &proxies, &Policy::default());
        assert_eq!(sel.disks[0].key_provider.as_deref(), Some(B));
        assert_eq!(assigned(&sel.disks[0]), Some(("proxy-b", Mode::HotAdd)));
        // Encrypted with unknown provider: HotAdd impossible, explained.
        let v = vm("o3", true, Some(""), vec![disk(2000, "ds", true, None)]);
        let sel = select(&v, &proxies, &policy(false, false, None));
        assert!(sel.refused);
        assert_eq!(
            sel.disks[0].candidates[0].reason,
            Reason::KeyProviderUnknown
        );
    }

    #[test]
    fn no_proxies_and_no_disks() {
        let v = vm("x", false, None, vec![disk(2000, "ds", false, None)]);
        let sel = select(&v, &[], &Policy::default());
        assert_eq!(
            sel.disks[0].outcome,
            Outcome::Refused {
                reason: Refusal::NoProxies
            }
        );
        let empty = vm("e", false, None, vec![]);
        assert!(select(&empty, &[nbd_proxy("n", 1)], &Policy::default()).is_runnable());
    }

    #[test]
    fn deterministic_and_order_of_proxies_irrelevant_for_choice() {
        let vms = tenant_vms();
        let p1 = tenant_proxies(8);
        let mut p2 = p1.clone();
        p2.reverse();
        let a = select_many(&vms, &mut p1.clone(), &Policy::default());
        let b = select_many(&vms, &mut p1.clone(), &Policy::default());
        assert_eq!(a, b);
        let c = select_many(&vms, &mut p2, &Policy::default());
        for (x, y) in a.iter().zip(&c) {
            assert_eq!(assigned(&x.disks[0]), assigned(&y.disks[0]));
        }
    }

    #[test]
    fn render_table_and_explain() {
        let mut proxies = tenant_proxies(1);
        proxies.remove(2);
        let vms = vec![
            vm("a01", true, Some(A), vec![disk(2000, "ds-a", true, None)]),
            vm("b01", true, Some(B), vec![disk(2000, "ds-b", true, None)]),
            vm("b02", true, Some(B), vec![disk(2000, "ds-b", true, None)]),
        ];
        let sels = select_many(&vms, &mut proxies, &policy(false, false, None));
        let t = render_table(&sels);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("VM "));
        assert!(
            lines[1].contains("a01") && lines[1].contains("proxy-a") && lines[1].contains("hotadd"),
            "{t}"
        );
        assert!(
            lines[2].contains("proxy-b") && lines[2].contains("chosen"),
            "{t}"
        );
        assert!(
            lines[3].contains("REFUSED: no candidate proxy qualifies for hotadd"),
            "{t}"
        );
        // Columns aligned: "MODE" header column starts where "hotadd" does.
        assert_eq!(lines[0].find("MODE"), lines[1].find("hotadd"));
        let e = sels[2].explain();
        assert!(
            e.contains("REFUSED")
                && e.contains(
                    "[ ] proxy-b (key provider KMS-B) hotadd: the proxy has no free task slot left"
                ),
            "{e}"
        );
        assert!(sels[0].explain().contains("[x] proxy-a"));
    }

    #[test]
    fn serde_round_trip_and_names() {
        let sels = select_many(
            &tenant_vms()[..4],
            &mut tenant_proxies(1),
            &Policy::default(),
        );
        let j = serde_json::to_string(&sels).unwrap();
        assert!(
            j.contains("\"mode\":\"hotadd\"") && j.contains("\"kind\":\"key_provider_mismatch\""),
            "{j}"
        );
        let back: Vec<Selection> = serde_json::from_str(&j).unwrap();
        assert_eq!(back, sels);
        let p: ProxyInfo = serde_json::from_str(
            r#"{"id":"p","is_vm":true,"reachable_hosts":{"hosts":["esx-1"]},"modes":["hotadd","nbdssl"],"free_slots":2}"#,
        )
        .unwrap();
        assert_eq!(p.reachable_hosts, HostReach::Hosts(vec![s("esx-1")]));
        let pol: Policy =
            serde_json::from_str(r#"{"failover_to_network":false,"allow_cleartext_nbd":false}"#)
                .unwrap();
        assert_eq!(pol.preferred, None);
    }

    #[test]
    fn reason_summary_names_the_choice_and_why_earlier_modes_were_not_used() {
        let v = vm(
            "db",
            true,
            Some("KMS-B"),
            vec![disk(2000, "ds1", true, None)],
        );
        let proxies = [
            hotadd_proxy("px-a", Some("KMS-A"), &["ds1"], 2),
            nbd_proxy("px-shared", 2),
        ];
        let sel = select(&v, &proxies, &policy(true, false, None));
        let r = sel.disks[0].reason_summary();
        assert!(r.starts_with("nbdssl via px-shared"), "{r}");
        assert!(r.contains("hotadd not used (px-a:"), "{r}");
        assert!(r.contains("KMS-A") && r.contains("KMS-B"), "{r}");
        let refused = select(&v, &proxies[..1], &policy(false, false, None));
        assert!(refused.disks[0].reason_summary().starts_with("refused: "));
    }
}
