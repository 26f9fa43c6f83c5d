//! CBT incrementals end to end through ferry's SOAP client, the mock vCenter and the
//! mock ESXi (NBD-SSL): a full backup records each disk's changeId; after a guest
//! changes about 1% of a disk the next backup reads exactly the changed chunks,
//! stores about 1%, restores bit-identically to the disk at snapshot time, and
//! `ferry export` of that point matches it under `qemu-img compare`, `nbdcopy` and
//! `nbdinfo`. A CBT reset, a resized disk, a requested full backup and CBT off each
//! give a full read with the reason recorded in the outcome and the manifest.

mod common;

use common::{hash, text, World, CS};
use ferry::job::vm::{VmBackupOutcome, VmBackupRequest};
use ferry::repo::manifest::ReadMode;
use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

/// One unencrypted VM with CBT off, a disk of `mib` MiB (mixed: zero, text and
/// random regions) and an 8 MiB sparse one; ESXi reached by NBD-SSL.
fn vcenter(mib: u64, qcda_max_areas: usize) -> VcenterMock {
    let toml = format!(
        r#"
name = "cbt"
[[cluster]]
name = "C1"
[[host]]
name = "esx-01.lab"
cluster = "C1"
datastores = ["ds-1"]
[[datastore]]
name = "ds-1"
[[vm]]
name = "app"
host = "esx-01.lab"
datastore = "ds-1"
cbt = false
[[vm.disk]]
size_mib = {mib}
content = "mixed"
seed = 11
[[vm.disk]]
size_mib = 8
content = "sparse"
data_pct = 30
seed = 12
"#
    );
    let sc = ferry_mocks::vcenter::Scenario::parse(&toml, Path::new("cbt.toml")).unwrap();
    let mut o = VcenterOptions::new(sc);
    o.qcda_max_areas = qcda_max_areas;
    VcenterMock::start(o).unwrap()
}

type Env = common::vsphere::NbdWorld;

fn new_env(mib: u64, qcda_max_areas: usize) -> Env {
    Env::new(vcenter(mib, qcda_max_areas))
}

/// cbt.rs' own checks around the common world.
trait CbtEnv {
    fn request(&self, job: &str) -> VmBackupRequest;
    fn backup(&self, req: &VmBackupRequest) -> VmBackupOutcome;
    fn disk_image(&self, key: i32, name: &str) -> PathBuf;
    fn restores_to(&self, out: &VmBackupOutcome, images: &[&Path]);
}

impl CbtEnv for Env {
    fn request(&self, job: &str) -> VmBackupRequest {
        self.nbd_request(job, "app")
    }

    fn backup(&self, req: &VmBackupRequest) -> VmBackupOutcome {
        let out = self.backup_vm(req);
        let st = self.vc.admin().state();
        assert_eq!((st.snapshot_count(), st.open_nbd_exports), (0, 0), "{st:?}");
        // The outcome and the manifest record say the same.
        for (d, r) in out.disks.iter().zip(&out.report.disks) {
            assert_eq!((d.read, &d.read_reason), (r.read, &r.read_reason));
            assert_eq!(d.bytes_read, r.bytes_read);
            assert!(
                r.chunks_zero + r.chunks_new + r.chunks_unchanged <= r.chunks_total,
                "{r:?}"
            );
        }
        out
    }

    /// The live content of disk `key` (what the next snapshot freezes) as a file.
    fn disk_image(&self, key: i32, name: &str) -> PathBuf {
        let size = self
            .vc
            .admin()
            .state()
            .vm("app")
            .unwrap()
            .disks
            .iter()
            .find(|d| d.key == key)
            .unwrap()
            .capacity;
        let mut buf = vec![0u8; size as usize];
        self.vc
            .admin()
            .read("app", &key.to_string(), None, 0, &mut buf)
            .unwrap();
        let p = self.w.path(name);
        std::fs::write(&p, &buf).unwrap();
        p
    }

    /// Every disk of the point restores to exactly `images[disk]`.
    fn restores_to(&self, out: &VmBackupOutcome, images: &[&Path]) {
        for d in &out.disks {
            let target = self
                .w
                .path(&format!("restored-{}-{}", out.report.point_id, d.disk));
            self.w
                .restore(&out.report.point_id, d.disk, &target)
                .unwrap();
            assert_eq!(
                hash(&target),
                hash(images[d.disk as usize]),
                "disk {}",
                d.disk
            );
            std::fs::remove_file(&target).unwrap();
        }
    }
}

/// Chunk positions touched by guest writes `(offset, len)`.
fn chunks_of(writes: &[(u64, u64)]) -> BTreeSet<u64> {
    let cs = CS as u64;
    writes
        .iter()
        .flat_map(|&(o, l)| o / cs..(o + l).div_ceil(cs))
        .collect()
}

#[test]
fn one_percent_changed_reads_and_stores_about_one_percent_and_the_export_matches() {
    // Three areas per QueryChangedDiskAreas answer: the job must follow the pages.
    let env = new_env(128, 3);
    let size = 128 * MIB;
    let req = env.request("px-n-1");
    assert!(req.enable_cbt);
    let full = env.backup(&req);
    assert!(
        env.vc.admin().state().vm("app").unwrap().cbt,
        "CBT was enabled on request"
    );
    for (d, r) in full.disks.iter().zip(&full.report.disks) {
        assert_eq!(d.read, ReadMode::Full);
        assert_eq!(
            d.read_reason, "first backup: no earlier restore point of app",
            "{d:?}"
        );
        assert!(
            r.change_id.is_some(),
            "the first backup records the changeId"
        );
    }
    let before = env.disk_image(2000, "before.img");

    // The guest rewrites 1% of disk 0 in chunk-sized blocks, and makes two small
    // unaligned writes, one across a chunk boundary.
    let admin = env.vc.admin();
    let mut writes: Vec<(u64, u64)> = admin
        .write_random("app", "2000", 0.01, 7, CS as u64)
        .unwrap();
    let cs = CS as u64;
    for (off, len) in [(40 * cs + 12_345, 4096u64), (90 * cs - 100, 300)] {
        admin
            .write("app", "2000", off, &vec![0x5a; len as usize])
            .unwrap();
        writes.push((off, len));
    }
    let touched = chunks_of(&writes);
    let at_snapshot = env.disk_image(2000, "at-snapshot.img");
    let disk1 = env.disk_image(2001, "disk1.img");

    let inc = env.backup(&env.request("px-n-2"));
    assert_eq!(inc.report.parent.as_deref(), Some(&*full.report.point_id));
    let (d0, r0) = (&inc.disks[0], &inc.report.disks[0]);
    assert_eq!(d0.read, ReadMode::Cbt, "{d0:?}");
    assert!(
        d0.read_reason.contains(&full.report.point_id)
            && d0
                .read_reason
                .contains(full.report.disks[0].change_id.as_deref().unwrap()),
        "{}",
        d0.read_reason
    );
    // Bytes read: exactly the chunks the guest touched, about 1% of the disk.
    assert_eq!(d0.bytes_read, touched.len() as u64 * cs, "{touched:?}");
    let ratio = d0.bytes_read as f64 / size as f64;
    assert!(ratio <= 0.02, "read {:.2}% of the disk", ratio * 100.0);
    assert!(ratio >= 0.01, "read {:.2}% of the disk", ratio * 100.0);
    // CBT's answer covers the writes (64 KiB granularity) and nothing else.
    let changed = d0.changed_bytes.unwrap();
    assert!(changed >= writes.iter().map(|w| w.1).sum::<u64>() && changed <= d0.bytes_read);
    // Bytes stored: at most the chunks read (random data does not compress), ~1%.
    assert!(r0.chunks_new <= touched.len() as u64, "{r0:?}");
    assert!(
        r0.bytes_new_stored <= touched.len() as u64 * (cs + 64),
        "{r0:?}"
    );
    assert!(r0.bytes_new_stored as f64 / size as f64 <= 0.02, "{r0:?}");
    // Every untouched position with data was taken from the full point unread;
    // zero positions stay zero.
    let zeros = zero_chunks(&at_snapshot);
    assert_eq!(r0.chunks_zero, zeros.len() as u64, "{r0:?}");
    assert_eq!(
        r0.chunks_unchanged,
        r0.chunks_total - touched.union(&zeros).count() as u64,
        "{r0:?}"
    );
    // The untouched second disk read nothing at all.
    assert_eq!(inc.disks[1].read, ReadMode::Cbt);
    assert_eq!(inc.disks[1].bytes_read, 0);
    assert_eq!(inc.report.disks[1].chunks_new, 0);

    // Both points restore to what the VM held at their snapshot.
    env.restores_to(&inc, &[&at_snapshot, &disk1]);
    env.restores_to(&full, &[&before, &disk1]);
    let o = env.w.ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));

    // Instant access to the incremental point: qemu-img, nbdcopy and nbdinfo see
    // the source disk at snapshot time.
    let e = Exporter::start(&env.w, &inc.report.point_id);
    let uri = e.uri();
    let o = run(
        Command::new("qemu-img")
            .arg("compare")
            .arg("-f")
            .arg("raw")
            .arg(&at_snapshot)
            .arg(&uri),
        "qemu-img",
    );
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("identical"),
        "{}",
        text(&o)
    );
    let copy = env.w.path("nbdcopy.img");
    let o = run(
        Command::new("nbdcopy")
            .args(["--connections=2", &uri])
            .arg(&copy),
        "nbdcopy",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(hash(&copy), hash(&at_snapshot));
    let o = run(Command::new("nbdinfo").args(["--json", &uri]), "nbdinfo");
    assert!(o.status.success(), "{}", text(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"], size, "{info}");
    let o = run(
        Command::new("nbdinfo").args(["--map", "--json", &uri]),
        "nbdinfo",
    );
    assert!(o.status.success(), "{}", text(&o));
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let src = std::fs::read(&at_snapshot).unwrap();
    let (mut covered, mut holes) = (0u64, 0u64);
    for m in map.as_array().unwrap() {
        let (off, len, ty) = (
            m["offset"].as_u64().unwrap(),
            m["length"].as_u64().unwrap(),
            m["type"].as_u64().unwrap(),
        );
        assert_eq!(off, covered, "{map}");
        covered += len;
        if ty & 2 != 0 {
            holes += len;
            assert!(
                src[off as usize..(off + len) as usize]
                    .iter()
                    .all(|b| *b == 0),
                "a hole at {off}+{len} holds data in the source"
            );
        }
    }
    assert_eq!(covered, size);
    assert!(holes > 0, "the mixed disk has zero chunks");
    e.stop();
}

/// Chunk positions of an image that are all zero.
fn zero_chunks(img: &Path) -> BTreeSet<u64> {
    let data = std::fs::read(img).unwrap();
    data.chunks(CS as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().all(|b| *b == 0))
        .map(|(i, _)| i as u64)
        .collect()
}

#[test]
fn a_cbt_reset_reads_in_full_with_the_reason_and_the_next_backup_is_incremental_again() {
    let env = new_env(16, 1024);
    env.backup(&env.request("px-n-1"));
    let admin = env.vc.admin();
    admin.reset_cbt("app", "2000").unwrap();
    admin.write("app", "2000", 3 * MIB, &[7u8; 5000]).unwrap();
    let img0 = env.disk_image(2000, "d0.img");
    let img1 = env.disk_image(2001, "d1.img");

    let out = env.backup(&env.request("px-n-2"));
    let d0 = &out.disks[0];
    assert_eq!(d0.read, ReadMode::Full, "{d0:?}");
    assert!(
        d0.read_reason.contains("CBT cannot answer since changeId")
            && d0.read_reason.contains("FileFault"),
        "{}",
        d0.read_reason
    );
    assert!(d0.changed_bytes.is_none());
    assert!(
        d0.bytes_read > 8 * MIB,
        "a full read of the allocated data: {d0:?}"
    );
    // The other disk's CBT was not reset.
    assert_eq!(out.disks[1].read, ReadMode::Cbt, "{:?}", out.disks[1]);
    env.restores_to(&out, &[&img0, &img1]);

    // The changeId recorded by the full read starts the next incremental.
    admin.write("app", "2000", MIB, &[9u8; 100]).unwrap();
    let img0 = env.disk_image(2000, "d0b.img");
    let out = env.backup(&env.request("px-n-3"));
    assert_eq!(out.disks[0].read, ReadMode::Cbt, "{:?}", out.disks[0]);
    assert_eq!(out.disks[0].bytes_read, CS as u64);
    env.restores_to(&out, &[&img0, &img1]);
}

#[test]
fn a_resized_disk_a_requested_full_and_cbt_off_each_read_in_full_with_the_reason() {
    let env = new_env(16, 1024);
    // CBT off and not to be enabled: full, and said so.
    let mut req = env.request("px-n-1");
    req.enable_cbt = false;
    let out = env.backup(&req);
    for d in &out.disks {
        assert_eq!(d.read, ReadMode::Full);
        assert!(
            d.read_reason.contains("changed block tracking is off"),
            "{}",
            d.read_reason
        );
    }
    assert!(out.report.disks.iter().all(|r| r.change_id.is_none()));
    // Enabled now; the previous point has no changeId: full.
    let out = env.backup(&env.request("px-n-2"));
    for d in &out.disks {
        assert_eq!(d.read, ReadMode::Full);
        assert!(
            d.read_reason.contains("recorded no changeId"),
            "{}",
            d.read_reason
        );
    }
    // A full backup on request, though CBT could answer.
    let mut req = env.request("px-n-3");
    req.full = true;
    let out = env.backup(&req);
    for d in &out.disks {
        assert_eq!(
            (d.read, d.read_reason.as_str()),
            (ReadMode::Full, "a full backup was requested")
        );
    }
    assert!(out.report.disks.iter().all(|r| r.change_id.is_some()));
    // Grow disk 0 by 4 MiB (and write into the new space).
    let admin = env.vc.admin();
    admin.resize("app", "2000", 20 * MIB).unwrap();
    admin.write("app", "2000", 18 * MIB, &[1u8; 4096]).unwrap();
    let img0 = env.disk_image(2000, "grown.img");
    let img1 = env.disk_image(2001, "d1.img");
    let out = env.backup(&env.request("px-n-4"));
    assert_eq!(out.disks[0].read, ReadMode::Full);
    assert_eq!(
        out.disks[0].read_reason,
        format!(
            "disk resized: {} bytes in the previous restore point {}, {} now",
            16 * MIB,
            out.report.parent.as_deref().unwrap(),
            20 * MIB
        )
    );
    assert_eq!(out.disks[1].read, ReadMode::Cbt);
    env.restores_to(&out, &[&img0, &img1]);
}

fn run(cmd: &mut Command, what: &str) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("{what} must be installed ({e}); .ci/run installs it (apt-get install libnbd-bin qemu-utils)")
    })
}

/// A running `ferry export` of disk 0 of a point; killed if the test fails early.
struct Exporter {
    child: std::process::Child,
    info: serde_json::Value,
}

impl Exporter {
    fn start(w: &World, point: &str) -> Exporter {
        let mut child = w
            .command(&[
                "--json",
                "export",
                "--point",
                point,
                "--disk",
                "0",
                "--listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut acc = String::new();
        let info = loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                let o = child.wait_with_output().unwrap();
                panic!("ferry export ended early: {}\n{acc}", text(&o));
            }
            acc.push_str(&line);
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&acc) {
                break v;
            }
        };
        Exporter { child, info }
    }

    fn uri(&self) -> String {
        self.info["uri"].as_str().unwrap().to_string()
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child process by its pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ferry_backup_vm_prints_how_each_disk_was_read_and_why() {
    let env = new_env(16, 1024);
    let pw = env.w.path("vcenter.password");
    std::fs::write(&pw, format!("{}\n", env.vc.password())).unwrap();
    let port = env.port.to_string();
    let (url, ca) = (env.vc.url(), env.vc.ca_path().to_path_buf());
    let args = |json: bool| {
        let mut v: Vec<String> = Vec::new();
        if json {
            v.push("--json".into());
        }
        v.extend(
            [
                "--no-progress",
                "backup",
                "--vm",
                "app",
                "--vcenter-url",
                &url,
                "--vcenter-user",
                env.vc.user(),
                "--vcenter-password-file",
                pw.to_str().unwrap(),
                "--vcenter-ca",
                ca.to_str().unwrap(),
                "--mode",
                "nbdssl",
                "--nbd-port",
                &port,
                "--nbd-tls-certificates",
                env.certs.to_str().unwrap(),
                "--nbd-connections",
                "2",
                "--enable-cbt",
            ]
            .map(str::to_string),
        );
        v
    };
    let run_ferry = |json: bool| {
        let a = args(json);
        let o = env
            .w
            .ferry(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", text(&o));
        o
    };
    // --dry-run: the selection table, no snapshot, no point; refused → exit 1.
    // It needs neither the repository nor keys.
    let mut dry = args(false);
    dry.push("--dry-run".into());
    let o = env
        .w
        .command(&dry.iter().map(String::as_str).collect::<Vec<_>>())
        .env_remove("FERRY_REPO")
        .env_remove("FERRY_PUBLIC_KEY")
        .env_remove("FERRY_PRIVATE_KEY")
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        plan.contains("DECISION")
            && plan.contains("nbdssl")
            && plan.contains("[x]")
            && plan.contains("dry run: nothing was changed"),
        "{plan}"
    );
    let strict: Vec<String> = dry
        .iter()
        .map(|a| {
            if a == "nbdssl" {
                "hotadd".into()
            } else {
                a.clone()
            }
        })
        .chain(["--no-failover".to_string()])
        .collect();
    let o = env
        .w
        .ferry(&strict.iter().map(String::as_str).collect::<Vec<_>>());
    let plan = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(plan.contains("REFUSED"), "{plan}");
    assert_eq!(env.vc.admin().state().snapshot_count(), 0);
    assert!(
        env.w.repo().point_ids().unwrap().is_empty(),
        "a dry run stores nothing"
    );

    let o = run_ferry(false);
    let human = String::from_utf8_lossy(&o.stdout);
    assert!(
        human.contains("Hard disk 1 (key 2000): nbdssl read full")
            && human.contains("first backup: no earlier restore point of app"),
        "{human}"
    );
    env.vc
        .admin()
        .write("app", "2000", 5 * MIB + 1, &[3u8; 10])
        .unwrap();
    let o = run_ferry(true);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let first = env.w.repo().point_ids().unwrap()[0].clone();
    let d = &v["disks"];
    assert_eq!(d[0]["read"], "cbt", "{v}");
    assert!(
        d[0]["read_reason"].as_str().unwrap().contains(&first),
        "{v}"
    );
    assert_eq!(d[0]["bytes_read"], CS as u64, "{v}");
    assert_eq!(d[0]["changed_bytes"], 64 << 10, "one 64 KiB CBT block: {v}");
    assert_eq!(
        (&d[1]["read"], &d[1]["bytes_read"]),
        (&"cbt".into(), &0.into())
    );
    assert_eq!(v["report"]["disks"][0]["read"], "cbt");
    let st = env.vc.admin().state();
    assert_eq!(st.snapshot_count(), 0, "{st:?}");
}
