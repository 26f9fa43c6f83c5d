//! Real peer: govmomi (VMware's Go SDK, Debian's golang-github-vmware-govmomi-dev,
//! the same sources vcsim is built from) as a client of the mock vCenter: the
//! program `tests/peers/govmomi_vcenter.go` logs in with the CA pinned, reads the
//! inventory through container views, takes snapshots and waits for them with
//! govmomi's own task waiter (CreatePropertyCollector + WaitForUpdatesEx), pages
//! QueryChangedDiskAreas, checks the crypto refusal and a hot-add within one key
//! provider, detaches, removes the snapshots and logs out.

use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
use std::path::Path;
use std::process::Command;

const GOPATH: &str = "/usr/share/gocode";

#[test]
fn govmomi_drives_the_mock_vcenter() {
    assert!(
        Path::new(GOPATH)
            .join("src/github.com/vmware/govmomi")
            .is_dir()
            && Command::new("go").arg("version").output().is_ok(),
        "go and govmomi are missing (.ci/run installs golang-go and golang-github-vmware-govmomi-dev)"
    );
    let build = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/govmomi_vcenter.go");
    std::fs::copy(&src, build.path().join("main.go")).unwrap();
    let bin = build.path().join("govmomi-vcenter");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg("main.go")
        .current_dir(build.path())
        .env("GOPATH", GOPATH)
        .env("GO111MODULE", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "go build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let opts = VcenterOptions::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small.toml"),
    )
    .unwrap();
    let mock = VcenterMock::start(opts).unwrap();
    let out = Command::new(&bin)
        .arg(mock.url())
        .arg(mock.user())
        .arg(mock.password())
        .arg(mock.ca_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "govmomi client failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["api"], "8.0.3.0");
    assert_eq!(s["vms"], 6);
    assert_eq!(s["hosts"], 2);
    assert_eq!(s["providers"]["tenant-a-web"], "KMS-A");
    assert_eq!(s["providers"]["tenant-b-db"], "KMS-B");
    assert_eq!(s["providers"]["proxy-a"], "KMS-A");
    assert!(s["providers"].get("plain-app").is_none());
    assert_eq!(s["attached_key"], 2001);
    // "*" = the generated data regions (1 MiB each) of the untouched disk.
    let mut data = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..32u64 {
        mock.admin()
            .read("tenant-a-web", "2000", None, i << 20, &mut buf)
            .unwrap();
        if buf.iter().any(|b| *b != 0) {
            data += 1 << 20;
        }
    }
    assert_eq!(s["allocated"].as_u64().unwrap(), data);
    assert!(s["cross_kms"].as_str().unwrap().contains("KMS-B"));
    let st = mock.admin().state();
    assert_eq!(st.snapshot_count() + st.attached_count(), 0);
    assert!(st.sessions.is_empty(), "logged out");
    assert_eq!(st.tasks.error, 1, "only the refused hot-add failed");
}
