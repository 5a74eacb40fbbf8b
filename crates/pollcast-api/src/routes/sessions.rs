//! `/api/sessions`: create, read, start, end; the session's polls and participants.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use pollcast_domain::{Domain, NewPoll};
use pollcast_protocol::{Participant, Poll, Session};
use serde::{Deserialize, Serialize};

use super::session_id;
use crate::auth::{Bearer, OptionalBearer};
use crate::body::JsonBody;
use crate::error::ApiResult;
use crate::page::{PageQuery, Paged};

/// Routes of this resource.
pub fn router() -> Router<Domain> {
    Router::new()
        .route("/api/sessions", post(create))
        .route("/api/sessions/{id}", get(read))
        .route("/api/sessions/{id}/start", post(start))
        .route("/api/sessions/{id}/end", post(end))
        .route("/api/sessions/{id}/participants", get(participants))
        .route("/api/sessions/{id}/polls", post(create_poll).get(polls))
}

#[derive(Deserialize)]
struct CreateSession {
    title: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionCreated {
    session: Session,
    presenter_token: String,
}

async fn create(
    State(domain): State<Domain>,
    OptionalBearer(admin_key): OptionalBearer,
    JsonBody(body): JsonBody<CreateSession>,
) -> ApiResult<(StatusCode, Json<SessionCreated>)> {
    let created = domain
        .create_session(admin_key.as_deref(), &body.title)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(SessionCreated {
            session: created.session,
            presenter_token: created.presenter_token,
        }),
    ))
}

async fn read(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
) -> ApiResult<Json<Session>> {
    Ok(Json(domain.session(&claims, session_id(&id)?).await?))
}

async fn start(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
) -> ApiResult<Json<Session>> {
    Ok(Json(domain.start_session(&claims, session_id(&id)?).await?))
}

async fn end(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
) -> ApiResult<Json<Session>> {
    Ok(Json(domain.end_session(&claims, session_id(&id)?).await?))
}

async fn participants(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
    PageQuery(request): PageQuery,
) -> ApiResult<Paged<Participant>> {
    let session = session_id(&id)?;
    Ok(Paged {
        page: domain.participants(&claims, session, request).await?,
        request,
        path: format!("/api/sessions/{session}/participants"),
    })
}

async fn create_poll(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
    JsonBody(body): JsonBody<NewPoll>,
) -> ApiResult<(StatusCode, Json<Poll>)> {
    let poll = domain.create_poll(&claims, session_id(&id)?, body).await?;
    Ok((StatusCode::CREATED, Json(poll)))
}

async fn polls(
    State(domain): State<Domain>,
    Path(id): Path<String>,
    Bearer(claims): Bearer,
    PageQuery(request): PageQuery,
) -> ApiResult<Paged<Poll>> {
    let session = session_id(&id)?;
    Ok(Paged {
        page: domain.polls(&claims, session, request).await?,
        request,
        path: format!("/api/sessions/{session}/polls"),
    })
}
