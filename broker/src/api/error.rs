//! Error responses of the admin API (always a JSON [`ErrorBody`]) and TLS setup errors.

use std::path::PathBuf;

use axum::Json;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use crate::views::{ErrorBody, FieldMessage};

/// An error answered to an API client: a status and an [`ErrorBody`].
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, error: impl Into<String>, hint: Option<&str>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: error.into(),
                hint: hint.map(str::to_owned),
                fields: Vec::new(),
            },
        }
    }

    /// A 400 about one field of the request: `error` says what is wrong with `field`.
    pub(crate) fn field(field: impl Into<String>, error: impl Into<String>, hint: &str) -> Self {
        let field = field.into();
        let message = error.into();
        let mut e = Self::bad_request(format!("{field}: {message}"), hint);
        e.body.fields = vec![FieldMessage {
            key: field,
            message,
        }];
        e
    }

    /// The same error with another status.
    pub(crate) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub(crate) fn conflict(error: impl Into<String>, hint: &str) -> Self {
        Self::new(StatusCode::CONFLICT, error, Some(hint))
    }

    pub(crate) fn internal(what: &str, detail: &str) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what} failed: {detail}"),
            Some("check the controller's log; retry later"),
        )
    }

    pub(crate) fn bad_request(error: impl Into<String>, hint: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, Some(hint))
    }

    pub(crate) fn not_found(error: impl Into<String>, hint: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, error, Some(hint))
    }

    /// 422 with one message per invalid field.
    pub(crate) fn invalid_fields(
        error: impl Into<String>,
        hint: &str,
        fields: Vec<crate::views::FieldMessage>,
    ) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, error, Some(hint));
        e.body.fields = fields;
        e
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid bearer token",
            Some(
                "send `Authorization: Bearer <token>` with the token from DATA/admin.token \
                 (posctl reads it from DATA/posctl.json)",
            ),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut response = (self.status, Json(self.body)).into_response();
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"posfleet\""),
            );
        }
        response
    }
}

/// Refuses operator-entered text of `field` (control or bidi characters, a card number:
/// `posfleet_proto::text`) with a 400 naming the field, never the value. Every handler that
/// takes text calls this; `field` must not contain the value.
pub(crate) fn check_text(
    field: impl Into<String>,
    value: &str,
    hint: &str,
) -> Result<(), ApiError> {
    posfleet_proto::text::check_operator_text(value)
        .map_err(|problem| ApiError::field(field, problem.to_string(), hint))
}

/// Fallback for unknown routes (reached only with a valid token).
pub(crate) async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(
        format!("no route for {}", posfleet_proto::text::shown(uri.path())),
        "the API lives under /api/v1 (devices, commands, config, transactions, stream); \
         the README's route table lists every route",
    )
}

/// Fallback for a known route with the wrong method.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
        Some(
            "reads are GET; commands are POST; groups and labels are PUT; configuration \
             layers take GET, PATCH, PUT and DELETE (see the README's route table)",
        ),
    )
}

/// Why the API's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    #[error("{}: no PEM certificate found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("the API certificate and key were refused: {0}")]
    Rustls(#[from] rustls::Error),
}
