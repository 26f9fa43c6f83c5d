//! The VM backup job end to end through ferry's SOAP client and the mock vCenter:
//! selection before any snapshot, HotAdd through the tenant's own proxy, refusal
//! across key providers, cleanup, and the orphan sweep.

mod common;

use common::vsphere::{self, client, proxy, request, rt};
use common::World;
use ferry::job::vm::{self, VmJobError};
use ferry::transport::select::{Mode, Policy};
use std::sync::Arc;

fn policy(failover: bool) -> Policy {
    Policy {
        failover_to_network: failover,
        allow_cleartext_nbd: false,
        preferred: None,
    }
}

#[test]
fn hotadd_through_the_tenants_own_proxy_restores_bit_identically_and_cleans_up() {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    let req = request("px-a-1", "tenant-a-web", policy(false), 0, None);
    let out = vsphere::backup(&rt, &c, &me, &w, &req).unwrap();
    assert_eq!(out.disks.len(), 2);
    for d in &out.disks {
        assert_eq!(d.mode, Mode::HotAdd, "{d:?}");
        assert!(d.reason.starts_with("hotadd via px-a"), "{}", d.reason);
    }
    for r in &out.report.disks {
        assert_eq!(r.transport, "hotadd");
        assert!(r.transport_reason.contains("hotadd via px-a"));
    }
    // Nothing left behind on vCenter.
    let st = vc.admin().state();
    assert_eq!(st.snapshot_count(), 0, "{st:?}");
    assert_eq!(st.attached_count(), 0, "{st:?}");
    // Every disk restores to exactly what the VM held at snapshot time.
    for d in &out.disks {
        let target = w.path(&format!("restored-{}", d.disk));
        w.restore(&out.report.point_id, d.disk, &target).unwrap();
        let (want, _) = vc
            .admin()
            .digest("tenant-a-web", &d.device_key.to_string(), None)
            .unwrap();
        assert_eq!(
            common::hash(&target).to_hex().to_string(),
            want,
            "disk {}",
            d.disk
        );
    }
    rt.block_on(c.logout());
}

#[test]
fn a_wrong_kms_proxy_with_failover_off_is_refused_before_any_snapshot() {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let rt = rt();
    let c = rt.block_on(client(&vc));
    // proxy-a is encrypted under KMS-A; tenant-b-db under KMS-B.
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd, Mode::NbdSsl]);
    let mut req = request("px-a-2", "tenant-b-db", policy(false), 0, None);
    req.enable_cbt = false;
    let err = vsphere::backup(&rt, &c, &me, &w, &req).unwrap_err();
    let VmJobError::Refused { summary, .. } = &err else {
        panic!("expected a refusal, got {err}");
    };
    assert!(
        summary.contains("KMS-A") && summary.contains("KMS-B"),
        "{summary}"
    );
    assert!(summary.contains("failover"), "{summary}");
    let st = vc.admin().state();
    assert_eq!(st.snapshot_count(), 0);
    assert_eq!(
        st.tasks.success + st.tasks.error + st.tasks.running,
        0,
        "no task may run: {st:?}"
    );
    assert!(w.repo().point_ids().unwrap().is_empty());
    // The dry-run plan says the same without touching anything.
    let sel = rt
        .block_on(vm::plan(&c, &me, "tenant-b-db", &policy(false)))
        .unwrap();
    assert!(!sel.is_runnable());
}

#[test]
fn orphan_sweep_removes_this_proxys_leftovers_and_nothing_else() {
    let vc = vsphere::vcenter("small");
    let rt = rt();
    let c = rt.block_on(client(&vc));
    rt.block_on(async {
        // A crashed job of px-a: its snapshot, and the snapshot disk still attached.
        let web = c.vm_by_name("tenant-a-web").await.unwrap();
        let snap = c
            .create_snapshot(
                &web,
                &ferry::vsphere::snapshot_name("px-a-7"),
                "ferry backup px-a-7",
                false,
            )
            .await
            .unwrap();
        let disks = c.snapshot_disks(&snap).await.unwrap();
        let pxa = c.vm_by_name("proxy-a").await.unwrap();
        c.attach_disk(&pxa.moref, &disks[0]).await.unwrap();
        // Another proxy's running job on another VM must survive.
        let app = c.vm_by_name("plain-app").await.unwrap();
        c.create_snapshot(
            &app,
            &ferry::vsphere::snapshot_name("px-b-3"),
            "ferry backup px-b-3",
            false,
        )
        .await
        .unwrap();
    });
    assert_eq!(vc.admin().state().attached_count(), 1);
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    let rep = rt.block_on(vm::sweep_orphans(&c, &me, &[], None)).unwrap();
    assert_eq!(rep.detached.len(), 1, "{rep:?}");
    assert_eq!(
        rep.snapshots_removed,
        vec![("tenant-a-web".to_string(), "ferry-px-a-7".to_string())]
    );
    assert!(rep.errors.is_empty(), "{rep:?}");
    let st = vc.admin().state();
    assert_eq!(st.attached_count(), 0);
    assert_eq!(st.snapshot_count(), 1, "px-b's snapshot stays");
}

#[test]
fn an_encrypted_vm_without_a_matching_hotadd_proxy_goes_nbd_ssl() {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let (esx, certs) = vsphere::esxi(&vc, w.dir.path());
    let rt = rt();
    let c = rt.block_on(client(&vc));
    // proxy-a (KMS-A) may not hot-add tenant-b-db (KMS-B): NBD-SSL, said up front.
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd, Mode::NbdSsl]);
    let req = request(
        "px-a-3",
        "tenant-b-db",
        policy(true),
        esx.port(),
        Some(certs),
    );
    let out = vsphere::backup(&rt, &c, &me, &w, &req).unwrap();
    for d in &out.disks {
        assert_eq!(d.mode, Mode::NbdSsl);
        assert!(d.reason.starts_with("nbdssl via px-a"), "{}", d.reason);
        assert!(
            d.reason.contains("hotadd not used") && d.reason.contains("KMS-B"),
            "{}",
            d.reason
        );
    }
    assert!(
        out.report.disks.iter().all(|r| r.transport == "nbdssl"),
        "{:?}",
        out.report.disks
    );
    let st = vc.admin().state();
    assert_eq!(
        (
            st.snapshot_count(),
            st.attached_count(),
            st.open_nbd_exports
        ),
        (0, 0, 0),
        "{st:?}"
    );
    vsphere::restore_matches(&w, &vc, "tenant-b-db", &out);
}

#[test]
fn a_hotadd_refused_by_vcenter_at_attach_time_fails_over_to_nbd_ssl() {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let (esx, certs) = vsphere::esxi(&vc, w.dir.path());
    let rt = rt();
    let c = rt.block_on(client(&vc));
    // The selector sees a valid HotAdd; vCenter then refuses the attach with a
    // crypto fault (as when the proxy was re-keyed in between).
    vc.admin().fail_tasks(ferry_mocks::vcenter::FailTasks {
        count: 1,
        method: Some("ReconfigVM_Task".into()),
        fault: Some("GenericVmConfigFault".into()),
        message: Some("Cannot hot-add an encrypted disk: the virtual machine and the disk use different key providers".into()),
        entity: None,
    });
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd, Mode::NbdSsl]);
    let mut req = request(
        "px-a-4",
        "tenant-a-web",
        policy(true),
        esx.port(),
        Some(certs),
    );
    req.enable_cbt = false;
    let out = vsphere::backup(&rt, &c, &me, &w, &req).unwrap();
    assert_eq!(out.disks[0].mode, Mode::NbdSsl, "{:?}", out.disks[0]);
    assert!(
        out.disks[0].reason.contains("refused by vCenter")
            && out.disks[0].reason.contains("failed over to NBD-SSL"),
        "{}",
        out.disks[0].reason
    );
    assert_eq!(out.report.disks[0].transport, "nbdssl");
    assert_eq!(
        out.disks[1].mode,
        Mode::HotAdd,
        "only the refused disk moves"
    );
    let st = vc.admin().state();
    assert_eq!((st.snapshot_count(), st.attached_count()), (0, 0), "{st:?}");
    vsphere::restore_matches(&w, &vc, "tenant-a-web", &out);
}

#[test]
fn an_unreachable_esxi_host_fails_the_job_and_still_removes_the_snapshot() {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let (esx, certs) = vsphere::esxi(&vc, w.dir.path());
    let port = esx.port();
    esx.stop().unwrap(); // the host's NBD service is down
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let me = proxy(&vc, "px-n", None, &[Mode::NbdSsl]);
    let req = request("px-n-5", "tenant-b-db", policy(true), port, Some(certs));
    let err = vsphere::backup(&rt, &c, &me, &w, &req).unwrap_err();
    assert!(matches!(err, VmJobError::Source { .. }), "{err}");
    assert!(err.to_string().contains("tenant-b-db"), "{err}");
    let st = vc.admin().state();
    assert_eq!((st.snapshot_count(), st.attached_count()), (0, 0), "{st:?}");
    assert!(
        st.tasks.success >= 2,
        "a snapshot was taken and removed: {st:?}"
    );
    assert!(w.repo().point_ids().unwrap().is_empty(), "no point");
}

#[test]
fn a_cancelled_job_detaches_removes_the_snapshot_and_commits_nothing() {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    let req = request("px-a-6", "tenant-a-web", policy(false), 0, None);
    let progress = Arc::new(ferry::progress::Progress::default());
    let p = progress.clone();
    // Cancel as soon as the first bytes moved (the disk is hot-added by then).
    let canceller = std::thread::spawn(move || {
        while p.snapshot().done == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        p.request_cancel();
    });
    let err = rt
        .block_on(vm::backup_vm(
            &c,
            &me,
            Arc::new(w.repo()),
            Arc::new(w.source()),
            &req,
            progress,
        ))
        .unwrap_err();
    canceller.join().unwrap();
    assert!(err.is_cancelled(), "{err}");
    let st = vc.admin().state();
    assert_eq!((st.snapshot_count(), st.attached_count()), (0, 0), "{st:?}");
    assert!(w.repo().point_ids().unwrap().is_empty(), "no point");
}
