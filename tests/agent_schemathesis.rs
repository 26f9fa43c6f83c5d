//! API fuzzing with schemathesis (a real third-party OpenAPI fuzzer, pip-installed
//! into `.venv` by `.ci/run`) against a running agent over HTTPS and the OpenAPI
//! document that agent serves:
//!
//! 1. With the token: every check schemathesis has (no 5xx, status codes, content
//!    types, headers and bodies conform to the document, schema-invalid input is
//!    rejected with a 4xx, unsupported methods get 405 with `Allow`, auth is not
//!    ignored, stateful links) except `positive_data_acceptance`: the API rejects
//!    some schema-valid requests on purpose (a tenant the agent does not serve, a
//!    VM the transport selector refuses: 422), which a schema cannot express.
//! 2. Without a token and with a wrong one: a custom check requires 401 with the
//!    `unauthorized` error code on every operation except `GET /v1/health`, and
//!    conformance of every response.
//!
//! Fixed seeds keep runs reproducible.

mod agent_support;

use agent_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn schemathesis() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/schemathesis");
    assert!(
        p.exists(),
        "{} is missing: .ci/run installs it (python3 -m venv .venv && .venv/bin/pip install schemathesis)",
        p.display()
    );
    p
}

const AUTH_HOOK: &str = r#"
import schemathesis

@schemathesis.check
def ferry_unauthenticated_is_401(ctx, response, case):
    if case.path == "/v1/health":
        if case.method.upper() in ("GET", "HEAD") and response.status_code != 200:
            raise AssertionError(f"GET /v1/health must answer 200 without a token, got {response.status_code}")
        return None
    if response.status_code != 401:
        raise AssertionError(f"{case.method} {case.path} answered {response.status_code} without a valid token; expected 401")
    if response.json().get("error", {}).get("code") != "unauthorized":
        raise AssertionError(f"401 without the unauthorized error code: {response.text}")
    return None
"#;

/// Run schemathesis; panic with its output unless it passes.
fn run(work: &Path, what: &str, args: &[String], hooks: bool) {
    let mut c = Command::new(schemathesis());
    c.current_dir(work).arg("run").args(args);
    c.env("NO_COLOR", "1")
        .env("SCHEMATHESIS_TELEMETRY", "false");
    if hooks {
        c.env("PYTHONPATH", work)
            .env("SCHEMATHESIS_HOOKS", "ferry_auth_hooks");
    }
    let out = c.output().expect("running schemathesis");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis ({what}) failed:\n{text}"
    );
    assert!(
        text.contains("Tested: 15"),
        "schemathesis ({what}) did not test all 15 operations:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_and_every_response_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let f = AgentFixture::start(dir.path(), &AgentOpts::default(), TestRunner::new()).await;
    // The document as the running agent serves it (with the token).
    let (s, doc) = f.get("/v1/openapi.json").await;
    assert_eq!(s, reqwest::StatusCode::OK);
    assert_eq!(
        doc,
        serde_json::from_str::<serde_json::Value>(&ferry::agent::openapi::json()).unwrap()
    );
    let work = dir.path().join("schemathesis");
    std::fs::create_dir_all(&work).unwrap();
    let spec = work.join("openapi.json");
    std::fs::write(&spec, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    std::fs::write(work.join("ferry_auth_hooks.py"), AUTH_HOOK).unwrap();
    // A body over the agent's 1 MiB limit is refused with 413 before it is
    // parsed: as much a rejection of invalid data as 400 (schemathesis' default
    // list for negative data lacks 413).
    std::fs::write(
        work.join("schemathesis.toml"),
        "[checks.negative_data_rejection]\nexpected-statuses = [\"400\", \"401\", \"403\", \"404\", \"405\", \"406\", \"409\", \"413\", \"415\", \"422\", \"428\", \"429\", \"5xx\"]\n",
    )
    .unwrap();
    let common = |seed: u32, examples: u32| -> Vec<String> {
        vec![
            spec.display().to_string(),
            "--url".into(),
            f.url.clone(),
            "--tls-verify".into(),
            f.pki.ca.display().to_string(),
            "--seed".into(),
            seed.to_string(),
            "--max-examples".into(),
            examples.to_string(),
            "--workers".into(),
            "2".into(),
            // One run in about seven, a request of the coverage phase ended in
            // "EOF occurred in violation of protocol" on loopback (seen once on
            // POST /v1/files/list, not reproduced by 420 replays of its kinds of
            // bodies on one keep-alive connection). A network-level failure is
            // retried twice; every answer received is still checked in full.
            "--request-retries".into(),
            "2".into(),
        ]
    };
    let url = f.url.clone();
    let w = work.clone();
    let mut authed = common(20261123, 60);
    authed.extend([
        "--header".into(),
        format!("Authorization: Bearer {TOKEN}"),
        "--checks".into(),
        "all".into(),
        "--exclude-checks".into(),
        "positive_data_acceptance".into(),
    ]);
    let unauth_checks = "ferry_unauthenticated_is_401,not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance";
    let mut none = common(7, 15);
    none.extend(["--checks".into(), unauth_checks.into()]);
    let mut wrong = common(8, 15);
    wrong.extend([
        "--header".into(),
        "Authorization: Bearer wrong-token-0123456789abcdef".into(),
        "--checks".into(),
        unauth_checks.into(),
    ]);
    tokio::task::spawn_blocking(move || {
        run(&w, "with the token", &authed, false);
        run(&w, "without a token", &none, true);
        run(&w, "with a wrong token", &wrong, true);
    })
    .await
    .unwrap();
    // The agent is still healthy after the fuzzing.
    let r = f
        .client
        .get(format!("{url}/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
}
