use super::*;
use serde_json::json;

fn new_job(id: &str, kind: JobKind, tenant: &str) -> NewJob {
    NewJob {
        id: id.into(),
        kind,
        spec: json!({"vm": id}),
        tenant: tenant.into(),
        subject: format!("vm-{id}"),
        disks: json!([{"disk_key": 2000, "mode": "hotadd"}]),
        bytes_total: 100,
    }
}

fn open(dir: &tempfile::TempDir) -> (StateStore, Recovered) {
    StateStore::open(&dir.path().join("state").join("agent.sqlite")).unwrap()
}

fn done(state: JobState, bytes: u64) -> Finish {
    Finish {
        state,
        bytes_done: bytes,
        bytes_total: 100,
        disks: json!([{"disk_key": 2000, "bytes": bytes}]),
        error: (state != JobState::Succeeded).then(|| ErrorInfo {
            code: "x".into(),
            message: "y".into(),
        }),
        notes: json!(["n"]),
        point_id: Some("p1".into()),
    }
}

#[test]
fn fresh_database_is_migrated_wal_and_full_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (s, rec) = open(&dir);
    assert!(rec.jobs.is_empty() && rec.runs.is_empty());
    assert_eq!(
        s.schema_version().unwrap(),
        migrations::MIGRATIONS.len() as i64
    );
    let c = s.lock();
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    assert_eq!(sync, 2, "synchronous = FULL");
    drop(c);
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(dir.path().join("state")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    // Reopening does not re-run migrations.
    drop(s);
    let (s, _) = open(&dir);
    assert_eq!(
        s.schema_version().unwrap(),
        migrations::MIGRATIONS.len() as i64
    );
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sqlite");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
    }
    match StateStore::open(&path) {
        Err(StateError::TooNew {
            found: 99, known, ..
        }) if known == migrations::MIGRATIONS.len() as i64 => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn job_lifecycle_and_terminal_states_are_final() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(&dir);
    let j = s.insert_job(&new_job("j1", JobKind::Backup, "a")).unwrap();
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.bytes_total, 100);
    assert!(j.started_at.is_none() && j.error.is_none());
    assert!(matches!(
        s.insert_job(&new_job("j1", JobKind::Backup, "a")),
        Err(StateError::Duplicate { .. })
    ));
    let j = s.mark_running("j1").unwrap();
    assert_eq!(j.state, JobState::Running);
    assert!(j.started_at.is_some());
    assert!(matches!(
        s.mark_running("j1"),
        Err(StateError::Conflict { ref state, .. }) if state == "running"
    ));
    s.update_progress("j1", 40, 100).unwrap();
    assert_eq!(s.get_job("j1").unwrap().unwrap().bytes_done, 40);
    let j = s.finish_job("j1", &done(JobState::Succeeded, 100)).unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(j.bytes_done, 100);
    assert_eq!(j.point_id.as_deref(), Some("p1"));
    assert_eq!(j.notes, json!(["n"]));
    assert_eq!(j.disks, json!([{"disk_key": 2000, "bytes": 100}]));
    assert!(j.finished_at.unwrap() >= j.started_at.unwrap());
    // Final: no second finish, no progress change.
    assert!(matches!(
        s.finish_job("j1", &done(JobState::Failed, 1)),
        Err(StateError::Conflict { .. })
    ));
    s.update_progress("j1", 1, 1).unwrap();
    assert_eq!(s.get_job("j1").unwrap().unwrap().bytes_done, 100);
    // Non-terminal finish is a programming error, reported as such.
    s.insert_job(&new_job("j2", JobKind::Restore, "a")).unwrap();
    assert!(s.finish_job("j2", &done(JobState::Running, 0)).is_err());
    // A queued job may be cancelled directly.
    let j = s.finish_job("j2", &done(JobState::Cancelled, 0)).unwrap();
    assert_eq!(j.error.unwrap().code, "x");
    assert!(matches!(
        s.mark_running("nope"),
        Err(StateError::NotFound { .. })
    ));
    assert!(s.get_job("nope").unwrap().is_none());
    s.set_cleanup("j2", "nothing to clean").unwrap();
    assert_eq!(
        s.get_job("j2").unwrap().unwrap().cleanup.as_deref(),
        Some("nothing to clean")
    );
    assert!(matches!(
        s.set_cleanup("nope", "x"),
        Err(StateError::NotFound { .. })
    ));
}

#[test]
fn list_filters_orders_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(&dir);
    for i in 0..5 {
        let kind = if i % 2 == 0 {
            JobKind::Backup
        } else {
            JobKind::Restore
        };
        s.insert_job(&new_job(
            &format!("j{i}"),
            kind,
            if i < 3 { "a" } else { "b" },
        ))
        .unwrap();
    }
    s.mark_running("j0").unwrap();
    s.finish_job("j0", &done(JobState::Succeeded, 70)).unwrap();
    s.mark_running("j1").unwrap();
    s.finish_job("j1", &done(JobState::Failed, 30)).unwrap();
    s.mark_running("j2").unwrap();
    let all = s.list_jobs(&JobFilter::default()).unwrap();
    let ids: Vec<&str> = all.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["j4", "j3", "j2", "j1", "j0"], "newest first");
    let f = JobFilter {
        state: Some(JobState::Queued),
        ..Default::default()
    };
    assert_eq!(s.list_jobs(&f).unwrap().len(), 2);
    let f = JobFilter {
        kind: Some(JobKind::Restore),
        tenant: Some("b".into()),
        ..Default::default()
    };
    let r = s.list_jobs(&f).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].id, "j3");
    let f = JobFilter {
        limit: 2,
        ..Default::default()
    };
    assert_eq!(s.list_jobs(&f).unwrap().len(), 2);
    let f = JobFilter {
        limit: 0,
        ..Default::default()
    };
    assert_eq!(
        s.list_jobs(&f).unwrap().len(),
        1,
        "limit clamps to at least 1"
    );
    let counts = s.count_by_state().unwrap();
    assert_eq!(
        counts,
        vec![
            (JobState::Queued, 2),
            (JobState::Running, 1),
            (JobState::Succeeded, 1),
            (JobState::Failed, 1),
            (JobState::Cancelled, 0)
        ]
    );
    assert_eq!(
        s.finished_bytes().unwrap(),
        vec![
            (JobKind::Backup, 70),
            (JobKind::Restore, 30),
            (JobKind::Verify, 0)
        ]
    );
}

#[test]
fn crash_recovery_marks_running_and_queued_jobs_failed_once() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, _) = open(&dir);
        s.insert_job(&new_job("run", JobKind::Backup, "a")).unwrap();
        s.mark_running("run").unwrap();
        s.update_progress("run", 33, 100).unwrap();
        s.insert_job(&new_job("queued", JobKind::Restore, "a"))
            .unwrap();
        s.insert_job(&new_job("ok", JobKind::Backup, "a")).unwrap();
        s.mark_running("ok").unwrap();
        s.finish_job("ok", &done(JobState::Succeeded, 100)).unwrap();
        let r = s.start_run("r1", "nightly", RunKind::Backup).unwrap();
        assert_eq!(r.state, RunState::Running);
        s.put_run_item(&RunItem {
            run_id: "r1".into(),
            item: "vm-1".into(),
            agent: Some("proxy-a".into()),
            agent_job_id: Some("run".into()),
            state: ItemState::Dispatched,
            attempts: 1,
            detail: json!({}),
            error: None,
            bytes: 0,
            updated_at: 0,
        })
        .unwrap();
        // Dropped without finishing: a crash, as far as the database knows.
    }
    let (s, rec) = open(&dir);
    let ids: Vec<&str> = rec.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["run", "queued"]);
    for j in &rec.jobs {
        assert_eq!(j.state, JobState::Failed);
        let e = j.error.as_ref().unwrap();
        assert_eq!(e.code, INTERRUPTED_CODE);
        assert_eq!(e.message, INTERRUPTED_AGENT);
        assert!(j.finished_at.is_some());
    }
    assert_eq!(rec.jobs[0].bytes_done, 33, "last recorded progress kept");
    assert_eq!(
        rec.jobs[0].spec,
        json!({"vm": "run"}),
        "spec returned for the sweep"
    );
    assert_eq!(s.get_job("ok").unwrap().unwrap().state, JobState::Succeeded);
    assert_eq!(rec.runs.len(), 1);
    assert_eq!(rec.runs[0].state, RunState::Failed);
    assert_eq!(rec.runs[0].error.as_deref(), Some(INTERRUPTED_ORCHESTRATOR));
    let items = s.run_items("r1").unwrap();
    assert_eq!(items[0].state, ItemState::Failed);
    assert!(items[0].error.as_ref().unwrap().contains("agent_job_id"));
    drop(s);
    let (_, rec) = open(&dir);
    assert!(rec.jobs.is_empty() && rec.runs.is_empty(), "recovered once");
}

#[test]
fn key_registry_detects_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(&dir);
    let obs = |id: &str, v: u64| KeyObservation {
        tenant: "a".into(),
        kms: "kms-a:5696".into(),
        key_name: "ferry/a".into(),
        key_id: id.into(),
        version: v,
    };
    let c = s.record_key_check(&obs("k1", 1)).unwrap();
    assert!(c.changed && c.previous.is_none());
    let first_change = s.keys().unwrap()[0].changed_at;
    std::thread::sleep(std::time::Duration::from_millis(5));
    let c = s.record_key_check(&obs("k1", 1)).unwrap();
    assert!(!c.changed);
    assert_eq!(c.previous, Some(("k1".into(), 1)));
    let e = &s.keys().unwrap()[0];
    assert_eq!(e.changed_at, first_change, "unchanged key keeps changed_at");
    assert!(e.checked_at > first_change);
    let c = s.record_key_check(&obs("k2", 2)).unwrap();
    assert!(c.changed);
    assert_eq!(c.previous, Some(("k1".into(), 1)));
    let all = s.keys().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].key_id.as_str(), all[0].version), ("k2", 2));
    s.record_key_check(&KeyObservation {
        tenant: "b".into(),
        ..obs("kb", 7)
    })
    .unwrap();
    assert_eq!(s.keys().unwrap().len(), 2);
}

#[test]
fn runs_items_and_last_run() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(&dir);
    assert!(s.last_run("nightly", RunKind::Backup).unwrap().is_none());
    s.start_run("r1", "nightly", RunKind::Backup).unwrap();
    assert!(matches!(
        s.start_run("r1", "nightly", RunKind::Backup),
        Err(StateError::Duplicate { .. })
    ));
    let mut item = RunItem {
        run_id: "r1".into(),
        item: "vm-1".into(),
        agent: None,
        agent_job_id: None,
        state: ItemState::Pending,
        attempts: 0,
        detail: json!({"plan": []}),
        error: None,
        bytes: 0,
        updated_at: 0,
    };
    s.put_run_item(&item).unwrap();
    item.state = ItemState::Succeeded;
    item.agent = Some("proxy-a".into());
    item.attempts = 2;
    item.bytes = 4096;
    s.put_run_item(&item).unwrap();
    s.put_run_item(&RunItem {
        item: "vm-2".into(),
        state: ItemState::Refused,
        ..item.clone()
    })
    .unwrap();
    let items = s.run_items("r1").unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].state, ItemState::Succeeded);
    assert_eq!(items[0].attempts, 2);
    assert_eq!(items[0].bytes, 4096);
    assert!(items[0].updated_at > 0);
    let r = s
        .finish_run("r1", RunState::Failed, &json!({"refused": 1}), None)
        .unwrap();
    assert_eq!(r.summary, json!({"refused": 1}));
    assert!(matches!(
        s.finish_run("r1", RunState::Succeeded, &json!({}), None),
        Err(StateError::Conflict { .. })
    ));
    std::thread::sleep(std::time::Duration::from_millis(3));
    s.start_run("r2", "nightly", RunKind::Backup).unwrap();
    s.start_run("k1", "key-sync", RunKind::KeySync).unwrap();
    assert_eq!(
        s.last_run("nightly", RunKind::Backup).unwrap().unwrap().id,
        "r2"
    );
    assert_eq!(s.list_runs(None, 10).unwrap().len(), 3);
    assert_eq!(s.list_runs(Some("nightly"), 10).unwrap().len(), 2);
}

#[test]
fn damaged_rows_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(&dir);
    s.insert_job(&new_job("j", JobKind::Backup, "a")).unwrap();
    s.lock()
        .execute("UPDATE jobs SET spec = '{not json' WHERE id = 'j'", [])
        .unwrap();
    match s.get_job("j") {
        Err(StateError::Corrupt { what, .. }) => assert!(what.contains("spec of j"), "{what}"),
        other => panic!("{other:?}"),
    }
    assert!(s.list_jobs(&JobFilter::default()).is_err());
}

#[test]
fn two_connections_write_concurrently_without_busy_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.sqlite");
    let (a, _) = StateStore::open(&path).unwrap();
    let (b, _) = StateStore::open(&path).unwrap();
    std::thread::scope(|sc| {
        for (n, s) in [(0, &a), (1, &b)] {
            sc.spawn(move || {
                for i in 0..50 {
                    let id = format!("{n}-{i}");
                    s.insert_job(&new_job(&id, JobKind::Backup, "t")).unwrap();
                    s.mark_running(&id).unwrap();
                    s.finish_job(&id, &done(JobState::Succeeded, 1)).unwrap();
                }
            });
        }
    });
    let f = JobFilter {
        limit: 1000,
        ..Default::default()
    };
    assert_eq!(a.list_jobs(&f).unwrap().len(), 100);
}

#[test]
fn timestamps_render_as_rfc3339() {
    assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    assert!(now_ms() > 1_700_000_000_000);
}

#[test]
fn state_lock_is_exclusive_and_released_with_its_holder() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sub/agent.lock");
    let l = StateLock::acquire(&p).unwrap();
    match StateLock::acquire(&p) {
        Err(StateError::Locked { holder, .. }) => {
            assert_eq!(holder, std::process::id().to_string())
        }
        other => panic!("{other:?}"),
    }
    drop(l);
    StateLock::acquire(&p).unwrap();
}

#[test]
fn readers_do_not_recover() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sqlite");
    let (s, _) = StateStore::open(&path).unwrap();
    s.insert_job(&new_job("live", JobKind::Backup, "a"))
        .unwrap();
    s.mark_running("live").unwrap();
    let r = StateStore::open_no_recovery(&path).unwrap();
    assert_eq!(r.get_job("live").unwrap().unwrap().state, JobState::Running);
}

#[test]
fn v2_database_with_jobs_migrates_to_verify_kind_and_keeps_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.sqlite");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        for m in &migrations::MIGRATIONS[..2] {
            c.execute_batch(m).unwrap();
        }
        c.execute_batch("PRAGMA user_version = 2").unwrap();
        // Version 2 refuses a verify job.
        assert!(c
            .execute(
                "INSERT INTO jobs (id, kind, spec, tenant, subject, state, created_at) \
                 VALUES ('v', 'verify', '{}', 't', 'repository', 'succeeded', 1)",
                [],
            )
            .is_err());
        c.execute(
            "INSERT INTO jobs (id, kind, spec, tenant, subject, state, created_at, finished_at, \
             bytes_done, bytes_total, notes, error_code, error_message, point_id) \
             VALUES ('b1', 'backup', '{\"vm\":\"b1\"}', 'ta', 'web', 'succeeded', 10, 20, 5, 6, \
             '[\"n1\"]', NULL, NULL, 'p1')",
            [],
        )
        .unwrap();
        c.execute(
            "INSERT INTO jobs (id, kind, spec, tenant, subject, state, created_at, finished_at, \
             error_code, error_message) \
             VALUES ('r1', 'restore', '{}', 'tb', 'p1', 'failed', 30, 40, 'x', 'y')",
            [],
        )
        .unwrap();
    }
    let (s, rec) = StateStore::open(&path).unwrap();
    assert!(rec.jobs.is_empty());
    assert_eq!(
        s.schema_version().unwrap(),
        migrations::MIGRATIONS.len() as i64
    );
    let b = s.get_job("b1").unwrap().unwrap();
    assert_eq!(
        (b.kind, b.state, b.tenant.as_str(), b.subject.as_str()),
        (JobKind::Backup, JobState::Succeeded, "ta", "web")
    );
    assert_eq!((b.bytes_done, b.bytes_total), (5, 6));
    assert_eq!(b.point_id.as_deref(), Some("p1"));
    assert_eq!(b.notes, json!(["n1"]));
    let r = s.get_job("r1").unwrap().unwrap();
    assert_eq!((r.kind, r.state), (JobKind::Restore, JobState::Failed));
    assert_eq!(r.error.as_ref().map(|e| e.code.as_str()), Some("x"));
    // The indexes are back and a verify job now fits.
    let c = s.lock();
    let idx: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name IN ('jobs_state', 'jobs_created')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(idx, 2);
    drop(c);
    s.insert_job(&NewJob {
        id: "v1".into(),
        kind: JobKind::Verify,
        spec: json!({}),
        tenant: "ta".into(),
        subject: "repository".into(),
        disks: json!([]),
        bytes_total: 0,
    })
    .unwrap();
    assert_eq!(s.get_job("v1").unwrap().unwrap().kind, JobKind::Verify);
    assert_eq!(s.list_jobs(&JobFilter::default()).unwrap().len(), 3);
}
