//! Tests of the pure dispatch queue: round-robin across tenants, caps per host
//! and datastore, back-off after busy answers; and property tests over a model
//! of agents' slots (caps never exceeded, every VM dispatched exactly once,
//! fairness bound between backlogged tenants).

use super::*;
use proptest::prelude::*;

fn fp(host: &str, ds: &[&str]) -> Footprint {
    Footprint {
        vcenter: "vc".into(),
        host: host.into(),
        datastores: ds.iter().map(|d| d.to_string()).collect(),
    }
}

/// Run rounds against one shared pool of `slots` (every VM takes one) until
/// `want` dispatches happened; returns the tenants in dispatch order.
fn drain(d: &mut Dispatcher, slots: usize, want: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut running: VecDeque<String> = VecDeque::new();
    while out.len() < want {
        let mut r = d.round();
        while let Some(o) = r.next(d) {
            if running.len() < slots {
                assert!(d.start(&o.key));
                r.dispatched();
                running.push_back(o.key.clone());
                out.push(o.tenant);
            } else {
                r.tenant_full();
            }
        }
        d.end_round(r);
        // One completion per round: the oldest.
        if let Some(k) = running.pop_front() {
            d.finish(&k);
        } else if d.queued_len() == 0 {
            break;
        }
    }
    out
}

#[test]
fn a_big_tenant_does_not_starve_a_small_one() {
    let mut d = Dispatcher::new(Caps::default());
    for i in 0..2000 {
        d.enqueue("big", &format!("big/{i}"), fp("h", &["ds"]));
    }
    for i in 0..20 {
        d.enqueue("small", &format!("small/{i}"), fp("h", &["ds"]));
    }
    let order = drain(&mut d, 4, 60);
    // Strict alternation while both have VMs queued: the small tenant's 20
    // VMs are all out within the first 40 dispatches.
    let small_done = order
        .iter()
        .enumerate()
        .filter(|(_, t)| *t == "small")
        .map(|(i, _)| i)
        .max()
        .unwrap();
    assert!(small_done < 40, "{order:?}");
    for pair in order[..40].chunks(2) {
        assert_ne!(pair[0], pair[1], "{order:?}");
    }
    assert!(order[40..].iter().all(|t| t == "big"));
}

#[test]
fn within_a_tenant_first_in_first_offered_and_waiting_does_not_block() {
    let mut d = Dispatcher::new(Caps::default());
    for k in ["a/1", "a/2", "a/3"] {
        d.enqueue("a", k, fp("h", &["ds"]));
    }
    let mut r = d.round();
    let o = r.next(&d).unwrap();
    assert_eq!(o.key, "a/1");
    // a/1 needs more room than there is: a/2 is offered next.
    r.waits();
    let o = r.next(&d).unwrap();
    assert_eq!(o.key, "a/2");
    assert!(d.start(&o.key));
    r.dispatched();
    // The only tenant's next turn: a/3.
    let o = r.next(&d).unwrap();
    assert_eq!(o.key, "a/3");
    r.gone();
    assert!(d.dequeue("a/3"));
    assert_eq!(r.next(&d), None);
    d.end_round(r);
    // Next round: a/1 again, first.
    let mut r = d.round();
    assert_eq!(r.next(&d).unwrap().key, "a/1");
    assert_eq!(d.queued_len(), 1);
    assert_eq!(d.running_len(), 1);
}

#[test]
fn the_next_round_starts_after_the_last_tenant_served() {
    let mut d = Dispatcher::new(Caps::default());
    for t in ["a", "b", "c"] {
        for i in 0..3 {
            d.enqueue(t, &format!("{t}/{i}"), fp(&format!("h-{t}{i}"), &[]));
        }
    }
    // One slot per round.
    let mut served = Vec::new();
    for _ in 0..6 {
        let mut r = d.round();
        let mut room = 1;
        while let Some(o) = r.next(&d) {
            if room > 0 {
                room -= 1;
                d.start(&o.key);
                r.dispatched();
                served.push(o.tenant);
            } else {
                r.tenant_full();
            }
        }
        d.end_round(r);
    }
    assert_eq!(served, ["a", "b", "c", "a", "b", "c"]);
}

#[test]
fn caps_per_host_and_datastore_hold_vms_back_with_the_reason() {
    let mut d = Dispatcher::new(Caps {
        per_host: 1,
        per_datastore: 2,
    });
    d.enqueue("a", "a/1", fp("esx-01", &["ds-a"]));
    d.enqueue("a", "a/2", fp("esx-01", &["ds-b"]));
    d.enqueue("b", "b/1", fp("esx-02", &["ds-a", "ds-b"]));
    d.enqueue("b", "b/2", fp("esx-03", &["ds-a"]));
    let mut r = d.round();
    let mut got = Vec::new();
    while let Some(o) = r.next(&d) {
        assert!(d.start(&o.key));
        r.dispatched();
        got.push(o.key);
    }
    // a/1 (esx-01, ds-a), b/1 (esx-02, ds-a + ds-b); a/2 is held by esx-01,
    // b/2 by ds-a (2 running).
    assert_eq!(got, ["a/1", "b/1"]);
    let blocked: Vec<(String, String)> = r
        .blocked()
        .iter()
        .map(|(k, b)| (k.clone(), b.to_string()))
        .collect();
    assert_eq!(blocked.len(), 2, "{blocked:?}");
    assert_eq!(blocked[0].0, "a/2");
    assert!(
        blocked[0].1.contains("host esx-01") && blocked[0].1.contains("max_snapshots_per_host = 1"),
        "{blocked:?}"
    );
    assert_eq!(blocked[1].0, "b/2");
    assert!(
        blocked[1].1.contains("datastore ds-a")
            && blocked[1].1.contains("max_snapshots_per_datastore = 2"),
        "{blocked:?}"
    );
    d.end_round(r);
    assert_eq!(d.stats().cap_waits["host esx-01"], 1);
    assert_eq!(d.stats().cap_waits["datastore ds-a"], 1);
    assert_eq!(d.stats().peak_per_datastore["vc/ds-a"], 2);
    // A cap-blocked VM cannot be started behind the round's back.
    assert!(!d.start("a/2"));
    d.finish("a/1");
    assert!(d.start("a/2"));
    assert_eq!(d.running_per_host()["vc/esx-01"], 1);
    // The same host name under another vCenter is another host.
    let mut other = fp("esx-01", &[]);
    other.vcenter = "vc2".into();
    assert_eq!(d.blocked(&other), None);
    // No caps: nothing is ever held back.
    let free = Dispatcher::new(Caps::default());
    assert_eq!(free.blocked(&fp("esx-01", &["ds-a"])), None);
}

#[test]
fn enqueue_twice_dequeue_and_finish_unknown_keys_are_harmless() {
    let mut d = Dispatcher::new(Caps::default());
    d.enqueue("a", "k", fp("h", &[]));
    d.enqueue("a", "k", fp("h", &[]));
    assert_eq!(d.queued_len(), 1);
    assert!(d.start("k"));
    d.enqueue("a", "k", fp("h", &[]));
    assert_eq!(d.queued_len(), 0, "a running key is not queued again");
    assert!(!d.dequeue("nope"));
    assert!(!d.finish("nope"));
    assert!(!d.start("nope"));
    assert!(d.finish("k"));
    assert!(!d.finish("k"));
    // A round over an empty queue offers nothing and ends cleanly.
    let mut r = d.round();
    assert_eq!(r.next(&d), None);
    d.end_round(r);
}

#[test]
fn busy_agents_back_off_exponentially_with_jitter_until_a_job_ends() {
    let mut d = Dispatcher::new(Caps::default());
    let w1 = d.busy("p", 1000, None, 0.0);
    assert_eq!(w1, BACKOFF_BASE);
    assert_eq!(d.backing_off("p", 1000), Some(1000 + 500));
    assert_eq!(d.backing_off("p", 1500), None);
    let w2 = d.busy("p", 2000, None, 0.0);
    assert_eq!(w2, BACKOFF_BASE * 2);
    // Jitter stretches by up to half; never shrinks.
    let w3 = d.busy("p", 3000, None, 1.0);
    assert_eq!(w3, BACKOFF_BASE * 4 + BACKOFF_BASE * 2);
    for _ in 0..40 {
        d.busy("p", 0, None, f64::NAN);
    }
    assert_eq!(d.busy("p", 0, None, 0.0), BACKOFF_MAX);
    assert!(d.busy("p", 0, None, 0.7) <= BACKOFF_MAX.mul_f64(1.5));
    // Retry-After is honoured as a floor.
    let w = d.busy("q", 0, Some(Duration::from_secs(5)), 0.0);
    assert_eq!(w, Duration::from_secs(5));
    assert_eq!(
        d.agents_backing_off(1),
        ["p".to_string(), "q".to_string()].into()
    );
    // A job of ours ending there frees it at once, and the next busy answer
    // starts from the base again.
    d.agent_freed("p");
    assert_eq!(d.backing_off("p", 1), None);
    assert_eq!(d.busy("p", 0, None, 0.0), BACKOFF_BASE);
    assert_eq!(d.stats().busy_answers, 47);
}

/// One VM of the model.
#[derive(Debug, Clone)]
struct ModelVm {
    tenant: usize,
    host: usize,
    datastores: Vec<usize>,
    slots: u32,
}

fn model_vm() -> impl Strategy<Value = ModelVm> {
    (
        0usize..4,
        0usize..3,
        proptest::collection::btree_set(0usize..3, 1..3),
        1u32..3,
    )
        .prop_map(|(tenant, host, ds, slots)| ModelVm {
            tenant,
            host,
            datastores: ds.into_iter().collect(),
            slots,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Agents with slots (tenant `t` may use agent `t % agents` and the shared
    /// agent 0), random completions: caps and slots are never exceeded, every
    /// VM is dispatched exactly once, and the queue drains.
    #[test]
    fn caps_and_slots_hold_and_every_vm_goes_exactly_once(
        vms in proptest::collection::vec(model_vm(), 0..60),
        per_host in 0u32..3,
        per_datastore in 0u32..4,
        agent_slots in proptest::collection::vec(2u32..5, 1..4),
        completions in proptest::collection::vec(any::<u64>(), 1..400),
    ) {
        let caps = Caps { per_host, per_datastore };
        let mut d = Dispatcher::new(caps);
        for (i, v) in vms.iter().enumerate() {
            let f = Footprint {
                vcenter: "vc".into(),
                host: format!("h{}", v.host),
                datastores: v.datastores.iter().map(|x| format!("ds{x}")).collect(),
            };
            d.enqueue(&format!("t{}", v.tenant), &i.to_string(), f);
        }
        let agents = agent_slots.len();
        let mut free: Vec<u32> = agent_slots.clone();
        // key -> (agent, slots)
        let mut running: BTreeMap<usize, (usize, u32)> = BTreeMap::new();
        let mut started = vec![0u32; vms.len()];
        let mut step = 0usize;
        loop {
            let mut r = d.round();
            while let Some(o) = r.next(&d) {
                let i: usize = o.key.parse().unwrap();
                let v = &vms[i];
                let mine = [v.tenant % agents, 0];
                match mine.iter().find(|a| free[**a] >= v.slots) {
                    Some(&a) => {
                        prop_assert!(d.start(&o.key));
                        r.dispatched();
                        free[a] -= v.slots;
                        running.insert(i, (a, v.slots));
                        started[i] += 1;
                    }
                    None if mine.iter().all(|a| free[*a] == 0) => r.tenant_full(),
                    None => r.waits(),
                }
                // Invariants after every decision.
                for (h, n) in d.running_per_host() {
                    prop_assert!(per_host == 0 || n <= per_host, "{h}: {n} > {per_host}");
                }
                for (ds, n) in d.running_per_datastore() {
                    prop_assert!(per_datastore == 0 || n <= per_datastore, "{ds}: {n}");
                }
                let mut used = vec![0u32; agents];
                for (a, s) in running.values() {
                    used[*a] += s;
                }
                for a in 0..agents {
                    prop_assert_eq!(used[a] + free[a], agent_slots[a]);
                }
            }
            d.end_round(r);
            if running.is_empty() {
                // Nothing running and nothing could start: the queue must be
                // empty (a VM whose every cap and agent is free always goes).
                prop_assert_eq!(d.queued_len(), 0);
                break;
            }
            // Finish some running VMs (at least one, so the model advances).
            let pick = completions[step % completions.len()];
            step += 1;
            let keys: Vec<usize> = running.keys().copied().collect();
            let n = 1 + (pick as usize % keys.len());
            for (j, k) in keys.iter().enumerate() {
                if j < n || (pick >> (j % 64)) & 1 == 1 {
                    let (a, s) = running.remove(k).unwrap();
                    free[a] += s;
                    prop_assert!(d.finish(&k.to_string()));
                }
            }
            prop_assert!(step < 10_000, "the queue does not drain");
        }
        prop_assert!(started.iter().all(|n| *n == 1), "{started:?}");
        prop_assert_eq!(d.stats().dispatched as usize, vms.len());
    }

    /// One shared pool, every VM one slot, no caps: while two tenants both
    /// have VMs queued, their dispatch counts differ by at most one, however
    /// big their queues and however the slots free up.
    #[test]
    fn backlogged_tenants_are_served_within_one_dispatch_of_each_other(
        sizes in proptest::collection::vec(0usize..40, 1..6),
        slots in 1usize..6,
        frees in proptest::collection::vec(1usize..4, 1..50),
    ) {
        let mut d = Dispatcher::new(Caps::default());
        for (t, n) in sizes.iter().enumerate() {
            for i in 0..*n {
                d.enqueue(&format!("t{t}"), &format!("t{t}/{i}"), fp("h", &["ds"]));
            }
        }
        let tenants = sizes.len();
        let mut served = vec![0usize; tenants];
        let mut running: VecDeque<String> = VecDeque::new();
        let mut step = 0;
        while d.queued_len() > 0 {
            let mut r = d.round();
            while let Some(o) = r.next(&d) {
                if running.len() < slots {
                    prop_assert!(d.start(&o.key));
                    r.dispatched();
                    running.push_back(o.key.clone());
                    let t: usize = o.tenant[1..].parse().unwrap();
                    served[t] += 1;
                    // Fairness: every tenant still backlogged (VMs left after
                    // this dispatch) is within one of every other.
                    for a in 0..tenants {
                        for b in 0..tenants {
                            let backlogged = |x: usize| served[x] < sizes[x];
                            if backlogged(a) && backlogged(b) {
                                prop_assert!(
                                    served[a].abs_diff(served[b]) <= 1,
                                    "{served:?} of {sizes:?}"
                                );
                            }
                        }
                    }
                } else {
                    r.tenant_full();
                }
            }
            d.end_round(r);
            for _ in 0..frees[step % frees.len()] {
                if let Some(k) = running.pop_front() {
                    d.finish(&k);
                }
            }
            step += 1;
        }
        prop_assert_eq!(served, sizes);
    }
}
