//! Event ids a client sends back (`lastEventId`, `resume`).
#![no_main]

use pollcast_protocol::EventId;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<EventId>() {
        let again: EventId = id.to_string().parse().expect("canonical form parses");
        assert_eq!(id, again);
        let _ = id.position_in(uuid::Uuid::nil());
    }
});
