//! Real peer: pyvmomi (VMware's Python SDK, from the repository's `.venv`) against
//! the mock vCenter on the `small` scenario: login, paged inventory with disks and
//! keyIds, snapshots, QueryChangedDiskAreas after guest writes, hot-add refused
//! across key providers and accepted within one, the device entry, NBD ticket,
//! detach, cleanup, logout. The script is `tests/peers/pyvmomi_vcenter.py`.

use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let ok = Command::new(&venv)
        .args(["-c", "import pyVmomi"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "pyvmomi is missing from {} (.ci/run installs it: python3 -m venv .venv && .venv/bin/pip install pyvmomi)",
        venv.display()
    );
    venv
}

#[test]
fn pyvmomi_drives_the_mock_vcenter() {
    let py = python();
    let opts = VcenterOptions::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small.toml"),
    )
    .unwrap();
    let mock = VcenterMock::start(opts).unwrap();
    let cfg = serde_json::json!({
        "host": "127.0.0.1",
        "port": mock.addr().port(),
        "user": mock.user(),
        "password": mock.password(),
        "ca": mock.ca_path(),
        "admin_token": mock.admin_token(),
        "device_dirs": {
            "proxy-a": mock.device_dir("proxy-a").unwrap(),
            "proxy-nbd": mock.device_dir("proxy-nbd").unwrap(),
        },
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/pyvmomi_vcenter.py");
    let mut child = Command::new(py)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cfg.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pyvmomi script failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();

    // What pyvmomi saw matches the scenario.
    assert_eq!(summary["api_version"], "8.0.3.0");
    assert_eq!(summary["bad_password"], "InvalidLogin");
    let inv = summary["inventory"].as_object().unwrap();
    assert_eq!(inv.len(), 6, "4 VMs and 2 proxies");
    assert!(
        summary["pages"].as_u64().unwrap() >= 3,
        "maxObjects=2 pages"
    );
    assert_eq!(inv["tenant-a-web"]["key_provider"], "KMS-A");
    assert_eq!(inv["tenant-b-db"]["key_provider"], "KMS-B");
    assert!(inv["plain-app"]["key_provider"].is_null());
    assert_eq!(inv["proxy-a"]["key_provider"], "KMS-A");
    let web_disks = inv["tenant-a-web"]["disks"].as_array().unwrap();
    assert_eq!(web_disks.len(), 2);
    assert_eq!(web_disks[0]["capacity"], 32 << 20);
    assert_eq!(web_disks[0]["key_provider"], "KMS-A");
    assert_eq!(
        web_disks[0]["file"],
        "[ds-tenant-a] tenant-a-web/tenant-a-web.vmdk"
    );
    assert!(web_disks[0]["change_id"].as_str().unwrap().contains('/'));
    assert!(
        inv["plain-app"]["disks"][0]["change_id"].is_null(),
        "CBT off"
    );
    // "*" = every allocated area of the generated content.
    let expect_alloc: u64 = {
        let admin = mock.admin();
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..32u64 {
            admin
                .read("tenant-a-web", "2000", None, i << 20, &mut buf)
                .unwrap();
            if buf.iter().any(|b| *b != 0) {
                total += 1 << 20;
            }
        }
        total
    };
    assert_eq!(summary["full_areas_bytes"].as_u64().unwrap(), expect_alloc);
    assert_eq!(
        summary["changed"],
        serde_json::json!([[1 << 20, 65536], [5 << 20, 131072]])
    );
    assert_eq!(summary["unknown_change_id"], "vim.fault.FileFault");
    assert_eq!(summary["cross_kms_fault"], "vim.fault.GenericVmConfigFault");
    let msg = summary["cross_kms_message"].as_str().unwrap();
    assert!(msg.contains("KMS-A") && msg.contains("KMS-B"), "{msg}");
    assert_eq!(summary["ticket_host"], "127.0.0.1");
    assert_eq!(summary["after_logout"], "NotAuthenticated");

    // Nothing left behind.
    let st = mock.admin().state();
    assert_eq!(st.snapshot_count(), 0);
    assert_eq!(st.attached_count(), 0);
    assert!(st.sessions.is_empty(), "{:?}", st.sessions);
    assert_eq!(st.open_nbd_exports, 0);
    assert_eq!(st.tasks.queued + st.tasks.running, 0);
    assert!(
        st.tasks.error >= 3,
        "the refused hot-adds and the locked removal"
    );
    let dev = mock.device_dir("proxy-a").unwrap();
    assert_eq!(std::fs::read_dir(dev).unwrap().count(), 0);
}
