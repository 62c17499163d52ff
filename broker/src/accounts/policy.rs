//! The PCI DSS v4.0.1 account rules as numbers, and the password checks they imply.

/// 8.3.6: at least 12 characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted (bounds the hashing work an attacker can ask for).
pub const MAX_PASSWORD_CHARS: usize = 256;
/// 8.3.7: a new password differs from this many previous ones (the current one included).
pub const PASSWORD_HISTORY: usize = 4;
/// 8.3.4: failed attempts that lock the account.
pub const MAX_FAILED_ATTEMPTS: u32 = 10;
/// 8.3.4: how long a lockout lasts.
pub const LOCKOUT_MS: u64 = 30 * 60 * 1000;
/// 8.2.8: a session idle this long ends.
pub const SESSION_IDLE_MS: u64 = 15 * 60 * 1000;
/// A session ends this long after login whatever its activity.
pub const SESSION_MAX_MS: u64 = 12 * 60 * 60 * 1000;
/// 8.2.6: an account unused this long is disabled.
pub const INACTIVE_DISABLE_MS: u64 = 90 * 24 * 60 * 60 * 1000;
/// 8.3.9: without MFA, a password older than this must be changed.
pub const PASSWORD_MAX_AGE_MS: u64 = 90 * 24 * 60 * 60 * 1000;
/// Longest lifetime of an API token.
pub const MAX_TOKEN_LIFETIME_S: u64 = 366 * 24 * 60 * 60;

/// Why a new password is refused (8.3.6, 8.3.7). The messages never contain the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WeakPassword {
    #[error("the password is shorter than {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    #[error("the password is longer than {MAX_PASSWORD_CHARS} characters")]
    TooLong,
    #[error("the password has no letter")]
    NoLetter,
    #[error("the password has no digit")]
    NoDigit,
    #[error("the password is one of the last {PASSWORD_HISTORY} passwords of this account")]
    Reused,
}

/// 8.3.6: length and character classes. (History is checked against the stored hashes.)
pub fn check_strength(password: &str) -> Result<(), WeakPassword> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(WeakPassword::TooShort);
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(WeakPassword::TooLong);
    }
    if !password.chars().any(char::is_alphabetic) {
        return Err(WeakPassword::NoLetter);
    }
    if !password.chars().any(|c| c.is_ascii_digit()) {
        return Err(WeakPassword::NoDigit);
    }
    Ok(())
}

/// A one-time initial password: 20 characters from an alphabet without look-alikes, with at
/// least one letter and one digit, so it passes [`check_strength`].
pub fn initial_password() -> String {
    use rand::Rng as _;
    const LETTERS: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ";
    const DIGITS: &[u8] = b"23456789";
    let mut rng = rand::rng();
    loop {
        let password: String = (0..20)
            .map(|_| {
                let n = rng.random_range(0..LETTERS.len() + DIGITS.len());
                char::from(*LETTERS.get(n).unwrap_or_else(|| &DIGITS[n - LETTERS.len()]))
            })
            .collect();
        if check_strength(&password).is_ok() {
            return password;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_rules() {
        assert_eq!(check_strength("abc123"), Err(WeakPassword::TooShort));
        assert_eq!(check_strength("abcdefghij1"), Err(WeakPassword::TooShort));
        assert_eq!(check_strength("abcdefghijkl"), Err(WeakPassword::NoDigit));
        assert_eq!(check_strength("123456789012"), Err(WeakPassword::NoLetter));
        assert_eq!(
            check_strength(&"a1".repeat(200)),
            Err(WeakPassword::TooLong)
        );
        assert_eq!(check_strength("abcdefghijk1"), Ok(()));
        // Characters, not bytes.
        assert_eq!(check_strength("ééééééééééé1"), Ok(()));
    }

    #[test]
    fn initial_passwords_pass_and_differ() {
        let a = initial_password();
        let b = initial_password();
        assert_eq!(check_strength(&a), Ok(()));
        assert_ne!(a, b);
    }
}
