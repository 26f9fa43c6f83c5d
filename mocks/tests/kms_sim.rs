//! `ferry-sim kms` runs the mock KMS standalone: it prints how to connect (here as
//! JSON), serves KMIP over mutual TLS with those files, keeps its key pairs and
//! certificates across a restart on the same directory, applies the fault flags,
//! and stops cleanly on SIGTERM.

use ferry::kmip::client::{KmsClient, KmsConfig};
use ferry::kmip::tags::*;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn start(dir: &Path, extra: &[&str]) -> (Child, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-sim"))
        .args(["kms", "--port", "0", "--json", "--dir"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        let _ = child.kill();
        panic!("ferry-sim printed {line:?}: {e}")
    });
    (child, info)
}

fn stop(mut child: Child) {
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let code = child.wait().unwrap();
    assert!(code.success(), "ferry-sim kms exited with {code:?}");
}

fn client(info: &serde_json::Value) -> KmsClient {
    let s = |k: &str| info[k].as_str().unwrap().to_string();
    let mut cfg = KmsConfig::pem(s("address"), s("ca"), s("client_cert"), s("client_key"));
    cfg.server_name = Some(s("server_name"));
    KmsClient::new(cfg).unwrap()
}

#[test]
fn ferry_sim_kms_serves_persists_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (child, info) = start(dir.path(), &[]);
    assert_eq!(info["objects"], 0);
    assert_eq!(info["ca"], dir.path().join("ca-cert.pem").to_str().unwrap());
    let c = client(&info);
    assert!(c.query().unwrap().operations.contains(&OP_REKEY_KEY_PAIR));
    let (sk, pk) = c.create_rsa_key_pair("sim/key", 2048).unwrap();
    c.activate(&sk).unwrap();
    let public = c.get(&pk, None).unwrap();
    stop(child);
    let state = std::fs::read_to_string(dir.path().join("kms-state.json")).unwrap();
    assert!(state.contains("sim/key"));

    // Restarted on the same directory, with faults: same certificates (the old
    // client files still work), same keys; Decrypt refused and Query says so.
    let (child, info) = start(dir.path(), &["--no-decrypt", "--hide-key", &sk]);
    assert_eq!(info["objects"], 2);
    let c = client(&info);
    assert_eq!(
        &c.get(&pk, None).unwrap().material[..],
        &public.material[..]
    );
    assert!(!c.query().unwrap().operations.contains(&OP_DECRYPT));
    let e = c.decrypt_rsa_oaep_sha1(&sk, &[0u8; 256]).unwrap_err();
    assert_eq!(e.reason(), Some(REASON_OPERATION_NOT_SUPPORTED), "{e}");
    let e = c.get(&sk, None).unwrap_err();
    assert_eq!(e.reason(), Some(REASON_ITEM_NOT_FOUND), "hidden key: {e}");
    stop(child);
}
