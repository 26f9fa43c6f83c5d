//! The mock ESXi NBD service (ferry's NBD server, TLS required) against real NBD
//! clients: libnbd's `nbdinfo` (handshake, flags, contexts, `--map` block status)
//! and `nbdcopy`, and `qemu-img compare`, all over TLS with the x509 directory
//! layout, reading a generated sparse disk. Then ferry's own NBD client against it
//! with faults: a connection cut mid-read (the client reconnects and resumes) and
//! slow reads over several connections. And writes: `nbdcopy` and `qemu-img
//! convert` write INTO a writable export of the mock over TLS (the bytes land
//! exactly; a read-only export refuses them), and ferry's NBD target writes through
//! a connection the mock cuts mid-write.

mod common;
use common::*;
use ferry::transport::nbd::NbdSource;
use ferry::transport::DiskSource;
use ferry_mocks::diskgen::{self, DiskSpec, Region};
use ferry_mocks::esxi::{FileExports, MockEsxi, ServerTls};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("{what} must be installed ({e}); .ci/run installs it (apt-get install libnbd-bin qemu-utils)")
    })
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
}

/// A sparse disk exported as `name` by a fresh mock ESXi host with TLS required.
struct Setup {
    w: World,
    certs: PathBuf,
    img: PathBuf,
    spec: DiskSpec,
    esx: MockEsxi,
}

fn setup(size: u64, seed: u64) -> Setup {
    let w = World::new();
    let certs = w.path("certs");
    ferry_mocks::fixtures::tls_certs(&certs).unwrap();
    let img = w.path("snapshot.img");
    let spec = DiskSpec::sparse(size, seed, 40);
    diskgen::generate(&img, &spec).unwrap();
    let exports = Arc::new(FileExports::new());
    exports.insert("vm-17/disk-0", &img);
    let esx = MockEsxi::start(exports, &ServerTls::from_dir(&certs, false).unwrap()).unwrap();
    Setup {
        w,
        certs,
        img,
        spec,
        esx,
    }
}

/// The allocation map the generator implies: (offset, length, type) with type 3
/// (hole, zero) for zero regions and 0 for data, adjacent runs merged.
fn expected_map(spec: &DiskSpec) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for i in 0..spec.regions() {
        let t = if spec.region_kind(i) == Region::Zero {
            3
        } else {
            0
        };
        let off = i * spec.region;
        let len = spec.region.min(spec.size - off);
        match out.last_mut() {
            Some(l) if l.2 == t => l.1 += len,
            _ => out.push((off, len, t)),
        }
    }
    out
}

fn qemu_nbd_opts(host: &str, port: u16, export: &str, tls: bool) -> String {
    let mut s = format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export}"
    );
    if tls {
        s.push_str(",tls-creds=tls0");
    }
    s
}

/// `qemu-img compare` of a raw file against an NBD export (TLS with the x509
/// directory when `certs` is given).
pub fn qemu_img_compare(img: &Path, nbd_opts: &str, certs: Option<&Path>) -> Output {
    let mut c = Command::new("qemu-img");
    c.arg("compare");
    if let Some(d) = certs {
        c.arg("--object").arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            d.display()
        ));
    }
    c.arg("--image-opts")
        .arg(format!("driver=file,filename={}", img.display()))
        .arg(nbd_opts);
    run(&mut c, "qemu-img")
}

#[test]
fn libnbd_tools_and_qemu_img_read_the_mock_esxi_over_tls() {
    let s = setup(24 << 20, 7);
    let uri = s.esx.uri("vm-17/disk-0", &s.certs);

    // nbdinfo: TLS, read-only, multi-conn, structured replies, base:allocation.
    let o = run(Command::new("nbdinfo").args(["--json", &uri]), "nbdinfo");
    ok(&o);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["protocol"], "newstyle-fixed", "{info}");
    assert_eq!(info["TLS"], true, "{info}");
    assert_eq!(info["structured"], true, "{info}");
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 24u64 << 20, "{info}");
    assert_eq!(e["is_read_only"], true, "{info}");
    assert_eq!(e["can_multi_conn"], true, "{info}");
    assert_eq!(e["can_flush"], true, "{info}");
    assert_eq!(e["can_trim"], false, "{info}");
    assert!(
        e["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "{info}"
    );

    // nbdinfo --map: the allocation map is exactly the generator's.
    let o = run(
        Command::new("nbdinfo").args(["--map", "--json", &uri]),
        "nbdinfo",
    );
    ok(&o);
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["length"].as_u64().unwrap(),
                m["type"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = expected_map(&s.spec);
    assert!(want.len() > 3, "the test disk must mix data and holes");
    assert_eq!(got, want);

    // nbdcopy (4 connections, many requests in flight) copies it bit for bit.
    let copy = s.w.path("copy.img");
    let o = run(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16", &uri])
            .arg(&copy),
        "nbdcopy",
    );
    ok(&o);
    assert_eq!(hash(&copy), hash(&s.img));

    // qemu-img compare through QEMU's own NBD client with x509 TLS.
    let o = qemu_img_compare(
        &s.img,
        &qemu_nbd_opts("127.0.0.1", s.esx.port(), "vm-17/disk-0", true),
        Some(&s.certs),
    );
    ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("identical"),
        "{}",
        text(&o)
    );

    // An unknown export name is refused with the reason; clear text is refused.
    let o = run(
        Command::new("nbdinfo").arg(s.esx.uri("vm-17/disk-9", &s.certs)),
        "nbdinfo",
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("vm-17/disk-9"), "{}", text(&o));
    let o = run(
        Command::new("nbdinfo").arg(format!("nbd://{}/vm-17/disk-0", s.esx.addr())),
        "nbdinfo",
    );
    assert!(!o.status.success(), "{}", text(&o));
    // (libnbd reports NBD_REP_ERR_TLS_REQD as "not supported"; ferry names it.)
    let e = NbdSource::connect(&format!("nbd://{}/vm-17/disk-0", s.esx.addr()), 1)
        .err()
        .expect("clear text must be refused")
        .to_string();
    assert!(e.contains("ERR_TLS_REQD"), "{e}");
}

/// nbdcopy and qemu-img write into a writable export over TLS; the file behind it
/// then holds exactly the source, and a read-only export refuses the same copy.
#[test]
fn nbdcopy_and_qemu_img_write_into_a_writable_export_over_tls() {
    let s = setup(24 << 20, 11);
    let exports = Arc::new(FileExports::new());
    let dst1 = s.w.path("new-disk-1.img");
    let dst2 = s.w.path("new-disk-2.img");
    for d in [&dst1, &dst2] {
        std::fs::File::create(d).unwrap().set_len(24 << 20).unwrap();
    }
    exports.insert_writable("vm-17/new-1", &dst1);
    exports.insert_writable("vm-17/new-2", &dst2);
    exports.insert("vm-17/snap", &s.img);
    let esx = MockEsxi::start(
        exports.clone(),
        &ServerTls::from_dir(&s.certs, false).unwrap(),
    )
    .unwrap();
    let uri = esx.uri("vm-17/new-1", &s.certs);

    // nbdinfo: writable, with flush, FUA and write zeroes; no trim.
    let o = run(Command::new("nbdinfo").args(["--json", &uri]), "nbdinfo");
    ok(&o);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["is_read_only"], false, "{info}");
    assert_eq!(e["can_flush"], true, "{info}");
    assert_eq!(e["can_fua"], true, "{info}");
    assert_eq!(e["can_zero"], true, "{info}");
    assert_eq!(e["can_trim"], false, "{info}");
    assert_eq!(info["TLS"], true, "{info}");

    // nbdcopy from the local image INTO the export, 4 connections, then flush.
    let o = run(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16", "--flush"])
            .arg(&s.img)
            .arg(&uri),
        "nbdcopy",
    );
    ok(&o);
    assert_eq!(hash(&dst1), hash(&s.img), "nbdcopy's writes landed exactly");
    assert!(esx.faults().stats().writes > 0);

    // qemu-img convert through QEMU's NBD client with x509 TLS into the second.
    let o = run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw"])
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                s.certs.display()
            ))
            .arg(&s.img)
            .arg("--target-image-opts")
            .arg(qemu_nbd_opts("127.0.0.1", esx.port(), "vm-17/new-2", true)),
        "qemu-img",
    );
    ok(&o);
    assert_eq!(
        hash(&dst2),
        hash(&s.img),
        "qemu-img's writes landed exactly"
    );
    // And read back through the export, over TLS.
    let o = qemu_img_compare(
        &s.img,
        &qemu_nbd_opts("127.0.0.1", esx.port(), "vm-17/new-2", true),
        Some(&s.certs),
    );
    ok(&o);

    // The read-only export refuses writes: nbdcopy fails and the image is intact.
    let before = hash(&s.img);
    let o = run(
        Command::new("nbdcopy")
            .arg(&dst1)
            .arg(esx.uri("vm-17/snap", &s.certs)),
        "nbdcopy",
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(hash(&s.img), before);
}

/// ferry's NBD target through a connection the mock cuts after 2 MiB received:
/// the write is re-sent on a new connection and the export ends up exact; when
/// every connection is cut, the write fails cleanly after bounded retries, and the
/// export name (a ticket, in vSphere) appears in no error.
#[test]
fn ferry_target_resends_writes_after_a_cut_and_gives_up_cleanly() {
    use ferry::transport::nbd::NbdTarget;
    use ferry::transport::DiskTarget;
    let s = setup(8 << 20, 3);
    let dst = s.w.path("new.img");
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let exports = Arc::new(FileExports::new());
    exports.insert_writable("secret-ticket-name", &dst);
    let esx = MockEsxi::start(exports, &ServerTls::from_dir(&s.certs, false).unwrap()).unwrap();
    let uri = esx.uri("secret-ticket-name", &s.certs);
    let data = std::fs::read(&s.img).unwrap();
    // The target's first connection is cut after 2 MiB received.
    esx.faults().drop_connections_after_received(2 << 20, 1);
    let t = NbdTarget::connect(&uri, "restore target", 1, true).unwrap();
    assert_eq!(t.transport(), "nbdssl");
    for (i, c) in data.chunks(1 << 20).enumerate() {
        t.write_at((i as u64) << 20, c).unwrap();
    }
    t.flush().unwrap();
    assert_eq!(esx.faults().stats().dropped, 1, "one connection was cut");
    assert_eq!(hash(&dst), hash(&s.img));
    drop(t);
    // Every connection cut after 64 KiB: bounded retries, then a clean error.
    esx.faults().drop_connections_after_received(64 << 10, 100);
    let t = NbdTarget::connect(&uri, "restore target", 1, true).unwrap();
    let e = (0..8usize)
        .find_map(|i| {
            t.write_at((i as u64) << 20, &data[i << 20..(i + 1) << 20])
                .err()
        })
        .expect("writes through cut connections must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("gave up after") && msg.contains("restore target"),
        "{msg}"
    );
    assert!(!msg.contains("secret-ticket-name"), "{msg}");
    esx.faults().clear();
}

fn read_all(src: &NbdSource) -> Vec<u8> {
    let mut out = vec![0u8; src.size() as usize];
    let mut at = 0;
    while let Some(e) = src.next_allocated(at).unwrap() {
        src.read_at(e.offset, &mut out[e.offset as usize..e.end() as usize])
            .unwrap();
        at = e.end();
    }
    out
}

#[test]
fn ferry_client_resumes_after_the_mock_cuts_a_connection_mid_read() {
    let s = setup(16 << 20, 11);
    let uri = s.esx.uri("vm-17/disk-0", &s.certs);
    // The next connection dies after 3 MiB of server bytes, in the middle of a
    // multi-MiB read: ferry reconnects and reads the disk completely.
    s.esx.faults().drop_connections_after(3 << 20, 1);
    let src = NbdSource::connect(&uri, 1).unwrap();
    let bytes = read_all(&src);
    assert_eq!(blake3::hash(&bytes), hash(&s.img));
    let st = s.esx.faults().stats();
    assert_eq!(st.dropped, 1, "{st:?}");
    assert!(st.connections >= 2, "{st:?}");
    drop(src);

    // A whole backup through a cut connection restores bit for bit.
    s.esx.faults().drop_connections_after(2 << 20, 1);
    let o = s.w.ferry(&[
        "--json",
        "backup",
        "--name",
        "esx",
        "--nbd",
        &uri,
        "--nbd-connections",
        "1",
    ]);
    ok(&o);
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["disks"][0]["transport"], "nbdssl");
    assert_eq!(s.esx.faults().stats().dropped, 2);
    let t = restore_latest(|a| s.w.ferry(a), "esx", &s.w.path("esx.restored"));
    assert_eq!(hash(&t), hash(&s.img));
}

#[test]
fn slow_reads_are_served_concurrently_over_several_connections() {
    let s = setup(16 << 20, 13);
    s.esx.faults().set_read_latency(Duration::from_millis(20));
    let src = NbdSource::connect(&s.esx.uri("vm-17/disk-0", &s.certs), 4).unwrap();
    // Four readers, 1 MiB each, through four connections.
    let r = ferry::bench::read_source(&src, 4, 1 << 20).unwrap();
    assert!(r.bytes_read > 0 && r.bytes_read < 16 << 20, "{r:?}");
    let st = s.esx.faults().stats();
    assert!(
        st.max_concurrent_reads >= 2,
        "reads on different connections must not wait for each other: {st:?}"
    );
    // And slow reads return the right bytes.
    assert_eq!(blake3::hash(&read_all(&src)), hash(&s.img));
    s.esx.faults().clear();
}
