//! The OpenAPI 3.1 document of the agent API, generated from the handler
//! annotations and the wire types (utoipa). Served at `GET /v1/openapi.json`;
//! `docs/api.md` is rendered from it ([`render_markdown`]) and a test keeps the
//! two in step.

use super::api::*;
use super::error::{ErrorBody, ErrorCode, ErrorDetail};
use super::http;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The token in the agent's `[agent] token_file`, as `Authorization: Bearer <token>`. Required on every endpoint except `GET /v1/health`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ferry agent API",
        description = "HTTP/JSON API of one ferry backup proxy agent. Every error is `{\"error\": {\"code\", \"message\"}}` with a stable code (see ErrorCode). Every endpoint except `GET /v1/health` needs the bearer token.",
        license(name = "Apache-2.0"),
    ),
    paths(
        http::health,
        http::info,
        http::post_backup,
        http::post_restore,
        http::post_verify,
        http::list_jobs,
        http::get_job,
        http::cancel_job,
        http::keys_sync,
        http::keys_check,
        http::repositories,
        http::files_list,
        http::files_find,
        http::get_metrics,
        http::openapi,
    ),
    components(schemas(
        ErrorBody, ErrorDetail, ErrorCode, Health, Info, Slots, TenantView, KmsView,
        KeySourceKind, PolicySpec, BackupRequest, DiskPlacement, VmSpec, DiskSpec, RetentionSpec,
        RestoreRequest, RestoreTargetSpec, VerifyRequest, Job, JobList, DiskView, JobError,
        KeySyncRequest, KeySyncResponse, KeySyncResult,
        KeyCheckRequest, KeyCheckResponse, PointKeyView, MissingKeyView, RepositoryList, RepositoryUsage,
        FilesListRequest, FilesFindRequest, FilesResponse,
        crate::files::VolumeInfo, crate::files::Entry, crate::files::EntryKind, crate::files::FsKind,
        crate::transport::select::Mode, crate::state::JobState, crate::state::JobKind,
        crate::job::quiesce::QuiescePolicy,
    )),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
    tags(
        (name = "agent", description = "Health, description, metrics, this document."),
        (name = "jobs", description = "Backups, restores, verifies and their life cycle."),
        (name = "keys", description = "Tenant key sync, disaster-recovery key check and repository usage (ids, versions and counts only)."),
        (name = "files", description = "File-level access to restore points: list and find (restores are jobs with a `files` target)."),
    )
)]
pub struct ApiDoc;

/// The document as pretty JSON, with the running version.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut d = ApiDoc::openapi();
    d.info.version = env!("CARGO_PKG_VERSION").to_string();
    d
}

/// The document as pretty JSON.
pub fn json() -> String {
    document()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Render `docs/api.md` from the document: endpoints with their responses, the
/// error codes, and every schema with its fields.
pub fn render_markdown() -> String {
    let doc: serde_json::Value =
        serde_json::to_value(document()).unwrap_or(serde_json::Value::Null);
    super::apidoc::render(&doc)
}
