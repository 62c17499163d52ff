//! Text that enters posfleet: the one check every entry point applies (the agent's local
//! API, the controller's transaction validation, configuration values, and every
//! operator-entered field of the admin API: reasons, notes, labels, group, user and token
//! names, comments).
//!
//! Refused, with a [`TextProblem`] whose message names no value:
//!
//! - control characters: Unicode category Cc, none excepted (newlines and tabs too: every
//!   field is one line, and escapes could rewrite an admin's terminal);
//! - bidi controls (U+202A..U+202E, U+2066..U+2069, U+200E, U+200F, U+061C): they make a
//!   text display differently from what it is (a reason or note could hide its content);
//! - a full card number, as the [PAN guard](crate::pan) finds it.
//!
//! Callers name the field in their error; [`shown`] is what may be echoed or logged of a
//! value that names something (a user or group name in a path): the value, or a
//! placeholder if it holds a card number.

use std::borrow::Cow;

use crate::pan::{TextKind, contains_pan_in};

/// Why a text was refused. The messages never repeat the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TextProblem {
    #[error(
        "holds what looks like a full card number (PAN); enter only a masked card (BIN and \
         last four) or a token"
    )]
    CardNumber,
    #[error("contains control characters (newlines, tabs, escapes)")]
    Control,
    #[error(
        "contains bidirectional control characters (they make text display differently from \
         what it is)"
    )]
    Bidi,
}

/// What [`shown`] puts in place of a value that holds a card number.
pub const WITHHELD: &str = "(withheld: looks like a card number)";

/// How posfleet joins values into one text it writes (audit targets and details, logs): a
/// comma *and* a space, a gap the PAN guard never links digit groups across (rule 1 of
/// [`crate::pan`] links across one punctuation character, or white space alone). Values that
/// are clean one by one then stay clean side by side: numeric terminal ids `12345678,12345679`
/// joined by a bare comma would read as one 16-digit run, and fail the guard one time in ten.
pub const LIST_SEPARATOR: &str = ", ";

/// The bidi controls refused in text: embeddings and overrides, isolates, and the marks.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
    )
}

/// Checks operator-entered text (module docs).
pub fn check_operator_text(text: &str) -> Result<(), TextProblem> {
    check_text(text, TextKind::General)
}

/// Checks text of `kind` (module docs); [`TextKind::ProductCode`] for SKUs.
pub fn check_text(text: &str, kind: TextKind) -> Result<(), TextProblem> {
    if text.chars().any(char::is_control) {
        return Err(TextProblem::Control);
    }
    if text.chars().any(is_bidi_control) {
        return Err(TextProblem::Bidi);
    }
    if contains_pan_in(text, kind) {
        return Err(TextProblem::CardNumber);
    }
    Ok(())
}

/// `text` as it may be echoed in an error or written to a log or the audit log: itself, or
/// [`WITHHELD`] if it holds a card number.
pub fn shown(text: &str) -> Cow<'_, str> {
    if contains_pan_in(text, TextKind::General) {
        Cow::Borrowed(WITHHELD)
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_joined_with_the_list_separator_never_link_into_a_card_number() {
        // 8-digit terminal ids in a row: joined by a bare comma, the run is 16+ digits.
        let ids: Vec<String> = (0..2000u32)
            .map(|i| format!("{}", 41_000_000 + i * 7))
            .collect();
        let bare = ids
            .chunks(2)
            .filter(|p| crate::pan::contains_pan(&p.join(",")))
            .count();
        assert!(
            bare > 0,
            "a bare comma links the ids (else this test proves nothing)"
        );
        for pair in ids.chunks(2) {
            let joined = pair.join(super::LIST_SEPARATOR);
            assert!(!crate::pan::contains_pan(&joined), "{joined}");
        }
    }

    use super::*;

    #[test]
    fn each_problem_is_found_and_named_without_the_text() {
        for (text, problem) in [
            ("card 4111.1111.1111.1111", TextProblem::CardNumber),
            ("4111a1111b1111c1111", TextProblem::CardNumber),
            ("two\nlines", TextProblem::Control),
            ("tab\there", TextProblem::Control),
            ("esc \u{1b}[2J", TextProblem::Control),
            ("del \u{7f}", TextProblem::Control),
            ("c1 \u{85}", TextProblem::Control),
            ("evil \u{202E}txt.exe", TextProblem::Bidi),
            ("\u{2066}isolate\u{2069}", TextProblem::Bidi),
            ("mark\u{200F}", TextProblem::Bidi),
            ("arabic mark \u{061C}", TextProblem::Bidi),
        ] {
            assert_eq!(check_operator_text(text), Err(problem), "{text:?}");
            assert!(!problem.to_string().contains("1111"));
        }
        for ok in [
            "stolen from till 3",
            "Übergabe an Frau Müller, Filiale 7",
            "وصلت",
            "2026-12-07 07:33:31.123456",
            "411111******1111",
            "",
        ] {
            assert_eq!(check_operator_text(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn product_codes_keep_their_gtin() {
        // A valid EAN-13 that is also Luhn-valid.
        let ean = "4006381333023";
        assert_eq!(
            check_text(ean, TextKind::General),
            Err(TextProblem::CardNumber)
        );
        assert_eq!(check_text(ean, TextKind::ProductCode), Ok(()));
    }

    #[test]
    fn shown_withholds_card_numbers_only() {
        assert_eq!(shown("alice"), "alice");
        assert_eq!(shown("4111.1111.1111.1111"), WITHHELD);
    }
}
