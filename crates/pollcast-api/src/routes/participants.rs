//! `/api/join`: joining a session with its code.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use pollcast_domain::Domain;
use pollcast_protocol::{Participant, Session};
use serde::{Deserialize, Serialize};

use crate::body::JsonBody;
use crate::error::ApiResult;

/// Routes of this resource.
pub fn router() -> Router<Domain> {
    Router::new().route("/api/join", post(join))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Join {
    code: String,
    display_name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Joined {
    participant: Participant,
    participant_token: String,
    session: Session,
}

async fn join(
    State(domain): State<Domain>,
    JsonBody(body): JsonBody<Join>,
) -> ApiResult<(StatusCode, Json<Joined>)> {
    let joined = domain.join(&body.code, &body.display_name).await?;
    Ok((
        StatusCode::CREATED,
        Json(Joined {
            participant: joined.participant,
            participant_token: joined.participant_token,
            session: joined.session,
        }),
    ))
}
