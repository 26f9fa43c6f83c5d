//! HTTP layer of the agent: routes, bearer-token check, request extractors that
//! turn every rejection into a JSON error, and the handlers (each documented for
//! the OpenAPI document with `#[utoipa::path]`).
//!
//! Must not: run jobs (the job manager does) or know the runner.

use super::api::*;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::jobs::{db, plan_of, Admission, Jobs};
use super::runner::{
    BackupSpec, FilesQuery, JobSpec, RestoreSpec, RestoreTarget, RunError, VerifySpec,
};
use super::{metrics, Settings};
use crate::state::{JobFilter, JobKind, KeyObservation, StateStore};
use crate::transport::select;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Shared by every handler.
pub(crate) struct AppState {
    pub jobs: Arc<Jobs>,
    pub store: Arc<StateStore>,
    pub settings: Arc<Settings>,
    pub runner: Arc<dyn super::JobRunner>,
    pub token_digest: [u8; 32],
    pub openapi_json: String,
}

type S = State<Arc<AppState>>;

/// The router with every route, the auth middleware and JSON fallbacks.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/info", get(info))
        .route("/v1/backups", post(post_backup))
        .route("/v1/restores", post(post_restore))
        .route("/v1/verifies", post(post_verify))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/keys/sync", post(keys_sync))
        .route("/v1/keys/check", post(keys_check))
        .route("/v1/repositories", get(repositories))
        .route("/v1/files/list", post(files_list))
        .route("/v1/files/find", post(files_find))
        .route("/metrics", get(get_metrics))
        .route("/v1/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

// ---- auth ---------------------------------------------------------------------

/// SHA-256 of a token: comparing digests in constant time hides the token's
/// length and content from timing.
pub(crate) fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Check `Authorization: Bearer <token>`.
pub(crate) fn check_bearer(headers: &HeaderMap, expected: &[u8; 32]) -> Result<(), ApiError> {
    let unauthorized = |m: &str| ApiError::new(ErrorCode::Unauthorized, m);
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "missing Authorization header: send 'Authorization: Bearer <token>' with the token from the agent's token_file",
        ));
    };
    let v = v
        .to_str()
        .map_err(|_| unauthorized("Authorization header is not ASCII"))?;
    let (scheme, token) = v.split_once(' ').unwrap_or((v, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized(
            "Authorization must use the Bearer scheme: 'Authorization: Bearer <token>'",
        ));
    }
    if !constant_time_eq(&token_digest(token.trim()), expected) {
        return Err(unauthorized(
            "wrong bearer token (compare with the agent's token_file)",
        ));
    }
    Ok(())
}

async fn auth(State(s): S, req: Request, next: Next) -> Response {
    if req.uri().path() == "/v1/health" {
        return next.run(req).await;
    }
    match check_bearer(req.headers(), &s.token_digest) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            tracing::debug!(path = %req.uri().path(), error = %e, "request refused");
            // Read (and drop) the body first, as for oversized bodies, so the
            // client gets its 401 instead of a connection reset mid-upload.
            let _ = read_body(req).await;
            e.into_response()
        }
    }
}

// ---- extractors -----------------------------------------------------------------

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn parse_body<T: DeserializeOwned + Validate>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the body as JSON with 'Content-Type: application/json'",
        ));
    }
    let raw: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("body is not JSON: {e}")))?;
    // Every request body is an object; serde would also build a struct from an
    // array of its fields, which the schema does not allow.
    if !raw.is_object() {
        return Err(ApiError::invalid("body must be a JSON object"));
    }
    let v: T = serde_json::from_value(raw)
        .map_err(|e| ApiError::invalid(format!("body is not a valid request: {e}")))?;
    v.validate()?;
    Ok(v)
}

/// Most bytes read (and discarded) from an oversized body before answering 413,
/// so that ordinary clients get the answer instead of a reset connection.
const DRAIN_MAX: usize = 16 * BODY_LIMIT;

async fn read_body(req: Request) -> Result<(Parts, Bytes), ApiError> {
    use axum::body::HttpBody;
    let (parts, mut body) = req.into_parts();
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0usize;
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(e)) => {
                return Err(ApiError::invalid(format!(
                    "cannot read the request body: {e}"
                )));
            }
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    total = total.saturating_add(data.len());
                    if total <= BODY_LIMIT {
                        buf.extend_from_slice(&data);
                    } else if total > DRAIN_MAX {
                        break;
                    }
                }
            }
        }
    }
    if total > BODY_LIMIT {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body larger than {BODY_LIMIT} bytes"),
        ));
    }
    Ok((parts, Bytes::from(buf)))
}

/// A JSON body, validated; any rejection is a JSON error.
pub(crate) struct ApiJson<T>(pub T);

impl<T, St> FromRequest<St> for ApiJson<T>
where
    T: DeserializeOwned + Validate,
    St: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request(req: Request, _state: &St) -> Result<Self, ApiError> {
        let (parts, bytes) = read_body(req).await?;
        parse_body(&parts.headers, &bytes).map(ApiJson)
    }
}

/// An optional JSON body: an empty body means `T::default()`.
pub(crate) struct OptionalJson<T>(pub T);

impl<T, St> FromRequest<St> for OptionalJson<T>
where
    T: DeserializeOwned + Validate + Default,
    St: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request(req: Request, _state: &St) -> Result<Self, ApiError> {
        let (parts, bytes) = read_body(req).await?;
        // No body, or a JSON `null`, means "no options".
        if bytes.is_empty() || (is_json(&parts.headers) && bytes.trim_ascii() == b"null".as_slice())
        {
            return Ok(OptionalJson(T::default()));
        }
        parse_body(&parts.headers, &bytes).map(OptionalJson)
    }
}

/// A query string, validated.
pub(crate) struct ApiQuery<T>(pub T);

impl<T, St> FromRequestParts<St> for ApiQuery<T>
where
    T: DeserializeOwned + Validate,
    St: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _state: &St) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        let v: T = serde_urlencoded_from_str(q)?;
        v.validate()?;
        Ok(ApiQuery(v))
    }
}

fn serde_urlencoded_from_str<T: DeserializeOwned>(q: &str) -> Result<T, ApiError> {
    let uri: Uri = format!("/?{q}")
        .parse()
        .map_err(|_| ApiError::invalid("query string is not valid"))?;
    axum::extract::Query::<T>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))
}

/// The `{id}` path segment.
pub(crate) struct JobId(pub String);

impl<St: Send + Sync> FromRequestParts<St> for JobId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| JobId(p.0))
            .map_err(|e| ApiError::invalid(format!("job id: {}", e.body_text())))
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no such endpoint {}; see GET /v1/openapi.json", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{method} is not allowed on {}; see the Allow header",
            uri.path()
        ),
    )
}

// ---- handlers ------------------------------------------------------------------

/// Liveness check.
///
/// The only endpoint that needs no token.
#[utoipa::path(get, path = "/v1/health", tag = "agent", security(()),
    responses((status = 200, description = "The agent is up.", body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

pub(crate) fn info_of(s: &AppState) -> Info {
    let (total, used) = s.jobs.slots();
    let st = &s.settings;
    Info {
        id: st.id.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        is_vm: st.is_vm,
        host: st.host.clone(),
        key_provider: st.key_provider.clone(),
        datastores: st.datastores.clone(),
        reachable_hosts: st.reachable_hosts.clone(),
        modes: st.modes.clone(),
        data_path: st.data_path.clone(),
        slots: Slots {
            total,
            used,
            free: total.saturating_sub(used),
        },
        tenants: st
            .tenants
            .iter()
            .map(|t| TenantView {
                name: t.name.clone(),
                key_provider: t.key_provider.clone(),
                key_source: if t.kms.is_some() {
                    KeySourceKind::Kms
                } else {
                    KeySourceKind::Pem
                },
                kms: t.kms.as_ref().map(|k| KmsView {
                    address: k.address.clone(),
                    key_name: k.key_name.clone(),
                }),
            })
            .collect(),
        policy: PolicySpec::from(&st.policy),
    }
}

/// Describe this proxy.
///
/// Id, the key provider its VM is encrypted under, tenants and KMSes served (names
/// and addresses only, never credentials or key material), modes, slots. The
/// orchestrator feeds this to the transport selector.
#[utoipa::path(get, path = "/v1/info", tag = "agent",
    responses(
        (status = 200, description = "Agent description.", body = Info),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
    ))]
pub(crate) async fn info(State(s): S) -> Json<Info> {
    Json(info_of(&s))
}

fn tenant_or_422<'a>(
    s: &'a AppState,
    name: &str,
) -> Result<&'a crate::config::TenantSection, ApiError> {
    s.settings
        .tenants
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| {
            let served: Vec<&str> = s.settings.tenants.iter().map(|t| t.name.as_str()).collect();
            ApiError::new(
                ErrorCode::UnknownTenant,
                format!(
                    "agent {} does not serve tenant {name:?} (it serves: {})",
                    s.settings.id,
                    if served.is_empty() {
                        "none".to_string()
                    } else {
                        served.join(", ")
                    }
                ),
            )
        })
}

/// Where a restore through the API may write for `tenant`: the resolved
/// `requested` path when it lies at or under one of the tenant's
/// `restore_dirs`, else `restore_path_not_allowed` naming them.
async fn allowed_restore_path(
    s: &AppState,
    tenant: &crate::config::TenantSection,
    requested: &str,
) -> Result<std::path::PathBuf, ApiError> {
    use super::restore_path::{check, PathRefusal};
    let allowed = tenant.restore_dirs.clone();
    let path = std::path::PathBuf::from(requested);
    // Resolving touches the file system (a slow mount must not hold a runtime
    // thread).
    let result = {
        let (path, allowed) = (path.clone(), allowed.clone());
        tokio::task::spawn_blocking(move || check(&path, &allowed))
            .await
            .map_err(ApiError::internal)?
    };
    let refusal = match result {
        Ok(resolved) => return Ok(resolved),
        Err(r) => r,
    };
    let message = match &refusal {
        PathRefusal::NoneConfigured => format!(
            "agent {} refuses restores to a directory or files for tenant {:?}: the tenant has no restore_dirs in its [[tenant]] section of the agent's configuration (restore_dirs = [\"/srv/ferry/restores/{}\"] allows that directory and below)",
            s.settings.id, tenant.name, tenant.name
        ),
        r => format!(
            "agent {} does not restore to {} for tenant {:?}: {r}; the tenant's restore_dirs allow only: {}",
            s.settings.id,
            path.display(),
            tenant.name,
            allowed
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    tracing::warn!(tenant = %tenant.name, path = %path.display(), reason = %refusal, "restore path refused");
    Err(ApiError::new(ErrorCode::RestorePathNotAllowed, message))
}

fn accepted(s: &AppState, rec: &crate::state::JobRecord) -> Response {
    let mut r = (StatusCode::ACCEPTED, Json(s.jobs.view(rec))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", rec.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Back up one VM through this proxy.
///
/// The agent runs the transport selector with
/// itself as the only candidate before accepting: a VM it cannot serve (for
/// example encrypted under another key provider with network failover off) is
/// refused here, before any snapshot, with every reason.
#[utoipa::path(post, path = "/v1/backups", tag = "jobs", request_body = BackupRequest,
    responses(
        (status = 202, description = "Accepted; poll the job.", body = Job,
            headers(("Location" = String, description = "/v1/jobs/{id} of the new job")),
            links(
                ("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")), description = "Poll the new job.")),
                ("CancelJob" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/id")), description = "Cancel the new job.")),
            )),
        (status = 400, description = "Malformed or invalid body.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
        (status = 415, description = "Body is not JSON.", body = ErrorBody),
        (status = 422, description = "unknown_tenant, vm_refused or exceeds_slots.", body = ErrorBody),
        (status = 429, description = "no_free_slots.", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 503, description = "shutting_down.", body = ErrorBody),
    ))]
pub(crate) async fn post_backup(
    State(s): S,
    ApiJson(req): ApiJson<BackupRequest>,
) -> Result<Response, ApiError> {
    tenant_or_422(&s, &req.tenant)?;
    let vm = req.vm.to_vm_info();
    let policy = req
        .policy
        .as_ref()
        .map(select::Policy::from)
        .unwrap_or_else(|| s.settings.policy.clone());
    let needed = vm.disks.len() as u32;
    // Capability only: slots are checked when they are reserved.
    let me = s.jobs.proxy_info(needed.max(1));
    let selection = select::select(&vm, std::slice::from_ref(&me), &policy);
    if !selection.is_runnable() {
        let summary = selection
            .refusal_summary()
            .unwrap_or_else(|| "refused".into());
        return Err(ApiError::new(
            ErrorCode::VmRefused,
            format!("agent {} cannot back up this VM: {summary}", s.settings.id),
        ));
    }
    let spec = BackupSpec {
        tenant: req.tenant.clone(),
        vm,
        folder: req.vm.folder.clone(),
        policy,
        selection,
        retention: req.retention.as_ref().map(RetentionSpec::to_policy),
        full: req.full,
        placement: req.placement.unwrap_or_default(),
        quiesce: req.quiesce.unwrap_or_default(),
    };
    let plan = plan_of(&spec.selection, &spec.placed());
    let spec = JobSpec::Backup(Box::new(spec));
    let rec = s
        .jobs
        .submit(Admission {
            kind: JobKind::Backup,
            tenant: req.tenant,
            subject: req.vm.name,
            spec,
            plan,
            slots: needed.max(1),
        })
        .await?;
    Ok(accepted(&s, &rec))
}

/// Restore a point through this proxy.
///
/// Takes one slot per disk named, one when all disks are restored. A
/// `directory` or `files` target must resolve (symlinks followed) to a
/// directory at or under one of the tenant's `restore_dirs` in the agent's
/// configuration; anything else, and every such target of a tenant without
/// `restore_dirs`, is refused with `restore_path_not_allowed` before a job
/// exists. The job writes to the resolved path.
#[utoipa::path(post, path = "/v1/restores", tag = "jobs", request_body = RestoreRequest,
    responses(
        (status = 202, description = "Accepted; poll the job.", body = Job,
            headers(("Location" = String, description = "/v1/jobs/{id} of the new job")),
            links(
                ("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")), description = "Poll the new job.")),
                ("CancelJob" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/id")), description = "Cancel the new job.")),
            )),
        (status = 400, description = "Malformed or invalid body.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 403, description = "restore_path_not_allowed: the target path is outside the tenant's `restore_dirs`.", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
        (status = 415, description = "Body is not JSON.", body = ErrorBody),
        (status = 422, description = "unknown_tenant or exceeds_slots.", body = ErrorBody),
        (status = 429, description = "no_free_slots.", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 503, description = "shutting_down.", body = ErrorBody),
    ))]
pub(crate) async fn post_restore(
    State(s): S,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> Result<Response, ApiError> {
    let tenant = tenant_or_422(&s, &req.tenant)?;
    let slots = req.disks.as_ref().map(|d| d.len() as u32).unwrap_or(1);
    let target = match &req.target {
        RestoreTargetSpec::Directory { path } => RestoreTarget::Directory {
            path: allowed_restore_path(&s, tenant, path).await?,
        },
        RestoreTargetSpec::Files {
            path,
            disk,
            partition,
            paths,
        } => RestoreTarget::Files {
            path: allowed_restore_path(&s, tenant, path).await?,
            disk: *disk,
            partition: *partition,
            paths: paths.clone(),
        },
        RestoreTargetSpec::Vm {
            moref,
            datastore,
            storage_policy,
            overwrite,
        } => RestoreTarget::Vm {
            moref: moref.clone(),
            datastore: datastore.clone(),
            storage_policy: storage_policy.clone(),
            overwrite: *overwrite,
        },
    };
    let spec = JobSpec::Restore(RestoreSpec {
        tenant: req.tenant.clone(),
        point: req.point.clone(),
        disks: req.disks.clone(),
        target,
    });
    let rec = s
        .jobs
        .submit(Admission {
            kind: JobKind::Restore,
            tenant: req.tenant,
            subject: req.point,
            spec,
            plan: Vec::new(),
            slots,
        })
        .await?;
    Ok(accepted(&s, &rec))
}

/// Verify the tenant's repository, or one restore point in it.
///
/// Takes one slot. The job reads every point's manifest and indexes (or the
/// one point's) and, with `read_data` (the default), every chunk they
/// reference, authenticating each against its id, with the tenant's key
/// source; it changes nothing. Its notes say what was checked (points,
/// chunks, bytes read). Damage found fails the job with `repository_error`,
/// naming the first problems; a point or the repository that does not exist
/// fails it with `not_found`, an unusable key with `key_error`.
#[utoipa::path(post, path = "/v1/verifies", tag = "jobs", request_body = VerifyRequest,
    responses(
        (status = 202, description = "Accepted; poll the job.", body = Job,
            headers(("Location" = String, description = "/v1/jobs/{id} of the new job")),
            links(
                ("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")), description = "Poll the new job.")),
                ("CancelJob" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/id")), description = "Cancel the new job.")),
            )),
        (status = 400, description = "Malformed or invalid body.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
        (status = 415, description = "Body is not JSON.", body = ErrorBody),
        (status = 422, description = "unknown_tenant or exceeds_slots.", body = ErrorBody),
        (status = 429, description = "no_free_slots.", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 503, description = "shutting_down.", body = ErrorBody),
    ))]
pub(crate) async fn post_verify(
    State(s): S,
    ApiJson(req): ApiJson<VerifyRequest>,
) -> Result<Response, ApiError> {
    tenant_or_422(&s, &req.tenant)?;
    let subject = req
        .point
        .clone()
        .unwrap_or_else(|| "repository".to_string());
    let spec = JobSpec::Verify(VerifySpec {
        tenant: req.tenant.clone(),
        point: req.point,
        read_data: req.read_data,
    });
    let rec = s
        .jobs
        .submit(Admission {
            kind: JobKind::Verify,
            tenant: req.tenant,
            subject,
            spec,
            plan: Vec::new(),
            slots: 1,
        })
        .await?;
    Ok(accepted(&s, &rec))
}

/// List one directory of a restore point's disk.
///
/// Reads the partition table and the file system (ext2/3/4, NTFS, FAT) of the
/// disk and fetches only the chunks the listing needs. Synchronous; no job. At
/// most 10000 entries (`truncated` says when a directory holds more; `find`
/// with a pattern narrows it).
#[utoipa::path(post, path = "/v1/files/list", tag = "files",
    request_body = FilesListRequest,
    responses(
        (status = 200, description = "The directory's entries (or the one file).", body = FilesResponse),
        (status = 400, description = "Malformed or invalid body.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 404, description = "file_not_found.", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
        (status = 415, description = "Body is not JSON.", body = ErrorBody),
        (status = 422, description = "unknown_tenant or files_unreadable.", body = ErrorBody),
    ))]
pub(crate) async fn files_list(
    State(s): S,
    ApiJson(req): ApiJson<FilesListRequest>,
) -> Result<Json<FilesResponse>, ApiError> {
    let tenant = tenant_or_422(&s, &req.tenant)?.clone();
    let query = FilesQuery {
        point: req.point,
        disk: req.disk,
        partition: req.partition,
        path: req.path,
        pattern: None,
        limit: FIND_LIMIT_MAX as usize,
    };
    browse(&s, tenant, query).await
}

/// Find files and directories on a restore point's disk by name pattern.
#[utoipa::path(post, path = "/v1/files/find", tag = "files",
    request_body = FilesFindRequest,
    responses(
        (status = 200, description = "Matches, in tree order (parents first).", body = FilesResponse),
        (status = 400, description = "Malformed or invalid body.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 404, description = "file_not_found.", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
        (status = 415, description = "Body is not JSON.", body = ErrorBody),
        (status = 422, description = "unknown_tenant or files_unreadable.", body = ErrorBody),
    ))]
pub(crate) async fn files_find(
    State(s): S,
    ApiJson(req): ApiJson<FilesFindRequest>,
) -> Result<Json<FilesResponse>, ApiError> {
    let tenant = tenant_or_422(&s, &req.tenant)?.clone();
    let query = FilesQuery {
        point: req.point,
        disk: req.disk,
        partition: req.partition,
        path: req.under,
        pattern: Some(req.pattern),
        limit: req.limit.unwrap_or(1000) as usize,
    };
    browse(&s, tenant, query).await
}

async fn browse(
    s: &AppState,
    tenant: crate::config::TenantSection,
    query: FilesQuery,
) -> Result<Json<FilesResponse>, ApiError> {
    let runner = s.runner.clone();
    let disk = query.disk;
    let answer = tokio::task::spawn_blocking(move || runner.browse_files(&tenant, &query))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("file browsing crashed: {e}")))?
        .map_err(|e| match e {
            RunError::NotFound(m) => ApiError::new(ErrorCode::FileNotFound, m),
            other => ApiError::new(ErrorCode::FilesUnreadable, other.to_string()),
        })?;
    Ok(Json(FilesResponse {
        point: answer.point_id,
        disk,
        volume: answer.volume,
        volumes: answer.volumes,
        entries: answer.entries,
        truncated: answer.truncated,
        errors: answer.errors,
        chunks_read: answer.chunks_read,
    }))
}

/// List jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(JobsQuery),
    responses(
        (status = 200, description = "Jobs.", body = JobList),
        (status = 400, description = "Invalid query.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
    ))]
pub(crate) async fn list_jobs(
    State(s): S,
    ApiQuery(q): ApiQuery<JobsQuery>,
) -> Result<Json<JobList>, ApiError> {
    let filter = JobFilter {
        state: q.state,
        kind: q.kind,
        tenant: q.tenant,
        limit: q.limit.unwrap_or(100),
    };
    let recs = db(&s.store, move |st| st.list_jobs(&filter)).await?;
    Ok(Json(JobList {
        jobs: recs.iter().map(|r| s.jobs.view(r)).collect(),
    }))
}

async fn job_or_404(s: &AppState, id: &str) -> Result<crate::state::JobRecord, ApiError> {
    let jid = id.to_string();
    db(&s.store, move |st| st.get_job(&jid))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::JobNotFound,
                format!("no job {id} on agent {}", s.settings.id),
            )
        })
}

/// Show one job.
///
/// State, bytes done, rate, ETA, and per disk the proxy, mode and the selector's
/// reason.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job.", body = Job),
        (status = 400, description = "Invalid id.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 404, description = "job_not_found.", body = ErrorBody),
    ))]
pub(crate) async fn get_job(State(s): S, JobId(id): JobId) -> Result<Json<Job>, ApiError> {
    let rec = job_or_404(&s, &id).await?;
    Ok(Json(s.jobs.view(&rec)))
}

/// Cancel a job.
///
/// Asks a queued or running job to stop. The job ends `cancelled` once its runner
/// has cleaned up (snapshot removed, disks detached); poll it.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 202, description = "Cancellation requested.", body = Job),
        (status = 400, description = "Invalid id.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 404, description = "job_not_found.", body = ErrorBody),
        (status = 409, description = "job_finished.", body = ErrorBody),
    ))]
pub(crate) async fn cancel_job(State(s): S, JobId(id): JobId) -> Result<Response, ApiError> {
    s.jobs.cancel(&id, "cancelled through the API").await?;
    let rec = job_or_404(&s, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(s.jobs.view(&rec))).into_response())
}

/// Run the key sync now.
///
/// The key sync system job: for each tenant (or those named), ask its key
/// source for the current key id and version, record it, and report rotations.
/// Returns ids and versions only, never key material.
#[utoipa::path(post, path = "/v1/keys/sync", tag = "keys",
    request_body(content = Option<KeySyncRequest>, description = "Optional: which tenants."),
    responses(
        (status = 200, description = "One result per tenant; per-tenant failures are in `error`.", body = KeySyncResponse),
        (status = 400, description = "Invalid body.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
        (status = 415, description = "Body is not JSON.", body = ErrorBody),
        (status = 422, description = "unknown_tenant.", body = ErrorBody),
        (status = 502, description = "key_sync_failed: the sync could not run.", body = ErrorBody),
    ))]
pub(crate) async fn keys_sync(
    State(s): S,
    OptionalJson(req): OptionalJson<KeySyncRequest>,
) -> Result<Json<KeySyncResponse>, ApiError> {
    let tenants: Vec<crate::config::TenantSection> = match &req.tenants {
        None => s.settings.tenants.clone(),
        Some(names) => names
            .iter()
            .map(|n| tenant_or_422(&s, n).cloned())
            .collect::<Result<_, _>>()?,
    };
    let runner = s.runner.clone();
    let ts = tenants.clone();
    let outcomes = tokio::task::spawn_blocking(move || runner.sync_keys(&ts))
        .await
        .map_err(|e| ApiError::new(ErrorCode::KeySyncFailed, format!("key sync crashed: {e}")))?;
    if outcomes.len() != tenants.len() {
        return Err(ApiError::new(
            ErrorCode::KeySyncFailed,
            format!(
                "key sync returned {} results for {} tenants",
                outcomes.len(),
                tenants.len()
            ),
        ));
    }
    let mut results = Vec::new();
    for (t, o) in tenants.iter().zip(outcomes) {
        results.push(match o {
            Ok(k) => {
                let obs = KeyObservation {
                    tenant: t.name.clone(),
                    kms: k.kms.clone(),
                    key_name: k.key_name.clone(),
                    key_id: k.key_id.clone(),
                    version: k.version,
                };
                let change = db(&s.store, move |st| st.record_key_check(&obs)).await?;
                let rotated = change.changed && change.previous.is_some();
                if rotated {
                    tracing::info!(tenant = %t.name, kms = %k.kms, key_id = %k.key_id, version = k.version, "tenant key rotated on the KMS; new restore points use the new key");
                }
                KeySyncResult {
                    tenant: t.name.clone(),
                    kms: Some(k.kms),
                    key_name: Some(k.key_name),
                    key_id: Some(k.key_id),
                    version: Some(k.version),
                    previous_key_id: change.previous.as_ref().map(|p| p.0.clone()),
                    previous_version: change.previous.as_ref().map(|p| p.1),
                    rotated,
                    checked_at: Some(crate::state::rfc3339_ms(change.checked_at)),
                    error: None,
                }
            }
            Err(e) => {
                tracing::warn!(tenant = %t.name, error = %e, "key sync failed for tenant");
                KeySyncResult {
                    tenant: t.name.clone(),
                    kms: t.kms.as_ref().map(|k| k.address.clone()),
                    key_name: t.kms.as_ref().map(|k| k.key_name.clone()),
                    key_id: None,
                    version: None,
                    previous_key_id: None,
                    previous_version: None,
                    rotated: false,
                    checked_at: None,
                    error: Some(JobError {
                        code: RunError::code(&e).to_string(),
                        message: e.to_string(),
                    }),
                }
            }
        });
    }
    Ok(Json(KeySyncResponse { results }))
}

/// Every tenant's repository as stored now.
///
/// Per tenant: backend and location, committed points, stored chunks and
/// their bytes, and for a local directory the file system's size and free
/// space. Lists each repository (one directory walk, or one S3 listing): poll
/// it every few minutes, not every second. A repository that cannot be read
/// is reported in its entry's `error`.
#[utoipa::path(get, path = "/v1/repositories", tag = "keys",
    responses(
        (status = 200, description = "One entry per tenant.", body = RepositoryList),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
    ))]
pub(crate) async fn repositories(State(s): S) -> Json<RepositoryList> {
    let mut out = Vec::new();
    for t in s.settings.tenants.clone() {
        let runner = s.runner.clone();
        let tt = t.clone();
        let got = tokio::task::spawn_blocking(move || runner.repository_usage(&tt))
            .await
            .unwrap_or_else(|e| Err(RunError::Repository(format!("reading it crashed: {e}"))));
        let measured_at = crate::state::rfc3339_ms(crate::state::now_ms());
        out.push(match got {
            Ok(u) => RepositoryUsage {
                tenant: t.name.clone(),
                backend: Some(u.backend.to_string()),
                location: u.location,
                points: Some(u.points),
                chunks: Some(u.chunks),
                stored_bytes: Some(u.stored_bytes),
                filesystem_total_bytes: u.fs.map(|f| f.total_bytes),
                filesystem_free_bytes: u.fs.map(|f| f.free_bytes),
                measured_at,
                error: None,
            },
            Err(e) => RepositoryUsage {
                tenant: t.name.clone(),
                backend: None,
                location: t.repository.display().to_string(),
                points: None,
                chunks: None,
                stored_bytes: None,
                filesystem_total_bytes: None,
                filesystem_free_bytes: None,
                measured_at,
                error: Some(JobError {
                    code: RunError::code(&e).to_string(),
                    message: e.to_string(),
                }),
            },
        });
    }
    Json(RepositoryList { repositories: out })
}

/// Disaster-recovery key check of one tenant.
///
/// For every restore point of the tenant's repository: whether the tenant's
/// keys, as the agent's key source reaches them now, open it (its own key, the
/// keyring, the provider's recovery key), and which keys to obtain for those
/// that no path opens — the report `ferry repo import` prints. Read-only: a
/// missing KMS key is reported, never created. Key ids and fingerprints only.
/// When the KMS or the repository cannot be reached, the answer is still 200
/// with `error` saying why (as the key sync reports per-tenant failures).
#[utoipa::path(post, path = "/v1/keys/check", tag = "keys",
    request_body = KeyCheckRequest,
    responses(
        (status = 200, description = "The report.", body = KeyCheckResponse),
        (status = 400, description = "Malformed or invalid body.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 413, description = "Body too large.", body = ErrorBody),
        (status = 415, description = "Body is not JSON.", body = ErrorBody),
        (status = 422, description = "unknown_tenant.", body = ErrorBody),
    ))]
pub(crate) async fn keys_check(
    State(s): S,
    ApiJson(req): ApiJson<KeyCheckRequest>,
) -> Result<Json<KeyCheckResponse>, ApiError> {
    let tenant = tenant_or_422(&s, &req.tenant)?.clone();
    let runner = s.runner.clone();
    let t = tenant.clone();
    let got = tokio::task::spawn_blocking(move || runner.check_keys(&t))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("key check crashed: {e}")))?;
    let at = crate::state::rfc3339_ms(crate::state::now_ms());
    Ok(Json(match got {
        Ok(report) => {
            tracing::info!(tenant = %tenant.name, points = report.points.len(), missing = report.missing_keys().len(), "key check");
            KeyCheckResponse::from_report(&tenant.name, at, &report)
        }
        Err(e) => {
            tracing::warn!(tenant = %tenant.name, error = %e, "key check could not run");
            KeyCheckResponse::failed(
                &tenant.name,
                at,
                JobError {
                    code: RunError::code(&e).to_string(),
                    message: e.to_string(),
                },
            )
        }
    }))
}

/// Prometheus metrics.
///
/// OpenMetrics text: jobs by state, bytes moved, running jobs, slot use.
#[utoipa::path(get, path = "/metrics", tag = "agent",
    responses(
        (status = 200, description = "OpenMetrics text exposition.", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 500, description = "State database unreadable.", body = ErrorBody),
    ))]
pub(crate) async fn get_metrics(State(s): S) -> Result<Response, ApiError> {
    let counts = db(&s.store, |st| st.count_by_state()).await?;
    let finished = db(&s.store, |st| st.finished_bytes()).await?;
    let text = metrics::render(&s, &counts, &finished).map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "agent",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API.", content_type = "application/json", body = Object),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
    ))]
pub(crate) async fn openapi(State(s): S) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.openapi_json.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let want = token_digest("s3cret-token");
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(check_bearer(&h("Bearer s3cret-token"), &want).is_ok());
        assert!(check_bearer(&h("bearer  s3cret-token "), &want).is_ok());
        for bad in [
            "Bearer s3cret",
            "Basic s3cret-token",
            "Bearer",
            "s3cret-token",
            "Bearer s3cret-token2",
        ] {
            let e = check_bearer(&h(bad), &want).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthorized, "{bad}");
        }
        assert!(check_bearer(&HeaderMap::new(), &want)
            .unwrap_err()
            .message
            .contains("missing"));
    }

    #[test]
    fn json_content_types() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(is_json(&h("application/json")));
        assert!(is_json(&h("Application/JSON; charset=utf-8")));
        assert!(is_json(&h("application/merge-patch+json")));
        assert!(!is_json(&h("text/plain")));
        assert!(!is_json(&HeaderMap::new()));
    }
}
