//! `posctl login|logout|mfa|token|user` against the real controller (`app::start` on
//! loopback), with canned prompt answers.

use std::collections::VecDeque;

use super::{Answers, Cli, Command, run_api};
use crate::accounts::totp;
use crate::app::{self, ServeOptions};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const NEW: &str = "correct horse 1";

async fn posctl_with(
    args: &[&str],
    answers: &[&str],
) -> (anyhow::Result<std::process::ExitCode>, String) {
    let cli = Cli::try_parse_from(std::iter::once("posctl").chain(args.iter().copied())).unwrap();
    let Command::Api(cmd) = cli.command else {
        panic!("not an API command: {args:?}");
    };
    let mut out = Vec::new();
    let mut prompt = Answers(
        answers
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<VecDeque<_>>(),
    );
    let result = run_api(
        &cli.conn,
        cli.output,
        cmd,
        &mut out,
        &mut prompt,
        std::future::pending(),
    )
    .await;
    (result, String::from_utf8(out).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_mfa_tokens_users_and_bootstrap_revocation_through_posctl() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let initial = crate::cli::admin_create(&data_dir, "ada").unwrap();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let opts = ServeOptions::loopback(data_dir.clone());
    let running = app::start(&opts, &tracker, cancel.clone()).await.unwrap();
    let dd = data_dir.display().to_string();
    let cfg = tmp.path().join("cfg").display().to_string();
    let base = ["--data-dir", dd.as_str(), "--config-dir", cfg.as_str()];
    let run = |extra: &'static [&'static str]| {
        let mut args: Vec<String> = base.iter().map(|s| (*s).to_owned()).collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let call = |args: Vec<String>, answers: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answers: Vec<&str> = answers.iter().map(String::as_str).collect();
        posctl_with(&args, &answers).await
    };

    // First login: the one-time password is changed, MFA enrolment is next.
    let (result, out) = call(
        run(&["login", "--user", "ada"]),
        vec![initial.clone(), String::new(), NEW.into(), NEW.into()],
    )
    .await;
    result.unwrap();
    assert!(
        out.contains("password changed") && out.contains("MFA enrolment required"),
        "{out}"
    );
    let session_file = tmp.path().join("cfg/session.json");
    let text = std::fs::read_to_string(&session_file).unwrap();
    assert!(text.contains("\"ada\""));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&session_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The restricted session cannot list devices.
    let (result, _) = call(run(&["devices", "list"]), vec![]).await;
    assert!(format!("{:#}", result.unwrap_err()).contains("403"));

    let (result, out) = call(run(&["mfa", "enrol", "-o", "json"]), vec![]).await;
    result.unwrap();
    let enrolment: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let secret = totp::base32_decode(enrolment["secret"].as_str().unwrap()).unwrap();
    let now = posfleet_proto::now_ms();
    let code = totp::code_text(&secret, now).unwrap();
    call(run(&["mfa", "confirm"]), vec![code]).await.0.unwrap();
    // The next step's code (accepted within the window; this step's is used up).
    let next = totp::code_text(&secret, now + totp::STEP_MS).unwrap();
    let (result, out) = call(run(&["login", "--user", "ada"]), vec![NEW.into(), next]).await;
    result.unwrap();
    assert!(out.contains("logged in as ada (admin)"), "{out}");
    let (result, out) = call(run(&["whoami"]), vec![]).await;
    result.unwrap();
    assert!(
        out.contains("\"ada\"") && out.contains("\"restricted\":false"),
        "{out}"
    );

    // Users and tokens.
    let (result, out) = call(
        run(&["user", "create", "bob", "--role", "operator"]),
        vec![],
    )
    .await;
    result.unwrap();
    assert!(out.contains("one-time password for bob"), "{out}");
    let (result, out) = call(
        run(&[
            "token",
            "create",
            "ci",
            "--role",
            "viewer",
            "--expires",
            "1d",
        ]),
        vec![],
    )
    .await;
    result.unwrap();
    let token = out.lines().next().unwrap().to_owned();
    assert!(token.starts_with("pft_"), "{out}");
    let token_file = tmp.path().join("ci.token");
    posfleet_proto::pki::write_secret_file(&token_file, &token).unwrap();
    let tf = token_file.display().to_string();
    let mut with_token: Vec<String> = base.iter().map(|s| (*s).to_owned()).collect();
    with_token.extend([
        "--token-file".into(),
        tf.clone(),
        "devices".into(),
        "list".into(),
    ]);
    call(with_token.clone(), vec![]).await.0.unwrap();
    let (result, out) = call(run(&["token", "list"]), vec![]).await;
    result.unwrap();
    assert!(out.contains("ci") && !out.contains(&token), "{out}");

    // Revoke the bootstrap token; the data dir's admin.token is refused from then on.
    call(run(&["token", "revoke", "bootstrap"]), vec![])
        .await
        .0
        .unwrap();
    let admin_token = data_dir.join("admin.token").display().to_string();
    let mut bootstrap: Vec<String> = base.iter().map(|s| (*s).to_owned()).collect();
    bootstrap.extend([
        "--token-file".into(),
        admin_token,
        "devices".into(),
        "list".into(),
    ]);
    let (result, _) = call(bootstrap.clone(), vec![]).await;
    assert!(format!("{:#}", result.unwrap_err()).contains("401"));
    call(run(&["token", "revoke", "ci"]), vec![])
        .await
        .0
        .unwrap();
    assert!(call(with_token, vec![]).await.0.is_err());

    // Logout: the session ends and is forgotten; posctl falls back to admin.token (refused).
    let (result, out) = call(run(&["logout"]), vec![]).await;
    result.unwrap();
    assert!(out.contains("logged out ada"), "{out}");
    assert!(
        !std::fs::read_to_string(&session_file)
            .unwrap()
            .contains("ada")
    );
    assert!(call(run(&["whoami"]), vec![]).await.0.is_err());
    assert!(running.accounts.bootstrap_revoked());

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(app::SHUTDOWN_GRACE, tracker.wait())
        .await
        .unwrap();
}
