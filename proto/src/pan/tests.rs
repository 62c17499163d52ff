//! The guard's rules, shapes and edges (false-positive rates: `corpus_tests.rs`).

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

/// `pan` in groups of four joined by `sep`.
fn grouped(pan: &str, sep: &str) -> String {
    pan.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(sep)
}

#[test]
fn finds_known_test_pans_in_every_notation() {
    for pan in TEST_PANS {
        assert!(contains_pan(pan), "{pan}");
        for sep in [
            " ", "-", " - ", ".", ":", "_", "+", ",", "*", "/", "'", "#", "\u{00B7}",
        ] {
            let text = grouped(pan, sep);
            assert!(contains_pan(&text), "{text}");
        }
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
    // Invisible characters neither count nor break.
    assert!(contains_pan("4111\u{200B}1111\u{202E}1111\u{2066}.1111"));
}

/// Issue 10 item 7: the notations the security review got through (other single
/// separators, mixed separators, letters between the groups).
#[test]
fn the_reviewers_separators_and_letters_are_found() {
    for &text in super::REVIEW_EXAMPLES {
        assert!(contains_pan(text), "not found: {text}");
    }
}

#[test]
fn letters_join_only_card_number_groupings() {
    for text in [
        "4111a1111b1111c1111",
        "4111x1111.1111x1111",
        "3782a822463b10005",
        "6250Z9410Z0652Z8599",
        "id=4111a1111b1111c1111&x",
    ] {
        assert!(contains_pan(text), "{text}");
    }
    // Other groupings and longer letter runs are not joined; a hex id is not a card number.
    for text in [
        "411a11111b1111c1111",
        "4111ab1111cd1111ef1111",
        "41111a11111b111111",
        "4111\u{00E9}1111\u{00E9}1111\u{00E9}1111",
    ] {
        assert!(!contains_pan(text), "{text}");
    }
}

#[test]
fn masked_cards_tokens_and_short_numbers_pass() {
    for ok in [
        "411111******1111",
        "555555XXXXXX4444",
        "41111111****1111",
        "**** **** **** 1111",
        "XXXX-XXXX-XXXX-1111",
        "tok_4f9a8b7c6d5e4f3a2b1c",
        "4111111111112", // 13 digits, fails Luhn
        "411111111111",  // 12 digits
        "TX-2024-00042",
        "",
        "2024-01-05 12:30:00",
    ] {
        assert!(!contains_pan(ok), "{ok}");
    }
    // Control characters other than white space end a run (binary structure).
    assert!(!contains_pan("\u{2}4111\u{2}1111\u{2}1111\u{2}1111"));
    assert!(contains_pan("4111\t1111\n1111\r\n1111"));
    // Two separators in a row, or ", ", end a run.
    assert!(!contains_pan("4111, 1111, 1111, 1111"));
    assert!(!contains_pan("4111..1111..1111..1111"));
}

#[test]
fn recognised_shapes_pass() {
    for ok in [
        "2026-12-07 07:33:31.123456",
        "2026-12-07T07:33:31.123456789+01:00",
        "07.12.2026 07:33",
        "07.12.2026 07:33:31",
        "12/07/2026 07:33:31",
        "2026/12/07 07:33:31.123",
        "07.12.26 07:33:31.123",
        "2026-12-07 07:33:31,123 INFO",
        "07:33:31.123456789-0500",
        "20261207073331123",
        "20261207-073331",
        "INV-20261207-000123",
        "1764242400000",
        "1764242400000123",
        "1764242400.123456",
        "192.168.100.200:8883",
        "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4",
        "550e8400-e29b-41d4-a716-446655440000",
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB29 NWBK 6016 1331 9268 19",
        "RF18 5390 0754 7034",
        "1,234,567.89",
        "9.999.999.999,99",
    ] {
        assert!(!contains_pan(ok), "{ok}");
    }
    // Out of range fields are not shapes.
    assert!(contains_pan("4111-11-11 1111 1111 1111"));
    assert!(
        contains_pan("DE00 4111 1111 1111 1111"),
        "a failed mod-97 check"
    );
}

#[test]
fn a_gtin_passes_only_in_a_product_code() {
    // An EAN-13 with a valid GS1 check digit that is also Luhn-valid.
    let ean = (0..10_000u64)
        .map(|n| format!("400638{:07}", n))
        .find(|s| {
            let d: Vec<u8> = s.bytes().map(|b| b - b'0').collect();
            gs1_valid(&d) && luhn_valid(&d)
        })
        .expect("one in a hundred");
    assert!(contains_pan(&ean));
    assert!(!contains_pan_in(&ean, TextKind::ProductCode));
    assert!(!contains_pan_in(
        &format!("SKU {ean}"),
        TextKind::ProductCode
    ));
    // Joined to other digits, it is a run like any other.
    assert!(contains_pan_in(
        "4111 1111 1111 1111",
        TextKind::ProductCode
    ));
}

#[test]
fn long_hex_strings_keep_only_their_edges() {
    let inner = "abcdef4111111111111111abcdef0123";
    assert!(!contains_pan(inner));
    assert!(contains_pan("4111111111111111abcdef0123456789abcdef"));
    assert!(contains_pan("abcdef4111111111111111a"), "shorter than 24");
    // Rule 2 sees inside them.
    assert!(contains_pan("ffff4111a1111b1111c1111fffff"));
}

#[test]
fn find_pans_says_where() {
    let text = "a 4111.1111.1111.1111 b 4111a1111b1111c1111";
    let found = find_pans(text, TextKind::General);
    assert_eq!(found, vec![2..21, 24..43]);
    assert!(find_pans("nothing 2026-12-07", TextKind::General).is_empty());
    let wide = "x４１１１１１１１１１１１１１１１";
    assert_eq!(find_pans(wide, TextKind::General), vec![1..wide.len()]);
}

#[test]
fn luhn() {
    assert!(luhn_valid(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1, 3]));
    assert!(!luhn_valid(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1, 4]));
    assert!(!luhn_valid(&[]));
    assert!(gs1_valid(&[4, 0, 0, 6, 3, 8, 1, 3, 3, 3, 9, 3, 1]));
    assert!(!gs1_valid(&[4, 0, 0, 6, 3, 8, 1, 3, 3, 3, 9, 3, 2]));
}

#[test]
fn longest_run_joins_separators_and_single_letters() {
    assert_eq!(longest_digit_run("ab 1234-5678 9x12"), 11);
    assert_eq!(longest_digit_run("1234.5678:90"), 10);
    assert_eq!(longest_digit_run("12ab34"), 2);
    assert_eq!(longest_digit_run("no digits"), 0);
    assert_eq!(longest_digit_run("411111******1111"), 6);
    assert_eq!(
        longest_digit_run("2026-12-07"),
        8,
        "shapes are not taken out"
    );
}

/// A random Luhn-valid PAN of 13..=19 digits, starting with 3, 4, 5 or 6 as the card
/// schemes' numbers do (a 13-, 16- or 19-digit number starting with 14..21 is read as a Unix
/// time, module docs).
pub(crate) fn pan_strategy() -> impl Strategy<Value = Vec<u8>> {
    (MIN_PAN_DIGITS..=MAX_PAN_DIGITS, 3u8..=6)
        .prop_flat_map(|(len, first)| {
            proptest::collection::vec(0u8..10, len - 2).prop_map(move |rest| {
                let mut body = vec![first];
                body.extend(rest);
                body
            })
        })
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

/// Separators a card number is written with (rule 1).
const SEPARATORS: [&str; 14] = [
    " ", "-", " - ", "  ", ".", ":", "_", "+", ",", "*", "/", "'", "|", "\u{2013}",
];

/// The PAN written in groups of four (or 4-6-5 for 15 digits), each gap from `seps`.
fn render(pan: &[u8], seps: &[usize]) -> String {
    let cuts: &[usize] = if pan.len() == 15 {
        &[4, 10]
    } else {
        &[4, 8, 12, 16]
    };
    let mut out = String::new();
    for (i, d) in pan.iter().enumerate() {
        if let Some(k) = cuts.iter().position(|c| *c == i) {
            out.push_str(SEPARATORS[seps[k] % SEPARATORS.len()]);
        }
        out.push(char::from(b'0' + d));
    }
    out
}

proptest! {
    #[test]
    fn a_valid_pan_in_any_usual_notation_embedded_anywhere_is_found(
        pan in pan_strategy(),
        seps in proptest::collection::vec(0usize..64, 4),
        grouped in any::<bool>(),
        prefix in "([ -~]{0,19}[^0-9])?",
        suffix in "([^0-9][ -~]{0,19})?",
    ) {
        let written = if grouped {
            render(&pan, &seps)
        } else {
            pan.iter().map(|d| char::from(b'0' + d)).collect()
        };
        let text = format!("{prefix}{written}{suffix}");
        prop_assert!(contains_pan(&text), "{}", text);
    }

    #[test]
    fn a_valid_pan_with_letters_between_its_groups_of_four_is_found(
        body in proptest::collection::vec(0u8..10, 15),
        letters in "[a-zA-Z]{3}",
    ) {
        let mut pan = body;
        let check = (0..10).find(|c| { pan.push(*c); let ok = luhn_valid(&pan); pan.pop(); ok });
        pan.push(check.unwrap_or_default());
        let digits: String = pan.iter().map(|d| char::from(b'0' + d)).collect();
        let mut text = String::new();
        for (i, group) in digits.as_bytes().chunks(4).enumerate() {
            if i > 0 {
                text.push(char::from(letters.as_bytes()[i - 1]));
            }
            text.push_str(std::str::from_utf8(group).unwrap_or_default());
        }
        prop_assert!(contains_pan(&text), "{}", text);
    }

    #[test]
    fn masked_cards_and_tokens_are_never_found(
        bin in "[0-9]{6,8}",
        mask in "[*Xx]{2,9}",
        last4 in "[0-9]{4}",
        token in "tok_[a-zA-Z]{2,4}([0-9]{1,6}[a-zA-Z]{2,4}){0,6}",
    ) {
        let masked = format!("{bin}{mask}{last4}");
        prop_assert!(!contains_pan(&masked));
        prop_assert!(!contains_pan(&token));
    }

    #[test]
    fn never_panics(text in "\\PC{0,64}") {
        let _ = contains_pan(&text);
        let _ = contains_pan_in(&text, TextKind::ProductCode);
        let _ = find_pans(&text, TextKind::General);
        let _ = longest_digit_run(&text);
    }

    #[test]
    fn never_panics_on_digits_and_separators(text in "[0-9.:/+ ,_a-fA-F\u{FF10}-\u{FF19}-]{0,80}") {
        let found = find_pans(&text, TextKind::General);
        prop_assert_eq!(found.is_empty(), !contains_pan(&text));
        for range in found {
            prop_assert!(text.get(range).is_some());
        }
    }
}
