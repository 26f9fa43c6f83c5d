//! The orchestrator's incremental inventory (`orchestrator::vcenter`, issue 21):
//! after a first full read, each read applies `WaitForUpdatesEx` changes, and the
//! result is always the inventory a fresh full read (`RetrievePropertiesEx`,
//! `vcenter::full_read`) gives — against ferry's mock vCenter (a generated
//! provider: VMs renamed, re-keyed, moved to another host, created, deleted;
//! truncated answers) and against govmomi's vcsim (rename, relocate, clone,
//! destroy through vim25 tasks). A lost session and a stale collector version
//! fall back to a full read, and say so.

mod common;

use common::vcsim::vcsim;
use ferry::orchestrator::config::VcenterConfig;
use ferry::orchestrator::inventory::{Inventory, InventoryVm};
use ferry::orchestrator::vcenter::{full_read, ReadKind, VsphereInventory};
use ferry::orchestrator::OrchestratorConfig;
use ferry::vsphere::{soap, Client, MoRef, Replay};
use ferry_mocks::provider::{generate, ProviderSpec};
use ferry_mocks::vcenter::scenario::{Content, DiskSpecToml, VmSpec};
use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
use std::path::Path;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A `[[vcenter]]` entry parsed the way the orchestrator parses it.
fn vcenter_config(dir: &Path, url: &str, user: &str, password: &str, ca: &Path) -> VcenterConfig {
    let pw = dir.join("vc.password");
    std::fs::write(&pw, password).unwrap();
    let text = format!(
        "[orchestrator]\nstate_dir = {:?}\n[[vcenter]]\nname = \"vc1\"\nurl = {url:?}\nuser = {user:?}\npassword_file = {:?}\nca = {:?}\n",
        dir.join("state").display().to_string(),
        pw.display().to_string(),
        ca.display().to_string()
    );
    let cfg = OrchestratorConfig::parse(&text, &dir.join("orchestrator.toml")).unwrap();
    cfg.vcenter("vc1").unwrap().clone()
}

async fn reference(vc: &VcenterConfig) -> Vec<InventoryVm> {
    let c = Client::connect(VsphereInventory::client_config(vc, 100).unwrap())
        .await
        .unwrap();
    let r = full_read(&c).await.unwrap();
    c.logout().await;
    r
}

fn kind(inv: &VsphereInventory) -> ReadKind {
    inv.last_read("vc1").unwrap().kind
}

#[test]
fn deltas_match_a_full_read_on_the_mock_vcenter() {
    let dir = tempfile::tempdir().unwrap();
    let p = generate(&ProviderSpec::new(240, 6, 8, 21));
    let vc = VcenterMock::start(VcenterOptions::new(p.scenario.clone())).unwrap();
    let cfg = vcenter_config(
        dir.path(),
        &vc.url(),
        vc.user(),
        vc.password(),
        vc.ca_path(),
    );
    let admin = vc.admin();
    // Small parts: the first read comes in truncated parts.
    let inv = VsphereInventory::new().with_page_size(50);
    rt().block_on(async {
        let first = inv.vms(&cfg).await.unwrap();
        assert_eq!(kind(&inv), ReadKind::Full { reason: None });
        assert_eq!(first.len(), 248, "240 workload VMs and 8 proxies");
        assert_eq!(first, reference(&cfg).await);
        let waits = admin
            .calls()
            .iter()
            .filter(|c| c.starts_with("WaitForUpdatesEx "))
            .count();
        assert!(
            waits >= 5,
            "240+8 objects in parts of 50: {waits} WaitForUpdatesEx calls"
        );

        // Nothing changed: an incremental read with no updates.
        let again = inv.vms(&cfg).await.unwrap();
        assert_eq!(
            kind(&inv),
            ReadKind::Incremental {
                updates: 0,
                reread: 0
            }
        );
        assert_eq!(again, first);

        // A provider's churn.
        let names: Vec<String> = p.scenario.vms.iter().map(|v| v.name.clone()).collect();
        admin.rename_vm(&names[0], "t001-renamed").unwrap();
        let enc = p.scenario.vms[10..]
            .iter()
            .find(|v| v.key_provider.is_some() && v.key_provider.as_deref() != Some("KMS-t002"))
            .unwrap();
        admin.set_key_provider(&enc.name, Some("KMS-t002")).unwrap();
        let plain = p.scenario.vms[10..]
            .iter()
            .find(|v| v.key_provider.is_none())
            .unwrap();
        admin
            .set_key_provider(&plain.name, Some("KMS-t003"))
            .unwrap();
        let other_host = p
            .scenario
            .hosts
            .iter()
            .find(|h| h.name != p.scenario.vms[5].host)
            .unwrap();
        admin.move_vm(&names[5], &other_host.name).unwrap();
        admin.remove_vm(&names[7]).unwrap();
        admin
            .add_vm(&VmSpec {
                name: "t004-vm-new".into(),
                host: p.scenario.hosts[0].name.clone(),
                datastore: None,
                key_provider: Some("KMS-t004".into()),
                cbt: false,
                tools: Default::default(),
                quiesce: Default::default(),
                disks: vec![DiskSpecToml {
                    size_mib: 1,
                    datastore: None,
                    encrypted: None,
                    content: Content::Empty,
                    data_pct: 0,
                    seed: None,
                }],
            })
            .unwrap();
        let after = inv.vms(&cfg).await.unwrap();
        match kind(&inv) {
            ReadKind::Incremental { updates, .. } => {
                assert!(updates >= 6, "{updates} updates for 6 changes")
            }
            k => panic!("expected an incremental read, got {k:?}"),
        }
        assert_eq!(after, reference(&cfg).await);
        assert_ne!(after, first);
        let by = |n: &str| after.iter().find(|v| v.vm.name == n).cloned();
        assert!(by(&names[0]).is_none() && by("t001-renamed").is_some());
        assert_eq!(
            by(&enc.name).unwrap().vm.key_provider.as_deref(),
            Some("KMS-t002")
        );
        assert!(by(&plain.name).unwrap().vm.encrypted);
        assert!(by(&names[7]).is_none());
        let new = by("t004-vm-new").unwrap();
        assert_eq!(new.vm.key_provider.as_deref(), Some("KMS-t004"));
        assert_eq!(new.folder, "/DC0/vm");
        assert_eq!(after.len(), 248);

        // The session is lost (vCenter restarted): a full read, saying why.
        admin.expire_sessions();
        admin
            .rename_vm("t001-renamed", "t001-renamed-again")
            .unwrap();
        let lost = inv.vms(&cfg).await.unwrap();
        match kind(&inv) {
            ReadKind::Full { reason: Some(r) } => assert!(r.contains("session"), "{r}"),
            k => panic!("expected a full read after the session was lost, got {k:?}"),
        }
        assert_eq!(lost, reference(&cfg).await);
        // And incremental again after it.
        inv.vms(&cfg).await.unwrap();
        assert!(matches!(kind(&inv), ReadKind::Incremental { .. }));

        // Closed (a one-shot plan exits): logged out; a later read starts over.
        let logouts = || {
            admin
                .calls()
                .iter()
                .filter(|c| c.starts_with("Logout "))
                .count()
        };
        let before = logouts();
        inv.close().await;
        assert_eq!(logouts(), before + 1, "the inventory's session logged out");
        inv.vms(&cfg).await.unwrap();
        assert_eq!(kind(&inv), ReadKind::Full { reason: None });
    });
}

#[test]
fn a_stale_collector_version_is_refused_and_reported() {
    let p = generate(&ProviderSpec::new(20, 2, 3, 5));
    let vc = VcenterMock::start(VcenterOptions::new(p.scenario.clone())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = vcenter_config(
        dir.path(),
        &vc.url(),
        vc.user(),
        vc.password(),
        vc.ca_path(),
    );
    rt().block_on(async {
        let c = Client::connect(VsphereInventory::client_config(&cfg, 100).unwrap())
            .await
            .unwrap();
        let mut w = c
            .create_watch(&["VirtualMachine"], &[&[("VirtualMachine", &["name"])]])
            .await
            .unwrap();
        let all = c.wait_for_updates(&mut w, 7).await.unwrap();
        assert_eq!(all.len(), 23, "20 VMs and 3 proxies, in parts of 7");
        assert!(c.wait_for_updates(&mut w, 7).await.unwrap().is_empty());
        let mut stale = w.clone();
        stale.version = "1".into();
        match c.wait_for_updates(&mut stale, 7).await {
            Err(ferry::vsphere::VsphereError::Fault { fault_type, .. }) => {
                assert_eq!(fault_type, "InvalidCollectorVersion")
            }
            other => panic!("expected InvalidCollectorVersion, got {other:?}"),
        }
        c.destroy_watch(&w).await;
        c.logout().await;
    });
}

// ---- govmomi vcsim ----

/// Run a vim25 task method on `this` and wait for it.
async fn task(c: &Client, method: &str, this: &MoRef, args: impl FnOnce(&mut soap::Body)) {
    let body = soap::envelope(method, this, args);
    let resp = c
        .invoke(method, &body, Replay::Unsafe, method)
        .await
        .unwrap()
        .unwrap_or_else(|f| panic!("{method}: {}", f.summary()));
    let t = MoRef::decode(resp.child("returnval").unwrap()).unwrap();
    c.wait_task(&t, method).await.unwrap();
}

#[test]
fn deltas_match_a_full_read_on_vcsim() {
    let v = vcsim();
    let dir = tempfile::tempdir().unwrap();
    let cfg = vcenter_config(dir.path(), &v.url, "user", "pass", &v.ca);
    let inv = VsphereInventory::new();
    rt().block_on(async {
        let first = inv.vms(&cfg).await.unwrap();
        assert_eq!(kind(&inv), ReadKind::Full { reason: None });
        assert!(first.len() >= 4, "{first:?}");
        assert_eq!(first, reference(&cfg).await);
        assert!(
            first.iter().all(|v| v.folder.starts_with("/DC0/vm")),
            "{first:?}"
        );
        inv.vms(&cfg).await.unwrap();
        assert!(matches!(
            kind(&inv),
            ReadKind::Incremental { updates: 0, .. }
        ));

        let c = Client::connect(VsphereInventory::client_config(&cfg, 100).unwrap())
            .await
            .unwrap();
        let vms = c.vms().await.unwrap();
        let hosts = c.hosts().await.unwrap();
        // Rename one VM.
        task(&c, "Rename_Task", &vms[0].moref, |b| {
            b.leaf("newName", "renamed-by-test");
        })
        .await;
        // Move another to a different host.
        let cur = vms[1].host.clone().unwrap();
        let cluster_of = |h: &MoRef| {
            hosts
                .iter()
                .find(|x| &x.moref == h)
                .and_then(|x| x.parent.clone())
        };
        let target = hosts
            .iter()
            .find(|h| h.moref != cur && h.parent == cluster_of(&cur))
            .expect("another host in the VM's cluster");
        task(&c, "RelocateVM_Task", &vms[1].moref, |b| {
            b.open("spec").moref("host", &target.moref).close("spec");
        })
        .await;
        // Delete a third (powered off first).
        let _ = c
            .invoke(
                "PowerOffVM_Task",
                &soap::envelope("PowerOffVM_Task", &vms[2].moref, |_| {}),
                Replay::Unsafe,
                "power off",
            )
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        task(&c, "Destroy_Task", &vms[2].moref, |_| {}).await;
        // Clone a fourth into the same folder.
        let folder = vms[3].parent.clone().unwrap();
        task(&c, "CloneVM_Task", &vms[3].moref, |b| {
            b.moref("folder", &folder)
                .leaf("name", "clone-by-test")
                .open("spec")
                .open("location")
                .close("location")
                .leaf("template", "false")
                .leaf("powerOn", "false")
                .close("spec");
        })
        .await;
        c.logout().await;

        let after = inv.vms(&cfg).await.unwrap();
        match kind(&inv) {
            ReadKind::Incremental { updates, .. } => assert!(updates >= 4, "{updates}"),
            k => panic!("expected an incremental read, got {k:?}"),
        }
        let full = reference(&cfg).await;
        assert_eq!(after, full);
        let names: Vec<&str> = after.iter().map(|v| v.vm.name.as_str()).collect();
        assert!(
            names.contains(&"renamed-by-test") && names.contains(&"clone-by-test"),
            "{names:?}"
        );
        assert!(!names.contains(&vms[2].name.as_str()));
        let moved = after
            .iter()
            .find(|x| x.vm.moref == vms[1].moref.value)
            .unwrap();
        assert_eq!(moved.vm.host, target.moref.value);
    });
}
