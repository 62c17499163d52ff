//! What account operations answer when they refuse. No variant carries a password, hash,
//! token, TOTP secret or code.

use super::policy::WeakPassword;
use super::secret::HashError;
use super::store::AccountStoreError;

/// Why a login was refused: for the audit log and tests only. The client gets the same answer
/// for every reason (ADR 0009), and every reason costs the same work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    UnknownUser,
    WrongPassword,
    /// Locked out (from this source, or the whole account), whatever the password.
    Locked,
    /// Disabled by an admin or for inactivity (right password).
    Disabled,
    /// The account has MFA and no code came (right password).
    TotpMissing,
    /// A wrong or replayed code (right password).
    TotpWrong,
}

impl LoginRefusal {
    /// As the audit log records it.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownUser => "unknown user",
            Self::WrongPassword => "wrong password",
            Self::Locked => "locked out",
            Self::Disabled => "disabled",
            Self::TotpMissing => "TOTP code missing",
            Self::TotpWrong => "TOTP code wrong",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Any refused login, said the same way whatever the reason; `lockout` if this attempt
    /// locked the name out.
    #[error("invalid user name, password or TOTP code")]
    LoginRefused {
        reason: LoginRefusal,
        lockout: Option<super::NewLockout>,
    },
    #[error(
        "the account is locked after too many failed attempts; retry after {until_ms} (Unix ms) or ask an admin to reset it"
    )]
    Locked { until_ms: u64 },
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
