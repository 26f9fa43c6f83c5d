//! Where and how a restore into a VM writes, against the mock vCenter: new disks
//! on another datastore under a storage policy (the `VirtualMachineDefinedProfileSpec`
//! vCenter receives is recorded on the disk); a datastore that does not exist, that
//! the VM's host does not mount or that lacks room is refused before any change;
//! `--overwrite` writes the point back over the disks of a powered-off VM and is
//! refused for a running one (naming VM and power state, changing nothing); new
//! disks of a powered-off VM are fine; a disk file locked by another host comes
//! back as `FileLocked` naming the file and the VM, with nothing left behind; and
//! the dry run says per disk where it goes, through which proxy and transport and
//! why, without a single mutating call reaching vCenter.

mod common;

use common::vsphere::{self, client, proxy, rt};
use common::World;
use ferry::job::vm::{NbdSettings, ThisProxy, VmBackupOutcome};
use ferry::job::vm_restore::{
    self, DiskAction, TargetOptions, VmRef, VmRestoreError, VmRestoreRequest,
};
use ferry::pipeline::PipelineConfig;
use ferry::progress::Progress;
use ferry::transport::select::{Mode, Policy};
use ferry_mocks::vcenter::{Scenario, VcenterMock, VcenterOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The restore scenario with a second host that alone mounts `ds-far`.
fn vcenter() -> VcenterMock {
    let text = format!(
        "{}\n[[host]]\nname = \"esx-02.lab\"\ncluster = \"C1\"\ndatastores = [\"ds-far\"]\n[[datastore]]\nname = \"ds-far\"\n",
        vsphere::RESTORE_SCENARIO
    );
    let sc = Scenario::parse(&text, Path::new("restore-target.toml")).unwrap();
    VcenterMock::start(VcenterOptions::new(sc)).unwrap()
}

const POLICY_ID: &str = "aa6d5a82-1c88-45da-85d3-3d74b91a5bad";

struct Setup {
    w: World,
    vc: VcenterMock,
    esx: ferry_mocks::esxi::MockEsxi,
    certs: PathBuf,
    rt: tokio::runtime::Runtime,
    c: ferry::vsphere::Client,
    backup: VmBackupOutcome,
    /// a-web's disks at snapshot time.
    digests: Vec<String>,
    hotadd: ThisProxy,
    nbd: ThisProxy,
}

/// A backup of a-web (two disks); a-web is written to afterwards.
fn setup() -> Setup {
    let w = World::new();
    let vc = vcenter();
    let (esx, certs) = vsphere::esxi(&vc, w.dir.path());
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let hotadd = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    let nbd = proxy(&vc, "px-n", None, &[Mode::NbdSsl]);
    let req = vsphere::request("px-a-1", "a-web", policy(), 0, None);
    let (backup, digests) =
        vsphere::backup_then_guest_writes(&rt, &c, &hotadd, &w, &vc, "a-web", &req);
    Setup {
        w,
        vc,
        esx,
        certs,
        rt,
        c,
        backup,
        digests,
        hotadd,
        nbd,
    }
}

fn policy() -> Policy {
    Policy {
        failover_to_network: true,
        allow_cleartext_nbd: false,
        preferred: None,
    }
}

impl Setup {
    fn request(&self, job: &str, target: &str, options: TargetOptions) -> VmRestoreRequest {
        VmRestoreRequest {
            job_id: job.to_string(),
            target: VmRef::Name(target.to_string()),
            disks: None,
            policy: policy(),
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
            options,
        }
    }

    fn restore(
        &self,
        me: &ThisProxy,
        req: &VmRestoreRequest,
    ) -> Result<vm_restore::VmRestoreOutcome, VmRestoreError> {
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
            Arc::new(Progress::default()),
        ))
    }

    fn plan(&self, me: &ThisProxy, req: &VmRestoreRequest) -> vm_restore::RestorePlan {
        let repo = self.w.repo();
        let (_, header, _) = repo.read_manifest(&self.backup.report.point_id).unwrap();
        let disks = vm_restore::wanted_disks(&header, None).unwrap();
        self.rt
            .block_on(vm_restore::plan(&self.c, me, req, &disks))
            .unwrap()
    }

    fn digest(&self, vm: &str, key: i32) -> String {
        self.vc
            .admin()
            .digest(vm, &key.to_string(), None)
            .unwrap()
            .0
    }

    /// Runs `f` and returns the mutating SOAP calls it made.
    fn mutations<T>(&self, f: impl FnOnce() -> T) -> (T, Vec<String>) {
        let before = self.vc.admin().calls().len();
        let out = f();
        let calls = self.vc.admin().calls();
        let new: Vec<String> = calls[before..]
            .iter()
            .filter(|c| {
                ferry_mocks::vcenter::MUTATING_METHODS
                    .contains(&c.split(' ').next().unwrap_or_default())
            })
            .cloned()
            .collect();
        (out, new)
    }

    fn nothing_left(&self) {
        let st = self.vc.admin().state();
        assert_eq!(st.attached_count(), 0, "{st:?}");
        assert_eq!(st.snapshot_count(), 0, "{st:?}");
        for v in &st.vms {
            assert!(
                v.disks
                    .iter()
                    .all(|d| !d.file_name.contains("ferry-restore-")),
                "{v:?}"
            );
        }
        let files: Vec<_> = common::files_under(self.vc.state_dir())
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("ferry-restore-"))
            })
            .collect();
        assert!(files.is_empty(), "{files:?}");
    }
}

#[test]
fn new_disks_on_another_datastore_under_a_storage_policy() {
    let s = setup();
    let opts = TargetOptions {
        datastore: Some("ds-b".into()),
        storage_policy: Some(POLICY_ID.into()),
        overwrite: false,
    };
    let out = s
        .restore(&s.nbd, &s.request("px-n-2", "a-app", opts))
        .unwrap();
    assert_eq!(out.disks.len(), 2);
    let st = s.vc.admin().state();
    let app = st.vm("a-app").unwrap();
    for r in &out.disks {
        assert!(
            r.new_file.starts_with("[ds-b] a-app/ferry-restore-"),
            "{r:?}"
        );
        let d = app.disks.iter().find(|d| d.key == r.new_disk_key).unwrap();
        assert_eq!(d.datastore, "ds-b");
        assert_eq!(d.storage_policy.as_deref(), Some(POLICY_ID));
        assert_eq!(d.key_provider.as_deref(), Some("KMS-A"));
        assert_eq!(
            s.digest("a-app", r.new_disk_key),
            s.digests[r.disk as usize]
        );
    }
    // The VM's own disk stays where it was, without a policy.
    assert_eq!(app.disks[0].datastore, "ds-a");
    assert_eq!(app.disks[0].storage_policy, None);
}

#[test]
fn a_datastore_that_cannot_take_the_disks_is_refused_before_any_change() {
    let s = setup();
    let disks_before = s.vc.admin().state().vm("a-app").unwrap().disks.len();
    let cases = [
        ("ds-nowhere", "no datastore of that name"),
        ("ds-far", "not mounted on host"),
        ("ds-b", "bytes free"),
    ];
    s.vc.admin()
        .set_datastore_free_space("ds-b", Some(1 << 20))
        .unwrap();
    for (ds, want) in cases {
        let opts = TargetOptions {
            datastore: Some(ds.into()),
            ..Default::default()
        };
        let (r, muts) = s.mutations(|| s.restore(&s.hotadd, &s.request("px-a-3", "a-app", opts)));
        let e = r.unwrap_err();
        assert!(
            matches!(&e, VmRestoreError::Datastore { datastore, .. } if datastore == ds),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(want) && msg.contains("a-app") && msg.contains("before any change"),
            "{msg}"
        );
        assert!(muts.is_empty(), "{ds}: {muts:?}");
    }
    // The VM's host mounts ds-a, ds-b, ds-shared: the refusal lists them.
    let e = s
        .restore(
            &s.hotadd,
            &s.request(
                "px-a-4",
                "a-app",
                TargetOptions {
                    datastore: Some("ds-far".into()),
                    ..Default::default()
                },
            ),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("ds-a, ds-b, ds-shared"), "{e}");
    assert_eq!(
        s.vc.admin().state().vm("a-app").unwrap().disks.len(),
        disks_before
    );
    s.nothing_left();
}

#[test]
fn a_running_vms_disks_are_never_overwritten() {
    let s = setup();
    let opts = TargetOptions {
        overwrite: true,
        ..Default::default()
    };
    for state in ["poweredOn", "suspended"] {
        s.vc.admin().set_power_state("a-web", state).unwrap();
        let (r, muts) =
            s.mutations(|| s.restore(&s.hotadd, &s.request("px-a-5", "a-web", opts.clone())));
        let e = r.unwrap_err();
        assert!(
            matches!(&e, VmRestoreError::PoweredOn { vm, power_state } if vm == "a-web" && power_state == state),
            "{e}"
        );
        let msg = e.to_string();
        for want in ["a-web", state, "power the VM off", "new disks"] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
        assert!(muts.is_empty(), "{muts:?}");
    }
    // Nothing was written: the guest's writes after the backup are still there.
    for d in &s.backup.disks {
        assert_ne!(s.digest("a-web", d.device_key), s.digests[d.disk as usize]);
    }
    s.nothing_left();
}

#[test]
fn a_powered_off_vm_is_overwritten_by_hotadd_and_gets_new_disks_by_nbd() {
    let s = setup();
    s.vc.admin().set_power_state("a-web", "poweredOff").unwrap();
    let before: Vec<i32> =
        s.vc.admin()
            .state()
            .vm("a-web")
            .unwrap()
            .disks
            .iter()
            .map(|d| d.key)
            .collect();
    let out = s
        .restore(
            &s.hotadd,
            &s.request(
                "px-a-6",
                "a-web",
                TargetOptions {
                    overwrite: true,
                    ..Default::default()
                },
            ),
        )
        .unwrap();
    for r in &out.disks {
        assert_eq!(r.mode, Mode::HotAdd);
        assert!(before.contains(&r.new_disk_key), "{r:?}");
        // Every byte: the guest's later writes are gone (zero chunks written too).
        assert_eq!(
            s.digest("a-web", r.new_disk_key),
            s.digests[r.disk as usize]
        );
    }
    assert_eq!(s.vc.admin().state().vm("a-web").unwrap().disks.len(), 2);
    s.nothing_left();

    // New disks into a powered-off VM are fine too.
    s.vc.admin().set_power_state("a-app", "poweredOff").unwrap();
    let out = s
        .restore(
            &s.nbd,
            &s.request("px-n-7", "a-app", TargetOptions::default()),
        )
        .unwrap();
    for r in &out.disks {
        assert_eq!(r.mode, Mode::NbdSsl);
        assert_eq!(
            s.digest("a-app", r.new_disk_key),
            s.digests[r.disk as usize]
        );
    }
}

#[test]
fn a_locked_disk_file_is_reported_with_the_file_the_vm_and_what_to_do() {
    let s = setup();
    s.vc.admin().set_power_state("a-web", "poweredOff").unwrap();
    let file = s.vc.admin().state().vm("a-web").unwrap().disks[0]
        .file_name
        .clone();
    s.vc.admin().set_file_lock(&file, Some("host esx-02.lab"));
    let opts = TargetOptions {
        overwrite: true,
        ..Default::default()
    };
    for (me, job) in [(&s.hotadd, "px-a-8"), (&s.nbd, "px-n-8")] {
        let e = s
            .restore(me, &s.request(job, "a-web", opts.clone()))
            .unwrap_err();
        match e.cause() {
            VmRestoreError::FileLocked {
                vm,
                file: f,
                message,
            } => {
                assert_eq!((vm.as_str(), f.as_str()), ("a-web", file.as_str()));
                assert!(message.contains("esx-02.lab"), "{message}");
            }
            other => panic!("{job}: {other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&file) && msg.contains("power off") && msg.contains("retry"),
            "{msg}"
        );
        s.nothing_left();
    }
    // Released: the same restore goes through.
    s.vc.admin().set_file_lock(&file, None);
    s.restore(&s.nbd, &s.request("px-n-9", "a-web", opts))
        .unwrap();
    s.nothing_left();
}

#[test]
fn the_dry_run_says_where_each_disk_goes_and_why_and_changes_nothing() {
    let s = setup();
    let opts = TargetOptions {
        datastore: Some("ds-b".into()),
        storage_policy: Some(POLICY_ID.into()),
        overwrite: false,
    };
    let (plan, muts) = s.mutations(|| s.plan(&s.hotadd, &s.request("px-a-10", "a-app", opts)));
    assert!(muts.is_empty(), "{muts:?}");
    assert!(plan.is_runnable(), "{plan:?}");
    assert_eq!(plan.vm, "a-app");
    assert_eq!(plan.power_state.as_deref(), Some("poweredOn"));
    assert_eq!(plan.disks.len(), 2);
    for d in &plan.disks {
        assert_eq!(d.action, DiskAction::New);
        assert_eq!(d.datastore, "ds-b");
        assert_eq!(d.datastore_reason, "from --datastore");
        assert_eq!(d.storage_policy.as_deref(), Some(POLICY_ID));
        assert_eq!(d.proxy.as_deref(), Some("px-a"));
        assert_eq!(d.mode, Some(Mode::HotAdd));
        assert!(d
            .target_file
            .starts_with("[ds-b] a-app/ferry-restore-px-a-10-disk"));
        assert!(!d.transport_reason.is_empty());
    }
    let text = plan.render();
    for want in [
        "NEW disk",
        "ds-b (from --datastore)",
        POLICY_ID,
        "hotadd through proxy px-a",
        "would run",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // The default datastore and why; an overwrite of the running VM is refused,
    // and the plan says so per disk and in the refusals.
    let (plan, muts) = s.mutations(|| {
        s.plan(
            &s.nbd,
            &s.request(
                "px-n-11",
                "a-web",
                TargetOptions {
                    overwrite: true,
                    ..Default::default()
                },
            ),
        )
    });
    assert!(muts.is_empty(), "{muts:?}");
    assert!(!plan.is_runnable());
    assert!(
        plan.refusals[0].contains("poweredOn"),
        "{:?}",
        plan.refusals
    );
    assert!(plan.disks.iter().all(|d| d.action == DiskAction::Overwrite
        && d.mode == Some(Mode::NbdSsl)
        && d.datastore == "ds-a"));
    let plan = s.plan(
        &s.nbd,
        &s.request("px-n-12", "a-app", TargetOptions::default()),
    );
    assert!(plan.is_runnable());
    assert!(
        plan.disks[0].datastore_reason.starts_with("default:"),
        "{:?}",
        plan.disks[0]
    );
    assert_eq!(plan.disks[0].datastore, "ds-a");
    // Nothing changed on vCenter at all.
    assert_eq!(s.vc.admin().state().vm("a-app").unwrap().disks.len(), 1);
    s.nothing_left();
}
