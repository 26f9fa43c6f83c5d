//! Dispatch at scale through the whole simulated provider (mock vCenter, mock
//! ESXi, the agents with ferry's real job runner, the orchestrator over HTTPS):
//! a generated world with more VMs than slots, two tenants' jobs at once, and
//! snapshot caps of one backup per host and two per datastore. Checked from the
//! mock vCenter's own call log (every CreateSnapshot and RemoveSnapshot, in the
//! order it served them): never more snapshots at once on a host or datastore
//! than the caps; every VM backed up exactly once; and no busy answer (`429`)
//! from any agent — the orchestrator follows the agents' capacity instead of
//! retrying.

use ferry::state::{ItemState, RunState};
use ferry_mocks::scale;
use ferry_mocks::world::{World, WorldOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const VMS: usize = 36;

#[test]
fn caps_hold_on_vcenter_and_more_vms_than_slots_bring_no_busy_answers() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = scale::scenario(VMS, 11);
    let mut opts = WorldOptions::new(scenario.clone(), dir.path());
    opts.workers = Some(1);
    opts.poll = Duration::from_millis(30);
    opts.agent_slots = 4;
    let world = World::start(opts).unwrap();
    scale::select_plain_vms(&world, &scenario).unwrap();
    let mut cfg = std::fs::read_to_string(&world.orchestrator_config).unwrap();
    cfg.push_str("\n[dispatch]\nmax_snapshots_per_host = 1\nmax_snapshots_per_datastore = 2\n");
    std::fs::write(&world.orchestrator_config, cfg).unwrap();
    // Slow vCenter tasks a little, so that backups overlap as on a real night.
    world.vcenter.admin().set_task_delay(20);
    let orch = world.orchestrator().unwrap();
    let runs = world.runtime().block_on(orch.run_once(&[], false)).unwrap();
    assert_eq!(runs.len(), 2, "one job per tenant");
    let mut names = BTreeSet::new();
    for r in &runs {
        assert_eq!(r.state, RunState::Succeeded, "{}", r.render());
        for it in &r.items {
            assert_eq!(it.state, ItemState::Succeeded, "{}", r.render());
            assert!(names.insert(it.detail["vm"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(names.len(), VMS, "every VM once");
    // 36 VMs, 12 slots: no agent ever answered busy.
    let stats = orch.dispatch_stats();
    assert_eq!(stats.busy_answers, 0, "{stats:?}");
    assert_eq!(stats.dispatched as usize, VMS);

    // The mock vCenter's side: replay its call log.
    let admin = world.vcenter.admin();
    let state = admin.state();
    let vm_by_moref: BTreeMap<String, (String, String, BTreeSet<String>)> = state
        .vms
        .iter()
        .map(|v| {
            (
                v.moref.clone(),
                (
                    v.name.clone(),
                    v.host.clone(),
                    v.disks.iter().map(|d| d.datastore.clone()).collect(),
                ),
            )
        })
        .collect();
    let moref_by_name: BTreeMap<&str, &str> = vm_by_moref
        .iter()
        .map(|(m, (n, _, _))| (n.as_str(), m.as_str()))
        .collect();
    let vm_of_snapshot: BTreeMap<String, String> = admin
        .snapshot_log()
        .into_iter()
        .filter_map(|a| Some((a.snapshot?, moref_by_name.get(a.vm.as_str())?.to_string())))
        .collect();
    let mut on_host: BTreeMap<String, i32> = BTreeMap::new();
    let mut on_ds: BTreeMap<String, i32> = BTreeMap::new();
    let mut peak_host: BTreeMap<String, i32> = BTreeMap::new();
    let mut peak_ds: BTreeMap<String, i32> = BTreeMap::new();
    let (mut creates, mut removes, mut peak_all, mut all) = (0, 0, 0, 0);
    for call in admin.calls() {
        let Some((method, this)) = call.split_once(' ') else {
            continue;
        };
        let (vm, delta) = match method {
            "CreateSnapshot_Task" => (this.trim_start_matches("VirtualMachine:").to_string(), 1),
            "RemoveSnapshot_Task" => {
                let snap = this.trim_start_matches("VirtualMachineSnapshot:");
                (vm_of_snapshot[snap].clone(), -1)
            }
            _ => continue,
        };
        let (_, host, dss) = &vm_by_moref[&vm];
        if delta > 0 {
            creates += 1;
        } else {
            removes += 1;
        }
        all += delta;
        peak_all = peak_all.max(all);
        let n = on_host.entry(host.clone()).or_default();
        *n += delta;
        let p = peak_host.entry(host.clone()).or_default();
        *p = (*p).max(*n);
        for ds in dss {
            let n = on_ds.entry(ds.clone()).or_default();
            *n += delta;
            let p = peak_ds.entry(ds.clone()).or_default();
            *p = (*p).max(*n);
        }
    }
    assert_eq!(creates, VMS, "one snapshot per VM");
    assert_eq!(removes, VMS, "every snapshot removed");
    assert!(peak_host.values().all(|n| *n <= 1), "{peak_host:?}");
    assert!(peak_ds.values().all(|n| *n <= 2), "{peak_ds:?}");
    // The caps were what held the night back (12 slots, 3 hosts), and backups
    // did overlap across hosts.
    assert!(peak_all >= 2, "peak {peak_all}");
    assert!(
        !stats.cap_waits.is_empty(),
        "the caps held VMs back: {stats:?}"
    );
    assert_eq!(state.snapshot_count(), 0, "nothing left on vCenter");
}
