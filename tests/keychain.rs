//! Multi-key chains and disaster recovery with PEM key pairs: a chain spanning a key
//! change restores with only the newest key through the keyring, and with each
//! point's own key once the keyring is gone; `ferry repo import` lists exactly the
//! keys that are missing and the points that need them.

mod common;
use common::*;
use ferry::keys::{KeySource, MultiKeySource, PemKeySource};
use ferry_mocks::fixtures::pem_pair;
use std::process::Command;

fn ferry(w: &World, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .arg("-r")
        .arg(&w.repo_dir)
        .output()
        .unwrap()
}

#[test]
fn chain_over_two_keys_restores_with_keyring_and_with_own_keys() {
    let w = World::new(); // repository initialised with key A (w.keys)
    let b = pem_pair(w.dir.path(), "tenant-b", 2048).unwrap();
    let a_src = || PemKeySource::open(Some(&w.keys.public), Some(&w.keys.private)).unwrap();
    let b_src = || PemKeySource::open(Some(&b.public), Some(&b.private)).unwrap();
    let img = w.image("disk.img", 6 << 20, 8);
    let backup = |ks: &dyn KeySource| {
        ferry::job::backup(
            &w.repo(),
            ks,
            ferry::job::BackupRequest {
                source_name: "vm".into(),
                identity: None,
                disks: vec![ferry::job::DiskInput {
                    source: Box::new(ferry::transport::file::FileSource::open(&img).unwrap()),
                    label: "d0".into(),
                    transport_reason: "test".into(),
                    change_id: None,
                    read: Default::default(),
                }],
                pipeline: ferry::pipeline::PipelineConfig::new(Some(2), CS, 16 << 20),
                lock_wait: std::time::Duration::from_secs(5),
                snapshot: None,
            },
            &ferry::progress::Progress::default(),
        )
        .unwrap()
    };
    let p1 = backup(&a_src());
    let h1 = hash(&img);
    // The tenant moves to key B: B is current, A still opens the old keyring.
    ferry_mocks::diskgen::mutate(&img, 1, 0.2, 64 << 10).unwrap();
    let both = MultiKeySource::new(vec![Box::new(b_src()), Box::new(a_src())]).unwrap();
    let p2 = backup(&both);
    let h2 = hash(&img);
    ferry_mocks::diskgen::mutate(&img, 2, 0.2, 64 << 10).unwrap();
    let p3 = backup(&b_src()); // the keyring is now wrapped by B alone
    let h3 = hash(&img);
    let fp = |p: &ferry_mocks::fixtures::PemPair| {
        PemKeySource::open(Some(&p.public), None)
            .unwrap()
            .current_key()
            .unwrap()
            .fingerprint
    };
    let fp_a = fp(&w.keys);

    let restore_all = |args: &[&str], expect_ok: &[bool; 3]| {
        for ((p, h), ok) in [(&p1.point_id, h1), (&p2.point_id, h2), (&p3.point_id, h3)]
            .into_iter()
            .zip(expect_ok)
        {
            let t = w.path("r.img");
            let _ = std::fs::remove_file(&t);
            let mut a = vec!["restore", "--point", p, "--target", t.to_str().unwrap()];
            a.extend_from_slice(args);
            let o = ferry(&w, &a);
            assert_eq!(o.status.success(), *ok, "{p}: {}", text(&o));
            if *ok {
                assert_eq!(hash(&t), h);
            } else {
                assert_eq!(o.status.code(), Some(5), "{}", text(&o));
                assert!(
                    String::from_utf8_lossy(&o.stderr).contains(&fp_a[..16]),
                    "{}",
                    text(&o)
                );
            }
        }
    };
    let bkey = ["--private-key", b.private.to_str().unwrap()];
    // With the keyring, the newest key alone restores the whole chain.
    restore_all(&bkey, &[true, true, true]);
    // ... and the DR report says so (issue 22): every point opens with B alone,
    // p1 (wrapped by A) through the keyring, the others through their own key
    // as well; no key to obtain.
    let o = ferry(&w, &["--json", "repo", "import", bkey[0], bkey[1]]);
    assert!(o.status.success(), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["missing_keys"], serde_json::json!([]), "{rep}");
    let paths: Vec<serde_json::Value> = rep["report"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["opens_with"].clone())
        .collect();
    assert_eq!(
        paths,
        [
            serde_json::json!(["keyring"]),
            serde_json::json!(["own_key", "keyring"]),
            serde_json::json!(["own_key", "keyring"])
        ],
        "{rep}"
    );
    let human = ferry(&w, &["repo", "import", bkey[0], bkey[1]]);
    let table = String::from_utf8_lossy(&human.stdout);
    assert!(
        !table.contains("KEY MISSING") && table.contains("no key to obtain"),
        "{table}"
    );

    // Disaster recovery: the keyring is lost.
    std::fs::remove_file(w.repo_dir.join("keyring")).unwrap();
    let o = ferry(
        &w,
        &[
            "--json",
            "repo",
            "import",
            "--private-key",
            b.private.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let missing = rep["missing_keys"].as_array().unwrap();
    assert_eq!(missing.len(), 1, "{rep}");
    assert_eq!(missing[0]["key"]["fingerprint"], fp_a.as_str());
    assert_eq!(missing[0]["points"], serde_json::json!([p1.point_id]));
    let st: Vec<&str> = rep["report"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"].as_str().unwrap_or("key_missing"))
        .collect();
    assert_eq!(st, ["key_missing", "opens", "opens"], "{rep}");
    // Points wrapped by B still restore; p1 needs A.
    restore_all(&bkey, &[false, true, true]);
    // The key exported by hand makes the whole chain restorable again.
    let with_a = [
        "--private-key",
        b.private.to_str().unwrap(),
        "--extra-private-key",
        w.keys.private.to_str().unwrap(),
    ];
    let o = ferry(
        &w,
        &["repo", "import", with_a[0], with_a[1], with_a[2], with_a[3]],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("every restore point opens"));
    restore_all(&with_a, &[true, true, true]);
}
