//! Bearer-token authentication of every route except `/healthz`.
//!
//! The presented token is compared with the admin token in constant time (for tokens of the
//! same length; the length of the generated token is public anyway). Failures are counted in
//! `api_auth_failures_total` and logged without the token.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::warn;

use super::error::ApiError;
use super::{AdminToken, ApiState};

/// Middleware: passes the request on only with `Authorization: Bearer <admin token>`, with a
/// [`crate::accounts::Principal`] in its extensions.
pub(crate) async fn require_token(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Response {
    let verdict = match bearer(request.headers()) {
        None => Err("missing_token"),
        Some(presented) if state.token.matches(presented) => Ok(()),
        Some(_) => Err("bad_token"),
    };
    match verdict {
        Ok(()) => {
            let principal = crate::accounts::Principal::bootstrap_admin();
            // Unit tests act as other principals (two-person approval) until accounts exist.
            #[cfg(test)]
            let principal = test_principal(request.headers()).unwrap_or(principal);
            request.extensions_mut().insert(principal);
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
            ApiError::unauthorized().into_response()
        }
    }
}

/// Unit tests only (never compiled into a binary): `x-test-principal: NAME` authenticates
/// the request as admin `NAME` instead of the bootstrap admin.
#[cfg(test)]
pub(crate) const TEST_PRINCIPAL_HEADER: &str = "x-test-principal";

#[cfg(test)]
fn test_principal(headers: &HeaderMap) -> Option<crate::accounts::Principal> {
    let name = headers.get(TEST_PRINCIPAL_HEADER)?.to_str().ok()?;
    Some(crate::accounts::Principal {
        name: name.to_owned(),
        role: crate::accounts::Role::Admin,
        kind: crate::accounts::PrincipalKind::Session,
    })
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
        !self.0.is_empty() && constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

/// Compares two byte strings without an early exit on the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold back into an early-exit comparison.
    std::hint::black_box(diff) == 0
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
