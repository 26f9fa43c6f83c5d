//! `ferry agent` as a process: serves until SIGTERM, then shuts down cleanly;
//! `--openapi` prints the document; a bad config fails with the key named.

mod agent_support;

use agent_support::*;
use std::process::Command;

#[test]
fn agent_process_serves_until_sigterm_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let o = AgentOpts::default();
    let (_, pki) = agent_config(dir.path(), &o);
    let mut agent = AgentProcess::start(&dir.path().join("agent.toml"));
    let url = agent.url.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client(&pki, false);
        let r = c.get(format!("{url}/v1/health")).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        let r = c.get(format!("{url}/v1/info")).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    });
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.lines.next().unwrap().unwrap(), "ferry agent stopped");
    assert!(agent.child.wait().unwrap().success());
}

#[test]
fn openapi_flag_and_config_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["agent", "--openapi"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["info"]["title"], "ferry agent API");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[agent]\nid = \"p\"\ntoken_file = \"t\"\nstate_dir = \"s\"\nslots = 0\ninsecure_http = true\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["agent", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent.slots"));
}
