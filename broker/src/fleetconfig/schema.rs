//! The configuration schema: which keys a layer may hold, of which type, within which rule.
//!
//! Keys are dotted (`payment.currency`): 1-128 characters, segments of letters, digits, '_'
//! or '-' separated by single dots. Values are scalars: strings, integers (i64; no floats, so
//! amounts stay exact) and booleans. A key outside [`KEYS`] is refused unless it starts with
//! [`CUSTOM_PREFIX`] (any scalar; strings up to [`MAX_CUSTOM_STRING_CHARS`] characters).
//! A document holds at most [`MAX_KEYS`] keys and [`MAX_DOCUMENT_BYTES`] of JSON.
//!
//! No value, of any type, may hold a card number, nor a key (the guard of
//! `posfleet_proto::pan`, integers read as their decimal digits); free text (the `Text` rule
//! and custom strings) is also free of control and bidi characters
//! (`posfleet_proto::text`).
//!
//! Error messages name the key and what is wrong; they never repeat the value (it may be
//! huge, or a secret typed into the wrong key), and a key that holds a card number is shown
//! as a placeholder.

use posfleet_proto::pan::contains_pan;
use posfleet_proto::text::{TextProblem, check_operator_text, shown};
use serde_json::{Map, Value};

use crate::views::{ConfigKeyView, ConfigSchemaView, FieldMessage};

/// Longest key, in bytes (keys are ASCII).
pub const MAX_KEY_LEN: usize = 128;
/// Most keys in one layer document.
pub const MAX_KEYS: usize = 200;
/// Largest layer document, as compact JSON.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// Keys under this prefix are free-form.
pub const CUSTOM_PREFIX: &str = "custom.";
/// Longest string under [`CUSTOM_PREFIX`], in characters.
pub const MAX_CUSTOM_STRING_CHARS: usize = 256;
/// The `key` of a [`FieldMessage`] about the whole document (size, key count).
pub const DOCUMENT_FIELD: &str = "(document)";

/// Characters of a refused key shown in a message.
const SHOWN_KEY_CHARS: usize = 64;

/// How a string value is checked beyond its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrRule {
    /// Free text without control characters.
    Text,
    /// ISO 4217 code: `^[A-Z]{3}$`.
    Currency,
    /// `^[a-z]{2}(-[A-Z]{2})?$`, e.g. `en` or `fr-CH`.
    Language,
    /// A DNS host name (or an IPv4 address): labels of 1-63 letters, digits or '-', not
    /// starting or ending with '-', 253 characters at most.
    Hostname,
    /// `HH:MM-HH:MM` (24 h, may cross midnight, start and end differ).
    TimeWindow,
    /// IANA-style `Area/City` (`Europe/Zurich`, `America/Argentina/Buenos_Aires`, `Etc/UTC`).
    Timezone,
}

/// The rule of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// An integer in `min..=max`.
    Int { min: i64, max: i64 },
    /// `true` or `false`.
    Bool,
    /// A string of at most `max_chars` characters that passes `rule`.
    Str { max_chars: usize, rule: StrRule },
}

/// One allowed key.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    pub key: &'static str,
    pub rule: Rule,
    pub description: &'static str,
}

const fn int(min: i64, max: i64) -> Rule {
    Rule::Int { min, max }
}

const fn text(max_chars: usize) -> Rule {
    Rule::Str {
        max_chars,
        rule: StrRule::Text,
    }
}

const fn pattern(max_chars: usize, rule: StrRule) -> Rule {
    Rule::Str { max_chars, rule }
}

/// Every built-in key, sorted by key (the table in the module docs of `fleetconfig`).
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        key: "agent.heartbeat_interval_s",
        rule: int(5, 3600),
        description: "seconds between heartbeats",
    },
    KeySpec {
        key: "agent.max_offline_s",
        rule: int(5, 2_592_000),
        description: "seconds without a valid lease before the terminal locks itself",
    },
    KeySpec {
        key: "agent.telemetry_interval_s",
        rule: int(5, 86_400),
        description: "seconds between telemetry samples",
    },
    KeySpec {
        key: "display.brightness",
        rule: int(0, 100),
        description: "screen brightness in percent",
    },
    KeySpec {
        key: "display.language",
        rule: pattern(5, StrRule::Language),
        description: "user interface language, e.g. en or fr-CH",
    },
    KeySpec {
        key: "maintenance.window",
        rule: pattern(11, StrRule::TimeWindow),
        description: "daily maintenance window HH:MM-HH:MM, local time",
    },
    KeySpec {
        key: "network.ntp_server",
        rule: pattern(253, StrRule::Hostname),
        description: "NTP server host name",
    },
    KeySpec {
        key: "payment.contactless_limit_minor",
        rule: int(0, 1_000_000_000),
        description: "largest contactless amount without PIN, in minor units",
    },
    KeySpec {
        key: "payment.currency",
        rule: pattern(3, StrRule::Currency),
        description: "ISO 4217 currency code",
    },
    KeySpec {
        key: "payment.max_amount_minor",
        rule: int(1, 1_000_000_000_000),
        description: "largest amount accepted, in minor units",
    },
    KeySpec {
        key: "payment.tips_enabled",
        rule: Rule::Bool,
        description: "whether the terminal offers tips",
    },
    KeySpec {
        key: "receipt.footer",
        rule: text(200),
        description: "text printed at the bottom of receipts",
    },
    KeySpec {
        key: "receipt.header",
        rule: text(200),
        description: "text printed at the top of receipts",
    },
    KeySpec {
        key: "store.name",
        rule: text(100),
        description: "store name shown on the terminal",
    },
    KeySpec {
        key: "store.timezone",
        rule: pattern(64, StrRule::Timezone),
        description: "IANA time zone, e.g. Europe/Zurich",
    },
];

/// The spec of a built-in key.
pub fn spec(key: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|s| s.key == key)
}

/// A field message for `key` (cut if it is long).
pub(crate) fn field(key: &str, message: impl Into<String>) -> FieldMessage {
    FieldMessage {
        key: shown_key(key),
        message: message.into(),
    }
}

fn shown_key(key: &str) -> String {
    let key = shown(key);
    if key.chars().count() <= SHOWN_KEY_CHARS {
        key.into_owned()
    } else {
        let mut cut: String = key.chars().take(SHOWN_KEY_CHARS).collect();
        cut.push('…');
        cut
    }
}

/// Checks the form of a key (not whether the schema knows it): what `unset` accepts.
pub fn check_key_syntax(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is empty".to_owned());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "key is {} bytes long; the maximum is {MAX_KEY_LEN}",
            key.len()
        ));
    }
    let segments_ok = key.split('.').all(|seg| {
        !seg.is_empty()
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    if !segments_ok {
        return Err(
            "a key is segments of letters, digits, '_' or '-' separated by single dots \
             (e.g. payment.currency)"
                .to_owned(),
        );
    }
    Ok(())
}

/// Checks one key and its value.
pub fn check_entry(key: &str, value: &Value) -> Result<(), FieldMessage> {
    check_key_syntax(key).map_err(|m| field(key, m))?;
    if contains_pan(key) {
        return Err(field(key, TextProblem::CardNumber.to_string()));
    }
    if let Some(spec) = spec(key) {
        check_rule(&spec.rule, value).map_err(|m| field(key, m))?;
    } else if key.starts_with(CUSTOM_PREFIX) {
        check_custom(value).map_err(|m| field(key, m))?;
    } else {
        return Err(field(
            key,
            "unknown key; use a key of the schema (GET /api/v1/config/schema, `posctl config \
             schema`) or put your own under custom.",
        ));
    }
    // Whatever the rule, no value holds a card number (an integer as its digits).
    let card_number = match value {
        Value::String(s) => contains_pan(s),
        Value::Number(n) => contains_pan(&n.to_string()),
        _ => false,
    };
    if card_number {
        return Err(field(key, TextProblem::CardNumber.to_string()));
    }
    Ok(())
}

/// Checks every entry of `document` and the document's size; returns every problem at once.
pub fn check_document(document: &Map<String, Value>) -> Vec<FieldMessage> {
    let mut errors: Vec<FieldMessage> = document
        .iter()
        .filter_map(|(k, v)| check_entry(k, v).err())
        .collect();
    errors.extend(check_size(document));
    errors
}

/// Checks the key count and encoded size of a document.
pub fn check_size(document: &Map<String, Value>) -> Option<FieldMessage> {
    if document.len() > MAX_KEYS {
        return Some(field(
            DOCUMENT_FIELD,
            format!(
                "the layer would hold {} keys; the maximum is {MAX_KEYS}",
                document.len()
            ),
        ));
    }
    let bytes = serde_json::to_vec(document).map_or(usize::MAX, |v| v.len());
    if bytes > MAX_DOCUMENT_BYTES {
        return Some(field(
            DOCUMENT_FIELD,
            format!(
                "the layer would be {bytes} bytes of JSON; the maximum is {MAX_DOCUMENT_BYTES}"
            ),
        ));
    }
    None
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() => "an integer",
        Value::Number(n) if n.is_u64() => "an integer above 9223372036854775807",
        Value::Number(_) => "a decimal number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_rule(rule: &Rule, value: &Value) -> Result<(), String> {
    match (rule, value) {
        (Rule::Int { min, max }, Value::Number(n)) if n.is_i64() => {
            let v = n.as_i64().unwrap_or_default();
            if (*min..=*max).contains(&v) {
                Ok(())
            } else {
                Err(format!("must be between {min} and {max}"))
            }
        }
        (Rule::Int { .. }, other) => Err(format!("expected an integer, got {}", type_name(other))),
        (Rule::Bool, Value::Bool(_)) => Ok(()),
        (Rule::Bool, other) => Err(format!(
            "expected a boolean (true or false), got {}",
            type_name(other)
        )),
        (Rule::Str { max_chars, rule }, Value::String(s)) => {
            let chars = s.chars().count();
            if chars > *max_chars {
                return Err(format!(
                    "is {chars} characters long; the maximum is {max_chars}"
                ));
            }
            check_str(*rule, s)
        }
        (Rule::Str { .. }, other) => Err(format!("expected a string, got {}", type_name(other))),
    }
}

fn check_custom(value: &Value) -> Result<(), String> {
    match value {
        Value::Bool(_) => Ok(()),
        Value::Number(n) if n.is_i64() => Ok(()),
        Value::String(s) => {
            let chars = s.chars().count();
            if chars > MAX_CUSTOM_STRING_CHARS {
                Err(format!(
                    "is {chars} characters long; custom strings are at most \
                     {MAX_CUSTOM_STRING_CHARS}"
                ))
            } else {
                check_operator_text(s).map_err(|problem| problem.to_string())
            }
        }
        other => Err(format!(
            "custom values are strings, integers or booleans, got {}",
            type_name(other)
        )),
    }
}

fn check_str(rule: StrRule, s: &str) -> Result<(), String> {
    let ok = match rule {
        StrRule::Text => return check_operator_text(s).map_err(|problem| problem.to_string()),
        StrRule::Currency => s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()),
        StrRule::Language => is_language(s),
        StrRule::Hostname => is_hostname(s),
        StrRule::TimeWindow => is_time_window(s),
        StrRule::Timezone => is_timezone(s),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("must be {}", str_rule_text(rule)))
    }
}

/// What a string rule expects, for messages and the schema view.
fn str_rule_text(rule: StrRule) -> &'static str {
    match rule {
        StrRule::Text => "text without control or bidi characters or a card number",
        StrRule::Currency => "three capital letters (ISO 4217, e.g. EUR)",
        StrRule::Language => "a language code like en or fr-CH",
        StrRule::Hostname => "a host name like pool.ntp.org",
        StrRule::TimeWindow => "a time window HH:MM-HH:MM (24 h) with different start and end",
        StrRule::Timezone => "an IANA time zone like Europe/Zurich",
    }
}

fn is_language(s: &str) -> bool {
    let b = s.as_bytes();
    let lang = |x: &[u8]| x.iter().all(u8::is_ascii_lowercase);
    match b.len() {
        2 => lang(b),
        5 => lang(&b[..2]) && b[2] == b'-' && b[3..].iter().all(u8::is_ascii_uppercase),
        _ => false,
    }
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `HH:MM` → minutes after midnight.
fn minutes(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    if b.len() != 5 || b[2] != b':' || !b[..2].iter().chain(&b[3..]).all(u8::is_ascii_digit) {
        return None;
    }
    let h: u32 = s[..2].parse().ok()?;
    let m: u32 = s[3..].parse().ok()?;
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn is_time_window(s: &str) -> bool {
    match s.split_once('-') {
        Some((start, end)) => match (minutes(start), minutes(end)) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        },
        None => false,
    }
}

fn is_timezone(s: &str) -> bool {
    let mut parts = s.split('/');
    let area_ok = parts.next().is_some_and(|area| {
        area.as_bytes().first().is_some_and(u8::is_ascii_uppercase)
            && area.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_')
    });
    let rest: Vec<&str> = parts.collect();
    area_ok
        && (1..=2).contains(&rest.len())
        && rest.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+'))
        })
}

/// The schema as the API serves it.
pub fn view() -> ConfigSchemaView {
    ConfigSchemaView {
        keys: KEYS
            .iter()
            .map(|s| {
                let (kind, rule) = match s.rule {
                    Rule::Int { min, max } => ("integer", format!("{min}..={max}")),
                    Rule::Bool => ("boolean", "true or false".to_owned()),
                    Rule::Str { max_chars, rule } => (
                        "string",
                        format!("{}, at most {max_chars} characters", str_rule_text(rule)),
                    ),
                };
                ConfigKeyView {
                    key: s.key.to_owned(),
                    kind: kind.to_owned(),
                    rule,
                    description: s.description.to_owned(),
                }
            })
            .collect(),
        custom_prefix: CUSTOM_PREFIX.to_owned(),
        max_custom_string_chars: MAX_CUSTOM_STRING_CHARS,
        max_key_len: MAX_KEY_LEN,
        max_keys: MAX_KEYS,
        max_document_bytes: MAX_DOCUMENT_BYTES,
    }
}

#[cfg(test)]
#[path = "schema_tests.rs"]
mod tests;
