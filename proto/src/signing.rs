//! Command signatures (docs/architecture.md "Identity and trust", ADR 0007): the controller signs every [`pb::Command`]
//! with its Ed25519 command key; agents verify it against the public keys they pin.
//!
//! - [`CommandKey`]: the controller's private key (PKCS#8 PEM on disk, mode 0600) and
//!   [`CommandKey::sign`].
//! - [`PublicKey`]: a trusted public key (SPKI PEM), named by its [key id](PublicKey::key_id).
//! - [`KeyRing::verify`]: every check a terminal makes before it may act on a command, in a
//!   fixed order, each failure a [`RejectReason`] with a stable machine-readable code.
//!
//! - Release signatures (issue 5): the same key type, used as a *release key* (a separate
//!   key, kept away from the controller): [`CommandKey::sign_release`] signs an artifact's
//!   SHA-256, [`KeyRing::verify_release`] checks it. The signed message is a domain tag plus the
//!   digest, so a release signature can never pass as a command signature or the reverse.
//!
//! Replays (an id already executed) and stale lock generations are the agent's journal's
//! business: they need its state. Their codes are here so both sides share one list.

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::DeviceId;
use crate::pb;

/// How far a command's `issued_at_ms` may lie in the terminal's future (clock skew).
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Longest command id accepted.
pub const MAX_COMMAND_ID_LEN: usize = 64;

/// Domain tag of release signatures: Ed25519 signs `RELEASE_TAG || sha256(artifact)`.
pub const RELEASE_TAG: &[u8] = b"posfleet-release-v1\0";

fn release_message(sha256: &[u8; 32]) -> Vec<u8> {
    let mut message = RELEASE_TAG.to_vec();
    message.extend_from_slice(sha256);
    message
}

/// Why a release signature is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("the artifact is signed by a release key that is not trusted")]
    UnknownKey,
    #[error("the release signature does not match the artifact")]
    BadSignature,
}

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an Ed25519 PKCS#8 private key in PEM form")]
    PrivateKey,
    #[error("not an Ed25519 public key in PEM (SubjectPublicKeyInfo) form")]
    PublicKey,
}

/// The controller's command-signing key.
pub struct CommandKey {
    signing: SigningKey,
    public: PublicKey,
}

impl std::fmt::Debug for CommandKey {
    /// Never prints the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandKey")
            .field("key_id", &self.public.key_id)
            .finish_non_exhaustive()
    }
}

impl CommandKey {
    /// A new random key whose PEM forms and key id never look like a card number (drawn
    /// again until the guard passes: `crate::secret`).
    pub fn generate() -> Self {
        crate::secret::random_until_clean(
            || Self::from_signing(SigningKey::from_bytes(&rand::random::<[u8; 32]>())),
            |key| {
                vec![
                    key.to_pem(),
                    key.public_key().to_pem(),
                    key.key_id().to_owned(),
                ]
            },
        )
    }

    fn from_signing(signing: SigningKey) -> Self {
        let public = PublicKey::from_verifying(signing.verifying_key());
        Self { signing, public }
    }

    /// Reads a PKCS#8 PEM private key (as written by [`CommandKey::to_pem`]).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let signing = SigningKey::from_pkcs8_pem(pem).map_err(|_| KeyError::PrivateKey)?;
        Ok(Self::from_signing(signing))
    }

    /// The private key as PKCS#8 PEM. Write it only with mode 0600.
    pub fn to_pem(&self) -> String {
        self.signing
            .to_pkcs8_pem(Default::default())
            .map(|pem| pem.as_str().to_owned())
            // Encoding a valid 32-byte key cannot fail.
            .unwrap_or_default()
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    pub fn key_id(&self) -> &str {
        &self.public.key_id
    }

    /// The release signature of an artifact whose SHA-256 is `sha256` (64 bytes).
    pub fn sign_release(&self, sha256: &[u8; 32]) -> Vec<u8> {
        self.signing
            .sign(&release_message(sha256))
            .to_bytes()
            .to_vec()
    }

    /// An Ed25519 signature over `tag ‖ message`, for uses other than commands and releases
    /// (the tag keeps the domains apart; e.g. the controller's audit anchors).
    pub fn sign_tagged(&self, tag: &[u8], message: &[u8]) -> [u8; 64] {
        let mut bytes = tag.to_vec();
        bytes.extend_from_slice(message);
        self.signing.sign(&bytes).to_bytes()
    }

    /// A 32-byte secret derived from the private key for `purpose` (SHA-256 of the purpose
    /// and the key's seed), e.g. a MAC key. Secret: never log it.
    pub fn derive_secret(&self, purpose: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(purpose);
        h.update(self.signing.to_bytes());
        h.finalize().into()
    }

    /// Encodes and signs `command`.
    pub fn sign(&self, command: &pb::Command) -> pb::SignedCommand {
        let bytes = command.encode_to_vec();
        let signature = self.signing.sign(&bytes);
        pb::SignedCommand {
            key_id: self.public.key_id.clone(),
            command: bytes,
            signature: signature.to_bytes().to_vec(),
        }
    }
}

/// A command-verification key a terminal trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    verifying: VerifyingKey,
    key_id: String,
}

impl PublicKey {
    fn from_verifying(verifying: VerifyingKey) -> Self {
        let digest = Sha256::digest(verifying.as_bytes());
        let key_id = hex::encode(&digest[..8]);
        Self { verifying, key_id }
    }

    /// Reads a SubjectPublicKeyInfo PEM (as written by [`PublicKey::to_pem`]).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let verifying = VerifyingKey::from_public_key_pem(pem).map_err(|_| KeyError::PublicKey)?;
        Ok(Self::from_verifying(verifying))
    }

    pub fn to_pem(&self) -> String {
        self.verifying
            .to_public_key_pem(Default::default())
            .unwrap_or_default()
    }

    /// 16 hex digits: the first 8 bytes of the SHA-256 of the raw public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Checks a [`CommandKey::sign_tagged`] signature (strict Ed25519).
    pub fn verify_tagged(&self, tag: &[u8], message: &[u8], signature: &[u8]) -> bool {
        let Ok(signature) = Signature::from_slice(signature) else {
            return false;
        };
        let mut bytes = tag.to_vec();
        bytes.extend_from_slice(message);
        self.verifying.verify_strict(&bytes, &signature).is_ok()
    }
}

/// Why a terminal refuses a command. [`RejectReason::code`] goes into
/// `CommandResult.details["reason"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The command bytes are not a valid Command, or its id is missing or malformed.
    Malformed,
    /// Signed by a key the terminal does not trust.
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// Addressed to another device.
    WrongDevice,
    /// Past its `not_after_ms`.
    Expired,
    /// Issued further in the future than the allowed clock skew.
    NotYetValid,
    /// A body this agent does not know (a newer controller).
    UnknownKind,
    /// An id the terminal has already executed (its stored result is sent again).
    Replayed,
    /// Older than the state it would change (a lock generation or config version already
    /// superseded).
    Stale,
    /// Valid, but refused by the terminal's rules (e.g. wipe with a non-empty outbox).
    Refused,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        RejectReason::Malformed,
        RejectReason::UnknownKey,
        RejectReason::BadSignature,
        RejectReason::WrongDevice,
        RejectReason::Expired,
        RejectReason::NotYetValid,
        RejectReason::UnknownKind,
        RejectReason::Replayed,
        RejectReason::Stale,
        RejectReason::Refused,
    ];

    pub fn code(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::UnknownKey => "unknown_key",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::WrongDevice => "wrong_device",
            RejectReason::Expired => "expired",
            RejectReason::NotYetValid => "not_yet_valid",
            RejectReason::UnknownKind => "unknown_kind",
            RejectReason::Replayed => "replayed",
            RejectReason::Stale => "stale",
            RejectReason::Refused => "refused",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// A refused command: the reason, and the id it claims if its bytes could be read (for a bad
/// signature or unknown key the id is unverified: report it, never trust it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub command_id: Option<String>,
}

/// The public keys a terminal accepts commands from (more than one during a key rotation).
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: Vec<PublicKey>,
}

impl KeyRing {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self { keys }
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a release signature: `key_id` trusted, and `signature` valid (strict Ed25519)
    /// over [`RELEASE_TAG`] and `sha256`.
    pub fn verify_release(
        &self,
        key_id: &str,
        sha256: &[u8; 32],
        signature: &[u8],
    ) -> Result<(), ReleaseError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.key_id == key_id)
            .ok_or(ReleaseError::UnknownKey)?;
        let signature = Signature::from_slice(signature).map_err(|_| ReleaseError::BadSignature)?;
        key.verifying
            .verify_strict(&release_message(sha256), &signature)
            .map_err(|_| ReleaseError::BadSignature)
    }

    /// Checks, in this order: key known, signature valid (strict Ed25519), bytes a Command with
    /// a well-formed id, addressed to `device`, not expired at `now_ms`, not issued more than
    /// [`MAX_CLOCK_SKEW_MS`] in the future, a body this build knows. Returns the command only
    /// if every check passes.
    pub fn verify(
        &self,
        signed: &pb::SignedCommand,
        device: &DeviceId,
        now_ms: u64,
    ) -> Result<pb::Command, Rejection> {
        let decoded = pb::Command::decode(signed.command.as_slice()).ok();
        let claimed_id = decoded
            .as_ref()
            .map(|c| c.id.clone())
            .filter(|id| valid_command_id(id));
        let reject = |reason| Rejection {
            reason,
            command_id: claimed_id.clone(),
        };
        let key = self
            .keys
            .iter()
            .find(|k| k.key_id == signed.key_id)
            .ok_or_else(|| reject(RejectReason::UnknownKey))?;
        let signature = Signature::from_slice(&signed.signature)
            .map_err(|_| reject(RejectReason::BadSignature))?;
        key.verifying
            .verify_strict(&signed.command, &signature)
            .map_err(|_| reject(RejectReason::BadSignature))?;
        let command = decoded.ok_or_else(|| reject(RejectReason::Malformed))?;
        if !valid_command_id(&command.id) {
            return Err(reject(RejectReason::Malformed));
        }
        if command.target_device != device.as_str() {
            return Err(reject(RejectReason::WrongDevice));
        }
        if command.not_after_ms < now_ms {
            return Err(reject(RejectReason::Expired));
        }
        if command.issued_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(reject(RejectReason::NotYetValid));
        }
        if command.body.is_none() {
            return Err(reject(RejectReason::UnknownKind));
        }
        Ok(command)
    }
}

/// 1–64 characters of `[A-Za-z0-9_-]`.
pub fn valid_command_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_COMMAND_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh random command id (32 hex digits).
pub fn new_command_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn device(id: &str) -> DeviceId {
        DeviceId::new(id).expect("valid id")
    }

    fn command(target: &str) -> pb::Command {
        pb::Command {
            id: "cmd-1".into(),
            target_device: target.into(),
            issued_at_ms: NOW,
            not_after_ms: NOW + 60_000,
            body: Some(pb::command::Body::Reboot(pb::Reboot {})),
        }
    }

    fn ring(key: &CommandKey) -> KeyRing {
        KeyRing::new(vec![key.public_key().clone()])
    }

    fn reason(r: Result<pb::Command, Rejection>) -> RejectReason {
        r.expect_err("must be rejected").reason
    }

    #[test]
    fn tagged_signatures_bind_tag_message_and_key_and_derived_secrets_differ_by_purpose() {
        let key = CommandKey::generate();
        let sig = key.sign_tagged(b"t1\0", b"message");
        assert!(key.public_key().verify_tagged(b"t1\0", b"message", &sig));
        assert!(!key.public_key().verify_tagged(b"t2\0", b"message", &sig));
        assert!(!key.public_key().verify_tagged(b"t1\0", b"messagf", &sig));
        assert!(
            !key.public_key()
                .verify_tagged(b"t1\0", b"message", &sig[..63])
        );
        let other = CommandKey::generate();
        assert!(!other.public_key().verify_tagged(b"t1\0", b"message", &sig));
        assert_ne!(key.derive_secret(b"a"), key.derive_secret(b"b"));
        assert_ne!(key.derive_secret(b"a"), other.derive_secret(b"a"));
        let again = CommandKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(key.derive_secret(b"a"), again.derive_secret(b"a"));
    }

    #[test]
    fn a_valid_command_verifies() {
        let key = CommandKey::generate();
        let signed = key.sign(&command("t-1"));
        let got = ring(&key)
            .verify(&signed, &device("t-1"), NOW)
            .expect("valid");
        assert_eq!(got, command("t-1"));
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let key = CommandKey::generate();
        let again = CommandKey::from_pem(&key.to_pem()).expect("private pem");
        assert_eq!(again.key_id(), key.key_id());
        let public = PublicKey::from_pem(&key.public_key().to_pem()).expect("public pem");
        assert_eq!(&public, key.public_key());
        assert_eq!(key.key_id().len(), 16);
        assert!(CommandKey::from_pem(&key.public_key().to_pem()).is_err());
        assert!(
            PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
                .is_err()
        );
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let key = CommandKey::generate();
        let shown = format!("{key:?}");
        assert!(!shown.contains("PRIVATE"));
        assert!(shown.contains(key.key_id()));
    }

    #[test]
    fn forged_signature_is_refused() {
        let key = CommandKey::generate();
        let mut signed = key.sign(&command("t-1"));
        signed.signature[0] ^= 1;
        let r = ring(&key).verify(&signed, &device("t-1"), NOW);
        assert_eq!(
            r.clone().map_err(|e| e.command_id),
            Err(Some("cmd-1".into()))
        );
        assert_eq!(reason(r), RejectReason::BadSignature);
        // A signature of the wrong length.
        signed.signature.truncate(10);
        assert_eq!(
            reason(ring(&key).verify(&signed, &device("t-1"), NOW)),
            RejectReason::BadSignature
        );
    }

    #[test]
    fn altered_command_bytes_are_refused() {
        let key = CommandKey::generate();
        let mut signed = key.sign(&command("t-1"));
        let mut other = command("t-1");
        other.body = Some(pb::command::Body::Wipe(pb::Wipe { force: true }));
        signed.command = other.encode_to_vec();
        assert_eq!(
            reason(ring(&key).verify(&signed, &device("t-1"), NOW)),
            RejectReason::BadSignature
        );
    }

    #[test]
    fn a_key_the_terminal_does_not_trust_is_refused() {
        let trusted = CommandKey::generate();
        let stranger = CommandKey::generate();
        let signed = stranger.sign(&command("t-1"));
        assert_eq!(
            reason(ring(&trusted).verify(&signed, &device("t-1"), NOW)),
            RejectReason::UnknownKey
        );
        // Claiming the trusted key id does not help.
        let mut claimed = signed;
        claimed.key_id = trusted.key_id().to_owned();
        assert_eq!(
            reason(ring(&trusted).verify(&claimed, &device("t-1"), NOW)),
            RejectReason::BadSignature
        );
        assert_eq!(
            reason(KeyRing::default().verify(&claimed, &device("t-1"), NOW)),
            RejectReason::UnknownKey
        );
    }

    #[test]
    fn another_devices_command_is_refused() {
        let key = CommandKey::generate();
        let signed = key.sign(&command("t-2"));
        assert_eq!(
            reason(ring(&key).verify(&signed, &device("t-1"), NOW)),
            RejectReason::WrongDevice
        );
    }

    #[test]
    fn validity_window_is_enforced() {
        let key = CommandKey::generate();
        let signed = key.sign(&command("t-1"));
        let ring = ring(&key);
        assert!(ring.verify(&signed, &device("t-1"), NOW + 60_000).is_ok());
        assert_eq!(
            reason(ring.verify(&signed, &device("t-1"), NOW + 60_001)),
            RejectReason::Expired
        );
        assert!(
            ring.verify(&signed, &device("t-1"), NOW - MAX_CLOCK_SKEW_MS)
                .is_ok()
        );
        assert_eq!(
            reason(ring.verify(&signed, &device("t-1"), NOW - MAX_CLOCK_SKEW_MS - 1)),
            RejectReason::NotYetValid
        );
    }

    #[test]
    fn unknown_body_and_bad_ids_are_refused() {
        let key = CommandKey::generate();
        let mut cmd = command("t-1");
        cmd.body = None;
        assert_eq!(
            reason(ring(&key).verify(&key.sign(&cmd), &device("t-1"), NOW)),
            RejectReason::UnknownKind
        );
        for bad in ["", "a/b", "x".repeat(65).as_str(), "id with space"] {
            let mut cmd = command("t-1");
            cmd.id = bad.to_owned();
            let r = ring(&key).verify(&key.sign(&cmd), &device("t-1"), NOW);
            assert_eq!(r.clone().map_err(|e| e.command_id), Err(None));
            assert_eq!(reason(r), RejectReason::Malformed);
        }
        let mut garbage = key.sign(&command("t-1"));
        garbage.command = vec![0xff; 7];
        let key2 = CommandKey::generate();
        let signed = pb::SignedCommand {
            key_id: key2.key_id().to_owned(),
            signature: key2.signing.sign(&garbage.command).to_bytes().to_vec(),
            command: garbage.command,
        };
        assert_eq!(
            reason(ring(&key2).verify(&signed, &device("t-1"), NOW)),
            RejectReason::Malformed
        );
    }

    #[test]
    fn release_signatures_verify_only_for_their_digest_and_key() {
        let release = CommandKey::generate();
        let ring = ring(&release);
        let digest: [u8; 32] = Sha256::digest(b"artifact bytes").into();
        let sig = release.sign_release(&digest);
        assert_eq!(ring.verify_release(release.key_id(), &digest, &sig), Ok(()));
        let mut other = digest;
        other[0] ^= 1;
        assert_eq!(
            ring.verify_release(release.key_id(), &other, &sig),
            Err(ReleaseError::BadSignature)
        );
        assert_eq!(
            ring.verify_release("0000000000000000", &digest, &sig),
            Err(ReleaseError::UnknownKey)
        );
        assert_eq!(
            ring.verify_release(release.key_id(), &digest, &sig[..10]),
            Err(ReleaseError::BadSignature)
        );
        // A command signature over the same bytes is not a release signature.
        let plain = release.signing.sign(&digest).to_bytes();
        assert_eq!(
            ring.verify_release(release.key_id(), &digest, &plain),
            Err(ReleaseError::BadSignature)
        );
    }

    #[test]
    fn reason_codes_round_trip() {
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::from_code(r.code()), Some(r));
        }
        assert_eq!(RejectReason::from_code("nope"), None);
    }

    #[test]
    fn command_ids_are_valid_and_distinct() {
        let a = new_command_id();
        assert!(valid_command_id(&a));
        assert_ne!(a, new_command_id());
    }
}
