//! Quiesce policy end to end (issue 22 §2): orchestrator config → agent API →
//! ferry's job runner → the mock vCenter, over HTTPS, with VMs whose VMware
//! Tools is not running or whose guest fails to quiesce. The job's policy is
//! `prefer` with a per-VM `require` override: the `prefer` VMs fall back to a
//! crash-consistent snapshot and their points record it and why; the `require`
//! VM fails with the actionable error and leaves no snapshot; a VM that
//! quiesces gets an application-consistent point. The mock vCenter's snapshot
//! log shows quiesce = true was really asked.

use ferry::repo::manifest::Consistency;
use ferry::repo::Repository;
use ferry::state::ItemState;
use ferry_mocks::vcenter::guest::{QuiesceBehaviour, ToolsState};
use ferry_mocks::vcenter::Scenario;
use ferry_mocks::world::{World, WorldOptions};
use std::path::Path;
use std::time::Duration;

const REQUIRED: &str = "tenant-a-vm01"; // Tools not running, policy require
const NO_TOOLS: &str = "tenant-a-vm02"; // Tools not running, policy prefer
const SCRIPT_FAILS: &str = "tenant-a-vm03"; // pre-freeze script fails, prefer
const QUIESCES: &str = "tenant-a-vm04"; // quiesces, prefer

fn scenario() -> Scenario {
    let mut s = Scenario::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("mocks/scenarios/whitepaper.toml"),
    )
    .unwrap();
    s.vms
        .retain(|v| [REQUIRED, NO_TOOLS, SCRIPT_FAILS, QUIESCES].contains(&v.name.as_str()));
    for vm in &mut s.vms {
        for d in &mut vm.disks {
            d.size_mib = 4;
        }
        match vm.name.as_str() {
            REQUIRED | NO_TOOLS => vm.tools = ToolsState::NotRunning,
            SCRIPT_FAILS => vm.quiesce = QuiesceBehaviour::ApplicationFault,
            _ => {}
        }
    }
    s
}

#[test]
fn quiesce_policy_through_orchestrator_agent_and_mock_vcenter() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = WorldOptions::new(scenario(), dir.path());
    opts.workers = Some(2);
    opts.poll = Duration::from_millis(50);
    opts.job_extra = format!(
        "quiesce = \"prefer\"\n\n[[job.quiesce_override]]\nvms = [{REQUIRED:?}]\nquiesce = \"require\"\n"
    );
    let world = World::start(opts).unwrap();
    let orch = world.orchestrator().unwrap();
    let runs = world.runtime().block_on(orch.run_once(&[], false)).unwrap();
    assert_eq!(runs.len(), 1, "{runs:#?}");
    let run = &runs[0];
    let text = run.render();
    eprintln!("{text}");
    assert_eq!(run.items.len(), 4, "{text}");
    let item = |vm: &str| {
        run.items
            .iter()
            .find(|i| i.detail["vm"] == vm)
            .unwrap_or_else(|| panic!("{vm}: {text}"))
    };

    // require: the VM's job fails, naming the VM, what vCenter said and the fix.
    let r = item(REQUIRED);
    assert_eq!(r.state, ItemState::Failed, "{text}");
    assert_eq!(r.detail["quiesce"], "require");
    let err = r.error.as_deref().unwrap();
    for want in [
        "vsphere_error",
        REQUIRED,
        "ToolsUnavailable",
        "VMware Tools is not running",
        "Install or start VMware Tools",
        "quiesce = \"prefer\"",
    ] {
        assert!(err.contains(want), "{want:?} in {err}");
    }

    // prefer: crash-consistent fallbacks, recorded with the reason; and a quiesced
    // VM is application-consistent.
    for (vm, note) in [
        (
            NO_TOOLS,
            "crash-consistent (policy prefer: quiesce failed (ToolsUnavailable",
        ),
        (
            SCRIPT_FAILS,
            "crash-consistent (policy prefer: quiesce failed (ApplicationQuiesceFault",
        ),
        (
            QUIESCES,
            "application-consistent (policy prefer: guest quiesced",
        ),
    ] {
        let i = item(vm);
        assert_eq!(i.state, ItemState::Succeeded, "{vm}: {text}");
        assert_eq!(i.detail["quiesce"], "prefer", "{vm}");
        let got = i.detail["snapshot"].as_str().unwrap_or_default();
        assert!(got.starts_with(note), "{vm}: {got}");
    }
    assert!(text.contains("crash-consistent") && text.contains("application-consistent"));

    // The points record it.
    let tenant = world.tenant("tenant-a").unwrap();
    let repo = Repository::open(&tenant.repository).unwrap();
    let points: Vec<_> = repo
        .list_points()
        .unwrap()
        .into_iter()
        .map(|p| p.header.unwrap())
        .collect();
    assert_eq!(points.len(), 3, "no point for the refused VM");
    assert!(points.iter().all(|h| h.source != REQUIRED));
    for (vm, consistency, reason) in [
        (
            NO_TOOLS,
            Consistency::Crash,
            "policy prefer: quiesce failed (ToolsUnavailable: Cannot complete operation because VMware Tools is not running in this virtual machine.); crash-consistent snapshot taken",
        ),
        (
            SCRIPT_FAILS,
            Consistency::Crash,
            "policy prefer: quiesce failed (ApplicationQuiesceFault: ",
        ),
        (
            QUIESCES,
            Consistency::Application,
            "policy prefer: guest quiesced through VMware Tools",
        ),
    ] {
        let h = points.iter().find(|h| h.source == vm).unwrap();
        let s = h.snapshot.as_ref().unwrap();
        assert_eq!(s.consistency, consistency, "{vm}: {s:?}");
        assert!(s.reason.starts_with(reason), "{vm}: {}", s.reason);
    }

    // `ferry points list` shows it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["points", "list", "-r"])
        .arg(&tenant.repository)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    assert!(listing.contains("consistency"), "{listing}");
    for (vm, c) in [
        (NO_TOOLS, "crash"),
        (SCRIPT_FAILS, "crash"),
        (QUIESCES, "application"),
    ] {
        let line = listing.lines().find(|l| l.contains(vm)).unwrap();
        assert!(line.split_whitespace().any(|w| w == c), "{line}");
    }

    // vCenter: quiesce = true was asked for every VM; the fallbacks then asked
    // for a crash-consistent snapshot, the required one did not; nothing is left.
    let log = world.vcenter.admin().snapshot_log();
    let asked = |vm: &str| -> Vec<(bool, Option<String>)> {
        log.iter()
            .filter(|e| e.vm == vm)
            .map(|e| (e.quiesce, e.fault.clone()))
            .collect()
    };
    assert_eq!(
        asked(REQUIRED),
        vec![(true, Some("ToolsUnavailable".to_string()))]
    );
    assert_eq!(
        asked(NO_TOOLS),
        vec![(true, Some("ToolsUnavailable".to_string())), (false, None)]
    );
    assert_eq!(
        asked(SCRIPT_FAILS),
        vec![
            (true, Some("ApplicationQuiesceFault".to_string())),
            (false, None)
        ]
    );
    assert_eq!(asked(QUIESCES), vec![(true, None)]);
    let st = world.vcenter.admin().state();
    assert_eq!((st.snapshot_count(), st.attached_count()), (0, 0), "{st:?}");
}
