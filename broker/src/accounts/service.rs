//! [`Accounts`]: logins, bearer authentication, password changes and MFA enrolment, with the
//! PCI DSS rules of `policy` enforced against an injectable clock. Every method blocks
//! (argon2id, sled); handlers call them through `spawn_blocking`.
//!
//! Writes go through one lock (the store's single writer): a change reads the record afresh
//! under it, so concurrent failed logins all count. Password verification (the slow part)
//! runs before the lock, so logins of different accounts do not wait for each other's hashing.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::error::AccountError;
use super::policy::{self, PASSWORD_HISTORY};
use super::secret::{self, API_TOKEN_PREFIX};
use super::sessions::Sessions;
use super::store::{AccountStore, AccountStoreError, TotpState, UserRecord};
use super::throttle::{LoginThrottle, Source};
use super::{BOOTSTRAP_PARTY, Principal, PrincipalKind, Role, totp};
use crate::controller::Clock;

/// Issuer shown by authenticator apps.
const TOTP_ISSUER: &str = "posfleet";

/// Who a bearer token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub principal: Principal,
    /// The session may only change its password, enrol MFA and log out.
    pub restricted: bool,
    /// SHA-256 of the session token (for logout); `None` for other credentials.
    pub session: Option<[u8; 32]>,
}

/// A successful login.
pub struct LoginOutcome {
    /// The session's bearer token, shown once.
    pub token: String,
    pub role: Role,
    /// The session may only change the password (first login, reset, expiry).
    pub must_change_password: bool,
    /// An admin without MFA: the session may only change the password and enrol MFA.
    pub mfa_enrolment_required: bool,
}

impl std::fmt::Debug for LoginOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginOutcome")
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .field("must_change_password", &self.must_change_password)
            .field("mfa_enrolment_required", &self.mfa_enrolment_required)
            .finish()
    }
}

/// A new TOTP enrolment, shown once.
pub struct Enrolment {
    /// Base32 secret for manual entry.
    pub secret: String,
    /// `otpauth://` URL for QR codes.
    pub otpauth_url: String,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Enrolment(<redacted>)")
    }
}

/// Operator accounts, sessions and API tokens.
pub struct Accounts {
    pub(super) store: Arc<AccountStore>,
    sessions: Mutex<Sessions>,
    /// Serialises read-modify-write of the store (shared with lockout writes that run after a
    /// refused login has been answered: `login`).
    pub(super) write: Arc<Mutex<()>>,
    /// Login admission, lockouts and the per-account backstop.
    pub(super) throttle: LoginThrottle,
    pub(super) clock: Clock,
    /// Content of `DATA/admin.token` (empty: none).
    bootstrap_token: String,
    /// Cached `m/bootstrap_revoked`, set after the revocation is durable.
    bootstrap_revoked: AtomicBool,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Accounts {
    /// Opens the store in `dir`. `bootstrap_token` is the content of `DATA/admin.token`
    /// (empty: no bootstrap token).
    pub fn open(
        dir: &Path,
        cache_capacity: u64,
        bootstrap_token: String,
        clock: Clock,
    ) -> Result<Self, AccountStoreError> {
        let store = AccountStore::open(dir, cache_capacity)?;
        let revoked = store.bootstrap_revoked()?;
        let throttle = LoginThrottle::new(clock.clone());
        let now = clock();
        // Lockouts survive a restart (the counts before a lockout do not).
        for (user, source, until_ms) in store.source_lockouts()? {
            if let (true, Ok(source)) = (until_ms > now, source.parse::<Source>()) {
                throttle.restore(&user, source, until_ms);
            }
        }
        // The dummy hash of unknown names, made now rather than at the first one.
        secret::dummy_hash();
        Ok(Self {
            store: Arc::new(store),
            sessions: Mutex::new(Sessions::default()),
            write: Arc::new(Mutex::new(())),
            throttle,
            clock,
            bootstrap_token,
            bootstrap_revoked: AtomicBool::new(revoked),
        })
    }

    pub(super) fn now(&self) -> u64 {
        (self.clock)()
    }

    pub(super) fn write_lock(&self) -> MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True once `DATA/admin.token` is refused.
    pub fn bootstrap_revoked(&self) -> bool {
        self.bootstrap_revoked.load(Ordering::Acquire)
    }

    pub(super) fn set_bootstrap_revoked(&self) -> Result<(), AccountError> {
        self.store.revoke_bootstrap()?;
        self.bootstrap_revoked.store(true, Ordering::Release);
        Ok(())
    }

    /// Who `bearer` is: an API token, the bootstrap token or a session (which this marks as
    /// used now). `None` for anything unknown, expired or revoked.
    pub fn authenticate(&self, bearer: &str) -> Result<Option<Authenticated>, AccountError> {
        let now = self.now();
        let digest = secret::token_digest(bearer);
        if bearer.starts_with(API_TOKEN_PREFIX) {
            let Some(token) = self.store.token_by_digest(&digest)? else {
                return Ok(None);
            };
            if now >= token.expires_ms || !self.creator_active(&token.created_by)? {
                return Ok(None);
            }
            // A token acts for the account that made it (no MFA: it cannot approve).
            let account = (token.created_by != BOOTSTRAP_PARTY).then_some(token.created_by);
            return Ok(Some(Authenticated {
                principal: Principal {
                    name: format!("token:{}", token.name),
                    role: token.role,
                    kind: PrincipalKind::ApiToken,
                    account,
                    mfa: false,
                },
                restricted: false,
                session: None,
            }));
        }
        if !self.bootstrap_token.is_empty()
            && secret::constant_time_eq(self.bootstrap_token.as_bytes(), bearer.as_bytes())
        {
            if self.bootstrap_revoked() {
                return Ok(None);
            }
            return Ok(Some(Authenticated {
                principal: Principal::bootstrap_admin(),
                restricted: false,
                session: None,
            }));
        }
        Ok(self
            .sessions()
            .touch(&digest, now)
            .map(|session| Authenticated {
                principal: Principal {
                    account: Some(session.user.clone()),
                    name: session.user,
                    role: session.role,
                    kind: PrincipalKind::Session,
                    mfa: session.mfa,
                },
                restricted: session.restricted,
                session: Some(digest),
            }))
    }

    /// True while the creator of a token may still act: the bootstrap token until it is
    /// revoked, an account while it exists and is enabled.
    pub(super) fn creator_active(&self, creator: &str) -> Result<bool, AccountError> {
        if creator == Principal::bootstrap_admin().name {
            return Ok(!self.bootstrap_revoked());
        }
        Ok(self.store.user(creator)?.is_some_and(|u| u.enabled))
    }

    /// Ends the session whose token has SHA-256 `digest`.
    pub fn logout(&self, digest: &[u8; 32]) {
        self.sessions().remove(digest);
    }

    /// Ends every session of `user`.
    pub(super) fn end_sessions(&self, user: &str) {
        self.sessions().end_user(user);
    }

    /// Changes `name`'s password (8.3.6, 8.3.7); ends every session of the account, so the
    /// user logs in again with the new password. A wrong `old` counts as a failed attempt.
    pub fn change_password(&self, name: &str, old: &str, new: &str) -> Result<(), AccountError> {
        policy::check_strength(new)?;
        let now = self.now();
        let user = self
            .store
            .user(name)?
            .ok_or_else(|| AccountError::UnknownUser(name.to_owned()))?;
        if user.locked_until_ms > now {
            return Err(AccountError::Locked {
                until_ms: user.locked_until_ms,
            });
        }
        if !secret::verify_password(old, &user.password_hash) {
            if let Some(lockout) = self.throttle.failed_account(name) {
                self.persist_lockout(name, None, lockout);
            }
            return Err(AccountError::WrongPassword);
        }
        let reused = std::iter::once(&user.password_hash)
            .chain(user.history.iter().take(PASSWORD_HISTORY - 1))
            .any(|hash| secret::verify_password(new, hash));
        if reused {
            return Err(policy::WeakPassword::Reused.into());
        }
        let hash = secret::hash_password(new)?;
        {
            let _write = self.write_lock();
            let mut fresh = self
                .store
                .user(name)?
                .ok_or_else(|| AccountError::UnknownUser(name.to_owned()))?;
            set_password(&mut fresh, hash, now);
            fresh.must_change = false;
            self.store.put_user(&fresh)?;
        }
        self.end_sessions(name);
        Ok(())
    }

    /// Starts (or restarts) a TOTP enrolment; the secret is shown once.
    pub fn mfa_enrol(&self, name: &str) -> Result<Enrolment, AccountError> {
        let _write = self.write_lock();
        let mut user = self
            .store
            .user(name)?
            .ok_or_else(|| AccountError::UnknownUser(name.to_owned()))?;
        if user.mfa_enabled() {
            return Err(AccountError::MfaEnrolled);
        }
        let secret_bytes = totp::new_secret();
        user.totp = Some(TotpState {
            secret_hex: hex::encode(&secret_bytes),
            confirmed: false,
            last_step: 0,
        });
        self.store.put_user(&user)?;
        Ok(Enrolment {
            secret: totp::base32_encode(&secret_bytes),
            otpauth_url: totp::otpauth_url(TOTP_ISSUER, name, &secret_bytes),
        })
    }

    /// Confirms the enrolment with a code from the authenticator; MFA is on from then on (and
    /// the code's step is used up).
    pub fn mfa_confirm(&self, name: &str, code: &str) -> Result<(), AccountError> {
        let now = self.now();
        let _write = self.write_lock();
        let mut user = self
            .store
            .user(name)?
            .ok_or_else(|| AccountError::UnknownUser(name.to_owned()))?;
        match &user.totp {
            None => return Err(AccountError::NoEnrolment),
            Some(t) if t.confirmed => return Err(AccountError::MfaEnrolled),
            Some(_) => {}
        }
        if !accept_code(&mut user, code, now) {
            return Err(AccountError::CodeMismatch);
        }
        if let Some(t) = user.totp.as_mut() {
            t.confirmed = true;
        }
        user.mfa_reenrol = false;
        self.store.put_user(&user)?;
        Ok(())
    }
}

/// Checks `code` against the user's authenticator (confirmed or pending) and uses up its
/// step; false for a wrong code or a step already used (replay).
pub(super) fn accept_code(user: &mut UserRecord, code: &str, now: u64) -> bool {
    let Some(state) = user.totp.as_mut() else {
        return false;
    };
    let Ok(secret_bytes) = hex::decode(&state.secret_hex) else {
        return false;
    };
    match totp::verify(&secret_bytes, code, now) {
        Some(step) if step > state.last_step => {
            state.last_step = step;
            true
        }
        _ => false,
    }
}

/// Makes `hash` the current password, keeping the previous ones for 8.3.7.
pub(super) fn set_password(user: &mut UserRecord, hash: String, now: u64) {
    let old = std::mem::replace(&mut user.password_hash, hash);
    user.history.insert(0, old);
    user.history.truncate(PASSWORD_HISTORY - 1);
    user.password_changed_ms = now;
}
