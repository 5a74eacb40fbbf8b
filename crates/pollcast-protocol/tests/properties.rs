//! Properties of everything a client or the network hands the protocol layer:
//! event ids, tokens, origins and encoded frames. Inputs are generated (proptest),
//! so these double as a fuzzer that runs on stable Rust in every test run; the
//! longer coverage-guided runs live in `fuzz/` (see `docs/operations.md`).

use std::time::Duration;

use pollcast_protocol::event_id::{EventIdError, MAX_POSITION};
use pollcast_protocol::token::{Claims, TokenError, TokenKeys};
use pollcast_protocol::{
    DomainEvent, Envelope, EventId, Origin, PresenceSignal, Role, SessionEvent, WireFormat,
};
use proptest::prelude::*;
use uuid::Uuid;

fn keys() -> TokenKeys {
    TokenKeys::new(b"property test secret", Duration::from_secs(3600))
}

/// Strings that look like what arrives: mostly printable, sometimes anything.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,80}",
        any::<String>(),
        "[0-9a-fA-F-]{30,40}",
        "v1\\.[A-Za-z0-9_.-]{0,200}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn event_ids_round_trip_and_order_like_their_positions(
        session in any::<u128>(),
        a in 1..=MAX_POSITION,
        b in 1..=MAX_POSITION,
    ) {
        let session = Uuid::from_u128(session);
        let (ida, idb) = (EventId::new(session, a), EventId::new(session, b));
        let parsed: EventId = ida.to_string().parse().expect("own ids parse");
        prop_assert_eq!(parsed.position_in(session), Ok(a));
        // Ordered as positions, as ids and as the strings clients compare.
        prop_assert_eq!(a.cmp(&b), ida.cmp(&idb));
        prop_assert_eq!(a.cmp(&b), ida.to_string().cmp(&idb.to_string()));
    }

    #[test]
    fn an_event_id_of_another_session_is_recognised_as_such(
        session in any::<u128>(),
        other in any::<u128>(),
        position in 1..=MAX_POSITION,
    ) {
        let (session, other) = (Uuid::from_u128(session), Uuid::from_u128(other));
        // The id keeps 76 bits of the session; sessions equal there share ids.
        let kept = ((1u128 << 80) - 1) & !(0xF << 76);
        prop_assume!(session.as_u128() & kept != other.as_u128() & kept);
        let id = EventId::new(session, position);
        prop_assert_eq!(id.position_in(other), Err(EventIdError::OtherSession));
    }

    #[test]
    fn any_string_offered_as_an_event_id_parses_or_is_refused(raw in text()) {
        if let Ok(id) = raw.parse::<EventId>() {
            let again: EventId = id.to_string().parse().expect("canonical form parses");
            prop_assert_eq!(id, again);
        }
    }

    #[test]
    fn any_string_offered_as_a_token_is_refused(raw in text()) {
        prop_assert!(keys().verify(&raw).is_err());
    }

    #[test]
    fn issued_tokens_verify_to_their_claims(
        session in any::<u128>(),
        participant in proptest::option::of(any::<u128>()),
    ) {
        let (session, participant) = (Uuid::from_u128(session), participant.map(Uuid::from_u128));
        let role = if participant.is_some() { Role::Participant } else { Role::Presenter };
        let token = keys().issue(session, role, participant);
        let claims = keys().verify(&token).expect("own token verifies");
        prop_assert_eq!(claims.session_id, session);
        prop_assert_eq!(claims.participant_id, participant);
        prop_assert_eq!(claims.role, role);
    }

    #[test]
    fn a_token_changed_in_any_one_place_is_refused(
        session in any::<u128>(),
        at in any::<prop::sample::Index>(),
        replacement in prop::char::range('-', 'z'),
    ) {
        let token = keys().issue(Uuid::from_u128(session), Role::Presenter, None);
        let at = at.index(token.len());
        let mut changed: Vec<char> = token.chars().collect();
        prop_assume!(changed[at] != replacement);
        changed[at] = replacement;
        let changed: String = changed.into_iter().collect();
        prop_assert_eq!(keys().verify(&changed), Err(TokenError::Invalid));
    }

    #[test]
    fn a_token_of_another_secret_is_refused(session in any::<u128>()) {
        let other = TokenKeys::new(b"another secret entirely", Duration::from_secs(3600));
        let token = other.issue(Uuid::from_u128(session), Role::Presenter, None);
        prop_assert_eq!(keys().verify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn origins_parse_to_a_normal_form_that_parses_to_itself(raw in text()) {
        if let Ok(origin) = raw.parse::<Origin>() {
            let again: Origin = origin.to_string().parse().expect("normal form parses");
            prop_assert_eq!(&origin, &again);
            prop_assert_eq!(origin.to_string(), origin.to_string().to_ascii_lowercase());
        }
    }

    /// Stream messages and presence signals come over the network: bytes that are
    /// not a valid frame are an error, never a panic or a runaway allocation
    /// (MessagePack length prefixes can claim billions of elements).
    #[test]
    fn arbitrary_bytes_never_decode_into_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for format in [WireFormat::Json, WireFormat::MessagePack] {
            let _ = format.decode::<Envelope<DomainEvent>>(&bytes);
            let _ = format.decode::<SessionEvent>(&bytes);
            let _ = format.decode::<PresenceSignal>(&bytes);
            let _ = format.decode::<Claims>(&bytes);
        }
    }
}
