//! `/healthz` (the process runs) and `/readyz` (what this node depends on answers:
//! database and event stream on an api node, the event stream on an edge).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use pollcast_domain::{Domain, DomainError};
use pollcast_stream::EventStream;
use serde_json::{Value, json};

use crate::error::ApiResult;

/// What `/readyz` checks.
#[derive(Clone)]
pub enum Readiness {
    /// An api node (or a whole one): the database and the event stream.
    Api(Domain),
    /// An edge node: the event stream only (edges have no database).
    Stream(Arc<dyn EventStream>),
}

/// `/healthz` and `/readyz`, for every role.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .with_state(readiness)
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(readiness): State<Readiness>) -> ApiResult<(StatusCode, Json<Value>)> {
    match readiness {
        Readiness::Api(domain) => domain.ready().await?,
        Readiness::Stream(stream) => stream
            .ping()
            .await
            .map_err(|e| DomainError::Unavailable(format!("event stream: {e}")))?,
    }
    Ok((StatusCode::OK, Json(json!({ "status": "ready" }))))
}
