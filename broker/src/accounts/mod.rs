//! Operator accounts and roles (issue 6, ADR 0009).
//!
//! # Layout
//!
//! - this file: [`Role`], [`Principal`] (who is asking; the auth middleware puts it into every
//!   authenticated request).
//! - `policy`: the PCI DSS v4.0.1 numbers and the password strength check.
//! - `secret`: argon2id hashes, random bearer tokens stored as SHA-256.
//! - `totp`: RFC 6238 codes, base32, `otpauth://` URLs.
//! - `store`: the sled store `DATA/accounts` (users, API tokens, bootstrap revocation).
//! - `sessions`: login sessions (in memory, bounded, idle and absolute timeouts).
//! - `service`: [`Accounts`]: login, authentication, password change, MFA enrolment.
//! - `admin`: account and token management.
//! - `tests`: every rule against an injected clock.

mod admin;
mod error;
pub mod policy;
mod secret;
mod service;
mod sessions;
mod store;
#[cfg(test)]
mod tests;
pub mod totp;

use serde::{Deserialize, Serialize};

pub use admin::{BOOTSTRAP_TOKEN_NAME, NewToken, TokenView, UserView, printable, validate_name};
pub use error::AccountError;
pub use secret::constant_time_eq;
pub use service::{Accounts, Authenticated, Enrolment, LoginOutcome};
pub use store::AccountStoreError;

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
}

impl Principal {
    /// The holder of the bootstrap admin token.
    pub fn bootstrap_admin() -> Self {
        Self {
            name: "admin".to_owned(),
            role: Role::Admin,
            kind: PrincipalKind::BootstrapToken,
        }
    }
}
