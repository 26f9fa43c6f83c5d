//! The console's HTML: one function per page, from the rows of `super::views`.
//! maud escapes every interpolated value, so names and reasons coming from
//! vCenter or agents cannot inject markup. No inline scripts (the
//! Content-Security-Policy allows only `/assets/console.js`).
//!
//! Must not read the orchestrator or decide who may see what: it formats what
//! it is given.

use super::auth::Principal;
use super::views::{
    AgentRow, HistoryRow, KeyCheck, PlanFilter, PlanRow, RepoRow, TenantKeys, VmRow, VmStatus,
};
use crate::state::{rfc3339_ms, AuditEntry};
use crate::transport::select::Selection;
use maud::{html, Markup, DOCTYPE};
use std::collections::BTreeMap;

/// What every signed-in page needs: who, and the CSRF token for its forms.
pub struct Ctx<'a> {
    /// Who is looking.
    pub p: &'a Principal,
    /// The session's CSRF token.
    pub csrf: &'a str,
}

/// Bytes for people (binary units).
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A time for tables: `2026-12-07 20:05:40` (UTC, to the second).
pub fn when(ms: i64) -> String {
    let t = rfc3339_ms(ms);
    let t = t.split('.').next().unwrap_or(&t).trim_end_matches('Z');
    t.replacen('T', " ", 1)
}

fn layout(title: &str, ctx: Option<&Ctx<'_>>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · ferry console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "ferry" }
                    @if let Some(c) = ctx {
                        nav {
                            a href="/" { "Overview" }
                            a href="/plan" { "Plan" }
                            a href="/jobs" { "Jobs" }
                            a href="/agents" { "Agents" }
                            a href="/keys" { "Keys" }
                            @if c.p.is_admin() { a href="/audit" { "Audit" } }
                        }
                        div.who {
                            span #whoami { (c.p.name) " · " (c.p.role) " · "
                                (c.p.tenant.as_deref().unwrap_or("provider")) }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(c.csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// The login form.
pub fn login(error: Option<&str>, next: &str) -> Markup {
    layout(
        "Log in",
        None,
        html! {
            @if let Some(e) = error { p.error #login-error { (e) } }
            form.login method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label { "Account" input #name type="text" name="name" autocomplete="username" required autofocus; }
                label { "Password" input #password type="password" name="password" autocomplete="current-password" required; }
                button #login type="submit" { "Log in" }
            }
        },
    )
}

/// A message page (errors, refusals).
pub fn message(ctx: Option<&Ctx<'_>>, title: &str, text: &str) -> Markup {
    layout(
        title,
        ctx,
        html! { p.message #message { (text) } p { a href="/" { "Back to the overview" } } },
    )
}

fn status_class(s: VmStatus) -> &'static str {
    match s {
        VmStatus::Protected => "ok",
        VmStatus::Failed => "bad",
        VmStatus::Missed | VmStatus::Never => "warn",
        VmStatus::Unprotected => "muted",
    }
}

/// Overview: per tenant counts and KMS, then every VM with its last result.
pub fn overview(
    ctx: &Ctx<'_>,
    tenants: &[(String, [usize; 5], Option<super::views::KmsState>)],
    repos: &[&RepoRow],
    vms: &[&VmRow],
    errors: &[String],
    taken_ms: i64,
) -> Markup {
    layout(
        "Overview",
        Some(ctx),
        html! {
            @for e in errors { p.error { (e) } }
            p.muted { "As of " (when(taken_ms)) "." }
            table #tenants {
                thead { tr { th { "Tenant" } th { "Protected" } th { "Failed" } th { "Missed window" }
                    th { "Not backed up yet" } th { "Unprotected" } th { "KMS (last key sync)" } } }
                tbody {
                    @for (t, c, kms) in tenants {
                        tr data-tenant=(t) {
                            td { (t) } td { (c[0]) } td.bad[c[1] > 0] { (c[1]) } td.warn[c[2] > 0] { (c[2]) }
                            td { (c[3]) } td { (c[4]) }
                            td {
                                @match kms {
                                    Some(k) if k.ok => { span.ok { "reachable" } " " small { (k.detail) " at " (when(k.at_ms)) } },
                                    Some(k) => { span.bad { "UNREACHABLE" } " " small { (k.detail) " at " (when(k.at_ms)) } },
                                    None => { span.muted { "no key sync yet" } },
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Repositories" }
            @if repos.is_empty() {
                p.muted { "No agent reported a repository." }
            } @else {
                table #repositories {
                    thead { tr { th { "Tenant" } th { "Stored in" } th { "Agents" } th { "Restore points" }
                        th { "Stored" } th { "Space left" } th { "Measured" } } }
                    tbody {
                        @for r in repos {
                            tr data-tenant=(r.tenant) {
                                td { (r.tenant) }
                                td { (r.location) }
                                td { (r.agents.join(", ")) }
                                @if let Some(e) = &r.error {
                                    td.bad colspan="3" { (e) }
                                } @else {
                                    td { (r.points.unwrap_or(0)) }
                                    td { (human_bytes(r.stored_bytes.unwrap_or(0))) }
                                    td {
                                        @match (r.fs_free_bytes, r.fs_total_bytes) {
                                            (Some(f), Some(t)) if t > 0 => {
                                                span class=(if f.saturating_mul(10) < t { "bad" } else { "" }) {
                                                    (human_bytes(f)) " of " (human_bytes(t))
                                                }
                                            },
                                            _ => { span.muted { "object storage" } },
                                        }
                                    }
                                }
                                td { small { (r.measured_at.split('.').next().unwrap_or("").replacen('T', " ", 1)) } }
                            }
                        }
                    }
                }
            }
            h2 { "VMs" }
            table #vms {
                thead { tr { th { "VM" } th { "Tenant" } th { "Status" } th { "Last result" } th { "Last point" } th { "Jobs" } } }
                tbody {
                    @for v in vms {
                        tr data-moref=(v.moref) {
                            td { a href={ "/vms/" (v.moref) } { (v.name) } }
                            td {
                                @match (&v.tenant, &v.key_provider_tenant) {
                                    (Some(t), _) => { (t) },
                                    (None, Some(k)) => { span.muted { "no job (key provider of " (k) ")" } },
                                    (None, None) => { span.muted { "no job" } },
                                }
                            }
                            td class=(status_class(v.status)) { (v.status.as_str()) }
                            td {
                                @if let Some(l) = &v.last {
                                    (l.state) " · " (when(l.started_ms))
                                    @if let Some(e) = &l.error { br; small.bad { (e) } }
                                } @else { "-" }
                            }
                            td { @if let Some(t) = v.last_success_ms { (when(t)) } @else { "-" } }
                            td { (v.jobs.join(", ")) }
                        }
                    }
                }
            }
        },
    )
}

/// The plan: every disk's proxy, mode and why, with every candidate.
/// The plan: one page of its rows; `at` = (page, pages, rows in all).
pub fn plan(
    ctx: &Ctx<'_>,
    tenants: &[String],
    f: &PlanFilter,
    rows: &[PlanRow],
    at: (usize, usize, usize),
) -> Markup {
    let (page, pages, total) = at;
    let first = (page - 1) * super::views::PLAN_PAGE;
    layout(
        "Plan",
        Some(ctx),
        html! {
            form.filters method="get" action="/plan" {
                label { "Tenant " select name="tenant" {
                    option value="" { "all" }
                    @for t in tenants { option value=(t) selected[f.tenant.as_deref() == Some(t.as_str())] { (t) } }
                } }
                label { "Mode " select name="mode" {
                    option value="" { "all" }
                    @for m in ["hotadd", "nbdssl", "nbd", "san"] {
                        option value=(m) selected[f.mode.as_deref() == Some(m)] { (m) }
                    }
                } }
                label { input type="checkbox" name="refused_only" value="1" checked[f.refused_only]; " refused only" }
                button type="submit" { "Filter" }
            }
            p.muted {
                (total) " disk(s)"
                @if pages > 1 { ", " (first + 1) "–" (first + rows.len()) " shown" }
                ". Open a row to see every candidate proxy and mode and why it was or was not taken."
            }
            @if pages > 1 {
                nav.pages {
                    @if page > 1 { a.prev href={ "/plan?" (f.query(page - 1)) } { "← previous" } " " }
                    "page " (page) " of " (pages)
                    @if page < pages { " " a.next href={ "/plan?" (f.query(page + 1)) } { "next →" } }
                }
            }
            table #plan {
                thead { tr { th { "Tenant" } th { "VM" } th { "Disk" } th { "Proxy" } th { "Mode" } th { "Decision" } th { "Why" } } }
                tbody {
                    @for r in rows {
                        tr.refused[r.refused] data-vm=(r.vm) {
                            td { (r.tenant) }
                            td { a href={ "/vms/" (r.moref) } { (r.vm) } }
                            td { (r.disk) } td { (r.proxy) } td { (r.mode) }
                            td { (r.decision) }
                            td {
                                details {
                                    summary { (r.reason) }
                                    @if !r.candidates.is_empty() {
                                        ul.candidates {
                                            @for c in &r.candidates {
                                                li.accepted[c.accepted] {
                                                    (c.proxy) " (" (c.proxy_key_provider.as_deref().unwrap_or("unencrypted")) ") "
                                                    (c.mode) ": " (if c.accepted { "TAKEN: " } else { "" }) (c.reason)
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A bar chart of `values` (newest last) as inline SVG.
fn chart(title: &str, values: &[(String, f64)], unit: &str) -> Markup {
    let w = 600.0;
    let h = 120.0;
    let max = values.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1e-9);
    let n = values.len().max(1) as f64;
    let bw = (w / n).min(40.0);
    html! {
        figure.chart {
            figcaption { (title) " (max " (format!("{max:.1}")) " " (unit) ")" }
            svg width=(w) height=(h + 4.0) viewBox={ "0 0 " (w) " " (h + 4.0) } role="img" aria-label=(title) {
                @for (i, (label, v)) in values.iter().enumerate() {
                    @let bh = (v / max * h).max(1.0);
                    rect x=(i as f64 * bw + 1.0) y=(h - bh) width=(bw - 2.0) height=(bh) {
                        title { (label) ": " (format!("{v:.2}")) " " (unit) }
                    }
                }
            }
        }
    }
}

/// A VM: disks and their decisions, points, history, charts and actions.
pub fn vm(
    ctx: &Ctx<'_>,
    v: &VmRow,
    sel: Option<&Selection>,
    history: &[HistoryRow],
    can_act: bool,
    agents: &[String],
) -> Markup {
    let mut series: Vec<&HistoryRow> = history.iter().filter(|h| h.state == "succeeded").collect();
    series.reverse();
    let sizes: Vec<(String, f64)> = series
        .iter()
        .map(|h| (when(h.started_ms), h.bytes as f64 / (1 << 20) as f64))
        .collect();
    let durations: Vec<(String, f64)> = series
        .iter()
        .map(|h| (when(h.started_ms), h.duration_s.unwrap_or(0.0)))
        .collect();
    layout(
        &format!("VM {}", v.name),
        Some(ctx),
        html! {
            p { "Tenant " strong { (v.tenant.as_deref().unwrap_or("-")) } " · " (v.moref) " · host " (v.host) " · folder " (v.folder) " · "
                @if v.encrypted { "encrypted under " (v.key_provider.as_deref().unwrap_or("?")) } @else { "not encrypted" }
                " · status " span class=(status_class(v.status)) { (v.status.as_str()) } }
            @if can_act && !v.jobs.is_empty() {
                p.actions { a.button #backup-now href={ "/vms/" (v.moref) "/backup" } { "Back up now" } }
            }
            h2 { "Disks" }
            table #disks {
                thead { tr { th { "Disk" } th { "Datastore" } th { "Planned" } } }
                tbody {
                    @for (label, ds) in &v.disks {
                        tr {
                            td { (label) } td { (ds) }
                            td {
                                @if let Some(d) = sel.and_then(|s| s.disks.iter().find(|d| &d.label == label)) {
                                    (d.reason_summary())
                                } @else { "-" }
                            }
                        }
                    }
                }
            }
            h2 { "Restore points" }
            table #points {
                thead { tr { th { "Point" } th { "Taken" } th { "Scanned" } th { "Duration" } th { "Per disk: mode, proxy, data processed, read" } @if can_act { th {} } } }
                tbody {
                    @for h in history.iter().filter(|h| h.point.is_some()) {
                        @let point = h.point.as_deref().unwrap_or("");
                        tr data-point=(point) {
                            td { code { (point) } }
                            td { (when(h.started_ms)) }
                            td { (human_bytes(h.bytes)) }
                            td { @if let Some(d) = h.duration_s { (format!("{d:.1} s")) } }
                            td { @for d in &h.disks { div { (disk_line(d)) } } }
                            @if can_act { td {
                                a.button href={ "/vms/" (v.moref) "/restore?point=" (point) } { "Restore…" }
                                " "
                                a.button.verify href={ "/vms/" (v.moref) "/verify?point=" (point) } { "Verify…" }
                            } }
                        }
                    }
                }
            }
            @if !sizes.is_empty() {
                div.charts { (chart("Data scanned per backup", &sizes, "MiB")) (chart("Backup duration", &durations, "s")) }
            }
            h2 { "Job history" }
            table #history {
                thead { tr { th { "Run" } th { "Job" } th { "State" } th { "Agent / job" } th { "Scanned" } th { "Notes" } } }
                tbody {
                    @for h in history {
                        tr {
                            td { (when(h.started_ms)) br; small { (h.run_id) } }
                            td { (h.job) }
                            td class=(if h.state == "succeeded" { "ok" } else if h.state == "dispatched" || h.state == "pending" { "" } else { "bad" }) { (h.state) }
                            td { (h.agent.as_deref().unwrap_or("-")) br; small { (h.agent_job_id.as_deref().unwrap_or("")) } }
                            td { (human_bytes(h.bytes)) }
                            td {
                                @if let Some(e) = &h.error { div.bad { (e) } }
                                @if let Some(s) = &h.snapshot { div { "snapshot: " (s) } }
                            }
                        }
                    }
                }
            }
            @if can_act && !agents.is_empty() { p.muted { "Restores run on: " (agents.join(", ")) } }
        },
    )
}

fn disk_line(d: &serde_json::Value) -> String {
    let s = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let read = match d.get("read").and_then(|v| v.as_str()) {
        Some(r) => format!(", read {r}"),
        None => String::new(),
    };
    format!(
        "{}: {} via {}, {} processed{read}",
        s("label"),
        d.get("mode").and_then(|v| v.as_str()).unwrap_or("-"),
        s("proxy"),
        human_bytes(d.get("bytes").and_then(|v| v.as_u64()).unwrap_or(0))
    )
}

/// "Back up now?" confirmation.
pub fn confirm_backup(ctx: &Ctx<'_>, v: &VmRow) -> Markup {
    layout(
        "Back up now",
        Some(ctx),
        html! {
            p { "Back up VM " strong { (v.name) } " (" (v.tenant.as_deref().unwrap_or("-")) ") now, as a run of job "
                strong { (v.jobs.first().map(String::as_str).unwrap_or("-")) } "?" }
            form method="post" action={ "/vms/" (v.moref) "/backup" } {
                input type="hidden" name="csrf" value=(ctx.csrf);
                button #confirm type="submit" { "Confirm: back up now" }
                " " a href={ "/vms/" (v.moref) } { "Cancel" }
            }
        },
    )
}

/// Restore form with its confirmation.
pub fn restore_form(ctx: &Ctx<'_>, v: &VmRow, point: &str, agents: &[String]) -> Markup {
    layout(
        "Restore",
        Some(ctx),
        html! {
            p { "Restore point " code { (point) } " of VM " strong { (v.name) } "." }
            form.restore method="post" action={ "/vms/" (v.moref) "/restore" } {
                input type="hidden" name="csrf" value=(ctx.csrf);
                input type="hidden" name="point" value=(point);
                label { "Through agent " select #agent name="agent" { @for a in agents { option value=(a) { (a) } } } }
                fieldset {
                    legend { "Into" }
                    label { input #kind-vm type="radio" name="kind" value="vm" checked; " new disks of this VM (" (v.moref) ")" }
                    label { input #kind-directory type="radio" name="kind" value="directory"; " raw disk images in a directory on the agent (under one of the directories its configuration allows for this tenant):" }
                    input #path type="text" name="path" placeholder="/srv/ferry/restores/tenant-a/vm" disabled;
                }
                label { input #confirm-box type="checkbox" name="confirm" value="1" required; " I confirm this restore." }
                button #confirm type="submit" { "Restore" }
                " " a href={ "/vms/" (v.moref) } { "Cancel" }
            }
        },
    )
}

/// Verify confirmation: one point of a VM (`point`), or the tenant's whole
/// repository.
pub fn verify_form(
    ctx: &Ctx<'_>,
    tenant: &str,
    point: Option<(&VmRow, &str)>,
    agents: &[String],
) -> Markup {
    let action = match point {
        Some((v, _)) => format!("/vms/{}/verify", v.moref),
        None => format!("/tenants/{tenant}/verify"),
    };
    layout(
        "Verify",
        Some(ctx),
        html! {
            @match point {
                Some((v, p)) => p { "Verify restore point " code { (p) } " of VM " strong { (v.name) } " (tenant " (tenant) "): read its manifest and indexes and every chunk it references, and check each against its id. Nothing is changed." },
                None => p { "Verify the whole repository of tenant " strong { (tenant) } ": every restore point's manifest and indexes and every chunk they reference. Nothing is changed; on a large repository this reads all of it." },
            }
            @if agents.is_empty() {
                p.bad { "No agent serving this tenant is up." }
            } @else {
                form.verify method="post" action=(action) {
                    input type="hidden" name="csrf" value=(ctx.csrf);
                    @if let Some((_, p)) = point { input type="hidden" name="point" value=(p); }
                    label { "Through agent " select #agent name="agent" { @for a in agents { option value=(a) { (a) } } } }
                    button #confirm type="submit" { "Confirm: verify" }
                    " " a href=(match point { Some((v, _)) => format!("/vms/{}", v.moref), None => "/keys".to_string() }) { "Cancel" }
                }
            }
        },
    )
}

/// Running jobs (updated by console.js from `/api/running`).
pub fn jobs(ctx: &Ctx<'_>, items: &[super::views::RunningItem], recent: Markup) -> Markup {
    layout(
        "Jobs",
        Some(ctx),
        html! {
            h2 { "Running" }
            table #running data-live="/api/running" {
                thead { tr { th { "VM" } th { "Tenant" } th { "Run" } th { "State" } th { "Agent" } th { "Progress" } th { "Rate" } th { "ETA" } } }
                tbody {
                    @if items.is_empty() { tr.empty { td colspan="8" { "Nothing running." } } }
                    @for i in items {
                        tr data-moref=(i.moref) {
                            td { a href={ "/vms/" (i.moref) } { (i.vm) } } td { (i.tenant) } td { (i.run_id) }
                            td.state { (i.state) } td { (i.agent.as_deref().unwrap_or("-")) }
                            td.progress { (progress_text(i.bytes_done, i.bytes_total)) }
                            td.rate { (human_bytes(i.rate as u64)) "/s" }
                            td.eta { @if let Some(e) = i.eta_s { (format!("{e:.0} s")) } @else { "-" } }
                        }
                    }
                }
            }
            p.muted #live-status { "Updates every 2 s." }
            h2 { "Recent runs" }
            (recent)
        },
    )
}

/// "12.0 MiB of 64.0 MiB (18%)".
pub fn progress_text(done: u64, total: u64) -> String {
    if total == 0 {
        return human_bytes(done);
    }
    format!(
        "{} of {} ({}%)",
        human_bytes(done),
        human_bytes(total),
        (done.saturating_mul(100) / total).min(100)
    )
}

/// Recent runs table.
pub fn recent_runs(runs: &[(crate::state::RunRecord, String)]) -> Markup {
    html! {
        table #runs {
            thead { tr { th { "Run" } th { "Job" } th { "Tenant" } th { "State" } th { "Started" } th { "Finished" } th { "Items" } } }
            tbody {
                @for (r, tenant) in runs {
                    tr data-run=(r.id) {
                        td { (r.id) } td { (r.job) } td { (tenant) }
                        td class=(match r.state.as_str() { "succeeded" => "ok", "failed" => "bad", _ => "" }) { (r.state.as_str()) }
                        td { (when(r.started_at)) } td { @if let Some(f) = r.finished_at { (when(f)) } }
                        td { small { (items_text(&r.summary)) } }
                    }
                }
            }
        }
    }
}

/// "3 succeeded, 1 failed" from a run summary's `items` counts.
fn items_text(summary: &serde_json::Value) -> String {
    match summary.get("items").and_then(|v| v.as_object()) {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "-".into(),
    }
}

/// Agents.
pub fn agents(ctx: &Ctx<'_>, rows: &[AgentRow]) -> Markup {
    layout(
        "Agents",
        Some(ctx),
        html! {
            table #agents {
                thead { tr { th { "Agent" } th { "Health" } th { "Modes" } th { "Data path" } th { "Proxy VM key provider" } th { "Host" } th { "Slots in use" } th { "Tenants" } th { "Version" } } }
                tbody {
                    @for a in rows {
                        tr data-agent=(a.id) {
                            td { (a.id) }
                            td { @if a.up { span.ok { "up" } } @else { span.bad { "DOWN" } " " small { (a.detail) } } }
                            td { (a.modes.join(" + ")) } td { (a.data_path) }
                            td { (a.key_provider.as_deref().unwrap_or("unencrypted")) }
                            td { (a.host.as_deref().unwrap_or("-")) }
                            td { (a.slots_used) " of " (a.slots_total) }
                            td { (a.tenants.join(", ")) } td { (a.version) }
                        }
                    }
                }
            }
        },
    )
}

/// Keys per tenant.
pub fn keys(ctx: &Ctx<'_>, tenants: &[TenantKeys], checks: &BTreeMap<String, KeyCheck>) -> Markup {
    layout(
        "Keys",
        Some(ctx),
        html! {
            p.muted { "Key ids and versions as the key sync recorded them; key material never leaves the tenants' KMSs and agents." }
            @for t in tenants {
                section data-tenant=(t.tenant) {
                    h2 { (t.tenant) }
                    @if ctx.p.acts_on(&t.tenant) {
                        p.actions { a.button.verify-repository href={ "/tenants/" (t.tenant) "/verify" } { "Verify repository…" } }
                    }
                    p { "KMS: "
                        @match &t.kms {
                            Some(k) if k.ok => { span.ok { "reachable" } " (" (k.detail) ", " (when(k.at_ms)) ")" },
                            Some(k) => { span.bad { "unreachable" } " (" (k.detail) ", " (when(k.at_ms)) ")" },
                            None => { span.muted { "no key sync recorded yet" } },
                        }
                    }
                    table.keys {
                        thead { tr { th { "KMS" } th { "Key name" } th { "Key id" } th { "Version" } th { "Last checked" } th { "Last changed (rotation)" } } }
                        tbody {
                            @for k in &t.keys {
                                tr { td { (k.kms) } td { (k.key_name) } td { code { (k.key_id) } } td { (k.version) }
                                     td { (when(k.checked_at)) } td { (when(k.changed_at)) } }
                            }
                        }
                    }
                    (key_check(ctx, &t.tenant, checks.get(&t.tenant)))
                }
            }
        },
    )
}

/// The disaster-recovery key check of a tenant (`ferry repo import`'s report):
/// the newest result, and the button that runs it again.
fn key_check(ctx: &Ctx<'_>, tenant: &str, check: Option<&KeyCheck>) -> Markup {
    html! {
        div.key-check id={ "tenant-" (tenant) } {
            h3 { "Disaster-recovery key check" }
            @match check {
                None => { p.muted { "Not run since the orchestrator started: it asks the tenant's KMS, through an agent, whether every restore point still opens." } },
                Some(c) if c.report.error.is_some() => {
                    p { "Checked " (c.report.checked_at.split('.').next().unwrap_or("").replacen('T', " ", 1)) " via " (c.agent) ": "
                        span.bad { "could not run: " (c.report.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")) } }
                },
                Some(c) => {
                    @let r = &c.report;
                    @let opens = r.points.iter().filter(|p| p.status == "opens").count();
                    p {
                        "Checked " (r.checked_at.split('.').next().unwrap_or("").replacen('T', " ", 1)) " via " (c.agent) ": "
                        span class=(if opens == r.points.len() { "ok" } else { "bad" }) {
                            (opens) " of " (r.points.len()) " restore point(s) open"
                        }
                        "; keyring " @if r.keyring_opens { span.ok { "opens" } } @else { span.bad { "does not open" } }
                        @if let Some(e) = &r.keyring_error { " (" (e) ")" }
                        @if let Some(k) = &r.recovery_key { "; key-loss protection with " code { (k) } }
                    }
                    @if !r.missing_keys.is_empty() {
                        p.bad { "Keys to obtain (from the KMS or its backup):" }
                        ul.missing-keys {
                            @for m in &r.missing_keys {
                                li { code { (m.key) } " for " (m.points.len()) " point(s): " (m.points.join(", "))
                                    @if let Some(k) = &m.or_recovery_key { " (or the recovery key " code { (k) } ")" } }
                            }
                        }
                    }
                    @let bad: Vec<_> = r.points.iter().filter(|p| p.status != "opens").collect();
                    @if !bad.is_empty() {
                        table.key-check-points {
                            thead { tr { th { "Point" } th { "Of" } th { "Status" } th { "Why" } } }
                            tbody {
                                @for p in bad {
                                    tr { td { code { (p.point_id) } } td { (p.source.as_deref().unwrap_or("-")) }
                                         td.bad { (p.status) } td { (p.why.as_deref().unwrap_or("")) } }
                                }
                            }
                        }
                    }
                },
            }
            @if ctx.p.acts_on(tenant) {
                form.inline method="post" action={ "/keys/" (tenant) "/check" } {
                    input type="hidden" name="csrf" value=(ctx.csrf);
                    button.key-check-run type="submit" { "Run key check now" }
                }
            }
        }
    }
}

/// Audit log.
pub fn audit(ctx: &Ctx<'_>, entries: &[AuditEntry]) -> Markup {
    layout(
        "Audit log",
        Some(ctx),
        html! {
            table #audit {
                thead { tr { th { "When" } th { "Account" } th { "Tenant" } th { "Action" } th { "Target" } th { "Outcome" } th { "Detail" } th { "From" } } }
                tbody {
                    @for e in entries {
                        tr { td { (when(e.at)) } td { (e.account) } td { (e.tenant.as_deref().unwrap_or("-")) }
                             td { (e.action) } td { (e.target) }
                             td class=(if e.outcome == "ok" { "ok" } else { "bad" }) { (e.outcome) }
                             td { (e.detail) } td { (e.remote) } }
                    }
                }
            }
        },
    )
}

/// One agent job (a restore or verify started from the console), updated live.
pub fn agent_job(ctx: &Ctx<'_>, agent: &str, j: &crate::agent::api::Job) -> Markup {
    layout(
        &format!(
            "{} {}",
            match j.kind.as_str() {
                "restore" => "Restore",
                "verify" => "Verify",
                _ => "Backup",
            },
            j.id
        ),
        Some(ctx),
        html! {
            dl #agent-job data-live={ "/api/agent-jobs/" (agent) "/" (j.id) } {
                dt { "Agent" } dd { (agent) }
                dt { "Tenant" } dd { (j.tenant) }
                dt { "Subject" } dd { (j.subject) }
                dt { "State" } dd.state { (j.state.as_str()) }
                dt { "Progress" } dd.progress { (progress_text(j.bytes_done, j.bytes_total)) }
                dt { "Rate" } dd.rate { (human_bytes(j.rate_bytes_per_sec as u64)) "/s" }
                dt { "ETA" } dd.eta { @if let Some(e) = j.eta_secs { (format!("{e:.0} s")) } @else { "-" } }
                dt { "Error" } dd.job-error { @if let Some(e) = &j.error { (e.code) ": " (e.message) } }
                dt { "Notes" } dd.notes { @for n in &j.notes { div { (n) } } }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::auth::Role;

    #[test]
    fn values_are_escaped() {
        let p = Principal {
            name: "<script>alert(1)</script>".into(),
            role: Role::Viewer,
            tenant: Some("t".into()),
        };
        let html = message(
            Some(&Ctx {
                p: &p,
                csrf: "x\"y",
            }),
            "T",
            "<b>hi</b>",
        )
        .into_string();
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("&lt;b&gt;hi"));
        assert!(html.contains("value=\"x&quot;y\""));
    }

    #[test]
    fn bytes_and_progress() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(progress_text(1 << 20, 4 << 20), "1.0 MiB of 4.0 MiB (25%)");
        assert_eq!(progress_text(5, 0), "5 B");
    }
}
