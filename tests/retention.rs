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

#[test]
fn prune_with_keys_drops_data_keys_no_remaining_point_references() {
    let w = World::new();
    let a = w.image("a.img", 4 << 20, 31);
    let b = w.image("b.img", 4 << 20, 32);
    w.backup("vm", &[&a]);
    let last = w.backup("vm", &[&b]).point_id;
    // A backup that crashed after registering its data key.
    let repo = w.repo();
    repo.update_keyring(&w.source(), |kr| {
        let k = ferry::keys::SecretKey::generate();
        let mut info = kr.body.keys.values().next().unwrap().clone();
        info.point = "crashed".into();
        kr.body.keys.insert(k.id, info);
        kr.keys.push(k);
        Ok(())
    })
    .unwrap();
    let keyring_len = || repo.load_keyring(&w.source()).unwrap().keys.len();
    assert_eq!(keyring_len(), 3);
    // What the point that stays references: its own key and its chunks' keys.
    let p = repo.open_point(&last, &w.source(), None).unwrap();
    let mut live = std::collections::HashSet::from([p.header.data_key_id]);
    let mut idx = repo.open_index(&p, 0).unwrap();
    while let Some(e) = idx.next_entry().unwrap() {
        if !e.id.is_zero_marker() {
            live.insert(e.key);
        }
    }
    let want = (3 - live.len()) as u64;
    assert!(want >= 1, "the crashed backup's key is never live");

    let prune = |keys: bool, dry: bool| {
        let mut c = w.command(&["--json", "prune", "--keep-last", "1"]);
        if dry {
            c.arg("--dry-run");
        }
        if !keys {
            c.env_remove("FERRY_PUBLIC_KEY")
                .env_remove("FERRY_PRIVATE_KEY");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    // Without keys the sealed keyring is left alone; a dry run only counts.
    let r = prune(false, true);
    assert!(r["keyring_keys_dropped"].is_null(), "{r}");
    let r = prune(true, true);
    assert_eq!(r["keyring_keys_dropped"], want, "{r}");
    assert_eq!(keyring_len(), 3);
    let r = prune(true, false);
    assert_eq!(r["points_removed"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["keyring_keys_dropped"], want, "{r}");
    assert_eq!(keyring_len(), live.len());

    // Everything still works: verify, restore, and dedupe against the kept point.
    let o = w.ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = w.path("r.img");
    w.restore(&last, 0, &t).unwrap();
    assert_eq!(hash(&t), hash(&b));
    let rep = w.backup("vm", &[&b]);
    assert_eq!(rep.disks[0].chunks_new, 0);
    // Nothing left to drop.
    assert_eq!(prune(true, false)["keyring_keys_dropped"], 0);
}
