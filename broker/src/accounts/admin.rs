//! Account and API token management on [`Accounts`]: what admins (and, for their own tokens,
//! operators) do. Every method blocks.

use serde::{Deserialize, Serialize};

use super::error::AccountError;
use super::policy::{self, MAX_TOKEN_LIFETIME_S};
use super::secret::{self, API_TOKEN_PREFIX};
use super::service::{Accounts, set_password};
use super::store::{TokenRecord, UserRecord, record_version};
use super::{Principal, PrincipalKind, Role};

/// Names no account or token may take: the bootstrap token's actor name and its token name
/// (PCI DSS 8.2.2: no generic accounts).
pub const RESERVED_NAMES: &[&str] = &["admin", "bootstrap", "root"];
/// The name `DELETE /api/v1/tokens/{name}` uses for the bootstrap token.
pub const BOOTSTRAP_TOKEN_NAME: &str = "bootstrap";

/// An account as the API shows it (no hash, no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    pub name: String,
    pub role: Role,
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub disabled_reason: String,
    /// Set while the account is locked out from everywhere (the per-account backstop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until_ms: Option<u64>,
    /// Client sources (IPv4 addresses, IPv6 /64s) the account is locked out from now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locked_out_from: Vec<String>,
    pub mfa: bool,
    pub must_change_password: bool,
    pub created_at_ms: u64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_login_ms: Option<u64>,
    pub password_changed_at_ms: u64,
}

/// An API token as the API shows it (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub role: Role,
    pub created_by: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

impl From<&TokenRecord> for TokenView {
    fn from(t: &TokenRecord) -> Self {
        Self {
            name: t.name.clone(),
            role: t.role,
            created_by: t.created_by.clone(),
            created_at_ms: t.created_ms,
            expires_at_ms: t.expires_ms,
        }
    }
}

/// A new API token, shown once.
pub struct NewToken {
    pub token: String,
    pub view: TokenView,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("token", &"<redacted>")
            .field("view", &self.view)
            .finish()
    }
}

/// 1-64 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), AccountError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if !ok {
        return Err(AccountError::InvalidName(printable(name)));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(AccountError::ReservedName(name.to_owned()));
    }
    Ok(())
}

/// A name from a request, shortened and stripped of control characters for messages and
/// the audit log.
pub fn printable(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).take(64).collect()
}

impl Accounts {
    /// Creates an account with a one-time initial password (returned; must be changed at the
    /// first login).
    pub fn create_user(&self, name: &str, role: Role, by: &str) -> Result<String, AccountError> {
        validate_name(name)?;
        let password = policy::initial_password();
        let hash = secret::hash_password(&password)?;
        let now = self.now();
        let _write = self.write_lock();
        if self.store.user(name)?.is_some() {
            return Err(AccountError::Exists(name.to_owned()));
        }
        self.store.put_user(&UserRecord {
            v: record_version(),
            name: name.to_owned(),
            role,
            password_hash: hash,
            history: Vec::new(),
            password_changed_ms: now,
            must_change: true,
            enabled: true,
            disabled_reason: String::new(),
            failed_attempts: 0,
            locked_until_ms: 0,
            created_ms: now,
            created_by: by.to_owned(),
            last_login_ms: None,
            active_since_ms: now,
            totp: None,
            mfa_reenrol: false,
        })?;
        Ok(password)
    }

    /// Every account.
    pub fn users(&self) -> Result<Vec<UserView>, AccountError> {
        let now = self.now();
        Ok(self
            .store
            .users()?
            .iter()
            .map(|u| UserView {
                name: u.name.clone(),
                role: u.role,
                enabled: u.enabled,
                disabled_reason: u.disabled_reason.clone(),
                locked_until_ms: (u.locked_until_ms > now).then_some(u.locked_until_ms),
                locked_out_from: self
                    .throttle
                    .locked_sources(&u.name)
                    .iter()
                    .map(|(s, _)| s.to_string())
                    .collect(),
                mfa: u.mfa_enabled(),
                must_change_password: u.must_change,
                created_at_ms: u.created_ms,
                created_by: u.created_by.clone(),
                last_login_ms: u.last_login_ms,
                password_changed_at_ms: u.password_changed_ms,
            })
            .collect())
    }

    /// Sets a new one-time password (returned), clears a lockout and restarts the inactivity
    /// period; with `reset_mfa` also removes the authenticator. Ends the account's sessions.
    pub fn reset_user(&self, name: &str, reset_mfa: bool) -> Result<String, AccountError> {
        let password = policy::initial_password();
        let hash = secret::hash_password(&password)?;
        let now = self.now();
        {
            let _write = self.write_lock();
            let mut user = self.existing(name)?;
            set_password(&mut user, hash, now);
            user.must_change = true;
            user.failed_attempts = 0;
            user.locked_until_ms = 0;
            user.active_since_ms = now;
            if reset_mfa {
                user.totp = None;
            }
            self.store.put_user(&user)?;
            self.store.clear_source_lockouts(name)?;
        }
        self.throttle.unlock(name);
        self.end_sessions(name);
        Ok(password)
    }

    /// Enables or disables an account (not one's own). Enabling clears a lockout and restarts
    /// the inactivity period; disabling ends its sessions.
    pub fn set_enabled(&self, name: &str, enabled: bool, by: &str) -> Result<(), AccountError> {
        if name == by {
            return Err(AccountError::Forbidden(
                "an admin cannot disable or enable themselves",
            ));
        }
        let now = self.now();
        {
            let _write = self.write_lock();
            let mut user = self.existing(name)?;
            user.enabled = enabled;
            if enabled {
                user.disabled_reason.clear();
                user.active_since_ms = now;
                user.failed_attempts = 0;
                user.locked_until_ms = 0;
            } else {
                user.disabled_reason = format!("disabled by {by}");
            }
            self.store.put_user(&user)?;
            if enabled {
                self.store.clear_source_lockouts(name)?;
            }
        }
        if enabled {
            self.throttle.unlock(name);
        } else {
            self.end_sessions(name);
        }
        Ok(())
    }

    /// Deletes an account (not one's own) with its API tokens and sessions.
    pub fn delete_user(&self, name: &str, by: &str) -> Result<(), AccountError> {
        if name == by {
            return Err(AccountError::Forbidden("an admin cannot delete themselves"));
        }
        {
            let _write = self.write_lock();
            self.existing(name)?;
            self.store.delete_user(name)?;
        }
        self.end_sessions(name);
        Ok(())
    }

    fn existing(&self, name: &str) -> Result<UserRecord, AccountError> {
        self.store
            .user(name)?
            .ok_or_else(|| AccountError::UnknownUser(printable(name)))
    }

    /// Creates an API token with `role` (at most the creator's) valid for `expires_in_s`.
    /// API tokens cannot create tokens.
    pub fn create_token(
        &self,
        by: &Principal,
        name: &str,
        role: Role,
        expires_in_s: u64,
    ) -> Result<NewToken, AccountError> {
        if by.kind == PrincipalKind::ApiToken {
            return Err(AccountError::Forbidden(
                "API tokens cannot create API tokens; log in with posctl login",
            ));
        }
        if !by.role.allows(role) {
            return Err(AccountError::Forbidden(
                "a token's role cannot be higher than its creator's",
            ));
        }
        validate_name(name)?;
        if expires_in_s == 0 || expires_in_s > MAX_TOKEN_LIFETIME_S {
            return Err(AccountError::Invalid(
                "expires_in_s must be between 1 and 31622400 (366 days)",
            ));
        }
        let token = secret::new_token(API_TOKEN_PREFIX);
        let now = self.now();
        let record = TokenRecord {
            v: record_version(),
            name: name.to_owned(),
            role,
            created_by: by.name.clone(),
            created_ms: now,
            expires_ms: now.saturating_add(expires_in_s.saturating_mul(1000)),
            digest_hex: hex::encode(secret::token_digest(&token)),
        };
        let _write = self.write_lock();
        if self.store.token(name)?.is_some() {
            return Err(AccountError::Exists(name.to_owned()));
        }
        self.store.put_token(&record)?;
        Ok(NewToken {
            token,
            view: TokenView::from(&record),
        })
    }

    /// The tokens `by` may see: every one for an admin, else the ones it created.
    pub fn tokens(&self, by: &Principal) -> Result<Vec<TokenView>, AccountError> {
        Ok(self
            .store
            .tokens()?
            .iter()
            .filter(|t| by.role == Role::Admin || t.created_by == by.name)
            .map(TokenView::from)
            .collect())
    }

    /// Revokes a token (an admin any, others their own). `bootstrap` revokes
    /// `DATA/admin.token` for good; that needs an enabled admin account with MFA, so that
    /// someone can still administer the fleet.
    pub fn revoke_token(&self, by: &Principal, name: &str) -> Result<(), AccountError> {
        if name == BOOTSTRAP_TOKEN_NAME {
            if by.role != Role::Admin {
                return Err(AccountError::Forbidden(
                    "only an admin can revoke the bootstrap token",
                ));
            }
            let _write = self.write_lock();
            let usable_admin = self
                .store
                .users()?
                .iter()
                .any(|u| u.role == Role::Admin && u.enabled && u.mfa_enabled());
            if !usable_admin {
                return Err(AccountError::Forbidden(
                    "no enabled admin account with MFA exists; create one (posfleet-broker admin \
                     create), log in and enrol MFA before revoking the bootstrap token",
                ));
            }
            return self.set_bootstrap_revoked();
        }
        let _write = self.write_lock();
        let token = self
            .store
            .token(name)?
            .filter(|t| by.role == Role::Admin || t.created_by == by.name)
            .ok_or_else(|| AccountError::UnknownToken(printable(name)))?;
        self.store.delete_token(&token)?;
        Ok(())
    }
}
