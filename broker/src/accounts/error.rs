//! What account operations answer when they refuse. No variant carries a password, hash,
//! token, TOTP secret or code.

use super::policy::WeakPassword;
use super::secret::HashError;
use super::store::AccountStoreError;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Unknown user or wrong password (not said which); `locked_now` if this attempt locked
    /// the account.
    #[error("invalid user name or password")]
    InvalidCredentials { locked_now: bool },
    #[error("a TOTP code is required for this account")]
    TotpRequired,
    /// A wrong or replayed code at login.
    #[error("invalid or already used TOTP code")]
    InvalidTotp { locked_now: bool },
    #[error(
        "the account is locked after too many failed attempts; retry after {until_ms} (Unix ms) or ask an admin to reset it"
    )]
    Locked { until_ms: u64 },
    #[error("the account is disabled ({reason}); ask an admin to enable it")]
    Disabled { reason: String },
    #[error(transparent)]
    Weak(#[from] WeakPassword),
    #[error("the current password is wrong")]
    WrongPassword,
    #[error("{0:?} already exists")]
    Exists(String),
    #[error("no account {0:?}")]
    UnknownUser(String),
    #[error("no API token {0:?}")]
    UnknownToken(String),
    #[error(
        "invalid name {0:?}: 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("{0:?} is a reserved name")]
    ReservedName(String),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("MFA is already enrolled for this account; an admin reset with reset_mfa clears it")]
    MfaEnrolled,
    #[error("no MFA enrolment in progress; start one with POST /api/v1/auth/mfa/enrol")]
    NoEnrolment,
    #[error("the code does not match the authenticator; check the device's clock and retry")]
    CodeMismatch,
    #[error(transparent)]
    Store(#[from] AccountStoreError),
    #[error(transparent)]
    Hash(#[from] HashError),
}
