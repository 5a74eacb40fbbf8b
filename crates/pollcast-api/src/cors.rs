//! CORS for browser apps on other origins. Off unless origins are configured:
//! native clients and same-origin pages need no CORS, and a wildcard would let any
//! site's scripts drive the API with tokens they got hold of.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, Method, header};
use pollcast_protocol::Origin;
use pollcast_protocol::origin::is_allowed;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The layer answering preflights and adding `Access-Control-Allow-Origin` for the
/// allowed origins; `None` when none are configured.
pub fn layer(origins: &[Origin]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let origins: Arc<[Origin]> = origins.into();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::predicate(move |value, _| {
                value.to_str().is_ok_and(|v| is_allowed(&origins, v))
            }))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
            ])
            // What the contract asks clients to read: paging links and when to
            // retry after a 429.
            .expose_headers([header::LINK, header::RETRY_AFTER])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}
