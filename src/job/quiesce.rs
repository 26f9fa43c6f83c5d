//! Quiesce policy of a VM backup: whether the snapshot is asked application-
//! consistent (quiesced through VMware Tools), what happens when vCenter cannot
//! quiesce the guest, and what the restore point records about it.
//!
//! Pure: [`decide`] maps the policy and the outcome of the quiesced attempt to
//! keep / fall back to crash-consistent / fail, with the reason the point
//! records; [`quiesce_failure`] says which vCenter errors mean "cannot quiesce"
//! (and so may be fallen back from) as opposed to errors a crash-consistent
//! snapshot would hit too. The vCenter calls are [`super::vm`]'s.

use crate::repo::manifest::{Consistency, SnapshotRecord};
use crate::vsphere::VsphereError;
use serde::{Deserialize, Serialize};

/// How a VM's snapshot is taken. TOML and JSON: `"off"`, `"prefer"`, `"require"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuiescePolicy {
    /// Crash-consistent snapshot; the guest is not asked to quiesce (default).
    #[default]
    Off,
    /// Ask for a quiesced snapshot; when VMware Tools is not running or the
    /// quiesce fails, take a crash-consistent one and record why.
    Prefer,
    /// Ask for a quiesced snapshot; when the guest cannot be quiesced, fail the
    /// VM's backup (nothing is left on vCenter).
    Require,
}

impl QuiescePolicy {
    /// Every policy, in order.
    pub const ALL: [QuiescePolicy; 3] = [
        QuiescePolicy::Off,
        QuiescePolicy::Prefer,
        QuiescePolicy::Require,
    ];

    /// `"off"`, `"prefer"`, `"require"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            QuiescePolicy::Off => "off",
            QuiescePolicy::Prefer => "prefer",
            QuiescePolicy::Require => "require",
        }
    }

    /// Whether the first snapshot is asked quiesced.
    pub fn asks_quiesce(&self) -> bool {
        !matches!(self, QuiescePolicy::Off)
    }
}

impl std::fmt::Display for QuiescePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QuiescePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        QuiescePolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("{s:?}: use off, prefer or require"))
    }
}

/// Why vCenter could not take a quiesced snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuiesceFailure {
    /// vim25 fault type (`ToolsUnavailable`, `ApplicationQuiesceFault`, ...).
    pub fault_type: String,
    /// vCenter's message.
    pub message: String,
}

impl std::fmt::Display for QuiesceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.is_empty() {
            f.write_str(&self.fault_type)
        } else {
            write!(f, "{}: {}", self.fault_type, self.message)
        }
    }
}

/// vim25 faults of `CreateSnapshot_Task` that mean the guest could not be
/// quiesced: VMware Tools is not running (or not installed), a pre-freeze script
/// failed, or the file systems could not be held frozen long enough. vSphere
/// rolls the snapshot back in every case.
pub const QUIESCE_FAULTS: [&str; 3] = [
    "ToolsUnavailable",
    "ApplicationQuiesceFault",
    "FilesystemQuiesceFault",
];

/// Whether `e`, the error of a quiesced `CreateSnapshot_Task`, means the guest
/// could not be quiesced (a crash-consistent snapshot may still work), and how.
/// Locks, permissions, states and transport errors are not: they would fail a
/// crash-consistent snapshot as well.
pub fn quiesce_failure(e: &VsphereError) -> Option<QuiesceFailure> {
    let (fault_type, message) = match e {
        VsphereError::TaskFailed {
            fault_type,
            message,
            ..
        }
        | VsphereError::Fault {
            fault_type,
            message,
            ..
        } => (fault_type, message),
        _ => return None,
    };
    // Any snapshot fault that says it is about quiescing (vCenter versions word
    // the guest's refusal differently: "An error occurred while quiescing...").
    let about_quiesce = matches!(fault_type.as_str(), "SnapshotFault" | "SystemError")
        && message.to_ascii_lowercase().contains("quiesc");
    (QUIESCE_FAULTS.contains(&fault_type.as_str()) || about_quiesce).then(|| QuiesceFailure {
        fault_type: fault_type.clone(),
        message: message.clone(),
    })
}

/// A quiesced snapshot was required and the guest could not be quiesced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VM {vm}: an application-consistent snapshot is required (quiesce = \"require\") but vCenter could not quiesce the guest ({failure}); nothing was backed up and no snapshot was left. Install or start VMware Tools in the guest (and check its quiescing: pre-freeze scripts, VSS writers), or set quiesce = \"prefer\" to accept a crash-consistent snapshot when quiescing fails")]
pub struct QuiesceRequired {
    /// VM name.
    pub vm: String,
    /// What vCenter said.
    pub failure: QuiesceFailure,
}

/// What to do after the first snapshot attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The snapshot taken stands; the point records this.
    Keep(SnapshotRecord),
    /// Take a crash-consistent snapshot instead; the point records this.
    FallBack(SnapshotRecord),
    /// Fail the VM's backup.
    Fail(QuiesceRequired),
}

/// The decision for `policy` on VM `vm` after the first snapshot attempt (quiesced
/// unless the policy is off): `Ok(())` when it was taken, the failure when the
/// guest could not be quiesced.
pub fn decide(policy: QuiescePolicy, vm: &str, attempt: Result<(), &QuiesceFailure>) -> Decision {
    match (policy, attempt) {
        (QuiescePolicy::Off, Ok(())) => Decision::Keep(SnapshotRecord {
            consistency: Consistency::Crash,
            reason: "policy off: crash-consistent snapshot (quiescing not asked)".into(),
        }),
        (p, Ok(())) => Decision::Keep(SnapshotRecord {
            consistency: Consistency::Application,
            reason: format!("policy {p}: guest quiesced through VMware Tools"),
        }),
        (QuiescePolicy::Require, Err(f)) => Decision::Fail(QuiesceRequired {
            vm: vm.to_string(),
            failure: f.clone(),
        }),
        // Off never asks to quiesce; a crash-consistent snapshot is what it wants.
        (p, Err(f)) => Decision::FallBack(SnapshotRecord {
            consistency: Consistency::Crash,
            reason: format!("policy {p}: quiesce failed ({f}); crash-consistent snapshot taken"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(t: &str, m: &str) -> QuiesceFailure {
        QuiesceFailure {
            fault_type: t.into(),
            message: m.into(),
        }
    }

    fn task_failed(t: &str, m: &str) -> VsphereError {
        VsphereError::TaskFailed {
            vcenter: "https://vc/sdk".into(),
            doing: "creating snapshot".into(),
            task: "task-1".into(),
            fault_type: t.into(),
            message: m.into(),
        }
    }

    #[test]
    fn policy_by_outcome() {
        let tools = failure(
            "ToolsUnavailable",
            "Cannot complete operation because VMware Tools is not running in this virtual machine.",
        );
        match decide(QuiescePolicy::Off, "web01", Ok(())) {
            Decision::Keep(r) => {
                assert_eq!(r.consistency, Consistency::Crash);
                assert!(r.reason.starts_with("policy off"), "{}", r.reason);
            }
            other => panic!("{other:?}"),
        }
        for p in [QuiescePolicy::Prefer, QuiescePolicy::Require] {
            match decide(p, "web01", Ok(())) {
                Decision::Keep(r) => {
                    assert_eq!(r.consistency, Consistency::Application);
                    assert!(r.reason.contains(&format!("policy {p}")), "{}", r.reason);
                }
                other => panic!("{other:?}"),
            }
        }
        match decide(QuiescePolicy::Prefer, "web01", Err(&tools)) {
            Decision::FallBack(r) => {
                assert_eq!(r.consistency, Consistency::Crash);
                assert_eq!(
                    r.reason,
                    "policy prefer: quiesce failed (ToolsUnavailable: Cannot complete operation because VMware Tools is not running in this virtual machine.); crash-consistent snapshot taken"
                );
            }
            other => panic!("{other:?}"),
        }
        match decide(QuiescePolicy::Require, "web01", Err(&tools)) {
            Decision::Fail(e) => {
                let m = e.to_string();
                for want in [
                    "VM web01",
                    "ToolsUnavailable",
                    "VMware Tools is not running",
                    "quiesce = \"prefer\"",
                    "Install or start VMware Tools",
                ] {
                    assert!(m.contains(want), "{want}: {m}");
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(QuiescePolicy::Off, "web01", Err(&tools)),
            Decision::FallBack(_)
        ));
    }

    #[test]
    fn which_faults_mean_cannot_quiesce() {
        for t in QUIESCE_FAULTS {
            assert_eq!(
                quiesce_failure(&task_failed(t, "m")),
                Some(failure(t, "m")),
                "{t}"
            );
        }
        assert!(quiesce_failure(&task_failed(
            "SnapshotFault",
            "An error occurred while quiescing the virtual machine."
        ))
        .is_some());
        // Faults a crash-consistent snapshot would hit too.
        assert!(quiesce_failure(&task_failed("SnapshotFault", "Too many snapshots")).is_none());
        assert!(quiesce_failure(&task_failed("SystemError", "disk full")).is_none());
        let locked = VsphereError::FileLocked {
            vcenter: "v".into(),
            doing: "d".into(),
            message: "quiesce".into(),
        };
        assert!(quiesce_failure(&locked).is_none());
    }

    #[test]
    fn policy_parses_and_serializes() {
        for p in QuiescePolicy::ALL {
            assert_eq!(p.as_str().parse::<QuiescePolicy>(), Ok(p));
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
        }
        assert_eq!(
            " Prefer ".parse::<QuiescePolicy>(),
            Ok(QuiescePolicy::Prefer)
        );
        assert!("yes"
            .parse::<QuiescePolicy>()
            .unwrap_err()
            .contains("off, prefer or require"));
        assert_eq!(QuiescePolicy::default(), QuiescePolicy::Off);
        assert!(!QuiescePolicy::Off.asks_quiesce());
        assert!(QuiescePolicy::Require.asks_quiesce());
    }
}
