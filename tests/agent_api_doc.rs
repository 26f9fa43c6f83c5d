//! docs/api.md is generated from the agent's OpenAPI document; this test fails
//! when it is stale. Regenerate with
//! `FERRY_UPDATE_DOCS=1 cargo test --test agent_api_doc`.

use std::path::Path;

#[test]
fn api_reference_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/api.md");
    let want = ferry::agent::openapi::render_markdown();
    if std::env::var_os("FERRY_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/api.md is stale: run `FERRY_UPDATE_DOCS=1 cargo test --test agent_api_doc` and commit it"
    );
    // Every endpoint and error code is in it.
    for needle in [
        "GET /v1/health",
        "GET /v1/info",
        "POST /v1/backups",
        "POST /v1/restores",
        "GET /v1/jobs",
        "GET /v1/jobs/{id}",
        "POST /v1/jobs/{id}/cancel",
        "POST /v1/keys/sync",
        "POST /v1/verifies",
        "POST /v1/files/list",
        "POST /v1/files/find",
        "GET /metrics",
        "GET /v1/openapi.json",
    ] {
        assert!(want.contains(&format!("### {needle}\n")), "{needle}");
    }
    for c in ferry::agent::error::ErrorCode::ALL {
        assert!(want.contains(&format!("| `{}` |", c.as_str())), "{c:?}");
    }
}

#[test]
fn document_declares_bearer_auth_everywhere_but_health() {
    let doc: serde_json::Value = serde_json::from_str(&ferry::agent::openapi::json()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 15);
    for (p, item) in paths {
        for (m, op) in item.as_object().unwrap() {
            let public = op.get("security") == Some(&serde_json::json!([{}]));
            assert_eq!(public, p == "/v1/health", "{m} {p}");
            if !public {
                assert!(
                    op["responses"].get("401").is_some(),
                    "{m} {p} documents 401"
                );
            }
        }
    }
}
