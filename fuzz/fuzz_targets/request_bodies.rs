//! JSON bodies of the write endpoints, parsed and validated as the API does.
#![no_main]

use pollcast_domain::{NewPoll, validate};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(poll) = serde_json::from_slice::<NewPoll>(data)
        && let Ok(max_choices) = poll.validate()
    {
        assert!((1..=poll.options.len() as u32).contains(&max_choices));
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        for (field, rule) in [
            ("title", validate::TITLE),
            ("displayName", validate::DISPLAY_NAME),
        ] {
            if let Some(text) = value[field].as_str()
                && validate::text(field, text, rule).is_ok()
            {
                assert!(!text.contains('\0'), "{field} with NUL accepted");
            }
        }
    }
});
