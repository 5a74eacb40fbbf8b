//! Join codes: six characters people can read aloud without ambiguity.

use rand::Rng;

/// The contract's alphabet: no 0/O, 1/I/L.
pub const ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
/// Length of a join code.
pub const LENGTH: usize = 6;

/// A fresh random code.
pub fn generate() -> String {
    let mut rng = rand::rng();
    (0..LENGTH)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// The code as stored (upper case), if it could be a join code at all.
pub fn normalise(input: &str) -> Option<String> {
    let code = input.trim().to_ascii_uppercase();
    let valid = code.len() == LENGTH && code.bytes().all(|b| ALPHABET.contains(&b));
    valid.then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_codes_use_only_the_alphabet() {
        for _ in 0..1000 {
            let code = generate();
            assert_eq!(normalise(&code).as_deref(), Some(code.as_str()));
        }
    }

    #[test]
    fn codes_match_case_insensitively() {
        assert_eq!(normalise("k7q2xm").as_deref(), Some("K7Q2XM"));
    }

    #[test]
    fn impossible_codes_are_rejected() {
        for bad in ["", "K7Q2X", "K7Q2XMM", "K7Q2X0", "K7Q2XI", "ÄÄÄÄÄÄ"] {
            assert_eq!(normalise(bad), None, "{bad}");
        }
    }
}
