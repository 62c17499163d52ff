//! Password hashes (argon2id), bearer tokens (random, stored as SHA-256) and the constant-time
//! comparison both use. Nothing here logs or formats a secret.

use argon2::password_hash::SaltString;
use sha2::{Digest as _, Sha256};

use super::hasher;

/// Prefix of API tokens, so that they are recognisable (e.g. by secret scanners).
pub const API_TOKEN_PREFIX: &str = "pft_";

/// Why a password could not be hashed (never contains the password).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// The argon2id PHC string of `password` (argon2 defaults: m = 19 MiB, t = 2, p = 1), with a
/// random 16-byte salt; computed in the bounded buffer pool of `hasher`.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| HashError(e.to_string()))?;
    hasher::hash(password, &salt).map_err(|e| HashError(e.to_string()))
}

/// True if `password` matches the PHC string `hash` (false for a malformed hash). One argon2
/// computation in the bounded buffer pool.
pub fn verify_password(password: &str, hash: &str) -> bool {
    hasher::verify(password, hash)
}

/// Spends the time of one verification against a hash with the same parameters as real ones,
/// for unknown users (no timing oracle on user names).
pub fn dummy_verify(password: &str) {
    let _ = verify_password(password, dummy_hash());
}

/// The hash [`dummy_verify`] checks against, made once per process (call it at start so the
/// first unknown user does not pay for it).
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        // A hash of a random password: nothing can match it.
        let random = hex::encode(rand::random::<[u8; 16]>());
        hash_password(&random).unwrap_or_default()
    })
}

/// A new random 256-bit bearer token, hex encoded, with `prefix`.
pub fn new_token(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

/// What is stored of a bearer token: its SHA-256.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two byte strings without an early exit on the first difference.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_salted_and_verify() {
        let a = hash_password("correct horse 1").unwrap();
        let b = hash_password("correct horse 1").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "salted");
        assert!(verify_password("correct horse 1", &a));
        assert!(!verify_password("correct horse 2", &a));
        assert!(!verify_password("correct horse 1", "not a hash"));
    }

    #[test]
    fn tokens_are_random_and_digested() {
        let t = new_token(API_TOKEN_PREFIX);
        assert!(t.starts_with("pft_") && t.len() == 4 + 64);
        assert_ne!(t, new_token(API_TOKEN_PREFIX));
        assert_eq!(token_digest(&t), token_digest(&t.clone()));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
