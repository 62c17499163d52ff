//! Enrolment tokens: `pfe_<id>_<secret>`. The id (12 hex digits) finds the record; the
//! controller stores only the SHA-256 of the whole text and compares digests in constant time.
//! The secret is 45 letters (`posfleet_proto::secret::token`: no digit, so the token can never
//! look like a card number); tokens issued with 64 hex digits keep working.

use std::time::Duration;

use sha2::{Digest, Sha256};

const PREFIX: &str = "pfe_";

/// A freshly generated token.
pub(super) struct Secret {
    pub id: String,
    /// The whole token text; shown once, never stored or logged.
    pub text: String,
}

pub(super) fn generate() -> Secret {
    let id = hex::encode(rand::random::<[u8; 6]>());
    let text = posfleet_proto::secret::token(&format!("{PREFIX}{id}_"));
    Secret { id, text }
}

/// The id part of a token text, if it has the token's shape.
pub(super) fn id_of(text: &str) -> Option<&str> {
    let rest = text.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex_len = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = posfleet_proto::secret::is_token_body(secret) || hex_len(secret, 64);
    (hex_len(id, 12) && secret_ok).then_some(id)
}

pub(super) fn digest(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// True if `text` hashes to `stored` (hex), compared without an early exit.
pub(super) fn matches(stored: &str, text: &str) -> bool {
    let presented = digest(text);
    let (a, b) = (stored.as_bytes(), presented.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Parses `expires_in` ("24h", "30m", "7d") and checks it against `max`.
pub(super) fn lifetime(text: &str, max: Duration) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("expires_in {text:?}: use a number and a unit, e.g. 24h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("expires_in {text:?}: the unit is s, m, h or d")),
    };
    let lifetime = Duration::from_secs(seconds);
    if lifetime.is_zero() {
        return Err("expires_in must be positive".into());
    }
    if lifetime > max {
        return Err(format!(
            "expires_in {text:?} is longer than the maximum of {} days",
            max.as_secs() / 86_400
        ));
    }
    Ok(lifetime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_compare() {
        let s = generate();
        assert_eq!(id_of(&s.text), Some(s.id.as_str()));
        let d = digest(&s.text);
        assert!(matches(&d, &s.text));
        assert!(!matches(&d, &generate().text));
        assert_eq!(id_of("pfe_x_y"), None);
        // Tokens issued in the old form (64 hex digits) are still recognised.
        let old = format!("pfe_0123456789ab_{}", "ab12".repeat(16));
        assert_eq!(id_of(&old), Some("0123456789ab"));
        assert_eq!(
            id_of(&format!("pfe_0123456789ab_{}", "ab12".repeat(15))),
            None
        );
        assert_eq!(id_of(""), None);
    }

    /// Issue 10 item 10: a generated enrolment token never holds what the PAN guard (and
    /// card-data scanners) take for a card number: 100,000 draws.
    #[test]
    fn generated_tokens_never_look_like_card_numbers() {
        let draws = 100_000;
        let flagged = (0..draws)
            .filter(|_| posfleet_proto::pan::contains_pan(&generate().text))
            .count();
        assert_eq!(
            flagged, 0,
            "{flagged} of {draws} enrolment tokens look like a card number"
        );
    }

    #[test]
    fn lifetimes() {
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(lifetime("24h", week).unwrap(), Duration::from_secs(86_400));
        assert_eq!(lifetime("7d", week).unwrap(), week);
        for bad in ["8d", "0h", "h", "24x", "", "-1h"] {
            assert!(lifetime(bad, week).is_err(), "{bad}");
        }
    }
}
