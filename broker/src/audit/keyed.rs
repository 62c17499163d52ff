//! Keyed checkpoints of the audit chain (issue 10 item 11).
//!
//! The hash chain shows that nothing was edited *unless the whole chain was rebuilt*: whoever
//! can write the data directory can edit an entry, recompute every later hash and rewrite the
//! anchor file. So the chain is also keyed, with an **audit key** (Ed25519, PKCS#8 PEM, 0600,
//! `DATA/audit.key` by default, `--audit-key FILE` to keep it off the data directory's disk;
//! created at the first start; never logged, only its id):
//!
//! - every entry carries `mac = HMAC-SHA256(k, "posfleet-audit-mac-v1\0" ‖ installation ‖ seq
//!   ‖ hash)`, `k` derived from the audit key; the anchor file, the base left by pruning and
//!   the log's metadata carry MACs of their own domain. Someone without the key cannot rebuild
//!   a chain that verifies: `verify` names the first entry whose checkpoint fails.
//! - **signed anchors** ([`AuditAnchor`]): the head's seq and hash, the installation, the key
//!   id and public key, signed with the audit key (Ed25519, verifiable by anyone). Exported
//!   and kept elsewhere, an anchor also catches a rebuild by someone who *has* the key (or
//!   replaced it): `verify` against it refuses an anchor that does not verify, is from another
//!   installation or names another key, and otherwise names the first entry where the chain
//!   departs from it.

use std::path::Path;

use posfleet_proto::pki::write_secret_file;
use posfleet_proto::signing::{CommandKey, PublicKey};
use ring::hmac;
use serde::{Deserialize, Serialize};

use super::entry::Hash;
use crate::views::AuditAnchor;

/// `AuditAnchor::format` of this version.
pub const ANCHOR_FORMAT: &str = "posfleet-audit-anchor-v1";
const ANCHOR_TAG: &[u8] = b"posfleet-audit-anchor-v1\0";
const MAC_KEY_PURPOSE: &[u8] = b"posfleet-audit-mac-key-v1\0";

/// What a MAC vouches for (each its own domain, so one cannot stand in for another).
#[derive(Debug, Clone, Copy)]
pub(crate) enum MacDomain {
    /// An entry (`seq`, `hash`).
    Entry,
    /// The anchor file: the head of the chain.
    Head,
    /// The base left by pruning.
    Base,
}

impl MacDomain {
    fn tag(self) -> &'static [u8] {
        match self {
            MacDomain::Entry => b"posfleet-audit-mac-v1\0",
            MacDomain::Head => b"posfleet-audit-head-v1\0",
            MacDomain::Base => b"posfleet-audit-base-v1\0",
        }
    }
}

/// The audit key: signs anchors, and keys the checkpoints.
pub struct AuditKey {
    key: CommandKey,
    mac: hmac::Key,
}

impl std::fmt::Debug for AuditKey {
    /// The key id only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("key_id", &self.key.key_id())
            .finish_non_exhaustive()
    }
}

/// Why the audit key could not be loaded or created. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    #[error("cannot read the audit key {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit key {path} is not an Ed25519 PKCS#8 PEM private key")]
    Parse { path: std::path::PathBuf },
    #[error("cannot write the audit key {path}: {detail}")]
    Write {
        path: std::path::PathBuf,
        detail: String,
    },
}

impl AuditKey {
    fn new(key: CommandKey) -> Self {
        let mac = hmac::Key::new(hmac::HMAC_SHA256, &key.derive_secret(MAC_KEY_PURPOSE));
        Self { key, mac }
    }

    /// Loads the key at `path`, creating it (0600) if there is none. Returns whether it was
    /// created. Blocks.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), AuditKeyError> {
        match std::fs::read_to_string(path) {
            Ok(pem) => {
                let key = CommandKey::from_pem(&pem).map_err(|_| AuditKeyError::Parse {
                    path: path.to_owned(),
                })?;
                Ok((Self::new(key), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)
                        .map_err(|e| AuditKeyError::Write {
                            path: path.to_owned(),
                            detail: e.to_string(),
                        })?;
                }
                // The key id is logged and exported: draw again the rare key whose id holds a
                // run of digits a card-data scanner would flag.
                let key = loop {
                    let key = CommandKey::generate();
                    if posfleet_proto::pan::longest_digit_run(key.key_id())
                        < posfleet_proto::pan::MIN_PAN_DIGITS
                    {
                        break key;
                    }
                };
                write_secret_file(path, &key.to_pem()).map_err(|e| AuditKeyError::Write {
                    path: path.to_owned(),
                    detail: e.to_string(),
                })?;
                Ok((Self::new(key), true))
            }
            Err(source) => Err(AuditKeyError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// 16 hex digits naming the key (safe to log and print).
    pub fn key_id(&self) -> &str {
        self.key.key_id()
    }

    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The checkpoint of (`seq`, `hash`) in `domain`, hex.
    pub(crate) fn mac(
        &self,
        domain: MacDomain,
        installation: &str,
        seq: u64,
        hash: &Hash,
    ) -> String {
        hex::encode(hmac::sign(&self.mac, &mac_input(domain, installation, seq, hash)).as_ref())
    }

    /// True if `mac` (hex) is the checkpoint of (`seq`, `hash`) in `domain`.
    pub(crate) fn check(
        &self,
        domain: MacDomain,
        installation: &str,
        seq: u64,
        hash: &Hash,
        mac: &str,
    ) -> bool {
        super::encoding::decode(mac).is_some_and(|tag| {
            hmac::verify(&self.mac, &mac_input(domain, installation, seq, hash), &tag).is_ok()
        })
    }

    /// The checkpoint of the log's metadata, hex.
    pub(crate) fn meta_mac(&self, meta: &Meta) -> String {
        hex::encode(hmac::sign(&self.mac, &meta_input(meta)).as_ref())
    }

    pub(crate) fn check_meta(&self, meta: &Meta) -> bool {
        super::encoding::decode(&meta.mac)
            .is_some_and(|tag| hmac::verify(&self.mac, &meta_input(meta), &tag).is_ok())
    }

    /// A signed anchor of (`seq`, `hash`).
    pub(crate) fn anchor(
        &self,
        meta: &Meta,
        seq: u64,
        hash: &Hash,
        exported_at_ms: u64,
    ) -> AuditAnchor {
        let mut anchor = AuditAnchor {
            format: ANCHOR_FORMAT.to_owned(),
            installation: meta.installation.clone(),
            seq,
            hash: hex::encode(hash),
            keyed_from: meta.keyed_from,
            exported_at_ms,
            key_id: self.key.key_id().to_owned(),
            public_key_pem: self.key.public_key().to_pem(),
            signature: String::new(),
        };
        anchor.signature = hex::encode(self.key.sign_tagged(ANCHOR_TAG, &anchor_message(&anchor)));
        anchor
    }
}

/// The log's metadata (sled key `m`), made at the first open with an audit key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// Random, made with the log: an anchor names it.
    pub installation: String,
    /// The audit key that keys entries from `keyed_from` on.
    pub key_id: String,
    /// Entries before this seq predate the key (written before keyed checkpoints, or under a
    /// key since replaced).
    pub keyed_from: u64,
    /// HMAC of the fields above (hex).
    pub mac: String,
}

/// A random installation id: 24 lowercase consonants (no digits, so no run of them can look
/// like a card number in a data-directory scan).
pub(crate) fn new_installation() -> String {
    const ALPHABET: &[u8] = b"bcdfghjkmnpqrstvwxz";
    (0..24)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn mac_input(domain: MacDomain, installation: &str, seq: u64, hash: &Hash) -> Vec<u8> {
    let mut out = domain.tag().to_vec();
    put_str(&mut out, installation);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(hash);
    out
}

fn meta_input(meta: &Meta) -> Vec<u8> {
    let mut out = b"posfleet-audit-meta-v1\0".to_vec();
    put_str(&mut out, &meta.installation);
    put_str(&mut out, &meta.key_id);
    out.extend_from_slice(&meta.keyed_from.to_be_bytes());
    out
}

/// What an anchor's signature covers: every field but the signature and the public key
/// (which `key_id` names).
fn anchor_message(a: &AuditAnchor) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, &a.format);
    put_str(&mut out, &a.installation);
    out.extend_from_slice(&a.seq.to_be_bytes());
    put_str(&mut out, &a.hash);
    out.extend_from_slice(&a.keyed_from.to_be_bytes());
    out.extend_from_slice(&a.exported_at_ms.to_be_bytes());
    put_str(&mut out, &a.key_id);
    out
}

/// Why an anchor is refused (each names the anchor field at fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct AnchorError {
    pub field: &'static str,
    pub message: String,
}

fn refuse(field: &'static str, message: impl Into<String>) -> AnchorError {
    AnchorError {
        field,
        message: message.into(),
    }
}

/// Checks an anchor against this log's `meta` and `key`: format, signature (under the
/// anchor's own public key), installation and key. Returns the anchored seq and hash.
pub(crate) fn check_anchor(
    anchor: &AuditAnchor,
    meta: &Meta,
    key: &AuditKey,
) -> Result<Hash, AnchorError> {
    if anchor.format != ANCHOR_FORMAT {
        return Err(refuse(
            "format",
            format!("not a posfleet audit anchor (expected {ANCHOR_FORMAT:?})"),
        ));
    }
    let public = PublicKey::from_pem(&anchor.public_key_pem)
        .map_err(|_| refuse("public_key_pem", "not an Ed25519 public key in PEM form"))?;
    if public.key_id() != anchor.key_id {
        return Err(refuse(
            "key_id",
            "does not name the anchor's public key: the anchor was altered",
        ));
    }
    let signature = hex::decode(&anchor.signature).unwrap_or_default();
    if !public.verify_tagged(ANCHOR_TAG, &anchor_message(anchor), &signature) {
        return Err(refuse(
            "signature",
            "the anchor's signature does not verify: the anchor was altered, or was not made \
             by a posfleet controller",
        ));
    }
    if anchor.installation != meta.installation {
        return Err(refuse(
            "installation",
            format!(
                "the anchor is from another installation ({}); this controller's audit log \
                 belongs to {}",
                anchor.installation, meta.installation
            ),
        ));
    }
    if anchor.key_id != key.key_id() {
        return Err(refuse(
            "key_id",
            format!(
                "the anchor was signed with audit key {} but this controller's audit key is {}: \
                 the key was replaced (or the anchor is from another installation)",
                anchor.key_id,
                key.key_id()
            ),
        ));
    }
    super::entry::parse_hash(&anchor.hash)
        .ok_or_else(|| refuse("hash", "not 64 hex digits: the anchor was altered"))
}
