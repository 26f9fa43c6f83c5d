//! govmomi's vcsim as a test peer (built by .ci/run into `.peers/vcsim`):
//! started on a free port, serving TLS with a certificate from a test PKI.
//! Shared by tests/vsphere_vcsim.rs and tests/inventory_incremental.rs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running vcsim; stopped (SIGTERM) when dropped.
pub struct Vcsim {
    child: Child,
    /// vcsim's SDK URL.
    pub url: String,
    /// Its port.
    pub port: u16,
    /// CA that signed vcsim's certificate (for CA pinning).
    pub ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        // SIGTERM lets vcsim remove its temporary datastore directories.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// Start vcsim on a free port with `extra` arguments; returns the process and the
/// URL it prints.
pub fn spawn_vcsim(extra: &[&str]) -> (Child, reqwest::Url) {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".peers/vcsim");
    assert!(
        bin.exists(),
        "{} missing: .ci/run builds it from Debian's golang-github-vmware-govmomi-dev (shared/PEERS.md)",
        bin.display()
    );
    let mut child = Command::new(&bin)
        .args(["-listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vcsim");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("vcsim prints its URL");
    // https://user:pass@127.0.0.1:PORT/sdk
    let url = reqwest::Url::parse(line.trim()).expect("vcsim URL");
    (child, url)
}

/// vcsim serving TLS with a certificate from the test PKI.
///
/// By default vcsim uses Go's built-in test certificate, whose key is RSA-1024:
/// ferry (rustls/ring) refuses to verify handshake signatures made with keys that
/// weak, as it should. ferry's build of vcsim (.ci/vcsim-main.go) takes
/// `-tls-cert`/`-tls-key`, so vcsim itself terminates TLS with a proper
/// certificate.
pub fn vcsim() -> Vcsim {
    let dir = tempfile::tempdir().unwrap();
    let ca = ferry_mocks::pki::Ca::new("vcsim test CA").unwrap();
    let srv = ca.server(&["127.0.0.1", "localhost"]).unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &srv.cert_pem).unwrap();
    std::fs::write(&key, &srv.key_pem).unwrap();
    let (child, url) = spawn_vcsim(&[
        "-tls=true",
        "-tls-cert",
        cert.to_str().unwrap(),
        "-tls-key",
        key.to_str().unwrap(),
    ]);
    let port = url.port().expect("port");
    Vcsim {
        child,
        url: format!("https://127.0.0.1:{port}/sdk"),
        port,
        ca: ca_path,
        _dir: dir,
    }
}
