use super::*;
use crate::agent::api::{KeySourceKind, PolicySpec, Slots, TenantView};
use crate::transport::select::{DiskInfo, Mode};

const A: &str = "KMS-A";
const B: &str = "KMS-B";

fn info(
    id: &str,
    kp: Option<&str>,
    modes: &[Mode],
    ds: &[&str],
    tenants: &[&str],
    total: u32,
    free: u32,
) -> AgentStatus {
    AgentStatus::Up {
        info: Box::new(Info {
            id: id.into(),
            version: "t".into(),
            is_vm: true,
            host: None,
            key_provider: kp.map(String::from),
            datastores: ds.iter().map(|s| s.to_string()).collect(),
            reachable_hosts: None,
            modes: modes.to_vec(),
            slots: Slots {
                total,
                used: total - free,
                free,
            },
            tenants: tenants
                .iter()
                .map(|t| TenantView {
                    name: t.to_string(),
                    key_provider: None,
                    key_source: KeySourceKind::Kms,
                    kms: None,
                })
                .collect(),
            policy: PolicySpec::from(&Policy::default()),
        }),
    }
}

fn world(b_state: Option<AgentStatus>) -> BTreeMap<String, AgentStatus> {
    let mut m = BTreeMap::new();
    m.insert(
        "proxy-a".into(),
        info(
            "proxy-a",
            Some(A),
            &[Mode::HotAdd],
            &["ds-a"],
            &["tenant-a"],
            4,
            4,
        ),
    );
    m.insert(
        "proxy-b".into(),
        b_state.unwrap_or_else(|| {
            info(
                "proxy-b",
                Some(B),
                &[Mode::HotAdd],
                &["ds-b"],
                &["tenant-b"],
                4,
                4,
            )
        }),
    );
    m.insert(
        "shared-nbd".into(),
        info(
            "shared-nbd",
            None,
            &[Mode::NbdSsl, Mode::Nbd],
            &[],
            &["tenant-a", "tenant-b"],
            8,
            8,
        ),
    );
    m
}

fn tenant(name: &str, kp: &str, own: &str) -> TenantConfig {
    TenantConfig {
        name: name.into(),
        key_provider: Some(kp.into()),
        agents: vec![own.into(), "shared-nbd".into()],
    }
}

fn vm(name: &str, kp: &str, ds: &str, disks: usize) -> InventoryVm {
    InventoryVm {
        folder: format!("/DC1/vm/{}", &name[..1]),
        vm: VmInfo {
            name: name.into(),
            moref: format!("vm-{name}"),
            host: "esx-1".into(),
            encrypted: true,
            key_provider: Some(kp.into()),
            disks: (0..disks)
                .map(|i| DiskInfo {
                    key: 2000 + i as i32,
                    label: format!("Hard disk {}", i + 1),
                    datastore: ds.into(),
                    encrypted: true,
                    key_provider: None,
                })
                .collect(),
        },
    }
}

fn vms(prefix: &str, kp: &str, ds: &str) -> Vec<InventoryVm> {
    (1..=10)
        .map(|i| vm(&format!("{prefix}{i:02}"), kp, ds, 1))
        .collect()
}

fn plan_all(
    t: &TenantConfig,
    policy: &Policy,
    v: &[InventoryVm],
    agents: &BTreeMap<String, AgentStatus>,
    free: &mut FreeSlots,
) -> Vec<VmPlan> {
    let c = candidates(t, agents);
    v.iter()
        .map(|x| plan_vm(x, t, policy, &c, free, &BTreeSet::new()))
        .collect()
}

/// Every dispatched disk: HotAdd only on a proxy of the disk's own provider, never
/// clear text for encrypted disks.
fn check_invariants(plans: &[VmPlan], agents: &BTreeMap<String, AgentStatus>) {
    for p in plans {
        let Decision::Dispatch { agent, .. } = &p.decision else {
            continue;
        };
        let sel = p.selection.as_ref().unwrap();
        for d in &sel.disks {
            let Outcome::Assigned { proxy, mode } = &d.outcome else {
                panic!("dispatched VM {} with a refused disk", p.vm);
            };
            assert_eq!(proxy, agent, "{}: one agent per VM", p.vm);
            let AgentStatus::Up { info } = &agents[proxy] else {
                panic!("dispatched to a down agent");
            };
            match mode {
                Mode::HotAdd => assert_eq!(
                    info.key_provider, d.key_provider,
                    "{}: HotAdd across key providers",
                    p.vm
                ),
                Mode::Nbd => assert!(!d.encrypted, "{}: clear text for an encrypted disk", p.vm),
                Mode::NbdSsl => {}
            }
        }
    }
}

fn dispatched(plans: &[VmPlan]) -> Vec<(String, String, Mode)> {
    plans
        .iter()
        .filter_map(|p| match &p.decision {
            Decision::Dispatch { agent, .. } => {
                let Outcome::Assigned { mode, .. } =
                    &p.selection.as_ref().unwrap().disks[0].outcome
                else {
                    return None;
                };
                Some((p.vm.clone(), agent.clone(), *mode))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn whitepaper_two_tenants_hotadd_to_own_proxy_then_nbdssl() {
    let agents = world(None);
    let mut free = free_slots(&agents);
    let ta = tenant("tenant-a", A, "proxy-a");
    let tb = tenant("tenant-b", B, "proxy-b");
    let pa = plan_all(
        &ta,
        &Policy::default(),
        &vms("a", A, "ds-a"),
        &agents,
        &mut free,
    );
    let pb = plan_all(
        &tb,
        &Policy::default(),
        &vms("b", B, "ds-b"),
        &agents,
        &mut free,
    );
    check_invariants(&pa, &agents);
    check_invariants(&pb, &agents);
    let da = dispatched(&pa);
    assert_eq!(da.len(), 10);
    assert!(
        da[..4]
            .iter()
            .all(|(_, a, m)| a == "proxy-a" && *m == Mode::HotAdd),
        "{da:?}"
    );
    assert!(
        da[4..]
            .iter()
            .all(|(_, a, m)| a == "shared-nbd" && *m == Mode::NbdSsl),
        "{da:?}"
    );
    let db = dispatched(&pb);
    // proxy-b's 4 slots, then the 2 shared slots left; 4 wait.
    assert_eq!(db.len(), 6, "{db:?}");
    assert!(db[..4]
        .iter()
        .all(|(_, a, m)| a == "proxy-b" && *m == Mode::HotAdd));
    assert!(db[4..]
        .iter()
        .all(|(_, a, m)| a == "shared-nbd" && *m == Mode::NbdSsl));
    for p in &pb[6..] {
        assert!(
            matches!(&p.decision, Decision::Deferred { reason } if reason.contains("waiting for free slots")),
            "{:?}",
            p.decision
        );
    }
    assert_eq!(free["shared-nbd"], 0);
    assert_eq!(free["proxy-a"], 0);
}

#[test]
fn without_failover_encrypted_vms_wait_for_their_own_hotadd_proxy() {
    let agents = world(None);
    let mut free = free_slots(&agents);
    let ta = tenant("tenant-a", A, "proxy-a");
    let pol = Policy {
        failover_to_network: false,
        ..Policy::default()
    };
    let pa = plan_all(&ta, &pol, &vms("a", A, "ds-a"), &agents, &mut free);
    check_invariants(&pa, &agents);
    assert_eq!(dispatched(&pa).len(), 4);
    assert!(pa[4..]
        .iter()
        .all(|p| matches!(p.decision, Decision::Deferred { .. })));
    assert_eq!(
        free["shared-nbd"], 8,
        "failover off: shared proxy untouched"
    );
}

#[test]
fn down_agent_sends_its_tenant_to_another_valid_agent() {
    let agents = world(Some(AgentStatus::Down {
        error: "connection refused".into(),
    }));
    let mut free = free_slots(&agents);
    let tb = tenant("tenant-b", B, "proxy-b");
    let pb = plan_all(
        &tb,
        &Policy::default(),
        &vms("b", B, "ds-b"),
        &agents,
        &mut free,
    );
    check_invariants(&pb, &agents);
    let db = dispatched(&pb);
    assert_eq!(db.len(), 8);
    assert!(db
        .iter()
        .all(|(_, a, m)| a == "shared-nbd" && *m == Mode::NbdSsl));
    // Without failover nothing else can take them: unavailable, naming the down agent.
    let mut free = free_slots(&agents);
    let pol = Policy {
        failover_to_network: false,
        ..Policy::default()
    };
    let pb = plan_all(&tb, &pol, &vms("b", B, "ds-b"), &agents, &mut free);
    for p in &pb {
        match &p.decision {
            Decision::Unavailable { reason } => {
                assert!(
                    reason.contains("proxy-b: down: connection refused"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_vm_of_another_tenant_is_refused_before_the_selector() {
    let agents = world(None);
    let mut free = free_slots(&agents);
    let ta = tenant("tenant-a", A, "proxy-a");
    let intruder = vm("b-in-a-folder", B, "ds-a", 1);
    let p = plan_all(&ta, &Policy::default(), &[intruder], &agents, &mut free);
    match &p[0].decision {
        Decision::Refused { reason } => {
            assert!(
                reason.contains("KMS-B") && reason.contains("tenant-a"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(free["shared-nbd"], 8, "a refused VM takes no slot");
    // A disk under another provider inside a tenant VM too.
    let mut mixed = vm("mixed", A, "ds-a", 2);
    mixed.vm.disks[1].key_provider = Some(B.into());
    assert!(foreign_provider(&ta, &mixed.vm).is_some());
    assert!(foreign_provider(&ta, &vm("own", A, "ds-a", 1).vm).is_none());
}

#[test]
fn split_vm_goes_whole_to_one_agent() {
    let mut agents = world(None);
    agents.insert(
        "proxy-a".into(),
        info(
            "proxy-a",
            Some(A),
            &[Mode::HotAdd],
            &["ds-a"],
            &["tenant-a"],
            4,
            1,
        ),
    );
    let mut free = free_slots(&agents);
    let ta = tenant("tenant-a", A, "proxy-a");
    let p = plan_all(
        &ta,
        &Policy::default(),
        &[vm("two", A, "ds-a", 2)],
        &agents,
        &mut free,
    );
    check_invariants(&p, &agents);
    match &p[0].decision {
        Decision::Dispatch { agent, note } => {
            assert_eq!(agent, "shared-nbd");
            assert!(note.as_ref().unwrap().contains("one agent"), "{note:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(free["proxy-a"], 1);
    assert_eq!(free["shared-nbd"], 6);
}

#[test]
fn too_big_for_every_agent_is_refused_not_deferred() {
    let agents = world(None);
    let mut free = free_slots(&agents);
    let ta = TenantConfig {
        agents: vec!["proxy-a".into()],
        ..tenant("tenant-a", A, "proxy-a")
    };
    let p = plan_all(
        &ta,
        &Policy::default(),
        &[vm("big", A, "ds-a", 5)],
        &agents,
        &mut free,
    );
    match &p[0].decision {
        Decision::Refused { reason } => {
            assert!(reason.contains("refused before snapshot"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // With the shared proxy busy but big enough, it waits instead.
    let mut free = free_slots(&agents);
    free.insert("shared-nbd".into(), 0);
    let p = plan_all(
        &tenant("tenant-a", A, "proxy-a"),
        &Policy::default(),
        &[vm("big", A, "ds-a", 5)],
        &agents,
        &mut free,
    );
    assert!(
        matches!(p[0].decision, Decision::Deferred { .. }),
        "{:?}",
        p[0].decision
    );
}

#[test]
fn agents_not_serving_the_tenant_are_not_candidates() {
    let agents = world(None);
    let wrong = TenantConfig {
        name: "tenant-a".into(),
        key_provider: Some(A.into()),
        agents: vec!["proxy-b".into(), "ghost".into()],
    };
    let c = candidates(&wrong, &agents);
    assert!(c.agents.is_empty());
    assert!(
        c.notes[0].contains("does not serve tenant tenant-a"),
        "{:?}",
        c.notes
    );
    assert!(c.notes[1].contains("ghost: not configured"));
}

#[test]
fn report_renders_table_and_decisions() {
    let agents = world(Some(AgentStatus::Down {
        error: "timeout".into(),
    }));
    let mut free = free_slots(&agents);
    let ta = tenant("tenant-a", A, "proxy-a");
    let mut v = vms("a", A, "ds-a");
    v.push(vm("b-stray", B, "ds-b", 1));
    let plans = plan_all(&ta, &Policy::default(), &v, &agents, &mut free);
    let r = PlanReport {
        agents: agents.clone(),
        jobs: vec![JobPlan {
            job: "nightly-a".into(),
            tenant: "tenant-a".into(),
            vcenter: "vc".into(),
            agent_notes: vec![],
            error: None,
            vms: plans,
        }],
    };
    let t = r.render(false);
    assert!(t.contains("proxy-b: DOWN: timeout"), "{t}");
    assert!(
        t.contains("JOB nightly-a (tenant tenant-a, vCenter vc): 11 VM(s)"),
        "{t}"
    );
    assert!(
        t.contains("a01") && t.contains("proxy-a") && t.contains("hotadd"),
        "{t}"
    );
    assert!(t.contains("a05") && t.contains("nbdssl"), "{t}");
    assert!(t.contains("b-stray: REFUSED"), "{t}");
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["agents"]["proxy-b"]["status"], "down");
    assert_eq!(j["jobs"][0]["vms"][0]["decision"]["kind"], "dispatch");
}
