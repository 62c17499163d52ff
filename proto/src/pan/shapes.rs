//! Shapes the guard recognises and takes out before its rules run (module docs of
//! [`super`]): UUIDs, IBANs and creditor references (mod-97 checked), dates and times in
//! the common notations, Unix times of 2015-2037, IPv4 addresses; and long hex strings,
//! whose inner digit groups the first rule skips.

use super::scan::{Kind, Tokens};

/// Unix seconds of 2015-01-01T00:00:00Z and 2038-01-01T00:00:00Z: the window of Unix times
/// read as timestamps. Its leading digits (14..21) begin no card number issued today (Mastercard
/// 2-series starts at 2221, MIR at 2200; see the module docs).
const UNIX_FROM_S: u64 = 1_420_070_400;
const UNIX_TO_S: u64 = 2_145_916_800;
/// Shortest hex string whose inner digit groups the first rule skips.
const MIN_HEX_CHARS: usize = 24;

/// Marks every recognised shape in `tokens`.
pub(super) fn take_out(tokens: &mut Tokens) {
    words(tokens);
    let mut t = 0;
    while t < tokens.toks.len() {
        if tokens.group(t).is_some() {
            if let Some(end) = digit_shape(tokens, t) {
                tokens.exclude(t, end);
                t = end;
            }
        }
        t += 1;
    }
}

/// A maximal sequence of letter and digit tokens.
struct Word {
    first: usize,
    last: usize,
    text: std::ops::Range<usize>,
}

fn words(tokens: &mut Tokens) {
    let mut words = Vec::new();
    let mut t = 0;
    while t < tokens.toks.len() {
        if matches!(tokens.toks[t].kind, Kind::Gap { .. }) {
            t += 1;
            continue;
        }
        let first = t;
        while t + 1 < tokens.toks.len() && !matches!(tokens.toks[t + 1].kind, Kind::Gap { .. }) {
            t += 1;
        }
        words.push(Word {
            first,
            last: t,
            text: tokens.toks[first].start..tokens.toks[t].end,
        });
        t += 1;
    }
    let mut w = 0;
    while w < words.len() {
        if let Some(n) = uuid(tokens, &words[w..]).or_else(|| iban(tokens, &words[w..])) {
            tokens.exclude(words[w].first, words[w + n - 1].last);
            w += n;
            continue;
        }
        let word = &words[w];
        let text = &tokens.text[word.text.clone()];
        if text.len() >= MIN_HEX_CHARS && is_hex_word(text) && word.last > word.first + 1 {
            tokens.exclude_from_runs(word.first + 1, word.last - 1);
        }
        w += 1;
    }
}

/// Hex digits with at least one letter, all letters of one case.
fn is_hex_word(text: &str) -> bool {
    let lower = text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let upper = text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'));
    (lower || upper) && text.bytes().any(|b| b.is_ascii_alphabetic())
}

/// The text of the gap between two consecutive words, if they are separated by one gap.
fn between<'t>(tokens: &'t Tokens, a: &Word, b: &Word) -> Option<&'t str> {
    (a.last + 2 == b.first).then(|| &tokens.text[a.text.end..b.text.start])
}

/// `8-4-4-4-12` hex digits: the number of words it spans (5).
fn uuid(tokens: &Tokens, words: &[Word]) -> Option<usize> {
    const LENS: [usize; 5] = [8, 4, 4, 4, 12];
    let words = words.get(..5)?;
    for (i, word) in words.iter().enumerate() {
        let text = &tokens.text[word.text.clone()];
        if text.len() != LENS[i] || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        if i > 0 && between(tokens, &words[i - 1], word) != Some("-") {
            return None;
        }
    }
    Some(5)
}

/// An IBAN or an ISO 11649 creditor reference (`RF..`): two capital letters, two check
/// digits, then capitals and digits, compact or in groups of four separated by single
/// spaces, 5 to 34 characters, passing the mod-97 check. The number of words it spans.
fn iban(tokens: &Tokens, words: &[Word]) -> Option<usize> {
    let upper_alnum = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    };
    let first = &tokens.text[words.first()?.text.clone()];
    let b = first.as_bytes();
    if b.len() < 4
        || !b[..2].iter().all(u8::is_ascii_uppercase)
        || !b[2..4].iter().all(u8::is_ascii_digit)
        || !upper_alnum(first)
    {
        return None;
    }
    let mut compact = first.to_owned();
    let mut best = None;
    let mut n = 1;
    loop {
        if (5..=34).contains(&compact.len()) && mod97_valid(&compact) {
            best = Some(n);
        }
        let (Some(prev), Some(next)) = (words.get(n - 1), words.get(n)) else {
            break;
        };
        let text = &tokens.text[next.text.clone()];
        let prev_len = prev.text.len();
        if prev_len != 4
            || between(tokens, prev, next) != Some(" ")
            || text.len() > 4
            || !upper_alnum(text)
            || compact.len() + text.len() > 34
        {
            break;
        }
        compact.push_str(text);
        n += 1;
    }
    best
}

/// ISO 7064 mod 97-10 over the text with its first four characters moved to the end
/// (letters count 10..35).
pub(super) fn mod97_valid(text: &str) -> bool {
    let (head, tail) = text.split_at(4);
    let mut rest: u32 = 0;
    for b in tail.bytes().chain(head.bytes()) {
        rest = match b {
            b'0'..=b'9' => (rest * 10 + u32::from(b - b'0')) % 97,
            b'A'..=b'Z' => (rest * 100 + u32::from(b - b'A') + 10) % 97,
            _ => return false,
        };
    }
    rest == 1
}

/// The digit group at `t` starts a date, time, Unix time or IPv4 address: the last token it
/// spans.
fn digit_shape(tokens: &Tokens, t: usize) -> Option<usize> {
    unix_time(tokens, t)
        .or_else(|| compact_date_time(tokens, t))
        .or_else(|| date(tokens, t))
        .or_else(|| time(tokens, t, false))
        .or_else(|| ipv4(tokens, t))
}

/// The value of at most 19 digits.
fn value(digits: &[u8]) -> u64 {
    digits.iter().fold(0u64, |v, d| {
        v.saturating_mul(10).saturating_add(u64::from(*d))
    })
}

/// The group at `t`, its length within `lens` and its value within `range`.
fn number(
    tokens: &Tokens,
    t: usize,
    lens: std::ops::RangeInclusive<usize>,
    range: std::ops::RangeInclusive<u64>,
) -> Option<u64> {
    let digits = tokens.group(t)?;
    let v = value(digits);
    (lens.contains(&digits.len()) && range.contains(&v)).then_some(v)
}

/// A fraction after `t` (`.123`, `,123456789`): its token, or `t`.
fn fraction(tokens: &Tokens, t: usize) -> usize {
    tokens
        .link_by(t, &['.', ','])
        .filter(|&f| number(tokens, f, 1..=9, 0..=u64::MAX).is_some())
        .unwrap_or(t)
}

/// Unix seconds (with a fraction), milliseconds, microseconds or nanoseconds of 2015-2037.
fn unix_time(tokens: &Tokens, t: usize) -> Option<usize> {
    let digits = tokens.group(t)?;
    let divisor = match digits.len() {
        10 => 1,
        13 => 1_000,
        16 => 1_000_000,
        19 => 1_000_000_000,
        _ => return None,
    };
    if !(UNIX_FROM_S..UNIX_TO_S).contains(&(value(digits) / divisor)) {
        return None;
    }
    let end = fraction(tokens, t);
    // Seconds alone are 10 digits, too short to matter; only with a fraction they count.
    (digits.len() != 10 || end != t).then_some(end)
}

fn is_ymd(d: &[u8]) -> bool {
    (1900..=2099).contains(&value(&d[..4]))
        && (1..=12).contains(&value(&d[4..6]))
        && (1..=31).contains(&value(&d[6..8]))
}

fn is_hm(d: &[u8]) -> bool {
    value(&d[..2]) <= 23 && value(&d[2..4]) <= 59
}

/// `YYYYMMDD`, `YYYYMMDDhhmm[ss[fraction]]`, or `YYYYMMDD` and `hhmm[ss[fraction]]` joined.
fn compact_date_time(tokens: &Tokens, t: usize) -> Option<usize> {
    let d = tokens.group(t)?;
    match d.len() {
        8 if is_ymd(d) => {
            let time = tokens.link(t).and_then(|(_, joins, u)| {
                let time = tokens.group(u)?;
                let ok = joins
                    && match time.len() {
                        4 => is_hm(time),
                        6..=15 => is_hm(time) && value(&time[4..6]) <= 60,
                        _ => false,
                    };
                ok.then(|| {
                    let end = if time.len() == 6 {
                        fraction(tokens, u)
                    } else {
                        u
                    };
                    offset(tokens, end)
                })
            });
            Some(time.unwrap_or(t))
        }
        12 | 14..=23
            if is_ymd(d) && is_hm(&d[8..12]) && (d.len() == 12 || value(&d[12..14]) <= 60) =>
        {
            Some(offset(tokens, t))
        }
        _ => None,
    }
}

/// `Y-M-D`, `Y/M/D`, `Y.M.D` (year 1900-2099), `D.M.Y`, `D/M/Y`, `M/D/Y`, `D-M-Y` (two-digit
/// years only with two-digit days and months), optionally followed by a time.
fn date(tokens: &Tokens, t: usize) -> Option<usize> {
    let a = tokens.group(t)?;
    let (Some(sep), _, u) = tokens.link(t)? else {
        return None;
    };
    if !matches!(sep, '-' | '/' | '.') {
        return None;
    }
    let v = tokens.link_by(u, &[sep])?;
    let (b, c) = (tokens.group(u)?, tokens.group(v)?);
    let year = |y: &[u8]| (1900..=2099).contains(&value(y));
    let (day, month) = (1..=31, 1..=12);
    let ok = if a.len() == 4 {
        year(a)
            && (1..=2).contains(&b.len())
            && month.contains(&value(b))
            && (1..=2).contains(&c.len())
            && day.contains(&value(c))
    } else {
        let (x, y) = (value(a), value(b));
        (1..=2).contains(&a.len())
            && (1..=2).contains(&b.len())
            && match c.len() {
                4 => year(c),
                2 => a.len() == 2 && b.len() == 2,
                _ => false,
            }
            && ((day.contains(&x) && month.contains(&y))
                || (month.contains(&x) && day.contains(&y)))
    };
    if !ok {
        return None;
    }
    let time = tokens
        .link(v)
        .filter(|(_, joins, _)| *joins)
        .and_then(|(_, _, w)| time(tokens, w, true));
    Some(time.unwrap_or(v))
}

/// `h:mm:ss[.fraction][offset]`, or `h:mm` too if `short` (after a date).
fn time(tokens: &Tokens, t: usize, short: bool) -> Option<usize> {
    number(tokens, t, 1..=2, 0..=23)?;
    let m = tokens.link_by(t, &[':'])?;
    number(tokens, m, 2..=2, 0..=59)?;
    let end = match tokens.link_by(m, &[':']) {
        Some(s) if number(tokens, s, 2..=2, 0..=60).is_some() => fraction(tokens, s),
        _ if short => m,
        _ => return None,
    };
    Some(offset(tokens, end))
}

/// A UTC offset glued to a time (`+01:00`, `-0500`, `+05`): its last token, or `end`.
fn offset(tokens: &Tokens, end: usize) -> usize {
    let Some(o) = tokens.link_by(end, &['+', '-', '\u{2212}']) else {
        return end;
    };
    if let Some(v) = number(tokens, o, 4..=4, 0..=1459) {
        return if v % 100 <= 59 { o } else { end };
    }
    if number(tokens, o, 2..=2, 0..=14).is_none() {
        return end;
    }
    match tokens.link_by(o, &[':']) {
        Some(m) if number(tokens, m, 2..=2, 0..=59).is_some() => m,
        _ => o,
    }
}

/// `a.b.c.d` (each 0-255), with `:port` or `/prefix`.
fn ipv4(tokens: &Tokens, t: usize) -> Option<usize> {
    number(tokens, t, 1..=3, 0..=255)?;
    let mut end = t;
    for _ in 0..3 {
        end = tokens.link_by(end, &['.'])?;
        number(tokens, end, 1..=3, 0..=255)?;
    }
    if let Some(port) = tokens.link_by(end, &[':']) {
        if number(tokens, port, 1..=5, 0..=65_535).is_some() {
            return Some(port);
        }
    }
    if let Some(prefix) = tokens.link_by(end, &['/']) {
        if number(tokens, prefix, 1..=2, 0..=32).is_some() {
            return Some(prefix);
        }
    }
    Some(end)
}
