//! `posctl login|logout|password|whoami`, `posctl mfa enrol|confirm`, `posctl token
//! create|list|revoke` and `posctl user create|list|reset|disable|enable|delete`.
//!
//! Secrets (passwords, TOTP codes) come from a [`Prompt`]: the terminal without echo, or
//! stdin lines with `--password-stdin` (scripts and tests). They are never printed; tokens
//! and one-time passwords are printed once, when created.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use reqwest::Method;
use serde_json::{Value, json};

use super::OutputFormat;
use super::client::ApiClient;
use super::endpoint::Endpoint;
use super::session::{self, StoredSession};
use crate::api::{
    CreatedToken, EnrolResponse, InitialPassword, LoginResponse, TokenList, UserList,
};

/// Where secrets come from.
pub(crate) trait Prompt {
    /// The answer to `label` (without the line end).
    fn secret(&mut self, label: &str) -> anyhow::Result<String>;
}

/// The terminal (no echo), or stdin lines with `--password-stdin`.
#[derive(Debug)]
pub(crate) struct TerminalPrompt {
    pub(crate) stdin: bool,
}

impl Prompt for TerminalPrompt {
    fn secret(&mut self, label: &str) -> anyhow::Result<String> {
        if self.stdin {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read stdin")?;
            if line.is_empty() {
                return Err(anyhow!("stdin ended before {label}"));
            }
            return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
        }
        rpassword::prompt_password(format!("{label}: "))
            .with_context(|| format!("cannot read {label} from the terminal; use --password-stdin"))
    }
}

/// The directory sessions are kept in.
fn session_dir(config_dir: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    session::config_dir(config_dir).ok_or_else(|| {
        anyhow!("no config directory: set HOME or XDG_CONFIG_HOME, or pass --config-dir")
    })
}

/// POST to the open login route; `Ok(Err(body))` for a refusal.
async fn try_login(
    api: &ApiClient,
    user: &str,
    password: &str,
    totp: Option<&str>,
) -> anyhow::Result<Result<LoginResponse, crate::views::ErrorBody>> {
    let mut body = json!({"user": user, "password": password});
    if let Some(code) = totp {
        body["totp"] = code.into();
    }
    let url = api.url(&["api", "v1", "auth", "login"]);
    let (status, value) = api.post_any(url, &body).await?;
    if status.is_success() {
        return Ok(Ok(
            serde_json::from_value(value).context("unexpected login answer")?
        ));
    }
    Ok(Err(serde_json::from_value(value).unwrap_or(
        crate::views::ErrorBody {
            error: format!("login refused ({status})"),
            hint: None,
            fields: vec![],
        },
    )))
}

/// What `posctl login` asks after the password. The server answers every refused login the
/// same way (it never says that a code is missing), so the code is asked up front.
pub(crate) const TOTP_PROMPT: &str = "TOTP code (leave empty if you have none)";

/// Logs in once with the code (if any).
async fn login_once(
    api: &ApiClient,
    user: &str,
    password: &str,
    code: Option<&str>,
) -> anyhow::Result<LoginResponse> {
    try_login(api, user, password, code)
        .await?
        .map_err(|body| anyhow!("login refused: {}", body.error))
}

/// An answer to [`TOTP_PROMPT`]: `None` when left empty.
fn totp_answer(prompt: &mut dyn Prompt, label: &str) -> anyhow::Result<Option<String>> {
    let code = prompt.secret(label)?;
    let code = code.trim();
    Ok((!code.is_empty()).then(|| code.to_owned()))
}

/// `posctl login`: stores the session for this server; changes the password first when the
/// server requires it. Asks for the password, then a TOTP code (empty without MFA).
pub(crate) async fn login(
    endpoint: Endpoint,
    config_dir: Option<&std::path::Path>,
    user: &str,
    prompt: &mut dyn Prompt,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let dir = session_dir(config_dir)?;
    let api = ApiClient::anonymous(endpoint)?;
    let password = prompt.secret(&format!("password for {user}"))?;
    let code = totp_answer(prompt, TOTP_PROMPT)?;
    let mut login = login_once(&api, user, &password, code.as_deref()).await?;
    if login.must_change_password {
        writeln!(out, "the password of {user} must be changed now")?;
        let new = prompt.secret("new password (12+ characters, letters and digits)")?;
        let again = prompt.secret("new password again")?;
        if new != again {
            return Err(anyhow!("the two new passwords differ; nothing changed"));
        }
        let session_api = with_token(&api, user, &login.token)?;
        session_api
            .send_empty(
                Method::POST,
                session_api.url(&["api", "v1", "auth", "password"]),
                Some(&json!({"old": password, "new": new})),
            )
            .await?;
        writeln!(out, "password changed")?;
        // A code is used once: the new login needs the authenticator's next one.
        let code = match code {
            Some(_) => totp_answer(
                prompt,
                "the next TOTP code (wait until the authenticator shows a new one)",
            )?,
            None => None,
        };
        login = login_once(&api, user, &new, code.as_deref()).await?;
    }
    session::save(
        &dir,
        api.api_url().as_str(),
        StoredSession {
            user: user.to_owned(),
            token: login.token,
        },
    )?;
    writeln!(out, "logged in as {user} ({})", login.role.name())?;
    if login.mfa_enrolment_required {
        writeln!(
            out,
            "MFA enrolment required (admins, or after an MFA reset): run `posctl mfa enrol`, \
             add the secret to an authenticator, `posctl mfa confirm`, then `posctl login` \
             again"
        )?;
    }
    Ok(())
}

/// A client using `token` as the session of `user`.
fn with_token(api: &ApiClient, user: &str, token: &str) -> anyhow::Result<ApiClient> {
    let mut endpoint = api.endpoint().clone();
    endpoint.session = Some(StoredSession {
        user: user.to_owned(),
        token: token.to_owned(),
    });
    ApiClient::new(endpoint)
}

/// `posctl logout`: ends the stored session on the server and forgets it.
pub(crate) async fn logout(
    endpoint: Endpoint,
    config_dir: Option<&std::path::Path>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let dir = session_dir(config_dir)?;
    let url = endpoint.api_url.to_string();
    let Some(stored) = session::forget(&dir, &url)? else {
        writeln!(out, "no session stored for {url}")?;
        return Ok(());
    };
    let mut endpoint = endpoint;
    endpoint.session = Some(stored.clone());
    let api = ApiClient::new(endpoint)?;
    // An ended session is as good as logged out.
    match api
        .send_empty(
            Method::POST,
            api.url(&["api", "v1", "auth", "logout"]),
            None,
        )
        .await
    {
        Ok(()) | Err(super::client::ApiError::SessionEnded { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    writeln!(out, "logged out {}", stored.user)?;
    Ok(())
}

/// `posctl password`: changes the password of the session's account (the session ends).
pub(crate) async fn password(
    api: &ApiClient,
    prompt: &mut dyn Prompt,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let old = prompt.secret("current password")?;
    let new = prompt.secret("new password (12+ characters, letters and digits)")?;
    let again = prompt.secret("new password again")?;
    if new != again {
        return Err(anyhow!("the two new passwords differ; nothing changed"));
    }
    api.send_empty(
        Method::POST,
        api.url(&["api", "v1", "auth", "password"]),
        Some(&json!({"old": old, "new": new})),
    )
    .await?;
    writeln!(
        out,
        "password changed; every session of the account ended: run `posctl login`"
    )?;
    Ok(())
}

pub(crate) async fn mfa_enrol(
    api: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let value = api
        .send_json(
            Method::POST,
            api.url(&["api", "v1", "auth", "mfa", "enrol"]),
            None,
        )
        .await?;
    if format == OutputFormat::Json {
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let enrolment: EnrolResponse = serde_json::from_value(value).context("unexpected answer")?;
    write!(out, "{}", qr_text(&enrolment.otpauth_url)?)?;
    writeln!(out, "secret       {}", enrolment.secret)?;
    writeln!(out, "otpauth URL  {}", enrolment.otpauth_url)?;
    writeln!(
        out,
        "scan the code (or type the secret) into an authenticator app, then run \
         `posctl mfa confirm` with its code"
    )?;
    Ok(())
}

/// `url` as a QR code drawn with half-block characters, light on dark (what most terminals
/// show), with its four-module quiet zone.
fn qr_text(url: &str) -> anyhow::Result<String> {
    use qrcode::render::unicode::Dense1x2;
    let code =
        qrcode::QrCode::new(url.as_bytes()).context("the otpauth URL does not fit a QR code")?;
    let mut text = code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build();
    text.push('\n');
    Ok(text)
}

pub(crate) async fn mfa_confirm(
    api: &ApiClient,
    prompt: &mut dyn Prompt,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let code = prompt.secret("TOTP code")?;
    api.send_empty(
        Method::POST,
        api.url(&["api", "v1", "auth", "mfa", "confirm"]),
        Some(&json!({"code": code})),
    )
    .await?;
    writeln!(out, "MFA enabled; log in again with `posctl login`")?;
    Ok(())
}

pub(crate) async fn whoami(api: &ApiClient, out: &mut dyn Write) -> anyhow::Result<()> {
    let value = api
        .get_json(api.url(&["api", "v1", "auth", "whoami"]))
        .await?;
    writeln!(out, "{value}")?;
    Ok(())
}

pub(crate) async fn token_create(
    api: &ApiClient,
    name: &str,
    role: &str,
    expires_in: std::time::Duration,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let value = api
        .send_json(
            Method::POST,
            api.url(&["api", "v1", "tokens"]),
            Some(&json!({"name": name, "role": role, "expires_in_s": expires_in.as_secs()})),
        )
        .await?;
    if format == OutputFormat::Json {
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let created: CreatedToken = serde_json::from_value(value).context("unexpected answer")?;
    writeln!(out, "{}", created.token)?;
    writeln!(
        out,
        "(token {} for {}, expires {}; shown once: keep it in a 0600 file and pass --token-file)",
        created.view.name,
        created.view.role.name(),
        super::output::datetime(created.view.expires_at_ms)
    )?;
    Ok(())
}

pub(crate) async fn token_list(
    api: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let value = api.get_json(api.url(&["api", "v1", "tokens"])).await?;
    if format == OutputFormat::Json {
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let list: TokenList = serde_json::from_value(value).context("unexpected answer")?;
    writeln!(
        out,
        "{:<24} {:<9} {:<16} EXPIRES",
        "NAME", "ROLE", "CREATED BY"
    )?;
    for t in list.tokens {
        writeln!(
            out,
            "{:<24} {:<9} {:<16} {}",
            t.name,
            t.role.name(),
            t.created_by,
            super::output::datetime(t.expires_at_ms)
        )?;
    }
    Ok(())
}

pub(crate) async fn token_revoke(
    api: &ApiClient,
    name: &str,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    api.send_empty(
        Method::DELETE,
        api.url(&["api", "v1", "tokens", name]),
        None,
    )
    .await?;
    writeln!(out, "revoked {name}")?;
    Ok(())
}

/// `posctl user create|reset`: prints the one-time password.
pub(crate) async fn user_create_or_reset(
    api: &ApiClient,
    url: reqwest::Url,
    body: Value,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let value = api.send_json(Method::POST, url, Some(&body)).await?;
    if format == OutputFormat::Json {
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let created: InitialPassword = serde_json::from_value(value).context("unexpected answer")?;
    writeln!(
        out,
        "one-time password for {}: {}",
        created.name, created.initial_password
    )?;
    writeln!(out, "(shown once; it must be changed at the first login)")?;
    Ok(())
}

pub(crate) async fn user_list(
    api: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let value = api.get_json(api.url(&["api", "v1", "users"])).await?;
    if format == OutputFormat::Json {
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let list: UserList = serde_json::from_value(value).context("unexpected answer")?;
    writeln!(
        out,
        "{:<24} {:<9} {:<8} {:<4} {:<7} LAST LOGIN",
        "NAME", "ROLE", "ENABLED", "MFA", "LOCKED"
    )?;
    for u in list.users {
        writeln!(
            out,
            "{:<24} {:<9} {:<8} {:<4} {:<7} {}",
            u.name,
            u.role.name(),
            if u.enabled { "yes" } else { "no" },
            if u.mfa { "yes" } else { "no" },
            if u.locked_until_ms.is_some() {
                "all".to_owned()
            } else if !u.locked_out_from.is_empty() {
                // Locked out from some client addresses only (ADR 0009).
                format!("{} addr", u.locked_out_from.len())
            } else {
                "no".to_owned()
            },
            u.last_login_ms
                .map(super::output::datetime)
                .unwrap_or_else(|| "never".into())
        )?;
    }
    Ok(())
}

/// `posctl user disable|enable|delete`.
pub(crate) async fn user_action(
    api: &ApiClient,
    method: Method,
    url: reqwest::Url,
    done: &str,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    api.send_empty(method, url, None).await?;
    writeln!(out, "{done}")?;
    Ok(())
}

#[cfg(test)]
mod qr_tests {
    #[test]
    fn the_enrolment_qr_code_is_a_square_of_half_blocks() {
        let url = crate::accounts::totp::otpauth_url("posfleet", "ada", &[7; 20]);
        let text = super::qr_text(&url).unwrap();
        let modules = qrcode::QrCode::new(url.as_bytes()).unwrap().width() + 8;
        let rows: Vec<&str> = text.lines().collect();
        // Two modules per character row (rounded up), one per column.
        assert_eq!(rows.len(), modules.div_ceil(2));
        assert!(rows.iter().all(|r| r.chars().count() == modules));
        assert!(text.chars().all(|c| " ▀▄█\n".contains(c)), "{text}");
        assert!(text.contains('█') && text.contains(' '));
    }
}
