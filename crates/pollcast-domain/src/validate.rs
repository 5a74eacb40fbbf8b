//! The contract's limits on text a client sends. Lengths count characters (Unicode
//! scalar values), not bytes, and text made only of white space counts as empty.

use crate::{DomainError, DomainResult};

/// Session titles: 1–200 characters.
pub const TITLE: (usize, usize) = (1, 200);
/// Display names: 1–64 characters.
pub const DISPLAY_NAME: (usize, usize) = (1, 64);
/// Poll questions: 1–500 characters.
pub const QUESTION: (usize, usize) = (1, 500);
/// Poll option texts: 1–200 characters.
pub const OPTION_TEXT: (usize, usize) = (1, 200);
/// Options per poll: 2–20.
pub const OPTIONS: (usize, usize) = (2, 20);

/// Checks that `value` (named `field` in the error) has a length within `limits`.
pub fn text(field: &str, value: &str, (min, max): (usize, usize)) -> DomainResult<()> {
    let len = value.chars().count();
    if value.trim().is_empty() && min > 0 {
        return Err(DomainError::ValidationFailed(format!(
            "{field} must not be empty"
        )));
    }
    if len < min || len > max {
        return Err(DomainError::ValidationFailed(format!(
            "{field} must be {min}–{max} characters, got {len}"
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
}
