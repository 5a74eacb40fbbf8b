//! Browser origins (`scheme://host[:port]`, RFC 6454) as the allow-lists of the
//! REST API (CORS) and of `/ws` name them. Both lists compare the same normal form,
//! so `https://Example.com:443` in a flag matches the `https://example.com` a
//! browser sends.

use std::fmt;
use std::str::FromStr;

/// An origin in normal form: lower case, no default port, no trailing slash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin(String);

/// Why a string is not an origin.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an origin (scheme://host[:port], http or https)")]
pub struct NotAnOrigin(pub String);

impl FromStr for Origin {
    type Err = NotAnOrigin;

    fn from_str(raw: &str) -> Result<Self, NotAnOrigin> {
        let bad = || NotAnOrigin(raw.to_owned());
        let lower = raw.trim().to_ascii_lowercase();
        let (scheme, rest) = lower.split_once("://").ok_or_else(bad)?;
        let default_port = match scheme {
            "https" => "443",
            "http" => "80",
            _ => return Err(bad()),
        };
        // An origin has no path, query, fragment or credentials; a trailing
        // slash is forgiven because people copy origins out of address bars.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad());
        }
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal's colons are inside brackets.
            Some((host, port)) if !port.contains(']') => (host, Some(port)),
            _ => (authority, None),
        };
        if host.is_empty() {
            return Err(bad());
        }
        let normal = match port {
            None => format!("{scheme}://{host}"),
            Some(port) if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(bad());
            }
            Some(port) if port.parse::<u16>().is_err() => return Err(bad()),
            Some(port) if port == default_port => format!("{scheme}://{host}"),
            Some(port) => format!("{scheme}://{host}:{port}"),
        };
        Ok(Origin(normal))
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether an `Origin` header value names one of `allowed`. A value that is not an
/// origin (browsers send `null` from sandboxed frames and files) is never allowed.
pub fn is_allowed(allowed: &[Origin], header: &str) -> bool {
    header
        .parse::<Origin>()
        .is_ok_and(|origin| allowed.contains(&origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(raw: &str) -> Origin {
        raw.parse().expect(raw)
    }

    #[test]
    fn normal_form_drops_case_default_ports_and_a_trailing_slash() {
        assert_eq!(
            origin("https://Example.COM:443/").to_string(),
            "https://example.com"
        );
        assert_eq!(
            origin("http://localhost:80").to_string(),
            "http://localhost"
        );
        assert_eq!(
            origin("http://localhost:5173").to_string(),
            "http://localhost:5173"
        );
        assert_eq!(
            origin("https://[::1]:8443").to_string(),
            "https://[::1]:8443"
        );
        assert_eq!(origin("https://[::1]").to_string(), "https://[::1]");
    }

    #[test]
    fn what_is_not_an_origin_is_refused() {
        for raw in [
            "",
            "null",
            "example.com",
            "ftp://example.com",
            "https://",
            "https://example.com/app",
            "https://example.com?x",
            "https://user@example.com",
            "https://example.com:",
            "https://example.com:99999",
            "https://example.com:-1",
            "https://:443",
        ] {
            assert!(raw.parse::<Origin>().is_err(), "{raw:?} accepted");
        }
    }

    #[test]
    fn allowed_compares_normal_forms() {
        let list = [
            origin("https://app.example.com"),
            origin("http://localhost:5173"),
        ];
        assert!(is_allowed(&list, "https://app.example.com"));
        assert!(is_allowed(&list, "HTTPS://APP.EXAMPLE.COM:443"));
        assert!(is_allowed(&list, "http://localhost:5173"));
        assert!(!is_allowed(&list, "http://app.example.com"));
        assert!(!is_allowed(&list, "https://evil.example.com"));
        assert!(!is_allowed(&list, "http://localhost:5174"));
        assert!(!is_allowed(&list, "null"));
        assert!(!is_allowed(&[], "https://app.example.com"));
    }
}
