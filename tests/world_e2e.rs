//! The whole simulated provider end to end over HTTPS, with ferry's real job
//! runner: the whitepaper's world (seed 004: 10 VMs encrypted under KMS-A, 10
//! under KMS-B, a HotAdd proxy per tenant encrypted under its tenant's provider,
//! one unencrypted shared NBD-SSL proxy), three agents, the orchestrator reading
//! the mock vCenter live. Every encrypted disk goes HotAdd to its own tenant's
//! proxy or NBD-SSL through the shared one, never HotAdd across providers, never
//! clear text; nothing is left on vCenter; restores are bit-identical.

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
    assert!(
        hotadd > 0,
        "HotAdd through the tenants' own proxies was used"
    );
    eprintln!("{hotadd} disks by HotAdd, {nbdssl} by NBD-SSL");
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
            let client = world.agent_client(proxy).unwrap();
            let target = restores.join(vm);
            let job = world
                .runtime()
                .block_on(client.start_restore(&RestoreRequest {
                    tenant: t.name.clone(),
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
            let keys: Vec<i64> = backed_up
                .iter()
                .filter(|b| &b.0 == vm)
                .map(|b| b.3)
                .collect();
            for (n, key) in keys.iter().enumerate() {
                let file = ferry::job::runner::restore_path(&target, vm, n as u32);
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
        &ferry::progress::Progress::default(),
    )
    .unwrap();
    assert!(rep.ok(), "{:?}", rep.points);
    assert_eq!(rep.points.len(), 4);
}
