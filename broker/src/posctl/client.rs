//! The HTTPS client of the admin API: trusts the fleet CA (every certificate in the CA file),
//! sends the bearer token, never follows redirects, reads bounded bodies, and turns HTTP
//! failures into errors that say what to do next.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use reqwest::{StatusCode, Url};
use serde_json::Value;

use super::endpoint::Endpoint;
use super::output::printable;
use crate::datadir::{DataDirError, read_token_file};
use crate::views::ErrorBody;
use posfleet_proto::DeviceId;
use posfleet_proto::pki::parse_pem_certs;

/// How long a TCP connect plus TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole request/response (not the stream) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest JSON response read (a device list of ~100k terminals fits).
const MAX_JSON_BYTES: usize = 64 * 1024 * 1024;
/// Largest error response read; the rest is ignored.
const MAX_ERROR_BYTES: usize = 64 * 1024;

/// The bearer token; never printed.
struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// An HTTPS client for one API endpoint.
#[derive(Debug)]
pub(crate) struct ApiClient {
    http: reqwest::Client,
    endpoint: Endpoint,
    /// `None`: requests go without a token (login).
    token: Option<Token>,
}

impl ApiClient {
    /// Reads the token and CA files and builds the client (no network traffic yet).
    pub(crate) fn new(endpoint: Endpoint) -> anyhow::Result<Self> {
        if let Some(session) = &endpoint.session {
            let token = session.token.clone();
            return Self::build(endpoint, Some(Token(token)));
        }
        let token = read_token_file(&endpoint.token_file).map_err(|e| match e {
            DataDirError::Io { path, source } => anyhow!(
                "cannot read the API token file {}: {source}; pass --token-file, or --data-dir \
                 with the data directory of the running server",
                path.display()
            ),
            other => other.into(),
        })?;
        Self::build(endpoint, Some(Token(token)))
    }

    /// A client that sends no token (for the open login route).
    pub(crate) fn anonymous(endpoint: Endpoint) -> anyhow::Result<Self> {
        Self::build(endpoint, None)
    }

    /// The API's base URL.
    pub(crate) fn api_url(&self) -> &Url {
        &self.endpoint.api_url
    }

    fn build(endpoint: Endpoint, token: Option<Token>) -> anyhow::Result<Self> {
        let tls = tls_config(&endpoint.ca_file)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            // The API never redirects; following one could hand the token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("posctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            http,
            endpoint,
            token,
        })
    }

    /// The URL of an API path given as segments (each percent-encoded as needed).
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.endpoint.api_url.clone();
        // `resolve` only accepts https URLs with a host, which always have path segments.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// The endpoint this client talks to.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// POSTs JSON and returns the status and the JSON answer whatever the status (the login
    /// route, whose refusals carry fields the caller needs).
    pub(crate) async fn post_any(
        &self,
        url: Url,
        body: &Value,
    ) -> Result<(StatusCode, Value), ApiError> {
        let request = self
            .http
            .post(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(REQUEST_TIMEOUT)
            .json(body);
        let request = match &self.token {
            Some(token) => request.bearer_auth(&token.0),
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(&url, e))?;
        let status = response.status();
        let bytes = read_capped(response, MAX_ERROR_BYTES)
            .await
            .map_err(|e| self.transport_error(&url, e))?
            .unwrap_or_default();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }

    /// Sends `method` with an optional JSON body; success answers have no body (204).
    pub(crate) async fn send_empty(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<(), ApiError> {
        let mut request = self
            .http
            .request(method, url.clone())
            .timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send(request, &url).await.map(drop)
    }

    /// GET a JSON document.
    pub(crate) async fn get_json(&self, url: Url) -> Result<Value, ApiError> {
        self.send_json(reqwest::Method::GET, url, None).await
    }

    /// Sends `method` with an optional JSON body and reads a JSON answer.
    pub(crate) async fn send_json(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let mut request = self
            .http
            .request(method, url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = self.send(request, &url).await?;
        let body = read_capped(response, MAX_JSON_BYTES)
            .await
            .map_err(|e| self.transport_error(&url, e))?
            .ok_or_else(|| ApiError::TooLarge {
                url: url.to_string(),
                limit: MAX_JSON_BYTES,
            })?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Unexpected {
            url: url.to_string(),
            cause: format!("the body is not JSON ({e})"),
        })
    }

    /// Sends `body` (streamed) with `method` and extra `headers`, waiting at most `timeout`
    /// for the whole exchange; returns the status (success only) and the JSON answer.
    pub(crate) async fn send_stream(
        &self,
        method: reqwest::Method,
        url: Url,
        headers: reqwest::header::HeaderMap,
        body: reqwest::Body,
        timeout: Duration,
    ) -> Result<(StatusCode, Value), ApiError> {
        let request = self
            .http
            .request(method, url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .headers(headers)
            .body(body)
            .timeout(timeout);
        let response = self.send(request, &url).await?;
        let status = response.status();
        let body = read_capped(response, MAX_JSON_BYTES)
            .await
            .map_err(|e| self.transport_error(&url, e))?
            .ok_or_else(|| ApiError::TooLarge {
                url: url.to_string(),
                limit: MAX_JSON_BYTES,
            })?;
        let value = serde_json::from_slice(&body).map_err(|e| ApiError::Unexpected {
            url: url.to_string(),
            cause: format!("the body is not JSON ({e})"),
        })?;
        Ok((status, value))
    }

    /// GET raw bytes (at most `limit`).
    pub(crate) async fn get_bytes(&self, url: Url, limit: usize) -> Result<Vec<u8>, ApiError> {
        let request = self.http.get(url.clone()).timeout(REQUEST_TIMEOUT);
        let response = self.send(request, &url).await?;
        read_capped(response, limit)
            .await
            .map_err(|e| self.transport_error(&url, e))?
            .ok_or_else(|| ApiError::TooLarge {
                url: url.to_string(),
                limit,
            })
    }

    /// Opens the live event stream (optionally for one device); the caller reads the body.
    pub(crate) async fn open_stream(
        &self,
        device: Option<&DeviceId>,
    ) -> Result<(Url, reqwest::Response), ApiError> {
        let mut url = self.url(&["api", "v1", "stream"]);
        if let Some(device) = device {
            url.query_pairs_mut().append_pair("device", device.as_str());
        }
        let request = self
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream");
        // No per-request timeout here: it would also cut the (endless) body. Only the wait for
        // the response head is bounded.
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.send(request, &url))
            .await
            .map_err(|_| ApiError::Timeout {
                url: url.to_string(),
            })??;
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("text/event-stream") {
            return Err(ApiError::Unexpected {
                url: url.to_string(),
                cause: format!("content type {content_type:?} instead of text/event-stream"),
            });
        }
        Ok((url, response))
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &Url,
    ) -> Result<reqwest::Response, ApiError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(&token.0),
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(url, e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = read_capped(response, MAX_ERROR_BYTES)
            .await
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice::<ErrorBody>(&bytes).ok());
        let url = url.to_string();
        Err(match status {
            StatusCode::UNAUTHORIZED => match &self.endpoint.session {
                Some(session) => ApiError::SessionEnded {
                    user: session.user.clone(),
                    detail: detail(body.as_ref()),
                },
                None => ApiError::Unauthorized {
                    url,
                    token_file: self.endpoint.token_file.clone(),
                },
            },
            StatusCode::FORBIDDEN => ApiError::Forbidden {
                credential: match &self.endpoint.session {
                    Some(session) => format!("the session of {}", session.user),
                    None => format!("the token in {}", self.endpoint.token_file.display()),
                },
                detail: detail(body.as_ref()),
            },
            StatusCode::NOT_FOUND => ApiError::NotFound { url, body },
            StatusCode::BAD_REQUEST => ApiError::BadRequest {
                detail: detail(body.as_ref()),
            },
            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::PAYLOAD_TOO_LARGE => ApiError::Invalid {
                status,
                detail: detail(body.as_ref()),
            },
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE => ApiError::Refused {
                status,
                detail: detail(body.as_ref()),
            },
            status => ApiError::Status {
                url,
                status,
                detail: detail(body.as_ref()),
            },
        })
    }

    /// Classifies a failure to send a request or to read a response.
    pub(crate) fn transport_error(&self, url: &Url, e: reqwest::Error) -> ApiError {
        let url = url.to_string();
        if let Some(cause) = tls_cause(&e) {
            return ApiError::Tls {
                url,
                cause,
                ca_file: self.endpoint.ca_file.clone(),
            };
        }
        if e.is_timeout() {
            return ApiError::Timeout { url };
        }
        let cause = root_cause(&e);
        if e.is_connect() {
            ApiError::Connect { url, cause }
        } else {
            ApiError::Transport { url, cause }
        }
    }
}

/// Reads a body up to `limit` bytes; `None` if it is longer.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// A rustls config trusting every certificate in `ca_file` (several during a CA rotation).
fn tls_config(ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let shown = ca_file.display();
    let pem = std::fs::read(ca_file).map_err(|e| {
        anyhow!(
            "cannot read the CA file {shown}: {e}; pass --ca with the fleet CA certificate \
             (DATA_DIR/pki/ca.crt of the server)"
        )
    })?;
    let certs = parse_pem_certs(&pem).map_err(|e| anyhow!("CA file {shown}: {e}"))?;
    if certs.is_empty() {
        return Err(anyhow!(
            "the CA file {shown} holds no PEM certificate; pass --ca with the fleet CA \
             certificate (DATA_DIR/pki/ca.crt of the server)"
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| {
            anyhow!("the CA file {shown} holds a certificate that cannot be trusted: {e}")
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Why an API request failed, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(
        "cannot connect to {url}: {cause}; check that `posfleet-broker serve` (or `demo`) is \
         running and that --server or posctl.json names its admin API address"
    )]
    Connect { url: String, cause: String },
    #[error(
        "TLS handshake with {url} failed: {cause}; check that {} is the fleet CA of this server \
         (DATA_DIR/pki/ca.crt) and that its certificate names this host \
         (`posctl pki init --host NAME`)",
        ca_file.display()
    )]
    Tls {
        url: String,
        cause: String,
        ca_file: PathBuf,
    },
    #[error("{url} did not answer in time; check that the server is healthy, then retry")]
    Timeout { url: String },
    #[error("request to {url} failed: {cause}; check the network and the server, then retry")]
    Transport { url: String, cause: String },
    #[error(
        "the API at {url} refused the token in {} (401 Unauthorized); the token is regenerated \
         only if deleted — check you use the data dir of the running server",
        token_file.display()
    )]
    Unauthorized { url: String, token_file: PathBuf },
    #[error("{credential} is not allowed to do this (403 Forbidden): {detail}")]
    Forbidden { credential: String, detail: String },
    #[error(
        "the session of {user} was refused (401 Unauthorized: {detail}); it ended (15 minutes \
         idle, 12 hours at most, logout or password change): run `posctl login` again"
    )]
    SessionEnded { user: String, detail: String },
    #[error(
        "{url} answered 404 Not Found{}; is --server the admin API of a posfleet-broker of the \
         same version as posctl?",
        body.as_ref().map(|b| format!(" ({})", detail(Some(b)))).unwrap_or_default()
    )]
    NotFound {
        url: String,
        body: Option<ErrorBody>,
    },
    #[error("the API refused the request (400 Bad Request): {detail}")]
    BadRequest { detail: String },
    #[error("the API refused the values ({status}); nothing was changed: {detail}")]
    Invalid { status: StatusCode, detail: String },
    #[error("the API refused the request ({status}): {detail}")]
    Refused { status: StatusCode, detail: String },
    #[error("the API at {url} failed with {status}: {detail}; check the server's log")]
    Status {
        url: String,
        status: StatusCode,
        detail: String,
    },
    #[error("the response from {url} is larger than {limit} bytes; refusing to read it")]
    TooLarge { url: String, limit: usize },
    #[error(
        "unexpected response from {url}: {cause}; is --server the admin API of a \
         posfleet-broker of the same version as posctl?"
    )]
    Unexpected { url: String, cause: String },
}

/// The server's error text, field messages and hint, made safe to print.
fn detail(body: Option<&ErrorBody>) -> String {
    let Some(body) = body else {
        return "no details in the response".to_owned();
    };
    let mut text = printable(&body.error).into_owned();
    for field in &body.fields {
        text.push_str(&format!(
            "\n  {}: {}",
            printable(&field.key),
            printable(&field.message)
        ));
    }
    if let Some(hint) = &body.hint {
        let sep = if body.fields.is_empty() { "; " } else { "\n" };
        text.push_str(sep);
        text.push_str(&printable(hint));
    }
    text
}

/// The rustls error somewhere in the chain. tokio-rustls wraps it in an `io::Error` (possibly
/// more than once), whose `source()` skips the wrapped error, so io errors are opened with
/// `get_ref`.
fn tls_cause(e: &(dyn StdError + 'static)) -> Option<String> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        current = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => err.source(),
        };
    }
    None
}

/// The innermost cause's message ("Connection refused (os error 111)").
fn root_cause(e: &(dyn StdError + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::posctl::endpoint::parse_api_url;

    #[test]
    fn urls_append_percent_encoded_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = posfleet_proto::pki::PkiDir::at(tmp.path());
        pki.init(&[]).unwrap();
        std::fs::write(tmp.path().join("token"), "t\n").unwrap();
        let client = ApiClient::new(Endpoint {
            api_url: parse_api_url("https://h:1/prefix", "x").unwrap(),
            ca_file: pki.ca_cert(),
            token_file: tmp.path().join("token"),
            session: None,
        })
        .unwrap();
        assert_eq!(
            client.url(&["api", "v1", "devices", "T-1"]).as_str(),
            "https://h:1/prefix/api/v1/devices/T-1"
        );
        assert!(
            !format!("{client:?}").contains("\"t\""),
            "token must not be in Debug"
        );
    }
}
