//! `?limit=N&after=<id>` on the list endpoints, and the `Link: <…>; rel="next"`
//! header of a page that is followed by another. Without either parameter a list
//! endpoint answers the whole list, as the contract says.

use axum::Json;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use pollcast_domain::page::MAX_PAGE;
use pollcast_domain::{DomainError, Page, PageRequest};
use pollcast_protocol::{Participant, Poll};
use serde::Serialize;
use uuid::Uuid;

use crate::ApiError;

/// The page a list request asks for.
pub struct PageQuery(pub PageRequest);

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse(parts.uri.query().unwrap_or_default())
            .map(PageQuery)
            .map_err(|reason| DomainError::ValidationFailed(reason).into())
    }
}

/// Reads `limit` and `after`; other parameters are ignored, as a client adding its
/// own (a cache buster, say) would expect.
fn parse(query: &str) -> Result<PageRequest, String> {
    let mut page = PageRequest::ALL;
    let (mut seen_limit, mut seen_after) = (false, false);
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "limit" => {
                if std::mem::replace(&mut seen_limit, true) {
                    return Err("limit: given twice".into());
                }
                let limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| format!("limit: must be a whole number from 1 to {MAX_PAGE}"))?;
                page.limit = Some(limit);
            }
            "after" => {
                if std::mem::replace(&mut seen_after, true) {
                    return Err("after: given twice".into());
                }
                let after = Uuid::parse_str(&value)
                    .map_err(|_| "after: must be the id of an item of the list".to_owned())?;
                page.after = Some(after);
            }
            _ => {}
        }
    }
    Ok(page)
}

/// An item a page can continue after.
pub trait Keyed {
    /// The id a next page's `after` names.
    fn key(&self) -> Uuid;
}

impl Keyed for Participant {
    fn key(&self) -> Uuid {
        self.id
    }
}

impl Keyed for Poll {
    fn key(&self) -> Uuid {
        self.id
    }
}

/// A page answered as the contract's JSON array, with a link to the next page.
pub struct Paged<T> {
    /// The page.
    pub page: Page<T>,
    /// What was asked for; the next page keeps its size.
    pub request: PageRequest,
    /// The endpoint's path, for the link.
    pub path: String,
}

impl<T: Serialize + Keyed> IntoResponse for Paged<T> {
    fn into_response(self) -> Response {
        let next = match (self.page.more, self.page.items.last()) {
            (true, Some(last)) => {
                let size = self.request.limit.unwrap_or(MAX_PAGE);
                let link = format!(
                    "<{}?limit={size}&after={}>; rel=\"next\"",
                    self.path,
                    last.key()
                );
                HeaderValue::from_str(&link).ok()
            }
            _ => None,
        };
        let mut response = Json(self.page.items).into_response();
        if let Some(link) = next {
            response.headers_mut().insert(header::LINK, link);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_parameters_is_the_whole_list() {
        assert_eq!(parse(""), Ok(PageRequest::ALL));
        assert_eq!(parse("cache=123"), Ok(PageRequest::ALL));
    }

    #[test]
    fn limit_and_after_are_read() {
        let id = Uuid::now_v7();
        let page = parse(&format!("limit=50&after={id}")).expect("valid");
        assert_eq!(page.limit, Some(50));
        assert_eq!(page.after, Some(id));
    }

    #[test]
    fn bad_values_are_refused() {
        for query in [
            "limit=0",
            "limit=1001",
            "limit=-1",
            "limit=ten",
            "limit=",
            "limit=1&limit=2",
            "after=nope",
            "after=",
        ] {
            assert!(parse(query).is_err(), "{query} accepted");
        }
    }
}
