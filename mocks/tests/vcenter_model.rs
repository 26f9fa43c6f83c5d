//! The mock vCenter's disk model end to end through SOAP and the admin handle:
//! snapshots freeze content, guest writes go to deltas, removal consolidates
//! (byte-exact at every step), CBT reports exactly the changed blocks, the NBD ticket
//! provider serves the frozen disk, and hot-added devices show the frozen content.

mod vcenter_common;

use ferry_mocks::vcenter::{Admin, VcenterMock, VcenterOptions};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Duration;
use vcenter_common::Soap;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;

fn start(tweak: impl FnOnce(&mut VcenterOptions)) -> VcenterMock {
    let mut o = VcenterOptions::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small.toml"),
    )
    .unwrap();
    tweak(&mut o);
    VcenterMock::start(o).unwrap()
}

fn read_all(a: &Admin, vm: &str, disk: &str, snap: Option<&str>, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; size as usize];
    a.read(vm, disk, snap, 0, &mut b).unwrap();
    b
}

fn vm_id(mock: &VcenterMock, name: &str) -> String {
    mock.admin().state().vm(name).unwrap().moref.clone()
}

/// Random writes (some unaligned, some straddling blocks) applied to the disk and
/// to `model`; returns the written `(offset, len)`.
fn random_writes(
    a: &Admin,
    vm: &str,
    disk: &str,
    model: &mut [u8],
    seed: u64,
    n: usize,
) -> Vec<(u64, u64)> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let size = model.len() as u64;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = rng.gen_range(1..200_000u64);
        let off = rng.gen_range(0..size - len);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        a.write(vm, disk, off, &data).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        out.push((off, len));
    }
    out
}

fn disk_file(soap: &mut Soap, snap: &str, key: &str) -> (String, Option<String>, u64) {
    let d = soap
        .snapshot_disks(snap)
        .into_iter()
        .find(|d| d.text_of("key") == Some(key))
        .unwrap();
    let b = d.child("backing").unwrap();
    (
        b.text_of("fileName").unwrap().to_string(),
        b.text_of("changeId").map(str::to_string),
        d.text_of("capacityInBytes").unwrap().parse().unwrap(),
    )
}

#[test]
fn snapshots_freeze_writes_go_to_deltas_and_removal_consolidates() {
    let mock = start(|_| {});
    let a = mock.admin();
    let mut soap = Soap::new(&mock);
    soap.login();
    let vm = vm_id(&mock, "tenant-a-web");
    let size = 32 * MIB;
    let base = read_all(&a, "tenant-a-web", "2000", None, size);
    let s1 = soap.snapshot(&vm, "ferry-1");
    assert_eq!(
        disk_file(&mut soap, &s1, "2000").0,
        "[ds-tenant-a] tenant-a-web/tenant-a-web.vmdk"
    );
    let mut m1 = base.clone();
    random_writes(&a, "tenant-a-web", "2000", &mut m1, 1, 40);
    assert_eq!(read_all(&a, "tenant-a-web", "2000", Some(&s1), size), base);
    assert_eq!(read_all(&a, "tenant-a-web", "2000", None, size), m1);
    let folder = mock.state_dir().join("datastores/ds-tenant-a/tenant-a-web");
    assert_eq!(
        std::fs::read(folder.join("tenant-a-web.vmdk")).unwrap(),
        base,
        "the base file is not written while a snapshot exists"
    );

    let s2 = soap.snapshot(&vm, "ferry-2");
    assert_eq!(
        disk_file(&mut soap, &s2, "2000").0,
        "[ds-tenant-a] tenant-a-web/tenant-a-web-000001.vmdk"
    );
    let mut m2 = m1.clone();
    random_writes(&a, "tenant-a-web", "2000", &mut m2, 2, 40);
    let live = soap
        .fetch(("VirtualMachine", &vm), "config.hardware.device")
        .unwrap()
        .unwrap();
    let live_file = live
        .children
        .iter()
        .find(|d| d.text_of("key") == Some("2000"))
        .and_then(|d| d.child("backing"))
        .and_then(|b| b.text_of("fileName"))
        .unwrap()
        .to_string();
    assert_eq!(
        live_file,
        "[ds-tenant-a] tenant-a-web/tenant-a-web-000002.vmdk"
    );
    assert_eq!(read_all(&a, "tenant-a-web", "2000", Some(&s1), size), base);
    assert_eq!(read_all(&a, "tenant-a-web", "2000", Some(&s2), size), m1);
    assert_eq!(read_all(&a, "tenant-a-web", "2000", None, size), m2);

    // Removing the older snapshot merges its delta into the base file, which the
    // remaining snapshot now freezes; contents do not move.
    soap.remove(&s1).unwrap();
    assert_eq!(
        disk_file(&mut soap, &s2, "2000").0,
        "[ds-tenant-a] tenant-a-web/tenant-a-web.vmdk"
    );
    assert!(!folder.join("tenant-a-web-000001.vmdk").exists());
    assert_eq!(read_all(&a, "tenant-a-web", "2000", Some(&s2), size), m1);
    assert_eq!(read_all(&a, "tenant-a-web", "2000", None, size), m2);
    soap.remove(&s2).unwrap();
    assert_eq!(read_all(&a, "tenant-a-web", "2000", None, size), m2);
    assert_eq!(std::fs::read(folder.join("tenant-a-web.vmdk")).unwrap(), m2);
    let mut files: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["tenant-a-web.vmdk", "tenant-a-web_1.vmdk"]);
    // Still sparse: the zero regions of the generated content were never written.
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(folder.join("tenant-a-web.vmdk")).unwrap();
    assert!(md.blocks() * 512 < md.len(), "the base file stays sparse");
    assert_eq!(mock.admin().state().snapshot_count(), 0);
}

#[test]
fn cbt_reports_exactly_the_changed_blocks_and_resets() {
    let mock = start(|o| o.qcda_max_areas = 3);
    let a = mock.admin();
    let mut soap = Soap::new(&mock);
    soap.login();
    let vm = vm_id(&mock, "tenant-a-web");
    let size = 32 * MIB;
    let s1 = soap.snapshot(&vm, "ferry-1");
    let (_, c1, cap) = disk_file(&mut soap, &s1, "2000");
    let c1 = c1.expect("CBT is on: the snapshot disk has a changeId");
    let (_, c1b, _) = disk_file(&mut soap, &s1, "2001");
    assert_eq!(cap, size);
    let mut model = read_all(&a, "tenant-a-web", "2000", None, size);
    let writes = random_writes(&a, "tenant-a-web", "2000", &mut model, 7, 25);
    let s2 = soap.snapshot(&vm, "ferry-2");
    // Expected: every 64 KiB block a write touched, merged.
    let mut blocks = std::collections::BTreeSet::new();
    for (off, len) in &writes {
        blocks.extend(off / BLOCK..=(off + len - 1) / BLOCK);
    }
    let mut expect: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match expect.last_mut() {
            Some((s, l)) if *s + *l == b * BLOCK => *l += BLOCK,
            _ => expect.push((b * BLOCK, BLOCK)),
        }
    }
    let (got, calls) = soap.changed_areas(&vm, &s2, 2000, &c1, size).unwrap();
    assert_eq!(got, expect);
    assert!(calls > 1, "3 areas per answer: the client pages");
    // The other disk did not change.
    let (none, _) = soap
        .changed_areas(&vm, &s2, 2001, c1b.as_deref().unwrap(), 8 * MIB)
        .unwrap();
    assert!(none.is_empty());
    // "*" covers every changed block, and whatever it leaves out reads as zeros.
    let (star, _) = soap.changed_areas(&vm, &s2, 2000, "*", size).unwrap();
    for (s, l) in &expect {
        assert!(star.iter().any(|(a, b)| a <= s && s + l <= a + b));
    }
    let frozen = read_all(&a, "tenant-a-web", "2000", Some(&s2), size);
    assert_eq!(frozen, model);
    let mut pos = 0u64;
    for (s, l) in star.iter().chain(std::iter::once(&(size, 0))) {
        assert!(frozen[pos as usize..*s as usize].iter().all(|b| *b == 0));
        pos = s + l;
    }

    // A CBT reset invalidates every earlier changeId.
    a.reset_cbt("tenant-a-web", "2000").unwrap();
    let e = soap.changed_areas(&vm, &s2, 2000, &c1, size).unwrap_err();
    assert_eq!(e.ty, "FileFault", "{}", e.message);
    assert!(e.message.contains("CBT was reset"), "{}", e.message);
    // Resize: refused with snapshots, then grows the disk and resets CBT.
    let e = a.resize("tenant-a-web", "2000", 48 * MIB).unwrap_err();
    assert!(e.to_string().contains("InvalidState"), "{e}");
    soap.remove(&s1).unwrap();
    soap.remove(&s2).unwrap();
    let s3 = soap.snapshot(&vm, "ferry-3");
    let (_, c3, _) = disk_file(&mut soap, &s3, "2000");
    soap.remove(&s3).unwrap();
    a.resize("tenant-a-web", "2000", 48 * MIB).unwrap();
    let s4 = soap.snapshot(&vm, "ferry-4");
    let (_, _, cap4) = disk_file(&mut soap, &s4, "2000");
    assert_eq!(cap4, 48 * MIB);
    let e = soap
        .changed_areas(&vm, &s4, 2000, c3.as_deref().unwrap(), cap4)
        .unwrap_err();
    assert_eq!(e.ty, "FileFault");
    let (star, _) = soap.changed_areas(&vm, &s4, 2000, "*", cap4).unwrap();
    assert!(
        star.iter().all(|(s, l)| s + l <= 32 * MIB),
        "the new space is empty"
    );
    // A disk with CBT off.
    let plain = vm_id(&mock, "plain-app");
    let sp = soap.snapshot(&plain, "p");
    let e = soap
        .changed_areas(&plain, &sp, 2000, "*", 16 * MIB)
        .unwrap_err();
    assert_eq!(e.ty, "FileFault");
    assert!(e.message.contains("not enabled"), "{}", e.message);
    // Unknown device key, offsets outside the disk.
    assert_eq!(
        soap.changed_areas(&plain, &sp, 2999, "*", 1)
            .unwrap_err()
            .ty,
        "InvalidArgument"
    );
    soap.remove(&sp).unwrap();
    soap.remove(&s4).unwrap();
    // Enabling CBT through ReconfigVM gives the disk a changeId.
    soap.task(
        "ReconfigVM_Task",
        ("VirtualMachine", &plain),
        "<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>",
    )
    .unwrap();
    let sp = soap.snapshot(&plain, "p2");
    let (_, cid, _) = disk_file(&mut soap, &sp, "2000");
    assert!(cid.is_some());
    soap.changed_areas(&plain, &sp, 2000, "*", 16 * MIB)
        .unwrap();
    soap.remove(&sp).unwrap();
}

#[test]
fn ticket_provider_serves_the_frozen_disk() {
    let mock = start(|o| o.remove_wait = Duration::from_millis(300));
    let a = mock.admin();
    let mut soap = Soap::new(&mock);
    soap.login();
    let vm = vm_id(&mock, "tenant-b-db");
    let host = soap
        .fetch(("VirtualMachine", &vm), "runtime.host")
        .unwrap()
        .unwrap()
        .text
        .clone();
    let size = 32 * MIB;
    let s = soap.snapshot(&vm, "ferry-nbd");
    a.write("tenant-b-db", "2000", 3 * MIB + 5, b"after the snapshot")
        .unwrap();
    let t = soap.ticket(&host, &vm, &s, 2000).unwrap();
    let id = t.text_of("id").unwrap().to_string();
    assert_eq!(t.text_of("hostName"), Some("127.0.0.1"));
    let provider = mock.export_provider();
    let backend = provider.open(&id).unwrap();
    assert_eq!(backend.size(), size);
    let frozen = read_all(&a, "tenant-b-db", "2000", Some(&s), size);
    let live = read_all(&a, "tenant-b-db", "2000", None, size);
    assert_ne!(frozen, live);
    let mut got = vec![0u8; size as usize];
    for (i, chunk) in got.chunks_mut(3 * 1000 * 1000).enumerate() {
        backend.read_at(i as u64 * 3_000_000, chunk).unwrap();
    }
    assert_eq!(got, frozen, "NBD reads return the frozen content");
    // Block status: runs cover the disk; data runs are the allocated areas ("*").
    let runs = backend.block_status(0, size).unwrap();
    assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), size);
    let mut pos = 0;
    let mut data = Vec::new();
    for (len, flags) in runs {
        if flags == 0 {
            data.push((pos, len));
        } else {
            assert_eq!(flags, 3, "holes read as zeros");
            assert!(frozen[pos as usize..(pos + len) as usize]
                .iter()
                .all(|b| *b == 0));
        }
        pos += len;
    }
    let (star, _) = soap.changed_areas(&vm, &s, 2000, "*", size).unwrap();
    assert_eq!(data, star);

    // Refusals: unknown names, bad ticket requests.
    assert!(provider.open("not-a-ticket").is_err());
    assert_eq!(
        soap.ticket("host-1", &vm, &s, 2000).unwrap_err().ty,
        "InvalidArgument"
    );
    assert_eq!(
        soap.ticket(&host, &vm, &s, 4242).unwrap_err().ty,
        "InvalidArgument"
    );
    assert_eq!(
        soap.ticket(&host, &vm, "snapshot-999999", 2000)
            .unwrap_err()
            .ty,
        "InvalidArgument"
    );

    // The snapshot cannot be removed while its disk is read over NBD.
    assert_eq!(mock.admin().state().open_nbd_exports, 1);
    let (ty, msg) = soap.remove(&s).unwrap_err();
    assert_eq!(ty, "FileLocked", "{msg}");
    drop(backend);
    soap.remove(&s).unwrap();
    let e = provider.open(&id).err().unwrap();
    assert!(e.0.contains("unknown or expired"), "{e}");

    // Expired tickets are refused.
    let s = soap.snapshot(&vm, "ferry-nbd-2");
    let id = soap
        .ticket(&host, &vm, &s, 2000)
        .unwrap()
        .text_of("id")
        .unwrap()
        .to_string();
    assert_eq!(a.expire_tickets(), 1);
    assert!(provider.open(&id).is_err());
    soap.remove(&s).unwrap();
    assert_eq!(mock.admin().state().open_nbd_exports, 0);
}

#[test]
fn hot_added_devices_show_the_frozen_content() {
    let mock = start(|_| {});
    let a = mock.admin();
    let mut soap = Soap::new(&mock);
    soap.login();
    let vm = vm_id(&mock, "tenant-a-web");
    let proxy = vm_id(&mock, "proxy-a");
    let dev = mock.device_dir("proxy-a").unwrap();
    let s1 = soap.snapshot(&vm, "ferry-1");
    a.write("tenant-a-web", "2000", 7 * MIB, &[0x5a; 100_000])
        .unwrap();
    let s2 = soap.snapshot(&vm, "ferry-2");
    a.write("tenant-a-web", "2000", 7 * MIB, &[0x11; 10])
        .unwrap();
    // s2 freezes base + one delta: the device is a flattened copy; s1's second disk
    // is the base file alone: the device points at it.
    let (f2, _, _) = disk_file(&mut soap, &s2, "2000");
    let (f1b, _, _) = disk_file(&mut soap, &s1, "2001");
    soap.hot_add(&proxy, &f2).unwrap();
    soap.hot_add(&proxy, &f1b).unwrap();
    let devices = soap
        .fetch(("VirtualMachine", &proxy), "config.hardware.device")
        .unwrap()
        .unwrap();
    let added: Vec<(i32, String, String)> = devices
        .children
        .iter()
        .filter(|d| d.xsi_type() == Some("VirtualDisk"))
        .filter_map(|d| {
            let b = d.child("backing")?;
            (b.text_of("diskMode") == Some("independent_nonpersistent")).then(|| {
                (
                    d.text_of("key").unwrap().parse().unwrap(),
                    b.text_of("fileName").unwrap().to_string(),
                    b.text_of("uuid").unwrap().to_string(),
                )
            })
        })
        .collect();
    assert_eq!(added.len(), 2);
    assert_eq!((added[0].0, added[1].0), (2001, 2002));
    for (key, file, uuid) in &added {
        let entry = dev.join(uuid.replace('-', "").to_lowercase());
        let (disk, snap, size) = if file == &f2 {
            ("2000", &s2, 32 * MIB)
        } else {
            ("2001", &s1, 8 * MIB)
        };
        assert_eq!(
            std::fs::read(&entry).unwrap(),
            read_all(&a, "tenant-a-web", disk, Some(snap), size),
            "device {key} holds the frozen content"
        );
    }
    let flat: Vec<_> = std::fs::read_dir(mock.state_dir().join("hotadd"))
        .unwrap()
        .collect();
    assert_eq!(flat.len(), 1, "one flattened copy for the two-layer chain");
    soap.detach(&proxy, 2001).unwrap();
    soap.detach(&proxy, 2002).unwrap();
    assert_eq!(std::fs::read_dir(&dev).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(mock.state_dir().join("hotadd"))
            .unwrap()
            .count(),
        0
    );
    // Detaching something that is not hot-added is refused.
    let (ty, _) = soap.detach(&proxy, 2000).unwrap_err();
    assert_eq!(ty, "NotSupported");
    let (ty, _) = soap.detach(&proxy, 2077).unwrap_err();
    assert_eq!(ty, "InvalidDeviceSpec");
    soap.remove(&s2).unwrap();
    soap.remove(&s1).unwrap();
    let st = mock.admin().state();
    assert_eq!(st.snapshot_count() + st.attached_count(), 0);
}
