//! File-level restore through a real `ferry agent` process: list and find on a
//! restore point's disk (`POST /v1/files/list`, `/v1/files/find`), and a
//! restore job with a `files` target, against a repository the test backed up
//! an ext4 disk (built with mke2fs -d) into.

mod agent_support;
mod common;

use agent_support::*;
use common::fsimage::{self, Part, MIB};
use common::World;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

struct Api {
    c: reqwest::Client,
    url: String,
}

impl Api {
    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .c
            .post(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap())
            .send()
            .await
            .unwrap();
        let status = r.status();
        (
            status,
            serde_json::from_str(&r.text().await.unwrap()).unwrap(),
        )
    }
    async fn get(&self, path: &str) -> Value {
        let r = self
            .c
            .get(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        serde_json::from_str(&r.text().await.unwrap()).unwrap()
    }
    async fn wait_done(&self, id: &str) -> Value {
        let t = Instant::now();
        loop {
            let j = self.get(&format!("/v1/jobs/{id}")).await;
            if ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or("")) {
                return j;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{j}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[test]
fn list_find_and_restore_files_through_the_agent() {
    let w = World::new();
    let (tree, ext) = fsimage::ext4_with_tree(w.dir.path(), 4 << 20, 32 * MIB);
    let disk = w.path("disk.img");
    fsimage::disk(
        &disk,
        "gpt",
        &[Part {
            volume: Some(&ext),
            size: 32 * MIB,
            sfdisk_type: "L",
        }],
    );
    w.backup("vm1", &[&disk]);

    // An agent serving tenant-a from that repository with its PEM keys,
    // restoring files only under `restores/`.
    let restores = w.path("restores");
    let dir = w.path("agent");
    let (_, pki) = agent_config(&dir, &AgentOpts::default());
    let cfg = dir.join("agent.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let head = &text[..text.find("\n[[tenant]]").unwrap()];
    std::fs::write(
        &cfg,
        format!(
            "{head}\n[[tenant]]\nname = \"tenant-a\"\nrepository = {:?}\nkey_provider = \"KMS-A\"\nrestore_dirs = [{:?}]\n[tenant.pem]\npublic_key = {:?}\nprivate_key = {:?}\n",
            w.repo_dir, restores, w.keys.public, w.keys.private
        ),
    )
    .unwrap();
    let agent = AgentProcess::start(&cfg);
    let api = Api {
        c: client(&pki, false),
        url: agent.url.clone(),
    };
    let out = restores.join("restored");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (s, v) = api
            .post("/v1/files/list", &json!({"tenant": "tenant-a", "point": "latest:vm1", "path": "/docs"}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let names: Vec<&str> = v["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, vec!["notes 2024.txt", "Übersicht.md"]);
        assert_eq!(v["volume"]["partition"], 1);
        assert_eq!(v["volume"]["fs"], "ext");
        assert!(v["chunks_read"].as_u64().unwrap() > 0);

        let (s, v) = api
            .post("/v1/files/find", &json!({"tenant": "tenant-a", "point": "latest:vm1", "pattern": "*.bin", "limit": 1}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["entries"].as_array().unwrap().len(), 1);
        assert_eq!(v["truncated"], true, "{v}");

        // Errors: a missing path, partition or point is 404, a bad body 400.
        for (body, code, needle) in [
            (json!({"tenant": "tenant-a", "point": "latest:vm1", "path": "/nope"}), StatusCode::NOT_FOUND, "/nope"),
            (json!({"tenant": "tenant-a", "point": "latest:vm1", "partition": 7}), StatusCode::NOT_FOUND, "no partition 7"),
            (json!({"tenant": "tenant-a", "point": "latest:nope"}), StatusCode::NOT_FOUND, "nope"),
            (json!({"tenant": "tenant-a", "point": "latest:vm1", "path": "relative"}), StatusCode::BAD_REQUEST, "absolute"),
            (json!({"tenant": "tenant-x", "point": "latest:vm1"}), StatusCode::UNPROCESSABLE_ENTITY, "tenant-x"),
        ] {
            let (s, v) = api.post("/v1/files/list", &body).await;
            assert_eq!(s, code, "{body}: {v}");
            assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{needle}: {v}");
        }

        // The orchestrator's agent client speaks the same API, typed.
        let agent_cfg = ferry::orchestrator::config::AgentConfig {
            id: "proxy-a".into(),
            url: api.url.clone(),
            token_file: dir.join("token"),
            ca: Some(pki.ca.clone()),
            client_cert: None,
            client_key: None,
            insecure_http: false,
        };
        let orch = ferry::orchestrator::client::HttpAgent::new(&agent_cfg, Duration::from_secs(30)).unwrap();
        let listed = orch
            .find_files(&ferry::agent::api::FilesFindRequest {
                tenant: "tenant-a".into(),
                point: "latest:vm1".into(),
                disk: 0,
                partition: None,
                under: "/".into(),
                pattern: "hello.txt".into(),
                limit: None,
            })
            .await
            .unwrap();
        assert_eq!(listed.entries.len(), 1);
        assert_eq!(listed.entries[0].size, 26);
        let err = orch
            .list_files(&ferry::agent::api::FilesListRequest {
                tenant: "tenant-a".into(),
                point: "latest:vm1".into(),
                disk: 0,
                partition: None,
                path: "/nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("file_not_found"), "{err}");

        // A restore job with a files target.
        let (s, v) = api
            .post(
                "/v1/restores",
                &json!({"tenant": "tenant-a", "point": "latest:vm1",
                        "target": {"kind": "files", "path": out, "paths": ["/docs", "/large.bin", "/link to hello"]}}),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let j = api.wait_done(v["id"].as_str().unwrap()).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        assert!(j["disks"][0]["reason"].as_str().unwrap().contains("restored to"), "{j}");

        // A path that does not exist fails the job with the path named.
        let (_, v) = api
            .post(
                "/v1/restores",
                &json!({"tenant": "tenant-a", "point": "latest:vm1",
                        "target": {"kind": "files", "path": restores.join("other"), "paths": ["/missing"]}}),
            )
            .await;
        let j = api.wait_done(v["id"].as_str().unwrap()).await;
        assert_eq!(j["state"], "failed", "{j}");
        assert_eq!(j["error"]["code"], "not_found", "{j}");
        assert!(j["error"]["message"].as_str().unwrap().contains("/missing"), "{j}");
        // disks and a files target do not mix.
        let (s, _) = api
            .post(
                "/v1/restores",
                &json!({"tenant": "tenant-a", "point": "latest:vm1", "disks": [0],
                        "target": {"kind": "files", "path": "/tmp/x", "paths": ["/"]}}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);

        // Outside restore_dirs: refused before any job, nothing created. That
        // includes a path through a symlink out of `restores/`, and one through
        // a symlink the restore above wrote (now dangling: its target was not
        // restored).
        std::os::unix::fs::symlink(w.dir.path(), restores.join("escape")).unwrap();
        for (path, created) in [
            (w.path("elsewhere"), w.path("elsewhere")),
            (restores.join("escape/stolen"), w.path("stolen")),
            (out.join("link to hello/x"), out.join("hello.txt")),
        ] {
            let (s, v) = api
                .post(
                    "/v1/restores",
                    &json!({"tenant": "tenant-a", "point": "latest:vm1",
                            "target": {"kind": "files", "path": path, "paths": ["/docs"]}}),
                )
                .await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{}: {v}", path.display());
            assert_eq!(v["error"]["code"], "restore_path_not_allowed", "{v}");
            assert!(v["error"]["message"].as_str().unwrap().contains(&restores.display().to_string()), "{v}");
            assert!(!created.exists(), "{}", created.display());
        }
        let (s, v) = api
            .post(
                "/v1/restores",
                &json!({"tenant": "tenant-a", "point": "latest:vm1",
                        "target": {"kind": "directory", "path": w.path("elsewhere")}}),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert!(!w.path("elsewhere").exists());
    });
    assert_eq!(
        std::fs::read(out.join("large.bin")).unwrap(),
        std::fs::read(tree.join("large.bin")).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join("docs/notes 2024.txt")).unwrap(),
        b"notes\n"
    );
    assert_eq!(
        std::fs::read_link(out.join("link to hello")).unwrap(),
        std::path::Path::new("hello.txt")
    );
}
