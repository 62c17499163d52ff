//! One stored audit entry and its hash.
//!
//! `hash = SHA-256(canonical encoding)`, where the canonical encoding is, in this order:
//!
//! ```text
//! "posfleet-audit-v1\0"
//! seq      u64 big-endian
//! at_ms    u64 big-endian
//! actor, source, action, target, outcome ("requested" | "success" | "failure" | "denied"),
//!          detail:
//!          each as u32 big-endian byte length, then the UTF-8 bytes
//! prev_hash 32 bytes
//! ```
//!
//! Length prefixes make the encoding unambiguous (no two different entries encode alike), and
//! it does not depend on how JSON is formatted, so the stored JSON may be re-serialised freely.
//! The keyed checkpoint (`mac`, `keyed.rs`) covers `seq` and `hash`, so it is not part of the
//! hash input.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AuditRecord, Outcome};

/// Domain separation of the hash input.
const DOMAIN: &[u8] = b"posfleet-audit-v1\0";

/// A SHA-256 digest.
pub(crate) type Hash = [u8; 32];

/// The `prev_hash` of the first entry ever written.
pub(crate) const ZERO_HASH: Hash = [0; 32];

/// One entry of the chain, as stored (JSON) and as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// 1, 2, 3, ...: gapless; the sled key holds it too.
    pub seq: u64,
    /// When the controller stored it, Unix ms (never decreasing along the chain).
    pub at_ms: u64,
    pub actor: String,
    pub source: String,
    pub action: String,
    pub target: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub detail: String,
    /// Hex SHA-256 of the previous entry (all zeros for the first entry ever).
    pub prev_hash: String,
    /// Hex SHA-256 of this entry's canonical encoding (module docs).
    pub hash: String,
    /// Keyed checkpoint of `seq` and `hash` with the controller's audit key (`keyed.rs`);
    /// empty on entries written before audit keys existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
}

impl AuditEntry {
    /// The entry `record` becomes at `seq`, `at_ms` after `prev`.
    pub(crate) fn new(seq: u64, at_ms: u64, record: AuditRecord, prev: &Hash) -> Self {
        let mut entry = Self {
            seq,
            at_ms,
            actor: record.actor,
            source: record.source,
            action: record.action,
            target: record.target,
            outcome: record.outcome,
            detail: record.detail,
            prev_hash: hex::encode(prev),
            hash: String::new(),
            mac: String::new(),
        };
        entry.hash = hex::encode(entry.compute_hash(prev));
        entry
    }

    /// The hash this entry should carry, given the previous hash it claims.
    pub(crate) fn compute_hash(&self, prev: &Hash) -> Hash {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(self.seq.to_be_bytes());
        h.update(self.at_ms.to_be_bytes());
        for field in [
            self.actor.as_str(),
            self.source.as_str(),
            self.action.as_str(),
            self.target.as_str(),
            outcome_name(self.outcome),
            self.detail.as_str(),
        ] {
            // Fields are bounded far below 4 GiB (the API caps them); saturate anyway.
            let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
            h.update(len.to_be_bytes());
            h.update(field.as_bytes());
        }
        h.update(prev);
        h.finalize().into()
    }

    /// `prev_hash` decoded (`None` if it is not 64 hex digits).
    pub(crate) fn prev(&self) -> Option<Hash> {
        parse_hash(&self.prev_hash)
    }

    /// `hash` decoded (`None` if it is not 64 hex digits).
    pub(crate) fn own(&self) -> Option<Hash> {
        parse_hash(&self.hash)
    }
}

/// The outcome as the hash encodes it (also its JSON name).
pub(crate) fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Requested => "requested",
        Outcome::Success => "success",
        Outcome::Failure => "failure",
        Outcome::Denied => "denied",
    }
}

/// 64 hex digits as a hash.
pub(crate) fn parse_hash(s: &str) -> Option<Hash> {
    let bytes = hex::decode(s).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(detail: &str) -> AuditRecord {
        AuditRecord {
            actor: "alice".into(),
            source: "10.0.0.1".into(),
            action: "command.create".into(),
            target: "T-1".into(),
            outcome: Outcome::Success,
            detail: detail.into(),
        }
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let base = AuditEntry::new(7, 1_000, record("x"), &ZERO_HASH);
        let h = base.own().unwrap();
        assert_eq!(base.compute_hash(&ZERO_HASH), h);
        let mut variants = Vec::new();
        let mut e = base.clone();
        e.seq = 8;
        variants.push(e);
        let mut e = base.clone();
        e.at_ms = 1_001;
        variants.push(e);
        for i in 0..6 {
            let mut e = base.clone();
            match i {
                0 => e.actor.push('!'),
                1 => e.source.push('!'),
                2 => e.action.push('!'),
                3 => e.target.push('!'),
                4 => e.outcome = Outcome::Denied,
                _ => e.detail.push('!'),
            }
            variants.push(e);
        }
        for v in variants {
            assert_ne!(v.compute_hash(&ZERO_HASH), h, "{v:?}");
        }
        assert_ne!(base.compute_hash(&[1; 32]), h);
    }

    #[test]
    fn the_encoding_is_unambiguous() {
        // "ab" + "c" and "a" + "bc" in adjacent fields must not collide.
        let mut a = AuditEntry::new(1, 1, record(""), &ZERO_HASH);
        a.actor = "ab".into();
        a.source = "c".into();
        let mut b = a.clone();
        b.actor = "a".into();
        b.source = "bc".into();
        assert_ne!(a.compute_hash(&ZERO_HASH), b.compute_hash(&ZERO_HASH));
    }
}
