//! `/api/polls/{pollId}`: read, activate, close, results.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use pollcast_domain::Domain;
use pollcast_protocol::{Poll, Results};

use super::poll_id;
use crate::auth::Bearer;
use crate::error::ApiResult;

/// Routes of this resource.
pub fn router() -> Router<Domain> {
    Router::new()
        .route("/api/polls/{poll_id}", get(read))
        .route("/api/polls/{poll_id}/activate", post(activate))
        .route("/api/polls/{poll_id}/close", post(close))
        .route("/api/polls/{poll_id}/results", get(results))
}

async fn read(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
) -> ApiResult<Json<Poll>> {
    Ok(Json(domain.poll(&claims, poll_id(&id)?).await?))
}

async fn activate(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
) -> ApiResult<Json<Poll>> {
    Ok(Json(domain.activate_poll(&claims, poll_id(&id)?).await?))
}

async fn close(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
) -> ApiResult<Json<Poll>> {
    Ok(Json(domain.close_poll(&claims, poll_id(&id)?).await?))
}

async fn results(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
) -> ApiResult<Json<Results>> {
    Ok(Json(domain.results(&claims, poll_id(&id)?).await?))
}
