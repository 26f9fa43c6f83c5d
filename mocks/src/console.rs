//! The web console on a simulated world, for `ferry-sim up --console`, the
//! console tests and the browser tests: the world's orchestrator opened
//! in-process (it takes the state lock) running its scheduler, the console
//! on loopback plain HTTP, and accounts: `admin` (the provider's
//! administrator) and, per tenant, `<tenant>-operator` and `<tenant>-viewer`,
//! with random passwords.

use crate::world::{World, WorldError};
use ferry::console::auth::{hash_password, random_token, Role};
use ferry::console::ConsoleHandle;
use ferry::orchestrator::config::ConsoleSection;
use ferry::orchestrator::Orchestrator;
use ferry::state::AccountRecord;
use std::sync::Arc;
use std::time::Duration;

/// One account of the simulated console.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimAccount {
    /// Login name.
    pub name: String,
    /// Its password (random, for this run only).
    pub password: String,
    /// Role.
    pub role: Role,
    /// Tenant, `None` for the provider.
    pub tenant: Option<String>,
}

/// A console serving a world.
pub struct SimConsole {
    /// The serving console.
    pub handle: ConsoleHandle,
    /// The in-process orchestrator behind it.
    pub orchestrator: Arc<Orchestrator>,
    /// Its accounts.
    pub accounts: Vec<SimAccount>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SimConsole {
    /// Start on 127.0.0.1:`port` (0 picks one) with 30-minute sessions.
    pub fn start(world: &World, port: u16) -> Result<SimConsole, WorldError> {
        Self::start_with(world, port, Duration::from_secs(1800))
    }

    /// Start with sessions that end after `idle` without a request.
    pub fn start_with(world: &World, port: u16, idle: Duration) -> Result<SimConsole, WorldError> {
        let orch = world.orchestrator()?;
        let err = |what: &str, e: String| WorldError::Start {
            component: format!("console: {what}"),
            message: e,
        };
        let mut accounts = vec![SimAccount {
            name: "admin".into(),
            password: random_token()[..20].to_string(),
            role: Role::Admin,
            tenant: None,
        }];
        for t in &world.tenants {
            for role in [Role::Operator, Role::Viewer] {
                accounts.push(SimAccount {
                    name: format!("{}-{}", t.name, role),
                    password: random_token()[..20].to_string(),
                    role,
                    tenant: Some(t.name.clone()),
                });
            }
        }
        for a in &accounts {
            let hash = hash_password(&a.password).map_err(|e| err("hashing", e))?;
            orch.store()
                .put_account(&AccountRecord {
                    name: a.name.clone(),
                    password_hash: hash,
                    role: a.role.as_str().into(),
                    tenant: a.tenant.clone(),
                    created_at: 0,
                    updated_at: 0,
                })
                .map_err(|e| err("accounts", e.to_string()))?;
        }
        let section = ConsoleSection {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            tls_cert: None,
            tls_key: None,
            session_idle: idle,
            session_max: idle.max(Duration::from_secs(3600)),
            refresh: Duration::from_secs(2),
        };
        let handle = world
            .runtime()
            .block_on(ferry::console::start(orch.clone(), &section))
            .map_err(|e| err("start", e.to_string()))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let o = orch.clone();
        world.runtime().spawn(async move {
            if let Err(e) = o
                .run_scheduled(async move {
                    let _ = rx.await;
                })
                .await
            {
                tracing::error!(error = %e, "simulated orchestrator stopped");
            }
        });
        Ok(SimConsole {
            handle,
            orchestrator: orch,
            accounts,
            stop: Some(tx),
        })
    }

    /// The console's base URL.
    pub fn url(&self) -> String {
        self.handle.url()
    }

    /// The account named `name`.
    pub fn account(&self, name: &str) -> Option<&SimAccount> {
        self.accounts.iter().find(|a| a.name == name)
    }
}

impl Drop for SimConsole {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A logged-in client of a console, blocking (its own current-thread runtime):
/// what scale tests and the page benchmark use to read pages as an account.
pub struct ConsoleClient {
    base: String,
    http: reqwest::Client,
    cookie: String,
    rt: tokio::runtime::Runtime,
}

fn form_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl ConsoleClient {
    /// Log in at `base` (`http://ADDR`) as `name`; errors say what the console
    /// answered.
    pub fn login(base: &str, name: &str, password: &str) -> Result<ConsoleClient, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        // reqwest's rustls has no provider of its own (rustls-no-provider).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let body = format!(
            "name={}&password={}&next=%2F",
            form_escape(name),
            form_escape(password)
        );
        let r = rt
            .block_on(
                http.post(format!("{base}/login"))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
                    .send(),
            )
            .map_err(|e| format!("login as {name}: {e}"))?;
        if r.status().as_u16() != 303 {
            return Err(format!("login as {name}: {}", r.status()));
        }
        let cookie = r
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|s| s.strip_prefix("ferry_session="))
            .and_then(|s| s.split(';').next())
            .ok_or_else(|| format!("login as {name}: no session cookie"))?
            .to_string();
        Ok(ConsoleClient {
            base: base.to_string(),
            http,
            cookie,
            rt,
        })
    }

    /// Log in to `console` as one of its accounts.
    pub fn login_as(console: &SimConsole, name: &str) -> Result<ConsoleClient, String> {
        let a = console
            .account(name)
            .ok_or_else(|| format!("no account {name}"))?;
        Self::login(&console.url(), &a.name, &a.password)
    }

    /// GET `path`: its body when the answer is 200.
    pub fn get(&self, path: &str) -> Result<String, String> {
        self.rt.block_on(async {
            let r = self
                .http
                .get(format!("{}{path}", self.base))
                .header(
                    reqwest::header::COOKIE,
                    format!("ferry_session={}", self.cookie),
                )
                .send()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            if r.status().as_u16() != 200 {
                return Err(format!("GET {path}: {}", r.status()));
            }
            r.text().await.map_err(|e| format!("GET {path}: {e}"))
        })
    }

    /// GET `path` as JSON.
    pub fn json(&self, path: &str) -> Result<serde_json::Value, String> {
        let body = self.get(path)?;
        serde_json::from_str(&body).map_err(|e| format!("{path}: not JSON ({e})"))
    }
}
