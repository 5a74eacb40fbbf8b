//! `/healthz` (the process runs) and `/readyz` (database and event stream answer).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use pollcast_domain::Domain;
use serde_json::{Value, json};

use crate::error::ApiResult;

/// Routes of this resource.
pub fn router() -> Router<Domain> {
    Router::new()
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(domain): State<Domain>) -> ApiResult<(StatusCode, Json<Value>)> {
    domain.ready().await?;
    Ok((StatusCode::OK, Json(json!({ "status": "ready" }))))
}
