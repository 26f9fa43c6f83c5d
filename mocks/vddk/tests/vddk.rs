//! The mock VDDK (`libvixDiskLib.so`), dlopened as ferry's loader does and driven
//! against a running mock vCenter: hot-add and NBD(-SSL) reads equal the snapshot's
//! content, VDDK's refusals and their error codes (cross-provider hot-add, clear NBD
//! of an encrypted disk, wrong thumbprint, dead session, missing snapshot or disk,
//! writes to a read-only handle, a writable hot-add without a snapshot, mixed
//! sync/async I/O), writes of a snapshot's base disk by hot-add, QueryAllocatedBlocks and its
//! chunk rules, fault injection, Cleanup of leftovers, the call log and the audit log.

mod common;

use common::*;
use ferry_mocks::vcenter::VddkFault;
use std::time::{Duration, Instant};

fn expected(w: &World, vm: &str, disk: &str, snap: &str) -> Vec<u8> {
    let a = w.mock.admin();
    let (_, size) = a.digest(vm, disk, Some(snap)).unwrap();
    let mut buf = vec![0u8; size as usize];
    a.read(vm, disk, Some(snap), 0, &mut buf).unwrap();
    buf
}

fn read_all(v: &Vddk, h: *mut std::ffi::c_void, cap: u64) -> Vec<u8> {
    let mut out = vec![0u8; cap as usize];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        let r = v.read(h, (i as u64) << 11, chunk);
        assert_eq!(r, VIX_OK, "{}", v.error_text(r));
    }
    out
}

#[test]
fn exports_every_symbol_and_the_library_runs_without_init_errors() {
    let _g = serial();
    let v = Vddk::load();
    for s in SYMBOLS {
        assert!(v.has(s), "{s} is not exported");
    }
    assert_eq!(v.transport_modes(), "hotadd:nbdssl:nbd");
    let t = v.error_text(13003);
    assert!(
        t.contains("VIX_E_SNAPSHOT_NOTFOUND") && t.contains("snapshot does not exist"),
        "{t}"
    );
    assert!(v
        .error_text(26000)
        .contains("VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED"));
    assert!(v.error_text(1 | (7 << 32)).starts_with("VIX_E_FAIL (1)"));
}

#[test]
fn transports_refusals_allocation_and_logs() {
    let _g = serial();
    let w = World::start();
    let a = w.mock.admin();
    let thumb = w.mock.thumbprint().to_string();
    assert_eq!(thumb.len(), 59, "{thumb}");
    let enc_a = w.moref("enc-a");
    let enc_a_disk = w.disk_file("enc-a", 0);
    let enc_a_sparse = w.disk_file("enc-a", 1);
    let enc_b_disk = w.disk_file("enc-b", 0);
    let plain_disk = w.disk_file("plain", 0);
    let far_disk = w.disk_file("far", 0);
    let snap_a = w.snapshot("enc-a");
    let snap_b = w.snapshot("enc-b");
    let snap_plain = w.snapshot("plain");
    let snap_far = w.snapshot("far");
    // Guest writes after the snapshot must not show through it.
    a.write("enc-a", "2000", 0, &[0xEE; 4096]).unwrap();
    let want = expected(&w, "enc-a", "2000", &snap_a);
    assert_ne!(&want[..4096], &[0xEE; 4096][..]);

    let (cfg, log) = w.config(Some("proxy-a"), "proxy-a");
    let v = Vddk::load();
    assert_eq!(v.init(Some(&cfg)), VIX_OK);
    let p = v.params(
        "127.0.0.1",
        w.port(),
        Some(&thumb.to_lowercase()),
        &w.cookie,
        &enc_a,
    );
    assert_eq!(v.prepare(&p, false), VIX_OK);

    // HotAdd from a proxy under the same key provider: attached, read locally.
    let conn = v.connect(&p, true, Some(&snap_a), "hotadd").unwrap();
    let h = v.open(conn, &enc_a_disk, FLAG_READ_ONLY).unwrap();
    assert_eq!(v.mode(h), "hotadd");
    let info = v.info(h);
    assert_eq!(info.capacity_sectors * 512, want.len() as u64);
    assert_eq!((info.logical, info.physical, info.num_links), (512, 512, 1));
    assert!(info.uuid.starts_with("6000C29"), "{info:?}");
    let st = a.state();
    let attached = &st.vm("proxy-a").unwrap().attached;
    assert_eq!(attached.len(), 1);
    assert_eq!(attached[0].source_snapshot, snap_a);
    assert!(
        read_all(&v, h, want.len() as u64) == want,
        "hotadd read differs from the snapshot"
    );
    // Read-only: writes refused.
    let r = v.write(h, 0, &[0u8; 512]);
    assert_eq!(r, VIX_E_FILE_READ_ONLY, "{}", v.error_text(r));
    // Out of range.
    let mut one = [0u8; 512];
    assert_eq!(
        v.read(h, info.capacity_sectors, &mut one),
        VIX_E_DISK_OUTOFRANGE
    );
    // Sync then async on one handle: mixed mode.
    let (r, cb) = v.read_async(h, 0, &mut one);
    assert_eq!((r, cb), (VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED, None));
    assert_eq!(v.close(h), VIX_OK);
    assert_eq!(a.state().attached_count(), 0, "Close detaches");
    assert_eq!(v.disconnect(conn), VIX_OK);

    // NBD-SSL of the same disk, async only: equal bytes.
    let conn = v.connect(&p, true, Some(&snap_a), "nbdssl").unwrap();
    let h = v.open(conn, &enc_a_disk, FLAG_READ_ONLY).unwrap();
    assert_eq!(v.mode(h), "nbdssl");
    let mut got = vec![0u8; want.len()];
    for (i, c) in got.chunks_mut(1 << 20).enumerate() {
        assert_eq!(
            v.read_async(h, (i as u64) << 11, c),
            (VIX_ASYNC, Some(VIX_OK))
        );
    }
    assert!(got == want, "nbdssl read differs from the snapshot");
    assert_eq!(v.read(h, 0, &mut one), VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED);
    assert_eq!(a.state().attached_count(), 0, "NBD attaches nothing");
    assert_eq!(v.close(h), VIX_OK);

    // QueryAllocatedBlocks on the sparse disk, answered from the snapshot's allocation.
    let h = v.open(conn, &enc_a_sparse, FLAG_READ_ONLY).unwrap();
    let sparse = expected(&w, "enc-a", "2001", &snap_a);
    let sectors = sparse.len() as u64 / 512;
    let blocks = v.allocated(h, 0, sectors, 128).unwrap();
    let alloc: u64 = blocks.iter().map(|b| b.1).sum();
    assert!(alloc > 0 && alloc < sectors, "{blocks:?}");
    for (i, chunk) in sparse.chunks(65536).enumerate() {
        if chunk.iter().any(|b| *b != 0) {
            let s = i as u64 * 128;
            assert!(
                blocks.iter().any(|(o, l)| *o <= s && s < o + l),
                "chunk {i} holds data but is not reported allocated"
            );
        }
    }
    for (o, l) in &blocks {
        assert!(o % 128 == 0 && l % 128 == 0 && *l > 0);
    }
    // Bigger chunks cover the same data; a window is clipped to itself.
    let big = v.allocated(h, 0, sectors, 2048).unwrap();
    assert!(big.iter().map(|b| b.1).sum::<u64>() >= alloc);
    for (o, l) in v.allocated(h, 2048, 2048, 128).unwrap() {
        assert!(o >= 2048 && o + l <= 4096);
    }
    // Chunk rules of §3.1.
    for (s, n, c) in [
        (0, 128, 64),
        (64, 128, 128),
        (0, 100, 128),
        (0, 128 * 524_289, 128),
    ] {
        let r = v.allocated(h, s, n, c).unwrap_err();
        assert_eq!(r, VIX_E_INVALID_ARG, "({s}, {n}, {c})");
    }
    assert_eq!(v.close(h), VIX_OK);
    assert_eq!(v.disconnect(conn), VIX_OK);

    // Cross-provider hot-add (KMS-B disk, KMS-A proxy): VIX_E_FAIL, crypto fault.
    let pb = v.params(
        "127.0.0.1",
        w.port(),
        Some(&thumb),
        &w.cookie,
        &w.moref("enc-b"),
    );
    let conn = v.connect(&pb, true, Some(&snap_b), "hotadd").unwrap();
    let r = v.open(conn, &enc_b_disk, FLAG_READ_ONLY).unwrap_err();
    assert_eq!(r, VIX_E_FAIL);
    let t = v.error_text(r);
    assert!(
        t.contains("Cannot use mode hotadd") && t.contains("key provider"),
        "{t}"
    );
    assert_eq!(a.state().attached_count(), 0);
    v.disconnect(conn);
    // Clear-text NBD of an encrypted disk: refused; NBD-SSL of it works.
    let conn = v.connect(&pb, true, Some(&snap_b), "nbd").unwrap();
    let r = v.open(conn, &enc_b_disk, FLAG_READ_ONLY).unwrap_err();
    assert_eq!(r, VIX_E_FAIL);
    assert!(v.error_text(r).contains("Cannot use mode nbd"));
    v.disconnect(conn);
    let conn = v.connect(&pb, true, Some(&snap_b), "nbdssl").unwrap();
    let h = v.open(conn, &enc_b_disk, FLAG_READ_ONLY).unwrap();
    let want_b = expected(&w, "enc-b", "2000", &snap_b);
    assert!(read_all(&v, h, want_b.len() as u64) == want_b);
    v.close(h);
    v.disconnect(conn);
    v.free_params(pb);

    // Clear NBD of an unencrypted disk is fine; hot-add of it to the KMS-A proxy too.
    let pp = v.params(
        "127.0.0.1",
        w.port(),
        Some(&thumb),
        &w.cookie,
        &w.moref("plain"),
    );
    let want_p = expected(&w, "plain", "2000", &snap_plain);
    for mode in ["nbd", "hotadd"] {
        let conn = v.connect(&pp, true, Some(&snap_plain), mode).unwrap();
        let h = v.open(conn, &plain_disk, FLAG_READ_ONLY).unwrap();
        assert_eq!(v.mode(h), mode);
        assert!(read_all(&v, h, want_p.len() as u64) == want_p, "{mode}");
        assert_eq!(v.close(h), VIX_OK);
        v.disconnect(conn);
    }
    v.free_params(pp);
    // A datastore the proxy's host cannot see: hot-add refused with VIX_E_FAIL.
    let pf = v.params(
        "127.0.0.1",
        w.port(),
        Some(&thumb),
        &w.cookie,
        &w.moref("far"),
    );
    let conn = v.connect(&pf, true, Some(&snap_far), "hotadd").unwrap();
    let r = v.open(conn, &far_disk, FLAG_READ_ONLY).unwrap_err();
    assert_eq!(r, VIX_E_FAIL);
    assert!(
        v.error_text(r).contains("not accessible"),
        "{}",
        v.error_text(r)
    );
    v.disconnect(conn);
    v.free_params(pf);

    assert_eq!(v.prepare(&p, true), VIX_OK);
    v.free_params(p);
    v.exit();

    // The audit log: no encrypted disk hot-added to a proxy under another provider,
    // none over clear-text NBD; the refusals are there.
    let audit = a.vddk_audit();
    for e in &audit {
        if e.vix == 0 && e.encrypted && e.op == "hotadd" {
            assert_eq!(e.disk_key_provider, e.proxy_key_provider, "{e:?}");
        }
        if e.vix == 0 && e.encrypted && e.op == "open" {
            assert_ne!(e.mode, "nbd", "{e:?}");
        }
    }
    let hotadds: Vec<_> = audit.iter().filter(|e| e.op == "hotadd").collect();
    assert_eq!(hotadds.len(), 2, "enc-a and plain");
    assert_eq!(audit.iter().filter(|e| e.op == "detach").count(), 2);
    assert!(audit.iter().any(|e| e.op == "refused"
        && e.mode == "hotadd"
        && e.disk_key_provider.as_deref() == Some("KMS-B")));
    assert!(audit
        .iter()
        .any(|e| e.op == "refused" && e.mode == "nbd" && e.encrypted));
    assert!(
        audit.iter().any(|e| e.op == "prepare-access")
            && audit.iter().any(|e| e.op == "end-access")
    );

    // The call log proves which transport carried which disk.
    let calls = calls(&log);
    let reads = |mode: &str, path: &str| {
        calls
            .iter()
            .filter(|c| {
                (c["fn"] == "VixDiskLib_Read" || c["fn"] == "VixDiskLib_ReadAsync")
                    && c["mode"] == mode
                    && c["path"] == path
                    && c["result"] == 0
            })
            .count()
    };
    assert_eq!(reads("hotadd", &enc_a_disk), 4);
    assert_eq!(reads("nbdssl", &enc_a_disk), 4);
    assert_eq!(reads("nbdssl", &enc_b_disk), 4);
    assert_eq!(reads("nbd", &enc_b_disk), 0);
    assert_eq!(reads("hotadd", &enc_b_disk), 0);
    assert_eq!(reads("nbd", &plain_disk), 4);
    let opens: Vec<_> = calls
        .iter()
        .filter(|c| c["fn"] == "VixDiskLib_Open")
        .collect();
    assert!(opens
        .iter()
        .any(|c| c["path"] == enc_b_disk.as_str() && c["result"] == 1));
    assert!(calls.iter().any(|c| c["fn"] == "VixDiskLib_InitEx"));
    assert_eq!(calls.last().unwrap()["fn"], "VixDiskLib_Exit");
}

#[test]
fn thumbprint_session_snapshot_and_disk_errors() {
    let _g = serial();
    let w = World::start();
    let thumb = w.mock.thumbprint().to_string();
    let vm = w.moref("plain");
    let disk = w.disk_file("plain", 0);
    let snap = w.snapshot("plain");
    let (cfg, _log) = w.config(Some("proxy-plain"), "errors");
    let v = Vddk::load();
    assert_eq!(v.init(Some(&cfg)), VIX_OK);

    // Wrong thumbprint: ConnectEx works, Open fails with VIX_E_FAIL.
    let wrong = thumb.replace(&thumb[..2], if &thumb[..2] == "00" { "01" } else { "00" });
    let p = v.params("127.0.0.1", w.port(), Some(&wrong), &w.cookie, &vm);
    let conn = v.connect(&p, true, Some(&snap), "nbdssl").unwrap();
    let r = v.open(conn, &disk, FLAG_READ_ONLY).unwrap_err();
    assert_eq!(r, VIX_E_FAIL);
    assert!(v.error_text(r).contains("thumbprint"));
    v.disconnect(conn);
    v.free_params(p);
    // No thumbprint at all is a mismatch too.
    let p = v.params("127.0.0.1", w.port(), None, &w.cookie, &vm);
    let conn = v.connect(&p, true, Some(&snap), "nbdssl").unwrap();
    assert_eq!(v.open(conn, &disk, FLAG_READ_ONLY).unwrap_err(), VIX_E_FAIL);
    v.disconnect(conn);
    v.free_params(p);

    let p = v.params("localhost", w.port(), Some(&thumb), &w.cookie, &vm);
    // Missing snapshot, missing disk.
    let conn = v
        .connect(&p, true, Some("snapshot-999999"), "nbdssl")
        .unwrap();
    assert_eq!(
        v.open(conn, &disk, FLAG_READ_ONLY).unwrap_err(),
        VIX_E_SNAPSHOT_NOTFOUND
    );
    v.disconnect(conn);
    let conn = v.connect(&p, true, Some(&snap), "nbdssl").unwrap();
    let r = v
        .open(conn, "[ds-shared] plain/nope.vmdk", FLAG_READ_ONLY)
        .unwrap_err();
    assert_eq!(r, VIX_E_FILE_NOT_FOUND);
    // A read-only *connection* makes Open read-only whatever the flags.
    let h = v.open(conn, &disk, 0).unwrap();
    assert_eq!(v.write(h, 0, &[1u8; 512]), VIX_E_FILE_READ_ONLY);
    v.close(h);
    v.disconnect(conn);

    // Dead session: ConnectEx refused; an existing connection's Open too.
    let conn = v.connect(&p, true, Some(&snap), "nbdssl").unwrap();
    assert!(w.mock.admin().expire_sessions() >= 1);
    let r = v.open(conn, &disk, FLAG_READ_ONLY).unwrap_err();
    assert_eq!(r, VIX_E_HOST_USER_PERMISSIONS, "{}", v.error_text(r));
    v.disconnect(conn);
    assert_eq!(
        v.connect(&p, true, Some(&snap), "nbdssl").unwrap_err(),
        VIX_E_HOST_USER_PERMISSIONS
    );
    v.free_params(p);

    // Bad handles and NULLs never crash.
    assert_eq!(v.close(std::ptr::null_mut()), VIX_E_INVALID_HANDLE);
    let mut b = [0u8; 512];
    assert_eq!(
        v.read(std::ptr::without_provenance_mut(0x12345), 0, &mut b),
        VIX_E_INVALID_HANDLE
    );
    assert_eq!(v.mode(std::ptr::null_mut()), "");
    let audit = w.mock.admin().vddk_audit();
    assert!(audit.iter().any(|e| e.op == "refused" && e.vix == 13003));
    assert!(audit.iter().any(|e| e.op == "refused" && e.vix == 3014));
    v.exit();
}

#[test]
fn faults_restore_writes_and_cleanup() {
    let _g = serial();
    let w = World::start();
    let a = w.mock.admin();
    let thumb = w.mock.thumbprint().to_string();
    let vm = w.moref("plain");
    let disk = w.disk_file("plain", 0);
    let snap = w.snapshot("plain");
    let (cfg, _log) = w.config(Some("proxy-plain"), "faults");
    let v = Vddk::load();
    assert_eq!(v.init(Some(&cfg)), VIX_OK);
    let p = v.params("127.0.0.1", w.port(), Some(&thumb), &w.cookie, &vm);
    let mut buf = vec![0u8; 1 << 20];

    for mode in ["nbdssl", "hotadd"] {
        let conn = v.connect(&p, true, Some(&snap), mode).unwrap();
        // Read error at byte 1 MiB + 5.
        a.vddk_fault(VddkFault {
            vm: Some("plain".into()),
            read_error_at: Some((1 << 20) + 5),
            count: 1,
            ..Default::default()
        });
        let h = v.open(conn, &disk, FLAG_READ_ONLY).unwrap();
        assert_eq!(v.read(h, 0, &mut buf), VIX_OK, "{mode}");
        let r = v.read(h, 2048, &mut buf);
        assert_eq!(r, VIX_E_FILE_ERROR, "{mode}: {}", v.error_text(r));
        assert_eq!(v.read(h, 4096, &mut buf), VIX_OK, "{mode}");
        v.close(h);
        // The connection dies after 1.5 MiB: the second 1 MiB read fails, and so
        // does everything after it on that handle; a new open works.
        a.vddk_fault(VddkFault {
            disk: Some("2000".into()),
            die_after: Some(3 << 19),
            count: 1,
            ..Default::default()
        });
        let h = v.open(conn, &disk, FLAG_READ_ONLY).unwrap();
        assert_eq!(v.read(h, 0, &mut buf), VIX_OK, "{mode}");
        let r = v.read(h, 2048, &mut buf);
        assert_eq!(r, VIX_E_HOST_TCP_CONN_LOST, "{mode}: {}", v.error_text(r));
        assert_eq!(v.read(h, 0, &mut buf), VIX_E_HOST_TCP_CONN_LOST, "{mode}");
        assert_eq!(v.close(h), VIX_OK, "{mode}: close still detaches");
        let h = v.open(conn, &disk, FLAG_READ_ONLY).unwrap();
        assert_eq!(v.read(h, 2048, &mut buf), VIX_OK, "{mode}");
        v.close(h);
        // Slow reads.
        a.vddk_fault(VddkFault {
            delay_ms: 150,
            count: 1,
            ..Default::default()
        });
        let h = v.open(conn, &disk, FLAG_READ_ONLY).unwrap();
        let t = Instant::now();
        assert_eq!(v.read(h, 0, &mut buf[..4096]), VIX_OK);
        assert_eq!(v.read(h, 8, &mut buf[..4096]), VIX_OK);
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{mode}: {:?}",
            t.elapsed()
        );
        v.close(h);
        v.disconnect(conn);
    }
    assert_eq!(a.state().attached_count(), 0);

    // Restore path: a live disk without snapshots, written over NBD-SSL and hot-add.
    let enc_b = w.moref("enc-b");
    let live = w.disk_file("enc-b", 0);
    let pw = v.params("127.0.0.1", w.port(), Some(&thumb), &w.cookie, &enc_b);
    let conn = v.connect(&pw, false, None, "nbdssl").unwrap();
    let h = v.open(conn, &live, 0).unwrap();
    assert_eq!(v.write(h, 8, &[0xAB; 1024]), VIX_OK);
    v.close(h);
    v.disconnect(conn);
    let mut back = [0u8; 1024];
    a.read("enc-b", "2000", None, 4096, &mut back).unwrap();
    assert_eq!(back, [0xAB; 1024]);
    v.free_params(pw);

    // Leftovers: hot-added disks never closed (the "process" died) are removed by
    // Cleanup for this proxy.
    let conn = v.connect(&p, true, Some(&snap), "hotadd").unwrap();
    let _h = v.open(conn, &disk, FLAG_READ_ONLY).unwrap();
    assert_eq!(a.state().vm("proxy-plain").unwrap().attached.len(), 1);
    assert_eq!(v.disconnect(conn), VIX_OK);
    let (r, cleaned, remaining) = v.cleanup(&p);
    assert_eq!((r, cleaned, remaining), (VIX_OK, 1, 0));
    assert_eq!(a.state().attached_count(), 0);
    let (r, cleaned, remaining) = v.cleanup(&p);
    assert_eq!((r, cleaned, remaining), (VIX_OK, 0, 0));
    assert!(a
        .vddk_audit()
        .iter()
        .any(|e| e.op == "cleanup" && e.message.contains("1 hot-added")));

    // Restore path by HotAdd: "With SAN/HotAdd, opening for write requires a
    // pre-existing snapshot". Without one the open is refused (and audited)...
    let conn = v.connect(&p, false, None, "hotadd").unwrap();
    let r = v.open(conn, &disk, 0).unwrap_err();
    assert_eq!(r, VIX_E_FAIL, "{}", v.error_text(r));
    assert!(
        a.vddk_audit().iter().any(|e| e.op == "refused"
            && e.mode == "hotadd"
            && !e.read_only
            && e.snapshot.is_none()
            && e.message.contains("requires a pre-existing snapshot")),
        "{:#?}",
        a.vddk_audit()
    );
    assert_eq!(a.state().attached_count(), 0, "nothing was hot-added");
    v.disconnect(conn);
    // ...with one, the base disk is hot-added writable and written through the
    // device; once the snapshot is removed the disk holds what was written.
    let conn = v.connect(&p, false, Some(&snap), "hotadd").unwrap();
    let h = v.open(conn, &disk, 0).unwrap();
    assert_eq!(v.mode(h), "hotadd");
    let block = 3u64 << 20; // in the 4 MiB disk
    assert_eq!(v.write(h, block / 512, &[0xCD; 4096]), VIX_OK);
    assert_eq!(v.write(h, 8, &[0xEF; 1024]), VIX_OK);
    assert_eq!(a.state().vm("proxy-plain").unwrap().attached.len(), 1);
    assert_eq!(v.close(h), VIX_OK);
    v.disconnect(conn);
    assert_eq!(a.state().attached_count(), 0);
    assert!(a.vddk_audit().iter().any(|e| e.op == "open"
        && e.mode == "hotadd"
        && !e.read_only
        && e.snapshot.as_deref() == Some(snap.as_str())));
    w.remove_snapshot(&snap);
    assert_eq!(a.state().snapshot_count(), 0);
    let mut back = [0u8; 4096];
    a.read("plain", "2000", None, block, &mut back).unwrap();
    assert_eq!(back, [0xCD; 4096]);
    let mut back = [0u8; 1024];
    a.read("plain", "2000", None, 4096, &mut back).unwrap();
    assert_eq!(back, [0xEF; 1024]);
    assert_eq!(a.vddk_open_handles(), 0);
    v.free_params(p);
    v.exit();
}
