//! The agent: the HTTP/JSON API of one backup proxy (`ferry agent`), on axum and
//! tokio, over TLS (optionally with client certificates) or, for loopback tests
//! only, plain HTTP.
//!
//! Owns: startup (state database, crash recovery and the orphan sweep before the
//! API serves), bearer-token authentication, admission of jobs (tenant served,
//! transport selector with this proxy as the only candidate, slots), job records
//! and progress, cancellation, metrics, the OpenAPI document, and graceful
//! shutdown (stop taking work, cancel running jobs, wait for their cleanup, record
//! them). Must not: do the work of a job (that is the [`JobRunner`] behind
//! [`runner`]), hold key material, or talk to vCenter or a KMS itself.
//!
//! Files: [`runner`] (the seam), [`api`] (wire types), [`error`] (error codes),
//! `jobs` (job manager), `http` (routes, auth, handlers), `restore_path` (where
//! restores through the API may write), `metrics`, [`openapi`]
//! (document, `docs/api.md` rendering).
//!
//! ```no_run
//! # async fn f(cfg: ferry::config::Config) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let agent = ferry::agent::Agent::from_config(&cfg)?;
//! let running = agent.start(Arc::new(ferry::agent::NoRunner)).await?;
//! println!("serving on {}", running.url());
//! running.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod api;
mod apidoc;
pub mod error;
mod http;
mod jobs;
mod metrics;
pub mod openapi;
mod restore_path;
pub mod runner;

pub use crate::tls::server::server_config;
pub use runner::{
    BackupSpec, DiskResult, FilesAnswer, FilesQuery, InterruptedJob, JobContext, JobRunner,
    JobSpec, KeyStatus, KeySyncOutcome, NoRunner, ProxyFacts, RestoreSpec, RestoreTarget, RunError,
    RunOutput, SweepReport, VerifySpec,
};

use crate::config::{Config, TenantSection};
use crate::state::{StateError, StateStore};
use crate::transport::select::{Mode, Policy};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// File name of the agent's database inside `[agent] state_dir`.
pub const STATE_FILE: &str = "agent.sqlite";
/// File name of the agent's lock inside `[agent] state_dir`.
pub const LOCK_FILE: &str = "agent.lock";

/// Agent errors; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration lacks or misconfigures something the agent needs.
    #[error("config: {0}")]
    Config(String),
    /// The token file is unusable.
    #[error("token file {path}: {detail}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// TLS setup failed.
    #[error("agent TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The listen address cannot be bound.
    #[error(
        "cannot listen on {addr}: {source} (is another agent running, or is the address wrong?)"
    )]
    Bind {
        /// Address.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Serve(String),
}

/// What the agent needs from `[agent]`, `[policy]` and `[[tenant]]`, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Proxy id.
    pub id: String,
    /// Listen address.
    pub listen: String,
    /// Slots.
    pub slots: u32,
    /// Modes offered.
    pub modes: Vec<Mode>,
    /// Proxy is a VM.
    pub is_vm: bool,
    /// Proxy VM's key provider.
    pub key_provider: Option<String>,
    /// Proxy VM's host.
    pub host: Option<String>,
    /// Datastores seen.
    pub datastores: Vec<String>,
    /// Hosts reachable (`None` = any).
    pub reachable_hosts: Option<Vec<String>>,
    /// Default transport policy.
    pub policy: Policy,
    /// Tenants served.
    pub tenants: Vec<TenantSection>,
    /// Wait for cancelled jobs at shutdown.
    pub shutdown_grace: Duration,
    /// State database.
    pub state_path: PathBuf,
    /// Which layer carries this agent's disks: `native`, or `vddk <version>
    /// (<library>)`, or `vddk unavailable: <why>` (see [`data_path_of`]).
    pub data_path: String,
}

/// What `[vddk]` makes of this agent's data path, checked at start without
/// loading the library (its files and version only): `native` without `[vddk]`.
pub fn data_path_of(v: Option<&crate::config::VddkSection>) -> String {
    let d = crate::transport::vddk::loader::data_path(v.map(|v| v.libdir.as_path()));
    if d.starts_with("vddk unavailable") {
        tracing::warn!(data_path = %d, "[vddk] is configured but VDDK cannot be used; jobs will fail until it is installed");
    }
    d
}

/// A configured agent, ready to start.
pub struct Agent {
    settings: Settings,
    token: zeroize::Zeroizing<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("settings", &self.settings)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Minimum token length: shorter tokens are guessable.
pub const TOKEN_MIN_LEN: usize = 16;

impl Agent {
    /// Read the `[agent]` section, the token file and the TLS files.
    pub fn from_config(cfg: &Config) -> Result<Agent, AgentError> {
        let a = cfg.agent.as_ref().ok_or_else(|| {
            AgentError::Config(format!(
                "{} has no [agent] section (see docs/configuration.md)",
                cfg.path.display()
            ))
        })?;
        let token =
            crate::config::read_secret_file(&a.token_file).map_err(|e| AgentError::Token {
                path: a.token_file.clone(),
                detail: e.to_string(),
            })?;
        let t = token.trim();
        if t.len() < TOKEN_MIN_LEN || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AgentError::Token {
                path: a.token_file.clone(),
                detail: format!(
                    "the token must be at least {TOKEN_MIN_LEN} printable characters without spaces (e.g. `openssl rand -hex 32 > {}`)",
                    a.token_file.display()
                ),
            });
        }
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(&a.token_file) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(file = %a.token_file.display(), "token file is readable by group or others; chmod 600 it");
                }
            }
        }
        let tls = match (&a.tls_cert, &a.tls_key) {
            (Some(c), Some(k)) => Some(server_config(c, k, a.client_ca.as_deref())?),
            _ if a.insecure_http => {
                tracing::warn!("serving plain HTTP (insecure_http = true): the token travels in clear text; use only on loopback");
                None
            }
            _ => return Err(AgentError::Config(
                "[agent] needs tls_cert and tls_key (or insecure_http = true for loopback tests)"
                    .into(),
            )),
        };
        let settings = Settings {
            id: a.id.clone(),
            listen: a.listen.clone(),
            slots: a.slots,
            modes: a.modes.clone(),
            is_vm: a.is_vm,
            key_provider: a.key_provider.clone(),
            host: a.host.clone(),
            datastores: a.datastores.clone(),
            reachable_hosts: a.reachable_hosts.clone(),
            policy: cfg.policy.clone(),
            tenants: cfg.tenants.clone(),
            shutdown_grace: Duration::from_secs(a.shutdown_grace_secs),
            state_path: a.state_dir.join(STATE_FILE),
            data_path: data_path_of(cfg.vddk.as_ref()),
        };
        Ok(Agent {
            settings,
            token: zeroize::Zeroizing::new(t.to_string()),
            tls,
        })
    }

    /// The resolved settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Open the state database (marking interrupted jobs failed), run the orphan
    /// sweep for them, bind the listen address and serve. Returns once serving.
    pub async fn start(self, runner: Arc<dyn JobRunner>) -> Result<RunningAgent, AgentError> {
        // One agent per state directory: recovery must not mark another live
        // agent's jobs interrupted.
        let lock =
            crate::state::StateLock::acquire(&self.settings.state_path.with_file_name(LOCK_FILE))?;
        let path = self.settings.state_path.clone();
        let (store, recovered) = tokio::task::spawn_blocking(move || StateStore::open(&path))
            .await
            .map_err(|e| AgentError::Serve(format!("state task: {e}")))??;
        let store = Arc::new(store);
        sweep(&store, runner.clone(), &recovered.jobs).await;
        let mut settings = self.settings;
        discover(&mut settings, runner.clone()).await;

        let settings = Arc::new(settings);
        let jobs = Arc::new(jobs::Jobs::new(
            store.clone(),
            runner.clone(),
            settings.clone(),
            tokio::runtime::Handle::current(),
        ));
        let state = Arc::new(http::AppState {
            jobs: jobs.clone(),
            store,
            settings: settings.clone(),
            runner,
            token_digest: http::token_digest(&self.token),
            openapi_json: openapi::json(),
        });
        drop(self.token);
        let app = http::router(state);
        let tcp = tokio::net::TcpListener::bind(&settings.listen)
            .await
            .map_err(|source| AgentError::Bind {
                addr: settings.listen.clone(),
                source,
            })?;
        let addr = tcp.local_addr().map_err(|source| AgentError::Bind {
            addr: settings.listen.clone(),
            source,
        })?;
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let stop = async move {
            let _ = stop_rx.wait_for(|v| *v).await;
        };
        let tls = self.tls.is_some();
        let task = match self.tls {
            Some(cfg) => {
                let l = crate::tls::server::TlsListener::new(tcp, cfg).map_err(|source| {
                    AgentError::Bind {
                        addr: settings.listen.clone(),
                        source,
                    }
                })?;
                tokio::spawn(async move {
                    axum::serve(l, app.into_make_service())
                        .with_graceful_shutdown(stop)
                        .await
                })
            }
            None => tokio::spawn(async move {
                axum::serve(tcp, app.into_make_service())
                    .with_graceful_shutdown(stop)
                    .await
            }),
        };
        tracing::info!(id = %settings.id, %addr, tls, slots = settings.slots, "agent serving");
        Ok(RunningAgent {
            _lock: lock,
            addr,
            tls,
            jobs,
            grace: settings.shutdown_grace,
            stop: stop_tx,
            task,
        })
    }
}

/// Replace the configured host, datastores and key provider of this proxy with
/// what vCenter reports, saying what changed; keep the config when discovery is
/// not possible.
async fn discover(settings: &mut Settings, runner: Arc<dyn JobRunner>) {
    let facts = tokio::task::spawn_blocking(move || runner.discover_proxy())
        .await
        .unwrap_or_else(|e| Err(RunError::Failed(format!("proxy discovery crashed: {e}"))));
    match facts {
        Ok(None) => {}
        Ok(Some(f)) => {
            if settings.key_provider.is_some() && settings.key_provider != f.key_provider {
                tracing::warn!(config = ?settings.key_provider, vcenter = ?f.key_provider,
                    "the proxy VM's key provider differs from [agent] key_provider; using vCenter's");
            }
            tracing::info!(host = ?f.host, datastores = ?f.datastores, key_provider = ?f.key_provider,
                "proxy discovered from vCenter");
            settings.is_vm = true;
            settings.key_provider = f.key_provider;
            settings.host = f.host;
            settings.datastores = f.datastores;
        }
        Err(e) => tracing::warn!(error = %e,
            "cannot read this proxy VM from vCenter; using [agent] key_provider/host/datastores from the config"),
    }
}

async fn sweep(
    store: &Arc<StateStore>,
    runner: Arc<dyn JobRunner>,
    jobs: &[crate::state::JobRecord],
) {
    let interrupted: Vec<InterruptedJob> = jobs
        .iter()
        .map(|j| InterruptedJob {
            id: j.id.clone(),
            spec: serde_json::from_value(j.spec.clone()).ok(),
            started_at: j.started_at,
        })
        .collect();
    let list = interrupted.clone();
    let result = tokio::task::spawn_blocking(move || runner.sweep_orphans(&list))
        .await
        .unwrap_or_else(|e| Err(RunError::Failed(format!("the orphan sweep crashed: {e}"))));
    let notes: Vec<(String, String)> = match result {
        Ok(report) => {
            for o in &report.other {
                tracing::info!(leftover = %o, "orphan sweep removed a leftover");
            }
            interrupted
                .iter()
                .map(|j| {
                    let note = report
                        .jobs
                        .iter()
                        .find(|(id, _)| *id == j.id)
                        .map(|(_, n)| n.clone())
                        .unwrap_or_else(|| "orphan sweep found nothing to clean".into());
                    (j.id.clone(), note)
                })
                .collect()
        }
        Err(e) => {
            tracing::error!(error = %e, "orphan sweep failed; leftovers (snapshots, hot-added disks) may remain");
            interrupted
                .iter()
                .map(|j| (j.id.clone(), format!("orphan sweep failed: {e}")))
                .collect()
        }
    };
    for (id, note) in notes {
        tracing::warn!(job = %id, cleanup = %note, "interrupted job swept");
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.set_cleanup(&id, &note)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot record the orphan sweep result"),
            Err(e) => tracing::error!(error = %e, "cannot record the orphan sweep result"),
        }
    }
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Default)]
pub struct ShutdownReport {
    /// Jobs that had not finished cleaning up when the grace period ended; the
    /// next start marks them interrupted and sweeps them.
    pub still_running: Vec<String>,
}

/// A serving agent.
pub struct RunningAgent {
    _lock: crate::state::StateLock,
    addr: SocketAddr,
    tls: bool,
    jobs: Arc<jobs::Jobs>,
    grace: Duration,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningAgent {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, `https://ip:port` or `http://ip:port`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Graceful shutdown: refuse new jobs (503), cancel running ones, wait up to
    /// the grace period for their cleanup (the API keeps answering meanwhile),
    /// then stop serving.
    pub async fn shutdown(self) -> Result<ShutdownReport, AgentError> {
        tracing::info!("agent shutting down: cancelling running jobs");
        self.jobs.begin_drain();
        let still_running = self.jobs.wait_idle(self.grace).await;
        if !still_running.is_empty() {
            tracing::warn!(jobs = ?still_running, "jobs still cleaning up after the grace period; the next start marks them interrupted and sweeps them");
        }
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(Ok(())) => Ok(ShutdownReport { still_running }),
            Ok(Err(e)) => Err(AgentError::Serve(e.to_string())),
            Err(e) => Err(AgentError::Serve(format!("server task: {e}"))),
        }
    }
}
