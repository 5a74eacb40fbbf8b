//! `GET /ws?sessionId=…&token=…[&lastEventId=…][&format=json|msgpack]`: what the
//! client asked for, or why the request is malformed (4400).

use pollcast_protocol::{EventId, WireFormat};
use uuid::Uuid;

/// A well-formed connection request (the token is not verified yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The session's room to join.
    pub session_id: Uuid,
    /// Bearer token (never logged).
    pub token: String,
    /// Resume after this event, if given.
    pub last_event_id: Option<EventId>,
    /// Wire format of server frames.
    pub format: WireFormat,
}

/// Why a query is malformed; the message goes into `connection:error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// The wire format the query asks for; JSON when absent or unreadable, so even a
/// refusal of a bad `format` is sent in a format the client can read.
pub fn format_of(query: &str) -> WireFormat {
    let format = form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "format")
        .map(|(_, value)| value);
    match format.as_deref() {
        Some("msgpack") => WireFormat::MessagePack,
        _ => WireFormat::Json,
    }
}

/// Parses the query string.
pub fn parse(query: &str) -> Result<ConnectRequest, BadRequest> {
    let mut session_id = None;
    let mut token = None;
    let mut last_event_id = None;
    let mut format = WireFormat::Json;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "sessionId" => {
                let id = Uuid::parse_str(&value)
                    .map_err(|_| BadRequest("sessionId is not a UUID".into()))?;
                session_id = Some(id);
            }
            "token" => token = Some(value.into_owned()),
            "lastEventId" if value.is_empty() => {}
            "lastEventId" => {
                let id = value
                    .parse::<EventId>()
                    .map_err(|_| BadRequest("lastEventId is not an event id".into()))?;
                last_event_id = Some(id);
            }
            "format" => {
                format = match value.as_ref() {
                    "json" => WireFormat::Json,
                    "msgpack" => WireFormat::MessagePack,
                    _ => return Err(BadRequest("format must be json or msgpack".into())),
                }
            }
            // Unknown parameters (cache busters, tracing ids) are ignored.
            _ => {}
        }
    }
    let session_id = session_id.ok_or_else(|| BadRequest("sessionId is required".into()))?;
    let token = token.ok_or_else(|| BadRequest("token is required".into()))?;
    Ok(ConnectRequest {
        session_id,
        token,
        last_event_id,
        format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_parameter() {
        let session = Uuid::now_v7();
        let last = EventId::new(session, 9);
        let query =
            format!("sessionId={session}&token=a%2Bb&lastEventId={last}&format=msgpack&x=1");
        let request = parse(&query).expect("well-formed");
        assert_eq!(request.session_id, session);
        assert_eq!(request.token, "a+b");
        assert_eq!(request.last_event_id, Some(last));
        assert_eq!(request.format, WireFormat::MessagePack);
    }

    #[test]
    fn missing_or_malformed_parameters_are_bad_requests() {
        let session = Uuid::now_v7();
        for query in [
            String::new(),
            format!("sessionId={session}"),
            "token=t".to_owned(),
            "sessionId=nope&token=t".to_owned(),
            format!("sessionId={session}&token=t&format=xml"),
            format!("sessionId={session}&token=t&lastEventId={session}"),
            format!("sessionId={session}&token=t&lastEventId=%FF%FE"),
        ] {
            assert!(parse(&query).is_err(), "{query}");
        }
    }

    #[test]
    fn refusal_format_falls_back_to_json() {
        assert_eq!(format_of("format=msgpack"), WireFormat::MessagePack);
        assert_eq!(format_of("format=xml"), WireFormat::Json);
        assert_eq!(format_of("%%%"), WireFormat::Json);
    }
}
