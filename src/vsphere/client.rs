//! The vCenter session: HTTPS transport (reqwest on ferry's own rustls
//! configuration), `RetrieveServiceContent`, `Login`/`Logout`, the
//! `vmware_soap_session` cookie, one re-login when the session expired, and bounded
//! retries with backoff on transient transport failures.
//!
//! Retry rules (docs/vsphere.md): a call that never reached vCenter (connect
//! failure, HTTP 503) is retried for every method; a call that may have reached it
//! (timeout, broken connection, 502/504) is retried only for read-only methods, so a
//! snapshot is never created twice behind ferry's back. `NotAuthenticated` triggers
//! one new login and one replay (the call was not executed). TLS failures, faults and
//! malformed answers are never retried.
//!
//! Must not know inventory or operations: those live in the sibling modules and use
//! [`Client::invoke`].

use super::error::{from_fault, Ctx, TransportKind, VsphereError};
use super::soap::{self, Fault, ResponseError};
use super::types::{MoRef, ServiceContent};
use super::xml::{Element, Limits};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeroize::Zeroizing;

/// How the vCenter certificate is trusted. There is no "trust anything".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// The certificate must chain to this CA (PEM file).
    Ca(PathBuf),
    /// The certificate's SHA-256 fingerprint must be this one.
    Thumbprint([u8; 32]),
}

/// Everything needed to talk to one vCenter.
#[derive(Clone)]
pub struct ClientConfig {
    /// SDK URL, `https://vcenter.example.com/sdk`.
    pub url: String,
    /// User name.
    pub user: String,
    /// Password (wiped on drop; never logged).
    pub password: Zeroizing<String>,
    /// Certificate trust.
    pub trust: ServerTrust,
    /// Connect and per-request timeout.
    pub timeout: Duration,
    /// Extra attempts after a transient transport failure.
    pub retries: u32,
    /// Delay before the first retry; doubled each time, capped at 8 s.
    pub backoff: Duration,
    /// XML parser limits (response size, depth, element count).
    pub limits: Limits,
    /// Longest wait for a task (snapshot removal consolidates and can take long).
    pub task_timeout: Duration,
    /// Longest interval between two polls of a running task.
    pub task_poll: Duration,
    /// `maxObjects` per property-collector page.
    pub page_size: u32,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("trust", &self.trust)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A configuration with ferry's defaults: 30 s timeout, 3 retries from 500 ms,
    /// 1 h task timeout, pages of 100 objects.
    pub fn new(
        url: &str,
        user: &str,
        password: Zeroizing<String>,
        trust: ServerTrust,
    ) -> ClientConfig {
        ClientConfig {
            url: url.to_string(),
            user: user.to_string(),
            password,
            trust,
            timeout: Duration::from_secs(30),
            retries: 3,
            backoff: Duration::from_millis(500),
            limits: Limits::default(),
            task_timeout: Duration::from_secs(3600),
            task_poll: Duration::from_secs(2),
            page_size: 100,
        }
    }

    /// From the `[vcenter]` section of the config file (reads the password file).
    pub fn from_section(v: &crate::config::VcenterSection) -> Result<ClientConfig, VsphereError> {
        let cfg_err = |detail: String| VsphereError::Config {
            vcenter: v.url.clone(),
            detail,
        };
        let trust = match (&v.ca, &v.thumbprint) {
            (Some(_), Some(_)) => {
                return Err(cfg_err("give either [vcenter] ca or thumbprint, not both".into()))
            }
            (Some(ca), None) => ServerTrust::Ca(ca.clone()),
            (None, Some(t)) => ServerTrust::Thumbprint(
                crate::tls::parse_sha256_thumbprint(t).map_err(|e| cfg_err(e.to_string()))?,
            ),
            (None, None) => return Err(cfg_err(
                "no way to trust the vCenter certificate: set [vcenter] ca (PEM of its CA) or thumbprint (`ferry vsphere thumbprint --url URL` shows it)".into(),
            )),
        };
        let password = crate::config::read_secret_file(&v.password_file)
            .map_err(|e| cfg_err(e.to_string()))?;
        let mut c = ClientConfig::new(&v.url, &v.user, password, trust);
        c.timeout = Duration::from_secs(v.timeout_secs.max(1));
        Ok(c)
    }
}

/// May a call be repeated when it is unknown whether vCenter received it?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Read-only or harmless to repeat.
    Safe,
    /// Changes state (creates a snapshot, reconfigures a VM...): repeat only when the
    /// request certainly did not reach vCenter.
    Unsafe,
}

struct Inner {
    cfg: ClientConfig,
    /// URL without user info, for requests and messages.
    url: String,
    http: reqwest::Client,
    sc: ServiceContent,
    soap_action: String,
    cookie: Mutex<Option<Zeroizing<String>>>,
    /// vCenter's leaf certificate (DER) as the verified TLS handshake saw it.
    peer_certificate: Mutex<Option<Vec<u8>>>,
    session_key: Mutex<Option<String>>,
    generation: AtomicU64,
    login_lock: tokio::sync::Mutex<()>,
    logged_out: AtomicBool,
}

/// A logged-in vCenter session. Cheap to clone (shared); safe to use from several
/// tasks at once. Call [`Client::logout`] when done.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

/// Remove `user:pass@` from a URL (vcsim prints one; it must never be sent or shown).
fn strip_userinfo(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// Does this error chain contain a rustls error (certificate or handshake)? The
/// connector layers do not always keep the typed error reachable, so rustls' own
/// messages are recognised too.
fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    const RUSTLS: &[&str] = &[
        "invalid peer certificate",
        "server certificate thumbprint",
        "peer is incompatible",
        "peer misbehaved",
        "received fatal alert",
        "peer sent no certificates",
    ];
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(r.to_string());
            }
        }
        let msg = c.to_string();
        if RUSTLS.iter().any(|m| msg.contains(m)) {
            return Some(msg.trim_start_matches("unexpected error: ").to_string());
        }
        cur = c.source();
    }
    None
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The `vmware_soap_session=...` pair from a `Set-Cookie` value.
pub fn session_cookie(set_cookie: &str) -> Option<&str> {
    let pair = set_cookie.split(';').next()?.trim();
    let (name, value) = pair.split_once('=')?;
    (name.trim() == "vmware_soap_session" && !value.trim().is_empty()).then_some(pair)
}

enum Attempt {
    Done(Result<Element, Fault>),
    Retry {
        kind: TransportKind,
        detail: String,
        safe_for_all: bool,
    },
}

impl Client {
    /// Connect: build the HTTPS client, read the service content, log in.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, VsphereError> {
        let url = strip_userinfo(&cfg.url);
        let cfg_err = |detail: String| VsphereError::Config {
            vcenter: url.clone(),
            detail,
        };
        if !url.starts_with("https://") {
            return Err(cfg_err(
                "ferry talks to vCenter over https only (the URL looks like https://vcenter.example.com/sdk)".into(),
            ));
        }
        let tls = match &cfg.trust {
            ServerTrust::Ca(p) => crate::tls::client_config(p, None),
            ServerTrust::Thumbprint(t) => crate::tls::thumbprint_client_config(*t),
        }
        .map_err(|e| cfg_err(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.timeout)
            .timeout(cfg.timeout)
            .pool_idle_timeout(Duration::from_secs(50))
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            // The verified peer certificate, for layers that pin it (VDDK).
            .tls_info(true)
            .build()
            .map_err(|e| cfg_err(format!("HTTPS client: {}", error_chain(&e))))?;
        let inner = Inner {
            cfg,
            url,
            http,
            // Placeholder until RetrieveServiceContent answers (nothing reads it
            // before then).
            sc: ServiceContent {
                root_folder: MoRef::new("Folder", "group-d1"),
                property_collector: MoRef::new("PropertyCollector", "propertyCollector"),
                view_manager: MoRef::new("ViewManager", "ViewManager"),
                session_manager: MoRef::new("SessionManager", "SessionManager"),
                about: Default::default(),
            },
            soap_action: "\"urn:vim25/7.0\"".into(),
            cookie: Mutex::new(None),
            peer_certificate: Mutex::new(None),
            session_key: Mutex::new(None),
            generation: AtomicU64::new(0),
            login_lock: tokio::sync::Mutex::new(()),
            logged_out: AtomicBool::new(false),
        };
        let mut client = Client {
            inner: Arc::new(inner),
        };
        let doing = "reading the service content (RetrieveServiceContent)";
        let si = MoRef::new("ServiceInstance", "ServiceInstance");
        let body = soap::envelope("RetrieveServiceContent", &si, |_| {});
        let resp = client
            .send("RetrieveServiceContent", &body, Replay::Safe, doing)
            .await?
            .map_err(|f| from_fault(&f, &client.ctx(doing)))?;
        let sc = resp
            .child("returnval")
            .ok_or_else(|| client.malformed(doing, "no returnval"))
            .and_then(|rv| ServiceContent::decode(rv).map_err(|e| client.malformed(doing, e)))?;
        {
            let url = client.inner.url.clone();
            // Nobody else holds the Arc yet.
            let inner = Arc::get_mut(&mut client.inner).ok_or_else(|| VsphereError::Config {
                vcenter: url,
                detail: "internal: client shared during connect".into(),
            })?;
            if !sc.about.api_version.is_empty() {
                inner.soap_action = format!("\"urn:vim25/{}\"", sc.about.api_version);
            }
            inner.sc = sc;
        }
        tracing::debug!(vcenter = %client.inner.url, about = %client.inner.sc.about.full_name, "service content read");
        client.login().await?;
        Ok(client)
    }

    /// The vCenter URL (without credentials).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Product and API version of the vCenter.
    pub fn about(&self) -> &super::types::About {
        &self.inner.sc.about
    }

    /// The service content references.
    pub fn service_content(&self) -> &ServiceContent {
        &self.inner.sc
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// The current session's key (`UserSession.key`), e.g. for an administrator to
    /// find ferry's session in vCenter's session list.
    pub fn session_key(&self) -> Option<String> {
        self.inner.session_key.lock().ok().and_then(|k| k.clone())
    }

    /// The session cookie (`vmware_soap_session=...`), for a layer that joins this
    /// session instead of logging in with the password (VDDK's session-id
    /// credentials). A credential: never log it.
    pub fn session_cookie(&self) -> Option<Zeroizing<String>> {
        self.inner.cookie.lock().ok().and_then(|c| c.clone())
    }

    /// vCenter's leaf certificate (DER) as ferry verified it on its own
    /// connection (CA or thumbprint pin), so a layer that pins a thumbprint
    /// (VDDK) pins exactly the certificate ferry trusts.
    pub fn server_certificate(&self) -> Option<Vec<u8>> {
        self.inner
            .peer_certificate
            .lock()
            .ok()
            .and_then(|c| c.clone())
    }

    /// vCenter's host name and port, from the URL.
    pub fn host_port(&self) -> (String, u16) {
        match reqwest::Url::parse(&self.inner.url) {
            Ok(u) => (
                u.host_str()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .to_string(),
                u.port_or_known_default().unwrap_or(443),
            ),
            Err(_) => (String::new(), 443),
        }
    }

    /// How many times this client has logged in (1 after connect; +1 per re-login).
    pub fn logins(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    /// The lock serialising HotAdd slot choice and reconfiguration.
    /// Serialises device changes of one proxy VM across every client of this
    /// process (each agent job has its own session): choosing a free SCSI unit
    /// and reconfiguring must not interleave, or two jobs pick the same unit.
    pub(super) fn hotadd_lock(&self, proxy: &MoRef) -> Arc<tokio::sync::Mutex<()>> {
        static LOCKS: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
        > = std::sync::OnceLock::new();
        let key = format!("{} {}", self.inner.url, proxy.value);
        let mut m = LOCKS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.entry(key).or_default().clone()
    }

    /// Context for error mapping.
    pub fn ctx<'a>(&'a self, doing: &'a str) -> Ctx<'a> {
        Ctx {
            vcenter: &self.inner.url,
            doing,
        }
    }

    /// A [`VsphereError::Malformed`] for this vCenter.
    pub fn malformed(&self, doing: &str, detail: impl std::fmt::Display) -> VsphereError {
        VsphereError::Malformed {
            vcenter: self.inner.url.clone(),
            doing: doing.to_string(),
            detail: detail.to_string(),
        }
    }

    async fn login(&self) -> Result<(), VsphereError> {
        let doing = format!("logging in as {:?}", self.inner.cfg.user);
        if let Ok(mut c) = self.inner.cookie.lock() {
            *c = None;
        }
        let body = Zeroizing::new(soap::envelope(
            "Login",
            &self.inner.sc.session_manager,
            |b| {
                b.leaf("userName", &self.inner.cfg.user);
                b.leaf("password", self.inner.cfg.password.as_str());
            },
        ));
        match self.send("Login", &body, Replay::Safe, &doing).await? {
            Ok(resp) => {
                let has_cookie = self
                    .inner
                    .cookie
                    .lock()
                    .map(|c| c.is_some())
                    .unwrap_or(false);
                if !has_cookie {
                    return Err(self.malformed(
                        &doing,
                        "Login answered without a vmware_soap_session cookie",
                    ));
                }
                let key = resp
                    .path(&["returnval", "key"])
                    .map(|k| k.text.trim().to_string());
                if let Ok(mut k) = self.inner.session_key.lock() {
                    *k = key;
                }
                self.inner.generation.fetch_add(1, Ordering::SeqCst);
                self.inner.logged_out.store(false, Ordering::SeqCst);
                Ok(())
            }
            Err(f) if f.fault_type == "InvalidLogin" => Err(VsphereError::InvalidLogin {
                vcenter: self.inner.url.clone(),
                user: self.inner.cfg.user.clone(),
                message: f.message.trim().to_string(),
            }),
            Err(f) => Err(from_fault(&f, &self.ctx(&doing))),
        }
    }

    /// Log in again unless another task already did since `seen_generation`.
    async fn relogin(&self, seen_generation: u64) -> Result<(), VsphereError> {
        let _g = self.inner.login_lock.lock().await;
        if self.inner.generation.load(Ordering::SeqCst) != seen_generation {
            return Ok(());
        }
        tracing::info!(vcenter = %self.inner.url, "vCenter session expired; logging in again");
        self.login().await
    }

    /// End the session (best effort: errors are logged, not returned). Later calls
    /// fail with `NotAuthenticated` instead of logging in again.
    pub async fn logout(&self) {
        self.inner.logged_out.store(true, Ordering::SeqCst);
        let body = soap::envelope("Logout", &self.inner.sc.session_manager, |_| {});
        match self
            .send("Logout", &body, Replay::Unsafe, "logging out")
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(f)) if f.fault_type == "NotAuthenticated" => {}
            Ok(Err(f)) => {
                tracing::warn!(vcenter = %self.inner.url, fault = %f.summary(), "logout failed")
            }
            Err(e) => tracing::warn!(error = %e, "logout failed"),
        }
        if let Ok(mut c) = self.inner.cookie.lock() {
            *c = None;
        }
    }

    /// Call `method` (body built with [`soap::envelope`]): the `<methodResponse>`
    /// element, or the vim25 fault for the caller to map. Renews an expired session
    /// once. Transport problems, oversize and malformed answers are errors.
    pub async fn invoke(
        &self,
        method: &str,
        body: &str,
        replay: Replay,
        doing: &str,
    ) -> Result<Result<Element, Fault>, VsphereError> {
        self.invoke_checked(method, body, replay, doing, |_| None)
            .await
    }

    /// Like [`Client::invoke`], with `check` inspecting a successful answer for a
    /// fault hidden inside it (a property collector's `missingSet` can carry
    /// `NotAuthenticated`, which vcsim returns instead of a SOAP fault).
    pub async fn invoke_checked(
        &self,
        method: &str,
        body: &str,
        replay: Replay,
        doing: &str,
        check: impl Fn(&Element) -> Option<Fault>,
    ) -> Result<Result<Element, Fault>, VsphereError> {
        let mut renewed = false;
        loop {
            let seen = self.inner.generation.load(Ordering::SeqCst);
            let r = match self.send(method, body, replay, doing).await? {
                Ok(e) => match check(&e) {
                    Some(f) => Err(f),
                    None => Ok(e),
                },
                Err(f) => Err(f),
            };
            match r {
                Err(f)
                    if f.fault_type == "NotAuthenticated"
                        && !renewed
                        && !self.inner.logged_out.load(Ordering::SeqCst) =>
                {
                    self.relogin(seen).await?;
                    renewed = true;
                }
                other => return Ok(other),
            }
        }
    }

    /// One logical call with bounded transport retries.
    async fn send(
        &self,
        method: &str,
        body: &str,
        replay: Replay,
        doing: &str,
    ) -> Result<Result<Element, Fault>, VsphereError> {
        let cfg = &self.inner.cfg;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let outcome = match self.attempt(method, body, doing).await {
                Err(VsphereError::Transport {
                    vcenter,
                    doing,
                    kind,
                    detail,
                    ..
                }) => {
                    return Err(VsphereError::Transport {
                        vcenter,
                        doing,
                        kind,
                        attempts: attempt,
                        detail,
                    })
                }
                other => other?,
            };
            let (kind, detail, safe_for_all) = match outcome {
                Attempt::Done(r) => return Ok(r),
                Attempt::Retry {
                    kind,
                    detail,
                    safe_for_all,
                } => (kind, detail, safe_for_all),
            };
            let may_retry = safe_for_all || replay == Replay::Safe;
            if !may_retry || attempt > cfg.retries {
                let detail = if may_retry {
                    detail
                } else {
                    format!("{detail} (not retried: the request may have reached vCenter and {method} changes state; check vCenter's recent tasks)")
                };
                return Err(VsphereError::Transport {
                    vcenter: self.inner.url.clone(),
                    doing: doing.to_string(),
                    kind,
                    attempts: attempt,
                    detail,
                });
            }
            let delay = cfg
                .backoff
                .saturating_mul(1u32 << (attempt - 1).min(16))
                .min(Duration::from_secs(8));
            tracing::info!(vcenter = %self.inner.url, %method, attempt, error = %detail, "vCenter call failed; retrying in {delay:?}");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(
        &self,
        method: &str,
        body: &str,
        doing: &str,
    ) -> Result<Attempt, VsphereError> {
        let inner = &self.inner;
        let mut req = inner
            .http
            .post(&inner.url)
            .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header("SOAPAction", &inner.soap_action)
            .body(body.to_string());
        let cookie = inner
            .cookie
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.to_string()));
        if let Some(c) = cookie {
            req = req.header(reqwest::header::COOKIE, c);
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return self.classify(&e, doing),
        };
        if let Some(der) = resp
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|t| t.peer_certificate())
        {
            if let Ok(mut c) = inner.peer_certificate.lock() {
                if c.as_deref() != Some(der) {
                    *c = Some(der.to_vec());
                }
            }
        }
        for v in resp.headers().get_all(reqwest::header::SET_COOKIE) {
            if let Some(pair) = v.to_str().ok().and_then(session_cookie) {
                if let Ok(mut c) = inner.cookie.lock() {
                    *c = Some(Zeroizing::new(pair.to_string()));
                }
            }
        }
        let status = resp.status().as_u16();
        let limit = inner.cfg.limits.max_bytes;
        let too_large = || VsphereError::TooLarge {
            vcenter: inner.url.clone(),
            doing: doing.to_string(),
            limit,
        };
        if resp.content_length().is_some_and(|l| l > limit as u64) {
            return Err(too_large());
        }
        let mut buf: Vec<u8> = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if buf.len() + c.len() > limit {
                        return Err(too_large());
                    }
                    buf.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) => return self.classify(&e, doing),
            }
        }
        match soap::parse_response(&buf, method, &inner.cfg.limits) {
            Ok(e) if (200..300).contains(&status) => Ok(Attempt::Done(Ok(e))),
            Err(ResponseError::Fault(f)) => Ok(Attempt::Done(Err(f))),
            parsed => {
                let what = match &parsed {
                    Ok(_) => "a SOAP answer with an error status".to_string(),
                    Err(e) => e.to_string(),
                };
                match status {
                    503 => Ok(Attempt::Retry {
                        kind: TransportKind::Http(status),
                        detail: "service unavailable".into(),
                        safe_for_all: true,
                    }),
                    502 | 504 => Ok(Attempt::Retry {
                        kind: TransportKind::Http(status),
                        detail: "bad gateway or gateway timeout".into(),
                        safe_for_all: false,
                    }),
                    200..=299 | 500 => match parsed {
                        Err(ResponseError::Xml(super::xml::XmlError::TooLarge { .. })) => Err(too_large()),
                        _ => Err(self.malformed(doing, what)),
                    },
                    s => Err(VsphereError::Transport {
                        vcenter: inner.url.clone(),
                        doing: doing.to_string(),
                        kind: TransportKind::Http(s),
                        attempts: 1,
                        detail: format!(
                            "not a SOAP answer ({what}); is the URL the SDK endpoint (https://HOST/sdk)?"
                        ),
                    }),
                }
            }
        }
    }

    fn classify(&self, e: &reqwest::Error, doing: &str) -> Result<Attempt, VsphereError> {
        if let Some(t) = tls_cause(e) {
            return Err(VsphereError::Tls {
                vcenter: self.inner.url.clone(),
                doing: doing.to_string(),
                detail: crate::tls::explain_tls_error(&t),
            });
        }
        let detail = error_chain(e);
        let (kind, safe_for_all) = if e.is_timeout() {
            (TransportKind::Timeout, false)
        } else if e.is_connect() {
            (TransportKind::Connect, true)
        } else {
            (TransportKind::Io, false)
        };
        Ok(Attempt::Retry {
            kind,
            detail,
            safe_for_all,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_cookie_is_found_in_set_cookie() {
        assert_eq!(
            session_cookie("vmware_soap_session=\"52ab\"; Path=/; HttpOnly; Secure;"),
            Some("vmware_soap_session=\"52ab\"")
        );
        assert_eq!(
            session_cookie("vmware_soap_session=abc; HttpOnly"),
            Some("vmware_soap_session=abc")
        );
        assert_eq!(session_cookie("other=1; Path=/"), None);
        assert_eq!(session_cookie("vmware_soap_session=; Path=/"), None);
        assert_eq!(session_cookie(""), None);
    }

    #[test]
    fn user_info_is_removed_from_urls() {
        assert_eq!(
            strip_userinfo("https://user:pass@127.0.0.1:8989/sdk"),
            "https://127.0.0.1:8989/sdk"
        );
        assert_eq!(
            strip_userinfo("https://vc.example/sdk"),
            "https://vc.example/sdk"
        );
    }

    #[test]
    fn config_from_the_vcenter_section() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\nignored\n").unwrap();
        let tp = "AA:".repeat(31) + "AA";
        let section = |ca: Option<&str>, thumb: Option<&str>| crate::config::VcenterSection {
            url: "https://vc.example/sdk".into(),
            user: "svc@vsphere.local".into(),
            password_file: dir.path().join("pw"),
            ca: ca.map(|c| dir.path().join(c)),
            thumbprint: thumb.map(str::to_string),
            proxy_vm: None,
            timeout_secs: 7,
        };
        let c = ClientConfig::from_section(&section(None, Some(&tp))).unwrap();
        assert_eq!(c.password.as_str(), "s3cret");
        assert_eq!(c.trust, ServerTrust::Thumbprint([0xAA; 32]));
        assert_eq!(c.timeout, Duration::from_secs(7));
        let c = ClientConfig::from_section(&section(Some("ca.pem"), None)).unwrap();
        assert_eq!(c.trust, ServerTrust::Ca(dir.path().join("ca.pem")));
        for (ca, t, want) in [
            (None, None, "thumbprint"),
            (Some("ca.pem"), Some(tp.as_str()), "not both"),
            (None, Some("zz"), "SHA-256"),
        ] {
            match ClientConfig::from_section(&section(ca, t)) {
                Err(VsphereError::Config { detail, .. }) => {
                    assert!(detail.contains(want), "{detail}")
                }
                other => panic!("{other:?}"),
            }
        }
        let mut s = section(None, Some(&tp));
        s.password_file = dir.path().join("missing");
        assert!(matches!(
            ClientConfig::from_section(&s),
            Err(VsphereError::Config { .. })
        ));
    }

    #[test]
    fn config_debug_hides_the_password() {
        let c = ClientConfig::new(
            "https://vc/sdk",
            "u",
            Zeroizing::new("s3cret".into()),
            ServerTrust::Thumbprint([0; 32]),
        );
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
