//! The contract's rules for text a client sends, in one place. Lengths count
//! characters (Unicode scalar values), not bytes; text made only of white space
//! counts as empty; U+0000 and other control characters are refused (a question
//! may hold tabs and newlines), so the answer is the same on every database
//! (PostgreSQL cannot store U+0000 in text at all).

use crate::{DomainError, DomainResult};

/// What a text field may hold.
#[derive(Clone, Copy, Debug)]
pub struct TextRule {
    /// Fewest characters.
    pub min: usize,
    /// Most characters.
    pub max: usize,
    /// Tabs and newlines allowed (the one kind of control character that is).
    pub multiline: bool,
}

/// Session titles: 1–200 characters.
pub const TITLE: TextRule = TextRule {
    min: 1,
    max: 200,
    multiline: false,
};
/// Display names: 1–64 characters.
pub const DISPLAY_NAME: TextRule = TextRule {
    min: 1,
    max: 64,
    multiline: false,
};
/// Poll questions: 1–500 characters, tabs and newlines allowed.
pub const QUESTION: TextRule = TextRule {
    min: 1,
    max: 500,
    multiline: true,
};
/// Poll option texts: 1–200 characters.
pub const OPTION_TEXT: TextRule = TextRule {
    min: 1,
    max: 200,
    multiline: false,
};
/// Options per poll: 2–20.
pub const OPTIONS: (usize, usize) = (2, 20);

/// Checks `value` (named `field` in the error) against `rule`.
pub fn text(field: &str, value: &str, rule: TextRule) -> DomainResult<()> {
    let len = value.chars().count();
    if value.trim().is_empty() && rule.min > 0 {
        return Err(DomainError::ValidationFailed(format!(
            "{field} must not be empty"
        )));
    }
    if len < rule.min || len > rule.max {
        return Err(DomainError::ValidationFailed(format!(
            "{field} must be {}–{} characters, got {len}",
            rule.min, rule.max
        )));
    }
    if let Some(bad) = value
        .chars()
        .find(|&c| c.is_control() && !(rule.multiline && matches!(c, '\t' | '\n')))
    {
        return Err(DomainError::ValidationFailed(format!(
            "{field} must not contain control characters (found U+{:04X})",
            u32::from(bad)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_characters_not_bytes() {
        assert!(text("t", &"é".repeat(200), TITLE).is_ok());
        assert!(text("t", &"é".repeat(201), TITLE).is_err());
    }

    #[test]
    fn blank_text_is_empty() {
        assert!(text("t", "   ", TITLE).is_err());
        assert!(text("t", "", TITLE).is_err());
    }

    #[test]
    fn control_characters_are_refused_except_tab_and_newline_in_questions() {
        for bad in [
            "a\u{0}b",
            "a\u{7}b",
            "a\u{1b}[31mb",
            "a\u{7f}b",
            "a\u{85}b",
            "a\rb",
        ] {
            assert!(text("t", bad, TITLE).is_err(), "{bad:?} in a title");
            assert!(text("q", bad, QUESTION).is_err(), "{bad:?} in a question");
        }
        assert!(text("q", "line one\n\tline two", QUESTION).is_ok());
        assert!(text("t", "line one\nline two", TITLE).is_err());
        assert!(text("t", "a\tb", OPTION_TEXT).is_err());
        // Not control characters: other scripts, emoji, zero-width joiners.
        assert!(text("t", "Grüße 👩‍💻 مرحبا", TITLE).is_ok());
    }
}
