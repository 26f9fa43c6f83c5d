//! ferry's KMIP client against a real KMS, the PyKMIP server, over mutual TLS:
//! DiscoverVersions, Query, CreateKeyPair, Activate, Locate, Get (public and
//! private), GetAttributes, Decrypt (PyKMIP refuses RSA: the Get-private fallback is
//! proven instead), Revoke, Destroy; then a full backup and restore with PyKMIP
//! holding the tenant key. The server comes from the venv .ci/run creates.

mod common;
use common::*;
use ferry::keys::{KeySource, KmsKeySource};
use ferry::kmip::client::{KmsClient, KmsConfig};
use ferry::kmip::tags::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct PyKmip {
    child: Child,
    port: u16,
    certs: PathBuf,
}
impl Drop for PyKmip {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pykmip(dir: &Path) -> PyKmip {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/pykmip-server");
    assert!(bin.exists(), "{} missing: .ci/run creates the venv (python3 -m venv .venv && .venv/bin/pip install pykmip)", bin.display());
    let certs = dir.join("kms-certs");
    ferry_mocks::fixtures::tls_certs(&certs).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let conf = dir.join("server.conf");
    std::fs::write(
        &conf,
        format!(
            "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={c}/server-cert.pem\nkey_path={c}/server-key.pem\nca_path={c}/ca-cert.pem\nauth_suite=TLS1.2\nenable_tls_client_auth=True\npolicy_path={d}/policies\nlogging_level=INFO\ndatabase_path={d}/pykmip.db\ntls_cipher_suites=\n    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384\n    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\n",
            c = certs.display(),
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-f")
        .arg(&conf)
        .arg("-l")
        .arg(dir.join("server.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "PyKMIP did not start; see {}",
            dir.join("server.log").display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    PyKmip { child, port, certs }
}

fn client(k: &PyKmip) -> KmsClient {
    let mut cfg = KmsConfig::pem(
        format!("127.0.0.1:{}", k.port),
        k.certs.join("ca-cert.pem"),
        k.certs.join("client-cert.pem"),
        k.certs.join("client-key.pem"),
    );
    cfg.server_name = Some("localhost".into());
    cfg.timeout = Duration::from_secs(20);
    KmsClient::new(cfg).unwrap()
}

#[test]
fn pykmip_operations_and_a_kms_held_backup() {
    let w = World::new();
    let kms = pykmip(w.dir.path());
    let c = client(&kms);

    let versions = c.discover_versions().unwrap();
    assert!(versions.contains(&(1, 4)), "{versions:?}");
    assert_eq!(c.version(), (1, 4));
    let q = c.query().unwrap();
    for op in [
        OP_CREATE_KEY_PAIR,
        OP_LOCATE,
        OP_GET,
        OP_GET_ATTRIBUTES,
        OP_ACTIVATE,
        OP_REVOKE,
        OP_DESTROY,
    ] {
        assert!(
            q.operations.contains(&op),
            "PyKMIP should support {}: {:?}",
            operation_name(op),
            q.operations
        );
    }

    let (sk, pk) = c.create_rsa_key_pair("ferry/acme/test", 2048).unwrap();
    assert_eq!(c.state(&pk).unwrap(), STATE_PRE_ACTIVE);
    c.activate(&sk).unwrap();
    c.activate(&pk).unwrap();
    assert_eq!(c.state(&pk).unwrap(), STATE_ACTIVE);
    assert_eq!(
        c.locate("ferry/acme/test", OBJ_PUBLIC_KEY, None).unwrap(),
        vec![pk.clone()]
    );
    assert_eq!(
        c.locate("ferry/acme/test", OBJ_PRIVATE_KEY, Some(STATE_ACTIVE))
            .unwrap(),
        vec![sk.clone()]
    );
    let public = c.get(&pk, None).unwrap();
    assert_eq!(public.format, FMT_PKCS1);
    let private = c.get(&sk, None).unwrap();
    assert_eq!(private.format, FMT_PKCS8);
    // The two halves belong together.
    use rsa::pkcs8::DecodePrivateKey;
    let rsk = rsa::RsaPrivateKey::from_pkcs8_der(&private.material).unwrap();
    let rpk = ferry::keys::rsa_oaep_wrap(
        &ferry::keys::kms_public_from(public.format, &public.material).unwrap(),
        &[9u8; 32],
        "t",
    )
    .unwrap();
    assert_eq!(
        &ferry::keys::rsa_oaep_unwrap(&rsk, &rpk, "t").unwrap()[..],
        &[9u8; 32]
    );
    let attrs = c
        .get_attributes(&pk, &["Name", "Cryptographic Length"])
        .unwrap();
    assert!(
        attrs.iter().any(|(n, _)| n == "Cryptographic Length"),
        "{attrs:?}"
    );
    // PyKMIP decrypts symmetric keys only: a clear, typed refusal.
    let e = c.decrypt_rsa_oaep_sha1(&sk, &rpk).unwrap_err();
    assert!(e.reason().is_some(), "{e}");

    // A backup and restore with PyKMIP holding the tenant key (Get-private fallback).
    let ks = KmsKeySource::open(client(&kms), "ferry/acme/repo", true, 2048).unwrap();
    assert_eq!(ks.current_key().unwrap().source, "kmip");
    let repo_dir = w.path("kms-repo");
    let repo = ferry::repo::Repository::init(&repo_dir, CS, "acme", &ks).unwrap();
    let img = w.image("k.img", 6 << 20, 17);
    let rep = ferry::job::backup(
        &repo,
        &ks,
        ferry::job::BackupRequest {
            source_name: "vm".into(),
            identity: None,
            disks: vec![ferry::job::DiskInput {
                source: Box::new(ferry::transport::file::FileSource::open(&img).unwrap()),
                label: "d".into(),
                transport_reason: "test".into(),
                change_id: None,
                read: Default::default(),
            }],
            pipeline: ferry::pipeline::PipelineConfig::new(Some(2), CS, 16 << 20),
            lock_wait: Duration::from_secs(5),
            snapshot: None,
        },
        &ferry::progress::Progress::default(),
    )
    .unwrap();
    let t = w.path("k.restored");
    ferry::job::restore(
        &repo,
        &ks,
        &rep.point_id,
        0,
        &t,
        ferry::pipeline::PipelineConfig::new(Some(2), CS, 16 << 20),
        &ferry::progress::Progress::default(),
    )
    .unwrap();
    assert_eq!(hash(&t), hash(&img));
    // Without the keyring too (the point's own KMS-wrapped key).
    std::fs::remove_file(repo_dir.join("keyring")).unwrap();
    let t2 = w.path("k.restored2");
    ferry::job::restore(
        &repo,
        &ks,
        &rep.point_id,
        0,
        &t2,
        ferry::pipeline::PipelineConfig::new(Some(1), CS, 8 << 20),
        &ferry::progress::Progress::default(),
    )
    .unwrap();
    assert_eq!(hash(&t2), hash(&img));

    // Revoke and Destroy (operator actions; ferry never does this by itself).
    c.revoke(&sk, REVOKE_CESSATION, Some("test done")).unwrap();
    assert_ne!(c.state(&sk).unwrap(), STATE_ACTIVE);
    c.destroy(&sk).unwrap();
    let e = c.get(&sk, None).unwrap_err();
    assert!(e.to_string().contains("KMS 127.0.0.1"), "{e}");
}

#[test]
fn cli_with_pykmip_keys_test_create_backup_restore_and_kms_down() {
    let w = World::new();
    let kms = pykmip(w.dir.path());
    let repo = w.path("cli-repo");
    let (port, certs) = (kms.port, kms.certs.clone());
    let env = |c: &mut Command| {
        c.env("FERRY_KMS", format!("127.0.0.1:{port}"))
            .env("FERRY_KMS_CA", certs.join("ca-cert.pem"))
            .env("FERRY_KMS_CERT", certs.join("client-cert.pem"))
            .env("FERRY_KMS_CLIENT_KEY", certs.join("client-key.pem"))
            .env("FERRY_KMS_SERVER_NAME", "localhost")
            .env("FERRY_KMS_KEY", "ferry/acme/cli")
            .env("FERRY_REPO", &repo)
            .env_remove("FERRY_PUBLIC_KEY")
            .env_remove("FERRY_PRIVATE_KEY");
    };
    let run = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.args(args);
        env(&mut c);
        c.output().unwrap()
    };
    let o = run(&["--json", "keys", "test"]);
    assert!(o.status.success(), "{}", text(&o));
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(t["using"], serde_json::json!([1, 4]));
    assert_eq!(t["key"]["public_keys"], serde_json::json!([]));
    let o = run(&["keys", "create"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["repo", "init", "--tenant", "acme"]);
    assert!(o.status.success(), "{}", text(&o));
    let img = w.image("c.img", 4 << 20, 3);
    let o = run(&[
        "--json",
        "backup",
        "--name",
        "vm",
        "--image",
        img.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["--json", "points", "list"]);
    let pts: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(pts[0]["key"]["source"], "kmip");
    assert_eq!(
        hash(&restore_latest(run, "vm", &w.path("c.restored"))),
        hash(&img)
    );

    // The KMS goes down: a backup fails before writing anything, naming the KMS.
    let before = files_under(&repo).len();
    drop(kms);
    let o = run(&["backup", "--name", "vm", "--image", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("unreachable"),
        "{err}"
    );
    assert_eq!(
        files_under(&repo).len(),
        before,
        "nothing may be written while the KMS is down"
    );
}

/// PyKMIP has no ReKeyKeyPair and keeps no links: rotation there is a new pair of
/// the same name (what `ferry keys rotate` does when Query does not list
/// ReKeyKeyPair), and ferry follows the name to its newest Active pair.
#[test]
fn rotation_on_pykmip_is_a_new_pair_of_the_same_name() {
    let w = World::new();
    let kms = pykmip(w.dir.path());
    let repo = w.path("rot-repo");
    let (port, certs) = (kms.port, kms.certs.clone());
    let run = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.args(args)
            .env("FERRY_KMS", format!("127.0.0.1:{port}"))
            .env("FERRY_KMS_CA", certs.join("ca-cert.pem"))
            .env("FERRY_KMS_CERT", certs.join("client-cert.pem"))
            .env("FERRY_KMS_CLIENT_KEY", certs.join("client-key.pem"))
            .env("FERRY_KMS_SERVER_NAME", "localhost")
            .env("FERRY_KMS_KEY", "ferry/acme/rot")
            .env("FERRY_REPO", &repo)
            .env_remove("FERRY_PUBLIC_KEY")
            .env_remove("FERRY_PRIVATE_KEY");
        c.output().unwrap()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = run(&a);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let v1 = json(&["keys", "create"])["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    json(&["repo", "init", "--tenant", "acme"]);
    let img = w.image("r.img", 4 << 20, 5);
    let p1 = json(&["backup", "--name", "vm", "--image", img.to_str().unwrap()])["point_id"]
        .as_str()
        .unwrap()
        .to_string();
    let h1 = hash(&img);

    // ReKeyKeyPair is refused by PyKMIP with a typed reason.
    let e = client(&kms).rekey_key_pair(&v1).unwrap_err();
    assert!(e.reason().is_some(), "{e}");

    let r = json(&["keys", "rotate"]);
    assert_eq!(r["method"], "new-pair", "{r}");
    let v2 = r["new"]["key_id"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);
    assert_eq!(r["new"]["key_version"], 2);
    assert_eq!(client(&kms).state(&v1).unwrap(), STATE_DEACTIVATED);

    // Sync re-wraps the keyring: the old key is fetched (PyKMIP cannot decrypt
    // RSA) although it is Deactivated.
    let s = json(&["keys", "sync"]);
    assert_eq!(s[0]["rotated"], true, "{s}");
    assert_eq!(s[0]["keyring"]["status"], "rewrapped", "{s}");
    let l = json(&["keys", "list"]);
    let pairs = l[0]["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 2, "{l}");
    assert_eq!(pairs[0]["private_id"], v1.as_str());
    assert_eq!(pairs[0]["state_name"], "Deactivated");
    assert_eq!(pairs[1]["private_id"], v2.as_str());
    assert_eq!(pairs[1]["current"], true);
    assert!(pairs[1]["replaces"].is_null(), "PyKMIP keeps no links");

    ferry_mocks::diskgen::mutate(&img, 3, 0.2, 64 << 10).unwrap();
    let p2 = json(&["backup", "--name", "vm", "--image", img.to_str().unwrap()])["point_id"]
        .as_str()
        .unwrap()
        .to_string();
    let h2 = hash(&img);
    let pts = json(&["points", "list"]);
    assert_eq!(pts[1]["key"]["key_id"], v2.as_str());
    assert_eq!(pts[1]["key"]["key_version"], 2);
    for keyring in [true, false] {
        if !keyring {
            std::fs::remove_file(repo.join("keyring")).unwrap();
        }
        for (p, h) in [(&p1, h1), (&p2, h2)] {
            let t = w.path("r.restored");
            let _ = std::fs::remove_file(&t);
            let o = run(&["restore", "--point", p, "--target", t.to_str().unwrap()]);
            assert!(o.status.success(), "{}", text(&o));
            assert_eq!(hash(&t), h, "{p} keyring={keyring}");
        }
    }
}
