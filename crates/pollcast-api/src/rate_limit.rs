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
//!
//! Behind a proxy every client has the proxy's address. `X-Forwarded-For` names
//! the real one, but anyone can send that header: it is believed only from peers in
//! [`RateLimitConfig::trusted_proxies`], see [`client_address`].

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Writes per second per token holder.
    pub writes_per_second: u32,
    /// Writes a token holder may make at once.
    pub write_burst: u32,
    /// Writes without a valid token per second per client IP.
    pub anonymous_per_second: u32,
    /// Such writes one IP may make at once.
    pub anonymous_burst: u32,
    /// Peers whose `X-Forwarded-For` is believed (load balancers, ingress).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl RateLimitConfig {
    /// No limits at all (benchmarks).
    pub const OFF: RateLimitConfig = RateLimitConfig {
        writes_per_second: 0,
        write_burst: 0,
        anonymous_per_second: 0,
        anonymous_burst: 0,
        trusted_proxies: Vec::new(),
    };
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            writes_per_second: 20,
            write_burst: 50,
            anonymous_per_second: 200,
            anonymous_burst: 2000,
            trusted_proxies: Vec::new(),
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
    trusted_proxies: Vec<ipnet::IpNet>,
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
            trusted_proxies: config.trusted_proxies,
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
                let peer = request
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
                let forwarded = request.headers().get_all("x-forwarded-for");
                let hops = forwarded.iter().filter_map(|v| v.to_str().ok());
                let address = client_address(peer, hops, &self.trusted_proxies);
                (Key::Address(address), None)
            }
        }
    }
}

/// The client's address: the peer's, unless the peer is a trusted proxy; then the
/// right-most `X-Forwarded-For` entry that is not a trusted proxy itself (each
/// proxy appends the address it saw, so entries left of the first untrusted one
/// are whatever the client chose to send). `headers` are the header's values in
/// the order received; an entry that is not an address ends the walk.
pub fn client_address<'h>(
    peer: IpAddr,
    headers: impl Iterator<Item = &'h str>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers.flat_map(|h| h.split(',')).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let header = ["203.0.113.9"];
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_address(ip("198.51.100.1"), header.into_iter(), &trusted),
            ip("198.51.100.1")
        );
        // A trusted one's names the client.
        assert_eq!(
            client_address(ip("10.1.2.3"), header.into_iter(), &trusted),
            ip("203.0.113.9")
        );
        // Through two trusted proxies; what the client wrote itself, left of them,
        // does not count.
        let chain = ["6.6.6.6, 203.0.113.9", "10.9.9.9"];
        assert_eq!(
            client_address(ip("10.1.2.3"), chain.into_iter(), &trusted),
            ip("203.0.113.9")
        );
        // Garbage ends the walk at the last address believed.
        let junk = ["nonsense, 10.9.9.9"];
        assert_eq!(
            client_address(ip("10.1.2.3"), junk.into_iter(), &trusted),
            ip("10.9.9.9")
        );
        // No header: the proxy itself.
        assert_eq!(
            client_address(ip("10.1.2.3"), std::iter::empty(), &trusted),
            ip("10.1.2.3")
        );
    }
}
