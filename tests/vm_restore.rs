//! Restores into new disks of a VM end to end through ferry's SOAP client, the mock
//! vCenter and the mock ESXi: a backup of an encrypted VM restored into another VM
//! of the same key provider over NBD-SSL and into the VM itself by HotAdd, each new
//! disk equal to the source disk at snapshot time (the source is written to after
//! the backup); a proxy of another key provider never plans HotAdd, is refused when
//! failover is off (before anything changes), and a HotAdd that vCenter refuses
//! anyway fails over to NBD-SSL; failures mid-restore (the ESXi host cutting the
//! connection, damaged chunks under a HotAdd) remove the new disk and leave nothing
//! attached.

mod common;

use common::vsphere::{self, client, proxy, rt};
use common::World;
use ferry::job::vm::{self, NbdSettings, VmBackupOutcome};
use ferry::job::vm_restore::{self, VmRef, VmRestoreError, VmRestoreRequest};
use ferry::pipeline::PipelineConfig;
use ferry::progress::Progress;
use ferry::transport::select::{Mode, Policy};
use ferry_mocks::vcenter::{FailTasks, Scenario, VcenterMock, VcenterOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn vcenter() -> VcenterMock {
    let sc = Scenario::parse(vsphere::RESTORE_SCENARIO, Path::new("restore.toml")).unwrap();
    VcenterMock::start(VcenterOptions::new(sc)).unwrap()
}

fn policy(failover: bool) -> Policy {
    Policy {
        failover_to_network: failover,
        allow_cleartext_nbd: false,
        preferred: None,
    }
}

/// A world with a backup of a-web (HotAdd through proxy-a) and the digests of its
/// disks at snapshot time; a-web is written to afterwards, so its live content no
/// longer matches the point.
struct Setup {
    w: World,
    vc: VcenterMock,
    esx: ferry_mocks::esxi::MockEsxi,
    certs: PathBuf,
    rt: tokio::runtime::Runtime,
    c: ferry::vsphere::Client,
    backup: VmBackupOutcome,
    digests: Vec<String>,
}

fn setup() -> Setup {
    let w = World::new();
    let vc = vcenter();
    let (esx, certs) = vsphere::esxi(&vc, w.dir.path());
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    let req = vsphere::request("px-a-1", "a-web", policy(false), 0, None);
    let (backup, digests) = vsphere::backup_then_guest_writes(&rt, &c, &me, &w, &vc, "a-web", &req);
    Setup {
        w,
        vc,
        esx,
        certs,
        rt,
        c,
        backup,
        digests,
    }
}

impl Setup {
    fn request(
        &self,
        job: &str,
        target: &str,
        disks: Option<Vec<u32>>,
        failover: bool,
    ) -> VmRestoreRequest {
        VmRestoreRequest {
            job_id: job.to_string(),
            target: VmRef::Name(target.to_string()),
            disks,
            policy: policy(failover),
            nbd: NbdSettings {
                tls_certificates: Some(self.certs.clone()),
                port: self.esx.port(),
                connections: 2,
            },
            pipeline: PipelineConfig::new(Some(2), common::CS, 16 << 20),
            lock_wait: Duration::from_secs(10),
            hotadd_wait: Duration::from_secs(10),
            required_key_provider: Some("KMS-A".into()),
            vddk: None,
            options: Default::default(),
        }
    }

    fn restore(
        &self,
        me: &ferry::job::vm::ThisProxy,
        req: &VmRestoreRequest,
        progress: Arc<Progress>,
    ) -> Result<vm_restore::VmRestoreOutcome, VmRestoreError> {
        let repo = self.w.repo();
        let keys = self.w.source();
        let point = repo
            .open_point(&self.backup.report.point_id, &keys, None)
            .unwrap();
        self.rt.block_on(vm_restore::restore_vm(
            &self.c,
            me,
            Arc::new(repo),
            Arc::new(point),
            req,
            progress,
        ))
    }

    /// Disks of `vm` in the mock: (key, file name, key provider).
    fn disks_of(&self, vm: &str) -> Vec<(i32, String, Option<String>)> {
        let st = self.vc.admin().state();
        st.vm(vm)
            .unwrap()
            .disks
            .iter()
            .map(|d| (d.key, d.file_name.clone(), d.key_provider.clone()))
            .collect()
    }

    /// Every new disk is on `vm`, encrypted under KMS-A, named ferry-restore-*,
    /// and holds exactly the source disk at snapshot time.
    fn check_restored(&self, vm: &str, out: &vm_restore::VmRestoreOutcome) {
        assert_eq!(out.vm, vm);
        let disks = self.disks_of(vm);
        for r in &out.disks {
            let (_, file, provider) = disks
                .iter()
                .find(|d| d.0 == r.new_disk_key)
                .unwrap_or_else(|| panic!("new disk {} not on {vm}: {disks:?}", r.new_disk_key));
            assert_eq!(file, &r.new_file);
            assert!(file.contains("/ferry-restore-"), "{file}");
            assert_eq!(
                provider.as_deref(),
                Some("KMS-A"),
                "encrypted under the VM's provider"
            );
            let (got, size) = self
                .vc
                .admin()
                .digest(vm, &r.new_disk_key.to_string(), None)
                .unwrap();
            assert_eq!(size, self.backup.report.disks[r.disk as usize].size);
            assert_eq!(
                got, self.digests[r.disk as usize],
                "disk {} into {vm}",
                r.disk
            );
        }
        let st = self.vc.admin().state();
        assert_eq!(st.attached_count(), 0, "{st:?}");
        assert_eq!(st.snapshot_count(), 0, "{st:?}");
    }

    /// No file named ferry-restore-* anywhere in the mock's datastores.
    fn restore_files_left(&self) -> Vec<PathBuf> {
        common::files_under(self.vc.state_dir())
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("ferry-restore-"))
            })
            .collect()
    }
}

#[test]
fn nbd_ssl_restore_into_another_vm_of_the_same_provider_matches_the_snapshot() {
    let s = setup();
    let before = s.disks_of("a-app").len();
    let me = proxy(&s.vc, "px-n", Some("proxy-nbd"), &[Mode::NbdSsl]);
    let out = s
        .restore(
            &me,
            &s.request("px-n-1", "a-app", None, true),
            Arc::new(Progress::default()),
        )
        .unwrap();
    assert_eq!(out.disks.len(), 2);
    for d in &out.disks {
        assert_eq!(d.mode, Mode::NbdSsl, "{d:?}");
        assert!(d.reason.starts_with("nbdssl via px-n"), "{}", d.reason);
        assert!(d.bytes_written > 0);
    }
    // Zero chunks of the new (zero-filled) disks were skipped, not written.
    let written: u64 = out.disks.iter().map(|d| d.bytes_written).sum();
    let size: u64 = s.backup.report.disks.iter().map(|d| d.size).sum();
    assert!(written < size, "{written} of {size}");
    assert_eq!(s.disks_of("a-app").len(), before + 2);
    s.check_restored("a-app", &out);
    assert!(s.esx.faults().stats().writes > 0, "written over NBD");
}

#[test]
fn hotadd_restore_into_the_same_vm_through_its_providers_proxy() {
    let s = setup();
    let me = proxy(
        &s.vc,
        "px-a",
        Some("proxy-a"),
        &[Mode::HotAdd, Mode::NbdSsl],
    );
    let out = s
        .restore(
            &me,
            &s.request("px-a-2", "a-web", Some(vec![1]), false),
            Arc::new(Progress::default()),
        )
        .unwrap();
    assert_eq!(out.disks.len(), 1);
    let d = &out.disks[0];
    assert_eq!((d.disk, d.mode), (1, Mode::HotAdd), "{d:?}");
    assert!(d.reason.starts_with("hotadd via px-a"), "{}", d.reason);
    assert_eq!(s.esx.faults().stats().writes, 0, "nothing went over NBD");
    s.check_restored("a-web", &out);
}

#[test]
fn another_providers_proxy_never_hotadds_and_a_refused_hotadd_fails_over() {
    let s = setup();
    let before = s.disks_of("a-app");
    let tasks = |s: &Setup| {
        let t = s.vc.admin().state().tasks;
        t.success + t.error + t.running + t.queued
    };
    // proxy-b (KMS-B) with failover off: refused before anything changes.
    let me_b = proxy(
        &s.vc,
        "px-b",
        Some("proxy-b"),
        &[Mode::HotAdd, Mode::NbdSsl],
    );
    let n = tasks(&s);
    let err = s
        .restore(
            &me_b,
            &s.request("px-b-1", "a-app", None, false),
            Arc::new(Progress::default()),
        )
        .unwrap_err();
    let VmRestoreError::Refused { summary, .. } = &err else {
        panic!("expected a refusal, got {err}");
    };
    assert!(
        summary.contains("KMS-A") && summary.contains("KMS-B"),
        "{summary}"
    );
    assert_eq!(tasks(&s), n, "no task ran");
    assert_eq!(s.disks_of("a-app"), before);

    // With failover: NBD-SSL, and the plan says why HotAdd was not used.
    let out = s
        .restore(
            &me_b,
            &s.request("px-b-2", "a-app", Some(vec![0]), true),
            Arc::new(Progress::default()),
        )
        .unwrap();
    let d = &out.disks[0];
    assert_eq!(d.mode, Mode::NbdSsl);
    assert!(
        d.reason.contains("hotadd not used") && d.reason.contains("KMS-B"),
        "{}",
        d.reason
    );
    s.check_restored("a-app", &out);

    // proxy-a plans HotAdd; vCenter refuses the attach with a crypto fault (as
    // when the proxy was re-keyed in between): the disk fails over to NBD-SSL.
    s.vc.admin().fail_tasks(FailTasks {
        count: 1,
        method: Some("ReconfigVM_Task".into()),
        fault: Some("GenericVmConfigFault".into()),
        message: Some("Cryptographic error: the key providers differ".into()),
        entity: Some("proxy-a".into()),
    });
    let me_a = proxy(
        &s.vc,
        "px-a",
        Some("proxy-a"),
        &[Mode::HotAdd, Mode::NbdSsl],
    );
    let out = s
        .restore(
            &me_a,
            &s.request("px-a-3", "a-app", Some(vec![1]), true),
            Arc::new(Progress::default()),
        )
        .unwrap();
    let d = &out.disks[0];
    assert_eq!(d.mode, Mode::NbdSsl, "{d:?}");
    assert!(
        d.reason.starts_with("hotadd via px-a")
            && d.reason.contains("refused by vCenter")
            && d.reason.contains("failed over to NBD-SSL"),
        "{}",
        d.reason
    );
    s.check_restored("a-app", &out);
}

#[test]
fn a_connection_cut_by_the_esxi_host_removes_the_new_disk_and_leaves_nothing_attached() {
    let s = setup();
    let before = s.disks_of("a-app");
    let done_tasks = |s: &Setup| s.vc.admin().state().tasks.success;
    let t0 = done_tasks(&s);
    // Every connection to the ESXi host is cut after 128 KiB arrived: each write
    // (a 256 KiB chunk) dies on every retry.
    s.esx
        .faults()
        .drop_connections_after_received(128 << 10, 1000);
    let me = proxy(&s.vc, "px-n", Some("proxy-nbd"), &[Mode::NbdSsl]);
    let err = s
        .restore(
            &me,
            &s.request("px-n-9", "a-app", None, true),
            Arc::new(Progress::default()),
        )
        .unwrap_err();
    s.esx.faults().clear();
    let msg = err.to_string();
    assert!(matches!(err, VmRestoreError::Failed { .. }), "{msg}");
    assert!(
        matches!(err.cause(), VmRestoreError::Job(_)),
        "the write failed: {msg}"
    );
    assert!(msg.contains("gave up after"), "{msg}");
    assert!(
        msg.contains("ferry-restore-px-n-9-disk0.vmdk were removed from VM a-app")
            && msg.contains("nothing is left behind"),
        "{msg}"
    );
    assert!(
        s.esx.faults().stats().dropped >= 3,
        "retried on new connections"
    );
    assert_eq!(s.disks_of("a-app"), before, "the new disk is gone");
    assert!(
        s.restore_files_left().is_empty(),
        "{:?}",
        s.restore_files_left()
    );
    // Created, then destroyed: two tasks, and nothing attached or snapshotted.
    assert_eq!(done_tasks(&s), t0 + 2);
    let st = s.vc.admin().state();
    assert_eq!((st.attached_count(), st.snapshot_count()), (0, 0), "{st:?}");
}

#[test]
fn a_failure_on_the_second_disk_removes_both_new_disks() {
    let s = setup();
    let before = s.disks_of("a-app");
    // Damage the chunks of disk 1 only: disk 0 is restored completely over
    // NBD-SSL, then disk 1 fails part-way.
    let repo = s.w.repo();
    let point = repo
        .open_point(&s.backup.report.point_id, &s.w.source(), None)
        .unwrap();
    let mut idx = repo.open_index(&point, 1).unwrap();
    let mut damaged = 0;
    while let Some(e) = idx.next_entry().unwrap() {
        if !e.id.is_zero_marker() && damaged < 2 {
            let f = repo.chunk_path(&e.id);
            let mut b = std::fs::read(&f).unwrap();
            let n = b.len();
            b[n - 1] ^= 0xFF;
            std::fs::write(&f, b).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    let me = proxy(&s.vc, "px-n", Some("proxy-nbd"), &[Mode::NbdSsl]);
    let err = s
        .restore(
            &me,
            &s.request("px-n-8", "a-app", None, true),
            Arc::new(Progress::default()),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("ferry-restore-px-n-8-disk1.vmdk, [ds-a] a-app/ferry-restore-px-n-8-disk0.vmdk were removed")
            && msg.contains("nothing is left behind"),
        "{msg}"
    );
    assert!(
        s.esx.faults().stats().bytes_written >= 2 << 20,
        "disk 0 was written before disk 1 failed"
    );
    assert_eq!(s.disks_of("a-app"), before);
    assert!(s.restore_files_left().is_empty());
    assert_eq!(s.vc.admin().state().attached_count(), 0);
}

#[test]
fn damaged_chunks_under_a_hotadd_restore_detach_and_destroy_the_new_disk() {
    let s = setup();
    let before = s.disks_of("a-web");
    // Damage every other chunk: the restore fails part-way through the disk.
    let chunks = common::files_under(&s.w.repo_dir.join("chunks"));
    assert!(chunks.len() > 4);
    for f in chunks.iter().step_by(2) {
        let mut b = std::fs::read(f).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xFF;
        std::fs::write(f, b).unwrap();
    }
    let me = proxy(&s.vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    let err = s
        .restore(
            &me,
            &s.request("px-a-9", "a-web", Some(vec![0]), false),
            Arc::new(Progress::default()),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("chunks/"), "the damaged chunk is named: {msg}");
    assert!(msg.contains("nothing is left behind"), "{msg}");
    assert_eq!(s.disks_of("a-web"), before);
    assert!(s.restore_files_left().is_empty());
    let st = s.vc.admin().state();
    assert_eq!(st.attached_count(), 0, "{st:?}");
    let dev = s.vc.device_dir("proxy-a").unwrap();
    assert_eq!(
        std::fs::read_dir(dev).unwrap().count(),
        0,
        "device entry removed"
    );

    // A cancelled restore (cancelled before it starts writing) changes nothing.
    let p = Arc::new(Progress::default());
    p.request_cancel();
    let err = s
        .restore(&me, &s.request("px-a-10", "a-web", None, false), p)
        .unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    assert_eq!(s.disks_of("a-web"), before);
}

#[test]
fn a_hotadd_device_that_never_appears_is_cleaned_up_too() {
    let s = setup();
    let before = s.disks_of("a-app");
    // A proxy whose device directory is wrong: the attach works, the device never
    // shows up; the disk is detached and destroyed.
    let mut me = proxy(&s.vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    me.device_dir = Some(s.w.path("no-such-dir"));
    let mut req = s.request("px-a-11", "a-app", Some(vec![1]), false);
    req.hotadd_wait = Duration::from_millis(200);
    let err = s
        .restore(&me, &req, Arc::new(Progress::default()))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("did not appear") && msg.contains("nothing is left behind"),
        "{msg}"
    );
    assert_eq!(s.disks_of("a-app"), before);
    assert_eq!(s.vc.admin().state().attached_count(), 0);
}

#[test]
fn a_vm_of_another_key_provider_is_refused_before_any_change() {
    let s = setup();
    let n = s.vc.admin().state().tasks.success;
    // a-app is KMS-A; the tenant of this point is declared KMS-B.
    let me = proxy(&s.vc, "px-n", Some("proxy-nbd"), &[Mode::NbdSsl]);
    let mut req = s.request("px-n-7", "a-app", None, true);
    req.required_key_provider = Some("KMS-B".into());
    let before = s.disks_of("a-app");
    let err = s
        .restore(&me, &req, Arc::new(Progress::default()))
        .unwrap_err();
    let VmRestoreError::Refused { summary, .. } = &err else {
        panic!("expected a refusal, got {err}");
    };
    assert!(
        summary.contains("KMS-A") && summary.contains("KMS-B"),
        "{summary}"
    );
    assert_eq!(s.disks_of("a-app"), before);
    assert_eq!(s.vc.admin().state().tasks.success, n, "no task ran");
}

/// What a killed agent leaves in the middle of a HotAdd restore: a new disk on the
/// VM, attached writable to the proxy. The orphan sweep detaches it from the proxy
/// (the disk itself stays on the VM for the operator: its name says where it came
/// from).
#[test]
fn the_orphan_sweep_detaches_a_restore_disk_left_on_the_proxy() {
    let s = setup();
    let me = proxy(&s.vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    s.rt.block_on(async {
        let app = s.c.vm_by_name("a-app").await.unwrap();
        let pxa = s.c.vm_by_name("proxy-a").await.unwrap();
        let first = &app.disks[0];
        let (ds, folder) = ferry::vsphere::newdisk::split_datastore_path(&first.file_name).unwrap();
        let d =
            s.c.create_disk(
                &app.moref,
                &ferry::vsphere::NewDiskSpec {
                    file_name: ferry::vsphere::newdisk::restore_file_name(ds, folder, "px-a-77", 0),
                    datastore: first.datastore.clone().unwrap(),
                    capacity_bytes: 1 << 20,
                    encrypt_with: app.key_id.clone(),
                    storage_policy: None,
                },
            )
            .await
            .unwrap();
        s.c.attach_disk_for_write(&pxa.moref, &d).await.unwrap();
    });
    assert_eq!(s.vc.admin().state().attached_count(), 1);
    let rep =
        s.rt.block_on(vm::sweep_orphans(&s.c, &me, &[], None))
            .unwrap();
    assert_eq!(rep.detached.len(), 1, "{rep:?}");
    assert!(
        rep.detached[0].contains("ferry-restore-px-a-77-disk0"),
        "{rep:?}"
    );
    assert!(rep.errors.is_empty(), "{rep:?}");
    assert_eq!(s.vc.admin().state().attached_count(), 0);
}
