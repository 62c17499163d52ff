//! `/api/v1/auth/...`: login (open), logout, password change, MFA enrolment, whoami; and the
//! mapping of [`AccountError`] to API errors. Bodies carrying secrets are parsed here with a
//! fixed error message, because serde's messages can quote the offending value.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use super::ApiState;
use super::auth::{PeerAddr, source};
use super::error::ApiError;
use crate::accounts::{
    AccountError, Accounts, Authenticated, LoginRefusal, NewLockout, Principal, Refused, Role,
    printable,
};
use crate::audit::{AuditRecord, Outcome};
use crate::views::FieldMessage;

/// Largest body of the auth routes.
pub(crate) const MAX_BODY_BYTES: usize = 8 * 1024;

/// `POST /api/v1/auth/login`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginRequest {
    user: String,
    password: String,
    #[serde(default)]
    totp: Option<String>,
}

/// The answer to a login: the session token, shown once.
#[derive(Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
    /// The session ends after this many seconds without a request.
    pub expires_idle_s: u64,
    pub role: Role,
    /// The session may only change the password.
    pub must_change_password: bool,
    /// An admin without MFA: the session may only change the password and enrol MFA.
    pub mfa_enrolment_required: bool,
}

/// `POST /api/v1/auth/password`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordRequest {
    old: String,
    new: String,
}

/// `POST /api/v1/auth/mfa/confirm`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfirmRequest {
    code: String,
}

/// The answer to `POST /api/v1/auth/mfa/enrol`, shown once.
#[derive(Serialize, Deserialize)]
pub struct EnrolResponse {
    /// Base32 secret, for typing into an authenticator.
    pub secret: String,
    pub otpauth_url: String,
}

/// `GET /api/v1/auth/whoami`.
#[derive(Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    pub name: String,
    pub role: Role,
    pub kind: crate::accounts::PrincipalKind,
    pub restricted: bool,
}

/// A JSON body holding secrets: any parse error gets the same message.
pub(crate) fn secret_body<T: DeserializeOwned>(body: &Bytes, shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|_| ApiError::bad_request(format!("the body must be JSON {shape}"), shape))
}

/// The account service, or 503 for a server built without one.
pub(crate) fn service(state: &ApiState) -> Result<Arc<Accounts>, ApiError> {
    state.accounts.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "operator accounts are not available on this server",
            Some("use the bootstrap token of DATA/admin.token"),
        )
    })
}

/// Runs a blocking account operation off the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    accounts: Arc<Accounts>,
    f: impl FnOnce(&Accounts) -> Result<T, AccountError> + Send + 'static,
) -> Result<T, AccountError> {
    tokio::task::spawn_blocking(move || f(&accounts))
        .await
        .unwrap_or_else(|e| {
            Err(AccountError::Invalid(if e.is_panic() {
                "the account operation failed"
            } else {
                "the account operation was cancelled"
            }))
        })
}

/// The one answer to every refused login (module docs of `accounts::login`): same status,
/// same body, whatever the reason.
pub(crate) fn login_refused() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        AccountError::LoginRefused {
            reason: LoginRefusal::WrongPassword,
            lockout: None,
        }
        .to_string(),
        Some(
            "send user, password and, for an account with MFA, totp (the current code); 10 \
             failed attempts from one address lock the account from there for 30 minutes",
        ),
    )
}

/// A 429 or 503 with `Retry-After`.
fn retry_later(status: StatusCode, message: &str, hint: &str, retry_after_s: u64) -> Response {
    let mut response = ApiError::new(status, message, Some(hint)).into_response();
    if let Ok(value) = axum::http::HeaderValue::from_str(&retry_after_s.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

pub(crate) async fn login(
    State(state): State<ApiState>,
    addr: Option<Extension<PeerAddr>>,
    body: Bytes,
) -> Response {
    let req: LoginRequest = match secret_body(&body, "{user, password, totp?}") {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let accounts = match service(&state) {
        Ok(accounts) => accounts,
        Err(e) => return e.into_response(),
    };
    let user = printable(&req.user);
    let src = source(addr.as_deref());
    let ip = addr.map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |a| a.0.0.ip());
    let record = |action: &str, target: &str, outcome, detail: String| AuditRecord {
        actor: target.to_owned(),
        source: src.clone(),
        action: action.into(),
        target: target.to_owned(),
        outcome,
        detail,
    };
    // Admission before any hashing: nothing here depends on the account.
    let ticket = match accounts.admit_login(ip) {
        Ok(ticket) => ticket,
        Err(refused) => {
            let (status, why, hint, retry) = match refused {
                Refused::Throttled { retry_after_s } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed logins from this address",
                    "wait for Retry-After seconds; logins from other addresses are not affected",
                    retry_after_s,
                ),
                Refused::Busy { retry_after_s } => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many logins at once",
                    "retry after Retry-After seconds",
                    retry_after_s,
                ),
            };
            // Counted per address: while refused, the names tried are not kept.
            state
                .refused(record("auth.login", "*", Outcome::Denied, why.to_owned()))
                .await;
            return retry_later(status, why, hint, retry);
        }
    };
    let result = blocking(accounts, move |a| {
        let _ticket = ticket;
        a.login(&req.user, &req.password, req.totp.as_deref(), ip)
    })
    .await;
    match result {
        Ok(outcome) => {
            if let Err(e) = state
                .audit(record("auth.login", &user, Outcome::Success, String::new()))
                .await
            {
                return e.into_response();
            }
            info!(user = %user, role = outcome.role.name(), "login");
            Json(LoginResponse {
                token: outcome.token,
                expires_idle_s: crate::accounts::policy::SESSION_IDLE_MS / 1000,
                role: outcome.role,
                must_change_password: outcome.must_change_password,
                mfa_enrolment_required: outcome.mfa_enrolment_required,
            })
            .into_response()
        }
        Err(AccountError::LoginRefused { reason, lockout }) => {
            state
                .refused(record(
                    "auth.login",
                    &user,
                    Outcome::Failure,
                    reason.name().to_owned(),
                ))
                .await;
            if let Some(lockout) = lockout {
                let detail = match lockout {
                    NewLockout::Source(_) => {
                        "10 failures from this address: locked out from it \
                                              for 30 minutes"
                    }
                    NewLockout::Account(_) => {
                        "100 failures from any addresses within 30 minutes: \
                                               locked out everywhere for 30 minutes"
                    }
                };
                state
                    .refused(record(
                        "auth.lockout",
                        &user,
                        Outcome::Success,
                        detail.into(),
                    ))
                    .await;
            }
            info!(user = %user, reason = reason.name(), "login refused");
            login_refused().into_response()
        }
        Err(e) => account_error(e).into_response(),
    }
}

pub(crate) async fn logout(
    State(state): State<ApiState>,
    Extension(auth): Extension<Authenticated>,
    addr: Option<Extension<PeerAddr>>,
) -> Result<StatusCode, ApiError> {
    let Some(digest) = auth.session else {
        return Err(ApiError::bad_request(
            "only a login session can log out",
            "revoke API tokens with DELETE /api/v1/tokens/{name}",
        ));
    };
    service(&state)?.logout(&digest);
    state
        .audited(
            &auth.principal,
            addr.as_deref(),
            "auth.logout",
            &auth.principal.name,
            Ok(()),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn change_password(
    State(state): State<ApiState>,
    Extension(auth): Extension<Authenticated>,
    addr: Option<Extension<PeerAddr>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: PasswordRequest = secret_body(&body, "{old, new}")?;
    let user = session_user(&auth)?;
    let name = user.clone();
    let result = blocking(service(&state)?, move |a| {
        a.change_password(&name, &req.old, &req.new)
    })
    .await;
    state
        .audited(
            &auth.principal,
            addr.as_deref(),
            "auth.password_change",
            &user,
            result,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn mfa_enrol(
    State(state): State<ApiState>,
    Extension(auth): Extension<Authenticated>,
    addr: Option<Extension<PeerAddr>>,
) -> Result<Json<EnrolResponse>, ApiError> {
    let user = session_user(&auth)?;
    let name = user.clone();
    let result = blocking(service(&state)?, move |a| a.mfa_enrol(&name)).await;
    let enrolment = state
        .audited(
            &auth.principal,
            addr.as_deref(),
            "auth.mfa_enrol",
            &user,
            result,
        )
        .await?;
    Ok(Json(EnrolResponse {
        secret: enrolment.secret,
        otpauth_url: enrolment.otpauth_url,
    }))
}

pub(crate) async fn mfa_confirm(
    State(state): State<ApiState>,
    Extension(auth): Extension<Authenticated>,
    addr: Option<Extension<PeerAddr>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: ConfirmRequest = secret_body(&body, "{code}")?;
    let user = session_user(&auth)?;
    let name = user.clone();
    let result = blocking(service(&state)?, move |a| a.mfa_confirm(&name, &req.code)).await;
    state
        .audited(
            &auth.principal,
            addr.as_deref(),
            "auth.mfa_confirm",
            &user,
            result,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn whoami(Extension(auth): Extension<Authenticated>) -> Json<WhoAmI> {
    Json(WhoAmI {
        name: auth.principal.name,
        role: auth.principal.role,
        kind: auth.principal.kind,
        restricted: auth.restricted,
    })
}

/// The account of a session (password and MFA belong to accounts, not tokens).
fn session_user(auth: &Authenticated) -> Result<String, ApiError> {
    match auth.principal.kind {
        crate::accounts::PrincipalKind::Session => Ok(auth.principal.name.clone()),
        _ => Err(ApiError::bad_request(
            "this needs a login session of an operator account",
            "log in with posctl login (API and bootstrap tokens have no password or MFA)",
        )),
    }
}

impl ApiState {
    /// Records the outcome of an action by `principal` on `target`, then returns the result
    /// (an account error as an API error).
    pub(crate) async fn audited<T>(
        &self,
        principal: &Principal,
        addr: Option<&PeerAddr>,
        action: &str,
        target: &str,
        result: Result<T, AccountError>,
    ) -> Result<T, ApiError> {
        let (outcome, detail) = match &result {
            Ok(_) => (Outcome::Success, String::new()),
            Err(AccountError::Forbidden(_)) => (Outcome::Denied, String::new()),
            Err(e) => (Outcome::Failure, e.to_string()),
        };
        self.audit(AuditRecord {
            actor: principal.name.clone(),
            source: source(addr),
            action: action.into(),
            target: printable(target),
            outcome,
            detail,
        })
        .await?;
        result.map_err(account_error)
    }
}

/// The API error for an account error.
pub(crate) fn account_error(e: AccountError) -> ApiError {
    let message = e.to_string();
    match e {
        AccountError::LoginRefused { .. } => login_refused(),
        AccountError::Locked { .. } => ApiError::new(
            StatusCode::FORBIDDEN,
            message,
            Some("10 failed attempts lock an account for 30 minutes; an admin's reset ends it"),
        ),
        AccountError::Weak(_) => ApiError::invalid_fields(
            message.clone(),
            "at least 12 characters with letters and digits, not one of the last 4",
            vec![FieldMessage {
                key: "new".into(),
                message,
            }],
        ),
        AccountError::WrongPassword => {
            ApiError::field("old", message, "retry with the current password")
                .with_status(StatusCode::FORBIDDEN)
        }
        AccountError::Exists(_) | AccountError::MfaEnrolled | AccountError::NoEnrolment => {
            ApiError::conflict(message, "see GET /api/v1/users or /api/v1/tokens")
        }
        AccountError::UnknownUser(_) | AccountError::UnknownToken(_) => {
            ApiError::not_found(message, "see GET /api/v1/users or /api/v1/tokens")
        }
        AccountError::InvalidName(_)
        | AccountError::ReservedName(_)
        | AccountError::Invalid(_)
        | AccountError::CodeMismatch => ApiError::bad_request(message, "fix the request and retry"),
        AccountError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, message, None),
        AccountError::Store(_) | AccountError::Hash(_) => {
            error!(error = %message, "account store failed");
            ApiError::internal("the account operation", "storage error")
        }
    }
}
