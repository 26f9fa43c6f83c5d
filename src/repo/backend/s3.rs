//! A repository in an S3-compatible bucket (AWS S3, Ceph RGW, MinIO, Wasabi...)
//! through the `object_store` crate (SigV4, retries with backoff and jitter,
//! multipart uploads), over ferry's own reqwest client and rustls setup.
//!
//! Owns the S3 side of the backend contract: keys under the repository prefix,
//! create-only writes with `If-None-Match: *`, point commits that write the
//! manifest last, the lock protocol of [`super::object_lock`], and errors that
//! name their cause and fix (credentials, bucket, clock). The repository's
//! calls are synchronous; each one runs on this store's own small tokio
//! runtime, so it may be called from any thread.

use super::{Backend, ObjectInfo, PointStage, Retention};
use crate::repo::lock::{LockMode, RepoLock};
use crate::repo::{RepoError, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AwsAuthorizer, AwsCredential};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};
use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Objects above this size are uploaded in parts.
const MULTIPART_ABOVE: u64 = 64 << 20;
/// Part size of multipart uploads.
const PART_SIZE: usize = 16 << 20;

/// How to reach the object store. See docs/operations.md, "Object storage".
#[derive(Clone)]
pub struct S3Settings {
    /// Endpoint URL (`https://s3.example.net`); `None`: AWS for the region.
    pub endpoint: Option<String>,
    /// Region (signing scope). Default `us-east-1`.
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`) rather than virtual hosts
    /// (`bucket.endpoint/key`). Default: on with a custom endpoint.
    pub path_style: bool,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<Zeroizing<String>>,
    /// Session token (temporary credentials).
    pub session_token: Option<Zeroizing<String>>,
    /// CA certificates (PEM) to trust for the endpoint; default: the system's
    /// bundle (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_file: Option<PathBuf>,
    /// Retries of a failed request (5xx, SlowDown, resets, timeouts).
    pub max_retries: usize,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Requests in flight at once during backups and restores (the fewest
    /// pipeline workers they use).
    pub connections: usize,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            endpoint: None,
            region: "us-east-1".into(),
            path_style: false,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            ca_file: None,
            max_retries: 8,
            timeout: Duration::from_secs(120),
            connections: 8,
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `[s3]` of the agent's or CLI's configuration file: defaults for every
/// `s3://` repository of the process, under the environment (an environment
/// variable wins over the file, as with AWS tools). No secrets here:
/// credentials come from the environment or a shared credentials file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    /// Endpoint URL (`FERRY_S3_ENDPOINT`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (`AWS_REGION`).
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style addressing (`FERRY_S3_PATH_STYLE`).
    #[serde(default)]
    pub path_style: Option<bool>,
    /// CA certificates (PEM) for the endpoint (`FERRY_S3_CA_FILE`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Retries of a failed request (`FERRY_S3_RETRIES`).
    #[serde(default)]
    pub retries: Option<usize>,
    /// Timeout of one request in seconds (`FERRY_S3_TIMEOUT_SECS`).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Requests in flight (`FERRY_S3_CONNECTIONS`, 1 to 256).
    #[serde(default)]
    pub connections: Option<usize>,
    /// Shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Profile in it (`AWS_PROFILE`).
    #[serde(default)]
    pub profile: Option<String>,
}

static SECTION: std::sync::RwLock<Option<S3Section>> = std::sync::RwLock::new(None);

/// Make `s` the defaults of [`S3Settings::from_env`] in this process (the
/// configuration file's `[s3]`; called when a configuration is loaded for a
/// command or an agent).
pub fn set_config_defaults(s: Option<S3Section>) {
    *SECTION.write().unwrap_or_else(|p| p.into_inner()) = s;
}

fn config_defaults() -> S3Section {
    SECTION
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default()
}

impl S3Settings {
    /// Settings for a custom endpoint (path-style) with static credentials.
    pub fn for_endpoint(endpoint: &str, region: &str, access_key_id: &str, secret: &str) -> Self {
        S3Settings {
            endpoint: Some(endpoint.to_string()),
            region: region.to_string(),
            path_style: true,
            access_key_id: Some(access_key_id.to_string()),
            secret_access_key: Some(Zeroizing::new(secret.to_string())),
            ..Default::default()
        }
    }

    /// Settings from the environment: `FERRY_S3_ENDPOINT` (or
    /// `AWS_ENDPOINT_URL`), `AWS_REGION` (or `AWS_DEFAULT_REGION`),
    /// `FERRY_S3_PATH_STYLE` (`true`/`false`), `FERRY_S3_CA_FILE`,
    /// `FERRY_S3_RETRIES`, `FERRY_S3_TIMEOUT_SECS`, and the credentials from
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, or
    /// else from the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`,
    /// default `~/.aws/credentials`, profile `AWS_PROFILE` or `default`).
    pub fn from_env() -> Result<S3Settings> {
        Self::from_layers(&env, &config_defaults())
    }

    /// Settings from `var` (the environment) over `file` (the configuration's
    /// `[s3]`) over the defaults.
    pub fn from_layers(
        var: &dyn Fn(&str) -> Option<String>,
        file: &S3Section,
    ) -> Result<S3Settings> {
        let mut s = S3Settings {
            endpoint: var("FERRY_S3_ENDPOINT")
                .or_else(|| var("AWS_ENDPOINT_URL"))
                .or_else(|| file.endpoint.clone()),
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .or_else(|| file.region.clone())
                .unwrap_or_else(|| "us-east-1".into()),
            ca_file: var("FERRY_S3_CA_FILE")
                .map(PathBuf::from)
                .or_else(|| file.ca_file.clone()),
            ..Default::default()
        };
        s.path_style = match var("FERRY_S3_PATH_STYLE").as_deref() {
            Some("true" | "1" | "yes") => true,
            Some("false" | "0" | "no") => false,
            Some(other) => {
                return Err(RepoError::Invalid(format!(
                    "FERRY_S3_PATH_STYLE={other}: use true or false"
                )))
            }
            None => file.path_style.unwrap_or(s.endpoint.is_some()),
        };
        if let Some(r) = var("FERRY_S3_RETRIES") {
            s.max_retries = r
                .parse()
                .map_err(|_| RepoError::Invalid(format!("FERRY_S3_RETRIES={r}: not a number")))?;
        } else if let Some(r) = file.retries {
            s.max_retries = r;
        }
        let connections = match var("FERRY_S3_CONNECTIONS") {
            Some(c) => Some((c.parse().ok(), format!("FERRY_S3_CONNECTIONS={c}"))),
            None => file
                .connections
                .map(|n| (Some(n), format!("[s3] connections = {n}"))),
        };
        if let Some((n, what)) = connections {
            s.connections = n
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| RepoError::Invalid(format!("{what}: a number from 1 to 256")))?;
        }
        if let Some(t) = var("FERRY_S3_TIMEOUT_SECS") {
            s.timeout = Duration::from_secs(t.parse().map_err(|_| {
                RepoError::Invalid(format!("FERRY_S3_TIMEOUT_SECS={t}: not a number"))
            })?);
        } else if let Some(t) = file.timeout_secs {
            s.timeout = Duration::from_secs(t);
        }
        if s.timeout.is_zero() {
            return Err(RepoError::Invalid(
                "the S3 request timeout must be at least 1 second".into(),
            ));
        }
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => {
                s.access_key_id = Some(id);
                s.secret_access_key = Some(Zeroizing::new(secret));
                s.session_token = var("AWS_SESSION_TOKEN").map(Zeroizing::new);
            }
            _ => {
                let credentials = var("AWS_SHARED_CREDENTIALS_FILE")
                    .map(PathBuf::from)
                    .or_else(|| file.credentials_file.clone())
                    .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
                let profile = var("AWS_PROFILE")
                    .or_else(|| file.profile.clone())
                    .unwrap_or_else(|| "default".into());
                if let Some(f) = credentials.filter(|f| f.exists()) {
                    let text = Zeroizing::new(
                        std::fs::read_to_string(&f).map_err(|e| RepoError::io(&f, e))?,
                    );
                    let c = credentials_profile(&text, &profile);
                    s.access_key_id = c.get("aws_access_key_id").map(|v| v.to_string());
                    s.secret_access_key = c
                        .get("aws_secret_access_key")
                        .map(|v| Zeroizing::new(v.to_string()));
                    s.session_token = c
                        .get("aws_session_token")
                        .map(|v| Zeroizing::new(v.to_string()));
                }
            }
        }
        Ok(s)
    }
}

/// The `key = value` pairs of `[profile]` in an AWS shared credentials file.
fn credentials_profile<'a>(
    text: &'a str,
    profile: &str,
) -> std::collections::HashMap<&'a str, &'a str> {
    let mut out = std::collections::HashMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == profile;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim(), v.trim());
            }
        }
    }
    out
}

/// Signs requests ferry makes or changes itself (object_store signs its own).
#[derive(Debug)]
struct Signer {
    cred: AwsCredential,
    region: String,
}

impl Signer {
    /// Sign `parts` + `body` (SigV4, payload hashed), replacing any signature.
    fn sign(&self, parts: &mut http::request::Parts, body: &Bytes) -> object_store::Result<()> {
        let digest = ring::digest::digest(&ring::digest::SHA256, body);
        parts.headers.remove(http::header::AUTHORIZATION);
        let mut req = HttpRequest::from_parts(parts.clone(), body.clone().into());
        AwsAuthorizer::new(&self.cred, "s3", &self.region)
            .try_authorize(&mut req, Some(digest.as_ref()))?;
        *parts = req.into_parts().0;
        Ok(())
    }
}

/// A request extension: object_store has no Object Lock option, so a PUT that
/// must carry a retention carries this, and ferry's HTTP seam turns it into
/// the lock headers (and the checksum S3 requires with them), then re-signs.
#[derive(Clone, Debug)]
struct LockHeaders {
    mode: &'static str,
    until: String,
}

/// object_store's HTTP seam, served by ferry's own client ([`super::s3_http`]:
/// hyper under ring-based rustls and the configured CA, quick-acking TCP)
/// rather than object_store's default client.
#[derive(Clone)]
struct FerryHttp {
    client: super::s3_http::Client,
    signer: Arc<Signer>,
    timeout: Duration,
}

impl std::fmt::Debug for FerryHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FerryHttp")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpConnector for FerryHttp {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.clone()))
    }
}

/// Add the Object Lock headers of `lock` to a request, with the SHA-256
/// checksum S3 demands alongside them.
fn add_lock_headers(parts: &mut http::request::Parts, body: &Bytes, lock: &LockHeaders) {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let h = &mut parts.headers;
    let val = |v: &str| http::HeaderValue::from_str(v).expect("ASCII header value");
    h.insert("x-amz-object-lock-mode", val(lock.mode));
    h.insert("x-amz-object-lock-retain-until-date", val(&lock.until));
    h.insert("x-amz-sdk-checksum-algorithm", val("SHA256"));
    h.insert(
        "x-amz-checksum-sha256",
        val(&base64::engine::general_purpose::STANDARD.encode(digest.as_ref())),
    );
}

#[async_trait::async_trait]
impl HttpService for FerryHttp {
    async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        use http_body_util::BodyExt;
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?
            .to_bytes();
        let mut parts = parts;
        if let Some(lock) = parts.extensions.get::<LockHeaders>().cloned() {
            add_lock_headers(&mut parts, &body, &lock);
            self.signer
                .sign(&mut parts, &body)
                .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        }
        parts.extensions = http::Extensions::new();
        // A create-only PUT that timed out may be sent again safely: the
        // replay gets 412 when the first one landed, and the caller reads the
        // object back (object_store retries timeouts only on requests it
        // deems idempotent).
        let create_only = parts
            .headers
            .get(http::header::IF_NONE_MATCH)
            .is_some_and(|v| v == "*");
        let req = http::Request::from_parts(parts, http_body_util::Full::new(body));
        super::s3_http::send(&self.client, req, self.timeout, create_only).await
    }
}

/// A repository in a bucket, under a key prefix. Cheap to clone.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

struct Inner {
    store: AmazonS3,
    rt: Option<tokio::runtime::Runtime>,
    bucket: String,
    prefix: String,
    endpoint: String,
    /// `endpoint/bucket` or `scheme://bucket.host`: where ferry's own
    /// requests (Object Lock) go.
    bucket_url: String,
    http: reqwest::Client,
    signer: Arc<Signer>,
    max_retries: usize,
    connections: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a runtime blocks; shutting it down in the background never
        // does, whatever thread the last clone is dropped on.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl S3Store {
    /// Connect to `bucket` (nothing is sent until the first request).
    pub fn connect(bucket: &str, prefix: &str, s: &S3Settings) -> Result<S3Store> {
        let invalid = |e: String| RepoError::Invalid(format!("S3 settings: {e}"));
        let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) else {
            return Err(RepoError::Invalid(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials (AWS_PROFILE)".into(),
            ));
        };
        let endpoint = s
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", s.region));
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(s.timeout)
            .pool_idle_timeout(Duration::from_secs(30));
        let tls = if endpoint.starts_with("https://") {
            let ca = s
                .ca_file
                .clone()
                .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
            crate::tls::client_config(&ca, None).map_err(|e| {
                invalid(format!(
                    "{e} (the CA bundle to trust for {endpoint}; set FERRY_S3_CA_FILE)"
                ))
            })?
        } else {
            // Plain http (test labs): no TLS is ever negotiated, but reqwest
            // wants a configuration; one that trusts nothing.
            Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(e.to_string()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
        };
        http = http.tls_backend_preconfigured((*tls).clone());
        let http = http.build().map_err(|e| invalid(e.to_string()))?;
        let objects_http = super::s3_http::client(tls, Duration::from_secs(10));
        let signer = Arc::new(Signer {
            cred: AwsCredential {
                key_id: id.clone(),
                secret_key: secret.to_string(),
                token: s.session_token.as_ref().map(|t| t.to_string()),
            },
            region: s.region.clone(),
        });
        let bucket_url = if s.path_style {
            format!("{}/{bucket}", endpoint.trim_end_matches('/'))
        } else {
            let (scheme, host) = endpoint.split_once("://").unwrap_or(("https", &endpoint));
            format!("{scheme}://{bucket}.{}", host.trim_end_matches('/'))
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&s.region)
            // With virtual hosts, object_store takes the bucket's own URL.
            .with_endpoint(if s.path_style { &endpoint } else { &bucket_url })
            .with_allow_http(endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(!s.path_style)
            .with_access_key_id(id)
            .with_secret_access_key(secret.as_str())
            .with_http_connector(FerryHttp {
                client: objects_http,
                signer: signer.clone(),
                timeout: s.timeout,
            })
            // Chunks authenticate themselves (AES-GCM) and TLS protects the
            // transfer: hashing every body for the signature would only cost
            // CPU. Requests that need a checksum (Object Lock) carry one.
            .with_unsigned_payload(true)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(15),
                    base: 2.0,
                },
                max_retries: s.max_retries,
                retry_timeout: Duration::from_secs(300),
            });
        if let Some(t) = &s.session_token {
            b = b.with_token(t.as_str());
        }
        let store = b.build().map_err(|e| invalid(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-s3")
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("cannot start the S3 client runtime: {e}")))?;
        Ok(S3Store {
            inner: Arc::new(Inner {
                store,
                rt: Some(rt),
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
                endpoint,
                bucket_url,
                http,
                signer,
                max_retries: s.max_retries,
                connections: s.connections,
            }),
        })
    }

    /// The object key in the bucket of repository key `key`.
    fn full_key(&self, key: &str) -> String {
        if self.inner.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.inner.prefix)
        }
    }

    /// A request ferry makes itself (the Object Lock calls object_store lacks):
    /// signed, retried with backoff on 5xx and network errors. `key` `None`:
    /// the bucket. Returns status, headers and body.
    fn raw(
        &self,
        method: http::Method,
        key: Option<&str>,
        query: &str,
        body: Vec<u8>,
    ) -> Result<(u16, http::HeaderMap, Bytes)> {
        let what = key
            .map(|k| self.url(k))
            .unwrap_or_else(|| format!("s3://{}", self.inner.bucket));
        let url = match key {
            Some(k) => format!("{}/{}?{query}", self.inner.bucket_url, self.full_key(k)),
            None => format!("{}?{query}", self.inner.bucket_url),
        };
        let url = url.trim_end_matches('?').to_string();
        let inner = self.inner.clone();
        let body = Bytes::from(body);
        let r = self.run(async move {
            let mut pause = Duration::from_millis(100);
            let mut attempt = 0;
            loop {
                let mut parts = http::Request::builder()
                    .method(method.clone())
                    .uri(&url)
                    .body(())
                    .map_err(|e| e.to_string())?
                    .into_parts()
                    .0;
                if !body.is_empty() {
                    use base64::Engine;
                    use md5::Digest;
                    let md5 = md5::Md5::digest(&body);
                    parts.headers.insert(
                        "content-md5",
                        http::HeaderValue::from_str(
                            &base64::engine::general_purpose::STANDARD.encode(md5),
                        )
                        .map_err(|e| e.to_string())?,
                    );
                }
                inner
                    .signer
                    .sign(&mut parts, &body)
                    .map_err(|e| e.to_string())?;
                let mut req = reqwest::Request::new(
                    parts.method,
                    reqwest::Url::parse(&url).map_err(|e| e.to_string())?,
                );
                *req.headers_mut() = parts.headers;
                *req.body_mut() = Some(body.clone().into());
                let res = inner.http.execute(req).await;
                let retry = match &res {
                    // 500, 502, 503 (SlowDown), 504; not 501 Not Implemented.
                    Ok(r) => matches!(r.status().as_u16(), 500 | 502 | 503 | 504),
                    Err(e) => !e.is_builder(),
                };
                if retry && attempt < inner.max_retries {
                    attempt += 1;
                    let jitter =
                        rand::Rng::gen_range(&mut rand::thread_rng(), 0..=pause.as_millis() as u64);
                    tokio::time::sleep(pause + Duration::from_millis(jitter)).await;
                    pause = (pause * 2).min(Duration::from_secs(15));
                    continue;
                }
                let r = res.map_err(|e| chain(&e))?;
                let status = r.status().as_u16();
                let headers = r.headers().clone();
                match r.bytes().await {
                    Ok(body) => return Ok::<_, String>((status, headers, body)),
                    // A body cut short: these requests are idempotent.
                    Err(_) if attempt < inner.max_retries => {
                        attempt += 1;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(15));
                    }
                    Err(e) => return Err(chain(&e)),
                }
            }
        });
        r.map_err(|detail| RepoError::Remote {
            object: what,
            detail,
        })
    }

    /// The S3 error code in an error response body (`<Code>...</Code>`).
    fn error_code(body: &[u8]) -> String {
        let t = String::from_utf8_lossy(body);
        t.split_once("<Code>")
            .and_then(|(_, r)| r.split_once("</Code>"))
            .map(|(c, _)| c.to_string())
            .unwrap_or_default()
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.inner.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.inner.prefix))
        }
    }

    fn url(&self, key: &str) -> String {
        if self.inner.prefix.is_empty() {
            format!("s3://{}/{key}", self.inner.bucket)
        } else {
            format!("s3://{}/{}/{key}", self.inner.bucket, self.inner.prefix)
        }
    }

    /// Run `f` on this store's runtime and wait for it, from any thread.
    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let rt = self
            .inner
            .rt
            .as_ref()
            .expect("runtime lives as long as the store");
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside some runtime (block_on would panic): hand the work over.
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            rt.spawn(async move {
                let _ = tx.send(f.await);
            });
            rx.recv().expect("the S3 runtime outlives its tasks")
        } else {
            rt.block_on(f)
        }
    }

    /// Run an idempotent operation (a listing), again after a failure that
    /// may pass (a body cut short, a reset, a 5xx that object_store's own
    /// retries did not absorb), up to the configured retries with backoff.
    /// object_store resumes object downloads itself but not listings.
    fn retrying<T, F, Fut>(&self, op: F) -> object_store::Result<T>
    where
        T: Send + 'static,
        F: Fn() -> Fut,
        Fut: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let mut pause = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            match self.run(op()) {
                Err(e) if attempt < self.inner.max_retries && transient(&e) => {
                    attempt += 1;
                    tracing::info!(error = %e, attempt, "S3 request failed; trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(15));
                }
                other => return other,
            }
        }
    }

    /// An error for `key`, with the cause spelled out when the store said it.
    fn err(&self, key: &str, e: object_store::Error) -> RepoError {
        remote_error(&self.url(key), &self.inner.bucket, &e)
    }

    /// A GET, sent again after a failure that may pass (object_store retries
    /// 5xx and resets itself, but not an error answer whose body was cut).
    fn get(&self, key: &str, range: Option<GetRange>) -> Result<Option<object_store::GetResult>> {
        let (store, path) = (self.inner.store.clone(), self.path(key));
        let r = self.retrying(|| {
            let (store, path, range) = (store.clone(), path.clone(), range.clone());
            async move {
                store
                    .get_opts(
                        &path,
                        GetOptions {
                            range,
                            ..Default::default()
                        },
                    )
                    .await
            }
        });
        match r {
            Ok(g) => Ok(Some(g)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn body(&self, key: &str, g: object_store::GetResult) -> Result<Bytes> {
        self.run(async move { g.bytes().await })
            .map_err(|e| self.err(key, e))
    }

    /// A PUT: `Ok(false)` when a create-only one finds the key taken.
    fn put(&self, key: &str, data: PutPayload, mode: PutMode) -> Result<bool> {
        self.put_opts(
            key,
            data,
            PutOptions {
                mode,
                ..Default::default()
            },
        )
    }

    fn put_opts(&self, key: &str, data: PutPayload, opts: PutOptions) -> Result<bool> {
        let (store, path) = (self.inner.store.clone(), self.path(key));
        let r = self.run(async move { store.put_opts(&path, data, opts).await });
        match r {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.err(key, e)),
        }
    }

    /// Upload a local file as `key` (create-only below the multipart size;
    /// larger ones in parts, which S3 cannot make conditional: callers give
    /// such files fresh names).
    fn upload_file(&self, key: &str, mut file: File, retention: Option<&Retention>) -> Result<()> {
        let local = |e| RepoError::io(std::env::temp_dir(), e);
        let len = file.seek(std::io::SeekFrom::End(0)).map_err(local)?;
        file.rewind().map_err(local)?;
        if len <= MULTIPART_ABOVE {
            let mut buf = Vec::with_capacity(len as usize);
            file.read_to_end(&mut buf).map_err(local)?;
            return self.create_once(key, buf, retention);
        }
        let (store, path) = (self.inner.store.clone(), self.path(key));
        // One task for the whole upload (the parts are read from a local file
        // on this store's own runtime, which nothing else waits on).
        let r = self.run(async move {
            let mut upload = store.put_multipart(&path).await.map_err(Err)?;
            let mut part = vec![0u8; PART_SIZE];
            let mut sent = 0u64;
            while sent < len {
                let n = ((len - sent) as usize).min(PART_SIZE);
                if let Err(e) = file.read_exact(&mut part[..n]) {
                    let _ = upload.abort().await;
                    return Err(Ok(e));
                }
                if let Err(e) = upload.put_part(PutPayload::from(part[..n].to_vec())).await {
                    let _ = upload.abort().await;
                    return Err(Err(e));
                }
                sent += n as u64;
            }
            upload.complete().await.map_err(Err)?;
            Ok(())
        });
        match r {
            // Parts carry no lock headers: the lock goes on once it is whole.
            Ok(()) => match retention {
                Some(r) => self.extend_retention(key, r),
                None => Ok(()),
            },
            Err(Ok(io)) => Err(local(io)),
            Err(Err(e)) => Err(self.err(key, e)),
        }
    }

    /// Create `key` with `data`, which must not exist, or exist with exactly
    /// these bytes: a PUT whose answer was lost (a reset) is retried, and the
    /// retry finds the first attempt's object (412). Anything else under the
    /// name is an error; nothing is replaced.
    fn create_once(&self, key: &str, data: Vec<u8>, retention: Option<&Retention>) -> Result<()> {
        let len = data.len() as u64;
        let payload = PutPayload::from(Bytes::from(data));
        let written = match retention {
            Some(r) => self.put_retained(key, payload.clone(), r)?,
            None => self.put(key, payload.clone(), PutMode::Create)?,
        };
        if written {
            return Ok(());
        }
        let ours: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
        match self.read(key, len) {
            Ok(Some(theirs)) if theirs == ours => {
                tracing::info!(object = %self.url(key), "already stored by an earlier attempt of this request");
                Ok(())
            }
            Ok(_) | Err(RepoError::Damaged { .. }) => Err(RepoError::Invalid(format!(
                "{} exists already with other content; refusing to replace it",
                self.url(key)
            ))),
            Err(e) => Err(e),
        }
    }

    /// A create-only PUT carrying a retention.
    fn put_retained(&self, key: &str, data: PutPayload, r: &Retention) -> Result<bool> {
        let mut ext = http::Extensions::new();
        ext.insert(LockHeaders {
            mode: r.mode.s3_name(),
            until: super::format_unix(r.until),
        });
        self.put_opts(
            key,
            data,
            PutOptions {
                mode: PutMode::Create,
                extensions: ext,
                ..Default::default()
            },
        )
    }
}

/// Whether a failed idempotent request may succeed when sent again: not a
/// refusal (credentials, permissions, a missing bucket or object).
fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    if matches!(
        e,
        E::NotFound { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotImplemented { .. }
    ) {
        return false;
    }
    let t = chain(e);
    ![
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "RequestTimeTooSkewed",
    ]
    .iter()
    .any(|c| t.contains(c))
}

/// An error and its causes, innermost last (reqwest keeps "timed out" or
/// "connection reset" in a source, not in the top message).
fn chain(e: &dyn std::error::Error) -> String {
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

/// An object-store failure as an operator can act on it.
fn remote_error(url: &str, bucket: &str, e: &object_store::Error) -> RepoError {
    let text = chain(e);
    let has = |s: &str| text.contains(s);
    let detail = if has("NoSuchBucket") {
        format!("the bucket {bucket} does not exist; create it (with object lock if points are to be immutable) or fix the repository location")
    } else if has("InvalidAccessKeyId")
        || has("SignatureDoesNotMatch")
        || matches!(e, object_store::Error::Unauthenticated { .. })
    {
        "the store refused the credentials (InvalidAccessKeyId / SignatureDoesNotMatch): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the credentials file profile)".to_string()
    } else if has("RequestTimeTooSkewed") {
        "this machine's clock is too far from the store's (RequestTimeTooSkewed): synchronise it (NTP) and retry".to_string()
    } else if has("AccessDenied") || matches!(e, object_store::Error::PermissionDenied { .. }) {
        "access denied: the credentials lack a permission this operation needs (see docs/operations.md for the bucket policy of agents and of prune)".to_string()
    } else {
        text.clone()
    };
    if detail != text {
        tracing::debug!(object = %url, error = %text, "object store error");
    }
    RepoError::Remote {
        object: url.to_string(),
        detail,
    }
}

impl Backend for S3Store {
    fn describe(&self) -> String {
        format!(
            "S3 bucket {}, prefix {:?}, at {}",
            self.inner.bucket, self.inner.prefix, self.inner.endpoint
        )
    }
    fn kind(&self) -> &'static str {
        "s3"
    }
    fn location(&self, key: &str) -> PathBuf {
        PathBuf::from(self.url(key))
    }

    fn is_empty(&self) -> Result<bool> {
        let (store, path) = (self.inner.store.clone(), self.path(""));
        let prefix = (!self.inner.prefix.is_empty()).then_some(path);
        let first = self.retrying(|| {
            let (store, prefix) = (store.clone(), prefix.clone());
            async move { store.list(prefix.as_ref()).next().await.transpose() }
        });
        match first {
            Ok(None) => Ok(true),
            Ok(Some(_)) => Ok(false),
            Err(e) => Err(self.err("", e)),
        }
    }

    fn prepare(&self) -> Result<()> {
        Ok(())
    }

    fn read(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>> {
        enum Got {
            Missing,
            TooLarge(u64),
            Body(Bytes),
        }
        // The GET and its body in one task (one hand-over between the
        // calling thread and the runtime per object, not two).
        let (store, path) = (self.inner.store.clone(), self.path(key));
        let got = self.retrying(|| {
            let (store, path) = (store.clone(), path.clone());
            async move {
                let g = match store.get_opts(&path, GetOptions::default()).await {
                    Err(object_store::Error::NotFound { .. }) => return Ok(Got::Missing),
                    r => r?,
                };
                if g.meta.size > max {
                    return Ok(Got::TooLarge(g.meta.size));
                }
                Ok(Got::Body(g.bytes().await?))
            }
        });
        match got.map_err(|e| self.err(key, e))? {
            Got::Missing => Ok(None),
            Got::TooLarge(len) => Err(RepoError::Damaged {
                path: self.location(key),
                source: crate::repo::format::FormatError::TooLarge {
                    what: "repository object",
                    len,
                    max,
                },
            }),
            // Without a copy when the body arrived as one buffer.
            Got::Body(b) => Ok(Some(Vec::from(b))),
        }
    }

    fn read_head(&self, key: &str, n: usize) -> Result<Option<(Vec<u8>, u64)>> {
        match self.get(key, Some(GetRange::Bounded(0..n as u64))) {
            Ok(Some(g)) => {
                let size = g.meta.size;
                let b = self.body(key, g)?;
                Ok(Some((b[..b.len().min(n)].to_vec(), size)))
            }
            Ok(None) => Ok(None),
            // An empty object has no byte 0 to range over.
            Err(e) => match self.get(key, None)? {
                Some(g) if g.meta.size == 0 => Ok(Some((Vec::new(), 0))),
                _ => Err(e),
            },
        }
    }

    fn open(&self, key: &str) -> Result<Option<(File, u64)>> {
        let Some(g) = self.get(key, None)? else {
            return Ok(None);
        };
        let size = g.meta.size;
        let local = |e| RepoError::io(std::env::temp_dir(), e);
        let mut f = tempfile::tempfile().map_err(local)?;
        let mut stream = g.into_stream();
        let mut got = 0u64;
        loop {
            let next = self.run(async move {
                let n = stream.next().await;
                (n, stream)
            });
            stream = next.1;
            match next.0 {
                None => break,
                Some(Ok(b)) => {
                    got += b.len() as u64;
                    f.write_all(&b).map_err(local)?;
                }
                Some(Err(e)) => return Err(self.err(key, e)),
            }
        }
        if got != size {
            return Err(RepoError::Remote {
                object: self.url(key),
                detail: format!("download ended after {got} of {size} bytes"),
            });
        }
        f.rewind().map_err(local)?;
        Ok(Some((f, size)))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let (store, path) = (self.inner.store.clone(), self.path(key));
        match self.run(async move { store.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn create(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.put(key, PutPayload::from(data.to_vec()), PutMode::Create)
    }

    fn replace(&self, key: &str, data: &[u8]) -> Result<()> {
        self.put(key, PutPayload::from(data.to_vec()), PutMode::Overwrite)
            .map(|_| ())
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        if self.exists(to)? {
            return Err(RepoError::Invalid(format!(
                "{} exists already; refusing to replace it",
                self.url(to)
            )));
        }
        let (store, a, b) = (self.inner.store.clone(), self.path(from), self.path(to));
        self.run(async move { store.copy(&a, &b).await })
            .map_err(|e| self.err(from, e))?;
        self.delete(from)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let (store, path) = (self.inner.store.clone(), self.path(key));
        match self.run(async move { store.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let (store, path) = (
            self.inner.store.clone(),
            self.path(prefix.trim_end_matches('/')),
        );
        let strip = if self.inner.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.inner.prefix)
        };
        let metas = self.retrying(|| {
            let (store, path) = (store.clone(), path.clone());
            async move {
                let mut out = Vec::new();
                let mut s = store.list(Some(&path));
                while let Some(m) = s.next().await {
                    out.push(m?);
                }
                Ok::<_, object_store::Error>(out)
            }
        });
        let metas = metas.map_err(|e| self.err(prefix, e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let key = m
                    .location
                    .as_ref()
                    .strip_prefix(strip.as_str())?
                    .to_string();
                Some(ObjectInfo {
                    key,
                    size: m.size,
                    modified: Some(m.last_modified.timestamp()),
                })
            })
            .collect())
    }

    fn sync(&self) -> Result<()> {
        // A PUT is acknowledged only once the object is durable.
        Ok(())
    }

    fn min_workers(&self) -> usize {
        self.inner.connections
    }

    fn check_object_lock(&self) -> Result<()> {
        let (status, _, body) = self.raw(http::Method::GET, None, "object-lock=", Vec::new())?;
        let text = String::from_utf8_lossy(&body);
        if status == 200 && text.contains("<ObjectLockEnabled>Enabled</ObjectLockEnabled>") {
            return Ok(());
        }
        let code = Self::error_code(&body);
        let why = match (status, code.as_str()) {
            (200, _) | (404, "ObjectLockConfigurationNotFoundError") => {
                "Object Lock is not enabled on it".to_string()
            }
            (404, "NoSuchBucket") => "it does not exist".to_string(),
            (403, _) => {
                format!("the credentials may not read its Object Lock configuration ({code})")
            }
            (501, _) => "this S3 server does not implement Object Lock".to_string(),
            _ => format!("its Object Lock configuration could not be read (HTTP {status} {code})"),
        };
        Err(RepoError::Invalid(format!(
            "immutable restore points need Object Lock, but bucket {}: {why}. Create a bucket with Object Lock enabled (most stores allow it only at creation) or back up without --immutable-days",
            self.inner.bucket
        )))
    }

    fn create_retained(&self, key: &str, data: &[u8], r: &Retention) -> Result<bool> {
        self.put_retained(key, PutPayload::from(data.to_vec()), r)
    }

    fn extend_retention(&self, key: &str, r: &Retention) -> Result<()> {
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
            r.mode.s3_name(),
            super::format_unix(r.until)
        );
        let (status, _, resp) = self.raw(
            http::Method::PUT,
            Some(key),
            "retention=",
            body.into_bytes(),
        )?;
        if status / 100 == 2 {
            return Ok(());
        }
        // Never shortened: an object already retained longer (in compliance
        // mode S3 refuses the shorter date) is what was wanted.
        if let Some(have) = self.retention(key)? {
            if have.until >= r.until {
                return Ok(());
            }
        }
        Err(RepoError::Remote {
            object: self.url(key),
            detail: format!(
                "could not set its retention until {} (HTTP {status} {})",
                super::format_unix(r.until),
                Self::error_code(&resp)
            ),
        })
    }

    fn retention(&self, key: &str) -> Result<Option<Retention>> {
        let (status, headers, _) = self.raw(http::Method::HEAD, Some(key), "", Vec::new())?;
        if status == 404 {
            return Ok(None);
        }
        if status / 100 != 2 {
            return Err(RepoError::Remote {
                object: self.url(key),
                detail: format!("HEAD answered HTTP {status}"),
            });
        }
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let (Some(mode), Some(until)) = (
            h("x-amz-object-lock-mode"),
            h("x-amz-object-lock-retain-until-date"),
        ) else {
            return Ok(None);
        };
        let mode = mode.parse().map_err(|e: String| RepoError::Remote {
            object: self.url(key),
            detail: e,
        })?;
        let until =
            time::OffsetDateTime::parse(until, &time::format_description::well_known::Rfc3339)
                .map_err(|e| RepoError::Remote {
                    object: self.url(key),
                    detail: format!("retention date {until:?}: {e}"),
                })?
                .unix_timestamp();
        Ok(Some(Retention { mode, until }))
    }

    fn lock(
        &self,
        name: &str,
        mode: LockMode,
        operation: &str,
        wait: Duration,
    ) -> Result<RepoLock> {
        super::object_lock::acquire(Arc::new(self.clone()), name, mode, operation, wait)
    }

    fn stage_point(
        &self,
        id: &str,
        retention: Option<Retention>,
    ) -> Result<Box<dyn PointStage + '_>> {
        Ok(Box::new(S3Stage {
            store: self,
            id: id.to_string(),
            retention,
            written: Vec::new(),
            committed: false,
        }))
    }

    fn remove_point(&self, id: &str) -> Result<()> {
        self.delete(&super::point_key(id, "manifest"))?;
        for o in self.list(&format!("points/{id}/"))? {
            self.delete(&o.key)?;
        }
        Ok(())
    }

    fn collect_debris(&self) -> Result<()> {
        let all = self.list("points/")?;
        let live: std::collections::HashSet<String> =
            super::committed_points(&all).into_iter().collect();
        for o in &all {
            let id = o
                .key
                .strip_prefix("points/")
                .and_then(|r| r.split_once('/'))
                .map(|(id, _)| id);
            if id.is_some_and(|id| !live.contains(id)) {
                tracing::info!(object = %self.url(&o.key), "removing a file of a point that was never committed");
                self.delete(&o.key)?;
            }
        }
        Ok(())
    }
}

/// A point being uploaded: indexes first, the manifest last.
struct S3Stage<'a> {
    store: &'a S3Store,
    id: String,
    retention: Option<Retention>,
    written: Vec<String>,
    committed: bool,
}

impl PointStage for S3Stage<'_> {
    fn create_file(&mut self, _name: &str) -> Result<File> {
        tempfile::tempfile().map_err(|e| RepoError::io(std::env::temp_dir(), e))
    }

    fn finish_file(&mut self, name: &str, file: File) -> Result<()> {
        let key = super::point_key(&self.id, name);
        self.written.push(key.clone());
        self.store.upload_file(&key, file, self.retention.as_ref())
    }

    fn commit(mut self: Box<Self>, manifest: &[u8]) -> Result<()> {
        // From the manifest PUT on, the point may exist whatever the answer
        // (a lost response): its files stay; prune collects them if it
        // does not.
        self.committed = true;
        let key = super::point_key(&self.id, "manifest");
        self.store
            .create_once(&key, manifest.to_vec(), self.retention.as_ref())
    }
}

impl Drop for S3Stage<'_> {
    fn drop(&mut self) {
        if !self.committed {
            for k in &self.written {
                let _ = self.store.delete(k);
            }
        }
    }
}

/// Test access to private parsers.
#[cfg(test)]
pub(crate) mod tests_support {
    /// [`super::credentials_profile`] as an owned map.
    pub fn profile(text: &str, name: &str) -> std::collections::HashMap<String, String> {
        super::credentials_profile(text, name)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_name_cause_and_fix() {
        let generic = |body: &str| object_store::Error::Generic {
            store: "S3",
            source: body.to_string().into(),
        };
        let say = |body: &str| remote_error("s3://b/p/config", "b", &generic(body)).to_string();
        let skew = say("Client error with status 403 Forbidden: <Error><Code>RequestTimeTooSkewed</Code></Error>");
        assert!(skew.contains("clock") && skew.contains("NTP"), "{skew}");
        let bucket = say("<Error><Code>NoSuchBucket</Code></Error>");
        assert!(bucket.contains("bucket b does not exist"), "{bucket}");
        let creds = say("<Error><Code>InvalidAccessKeyId</Code></Error>");
        assert!(creds.contains("AWS_ACCESS_KEY_ID"), "{creds}");
        let denied = say("<Error><Code>AccessDenied</Code></Error>");
        assert!(denied.contains("bucket policy"), "{denied}");
        let other = say("something else");
        assert!(
            other.starts_with("s3://b/p/config: ") && other.contains("something else"),
            "{other}"
        );
    }

    #[test]
    fn environment_over_config_section_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n[backup]\naws_access_key_id = B\naws_secret_access_key = BS\n",
        )
        .unwrap();
        let file = S3Section {
            endpoint: Some("https://file.example".into()),
            region: Some("eu-1".into()),
            path_style: Some(false),
            ca_file: Some("/etc/file-ca.pem".into()),
            retries: Some(3),
            timeout_secs: Some(9),
            connections: Some(16),
            credentials_file: Some(creds.clone()),
            profile: Some("backup".into()),
        };
        let none = |_: &str| None;
        let s = S3Settings::from_layers(&none, &file).unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("https://file.example"));
        assert_eq!(
            (s.region.as_str(), s.path_style, s.max_retries),
            ("eu-1", false, 3)
        );
        assert_eq!((s.timeout, s.connections), (Duration::from_secs(9), 16));
        assert_eq!(s.access_key_id.as_deref(), Some("B"), "the file's profile");
        assert_eq!(
            s.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/file-ca.pem"))
        );
        let vars = |k: &str| match k {
            "FERRY_S3_ENDPOINT" => Some("http://env:9000".to_string()),
            "AWS_REGION" => Some("env-2".into()),
            "FERRY_S3_CONNECTIONS" => Some("4".into()),
            "AWS_PROFILE" => Some("default".into()),
            _ => None,
        };
        let s = S3Settings::from_layers(&vars, &file).unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://env:9000"));
        assert_eq!((s.region.as_str(), s.connections), ("env-2", 4));
        assert!(
            !s.path_style,
            "the file's path_style stands when the environment says nothing"
        );
        assert_eq!(s.access_key_id.as_deref(), Some("D"), "AWS_PROFILE wins");
        let d = S3Settings::from_layers(&none, &S3Section::default()).unwrap();
        assert_eq!(
            (d.endpoint, d.region.as_str(), d.connections),
            (None, "us-east-1", 8)
        );
        let bad = S3Section {
            connections: Some(0),
            ..Default::default()
        };
        let e = S3Settings::from_layers(&none, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[s3] connections = 0"), "{e}");
    }

    #[test]
    fn credentials_file_profiles() {
        let text = "# comment\n[default]\naws_access_key_id = A\naws_secret_access_key=B\n\n[other]\naws_access_key_id = C\n";
        let d = credentials_profile(text, "default");
        assert_eq!(d.get("aws_access_key_id"), Some(&"A"));
        assert_eq!(d.get("aws_secret_access_key"), Some(&"B"));
        let o = credentials_profile(text, "other");
        assert_eq!(o.get("aws_access_key_id"), Some(&"C"));
        assert!(!o.contains_key("aws_secret_access_key"));
        assert!(credentials_profile(text, "none").is_empty());
    }
}
