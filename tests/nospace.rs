//! A full file system during a backup: a clear "no space" error (exit code 6), no
//! new restore point, and the existing points still verify and restore.
//! Needs root to mount a small tmpfs (CI runs as root); elsewhere it says so and
//! stops without asserting.

mod common;
use common::*;
use std::process::Command;

#[test]
fn full_disk_fails_cleanly_and_harms_nothing() {
    if !is_root() {
        eprintln!("SKIPPED full_disk_fails_cleanly_and_harms_nothing: needs root to mount a tmpfs");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    mount(&[
        "-t".as_ref(),
        "tmpfs".as_ref(),
        "-o".as_ref(),
        "size=12m".as_ref(),
        "tmpfs".as_ref(),
        mnt.as_os_str(),
    ]);
    let _m = Mount(mnt.clone());

    let w = World::new();
    // Move the repository onto the small file system: a fresh one, same keys.
    let repo_dir = mnt.join("repo");
    let o = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "repo",
            "init",
            "-r",
            repo_dir.to_str().unwrap(),
            "--chunk-size",
            "256K",
            "--public-key",
            w.keys.public.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let ferry = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .env("FERRY_REPO", &repo_dir)
            .env("FERRY_PUBLIC_KEY", &w.keys.public)
            .env("FERRY_PRIVATE_KEY", &w.keys.private)
            .output()
            .unwrap()
    };
    let small = w.image("small.img", 2 << 20, 1);
    let o = ferry(&[
        "backup",
        "--name",
        "small",
        "--image",
        small.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // 32 MiB of mostly incompressible data cannot fit in what is left.
    let big = w.path("big.img");
    ferry_mocks::diskgen::generate(
        &big,
        &ferry_mocks::diskgen::DiskSpec {
            zero_pct: 0,
            compressible_pct: 0,
            ..ferry_mocks::diskgen::DiskSpec::mixed(32 << 20, 9)
        },
    )
    .unwrap();
    let o = ferry(&["backup", "--name", "big", "--image", big.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no space left"), "{err}");
    // No new point; the old one verifies and restores.
    let o = ferry(&["--json", "points", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let o = ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        hash(&restore_latest(ferry, "small", &w.path("r.img"))),
        hash(&small)
    );
    // Prune reclaims the failed run's chunks.
    let o = ferry(&["--json", "prune", "--keep-last", "5"]);
    assert!(o.status.success(), "{}", text(&o));
    let pr: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(pr["chunks_deleted"].as_u64().unwrap() > 0, "{pr}");
    let o = ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));
}
