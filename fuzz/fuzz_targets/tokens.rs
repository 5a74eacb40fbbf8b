//! Bearer tokens: anything that is not a token this secret signed is refused.
#![no_main]

use std::time::Duration;

use pollcast_protocol::token::TokenKeys;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let keys = TokenKeys::new(b"fuzzing secret", Duration::from_secs(60));
    assert!(
        keys.verify(token).is_err(),
        "a forged token verified: {token:?}"
    );
});
