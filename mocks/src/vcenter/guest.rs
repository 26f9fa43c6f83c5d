//! VMware Tools in the mock's guests: whether Tools runs, and what a quiesced
//! snapshot request does in the guest (works, a pre-freeze script fails, the
//! file systems cannot be held frozen). `CreateSnapshot_Task` with
//! `quiesce = true` answers as vSphere does (a task error with
//! `ToolsUnavailable`, `ApplicationQuiesceFault` or `FilesystemQuiesceFault`,
//! and nothing of the snapshot left); `guest.toolsStatus` and
//! `guest.toolsRunningStatus` report the state. Also the audit of every snapshot
//! request (quiesced or not, and what came of it), for tests.
//!
//! Set per VM by the scenario (`[[vm]] tools`, `quiesce`), the admin API
//! (`POST /admin/vms/{vm}/guest`) or [`super::Admin::set_guest`].

use super::codec::{Fault, Obj, Val};
use serde::{Deserialize, Serialize};

/// Whether VMware Tools runs in the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToolsState {
    /// Installed and running (the default).
    #[default]
    Running,
    /// Installed, not running.
    NotRunning,
    /// Not installed.
    NotInstalled,
}

/// What the guest does when asked to quiesce (with Tools running).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuiesceBehaviour {
    /// Quiesces (the default).
    #[default]
    Ok,
    /// A pre-freeze script or VSS writer fails: `ApplicationQuiesceFault`.
    ApplicationFault,
    /// The freeze outlasts the I/O hold-off limit: `FilesystemQuiesceFault`.
    FilesystemFault,
}

/// A VM's guest as far as snapshots are concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestTools {
    /// VMware Tools state.
    #[serde(default)]
    pub tools: ToolsState,
    /// What a quiesce request does.
    #[serde(default)]
    pub quiesce: QuiesceBehaviour,
}

/// vSphere's message when Tools is not running (or not installed).
pub const TOOLS_UNAVAILABLE_MSG: &str =
    "Cannot complete operation because VMware Tools is not running in this virtual machine.";

impl GuestTools {
    /// The fault a quiesced `CreateSnapshot_Task` ends with, if any.
    pub fn quiesce_fault(&self) -> Option<Fault> {
        match (self.tools, self.quiesce) {
            (ToolsState::NotRunning | ToolsState::NotInstalled, _) => {
                Some(Fault::new("ToolsUnavailable", TOOLS_UNAVAILABLE_MSG))
            }
            (ToolsState::Running, QuiesceBehaviour::Ok) => None,
            (ToolsState::Running, QuiesceBehaviour::ApplicationFault) => Some(Fault::new(
                "ApplicationQuiesceFault",
                "An error occurred while quiescing the virtual machine: a pre-freeze script or VSS writer in the guest failed. See the virtual machine's event log for details.",
            )),
            (ToolsState::Running, QuiesceBehaviour::FilesystemFault) => Some(Fault::new(
                "FilesystemQuiesceFault",
                "Cannot create a quiesced snapshot because the create snapshot operation exceeded the time limit for holding off I/O in the frozen virtual machine.",
            )),
        }
    }

    /// The VM's `guest` property (`GuestInfo`, the Tools fields).
    pub fn guest_info(&self) -> Val {
        let (status, running, version) = match self.tools {
            ToolsState::Running => ("toolsOk", "guestToolsRunning", "guestToolsCurrent"),
            ToolsState::NotRunning => (
                "toolsNotRunning",
                "guestToolsNotRunning",
                "guestToolsCurrent",
            ),
            ToolsState::NotInstalled => (
                "toolsNotInstalled",
                "guestToolsNotRunning",
                "guestToolsNotInstalled",
            ),
        };
        Val::Obj(
            Obj::new("GuestInfo")
                .f(
                    "toolsStatus",
                    Val::Enum("VirtualMachineToolsStatus", status.into()),
                )
                .f("toolsVersionStatus2", Val::s(version))
                .f("toolsRunningStatus", Val::s(running))
                .f(
                    "guestState",
                    Val::s(if self.tools == ToolsState::Running {
                        "running"
                    } else {
                        "notRunning"
                    }),
                ),
        )
    }
}

/// One `CreateSnapshot_Task` as the mock ran it (injected task failures, which
/// end the task before it runs, are not recorded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotAttempt {
    /// VM name.
    pub vm: String,
    /// Snapshot name asked for.
    pub name: String,
    /// `quiesce` as asked.
    pub quiesce: bool,
    /// The snapshot's moref id when it was created.
    pub snapshot: Option<String>,
    /// The fault type when it failed (`ToolsUnavailable`, ...).
    pub fault: Option<String>,
    /// The fault's message.
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_by_state() {
        let g = |tools, quiesce| GuestTools { tools, quiesce };
        assert!(GuestTools::default().quiesce_fault().is_none());
        for t in [ToolsState::NotRunning, ToolsState::NotInstalled] {
            let f = g(t, QuiesceBehaviour::Ok).quiesce_fault().unwrap();
            assert_eq!(f.obj.ty, "ToolsUnavailable");
        }
        let f = g(ToolsState::Running, QuiesceBehaviour::ApplicationFault)
            .quiesce_fault()
            .unwrap();
        assert_eq!(f.obj.ty, "ApplicationQuiesceFault");
        let f = g(ToolsState::Running, QuiesceBehaviour::FilesystemFault)
            .quiesce_fault()
            .unwrap();
        assert_eq!(f.obj.ty, "FilesystemQuiesceFault");
        let j: GuestTools = serde_json::from_str(r#"{"tools":"not-installed"}"#).unwrap();
        assert_eq!(j.tools, ToolsState::NotInstalled);
        assert!(serde_json::from_str::<GuestTools>(r#"{"tool":"running"}"#).is_err());
    }
}
