//! `/api/polls/{pollId}/votes`: casting a vote, idempotently with `Idempotency-Key`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use pollcast_domain::{Domain, VoteRequest};
use pollcast_protocol::Vote;
use serde::{Deserialize, Serialize};

use super::poll_id;
use crate::auth::Bearer;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};

/// Routes of this resource.
pub fn router() -> Router<Domain> {
    Router::new().route("/api/polls/{poll_id}/votes", post(cast))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CastVote {
    option_ids: Vec<String>,
}

#[derive(Serialize)]
struct VoteCast {
    vote: Vote,
}

async fn cast(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CastVote>,
) -> ApiResult<(StatusCode, Json<VoteCast>)> {
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::InvalidBody("Idempotency-Key must be visible ASCII".into()))
        })
        .transpose()?;
    let request = VoteRequest {
        option_ids: body.option_ids,
        idempotency_key,
    };
    let vote = domain.vote(&claims, poll_id(&id)?, request).await?;
    Ok((StatusCode::CREATED, Json(VoteCast { vote })))
}
