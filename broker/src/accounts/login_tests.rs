//! Login refusals (issue 10, item 5) against an injected clock: every refusal is one answer
//! for one argon2 verification, lockouts are per source with a durable per-account backstop,
//! and the offline unlock and MFA reset, audited at the next start.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::hasher::verifications;
use super::policy::MAX_FAILED_ATTEMPTS;
use super::throttle::ACCOUNT_MAX_FAILURES;
use super::*;

const T0: u64 = 1_700_000_000_000;
const GOOD: &str = "correct horse 1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
    now: Arc<AtomicU64>,
    accounts: Option<Accounts>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(T0));
        let mut f = Self {
            dir,
            now,
            accounts: None,
        };
        f.reopen();
        f
    }

    fn reopen(&mut self) {
        self.accounts = None;
        let now = Arc::clone(&self.now);
        self.accounts = Some(
            Accounts::open(
                &self.dir.path().join("accounts"),
                1 << 20,
                String::new(),
                Arc::new(move || now.load(Ordering::SeqCst)),
            )
            .unwrap(),
        );
    }

    fn a(&self) -> &Accounts {
        self.accounts.as_ref().unwrap()
    }

    fn user(&self, name: &str, role: Role) {
        let initial = self.a().create_user(name, role, "test").unwrap();
        self.a().change_password(name, &initial, GOOD).unwrap();
    }

    fn totp(&self, name: &str) -> Vec<u8> {
        let enrolment = self.a().mfa_enrol(name).unwrap();
        let secret = totp::base32_decode(&enrolment.secret).unwrap();
        let code = totp::code_text(&secret, self.now.load(Ordering::SeqCst)).unwrap();
        self.a().mfa_confirm(name, &code).unwrap();
        self.now.fetch_add(totp::STEP_MS, Ordering::SeqCst);
        secret
    }
}

/// The login's result, the argon2 verifications it ran and how long it took.
fn attempt(
    f: &Fixture,
    name: &str,
    password: &str,
    code: Option<&str>,
    from: &str,
) -> (Result<LoginOutcome, AccountError>, u64, std::time::Duration) {
    let before = verifications();
    let started = Instant::now();
    let result = f.a().login(name, password, code, ip(from));
    (result, verifications() - before, started.elapsed())
}

#[test]
fn every_refusal_costs_one_verification_and_reads_the_same() {
    let f = Fixture::new();
    f.user("uma", Role::Operator);
    let secret = f.totp("uma");
    f.user("dis", Role::Viewer);
    f.a().set_enabled("dis", false, "test").unwrap();
    f.user("lok", Role::Viewer);
    for _ in 0..MAX_FAILED_ATTEMPTS {
        f.a()
            .login("lok", "wrong password 1", None, ip("10.0.0.1"))
            .unwrap_err();
    }
    f.user("all", Role::Viewer);
    // The per-account backstop: many sources.
    for s in 0..ACCOUNT_MAX_FAILURES {
        let from = ip(&format!("10.1.{}.{}", s / 10, s % 10));
        f.a()
            .login("all", "wrong password 1", None, from)
            .unwrap_err();
    }
    let now = f.now.load(Ordering::SeqCst);
    let code = totp::code_text(&secret, now).unwrap();
    let wrong = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    let paths: [(&str, &str, &str, Option<&str>, LoginRefusal); 8] = [
        (
            "unknown user",
            "nobody",
            GOOD,
            None,
            LoginRefusal::UnknownUser,
        ),
        (
            "wrong password",
            "uma",
            "wrong password 1",
            Some(&code),
            LoginRefusal::WrongPassword,
        ),
        (
            "locked from this source",
            "lok",
            GOOD,
            None,
            LoginRefusal::Locked,
        ),
        ("locked everywhere", "all", GOOD, None, LoginRefusal::Locked),
        ("disabled", "dis", GOOD, None, LoginRefusal::Disabled),
        ("TOTP missing", "uma", GOOD, None, LoginRefusal::TotpMissing),
        (
            "TOTP wrong",
            "uma",
            GOOD,
            Some(&wrong),
            LoginRefusal::TotpWrong,
        ),
        (
            "wrong password, locked",
            "lok",
            "wrong password 2",
            None,
            LoginRefusal::Locked,
        ),
    ];
    let mut messages = Vec::new();
    for (path, name, password, code, reason) in paths {
        let (result, hashes, took) = attempt(&f, name, password, code, "10.0.0.1");
        match result {
            Err(AccountError::LoginRefused { reason: r, .. }) => assert_eq!(r, reason, "{path}"),
            other => panic!("{path}: {other:?}"),
        }
        assert_eq!(hashes, 1, "{path}: {hashes} argon2 verifications");
        messages.push(
            f.a()
                .login(name, password, code, ip("10.0.0.1"))
                .map(|_| ())
                .unwrap_err()
                .to_string(),
        );
        eprintln!("login refused ({path}): {took:?}");
    }
    messages.dedup();
    assert_eq!(messages, ["invalid user name, password or TOTP code"]);
    // A success costs the same one verification.
    f.now.fetch_add(totp::STEP_MS, Ordering::SeqCst);
    let code = totp::code_text(&secret, f.now.load(Ordering::SeqCst)).unwrap();
    let (result, hashes, took) = attempt(&f, "uma", GOOD, Some(&code), "10.0.0.9");
    result.unwrap();
    assert_eq!(hashes, 1);
    eprintln!("login accepted: {took:?}");
}

#[test]
fn the_account_wide_backstop_is_durable_and_admin_unlock_lifts_every_lockout() {
    let mut f = Fixture::new();
    f.user("ada", Role::Admin);
    // Ten sources of ten failures: locked everywhere.
    for s in 0..ACCOUNT_MAX_FAILURES {
        let from = ip(&format!("10.2.{}.{}", s / 10, s % 10));
        f.a()
            .login("ada", "wrong password 1", None, from)
            .unwrap_err();
    }
    let refused = |f: &Fixture, from: &str| {
        matches!(
            f.a().login("ada", GOOD, None, ip(from)),
            Err(AccountError::LoginRefused {
                reason: LoginRefusal::Locked,
                ..
            })
        )
    };
    assert!(
        refused(&f, "192.0.2.1"),
        "the backstop did not lock ada everywhere"
    );
    f.reopen();
    assert!(
        refused(&f, "192.0.2.1"),
        "a restart lifted the account-wide lockout"
    );
    assert!(refused(&f, "10.2.0.0"), "a restart lifted a source lockout");
    assert!(f.a().users().unwrap()[0].locked_until_ms.is_some());
    // The offline unlock (the server is stopped: this store is only open here).
    f.a().unlock_offline("ada").unwrap();
    f.reopen();
    f.a().login("ada", GOOD, None, ip("10.2.0.0")).unwrap();
    f.a().login("ada", GOOD, None, ip("192.0.2.1")).unwrap();
    // The unlock waits for the audit log of the next start.
    let mut appended = Vec::new();
    let n = f
        .a()
        .drain_pending_audit(|r| {
            appended.push(r);
            Ok::<_, String>(())
        })
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(appended[0].action, "user.unlock");
    assert_eq!(appended[0].target, "ada");
    assert_eq!(appended[0].actor, OFFLINE_ACTOR);
    assert!(
        appended[0].detail.contains("account-wide"),
        "{}",
        appended[0].detail
    );
    assert_eq!(
        f.a().drain_pending_audit(|_| Ok::<_, String>(())).unwrap(),
        0
    );
    // Nothing is lost if the audit log refuses: the record stays queued.
    f.a().unlock_offline("ada").unwrap();
    assert!(f.a().drain_pending_audit(|_| Err("disk full")).is_err());
    assert_eq!(
        f.a().drain_pending_audit(|_| Ok::<_, String>(())).unwrap(),
        1
    );
}

#[test]
fn an_offline_mfa_reset_forces_a_new_enrolment() {
    let f = Fixture::new();
    f.user("otto", Role::Operator);
    f.totp("otto");
    f.a().reset_mfa_offline("otto").unwrap();
    // The password alone logs in, to a session that may only enrol MFA.
    let login = f.a().login("otto", GOOD, None, ip("10.0.0.1")).unwrap();
    assert!(login.mfa_enrolment_required);
    let auth = f.a().authenticate(&login.token).unwrap().unwrap();
    assert!(auth.restricted && !auth.principal.mfa);
    let secret = f.totp("otto");
    let code = totp::code_text(&secret, f.now.load(Ordering::SeqCst)).unwrap();
    let login = f
        .a()
        .login("otto", GOOD, Some(&code), ip("10.0.0.1"))
        .unwrap();
    assert!(!login.mfa_enrolment_required);
    let auth = f.a().authenticate(&login.token).unwrap().unwrap();
    assert!(!auth.restricted && auth.principal.mfa);
    let mut actions = Vec::new();
    f.a()
        .drain_pending_audit(|r| {
            actions.push(r.action);
            Ok::<_, String>(())
        })
        .unwrap();
    assert_eq!(actions, ["user.reset_mfa"]);
}

#[test]
fn tokens_act_for_their_maker_and_only_mfa_sessions_approve() {
    let f = Fixture::new();
    f.user("ada", Role::Admin);
    let secret = f.totp("ada");
    let code = totp::code_text(&secret, f.now.load(Ordering::SeqCst)).unwrap();
    let login = f
        .a()
        .login("ada", GOOD, Some(&code), ip("10.0.0.1"))
        .unwrap();
    let ada = f.a().authenticate(&login.token).unwrap().unwrap().principal;
    assert_eq!((ada.party(), ada.approver()), ("ada", Some("ada")));
    let token = f.a().create_token(&ada, "ci", Role::Admin, 60).unwrap();
    let ci = f.a().authenticate(&token.token).unwrap().unwrap().principal;
    assert_eq!(ci.name, "token:ci");
    assert_eq!((ci.party(), ci.approver()), ("ada", None));
    let boot = Principal::bootstrap_admin();
    assert_eq!((boot.party(), boot.approver()), (BOOTSTRAP_PARTY, None));
    let auto = f.a().create_token(&boot, "auto", Role::Admin, 60).unwrap();
    let auto = f.a().authenticate(&auto.token).unwrap().unwrap().principal;
    assert_eq!((auto.party(), auto.approver()), (BOOTSTRAP_PARTY, None));
    // A session whose login verified no code does not approve.
    let no_mfa = Principal {
        mfa: false,
        ..ada.clone()
    };
    assert_eq!(no_mfa.approver(), None);
}
