//! The PAN guard: finds full card numbers (PANs) in text, so that none is ever stored, sent or
//! logged (PCI DSS; DESIGN.md §4).
//!
//! A PAN is **13 to 19 digits that pass the Luhn check**, written with or without separators
//! between the digits. The guard is deliberately wider than a real PAN detector:
//!
//! - Digits joined by separators form one run: ASCII space and every other white space, the
//!   hyphen-minus and the Unicode dashes/minus signs. `4111 1111-1111  1111` is one run of 16
//!   digits.
//! - Every window of 13..=19 consecutive digits of a run is checked, so a PAN glued to other
//!   digits (`ref 0424111111111111111`) is found too. A consequence: almost every run of 20 or
//!   more digits holds some Luhn-valid window and is refused. Identifiers that the payment
//!   application sends must therefore never hold 13 or more digits in a row (letters break a
//!   run; dashes and spaces do not).
//! - Digits are ASCII `0-9` and the full-width forms `０-９`.
//!
//! The guard never returns or logs the number it found, only whether there is one.

/// Fewest digits of a PAN (ISO/IEC 7812).
pub const MIN_PAN_DIGITS: usize = 13;
/// Most digits of a PAN.
pub const MAX_PAN_DIGITS: usize = 19;

/// True if `text` holds a full PAN anywhere (see the module docs).
pub fn contains_pan(text: &str) -> bool {
    // Fast path: fewer than 13 digits in the whole text cannot hold a PAN.
    if text.chars().filter(|c| digit_value(*c).is_some()).count() < MIN_PAN_DIGITS {
        return false;
    }
    let mut run: Vec<u8> = Vec::with_capacity(32);
    for c in text.chars() {
        if let Some(d) = digit_value(c) {
            run.push(d);
        } else if is_separator(c) {
            // Separators join the digits around them; leading ones are harmless.
        } else {
            if run_has_pan(&run) {
                return true;
            }
            run.clear();
        }
    }
    run_has_pan(&run)
}

/// The longest run of digits in `text`, counting digits joined by separators as one run (the
/// same runs [`contains_pan`] checks). Generators use it to prove they never produce a string
/// the guard could refuse (fewer than [`MIN_PAN_DIGITS`]).
pub fn longest_digit_run(text: &str) -> usize {
    let (mut longest, mut current) = (0, 0);
    for c in text.chars() {
        if digit_value(c).is_some() {
            current += 1;
            longest = longest.max(current);
        } else if !is_separator(c) {
            current = 0;
        }
    }
    longest
}

/// The Luhn (mod 10) check over decimal digit values, the last being the check digit.
pub fn luhn_valid(digits: &[u8]) -> bool {
    if digits.is_empty() {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

fn run_has_pan(run: &[u8]) -> bool {
    if run.len() < MIN_PAN_DIGITS {
        return false;
    }
    (MIN_PAN_DIGITS..=MAX_PAN_DIGITS.min(run.len())).any(|len| run.windows(len).any(luhn_valid))
}

fn digit_value(c: char) -> Option<u8> {
    match c {
        '0'..='9' => Some(c as u8 - b'0'),
        // Full-width digits U+FF10..U+FF19.
        '\u{FF10}'..='\u{FF19}' => u8::try_from(u32::from(c) - 0xFF10).ok(),
        _ => None,
    }
}

fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '-' | '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE58}' | '\u{FE63}' | '\u{FF0D}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Test PANs of the card schemes (public test numbers, Luhn-valid).
    const TEST_PANS: [&str; 6] = [
        "4111111111111111",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
        "4222222222222",
        "6250941006528599",
    ];

    #[test]
    fn finds_known_test_pans_in_every_notation() {
        for pan in TEST_PANS {
            assert!(contains_pan(pan), "{pan}");
            let spaced: String = pan
                .chars()
                .enumerate()
                .flat_map(|(i, c)| (i > 0 && i % 4 == 0).then_some(' ').into_iter().chain([c]))
                .collect();
            assert!(contains_pan(&spaced), "{spaced}");
            assert!(contains_pan(&spaced.replace(' ', "-")), "{spaced}");
            assert!(contains_pan(&format!("card:{pan};")), "{pan}");
            assert!(
                contains_pan(&format!("ref 42{pan}")),
                "glued to other digits"
            );
            let wide: String = pan
                .chars()
                .map(|c| char::from_u32(u32::from(c) - u32::from('0') + 0xFF10).unwrap())
                .collect();
            assert!(contains_pan(&wide), "full-width digits");
        }
        assert!(contains_pan("4111\u{00A0}1111\u{2013}1111 \t1111"));
    }

    /// Issue 10 item 7: the notations the security review got through (other single
    /// separators, mixed separators, letters between the groups).
    #[test]
    fn the_reviewers_separators_and_letters_are_found() {
        for text in [
            "4111.1111.1111.1111",
            "4111:1111:1111:1111",
            "4111_1111_1111_1111",
            "4111+1111+1111+1111",
            "4111,1111,1111,1111",
            "4111*1111*1111*1111",
            "4111/1111/1111/1111",
            "4111.1111:1111_1111",
            "4111+1111,1111*1111/",
            "4111a1111b1111c1111",
        ] {
            assert!(contains_pan(text), "not found: {text}");
        }
    }

    #[test]
    fn masked_cards_tokens_and_short_numbers_pass() {
        for ok in [
            "411111******1111",
            "555555XXXXXX4444",
            "41111111****1111",
            "tok_4f9a8b7c6d5e4f3a2b1c",
            "4111111111112", // 13 digits, fails Luhn
            "411111111111",  // 12 digits
            "TX-2024-00042",
            "",
            "2024-01-05 12:30:00",
        ] {
            assert!(!contains_pan(ok), "{ok}");
        }
    }

    #[test]
    fn luhn() {
        assert!(luhn_valid(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1, 3]));
        assert!(!luhn_valid(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1, 4]));
        assert!(!luhn_valid(&[]));
    }

    #[test]
    fn longest_run_joins_separators() {
        assert_eq!(longest_digit_run("ab 1234-5678 9x12"), 9);
        assert_eq!(longest_digit_run("no digits"), 0);
        assert_eq!(longest_digit_run("411111******1111"), 6);
    }

    /// A random Luhn-valid PAN of 13..=19 digits.
    pub(crate) fn pan_strategy() -> impl Strategy<Value = Vec<u8>> {
        (MIN_PAN_DIGITS..=MAX_PAN_DIGITS)
            .prop_flat_map(|len| proptest::collection::vec(0u8..10, len - 1))
            .prop_map(|mut body| {
                for check in 0..10 {
                    body.push(check);
                    if luhn_valid(&body) {
                        return body;
                    }
                    body.pop();
                }
                unreachable!("one check digit always fits")
            })
    }

    /// The PAN written with a separator style: none, every 4 digits, or random.
    fn render(pan: &[u8], style: u8, seps: &[bool]) -> String {
        let mut out = String::new();
        for (i, d) in pan.iter().enumerate() {
            let sep = match style % 4 {
                0 => None,
                1 => (i > 0 && i % 4 == 0).then_some(" "),
                2 => (i > 0 && i % 4 == 0).then_some("-"),
                _ => (i > 0 && seps.get(i).copied().unwrap_or(false)).then_some(" - "),
            };
            out.extend(sep);
            out.push(char::from(b'0' + d));
        }
        out
    }

    proptest! {
        #[test]
        fn a_valid_pan_embedded_anywhere_is_found(
            pan in pan_strategy(),
            style in any::<u8>(),
            seps in proptest::collection::vec(any::<bool>(), 19),
            prefix in "[ -~]{0,20}",
            suffix in "[ -~]{0,20}",
        ) {
            let text = format!("{prefix}{}{suffix}", render(&pan, style, &seps));
            prop_assert!(contains_pan(&text));
        }

        #[test]
        fn masked_cards_and_tokens_are_never_found(
            bin in "[0-9]{6,8}",
            mask in "[*Xx]{2,9}",
            last4 in "[0-9]{4}",
            token in "tok_[a-zA-Z_]{1,4}([0-9]{1,6}[a-zA-Z_]{1,4}){0,6}",
        ) {
            let masked = format!("{bin}{mask}{last4}");
            prop_assert!(!contains_pan(&masked));
            prop_assert!(!contains_pan(&token));
        }

        #[test]
        fn never_panics(text in "\\PC{0,64}") {
            let _ = contains_pan(&text);
            let _ = longest_digit_run(&text);
        }
    }
}
