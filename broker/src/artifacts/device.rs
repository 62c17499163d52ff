//! The terminals' download endpoint: `GET /device/v1/artifacts/{sha256}` on its own HTTPS
//! listener that requires a client certificate from the fleet CA (a device or a controller
//! identity; the accept loop is the admin API's, `api::serve_site`).
//!
//! Full downloads answer 200; a single `Range: bytes=N-`, `bytes=N-M` or `bytes=-N` answers
//! 206 with `Content-Range`; a range starting beyond the end answers 416; an unknown id 404.
//! Bytes are streamed from the file (never read whole) and counted in
//! `posfleet_artifact_bytes_served_total`.

use std::io::SeekFrom;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json};
use futures_util::StreamExt as _;
use posfleet_proto::pki::Identity;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio_util::io::ReaderStream;
use tracing::debug;

use super::Artifacts;
use super::validate::parse_id;
use crate::edge::{TlsSetupError, mtls_server_config};
use crate::views::ErrorBody;

/// The identity of the client certificate of a connection (inserted by the accept loop).
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Identity);

/// Read buffer of a download stream.
const CHUNK: usize = 64 * 1024;

/// TLS for the device endpoint: the edge's mutual-TLS configuration (client certificate from
/// the fleet CA required), speaking HTTP/1.1 instead of MQTT.
pub fn device_tls_config(
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let mut config = (*mtls_server_config(ca_file, cert_file, key_file)?).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The device endpoint's routes.
pub fn device_router(artifacts: Arc<Artifacts>) -> Router {
    Router::new()
        .route("/device/v1/artifacts/{id}", get(download))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(artifacts)
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.to_owned(),
            hint: None,
            fields: Vec::new(),
        }),
    )
        .into_response()
}

/// What a `Range` header asks for, against a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    /// No (usable) range: the whole file.
    All,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// Starts beyond the end.
    Unsatisfiable,
}

/// Parses a single byte range. Anything else (several ranges, other units, malformed) is
/// ignored, as RFC 9110 allows: the whole file is served.
fn wanted(range: Option<&HeaderValue>, len: u64) -> Wanted {
    let Some(spec) = range
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Wanted::All;
    };
    if spec.contains(',') {
        return Wanted::All;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Wanted::All;
    };
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match number(last) {
            Some(0) => Wanted::Unsatisfiable,
            Some(n) if len > 0 => Wanted::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            Some(_) => Wanted::Unsatisfiable,
            None => Wanted::All,
        },
        (false, _) => {
            let Some(start) = number(first) else {
                return Wanted::All;
            };
            let end = if last.is_empty() {
                None
            } else {
                match number(last) {
                    Some(end) if end >= start => Some(end),
                    _ => return Wanted::All,
                }
            };
            if start >= len {
                return Wanted::Unsatisfiable;
            }
            Wanted::Part {
                start,
                end: end.map_or(len - 1, |e| e.min(len - 1)),
            }
        }
        (true, true) => Wanted::All,
    }
}

async fn download(
    State(artifacts): State<Arc<Artifacts>>,
    Extension(PeerIdentity(peer)): Extension<PeerIdentity>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if parse_id(&id).is_none() {
        return error(StatusCode::NOT_FOUND, "no such artifact");
    }
    let meta = {
        let store = Arc::clone(artifacts.store());
        let key = id.clone();
        match tokio::task::spawn_blocking(move || store.get(&key)).await {
            Ok(Ok(Some(meta))) => meta,
            Ok(Ok(None)) => return error(StatusCode::NOT_FOUND, "no such artifact"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "artifact store read failed");
                return error(StatusCode::INTERNAL_SERVER_ERROR, "artifact store failed");
            }
            Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "artifact store failed"),
        }
    };
    let path = artifacts.store().blob_path(&meta.id);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "artifact blob cannot be opened");
            return error(StatusCode::NOT_FOUND, "no such artifact");
        }
    };
    let len = meta.size_bytes;
    let (status, start, count) = match wanted(headers.get(header::RANGE), len) {
        Wanted::All => (StatusCode::OK, 0, len),
        Wanted::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Wanted::Unsatisfiable => {
            let mut response = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "the range starts beyond the end of the artifact",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return response;
        }
    };
    if start > 0 {
        if let Err(e) = file.seek(SeekFrom::Start(start)).await {
            tracing::error!(error = %e, "artifact blob seek failed");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reading the artifact failed",
            );
        }
    }
    debug!(device = %peer, id = %meta.id, start, bytes = count, "artifact download");
    let metrics = Arc::clone(&artifacts.metrics);
    let stream = ReaderStream::with_capacity(file.take(count), CHUNK).map(move |chunk| {
        if let Ok(bytes) = &chunk {
            metrics
                .artifact_bytes_served_total
                .inc_by(bytes.len() as u64);
        }
        chunk
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", meta.id)) {
        h.insert(header::ETAG, etag);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let range = format!("bytes {start}-{}/{len}", start + count - 1);
        if let Ok(v) = HeaderValue::from_str(&range) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(range: &str, len: u64) -> Wanted {
        wanted(Some(&HeaderValue::from_str(range).unwrap()), len)
    }

    #[test]
    fn ranges() {
        assert_eq!(wanted(None, 100), Wanted::All);
        assert_eq!(w("bytes=10-", 100), Wanted::Part { start: 10, end: 99 });
        assert_eq!(w("bytes=10-19", 100), Wanted::Part { start: 10, end: 19 });
        assert_eq!(w("bytes=10-1000", 100), Wanted::Part { start: 10, end: 99 });
        assert_eq!(w("bytes=-5", 100), Wanted::Part { start: 95, end: 99 });
        assert_eq!(w("bytes=-500", 100), Wanted::Part { start: 0, end: 99 });
        assert_eq!(w("bytes=99-", 100), Wanted::Part { start: 99, end: 99 });
        assert_eq!(w("bytes=100-", 100), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=-0", 100), Wanted::Unsatisfiable);
        for ignored in [
            "bytes=1-2,5-6",
            "items=1-2",
            "bytes=x-",
            "bytes=5-2",
            "bytes=-",
            "bytes=+1-",
        ] {
            assert_eq!(w(ignored, 100), Wanted::All, "{ignored}");
        }
    }
}
