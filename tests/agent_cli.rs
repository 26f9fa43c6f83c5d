//! `ferry agent` as a process: serves until SIGTERM, then shuts down cleanly;
//! `--openapi` prints the document; a bad config fails with the key named.

mod agent_support;

use agent_support::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Kills the agent if the test fails before it stops it.
struct Reap(std::process::Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_process_serves_until_sigterm_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let o = AgentOpts::default();
    let (_, pki) = agent_config(dir.path(), &o);
    let mut child = Reap(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["agent", "--config"])
            .arg(dir.path().join("agent.toml"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first
        .strip_prefix("ferry agent serving on ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client(&pki, false);
        let r = c.get(format!("{url}/v1/health")).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        let r = c.get(format!("{url}/v1/info")).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    });
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(lines.next().unwrap().unwrap(), "ferry agent stopped");
    assert!(child.0.wait().unwrap().success());
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
