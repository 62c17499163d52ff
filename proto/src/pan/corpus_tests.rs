//! False positives and misses, measured: many random values of each class of legitimate text
//! (and of card numbers in their notations), the share the guard refuses, printed and held
//! to the bound the module docs give. Seeded, so every run draws the same values.
//!
//! `cargo test -p posfleet-proto --lib pan::corpus_tests -- --nocapture` prints the table.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{TextKind, contains_pan_in, gs1_valid, luhn_valid};

/// Values drawn per class.
const DRAWS: usize = 20_000;

/// Draws one value.
type Draw = fn(&mut StdRng) -> String;

/// One class: its name, a generator, the field kind, and the largest share refused.
struct Class {
    name: &'static str,
    draw: Draw,
    kind: TextKind,
    max_refused: f64,
}

fn class(name: &'static str, draw: Draw, max_refused: f64) -> Class {
    Class {
        name,
        draw,
        kind: TextKind::General,
        max_refused,
    }
}

fn hex(rng: &mut StdRng, n: usize) -> String {
    let s: String = (0..n)
        .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
        .collect();
    if rng.random_bool(0.3) {
        s.to_uppercase()
    } else {
        s
    }
}

fn digits(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

fn uuid(rng: &mut StdRng) -> String {
    let h = hex(rng, 32);
    let variant = ["8", "9", "a", "b"][rng.random_range(0..4)];
    format!(
        "{}-{}-4{}-{variant}{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..]
    )
}

fn timestamp(rng: &mut StdRng) -> String {
    let (y, mo, d) = (
        rng.random_range(1970..=2099),
        rng.random_range(1..=12),
        rng.random_range(1..=28),
    );
    let (h, mi, s) = (
        rng.random_range(0..24),
        rng.random_range(0..60),
        rng.random_range(0..60),
    );
    let frac = &digits(rng, 9)[..[3, 6, 9][rng.random_range(0..3)]];
    let off = ["Z", "+01:00", "-05:00", "+0530", "+00:00", ""][rng.random_range(0..6)];
    let unix_s = rng.random_range(1_420_070_400u64..2_145_916_800);
    match rng.random_range(0..17) {
        0 => format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac}{off}"),
        1 => format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{frac}"),
        2 => format!("{d:02}.{mo:02}.{y:04} {h:02}:{mi:02}"),
        3 => format!("{d:02}.{mo:02}.{y:04} {h:02}:{mi:02}:{s:02}"),
        4 => format!("{mo:02}/{d:02}/{y:04} {h:02}:{mi:02}:{s:02}"),
        5 => format!("{y:04}/{mo:02}/{d:02} {h:02}:{mi:02}:{s:02}.{frac}"),
        6 => format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}"),
        7 => format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z"),
        8 => format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}"),
        9 => format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02},{}", &frac[..3]),
        10 => format!("{d}.{mo}.{y}, {h:02}:{mi:02}:{s:02}"),
        11 => format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{off}"),
        12 => format!("{}", unix_s * 1000 + rng.random_range(0..1000)),
        13 => format!("{unix_s}.{:06}", rng.random_range(0..1_000_000)),
        14 => format!(
            "{d:02}/{mo:02}/{:02} {h:02}:{mi:02}:{s:02}.{}",
            y % 100,
            &frac[..3]
        ),
        15 => format!("{h:02}:{mi:02}:{s:02}.{frac} {y:04}-{mo:02}-{d:02}"),
        _ => format!("{}", unix_s * 1_000_000 + rng.random_range(0..1_000_000)),
    }
}

/// An amount up to the largest the product accepts (10^12 minor units, 10^10 major).
fn amount(rng: &mut StdRng) -> String {
    let int_digits = rng.random_range(1..=10u32);
    let v: u64 = rng.random_range(10u64.pow(int_digits - 1)..10u64.pow(int_digits));
    let cents = rng.random_range(0..100);
    let grouped = v
        .to_string()
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>();
    match rng.random_range(0..5) {
        0 => format!("{}.{cents:02}", grouped.join(",")),
        1 => format!("{},{cents:02}", grouped.join(".")),
        2 => format!("{}.{cents:02}", grouped.join("'")),
        3 => format!("{},{cents:02} EUR", grouped.join(" ")),
        _ => format!("{v}.{cents:02}"),
    }
}

fn masked(rng: &mut StdRng) -> String {
    let last4 = digits(rng, 4);
    match rng.random_range(0..4) {
        0 => {
            let mask = ["*", "X", "x"][rng.random_range(0..3)].repeat(rng.random_range(2..=9));
            let bin = rng.random_range(6..=8);
            format!("{}{mask}{last4}", digits(rng, bin))
        }
        1 => format!("XXXX-XXXX-XXXX-{last4}"),
        2 => format!("**** **** **** {last4}"),
        _ => format!("{} {}** **** {last4}", digits(rng, 4), digits(rng, 2)),
    }
}

/// A valid IBAN of a random country (compact or in groups of four) or creditor reference.
fn iban(rng: &mut StdRng) -> String {
    const COUNTRIES: [(&str, usize); 12] = [
        ("DE", 22),
        ("FR", 27),
        ("GB", 22),
        ("NL", 18),
        ("IT", 27),
        ("ES", 24),
        ("CH", 21),
        ("AT", 20),
        ("BE", 16),
        ("PL", 28),
        ("SE", 24),
        ("RF", 0),
    ];
    let (cc, len) = COUNTRIES[rng.random_range(0..COUNTRIES.len())];
    let body = if cc == "RF" {
        let n = rng.random_range(10..=21);
        digits(rng, n)
    } else if cc == "GB" || cc == "NL" {
        let bank: String = (0..4)
            .map(|_| char::from(b'A' + rng.random_range(0..26u8)))
            .collect();
        bank + &digits(rng, len - 8)
    } else {
        digits(rng, len - 4)
    };
    let check = (2..=98)
        .map(|c| format!("{cc}{c:02}{body}"))
        .find(|s| super::shapes::mod97_valid(s))
        .unwrap_or_default();
    if rng.random_bool(0.5) {
        check
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        check
    }
}

fn gtin(rng: &mut StdRng) -> String {
    let n = [8, 12, 13, 14][rng.random_range(0..4)];
    let mut d: Vec<u8> = (0..n - 1).map(|_| rng.random_range(0..10)).collect();
    let check = (0..10u8)
        .find(|c| {
            d.push(*c);
            let ok = gs1_valid(&d);
            d.pop();
            ok
        })
        .unwrap_or_default();
    d.push(check);
    d.iter().map(|x| char::from(b'0' + x)).collect()
}

fn base64(rng: &mut StdRng) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..43)
        .map(|_| char::from(A[rng.random_range(0..64)]))
        .collect::<String>()
        + "="
}

fn phone(rng: &mut StdRng) -> String {
    let (country, n) = (rng.random_range(1..=99), rng.random_range(6..=9));
    format!("+{country} {} {}", digits(rng, 3), digits(rng, n))
}

/// A Luhn-valid PAN of 13..=19 digits.
fn pan(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len - 1).map(|_| rng.random_range(0..10)).collect();
    let check = (0..10u8)
        .find(|c| {
            d.push(*c);
            let ok = luhn_valid(&d);
            d.pop();
            ok
        })
        .unwrap_or_default();
    d.push(check);
    d
}

const SEPARATORS: &[u8] = b" -.:_+,*/";

fn pan_grouped(rng: &mut StdRng) -> String {
    let len = rng.random_range(13..=19);
    let sep = char::from(SEPARATORS[rng.random_range(0..SEPARATORS.len())]);
    let d = pan(rng, len);
    let mut out = String::new();
    for (i, x) in d.iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(sep);
        }
        out.push(char::from(b'0' + x));
    }
    out
}

fn pan_random_separators(rng: &mut StdRng) -> String {
    let len = rng.random_range(13..=19);
    let d = pan(rng, len);
    let mut out = String::new();
    for (i, x) in d.iter().enumerate() {
        if i > 0 && rng.random_bool(0.3) {
            out.push(char::from(
                SEPARATORS[rng.random_range(0..SEPARATORS.len())],
            ));
        }
        out.push(char::from(b'0' + x));
    }
    out
}

fn pan_letters(rng: &mut StdRng) -> String {
    let d = pan(rng, 16);
    let mut out = String::new();
    for (i, x) in d.iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(char::from(b'a' + rng.random_range(0..26u8)));
        }
        out.push(char::from(b'0' + x));
    }
    out
}

#[test]
fn false_positives_and_misses_stay_within_their_bounds() {
    let mut legitimate = vec![
        class("UUID", uuid, 0.0),
        class("hex id, 8", |r| hex(r, 8), 0.0),
        class("hex id, 16", |r| hex(r, 16), 0.003),
        class("hex id, 24", |r| hex(r, 24), 0.004),
        class("hex id, 32", |r| hex(r, 32), 0.004),
        class("hex id, 40", |r| hex(r, 40), 0.004),
        class("hex id, 64", |r| hex(r, 64), 0.004),
        class("timestamp (17 notations)", timestamp, 0.0),
        class("amount up to 10^10", amount, 0.0),
        class("masked PAN", masked, 0.0),
        class("IBAN / creditor reference", iban, 0.0),
        class("base64, 44 chars", base64, 0.001),
        // Refused by design (module docs): a 13+ digit number in groups.
        class("phone number (E.164, spaced)", phone, 0.15),
        class("GTIN outside a product code", gtin, 0.12),
    ];
    legitimate.push(Class {
        kind: TextKind::ProductCode,
        ..class("GTIN as SKU", gtin, 0.0)
    });
    let mut rng = StdRng::seed_from_u64(0x10_07);
    let mut failures = Vec::new();
    eprintln!(
        "{:<32} {:>8} {:>9} {:>9}",
        "class", "draws", "refused", "bound"
    );
    for c in &legitimate {
        let refused = (0..DRAWS)
            .filter(|_| contains_pan_in(&(c.draw)(&mut rng), c.kind))
            .count();
        let rate = refused as f64 / DRAWS as f64;
        eprintln!(
            "{:<32} {DRAWS:>8} {:>8.3}% {:>8.3}%",
            c.name,
            rate * 100.0,
            c.max_refused * 100.0
        );
        if rate > c.max_refused {
            failures.push(format!("{}: {:.3}% refused", c.name, rate * 100.0));
        }
    }
    // Card numbers: the share found, and the least allowed.
    let pans: [(&str, Draw, f64); 3] = [
        ("PAN, groups of 4, any separator", pan_grouped, 1.0),
        ("PAN, letters between groups", pan_letters, 1.0),
        ("PAN, separators at random", pan_random_separators, 0.99),
    ];
    for (name, draw, min_found) in pans {
        let found = (0..DRAWS)
            .filter(|_| contains_pan_in(&draw(&mut rng), TextKind::General))
            .count();
        let rate = found as f64 / DRAWS as f64;
        eprintln!(
            "{name:<32} {DRAWS:>8} {:>7.3}% found (at least {:.1}%)",
            rate * 100.0,
            min_found * 100.0
        );
        if rate < min_found {
            failures.push(format!("{name}: only {:.3}% found", rate * 100.0));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
