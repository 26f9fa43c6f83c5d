//! Crash safety: `ferry backup` killed with SIGKILL at many random moments. After
//! each kill the repository verifies and every committed point restores bit for
//! bit; the killed backup leaves either a whole point or none.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::process::Stdio;
use std::time::Instant;

#[test]
fn sigkill_at_random_moments_never_harms_the_repository() {
    let w = World::new();
    let img = w.image("disk.img", 24 << 20, 7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xF3221);
    let mut expected: HashMap<String, blake3::Hash> = HashMap::new();

    let run = || {
        w.command(&[
            "backup",
            "--name",
            "vm",
            "--image",
            img.to_str().unwrap(),
            "--workers",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
    };
    assert!(run().wait().unwrap().success());
    expected.insert(w.repo().point_ids().unwrap()[0].clone(), hash(&img));
    // Measure one uninterrupted incremental run (same work as the rounds below) to
    // spread the kills over its whole duration.
    ferry_mocks::diskgen::mutate(&img, 99, 0.05, 256 << 10).unwrap();
    let t = Instant::now();
    assert!(run().wait().unwrap().success());
    let mut full = t.elapsed();
    let ids = w.repo().point_ids().unwrap();
    expected.insert(ids[ids.len() - 1].clone(), hash(&img));

    let mut kills = 0;
    let mut committed_by_killed = 0;
    let mut round = 0u64;
    while kills < 20 {
        round += 1;
        assert!(
            round <= 60,
            "only {kills} of {round} runs were killed mid-way"
        );
        // The guest changes the disk between backups.
        ferry_mocks::diskgen::mutate(&img, 100 + round, 0.05, 256 << 10).unwrap();
        let want = hash(&img);
        let before: Vec<String> = w.repo().point_ids().unwrap();
        let mut child = run();
        let delay = full.mul_f64(rng.gen_range(0.0..1.0));
        std::thread::sleep(delay);
        let killed = child.try_wait().unwrap().is_none();
        if killed {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        } else {
            // The run was quicker than the one measured (the machine was busier
            // then): aim the next kills earlier.
            full = full.mul_f64(0.8);
        }
        let status = child.wait().unwrap();
        assert!(
            killed || status.success(),
            "uninterrupted backup failed: {status:?}"
        );
        let after: Vec<String> = w.repo().point_ids().unwrap();
        let new: Vec<&String> = after.iter().filter(|p| !before.contains(p)).collect();
        assert!(new.len() <= 1, "round {round}: {new:?}");
        if let Some(p) = new.first() {
            expected.insert((*p).clone(), want);
            if killed {
                committed_by_killed += 1;
            }
        }
        // The whole repository verifies ...
        let rep = ferry::repo::verify::verify(
            &w.repo(),
            &w.source(),
            &[],
            2,
            false,
            &ferry::progress::Progress::default(),
        )
        .unwrap();
        assert!(rep.ok(), "round {round} (killed after {delay:?}): {rep:#?}");
        // ... and committed points restore bit-identically: the newest and a random
        // earlier one each round (verify above already authenticated every chunk of
        // every point), all of them at the end.
        let sample = [after.last().unwrap(), &after[rng.gen_range(0..after.len())]];
        for p in sample {
            let t = w.path("restored.img");
            w.restore(p, 0, &t)
                .unwrap_or_else(|e| panic!("round {round}: restore {p}: {e}"));
            assert_eq!(hash(&t), expected[p], "round {round}: point {p} differs");
        }
    }
    for p in w.repo().point_ids().unwrap() {
        let t = w.path("restored.img");
        w.restore(&p, 0, &t)
            .unwrap_or_else(|e| panic!("restore {p}: {e}"));
        assert_eq!(hash(&t), expected[&p], "point {p} differs");
    }
    eprintln!("{kills} kills, {committed_by_killed} of them after the commit point");
    // Garbage left by killed runs is collected without touching live data.
    let o = w.ferry(&["--json", "prune", "--keep-last", "100"]);
    assert!(o.status.success(), "{}", text(&o));
    let rep = ferry::repo::verify::verify(
        &w.repo(),
        &w.source(),
        &[],
        2,
        false,
        &ferry::progress::Progress::default(),
    )
    .unwrap();
    assert!(rep.ok());
    assert!(files_under(&w.repo_dir.join("tmp")).is_empty());
}

#[test]
fn sigterm_cancels_promptly_and_leaves_no_point() {
    let w = World::new();
    let img = w.image("big.img", 256 << 20, 3);
    let child = w
        .command(&[
            "backup",
            "--name",
            "vm",
            "--image",
            img.to_str().unwrap(),
            "--workers",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the pipeline is running (chunks appear), then ask it to stop.
    let t = Instant::now();
    while files_under(&w.repo_dir.join("chunks")).len() < 5 {
        assert!(t.elapsed().as_secs() < 60, "backup never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let sent = Instant::now();
    // SAFETY: kill(2) with a valid pid and signal number.
    unsafe { libc::kill(child.id() as i32, 15) };
    let out = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
    assert!(took.as_secs() < 5, "cancellation took {took:?}");
    assert!(w.repo().point_ids().unwrap().is_empty());
    assert!(
        files_under(&w.repo_dir.join("tmp")).is_empty(),
        "temporary point left behind"
    );
}
