//! Retention and garbage collection: ten points of a changing disk, keep-last 3;
//! a dry run changes nothing, the real prune shrinks the repository, verify passes
//! and every remaining point restores bit for bit.

mod common;
use common::*;

/// Bytes of repository data (the lock file's holder note is not data).
fn repo_bytes(w: &World) -> u64 {
    files_under(&w.repo_dir)
        .iter()
        .filter(|p| !p.starts_with(w.repo_dir.join("locks")))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn keep_last_three_of_ten_shrinks_storage_and_keeps_restores_exact() {
    let w = World::new();
    let img = w.image("disk.img", 8 << 20, 21);
    let mut points = Vec::new();
    for i in 0..10 {
        if i > 0 {
            // Each point rewrites a tenth of the disk, so old points own chunks.
            ferry_mocks::diskgen::mutate(&img, 500 + i, 0.1, CS as u64).unwrap();
        }
        let rep = w.backup("vm", &[&img]);
        points.push((rep.point_id, hash(&img)));
    }
    let before = repo_bytes(&w);

    let o = w.ferry(&["--json", "prune", "--keep-last", "3", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let dry: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(dry["points_removed"].as_array().unwrap().len(), 7);
    assert!(dry["chunks_deleted"].as_u64().unwrap() > 0);
    assert_eq!(repo_bytes(&w), before, "a dry run must not change anything");
    assert_eq!(w.repo().point_ids().unwrap().len(), 10);

    let o = w.ferry(&["--json", "prune", "--keep-last", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let real: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(real["chunks_deleted"], dry["chunks_deleted"]);
    let after = repo_bytes(&w);
    assert!(
        after < before,
        "storage did not shrink: {before} -> {after}"
    );

    let left = w.repo().point_ids().unwrap();
    let want: Vec<String> = points[7..].iter().map(|p| p.0.clone()).collect();
    assert_eq!(left, want);
    let o = w.ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    for (id, h) in &points[7..] {
        let t = w.path("r.img");
        w.restore(id, 0, &t).unwrap();
        assert_eq!(hash(&t), *h, "point {id}");
    }
    // A new backup after the prune still deduplicates against the newest point.
    let rep = w.backup("vm", &[&img]);
    assert_eq!(rep.disks[0].chunks_new, 0);
}
