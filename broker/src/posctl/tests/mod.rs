//! posctl against a real HTTPS server (`devices`, `tx`, `watch`): a tiny axum app on 127.0.0.1:0 behind tokio-rustls,
//! with certificates from `PkiDir::init` in a temp dir, returning canned `views` JSON.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::{CommandFactory, Parser};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use posfleet_proto::pki::{PkiDir, write_secret_file};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::devices::tests::{NOW, detail, summary, telemetry};
use super::{Cli, Command, run_api};

mod accounts;
mod artifacts;
mod commands;
mod config;
mod devices;
mod enrol;
mod rollouts;
pub(crate) mod transactions;
mod watch;
use crate::datadir::DataDir;
use crate::views::{DeviceDetail, DeviceList, ErrorBody, FleetEvent, HeartbeatView};

const TOKEN: &str = "test-token-not-secret";

/// What the canned server shares with the test.
#[derive(Clone, Default)]
pub(super) struct Shared {
    /// Notified when a stream request arrives (lets a test stop `watch` without sleeping).
    pub(super) stream_opened: Arc<Notify>,
}

pub(super) struct Fixture {
    _tmp: tempfile::TempDir,
    pub(super) data_dir: PathBuf,
    pub(super) url: String,
    pub(super) shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Fixture {
    pub(super) async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::at(tmp.path().join("data"));
        data.create().unwrap();
        let pki = data.pki();
        pki.init(&[]).unwrap();
        write_secret_file(&data.admin_token_file(), &format!("{TOKEN}\n")).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        data.write_client_file(&url, None, None).unwrap();

        let certs = CertificateDer::pem_file_iter(pki.server_cert())
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.server_key()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let shared = Shared::default();
        let app = app(shared.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client that rejects our certificate ends here; that is the test's point.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        Self {
            data_dir: data.root().to_owned(),
            _tmp: tmp,
            url,
            shared,
            server,
        }
    }

    pub(super) fn pki(&self) -> PkiDir {
        DataDir::at(&self.data_dir).pki()
    }

    /// Runs posctl with `--data-dir` of this fixture plus `args`; returns the result and stdout.
    pub(super) async fn posctl(&self, args: &[&str]) -> (anyhow::Result<ExitCode>, String) {
        let data_dir = self.data_dir.display().to_string();
        let mut full = vec!["--data-dir", data_dir.as_str()];
        full.extend_from_slice(args);
        posctl(&full, std::future::pending()).await
    }
}

pub(super) async fn posctl(
    args: &[&str],
    stop: impl std::future::Future<Output = ()>,
) -> (anyhow::Result<ExitCode>, String) {
    let cli = Cli::try_parse_from(std::iter::once("posctl").chain(args.iter().copied())).unwrap();
    let Command::Api(cmd) = cli.command else {
        panic!("not an API command: {args:?}");
    };
    let mut out = Vec::new();
    let mut prompt = Answers::default();
    let result = run_api(&cli.conn, cli.output, cmd, &mut out, &mut prompt, stop).await;
    (result, String::from_utf8(out).unwrap())
}

/// Canned answers to posctl's prompts, in order.
#[derive(Debug, Default)]
pub(crate) struct Answers(pub(crate) std::collections::VecDeque<String>);

impl super::accounts::Prompt for Answers {
    fn secret(&mut self, label: &str) -> anyhow::Result<String> {
        self.0
            .pop_front()
            .ok_or_else(|| anyhow::anyhow!("no answer for {label}"))
    }
}

pub(super) fn error_text(result: anyhow::Result<ExitCode>) -> String {
    format!("{:#}", result.expect_err("posctl should have failed"))
}

// ----- the canned API ---------------------------------------------------------------------

fn app(shared: Shared) -> Router {
    Router::new()
        .route("/api/v1/devices", get(list))
        .route("/api/v1/devices/{id}", get(show))
        .route("/api/v1/stream", get(stream))
        .route("/api/v1/transactions", get(transactions::list))
        .route(
            "/api/v1/devices/{id}/transactions/summary",
            get(transactions::summary),
        )
        .with_state(shared)
}

fn unauthorized(headers: &HeaderMap) -> Option<Response> {
    let expected = format!("Bearer {TOKEN}");
    let ok = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    (!ok).then(|| {
        error_response(
            StatusCode::UNAUTHORIZED,
            "missing or invalid bearer token",
            None,
        )
    })
}

fn error_response(status: StatusCode, error: &str, hint: Option<&str>) -> Response {
    let body = ErrorBody {
        error: error.into(),
        hint: hint.map(Into::into),
        fields: Vec::new(),
    };
    (status, axum::Json(body)).into_response()
}

pub(super) fn canned_list() -> DeviceList {
    DeviceList {
        devices: vec![summary("T-2", true), summary("T-1", false)],
    }
}

/// The list plus a field this posctl does not know (a newer server may add fields).
async fn list(headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&headers) {
        return refused;
    }
    let mut value = serde_json::to_value(canned_list()).unwrap();
    value["generated_at_ms"] = NOW.into();
    axum::Json(value).into_response()
}

async fn show(headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Some(refused) = unauthorized(&headers) {
        return refused;
    }
    match id.as_str() {
        "T-1" => axum::Json(detail("T-1", true)).into_response(),
        "T-500" => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "registry unavailable",
            Some("retry in a minute"),
        ),
        _ => error_response(StatusCode::NOT_FOUND, &format!("no device {id}"), None),
    }
}

pub(super) fn canned_events() -> Vec<FleetEvent> {
    vec![
        FleetEvent::Presence {
            device: "T-1".into(),
            online: true,
            reason: None,
            at_ms: NOW,
        },
        FleetEvent::Heartbeat {
            device: "T-2".into(),
            heartbeat: HeartbeatView {
                seq: 9,
                sent_at_ms: NOW,
                received_at_ms: NOW,
                interval_s: 10,
                uptime_s: 42,
                outbox_depth: 0,
                boot_id: 3,
                config_version: 0,
                locked: false,
                lock_generation: 0,
                dead_letters: 0,
            },
        },
        FleetEvent::Telemetry {
            device: "T-1".into(),
            telemetry: telemetry(false),
        },
    ]
}

/// The stream as the real server frames it (keep-alive comments, `event:` + `data:`), CRLF
/// for one event, and cut into small chunks so events straddle chunk boundaries.
async fn stream(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = unauthorized(&headers) {
        return refused;
    }
    shared.stream_opened.notify_one();
    let device = query.get("device").cloned();
    if device.as_deref() == Some("T-hang") {
        // Never answers: the client must not wait for the response head forever.
        std::future::pending::<()>().await;
    }
    let body = if device.as_deref() == Some("T-idle") {
        // Keep-alive, then silence until the client goes away.
        let keepalive = futures_util::stream::once(async {
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(b": keep-alive\n\n"))
        });
        Body::from_stream(futures_util::StreamExt::chain(
            keepalive,
            futures_util::stream::pending(),
        ))
    } else {
        let mut text = String::from(":ok\n\n");
        for (i, event) in canned_events().iter().enumerate() {
            if device.as_deref().is_some_and(|d| event.device() != Some(d)) {
                continue;
            }
            let json = serde_json::to_string(event).unwrap();
            let end = if i == 1 { "\r\n" } else { "\n" };
            text.push_str(&format!(
                "event: {}{end}data: {json}{end}{end}",
                event.kind()
            ));
            text.push_str(": keep-alive\n\n");
        }
        let chunks: Vec<Result<bytes::Bytes, std::convert::Infallible>> = text
            .as_bytes()
            .chunks(7)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        Body::from_stream(futures_util::stream::iter(chunks))
    };
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

// ----- command line -----------------------------------------------------------------------

#[test]
fn the_command_line_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn invalid_device_ids_are_usage_errors_naming_the_alphabet() {
    for args in [
        &["posctl", "devices", "show", "a/b"][..],
        &["posctl", "watch", "--device=-x"],
        &["posctl", "pki", "issue-device", "--id", "", "--out", "o"],
    ] {
        let err = Cli::try_parse_from(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{args:?}");
        assert!(
            err.to_string()
                .contains("letters, digits, '.', '_' or '-', starting with a letter or digit"),
            "{err}"
        );
    }
}

#[test]
fn output_and_connection_flags_are_accepted_after_the_subcommand() {
    let cli = Cli::try_parse_from([
        "posctl",
        "devices",
        "list",
        "--output",
        "json",
        "--data-dir",
        "/d",
    ])
    .unwrap();
    assert_eq!(cli.output, super::OutputFormat::Json);
    assert_eq!(cli.conn.data_dir.as_deref(), Some(Path::new("/d")));
}
