//! `/api/v1/users` (admin) and `/api/v1/tokens` (operator and up; non-admins see and revoke
//! only their own tokens). Initial passwords and tokens are in the answer once and nowhere
//! else.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::accounts::{blocking, service};
use super::auth::PeerAddr;
use super::error::ApiError;
use crate::accounts::{Principal, Role, TokenView, UserView};

const USER_HINT: &str = "send {\"name\": \"alice\", \"role\": \"viewer|operator|admin\"}";
const TOKEN_HINT: &str =
    "send {\"name\": \"ci\", \"role\": \"viewer|operator|admin\", \"expires_in_s\": 86400}";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateUser {
    name: String,
    role: Role,
}

/// A new account or a reset: the one-time password, shown once.
#[derive(Serialize, Deserialize)]
pub struct InitialPassword {
    pub name: String,
    pub initial_password: String,
    pub must_change_password: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetUser {
    /// Also remove the account's authenticator (a lost phone).
    #[serde(default)]
    reset_mfa: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UserList {
    pub users: Vec<UserView>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateToken {
    name: String,
    role: Role,
    expires_in_s: u64,
}

/// A new API token, shown once.
#[derive(Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: String,
    #[serde(flatten)]
    pub view: TokenView,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

fn body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    hint: &str,
) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::bad_request(e.body_text(), hint))
}

pub(crate) async fn create_user(
    State(state): State<ApiState>,
    Extension(by): Extension<Principal>,
    addr: Option<Extension<PeerAddr>>,
    req: Result<Json<CreateUser>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<InitialPassword>), ApiError> {
    let req = body(req, USER_HINT)?;
    let (name, role, author) = (req.name.clone(), req.role, by.name.clone());
    let result = blocking(service(&state)?, move |a| {
        a.create_user(&name, role, &author)
    })
    .await;
    let password = state
        .audited(&by, addr.as_deref(), "user.create", &req.name, result)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(InitialPassword {
            name: req.name,
            initial_password: password,
            must_change_password: true,
        }),
    ))
}

pub(crate) async fn list_users(State(state): State<ApiState>) -> Result<Json<UserList>, ApiError> {
    let users = blocking(service(&state)?, |a| a.users())
        .await
        .map_err(super::accounts::account_error)?;
    Ok(Json(UserList { users }))
}

pub(crate) async fn reset_user(
    State(state): State<ApiState>,
    Extension(by): Extension<Principal>,
    addr: Option<Extension<PeerAddr>>,
    Path(name): Path<String>,
    req: Option<Json<ResetUser>>,
) -> Result<Json<InitialPassword>, ApiError> {
    let reset_mfa = req.map(|Json(r)| r.reset_mfa).unwrap_or_default();
    let target = name.clone();
    let result = blocking(service(&state)?, move |a| a.reset_user(&target, reset_mfa)).await;
    let password = state
        .audited(&by, addr.as_deref(), "user.reset", &name, result)
        .await?;
    Ok(Json(InitialPassword {
        name,
        initial_password: password,
        must_change_password: true,
    }))
}

pub(crate) async fn disable_user(
    state: State<ApiState>,
    by: Extension<Principal>,
    addr: Option<Extension<PeerAddr>>,
    name: Path<String>,
) -> Result<StatusCode, ApiError> {
    set_enabled(state, by, addr, name, false).await
}

pub(crate) async fn enable_user(
    state: State<ApiState>,
    by: Extension<Principal>,
    addr: Option<Extension<PeerAddr>>,
    name: Path<String>,
) -> Result<StatusCode, ApiError> {
    set_enabled(state, by, addr, name, true).await
}

async fn set_enabled(
    State(state): State<ApiState>,
    Extension(by): Extension<Principal>,
    addr: Option<Extension<PeerAddr>>,
    Path(name): Path<String>,
    enabled: bool,
) -> Result<StatusCode, ApiError> {
    let (target, author) = (name.clone(), by.name.clone());
    let result = blocking(service(&state)?, move |a| {
        a.set_enabled(&target, enabled, &author)
    })
    .await;
    let action = if enabled {
        "user.enable"
    } else {
        "user.disable"
    };
    state
        .audited(&by, addr.as_deref(), action, &name, result)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn delete_user(
    State(state): State<ApiState>,
    Extension(by): Extension<Principal>,
    addr: Option<Extension<PeerAddr>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (target, author) = (name.clone(), by.name.clone());
    let result = blocking(service(&state)?, move |a| a.delete_user(&target, &author)).await;
    state
        .audited(&by, addr.as_deref(), "user.delete", &name, result)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn create_token(
    State(state): State<ApiState>,
    Extension(by): Extension<Principal>,
    addr: Option<Extension<PeerAddr>>,
    req: Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let req = body(req, TOKEN_HINT)?;
    let creator = by.clone();
    let name = req.name.clone();
    let result = blocking(service(&state)?, move |a| {
        a.create_token(&creator, &name, req.role, req.expires_in_s)
    })
    .await;
    let created = state
        .audited(&by, addr.as_deref(), "token.create", &req.name, result)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: created.token,
            view: created.view,
        }),
    ))
}

pub(crate) async fn list_tokens(
    State(state): State<ApiState>,
    Extension(by): Extension<Principal>,
) -> Result<Json<TokenList>, ApiError> {
    let tokens = blocking(service(&state)?, move |a| a.tokens(&by))
        .await
        .map_err(super::accounts::account_error)?;
    Ok(Json(TokenList { tokens }))
}

pub(crate) async fn revoke_token(
    State(state): State<ApiState>,
    Extension(by): Extension<Principal>,
    addr: Option<Extension<PeerAddr>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (revoker, target) = (by.clone(), name.clone());
    let result = blocking(service(&state)?, move |a| a.revoke_token(&revoker, &target)).await;
    state
        .audited(&by, addr.as_deref(), "token.revoke", &name, result)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
