//! The agent API end to end over real HTTPS: authentication on every endpoint,
//! job life cycle, cancellation, slots, admission by the transport selector,
//! validation errors, key sync, metrics, mutual TLS, graceful shutdown, a
//! restart with a job left `running` in SQLite, and verify jobs through the
//! real runner on a good and a damaged repository.

mod agent_support;
mod common;

use agent_support::*;
use ferry::state::{JobKind, NewJob, StateStore};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Every (method, path) of the API, health excepted.
const PROTECTED: &[(&str, &str)] = &[
    ("GET", "/v1/info"),
    ("POST", "/v1/backups"),
    ("POST", "/v1/restores"),
    ("POST", "/v1/verifies"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/some-id"),
    ("POST", "/v1/jobs/some-id/cancel"),
    ("POST", "/v1/keys/sync"),
    ("POST", "/v1/keys/check"),
    ("GET", "/v1/repositories"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
];

fn method(m: &str) -> Method {
    Method::from_bytes(m.as_bytes()).unwrap()
}

fn assert_error(status: StatusCode, v: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_on_every_endpoint_but_health() {
    let dir = tempfile::tempdir().unwrap();
    let f = AgentFixture::start(dir.path(), &AgentOpts::default(), TestRunner::new()).await;
    assert!(f.url.starts_with("https://"));
    for (m, p) in PROTECTED {
        for token in [None, Some("wrong-token-0123456789abcdef"), Some("")] {
            let body = (*m == "POST").then(|| json!({}));
            let (s, h, v) = f.request(method(m), p, token, body.as_ref()).await;
            assert_error(s, &v, StatusCode::UNAUTHORIZED, "unauthorized");
            assert!(
                h.get("www-authenticate")
                    .is_some_and(|w| w.to_str().unwrap().starts_with("Bearer")),
                "{m} {p}"
            );
        }
        // With the token: anything but 401.
        let body = (*m == "POST").then(|| json!({}));
        let (s, _, v) = f.request(method(m), p, Some(TOKEN), body.as_ref()).await;
        assert_ne!(s, StatusCode::UNAUTHORIZED, "{m} {p}: {v}");
    }
    // A large body without a token still gets its 401 (not a reset connection).
    let r = f
        .client
        .post(format!("{}/v1/keys/sync", f.url))
        .header("content-type", "application/json")
        .body(vec![b' '; 3 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Basic auth with the right secret is still refused.
    let r = f
        .client
        .get(format!("{}/v1/info", f.url))
        .basic_auth(TOKEN, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Health: no token needed, and a wrong one does not matter.
    for token in [None, Some("nope")] {
        let (s, _, v) = f.request(Method::GET, "/v1/health", token, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["status"], "ok");
    }
    // Unknown paths do not reveal themselves without a token; with one, JSON 404.
    let (s, _, _) = f.request(Method::GET, "/v2/nothing", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = f.get("/v2/nothing").await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found");
    // Wrong method: JSON 405 with Allow.
    let (s, h, v) = f
        .request(Method::DELETE, "/v1/jobs", Some(TOKEN), None)
        .await;
    assert_error(s, &v, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert!(
        h.get("allow")
            .is_some_and(|a| a.to_str().unwrap().contains("GET")),
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_describes_the_proxy_and_never_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let o = AgentOpts {
        tenants: vec![
            ("tenant-a".into(), Some("KMS-A".into())),
            ("tenant-x".into(), None),
        ],
        ..Default::default()
    };
    let f = AgentFixture::start(dir.path(), &o, TestRunner::new()).await;
    let (s, v) = f.get("/v1/info").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["id"], "proxy-a");
    assert_eq!(v["key_provider"], "KMS-A");
    assert_eq!(v["is_vm"], true);
    assert_eq!(v["modes"], json!(["hotadd", "nbdssl"]));
    assert_eq!(v["slots"], json!({"total": 4, "used": 0, "free": 4}));
    assert_eq!(v["datastores"], json!(["ds-a"]));
    assert_eq!(v["reachable_hosts"], Value::Null);
    assert_eq!(v["policy"]["failover_to_network"], true);
    assert_eq!(v["tenants"][0]["name"], "tenant-a");
    assert_eq!(v["tenants"][0]["key_provider"], "KMS-A");
    assert_eq!(v["tenants"][0]["key_source"], "kms");
    assert_eq!(
        v["tenants"][0]["kms"],
        json!({"address": "kms.tenant-a.example:5696", "key_name": "ferry/tenant-a"})
    );
    assert_eq!(v["tenants"][1]["key_provider"], Value::Null);
    let text = v.to_string();
    for secret in ["SECRET", "client", "ca.pem", "token", TOKEN, "BEGIN"] {
        assert!(!text.contains(secret), "info leaks {secret:?}: {text}");
    }
    // The orchestrator's view of it.
    let info: ferry::agent::api::Info = serde_json::from_value(v).unwrap();
    let p = info.to_proxy_info();
    assert_eq!(p.free_slots, 4);
    assert_eq!(p.key_provider.as_deref(), Some("KMS-A"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_life_cycle_reports_mode_reason_bytes_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let runner = TestRunner::gated();
    let f = AgentFixture::start(dir.path(), &AgentOpts::default(), runner.clone()).await;
    let (s, h, v) = f
        .request(
            Method::POST,
            "/v1/backups",
            Some(TOKEN),
            Some(&backup_body("tenant-a", "a01", Some("KMS-A"), 2, "ds-a")),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(
        h.get("location").unwrap().to_str().unwrap(),
        format!("/v1/jobs/{id}")
    );
    assert_eq!(v["kind"], "backup");
    assert_eq!(v["subject"], "a01");
    // The plan is visible while running: HotAdd on this proxy, with the reason.
    let running = f.wait_job(&id, |v| v["state"] == "running").await;
    assert_eq!(running["disks"].as_array().unwrap().len(), 2);
    for d in running["disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "hotadd");
        assert_eq!(d["proxy"], "proxy-a");
        assert!(
            d["reason"]
                .as_str()
                .unwrap()
                .starts_with("hotadd via proxy-a: chosen"),
            "{d}"
        );
    }
    let running = f
        .wait_job(&id, |v| v["bytes_done"].as_u64() > Some(0))
        .await;
    assert_eq!(running["bytes_total"], 2 * (8u64 << 20));
    assert!(running["rate_bytes_per_sec"].as_f64().unwrap() > 0.0);
    assert!(running["eta_secs"].as_f64().is_some(), "{running}");
    let (_, info) = f.get("/v1/info").await;
    assert_eq!(info["slots"], json!({"total": 4, "used": 2, "free": 2}));
    let (s, _, m) = f.request(Method::GET, "/metrics", Some(TOKEN), None).await;
    assert_eq!(s, StatusCode::OK);
    let m = m.as_str().unwrap().to_string();
    assert!(m.contains("ferry_agent_running_jobs 1"), "{m}");
    assert!(m.contains("ferry_agent_slots_used 2"), "{m}");
    assert!(m.contains("ferry_agent_jobs{state=\"running\"} 1"), "{m}");

    runner.gate.set(true);
    let done = f.wait_done(&id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["bytes_done"], 2 * (8u64 << 20));
    assert_eq!(done["eta_secs"], Value::Null);
    assert_eq!(done["point_id"], format!("point-{id}"));
    assert_eq!(done["notes"], json!(["test runner: no data moved"]));
    assert!(done["finished_at"].as_str().is_some());
    assert_eq!(done["disks"][1]["bytes"], 8u64 << 20);
    assert_eq!(
        done["disks"][1]["rate_bytes_per_sec"],
        16.0 * 1024.0 * 1024.0
    );
    assert_eq!(done["error"], Value::Null);
    // What the runner got: the VM, the selection and this proxy.
    let calls = runner.runs();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].job_id, id);
    assert_eq!(calls[0].proxy_key_provider.as_deref(), Some("KMS-A"));

    let (s, list) = f.get("/v1/jobs?state=succeeded&kind=backup&limit=5").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    let (_, list) = f.get("/v1/jobs?state=failed").await;
    assert!(list["jobs"].as_array().unwrap().is_empty());
    let (_, info) = f.get("/v1/info").await;
    assert_eq!(info["slots"]["free"], 4);
    let (_, _, m) = f.request(Method::GET, "/metrics", Some(TOKEN), None).await;
    let m = m.as_str().unwrap();
    assert!(m.contains("ferry_agent_jobs{state=\"succeeded\"} 1"), "{m}");
    assert!(
        m.contains(&format!(
            "ferry_agent_bytes_moved_total{{kind=\"backup\"}} {}",
            2 * (8u64 << 20)
        )),
        "{m}"
    );
    assert!(m.contains("ferry_agent_running_jobs 0"), "{m}");
    assert!(m.trim_end().ends_with("# EOF"), "{m}");
    // Unknown job.
    let (s, v) = f.get("/v1/jobs/job-nope").await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "job_not_found");
    // A failing job records the runner's typed error.
    runner.fail_vms.lock().unwrap().push("bad".into());
    let (s, v) = f
        .post(
            "/v1/backups",
            &backup_body("tenant-a", "bad", None, 1, "ds-a"),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let done = f.wait_done(v["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed");
    assert_eq!(done["error"]["code"], "vsphere_error");
    assert!(done["error"]["message"]
        .as_str()
        .unwrap()
        .contains("injected fault"));
    // A restore (under the tenant's restore_dirs).
    let (s, v) = f
        .post(
            "/v1/restores",
            &json!({"tenant": "tenant-a", "point": "latest:a01", "disks": [0, 1],
                    "target": {"kind": "directory", "path": f.dir.join("restores/tenant-a/here")}}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let done = f.wait_done(v["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["kind"], "restore");
    assert_eq!(done["disks"][0]["mode"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_and_finished_jobs_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let runner = TestRunner::gated();
    let f = AgentFixture::start(dir.path(), &AgentOpts::default(), runner.clone()).await;
    let (s, v) = f
        .post(
            "/v1/backups",
            &backup_body("tenant-a", "a02", Some("KMS-A"), 1, "ds-a"),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    f.wait_job(&id, |v| v["state"] == "running").await;
    let (s, v) = f.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["cancel_requested"], true);
    let done = f.wait_done(&id).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert_eq!(done["error"]["code"], "cancelled");
    assert!(done["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cancelled through the API"));
    let (s, v) = f.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_error(s, &v, StatusCode::CONFLICT, "job_finished");
    let (s, v) = f.post("/v1/jobs/job-none/cancel", &json!({})).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "job_not_found");
    let (_, info) = f.get("/v1/info").await;
    assert_eq!(info["slots"]["used"], 0, "slots released after cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_limit_concurrent_work() {
    let dir = tempfile::tempdir().unwrap();
    let runner = TestRunner::gated();
    let o = AgentOpts {
        slots: 3,
        ..Default::default()
    };
    let f = AgentFixture::start(dir.path(), &o, runner.clone()).await;
    let (s, v) = f
        .post(
            "/v1/backups",
            &backup_body("tenant-a", "two", Some("KMS-A"), 2, "ds-a"),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let first = v["id"].as_str().unwrap().to_string();
    // 2 of 3 slots used: another 2-disk VM does not fit now...
    let (s, h, v) = f
        .request(
            Method::POST,
            "/v1/backups",
            Some(TOKEN),
            Some(&backup_body("tenant-a", "two-b", Some("KMS-A"), 2, "ds-a")),
        )
        .await;
    assert_error(s, &v, StatusCode::TOO_MANY_REQUESTS, "no_free_slots");
    assert!(h.get("retry-after").is_some());
    // ...a 1-disk VM does...
    let (s, v) = f
        .post(
            "/v1/backups",
            &backup_body("tenant-a", "one", Some("KMS-A"), 1, "ds-a"),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let second = v["id"].as_str().unwrap().to_string();
    // ...and a 4-disk VM never will.
    let (s, v) = f
        .post(
            "/v1/backups",
            &backup_body("tenant-a", "four", Some("KMS-A"), 4, "ds-a"),
        )
        .await;
    assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, "exceeds_slots");
    let (s, v) = f
        .post(
            "/v1/restores",
            &json!({"tenant": "tenant-a", "point": "p", "target": {"kind": "vm", "moref": "vm-1"}}),
        )
        .await;
    assert_error(s, &v, StatusCode::TOO_MANY_REQUESTS, "no_free_slots");
    let (_, info) = f.get("/v1/info").await;
    assert_eq!(info["slots"], json!({"total": 3, "used": 3, "free": 0}));
    runner.gate.set(true);
    f.wait_done(&first).await;
    f.wait_done(&second).await;
    let (s, v) = f
        .post(
            "/v1/backups",
            &backup_body("tenant-a", "two-b", Some("KMS-A"), 2, "ds-a"),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f.wait_done(v["id"].as_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_runs_the_selector_before_any_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let runner = TestRunner::new();
    // A HotAdd-only proxy of KMS-A serving two tenants, no network failover.
    let o = AgentOpts {
        modes: vec!["hotadd"],
        failover: false,
        datastores: vec!["ds-a".into(), "ds-b".into()],
        tenants: vec![
            ("tenant-a".into(), Some("KMS-A".into())),
            ("tenant-b".into(), Some("KMS-B".into())),
        ],
        ..Default::default()
    };
    let f = AgentFixture::start(dir.path(), &o, runner.clone()).await;
    let (s, v) = f
        .post(
            "/v1/backups",
            &backup_body("tenant-b", "b01", Some("KMS-B"), 1, "ds-b"),
        )
        .await;
    assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, "vm_refused");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("KMS-B") && m.contains("KMS-A") && m.contains("before snapshot"),
        "{m}"
    );
    assert!(
        runner.runs().is_empty(),
        "a refused VM never reaches the runner"
    );
    // With a policy allowing failover, the agent still has no network mode: refused.
    let mut body = backup_body("tenant-b", "b01", Some("KMS-B"), 1, "ds-b");
    body["policy"] = json!({"failover_to_network": true});
    let (s, v) = f.post("/v1/backups", &body).await;
    assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, "vm_refused");

    // A shared NBD-SSL proxy takes it, and never in clear text.
    let dir2 = tempfile::tempdir().unwrap();
    let o2 = AgentOpts {
        id: "shared-nbd".into(),
        modes: vec!["nbdssl", "nbd"],
        key_provider: None,
        tenants: o.tenants.clone(),
        ..Default::default()
    };
    let f2 = AgentFixture::start(dir2.path(), &o2, runner.clone()).await;
    let mut body = backup_body("tenant-b", "b01", Some("KMS-B"), 1, "ds-b");
    body["policy"] =
        json!({"failover_to_network": true, "allow_cleartext_nbd": true, "preferred": "nbd"});
    let (s, v) = f2.post("/v1/backups", &body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["disks"][0]["mode"], "nbdssl");
    let reason = v["disks"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("nbd not possible: clear-text NBD is never used"),
        "{reason}"
    );
    let done = f2.wait_done(v["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // Unknown tenant.
    let (s, v) = f2
        .post("/v1/backups", &backup_body("tenant-z", "z", None, 1, "ds"))
        .await;
    assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, "unknown_tenant");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tenant-a, tenant-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_json_error_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let f = AgentFixture::start(dir.path(), &AgentOpts::default(), TestRunner::new()).await;
    let send = |ct: Option<&'static str>, body: Vec<u8>, path: &'static str| {
        let mut rb = f
            .client
            .post(format!("{}{path}", f.url))
            .bearer_auth(TOKEN)
            .body(body);
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        async move {
            let r = rb.send().await.unwrap();
            let s = r.status();
            assert_eq!(
                r.headers().get("content-type").unwrap(),
                "application/json",
                "errors are JSON"
            );
            (
                s,
                serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap(),
            )
        }
    };
    let good = serde_json::to_vec(&backup_body("tenant-a", "x", None, 1, "ds-a")).unwrap();
    let (s, v) = send(Some("text/plain"), good.clone(), "/v1/backups").await;
    assert_error(
        s,
        &v,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (s, v) = send(None, good, "/v1/backups").await;
    assert_error(
        s,
        &v,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (s, v) = send(
        Some("application/json"),
        b"{\"tenant\":".to_vec(),
        "/v1/backups",
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request");
    let (s, v) = send(Some("application/json"), vec![b' '; 2 << 20], "/v1/backups").await;
    assert_error(s, &v, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let (s, v) = send(
        Some("application/json"),
        b"\xff\xfe".to_vec(),
        "/v1/restores",
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request");
    for (patch, needle) in [
        (json!({"tenant": ""}), "tenant"),
        (json!({"extra": 1}), "extra"),
        (json!({"policy": null}), "null"),
        (json!({"vm": {"name": "x"}}), "moref"),
        (
            json!({"retention": {"keep_last": 0}}),
            "retention.keep_last",
        ),
        (json!({"policy": {"preferred": "scsi"}}), "scsi"),
    ] {
        let mut b = backup_body("tenant-a", "x", None, 1, "ds-a");
        for (k, val) in patch.as_object().unwrap() {
            b[k] = val.clone();
        }
        let (s, v) = f.post("/v1/backups", &b).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{needle}: {v}"
        );
    }
    for q in [
        "state=bogus",
        "limit=0",
        "limit=1001",
        "limit=x",
        "kind=",
        "tenant=",
    ] {
        let (s, v) = f.get(&format!("/v1/jobs?{q}")).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let (s, v) = f
        .post(
            "/v1/restores",
            &json!({"tenant": "tenant-a", "point": "p", "target": {"kind": "directory", "path": "relative"}}),
        )
        .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request");
    // A job id with odd characters is just unknown.
    let (s, v) = f.get("/v1/jobs/%00%2F..%20x").await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "job_not_found");
}

/// Restores to a directory or files land only at or under the tenant's
/// `restore_dirs` (issue 19): anything else, symlinks followed, is refused with
/// 403 `restore_path_not_allowed` before a job exists, and nothing is created.
/// A tenant without `restore_dirs` gets no such restore at all; VM targets are
/// not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_outside_the_tenants_restore_dirs_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let runner = TestRunner::new();
    let o = AgentOpts {
        datastores: vec!["ds-a".into(), "ds-b".into()],
        tenants: vec![
            ("tenant-a".into(), Some("KMS-A".into())),
            ("tenant-b".into(), Some("KMS-B".into())),
        ],
        ..Default::default()
    };
    let f = AgentFixture::start(&root, &o, runner.clone()).await;
    // restore_dirs = ["restores/<tenant>"], relative to the agent's config.
    let allowed = root.join("restores/tenant-a");
    let outside = root.join("outside");
    std::fs::create_dir_all(allowed.join("real")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("escape")).unwrap();
    std::os::unix::fs::symlink("real", allowed.join("alias")).unwrap();
    let restore = |kind: &str, path: &std::path::Path| {
        let mut target = json!({"kind": kind, "path": path});
        if kind == "files" {
            target["paths"] = json!(["/etc"]);
        }
        json!({"tenant": "tenant-a", "point": "latest:a01", "target": target})
    };
    for (kind, path, created) in [
        ("directory", outside.join("x"), outside.join("x")),
        ("files", outside.join("x"), outside.join("x")),
        // A sibling sharing the allowed directory's name as a prefix.
        (
            "directory",
            root.join("restores/tenant-a-evil"),
            root.join("restores/tenant-a-evil"),
        ),
        // Another tenant's restore directory.
        (
            "files",
            root.join("restores/tenant-b/x"),
            root.join("restores/tenant-b"),
        ),
        // `..`, even one that would come back inside.
        (
            "directory",
            allowed.join("../tenant-a/x"),
            allowed.join("x"),
        ),
        // A symlink inside the allowed directory pointing out of it.
        ("directory", allowed.join("escape/new"), outside.join("new")),
        ("files", allowed.join("escape"), outside.join("etc")),
        (
            "directory",
            std::path::PathBuf::from("/"),
            root.join("none"),
        ),
    ] {
        let (s, v) = f.post("/v1/restores", &restore(kind, &path)).await;
        assert_error(s, &v, StatusCode::FORBIDDEN, "restore_path_not_allowed");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("tenant-a") && m.contains(&allowed.display().to_string()),
            "{kind} {}: the message names the tenant and its allowed directory: {m}",
            path.display()
        );
        assert!(!created.exists(), "{} was created", created.display());
    }
    assert!(
        runner.runs().is_empty(),
        "a refused restore never reaches the runner"
    );
    let (_, jobs) = f.get("/v1/jobs").await;
    assert!(jobs["jobs"].as_array().unwrap().is_empty(), "{jobs}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing was written outside"
    );

    // Inside, through a symlink that stays inside: accepted, and the job gets
    // the resolved path (a later change of the symlink does not redirect it).
    for (kind, path, want) in [
        (
            "directory",
            allowed.join("alias/new"),
            allowed.join("real/new"),
        ),
        ("files", allowed.clone(), allowed.clone()),
    ] {
        let (s, v) = f.post("/v1/restores", &restore(kind, &path)).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let done = f.wait_done(v["id"].as_str().unwrap()).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        let runs = runner.runs();
        let got = match &runs.last().unwrap().spec {
            ferry::agent::JobSpec::Restore(r) => match &r.target {
                ferry::agent::RestoreTarget::Directory { path }
                | ferry::agent::RestoreTarget::Files { path, .. } => path.clone(),
                t => panic!("{t:?}"),
            },
            s => panic!("{s:?}"),
        };
        assert_eq!(got, want);
    }

    // A tenant without restore_dirs: every directory or files restore is
    // refused, naming the key and the tenant; a VM target still goes.
    let dir2 = tempfile::tempdir().unwrap();
    let runner2 = TestRunner::new();
    let o2 = AgentOpts {
        restore_dirs: false,
        ..Default::default()
    };
    let f2 = AgentFixture::start(dir2.path(), &o2, runner2.clone()).await;
    for kind in ["directory", "files"] {
        let path = dir2.path().join("restores/tenant-a/x");
        let (s, v) = f2.post("/v1/restores", &restore(kind, &path)).await;
        assert_error(s, &v, StatusCode::FORBIDDEN, "restore_path_not_allowed");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("restore_dirs") && m.contains("\"tenant-a\""),
            "{m}"
        );
        assert!(!dir2.path().join("restores").exists());
    }
    let (s, v) = f2
        .post(
            "/v1/restores",
            &json!({"tenant": "tenant-a", "point": "p", "target": {"kind": "vm", "moref": "vm-1"}}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    f2.wait_done(v["id"].as_str().unwrap()).await;
    assert_eq!(runner2.runs().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_sync_records_versions_and_reports_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let runner = TestRunner::new();
    let o = AgentOpts {
        tenants: vec![
            ("tenant-a".into(), Some("KMS-A".into())),
            ("tenant-b".into(), Some("KMS-B".into())),
        ],
        ..Default::default()
    };
    let f = AgentFixture::start(dir.path(), &o, runner.clone()).await;
    // No body at all is allowed.
    let r = f
        .client
        .post(format!("{}/v1/keys/sync", f.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let res = v["results"].as_array().unwrap();
    assert_eq!(res.len(), 2);
    assert_eq!(res[0]["tenant"], "tenant-a");
    assert_eq!(res[0]["kms"], "kms.tenant-a.example:5696");
    assert_eq!(res[0]["version"], 1);
    assert_eq!(res[0]["rotated"], false);
    assert_eq!(res[0]["previous_version"], Value::Null);
    // The KMS rotates tenant-a's key; tenant-b's KMS goes down.
    runner
        .key_versions
        .lock()
        .unwrap()
        .insert("tenant-a".into(), 2);
    runner
        .key_versions
        .lock()
        .unwrap()
        .insert("tenant-b".into(), 0);
    let (s, v) = f.post("/v1/keys/sync", &json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let a = &v["results"][0];
    assert_eq!(a["rotated"], true);
    assert_eq!(a["version"], 2);
    assert_eq!(a["previous_version"], 1);
    assert_eq!(a["previous_key_id"], "tenant-a-key-v1");
    let b = &v["results"][1];
    assert_eq!(b["error"]["code"], "key_error");
    assert_eq!(b["rotated"], false);
    let (s, v) = f
        .post("/v1/keys/sync", &json!({"tenants": ["tenant-a"]}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["results"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["results"][0]["rotated"], false,
        "no change since last sync"
    );
    let (s, v) = f
        .post("/v1/keys/sync", &json!({"tenants": ["nobody"]}))
        .await;
    assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, "unknown_tenant");
    // The registry holds names and versions only.
    let reg = StateStore::open_no_recovery(&dir.path().join("state/agent.sqlite"))
        .unwrap()
        .keys()
        .unwrap();
    assert_eq!(reg.len(), 2);
    assert_eq!(
        (reg[0].key_id.as_str(), reg[0].version),
        ("tenant-a-key-v2", 2)
    );
    assert_eq!(
        (reg[1].key_id.as_str(), reg[1].version),
        ("tenant-b-key-v1", 1),
        "a failed check keeps the last version seen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_client_ca_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let o = AgentOpts {
        mtls: true,
        ..Default::default()
    };
    let f = AgentFixture::start(dir.path(), &o, TestRunner::new()).await;
    let (s, _) = f.get("/v1/info").await;
    assert_eq!(s, StatusCode::OK);
    let anonymous = client(&f.pki, false);
    let e = anonymous
        .get(format!("{}/v1/health", f.url))
        .send()
        .await
        .expect_err("no client certificate, no connection");
    assert!(e.is_connect() || e.is_request(), "{e:?}");
    // A client that does not trust the agent's CA refuses it.
    let other = tempfile::tempdir().unwrap();
    let other_pki = Pki::new(other.path());
    let stranger = client(&other_pki, true);
    assert!(stranger
        .get(format!("{}/v1/health", f.url))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_cancels_records_and_refuses_new_work() {
    let dir = tempfile::tempdir().unwrap();
    let runner = TestRunner::gated();
    let mut f = AgentFixture::start(dir.path(), &AgentOpts::default(), runner.clone()).await;
    let (s, v) = f
        .post(
            "/v1/backups",
            &backup_body("tenant-a", "a03", Some("KMS-A"), 1, "ds-a"),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    f.wait_job(&id, |v| v["state"] == "running").await;
    f.shutdown().await;
    let (store, recovered) = StateStore::open(&dir.path().join("state/agent.sqlite")).unwrap();
    assert!(recovered.jobs.is_empty(), "nothing left running");
    let j = store.get_job(&id).unwrap().unwrap();
    assert_eq!(j.state.as_str(), "cancelled");
    assert!(j.error.unwrap().message.contains("agent shutting down"));
    assert!(
        f.client
            .get(format!("{}/v1/health", f.url))
            .send()
            .await
            .is_err(),
        "stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_marks_running_jobs_failed_and_sweeps_them() {
    let dir = tempfile::tempdir().unwrap();
    // A previous agent died while this job ran: the database says "running".
    let spec = {
        let runner = TestRunner::gated();
        let d2 = tempfile::tempdir().unwrap();
        let f = AgentFixture::start(d2.path(), &AgentOpts::default(), runner.clone()).await;
        let (s, v) = f
            .post(
                "/v1/backups",
                &backup_body("tenant-a", "a04", Some("KMS-A"), 1, "ds-a"),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED);
        f.wait_job(v["id"].as_str().unwrap(), |v| v["state"] == "running")
            .await;
        while runner.runs().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        runner.gate.set(true);
        runner.runs()[0].spec.clone()
    };
    {
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let (s, _) = StateStore::open(&dir.path().join("state/agent.sqlite")).unwrap();
        s.insert_job(&NewJob {
            id: "job-crashed".into(),
            kind: JobKind::Backup,
            spec: serde_json::to_value(&spec).unwrap(),
            tenant: "tenant-a".into(),
            subject: "a04".into(),
            disks: json!([]),
            bytes_total: 0,
        })
        .unwrap();
        s.mark_running("job-crashed").unwrap();
        s.update_progress("job-crashed", 123, 456).unwrap();
    }
    let runner = TestRunner::new();
    let f = AgentFixture::start(dir.path(), &AgentOpts::default(), runner.clone()).await;
    // A second agent on the same state directory is refused: its recovery would
    // mark the first one's jobs interrupted.
    let second = ferry::agent::Agent::from_config(&f.config).unwrap();
    let e = second.start(TestRunner::new()).await.err().unwrap();
    assert!(
        e.to_string().contains("only one agent or orchestrator"),
        "{e}"
    );
    let sweeps = runner.sweeps.lock().unwrap().clone();
    assert_eq!(sweeps.len(), 1, "sweep called once at start");
    assert_eq!(sweeps[0].len(), 1);
    assert_eq!(sweeps[0][0].id, "job-crashed");
    assert_eq!(
        sweeps[0][0].spec.as_ref(),
        Some(&spec),
        "spec handed to the sweep"
    );
    assert!(sweeps[0][0].started_at.is_some());
    let (s, v) = f.get("/v1/jobs/job-crashed").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["state"], "failed");
    assert_eq!(v["error"]["code"], "interrupted");
    assert_eq!(v["error"]["message"], "interrupted: agent restarted");
    assert_eq!(v["cleanup"], "removed snapshot ferry-job-crashed");
    assert_eq!(v["bytes_done"], 123);
    // The agent works normally afterwards.
    let (s, v) = f
        .post(
            "/v1/backups",
            &backup_body("tenant-a", "a05", Some("KMS-A"), 1, "ds-a"),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(
        f.wait_done(v["id"].as_str().unwrap()).await["state"],
        "succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_only_when_configured_and_no_runner_refuses_honestly() {
    let dir = tempfile::tempdir().unwrap();
    let o = AgentOpts {
        tls: false,
        ..Default::default()
    };
    let (cfg, pki) = agent_config(dir.path(), &o);
    let agent = ferry::agent::Agent::from_config(&cfg).unwrap();
    let running = agent
        .start(std::sync::Arc::new(ferry::agent::NoRunner))
        .await
        .unwrap();
    let url = running.url();
    assert!(url.starts_with("http://"));
    let c = client(&pki, false);
    let r = c
        .post(format!("{url}/v1/backups"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&backup_body("tenant-a", "x", Some("KMS-A"), 1, "ds-a")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id = serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut v = Value::Null;
    for _ in 0..500 {
        let text = c
            .get(format!("{url}/v1/jobs/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        v = serde_json::from_str(&text).unwrap();
        if v["state"] == "failed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(v["error"]["code"], "runner_unavailable", "{v}");
    running.shutdown().await.unwrap();
    // A short token is refused at start.
    std::fs::write(dir.path().join("token"), "short\n").unwrap();
    let e = ferry::agent::Agent::from_config(&cfg).unwrap_err();
    assert!(e.to_string().contains("at least 16"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_jobs_check_the_repository_and_fail_on_a_damaged_chunk() {
    // A repository with two VMs' points, served by an agent with the real
    // runner (no vCenter: it verifies, restores to directories, syncs keys).
    let w = common::World::new();
    let a = w.image("a.img", 3 << 20, 21);
    let b = w.image("b.img", 2 << 20, 22);
    let p1 = w.backup("vm1", &[&a]).point_id;
    w.backup("vm2", &[&b]);
    let dir = w.path("agent");
    let (_, pki) = agent_config(&dir, &AgentOpts::default());
    let cfg_path = dir.join("agent.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let head = &text[..text.find("\n[[tenant]]").unwrap()];
    std::fs::write(
        &cfg_path,
        format!(
            "{head}\n[[tenant]]\nname = \"tenant-a\"\nrepository = {:?}\nkey_provider = \"KMS-A\"\n[tenant.pem]\npublic_key = {:?}\nprivate_key = {:?}\n",
            w.repo_dir, w.keys.public, w.keys.private
        ),
    )
    .unwrap();
    let config = ferry::config::Config::load(&cfg_path).unwrap();
    let runner =
        std::sync::Arc::new(ferry::job::runner::VmJobRunner::from_config(&config).unwrap());
    let running = ferry::agent::Agent::from_config(&config)
        .unwrap()
        .start(runner)
        .await
        .unwrap();
    let mut f = AgentFixture {
        dir: dir.clone(),
        url: running.url(),
        agent: Some(running),
        runner: TestRunner::new(),
        client: client(&pki, false),
        pki,
        config,
    };

    // The whole repository: accepted as a verify job of subject `repository`,
    // succeeds with notes saying what was checked.
    let (st, hdr, job) = f
        .request(
            Method::POST,
            "/v1/verifies",
            Some(TOKEN),
            Some(&json!({"tenant": "tenant-a"})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{job}");
    assert_eq!(job["kind"], "verify");
    assert_eq!(job["subject"], "repository");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(hdr["location"], format!("/v1/jobs/{id}").as_str());
    let done = f.wait_done(&id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let notes = done["notes"].to_string();
    assert!(
        notes.contains("verified 2 point(s): 2 ok, 0 damaged"),
        "{notes}"
    );
    assert!(notes.contains("read and authenticated"), "{notes}");
    assert!(done["bytes_total"].as_u64().unwrap() >= 5 << 20, "{done}");
    assert_eq!(done["bytes_done"], done["bytes_total"]);
    let (_, list) = f.get("/v1/jobs?kind=verify").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");

    // One point by `latest:`, metadata only.
    let (st, job) = f
        .post(
            "/v1/verifies",
            &json!({"tenant": "tenant-a", "point": "latest:vm1", "read_data": false}),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{job}");
    assert_eq!(job["subject"], "latest:vm1");
    let done = f.wait_done(job["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["point_id"], p1.as_str());
    assert!(
        done["notes"].to_string().contains("verified 1 point(s)")
            && done["notes"].to_string().contains("chunks not read"),
        "{done}"
    );

    // A point that does not exist fails the job with not_found; refusals
    // before any job: an unknown tenant, an empty point, an unknown field.
    let (st, job) = f
        .post(
            "/v1/verifies",
            &json!({"tenant": "tenant-a", "point": "latest:nope"}),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{job}");
    let done = f.wait_done(job["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "not_found", "{done}");
    let (st, v) = f.post("/v1/verifies", &json!({"tenant": "tenant-x"})).await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "unknown_tenant");
    let (st, v) = f
        .post("/v1/verifies", &json!({"tenant": "tenant-a", "point": ""}))
        .await;
    assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_request");
    let (st, v) = f
        .post(
            "/v1/verifies",
            &json!({"tenant": "tenant-a", "repair": true}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // What the repository holds, as the console's overview shows it.
    let (st, v) = f.get("/v1/repositories").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let repos = v["repositories"].as_array().unwrap();
    assert_eq!(repos.len(), 1, "{v}");
    let r = &repos[0];
    assert_eq!(r["tenant"], "tenant-a");
    assert_eq!(r["backend"], "local");
    assert_eq!(r["points"], 2, "{r}");
    let chunk_files = common::files_under(&w.repo_dir.join("chunks"));
    assert_eq!(r["chunks"], chunk_files.len() as u64, "{r}");
    let on_disk: u64 = chunk_files
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(r["stored_bytes"], on_disk, "{r}");
    assert!(
        r["filesystem_free_bytes"].as_u64().unwrap()
            <= r["filesystem_total_bytes"].as_u64().unwrap()
    );
    assert!(r["error"].is_null(), "{r}");

    // The disaster-recovery key check: both points open with the tenant's key.
    let (st, v) = f
        .post("/v1/keys/check", &json!({"tenant": "tenant-a"}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["tenant"], "tenant-a");
    assert_eq!(v["keyring_opens"], true, "{v}");
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{v}");
    assert!(
        points.iter().all(|p| p["status"] == "opens"
            && p["opens_with"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w == "own_key")),
        "{v}"
    );
    assert!(points.iter().any(|p| p["point_id"] == p1.as_str()), "{v}");
    assert!(v["missing_keys"].as_array().unwrap().is_empty(), "{v}");
    assert!(!v.to_string().contains("PRIVATE"), "no key material: {v}");
    let (st, v) = f
        .post("/v1/keys/check", &json!({"tenant": "tenant-x"}))
        .await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "unknown_tenant");
    let (st, v) = f
        .post("/v1/keys/check", &json!({"tenant": "tenant-a", "x": 1}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // A flipped byte in one chunk: the repository verify fails with
    // repository_error naming the chunk file.
    let chunks: Vec<_> = common::files_under(&w.repo_dir.join("chunks"));
    let victim = chunks
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() - 40;
    bytes[at] ^= 0x20;
    std::fs::write(victim, &bytes).unwrap();
    let (st, job) = f.post("/v1/verifies", &json!({"tenant": "tenant-a"})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{job}");
    let done = f.wait_done(job["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "repository_error", "{done}");
    let msg = done["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("damage found"), "{msg}");
    assert!(msg.contains("1 chunk(s) damaged"), "{msg}");
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(name), "{msg} names {name}");
    // Nothing was changed: the chunk is still there, damaged.
    assert_eq!(std::fs::read(victim).unwrap(), bytes);
    f.shutdown().await;
}
