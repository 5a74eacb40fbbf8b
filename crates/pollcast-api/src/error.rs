//! Every failure of the API as the contract's status and error body. This is the
//! single place domain errors map to HTTP.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pollcast_domain::{DomainError, VoteRejection};
use pollcast_protocol::ErrorBody;

/// An API failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A domain operation refused or failed.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The body is not JSON, or not the JSON the endpoint takes.
    #[error("invalid body: {0}")]
    InvalidBody(String),
    /// The body is larger than 64 KiB.
    #[error("request body over 64 KiB")]
    PayloadTooLarge,
    /// No such route.
    #[error("no such resource")]
    NotFound,
    /// The route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Too many writes; try again after `retry_after`.
    #[error("too many requests; retry in {} s", retry_after_secs(*.retry_after))]
    RateLimited {
        /// How long until the next request will be accepted.
        retry_after: std::time::Duration,
    },
}

/// Whole seconds to wait, at least one (`Retry-After` takes whole seconds).
fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Domain(err) => match err {
                DomainError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
                DomainError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
                DomainError::SessionNotFound => (StatusCode::NOT_FOUND, "session_not_found"),
                DomainError::PollNotFound => (StatusCode::NOT_FOUND, "poll_not_found"),
                DomainError::ValidationFailed(_) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
                }
                DomainError::InvalidState(_) => (StatusCode::CONFLICT, "invalid_state"),
                DomainError::SessionNotStarted => (StatusCode::CONFLICT, "session_not_started"),
                DomainError::SessionEnded => (StatusCode::CONFLICT, "session_ended"),
                DomainError::VoteRejected { reason, .. } => {
                    let status = match reason {
                        VoteRejection::PollNotActive | VoteRejection::AlreadyVoted => {
                            StatusCode::CONFLICT
                        }
                        VoteRejection::InvalidOption
                        | VoteRejection::TooManyChoices
                        | VoteRejection::ValidationFailed => StatusCode::UNPROCESSABLE_ENTITY,
                    };
                    (status, reason.code())
                }
                DomainError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                DomainError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Domain(DomainError::Internal(detail)) => {
                // Details are for operators, not clients.
                tracing::error!(%detail, "internal error");
                "internal error".to_owned()
            }
            ApiError::Domain(DomainError::Unavailable(what)) => {
                tracing::warn!(%what, "unavailable");
                "service unavailable; nothing was changed".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = (status, Json(ErrorBody::new(code, message))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::RateLimited { retry_after } = self {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(retry_after).max(1)),
            );
        }
        response
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
