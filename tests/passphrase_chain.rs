//! A chain mixing KMS-wrapped and passphrase-wrapped restore points (seed 001:
//! Veeam chains may mix password and KMS encryption), through the `ferry` CLI
//! against the mock KMS: point 1 wrapped by the tenant's KMS key, point 2 by a
//! passphrase (the KMS only unwraps the keyring), point 3 by the KMS again. Every
//! point restores bit-identically with the keyring and with the keyring deleted
//! (each point's own key); without the passphrase, point 2 is refused with a key
//! error naming the passphrase key, the others still restore, and `repo import`
//! lists exactly the passphrase key as missing.

mod common;
use common::*;
use ferry_mocks::kms::{KmsMock, KmsOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Env {
    kms: KmsMock,
    repo: PathBuf,
    passphrase: PathBuf,
}

impl Env {
    /// `ferry args` with the KMS in the environment; `key_name` names the tenant
    /// key (needed to wrap with the KMS), `passphrase` adds --passphrase-file.
    fn ferry(&self, args: &[&str], key_name: bool, passphrase: bool) -> Output {
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
            .env_remove("FERRY_PASSPHRASE_FILE")
            .env_remove("RUST_LOG");
        if key_name {
            c.env("FERRY_KMS_KEY", "ferry/acme/mixed");
        } else {
            c.env_remove("FERRY_KMS_KEY");
        }
        if passphrase {
            c.env("FERRY_PASSPHRASE_FILE", &self.passphrase);
        }
        c.output().unwrap()
    }

    fn backup(&self, img: &Path, key_name: bool, passphrase: bool) -> (String, serde_json::Value) {
        let o = self.ferry(
            &[
                "--json",
                "backup",
                "--name",
                "vm",
                "--image",
                img.to_str().unwrap(),
            ],
            key_name,
            passphrase,
        );
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (v["point_id"].as_str().unwrap().to_string(), v)
    }

    fn restore(&self, point: &str, target: &Path, passphrase: bool) -> Output {
        let _ = std::fs::remove_file(target);
        self.ferry(
            &[
                "restore",
                "--point",
                point,
                "--target",
                target.to_str().unwrap(),
            ],
            false,
            passphrase,
        )
    }
}

fn point_key(repo: &Path, point: &str) -> ferry::keys::KeyRef {
    let r = ferry::repo::Repository::open(repo).unwrap();
    r.read_manifest(point).unwrap().1.wrapped_key.key_ref
}

#[test]
fn a_chain_mixing_kms_and_passphrase_wrapped_points() {
    let w = World::new();
    let e = Env {
        kms: KmsMock::start(KmsOptions {
            state_dir: Some(w.path("kms")),
            ..Default::default()
        })
        .unwrap(),
        repo: w.path("mixed-repo"),
        passphrase: w.path("passphrase"),
    };
    std::fs::write(&e.passphrase, "a tenant passphrase of some length\n").unwrap();
    let o = e.ferry(
        &["repo", "init", "--tenant", "acme", "--kms-create"],
        true,
        false,
    );
    assert!(o.status.success(), "{}", text(&o));

    let imgs: Vec<PathBuf> = (0..3)
        .map(|i| w.image(&format!("v{i}.img"), 24 << 20, 100 + i))
        .collect();
    let (p1, _) = e.backup(&imgs[0], true, false);
    // Passphrase current: the KMS (no key name) only opens the keyring.
    let (p2, _) = e.backup(&imgs[1], false, true);
    // Back to the KMS key; the passphrase opens the keyring it re-wrapped.
    let (p3, _) = e.backup(&imgs[2], true, true);
    assert_eq!(point_key(&e.repo, &p1).source, "kmip");
    assert_eq!(point_key(&e.repo, &p2).source, "passphrase");
    assert_eq!(point_key(&e.repo, &p3).source, "kmip");
    let pass_key = point_key(&e.repo, &p2);

    let check_all = |label: &str| {
        for (p, img) in [(&p1, &imgs[0]), (&p2, &imgs[1]), (&p3, &imgs[2])] {
            let t = w.path(&format!("{label}-{p}.img"));
            let o = e.restore(p, &t, true);
            assert!(o.status.success(), "{label} {p}: {}", text(&o));
            assert_eq!(hash(&t), hash(img), "{label} {p}");
        }
    };
    check_all("keyring");
    std::fs::remove_file(e.repo.join("keyring")).unwrap();
    check_all("own-keys");

    // Without the passphrase: point 2 is refused naming its key (exit 5), the
    // KMS-wrapped points still restore.
    let t = w.path("no-pass.img");
    let o = e.restore(&p2, &t, false);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains(&pass_key.key_id), "{}", text(&o));
    for (p, img) in [(&p1, &imgs[0]), (&p3, &imgs[2])] {
        let o = e.restore(p, &t, false);
        assert!(o.status.success(), "{p}: {}", text(&o));
        assert_eq!(hash(&t), hash(img));
    }

    // Disaster recovery view: only the passphrase key is missing.
    let o = e.ferry(&["--json", "repo", "import"], false, false);
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    let missing = v["missing_keys"]
        .as_array()
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(missing.len(), 1, "{v:#}");
    assert_eq!(
        missing[0]["key"]["key_id"],
        pass_key.key_id.as_str(),
        "{v:#}"
    );
    let o = e.ferry(&["--json", "repo", "import"], false, true);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["missing_keys"].as_array().map(Vec::len), Some(0), "{v:#}");
}
