//! Bad input and faults in the repository: any flipped byte in any repository file
//! is found by `verify`, which names the damaged point and file; a restore of an
//! affected point fails and never leaves wrong data under the target name; truncated
//! files, unknown versions and wrong keys give clear errors.

mod common;
use common::*;
use ferry::keys::PemKeySource;
use ferry::progress::Progress;
use ferry::repo::{verify, RepoError, Repository};
use std::path::Path;

fn flip(p: &Path, at: usize) -> u8 {
    let mut b = std::fs::read(p).unwrap();
    let old = b[at];
    b[at] ^= 0x20;
    std::fs::write(p, &b).unwrap();
    old
}
fn put_back(p: &Path, at: usize, old: u8) {
    let mut b = std::fs::read(p).unwrap();
    b[at] = old;
    std::fs::write(p, &b).unwrap();
}

struct Setup {
    w: World,
    /// (point, disk, source hash)
    points: Vec<(String, u32, blake3::Hash)>,
}

fn setup() -> Setup {
    let w = World::new();
    let a = w.image("a.img", 4 << 20, 11);
    let b = w.image("b.img", 3 << 20, 12);
    let p1 = w.backup("vm1", &[&a]);
    let h1 = hash(&a);
    ferry_mocks::diskgen::mutate(&a, 5, 0.1, 64 << 10).unwrap();
    let p2 = w.backup("vm1", &[&a]);
    let h2 = hash(&a);
    let p3 = w.backup("vm2", &[&b]);
    let points = vec![
        (p1.point_id, 0, h1),
        (p2.point_id, 0, h2),
        (p3.point_id, 0, hash(&b)),
    ];
    Setup { w, points }
}

fn verify_all(w: &World) -> verify::VerifyReport {
    verify::verify(&w.repo(), &w.source(), &[], 2, false, &Progress::default()).unwrap()
}

#[test]
fn every_repository_file_flip_is_detected_and_named() {
    let s = setup();
    let w = &s.w;
    assert!(verify_all(w).ok());
    let files: Vec<_> = files_under(&w.repo_dir)
        .into_iter()
        .filter(|p| !p.starts_with(w.repo_dir.join("locks")))
        .collect();
    let chunks: Vec<_> = files
        .iter()
        .filter(|p| p.starts_with(w.repo_dir.join("chunks")))
        .cloned()
        .collect();
    let others: Vec<_> = files
        .iter()
        .filter(|p| !p.starts_with(w.repo_dir.join("chunks")))
        .cloned()
        .collect();
    assert!(chunks.len() > 10 && others.len() >= 8, "{files:?}");
    // Every non-chunk file at several positions, and a spread of chunk files.
    let mut cases = Vec::new();
    for f in &others {
        let len = std::fs::metadata(f).unwrap().len() as usize;
        for at in [0, 9, 13, len / 3, len / 2, len - 20, len - 1] {
            cases.push((f.clone(), at));
        }
    }
    for (i, f) in chunks.iter().enumerate().step_by(3) {
        let len = std::fs::metadata(f).unwrap().len() as usize;
        cases.push((f.clone(), [10, 20, 30, 41, 50, len / 2, len - 1][i % 7]));
    }
    let mut restore_checked = 0;
    for (f, at) in cases {
        let old = flip(&f, at);
        let name = f.strip_prefix(&w.repo_dir).unwrap().display().to_string();
        if name == "config" {
            match Repository::open(&w.repo_dir) {
                Err(RepoError::Damaged { path, .. }) => assert!(path.ends_with("config")),
                Err(e) => panic!("config flip at {at}: unexpected {e}"),
                Ok(_) => panic!("config flip at {at} not detected"),
            }
            put_back(&f, at, old);
            continue;
        }
        let rep = verify_all(w);
        assert!(!rep.ok(), "flip in {name} at {at} not detected");
        let named = rep
            .keyring
            .iter()
            .chain(rep.points.iter().flat_map(|p| &p.problems))
            .any(|p| {
                p.file.contains(&name)
                    || (name.starts_with("points/")
                        && p.file.contains(name.split('/').nth(1).unwrap()))
            });
        assert!(
            named,
            "flip in {name} at {at}: report does not name the file: {:#?}",
            rep
        );
        // Restoring every damaged point fails cleanly and leaves no file at the target.
        if name != "keyring" && restore_checked < 40 {
            for (point, disk, want) in &s.points {
                let damaged = rep.points.iter().any(|p| &p.point_id == point && !p.ok);
                let t = w.path("restore-check.img");
                let _ = std::fs::remove_file(t.with_extension("partial"));
                let r = w.restore(point, *disk, &t);
                if damaged {
                    assert!(
                        r.is_err(),
                        "restore of damaged {point} succeeded (flip in {name} at {at})"
                    );
                    assert!(
                        !t.exists(),
                        "a failed restore left {} in place",
                        t.display()
                    );
                    restore_checked += 1;
                } else {
                    r.unwrap_or_else(|e| panic!("undamaged {point} failed to restore: {e}"));
                    assert_eq!(hash(&t), *want);
                }
            }
        }
        put_back(&f, at, old);
    }
    assert!(restore_checked > 10);
    assert!(verify_all(w).ok());
}

#[test]
fn truncated_files_give_clear_errors() {
    let s = setup();
    let w = &s.w;
    let (p1, _, _) = &s.points[0];
    for rel in ["manifest", "disk-0.idx"] {
        let f = w.repo_dir.join("points").join(p1).join(rel);
        let orig = std::fs::read(&f).unwrap();
        for cut in [0, 5, 12, orig.len() / 2, orig.len() - 1] {
            std::fs::write(&f, &orig[..cut]).unwrap();
            let rep = verify_all(w);
            let p = rep.points.iter().find(|p| &p.point_id == p1).unwrap();
            assert!(!p.ok, "{rel} cut at {cut}");
            assert!(p.problems[0].file.ends_with(rel), "{:?}", p.problems);
            let e = w.restore(p1, 0, &w.path("t.img")).unwrap_err().to_string();
            assert!(e.contains(rel), "{e}");
        }
        std::fs::write(&f, &orig).unwrap();
    }
    // A truncated chunk.
    let chunk = files_under(&w.repo_dir.join("chunks"))
        .into_iter()
        .next()
        .unwrap();
    let orig = std::fs::read(&chunk).unwrap();
    std::fs::write(&chunk, &orig[..orig.len() - 7]).unwrap();
    let rep = verify_all(w);
    assert_eq!(rep.chunks_damaged, 1);
    assert!(rep
        .points
        .iter()
        .flat_map(|p| &p.problems)
        .any(|p| p.file == chunk.display().to_string()));
    std::fs::write(&chunk, &orig).unwrap();
    assert!(verify_all(w).ok());
}

#[test]
fn unknown_format_version_is_refused_by_name() {
    let s = setup();
    let w = &s.w;
    let cfg = w.repo_dir.join("config");
    let orig = std::fs::read(&cfg).unwrap();
    let mut b = orig.clone();
    b[9] = 9; // version 9
    std::fs::write(&cfg, &b).unwrap();
    let e = Repository::open(&w.repo_dir)
        .err()
        .expect("must refuse")
        .to_string();
    assert!(e.contains("format version 9 is not supported"), "{e}");
    std::fs::write(&cfg, &orig).unwrap();
    let m = w
        .repo_dir
        .join("points")
        .join(&s.points[0].0)
        .join("manifest");
    let orig = std::fs::read(&m).unwrap();
    let mut b = orig.clone();
    b[9] = 2;
    std::fs::write(&m, &b).unwrap();
    let e = w
        .restore(&s.points[0].0, 0, &w.path("x.img"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("version 2 is not supported") && e.contains("manifest"),
        "{e}"
    );
    std::fs::write(&m, &orig).unwrap();
}

#[test]
fn wrong_key_is_named_and_harmless() {
    let s = setup();
    let w = &s.w;
    let other = ferry_mocks::fixtures::pem_pair(w.dir.path(), "other", 2048).unwrap();
    let ks = PemKeySource::open(Some(&other.public), Some(&other.private)).unwrap();
    let repo = w.repo();
    let e = ferry::job::restore(
        &repo,
        &ks,
        &s.points[0].0,
        0,
        &w.path("x.img"),
        ferry::pipeline::PipelineConfig::new(Some(1), CS, 8 << 20),
        &Progress::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("wrong key") && e.contains("fingerprint"), "{e}");
    assert!(!w.path("x.img").exists());
    // A backup with the wrong key cannot open the keyring: it fails before writing.
    let before = files_under(&w.repo_dir).len();
    let img = w.image("c.img", 1 << 20, 3);
    let r = ferry::job::backup(
        &repo,
        &ks,
        ferry::job::BackupRequest {
            source_name: "vm3".into(),
            identity: None,
            disks: vec![ferry::job::DiskInput {
                source: Box::new(ferry::transport::file::FileSource::open(&img).unwrap()),
                label: "c".into(),
                transport_reason: "t".into(),
                change_id: None,
                read: Default::default(),
            }],
            pipeline: ferry::pipeline::PipelineConfig::new(Some(1), CS, 8 << 20),
            lock_wait: std::time::Duration::from_secs(1),
            snapshot: None,
        },
        &Progress::default(),
    );
    assert!(r.unwrap_err().to_string().contains("wrong key"));
    assert_eq!(files_under(&w.repo_dir).len(), before);
    assert!(verify_all(w).ok());
    // And through the CLI: exit code 5.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "verify",
            "-r",
            w.repo_dir.to_str().unwrap(),
            "--private-key",
            other.private.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("NO KEY"),
        "{}",
        text(&o)
    );
}

#[test]
fn missing_keyring_blocks_backups_with_a_clear_message_but_not_restores() {
    let s = setup();
    let w = &s.w;
    std::fs::rename(w.repo_dir.join("keyring"), w.path("keyring.saved")).unwrap();
    let img = w.image("d.img", 1 << 20, 4);
    let o = w.ferry(&["backup", "--name", "vm9", "--image", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is missing: backups need it"),
        "{}",
        text(&o)
    );
    // Every point still restores with its own wrapped key.
    for (point, disk, want) in &s.points {
        let t = w.path("k.img");
        w.restore(point, *disk, &t).unwrap();
        assert_eq!(hash(&t), *want);
    }
    assert!(verify_all(w).ok());
}

/// The non-zero chunk ids point `id` references on disk 0, in order.
fn chunk_ids(w: &World, id: &str) -> Vec<ferry::repo::format::ChunkId> {
    let repo = w.repo();
    let p = repo.open_point(id, &w.source(), None).unwrap();
    let mut r = repo.open_index(&p, 0).unwrap();
    std::iter::from_fn(|| r.next_entry().unwrap())
        .map(|e| e.id)
        .filter(|id| !id.is_zero_marker())
        .collect()
}

#[test]
fn verify_repair_quarantines_damaged_chunks_and_the_next_backup_mends_every_point() {
    let s = setup();
    let w = &s.w;
    let (p1, _, h1) = &s.points[0];
    let (p2, _, h2) = &s.points[1];
    // Three chunks both vm1 points share (the unchanged part of the disk): one
    // with a flipped byte in its body (its header still reads fine, so backups
    // would deduplicate against it), one emptied as by a power loss (backups
    // that meet its data fail), one deleted.
    let in_p1: std::collections::HashSet<_> = chunk_ids(w, p1).into_iter().collect();
    let shared: Vec<_> = chunk_ids(w, p2)
        .into_iter()
        .filter(|c| in_p1.contains(c))
        .collect();
    assert!(shared.len() >= 3, "{}", shared.len());
    let repo = w.repo();
    let (flipped, emptied, deleted) = (shared[0], shared[1], shared[2]);
    let f = repo.chunk_path(&flipped);
    let len = std::fs::metadata(&f).unwrap().len() as usize;
    flip(&f, len - 40);
    std::fs::write(repo.chunk_path(&emptied), b"").unwrap();
    std::fs::remove_file(repo.chunk_path(&deleted)).unwrap();

    // Without --repair, verify changes nothing.
    let o = w.ferry(&["verify"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(!w.repo_dir.join("damaged").exists());
    // A backup of the same data before the repair takes the three from the
    // previous index, which it trusts: that point is damaged like the others.
    let a = w.path("a.img");
    let o = w.ferry(&["backup", "--name", "vm1", "--image", a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = w.ferry(&["--json", "verify"]);
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let damaged = rep["points"].as_array().unwrap().iter();
    assert_eq!(damaged.filter(|p| p["ok"] == false).count(), 3, "{rep}");

    let o = w.ferry(&["--json", "verify", "--repair"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut want: Vec<String> = [flipped, emptied, deleted]
        .iter()
        .map(|c| c.to_hex())
        .collect();
    want.sort();
    let got: Vec<String> = rep["chunks_quarantined"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want, "{rep}");
    for c in [flipped, emptied, deleted] {
        assert!(!repo.chunk_path(&c).exists());
        let kept = std::fs::read_dir(w.repo_dir.join("damaged")).unwrap();
        let prefix = format!("{}.", c.to_hex());
        assert_eq!(
            kept.filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(&prefix))
                .count(),
            1,
            "damaged/{prefix}<key>"
        );
    }
    assert_eq!(repo.chunks_to_rewrite().unwrap().len(), 3);
    let o = w.ferry(&["--json", "repo", "info"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["chunks_to_store_again"], 3, "{info}");
    // Repairing again finds them missing, already recorded: nothing moves and
    // the kept copy of the flipped chunk keeps its bytes.
    let o = w.ferry(&["--json", "verify", "--repair"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["chunks_quarantined"], serde_json::json!([]), "{rep}");
    let kept = w
        .repo_dir
        .join("damaged")
        .join(format!("{}.", flipped.to_hex()));
    let kept = std::fs::read_dir(w.repo_dir.join("damaged"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().starts_with(&*kept.to_string_lossy()))
        .unwrap();
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), len as u64);

    // The next backup of vm1 (its previous index still names the three chunks)
    // reads and stores them again; every point, the damaged one made before the
    // repair included, verifies and restores.
    let o = w.ferry(&["backup", "--name", "vm1", "--image", a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(repo.chunks_to_rewrite().unwrap().is_empty());
    let o = w.ferry(&["--json", "repo", "info"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["chunks_to_store_again"], 0, "{info}");
    let o = w.ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    for (p, h) in [(p1, h1), (p2, h2)] {
        let t = w.path("t.img");
        w.restore(p, 0, &t).unwrap();
        assert_eq!(&hash(&t), h, "{p}");
    }
}

/// Restores a remote request names (the agent's directory targets) write a new
/// regular file only: a symlink already at the name, to a file or to a block
/// device, is refused and never followed.
#[test]
fn a_restore_to_a_new_file_never_follows_a_symlink() {
    let w = World::new();
    let a = w.image("a.img", 1 << 20, 31);
    let point = w.backup("vm1", &[&a]).point_id;
    let area = w.path("area");
    std::fs::create_dir_all(&area).unwrap();
    let victim = w.path("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let link = area.join("vm1-disk0.img");
    let restore = |target: &Path| {
        ferry::job::restore_new_file(
            &w.repo(),
            &w.source(),
            &point,
            0,
            target,
            ferry::pipeline::PipelineConfig::new(Some(2), CS, 16 << 20),
            &Progress::default(),
        )
    };
    for to in [victim.clone(), "/dev/null".into()] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&to, &link).unwrap();
        let e = restore(&link).unwrap_err().to_string();
        assert!(e.contains("exists"), "{e}");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    // A new name restores.
    let fresh = area.join("fresh.img");
    restore(&fresh).unwrap();
    assert_eq!(hash(&fresh), hash(&a));
}
