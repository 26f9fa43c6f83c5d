use super::*;
use crate::agent::api::{KeySourceKind, PolicySpec, Slots, TenantView};
use crate::orchestrator::scheduler::{Grant, Ledger, LesserMode, WaitState};
use crate::transport::select::{DiskInfo, Mode};
use std::time::Duration;

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
            data_path: "native".into(),
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

/// Plan `v` in one round (nobody has waited yet) under `lesser`.
fn plan_with(
    t: &TenantConfig,
    policy: &Policy,
    lesser: LesserMode,
    v: &[InventoryVm],
    agents: &BTreeMap<String, AgentStatus>,
    load: &mut Load,
) -> Vec<VmPlan> {
    let c = candidates(t, agents);
    let allow = Allowance::fresh(lesser);
    v.iter()
        .map(|x| plan_vm(x, t, policy, &c, load, &BTreeSet::new(), &allow))
        .collect()
}

/// Plan `v` under the default wait policy (`never`).
fn plan_all(
    t: &TenantConfig,
    policy: &Policy,
    v: &[InventoryVm],
    agents: &BTreeMap<String, AgentStatus>,
    load: &mut Load,
) -> Vec<VmPlan> {
    plan_with(t, policy, LesserMode::Never, v, agents, load)
}

fn free_of(load: &Load, id: &str) -> u32 {
    load.free_of(id)
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
fn whitepaper_two_tenants_wait_for_their_own_hotadd_proxy_by_default() {
    let agents = world(None);
    let mut free = reported_load(&agents);
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
    for (plans, own) in [(&pa, "proxy-a"), (&pb, "proxy-b")] {
        let d = dispatched(plans);
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(
            d.iter().all(|(_, a, m)| a == own && *m == Mode::HotAdd),
            "{d:?}"
        );
        for p in &plans[4..] {
            let Decision::Deferred { reason } = &p.decision else {
                panic!("{:?}", p.decision)
            };
            // The reason names the busy HotAdd proxy and who holds its slots,
            // and the valid network path the policy does not take.
            assert!(
                reason.contains(&format!("hotadd via {own}: busy")),
                "{reason}"
            );
            assert!(
                reason.contains("0 slot(s) free, this VM needs 1"),
                "{reason}"
            );
            assert!(
                reason.contains("nbdssl via shared-nbd is valid, but policy never waits"),
                "{reason}"
            );
            // The explanation names every agent of the tenant.
            let sel = p.selection.as_ref().unwrap();
            let proxies: BTreeSet<&str> = sel.disks[0]
                .candidates
                .iter()
                .map(|c| c.proxy.as_str())
                .collect();
            assert_eq!(proxies, [own, "shared-nbd"].into_iter().collect());
            let text = sel.explain();
            assert!(text.contains("WAITING for a slot"), "{text}");
            assert!(text.contains(&format!("{own} (key provider")), "{text}");
            assert!(
                text.contains("valid, but the job waits for hotadd via"),
                "{text}"
            );
        }
    }
    assert_eq!(
        free_of(&free, "shared-nbd"),
        8,
        "the shared proxy takes no encrypted VM"
    );
    assert_eq!(free_of(&free, "proxy-a"), 0);
}

#[test]
fn whitepaper_after_0s_spills_over_and_names_the_busy_hotadd_proxy() {
    let agents = world(None);
    let mut free = reported_load(&agents);
    let ta = tenant("tenant-a", A, "proxy-a");
    let tb = tenant("tenant-b", B, "proxy-b");
    let now = LesserMode::After(Duration::ZERO);
    let pa = plan_with(
        &ta,
        &Policy::default(),
        now,
        &vms("a", A, "ds-a"),
        &agents,
        &mut free,
    );
    let pb = plan_with(
        &tb,
        &Policy::default(),
        now,
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
    for p in &pa[4..] {
        let sel = p.selection.as_ref().unwrap();
        let why = sel.disks[0].reason_summary();
        assert!(
            why.starts_with("nbdssl via shared-nbd: proxy-a (hotadd, KMS-A) had no free slot for 0 s; policy after=0s"),
            "{why}"
        );
        let Decision::Dispatch { note: Some(n), .. } = &p.decision else {
            panic!("{:?}", p.decision)
        };
        assert!(
            n.contains("proxy-a (hotadd, KMS-A) had no free slot"),
            "{n}"
        );
    }
    // proxy-b's 4 slots, then the 2 shared slots left; 4 wait.
    let db = dispatched(&pb);
    assert_eq!(db.len(), 6, "{db:?}");
    assert!(db[..4]
        .iter()
        .all(|(_, a, m)| a == "proxy-b" && *m == Mode::HotAdd));
    assert!(db[4..]
        .iter()
        .all(|(_, a, m)| a == "shared-nbd" && *m == Mode::NbdSsl));
    for p in &pb[6..] {
        assert!(
            matches!(&p.decision, Decision::Deferred { reason } if reason.contains("waiting for a free slot: hotadd via proxy-b")),
            "{:?}",
            p.decision
        );
    }
    assert_eq!(free_of(&free, "shared-nbd"), 0);
    assert_eq!(free_of(&free, "proxy-a"), 0);
}

#[test]
fn without_failover_encrypted_vms_wait_for_their_own_hotadd_proxy() {
    let agents = world(None);
    let mut free = reported_load(&agents);
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
        free_of(&free, "shared-nbd"),
        8,
        "failover off: shared proxy untouched"
    );
}

#[test]
fn down_agent_sends_its_tenant_to_another_valid_agent() {
    let agents = world(Some(AgentStatus::Down {
        error: "connection refused".into(),
    }));
    let mut free = reported_load(&agents);
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
    let mut free = reported_load(&agents);
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
    let mut free = reported_load(&agents);
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
    assert_eq!(
        free_of(&free, "shared-nbd"),
        8,
        "a refused VM takes no slot"
    );
    // A disk under another provider inside a tenant VM too.
    let mut mixed = vm("mixed", A, "ds-a", 2);
    mixed.vm.disks[1].key_provider = Some(B.into());
    assert!(foreign_provider(&ta, &mixed.vm).is_some());
    assert!(foreign_provider(&ta, &vm("own", A, "ds-a", 1).vm).is_none());
}

#[test]
fn a_vm_never_splits_and_waits_for_room_on_its_best_agent() {
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
    let ta = tenant("tenant-a", A, "proxy-a");
    let two = [vm("two", A, "ds-a", 2)];
    // Default: wait for proxy-a, whose 3 slots are taken by jobs started elsewhere.
    let mut free = reported_load(&agents);
    let p = plan_all(&ta, &Policy::default(), &two, &agents, &mut free);
    match &p[0].decision {
        Decision::Deferred { reason } => {
            assert!(reason.contains("hotadd via proxy-a: busy until its earlier jobs finish (1 slot(s) free, this VM needs 2; slots taken by 3 slot(s) of jobs started elsewhere)"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(free_of(&free, "proxy-a"), 1);
    assert_eq!(free_of(&free, "shared-nbd"), 8);
    // after=0s: the whole VM to the shared proxy, never split.
    let mut free = reported_load(&agents);
    let p = plan_with(
        &ta,
        &Policy::default(),
        LesserMode::After(Duration::ZERO),
        &two,
        &agents,
        &mut free,
    );
    check_invariants(&p, &agents);
    match &p[0].decision {
        Decision::Dispatch { agent, note } => {
            assert_eq!(agent, "shared-nbd");
            assert!(
                note.as_ref()
                    .unwrap()
                    .contains("proxy-a (hotadd, KMS-A) had no free slot"),
                "{note:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(free_of(&free, "proxy-a"), 1);
    assert_eq!(free_of(&free, "shared-nbd"), 6);
}

#[test]
fn too_big_for_every_agent_is_refused_not_deferred() {
    let agents = world(None);
    let mut free = reported_load(&agents);
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
    let mut free = reported_load(&agents);
    free.free.insert("shared-nbd".into(), 0);
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
    let mut free = reported_load(&agents);
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
    assert!(
        t.contains("a05: DEFERRED: waiting for a free slot: hotadd via proxy-a"),
        "{t}"
    );
    assert!(t.contains("b-stray: REFUSED"), "{t}");
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["agents"]["proxy-b"]["status"], "down");
    assert_eq!(j["jobs"][0]["vms"][0]["decision"]["kind"], "dispatch");
}

// ---- the queue over simulated time ----------------------------------------

/// One VM's end in a simulated run.
#[derive(Debug)]
struct Placed {
    tenant: String,
    plan: VmPlan,
    /// When it started waiting, and when it was dispatched (simulated ms).
    waited: u64,
}

/// Run every tenant's VMs through the planner and the ledger as the
/// orchestrator's run loop does, on simulated time: a round every second, a
/// job takes `per_disk_ms` per disk, agents report every slot free (the ledger
/// does the accounting). Returns every dispatch (and the VMs never placed).
fn simulate(
    jobs: &[(TenantConfig, Vec<InventoryVm>)],
    agents: &BTreeMap<String, AgentStatus>,
    policy: &Policy,
    lesser: LesserMode,
    per_disk_ms: u64,
) -> (Vec<Placed>, Vec<(String, VmPlan)>) {
    let reported: BTreeMap<String, (u32, u32)> = reported_slots(agents)
        .into_iter()
        .map(|(a, (total, _))| (a, (total, total)))
        .collect();
    let mut ledger = Ledger::default();
    let mut queues: Vec<Vec<(InventoryVm, Option<u64>)>> = jobs
        .iter()
        .map(|(_, v)| v.iter().map(|x| (x.clone(), None)).collect())
        .collect();
    let mut running: Vec<(u64, String, String)> = Vec::new();
    let mut placed = Vec::new();
    let mut stuck = Vec::new();
    let mut now = 0u64;
    while queues.iter().any(|q| !q.is_empty()) || !running.is_empty() {
        running.retain(|(end, agent, key)| {
            if *end <= now {
                ledger.release(agent, key, now, true);
                false
            } else {
                true
            }
        });
        for ((tenant, _), queue) in jobs.iter().zip(queues.iter_mut()) {
            let cands = candidates(tenant, agents);
            let idle = ledger.idle(&reported);
            let mut keep = Vec::new();
            for (v, since) in queue.drain(..) {
                let waited = Duration::from_millis(since.map_or(0, |s| now - s));
                let allow = Allowance {
                    policy: lesser,
                    waited,
                    grant: lesser.grant(
                        &WaitState {
                            waited,
                            ..WaitState::default()
                        },
                        &idle,
                    ),
                };
                let mut load = ledger.load(&reported);
                let plan = plan_vm(
                    &v,
                    tenant,
                    policy,
                    &cands,
                    &mut load,
                    &BTreeSet::new(),
                    &allow,
                );
                match &plan.decision {
                    Decision::Dispatch { agent, .. } => {
                        let key = format!("{}/{}", tenant.name, v.vm.moref);
                        let n = v.vm.disks.len() as u64;
                        ledger.hold(agent, &key, &v.vm.name, n as u32, now);
                        running.push((now + n * per_disk_ms, agent.clone(), key));
                        placed.push(Placed {
                            tenant: tenant.name.clone(),
                            waited: waited.as_millis() as u64,
                            plan,
                        });
                    }
                    Decision::Deferred { .. } => keep.push((v, since.or(Some(now)))),
                    _ => stuck.push((tenant.name.clone(), plan)),
                }
            }
            *queue = keep;
        }
        now += 1000;
        assert!(now < 10_000_000, "the simulated run does not end");
    }
    (placed, stuck)
}

fn mode_of(p: &VmPlan) -> Vec<(String, Mode)> {
    p.selection
        .as_ref()
        .unwrap()
        .disks
        .iter()
        .map(|d| match &d.outcome {
            Outcome::Assigned { proxy, mode } => (proxy.clone(), *mode),
            other => panic!("{}: {other:?}", p.vm),
        })
        .collect()
}

#[test]
fn whitepaper_night_full_hotadd_under_never_spill_only_when_allowed() {
    let agents = world(None);
    let jobs = vec![
        (tenant("tenant-a", A, "proxy-a"), vms("a", A, "ds-a")),
        (tenant("tenant-b", B, "proxy-b"), vms("b", B, "ds-b")),
    ];
    // Default: every encrypted disk HotAdd through its own tenant's proxy.
    let (placed, stuck) = simulate(
        &jobs,
        &agents,
        &Policy::default(),
        LesserMode::Never,
        60_000,
    );
    assert!(stuck.is_empty(), "{stuck:?}");
    assert_eq!(placed.len(), 20);
    for p in &placed {
        let own = if p.tenant == "tenant-a" {
            "proxy-a"
        } else {
            "proxy-b"
        };
        for (proxy, mode) in mode_of(&p.plan) {
            assert_eq!((proxy.as_str(), mode), (own, Mode::HotAdd), "{}", p.plan.vm);
        }
    }
    // Ten 1-disk VMs over 4 slots of 60 s each: the last ones waited 2 minutes.
    let max_wait = placed.iter().map(|p| p.waited).max().unwrap();
    assert_eq!(max_wait, 120_000);
    // A VM that waited and then ran says so in no fallback text.
    assert!(placed
        .iter()
        .all(|p| !p.plan.selection.as_ref().unwrap().disks[0]
            .reason_summary()
            .contains("had no free slot")));

    // after=0s: the overflow goes NBD-SSL, each naming the busy HotAdd proxy.
    let (placed, _) = simulate(
        &jobs,
        &agents,
        &Policy::default(),
        LesserMode::After(Duration::ZERO),
        60_000,
    );
    let spilled: Vec<&Placed> = placed
        .iter()
        .filter(|p| mode_of(&p.plan)[0].1 == Mode::NbdSsl)
        .collect();
    assert!(!spilled.is_empty());
    for p in &spilled {
        let own = if p.tenant == "tenant-a" {
            "proxy-a"
        } else {
            "proxy-b"
        };
        let why = p.plan.selection.as_ref().unwrap().disks[0].reason_summary();
        assert!(why.starts_with("nbdssl via shared-nbd: "), "{why}");
        assert!(
            why.contains(&format!("{own} (hotadd, KMS-")) && why.contains("had no free slot"),
            "{why}"
        );
        assert!(why.contains("policy after=0s"), "{why}");
    }

    // after=90s: nobody spills before waiting 90 s; after that they may.
    let (placed, _) = simulate(
        &jobs,
        &agents,
        &Policy::default(),
        LesserMode::After(Duration::from_secs(90)),
        60_000,
    );
    for p in &placed {
        if mode_of(&p.plan)[0].1 == Mode::NbdSsl {
            assert!(
                p.waited >= 90_000,
                "{} spilled after {} ms",
                p.plan.vm,
                p.waited
            );
            let why = p.plan.selection.as_ref().unwrap().disks[0].reason_summary();
            assert!(
                why.contains("had no free slot for") && why.contains("policy after=90s"),
                "{why}"
            );
        }
    }
}

#[test]
fn when_idle_spills_only_to_an_idle_agent_for_a_vm_that_would_miss_its_window() {
    let agents = world(None);
    let idle: BTreeSet<String> = ["shared-nbd".to_string()].into();
    let ta = tenant("tenant-a", A, "proxy-a");
    let c = candidates(&ta, &agents);
    let mut load = reported_load(&agents);
    load.free.insert("proxy-a".into(), 0);
    let v = vm("late", A, "ds-a", 1);
    let at = |left: u64, wait: u64| {
        LesserMode::WhenIdle.grant(
            &WaitState {
                waited: Duration::from_secs(60),
                window_left: Some(Duration::from_secs(left)),
                expected_wait: Some(Duration::from_secs(wait)),
            },
            &idle,
        )
    };
    let plan = |grant: Grant| {
        let allow = Allowance {
            policy: LesserMode::WhenIdle,
            waited: Duration::from_secs(60),
            grant,
        };
        plan_vm(
            &v,
            &ta,
            &Policy::default(),
            &c,
            &mut load.clone(),
            &BTreeSet::new(),
            &allow,
        )
    };
    // It fits in the window: it waits.
    assert!(matches!(
        plan(at(3600, 600)).decision,
        Decision::Deferred { .. }
    ));
    // It would miss the window: to the idle shared proxy.
    let p = plan(at(300, 600));
    assert!(
        matches!(&p.decision, Decision::Dispatch { agent, .. } if agent == "shared-nbd"),
        "{:?}",
        p.decision
    );
    let why = p.selection.unwrap().disks[0].reason_summary();
    assert!(
        why.contains("proxy-a (hotadd, KMS-A) had no free slot for 60 s; policy when-idle"),
        "{why}"
    );
    // Only idle agents may take it.
    let p = plan(Grant::Only(["elsewhere".to_string()].into()));
    assert!(matches!(p.decision, Decision::Deferred { .. }));
}

#[test]
fn explanations_name_down_agents_too() {
    let agents = world(Some(AgentStatus::Down {
        error: "connection refused".into(),
    }));
    let mut load = reported_load(&agents);
    let tb = tenant("tenant-b", B, "proxy-b");
    let p = plan_all(
        &tb,
        &Policy::default(),
        &vms("b", B, "ds-b")[..1],
        &agents,
        &mut load,
    );
    let sel = p[0].selection.as_ref().unwrap();
    let down = sel.disks[0]
        .candidates
        .iter()
        .find(|c| c.proxy == "proxy-b")
        .expect("the down agent is named");
    assert_eq!(
        down.reason.to_string(),
        "not a candidate now: down: connection refused"
    );
    assert!(sel.explain().contains("proxy-b"), "{}", sel.explain());
}

mod worlds {
    //! Random worlds: tenants, proxies, VMs, disks, datastores, slots.
    use super::*;
    use proptest::prelude::*;

    const DS: [&str; 3] = ["ds-0", "ds-1", "ds-2"];

    #[derive(Debug, Clone)]
    struct Proxy {
        tenant: usize,
        /// Key provider of the proxy VM: its tenant's, another tenant's, none.
        kp: Option<usize>,
        hotadd: bool,
        nbdssl: bool,
        ds: Vec<usize>,
        slots: u32,
    }

    #[derive(Debug, Clone)]
    struct Vm {
        tenant: usize,
        encrypted: bool,
        disks: Vec<usize>,
    }

    fn proxy() -> impl Strategy<Value = Proxy> {
        (
            0..3usize,
            prop::option::of(0..3usize),
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(0..3usize, 0..3),
            1..5u32,
        )
            .prop_map(|(tenant, kp, hotadd, nbdssl, ds, slots)| Proxy {
                tenant,
                kp,
                hotadd: hotadd || !nbdssl,
                nbdssl,
                ds,
                slots,
            })
    }

    fn vmgen() -> impl Strategy<Value = Vm> {
        (
            0..3usize,
            any::<bool>(),
            prop::collection::vec(0..3usize, 1..4),
        )
            .prop_map(|(tenant, encrypted, disks)| Vm {
                tenant,
                encrypted,
                disks,
            })
    }

    fn kp(i: usize) -> String {
        format!("KMS-{i}")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn placement_keeps_key_providers_waits_under_never_and_names_every_agent(
            proxies in prop::collection::vec(proxy(), 1..6),
            shared in prop::collection::vec((1..4u32, any::<bool>()), 0..3),
            vms in prop::collection::vec(vmgen(), 1..12),
            lesser in prop_oneof![
                Just(LesserMode::Never),
                Just(LesserMode::After(Duration::ZERO)),
                Just(LesserMode::After(Duration::from_secs(3))),
            ],
        ) {
            let mut agents = BTreeMap::new();
            let mut owned: Vec<Vec<String>> = vec![Vec::new(); 3];
            for (i, p) in proxies.iter().enumerate() {
                let id = format!("px-{i}");
                let mut modes = Vec::new();
                if p.hotadd { modes.push(Mode::HotAdd); }
                if p.nbdssl { modes.push(Mode::NbdSsl); }
                let ds: Vec<&str> = p.ds.iter().map(|d| DS[*d]).collect();
                let kpn = p.kp.map(kp);
                agents.insert(id.clone(), info(&id, kpn.as_deref(), &modes, &ds, &[&format!("t{}", p.tenant)], p.slots, p.slots));
                owned[p.tenant].push(id);
            }
            let all_tenants = ["t0", "t1", "t2"];
            for (i, (slots, clear)) in shared.iter().enumerate() {
                let id = format!("shared-{i}");
                let modes = if *clear { vec![Mode::NbdSsl, Mode::Nbd] } else { vec![Mode::NbdSsl] };
                agents.insert(id.clone(), info(&id, None, &modes, &[], &all_tenants, *slots, *slots));
                for o in owned.iter_mut() { o.push(id.clone()); }
            }
            let policy = Policy { allow_cleartext_nbd: true, ..Policy::default() };
            let jobs: Vec<(TenantConfig, Vec<InventoryVm>)> = (0..3)
                .map(|t| {
                    let tc = TenantConfig {
                        name: format!("t{t}"),
                        key_provider: Some(kp(t)),
                        agents: owned[t].clone(),
                    };
                    let v = vms
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| v.tenant == t)
                        .map(|(i, v)| InventoryVm {
                            folder: "/dc/vm".into(),
                            vm: VmInfo {
                                name: format!("vm{i}"),
                                moref: format!("vm-{i}"),
                                host: "esx-1".into(),
                                encrypted: v.encrypted,
                                key_provider: v.encrypted.then(|| kp(t)),
                                disks: v
                                    .disks
                                    .iter()
                                    .enumerate()
                                    .map(|(k, d)| DiskInfo {
                                        key: 2000 + k as i32,
                                        label: format!("Hard disk {}", k + 1),
                                        datastore: DS[*d].into(),
                                        encrypted: v.encrypted,
                                        key_provider: None,
                                    })
                                    .collect(),
                            },
                        })
                        .collect();
                    (tc, v)
                })
                .collect();
            let (placed, stuck) = simulate(&jobs, &agents, &policy, lesser, 2_000);
            let tenant_of = |name: &str| jobs.iter().find(|(t, _)| t.name == name).unwrap();
            for (tenant, plan) in placed.iter().map(|p| (&p.tenant, &p.plan)).chain(stuck.iter().map(|(t, p)| (t, p))) {
                let Some(sel) = &plan.selection else { continue };
                // Every explanation lists every agent of the tenant.
                let (tc, _) = tenant_of(tenant);
                for d in &sel.disks {
                    let named: BTreeSet<&str> = d.candidates.iter().map(|c| c.proxy.as_str()).collect();
                    for a in &tc.agents {
                        prop_assert!(named.contains(a.as_str()), "{} disk {}: {a} not named", plan.vm, d.disk_key);
                    }
                }
            }
            for p in &placed {
                let (tc, vms) = tenant_of(&p.tenant);
                let v = vms.iter().find(|v| v.vm.name == p.plan.vm).unwrap();
                let sel = p.plan.selection.as_ref().unwrap();
                for d in &sel.disks {
                    let Outcome::Assigned { proxy, mode } = &d.outcome else { panic!() };
                    let AgentStatus::Up { info } = &agents[proxy] else { panic!() };
                    match mode {
                        // Never HotAdd across key providers.
                        Mode::HotAdd if d.encrypted => prop_assert_eq!(&info.key_provider, &d.key_provider),
                        Mode::Nbd => prop_assert!(!d.encrypted, "clear text for an encrypted disk"),
                        _ => {}
                    }
                }
                // Under never: a VM that one agent of its tenant could take
                // whole by HotAdd goes HotAdd, every disk.
                if lesser == LesserMode::Never {
                    let whole_hotadd = tc.agents.iter().any(|a| {
                        let AgentStatus::Up { info } = &agents[a] else { return false };
                        let mut px = info.to_proxy_info();
                        px.free_slots = info.slots.total;
                        let s = select(&v.vm, std::slice::from_ref(&px), &policy);
                        s.is_runnable() && s.disks.iter().all(|d| matches!(d.outcome, Outcome::Assigned { mode: Mode::HotAdd, .. }))
                    });
                    if whole_hotadd {
                        prop_assert!(sel.disks.iter().all(|d| matches!(d.outcome, Outcome::Assigned { mode: Mode::HotAdd, .. })), "{} left HotAdd under never", v.vm.name);
                    }
                }
            }
        }
    }
}

#[test]
fn the_placement_line_names_every_agent_of_the_tenant() {
    let agents = world(Some(AgentStatus::Down {
        error: "timeout".into(),
    }));
    let mut load = reported_load(&agents);
    let ta = TenantConfig {
        agents: vec!["proxy-a".into(), "shared-nbd".into(), "proxy-b".into()],
        ..tenant("tenant-a", A, "proxy-a")
    };
    let p = plan_all(
        &ta,
        &Policy::default(),
        &vms("a", A, "ds-a")[..1],
        &agents,
        &mut load,
    );
    let d = &p[0].selection.as_ref().unwrap().disks[0];
    assert_eq!(
        placement_summary(d, Duration::from_secs(125)),
        "hotadd via proxy-a: chosen: the only valid candidate for this mode; \
         waited 2 min for a free slot; \
         shared-nbd (nbdssl): valid, but hotadd via proxy-a comes earlier in the policy's mode order; \
         proxy-b (hotadd): not a candidate now: down: timeout"
    );
    // Less than a second of waiting is not worth a word.
    assert!(!placement_summary(d, Duration::from_millis(900)).contains("waited"));
}
