//! End-to-end through the `ferry` binary: init, backup, dedupe on re-run, list,
//! restore bit-identically, verify, prune, JSON output and exit codes.

mod common;
use common::*;

#[test]
fn backup_restore_verify_prune_through_the_cli() {
    let w = World::new();
    let img = w.image("a.img", 24 << 20, 1);
    let img2 = w.image("b.img", 5 << 20, 2);
    let o = w.ferry(&[
        "--json",
        "backup",
        "--name",
        "vm1",
        "--image",
        img.to_str().unwrap(),
        "--image",
        img2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let first: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p1 = first["point_id"].as_str().unwrap().to_string();
    assert!(first["disks"][0]["chunks_new"].as_u64().unwrap() > 0);

    // A re-run of the unchanged disk stores nothing new.
    let o = w.ferry(&[
        "--json",
        "backup",
        "--name",
        "vm1",
        "--image",
        img.to_str().unwrap(),
        "--image",
        img2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let second: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(second["parent"].as_str(), Some(p1.as_str()));
    for d in second["disks"].as_array().unwrap() {
        assert_eq!(d["chunks_new"], 0, "{second}");
        assert_eq!(d["bytes_new_stored"], 0);
    }

    let o = w.ferry(&["--json", "points", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["name"], "vm1");

    for (disk, src) in [(0, &img), (1, &img2)] {
        let t = w.path(&format!("r{disk}.img"));
        let o = w.ferry(&[
            "restore",
            "--point",
            "latest:vm1",
            "--disk",
            &disk.to_string(),
            "--target",
            t.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(hash(&t), hash(src));
    }
    // Refuses to overwrite an existing file.
    let o = w.ferry(&[
        "restore",
        "--point",
        &p1,
        "--target",
        w.path("r0.img").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));

    let o = w.ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("repository OK"));

    let o = w.ferry(&["--json", "prune", "--keep-last", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let pr: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(pr["points_removed"].as_array().unwrap().len(), 1);
    // The second point shared every chunk, so nothing is freed.
    assert_eq!(pr["chunks_deleted"], 0);
    let o = w.ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn usage_and_key_errors_have_distinct_exit_codes() {
    let w = World::new();
    let o = w.ferry(&["backup"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = w.ferry(&["prune"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no keep rule"));
    // A key file that is not a key.
    std::fs::write(w.path("bad.pem"), "not a key").unwrap();
    let img = w.image("a.img", 1 << 20, 1);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "backup",
            "-r",
            w.repo_dir.to_str().unwrap(),
            "--public-key",
            w.path("bad.pem").to_str().unwrap(),
            "--name",
            "x",
            "--image",
            img.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a usable RSA public key"),
        "{}",
        text(&o)
    );
    // Not a repository.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["points", "list", "-r", w.path("nothing").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not a ferry repository"));
}

#[test]
fn odd_sized_disks_restore_bit_identically() {
    // Sizes that are not multiples of the chunk size or of the 4 KiB direct-I/O block.
    let w = World::new();
    for (i, size) in [(5u64 << 20) + 1000, 4095, (CS as u64) * 3 + 512]
        .into_iter()
        .enumerate()
    {
        let img = w.path(&format!("odd{i}.img"));
        ferry_mocks::diskgen::generate(
            &img,
            &ferry_mocks::diskgen::DiskSpec {
                zero_pct: 0,
                ..ferry_mocks::diskgen::DiskSpec::mixed(size, i as u64)
            },
        )
        .unwrap();
        let rep = w.backup(&format!("odd{i}"), &[&img]);
        let t = w.path(&format!("odd{i}.restored"));
        w.restore(&rep.point_id, 0, &t).unwrap();
        assert_eq!(std::fs::metadata(&t).unwrap().len(), size);
        assert_eq!(hash(&t), hash(&img), "size {size}");
    }
}
