//! argon2id with bounded memory (issue 10, item 4): every hash and verification of the process
//! runs in one of [`SLOTS`] block buffers, allocated once (on first use) and reused, so
//! password hashing never holds more than `SLOTS` × 19 MiB, whatever the number of concurrent
//! logins and whichever threads run them. A caller waits for a free buffer (logins are
//! admitted before they get here: `throttle`); the wait is bounded by the callers admitted.
//!
//! The argon2 crate's `PasswordHasher`/`PasswordVerifier` allocate a new 19 MiB buffer per
//! call; glibc keeps such freed buffers in per-thread arenas, so a burst of concurrent logins
//! on the blocking pool's many threads grew the process by GBs that were never given back.
//! Here the PHC string is parsed and `hash_password_into_with_memory` computes the output in a
//! pooled buffer; the output is compared in constant time (`password_hash::Output`).

use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

use argon2::password_hash::{Output, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Hashes running at once at most (each holds one buffer of the default 19 MiB).
pub const SLOTS: usize = 2;
/// Largest memory cost accepted in a stored hash (KiB); a bigger one is treated as malformed
/// (a buffer grows to a stored hash's cost once, never beyond this).
const MAX_M_COST_KIB: u32 = 64 * 1024;

/// The buffers not in use.
struct Pool {
    free: Mutex<Vec<Vec<Block>>>,
    returned: Condvar,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        free: Mutex::new((0..SLOTS).map(|_| Vec::new()).collect()),
        returned: Condvar::new(),
    })
}

/// A buffer taken from the pool; given back on drop.
struct Slot(Option<Vec<Block>>);

impl Slot {
    fn take() -> Self {
        let pool = pool();
        let mut free = pool.free.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(buffer) = free.pop() {
                return Slot(Some(buffer));
            }
            free = pool
                .returned
                .wait(free)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The first `blocks` blocks (the buffer grows to that size once).
    fn blocks(&mut self, blocks: usize) -> &mut [Block] {
        let buffer = self.0.get_or_insert_with(Vec::new);
        if buffer.len() < blocks {
            buffer.resize(blocks, Block::default());
        }
        &mut buffer[..blocks]
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(buffer) = self.0.take() {
            let pool = pool();
            pool.free
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(buffer);
            pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Verifications run on this thread (tests count the work of each login path).
    static VERIFICATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Verifications run on the calling thread so far (tests only).
#[cfg(test)]
pub fn verifications() -> u64 {
    VERIFICATIONS.with(std::cell::Cell::get)
}

/// Why hashing failed (never contains the password).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashFailed(String);

/// The argon2id PHC string of `password` with the crate's default parameters (m = 19 MiB,
/// t = 2, p = 1) and `salt`.
pub fn hash(password: &str, salt: &SaltString) -> Result<String, HashFailed> {
    let err = |e: &dyn std::fmt::Display| HashFailed(e.to_string());
    let params = Params::default();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut salt_bytes = [0u8; 64];
    let salt_raw = salt
        .as_salt()
        .decode_b64(&mut salt_bytes)
        .map_err(|e| err(&e))?;
    let out_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let output = compute(&argon, &params, password, salt_raw, out_len).map_err(|e| err(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: (&params).try_into().map_err(|e| err(&e))?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// True if `password` matches the PHC string `phc` (false for a malformed or foreign hash).
/// Exactly one argon2 computation for any well-formed argon2 hash.
pub fn verify(password: &str, phc: &str) -> bool {
    #[cfg(test)]
    VERIFICATIONS.with(|n| n.set(n.get() + 1));
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (parsed.hash, parsed.salt) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if params.m_cost() > MAX_M_COST_KIB {
        return false;
    }
    let mut salt_bytes = [0u8; 64];
    let Ok(salt_raw) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let argon = Argon2::new(algorithm, version, params.clone());
    let computed = compute(&argon, &params, password, salt_raw, expected.len());
    // `Output`'s equality is constant-time.
    computed.is_ok_and(|c| c == expected)
}

/// One argon2 computation of `out_len` bytes in a pooled memory slot (given back before
/// returning).
fn compute(
    argon: &Argon2<'_>,
    params: &Params,
    password: &str,
    salt: &[u8],
    out_len: usize,
) -> Result<Output, argon2::password_hash::Error> {
    let mut slot = Slot::take();
    Output::init_with(out_len, |out| {
        argon
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                out,
                slot.blocks(params.block_count()),
            )
            .map_err(|_| argon2::password_hash::Error::Crypto)
    })
}

#[cfg(test)]
mod tests {
    use argon2::PasswordHasher as _;

    use super::*;

    #[test]
    fn pooled_hashes_match_the_crate_and_verify_both_ways() {
        let salt = SaltString::encode_b64(&[7u8; 16]).unwrap();
        let ours = hash("correct horse 1", &salt).unwrap();
        let theirs = Argon2::default()
            .hash_password(b"correct horse 1", &salt)
            .unwrap()
            .to_string();
        assert_eq!(ours, theirs);
        assert!(verify("correct horse 1", &theirs));
        assert!(!verify("correct horse 2", &ours));
        assert!(!verify(
            "x",
            "$argon2id$v=19$m=999999,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"
        ));
        assert!(!verify("x", "not a hash"));
    }
}
