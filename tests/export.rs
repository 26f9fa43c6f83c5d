//! `ferry export` (instant access) against real NBD clients: a restore point disk
//! served over TCP and a Unix socket, in clear text and with x509 TLS (one variant
//! with client certificates required); `qemu-img compare` against the source image
//! and `nbdcopy` to a file are identical, `nbdinfo --map` shows the zero chunks as
//! holes, unknown export names are refused, and SIGTERM stops the server cleanly.

mod common;
use common::*;
use ferry::transport::nbd::NbdSource;
use ferry::transport::DiskSource;
use ferry_mocks::diskgen::{DiskSpec, Region};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("{what} must be installed ({e}); .ci/run installs it (apt-get install libnbd-bin qemu-utils)")
    })
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
}

/// A running `ferry export`; killed if the test fails before stopping it.
struct Exporter {
    child: Child,
    info: serde_json::Value,
}

impl Exporter {
    fn start(w: &World, extra: &[&str]) -> Exporter {
        let mut args = vec!["--json", "export", "--point", "latest:vm", "--disk", "0"];
        args.extend_from_slice(extra);
        let mut child = w
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The JSON result is printed once the server listens.
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

    fn export_name(&self) -> String {
        self.info["export"].as_str().unwrap().to_string()
    }

    /// SIGTERM, then the exit status must be success.
    fn stop(mut self) {
        // SAFETY: signalling our own child process by its pid.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0);
        let st = self.child.wait().unwrap();
        assert!(
            st.success(),
            "ferry export exited with {st:?} after SIGTERM"
        );
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_img_compare(img: &Path, nbd_opts: &str, certs: Option<&Path>) -> Output {
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

/// Back up a generated mixed image (with zero regions) as "vm".
fn world_with_point() -> (World, std::path::PathBuf, DiskSpec) {
    let w = World::new();
    let spec = DiskSpec::mixed(20 << 20, 21);
    let img = w.path("vm.img");
    ferry_mocks::diskgen::generate(&img, &spec).unwrap();
    w.backup("vm", &[&img]);
    (w, img, spec)
}

/// Check one running export with qemu-img, nbdcopy and ferry's client.
fn check(w: &World, e: &Exporter, img: &Path, qemu_opts: &str, certs: Option<&Path>, tag: &str) {
    let o = qemu_img_compare(img, qemu_opts, certs);
    ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("identical"),
        "{}",
        text(&o)
    );
    let copy = w.path(&format!("copy-{tag}.img"));
    ok(&run(
        Command::new("nbdcopy")
            .args(["--connections=4", &e.uri()])
            .arg(&copy),
        "nbdcopy",
    ));
    assert_eq!(hash(&copy), hash(img), "{tag}");
    let src = NbdSource::connect(&e.uri(), 2).unwrap();
    assert_eq!(src.size(), 20 << 20);
}

#[test]
fn plain_tcp_and_unix_socket() {
    let (w, img, spec) = world_with_point();
    // TCP, port 0.
    let e = Exporter::start(&w, &["--listen", "127.0.0.1:0"]);
    assert_eq!(e.info["size"], 20u64 << 20);
    assert_eq!(e.info["tls"], false);
    let uri = e.uri();
    let port = uri
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={}",
        e.export_name()
    );
    check(&w, &e, &img, &opts, None, "tcp");
    // The default export ("") is the same disk.
    let o = qemu_img_compare(
        &img,
        &format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port}"),
        None,
    );
    ok(&o);
    // Block status: zero chunks are holes that read as zeroes, data is data.
    let o = run(
        Command::new("nbdinfo").args(["--map", "--json", &uri]),
        "nbdinfo",
    );
    ok(&o);
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut want: Vec<(u64, u64, u64)> = Vec::new();
    for i in 0..spec.regions() {
        let t = if spec.region_kind(i) == Region::Zero {
            3
        } else {
            0
        };
        match want.last_mut() {
            Some(l) if l.2 == t => l.1 += spec.region,
            _ => want.push((i * spec.region, spec.region, t)),
        }
    }
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
    assert!(
        want.iter().any(|x| x.2 == 3),
        "the disk must have zero chunks"
    );
    assert_eq!(got, want);
    // Unknown export names are refused cleanly, with the reason.
    let bad = uri.replace(&e.export_name(), "no-such-disk");
    let o = run(Command::new("nbdinfo").arg(&bad), "nbdinfo");
    assert!(!o.status.success(), "{}", text(&o));
    let err = NbdSource::connect(&bad, 1).err().unwrap().to_string();
    assert!(
        err.contains("ERR_UNKNOWN") && err.contains("exports only"),
        "{err}"
    );
    e.stop();

    // Unix socket.
    let sock = w.path("export.sock");
    let e = Exporter::start(&w, &["--socket", sock.to_str().unwrap()]);
    assert!(e.uri().starts_with("nbd+unix:///"), "{}", e.uri());
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={}",
        sock.display(),
        e.export_name()
    );
    check(&w, &e, &img, &opts, None, "unix");
    e.stop();
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn tls_over_tcp_with_client_certificates_and_over_a_unix_socket() {
    let (w, img, _) = world_with_point();
    let certs = w.path("certs");
    ferry_mocks::fixtures::tls_certs(&certs).unwrap();
    let c = certs.to_str().unwrap();

    let e = Exporter::start(
        &w,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-certificates",
            c,
            "--tls-verify-peer",
        ],
    );
    assert_eq!(e.info["tls"], true);
    assert!(e.uri().starts_with("nbds://"), "{}", e.uri());
    let port = e
        .uri()
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={},tls-creds=tls0",
        e.export_name()
    );
    check(&w, &e, &img, &opts, Some(&certs), "tls-tcp");
    // Clear text is refused by a TLS export.
    let plain = e
        .uri()
        .replace("nbds://", "nbd://")
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let err = NbdSource::connect(&plain, 1).err().unwrap().to_string();
    assert!(err.contains("ERR_TLS_REQD"), "{err}");
    // Without a client certificate the TLS handshake fails (peer verification on).
    let no_client = w.path("no-client-cert");
    std::fs::create_dir_all(&no_client).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), no_client.join("ca-cert.pem")).unwrap();
    let u = e.uri().replace(c, no_client.to_str().unwrap());
    assert!(NbdSource::connect(&u, 1).is_err());
    e.stop();

    let sock = w.path("tls.sock");
    let e = Exporter::start(
        &w,
        &["--socket", sock.to_str().unwrap(), "--tls-certificates", c],
    );
    assert!(e.uri().starts_with("nbds+unix:///"), "{}", e.uri());
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={},tls-creds=tls0,tls-hostname=localhost",
        sock.display(),
        e.export_name()
    );
    check(&w, &e, &img, &opts, Some(&certs), "tls-unix");
    e.stop();
}

#[test]
fn a_damaged_chunk_fails_only_its_range_and_the_export_lists_its_name() {
    use ferry::export::{ExportOptions, PointExport, PointExportProvider};
    use ferry::nbd_server::{ExportBackend, ExportProvider};
    let (w, img, spec) = world_with_point();
    let repo = w.repo();
    let point = repo.latest_point_of("vm").unwrap().unwrap().point_id;
    let open = || PointExport::open(w.repo(), &w.source(), &point, 0, ExportOptions::default());
    let e = std::sync::Arc::new(open().unwrap());
    let mut all = vec![0u8; 20 << 20];
    e.read_at(0, &mut all).unwrap();
    assert_eq!(blake3::hash(&all), hash(&img));
    let provider = PointExportProvider::new(e.clone());
    assert_eq!(provider.list().unwrap(), vec![e.export_name()]);
    assert!(provider.open("").is_ok() && provider.open("other").is_err());
    drop((e, provider));

    // Damage the chunk behind the first data region (found through the index).
    let region = (0..spec.regions())
        .find(|&i| spec.region_kind(i) != Region::Zero)
        .unwrap();
    let at = region * spec.region;
    let opened = repo.open_point(&point, &w.source(), None).unwrap();
    let mut index = repo.open_index(&opened, 0).unwrap();
    let entry = (0..=at / CS as u64)
        .map(|_| index.next_entry().unwrap().unwrap())
        .last()
        .unwrap();
    let victim = repo.chunk_path(&entry.id);
    let mut bytes = std::fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&victim, &bytes).unwrap();

    let e = open().unwrap();
    let mut b = vec![0u8; 4096];
    let err = e.read_at(at, &mut b).unwrap_err().to_string();
    assert!(err.contains(&entry.id.to_hex()), "{err}");
    // Other chunks still read correctly.
    let far = (0..spec.regions())
        .rev()
        .find(|&i| spec.region_kind(i) != Region::Zero && i != region)
        .unwrap()
        * spec.region;
    e.read_at(far, &mut b).unwrap();
    assert_eq!(&b[..], &all[far as usize..far as usize + 4096]);
}
