//! The console's HTTP surface (axum): login and logout, the pages, the JSON
//! behind them (`/api/...`), the actions (back up now, restore, verify) and the
//! embedded assets. Every request but login and assets needs a session
//! cookie; every POST needs the session's CSRF token and a same-origin
//! request; every handler asks `auth::Principal` before it shows or does
//! anything of a tenant, so a tenant account that edits URLs or calls the JSON
//! gets 404 for what is not its own (not 403: it must not learn what exists).
//!
//! Must not decide placement or talk to vCenter: it goes through the
//! orchestrator.

// Checks return the finished refusal (`Err(Response)`) so handlers can `?` or
// return it as is; a Response is large, and that is fine on this path.
#![allow(clippy::result_large_err)]

use super::auth::{self, Principal, Session, SessionMiss, Sessions, Throttle};
use super::pages::{self, Ctx};
use super::views::{self, KeyCheck, PlanFilter, Snapshot};
use crate::agent::api::{RestoreRequest, RestoreTargetSpec, VerifyRequest};
use crate::orchestrator::Orchestrator;
use crate::state::AuditEntry;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use maud::Markup;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The client's address, for both listeners (plain TCP and TLS).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for ClientAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, crate::tls::server::TlsListener>,
    > for ClientAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, crate::tls::server::TlsListener>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

/// The session cookie's name.
pub const COOKIE: &str = "ferry_session";

/// The console's shared state.
pub struct Console {
    orch: Arc<Orchestrator>,
    sessions: Sessions,
    throttle: Throttle,
    throttle_addr: Throttle,
    secure_cookies: bool,
    snapshot_ttl: Duration,
    snapshot: tokio::sync::Mutex<Option<(Instant, Arc<Snapshot>)>>,
    repos: tokio::sync::Mutex<Option<(Instant, Arc<Repos>)>>,
    key_checks: std::sync::Mutex<BTreeMap<String, KeyCheck>>,
}

/// The agents' repository reports and the agents that could not be asked.
type Repos = (Vec<views::RepoRow>, Vec<String>);

/// How long one round of repository reports serves pages (each lists every
/// repository on the agents).
const REPOS_TTL: Duration = Duration::from_secs(60);

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Idle time after which a session ends.
    pub session_idle: Duration,
    /// Absolute session lifetime.
    pub session_max: Duration,
    /// Mark the cookie `Secure` (always, except plain HTTP for tests that
    /// cannot send secure cookies).
    pub secure_cookies: bool,
    /// How long one read of the world (plan, inventory, agents) serves pages.
    pub snapshot_ttl: Duration,
}

impl Console {
    /// The console over `orch`.
    pub fn new(orch: Arc<Orchestrator>, s: &HttpSettings) -> Arc<Console> {
        Arc::new(Console {
            orch,
            sessions: Sessions::new(s.session_idle, s.session_max),
            throttle: Throttle::default(),
            throttle_addr: Throttle::new(auth::FREE_FAILURES_PER_ADDRESS),
            secure_cookies: s.secure_cookies,
            snapshot_ttl: s.snapshot_ttl,
            snapshot: tokio::sync::Mutex::new(None),
            repos: tokio::sync::Mutex::new(None),
            key_checks: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// The world, read at most every `snapshot_ttl` (actions invalidate it).
    async fn snapshot(&self) -> Arc<Snapshot> {
        let mut g = self.snapshot.lock().await;
        if let Some((at, s)) = &*g {
            if at.elapsed() < self.snapshot_ttl {
                return s.clone();
            }
        }
        let s = Arc::new(Snapshot::read(&self.orch).await);
        *g = Some((Instant::now(), s.clone()));
        s
    }

    /// The agents' repository reports, asked at most every [`REPOS_TTL`].
    async fn repos(&self) -> Arc<Repos> {
        let mut g = self.repos.lock().await;
        if let Some((at, r)) = &*g {
            if at.elapsed() < REPOS_TTL {
                return r.clone();
            }
        }
        let r = Arc::new(views::repositories(&self.orch).await);
        *g = Some((Instant::now(), r.clone()));
        r
    }

    /// The newest key checks of the tenants `p` may see.
    fn key_checks_for(&self, p: &auth::Principal) -> BTreeMap<String, KeyCheck> {
        let g = self.key_checks.lock().unwrap_or_else(|e| e.into_inner());
        g.iter()
            .filter(|(t, _)| p.sees(t))
            .map(|(t, c)| (t.clone(), c.clone()))
            .collect()
    }

    /// Whether the session's account still exists unchanged.
    async fn account_current(&self, s: &Session) -> bool {
        let store = self.orch.store().clone();
        let name = s.principal.name.clone();
        let version = s.account_version;
        tokio::task::spawn_blocking(
            move || matches!(store.get_account(&name), Ok(Some(a)) if a.updated_at == version),
        )
        .await
        .unwrap_or(false)
    }

    async fn invalidate(&self) {
        *self.snapshot.lock().await = None;
    }

    async fn audit(&self, e: AuditEntry) {
        let store = self.orch.store().clone();
        let r = tokio::task::spawn_blocking(move || store.audit(&e)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write the console audit log"),
            Err(e) => tracing::error!(error = %e, "cannot write the console audit log"),
        }
    }
}

/// The console's routes.
pub fn router(c: Arc<Console>) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/", get(overview))
        .route("/plan", get(plan))
        .route("/jobs", get(jobs))
        .route("/agents", get(agents))
        .route("/keys", get(keys))
        .route("/keys/{tenant}/check", post(key_check))
        .route("/audit", get(audit))
        .route("/vms/{moref}", get(vm))
        .route("/vms/{moref}/backup", get(confirm_backup).post(backup_now))
        .route("/vms/{moref}/restore", get(restore_form).post(restore))
        .route(
            "/vms/{moref}/verify",
            get(verify_point_form).post(verify_point),
        )
        .route(
            "/tenants/{tenant}/verify",
            get(verify_repository_form).post(verify_repository),
        )
        .route("/agent-jobs/{agent}/{id}", get(agent_job_page))
        .route("/api/overview", get(api_overview))
        .route("/api/plan", get(api_plan))
        .route("/api/vms/{moref}", get(api_vm))
        .route("/api/vms/{moref}/backup", post(api_backup_now))
        .route("/api/running", get(api_running))
        .route("/api/agents", get(api_agents))
        .route("/api/keys", get(api_keys))
        .route("/api/keys/{tenant}/check", post(api_key_check))
        .route("/api/vms/{moref}/verify", post(api_verify_point))
        .route("/api/tenants/{tenant}/verify", post(api_verify_repository))
        .route("/api/agent-jobs/{agent}/{id}", get(api_agent_job))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .fallback(not_found)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(c)
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

fn html(m: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        m.into_string(),
    )
        .into_response()
}

fn html_status(code: StatusCode, m: Markup) -> Response {
    let mut r = html(m);
    *r.status_mut() = code;
    r
}

fn json_error(code: StatusCode, error: &str, message: &str) -> Response {
    (
        code,
        Json(serde_json::json!({ "error": error, "message": message })),
    )
        .into_response()
}

/// A request with a valid session.
struct Authed {
    sid: String,
    s: Session,
    api: bool,
}

impl Authed {
    fn p(&self) -> &Principal {
        &self.s.principal
    }
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            p: &self.s.principal,
            csrf: &self.s.csrf,
        }
    }
    /// 404 in the request's language.
    fn not_found(&self, what: &str) -> Response {
        if self.api {
            json_error(StatusCode::NOT_FOUND, "not_found", what)
        } else {
            html_status(
                StatusCode::NOT_FOUND,
                pages::message(Some(&self.ctx()), "Not found", what),
            )
        }
    }
    fn forbidden(&self, what: &str) -> Response {
        if self.api {
            json_error(StatusCode::FORBIDDEN, "forbidden", what)
        } else {
            html_status(
                StatusCode::FORBIDDEN,
                pages::message(Some(&self.ctx()), "Not allowed", what),
            )
        }
    }
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
}

impl FromRequestParts<Arc<Console>> for Authed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        c: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let api = parts.uri.path().starts_with("/api/");
        let miss = match session_id(&parts.headers) {
            None => SessionMiss::Unknown,
            Some(sid) => match c.sessions.get(&sid, Instant::now()) {
                Ok(s) if !c.account_current(&s).await => {
                    c.sessions.remove(&sid);
                    SessionMiss::Unknown
                }
                Ok(s) => {
                    let a = Authed { sid, s, api };
                    if parts.method != Method::GET && parts.method != Method::HEAD {
                        check_origin(&parts.headers).map_err(|m| a.forbidden(m))?;
                        // Forms carry the token in their body (checked by the
                        // handler); JSON calls in the header, checked here.
                        if api {
                            let h = parts
                                .headers
                                .get("x-csrf-token")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            if !auth::same(h, &a.s.csrf) {
                                return Err(a.forbidden(
                                    "missing or wrong X-CSRF-Token header (the token is in every page's forms)",
                                ));
                            }
                        }
                    }
                    return Ok(a);
                }
                Err(m) => m,
            },
        };
        let why = match miss {
            SessionMiss::Unknown => "not logged in",
            SessionMiss::Expired => "session expired",
        };
        if api {
            return Err(json_error(StatusCode::UNAUTHORIZED, "unauthenticated", why));
        }
        let next = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut r = Redirect::to(&format!(
            "/login?next={}&why={}",
            url_escape(next),
            if miss == SessionMiss::Expired {
                "expired"
            } else {
                ""
            }
        ))
        .into_response();
        if miss == SessionMiss::Expired {
            r.headers_mut()
                .append(header::SET_COOKIE, clear_cookie(c.secure_cookies));
        }
        Err(r)
    }
}

/// Refuse cross-site requests: `Sec-Fetch-Site` other than same-origin/none,
/// or an `Origin` whose host is not the request's `Host`.
fn check_origin(h: &HeaderMap) -> Result<(), &'static str> {
    if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if !matches!(site, "same-origin" | "none") {
            return Err("cross-site request refused");
        }
    }
    if let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = h
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let o = origin
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(origin);
        if origin == "null" || o != host {
            return Err("request from another origin refused");
        }
    }
    Ok(())
}

fn url_escape(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// Only local paths are followed after login (no open redirect).
fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

fn session_cookie(sid: &str, secure: bool) -> HeaderValue {
    let c = cookie::Cookie::build((COOKIE, sid.to_string()))
        .path("/")
        .http_only(true)
        .secure(secure)
        .same_site(cookie::SameSite::Strict)
        .build();
    HeaderValue::from_str(&c.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn clear_cookie(secure: bool) -> HeaderValue {
    let c = cookie::Cookie::build((COOKIE, ""))
        .path("/")
        .http_only(true)
        .secure(secure)
        .same_site(cookie::SameSite::Strict)
        .max_age(cookie::time::Duration::ZERO)
        .build();
    HeaderValue::from_str(&c.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LoginQuery {
    next: String,
    why: String,
}

async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    let msg = (q.why == "expired").then_some("Your session expired: log in again.");
    html(pages::login(msg, safe_next(&q.next)))
}

#[derive(Deserialize)]
struct LoginForm {
    name: String,
    password: String,
    #[serde(default)]
    next: String,
}

async fn login(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    Form(mut f): Form<LoginForm>,
) -> Response {
    // The password leaves this function only inside a Zeroizing buffer.
    let password = zeroize::Zeroizing::new(std::mem::take(&mut f.password));
    let remote = peer.ip().to_string();
    if let Err(m) = check_origin(&headers) {
        return html_status(
            StatusCode::FORBIDDEN,
            pages::message(None, "Not allowed", m),
        );
    }
    let now = Instant::now();
    let name_key = format!("account:{}", f.name);
    let ip_key = format!("ip:{remote}");
    let wait = c
        .throttle
        .wait(&name_key, now)
        .max(c.throttle_addr.wait(&ip_key, now));
    if !wait.is_zero() {
        c.audit(audit_entry(
            "-",
            None,
            "login",
            &f.name,
            "refused",
            "throttled",
            &remote,
        ))
        .await;
        let mut r = html_status(
            StatusCode::TOO_MANY_REQUESTS,
            pages::login(
                Some(&format!(
                    "Too many failed logins: try again in {} s.",
                    wait.as_secs().max(1)
                )),
                safe_next(&f.next),
            ),
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        return r;
    }
    let store = c.orch.store().clone();
    let name = f.name.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let acc = store.get_account(&name)?;
        let hash = acc
            .as_ref()
            .map(|a| a.password_hash.clone())
            .unwrap_or_else(|| auth::dummy_hash().to_string());
        let ok = auth::verify_password(&password, &hash);
        Ok::<_, crate::state::StateError>(acc.filter(|_| ok))
    })
    .await;
    let account = match checked {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "console login: cannot read accounts");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "console login failed");
            None
        }
    };
    let principal = account.and_then(|a| {
        Some((
            Principal {
                role: a.role.parse().ok()?,
                name: a.name,
                tenant: a.tenant,
            },
            a.updated_at,
        ))
    });
    let Some((p, version)) = principal else {
        c.throttle.failed(&name_key, now);
        c.throttle_addr.failed(&ip_key, now);
        tracing::info!(account = %f.name, %remote, "console login failed");
        c.audit(audit_entry(
            "-",
            None,
            "login",
            &f.name,
            "refused",
            "wrong account or password",
            &remote,
        ))
        .await;
        return html_status(
            StatusCode::UNAUTHORIZED,
            pages::login(Some("Wrong account or password."), safe_next(&f.next)),
        );
    };
    c.throttle.succeeded(&name_key);
    c.throttle_addr.succeeded(&ip_key);
    tracing::info!(account = %p.name, role = %p.role, tenant = p.tenant.as_deref().unwrap_or("-"), %remote, "console login");
    c.audit(audit_entry(
        &p.name,
        p.tenant.as_deref(),
        "login",
        &p.name,
        "ok",
        "",
        &remote,
    ))
    .await;
    let (sid, _) = c.sessions.create(p, version, now);
    let mut r = Redirect::to(safe_next(&f.next)).into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&sid, c.secure_cookies));
    r
}

fn audit_entry(
    account: &str,
    tenant: Option<&str>,
    action: &str,
    target: &str,
    outcome: &str,
    detail: &str,
    remote: &str,
) -> AuditEntry {
    AuditEntry {
        at: 0,
        account: account.into(),
        tenant: tenant.map(str::to_string),
        action: action.into(),
        target: target.into(),
        outcome: outcome.into(),
        detail: detail.into(),
        remote: remote.into(),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

fn csrf_ok(a: &Authed, token: &str) -> Result<(), Response> {
    if auth::same(token, &a.s.csrf) {
        Ok(())
    } else {
        Err(a.forbidden("this form has no valid CSRF token (reload the page and try again)"))
    }
}

async fn logout(State(c): State<Arc<Console>>, a: Authed, Form(f): Form<CsrfForm>) -> Response {
    if let Err(r) = csrf_ok(&a, &f.csrf) {
        return r;
    }
    c.sessions.remove(&a.sid);
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, clear_cookie(c.secure_cookies));
    r
}

/// Per tenant: [protected, failed, missed, never, unprotected] and the KMS.
fn tenant_counts(
    snap: &Snapshot,
    p: &Principal,
) -> Vec<(String, [usize; 5], Option<views::KmsState>)> {
    let mut out: Vec<(String, [usize; 5], Option<views::KmsState>)> = snap
        .tenants_for(p)
        .map(|t| (t.clone(), [0; 5], snap.kms.get(t).cloned()))
        .collect();
    if p.is_provider() {
        out.push(("(no job)".into(), [0; 5], None));
    }
    for v in snap.vms_for(p) {
        let key = v.tenant.as_deref().unwrap_or("(no job)");
        if let Some(row) = out.iter_mut().find(|(t, _, _)| t == key) {
            let i = match v.status {
                views::VmStatus::Protected => 0,
                views::VmStatus::Failed => 1,
                views::VmStatus::Missed => 2,
                views::VmStatus::Never => 3,
                views::VmStatus::Unprotected => 4,
            };
            row.1[i] += 1;
        }
    }
    out
}

/// The repository rows `p` may see, and (for the provider) the agents that
/// could not be asked.
fn repos_for<'r>(r: &'r Repos, p: &Principal) -> (Vec<&'r views::RepoRow>, &'r [String]) {
    let rows = r.0.iter().filter(|x| p.sees(&x.tenant)).collect();
    (rows, if p.is_provider() { &r.1 } else { &[] })
}

async fn overview(State(c): State<Arc<Console>>, a: Authed) -> Response {
    let snap = c.snapshot().await;
    let repos = c.repos().await;
    let counts = tenant_counts(&snap, a.p());
    let vms: Vec<&views::VmRow> = snap.vms_for(a.p()).collect();
    let mut errors: Vec<String> = Vec::new();
    let (repo_rows, repo_errors) = repos_for(&repos, a.p());
    if a.p().is_provider() {
        errors.extend(snap.inventory_errors.iter().cloned());
        errors.extend(repo_errors.iter().cloned());
    }
    html(pages::overview(
        &a.ctx(),
        &counts,
        &repo_rows,
        &vms,
        &errors,
        snap.taken_ms,
    ))
}

async fn api_overview(State(c): State<Arc<Console>>, a: Authed) -> Response {
    let snap = c.snapshot().await;
    let tenants: Vec<serde_json::Value> = tenant_counts(&snap, a.p())
        .into_iter()
        .map(|(t, n, kms)| {
            serde_json::json!({"tenant": t, "protected": n[0], "failed": n[1], "missed": n[2],
                "never": n[3], "unprotected": n[4], "kms": kms})
        })
        .collect();
    let vms: Vec<&views::VmRow> = snap.vms_for(a.p()).collect();
    let repos = c.repos().await;
    let (repo_rows, repo_errors) = repos_for(&repos, a.p());
    Json(
        serde_json::json!({ "as_of": crate::state::rfc3339_ms(snap.taken_ms), "tenants": tenants,
        "repositories": repo_rows, "repository_errors": repo_errors, "vms": vms }),
    )
    .into_response()
}

async fn plan(State(c): State<Arc<Console>>, a: Authed, Query(f): Query<PlanFilter>) -> Response {
    let snap = c.snapshot().await;
    let rows = snap.plan_rows(a.p(), &f);
    let tenants: Vec<String> = snap.tenants_for(a.p()).cloned().collect();
    let (page, n, of) = views::page_of(&rows, f.page.unwrap_or(1), views::PLAN_PAGE);
    html(pages::plan(
        &a.ctx(),
        &tenants,
        &f,
        page,
        (n, of, rows.len()),
    ))
}

async fn api_plan(
    State(c): State<Arc<Console>>,
    a: Authed,
    Query(f): Query<PlanFilter>,
) -> Response {
    let snap = c.snapshot().await;
    let rows = snap.plan_rows(a.p(), &f);
    match f.page {
        None => Json(rows).into_response(),
        Some(p) => Json(views::page_of(&rows, p, views::PLAN_PAGE).0).into_response(),
    }
}

async fn raw_history(c: &Console, moref: &str) -> Vec<crate::state::VmHistoryEntry> {
    let store = c.orch.store().clone();
    let m = moref.to_string();
    match tokio::task::spawn_blocking(move || store.vm_history(&m, 200)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::error!(error = %e, vm = %moref, "console: cannot read the VM's history");
            vec![]
        }
        Err(e) => {
            tracing::error!(error = %e, vm = %moref, "console: cannot read the VM's history");
            vec![]
        }
    }
}

async fn history(c: &Console, moref: &str) -> Vec<views::HistoryRow> {
    views::history_rows(&raw_history(c, moref).await)
}

/// A VM's history, and its row brought up to date with it.
async fn history_and_row(c: &Console, v: &views::VmRow) -> (Vec<views::HistoryRow>, views::VmRow) {
    let h = raw_history(c, &v.moref).await;
    let row = views::refresh_row(c.orch.config(), v, &h, crate::state::now_ms());
    (views::history_rows(&h), row)
}

/// Agents that serve `tenant` and are up.
fn restore_agents(snap: &Snapshot, tenant: &str) -> Vec<String> {
    snap.plan
        .agents
        .iter()
        .filter_map(|(id, st)| match st {
            crate::orchestrator::plan::AgentStatus::Up { info }
                if info.tenants.iter().any(|t| t.name == tenant) =>
            {
                Some(id.clone())
            }
            _ => None,
        })
        .collect()
}

async fn vm(State(c): State<Arc<Console>>, a: Authed, Path(moref): Path<String>) -> Response {
    let snap = c.snapshot().await;
    let Some(v) = snap.vm_for(a.p(), &moref) else {
        return a.not_found(&format!("no VM {moref} that you may see"));
    };
    let (h, fresh) = history_and_row(&c, v).await;
    let v = &fresh;
    let can_act = v.tenant.as_deref().is_some_and(|t| a.p().acts_on(t));
    let agents = v
        .tenant
        .as_deref()
        .map(|t| restore_agents(&snap, t))
        .unwrap_or_default();
    html(pages::vm(
        &a.ctx(),
        v,
        snap.selection(&moref),
        &h,
        can_act,
        &agents,
    ))
}

async fn api_vm(State(c): State<Arc<Console>>, a: Authed, Path(moref): Path<String>) -> Response {
    let snap = c.snapshot().await;
    let Some(v) = snap.vm_for(a.p(), &moref) else {
        return a.not_found(&format!("no VM {moref} that you may see"));
    };
    let (h, v) = history_and_row(&c, v).await;
    Json(serde_json::json!({ "vm": v, "selection": snap.selection(&moref), "history": h }))
        .into_response()
}

/// 404 unless `point` is one of the VM's restore points (a point id of
/// another VM, or of another tenant, is not found here).
async fn has_point(c: &Console, a: &Authed, v: &views::VmRow, point: &str) -> Result<(), Response> {
    let h = history(c, &v.moref).await;
    if h.iter().any(|r| r.point.as_deref() == Some(point)) {
        Ok(())
    } else {
        Err(a.not_found(&format!("VM {} has no restore point {point:?}", v.name)))
    }
}

/// The VM `moref` if `a` may act on it, with its tenant.
fn actionable<'s>(
    a: &Authed,
    snap: &'s Snapshot,
    moref: &str,
) -> Result<(&'s views::VmRow, String), Response> {
    let Some(v) = snap.vm_for(a.p(), moref) else {
        return Err(a.not_found(&format!("no VM {moref} that you may see")));
    };
    let Some(t) = v.tenant.clone() else {
        return Err(a.forbidden("this VM belongs to no tenant: no job selects it"));
    };
    if !a.p().acts_on(&t) {
        return Err(a.forbidden("your role may only look (viewer)"));
    }
    Ok((v, t))
}

async fn confirm_backup(
    State(c): State<Arc<Console>>,
    a: Authed,
    Path(moref): Path<String>,
) -> Response {
    let snap = c.snapshot().await;
    match actionable(&a, &snap, &moref) {
        Ok((v, _)) if !v.jobs.is_empty() => html(pages::confirm_backup(&a.ctx(), v)),
        Ok(_) => a.forbidden("no job selects this VM"),
        Err(r) => r,
    }
}

async fn start_backup(
    c: &Console,
    a: &Authed,
    moref: &str,
    remote: &str,
) -> Result<String, Response> {
    let snap = c.snapshot().await;
    let (v, tenant) = actionable(a, &snap, moref)?;
    let Some(job) = v.jobs.first().cloned() else {
        return Err(a.forbidden("no job selects this VM"));
    };
    match c.orch.start_vm_backup(&job, moref) {
        Ok(run) => {
            tracing::info!(account = %a.p().name, vm = %v.name, %run, "console: back up now");
            c.audit(audit_entry(
                &a.p().name,
                Some(&tenant),
                "backup_now",
                moref,
                "ok",
                &format!("run {run} of job {job}"),
                remote,
            ))
            .await;
            c.invalidate().await;
            Ok(run)
        }
        Err(e) => {
            c.audit(audit_entry(
                &a.p().name,
                Some(&tenant),
                "backup_now",
                moref,
                "failed",
                &e.to_string(),
                remote,
            ))
            .await;
            Err(a.forbidden(&e.to_string()))
        }
    }
}

async fn backup_now(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    a: Authed,
    Path(moref): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(r) = csrf_ok(&a, &f.csrf) {
        return r;
    }
    match start_backup(&c, &a, &moref, &peer.ip().to_string()).await {
        Ok(_) => Redirect::to("/jobs").into_response(),
        Err(r) => r,
    }
}

async fn api_backup_now(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    a: Authed,
    Path(moref): Path<String>,
) -> Response {
    match start_backup(&c, &a, &moref, &peer.ip().to_string()).await {
        Ok(run) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "run": run })),
        )
            .into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PointQuery {
    point: String,
}

async fn restore_form(
    State(c): State<Arc<Console>>,
    a: Authed,
    Path(moref): Path<String>,
    Query(q): Query<PointQuery>,
) -> Response {
    let snap = c.snapshot().await;
    let (v, tenant) = match actionable(&a, &snap, &moref) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = has_point(&c, &a, v, &q.point).await {
        return r;
    }
    html(pages::restore_form(
        &a.ctx(),
        v,
        &q.point,
        &restore_agents(&snap, &tenant),
    ))
}

#[derive(Deserialize)]
struct RestoreForm {
    #[serde(default)]
    csrf: String,
    point: String,
    agent: String,
    kind: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    confirm: String,
}

async fn restore(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    a: Authed,
    Path(moref): Path<String>,
    Form(f): Form<RestoreForm>,
) -> Response {
    if let Err(r) = csrf_ok(&a, &f.csrf) {
        return r;
    }
    let remote = peer.ip().to_string();
    let snap = c.snapshot().await;
    let (v, tenant) = match actionable(&a, &snap, &moref) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if f.confirm != "1" {
        return a.forbidden("confirm the restore (tick the box)");
    }
    if let Err(r) = has_point(&c, &a, v, &f.point).await {
        return r;
    }
    if !restore_agents(&snap, &tenant).contains(&f.agent) {
        return a.not_found(&format!(
            "no agent {:?} serving tenant {tenant} is up",
            f.agent
        ));
    }
    let target = match f.kind.as_str() {
        "directory" => RestoreTargetSpec::Directory {
            path: f.path.trim().to_string(),
        },
        "vm" => RestoreTargetSpec::Vm {
            moref: moref.clone(),
            datastore: None,
            storage_policy: None,
            overwrite: false,
        },
        _ => return a.forbidden("choose where to restore: directory or vm"),
    };
    let req = RestoreRequest {
        tenant: tenant.clone(),
        point: f.point.clone(),
        disks: None,
        target,
    };
    let Some(api) = c.orch.agent(&f.agent) else {
        return a.not_found("no such agent");
    };
    let target_text = match f.kind.as_str() {
        "directory" => format!(
            "point {} via {} into directory {}",
            f.point,
            f.agent,
            f.path.trim()
        ),
        _ => format!("point {} via {} into new disks of the VM", f.point, f.agent),
    };
    match api.start_restore(&req).await {
        Ok(job) => {
            tracing::info!(account = %a.p().name, vm = %v.name, agent = %f.agent, job = %job.id, "console: restore started");
            c.audit(audit_entry(
                &a.p().name,
                Some(&tenant),
                "restore",
                &moref,
                "ok",
                &format!("{target_text}: agent job {}", job.id),
                &remote,
            ))
            .await;
            Redirect::to(&format!(
                "/agent-jobs/{}/{}",
                url_escape(&f.agent),
                url_escape(&job.id)
            ))
            .into_response()
        }
        Err(e) => {
            c.audit(audit_entry(
                &a.p().name,
                Some(&tenant),
                "restore",
                &moref,
                "failed",
                &format!("{target_text}: {e}"),
                &remote,
            ))
            .await;
            html_status(
                StatusCode::BAD_GATEWAY,
                pages::message(Some(&a.ctx()), "Restore not started", &e.to_string()),
            )
        }
    }
}

/// The tenant `tenant` if `a` may verify its repository: 404 for a tenant it
/// may not see (or that does not exist), 403 for a viewer.
fn verifiable_tenant(a: &Authed, snap: &Snapshot, tenant: &str) -> Result<String, Response> {
    let Some(t) = snap.tenants_for(a.p()).find(|t| t.as_str() == tenant) else {
        return Err(a.not_found(&format!("no tenant {tenant:?} that you may see")));
    };
    if !a.p().acts_on(t) {
        return Err(a.forbidden("your role may only look (viewer)"));
    }
    Ok(t.clone())
}

/// Start a verify of `tenant`'s repository (`point`: one point of it) on
/// `agent` (empty: the first agent serving the tenant), audit it, and return
/// the agent and its job.
#[allow(clippy::too_many_arguments)]
async fn start_verify(
    c: &Console,
    a: &Authed,
    snap: &Snapshot,
    tenant: &str,
    point: Option<String>,
    agent: &str,
    audit_target: &str,
    remote: &str,
) -> Result<(String, crate::agent::api::Job), Response> {
    let serving = restore_agents(snap, tenant);
    let agent = match agent {
        "" => serving.first().map(String::as_str).unwrap_or(""),
        a => a,
    };
    if !serving.iter().any(|x| x == agent) {
        return Err(a.not_found(&format!("no agent {agent:?} serving tenant {tenant} is up")));
    }
    let Some(api) = c.orch.agent(agent) else {
        return Err(a.not_found("no such agent"));
    };
    let what = match &point {
        Some(p) => format!("point {p} via {agent}"),
        None => format!("repository of tenant {tenant} via {agent}"),
    };
    let req = VerifyRequest {
        tenant: tenant.to_string(),
        point,
        read_data: true,
    };
    match api.start_verify(&req).await {
        Ok(job) => {
            tracing::info!(account = %a.p().name, %tenant, agent = %agent, job = %job.id, "console: verify started");
            c.audit(audit_entry(
                &a.p().name,
                Some(tenant),
                "verify",
                audit_target,
                "ok",
                &format!("{what}: agent job {}", job.id),
                remote,
            ))
            .await;
            Ok((agent.to_string(), job))
        }
        Err(e) => {
            c.audit(audit_entry(
                &a.p().name,
                Some(tenant),
                "verify",
                audit_target,
                "failed",
                &format!("{what}: {e}"),
                remote,
            ))
            .await;
            Err(if a.api {
                json_error(
                    StatusCode::BAD_GATEWAY,
                    "verify_not_started",
                    &e.to_string(),
                )
            } else {
                html_status(
                    StatusCode::BAD_GATEWAY,
                    pages::message(Some(&a.ctx()), "Verify not started", &e.to_string()),
                )
            })
        }
    }
}

/// Where a started agent job is shown: its page (forms) or 202 with its ids
/// (JSON).
fn started(a: &Authed, r: Result<(String, crate::agent::api::Job), Response>) -> Response {
    match r {
        Ok((agent, job)) if a.api => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "agent": agent, "job": job })),
        )
            .into_response(),
        Ok((agent, job)) => Redirect::to(&format!(
            "/agent-jobs/{}/{}",
            url_escape(&agent),
            url_escape(&job.id)
        ))
        .into_response(),
        Err(r) => r,
    }
}

/// Body of `POST /api/vms/{moref}/verify` and `/api/tenants/{tenant}/verify`.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct VerifyJson {
    /// The point (VM calls only).
    point: String,
    /// The agent; empty: the first agent serving the tenant.
    agent: String,
}

async fn api_verify_point(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    a: Authed,
    Path(moref): Path<String>,
    Json(f): Json<VerifyJson>,
) -> Response {
    verify_point_of(&c, &a, &moref, &f.point, &f.agent, &peer.ip().to_string()).await
}

/// Verify `point` of VM `moref` if `a` may (forms and JSON).
async fn verify_point_of(
    c: &Console,
    a: &Authed,
    moref: &str,
    point: &str,
    agent: &str,
    remote: &str,
) -> Response {
    let snap = c.snapshot().await;
    let (v, tenant) = match actionable(a, &snap, moref) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = has_point(c, a, v, point).await {
        return r;
    }
    let r = start_verify(
        c,
        a,
        &snap,
        &tenant,
        Some(point.to_string()),
        agent,
        moref,
        remote,
    )
    .await;
    started(a, r)
}

async fn api_verify_repository(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    a: Authed,
    Path(tenant): Path<String>,
    Json(f): Json<VerifyJson>,
) -> Response {
    verify_repository_of(&c, &a, &tenant, &f.agent, &peer.ip().to_string()).await
}

/// Verify `tenant`'s whole repository if `a` may (forms and JSON).
async fn verify_repository_of(
    c: &Console,
    a: &Authed,
    tenant: &str,
    agent: &str,
    remote: &str,
) -> Response {
    let snap = c.snapshot().await;
    let tenant = match verifiable_tenant(a, &snap, tenant) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let r = start_verify(
        c,
        a,
        &snap,
        &tenant,
        None,
        agent,
        &format!("repository of {tenant}"),
        remote,
    )
    .await;
    started(a, r)
}

async fn verify_point_form(
    State(c): State<Arc<Console>>,
    a: Authed,
    Path(moref): Path<String>,
    Query(q): Query<PointQuery>,
) -> Response {
    let snap = c.snapshot().await;
    let (v, tenant) = match actionable(&a, &snap, &moref) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = has_point(&c, &a, v, &q.point).await {
        return r;
    }
    html(pages::verify_form(
        &a.ctx(),
        &tenant,
        Some((v, q.point.as_str())),
        &restore_agents(&snap, &tenant),
    ))
}

#[derive(Deserialize)]
struct VerifyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    point: String,
    #[serde(default)]
    agent: String,
}

async fn verify_point(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    a: Authed,
    Path(moref): Path<String>,
    Form(f): Form<VerifyForm>,
) -> Response {
    if let Err(r) = csrf_ok(&a, &f.csrf) {
        return r;
    }
    verify_point_of(&c, &a, &moref, &f.point, &f.agent, &peer.ip().to_string()).await
}

async fn verify_repository_form(
    State(c): State<Arc<Console>>,
    a: Authed,
    Path(tenant): Path<String>,
) -> Response {
    let snap = c.snapshot().await;
    let tenant = match verifiable_tenant(&a, &snap, &tenant) {
        Ok(t) => t,
        Err(r) => return r,
    };
    html(pages::verify_form(
        &a.ctx(),
        &tenant,
        None,
        &restore_agents(&snap, &tenant),
    ))
}

async fn verify_repository(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    a: Authed,
    Path(tenant): Path<String>,
    Form(f): Form<VerifyForm>,
) -> Response {
    if let Err(r) = csrf_ok(&a, &f.csrf) {
        return r;
    }
    verify_repository_of(&c, &a, &tenant, &f.agent, &peer.ip().to_string()).await
}

/// An agent job, if it belongs to a tenant `a` may see.
async fn visible_agent_job(
    c: &Console,
    a: &Authed,
    agent: &str,
    id: &str,
) -> Result<crate::agent::api::Job, Response> {
    let Some(api) = c.orch.agent(agent) else {
        return Err(a.not_found("no such agent job"));
    };
    match api.job(id).await {
        Ok(j) if a.p().sees(&j.tenant) => Ok(j),
        Ok(_) => Err(a.not_found("no such agent job")),
        Err(e) if e.code() == Some("job_not_found") => Err(a.not_found("no such agent job")),
        Err(e) => Err(a.forbidden(&e.to_string())),
    }
}

async fn agent_job_page(
    State(c): State<Arc<Console>>,
    a: Authed,
    Path((agent, id)): Path<(String, String)>,
) -> Response {
    match visible_agent_job(&c, &a, &agent, &id).await {
        Ok(j) => html(pages::agent_job(&a.ctx(), &agent, &j)),
        Err(r) => r,
    }
}

async fn api_agent_job(
    State(c): State<Arc<Console>>,
    a: Authed,
    Path((agent, id)): Path<(String, String)>,
) -> Response {
    match visible_agent_job(&c, &a, &agent, &id).await {
        Ok(j) => Json(j).into_response(),
        Err(r) => r,
    }
}

async fn jobs(State(c): State<Arc<Console>>, a: Authed) -> Response {
    let items = views::running(&c.orch, a.p()).await.unwrap_or_default();
    let store = c.orch.store().clone();
    let runs = tokio::task::spawn_blocking(move || store.list_runs(None, 50))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let cfg = c.orch.config();
    let runs: Vec<(crate::state::RunRecord, String)> = runs
        .into_iter()
        .filter_map(|r| {
            let tenant: Option<String> = cfg
                .jobs
                .iter()
                .find(|j| j.name == r.job)
                .map(|j| j.tenant.clone());
            match tenant {
                Some(t) if a.p().sees(&t) => Some((r, t)),
                None if a.p().is_provider() => Some((r, "-".to_string())),
                _ => None,
            }
        })
        .collect();
    html(pages::jobs(&a.ctx(), &items, pages::recent_runs(&runs)))
}

async fn api_running(State(c): State<Arc<Console>>, a: Authed) -> Response {
    match views::running(&c.orch, a.p()).await {
        Ok(items) => Json(items).into_response(),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "state", &e),
    }
}

async fn agents(State(c): State<Arc<Console>>, a: Authed) -> Response {
    let snap = c.snapshot().await;
    html(pages::agents(&a.ctx(), &snap.agents_for(a.p())))
}

async fn api_agents(State(c): State<Arc<Console>>, a: Authed) -> Response {
    let snap = c.snapshot().await;
    Json(snap.agents_for(a.p())).into_response()
}

async fn keys(State(c): State<Arc<Console>>, a: Authed) -> Response {
    let snap = c.snapshot().await;
    html(pages::keys(
        &a.ctx(),
        &snap.keys_for(a.p()),
        &c.key_checks_for(a.p()),
    ))
}

async fn api_keys(State(c): State<Arc<Console>>, a: Authed) -> Response {
    let snap = c.snapshot().await;
    let checks = c.key_checks_for(a.p());
    let out: Vec<serde_json::Value> = snap
        .keys_for(a.p())
        .into_iter()
        .map(|t| {
            let check = checks.get(&t.tenant);
            serde_json::json!({"tenant": t.tenant, "kms": t.kms, "keys": t.keys, "key_check": check})
        })
        .collect();
    Json(out).into_response()
}

/// Run the disaster-recovery key check of `tenant` on an agent serving it,
/// keep the report for the keys page, and audit it.
async fn run_key_check(
    c: &Console,
    a: &Authed,
    tenant: &str,
    remote: &str,
) -> Result<KeyCheck, Response> {
    let snap = c.snapshot().await;
    let tenant = verifiable_tenant(a, &snap, tenant)?;
    let Some(agent) = restore_agents(&snap, &tenant).into_iter().next() else {
        return Err(a.not_found(&format!("no agent serving tenant {tenant} is up")));
    };
    let Some(api) = c.orch.agent(&agent) else {
        return Err(a.not_found("no such agent"));
    };
    let got = api.check_keys(&tenant).await;
    let (outcome, detail) = match &got {
        Ok(r) if r.error.is_some() => (
            "failed",
            format!(
                "via {agent}: {}",
                r.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
            ),
        ),
        Ok(r) => (
            "ok",
            format!(
                "via {agent}: {} point(s), {} open, {} key(s) missing",
                r.points.len(),
                r.points.iter().filter(|p| p.status == "opens").count(),
                r.missing_keys.len()
            ),
        ),
        Err(e) => ("failed", format!("via {agent}: {e}")),
    };
    c.audit(audit_entry(
        &a.p().name,
        Some(&tenant),
        "key_check",
        &tenant,
        outcome,
        &detail,
        remote,
    ))
    .await;
    match got {
        Ok(report) => {
            tracing::info!(account = %a.p().name, %tenant, %agent, "console: key check");
            let check = KeyCheck { agent, report };
            c.key_checks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(tenant, check.clone());
            Ok(check)
        }
        Err(e) => Err(if a.api {
            json_error(StatusCode::BAD_GATEWAY, "key_check_failed", &e.to_string())
        } else {
            html_status(
                StatusCode::BAD_GATEWAY,
                pages::message(Some(&a.ctx()), "Key check failed", &e.to_string()),
            )
        }),
    }
}

async fn key_check(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    a: Authed,
    Path(tenant): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(r) = csrf_ok(&a, &f.csrf) {
        return r;
    }
    match run_key_check(&c, &a, &tenant, &peer.ip().to_string()).await {
        Ok(_) => Redirect::to(&format!("/keys#tenant-{}", url_escape(&tenant))).into_response(),
        Err(r) => r,
    }
}

async fn api_key_check(
    State(c): State<Arc<Console>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    a: Authed,
    Path(tenant): Path<String>,
) -> Response {
    match run_key_check(&c, &a, &tenant, &peer.ip().to_string()).await {
        Ok(check) => Json(check).into_response(),
        Err(r) => r,
    }
}

async fn audit(State(c): State<Arc<Console>>, a: Authed) -> Response {
    if !a.p().is_admin() {
        return a.not_found("no such page");
    }
    let store = c.orch.store().clone();
    let entries = tokio::task::spawn_blocking(move || store.list_audit(None, 500))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    html(pages::audit(&a.ctx(), &entries))
}

async fn not_found() -> Response {
    html_status(
        StatusCode::NOT_FOUND,
        pages::message(None, "Not found", "There is no such page."),
    )
}

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CSS,
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        JS,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn origin_checks() {
        assert!(check_origin(&h(&[])).is_ok(), "non-browser clients");
        assert!(check_origin(&h(&[("host", "c:1"), ("origin", "http://c:1")])).is_ok());
        assert!(check_origin(&h(&[("host", "c:1"), ("origin", "http://evil:1")])).is_err());
        assert!(check_origin(&h(&[("host", "c:1"), ("origin", "null")])).is_err());
        assert!(check_origin(&h(&[("sec-fetch-site", "cross-site")])).is_err());
        assert!(check_origin(&h(&[("sec-fetch-site", "same-site")])).is_err());
        assert!(check_origin(&h(&[("sec-fetch-site", "same-origin")])).is_ok());
    }

    #[test]
    fn next_is_local_only() {
        assert_eq!(safe_next("/vms/vm-1"), "/vms/vm-1");
        assert_eq!(safe_next("//evil.example/"), "/");
        assert_eq!(safe_next("https://evil.example/"), "/");
        assert_eq!(safe_next("/\\evil"), "/");
        assert_eq!(url_escape("/plan?tenant=a b"), "/plan%3Ftenant%3Da%20b");
    }

    #[test]
    fn cookie_attributes() {
        let v = session_cookie("abc", true);
        let s = v.to_str().unwrap();
        for part in [
            "ferry_session=abc",
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/",
        ] {
            assert!(s.contains(part), "{s} lacks {part}");
        }
        let mut m = HeaderMap::new();
        m.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; ferry_session=xyz; b=2"),
        );
        assert_eq!(session_id(&m).as_deref(), Some("xyz"));
        assert!(clear_cookie(true).to_str().unwrap().contains("Max-Age=0"));
    }
}
