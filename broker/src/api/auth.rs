//! Authentication and authorisation of every route except the open ones (ADR 0009).
//!
//! - [`authenticate`] (around the whole protected router): the bearer token is an API token
//!   (`pft_...`), the bootstrap token of `DATA/admin.token` (compared in constant time; refused
//!   once revoked) or a login session. It puts the [`Principal`] and the [`Authenticated`]
//!   record into the request's extensions; anything else is a 401, counted in
//!   `api_auth_failures_total`, logged without the token and counted for the aggregated
//!   `api.unauthenticated` audit entry of its source (`crate::audit::Refusals`).
//! - [`authorize`] (around each route of the table): the principal's role must reach the
//!   route's role for the method (GET/HEAD: `read`, others: `write`), and a restricted
//!   session (password change or MFA enrolment due) only reaches the routes marked for it.
//!   Refusals are 403, counted for the aggregated `api.denied` audit entry (actor, route).
//! - [`Actor`]: extractor giving handlers the principal's name, recorded as author.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::warn;

pub(crate) use super::PeerAddr;
use super::error::ApiError;
use super::{AdminToken, ApiState};
use crate::accounts::{Authenticated, Principal, Role};
use crate::audit::{AuditRecord, Outcome};

/// What a route of the table requires.
#[derive(Debug, Clone)]
pub(crate) struct RouteAuth {
    pub(crate) state: ApiState,
    /// Least role for GET and HEAD.
    pub(crate) read: Role,
    /// Least role for every other method.
    pub(crate) write: Role,
    /// A restricted session may call it (password change, MFA enrolment, logout).
    pub(crate) restricted_ok: bool,
}

/// Middleware: passes the request on only with a valid bearer token, with its
/// [`Principal`] and [`Authenticated`] in the extensions.
pub(crate) async fn authenticate(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Response {
    let verdict = match bearer(request.headers()) {
        None => Err("missing_token"),
        Some(presented) => match resolve(&state, presented.to_owned()).await {
            Ok(Some(auth)) => Ok(auth),
            Ok(None) => Err("bad_token"),
            Err(e) => return e.into_response(),
        },
    };
    match verdict {
        Ok(auth) => {
            // Unit tests act as other principals (two-person approval) with a header.
            #[cfg(test)]
            let auth = match test_principal(request.headers()) {
                Some(principal) => Authenticated { principal, ..auth },
                None => auth,
            };
            request.extensions_mut().insert(auth.principal.clone());
            request.extensions_mut().insert(auth);
            next.run(request).await
        }
        Err(reason) => {
            state.metrics.api_auth_failures_total.inc();
            warn!(
                reason,
                method = %request.method(),
                path = request.uri().path(),
                "admin API request refused"
            );
            state
                .refused(AuditRecord {
                    actor: "unauthenticated".into(),
                    source: source(request.extensions().get::<PeerAddr>()),
                    action: "api.unauthenticated".into(),
                    // Not the path: the key of the count stays bounded whatever is requested.
                    target: "-".into(),
                    outcome: Outcome::Denied,
                    detail: reason.replace('_', " "),
                })
                .await;
            ApiError::unauthorized().into_response()
        }
    }
}

/// Unit tests only (never compiled into a binary): `x-test-principal: NAME` authenticates
/// the request as admin `NAME` (a session with MFA) instead of the bootstrap admin.
#[cfg(test)]
pub(crate) const TEST_PRINCIPAL_HEADER: &str = "x-test-principal";

#[cfg(test)]
fn test_principal(headers: &HeaderMap) -> Option<crate::accounts::Principal> {
    let name = headers.get(TEST_PRINCIPAL_HEADER)?.to_str().ok()?;
    Some(crate::accounts::Principal {
        name: name.to_owned(),
        role: crate::accounts::Role::Admin,
        kind: crate::accounts::PrincipalKind::Session,
        account: Some(name.to_owned()),
        mfa: true,
    })
}

/// Who `presented` is: through the account service when there is one, else only the
/// bootstrap token.
async fn resolve(state: &ApiState, presented: String) -> Result<Option<Authenticated>, ApiError> {
    let Some(accounts) = state.accounts.clone() else {
        return Ok(state.token.matches(&presented).then(|| Authenticated {
            principal: Principal::bootstrap_admin(),
            restricted: false,
            session: None,
        }));
    };
    // A sled read (API tokens); off the runtime.
    tokio::task::spawn_blocking(move || accounts.authenticate(&presented))
        .await
        .map_err(|e| ApiError::internal("authentication", &e.to_string()))?
        .map_err(super::accounts::account_error)
}

/// Middleware of each route: the role check and the restricted-session check.
pub(crate) async fn authorize(
    State(route): State<RouteAuth>,
    request: Request,
    next: Next,
) -> Response {
    let Some(auth) = request.extensions().get::<Authenticated>().cloned() else {
        return ApiError::unauthorized().into_response();
    };
    let needed = if matches!(*request.method(), Method::GET | Method::HEAD) {
        route.read
    } else {
        route.write
    };
    let refusal = if auth.restricted && !route.restricted_ok {
        Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "this session may only change its password and enrol MFA",
            Some(
                "change the password (posctl password) and, for admins, enrol MFA (posctl mfa \
                 enrol), then log in again",
            ),
        ))
    } else if !auth.principal.role.allows(needed) {
        Some(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this needs the {} role; {} has {}",
                needed.name(),
                auth.principal.name,
                auth.principal.role.name()
            ),
            Some("ask an admin to do it, or for an account with that role"),
        ))
    } else {
        None
    };
    let Some(refusal) = refusal else {
        return next.run(request).await;
    };
    warn!(
        actor = %auth.principal.name,
        role = auth.principal.role.name(),
        method = %request.method(),
        path = request.uri().path(),
        "admin API request denied"
    );
    let route_path = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(
            || request.uri().path().to_owned(),
            |m| m.as_str().to_owned(),
        );
    route
        .state
        .refused(AuditRecord {
            actor: auth.principal.name.clone(),
            source: source(request.extensions().get::<PeerAddr>()),
            action: "api.denied".into(),
            target: format!("{} {route_path}", request.method()),
            outcome: Outcome::Denied,
            detail: if auth.restricted && !route.restricted_ok {
                "restricted session".into()
            } else {
                format!("needs {}", needed.name())
            },
        })
        .await;
    refusal.into_response()
}

/// The audit source of a request: the client's IP address.
pub(crate) fn source(addr: Option<&PeerAddr>) -> String {
    addr.map_or_else(|| "unknown".to_owned(), |a| a.0.ip().to_string())
}

/// The principal's name, for handlers that record an author.
#[derive(Debug, Clone)]
pub(crate) struct Actor(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        // Every protected route runs behind `authenticate`; the fallback only matters for
        // handlers called without it (never in the router).
        Ok(Actor(parts.extensions.get::<Principal>().map_or_else(
            || Principal::bootstrap_admin().name,
            |p| p.name.clone(),
        )))
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl AdminToken {
    /// True if `presented` is the admin token. An empty admin token matches nothing.
    pub(crate) fn matches(&self, presented: &str) -> bool {
        !self.0.is_empty()
            && crate::accounts::constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn parses_bearer_headers() {
        assert_eq!(bearer(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&headers("Bearerabc")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn token_comparison() {
        let token = AdminToken("s3cret".into());
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cres"));
        assert!(!token.matches("s3cret2"));
        assert!(!token.matches(""));
        assert!(!AdminToken("".into()).matches(""));
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
    }
}
