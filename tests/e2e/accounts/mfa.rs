//! The first admin, MFA and roles through `pf-broker admin create` and `pf-posctl`.

use std::time::Duration;

use posfleet_tests::{Posctl, eventually};

use super::{
    NEW_PASSWORD, create_user, first_admin_login, mode, ok, ok_stdin, one_time_password, principal,
    run,
};
use crate::support::{bins, broker};

/// How many failures lock an account (PCI DSS 8.3.4).
const LOCKOUT_AFTER: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_first_admin_mfa_roles_and_lockout_through_posctl() {
    let mut broker = broker().await;
    let data_dir = broker.data_dir().display().to_string();

    // `admin create` works on the stopped server's data dir.
    broker.terminate().await.expect("the broker stops");
    let created = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&bins().broker)
            .args(["admin", "create", "--data-dir", &data_dir, "--name", "ada"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("admin create finishes")
    .expect("admin create runs");
    let stdout = String::from_utf8_lossy(&created.stdout);
    assert!(
        created.status.success(),
        "admin create failed: {stdout}\n{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let initial = one_time_password(&stdout, "ada");
    broker.restart().await.expect("the broker starts again");

    let posctl = Posctl::new(&broker);
    let ada = principal(&broker, &posctl, "ada");
    first_admin_login(&ada, "ada", &initial).await;
    let whoami = ok(&ada, &["whoami"]).await;
    assert!(
        whoami.stdout.contains(r#""name":"ada""#)
            && whoami.stdout.contains(r#""role":"admin""#)
            && whoami.stdout.contains(r#""restricted":false"#),
        "{whoami}"
    );
    let session_file = ada.config_dir().join("session.json");
    assert_eq!(mode(&session_file), 0o600, "{}", session_file.display());

    // An operator: forced change at the first login, then refused an admin command.
    let op_initial = create_user(&ada, "op", "operator").await;
    let op = principal(&broker, &posctl, "op");
    let out = ok_stdin(
        &op,
        &["login", "--user", "op", "--password-stdin"],
        Some(&format!("{op_initial}\n\n{NEW_PASSWORD}\n{NEW_PASSWORD}\n")),
    )
    .await;
    assert!(
        out.stdout.contains("password changed")
            && out.stdout.contains("logged in as op (operator)"),
        "{out}"
    );
    assert_eq!(mode(&op.config_dir().join("session.json")), 0o600);
    ok(&op, &["devices", "list"]).await;
    for admin_only in [
        &["user", "list"][..],
        &["enroll", "token", "create", "--expires", "1h"],
        &["devices", "revoke", "T-none", "--reason", "test"],
    ] {
        let refused = run(&op, admin_only, None).await;
        assert!(
            !refused.status.success() && refused.stderr.contains("403"),
            "an operator ran {admin_only:?}:\n{refused}"
        );
    }

    // Wrong passwords count: after 10 the right one is refused too (from this address; the
    // answer is the same as for a wrong password, so nobody learns that the account exists
    // or is locked).
    for attempt in 1..=LOCKOUT_AFTER {
        let refused = run(
            &op,
            &["login", "--user", "op", "--password-stdin"],
            Some("wrong password 9\n\n"),
        )
        .await;
        assert!(
            !refused.status.success() && refused.stderr.contains("login refused"),
            "wrong password accepted (attempt {attempt}):\n{refused}"
        );
    }
    let locked = run(
        &op,
        &["login", "--user", "op", "--password-stdin"],
        Some(&format!("{NEW_PASSWORD}\n\n")),
    )
    .await;
    assert!(
        !locked.status.success()
            && locked
                .stderr
                .contains("login refused: invalid user name, password or TOTP code"),
        "the right password after {LOCKOUT_AFTER} failures was not refused:\n{locked}"
    );

    // Every failure and the lockout are in the audit log (aggregated: one entry per reason
    // and window, with the count).
    let audit = ok(
        &ada,
        &[
            "-o", "json", "audit", "list", "--actor", "op", "--limit", "1000",
        ],
    )
    .await;
    let page: posfleet_broker::views::AuditPage = audit.json().expect("an audit page");
    let failures: u64 = page
        .entries
        .iter()
        .filter(|e| {
            e.action == "auth.login" && e.outcome == posfleet_broker::audit::Outcome::Failure
        })
        .map(|e| posfleet_broker::audit::refusal_count(&e.detail).unwrap_or(1))
        .sum();
    assert_eq!(
        failures,
        LOCKOUT_AFTER as u64 + 1,
        "failed logins of op audited, expected 10 wrong + 1 locked: {:#?}",
        page.entries
    );
    assert!(
        page.entries.iter().any(|e| e.action == "auth.lockout"),
        "no auth.lockout entry: {:#?}",
        page.entries
    );
    // The admin's session still works (the lockout is per account and address).
    eventually(Duration::from_secs(5), || async {
        ada.run(&["whoami"]).await?.success()
    })
    .await;
}
