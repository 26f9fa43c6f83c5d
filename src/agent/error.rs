//! API errors: a stable code, an HTTP status and an operator-readable message,
//! always rendered as `{"error": {"code": "...", "message": "..."}}`.
//!
//! Owns the list of codes (documented in docs/api.md, generated from the OpenAPI
//! document) and the status each maps to. Bad input is always a 4xx; a 5xx means
//! the agent itself is broken (state database) or is shutting down.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Stable error codes of the agent API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 401: the `Authorization: Bearer` token is missing or wrong.
    Unauthorized,
    /// 400: the body, query or path is malformed or fails validation.
    InvalidRequest,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 413: the body is larger than 1 MiB.
    PayloadTooLarge,
    /// 404: no such path.
    NotFound,
    /// 405: the path exists, the method does not (see the `Allow` header).
    MethodNotAllowed,
    /// 422: the tenant is not served by this agent.
    UnknownTenant,
    /// 422: the selector refuses the VM on this proxy (the message lists every
    /// disk and candidate with its reason).
    VmRefused,
    /// 422: the job needs more slots than this agent has in total.
    ExceedsSlots,
    /// 429: not enough free slots right now (see `Retry-After`).
    NoFreeSlots,
    /// 404: no job with this id.
    JobNotFound,
    /// 409: the job has already finished and cannot be cancelled.
    JobFinished,
    /// 502: the key sync could not run at all.
    KeySyncFailed,
    /// 404: no such restore point, disk, partition or path (file requests).
    FileNotFound,
    /// 422: the disk cannot be read as files (unsupported or damaged file
    /// system, damaged chunks, unusable key); the message says which.
    FilesUnreadable,
    /// 403: a restore to a directory or files names a path outside the
    /// tenant's `restore_dirs` on this agent (or the tenant has none).
    RestorePathNotAllowed,
    /// 503: the agent is shutting down and accepts no new work.
    ShuttingDown,
    /// 500: the agent's own state is broken (see its log).
    Internal,
}

impl ErrorCode {
    /// HTTP status for this code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::RestorePathNotAllowed => StatusCode::FORBIDDEN,
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NotFound | ErrorCode::JobNotFound | ErrorCode::FileNotFound => {
                StatusCode::NOT_FOUND
            }
            ErrorCode::FilesUnreadable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::UnknownTenant | ErrorCode::VmRefused | ErrorCode::ExceedsSlots => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ErrorCode::NoFreeSlots => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::JobFinished => StatusCode::CONFLICT,
            ErrorCode::KeySyncFailed => StatusCode::BAD_GATEWAY,
            ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the code means and what to do, for the documentation.
    pub fn meaning(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "The `Authorization: Bearer` token is missing or wrong.",
            ErrorCode::InvalidRequest => "The body, query or path is malformed or fails validation; the message names the field.",
            ErrorCode::UnsupportedMediaType => "The body is not sent as `application/json`.",
            ErrorCode::PayloadTooLarge => "The body is larger than 1 MiB.",
            ErrorCode::NotFound => "No such path.",
            ErrorCode::MethodNotAllowed => "The path exists but not with this method (see the `Allow` header).",
            ErrorCode::UnknownTenant => "The tenant is not served by this agent (see `GET /v1/info`).",
            ErrorCode::VmRefused => "The transport selector refuses the VM on this proxy, before any snapshot; the message lists every disk and candidate with its reason.",
            ErrorCode::ExceedsSlots => "The job needs more slots (one per disk) than the agent has in total.",
            ErrorCode::NoFreeSlots => "Not enough free slots now; retry after `Retry-After` seconds or use another agent.",
            ErrorCode::JobNotFound => "No job with this id on this agent.",
            ErrorCode::JobFinished => "The job has already finished and cannot be cancelled.",
            ErrorCode::KeySyncFailed => "The key sync could not run at all (per-tenant failures are reported in the 200 response instead).",
            ErrorCode::FileNotFound => "File requests: no such restore point, disk, partition or path; the message names which (`ferry files volumes` lists partitions).",
            ErrorCode::FilesUnreadable => "File requests: the disk cannot be read as files (a file system ferry does not read, such as XFS or LVM; damaged data; an unusable key); the message says which. `ferry mount` serves the raw disk for such cases.",
            ErrorCode::RestorePathNotAllowed => "A restore with a `directory` or `files` target names a path that does not resolve (symlinks followed) to a directory at or under one of the tenant's `restore_dirs` in the agent's configuration, or contains `..`, or the tenant has no `restore_dirs` (then every such restore is refused); the message names the allowed directories. Nothing was written. Restores into a VM are not affected.",
            ErrorCode::ShuttingDown => "The agent is shutting down and accepts no new work; use another agent.",
            ErrorCode::Internal => "The agent's own state is broken (state database); see the agent log.",
        }
    }

    /// The serialized name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::UnknownTenant => "unknown_tenant",
            ErrorCode::VmRefused => "vm_refused",
            ErrorCode::ExceedsSlots => "exceeds_slots",
            ErrorCode::NoFreeSlots => "no_free_slots",
            ErrorCode::JobNotFound => "job_not_found",
            ErrorCode::JobFinished => "job_finished",
            ErrorCode::KeySyncFailed => "key_sync_failed",
            ErrorCode::FileNotFound => "file_not_found",
            ErrorCode::FilesUnreadable => "files_unreadable",
            ErrorCode::RestorePathNotAllowed => "restore_path_not_allowed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }

    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::Unauthorized,
        ErrorCode::InvalidRequest,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::PayloadTooLarge,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::UnknownTenant,
        ErrorCode::VmRefused,
        ErrorCode::ExceedsSlots,
        ErrorCode::NoFreeSlots,
        ErrorCode::JobNotFound,
        ErrorCode::JobFinished,
        ErrorCode::KeySyncFailed,
        ErrorCode::FileNotFound,
        ErrorCode::FilesUnreadable,
        ErrorCode::RestorePathNotAllowed,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];
}

/// The `error` member of an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable code; branch on this, not on the message.
    pub code: ErrorCode,
    /// What went wrong and what to do about it.
    pub message: String,
}

/// Every non-2xx response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// Code (decides the status).
    pub code: ErrorCode,
    /// Message.
    pub message: String,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }
    /// 500 `internal`, logging the cause.
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "agent internal error");
        ApiError::new(ErrorCode::Internal, format!("agent internal error: {e}"))
    }
    /// Add a `Retry-After`.
    pub fn retry_after(mut self, secs: u32) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut r = (self.code.status(), axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.code == ErrorCode::PayloadTooLarge {
            // The rest of the body was not read: the connection cannot carry
            // another request.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.code == ErrorCode::Unauthorized {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ferry-agent\""),
            );
        }
        r
    }
}

impl From<crate::state::StateError> for ApiError {
    fn from(e: crate::state::StateError) -> ApiError {
        ApiError::internal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_documented_names() {
        for c in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::Value::String(c.as_str().into())
            );
            let s = c.status();
            assert!(s.is_client_error() || s.is_server_error(), "{c:?}");
        }
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
