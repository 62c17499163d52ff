//! Operator accounts, the audit log, two-person approval, enrolment and revocation (issue 6)
//! with the real processes: `pf-broker admin create` on the data dir, `pf-posctl login
//! --password-stdin` with TOTP codes computed from the enrolled secret, `pf-agent enroll` and
//! `pf-agent run` with the config it wrote, and the edge refusing a revoked terminal.
//!
//! - `mfa`: first admin, forced password change, MFA enrolment and login, an operator refused
//!   an admin command (403), lockout after 10 failures (audited), the session file's mode.
//! - `audit`: `posctl audit verify` passes, then fails naming the entry edited in the sled store.
//! - `enrol`: a real agent enrols with a one-time token and comes online; the token cannot be
//!   reused and a token pinned to another serial is refused; revocation closes the live
//!   session, refuses reconnects at the edge and lands in the CRL.
//! - `approval`: a wipe under the two-person rule waits for a second principal.
//! - `flood`: a login flood from several addresses: the broker's memory stays bounded, its
//!   terminals online and its API answering.

mod approval;
mod audit;
mod enrol;
mod flood;
mod mfa;

use std::path::Path;

use posfleet_broker::accounts::totp;
use posfleet_tests::{Broker, Posctl, PosctlOutput};

/// The password every account gets at its forced change (12+, letters and digits).
pub const NEW_PASSWORD: &str = "correct horse 1";

/// The TOTP code of `secret` for now + `steps` × 30 s (RFC 6238, as an authenticator app).
pub fn totp_code(secret: &[u8], steps: u64) -> String {
    let at = posfleet_proto::now_ms() + steps * totp::STEP_MS;
    match totp::code_text(secret, at) {
        Some(code) => code,
        None => panic!("no TOTP code for a {}-byte secret", secret.len()),
    }
}

/// Runs posctl and requires success.
pub async fn ok(posctl: &Posctl, args: &[&str]) -> PosctlOutput {
    ok_stdin(posctl, args, None).await
}

/// Runs posctl with stdin answers and requires success.
pub async fn ok_stdin(posctl: &Posctl, args: &[&str], stdin: Option<&str>) -> PosctlOutput {
    let output = run(posctl, args, stdin).await;
    if let Err(error) = output.success() {
        panic!("{error:#}");
    }
    output
}

/// Runs posctl (any exit status).
pub async fn run(posctl: &Posctl, args: &[&str], stdin: Option<&str>) -> PosctlOutput {
    match posctl.run_stdin(args, stdin).await {
        Ok(output) => output,
        Err(error) => panic!("{error:#}"),
    }
}

/// `posctl user create NAME --role ROLE`; returns the one-time password it printed.
pub async fn create_user(posctl: &Posctl, name: &str, role: &str) -> String {
    let out = ok(posctl, &["user", "create", name, "--role", role]).await;
    one_time_password(&out.stdout, name)
}

/// The password of "one-time password[ for NAME]: PW" in `text`.
pub fn one_time_password(text: &str, name: &str) -> String {
    let found = text.lines().find_map(|line| {
        let (label, pw) = line.split_once(": ")?;
        (label.starts_with("one-time password")
            && (label.ends_with(name) || label == "one-time password"))
            .then(|| pw.trim().to_owned())
    });
    match found {
        Some(pw) if !pw.is_empty() => pw,
        _ => panic!("no one-time password for {name} in:\n{text}"),
    }
}

/// First login of admin `name` (one-time password `initial`) through `posctl` with its own
/// config dir: the forced change, MFA enrolment with a computed code, and the login with
/// TOTP. Returns the TOTP secret.
pub async fn first_admin_login(posctl: &Posctl, name: &str, initial: &str) -> Vec<u8> {
    // Password, no TOTP code yet (empty line), the new password twice.
    let answers = format!("{initial}\n\n{NEW_PASSWORD}\n{NEW_PASSWORD}\n");
    let out = ok_stdin(
        posctl,
        &["login", "--user", name, "--password-stdin"],
        Some(&answers),
    )
    .await;
    assert!(
        out.stdout.contains("password changed") && out.stdout.contains("MFA enrolment required"),
        "{out}"
    );
    // Restricted until MFA is on: no device list yet.
    let refused = run(posctl, &["devices", "list"], None).await;
    assert!(
        !refused.status.success() && refused.stderr.contains("403"),
        "a restricted admin session listed devices:\n{refused}"
    );
    let enrol = ok(posctl, &["-o", "json", "mfa", "enrol"]).await;
    let value: serde_json::Value = match enrol.json() {
        Ok(v) => v,
        Err(error) => panic!("{error:#}"),
    };
    let Some(secret) = value["secret"].as_str().and_then(totp::base32_decode) else {
        panic!("no base32 secret in the enrolment:\n{enrol}");
    };
    let code = totp_code(&secret, 0);
    ok_stdin(
        posctl,
        &["mfa", "confirm", "--password-stdin"],
        Some(&format!("{code}\n")),
    )
    .await;
    // The next step's code: this step's was used by the confirmation (no replay).
    let next = totp_code(&secret, 1);
    let out = ok_stdin(
        posctl,
        &["login", "--user", name, "--password-stdin"],
        Some(&format!("{NEW_PASSWORD}\n{next}\n")),
    )
    .await;
    assert!(
        out.stdout.contains(&format!("logged in as {name} (admin)")),
        "{out}"
    );
    secret
}

/// A config dir for one principal's posctl session, beside the broker's data dir.
pub fn principal(broker: &Broker, posctl: &Posctl, name: &str) -> Posctl {
    let dir = match broker.scratch_dir(&format!("posctl-{name}")) {
        Ok(dir) => dir,
        Err(error) => panic!("{error:#}"),
    };
    posctl.with_config_dir(dir)
}

/// The mode bits of `path`.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(error) => panic!("{}: {error}", path.display()),
    }
}
