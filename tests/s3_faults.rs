//! S3 repositories under network and server faults, through a fault-injecting
//! proxy (`common::faultproxy`) in front of s3s-fs (which checks signatures, so
//! every retried request must still be signed correctly).
//!
//! - 503 SlowDown and 500 InternalError, every 3rd request and in bursts: backup,
//!   incremental, restore and verify succeed, bit-identical, after retries.
//! - Connection resets: object bodies cut mid-way are resumed (ranged GETs);
//!   PUTs reset before their answer are retried, and a lost answer to an index
//!   or manifest PUT is recognised on the replay (412, same bytes). A listing
//!   cut mid-way is listed again.
//! - A persistent 503 on PUTs with a small retry budget: the backup fails in
//!   bounded time and leaves no point; prune collects what it uploaded.
//! - Answers slower than the request timeout: GETs, listings and create-only
//!   PUTs are sent again (a replayed PUT that had landed gets 412 and is read
//!   back); the backup succeeds.
//! - A clock an hour off (the proxy moves each request's signed date; s3s-fs
//!   answers RequestTimeTooSkewed itself): one error naming the clock and NTP,
//!   not retried; a backup refused at its index leaves no point, and prune
//!   collects its chunks.
//! - SIGKILL of `ferry backup` mid-upload and while its manifest is in flight:
//!   no point, the earlier one restores, verify passes; the dead processes'
//!   lock objects (same host, pid gone) do not hold off prune, which collects
//!   the rest.

mod common;

use common::faultproxy::{Fault, FaultProxy, Rule, Seen, When};
use common::s3::{S3Peer, S3Server};
use common::{hash, text, World, CS};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// s3s-fs, a proxy in front of it, and a world whose every request after init
/// goes through the proxy.
fn setup(bucket: &str) -> (S3Server, FaultProxy, World) {
    let server = S3Server::start(S3Peer::S3sFs);
    let proxy = FaultProxy::start(&server.endpoint());
    let w = World::on_s3_at(&server, bucket, &proxy.endpoint());
    (server, proxy, w)
}

/// Retry budget and request timeout, for the library and the binary alike.
fn tune(w: &mut World, retries: usize, timeout: Duration) {
    let (settings, env) = w.s3.as_mut().unwrap();
    settings.max_retries = retries;
    settings.timeout = timeout;
    env.push(("FERRY_S3_RETRIES".into(), retries.to_string()));
    env.push((
        "FERRY_S3_TIMEOUT_SECS".into(),
        timeout.as_secs().to_string(),
    ));
}

/// Overwrite `len` bytes of `img` at `at` with `byte`.
fn scribble(img: &Path, at: u64, len: usize, byte: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&vec![byte; len]).unwrap();
}

fn keys(w: &World, prefix: &str) -> BTreeSet<String> {
    let l = w.repo().backend().list(prefix).unwrap();
    l.into_iter().map(|o| o.key).collect()
}

fn is(method: &'static str, path: &'static str) -> impl Fn(&Seen) -> bool {
    move |s| s.method == method && s.path.contains(path)
}

fn restores(w: &World, point: &str, want: blake3::Hash, what: &str) {
    let out = w.path("restored.img");
    w.restore(point, 0, &out)
        .unwrap_or_else(|e| panic!("{what}: restore {point}: {e}"));
    assert_eq!(hash(&out), want, "{what}: restore of {point}");
}

fn verify_ok(w: &World, what: &str) {
    let o = w.ferry(&["verify"]);
    assert!(o.status.success(), "{what}: verify: {}", text(&o));
}

#[test]
fn slowdown_and_internal_errors_are_retried() {
    let (_server, proxy, w) = setup("faults-5xx");
    let img = w.image("disk.img", 24 * CS as u64 + 4096, 7);
    proxy.set(vec![
        Rule::new(When::EveryNth(3), Fault::Status(503)),
        Rule::new(When::Bursts { every: 10, len: 3 }, Fault::Status(500)),
    ]);
    let r1 = w
        .try_backup("vm1", &[&img])
        .expect("full backup through 5xx");
    let h1 = hash(&img);
    scribble(&img, 3 * CS as u64, 8192, 0xA5);
    let r2 = w
        .try_backup("vm1", &[&img])
        .expect("incremental through 5xx");
    assert_eq!(r2.parent.as_deref(), Some(r1.point_id.as_str()));
    assert_eq!(r2.disks[0].chunks_new, 1, "only the changed chunk is new");
    restores(&w, &r1.point_id, h1, "5xx");
    restores(&w, &r2.point_id, hash(&img), "5xx");
    verify_ok(&w, "5xx (the binary, through the same faults)");
    let (s503, s500) = (
        proxy.count(|s| s.fault == Fault::Status(503)),
        proxy.count(|s| s.fault == Fault::Status(500)),
    );
    assert!(s503 > 10 && s500 > 10, "injected 503 {s503}, 500 {s500}");
    // Three 500s in a row hit the PUT and GET of chunks alike.
    assert!(proxy.count(|s| s.fault != Fault::Pass && s.method == "PUT") > 0);
    assert!(proxy.count(|s| s.fault != Fault::Pass && s.method == "GET") > 0);
    proxy.clear();
    assert_eq!(w.repo().point_ids().unwrap().len(), 2);
}

/// A backup through `rule` that must fail: its error, and no new point.
fn fails(w: &World, proxy: &FaultProxy, rule: Rule, img: &Path) -> String {
    let before = w.repo().point_ids().unwrap();
    proxy.set(vec![rule]);
    let res = w.try_backup("vm1", &[img]);
    proxy.clear();
    let e = res.map(|r| r.point_id).expect_err("the backup fails");
    assert_eq!(w.repo().point_ids().unwrap(), before, "no new point: {e}");
    e.to_string()
}

#[test]
fn resets_are_retried_or_fail_cleanly() {
    let (_server, proxy, mut w) = setup("faults-resets");
    let img = w.image("disk.img", 16 * CS as u64, 3);
    let r1 = w.try_backup("vm1", &[&img]).unwrap();
    let h1 = hash(&img);

    // Object bodies cut in half: object_store resumes them (a ranged GET,
    // same ETag), the restore never notices.
    proxy.set(vec![
        Rule::new(When::EveryNth(2), Fault::ResetMidBody)
            .method("GET")
            .path("/chunks/"),
        Rule::new(When::EveryNth(2), Fault::ResetMidBody)
            .method("GET")
            .path("/points/"),
    ]);
    restores(&w, &r1.point_id, h1, "GET bodies cut");
    assert!(proxy.injected() >= 8, "{:?}", proxy.seen());
    assert!(
        proxy.count(|s| s.status == Some(206)) >= 1,
        "resumed by range"
    );
    proxy.clear();

    // A listing cut mid-body (object_store resumes only object bodies):
    // ferry lists again.
    proxy.reset_counts();
    proxy.set(vec![
        Rule::new(When::Next(1), Fault::ResetMidBody).path("list-type=")
    ]);
    restores(&w, &r1.point_id, h1, "a listing cut");
    assert_eq!(proxy.injected(), 1, "{:?}", proxy.seen());
    proxy.clear();

    // PUTs whose connection drops before any answer, whether the server got
    // them (a lost acknowledgement) or not: retried; a chunk that landed the
    // first time is refused on the replay (If-None-Match: *) and counts as
    // stored. The backup succeeds.
    proxy.reset_counts();
    for c in [1, 4, 6, 9, 12, 14] {
        scribble(&img, c * CS as u64 + 100, 4096, 0x11 * c as u8);
    }
    proxy.set(vec![
        Rule::new(When::EveryNth(3), Fault::ResetBeforeResponse)
            .method("PUT")
            .path("/chunks/"),
        Rule::new(When::EveryNth(2), Fault::DropRequest)
            .method("PUT")
            .path("/chunks/"),
        Rule::new(When::Next(1), Fault::DropRequest)
            .method("PUT")
            .path(".idx"),
        Rule::new(When::Next(1), Fault::DropRequest)
            .method("PUT")
            .path("/manifest"),
    ]);
    let r2 = w
        .try_backup("vm1", &[&img])
        .expect("backup through PUT resets");
    proxy.clear();
    assert!(r2.disks[0].chunks_new > 0);
    let hit = |f: Fault| proxy.count(|s| s.fault == f);
    assert!(hit(Fault::ResetBeforeResponse) >= 1 && hit(Fault::DropRequest) >= 4);
    // Every injected PUT was sent again.
    for s in proxy.seen().iter().filter(|s| s.fault != Fault::Pass) {
        assert!(
            proxy.count(|t| t.path == s.path && t.status.is_some()) >= 1,
            "{s:?}"
        );
    }
    restores(&w, &r2.point_id, hash(&img), "PUT resets");

    // A lost acknowledgement of an index or of the manifest PUT: the replay
    // is refused (412, the first attempt landed); ferry reads the object
    // back, finds its own bytes, and carries on. (Before commit c9d4966 the
    // index case failed the backup, and the manifest case failed it and left
    // a point without its index: damaged.)
    for what in [".idx", "/manifest"] {
        scribble(&img, 2 * CS as u64, 4096, what.len() as u8);
        proxy.reset_counts();
        let rule = Rule::new(When::Next(1), Fault::ResetBeforeResponse)
            .method("PUT")
            .path(what);
        proxy.set(vec![rule]);
        let r = w.try_backup("vm1", &[&img]);
        proxy.clear();
        let r = r.unwrap_or_else(|e| panic!("lost answer to the {what} PUT: {e}"));
        let replays = proxy.count(|s| is("PUT", what)(s) && s.status == Some(412));
        assert_eq!(replays, 1, "{what}: {:?}", proxy.seen());
        restores(&w, &r.point_id, hash(&img), what);
    }

    // A lost answer to the manifest PUT with no retry left: its outcome is
    // unknown, the backup fails, and its point exists, whole (the stage
    // keeps the point's files once the manifest PUT is sent).
    tune(&mut w, 0, Duration::from_secs(30));
    scribble(&img, 7 * CS as u64, 4096, 0x77);
    let before = w.repo().point_ids().unwrap().len();
    let rule = Rule::new(When::Next(1), Fault::ResetBeforeResponse)
        .method("PUT")
        .path("/manifest");
    proxy.set(vec![rule]);
    let res = w.try_backup("vm1", &[&img]);
    proxy.clear();
    let e = res
        .map(|r| r.point_id)
        .expect_err("no retry left")
        .to_string();
    assert!(
        e.contains("/manifest") && e.contains("Connection reset"),
        "{e}"
    );
    let ids = w.repo().point_ids().unwrap();
    assert_eq!(ids.len(), before + 1, "the point was committed: {ids:?}");
    restores(
        &w,
        ids.last().unwrap(),
        hash(&img),
        "point of an unanswered manifest PUT",
    );
    verify_ok(&w, "after resets");
}

#[test]
fn persistent_put_failure_fails_in_bounded_time_and_prune_collects() {
    let (_server, proxy, mut w) = setup("faults-persistent");
    tune(&mut w, 2, Duration::from_secs(30));
    let img = w.image("disk.img", 16 * CS as u64, 5);
    let r1 = w.try_backup("vm1", &[&img]).unwrap();
    let h1 = hash(&img);
    let (points0, chunks0) = (keys(&w, "points/"), keys(&w, "chunks/"));

    // Every PUT answered 503: the first (the lock object) gives up after
    // its two retries.
    let t = Instant::now();
    let e = fails(
        &w,
        &proxy,
        Rule::new(When::Always, Fault::Status(503)).method("PUT"),
        &img,
    );
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert!(e.contains("locks/repo/") && e.contains("SlowDown"), "{e}");
    assert!(e.contains("after 2 retries"), "{e}");

    // Only the point's files refused: the chunks of a new disk are uploaded,
    // its index is tried three times, then the backup fails.
    let img2 = w.image("disk2.img", 16 * CS as u64, 6);
    proxy.reset_counts();
    let t = Instant::now();
    let rule = Rule::new(When::Always, Fault::Status(503))
        .method("PUT")
        .path("/points/");
    let e = fails(&w, &proxy, rule, &img2);
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert!(e.contains("disk-0.idx") && e.contains("SlowDown"), "{e}");
    assert_eq!(proxy.count(is("PUT", "/points/")), 3, "1 + 2 retries");
    assert!(proxy.count(is("PUT", "/manifest")) == 0);
    let chunks1 = keys(&w, "chunks/");
    assert!(
        chunks1.len() > chunks0.len(),
        "the failed backup's chunks are stored"
    );
    assert_eq!(keys(&w, "points/"), points0, "its index was never stored");

    // The fault gone, prune collects its chunks; the earlier point is whole.
    let o = w.ferry(&["prune", "--keep-last", "5"]);
    assert!(o.status.success(), "prune: {}", text(&o));
    assert_eq!(
        keys(&w, "chunks/"),
        chunks0,
        "prune left chunks of the failed backup"
    );
    assert_eq!(keys(&w, "points/"), points0);
    assert_eq!(w.repo().point_ids().unwrap(), [r1.point_id.as_str()]);
    verify_ok(&w, "after prune");
    restores(&w, &r1.point_id, h1, "after prune");
}

#[test]
fn slow_answers_time_out_and_gets_are_retried() {
    let (_server, proxy, mut w) = setup("faults-slow");
    tune(&mut w, 3, Duration::from_secs(2));
    let img = w.image("disk.img", 16 * CS as u64, 9);
    let r1 = w.try_backup("vm1", &[&img]).unwrap();
    let h1 = hash(&img);
    let slow = Fault::Delay(Duration::from_secs(4));

    // Chunk reads and a listing held past the 2 s timeout: the client gives
    // up on them (they never reach the server) and asks again.
    proxy.set(vec![
        Rule::new(When::Next(2), slow.clone())
            .method("GET")
            .path("/chunks/"),
        Rule::new(When::Next(1), slow.clone())
            .method("GET")
            .path("list-type="),
    ]);
    let t = Instant::now();
    restores(&w, &r1.point_id, h1, "slow GETs");
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    proxy.clear();
    for s in proxy.seen().iter().filter(|s| s.fault != Fault::Pass) {
        assert!(!s.forwarded, "{s:?}");
        assert!(
            proxy.count(|t| t.path == s.path && t.status == Some(200)) >= 1,
            "{s:?}"
        );
    }
    assert_eq!(proxy.injected(), 3);

    // A create-only PUT that times out: object_store retries timeouts only
    // of requests it deems idempotent, so ferry's HTTP seam reports it as a
    // failed request, and it is sent again (a replay that finds its first
    // attempt landed gets 412 and is read back).
    scribble(&img, 5 * CS as u64, 4096, 0x5A);
    proxy.reset_counts();
    proxy.set(vec![Rule::new(When::Next(1), slow.clone())
        .method("PUT")
        .path("/chunks/")]);
    let r2 = w.try_backup("vm1", &[&img]).unwrap();
    proxy.clear();
    let put = proxy
        .seen()
        .into_iter()
        .find(|s| s.fault != Fault::Pass)
        .unwrap();
    let sent = proxy.count(|s| s.method == "PUT" && s.path == put.path);
    assert!(sent >= 2, "sent again: {:?}", proxy.seen());
    restores(&w, &r2.point_id, hash(&img), "after a slow PUT");
}

/// `ferry backup` of `img` as vm through the proxy, SIGKILLed once `ready`
/// says so (polling the proxy); panics if it ends first. Returns its pid.
fn kill_backup(
    w: &World,
    proxy: &FaultProxy,
    img: &Path,
    ready: impl Fn(&FaultProxy) -> bool,
) -> u32 {
    use std::process::Stdio;
    let mut child = w
        .command(&["backup", "--name", "vm", "--image", img.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !ready(proxy) {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the backup ended ({st}) before it was killed");
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the backup never got there"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    child.id()
}

#[test]
fn sigkill_mid_backup_leaves_no_point_and_prune_collects() {
    let (_server, proxy, w) = setup("faults-sigkill");
    let small = w.image("small.img", 16 * CS as u64, 21);
    let r1 = w.try_backup("vm", &[&small]).unwrap();
    let h1 = hash(&small);
    let (points0, chunks0) = (keys(&w, "points/"), keys(&w, "chunks/"));
    let big = w.image("big.img", 64 << 20, 22);

    // Killed while uploading chunks (some are held a little, so it is surely
    // mid-way).
    let chunk_puts =
        |p: &FaultProxy| p.count(|s| is("PUT", "/chunks/")(s) && s.status == Some(200));
    proxy.set(vec![Rule::new(
        When::EveryNth(4),
        Fault::Delay(Duration::from_millis(200)),
    )
    .method("PUT")
    .path("/chunks/")]);
    let pid1 = kill_backup(&w, &proxy, &big, |p| chunk_puts(p) >= 24);
    proxy.clear();
    assert!(
        chunk_puts(&proxy) < 200,
        "killed mid-way: {}",
        chunk_puts(&proxy)
    );

    // Killed while its manifest is in flight (held, then dropped unsent when
    // the connection dies): every chunk and the index are stored.
    proxy.reset_counts();
    let hold = Fault::Delay(Duration::from_secs(30));
    proxy.set(vec![Rule::new(When::Always, hold)
        .method("PUT")
        .path("/manifest")]);
    let pid2 = kill_backup(&w, &proxy, &big, |p| p.count(is("PUT", "/manifest")) >= 1);
    std::thread::sleep(Duration::from_millis(200)); // the proxy sees it gone
    proxy.clear();
    let seen = proxy.seen();
    let manifests: Vec<_> = seen.iter().filter(|s| is("PUT", "/manifest")(s)).collect();
    assert!(manifests.iter().all(|s| !s.forwarded), "{manifests:?}");

    // No point; leftovers: an index without manifest, unreferenced chunks,
    // and the killed processes' lock objects.
    assert_eq!(w.repo().point_ids().unwrap(), [r1.point_id.as_str()]);
    let points1 = keys(&w, "points/");
    let orphans: Vec<_> = points1.difference(&points0).collect();
    assert!(
        orphans.len() == 1 && orphans[0].ends_with("/disk-0.idx"),
        "{orphans:?}"
    );
    assert!(keys(&w, "chunks/").len() >= chunks0.len() + 200);
    let locks = keys(&w, "locks/repo/");
    assert_eq!(locks.len(), 2, "{locks:?}");
    restores(&w, &r1.point_id, h1, "after the kills");
    verify_ok(&w, "after the kills");

    // The dead backups' lock objects name processes of this host that no
    // longer run: prune removes them and goes ahead, collecting everything.
    let o = w.ferry(&["prune", "--keep-last", "5", "--lock-wait", "1"]);
    assert!(o.status.success(), "prune: {}", text(&o));
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("no longer runs"), "{}", text(&o));
    let _ = (pid1, pid2);
    assert!(keys(&w, "locks/repo/").is_empty(), "{locks:?} left");
    assert_eq!(
        keys(&w, "points/"),
        points0,
        "index without manifest collected"
    );
    assert_eq!(
        keys(&w, "chunks/"),
        chunks0,
        "unreferenced chunks collected"
    );
    assert_eq!(w.repo().point_ids().unwrap(), [r1.point_id.as_str()]);
    restores(&w, &r1.point_id, h1, "after prune");
    verify_ok(&w, "after prune");
}

/// `e` names the cause (the clock, RequestTimeTooSkewed) and the fix (NTP).
fn names_the_clock(e: &str) {
    assert!(
        e.contains("clock") && e.contains("RequestTimeTooSkewed") && e.contains("NTP"),
        "{e}"
    );
}

#[test]
fn clock_skew_is_one_clear_error() {
    // The proxy moves each request's signed date an hour back, as a client
    // whose clock is an hour slow would sign it; s3s-fs itself answers 403
    // RequestTimeTooSkewed (it checks the skew before the signature).
    let (_server, proxy, mut w) = setup("faults-skew");
    tune(&mut w, 3, Duration::from_secs(30));
    let img = w.image("disk.img", 16 * CS as u64, 13);
    let r1 = w.try_backup("vm1", &[&img]).unwrap();
    let h1 = hash(&img);
    let (points0, chunks0) = (keys(&w, "points/"), keys(&w, "chunks/"));
    let skew = Fault::ShiftDate(-3600);

    // Every request skewed (the binary): the first, reading the
    // repository's config, is refused and not retried; one error, the cause
    // and the fix, once.
    proxy.reset_counts();
    proxy.set(vec![Rule::new(When::Always, skew.clone())]);
    let t = Instant::now();
    let o = w.ferry(&["backup", "--name", "vm1", "--image", img.to_str().unwrap()]);
    proxy.clear();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    names_the_clock(&err);
    assert_eq!(err.matches("RequestTimeTooSkewed").count(), 1, "{err}");
    assert_eq!(
        proxy.count(|s| s.status == Some(403)),
        1,
        "refused once, not retried: {:?}",
        proxy.seen()
    );
    assert_eq!(keys(&w, "points/"), points0);

    // Only the point's files skewed: the new chunks are stored, the index is
    // refused, the backup fails with the same clear error, and no point
    // exists (the manifest was never sent).
    let img2 = w.image("disk2.img", 16 * CS as u64, 14);
    proxy.reset_counts();
    let rule = Rule::new(When::Always, skew).method("PUT").path("/points/");
    let e = fails(&w, &proxy, rule, &img2);
    names_the_clock(&e);
    assert!(e.contains("disk-0.idx"), "{e}");
    assert_eq!(proxy.count(is("PUT", "/points/")), 1, "not retried");
    assert_eq!(proxy.count(is("PUT", "/manifest")), 0);
    assert_eq!(keys(&w, "points/"), points0, "nothing of the point stored");
    assert!(keys(&w, "chunks/").len() > chunks0.len());

    // The clock right again: prune collects the failed backup's chunks; the
    // earlier point restores and verifies.
    let o = w.ferry(&["prune", "--keep-last", "5"]);
    assert!(o.status.success(), "prune: {}", text(&o));
    assert_eq!(keys(&w, "chunks/"), chunks0);
    assert_eq!(w.repo().point_ids().unwrap(), [r1.point_id.as_str()]);
    restores(&w, &r1.point_id, h1, "after the skew");
    verify_ok(&w, "after the skew");
}
