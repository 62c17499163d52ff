//! How hashes and keyed checkpoints are written in the audit store (`DATA/audit`, the anchor
//! file): unpadded base64url, not hex. Hex of a random 32-byte value holds a Luhn-valid run of
//! 13+ decimal digits in about 0.4% of cases (and the zero hash before the first entry is 64
//! zeros), which card-data scanners, the project's own data-directory scan included, report
//! as card numbers. Base64url has far fewer digits (a 13-digit run about once in 10⁹ values).
//! The API and exports keep hex; values written in hex by older versions are still read.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::entry::{AuditEntry, Hash};

/// The stored form of `hex` (64 hex digits). Anything else is kept as it is (it is then
/// reported as malformed by `verify`).
pub(crate) fn to_store(hex_text: &str) -> String {
    match hex::decode(hex_text) {
        Ok(bytes) if hex_text.len() == 64 => URL_SAFE_NO_PAD.encode(bytes),
        _ => hex_text.to_owned(),
    }
}

/// The bytes of a stored value, in either form (64 hex digits, or base64url).
pub(crate) fn decode(text: &str) -> Option<Vec<u8>> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return hex::decode(text).ok();
    }
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// The hex (API) form of a stored value; unreadable values are kept as they are.
pub(crate) fn from_store(text: &str) -> String {
    match decode(text) {
        Some(bytes) if bytes.len() == 32 => hex::encode(bytes),
        _ => text.to_owned(),
    }
}

/// An entry as stored.
pub(crate) fn encode_entry(entry: &AuditEntry) -> Result<Vec<u8>, serde_json::Error> {
    let mut stored = entry.clone();
    stored.prev_hash = to_store(&entry.prev_hash);
    stored.hash = to_store(&entry.hash);
    if !stored.mac.is_empty() {
        stored.mac = to_store(&entry.mac);
    }
    serde_json::to_vec(&stored)
}

/// A stored entry (either form) in its API form.
pub(crate) fn decode_entry(bytes: &[u8]) -> Result<AuditEntry, serde_json::Error> {
    let mut entry: AuditEntry = serde_json::from_slice(bytes)?;
    entry.prev_hash = from_store(&entry.prev_hash);
    entry.hash = from_store(&entry.hash);
    if !entry.mac.is_empty() {
        entry.mac = from_store(&entry.mac);
    }
    Ok(entry)
}

/// A [`Hash`] field in the stored form (read in either).
pub(crate) mod stored_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Hash;

    pub(crate) fn serialize<S: Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_store(&hex::encode(h)))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let s = String::deserialize(d)?;
        super::decode(&s)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("expected a 32-byte hash"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_have_no_card_like_digit_runs_and_round_trip() {
        let zero = "0".repeat(64);
        let stored = to_store(&zero);
        assert!(!posfleet_proto::pan::contains_pan(&stored), "{stored}");
        assert_eq!(from_store(&stored), zero);
        // Legacy hex is read as it is.
        assert_eq!(from_store(&zero), zero);
        assert_eq!(decode(&zero), Some(vec![0; 32]));
        // Random hashes: hex is flagged now and then, the stored form practically never.
        let mut hex_flagged = 0;
        for i in 0u32..20_000 {
            let h: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
                <sha2::Sha256 as sha2::Digest>::new(),
                i.to_be_bytes(),
            ))
            .into();
            let hex_text = hex::encode(h);
            hex_flagged += usize::from(posfleet_proto::pan::contains_pan(&hex_text));
            let stored = to_store(&hex_text);
            assert!(!posfleet_proto::pan::contains_pan(&stored), "{stored}");
            assert_eq!(from_store(&stored), hex_text);
        }
        assert!(hex_flagged > 0, "hex of 20,000 hashes had no card-like run");
        // Garbage stays garbage (and `verify` reports it).
        assert_eq!(from_store("not a hash"), "not a hash");
        assert_eq!(to_store("xyz"), "xyz");
    }
}
