//! Bytes a client sends after the WebSocket upgrade, through the connection reader.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pollcast_edge::fuzzing::client_bytes(data);
});
