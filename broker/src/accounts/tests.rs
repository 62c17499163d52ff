//! Every account rule against an injected clock (no waiting), on a real sled store.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::policy::*;
use super::*;

const T0: u64 = 1_700_000_000_000;
const BOOTSTRAP: &str = "bootstrap-token-for-tests-0123456789";
const GOOD: &str = "correct horse 1";
/// Where the tests' logins come from.
const SRC: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

/// True if `result` is a refused login for `reason`.
fn refused<T>(result: Result<T, AccountError>, reason: LoginRefusal) -> bool {
    matches!(result, Err(AccountError::LoginRefused { reason: r, .. }) if r == reason)
}

struct Fixture {
    tmp: tempfile::TempDir,
    now: Arc<AtomicU64>,
    accounts: Accounts,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(T0));
        let accounts = open(tmp.path(), &now);
        Self { tmp, now, accounts }
    }

    fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Closes and reopens the store (a restart).
    fn reopen(&mut self) {
        let dir = self.tmp.path().to_owned();
        // Drop the old handle first so the new one gets the sled lock.
        let placeholder = tempfile::tempdir().unwrap();
        let old = std::mem::replace(&mut self.accounts, open(placeholder.path(), &self.now));
        drop(old);
        self.accounts = open(&dir, &self.now);
    }

    /// An account with password [`GOOD`], past its first-login change.
    fn user(&self, name: &str, role: Role) {
        let initial = self.accounts.create_user(name, role, "admin").unwrap();
        self.accounts.change_password(name, &initial, GOOD).unwrap();
    }

    fn totp(&self, name: &str) -> Vec<u8> {
        let enrolment = self.accounts.mfa_enrol(name).unwrap();
        let secret = totp::base32_decode(&enrolment.secret).unwrap();
        let code = totp::code_text(&secret, self.now()).unwrap();
        self.accounts.mfa_confirm(name, &code).unwrap();
        // The confirmation used up this step's code.
        self.advance(totp::STEP_MS);
        secret
    }
}

fn open(dir: &Path, now: &Arc<AtomicU64>) -> Accounts {
    let now = Arc::clone(now);
    Accounts::open(
        &dir.join("accounts"),
        1 << 20,
        BOOTSTRAP.to_owned(),
        Arc::new(move || now.load(Ordering::SeqCst)),
    )
    .unwrap()
}

#[test]
fn roles_are_ordered() {
    assert!(Role::Admin.allows(Role::Operator));
    assert!(Role::Operator.allows(Role::Viewer));
    assert!(!Role::Viewer.allows(Role::Operator));
    assert!(!Role::Operator.allows(Role::Admin));
    assert_eq!(Role::parse("operator"), Some(Role::Operator));
    assert_eq!(Role::parse("root"), None);
}

#[test]
fn first_login_must_change_the_password_and_is_restricted() {
    let f = Fixture::new();
    let initial = f
        .accounts
        .create_user("alice", Role::Operator, "admin")
        .unwrap();
    assert!(check_strength(&initial).is_ok());
    assert!(matches!(
        f.accounts.create_user("alice", Role::Viewer, "admin"),
        Err(AccountError::Exists(_))
    ));
    let login = f.accounts.login("alice", &initial, None, SRC).unwrap();
    assert!(login.must_change_password);
    let auth = f.accounts.authenticate(&login.token).unwrap().unwrap();
    assert!(auth.restricted);
    assert_eq!(auth.principal.name, "alice");
    assert_eq!(auth.principal.kind, PrincipalKind::Session);
    f.accounts.change_password("alice", &initial, GOOD).unwrap();
    // The change ends the session; the next login is unrestricted.
    assert!(f.accounts.authenticate(&login.token).unwrap().is_none());
    let login = f.accounts.login("alice", GOOD, None, SRC).unwrap();
    assert!(!login.must_change_password);
    assert!(
        !f.accounts
            .authenticate(&login.token)
            .unwrap()
            .unwrap()
            .restricted
    );
}

#[test]
fn weak_passwords_are_refused() {
    let f = Fixture::new();
    f.user("bob", Role::Viewer);
    for (new, why) in [
        ("short1", WeakPassword::TooShort),
        ("no digits in here", WeakPassword::NoDigit),
        ("1234567890123", WeakPassword::NoLetter),
    ] {
        match f.accounts.change_password("bob", GOOD, new) {
            Err(AccountError::Weak(w)) => assert_eq!(w, why, "{new}"),
            other => panic!("{new}: {other:?}"),
        }
    }
    // The old password still works: nothing changed.
    f.accounts.login("bob", GOOD, None, SRC).unwrap();
}

#[test]
fn the_last_four_passwords_cannot_be_reused() {
    let f = Fixture::new();
    f.user("carol", Role::Viewer);
    let passwords = ["second pass 2", "third pass 3", "fourth pass 4"];
    let mut current = GOOD;
    for next in passwords {
        f.accounts.change_password("carol", current, next).unwrap();
        current = next;
    }
    // GOOD, second, third and fourth are the last four.
    for old in [GOOD, "second pass 2", "third pass 3", "fourth pass 4"] {
        assert!(
            matches!(
                f.accounts.change_password("carol", current, old),
                Err(AccountError::Weak(WeakPassword::Reused))
            ),
            "{old}"
        );
    }
    f.accounts
        .change_password("carol", current, "fifth pass 5")
        .unwrap();
    // Now GOOD is five passwords back and allowed again.
    f.accounts
        .change_password("carol", "fifth pass 5", GOOD)
        .unwrap();
}

#[test]
fn ten_failures_lock_out_the_source_for_thirty_minutes_across_a_restart() {
    let mut f = Fixture::new();
    f.user("dave", Role::Operator);
    let other: std::net::IpAddr = "10.0.0.2".parse().unwrap();
    for i in 1..MAX_FAILED_ATTEMPTS {
        assert!(
            matches!(
                f.accounts.login("dave", "wrong password 1", None, SRC),
                Err(AccountError::LoginRefused {
                    reason: LoginRefusal::WrongPassword,
                    lockout: None
                })
            ),
            "failure {i}"
        );
    }
    assert!(matches!(
        f.accounts.login("dave", "wrong password 1", None, SRC),
        Err(AccountError::LoginRefused {
            lockout: Some(NewLockout::Source(_)),
            ..
        })
    ));
    // Locked out from there: even the right password, for 30 minutes, across a restart.
    assert!(refused(
        f.accounts.login("dave", GOOD, None, SRC),
        LoginRefusal::Locked
    ));
    f.reopen();
    assert!(refused(
        f.accounts.login("dave", GOOD, None, SRC),
        LoginRefusal::Locked
    ));
    let users = f.accounts.users().unwrap();
    assert_eq!(users[0].locked_out_from, ["10.0.0.1"]);
    // Not from elsewhere.
    f.accounts.login("dave", GOOD, None, other).unwrap();
    f.advance(LOCKOUT_MS - 1);
    assert!(refused(
        f.accounts.login("dave", GOOD, None, SRC),
        LoginRefusal::Locked
    ));
    f.advance(1);
    f.accounts.login("dave", GOOD, None, SRC).unwrap();
}

#[test]
fn an_admin_reset_unlocks_and_forces_a_change() {
    let f = Fixture::new();
    f.user("erin", Role::Viewer);
    for _ in 0..MAX_FAILED_ATTEMPTS {
        f.accounts
            .login("erin", "wrong password 1", None, SRC)
            .unwrap_err();
    }
    let temp = f.accounts.reset_user("erin", false).unwrap();
    let login = f.accounts.login("erin", &temp, None, SRC).unwrap();
    assert!(login.must_change_password);
    assert!(
        f.accounts
            .authenticate(&login.token)
            .unwrap()
            .unwrap()
            .restricted
    );
}

#[test]
fn idle_sessions_end_after_fifteen_minutes() {
    let f = Fixture::new();
    f.user("frank", Role::Viewer);
    let login = f.accounts.login("frank", GOOD, None, SRC).unwrap();
    f.advance(SESSION_IDLE_MS - 1);
    assert!(f.accounts.authenticate(&login.token).unwrap().is_some());
    f.advance(SESSION_IDLE_MS - 1);
    assert!(
        f.accounts.authenticate(&login.token).unwrap().is_some(),
        "use resets idle time"
    );
    f.advance(SESSION_IDLE_MS);
    assert!(f.accounts.authenticate(&login.token).unwrap().is_none());
    // Logout ends a session at once.
    let login = f.accounts.login("frank", GOOD, None, SRC).unwrap();
    let auth = f.accounts.authenticate(&login.token).unwrap().unwrap();
    f.accounts.logout(&auth.session.unwrap());
    assert!(f.accounts.authenticate(&login.token).unwrap().is_none());
}

#[test]
fn accounts_unused_for_ninety_days_are_disabled() {
    let f = Fixture::new();
    f.user("gina", Role::Viewer);
    f.user("hank", Role::Viewer);
    f.accounts.login("hank", GOOD, None, SRC).unwrap();
    f.advance(INACTIVE_DISABLE_MS - 1);
    f.accounts.login("hank", GOOD, None, SRC).unwrap();
    f.advance(1);
    assert!(refused(
        f.accounts.login("gina", GOOD, None, SRC),
        LoginRefusal::Disabled
    ));
    // Stays disabled, and shows so, until an admin enables it.
    let gina = f
        .accounts
        .users()
        .unwrap()
        .into_iter()
        .find(|u| u.name == "gina")
        .unwrap();
    assert!(!gina.enabled);
    f.accounts.set_enabled("gina", true, "root-admin").unwrap();
    f.accounts.login("gina", GOOD, None, SRC).unwrap();
}

#[test]
fn passwords_expire_after_ninety_days_without_mfa() {
    let f = Fixture::new();
    f.user("ivan", Role::Operator);
    f.user("jane", Role::Operator);
    let secret = f.totp("jane");
    // Both log in a day before the 90 days are up (so that the inactivity rule, tested
    // above, does not disable them first); then the day passes.
    const DAY: u64 = 24 * 60 * 60 * 1000;
    f.advance(PASSWORD_MAX_AGE_MS - DAY);
    assert!(
        !f.accounts
            .login("ivan", GOOD, None, SRC)
            .unwrap()
            .must_change_password
    );
    let code = totp::code_text(&secret, f.now()).unwrap();
    f.accounts.login("jane", GOOD, Some(&code), SRC).unwrap();
    f.advance(DAY);
    let ivan = f.accounts.login("ivan", GOOD, None, SRC).unwrap();
    assert!(ivan.must_change_password);
    assert!(
        f.accounts
            .authenticate(&ivan.token)
            .unwrap()
            .unwrap()
            .restricted
    );
    let code = totp::code_text(&secret, f.now()).unwrap();
    let jane = f.accounts.login("jane", GOOD, Some(&code), SRC).unwrap();
    assert!(
        !jane.must_change_password,
        "with MFA the password does not expire"
    );
}

#[test]
fn totp_missing_invalid_and_replayed_codes_are_refused_and_count() {
    let f = Fixture::new();
    f.user("kate", Role::Operator);
    let secret = f.totp("kate");
    assert!(refused(
        f.accounts.login("kate", GOOD, None, SRC),
        LoginRefusal::TotpMissing
    ));
    assert!(refused(
        f.accounts.login("kate", GOOD, Some(""), SRC),
        LoginRefusal::TotpMissing
    ));
    let good = totp::code_text(&secret, f.now()).unwrap();
    let bad = format!("{:06}", (good.parse::<u32>().unwrap() + 1) % 1_000_000);
    assert!(refused(
        f.accounts.login("kate", GOOD, Some(&bad), SRC),
        LoginRefusal::TotpWrong
    ));
    assert!(refused(
        f.accounts.login("kate", GOOD, Some("abc"), SRC),
        LoginRefusal::TotpWrong
    ));
    f.accounts.login("kate", GOOD, Some(&good), SRC).unwrap();
    assert!(
        refused(
            f.accounts.login("kate", GOOD, Some(&good), SRC),
            LoginRefusal::TotpWrong
        ),
        "replay within the window"
    );
    // Missing and wrong codes count (the success reset the count; the replay was 1): 8 more,
    // then the tenth locks the account out from this source.
    for i in 0..8 {
        let code = if i % 2 == 0 { None } else { Some(bad.as_str()) };
        f.accounts.login("kate", GOOD, code, SRC).unwrap_err();
    }
    assert!(matches!(
        f.accounts.login("kate", GOOD, None, SRC),
        Err(AccountError::LoginRefused {
            lockout: Some(NewLockout::Source(_)),
            ..
        })
    ));
    f.advance(LOCKOUT_MS + totp::STEP_MS);
    // A wrong password is refused before the code is looked at (and the code stays unused).
    let next = totp::code_text(&secret, f.now()).unwrap();
    assert!(refused(
        f.accounts
            .login("kate", "wrong password 1", Some(&next), SRC),
        LoginRefusal::WrongPassword
    ));
    f.accounts.login("kate", GOOD, Some(&next), SRC).unwrap();
}

#[test]
fn admins_must_enrol_mfa_before_a_full_session() {
    let f = Fixture::new();
    let initial = f
        .accounts
        .create_user("lena", Role::Admin, "admin")
        .unwrap();
    let first = f.accounts.login("lena", &initial, None, SRC).unwrap();
    assert!(first.must_change_password && first.mfa_enrolment_required);
    f.accounts.change_password("lena", &initial, GOOD).unwrap();
    let second = f.accounts.login("lena", GOOD, None, SRC).unwrap();
    assert!(!second.must_change_password && second.mfa_enrolment_required);
    assert!(
        f.accounts
            .authenticate(&second.token)
            .unwrap()
            .unwrap()
            .restricted
    );
    // A wrong confirmation code leaves MFA off.
    f.accounts.mfa_enrol("lena").unwrap();
    assert!(matches!(
        f.accounts
            .mfa_confirm("lena", "000000")
            .or(f.accounts.mfa_confirm("lena", "999999")),
        Err(AccountError::CodeMismatch) | Ok(())
    ));
    let secret = f.totp("lena");
    assert!(matches!(
        f.accounts.mfa_enrol("lena"),
        Err(AccountError::MfaEnrolled)
    ));
    let code = totp::code_text(&secret, f.now()).unwrap();
    let full = f.accounts.login("lena", GOOD, Some(&code), SRC).unwrap();
    assert!(!full.mfa_enrolment_required);
    let auth = f.accounts.authenticate(&full.token).unwrap().unwrap();
    assert!(!auth.restricted);
    assert_eq!(auth.principal.role, Role::Admin);
}

#[test]
fn api_tokens_have_a_role_no_higher_than_their_creator_and_expire() {
    let f = Fixture::new();
    f.user("mike", Role::Operator);
    let login = f.accounts.login("mike", GOOD, None, SRC).unwrap();
    let mike = f
        .accounts
        .authenticate(&login.token)
        .unwrap()
        .unwrap()
        .principal;
    assert!(matches!(
        f.accounts.create_token(&mike, "ci", Role::Admin, 3600),
        Err(AccountError::Forbidden(_))
    ));
    let created = f
        .accounts
        .create_token(&mike, "ci", Role::Operator, 3600)
        .unwrap();
    assert!(created.token.starts_with("pft_"));
    let auth = f.accounts.authenticate(&created.token).unwrap().unwrap();
    assert_eq!(auth.principal.name, "token:ci");
    assert_eq!(auth.principal.kind, PrincipalKind::ApiToken);
    assert_eq!(auth.principal.role, Role::Operator);
    // Tokens cannot mint tokens.
    assert!(matches!(
        f.accounts
            .create_token(&auth.principal, "ci2", Role::Viewer, 60),
        Err(AccountError::Forbidden(_))
    ));
    // Forged: right prefix and length, unknown.
    let forged = format!("pft_{}", "0".repeat(64));
    assert!(f.accounts.authenticate(&forged).unwrap().is_none());
    // Expiry.
    f.advance(3600 * 1000);
    assert!(f.accounts.authenticate(&created.token).unwrap().is_none());
    // Revocation, and a disabled creator's tokens stop working.
    let mike = Principal {
        name: "mike".into(),
        role: Role::Operator,
        kind: PrincipalKind::Session,
        account: Some("mike".into()),
        mfa: false,
    };
    let a = f
        .accounts
        .create_token(&mike, "a", Role::Viewer, 3600)
        .unwrap();
    let b = f
        .accounts
        .create_token(&mike, "b", Role::Viewer, 3600)
        .unwrap();
    assert_eq!(f.accounts.tokens(&mike).unwrap().len(), 3);
    f.accounts.revoke_token(&mike, "a").unwrap();
    assert!(f.accounts.authenticate(&a.token).unwrap().is_none());
    assert!(f.accounts.authenticate(&b.token).unwrap().is_some());
    f.accounts.set_enabled("mike", false, "root-admin").unwrap();
    assert!(f.accounts.authenticate(&b.token).unwrap().is_none());
}

#[test]
fn the_bootstrap_token_works_until_revoked_for_good() {
    let mut f = Fixture::new();
    let auth = f.accounts.authenticate(BOOTSTRAP).unwrap().unwrap();
    assert_eq!(auth.principal, Principal::bootstrap_admin());
    let boot = auth.principal;
    let from_boot = f
        .accounts
        .create_token(&boot, "auto", Role::Admin, 3600)
        .unwrap();
    // Refused while no admin with MFA could take over.
    assert!(matches!(
        f.accounts.revoke_token(&boot, BOOTSTRAP_TOKEN_NAME),
        Err(AccountError::Forbidden(_))
    ));
    f.user("nora", Role::Admin);
    f.totp("nora");
    let viewer = Principal {
        name: "v".into(),
        role: Role::Viewer,
        kind: PrincipalKind::Session,
        account: Some("v".into()),
        mfa: false,
    };
    assert!(
        f.accounts
            .revoke_token(&viewer, BOOTSTRAP_TOKEN_NAME)
            .is_err()
    );
    f.accounts
        .revoke_token(&boot, BOOTSTRAP_TOKEN_NAME)
        .unwrap();
    assert!(f.accounts.authenticate(BOOTSTRAP).unwrap().is_none());
    assert!(
        f.accounts.authenticate(&from_boot.token).unwrap().is_none(),
        "tokens the bootstrap token created go with it"
    );
    f.reopen();
    assert!(
        f.accounts.authenticate(BOOTSTRAP).unwrap().is_none(),
        "durable"
    );
}

#[test]
fn names_are_checked_and_reserved_names_refused() {
    let f = Fixture::new();
    for bad in ["", "Alice", "-x", "a b", &"x".repeat(65)] {
        assert!(
            matches!(
                f.accounts.create_user(bad, Role::Viewer, "admin"),
                Err(AccountError::InvalidName(_))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        f.accounts.create_user("admin", Role::Admin, "admin"),
        Err(AccountError::ReservedName(_))
    ));
    assert!(matches!(
        f.accounts.set_enabled("x", false, "x"),
        Err(AccountError::Forbidden(_))
    ));
    assert!(matches!(
        f.accounts.delete_user("ghost", "admin"),
        Err(AccountError::UnknownUser(_))
    ));
}

#[test]
fn errors_and_debug_output_carry_no_secret() {
    let f = Fixture::new();
    let initial = f
        .accounts
        .create_user("omar", Role::Viewer, "admin")
        .unwrap();
    let login = f.accounts.login("omar", &initial, None, SRC).unwrap();
    let text = format!("{login:?}");
    assert!(!text.contains(&login.token), "{text}");
    let err = f
        .accounts
        .change_password("omar", &initial, "short1")
        .unwrap_err();
    assert!(!err.to_string().contains("short1"));
    let enrolment = f.accounts.mfa_enrol("omar").unwrap();
    assert!(!format!("{enrolment:?}").contains(&enrolment.secret));
    let users = format!("{:?}", f.accounts.store.user("omar").unwrap().unwrap());
    assert!(!users.contains("argon2"), "{users}");
}
