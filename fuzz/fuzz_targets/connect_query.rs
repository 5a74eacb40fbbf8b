//! The `/ws` query string: session id, token, `lastEventId`, format.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(query) = std::str::from_utf8(data) {
        let _ = pollcast_edge::query::parse(query);
    }
});
