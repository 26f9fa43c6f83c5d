//! ferry's NBD client against a real NBD server, qemu-nbd (Unix socket and TCP):
//! a sparse disk is read bit-identically, block status is honoured (holes are not
//! read), and a backup from the export restores to the same bytes.

mod common;
use common::*;
use ferry::transport::nbd::NbdSource;
use ferry::transport::DiskSource;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(args: &[&str], img: &std::path::Path) -> Server {
    let child = Command::new("qemu-nbd")
        .args(["--read-only", "--persistent", "--shared=8", "--format=raw"])
        .args(args)
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd must be installed (apt-get install qemu-utils); .ci/run installs it");
    Server(child)
}

fn wait_connect(uri: &str) -> NbdSource {
    let t = Instant::now();
    loop {
        match NbdSource::connect(uri, 4) {
            Ok(s) => return s,
            Err(e) if t.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect to {uri}: {e}"),
        }
    }
}

fn read_all(src: &NbdSource) -> (Vec<u8>, u64) {
    let mut out = vec![0u8; src.size() as usize];
    let mut read = 0;
    let mut at = 0;
    while let Some(e) = src.next_allocated(at).unwrap() {
        assert!(e.offset >= at && e.len > 0, "{e:?} from {at}");
        src.read_at(e.offset, &mut out[e.offset as usize..e.end() as usize])
            .unwrap();
        read += e.len;
        at = e.end();
    }
    (out, read)
}

#[test]
fn qemu_nbd_unix_socket_sparse_read_and_backup() {
    let w = World::new();
    let img = w.path("sparse.img");
    ferry_mocks::diskgen::generate(
        &img,
        &ferry_mocks::diskgen::DiskSpec::sparse(48 << 20, 5, 30),
    )
    .unwrap();
    let sock = w.path("nbd.sock");
    let _srv = qemu_nbd(&["--socket", sock.to_str().unwrap()], &img);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let src = wait_connect(&uri);
    assert_eq!(src.size(), 48 << 20);
    let (bytes, read) = read_all(&src);
    assert_eq!(blake3::hash(&bytes), hash(&img));
    assert!(
        read < (48 << 20) / 2,
        "block status ignored: read {read} bytes of a 30% allocated disk"
    );
    drop(src);

    let o = w.ferry(&["--json", "backup", "--name", "nbdvm", "--nbd", &uri]);
    assert!(o.status.success(), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["disks"][0]["transport"], "nbd");
    assert!(
        rep["disks"][0]["bytes_read"].as_u64().unwrap() < 24 << 20,
        "{rep}"
    );
    assert_eq!(
        hash(&restore_latest(
            |a| w.ferry(a),
            "nbdvm",
            &w.path("restored.img")
        )),
        hash(&img)
    );
}

#[test]
fn qemu_nbd_tcp_reads_a_full_disk_bit_identically() {
    let w = World::new();
    let img = w.image("full.img", 20 << 20, 9);
    // An ephemeral port: bind 0 to find a free one, then hand it to qemu-nbd.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _srv = qemu_nbd(&["--bind", "127.0.0.1", "--port", &port.to_string()], &img);
    let src = wait_connect(&format!("nbd://127.0.0.1:{port}/"));
    let (bytes, _) = read_all(&src);
    assert_eq!(blake3::hash(&bytes), hash(&img));
    // Reads beyond the end are refused locally, never sent.
    let mut b = [0u8; 16];
    assert!(src.read_at((20 << 20) - 8, &mut b).is_err());
}

fn nbdkit(w: &World, sock: &std::path::Path, plugin_args: &[&str]) -> Server {
    let child = Command::new("nbdkit")
        .args(["-f", "-r", "-U"])
        .arg(sock)
        .args(plugin_args)
        .current_dir(w.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit must be installed (apt-get install nbdkit); .ci/run installs it");
    Server(child)
}

#[test]
fn nbdkit_file_plugin_reads_bit_identically() {
    let w = World::new();
    let img = w.image("disk.img", 16 << 20, 4);
    let sock = w.path("kit.sock");
    let _srv = nbdkit(&w, &sock, &["file", img.to_str().unwrap()]);
    let src = wait_connect(&format!("nbd+unix:///?socket={}", sock.display()));
    let (bytes, _) = read_all(&src);
    assert_eq!(blake3::hash(&bytes), hash(&img));
}

#[test]
fn nbdkit_sparse_random_4g_block_status_and_backup_match_nbdcopy() {
    // A 4 GiB disk with about 0.5% data: block status must keep the read small, and
    // ferry's backup of it must restore to exactly what nbdcopy reads.
    let w = World::new();
    let sock = w.path("sr.sock");
    let _srv = nbdkit(
        &w,
        &sock,
        &["sparse-random", "size=4G", "seed=42", "percent=0.5"],
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let src = wait_connect(&uri);
    assert_eq!(src.size(), 4 << 30);
    drop(src);
    let o = w.ferry(&["--json", "backup", "--name", "sr", "--nbd", &uri]);
    assert!(o.status.success(), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let read = rep["disks"][0]["bytes_read"].as_u64().unwrap();
    assert!(
        read < (4u64 << 30) / 20,
        "read {read} bytes of a 0.5% allocated 4 GiB disk"
    );
    let t = restore_latest(|a| w.ferry(a), "sr", &w.path("sr.restored"));
    let copy = w.path("sr.nbdcopy");
    let st = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&copy)
        .status()
        .expect("nbdcopy (libnbd-bin) must be installed");
    assert!(st.success());
    assert_eq!(hash(&t), hash(&copy));
}

#[test]
fn nbd_ssl_against_qemu_nbd_and_nbdkit_with_x509() {
    let w = World::new();
    let certs = w.path("certs");
    ferry_mocks::fixtures::tls_certs(&certs).unwrap();
    let img = w.image("tls.img", 12 << 20, 12);

    // qemu-nbd over TCP with TLS required.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
        certs.display()
    );
    let _q = qemu_nbd(
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--object",
            &creds,
            "--tls-creds",
            "tls0",
        ],
        &img,
    );
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        certs.display()
    );
    let src = wait_connect(&uri);
    assert_eq!(src.transport(), "nbdssl");
    let (bytes, _) = read_all(&src);
    assert_eq!(blake3::hash(&bytes), hash(&img));
    drop(src);
    // Clear text against a TLS-only server is refused by the server, with its reason.
    let e = NbdSource::connect(&format!("nbd://127.0.0.1:{port}/"), 1)
        .err()
        .expect("must be refused")
        .to_string();
    assert!(e.contains("TLS_REQD") || e.contains("ERR_"), "{e}");
    // A CA that did not sign the server certificate is rejected by ferry.
    let other = w.path("other-ca");
    ferry_mocks::fixtures::tls_certs(&other).unwrap();
    let e = NbdSource::connect(
        &format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            other.display()
        ),
        1,
    )
    .err()
    .expect("must fail verification")
    .to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // nbdkit over a Unix socket, TLS required, client certificate presented.
    let sock = w.path("kit-tls.sock");
    let _k = nbdkit(
        &w,
        &sock,
        &[
            "--tls=require",
            &format!("--tls-certificates={}", certs.display()),
            "file",
            img.to_str().unwrap(),
        ],
    );
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        sock.display(),
        certs.display()
    );
    let src = wait_connect(&uri);
    let (bytes, _) = read_all(&src);
    assert_eq!(blake3::hash(&bytes), hash(&img));
    drop(src);
    // And a whole backup over NBD-SSL restores bit for bit.
    let o = w.ferry(&["--json", "backup", "--name", "tlsvm", "--nbd", &uri]);
    assert!(o.status.success(), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["disks"][0]["transport"], "nbdssl");
    assert_eq!(
        hash(&restore_latest(
            |a| w.ferry(a),
            "tlsvm",
            &w.path("tls.restored")
        )),
        hash(&img)
    );
}

/// A TCP proxy to `upstream` that cuts the first `drops` connections after
/// `after` bytes from the server, as a flaky network would.
fn flaky_proxy(upstream: u16, drops: usize, after: usize) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, c) in l.incoming().enumerate() {
            let Ok(mut c) = c else { return };
            let Ok(mut u) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let (mut c2, mut u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut u2);
            });
            let limit = if n < drops { Some(after) } else { None };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                let mut sent = 0;
                loop {
                    let k = match u.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => k,
                    };
                    if limit.is_some_and(|l| sent + k > l) {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                        let _ = u.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                    if c.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    sent += k;
                }
            });
        }
    });
    port
}

#[test]
fn dropped_connection_mid_disk_is_resumed() {
    let w = World::new();
    let img = w.image("flaky.img", 16 << 20, 31);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _srv = qemu_nbd(&["--bind", "127.0.0.1", "--port", &port.to_string()], &img);
    wait_connect(&format!("nbd://127.0.0.1:{port}/"));
    // The first connection dies after 3 MiB of replies; ferry reconnects and goes on.
    let proxy = flaky_proxy(port, 1, 3 << 20);
    let uri = format!("nbd://127.0.0.1:{proxy}/");
    let o = w.ferry(&[
        "--json",
        "backup",
        "--name",
        "flaky",
        "--nbd",
        &uri,
        "--nbd-connections",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        hash(&restore_latest(
            |a| w.ferry(a),
            "flaky",
            &w.path("flaky.restored")
        )),
        hash(&img)
    );
    // A connection that always dies fails the disk cleanly: no point is committed.
    let dead = flaky_proxy(port, usize::MAX, 64 << 10); // less than one chunk read
    let o = w.ferry(&[
        "backup",
        "--name",
        "dead",
        "--nbd",
        &format!("nbd://127.0.0.1:{dead}/"),
        "--nbd-connections",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("gave up after 3 attempts"),
        "{}",
        text(&o)
    );
    let o = w.ferry(&["--json", "points", "list", "--name", "dead"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );
}
