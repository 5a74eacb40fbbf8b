//! The REST API: HTTP in, domain calls, contract answers out. No business rule lives
//! here; [`error`] is the one place domain errors become status codes.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use pollcast_domain::Domain;
use pollcast_protocol::Origin;

pub mod auth;
pub mod body;
pub mod cors;
pub mod error;
pub mod page;
pub mod rate_limit;
pub mod routes;

pub use error::ApiError;
pub use rate_limit::RateLimitConfig;
pub use routes::health;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The REST router (`/api/…`) over the domain services; [`health::router`] adds
/// `/healthz` and `/readyz`.
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so that
/// anonymous writes are limited per client address.
///
/// `body_timeout` bounds the time between two pieces of a request body: a client
/// that stalls mid-body is answered `400 invalid_body` and its connection closed.
/// `cors_origins` are the browser origins allowed to call the API from other
/// sites (none: no CORS).
pub fn router(
    domain: Domain,
    rate_limits: RateLimitConfig,
    body_timeout: Duration,
    cors_origins: &[Origin],
) -> Router {
    let limits = rate_limit::RateLimits::new(domain.clone(), rate_limits);
    let router = Router::new()
        .merge(routes::sessions::router())
        .merge(routes::participants::router())
        .merge(routes::polls::router())
        .merge(routes::votes::router())
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(body::refuse_oversized))
        .layer(middleware::from_fn_with_state(limits, rate_limit::limit))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            body_timeout,
        ))
        .layer(middleware::from_fn(record_latency));
    // Outermost, so a preflight is answered before rate limits see it, and every
    // answer, errors included, carries the CORS headers a browser needs to read it.
    let router = match cors::layer(cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(domain)
}

/// Records every request's latency by route template (never by raw path, which
/// would make one series per id).
async fn record_latency(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    metrics::histogram!(
        "pollcast_http_request_duration_seconds",
        "method" => method,
        "route" => route,
        "status" => response.status().as_u16().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}
