//! The scanner behind [`super::find_pans`]: the text as tokens (digit groups, letters, gaps),
//! the recognised shapes taken out (`shapes.rs`), then the two rules of the module docs.

use std::ops::Range;

use super::shapes;
use super::{MAX_PAN_DIGITS, MIN_PAN_DIGITS, TextKind, gs1_valid, luhn_valid};

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Decimal digits (ASCII or full-width): `digits[first..first + len]` of [`Tokens`].
    Digits { first: usize, len: usize },
    /// Other letters and digits, of any script: `chars` of them, and the letter itself if it
    /// is one ASCII letter.
    Letters { chars: usize, ascii: Option<u8> },
    /// Everything else (white space, punctuation, symbols, controls). `joins`: the digit
    /// groups on both sides belong to one run; `single`: the one visible character, if the
    /// gap has exactly one.
    Gap { joins: bool, single: Option<char> },
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Tok {
    pub(super) kind: Kind,
    /// Byte range in the text.
    pub(super) start: usize,
    pub(super) end: usize,
}

/// The tokens of one text, with every digit's value and position, and which digit groups
/// the recognised shapes took out.
pub(super) struct Tokens<'a> {
    pub(super) text: &'a str,
    pub(super) toks: Vec<Tok>,
    pub(super) digits: Vec<u8>,
    /// Byte range of each digit.
    at: Vec<Range<usize>>,
    /// Taken out by a shape (neither rule sees the group).
    pub(super) excluded: Vec<bool>,
    /// Inside a long hex string: not part of a run of the first rule.
    inner_hex: Vec<bool>,
}

/// The value of a decimal digit as the guard reads it: ASCII and full-width digits.
pub(super) fn digit_value(c: char) -> Option<u8> {
    match c {
        '0'..='9' => Some(c as u8 - b'0'),
        // Full-width digits U+FF10..U+FF19.
        '\u{FF10}'..='\u{FF19}' => u8::try_from(u32::from(c) - 0xFF10).ok(),
        _ => None,
    }
}

/// Characters a gap ignores: zero-width characters, the soft hyphen and the bidi controls.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// White space and dashes: any number of them join digit groups (the guard's old rule).
fn is_soft(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '-' | '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE58}' | '\u{FE63}' | '\u{FF0D}'
        )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Digit,
    Letter,
    Other,
}

fn class(c: char) -> Class {
    if digit_value(c).is_some() {
        Class::Digit
    } else if c.is_alphanumeric() {
        Class::Letter
    } else {
        Class::Other
    }
}

impl<'a> Tokens<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        let mut tokens = Tokens {
            text,
            toks: Vec::new(),
            digits: Vec::new(),
            at: Vec::new(),
            excluded: Vec::new(),
            inner_hex: Vec::new(),
        };
        let mut chars = text.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            let class = class(c);
            let mut end = start + c.len_utf8();
            let mut members = vec![c];
            while let Some(&(i, next)) = chars.peek() {
                if self::class(next) != class {
                    break;
                }
                end = i + next.len_utf8();
                members.push(next);
                chars.next();
            }
            let kind = match class {
                Class::Digit => {
                    let first = tokens.digits.len();
                    let mut at = start;
                    for m in &members {
                        tokens.digits.push(digit_value(*m).unwrap_or_default());
                        tokens.at.push(at..at + m.len_utf8());
                        at += m.len_utf8();
                    }
                    Kind::Digits {
                        first,
                        len: members.len(),
                    }
                }
                Class::Letter => Kind::Letters {
                    chars: members.len(),
                    ascii: match members.as_slice() {
                        [one] if one.is_ascii_alphabetic() => Some(*one as u8),
                        _ => None,
                    },
                },
                // Control characters other than white space end a run: no one writes a
                // number with them, and in binary files they are structure (length bytes
                // between short decimal strings).
                Class::Other if members.iter().any(|c| c.is_control() && !c.is_whitespace()) => {
                    Kind::Gap {
                        joins: false,
                        single: None,
                    }
                }
                Class::Other => {
                    let visible: Vec<char> =
                        members.into_iter().filter(|c| !is_invisible(*c)).collect();
                    Kind::Gap {
                        joins: visible.len() <= 1 || visible.iter().all(|c| is_soft(*c)),
                        single: match visible.as_slice() {
                            [one] => Some(*one),
                            _ => None,
                        },
                    }
                }
            };
            tokens.toks.push(Tok { kind, start, end });
        }
        tokens.excluded = vec![false; tokens.toks.len()];
        tokens.inner_hex = vec![false; tokens.toks.len()];
        tokens
    }

    /// The digits of token `t`, if it is a digit group no shape took.
    pub(super) fn group(&self, t: usize) -> Option<&[u8]> {
        match self.toks.get(t)?.kind {
            Kind::Digits { first, len } if !self.excluded[t] => Some(&self.digits[first..][..len]),
            _ => None,
        }
    }

    /// The gap after token `t` and the digit group after it: `(single, joins, index)`.
    pub(super) fn link(&self, t: usize) -> Option<(Option<char>, bool, usize)> {
        match self.toks.get(t + 1)?.kind {
            Kind::Gap { joins, single } => {
                self.group(t + 2)?;
                Some((single, joins, t + 2))
            }
            _ => None,
        }
    }

    /// The digit group after token `t` if the gap between is exactly one of `seps`.
    pub(super) fn link_by(&self, t: usize, seps: &[char]) -> Option<usize> {
        match self.link(t)? {
            (Some(c), _, next) if seps.contains(&c) => Some(next),
            _ => None,
        }
    }

    /// Takes the digit groups of tokens `from..=to` out of both rules.
    pub(super) fn exclude(&mut self, from: usize, to: usize) {
        for flag in &mut self.excluded[from..=to] {
            *flag = true;
        }
    }

    /// Takes the digit groups of tokens `from..=to` out of the first rule only.
    pub(super) fn exclude_from_runs(&mut self, from: usize, to: usize) {
        for flag in &mut self.inner_hex[from..=to] {
            *flag = true;
        }
    }

    /// Byte range of the digits `from..to`.
    fn span(&self, from: usize, to: usize) -> Range<usize> {
        self.at[from].start..self.at[to - 1].end
    }
}

/// Calls `found` with the byte range of every PAN in `text`; stops when it returns `false`.
pub(super) fn scan(text: &str, kind: TextKind, found: &mut dyn FnMut(Range<usize>) -> bool) {
    // Every rule needs 13 digits.
    if text.chars().filter(|c| digit_value(*c).is_some()).count() < MIN_PAN_DIGITS {
        return;
    }
    let mut tokens = Tokens::new(text);
    shapes::take_out(&mut tokens);
    if runs(&tokens, kind, found) {
        letter_groups(&tokens, found);
    }
}

/// Rule 1: digit groups joined by separators. Returns `false` if `found` asked to stop.
fn runs(tokens: &Tokens, kind: TextKind, found: &mut dyn FnMut(Range<usize>) -> bool) -> bool {
    // The current run: its first and end digit, groups, and its last digit token.
    let mut run: Option<(usize, usize, usize, usize)> = None;
    for (t, tok) in tokens.toks.iter().enumerate() {
        match tok.kind {
            Kind::Digits { first, len } if !tokens.excluded[t] && !tokens.inner_hex[t] => match run
            {
                Some((from, _, groups, last))
                    if last + 2 == t
                        && matches!(tokens.toks[t - 1].kind, Kind::Gap { joins: true, .. }) =>
                {
                    run = Some((from, first + len, groups + 1, t));
                }
                _ => {
                    if let Some(done) = run.take() {
                        if !check_run(tokens, kind, done, found) {
                            return false;
                        }
                    }
                    run = Some((first, first + len, 1, t));
                }
            },
            Kind::Gap { joins: true, .. } => {}
            _ => {
                if let Some(done) = run.take() {
                    if !check_run(tokens, kind, done, found) {
                        return false;
                    }
                }
            }
        }
    }
    match run {
        Some(done) => check_run(tokens, kind, done, found),
        None => true,
    }
}

/// Checks one run; returns `false` if `found` asked to stop.
fn check_run(
    tokens: &Tokens,
    kind: TextKind,
    (from, to, groups, _): (usize, usize, usize, usize),
    found: &mut dyn FnMut(Range<usize>) -> bool,
) -> bool {
    let digits = &tokens.digits[from..to];
    if digits.len() < MIN_PAN_DIGITS {
        return true;
    }
    if kind == TextKind::ProductCode
        && groups == 1
        && matches!(digits.len(), 8 | 12 | 13 | 14)
        && gs1_valid(digits)
    {
        return true;
    }
    if has_luhn_window(digits) {
        return found(tokens.span(from, to));
    }
    true
}

/// True if a window of 13..=19 digits of `digits` passes the Luhn check.
pub(super) fn has_luhn_window(digits: &[u8]) -> bool {
    (MIN_PAN_DIGITS..=MAX_PAN_DIGITS.min(digits.len()))
        .any(|len| digits.windows(len).any(luhn_valid))
}

/// Card-number groupings recognised with letters between the groups.
const LETTER_PATTERNS: [&[usize]; 4] = [&[4, 4, 4, 4], &[4, 4, 4, 4, 3], &[4, 6, 5], &[4, 6, 4]];

/// Rule 2: digit groups of a card-number grouping with single ASCII letters between them.
fn letter_groups(tokens: &Tokens, found: &mut dyn FnMut(Range<usize>) -> bool) {
    // A chain: digit tokens linked by one ASCII letter or a joining gap; `true` = by a letter.
    let mut chain: Vec<usize> = Vec::new();
    let mut by_letter: Vec<bool> = Vec::new();
    let mut t = 0;
    while t < tokens.toks.len() {
        if tokens.group(t).is_none() {
            t += 1;
            continue;
        }
        chain.push(t);
        let letter = match tokens.toks.get(t + 1).map(|tok| tok.kind) {
            Some(Kind::Letters {
                chars: 1,
                ascii: Some(_),
            }) => Some(true),
            Some(Kind::Gap { joins: true, .. }) => Some(false),
            _ => None,
        };
        match letter {
            Some(letter) if tokens.group(t + 2).is_some() => {
                by_letter.push(letter);
                t += 2;
            }
            _ => {
                if !check_chain(tokens, &chain, &by_letter, found) {
                    return;
                }
                chain.clear();
                by_letter.clear();
                t += 1;
            }
        }
    }
}

/// Checks every grouping inside one chain; returns `false` if `found` asked to stop.
fn check_chain(
    tokens: &Tokens,
    chain: &[usize],
    by_letter: &[bool],
    found: &mut dyn FnMut(Range<usize>) -> bool,
) -> bool {
    let lens: Vec<usize> = chain
        .iter()
        .map(|&t| tokens.group(t).map_or(0, <[u8]>::len))
        .collect();
    for start in 0..chain.len() {
        for pattern in LETTER_PATTERNS {
            let end = start + pattern.len();
            if end > chain.len()
                || lens[start..end] != *pattern
                || !by_letter[start..end - 1].iter().any(|l| *l)
            {
                continue;
            }
            let (Kind::Digits { first, .. }, Kind::Digits { first: last, len }) = (
                tokens.toks[chain[start]].kind,
                tokens.toks[chain[end - 1]].kind,
            ) else {
                continue;
            };
            // Digit groups are stored in text order: the chain's digits are contiguous.
            if luhn_valid(&tokens.digits[first..last + len])
                && !found(tokens.span(first, last + len))
            {
                return false;
            }
        }
    }
    true
}

/// The longest sequence of digits linked by joining gaps or single ASCII letters, ignoring
/// every recognised shape: an upper bound of what either rule can see.
pub(super) fn longest_linked_digits(text: &str) -> usize {
    let tokens = Tokens::new(text);
    let (mut longest, mut current) = (0, 0);
    let mut last_digits: Option<usize> = None;
    for (t, tok) in tokens.toks.iter().enumerate() {
        match tok.kind {
            Kind::Digits { len, .. } => {
                let linked = last_digits.is_some_and(|last| {
                    last + 2 == t
                        && matches!(
                            tokens.toks[t - 1].kind,
                            Kind::Gap { joins: true, .. }
                                | Kind::Letters {
                                    chars: 1,
                                    ascii: Some(_)
                                }
                        )
                });
                current = if linked { current + len } else { len };
                longest = longest.max(current);
                last_digits = Some(t);
            }
            Kind::Gap { joins: true, .. }
            | Kind::Letters {
                chars: 1,
                ascii: Some(_),
            } => {}
            _ => last_digits = None,
        }
    }
    longest
}
