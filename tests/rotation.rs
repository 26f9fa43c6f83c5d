//! Key rotation and disaster recovery with KMS-held keys (issue 8), through the
//! `ferry` CLI against the mock KMS: a chain over three key versions (two
//! ReKeyKeyPair: one by the KMS administrator, one by `ferry keys rotate`),
//! rotation picked up by `ferry keys sync` and by a backup's job start, the keyring
//! re-wrapped with the newest key, every point restored bit-identically with the
//! keyring and again with the keyring deleted; `ferry keys list` shows the
//! versions; with one key destroyed on the KMS, `ferry repo import` on a fresh
//! installation lists exactly the missing key id, the other points still restore,
//! and the key exported by hand (`ferry keys import`, `--extra-private-key`) opens
//! the rest. The same library path via `sync_tenant` from a configuration file.

mod common;
use common::*;
use ferry::kmip::client::KmsClient;
use ferry::kmip::tags::*;
use ferry_mocks::kms::{KmsMock, KmsOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Env {
    kms: KmsMock,
    repo: PathBuf,
}

impl Env {
    fn ferry(&self, args: &[&str], with_key_name: bool) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.args(args)
            .env("FERRY_KMS", self.kms.address())
            .env("FERRY_KMS_CA", self.kms.ca_path())
            .env("FERRY_KMS_CERT", self.kms.client_cert_path())
            .env("FERRY_KMS_CLIENT_KEY", self.kms.client_key_path())
            .env("FERRY_KMS_SERVER_NAME", "localhost")
            .env("FERRY_REPO", &self.repo)
            .env_remove("FERRY_PUBLIC_KEY")
            .env_remove("FERRY_PRIVATE_KEY")
            .env_remove("RUST_LOG");
        if with_key_name {
            c.env("FERRY_KMS_KEY", "ferry/acme/chain");
        } else {
            c.env_remove("FERRY_KMS_KEY");
        }
        c.output().unwrap()
    }
    fn ok_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.ferry(&a, true);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }
    fn backup(&self, img: &Path) -> String {
        let v = self.ok_json(&["backup", "--name", "vm", "--image", img.to_str().unwrap()]);
        v["point_id"].as_str().unwrap().to_string()
    }
    fn restore(&self, point: &str, target: &Path, extra: &[&str], with_key_name: bool) -> Output {
        let _ = std::fs::remove_file(target);
        let mut a = vec![
            "restore",
            "--point",
            point,
            "--target",
            target.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        self.ferry(&a, with_key_name)
    }
    fn client(&self) -> KmsClient {
        KmsClient::new(self.kms.client_config()).unwrap()
    }
}

#[test]
fn chain_over_three_key_versions_and_disaster_recovery() {
    let w = World::new();
    let e = Env {
        kms: KmsMock::start(KmsOptions {
            state_dir: Some(w.path("kms")),
            ..Default::default()
        })
        .unwrap(),
        repo: w.path("kms-repo"),
    };
    let created = e.ok_json(&["keys", "create"]);
    let v1 = created["key_id"].as_str().unwrap().to_string();
    assert_eq!(created["key_version"], 1);
    e.ok_json(&["repo", "init", "--tenant", "acme"]);

    let img = w.image("disk.img", 6 << 20, 21);
    let p1 = e.backup(&img);
    let h1 = hash(&img);

    // Rotation 1: the KMS administrator re-keys. `keys sync` notices and
    // re-wraps the keyring.
    let (v2, _) = e.client().rekey_key_pair(&v1).unwrap();
    let s = e.ok_json(&["keys", "sync"]);
    assert_eq!(s[0]["rotated"], true, "{s}");
    assert_eq!(s[0]["previous"]["key_id"], v1.as_str());
    assert_eq!(s[0]["current"]["key_id"], v2.as_str());
    assert_eq!(s[0]["current"]["key_version"], 2);
    assert_eq!(s[0]["keyring"]["status"], "rewrapped");
    assert_eq!(s[0]["keyring"]["from"]["key_id"], v1.as_str());
    let again = e.ok_json(&["keys", "sync"]);
    assert_eq!(again[0]["keyring"]["status"], "up_to_date", "{again}");
    assert_eq!(again[0]["rotated"], false);

    ferry_mocks::diskgen::mutate(&img, 1, 0.2, 64 << 10).unwrap();
    let p2 = e.backup(&img);
    let h2 = hash(&img);

    // Rotation 2: by the operator, through ferry (ReKeyKeyPair on this KMS). No
    // sync: the next backup's job start picks the new key up and re-wraps the
    // keyring itself.
    let r = e.ok_json(&["keys", "rotate"]);
    assert_eq!(r["method"], "rekey");
    assert_eq!(r["old"]["key_id"], v2.as_str());
    let v3 = r["new"]["key_id"].as_str().unwrap().to_string();
    assert_eq!(r["new"]["key_version"], 3);
    ferry_mocks::diskgen::mutate(&img, 2, 0.2, 64 << 10).unwrap();
    let p3 = e.backup(&img);
    let h3 = hash(&img);
    let s = e.ok_json(&["keys", "sync"]);
    assert_eq!(
        s[0]["keyring"]["status"], "up_to_date",
        "the backup re-wrapped it: {s}"
    );
    assert_eq!(s[0]["previous"]["key_id"], v3.as_str());

    // Each point records its own key id and version.
    let pts = e.ok_json(&["points", "list"]);
    let keys: Vec<(String, u64)> = pts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["key"]["key_id"].as_str().unwrap().to_string(),
                p["key"]["key_version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![(v1.clone(), 1), (v2.clone(), 2), (v3.clone(), 3)]
    );

    // `keys list`: three versions, links, states, the current one.
    let l = e.ok_json(&["keys", "list"]);
    let pairs = l[0]["pairs"].as_array().unwrap();
    let rows: Vec<(&str, &str, bool)> = pairs
        .iter()
        .map(|p| {
            (
                p["private_id"].as_str().unwrap(),
                p["state_name"].as_str().unwrap(),
                p["current"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (v1.as_str(), "Deactivated", false),
            (v2.as_str(), "Deactivated", false),
            (v3.as_str(), "Active", true)
        ]
    );
    assert_eq!(pairs[1]["replaces"], v1.as_str());
    assert_eq!(pairs[1]["replaced_by"], v3.as_str());
    let human = e.ferry(&["keys", "list"], true);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("replaced by"),
        "{}",
        text(&human)
    );

    let points = [(&p1, h1), (&p2, h2), (&p3, h3)];
    let restore_all = |extra: &[&str], with_name: bool, ok: [bool; 3]| {
        for ((p, h), ok) in points.iter().zip(ok) {
            let t = w.path("r.img");
            let o = e.restore(p, &t, extra, with_name);
            assert_eq!(o.status.success(), ok, "{p}: {}", text(&o));
            if ok {
                assert_eq!(hash(&t), *h, "{p}");
            } else {
                assert_eq!(o.status.code(), Some(5), "{}", text(&o));
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(
                    err.contains(&format!("key {v2}")) && err.contains("fix:"),
                    "{err}"
                );
            }
        }
    };
    // With the keyring: everything through the newest key.
    restore_all(&[], true, [true; 3]);
    // Keyring deleted: each point's own key (versions 1 and 2 are Deactivated
    // on the KMS and still decrypt).
    std::fs::remove_file(e.repo.join("keyring")).unwrap();
    restore_all(&[], true, [true; 3]);

    // A fresh installation (no key name, no keyring) with the KMS holding every
    // key: every point opens.
    let o = e.ferry(&["--json", "repo", "import"], false);
    assert!(o.status.success(), "{}", text(&o));

    // The KMS administrator exports version 2's private key by hand (last resort
    // material), then destroys version 2.
    let c = e.client();
    let exported = c.get(&v2, Some(FMT_PKCS8)).unwrap();
    let pem = w.path("v2-exported.pem");
    {
        use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
        let sk = rsa::RsaPrivateKey::from_pkcs8_der(&exported.material).unwrap();
        std::fs::write(
            &pem,
            sk.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
    }
    c.destroy(&v2).unwrap();

    // DR import lists exactly the missing key id and the point that needs it.
    let o = e.ferry(&["--json", "repo", "import"], false);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
    let missing = rep["missing_keys"].as_array().unwrap();
    assert_eq!(missing.len(), 1, "{rep}");
    assert_eq!(missing[0]["key"]["key_id"], v2.as_str());
    assert_eq!(missing[0]["key"]["kms"], e.kms.address().as_str());
    assert_eq!(missing[0]["points"], serde_json::json!([p2]));
    assert!(missing[0]["or_recovery_key"].is_null(), "{rep}");
    let st: Vec<&str> = rep["report"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"].as_str().unwrap_or("key_missing"))
        .collect();
    assert_eq!(st, ["opens", "key_missing", "opens"], "{rep}");
    let human = e.ferry(&["repo", "import"], false);
    let table = String::from_utf8_lossy(&human.stdout);
    assert!(
        table.contains("KEY MISSING") && table.contains(&v2),
        "{table}"
    );
    // The other points still restore; p2 fails with a message naming the key.
    restore_all(&[], false, [true, false, true]);

    // Last resort: the exported key. `keys import` checks it and stores nothing.
    let before: Vec<_> = files_under(&e.repo);
    let o = e.ferry(
        &[
            "--json",
            "keys",
            "import",
            "--private-key",
            pem.to_str().unwrap(),
        ],
        false,
    );
    assert!(o.status.success(), "{}", text(&o));
    let imp: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(imp["opens_points"], serde_json::json!([p2]), "{imp}");
    assert_eq!(files_under(&e.repo), before, "keys import writes nothing");
    let wrong = w.keys.private.to_str().unwrap().to_string();
    let o = e.ferry(&["keys", "import", "--private-key", &wrong], false);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    // With it, the whole chain opens and restores again.
    let extra = ["--extra-private-key", pem.to_str().unwrap()];
    let o = e.ferry(&["repo", "import", extra[0], extra[1]], false);
    assert!(o.status.success(), "{}", text(&o));
    restore_all(&extra, false, [true; 3]);

    // The KMS administrator retires the last version too: restores (which only
    // unwrap) still work with the key name configured, a backup fails before
    // writing anything, naming the key and the fix.
    c.revoke(&v3, REVOKE_CESSATION, None).unwrap();
    let t = w.path("r3.img");
    let o = e.restore(&p3, &t, &[], true);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(hash(&t), h3);
    let before = files_under(&e.repo);
    let o = e.ferry(
        &["backup", "--name", "vm", "--image", img.to_str().unwrap()],
        true,
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no Active key pair") && err.contains("ferry/acme/chain"),
        "{err}"
    );
    assert_eq!(files_under(&e.repo), before, "nothing written");
}

#[test]
fn sync_tenant_from_a_configuration_file() {
    let w = World::new();
    let kms = KmsMock::start(KmsOptions::default()).unwrap();
    let repo = w.path("cfg-repo");
    let cfg_path = w.path("ferry.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[[tenant]]\nname = \"acme\"\nrepository = \"{}\"\n[tenant.kms]\naddress = \"{}\"\nserver_name = \"localhost\"\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\nkey_name = \"ferry/acme/cfg\"\ncreate_key = true\n",
            repo.display(),
            kms.address(),
            kms.ca_path().display(),
            kms.client_cert_path().display(),
            kms.client_key_path().display()
        ),
    )
    .unwrap();
    let cfg = ferry::config::Config::load(&cfg_path).unwrap();
    let t = cfg.tenant(Some("acme")).unwrap();
    // No repository yet: the key is created (create_key) and reported.
    let r = ferry::keys::sync::sync_tenant(t).unwrap();
    assert_eq!(r.keyring, ferry::keys::sync::KeyringSync::NoRepository);
    assert_eq!(r.current.key_version, 1);
    assert_eq!(r.tenant.as_deref(), Some("acme"));
    let src = ferry::keys::tenant::open_key_source(t).unwrap();
    ferry::repo::Repository::init(&repo, CS, "acme", &*src).unwrap();
    let old = r.current.key_id.clone();
    let (new, _) = KmsClient::new(kms.client_config())
        .unwrap()
        .rekey_key_pair(&old)
        .unwrap();
    let r = ferry::keys::sync::sync_tenant(t).unwrap();
    assert!(r.rotated);
    assert_eq!(r.previous.as_ref().unwrap().key_id, old);
    assert_eq!(
        (r.current.key_id.as_str(), r.current.key_version),
        (new.as_str(), 2)
    );
    assert!(matches!(
        r.keyring,
        ferry::keys::sync::KeyringSync::Rewrapped { .. }
    ));
    assert_eq!(r.versions.len(), 2);
    // The CLI over the same file, with the KMS down: a typed error, exit 5.
    kms.faults().set_down(true);
    let o = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["keys", "sync", "--config", cfg_path.to_str().unwrap()])
        .env_remove("FERRY_KMS")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&kms.address()) && err.contains("ferry/acme/cfg") && err.contains("fix:"),
        "{err}"
    );
    kms.faults().set_down(false);
    let o = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "--json",
            "keys",
            "sync",
            "--config",
            cfg_path.to_str().unwrap(),
        ])
        .env_remove("FERRY_KMS")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["tenant"], "acme");
    assert_eq!(v[0]["keyring"]["status"], "up_to_date");
}

/// Seed 001: a chain whose points are wrapped by different key stores. The
/// tenant starts with a PEM key pair and moves to its KMS; the move's first backup
/// opens the PEM-wrapped keyring with the old private key and re-wraps it with
/// the KMS key. Without the keyring, each point needs its own store.
#[test]
fn a_chain_mixing_pem_and_kms_wrapped_points() {
    let w = World::new(); // repository initialised with the PEM pair w.keys
    let img = w.image("mixed.img", 4 << 20, 33);
    let p1 = w.backup("vm", &[&img]).point_id;
    let h1 = hash(&img);
    let kms = KmsMock::start(KmsOptions::default()).unwrap();
    let kms_env = |c: &mut Command| {
        c.env("FERRY_KMS", kms.address())
            .env("FERRY_KMS_CA", kms.ca_path())
            .env("FERRY_KMS_CERT", kms.client_cert_path())
            .env("FERRY_KMS_CLIENT_KEY", kms.client_key_path())
            .env("FERRY_KMS_SERVER_NAME", "localhost")
            .env("FERRY_KMS_KEY", "ferry/acme/mixed")
            .env_remove("FERRY_PUBLIC_KEY")
            .env_remove("FERRY_PRIVATE_KEY");
    };
    let run = |args: &[&str]| {
        let mut c = w.command(args);
        kms_env(&mut c);
        c.output().unwrap()
    };
    let old = ["--extra-private-key", w.keys.private.to_str().unwrap()];
    assert!(run(&["keys", "create"]).status.success());
    ferry_mocks::diskgen::mutate(&img, 4, 0.2, 64 << 10).unwrap();
    let o = run(&[
        "--json",
        "backup",
        "--name",
        "vm",
        "--image",
        img.to_str().unwrap(),
        old[0],
        old[1],
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let p2 = serde_json::from_slice::<Value>(&o.stdout).unwrap()["point_id"]
        .as_str()
        .unwrap()
        .to_string();
    let h2 = hash(&img);
    let kr = w.repo().keyring_header().unwrap();
    assert_eq!(
        kr.wrapped_key.key_ref.source, "kmip",
        "the keyring moved to the KMS key"
    );

    let restore = |p: &str, extra: &[&str]| {
        let t = w.path("m.restored");
        let _ = std::fs::remove_file(&t);
        let mut a = vec!["restore", "--point", p, "--target", t.to_str().unwrap()];
        a.extend_from_slice(extra);
        let o = run(&a);
        (
            o.status.code(),
            if o.status.success() {
                Some(hash(&t))
            } else {
                None
            },
            text(&o),
        )
    };
    // With the keyring, the KMS key alone opens both points.
    assert_eq!(restore(&p1, &[]).1, Some(h1));
    assert_eq!(restore(&p2, &[]).1, Some(h2));
    // Without it, p1 needs the PEM key and p2 the KMS.
    std::fs::remove_file(w.repo_dir.join("keyring")).unwrap();
    let (code, _, t) = restore(&p1, &[]);
    assert_eq!(code, Some(5), "{t}");
    assert_eq!(restore(&p1, &old).1, Some(h1));
    assert_eq!(restore(&p2, &old).1, Some(h2));
    let o = run(&["--json", "repo", "import"]);
    let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["missing_keys"].as_array().unwrap().len(), 1, "{rep}");
    assert_eq!(rep["missing_keys"][0]["key"]["source"], "pem");
    assert_eq!(rep["missing_keys"][0]["points"], serde_json::json!([p1]));
}
