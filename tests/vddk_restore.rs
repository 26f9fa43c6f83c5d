//! Restores into new disks of a VM through VDDK: ferry's real loader and
//! bindings drive the mock `libvixDiskLib` (crate `ferry-mock-vddk`) against the
//! mock vCenter. A point of an encrypted VM is restored into another VM of the
//! same key provider by HotAdd (written under a `ferry-<job>` snapshot of the
//! target VM, as VDDK requires for HotAdd writes, then the snapshot is removed)
//! and by NBD-SSL (no snapshot); each new disk equals the source disk at snapshot
//! time; VDDK is handed exactly one mode per connection and opens the disk for
//! write in it; a HotAdd VDDK refuses (the proxy re-keyed mid-job) fails over to
//! NBD-SSL when policy allows and otherwise fails, removing the new disks;
//! failures and cancellation leave no snapshot, attached disk, open VDDK handle
//! or half-written disk.

mod common;

use common::vsphere::{self, client, mock_vddk, proxy, rt, vddk_calls};
use common::World;
use ferry::job::vm::{NbdSettings, ThisProxy, VmBackupOutcome};
use ferry::job::vm_restore::{self, VmRef, VmRestoreError, VmRestoreOutcome, VmRestoreRequest};
use ferry::pipeline::PipelineConfig;
use ferry::progress::Progress;
use ferry::transport::select::{Mode, Policy};
use ferry_mocks::vcenter::{Latency, Scenario, VcenterMock, VcenterOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Open flag `VIXDISKLIB_FLAG_OPEN_READ_ONLY`.
const FLAG_READ_ONLY: u64 = 4;

fn policy(failover: bool) -> Policy {
    Policy {
        failover_to_network: failover,
        allow_cleartext_nbd: false,
        preferred: None,
    }
}

/// A world with a backup of a-web (native HotAdd through proxy-a) and the digests
/// of its disks at snapshot time; a-web is written to afterwards.
struct Setup {
    w: World,
    vc: VcenterMock,
    rt: tokio::runtime::Runtime,
    c: ferry::vsphere::Client,
    backup: VmBackupOutcome,
    digests: Vec<String>,
}

fn setup() -> Setup {
    let w = World::new();
    let sc = Scenario::parse(vsphere::RESTORE_SCENARIO, Path::new("vddk-restore.toml")).unwrap();
    let vc = VcenterMock::start(VcenterOptions::new(sc)).unwrap();
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    let req = vsphere::request("px-a-1", "a-web", policy(false), 0, None);
    let (backup, digests) = vsphere::backup_then_guest_writes(&rt, &c, &me, &w, &vc, "a-web", &req);
    Setup {
        w,
        vc,
        rt,
        c,
        backup,
        digests,
    }
}

impl Setup {
    /// VDDK (the mock, for a proxy running in `proxy_vm`) and a restore request
    /// into a-app through it. Returns the request and VDDK's call log. Once per
    /// test and proxy: the library file is copied into place here.
    fn request(&self, job: &str, proxy_vm: &str, failover: bool) -> (VmRestoreRequest, PathBuf) {
        let (settings, log) = mock_vddk(&self.vc, self.w.dir.path(), proxy_vm);
        let req = VmRestoreRequest {
            job_id: job.to_string(),
            target: VmRef::Name("a-app".into()),
            disks: None,
            policy: policy(failover),
            // Not used: VDDK carries NBD-SSL itself (NFC).
            nbd: NbdSettings {
                tls_certificates: None,
                port: 0,
                connections: 1,
            },
            pipeline: PipelineConfig::new(Some(2), common::CS, 16 << 20),
            lock_wait: Duration::from_secs(10),
            hotadd_wait: Duration::from_secs(10),
            required_key_provider: Some("KMS-A".into()),
            vddk: Some(settings),
            options: Default::default(),
        };
        (req, log)
    }

    fn restore(
        &self,
        me: &ThisProxy,
        req: &VmRestoreRequest,
        progress: Arc<Progress>,
    ) -> Result<VmRestoreOutcome, VmRestoreError> {
        let repo = self.w.repo();
        let point = repo
            .open_point(&self.backup.report.point_id, &self.w.source(), None)
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

    /// Disks of a-app: (key, file name).
    fn app_disks(&self) -> Vec<(i32, String)> {
        self.vc
            .admin()
            .state()
            .vm("a-app")
            .unwrap()
            .disks
            .iter()
            .map(|d| (d.key, d.file_name.clone()))
            .collect()
    }

    /// Every new disk is on a-app under its base name, encrypted under KMS-A,
    /// and holds exactly the source disk at snapshot time.
    fn check_restored(&self, out: &VmRestoreOutcome) {
        assert_eq!(out.disks.len(), self.backup.disks.len());
        let st = self.vc.admin().state();
        let app = st.vm("a-app").unwrap();
        for r in &out.disks {
            let d = app
                .disks
                .iter()
                .find(|d| d.key == r.new_disk_key)
                .unwrap_or_else(|| panic!("new disk {} not on a-app", r.new_disk_key));
            assert_eq!(d.file_name, r.new_file, "the base, no snapshot delta");
            assert!(r.new_file.contains("/ferry-restore-"), "{}", r.new_file);
            assert_eq!(d.key_provider.as_deref(), Some("KMS-A"));
            let (got, size) = self
                .vc
                .admin()
                .digest("a-app", &r.new_disk_key.to_string(), None)
                .unwrap();
            assert_eq!(size, self.backup.report.disks[r.disk as usize].size);
            assert_eq!(got, self.digests[r.disk as usize], "disk {}", r.disk);
            assert!(r.bytes_written > 0);
        }
        nothing_left(&self.vc);
    }

    /// No ferry-restore-* file anywhere in the mock's datastores.
    fn restore_files_left(&self) -> Vec<PathBuf> {
        common::files_under(self.vc.state_dir())
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("ferry-restore-"))
            })
            .collect()
    }

    /// In the background: wait until the restore created its first new disk on
    /// a-app (the snapshot it takes next is slowed down), then run `then`.
    fn when_a_new_disk_exists(
        &self,
        then: impl FnOnce(&ferry_mocks::vcenter::Admin) + Send + 'static,
    ) -> std::thread::JoinHandle<bool> {
        self.vc.admin().set_latency(Latency {
            ms: 800,
            method: Some("CreateSnapshot_Task".into()),
        });
        let admin = self.vc.admin();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let st = admin.state();
                if st
                    .vm("a-app")
                    .unwrap()
                    .disks
                    .iter()
                    .any(|d| d.file_name.contains("/ferry-restore-"))
                {
                    then(&admin);
                    return true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        })
    }
}

/// Nothing left on vCenter: no snapshot, no hot-added disk, no open VDDK handle.
fn nothing_left(vc: &VcenterMock) {
    let st = vc.admin().state();
    assert_eq!(st.snapshot_count(), 0, "{st:?}");
    assert_eq!(st.attached_count(), 0, "{st:?}");
    assert_eq!(vc.admin().vddk_open_handles(), 0);
}

/// ConnectEx calls (mode, read-only, snapshot) and the modes disks were opened
/// in, with their open flags.
type Connects = Vec<(String, bool, Option<String>)>;
fn connects_and_opens(calls: &[serde_json::Value]) -> (Connects, Vec<(String, u64)>) {
    let connects = calls
        .iter()
        .filter(|c| c["fn"] == "VixDiskLib_ConnectEx")
        .map(|c| {
            (
                c["modes"].as_str().unwrap_or("").to_string(),
                c["readOnly"].as_bool().unwrap_or(true),
                c["snapshot"].as_str().map(str::to_string),
            )
        })
        .collect();
    let opens = calls
        .iter()
        .filter(|c| c["fn"] == "VixDiskLib_Open" && c["result"] == 0)
        .map(|c| {
            (
                c["mode"].as_str().unwrap_or("").to_string(),
                c["flags"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    (connects, opens)
}

#[test]
fn hotadd_through_vddk_writes_under_a_snapshot_and_matches_the_point() {
    let s = setup();
    let app = s.vc.admin().state().vm("a-app").unwrap().moref.clone();
    let me = proxy(
        &s.vc,
        "px-a",
        Some("proxy-a"),
        &[Mode::HotAdd, Mode::NbdSsl],
    );
    let (req, log) = s.request("px-a-2", "proxy-a", false);
    let out = s.restore(&me, &req, Arc::new(Progress::default())).unwrap();
    for d in &out.disks {
        assert_eq!(d.mode, Mode::HotAdd, "{d:?}");
        assert!(d.reason.starts_with("hotadd via px-a"), "{}", d.reason);
        assert!(
            d.reason.contains(
                "carried by VDDK 8 (hotadd confirmed by GetTransportMode, opened for write under snapshot snapshot-"
            ),
            "{}",
            d.reason
        );
    }
    s.check_restored(&out);

    // One mode per connection, read-write, under a snapshot; every disk opened
    // writable in that mode.
    let calls = vddk_calls(&log);
    let (connects, opens) = connects_and_opens(&calls);
    assert_eq!(connects.len(), 2, "{calls:#?}");
    for (mode, ro, snap) in &connects {
        assert_eq!((mode.as_str(), *ro), ("hotadd", false));
        assert!(snap.as_deref().is_some_and(|s| s.starts_with("snapshot-")));
    }
    assert_eq!(opens.len(), 2);
    for (mode, flags) in &opens {
        assert_eq!(mode, "hotadd");
        assert_eq!(flags & FLAG_READ_ONLY, 0, "opened for write");
    }
    for f in [
        "VixDiskLib_PrepareForAccess",
        "VixDiskLib_EndAccess",
        "VixDiskLib_Close",
    ] {
        assert!(calls.iter().any(|c| c["fn"] == f), "{f} never called");
    }

    // vCenter's audit: the new disks' bases were hot-added writable to proxy-a,
    // under the same key provider, each under a snapshot of a-app.
    let audit = s.vc.admin().vddk_audit();
    let hotadds: Vec<_> = audit.iter().filter(|a| a.op == "hotadd").collect();
    assert_eq!(hotadds.len(), 2, "{audit:#?}");
    for a in &hotadds {
        assert_eq!(a.vm, app);
        assert_eq!(a.proxy_key_provider.as_deref(), Some("KMS-A"), "{a:?}");
        assert_eq!(a.disk_key_provider, a.proxy_key_provider, "{a:?}");
        assert!(!a.read_only && a.snapshot.is_some(), "{a:?}");
        assert!(a.disk_path.contains("/ferry-restore-px-a-2-disk"), "{a:?}");
    }
    assert!(
        audit
            .iter()
            .filter(|a| a.op == "close" && a.mode == "hotadd")
            .all(|a| a
                .message
                .contains("written through the hot-added device are in the disk")),
        "{audit:#?}"
    );
    assert!(audit.iter().all(|a| a.op != "refused"), "{audit:#?}");
    assert!(audit
        .iter()
        .any(|a| a.op == "prepare-access" && a.vm == app));
    assert!(audit.iter().any(|a| a.op == "end-access" && a.vm == app));
    rt_logout(&s);
}

#[test]
fn nbdssl_through_vddk_writes_the_live_disk_without_a_snapshot() {
    let s = setup();
    let me = proxy(&s.vc, "px-n", Some("proxy-nbd"), &[Mode::NbdSsl]);
    let (req, log) = s.request("px-n-1", "proxy-nbd", true);
    let out = s.restore(&me, &req, Arc::new(Progress::default())).unwrap();
    for d in &out.disks {
        assert_eq!(d.mode, Mode::NbdSsl, "{d:?}");
        assert!(
            d.reason.contains(
                "carried by VDDK 8 (nbdssl confirmed by GetTransportMode, opened for write)"
            ),
            "{}",
            d.reason
        );
    }
    // Zero chunks of the new (zero-filled) disks were skipped, not written.
    let written: u64 = out.disks.iter().map(|d| d.bytes_written).sum();
    let size: u64 = s.backup.report.disks.iter().map(|d| d.size).sum();
    assert!(written < size, "{written} of {size}");
    s.check_restored(&out);
    let (connects, opens) = connects_and_opens(&vddk_calls(&log));
    assert_eq!(
        connects,
        vec![("nbdssl".to_string(), false, None); 2],
        "one mode per connection, read-write, no snapshot"
    );
    assert!(opens
        .iter()
        .all(|(m, f)| m == "nbdssl" && f & FLAG_READ_ONLY == 0));
    let audit = s.vc.admin().vddk_audit();
    assert!(
        audit
            .iter()
            .filter(|a| a.op == "open")
            .all(|a| a.mode == "nbdssl" && !a.read_only && a.snapshot.is_none() && a.encrypted),
        "{audit:#?}"
    );
    assert!(audit.iter().all(|a| a.op != "hotadd"));
    rt_logout(&s);
}

/// Restore into a-app through VDDK on proxy-a while proxy-a is re-keyed under
/// KMS-B after the selector planned HotAdd and the first new disk exists (during
/// the snapshot), as when a proxy VM is re-encrypted mid-job.
fn with_proxy_rekeyed_mid_job(
    s: &Setup,
    job: &str,
    failover: bool,
) -> (Result<VmRestoreOutcome, VmRestoreError>, PathBuf) {
    let me = proxy(
        &s.vc,
        "px-a",
        Some("proxy-a"),
        &[Mode::HotAdd, Mode::NbdSsl],
    );
    let (req, log) = s.request(job, "proxy-a", failover);
    let rekey = s.when_a_new_disk_exists(|admin| {
        admin.set_key_provider("proxy-a", Some("KMS-B")).unwrap();
    });
    let out = s.restore(&me, &req, Arc::new(Progress::default()));
    assert!(rekey.join().unwrap(), "the restore never created a disk");
    s.vc.admin().clear_faults();
    (out, log)
}

#[test]
fn a_hotadd_vddk_refuses_fails_over_to_nbdssl_when_policy_allows() {
    let s = setup();
    let (out, log) = with_proxy_rekeyed_mid_job(&s, "px-a-3", true);
    let out = out.unwrap();
    for d in &out.disks {
        assert_eq!(d.mode, Mode::NbdSsl, "{d:?}");
        assert!(
            d.reason.starts_with("hotadd via px-a")
                && d.reason.contains("HotAdd then refused by VDDK")
                && d.reason.contains("failed over to NBD-SSL")
                && d.reason.contains("nbdssl confirmed by GetTransportMode"),
            "{}",
            d.reason
        );
    }
    s.check_restored(&out);
    // Asked for hotadd (under the snapshot), refused, then nbdssl (without one).
    let (connects, opens) = connects_and_opens(&vddk_calls(&log));
    assert_eq!(
        connects.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["hotadd", "nbdssl", "hotadd", "nbdssl"],
        "{connects:?}"
    );
    for (mode, ro, snap) in &connects {
        assert!(!ro);
        assert_eq!(snap.is_some(), mode == "hotadd", "{connects:?}");
    }
    assert!(opens.iter().all(|(m, _)| m == "nbdssl"), "{opens:?}");
    let refused: Vec<_> =
        s.vc.admin()
            .vddk_audit()
            .into_iter()
            .filter(|a| a.op == "refused")
            .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(
        refused.iter().all(|a| a.mode == "hotadd"
            && a.proxy_key_provider.as_deref() == Some("KMS-B")
            && a.message.contains("key provider")),
        "{refused:#?}"
    );
    rt_logout(&s);
}

#[test]
fn a_hotadd_vddk_refuses_fails_and_removes_the_new_disks_when_failover_is_off() {
    let s = setup();
    let before = s.app_disks();
    let (out, _log) = with_proxy_rekeyed_mid_job(&s, "px-a-4", false);
    let err = out.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err.cause(), VmRestoreError::Target { .. }) && msg.contains("hotadd"),
        "{msg}"
    );
    assert!(msg.contains("key provider"), "{msg}");
    assert!(
        msg.contains("ferry-restore-px-a-4-disk0.vmdk were removed from VM a-app")
            && msg.contains("nothing is left behind"),
        "{msg}"
    );
    assert_eq!(s.app_disks(), before, "no half-written disk");
    assert!(
        s.restore_files_left().is_empty(),
        "{:?}",
        s.restore_files_left()
    );
    nothing_left(&s.vc);
    rt_logout(&s);
}

#[test]
fn failures_and_cancellation_under_the_snapshot_leave_nothing_behind() {
    let s = setup();
    let before = s.app_disks();
    let me = proxy(&s.vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);

    // Cancelled while the snapshot is being taken: the disk is open for write
    // under the snapshot when the pipeline sees the cancel.
    let (req, _) = s.request("px-a-5", "proxy-a", false);
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let cancel = s.when_a_new_disk_exists(move |_| p.request_cancel());
    let err = s.restore(&me, &req, progress).unwrap_err();
    assert!(cancel.join().unwrap());
    s.vc.admin().clear_faults();
    assert!(err.is_cancelled(), "{err}");
    assert!(err.to_string().contains("nothing is left behind"), "{err}");
    assert_eq!(s.app_disks(), before);
    assert!(s.restore_files_left().is_empty());
    nothing_left(&s.vc);

    // Damaged chunks: the write fails part-way through the first disk.
    for f in common::files_under(&s.w.repo_dir.join("chunks"))
        .iter()
        .step_by(2)
    {
        let mut b = std::fs::read(f).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xFF;
        std::fs::write(f, b).unwrap();
    }
    // (The same VDDK directory: the loaded library is not copied over again.)
    let mut req = req;
    req.job_id = "px-a-6".into();
    let err = s
        .restore(&me, &req, Arc::new(Progress::default()))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err.cause(), VmRestoreError::Job(_)), "{msg}");
    assert!(
        msg.contains("chunks/") && msg.contains("nothing is left behind"),
        "{msg}"
    );
    assert_eq!(s.app_disks(), before);
    assert!(s.restore_files_left().is_empty());
    nothing_left(&s.vc);
    // The snapshot existed while the disk was written, and is gone.
    assert!(s
        .vc
        .admin()
        .vddk_audit()
        .iter()
        .any(|a| a.op == "open" && a.mode == "hotadd" && !a.read_only && a.snapshot.is_some()));
    rt_logout(&s);
}

fn rt_logout(s: &Setup) {
    s.rt.block_on(s.c.logout());
}
