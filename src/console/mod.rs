//! The web console (`[console]` in the orchestrator's configuration; served
//! by `ferry orchestrator run`): the provider's and its tenants' view of what
//! is protected, where each disk goes and why, running jobs, agents and keys,
//! and the actions back up now and restore. Documented in docs/console.md.
//!
//! Files: [`auth`] (roles, scopes, password hashes, sessions, CSRF tokens,
//! login throttling: pure), [`views`] (the data of each page, cut to what an
//! account may see), [`pages`] (HTML), [`http`] (routes, cookies, checks).
//! Accounts and the audit log live in the orchestrator's state database
//! (`crate::state`); `ferry orchestrator account` manages them.
//!
//! Must not hold key material or talk to vCenter or agents other than through
//! the orchestrator.

pub mod auth;
pub mod http;
pub mod pages;
pub mod views;

use crate::orchestrator::config::ConsoleSection;
use crate::orchestrator::Orchestrator;
use std::net::SocketAddr;
use std::sync::Arc;

/// Why the console did not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The listen address is taken or not ours.
    #[error("console: cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate or key unusable.
    #[error("console: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A serving console; stops when dropped.
pub struct ConsoleHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Whether it speaks TLS.
    pub tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConsoleHandle {
    /// Its base URL (`https://ADDR` or `http://ADDR`).
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Stop serving (requests in flight finish).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for ConsoleHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Start serving the console for `orch` as `cfg` says.
pub async fn start(
    orch: Arc<Orchestrator>,
    cfg: &ConsoleSection,
) -> Result<ConsoleHandle, ConsoleError> {
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(crate::tls::server::server_config(c, k, None)?),
        _ => None,
    };
    let settings = http::HttpSettings {
        session_idle: cfg.session_idle,
        session_max: cfg.session_max,
        secure_cookies: true,
        snapshot_ttl: cfg.refresh,
    };
    let app = http::router(http::Console::new(orch, &settings))
        .into_make_service_with_connect_info::<http::ClientAddr>();
    let bind_err = |source| ConsoleError::Bind {
        addr: cfg.listen,
        source,
    };
    let tcp = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(bind_err)?;
    let addr = tcp.local_addr().map_err(bind_err)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
    };
    let is_tls = tls.is_some();
    let task = match tls {
        Some(t) => {
            let l = crate::tls::server::TlsListener::new(tcp, t).map_err(bind_err)?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                    tracing::error!(error = %e, "console stopped");
                }
            })
        }
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, app).with_graceful_shutdown(stop).await {
                tracing::error!(error = %e, "console stopped");
            }
        }),
    };
    tracing::info!(%addr, tls = is_tls, "console serving");
    Ok(ConsoleHandle {
        addr,
        tls: is_tls,
        stop: Some(stop_tx),
        task,
    })
}
