//! Operator accounts and roles (issue 6, ADR 0009).
//!
//! # Layout
//!
//! - this file: [`Role`], [`Principal`] (who is asking; the auth middleware puts it into every
//!   authenticated request).
//! - `policy`: the PCI DSS v4.0.1 numbers and the password strength check.
//! - `secret`: argon2id hashes, random bearer tokens stored as SHA-256.
//! - `hasher`: argon2id in a bounded pool of reused buffers (memory bound of any login flood).
//! - `throttle`: login admission, lockouts per (name, source) and the per-account backstop.
//! - `totp`: RFC 6238 codes, base32, `otpauth://` URLs.
//! - `store`: the sled store `DATA/accounts` (users, API tokens, bootstrap revocation).
//! - `sessions`: login sessions (in memory, bounded, idle and absolute timeouts).
//! - `service`: [`Accounts`]: authentication, password change, MFA enrolment.
//! - `login`: [`Accounts::login`]: one answer and one hash for every refusal, throttling.
//! - `admin`: account and token management.
//! - `offline`: `posfleet-broker admin create|unlock|reset-mfa` and their queued audit records.
//! - `tests`: every rule against an injected clock.

mod admin;
mod error;
mod hasher;
mod login;
#[cfg(test)]
mod login_tests;
mod offline;
pub mod policy;
mod secret;
mod service;
mod sessions;
mod store;
#[cfg(test)]
mod tests;
pub mod throttle;
pub mod totp;

use serde::{Deserialize, Serialize};

pub use admin::{BOOTSTRAP_TOKEN_NAME, NewToken, TokenView, UserView, printable, validate_name};
pub use error::{AccountError, LoginRefusal};
pub use offline::OFFLINE_ACTOR;
pub use secret::constant_time_eq;
pub use service::{Accounts, Authenticated, Enrolment, LoginOutcome};
pub use store::AccountStoreError;
pub use throttle::{NewLockout, Refused, Source, Ticket};

/// The party the bootstrap token (and the API tokens made with it) act for: not a human
/// account (no account can take this reserved name).
pub const BOOTSTRAP_PARTY: &str = "admin";

/// Default page cache of the account store (a few records).
pub const DEFAULT_CACHE: u64 = 4 * 1024 * 1024;

/// What an operator may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Lock/unlock, configuration, reboot, logs, transactions.
    Operator,
    /// Users, enrolment, revocation, wipe, rollouts, keys.
    Admin,
}

impl Role {
    /// Parses `viewer`, `operator` or `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// True if this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

/// How a request authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// The bootstrap admin token in `DATA/admin.token`.
    BootstrapToken,
    /// An operator's login session.
    Session,
    /// An API token for automation.
    ApiToken,
}

/// Who is asking: put into every authenticated request's extensions by the auth middleware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The account (or token) name; recorded as the actor of changes and audit entries.
    pub name: String,
    pub role: Role,
    pub kind: PrincipalKind,
    /// The human account answerable for the request: the session's account, or the account
    /// that made the API token; `None` for the bootstrap token and the tokens made with it.
    pub account: Option<String>,
    /// A session whose login verified a TOTP code (false for every token).
    pub mfa: bool,
}

impl Principal {
    /// The holder of the bootstrap admin token.
    pub fn bootstrap_admin() -> Self {
        Self {
            name: BOOTSTRAP_PARTY.to_owned(),
            role: Role::Admin,
            kind: PrincipalKind::BootstrapToken,
            account: None,
            mfa: false,
        }
    }

    /// Whose request this is, for two-person approval and the lock window: the human
    /// account, or [`BOOTSTRAP_PARTY`] for the bootstrap token and its tokens.
    pub fn party(&self) -> &str {
        self.account.as_deref().unwrap_or(BOOTSTRAP_PARTY)
    }

    /// The human account this principal may approve for: a session of an account whose login
    /// verified a TOTP code. Tokens (API or bootstrap) never approve.
    pub fn approver(&self) -> Option<&str> {
        match self.kind {
            PrincipalKind::Session if self.mfa => self.account.as_deref(),
            _ => None,
        }
    }
}
