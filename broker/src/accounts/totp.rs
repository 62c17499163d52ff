//! TOTP (RFC 6238 over RFC 4226): HMAC-SHA-1, 6 digits, 30-second steps, codes of the step
//! before and after accepted. Replay protection (a step used once is refused afterwards) is
//! the caller's: [`verify`] returns the step that matched. The HMAC is ring's, the one every
//! other MAC of the controller uses; base32 is data-encoding's; the `otpauth://` URL is
//! percent-encoded with percent-encoding.

use data_encoding::BASE32_NOPAD;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use ring::hmac;

/// Length of a step.
pub const STEP_MS: u64 = 30_000;
/// Digits of a code.
pub const DIGITS: u32 = 6;
/// Bytes of a generated secret (160 bits, RFC 4226's recommendation).
pub const SECRET_BYTES: usize = 20;

/// A new random secret whose written forms (base32 for the authenticator, hex in the account
/// store) never look like a card number: base32 is fixed by the standard, so the secret is
/// drawn again until the guard passes (`posfleet_proto::secret`).
pub fn new_secret() -> Vec<u8> {
    posfleet_proto::secret::random_until_clean(rand::random::<[u8; SECRET_BYTES]>, |bytes| {
        vec![base32_encode(bytes), hex::encode(bytes)]
    })
    .to_vec()
}

/// The code of `secret` for time step `step`.
pub fn code_at(secret: &[u8], step: u64) -> Option<u32> {
    // SHA-1 is what RFC 6238 and every authenticator app use; HMAC-SHA-1 is not weakened by
    // SHA-1's collisions.
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &step.to_be_bytes());
    let digest = tag.as_ref();
    let offset = usize::from(digest.last()? & 0x0f);
    let bytes = digest.get(offset..offset + 4)?;
    let binary = u32::from_be_bytes([bytes[0] & 0x7f, bytes[1], bytes[2], bytes[3]]);
    Some(binary % 10u32.pow(DIGITS))
}

/// The step of `now_ms`.
pub fn step_of(now_ms: u64) -> u64 {
    now_ms / STEP_MS
}

/// The step (now or one either side) whose code is `code`, if any. `code` must be exactly six
/// ASCII digits.
pub fn verify(secret: &[u8], code: &str, now_ms: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let presented: u32 = code.parse().ok()?;
    let now = step_of(now_ms);
    [now.saturating_sub(1), now, now + 1]
        .into_iter()
        .find(|&step| code_at(secret, step) == Some(presented))
}

/// The six-digit text of the code for `now_ms` (authenticator side; tests and tools).
pub fn code_text(secret: &[u8], now_ms: u64) -> Option<String> {
    code_at(secret, step_of(now_ms)).map(|c| format!("{c:06}"))
}

/// RFC 4648 base32 without padding (what authenticator apps expect in `secret=`).
pub fn base32_encode(bytes: &[u8]) -> String {
    BASE32_NOPAD.encode(bytes)
}

/// Decodes RFC 4648 base32 (case-insensitive, padding and spaces ignored).
pub fn base32_decode(text: &str) -> Option<Vec<u8>> {
    let canonical: String = text
        .chars()
        .filter(|c| *c != '=' && *c != ' ')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    BASE32_NOPAD.decode(canonical.as_bytes()).ok()
}

/// What stays unescaped in an `otpauth://` label or parameter: RFC 3986's unreserved
/// characters.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `otpauth://` URL authenticator apps scan: label `issuer:account` and the `issuer`
/// parameter percent-encoded (Key Uri Format).
pub fn otpauth_url(issuer: &str, account: &str, secret: &[u8]) -> String {
    let issuer = utf8_percent_encode(issuer, UNRESERVED);
    let account = utf8_percent_encode(account, UNRESERVED);
    format!(
        "otpauth://totp/{issuer}:{account}?secret={}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={}",
        base32_encode(secret),
        STEP_MS / 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B (SHA-1 secret), last six digits of its eight-digit codes.
    #[test]
    fn rfc6238_vectors() {
        let secret = b"12345678901234567890";
        for (t, code) in [
            (59u64, 287_082u32),
            (1_111_111_109, 81_804),
            (1_111_111_111, 50_471),
            (1_234_567_890, 5_924),
            (2_000_000_000, 279_037),
        ] {
            assert_eq!(code_at(secret, t / 30), Some(code), "t = {t}");
        }
    }

    #[test]
    fn window_is_one_step_either_side() {
        let secret = new_secret();
        let now = 1_700_000_000_000;
        let step = step_of(now);
        for (delta, ok) in [(-2i64, false), (-1, true), (0, true), (1, true), (2, false)] {
            let s = step.checked_add_signed(delta).unwrap();
            let code = format!("{:06}", code_at(&secret, s).unwrap());
            assert_eq!(verify(&secret, &code, now) == Some(s), ok, "delta {delta}");
        }
        assert_eq!(verify(&secret, "12345", now), None);
        assert_eq!(verify(&secret, "12345a", now), None);
    }

    #[test]
    fn otpauth_urls_encode_their_label_and_issuer() {
        let secret = b"12345678901234567890";
        let url = otpauth_url("ACME Payments & Co", "ops:admin", secret);
        assert_eq!(
            url,
            "otpauth://totp/ACME%20Payments%20%26%20Co:ops%3Aadmin\
             ?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=ACME%20Payments%20%26%20Co\
             &algorithm=SHA1&digits=6&period=30"
        );
    }

    #[test]
    fn base32_round_trips() {
        assert_eq!(base32_encode(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32_decode("MZXW6YTBOI======").unwrap(), b"foobar");
        let secret = new_secret();
        assert_eq!(base32_decode(&base32_encode(&secret)).unwrap(), secret);
        assert_eq!(base32_decode("M1"), None);
        let url = otpauth_url("posfleet", "alice", &secret);
        assert!(
            url.starts_with("otpauth://totp/posfleet:alice?secret="),
            "{url}"
        );
    }
}
