//! Rate limits on writes: `429 rate_limited` with `Retry-After`.
//!
//! Every POST counts against one bucket. A request with a valid token counts
//! against its holder (the session's presenter, or one participant): no honest
//! client votes or drafts polls many times a second, and every refused vote still
//! writes a `vote:rejected` into the session's stream, so this is what keeps one
//! participant from flooding a room's history. Anything else (creating a session,
//! joining, or a bad token) counts against the client's IP address, with generous
//! defaults: a whole conference hall may join from one NAT address in a minute.
//! Reads are not limited.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use pollcast_domain::{Claims, Domain};
use uuid::Uuid;

use crate::ApiError;

/// Checks between sweeps of buckets that are full again (idle clients).
const SWEEP_EVERY: u64 = 10_000;

/// Rates and bursts; a rate of 0 turns that limit off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Writes per second per token holder.
    pub writes_per_second: u32,
    /// Writes a token holder may make at once.
    pub write_burst: u32,
    /// Writes without a valid token per second per client IP.
    pub anonymous_per_second: u32,
    /// Such writes one IP may make at once.
    pub anonymous_burst: u32,
}

impl RateLimitConfig {
    /// No limits at all (benchmarks).
    pub const OFF: RateLimitConfig = RateLimitConfig {
        writes_per_second: 0,
        write_burst: 0,
        anonymous_per_second: 0,
        anonymous_burst: 0,
    };
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            writes_per_second: 20,
            write_burst: 50,
            anonymous_per_second: 200,
            anonymous_burst: 2000,
        }
    }
}

/// Whose bucket a request takes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A token holder: the session and the participant (`None` for the presenter).
    Holder(Uuid, Option<Uuid>),
    /// Anyone else, by address.
    Address(IpAddr),
}

type Limiter = DefaultKeyedRateLimiter<Key>;

/// The limiters and what the middleware needs to pick a bucket.
pub struct RateLimits {
    domain: Domain,
    writes: Option<Limiter>,
    anonymous: Option<Limiter>,
    checks: AtomicU64,
}

fn limiter(per_second: u32, burst: u32) -> Option<Limiter> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(Limiter::keyed(Quota::per_second(rate).allow_burst(burst)))
}

impl RateLimits {
    /// Limiters for `config`.
    pub fn new(domain: Domain, config: RateLimitConfig) -> Arc<Self> {
        Arc::new(Self {
            domain,
            writes: limiter(config.writes_per_second, config.write_burst),
            anonymous: limiter(config.anonymous_per_second, config.anonymous_burst),
            checks: AtomicU64::new(0),
        })
    }

    /// `Err(wait)` when the bucket of `key` is empty.
    fn check(&self, key: &Key) -> Result<(), Duration> {
        let limiter = match key {
            Key::Holder(..) => &self.writes,
            Key::Address(_) => &self.anonymous,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// The request's bucket, and its verified claims when it has a valid token.
    fn key_of(&self, request: &Request) -> (Key, Option<Claims>) {
        let bearer = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .and_then(|(_, token)| self.domain.verify_token(token.trim()).ok());
        match bearer {
            Some(claims) => (
                Key::Holder(claims.session_id, claims.participant_id),
                Some(claims),
            ),
            None => {
                let address = request
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
                (Key::Address(address), None)
            }
        }
    }
}

/// Refuses a POST whose bucket is empty, before anything else runs. The claims it
/// verified travel on in the request, so the handler does not verify them again.
pub async fn limit(
    State(limits): State<Arc<RateLimits>>,
    mut request: Request,
    next: Next,
) -> Response {
    if request.method() == Method::POST {
        let (key, claims) = limits.key_of(&request);
        if let Err(wait) = limits.check(&key) {
            metrics::counter!("pollcast_http_rate_limited_total").increment(1);
            return ApiError::RateLimited { retry_after: wait }.into_response();
        }
        if let Some(claims) = claims {
            request.extensions_mut().insert(Verified(claims));
        }
    }
    next.run(request).await
}

/// Claims already verified for this request.
#[derive(Clone)]
pub(crate) struct Verified(pub(crate) Claims);
