//! VMware Tools and quiescing in the mock vCenter: a quiesced CreateSnapshot_Task
//! on a VM whose Tools is not running, or whose guest fails to quiesce, ends with
//! the fault vSphere gives and leaves no snapshot; a crash-consistent one still
//! works; `guest.toolsRunningStatus` says so; the snapshot log records what was
//! asked. Set by the scenario and the admin API.

mod vcenter_common;

use ferry_mocks::vcenter::guest::{GuestTools, QuiesceBehaviour, ToolsState};
use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
use std::path::Path;
use vcenter_common::{el, Soap};

fn args(name: &str, quiesce: bool) -> String {
    el("name", name) + &el("memory", "false") + &el("quiesce", &quiesce.to_string())
}

fn tools_running_status(soap: &mut Soap, vm: &str) -> String {
    soap.fetch(("VirtualMachine", vm), "guest.toolsRunningStatus")
        .unwrap()
        .unwrap()
        .text
        .clone()
}

#[test]
fn quiesced_snapshots_fail_as_vsphere_does_and_leave_nothing() {
    let mut o = VcenterOptions::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small.toml"),
    )
    .unwrap();
    // The scenario sets one VM's Tools.
    o.scenario
        .vms
        .iter_mut()
        .find(|v| v.name == "tenant-b-db")
        .unwrap()
        .tools = ToolsState::NotInstalled;
    let mock = VcenterMock::start(o).unwrap();
    let a = mock.admin();
    let mut soap = Soap::new(&mock);
    soap.login();
    let st = a.state();
    let app = st.vm("plain-app").unwrap().moref.clone();
    let db = st.vm("tenant-b-db").unwrap().moref.clone();

    // Tools running, quiesce works: a quiesced snapshot.
    assert_eq!(tools_running_status(&mut soap, &app), "guestToolsRunning");
    let s = soap
        .task(
            "CreateSnapshot_Task",
            ("VirtualMachine", &app),
            &args("q1", true),
        )
        .unwrap()
        .unwrap()
        .text
        .clone();
    soap.remove(&s).unwrap();

    // Tools not installed (scenario): ToolsUnavailable, nothing left; a
    // crash-consistent snapshot still works.
    assert_eq!(tools_running_status(&mut soap, &db), "guestToolsNotRunning");
    let status = soap
        .fetch(("VirtualMachine", &db), "guest.toolsStatus")
        .unwrap()
        .unwrap();
    assert_eq!(status.text, "toolsNotInstalled");
    let (ty, msg) = soap
        .task(
            "CreateSnapshot_Task",
            ("VirtualMachine", &db),
            &args("q2", true),
        )
        .unwrap_err();
    assert_eq!(ty, "ToolsUnavailable");
    assert!(msg.contains("VMware Tools is not running"), "{msg}");
    assert_eq!(a.state().snapshot_count(), 0);
    let s = soap
        .task(
            "CreateSnapshot_Task",
            ("VirtualMachine", &db),
            &args("c2", false),
        )
        .unwrap()
        .unwrap()
        .text
        .clone();
    soap.remove(&s).unwrap();

    // Through the admin HTTP API: Tools stopped, then a failing pre-freeze
    // script, then a freeze that outlasts the I/O hold-off.
    let cases = [
        (
            serde_json::json!({"tools": "not-running"}),
            "ToolsUnavailable",
            "guestToolsNotRunning",
        ),
        (
            serde_json::json!({"tools": "running", "quiesce": "application-fault"}),
            "ApplicationQuiesceFault",
            "guestToolsRunning",
        ),
        (
            serde_json::json!({"quiesce": "filesystem-fault"}),
            "FilesystemQuiesceFault",
            "guestToolsRunning",
        ),
    ];
    for (body, fault, running) in cases {
        let (code, _) = soap.admin("vms/plain-app/guest", Some(body.clone()), None);
        assert_eq!(code, 204, "{body}");
        assert_eq!(tools_running_status(&mut soap, &app), running);
        let (ty, _) = soap
            .task(
                "CreateSnapshot_Task",
                ("VirtualMachine", &app),
                &args("q3", true),
            )
            .unwrap_err();
        assert_eq!(ty, fault, "{body}");
        assert_eq!(a.state().snapshot_count(), 0, "{body}");
    }
    // Bad requests are refused.
    let (code, _) = soap.admin(
        "vms/plain-app/guest",
        Some(serde_json::json!({"tools": "maybe"})),
        None,
    );
    assert!((400..500).contains(&code), "{code}");
    let (code, _) = soap.admin(
        "vms/nope/guest",
        Some(serde_json::json!({"tools": "running"})),
        None,
    );
    assert_eq!(code, 404);
    // In-process handle.
    a.set_guest("plain-app", GuestTools::default()).unwrap();
    assert!(a
        .set_guest(
            "nope",
            GuestTools {
                tools: ToolsState::Running,
                quiesce: QuiesceBehaviour::Ok
            }
        )
        .is_err());

    // The log has every request, with what was asked and what came of it.
    let log = a.snapshot_log();
    let seen: Vec<(&str, &str, bool, Option<&str>)> = log
        .iter()
        .map(|e| {
            (
                e.vm.as_str(),
                e.name.as_str(),
                e.quiesce,
                e.fault.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("plain-app", "q1", true, None),
            ("tenant-b-db", "q2", true, Some("ToolsUnavailable")),
            ("tenant-b-db", "c2", false, None),
            ("plain-app", "q3", true, Some("ToolsUnavailable")),
            ("plain-app", "q3", true, Some("ApplicationQuiesceFault")),
            ("plain-app", "q3", true, Some("FilesystemQuiesceFault")),
        ]
    );
    assert!(log[0].snapshot.is_some() && log[1].snapshot.is_none());
    let (code, body) = soap.admin("snapshots/log", None, None);
    assert_eq!(code, 200);
    assert_eq!(body.as_array().unwrap().len(), log.len());
}
