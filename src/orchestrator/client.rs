//! Talking to agents: the [`AgentApi`] seam (so dispatch logic can be tested with
//! scripted agents) and [`HttpAgent`], its implementation over the agent's
//! HTTP/JSON API with reqwest and ferry's rustls configuration (pinned CA,
//! optional client certificate, ring provider).

use super::config::AgentConfig;
use super::inventory::BoxFuture;
use crate::agent::api::{
    BackupRequest, FilesFindRequest, FilesListRequest, FilesResponse, Info, Job, KeyCheckRequest,
    KeyCheckResponse, KeySyncResponse, RepositoryList, RestoreRequest, VerifyRequest,
};
use crate::agent::error::ErrorBody;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

/// Why a call to an agent failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No answer: connection refused, TLS failure, timeout.
    #[error("agent {agent} unreachable: {message}")]
    Unreachable {
        /// Agent id.
        agent: String,
        /// What happened.
        message: String,
    },
    /// The agent answered with an API error.
    #[error("agent {agent} answered {status} {code}: {message}")]
    Api {
        /// Agent id.
        agent: String,
        /// HTTP status.
        status: u16,
        /// Stable error code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The answer is not what the API promises.
    #[error("agent {agent}: unexpected answer: {message}")]
    Protocol {
        /// Agent id.
        agent: String,
        /// What was wrong.
        message: String,
    },
}

impl ClientError {
    /// The API error code, if the agent answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// One agent as the orchestrator uses it.
pub trait AgentApi: Send + Sync {
    /// Agent id.
    fn id(&self) -> &str;
    /// `GET /v1/info`.
    fn info(&self) -> BoxFuture<'_, Result<Info, ClientError>>;
    /// `POST /v1/backups`.
    fn start_backup<'a>(
        &'a self,
        req: &'a BackupRequest,
    ) -> BoxFuture<'a, Result<Job, ClientError>>;
    /// `GET /v1/jobs/{id}`.
    fn job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Job, ClientError>>;
    /// `POST /v1/keys/sync`.
    fn sync_keys(&self) -> BoxFuture<'_, Result<KeySyncResponse, ClientError>>;
    /// `POST /v1/restores`: start a restore on this agent (the console and
    /// the simulator; the orchestrator's runs are backups).
    fn start_restore<'a>(
        &'a self,
        req: &'a RestoreRequest,
    ) -> BoxFuture<'a, Result<Job, ClientError>>;
    /// `POST /v1/verifies`: start a verify of a tenant's repository or of one
    /// point on this agent (the console).
    fn start_verify<'a>(
        &'a self,
        req: &'a VerifyRequest,
    ) -> BoxFuture<'a, Result<Job, ClientError>>;
    /// `GET /v1/repositories`: what each tenant's repository holds (the
    /// console's overview). Clients that cannot ask answer `Protocol`.
    fn repositories(&self) -> BoxFuture<'_, Result<RepositoryList, ClientError>> {
        let agent = self.id().to_string();
        Box::pin(async move {
            Err(ClientError::Protocol {
                agent,
                message: "this agent client does not read repositories".into(),
            })
        })
    }
    /// `POST /v1/keys/check`: the disaster-recovery key check of one tenant
    /// (the console's keys page).
    fn check_keys<'a>(
        &'a self,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<KeyCheckResponse, ClientError>> {
        let agent = self.id().to_string();
        let _ = tenant;
        Box::pin(async move {
            Err(ClientError::Protocol {
                agent,
                message: "this agent client does not check keys".into(),
            })
        })
    }
}

/// An agent over HTTPS.
pub struct HttpAgent {
    id: String,
    base: String,
    token: zeroize::Zeroizing<String>,
    client: reqwest::Client,
}

impl std::fmt::Debug for HttpAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAgent")
            .field("id", &self.id)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Errors building a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    /// Token file.
    #[error("agent {agent}: token file: {source}")]
    Token {
        /// Agent id.
        agent: String,
        /// Cause.
        source: crate::config::ConfigError,
    },
    /// TLS files.
    #[error("agent {agent}: {source}")]
    Tls {
        /// Agent id.
        agent: String,
        /// Cause.
        source: crate::tls::TlsError,
    },
    /// reqwest refused the configuration.
    #[error("agent {agent}: HTTP client: {message}")]
    Client {
        /// Agent id.
        agent: String,
        /// Cause.
        message: String,
    },
}

fn plain_tls() -> Result<rustls::ClientConfig, rustls::Error> {
    // Never used for https (the URL is http:// when this is chosen), but reqwest
    // without a default provider needs some rustls configuration.
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth())
}

impl HttpAgent {
    /// A client for `cfg` with `timeout` per request.
    pub fn new(cfg: &AgentConfig, timeout: Duration) -> Result<HttpAgent, ClientSetupError> {
        let token = crate::config::read_secret_file(&cfg.token_file).map_err(|source| {
            ClientSetupError::Token {
                agent: cfg.id.clone(),
                source,
            }
        })?;
        let tls = match &cfg.ca {
            Some(ca) => {
                let client = match (&cfg.client_cert, &cfg.client_key) {
                    (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                    _ => None,
                };
                (*crate::tls::client_config(ca, client).map_err(|source| {
                    ClientSetupError::Tls {
                        agent: cfg.id.clone(),
                        source,
                    }
                })?)
                .clone()
            }
            None => plain_tls().map_err(|e| ClientSetupError::Client {
                agent: cfg.id.clone(),
                message: e.to_string(),
            })?,
        };
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .https_only(!cfg.insecure_http)
            .build()
            .map_err(|e| ClientSetupError::Client {
                agent: cfg.id.clone(),
                message: e.to_string(),
            })?;
        Ok(HttpAgent {
            id: cfg.id.clone(),
            base: cfg.url.trim_end_matches('/').to_string(),
            token: zeroize::Zeroizing::new(token.trim().to_string()),
            client,
        })
    }

    /// `POST /v1/files/list`: one directory of a restore point's disk.
    pub async fn list_files(&self, req: &FilesListRequest) -> Result<FilesResponse, ClientError> {
        let body = self.body(req)?;
        self.call(reqwest::Method::POST, "/v1/files/list", Some(body))
            .await
    }

    /// `POST /v1/files/find`: search a restore point's disk by name pattern.
    pub async fn find_files(&self, req: &FilesFindRequest) -> Result<FilesResponse, ClientError> {
        let body = self.body(req)?;
        self.call(reqwest::Method::POST, "/v1/files/find", Some(body))
            .await
    }

    fn body<T: serde::Serialize>(&self, req: &T) -> Result<Vec<u8>, ClientError> {
        serde_json::to_vec(req).map_err(|e| ClientError::Protocol {
            agent: self.id.clone(),
            message: e.to_string(),
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let mut rb = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.as_str());
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        let r = rb.send().await.map_err(|e| ClientError::Unreachable {
            agent: self.id.clone(),
            message: error_chain(&e),
        })?;
        let status = r.status();
        let text = r.text().await.map_err(|e| ClientError::Unreachable {
            agent: self.id.clone(),
            message: format!("reading the answer: {}", error_chain(&e)),
        })?;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| ClientError::Protocol {
                agent: self.id.clone(),
                message: format!("{path}: {e}"),
            });
        }
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => Err(ClientError::Api {
                agent: self.id.clone(),
                status: status.as_u16(),
                code: b.error.code.as_str().to_string(),
                message: b.error.message,
            }),
            Err(_) => Err(ClientError::Protocol {
                agent: self.id.clone(),
                message: format!("{path}: HTTP {status} without an error body"),
            }),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl AgentApi for HttpAgent {
    fn id(&self) -> &str {
        &self.id
    }
    fn info(&self) -> BoxFuture<'_, Result<Info, ClientError>> {
        Box::pin(self.call(reqwest::Method::GET, "/v1/info", None))
    }
    fn start_backup<'a>(
        &'a self,
        req: &'a BackupRequest,
    ) -> BoxFuture<'a, Result<Job, ClientError>> {
        Box::pin(async move {
            let body = self.body(req)?;
            self.call(reqwest::Method::POST, "/v1/backups", Some(body))
                .await
        })
    }
    fn job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Job, ClientError>> {
        Box::pin(async move {
            let mut p = String::from("/v1/jobs/");
            // Job ids are [A-Za-z0-9-]; anything else is escaped.
            for b in id.bytes() {
                if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                    p.push(b as char);
                } else {
                    p.push_str(&format!("%{b:02X}"));
                }
            }
            self.call(reqwest::Method::GET, &p, None).await
        })
    }
    fn sync_keys(&self) -> BoxFuture<'_, Result<KeySyncResponse, ClientError>> {
        Box::pin(self.call(reqwest::Method::POST, "/v1/keys/sync", Some(b"{}".to_vec())))
    }
    fn start_restore<'a>(
        &'a self,
        req: &'a RestoreRequest,
    ) -> BoxFuture<'a, Result<Job, ClientError>> {
        Box::pin(async move {
            let body = self.body(req)?;
            self.call(reqwest::Method::POST, "/v1/restores", Some(body))
                .await
        })
    }
    fn start_verify<'a>(
        &'a self,
        req: &'a VerifyRequest,
    ) -> BoxFuture<'a, Result<Job, ClientError>> {
        Box::pin(async move {
            let body = self.body(req)?;
            self.call(reqwest::Method::POST, "/v1/verifies", Some(body))
                .await
        })
    }
    fn repositories(&self) -> BoxFuture<'_, Result<RepositoryList, ClientError>> {
        Box::pin(self.call(reqwest::Method::GET, "/v1/repositories", None))
    }
    fn check_keys<'a>(
        &'a self,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<KeyCheckResponse, ClientError>> {
        Box::pin(async move {
            let body = self.body(&KeyCheckRequest {
                tenant: tenant.to_string(),
            })?;
            self.call(reqwest::Method::POST, "/v1/keys/check", Some(body))
                .await
        })
    }
}
