//! The web console over HTTP on the simulated world (issue 19): login,
//! wrong passwords and throttling, tenant isolation on pages and JSON, CSRF
//! and cross-origin refusals, roles, back up now through to a restore point,
//! a restore into new disks, verifies of a point and of a tenant's
//! repository, the audit log, expired sessions and removed accounts. The browser-level flow is tests/console_browser.rs.

use ferry_mocks::console::SimConsole;
use ferry_mocks::vcenter::Scenario;
use ferry_mocks::world::{World, WorldOptions};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use std::path::Path;
use std::time::{Duration, Instant};

fn small_world(dir: &Path) -> World {
    let mut s = Scenario::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("mocks/scenarios/whitepaper.toml"),
    )
    .unwrap();
    for vm in &mut s.vms {
        for d in vm.disks.iter_mut() {
            d.size_mib = 4;
        }
    }
    World::start(WorldOptions::new(s, dir)).unwrap()
}

/// A cookie-keeping client of the console.
struct Browser {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
    rt: tokio::runtime::Runtime,
}

struct Answer {
    status: StatusCode,
    location: String,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl Browser {
    fn new(base: &str) -> Browser {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Browser {
            base: base.to_string(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn send(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
        extra: HeaderMap,
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.header(COOKIE, format!("ferry_session={c}"));
        }
        if let Some(b) = body {
            req = req
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(b);
        }
        let r = self.rt.block_on(req.headers(extra).send()).unwrap();
        for v in r.headers().get_all(SET_COOKIE) {
            let s = v.to_str().unwrap();
            if let Some(rest) = s.strip_prefix("ferry_session=") {
                let val = rest.split(';').next().unwrap_or("");
                self.cookie = (!val.is_empty()).then(|| val.to_string());
            }
        }
        let status = r.status();
        let location = r
            .headers()
            .get(LOCATION)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = self.rt.block_on(r.text()).unwrap();
        Answer {
            status,
            location,
            body,
        }
    }

    fn get(&mut self, path: &str) -> Answer {
        self.send(reqwest::Method::GET, path, None, HeaderMap::new())
    }

    fn post(&mut self, path: &str, pairs: &[(&str, &str)]) -> Answer {
        self.send(
            reqwest::Method::POST,
            path,
            Some(form(pairs)),
            HeaderMap::new(),
        )
    }

    /// A JSON call as the console's script makes it (CSRF token in the header).
    fn post_json(&mut self, path: &str, csrf: &str, body: &str) -> Answer {
        let mut h = HeaderMap::new();
        h.insert("x-csrf-token", HeaderValue::from_str(csrf).unwrap());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.send(reqwest::Method::POST, path, Some(body.to_string()), h)
    }

    fn login(&mut self, name: &str, password: &str) -> Answer {
        self.post(
            "/login",
            &[("name", name), ("password", password), ("next", "/")],
        )
    }

    /// The CSRF token from a page's forms.
    fn csrf(&mut self) -> String {
        let page = self.get("/");
        let at = page
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a form with a csrf field");
        page.body[at + 19..at + 19 + 64].to_string()
    }
}

fn login_as(c: &SimConsole, name: &str) -> Browser {
    let mut b = Browser::new(&c.url());
    let a = c.account(name).unwrap();
    let r = b.login(&a.name, &a.password);
    assert_eq!(r.status, StatusCode::SEE_OTHER, "login {name}: {}", r.body);
    assert!(b.cookie.is_some());
    b
}

/// Tenant, moref and name of every VM a job selects, from the admin's
/// overview JSON.
fn vms_by_tenant(admin: &mut Browser) -> Vec<(String, String, String)> {
    let ov = admin.get("/api/overview").json();
    ov["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["jobs"].as_array().unwrap().is_empty())
        .map(|v| {
            (
                v["tenant"].as_str().unwrap_or("").to_string(),
                v["moref"].as_str().unwrap().to_string(),
                v["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn console_isolates_tenants_and_runs_actions() {
    let dir = tempfile::tempdir().unwrap();
    let world = small_world(dir.path());
    let console = SimConsole::start(&world, 0).unwrap();

    // Not logged in: pages redirect to the login page, JSON says 401.
    let mut anon = Browser::new(&console.url());
    let r = anon.get("/plan");
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(
        r.location.starts_with("/login?next=/plan"),
        "{}",
        r.location
    );
    assert_eq!(anon.get("/api/overview").status, StatusCode::UNAUTHORIZED);
    let r = anon.get("/login");
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("name=\"password\""));

    // Wrong password, unknown account: the same answer, no cookie.
    let admin_pw = console.account("admin").unwrap().password.clone();
    let r = anon.login("admin", "wrong password!!");
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("Wrong account or password"));
    assert!(anon.cookie.is_none());
    assert_eq!(
        anon.login("nobody", "whatever-password").status,
        StatusCode::UNAUTHORIZED
    );

    // Throttling: after 5 failures in a row an account must wait, even with
    // the right password; the Retry-After header says how long.
    let mut t = Browser::new(&console.url());
    let viewer_b = console.account("tenant-b-viewer").unwrap().clone();
    for _ in 0..5 {
        assert_eq!(
            t.login(&viewer_b.name, "not the password").status,
            StatusCode::UNAUTHORIZED
        );
    }
    let r = t.login(&viewer_b.name, &viewer_b.password);
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert!(r.body.contains("Too many failed logins"));
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        t.login(&viewer_b.name, &viewer_b.password).status,
        StatusCode::SEE_OTHER
    );

    // The provider's admin sees both tenants.
    let mut admin = Browser::new(&console.url());
    assert_eq!(
        admin.login("admin", &admin_pw).status,
        StatusCode::SEE_OTHER
    );
    let vms = vms_by_tenant(&mut admin);
    let a_vm = vms.iter().find(|v| v.0 == "tenant-a").unwrap().clone();
    let b_vm = vms.iter().find(|v| v.0 == "tenant-b").unwrap().clone();
    let page = admin.get("/");
    assert!(page.body.contains(&a_vm.2) && page.body.contains(&b_vm.2));
    let headers = admin.send(reqwest::Method::GET, "/", None, HeaderMap::new());
    assert_eq!(headers.status, StatusCode::OK);
    let plan = admin.get("/api/plan").json();
    let tenants: std::collections::BTreeSet<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(
        tenants.into_iter().collect::<Vec<_>>(),
        ["tenant-a", "tenant-b"]
    );
    let row = &plan[0];
    assert!(!row["reason"].as_str().unwrap().is_empty());
    assert!(row["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["accepted"] == true));
    let html = admin.get("/plan?tenant=tenant-b&mode=&refused_only=").body;
    assert!(html.contains(&b_vm.2) && !html.contains(&format!(">{}<", a_vm.2)));

    // A tenant-a operator: only tenant-a, whatever URL or JSON it asks for.
    let mut op_a = login_as(&console, "tenant-a-operator");
    let ov = op_a.get("/api/overview").json();
    assert!(ov["vms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["tenant"] == "tenant-a"));
    assert!(!op_a.get("/").body.contains(&b_vm.2));
    assert!(op_a
        .get("/api/plan")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["tenant"] == "tenant-a"));
    assert_eq!(
        op_a.get(&format!("/vms/{}", b_vm.1)).status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        op_a.get(&format!("/api/vms/{}", b_vm.1)).status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        op_a.get(&format!("/vms/{}/backup", b_vm.1)).status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        op_a.get("/audit").status,
        StatusCode::NOT_FOUND,
        "admins only"
    );
    let keys = op_a.get("/api/keys").json();
    assert!(keys
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["tenant"] == "tenant-a"));
    let agents = op_a.get("/api/agents").json();
    for a in agents.as_array().unwrap() {
        assert!(
            a["tenants"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t == "tenant-a"),
            "{a}"
        );
    }
    let csrf = op_a.csrf();
    let r = op_a.post(&format!("/vms/{}/backup", b_vm.1), &[("csrf", &csrf)]);
    assert_eq!(r.status, StatusCode::NOT_FOUND, "another tenant's VM");

    // CSRF: a form without the token, JSON without the header, and a
    // cross-origin request are refused and start nothing.
    let r = op_a.post(&format!("/vms/{}/backup", a_vm.1), &[("csrf", "")]);
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body.contains("CSRF"));
    let r = op_a.send(
        reqwest::Method::POST,
        &format!("/api/vms/{}/backup", a_vm.1),
        None,
        HeaderMap::new(),
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let mut evil = HeaderMap::new();
    evil.insert("origin", HeaderValue::from_static("http://evil.example"));
    let r = op_a.send(
        reqwest::Method::POST,
        &format!("/vms/{}/backup", a_vm.1),
        Some(form(&[("csrf", &csrf)])),
        evil,
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(op_a
        .get("/api/running")
        .json()
        .as_array()
        .unwrap()
        .is_empty());

    // A viewer may look but not act.
    let mut view_a = login_as(&console, "tenant-a-viewer");
    assert!(!view_a
        .get(&format!("/vms/{}", a_vm.1))
        .body
        .contains("backup-now"));
    let vcsrf = view_a.csrf();
    let r = view_a.post(&format!("/vms/{}/backup", a_vm.1), &[("csrf", &vcsrf)]);
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Back up now (the JSON way, with the header) and wait for the point.
    let mut h = HeaderMap::new();
    h.insert("x-csrf-token", HeaderValue::from_str(&csrf).unwrap());
    let r = op_a.send(
        reqwest::Method::POST,
        &format!("/api/vms/{}/backup", a_vm.1),
        None,
        h,
    );
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let run = r.json()["run"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(180);
    let point = loop {
        let v = op_a.get(&format!("/api/vms/{}", a_vm.1)).json();
        let h = &v["history"].as_array().unwrap();
        if let Some(e) = h.iter().find(|e| e["run_id"] == run.as_str()) {
            match e["state"].as_str().unwrap() {
                "succeeded" => break e["point"].as_str().unwrap().to_string(),
                "failed" | "refused" | "cancelled" => panic!("backup failed: {e}"),
                _ => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "backup of {} did not finish",
            a_vm.2
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let page = op_a.get(&format!("/vms/{}", a_vm.1)).body;
    assert!(page.contains(&point), "the VM page lists the new point");
    assert!(page.contains("<svg"), "with its charts");

    // Restore it into new disks of the same VM, through an agent of tenant-a.
    let form_page = op_a.get(&format!("/vms/{}/restore?point={point}", a_vm.1));
    assert_eq!(form_page.status, StatusCode::OK);
    let agent = {
        let b = &form_page.body;
        let at = b.find("<option value=\"").unwrap() + 15;
        b[at..at + b[at..].find('"').unwrap()].to_string()
    };
    let r = op_a.post(
        &format!("/vms/{}/restore", a_vm.1),
        &[
            ("csrf", &csrf),
            ("point", &point),
            ("agent", &agent),
            ("kind", "vm"),
        ],
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN, "not confirmed");
    let r = op_a.post(
        &format!("/vms/{}/restore", a_vm.1),
        &[
            ("csrf", &csrf),
            ("point", &point),
            ("agent", &agent),
            ("kind", "vm"),
            ("confirm", "1"),
        ],
    );
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert!(r.location.starts_with("/agent-jobs/"), "{}", r.location);
    let api = format!("/api{}", r.location);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let j = op_a.get(&api).json();
        match j["state"].as_str().unwrap() {
            "succeeded" => break,
            "failed" | "cancelled" => panic!("restore failed: {j}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "restore did not finish");
        std::thread::sleep(Duration::from_millis(300));
    }

    // Verify the new point from the VM page, through an agent of tenant-a.
    let wait_agent_job = |b: &mut Browser, location: &str, what: &str| {
        let api = format!("/api{location}");
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let j = b.get(&api).json();
            match j["state"].as_str().unwrap() {
                "succeeded" => break j,
                "failed" | "cancelled" => panic!("{what} failed: {j}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "{what} did not finish");
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let vm_page = op_a.get(&format!("/vms/{}", a_vm.1)).body;
    assert!(
        vm_page.contains(&format!("/vms/{}/verify?point={point}", a_vm.1)),
        "a Verify… link next to the point"
    );
    let confirm = op_a.get(&format!("/vms/{}/verify?point={point}", a_vm.1));
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(confirm.body.contains(&point), "{}", confirm.body);
    let r = op_a.post(
        &format!("/vms/{}/verify", a_vm.1),
        &[("csrf", &csrf), ("point", &point), ("agent", &agent)],
    );
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert!(r.location.starts_with("/agent-jobs/"), "{}", r.location);
    let j = wait_agent_job(&mut op_a, &r.location, "verify of the point");
    assert_eq!(j["kind"], "verify", "{j}");
    assert_eq!(j["subject"], point.as_str(), "{j}");
    assert!(
        j["notes"].to_string().contains("verified 1 point(s): 1 ok"),
        "{j}"
    );
    let page = op_a.get(&r.location).body;
    assert!(
        page.contains("Verify") && page.contains("verified 1 point(s)"),
        "{page}"
    );
    // A point the VM does not have: 404; without CSRF: 403.
    let r = op_a.post(
        &format!("/vms/{}/verify", a_vm.1),
        &[
            ("csrf", &csrf),
            ("point", "no-such-point"),
            ("agent", &agent),
        ],
    );
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = op_a.post(
        &format!("/vms/{}/verify", a_vm.1),
        &[("point", &point), ("agent", &agent)],
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // The whole repository of tenant-a, from the keys page.
    assert!(op_a.get("/keys").body.contains("/tenants/tenant-a/verify"));
    assert_eq!(op_a.get("/tenants/tenant-a/verify").status, StatusCode::OK);
    let r = op_a.post(
        "/tenants/tenant-a/verify",
        &[("csrf", &csrf), ("agent", &agent)],
    );
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let j = wait_agent_job(&mut op_a, &r.location, "verify of the repository");
    assert_eq!(j["subject"], "repository", "{j}");
    // A viewer may not verify: 403 on the confirmation and the POST.
    assert!(!view_a
        .get("/keys")
        .body
        .contains("/tenants/tenant-a/verify"));
    assert!(!view_a
        .get(&format!("/vms/{}", a_vm.1))
        .body
        .contains("/verify?point="));
    assert_eq!(
        view_a
            .get(&format!("/vms/{}/verify?point={point}", a_vm.1))
            .status,
        StatusCode::FORBIDDEN
    );
    let r = view_a.post(
        &format!("/vms/{}/verify", a_vm.1),
        &[("csrf", &vcsrf), ("point", &point), ("agent", &agent)],
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = view_a.post(
        "/tenants/tenant-a/verify",
        &[("csrf", &vcsrf), ("agent", &agent)],
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // tenant-b cannot look at tenant-a's restore job.
    let mut op_b = login_as(&console, "tenant-b-operator");
    assert_eq!(op_b.get(&api).status, StatusCode::NOT_FOUND);
    // A point of another VM is refused for this VM.
    let r = op_b.get(&format!("/vms/{}/restore?point={point}", b_vm.1));
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Nor verify tenant-a's point or repository: 404, as if they did not exist.
    let r = op_b.get(&format!("/vms/{}/verify?point={point}", a_vm.1));
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = op_b.get(&format!("/vms/{}/verify?point={point}", b_vm.1));
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let bcsrf = op_b.csrf();
    let r = op_b.post(
        "/tenants/tenant-a/verify",
        &[("csrf", &bcsrf), ("agent", &agent)],
    );
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        op_b.get("/tenants/no-such-tenant/verify").status,
        StatusCode::NOT_FOUND
    );

    // Verify through JSON: a point and the whole repository; the agent
    // defaults to one serving the tenant. Another tenant's: 404.
    let r = op_a.post_json(
        &format!("/api/vms/{}/verify", a_vm.1),
        &csrf,
        &format!(r#"{{"point": "{point}"}}"#),
    );
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let j = r.json();
    assert_eq!(j["job"]["kind"], "verify", "{j}");
    assert_eq!(j["job"]["subject"], point.as_str(), "{j}");
    let r = op_a.post_json("/api/tenants/tenant-a/verify", &csrf, "{}");
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.json()["job"]["subject"], "repository");
    let r = op_b.post_json("/api/tenants/tenant-a/verify", &bcsrf, "{}");
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = op_b.post_json(
        &format!("/api/vms/{}/verify", a_vm.1),
        &bcsrf,
        &format!(r#"{{"point": "{point}"}}"#),
    );
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // The disaster-recovery key check (`repo import`'s report) from the keys
    // page: every point of tenant-a opens with its KMS key.
    let r = op_a.post("/keys/tenant-a/check", &[("csrf", &csrf)]);
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let keys_page = op_a.get("/keys").body;
    assert!(keys_page.contains("Disaster-recovery key check"));
    let check = op_a.post_json("/api/keys/tenant-a/check", &csrf, "");
    assert_eq!(check.status, StatusCode::OK, "{}", check.body);
    let check = check.json();
    let points = check["report"]["points"].as_array().unwrap();
    assert!(
        points.iter().any(|p| p["point_id"] == point.as_str()),
        "{check}"
    );
    assert!(points.iter().all(|p| p["status"] == "opens"), "{check}");
    assert_eq!(check["report"]["keyring_opens"], true, "{check}");
    let n = points.len();
    assert!(op_a
        .get("/keys")
        .body
        .contains(&format!("{n} of {n} restore point(s) open")));
    let listed = op_a.get("/api/keys").json();
    let a_keys = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "tenant-a")
        .unwrap();
    assert_eq!(a_keys["key_check"]["report"]["tenant"], "tenant-a");
    // Viewers may not run it; tenant-b may neither run nor see tenant-a's.
    let r = view_a.post("/keys/tenant-a/check", &[("csrf", &vcsrf)]);
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = op_b.post("/keys/tenant-a/check", &[("csrf", &bcsrf)]);
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!op_b.get("/keys").body.contains("tenant-a"));
    assert!(op_b
        .get("/api/keys")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["tenant"] == "tenant-b"));

    // Repository usage on the overview: per tenant, as the agents measured it
    // (local directories: the file system's space too); tenants see their own.
    let admin_repos = admin.get("/api/overview").json()["repositories"].clone();
    let admin_repos = admin_repos.as_array().unwrap();
    for t in ["tenant-a", "tenant-b"] {
        let row = admin_repos
            .iter()
            .find(|r| r["tenant"] == t)
            .unwrap_or_else(|| panic!("no repository row for {t}: {admin_repos:?}"));
        assert!(row["error"].is_null(), "{row}");
        assert_eq!(row["backend"], "local", "{row}");
        assert!(row["fs_total_bytes"].as_u64().unwrap() > 0, "{row}");
        assert!(
            row["points"].is_u64() && row["stored_bytes"].is_u64(),
            "{row}"
        );
    }
    let a_repos = op_a.get("/api/overview").json()["repositories"].clone();
    assert!(!a_repos.as_array().unwrap().is_empty());
    assert!(a_repos
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["tenant"] == "tenant-a"));
    assert!(op_a.get("/").body.contains("id=\"repositories\""));

    // The audit log has the refusals and the actions, for admins.
    let audit = admin.get("/audit").body;
    for needle in [
        "backup_now",
        "restore",
        "verify",
        "wrong account or password",
        "throttled",
        &run,
    ] {
        assert!(audit.contains(needle), "audit log lacks {needle}");
    }

    // Logout ends the session server-side.
    let old = op_b.cookie.clone();
    let bcsrf = op_b.csrf();
    assert_eq!(
        op_b.post("/logout", &[("csrf", &bcsrf)]).status,
        StatusCode::SEE_OTHER
    );
    op_b.cookie = old;
    assert_eq!(op_b.get("/api/overview").status, StatusCode::UNAUTHORIZED);

    // Removing (or changing) an account ends its sessions at once.
    assert!(console
        .orchestrator
        .store()
        .remove_account("tenant-a-viewer")
        .unwrap());
    assert_eq!(view_a.get("/api/overview").status, StatusCode::UNAUTHORIZED);
}

#[test]
fn an_idle_session_expires() {
    let dir = tempfile::tempdir().unwrap();
    let world = small_world(dir.path());
    let console = SimConsole::start_with(&world, 0, Duration::from_secs(1)).unwrap();
    let mut b = login_as(&console, "admin");
    assert_eq!(b.get("/api/overview").status, StatusCode::OK);
    std::thread::sleep(Duration::from_millis(1500));
    let r = b.get("/plan");
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location.contains("why=expired"), "{}", r.location);
    assert!(b.cookie.is_none(), "the expired cookie is cleared");
    let r = b.get(&r.location.clone());
    assert!(r.body.contains("session expired"), "{}", r.body);
}

#[test]
fn the_console_serves_https_with_its_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let world = small_world(&dir.path().join("world"));
    let ca = ferry_mocks::pki::Ca::new("console test CA").unwrap();
    let issued = ca.server(&["127.0.0.1"]).unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    let orch = world.orchestrator().unwrap();
    let section = ferry::orchestrator::config::ConsoleSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls_cert: Some(cert),
        tls_key: Some(key),
        session_idle: Duration::from_secs(60),
        session_max: Duration::from_secs(600),
        refresh: Duration::from_secs(2),
    };
    let handle = world
        .runtime()
        .block_on(ferry::console::start(orch, &section))
        .unwrap();
    assert!(handle.url().starts_with("https://"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let trusting = |pem: &str| {
        let f = dir.path().join(format!("ca-{}.pem", pem.len()));
        std::fs::write(&f, pem).unwrap();
        (*ferry::tls::client_config(&f, None).unwrap()).clone()
    };
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(trusting(&ca.cert_pem()))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = rt
        .block_on(client.get(format!("{}/login", handle.url())).send())
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    // An unknown CA is refused: verification is on.
    let other = reqwest::Client::builder()
        .tls_backend_preconfigured(trusting(
            &ferry_mocks::pki::Ca::new("other").unwrap().cert_pem(),
        ))
        .build()
        .unwrap();
    assert!(rt
        .block_on(other.get(format!("{}/login", handle.url())).send())
        .is_err());
    // Plain HTTP to the TLS port gets no page.
    let plain = handle.url().replace("https://", "http://");
    assert!(rt
        .block_on(reqwest::Client::new().get(format!("{plain}/login")).send())
        .map(|r| !r.status().is_success())
        .unwrap_or(true));
}
