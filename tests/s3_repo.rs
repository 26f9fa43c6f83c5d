//! Repositories on S3-compatible object storage, end to end, against two real
//! and independent S3 servers (moto's server and s3s-fs, started from what
//! `.ci/run` installs): the same suite on each. init, backup, incremental,
//! bit-identical restore, verify, prune, point listing through the CLI; an
//! interrupted backup leaves no point and its leftovers go with the next prune;
//! wrong credentials and a missing bucket give one clear error.

mod common;

use common::s3::{S3Peer, S3Server};
use common::{hash, text, World, CS};
use ferry::repo::backend::s3::{S3Settings, S3Store};
use ferry::repo::backend::Backend;

fn suite(peer: S3Peer) {
    let server = S3Server::start(peer);
    let w = World::on_s3(&server, "ferry-suite");
    let img = w.image("disk.img", 24 * CS as u64 + 4096, 7);

    // Full, then incremental after a change.
    let r1 = w.backup("vm1", &[&img]);
    assert!(r1.disks[0].chunks_new > 0, "{peer}");
    let h1 = hash(&img);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(3 * CS as u64)).unwrap();
        f.write_all(&[0xA5; 8192]).unwrap();
    }
    let r2 = w.backup("vm1", &[&img]);
    assert_eq!(r2.parent.as_deref(), Some(r1.point_id.as_str()), "{peer}");
    assert_eq!(
        r2.disks[0].chunks_new, 1,
        "{peer}: only the changed chunk is new"
    );

    // Both points restore bit for bit.
    let out = w.path("restored.img");
    w.restore(&r1.point_id, 0, &out).unwrap();
    assert_eq!(hash(&out), h1, "{peer}: first point");
    w.restore(&r2.point_id, 0, &out).unwrap();
    assert_eq!(hash(&out), hash(&img), "{peer}: second point");

    // The CLI reaches the same repository through s3:// and the environment.
    let o = w.ferry(&["repo", "info"]);
    assert!(o.status.success(), "{peer}: {}", text(&o));
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(info.contains("S3 bucket ferry-suite"), "{peer}: {info}");
    assert!(info.contains("points      2"), "{peer}: {info}");
    let o = w.ferry(&["points", "list"]);
    assert!(o.status.success(), "{peer}: {}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&r2.point_id));
    let o = w.ferry(&["verify"]);
    assert!(o.status.success(), "{peer}: verify: {}", text(&o));

    // An interrupted backup: its chunks and index are uploaded, its manifest
    // never is. It is no point; prune collects its files.
    let repo = w.repo();
    {
        let mut stage = repo.stage_point("20990101T000000Z-dead", None).unwrap();
        let f = stage.create_file("disk-0.idx").unwrap();
        stage.finish_file("disk-0.idx", f).unwrap();
        std::mem::forget(stage); // as a SIGKILL would: no clean-up
    }
    assert!(repo
        .put_chunk(&ferry::repo::format::ChunkId([7; 32]), b"orphan")
        .unwrap());
    assert_eq!(repo.point_ids().unwrap().len(), 2, "{peer}");
    let o = w.ferry(&["prune", "--keep-last", "1"]);
    assert!(o.status.success(), "{peer}: prune: {}", text(&o));
    let repo = w.repo();
    assert_eq!(
        repo.point_ids().unwrap(),
        vec![r2.point_id.clone()],
        "{peer}"
    );
    let left = repo.backend().list("points/").unwrap();
    assert!(
        left.iter()
            .all(|o| o.key.starts_with(&format!("points/{}/", r2.point_id))),
        "{peer}: leftovers remain: {left:?}"
    );
    assert!(
        !repo
            .backend()
            .exists(&ferry::repo::backend::chunk_key(
                &ferry::repo::format::ChunkId([7; 32]).to_hex()
            ))
            .unwrap(),
        "{peer}: the orphan chunk was collected"
    );
    w.restore(&r2.point_id, 0, &out).unwrap();
    assert_eq!(hash(&out), hash(&img), "{peer}: after prune");
    let o = w.ferry(&["verify"]);
    assert!(
        o.status.success(),
        "{peer}: verify after prune: {}",
        text(&o)
    );
}

#[test]
fn repository_on_moto() {
    suite(S3Peer::Moto);
}

#[test]
fn repository_on_s3s_fs() {
    suite(S3Peer::S3sFs);
}

#[test]
fn clear_errors_for_credentials_and_bucket() {
    let server = S3Server::start(S3Peer::S3sFs);
    server.create_bucket("present", false);
    let wrong = S3Settings::for_endpoint(
        &server.endpoint(),
        common::s3::REGION,
        common::s3::ACCESS_KEY,
        "not-the-secret",
    );
    let store = S3Store::connect("present", "", &wrong).unwrap();
    let e = store.read("config", 1 << 20).unwrap_err().to_string();
    assert!(e.contains("refused the credentials"), "{e}");

    let right = server.settings();
    // (s3s-fs creates a missing bucket on PUT; a listing says it is missing)
    let store = S3Store::connect("absent", "", &right).unwrap();
    let e = store.list("points/").unwrap_err().to_string();
    assert!(e.contains("bucket absent does not exist"), "{e}");

    // Through the CLI: the same words, and a non-zero exit.
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["repo", "info", "--repo", "s3://absent/x"])
        .env("FERRY_S3_ENDPOINT", server.endpoint())
        .env("AWS_ACCESS_KEY_ID", common::s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", common::s3::SECRET_KEY)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not exist"),
        "{}",
        text(&o)
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["repo", "info", "--repo", "s3://present/x"])
        .env("FERRY_S3_ENDPOINT", server.endpoint())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no S3 credentials"),
        "{}",
        text(&o)
    );
}

/// `ferry repo copy`: a local repository to S3 (a new replica), then only what
/// the target lacks; restore and verify at the target with the same tenant
/// keys; a different repository is refused as a target.
fn copy_to(peer: S3Peer) {
    let server = S3Server::start(peer);
    server.create_bucket("copies", false);
    let w = World::new();
    let img = w.image("disk.img", 16 * CS as u64, 11);
    let r1 = w.backup("vm1", &[&img]);
    let s3_env = server.env();
    let target = "s3://copies/site-b";
    let copy = |extra: &[&str]| {
        let mut args = vec!["--json", "repo", "copy", "--to", target];
        args.extend_from_slice(extra);
        let o = w.command(&args).envs(s3_env.clone()).output().unwrap();
        assert!(o.status.success(), "{peer}: copy: {}", text(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let first = copy(&[]);
    assert_eq!(first["target_created"], true, "{peer}: {first}");
    assert_eq!(first["points_copied"][0], r1.point_id.as_str());
    let sent_first = first["chunks_copied"].as_u64().unwrap();
    assert!(sent_first > 0);

    // A second backup: the copy sends only its new chunks.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(5 * CS as u64)).unwrap();
        f.write_all(&[0x5A; 4096]).unwrap();
    }
    let r2 = w.backup("vm1", &[&img]);
    let second = copy(&["--point", "latest:vm1"]);
    assert_eq!(second["points_copied"][0], r2.point_id.as_str(), "{second}");
    assert_eq!(
        second["chunks_copied"], 1,
        "{peer}: only the changed chunk: {second}"
    );
    assert!(second["chunks_present"].as_u64().unwrap() >= sent_first - 1);
    let again = copy(&[]);
    assert_eq!(again["points_copied"].as_array().unwrap().len(), 0);
    assert_eq!(again["points_present"].as_array().unwrap().len(), 2);

    // The target restores and verifies with the tenant's same keys.
    let at_target = |args: &[&str]| {
        w.command(args)
            .env("FERRY_REPO", target)
            .envs(s3_env.clone())
            .output()
            .unwrap()
    };
    let o = at_target(&["verify"]);
    assert!(o.status.success(), "{peer}: verify at target: {}", text(&o));
    let out = w.path("from-copy.img");
    let o = at_target(&[
        "restore",
        "--point",
        &r2.point_id,
        "--target",
        out.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{peer}: restore at target: {}",
        text(&o)
    );
    assert_eq!(hash(&out), hash(&img), "{peer}");

    // Another repository is no copy target.
    let other = World::new();
    let o = other
        .command(&["repo", "copy", "--to", target])
        .envs(s3_env.clone())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("holds another repository"),
        "{}",
        text(&o)
    );
}

#[test]
fn copy_local_to_moto() {
    copy_to(S3Peer::Moto);
}

#[test]
fn copy_local_to_s3s_fs() {
    copy_to(S3Peer::S3sFs);
}
