//! [`Accounts::login`] and its throttling (issue 10, items 4 and 5; ADR 0009).
//!
//! Every refused login gets the same error ([`AccountError::LoginRefused`], one message) and
//! costs the same work: exactly one argon2 verification (a dummy hash for unknown names, the
//! real hash even when the name is locked out or the account disabled), in-memory counting, and
//! no disk write on the way to the answer. The durable writes some refusals cause (a lockout, an
//! account disabled for inactivity) run after the answer (`persist_*`), so their fsync cannot
//! tell an attacker that a name exists or a password was right.

use std::net::IpAddr;

use tracing::error;

use super::Role;
use super::error::{AccountError, LoginRefusal};
use super::policy::{INACTIVE_DISABLE_MS, PASSWORD_MAX_AGE_MS};
use super::secret;
use super::service::{Accounts, LoginOutcome, accept_code};
use super::sessions::Session;
use super::store::{AccountStore, AccountStoreError};
use super::throttle::{NewLockout, Refused, Source, Ticket};

/// What the part of a login under the write lock decided.
enum Decision {
    In(LoginOutcome),
    Out(LoginRefusal),
    /// Refused as disabled, and the account must now be disabled for inactivity.
    Inactive,
}

impl Accounts {
    /// Admits a login from `from` before any hashing: a source with too many failures, or no
    /// room in the bounded queue of logins, is refused (429 / 503 with Retry-After). The
    /// ticket is held until the login is done.
    pub fn admit_login(&self, from: IpAddr) -> Result<Ticket, Refused> {
        self.throttle.admit(from)
    }

    /// Logs `name` in from `from` with `password` (and `totp` when the account has MFA):
    /// lockout per source and per account (8.3.4), 8.2.6 inactivity, 8.3.9 expiry, MFA with
    /// replay protection. Every refusal is [`AccountError::LoginRefused`] (module docs).
    pub fn login(
        &self,
        name: &str,
        password: &str,
        totp_code: Option<&str>,
        from: IpAddr,
    ) -> Result<LoginOutcome, AccountError> {
        let now = self.now();
        let source = Source::of(from);
        let user = self.store.user(name)?;
        // The one verification of every path.
        let password_ok = match &user {
            Some(u) => secret::verify_password(password, &u.password_hash),
            None => {
                secret::dummy_verify(password);
                false
            }
        };
        let Some(user) = user else {
            return Err(self.refuse(name, source, false, LoginRefusal::UnknownUser));
        };
        if self.throttle.locked(name, source) || user.locked_until_ms > now {
            return Err(self.refuse(name, source, true, LoginRefusal::Locked));
        }
        if !password_ok {
            return Err(self.refuse(name, source, true, LoginRefusal::WrongPassword));
        }
        match self.decide(name, totp_code, now)? {
            Decision::In(outcome) => {
                self.throttle.succeeded(name, source);
                Ok(outcome)
            }
            Decision::Out(reason) => Err(self.refuse(name, source, true, reason)),
            Decision::Inactive => {
                self.persist_later(name.to_owned(), |store, user| {
                    let Some(mut record) = store.user(&user)? else {
                        return Ok(());
                    };
                    record.enabled = false;
                    record.disabled_reason = "inactive for 90 days".into();
                    store.put_user(&record)
                });
                Err(self.refuse(name, source, true, LoginRefusal::Disabled))
            }
        }
    }

    /// The checks after the password, on a fresh record under the write lock; a success is
    /// made durable (TOTP step used, last login) and gets its session.
    fn decide(
        &self,
        name: &str,
        totp_code: Option<&str>,
        now: u64,
    ) -> Result<Decision, AccountError> {
        let _write = self.write_lock();
        let Some(mut user) = self.store.user(name)? else {
            return Ok(Decision::Out(LoginRefusal::UnknownUser));
        };
        if user.locked_until_ms > now {
            return Ok(Decision::Out(LoginRefusal::Locked));
        }
        if !user.enabled {
            return Ok(Decision::Out(LoginRefusal::Disabled));
        }
        if now.saturating_sub(user.active_since_ms) >= INACTIVE_DISABLE_MS {
            return Ok(Decision::Inactive);
        }
        if user.mfa_enabled() {
            match totp_code.filter(|c| !c.is_empty()) {
                None => return Ok(Decision::Out(LoginRefusal::TotpMissing)),
                Some(code) if !accept_code(&mut user, code, now) => {
                    return Ok(Decision::Out(LoginRefusal::TotpWrong));
                }
                Some(_) => {}
            }
        } else if now.saturating_sub(user.password_changed_ms) >= PASSWORD_MAX_AGE_MS {
            user.must_change = true;
        }
        let mfa = user.mfa_enabled();
        let mfa_enrolment_required = (user.role == Role::Admin || user.mfa_reenrol) && !mfa;
        user.failed_attempts = 0;
        user.last_login_ms = Some(now);
        user.active_since_ms = now;
        self.store.put_user(&user)?;

        let token = secret::new_token("");
        let session = Session {
            user: user.name.clone(),
            role: user.role,
            created_ms: now,
            last_seen_ms: now,
            restricted: user.must_change || mfa_enrolment_required,
            mfa,
        };
        self.sessions()
            .insert(secret::token_digest(&token), session, now);
        Ok(Decision::In(LoginOutcome {
            token,
            role: user.role,
            must_change_password: user.must_change,
            mfa_enrolment_required,
        }))
    }

    /// Counts the failure and says no (the caller holds no lock).
    fn refuse(
        &self,
        name: &str,
        source: Source,
        existing: bool,
        reason: LoginRefusal,
    ) -> AccountError {
        let lockout = self.throttle.failed(name, source, existing);
        if let (true, Some(lockout)) = (existing, lockout) {
            self.persist_lockout(name, Some(source), lockout);
        }
        AccountError::LoginRefused { reason, lockout }
    }

    /// Makes a lockout of an existing account durable, after the answer.
    pub(super) fn persist_lockout(&self, name: &str, source: Option<Source>, lockout: NewLockout) {
        let now = self.now();
        let source = source.map(|s| s.to_string());
        self.persist_later(name.to_owned(), move |store, user| match lockout {
            NewLockout::Source(until) => match source {
                Some(source) => store.put_source_lockout(&user, &source, until, now),
                None => Ok(()),
            },
            NewLockout::Account(until) => {
                let Some(mut record) = store.user(&user)? else {
                    return Ok(());
                };
                record.locked_until_ms = record.locked_until_ms.max(until);
                store.put_user(&record)
            }
        });
    }

    /// Runs `write` (under the store's write lock) on a blocking thread of the runtime, not
    /// awaited; inline without a runtime (tools, unit tests). The caller holds no lock.
    fn persist_later(
        &self,
        user: String,
        write: impl FnOnce(&AccountStore, String) -> Result<(), AccountStoreError> + Send + 'static,
    ) {
        let store = std::sync::Arc::clone(&self.store);
        let lock = std::sync::Arc::clone(&self.write);
        let run = move || {
            let _write = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = write(&store, user) {
                error!(error = %e, "a lockout or inactivity change could not be stored");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(run);
            }
            Err(_) => run(),
        }
    }
}
