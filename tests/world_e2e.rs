//! The whole simulated provider end to end over HTTPS, with ferry's real job
//! runner: the whitepaper's world (seed 004: 10 VMs encrypted under KMS-A, 10
//! under KMS-B, a HotAdd proxy per tenant encrypted under its tenant's provider,
//! one unencrypted shared NBD-SSL proxy), three agents, the orchestrator reading
//! the mock vCenter live. Every encrypted disk goes HotAdd to its own tenant's
//! proxy or NBD-SSL through the shared one, never HotAdd across providers, never
//! clear text; nothing is left on vCenter; restores are bit-identical, to files
//! and into new disks of a VM (through the agent API and `ferry restore --vm`).

mod common;

use ferry::agent::api::{RestoreRequest, RestoreTargetSpec};
use ferry::orchestrator::client::AgentApi;
use ferry::state::{ItemState, JobState, RunState};
use ferry_mocks::vcenter::Scenario;
use ferry_mocks::world::{World, WorldOptions};
use std::path::Path;
use std::time::Duration;

/// The whitepaper's world with its disks shrunk to 8 and 4 MiB: the VM count,
/// encryption and proxies are what this test is about, not volume (the
/// benchmarks measure volume).
fn whitepaper() -> Scenario {
    let mut s = Scenario::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("mocks/scenarios/whitepaper.toml"),
    )
    .unwrap();
    for vm in &mut s.vms {
        for (i, d) in vm.disks.iter_mut().enumerate() {
            d.size_mib = if i == 0 { 8 } else { 4 };
        }
    }
    s
}

/// Restore the latest point of `vm` (tenant `tenant`) through agent `proxy`'s
/// API into `target` and check every disk (device keys `keys`, in order) is
/// bit-identical to the VM's disk in the mock vCenter.
fn restore_and_compare(
    world: &World,
    tenant: &str,
    vm: &str,
    proxy: &str,
    keys: &[i64],
    target: &Path,
) {
    let client = world.agent_client(proxy).unwrap();
    let job = world
        .runtime()
        .block_on(client.start_restore(&RestoreRequest {
            tenant: tenant.to_string(),
            point: format!("latest:{vm}"),
            disks: None,
            target: RestoreTargetSpec::Directory {
                path: target.display().to_string(),
            },
        }))
        .unwrap();
    let done = world.runtime().block_on(async {
        loop {
            let j = client.job(&job.id).await.unwrap();
            if j.state.is_terminal() {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    for (n, key) in keys.iter().enumerate() {
        let file = ferry::job::runner::restore_path(target, vm, n as u32);
        let got = ferry_mocks::diskgen::hash_file(&file)
            .unwrap()
            .to_hex()
            .to_string();
        let (want, _) = world
            .vcenter
            .admin()
            .digest(vm, &key.to_string(), None)
            .unwrap();
        assert_eq!(got, want, "{vm} disk {key} restored through {proxy}");
    }
}

#[test]
fn whitepaper_world_backs_up_every_vm_by_key_provider_and_restores_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = WorldOptions::new(whitepaper(), dir.path());
    opts.workers = Some(2);
    opts.poll = Duration::from_millis(50);
    let world = World::start(opts).unwrap();
    assert_eq!(world.agents.len(), 3);
    let orch = world.orchestrator().unwrap();
    let runs = world.runtime().block_on(orch.run_once(&[], true)).unwrap();
    // Key sync first, then one run per tenant.
    assert_eq!(runs.len(), 3, "{runs:#?}");
    assert_eq!(runs[0].state, RunState::Succeeded, "{}", runs[0].render());
    let mut hotadd = 0;
    let mut nbdssl = 0;
    let mut backed_up = Vec::new();
    for run in &runs[1..] {
        assert_eq!(run.state, RunState::Succeeded, "{}", run.render());
        let tenant = run.job.trim_end_matches("-backup");
        let t = world.tenant(tenant).unwrap();
        assert_eq!(run.items.len(), 10, "{}", run.render());
        for item in &run.items {
            assert_eq!(item.state, ItemState::Succeeded, "{}", run.render());
            let vm = item.detail["vm"].as_str().unwrap().to_string();
            // The folder path read live from vCenter's parent chain.
            assert_eq!(item.detail["folder"], "/DC-Provider/vm", "{vm}");
            assert!(t.vms.contains(&vm), "{vm} backed up for {tenant}");
            assert!(item.bytes > 0, "{}", run.render());
            let disks = item.detail["result"].as_array().unwrap();
            assert!(!disks.is_empty());
            for d in disks {
                let proxy = d["proxy"].as_str().unwrap();
                let mode = d["mode"].as_str().unwrap();
                let agent = world.agents.iter().find(|a| a.id == proxy).unwrap();
                match mode {
                    "hotadd" => {
                        // Only ever through the proxy encrypted under the VM's own provider.
                        assert_eq!(
                            agent.key_provider.as_deref(),
                            Some(t.key_provider.as_str()),
                            "{d}"
                        );
                        hotadd += 1;
                    }
                    "nbdssl" => nbdssl += 1,
                    other => panic!("{vm}: mode {other} for an encrypted disk: {d}"),
                }
                assert!(!d["reason"].as_str().unwrap().is_empty());
                backed_up.push((
                    vm.clone(),
                    proxy.to_string(),
                    mode.to_string(),
                    d["disk_key"].as_i64().unwrap(),
                ));
            }
        }
    }
    // "Dedicated HotAdd" means full HotAdd: under the default wait policy
    // every encrypted disk goes through its own tenant's proxy, none through
    // the shared one; the VMs beyond the proxies' slots waited for them.
    eprintln!("{hotadd} disks by HotAdd, {nbdssl} by NBD-SSL");
    assert_eq!(nbdssl, 0, "full HotAdd under lesser_mode=never");
    assert_eq!(hotadd, backed_up.len());
    let waited = runs[1..]
        .iter()
        .flat_map(|r| r.items.iter())
        .filter(|i| i.detail["waited_ms"].as_u64().unwrap_or(0) > 0)
        .count();
    assert!(waited > 0, "some VMs waited for a HotAdd slot");
    // Nothing left behind on vCenter.
    let st = world.vcenter.admin().state();
    assert_eq!(st.snapshot_count(), 0, "{st:?}");
    assert_eq!(st.attached_count(), 0, "{st:?}");

    // Restore one HotAdd-backed and one NBD-SSL-backed VM (if any) of each tenant
    // through the agents' API and compare with the VM disks.
    let restores = dir.path().join("restores");
    for t in &world.tenants {
        let mut picked: Vec<&(String, String, String, i64)> = Vec::new();
        for mode in ["hotadd", "nbdssl"] {
            if let Some(b) = backed_up
                .iter()
                .find(|b| b.2 == mode && t.vms.contains(&b.0) && !picked.iter().any(|p| p.0 == b.0))
            {
                picked.push(b);
            }
        }
        for (vm, proxy, _, _) in picked {
            let keys: Vec<i64> = backed_up
                .iter()
                .filter(|b| &b.0 == vm)
                .map(|b| b.3)
                .collect();
            restore_and_compare(&world, &t.name, vm, proxy, &keys, &restores.join(vm));
        }
    }
}

/// With `lesser_mode = "after=0s"` (the behaviour before round 2), the VMs
/// beyond the HotAdd proxies' slots spill to NBD-SSL through the shared proxy
/// at once, and every such disk's reason, as the agent recorded it, names its
/// tenant's busy HotAdd proxy and the policy that allowed it.
#[test]
fn with_after_0s_the_overflow_goes_nbdssl_naming_the_busy_hotadd_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = WorldOptions::new(whitepaper(), dir.path());
    opts.workers = Some(2);
    opts.poll = Duration::from_millis(50);
    opts.lesser_mode = "after=0s".into();
    let world = World::start(opts).unwrap();
    let orch = world.orchestrator().unwrap();
    let runs = world.runtime().block_on(orch.run_once(&[], false)).unwrap();
    let mut spilled = 0;
    for run in &runs {
        assert_eq!(run.state, RunState::Succeeded, "{}", run.render());
        let t = world.tenant(run.job.trim_end_matches("-backup")).unwrap();
        let own = world
            .agents
            .iter()
            .find(|a| a.key_provider.as_deref() == Some(t.key_provider.as_str()))
            .unwrap();
        for item in &run.items {
            for d in item.detail["result"].as_array().unwrap() {
                let reason = d["reason"].as_str().unwrap();
                match d["mode"].as_str().unwrap() {
                    "hotadd" => assert_eq!(d["proxy"], own.id.as_str(), "{d}"),
                    "nbdssl" => {
                        spilled += 1;
                        let busy = format!(
                            "{} (hotadd, {}) had no free slot for",
                            own.id, t.key_provider
                        );
                        assert!(reason.contains(&busy), "{reason}");
                        assert!(reason.contains("policy after=0s"), "{reason}");
                    }
                    other => panic!("mode {other}: {d}"),
                }
            }
        }
    }
    assert!(spilled > 0, "the 4-slot HotAdd proxies overflowed");
}

/// The whitepaper world with every agent's disks carried by VDDK (each proxy
/// with its own copy of the mock `libvixDiskLib`): every encrypted disk goes
/// HotAdd only through its own tenant's proxy, nothing over clear text, and
/// the mock VDDK's call logs and vCenter's audit log prove which transport
/// carried which disk; restores are bit-identical.
#[test]
fn whitepaper_world_through_the_mock_vddk() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = WorldOptions::new(whitepaper(), dir.path());
    opts.workers = Some(2);
    opts.poll = Duration::from_millis(50);
    opts.vddk_library = Some(common::vsphere::mock_vddk_library());
    let world = World::start(opts).unwrap();
    let orch = world.orchestrator().unwrap();
    let plan = world.runtime().block_on(orch.plan(&[])).unwrap();
    let text = plan.render(false);
    assert!(text.contains("carried by vddk 8"), "{text}");
    let runs = world.runtime().block_on(orch.run_once(&[], false)).unwrap();
    let mut disks = 0;
    for run in &runs {
        assert_eq!(run.state, RunState::Succeeded, "{}", run.render());
        let t = world.tenant(run.job.trim_end_matches("-backup")).unwrap();
        for item in &run.items {
            for d in item.detail["result"].as_array().unwrap() {
                disks += 1;
                assert_eq!(d["mode"], "hotadd", "{d}");
                let proxy = world.agents.iter().find(|a| a.id == d["proxy"]).unwrap();
                assert_eq!(proxy.key_provider.as_deref(), Some(t.key_provider.as_str()));
                let reason = d["reason"].as_str().unwrap();
                assert!(reason.contains("carried by VDDK 8"), "{reason}");
            }
        }
    }
    assert_eq!(disks, 30);
    // Each proxy's own library: only its tenant's VMs, only hotadd, one mode per
    // connection.
    for a in &world.agents {
        let calls = common::vsphere::vddk_calls(a.vddk_calls.as_ref().unwrap());
        let modes: Vec<&str> = calls
            .iter()
            .filter(|c| c["fn"] == "VixDiskLib_ConnectEx")
            .map(|c| c["modes"].as_str().unwrap())
            .collect();
        match &a.key_provider {
            Some(_) => {
                assert!(!modes.is_empty(), "{}", a.id);
                assert!(modes.iter().all(|m| *m == "hotadd"), "{}: {modes:?}", a.id);
            }
            None => assert!(
                modes.is_empty(),
                "the shared proxy took no encrypted VM: {modes:?}"
            ),
        }
    }
    // vCenter's audit: no hot-add across key providers, no clear text.
    let audit = world.vcenter.admin().vddk_audit();
    assert!(audit.iter().any(|e| e.op == "hotadd"));
    for e in &audit {
        if e.op == "hotadd" {
            assert_eq!(e.proxy_key_provider, e.disk_key_provider, "{e:?}");
        }
        assert_ne!(e.mode, "nbd", "{e:?}");
    }
    let st = world.vcenter.admin().state();
    assert_eq!((st.snapshot_count(), st.attached_count()), (0, 0), "{st:?}");
    assert_eq!(world.vcenter.admin().vddk_open_handles(), 0);
    // One VM per tenant restores bit for bit.
    for t in &world.tenants {
        let vm = &t.vms[0];
        let agent = world
            .agents
            .iter()
            .find(|a| a.key_provider.as_deref() == Some(t.key_provider.as_str()))
            .unwrap();
        let keys: Vec<i64> = world
            .vcenter
            .admin()
            .state()
            .vm(vm)
            .unwrap()
            .disks
            .iter()
            .map(|d| i64::from(d.key))
            .collect();
        let target = dir.path().join("restores").join(vm);
        restore_and_compare(&world, &t.name, vm, &agent.id, &keys, &target);
    }
}

/// The tenant's KMS rotates its key (ReKeyKeyPair, as a KMS admin would); the
/// orchestrator's key sync through the agents notices, and the next backups are
/// wrapped with the new version while older points keep theirs and still restore.
#[test]
fn a_kms_rotation_is_seen_by_key_sync_and_used_by_the_next_backups() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = whitepaper();
    // Two VMs per tenant are enough here.
    s.vms
        .retain(|v| v.name.ends_with("01") || v.name.ends_with("02"));
    let mut opts = WorldOptions::new(s, dir.path());
    opts.workers = Some(2);
    opts.poll = Duration::from_millis(50);
    // Key-loss protection configured per tenant in the agents' configuration.
    let provider = ferry_mocks::fixtures::pem_pair(dir.path(), "provider-recovery", 2048).unwrap();
    opts.recovery_public_key = Some(provider.public.clone());
    let world = World::start(opts).unwrap();
    let orch = world.orchestrator().unwrap();
    let first = world.runtime().block_on(orch.run_once(&[], true)).unwrap();
    for r in &first {
        assert_eq!(r.state, RunState::Succeeded, "{}", r.render());
    }

    // Tenant A's KMS admin rotates the key pair.
    let a = world.tenant("tenant-a").unwrap();
    let kms = &world.kms[world.tenants.iter().position(|t| t.name == a.name).unwrap()];
    let client = ferry::kmip::client::KmsClient::new(kms.client_config()).unwrap();
    let before = a.key_source().unwrap().current_key().unwrap();
    assert_eq!(before.key_version, 1);
    client.rekey_key_pair(&before.key_id).unwrap();

    let second = world.runtime().block_on(orch.run_once(&[], true)).unwrap();
    let sync = &second[0];
    assert_eq!(sync.state, RunState::Succeeded, "{}", sync.render());
    // Every agent serving tenant A reports version 2; tenant B stays at 1.
    let mut seen = 0;
    for item in &sync.items {
        for r in item.detail["results"].as_array().unwrap() {
            let want = if r["tenant"] == "tenant-a" { 2 } else { 1 };
            assert_eq!(r["version"].as_u64(), Some(want), "{r}");
            seen += 1;
        }
    }
    assert!(seen >= 3, "{}", sync.render());
    for r in &second[1..] {
        assert_eq!(r.state, RunState::Succeeded, "{}", r.render());
        // Nothing changed in the guests: the second backups are CBT incrementals.
        for item in &r.items {
            for d in item.detail["result"].as_array().unwrap() {
                assert_eq!(d["read"], "cbt", "{d}");
            }
        }
    }

    // New points of tenant A are wrapped by version 2, the first ones by version 1.
    let repo = ferry::repo::Repository::open(&a.repository).unwrap();
    let mut versions: Vec<u32> = repo
        .list_points()
        .unwrap()
        .into_iter()
        .map(|p| p.header.unwrap().wrapped_key.key_ref.key_version)
        .collect();
    versions.sort();
    assert_eq!(versions, [1, 1, 2, 2], "tenant A's points");
    // Every point still verifies with the rotated key source.
    let keys = a.key_source().unwrap();
    assert_eq!(keys.current_key().unwrap().key_version, 2);
    let rep = ferry::repo::verify::verify(
        &repo,
        keys.as_ref(),
        &[],
        2,
        false,
        &ferry::progress::Progress::default(),
    )
    .unwrap();
    assert!(rep.ok(), "{:?}", rep.points);
    assert_eq!(rep.points.len(), 4);

    // Every point, before and after the rotation, is also wrapped by the
    // provider's recovery key, which alone verifies them all (the tenant's KMS
    // is not asked).
    let recovery = ferry::keys::PemKeySource::open(None, Some(&provider.private)).unwrap();
    for p in repo.list_points().unwrap() {
        let h = p.header.unwrap();
        let w = h
            .recovery_wrapped_key
            .expect("point made under key-loss protection");
        assert_eq!(w.key_ref.source, "recovery");
    }
    let rep = ferry::repo::verify::verify(
        &repo,
        &recovery,
        &[],
        2,
        false,
        &ferry::progress::Progress::default(),
    )
    .unwrap();
    assert!(rep.ok(), "{:?}", rep.points);
    assert_eq!(rep.points.len(), 4);
}

/// `POST /v1/restores` with a `vm` target through the agents of the simulated
/// world: a point of tenant A's vm01 goes into new disks of vm02 (same key
/// provider) by HotAdd through tenant A's own proxy and by NBD-SSL through the
/// shared one; the new disks hold exactly vm01's disks at snapshot time, are
/// encrypted under KMS-A, and nothing stays attached. A VM of tenant B is refused
/// (`vm_refused`) before anything is created.
#[test]
fn restores_into_new_disks_of_a_vm_through_the_agent_api() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = whitepaper();
    s.vms
        .retain(|v| ["tenant-a-vm01", "tenant-a-vm02", "tenant-b-vm01"].contains(&v.name.as_str()));
    let mut opts = WorldOptions::new(s, dir.path());
    opts.workers = Some(2);
    opts.poll = Duration::from_millis(50);
    let world = World::start(opts).unwrap();
    let orch = world.orchestrator().unwrap();
    let runs = world.runtime().block_on(orch.run_once(&[], true)).unwrap();
    for r in &runs {
        assert_eq!(r.state, RunState::Succeeded, "{}", r.render());
    }
    let admin = world.vcenter.admin();
    let st = admin.state();
    let src = st.vm("tenant-a-vm01").unwrap().clone();
    let digests: Vec<String> = src
        .disks
        .iter()
        .map(|d| {
            admin
                .digest("tenant-a-vm01", &d.key.to_string(), None)
                .unwrap()
                .0
        })
        .collect();
    // vm01 changes after its backup: the restore must give the backed-up content.
    admin
        .write(
            "tenant-a-vm01",
            &src.disks[0].key.to_string(),
            0,
            &[0xA5; 4096],
        )
        .unwrap();
    let target = st.vm("tenant-a-vm02").unwrap().moref.clone();
    let other_tenant = st.vm("tenant-b-vm01").unwrap().moref.clone();

    let run_on = |agent: &str, moref: &str, datastore: Option<&str>, policy: Option<&str>| {
        let client = world.agent_client(agent).unwrap();
        let job = world
            .runtime()
            .block_on(client.start_restore(&RestoreRequest {
                tenant: "tenant-a".into(),
                point: "latest:tenant-a-vm01".into(),
                disks: None,
                target: RestoreTargetSpec::Vm {
                    moref: moref.to_string(),
                    datastore: datastore.map(str::to_string),
                    storage_policy: policy.map(str::to_string),
                    overwrite: false,
                },
            }))
            .unwrap();
        world.runtime().block_on(async {
            loop {
                let j = client.job(&job.id).await.unwrap();
                if j.state.is_terminal() {
                    return j;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let run = |agent: &str, moref: &str| run_on(agent, moref, None, None);
    // Through the shared NBD-SSL proxy, the API also picks the datastore and the
    // storage policy of the new disks.
    for (agent, mode, ds, policy) in [
        ("proxy-kms-a", "hotadd", None, None),
        (
            "proxy-nbd",
            "nbdssl",
            Some("ds-shared"),
            Some("gold-encrypted"),
        ),
    ] {
        let before: Vec<i32> = admin
            .state()
            .vm("tenant-a-vm02")
            .unwrap()
            .disks
            .iter()
            .map(|d| d.key)
            .collect();
        let done = run_on(agent, &target, ds, policy);
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert_eq!(done.disks.len(), src.disks.len(), "{done:?}");
        let vm02 = admin.state().vm("tenant-a-vm02").unwrap().clone();
        let new: Vec<_> = vm02
            .disks
            .iter()
            .filter(|d| !before.contains(&d.key))
            .collect();
        assert_eq!(new.len(), src.disks.len(), "{vm02:?}");
        for (n, d) in done.disks.iter().enumerate() {
            assert_eq!(d.disk_key, n as i32);
            assert_eq!(d.proxy, agent);
            assert_eq!(
                serde_json::to_value(d.mode).unwrap(),
                serde_json::json!(mode),
                "{d:?}"
            );
            assert!(d.reason.contains("written into new disk"), "{}", d.reason);
            let nd = new
                .iter()
                .find(|x| x.file_name.ends_with(&format!("-disk{n}.vmdk")))
                .unwrap();
            assert!(
                nd.file_name.contains(&format!("ferry-restore-{agent}-")),
                "{}",
                nd.file_name
            );
            assert_eq!(nd.key_provider.as_deref(), Some("KMS-A"));
            assert_eq!(
                nd.datastore,
                ds.unwrap_or("ds-tenant-a"),
                "disk {n} through {agent}"
            );
            assert_eq!(nd.storage_policy.as_deref(), policy);
            let (got, _) = admin
                .digest("tenant-a-vm02", &nd.key.to_string(), None)
                .unwrap();
            assert_eq!(got, digests[n], "disk {n} restored through {agent}");
        }
        assert!(
            done.disks.iter().map(|d| d.bytes).sum::<u64>() > 0,
            "{done:?}"
        );
        assert!(
            done.notes.iter().any(|n| n.contains("tenant-a-vm02")),
            "{:?}",
            done.notes
        );
        let st = admin.state();
        assert_eq!((st.attached_count(), st.snapshot_count()), (0, 0), "{st:?}");
    }

    // Tenant A's point into tenant B's VM: refused, nothing created.
    let before = admin.state().vm("tenant-b-vm01").unwrap().disks.len();
    let done = run("proxy-nbd", &other_tenant);
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    let e = done.error.unwrap();
    assert_eq!(e.code, "vm_refused", "{e:?}");
    assert!(
        e.message.contains("KMS-B") && e.message.contains("KMS-A"),
        "{e:?}"
    );
    assert_eq!(
        admin.state().vm("tenant-b-vm01").unwrap().disks.len(),
        before
    );

    // The same through the CLI with the agent's configuration: one disk, by name.
    let agent = world.agents.iter().find(|a| a.id == "proxy-kms-a").unwrap();
    let ferry = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("FERRY_REPO")
            .output()
            .unwrap()
    };
    let cfg = agent.config.to_str().unwrap();
    // `ferry restore --vm tenant-a-vm02` of tenant-a-vm01's latest point.
    let restore_a = |disk: &'static str, dry: bool| {
        let mut a = vec![
            "restore",
            "--vm",
            "tenant-a-vm02",
            "--point",
            "latest:tenant-a-vm01",
            "--disk",
            disk,
            "--config",
            cfg,
        ];
        if dry {
            a.push("--dry-run");
        }
        a
    };
    // --dry-run first: the plan, and nothing changes on vCenter.
    let disks_of = |vm: &str| admin.state().vm(vm).unwrap().disks.len();
    let before = (disks_of("tenant-a-vm02"), disks_of("tenant-b-vm01"));
    let o = ferry(&[&["--json"][..], &restore_a("0", true)].concat());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["vm"], "tenant-a-vm02", "{v}");
    assert_eq!(v["refusals"], serde_json::json!([]), "{v}");
    assert_eq!(v["disks"].as_array().unwrap().len(), 1, "{v}");
    let d = &v["disks"][0];
    assert_eq!(
        (&d["action"], &d["mode"], &d["proxy"]),
        (&"new".into(), &"hotadd".into(), &"proxy-kms-a".into()),
        "{v}"
    );
    assert!(
        d["datastore_reason"]
            .as_str()
            .unwrap()
            .starts_with("default:"),
        "{v}"
    );
    let outcome = &v["selection"]["disks"][0]["outcome"];
    assert_eq!(
        (&outcome["kind"], &outcome["mode"], &outcome["proxy"]),
        (&"assigned".into(), &"hotadd".into(), &"proxy-kms-a".into()),
        "{v}"
    );
    // In text, with a datastore and a storage policy: where each disk goes and why.
    let ds = admin.state().vm("tenant-a-vm02").unwrap().disks[0]
        .datastore
        .clone();
    let o = ferry(
        &[
            &restore_a("0", true)[..],
            &["--datastore", &ds, "--storage-policy", "pol-gold-1"],
        ]
        .concat(),
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "NEW disk",
        &format!("datastore: {ds} (from --datastore)"),
        "storage policy: pol-gold-1",
        "hotadd through proxy proxy-kms-a",
        "(dry run: nothing was changed)",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // --overwrite of the running VM: refused in the plan, exit 1.
    let o = ferry(&[&restore_a("0", true)[..], &["--overwrite"]].concat());
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("OVERWRITE") && text.contains("REFUSED") && text.contains("poweredOn"),
        "{text}"
    );
    let o = ferry(&[
        "restore",
        "--vm",
        "tenant-b-vm01",
        "--point",
        "latest:tenant-a-vm01",
        "--config",
        cfg,
        "--dry-run",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("refused") && err.contains("KMS-B"), "{err}");
    // A disk number the point does not have: the same not-found error as the
    // restore itself gives, from the dry run too.
    for dry in [true, false] {
        let o = ferry(&restore_a("9", dry));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "dry run {dry}: {err}");
        assert!(err.contains("has no disk 9"), "dry run {dry}: {err}");
    }
    assert_eq!(
        (disks_of("tenant-a-vm02"), disks_of("tenant-b-vm01")),
        before,
        "a dry run creates no disk"
    );
    assert_eq!(admin.state().attached_count(), 0);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--json", "restore", "--vm", "tenant-a-vm02", "--point"])
        .arg("latest:tenant-a-vm01")
        .args(["--disk", "0", "--config"])
        .arg(&agent.config)
        .env_remove("RUST_LOG")
        .env_remove("FERRY_REPO")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["disks"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["disks"][0]["mode"], "hotadd", "{v}");
    let vm02 = admin.state().vm("tenant-a-vm02").unwrap().clone();
    let nd = vm02
        .disks
        .iter()
        .find(|d| d.file_name.contains("ferry-restore-proxy-kms-a-cli-"))
        .unwrap_or_else(|| panic!("{vm02:?}"));
    let (got, _) = admin
        .digest("tenant-a-vm02", &nd.key.to_string(), None)
        .unwrap();
    assert_eq!(got, digests[0]);
    assert_eq!(admin.state().attached_count(), 0);
    // --vm without --config is a usage error.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["restore", "--vm", "x", "--point", "p"])
        .env_remove("FERRY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // An agent crash in the middle of a restore into vm02 leaves its new disk on
    // the VM (and attached to the proxy): the sweep at the next start detaches and
    // removes it, and nothing else.
    use ferry::agent::{InterruptedJob, JobRunner, JobSpec, RestoreSpec, RestoreTarget};
    let cfg = ferry::config::Config::load(&agent.config).unwrap();
    let runner = ferry::job::runner::VmJobRunner::from_config(&cfg).unwrap();
    let vc = &world.vcenter;
    let conf = ferry::vsphere::ClientConfig::new(
        &vc.url(),
        vc.user(),
        zeroize::Zeroizing::new(vc.password().to_string()),
        ferry::vsphere::ServerTrust::Ca(vc.ca_path().to_path_buf()),
    );
    let keep = world.runtime().block_on(async {
        let c = ferry::vsphere::Client::connect(conf).await.unwrap();
        let vm02 = c.vm_by_name("tenant-a-vm02").await.unwrap();
        let proxy = c.vm_by_name("proxy-kms-a").await.unwrap();
        let first = &vm02.disks[0];
        let (ds, folder) = ferry::vsphere::newdisk::split_datastore_path(&first.file_name).unwrap();
        let mut keep = Vec::new();
        for job in ["proxy-kms-a-crashed", "proxy-kms-a-crashed2"] {
            let d = c
                .create_disk(
                    &vm02.moref,
                    &ferry::vsphere::NewDiskSpec {
                        file_name: ferry::vsphere::newdisk::restore_file_name(ds, folder, job, 0),
                        datastore: first.datastore.clone().unwrap(),
                        capacity_bytes: 1 << 20,
                        encrypt_with: vm02.key_id.clone(),
                        storage_policy: None,
                    },
                )
                .await
                .unwrap();
            if job.ends_with("crashed") {
                c.attach_disk_for_write(&proxy.moref, &d).await.unwrap();
            } else {
                keep.push(d.file_name);
            }
        }
        c.logout().await;
        keep
    });
    let moref = admin.state().vm("tenant-a-vm02").unwrap().moref.clone();
    let before = disks_of("tenant-a-vm02");
    let rep = runner
        .sweep_orphans(&[InterruptedJob {
            id: "crashed".into(),
            spec: Some(JobSpec::Restore(RestoreSpec {
                tenant: "tenant-a".into(),
                point: "latest:tenant-a-vm01".into(),
                disks: None,
                target: RestoreTarget::Vm {
                    moref,
                    datastore: None,
                    storage_policy: None,
                    overwrite: false,
                },
            })),
            started_at: None,
        }])
        .unwrap();
    assert!(
        rep.jobs[0].1.contains("half-written new disk(s)")
            && rep.jobs[0]
                .1
                .contains("ferry-restore-proxy-kms-a-crashed-disk0"),
        "{rep:?}"
    );
    assert_eq!(admin.state().attached_count(), 0, "{rep:?}");
    let after = admin.state().vm("tenant-a-vm02").unwrap().clone();
    assert_eq!(after.disks.len(), before - 1, "{rep:?}");
    assert!(
        after.disks.iter().any(|d| d.file_name == keep[0]),
        "another job's disk stays: {after:?}"
    );
}
