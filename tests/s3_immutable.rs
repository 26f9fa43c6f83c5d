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

/// `ferry repo copy` takes the target's retention, not the source's: the copied
/// objects are retained by the target's `--immutable-days` from the time of the
/// copy, the target records that date (its prune, verify and points list use
/// it), the source's manifest date stays the source's; a copy to a bucket
/// without Object Lock carries no date over (verify there is clean), and
/// asking that bucket for immutability is refused with the reason.
#[test]
fn copies_take_the_targets_retention() {
    use ferry::repo::backend::s3::S3Store;
    use ferry::repo::Repository;
    let server = S3Server::start(S3Peer::Moto);
    let im = Immutability {
        days: 30,
        mode: RetentionMode::Governance,
    };
    let w = World::on_s3_with(&server, "src-locked", Some(im));
    let img = w.image("disk.img", 8 * CS as u64, 5);
    let r1 = w.backup("vm1", &[&img]);
    let src_until = w
        .repo()
        .read_manifest(&r1.point_id)
        .unwrap()
        .1
        .immutable
        .expect("an immutable source point")
        .until;

    // To a locked bucket, with the target's own 100 days (compliance).
    server.create_bucket("dst-locked", true);
    let copy = |target: &str, extra: &[&str]| {
        let mut args = vec!["--json", "repo", "copy", "--to", target];
        args.extend_from_slice(extra);
        w.command(&args).output().unwrap()
    };
    let before = time::OffsetDateTime::now_utc().unix_timestamp();
    let o = copy(
        "s3://dst-locked/copy",
        &["--immutable-days", "100", "--immutable-mode", "compliance"],
    );
    let after = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(o.status.success(), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (lo, hi) = (retention_until(before, 100), retention_until(after, 100));
    let until = rep["immutable"]["until"].as_i64().expect("the report says");
    assert!((lo..=hi).contains(&until), "{rep}");
    assert_ne!(until, src_until);
    assert_eq!(rep["immutable"]["mode"], "compliance", "{rep}");

    let store = S3Store::connect("dst-locked", "copy", &server.settings()).unwrap();
    let dst = Repository::open_in(Box::new(store)).unwrap();
    let h = dst.read_manifest(&r1.point_id).unwrap().1;
    let got = h.immutable.expect("the target records its retention");
    assert_eq!((got.until, got.mode), (until, RetentionMode::Compliance));
    let files = dst.point_files(&r1.point_id).unwrap();
    assert!(files.iter().any(|f| f == "retention"), "{files:?}");
    let keys = std::iter::once("manifest".to_string())
        .chain(files)
        .map(|f| format!("points/{}/{f}", r1.point_id))
        .chain(
            dst.backend()
                .list("chunks/")
                .unwrap()
                .into_iter()
                .map(|o| o.key),
        );
    for key in keys {
        let r = dst
            .backend()
            .retention(&key)
            .unwrap()
            .unwrap_or_else(|| panic!("{key} has no retention at the target"));
        assert_eq!(
            (r.until, r.mode),
            (until, RetentionMode::Compliance),
            "{key}"
        );
    }
    // The source keeps its own date.
    let src_h = w.repo().read_manifest(&r1.point_id).unwrap().1;
    assert_eq!(src_h.immutable.unwrap().until, src_until);
    // The target's views use its date; its verify is clean.
    let at =
        |target: &str, args: &[&str]| w.command(args).env("FERRY_REPO", target).output().unwrap();
    let o = at("s3://dst-locked/copy", &["--json", "points", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let listed = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        listed.contains(&ferry::repo::backend::format_unix(until)),
        "{listed}"
    );
    assert!(
        !listed.contains(&ferry::repo::backend::format_unix(src_until)),
        "{listed}"
    );
    let o = at("s3://dst-locked/copy", &["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    // A copy of the copy (to another locked bucket, 7 days): its own date again.
    server.create_bucket("third-locked", true);
    let o = w
        .command(&[
            "--json",
            "repo",
            "copy",
            "--to",
            "s3://third-locked/c",
            "--immutable-days",
            "7",
        ])
        .env("FERRY_REPO", "s3://dst-locked/copy")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let store = S3Store::connect("third-locked", "c", &server.settings()).unwrap();
    let third = Repository::open_in(Box::new(store)).unwrap();
    let t = third
        .read_manifest(&r1.point_id)
        .unwrap()
        .1
        .immutable
        .unwrap();
    assert!(
        t.until < until && t.mode == RetentionMode::Governance,
        "{t:?}"
    );

    // To a bucket without Object Lock: no date carried over, verify clean.
    server.create_bucket("dst-plain", false);
    let o = copy("s3://dst-plain/copy", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(rep["immutable"].is_null(), "{rep}");
    let store = S3Store::connect("dst-plain", "copy", &server.settings()).unwrap();
    let plain = Repository::open_in(Box::new(store)).unwrap();
    assert_eq!(plain.config.immutability, None);
    let h = plain.read_manifest(&r1.point_id).unwrap().1;
    assert_eq!(h.immutable, None, "the source's date is not the target's");
    let o = at("s3://dst-plain/copy", &["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    // ... and immutability asked of it is refused, with the reason.
    let o = copy("s3://dst-plain/copy", &["--immutable-days", "7"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Object Lock is not enabled"),
        "{}",
        text(&o)
    );
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
