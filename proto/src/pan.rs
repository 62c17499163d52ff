//! The PAN guard: finds full card numbers (PANs) in text, so that none is ever stored, sent or
//! logged (PCI DSS; docs/security.md item 7). Every place where text enters posfleet uses it: the
//! agent's local API, the controller's transaction validation, configuration values, and
//! every operator-entered text through [`crate::text`]; the repository's own scan of data
//! directories (`tests/src/panscan.rs`) reports exactly what [`find_pans`] finds.
//!
//! A PAN is **13 to 19 digits that pass the Luhn check**. Digits are ASCII `0-9` and the
//! full-width forms `０-９`. The guard never returns or logs the number it found, only
//! whether (and, for the scan, where) there is one.
//!
//! # Rule 1: digit groups joined by separators
//!
//! Digit groups form one **run** when the characters between two groups (the gap) are
//!
//! - only white space and dashes, any number of them (`4111 1111 - 1111  1111`), or
//! - exactly one character that is not a letter or digit, whatever it is:
//!   `. : _ + , * / ' # ( )` … (`4111.1111:1111_1111`, mixed separators too).
//!
//! Zero-width characters, the soft hyphen and bidi controls in a gap are ignored (they
//! neither count nor break). Letters, gaps of two or more characters that are not all white
//! space or dashes (`", "`, `" / "`, `"**"`), and control characters other than white space
//! end a run (text entry refuses control characters anyway; in binary files they are
//! structure, such as the length bytes between short decimal strings in a sled file). Every window of 13..=19
//! consecutive digits of a run is checked, so a PAN glued to other digits
//! (`ref 0424111111111111111`) is found too.
//!
//! # Rule 2: letters between the groups of a card-number grouping
//!
//! Letters cannot join digit groups in general: a hex id would then be one long digit run
//! (a random 64-hex string holds about 40 digits) and be refused almost always. The guard
//! therefore recognises only the groupings card numbers are written in: 4-4-4-4,
//! 4-4-4-4-3, 4-6-5 (Amex) and 4-6-4 (Diners), whose groups are linked by **single ASCII
//! letters** (at least one) or by the separators of rule 1: `4111a1111b1111c1111`. The
//! whole grouping must pass the Luhn check. Measured on random hex ids this adds under
//! 0.01 % refusals (`corpus_tests.rs`).
//!
//! # Shapes that are not card numbers
//!
//! With `.` and `:` joining groups, a timestamp like `2026-12-07 07:33:31.123456` becomes a
//! 20-digit run, and almost every run of 20 digits holds some Luhn-valid window. So before
//! the rules run, the guard takes out the digit groups of shapes it recognises, each with
//! strict field ranges:
//!
//! - dates `Y-M-D`, `Y/M/D`, `Y.M.D` (years 1900-2099), `D.M.Y`, `D/M/Y`, `M/D/Y`, `D-M-Y`
//!   (two-digit years only as `DD.MM.YY`), each with an optional following time `h:mm`;
//! - times `h:mm:ss` with an optional fraction (`.` or `,`, up to 9 digits) and a glued UTC
//!   offset (`+01:00`, `-0500`);
//! - compact dates and times: `YYYYMMDD`, `YYYYMMDDhhmm[ss[fraction]]`, and `YYYYMMDD`
//!   joined to `hhmm[ss]` (`20261207-073331`);
//! - Unix times of 2015-01-01 to 2037-12-31: 13, 16 or 19 digits (ms, µs, ns) or 10 digits
//!   with a fraction (`1764242400.123456`). Their leading digits (14..21) begin no card
//!   number issued today: Mastercard's 2-series starts at 2221, MIR at 2200, and no scheme
//!   issues 13-, 16- or 19-digit numbers starting with 1;
//! - IPv4 addresses with an optional `:port` or `/prefix`;
//! - UUIDs (`8-4-4-4-12` hex digits);
//! - IBANs and ISO 11649 creditor references (two capitals, two check digits, compact or
//!   in groups of four) **that pass their mod-97 check**;
//! - in a product code ([`TextKind::ProductCode`], SKUs), a lone GTIN-8/12/13/14 that
//!   passes its GS1 check digit (an EAN-13 is Luhn-valid one time in ten).
//!
//! Long hex strings (24 or more hex digits, at least one letter, one case: digests, key ids,
//! UUIDs without dashes) keep only their first and last digit group in rule 1; the groups
//! strictly inside are part of the digest, not a written number. The edges still count, so
//! a random 16- to 64-hex string is refused about 0.15-0.2 % of the time (a 64-hex string
//! 1.6 % without this rule).
//!
//! # The trade-off
//!
//! A shape is taken out only if every field is in range, so a card number in the usual
//! notations (no separators, groups of four, 4-6-5, with any one separator) is never
//! mistaken for one: the grouping of a card number (groups of 4 or more digits) is not
//! that of a date, time or address. A card number written with separators at random
//! places can still form a shape by chance: measured, 0.3 % of random separations are
//! missed (`corpus_tests.rs`). What is still refused, by design: numbers of 13 or more
//! digits in groups that are none of the shapes above and happen to pass the Luhn check:
//! comma-separated lists of numbers (`80,443,8080,8443`), phone numbers written with 13 or
//! more digits, amounts of more than 10¹⁰ written with separators, EAN-13 codes outside
//! product-code fields. The corpus test prints every rate and holds each to a bound.

mod scan;
mod shapes;

#[cfg(test)]
mod corpus_tests;
#[cfg(test)]
mod tests;

use std::ops::Range;

/// Fewest digits of a PAN (ISO/IEC 7812).
pub const MIN_PAN_DIGITS: usize = 13;
/// Most digits of a PAN.
pub const MAX_PAN_DIGITS: usize = 19;

/// The full card numbers an outside security review got accepted before the guard learned
/// other separators and letters between groups (issue 10 item 7): the test Visa number
/// 4111 1111 1111 1111 (a card nobody holds) joined by single separators, mixed separators
/// and letters. The guard finds every one; the crates' tests use this list as the review's
/// examples wherever text enters (agent local API, transaction validation, device ids).
pub const REVIEW_EXAMPLES: &[&str] = &[
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
];

/// What a text holds, for the one exemption that depends on the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextKind {
    /// Anything.
    #[default]
    General,
    /// A product code (SKU): a lone GTIN-8/12/13/14 with a valid GS1 check digit passes.
    ProductCode,
}

/// True if `text` holds a full PAN anywhere (see the module docs).
pub fn contains_pan(text: &str) -> bool {
    contains_pan_in(text, TextKind::General)
}

/// True if `text`, a field of `kind`, holds a full PAN anywhere.
pub fn contains_pan_in(text: &str, kind: TextKind) -> bool {
    let mut found = false;
    scan::scan(text, kind, &mut |_| {
        found = true;
        false
    });
    found
}

/// The byte ranges of every PAN in `text` (for rule 1 the whole run holding it, for rule 2
/// the grouping), in the order found. For scans that must say where; never log the text.
pub fn find_pans(text: &str, kind: TextKind) -> Vec<Range<usize>> {
    let mut found = Vec::new();
    scan::scan(text, kind, &mut |range| {
        found.push(range);
        true
    });
    found
}

/// The longest sequence of digits in `text` that either rule could join, ignoring the
/// recognised shapes: digit groups linked by separators (rule 1) or single ASCII letters
/// (rule 2). Generators use it to prove they never produce a string the guard could refuse
/// (fewer than [`MIN_PAN_DIGITS`]).
pub fn longest_digit_run(text: &str) -> usize {
    scan::longest_linked_digits(text)
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

/// The GS1 check digit (GTIN-8/12/13/14): weights 3 and 1 from the right, the last digit
/// being the check digit.
fn gs1_valid(digits: &[u8]) -> bool {
    let Some((&check, body)) = digits.split_last() else {
        return false;
    };
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| u32::from(d) * if i % 2 == 0 { 3 } else { 1 })
        .sum();
    (10 - sum % 10) % 10 == u32::from(check)
}
