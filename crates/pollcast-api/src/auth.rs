//! `Authorization: Bearer <token>`: extractors that hand handlers verified claims.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use pollcast_domain::{Claims, Domain, DomainError};

use crate::ApiError;
use crate::rate_limit::Verified;

/// The verified claims of the request's bearer token; 401 without a valid one.
pub struct Bearer(pub Claims);

/// The raw bearer credential, if any (the admin key on session creation).
pub struct OptionalBearer(pub Option<String>);

fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| DomainError::Unauthorized("malformed Authorization header"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(DomainError::Unauthorized("expected a Bearer token"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(DomainError::Unauthorized("expected a Bearer token").into());
    }
    Ok(Some(token.trim()))
}

impl FromRequestParts<Domain> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, domain: &Domain) -> Result<Self, ApiError> {
        if let Some(Verified(claims)) = parts.extensions.remove::<Verified>() {
            return Ok(Bearer(claims));
        }
        let token = bearer(parts)?.ok_or(DomainError::Unauthorized("missing bearer token"))?;
        Ok(Bearer(domain.verify_token(token)?))
    }
}

impl FromRequestParts<Domain> for OptionalBearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &Domain) -> Result<Self, ApiError> {
        Ok(OptionalBearer(bearer(parts)?.map(str::to_owned)))
    }
}
