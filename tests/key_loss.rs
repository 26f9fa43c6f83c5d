//! Key-loss protection (issue 22): a tenant whose key lives on its own KMS opts
//! in half-way through a chain (`ferry repo recovery enable` with the provider's
//! recovery public key); then the tenant's KMS is destroyed for good. With only
//! the provider's offline recovery private key, `ferry repo import` says which
//! points open and through what, and restores confirm it bit for bit: every point
//! made after opt-in (including the chunks they share with older points), none
//! made before, none made after opt-out. A repository that never opted in opens
//! with nothing the provider holds. `repo info` and `points list` say which.

mod common;
use common::*;
use ferry_mocks::fixtures::pem_pair;
use ferry_mocks::kms::{KmsMock, KmsOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The ferry CLI against one repository, with the tenant's KMS while it exists.
struct Tenant {
    repo: PathBuf,
    kms: Option<KmsMock>,
}

impl Tenant {
    fn ferry(&self, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.args(args)
            .env("FERRY_REPO", &self.repo)
            .env_remove("FERRY_PUBLIC_KEY")
            .env_remove("FERRY_PRIVATE_KEY")
            .env_remove("FERRY_KMS")
            .env_remove("FERRY_KMS_KEY")
            .env_remove("RUST_LOG");
        if let Some(kms) = &self.kms {
            c.env("FERRY_KMS", kms.address())
                .env("FERRY_KMS_CA", kms.ca_path())
                .env("FERRY_KMS_CERT", kms.client_cert_path())
                .env("FERRY_KMS_CLIENT_KEY", kms.client_key_path())
                .env("FERRY_KMS_SERVER_NAME", "localhost")
                .env("FERRY_KMS_KEY", "ferry/acme/vm");
        }
        c.output().unwrap()
    }
    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.ferry(&a);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }
    fn backup(&self, img: &Path) -> (String, blake3::Hash) {
        let v = self.json(&["backup", "--name", "vm", "--image", img.to_str().unwrap()]);
        (v["point_id"].as_str().unwrap().to_string(), hash(img))
    }
}

fn opens_with(report: &Value) -> Vec<Value> {
    report["report"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["opens_with"].clone())
        .collect()
}

#[test]
fn the_recovery_key_opens_exactly_the_points_made_under_protection() {
    let w = World::new();
    let provider = pem_pair(w.dir.path(), "provider-recovery", 3072).unwrap();
    let (rec_pub, rec_key) = (
        provider.public.to_str().unwrap(),
        provider.private.to_str().unwrap(),
    );
    let mut t = Tenant {
        repo: w.path("acme-repo"),
        kms: Some(
            KmsMock::start(KmsOptions {
                state_dir: Some(w.path("kms")),
                ..Default::default()
            })
            .unwrap(),
        ),
    };
    t.json(&["keys", "create"]);
    t.json(&["repo", "init", "--tenant", "acme"]);
    let info = t.json(&["repo", "info"]);
    assert!(
        info["key_loss_protection"]["recovery_key"].is_null(),
        "{info}"
    );

    let img = w.image("disk.img", 6 << 20, 31);
    let before = t.backup(&img);

    // Opt in: new points only.
    let on = t.json(&[
        "repo",
        "recovery",
        "enable",
        "--recovery-public-key",
        rec_pub,
    ]);
    let rec_fp = on["recovery"]["key_ref"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(on["recovery"]["key_ref"]["source"], "recovery");
    ferry_mocks::diskgen::mutate(&img, 1, 0.1, 64 << 10).unwrap();
    let during1 = t.backup(&img); // shares most chunks with `before`
    ferry_mocks::diskgen::mutate(&img, 2, 0.1, 64 << 10).unwrap();
    let during2 = t.backup(&img);
    // Opt out again: the next point is the tenant's alone.
    t.json(&["repo", "recovery", "disable"]);
    ferry_mocks::diskgen::mutate(&img, 3, 0.1, 64 << 10).unwrap();
    let after = t.backup(&img);

    // Each manifest records it; `points list` and `repo info` show it.
    let pts = t.json(&["points", "list"]);
    let protected: Vec<bool> = pts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["recovery_key"]["fingerprint"] == rec_fp.as_str())
        .collect();
    assert_eq!(protected, [false, true, true, false], "{pts}");
    let info = t.json(&["repo", "info"]);
    assert_eq!(info["key_loss_protection"]["points_protected"], 2, "{info}");
    assert!(
        info["key_loss_protection"]["recovery_key"].is_null(),
        "{info}"
    );
    let human = t.ferry(&["repo", "info"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("protection off") && human.contains("2 of 4 point(s)"),
        "{human}"
    );

    // The tenant's KMS is lost for good (server and its state).
    drop(t.kms.take());
    std::fs::remove_dir_all(w.path("kms")).unwrap();

    // The provider's recovery key alone: the DR report names the path per
    // point and lists the tenant key only for the points nothing opens.
    let o = t.ferry(&[
        "--json",
        "repo",
        "import",
        "--recovery-private-key",
        rec_key,
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        opens_with(&rep),
        [
            serde_json::json!([]),
            serde_json::json!(["recovery_key"]),
            serde_json::json!(["recovery_key"]),
            serde_json::json!([])
        ],
        "{rep}"
    );
    let missing = rep["missing_keys"].as_array().unwrap();
    assert_eq!(missing.len(), 1, "{rep}");
    assert_eq!(missing[0]["key"]["source"], "kmip");
    assert_eq!(
        missing[0]["points"],
        serde_json::json!([before.0, after.0]),
        "{rep}"
    );
    let table = t.ferry(&["repo", "import", "--recovery-private-key", rec_key]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("recovery key") && table.contains("KEY MISSING"),
        "{table}"
    );

    // Restores confirm it, bit for bit, with nothing but the recovery key.
    for ((point, h), ok) in [
        (&before, false),
        (&during1, true),
        (&during2, true),
        (&after, false),
    ] {
        let target = w.path("restored.img");
        let _ = std::fs::remove_file(&target);
        let o = t.ferry(&[
            "restore",
            "--point",
            point,
            "--target",
            target.to_str().unwrap(),
            "--recovery-private-key",
            rec_key,
        ]);
        assert_eq!(o.status.success(), ok, "{point}: {}", text(&o));
        if ok {
            assert_eq!(hash(&target), *h, "{point}");
        } else {
            assert_eq!(o.status.code(), Some(5), "{}", text(&o));
        }
    }
    // `keys import` of the recovery key says which points it opens.
    let imp = t.json(&["keys", "import", "--private-key", rec_key]);
    assert_eq!(
        imp["opens_points"],
        serde_json::json!([during1.0, during2.0]),
        "{imp}"
    );

    // Nothing secret was stored: the repository holds the recovery public key
    // only (in the keyring header), never its private half.
    let secret = std::fs::read_to_string(&provider.private).unwrap();
    let body: String = secret.lines().filter(|l| !l.starts_with("-----")).collect();
    for f in files_under(&t.repo) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&body[..64]),
            "{}",
            f.display()
        );
    }
}

#[test]
fn without_opt_in_the_provider_opens_nothing_and_own_keys_are_refused() {
    let w = World::new(); // a PEM tenant, never opted in
    w.backup("vm", &[&w.image("a.img", 4 << 20, 5)]);
    let provider = pem_pair(w.dir.path(), "provider-recovery", 2048).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .arg("-r")
            .arg(&w.repo_dir)
            .env_remove("FERRY_PUBLIC_KEY")
            .env_remove("FERRY_PRIVATE_KEY")
            .output()
            .unwrap()
    };
    let rk = provider.private.to_str().unwrap();
    let o = run(&["--json", "repo", "import", "--recovery-private-key", rk]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(opens_with(&rep), [serde_json::json!([])], "{rep}");
    assert!(rep["report"]["recovery"].is_null());
    let o = run(&["keys", "import", "--private-key", rk]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let human = run(&["repo", "info"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("the provider cannot open"),
        "{}",
        text(&human)
    );

    // The tenant's own key cannot be its recovery key.
    let (pubk, privk) = (
        w.keys.public.to_str().unwrap(),
        w.keys.private.to_str().unwrap(),
    );
    let o = run(&[
        "repo",
        "recovery",
        "enable",
        "--public-key",
        pubk,
        "--private-key",
        privk,
        "--recovery-public-key",
        pubk,
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("the tenant's own key"), "{}", text(&o));
    // Changing the setting takes the tenant's private key (it lives in the
    // keyring, authenticated by that key): a public key alone is refused.
    let o = run(&[
        "repo",
        "recovery",
        "enable",
        "--public-key",
        pubk,
        "--recovery-public-key",
        provider.public.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
}
