//! Real peer: PyKMIP's client (from the repository's `.venv`) against the mock KMS:
//! DiscoverVersions, Query, CreateKeyPair, Activate, Locate, Get of the public and
//! the private key, GetAttributes, Decrypt (RSA-OAEP SHA-1), Revoke, Destroy and
//! the refusal of Get afterwards, with the TLS version PyKMIP negotiates by default
//! and with TLS 1.2 pinned. Then ferry's own client uses the pair PyKMIP made. The
//! script is `tests/peers/pykmip_client.py`.

use ferry::keys::{KeySource, KmsKeySource};
use ferry_mocks::kms::{KmsMock, KmsOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let ok = Command::new(&venv)
        .args(["-c", "import kmip"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "PyKMIP is missing from {} (.ci/run installs it: python3 -m venv .venv && .venv/bin/pip install pykmip)",
        venv.display()
    );
    venv
}

#[test]
fn pykmip_client_drives_the_mock_kms() {
    let py = python();
    let kms = KmsMock::start(KmsOptions::default()).unwrap();
    let cfg = serde_json::json!({
        "host": "127.0.0.1",
        "port": kms.addr().port(),
        "ca": kms.ca_path(),
        "cert": kms.client_cert_path(),
        "key": kms.client_key_path(),
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/pykmip_client.py");
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
        "PyKMIP script failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();

    assert_eq!(s["versions"][0], "1.4", "{s}");
    let ops: Vec<&str> = s["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    for op in [
        "CREATE_KEY_PAIR",
        "LOCATE",
        "GET",
        "GET_ATTRIBUTES",
        "ACTIVATE",
        "REVOKE",
        "DESTROY",
        "QUERY",
        "DISCOVER_VERSIONS",
        "DECRYPT",
        "REKEY_KEY_PAIR",
    ] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    assert_eq!(s["vendor"], ferry_mocks::kms::ops::VENDOR);
    assert_eq!(s["tls12"], "TLSv1.2");
    assert!(
        s["default_tls"].as_str().unwrap().starts_with("TLSv1."),
        "{s}"
    );
    for run in ["default", "tls12_lifecycle"] {
        let r = &s[run];
        assert_eq!(r["state_created"], "PRE_ACTIVE", "{run}: {r}");
        assert_eq!(r["public_format"], "PKCS_1");
        assert_eq!(r["private_format"], "PKCS_8");
        assert_eq!(r["public_length"], 2048);
        assert_eq!(r["state"], "ACTIVE");
        assert_eq!(r["length"], 2048);
        assert_eq!(r["object_type"], "PRIVATE_KEY");
        assert_eq!(r["decrypt"], "ok");
        assert_eq!(r["destroy_active"], "ILLEGAL_OPERATION");
        assert_eq!(r["state_revoked"], "DEACTIVATED");
        assert_eq!(r["state_destroyed"], "DESTROYED");
        assert_eq!(r["get_destroyed"], "ITEM_NOT_FOUND");
    }
    assert_eq!(s["default"]["name"], "py/lifecycle");

    // What PyKMIP did is what the mock holds.
    let objs = kms.objects();
    assert_eq!(objs.len(), 6, "{objs:?}");
    let destroyed = objs.iter().filter(|o| o.state == "Destroyed").count();
    assert_eq!(destroyed, 2, "{objs:?}");
    assert!(kms.stats().operations["Decrypt"] >= 2);

    // ferry's client uses the pair PyKMIP created.
    let ks = KmsKeySource::open(
        ferry::kmip::client::KmsClient::new(kms.client_config()).unwrap(),
        "py/shared",
        false,
        2048,
    )
    .unwrap();
    assert_eq!(
        ks.current_key().unwrap().key_id,
        s["shared"][1].as_str().unwrap()
    );
    let w = ks.wrap(&[4u8; 32]).unwrap();
    assert_eq!(&ks.unwrap(&w).unwrap()[..], &[4u8; 32]);
}
