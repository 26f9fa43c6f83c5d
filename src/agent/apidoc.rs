//! Markdown rendering of the agent's OpenAPI document, for `docs/api.md`. Pure:
//! JSON in, text out; deterministic, so a test can compare it with the file.

use super::error::ErrorCode;
use serde_json::Value;
use std::fmt::Write;

fn ref_name(r: &str) -> &str {
    r.rsplit('/').next().unwrap_or(r)
}

/// A short type description of a schema: `string`, `integer (uint64)`,
/// [`Job`](#job), `array of ...`, `one of ...`, `... or null`.
fn type_of(s: &Value) -> String {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let n = ref_name(r);
        return format!("[`{n}`](#{})", n.to_ascii_lowercase());
    }
    if let Some(all) = s
        .get("oneOf")
        .or_else(|| s.get("anyOf"))
        .and_then(Value::as_array)
    {
        let parts: Vec<String> = all.iter().map(type_of).collect();
        return parts.join(" or ");
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        let vals: Vec<String> = e
            .iter()
            .map(|v| match v {
                Value::String(s) => format!("`{s}`"),
                o => format!("`{o}`"),
            })
            .collect();
        return format!("one of {}", vals.join(", "));
    }
    let types: Vec<String> = match s.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
        _ => vec![],
    };
    let mut main: Vec<String> = types
        .iter()
        .filter(|t| *t != "null")
        .map(|t| match t.as_str() {
            "array" => format!(
                "array of {}",
                s.get("items").map(type_of).unwrap_or_else(|| "any".into())
            ),
            other => match s.get("format").and_then(Value::as_str) {
                Some(f) => format!("{other} ({f})"),
                None => other.to_string(),
            },
        })
        .collect();
    if main.is_empty() {
        main.push(if types.is_empty() {
            "any".into()
        } else {
            String::new()
        });
    }
    let mut out = main.join(" or ");
    if types.iter().any(|t| t == "null") {
        out = if out.is_empty() {
            "null".into()
        } else {
            format!("{out} or null")
        };
    }
    out
}

fn constraints(s: &Value) -> String {
    let mut c = Vec::new();
    for (k, label) in [
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minimum", "min"),
        ("maximum", "max"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("minProperties", "min properties"),
        ("pattern", "pattern"),
        ("default", "default"),
    ] {
        if let Some(v) = s.get(k) {
            c.push(format!("{label} `{v}`"));
        }
    }
    c.join(", ")
}

/// A schema's description, looking into `oneOf` (nullable references put it there).
fn description(s: &Value) -> &str {
    s.get("description")
        .and_then(Value::as_str)
        .or_else(|| {
            s.get("oneOf").and_then(Value::as_array).and_then(|a| {
                a.iter()
                    .find_map(|x| x.get("description").and_then(Value::as_str))
            })
        })
        .unwrap_or("")
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn schema_ref(content: &Value) -> String {
    content
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(ct, v)| {
                    let t = v.get("schema").map(type_of).unwrap_or_else(|| "-".into());
                    format!("{t} (`{ct}`)")
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn render_schema(out: &mut String, name: &str, s: &Value) {
    let _ = writeln!(out, "### {name}\n");
    if let Some(d) = s.get("description").and_then(Value::as_str) {
        let _ = writeln!(out, "{d}\n");
    }
    if let Some(variants) = s.get("oneOf").and_then(Value::as_array) {
        let _ = writeln!(out, "One of:\n");
        for v in variants {
            let desc = v.get("description").and_then(Value::as_str).unwrap_or("");
            let _ = writeln!(out, "- {}\n", cell(desc));
            render_props(out, v);
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
        return;
    }
    if s.get("properties").is_some() {
        render_props(out, s);
        let mut notes = Vec::new();
        if s.get("additionalProperties") == Some(&Value::Bool(false)) {
            notes.push(
                "no fields besides these (requests with unknown fields are rejected)".to_string(),
            );
        }
        let c = constraints(s);
        if !c.is_empty() {
            notes.push(c);
        }
        if !notes.is_empty() {
            let _ = writeln!(out, "\n{}.", notes.join("; "));
        }
        let _ = writeln!(out);
    } else {
        let _ = writeln!(out, "Type: {}\n", type_of(s));
    }
}

fn render_props(out: &mut String, s: &Value) {
    let required: Vec<&str> = s
        .get("required")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = s.get("properties").and_then(Value::as_object) else {
        return;
    };
    let _ = writeln!(out, "| field | type | required | description |");
    let _ = writeln!(out, "|---|---|---|---|");
    for (k, v) in props {
        let mut desc = description(v).to_string();
        let c = constraints(v);
        if !c.is_empty() {
            desc = format!("{desc} ({c})");
        }
        let _ = writeln!(
            out,
            "| `{k}` | {} | {} | {} |",
            cell(&type_of(v)),
            if required.contains(&k.as_str()) {
                "yes"
            } else {
                "no"
            },
            cell(desc.trim())
        );
    }
}

/// Render the whole reference.
pub fn render(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Agent API reference\n\n<!-- Generated from the OpenAPI document by `ferry::agent::openapi::render_markdown`.\n     Do not edit: run `FERRY_UPDATE_DOCS=1 cargo test --test agent_api_doc` after changing the API. -->\n"
    );
    if let Some(d) = doc.pointer("/info/description").and_then(Value::as_str) {
        let _ = writeln!(out, "{d}\n");
    }
    let _ = writeln!(
        out,
        "The machine-readable document is served by every agent at `GET /v1/openapi.json` \
(OpenAPI {}) and printed by `ferry agent --openapi`.\n",
        doc.get("openapi").and_then(Value::as_str).unwrap_or("3.1")
    );
    let _ = writeln!(out, "## Authentication\n");
    if let Some(schemes) = doc
        .pointer("/components/securitySchemes")
        .and_then(Value::as_object)
    {
        for (name, s) in schemes {
            let _ = writeln!(
                out,
                "- `{name}`: HTTP `{}`. {}",
                s.get("scheme").and_then(Value::as_str).unwrap_or("?"),
                s.get("description").and_then(Value::as_str).unwrap_or("")
            );
        }
    }
    let _ = writeln!(out, "\n## Endpoints\n");
    let _ = writeln!(out, "| method | path | auth | summary |");
    let _ = writeln!(out, "|---|---|---|---|");
    let paths = doc.get("paths").and_then(Value::as_object);
    let mut ops = Vec::new();
    if let Some(paths) = paths {
        for (p, item) in paths {
            if let Some(item) = item.as_object() {
                for (m, op) in item {
                    ops.push((p.clone(), m.to_ascii_uppercase(), op.clone()));
                }
            }
        }
    }
    let auth_of = |op: &Value| -> &'static str {
        match op.get("security").and_then(Value::as_array) {
            Some(a)
                if a.iter()
                    .all(|r| r.as_object().is_some_and(|o| o.is_empty())) =>
            {
                "none"
            }
            _ => "bearer",
        }
    };
    let summary_of = |op: &Value| -> String {
        op.get("summary")
            .or_else(|| op.get("description"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    };
    for (p, m, op) in &ops {
        let _ = writeln!(
            out,
            "| {m} | `{p}` | {} | {} |",
            auth_of(op),
            cell(&summary_of(op))
        );
    }
    for (p, m, op) in &ops {
        let _ = writeln!(out, "\n### {m} {p}\n");
        let text: Vec<&str> = [op.get("summary"), op.get("description")]
            .iter()
            .filter_map(|v| v.and_then(Value::as_str))
            .collect();
        if !text.is_empty() {
            let _ = writeln!(out, "{}\n", text.join("\n\n"));
        }
        let _ = writeln!(out, "Auth: {}.\n", auth_of(op));
        if let Some(params) = op.get("parameters").and_then(Value::as_array) {
            let _ = writeln!(out, "| parameter | in | type | required | description |");
            let _ = writeln!(out, "|---|---|---|---|---|");
            for prm in params {
                let sch = prm.get("schema").cloned().unwrap_or(Value::Null);
                let mut desc = prm
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let c = constraints(&sch);
                if !c.is_empty() {
                    desc = format!("{desc} ({c})");
                }
                let _ = writeln!(
                    out,
                    "| `{}` | {} | {} | {} | {} |",
                    prm.get("name").and_then(Value::as_str).unwrap_or("?"),
                    prm.get("in").and_then(Value::as_str).unwrap_or("?"),
                    cell(&type_of(&sch)),
                    if prm.get("required") == Some(&Value::Bool(true)) {
                        "yes"
                    } else {
                        "no"
                    },
                    cell(desc.trim())
                );
            }
            let _ = writeln!(out);
        }
        if let Some(body) = op.get("requestBody") {
            let req = if body.get("required") == Some(&Value::Bool(true)) {
                "required"
            } else {
                "optional"
            };
            let _ = writeln!(
                out,
                "Request body ({req}): {}\n",
                body.get("content").map(schema_ref).unwrap_or_default()
            );
        }
        let _ = writeln!(out, "| status | body | description |");
        let _ = writeln!(out, "|---|---|---|");
        if let Some(rs) = op.get("responses").and_then(Value::as_object) {
            for (status, r) in rs {
                let mut desc = r
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if let Some(h) = r.get("headers").and_then(Value::as_object) {
                    let names: Vec<String> = h.keys().map(|k| format!("`{k}`")).collect();
                    desc.push_str(&format!(" Headers: {}.", names.join(", ")));
                }
                let _ = writeln!(
                    out,
                    "| {status} | {} | {} |",
                    cell(
                        &r.get("content")
                            .map(schema_ref)
                            .unwrap_or_else(|| "-".into())
                    ),
                    cell(desc.trim())
                );
            }
        }
    }
    let _ = writeln!(out, "\n## Error codes\n");
    let _ = writeln!(
        out,
        "Every error response is `{{\"error\": {{\"code\": \"...\", \"message\": \"...\"}}}}`. \
Branch on `code`; the message is for people.\n"
    );
    let _ = writeln!(out, "| code | status | meaning |");
    let _ = writeln!(out, "|---|---|---|");
    for c in ErrorCode::ALL {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} |",
            c.as_str(),
            c.status().as_u16(),
            cell(c.meaning())
        );
    }
    let _ = writeln!(
        out,
        "\nJob errors (`Job.error.code`) use their own codes: `cancelled`, `interrupted` \
(the agent restarted while the job ran; see `cleanup` for what the orphan sweep did), \
`vm_refused`, `not_found`, `key_error`, `vsphere_error`, `transport_error`, \
`repository_error`, `runner_unavailable`, `job_failed`.\n"
    );
    let _ = writeln!(out, "## Schemas\n");
    if let Some(schemas) = doc
        .pointer("/components/schemas")
        .and_then(Value::as_object)
    {
        for (name, s) in schemas {
            render_schema(&mut out, name, s);
        }
    }
    out
}
