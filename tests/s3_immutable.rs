//! Immutable restore points on S3 Object Lock, against moto's server (s3s-fs
//! has no Object Lock: asking for it there is refused with the reason). Every
//! object a point references is retained until the date its manifest records;
//! incrementals of the same 7-day generation reuse their parent's chunks as
//! they are; prune keeps locked points whatever the policy says; verify
//! reports an object whose retention is missing; a bucket or a directory
//! without Object Lock is refused with the reason and the fix.

mod common;

use common::s3::{S3Peer, S3Server};
use common::{text, World, CS};
use ferry::repo::backend::{retention_until, RetentionMode, RETENTION_GENERATION_SECS};
use ferry::repo::format::Immutability;

#[test]
fn immutable_points_on_moto() {
    let server = S3Server::start(S3Peer::Moto);
    let im = Immutability {
        days: 30,
        mode: RetentionMode::Governance,
    };
    let w = World::on_s3_with(&server, "locked", Some(im));
    let img = w.image("disk.img", 12 * CS as u64, 3);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let r1 = w.backup("vm1", &[&img]);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(2 * CS as u64)).unwrap();
        f.write_all(&[0x33; 4096]).unwrap();
    }
    let r2 = w.backup("vm1", &[&img]);

    let repo = w.repo();
    let store = repo.backend();
    let (_, h2, _) = repo.read_manifest(&r2.point_id).unwrap();
    let want = h2.immutable.expect("the manifest records its retention");
    assert_eq!(want.mode, RetentionMode::Governance);
    assert_eq!(want.until % RETENTION_GENERATION_SECS, 0);
    assert!(want.until >= now + 30 * 86_400);
    assert!(want.until <= retention_until(now + 60, 30));

    // Every object of both points is retained at least that long.
    for id in [&r1.point_id, &r2.point_id] {
        for f in std::iter::once("manifest".to_string()).chain(repo.point_files(id).unwrap()) {
            let key = format!("points/{id}/{f}");
            let r = store
                .retention(&key)
                .unwrap()
                .unwrap_or_else(|| panic!("{key}"));
            assert!(r.until >= want.until || id == &r1.point_id, "{key}: {r:?}");
        }
    }
    let chunks = store.list("chunks/").unwrap();
    assert!(!chunks.is_empty());
    for c in &chunks {
        let r = store
            .retention(&c.key)
            .unwrap()
            .unwrap_or_else(|| panic!("{}", c.key));
        assert!(r.until >= want.until, "{}: {r:?}", c.key);
    }

    // points list shows each point's date.
    let o = w.ferry(&["--json", "points", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        list.to_string()
            .contains(&ferry::repo::backend::format_unix(want.until)),
        "{list}"
    );

    // Prune keeps both, saying why; verify is clean.
    let o = w.ferry(&["--json", "prune", "--keep-last", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["points_removed"].as_array().unwrap().len(), 0, "{rep}");
    assert!(rep.to_string().contains("immutable until"), "{rep}");
    assert_eq!(w.repo().point_ids().unwrap().len(), 2);
    let o = w.ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));

    // An index replaced by a plain write (a new, unretained version): verify
    // names it.
    let idx = format!("points/{}/disk-0.idx", r2.point_id);
    let bytes = store.read(&idx, 1 << 30).unwrap().unwrap();
    store.replace(&idx, &bytes).unwrap();
    let o = w.ferry(&["verify"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("no retention"), "{out}");
    assert!(out.contains("disk-0.idx"), "{out}");
}

/// `repo set-immutability --immutable-days 7` in `w` fails, saying `why`.
fn refused(w: &World, why: &str) -> String {
    let o = w.ferry(&["repo", "set-immutability", "--immutable-days", "7"]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains(why), "{}", text(&o));
    err
}

#[test]
fn no_object_lock_no_immutable_points() {
    // moto: a bucket made without Object Lock.
    let server = S3Server::start(S3Peer::Moto);
    let err = refused(
        &World::on_s3(&server, "plain"),
        "Object Lock is not enabled",
    );
    assert!(err.contains("Create a bucket with Object Lock"), "{err}");
    // s3s-fs implements no Object Lock at all.
    let server = S3Server::start(S3Peer::S3sFs);
    refused(
        &World::on_s3(&server, "plain"),
        "does not implement Object Lock",
    );
    // A local directory cannot enforce it.
    refused(&World::new(), "need S3 Object Lock");
}
