//! posctl against a real HTTPS server: a tiny axum app on 127.0.0.1:0 behind tokio-rustls,
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
use crate::datadir::DataDir;
use crate::views::{DeviceDetail, DeviceList, ErrorBody, FleetEvent, HeartbeatView};

const TOKEN: &str = "test-token-not-secret";

/// What the canned server shares with the test.
#[derive(Clone, Default)]
struct Shared {
    /// Notified when a stream request arrives (lets a test stop `watch` without sleeping).
    stream_opened: Arc<Notify>,
}

struct Fixture {
    _tmp: tempfile::TempDir,
    data_dir: PathBuf,
    url: String,
    shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Fixture {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::at(tmp.path().join("data"));
        data.create().unwrap();
        let pki = data.pki();
        pki.init(&[]).unwrap();
        write_secret_file(&data.admin_token_file(), &format!("{TOKEN}\n")).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        data.write_client_file(&url).unwrap();

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

    fn pki(&self) -> PkiDir {
        DataDir::at(&self.data_dir).pki()
    }

    /// Runs posctl with `--data-dir` of this fixture plus `args`; returns the result and stdout.
    async fn posctl(&self, args: &[&str]) -> (anyhow::Result<ExitCode>, String) {
        let data_dir = self.data_dir.display().to_string();
        let mut full = vec!["--data-dir", data_dir.as_str()];
        full.extend_from_slice(args);
        posctl(&full, std::future::pending()).await
    }
}

async fn posctl(
    args: &[&str],
    stop: impl std::future::Future<Output = ()>,
) -> (anyhow::Result<ExitCode>, String) {
    let cli = Cli::try_parse_from(std::iter::once("posctl").chain(args.iter().copied())).unwrap();
    let Command::Api(cmd) = cli.command else {
        panic!("not an API command: {args:?}");
    };
    let mut out = Vec::new();
    let result = run_api(&cli.conn, cli.output, cmd, &mut out, stop).await;
    (result, String::from_utf8(out).unwrap())
}

fn error_text(result: anyhow::Result<ExitCode>) -> String {
    format!("{:#}", result.expect_err("posctl should have failed"))
}

// ----- the canned API ---------------------------------------------------------------------

fn app(shared: Shared) -> Router {
    Router::new()
        .route("/api/v1/devices", get(list))
        .route("/api/v1/devices/{id}", get(show))
        .route("/api/v1/stream", get(stream))
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
    };
    (status, axum::Json(body)).into_response()
}

fn canned_list() -> DeviceList {
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

fn canned_events() -> Vec<FleetEvent> {
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

// ----- devices ----------------------------------------------------------------------------

#[tokio::test]
async fn devices_list_renders_a_table_from_the_data_dir() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["devices", "list"]).await;
    assert!(result.is_ok(), "{result:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID   STATE   ONLINE"), "{out}");
    assert!(
        lines[1].starts_with("T-1  active  offline (missed_heartbeats)  "),
        "{out}"
    );
    assert!(lines[2].starts_with("T-2  active  online"), "{out}");
    assert_eq!(lines.last(), Some(&"2 devices, 1 online"), "{out}");
}

#[tokio::test]
async fn devices_list_json_is_the_api_json() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["devices", "list", "--output", "json"]).await;
    assert!(result.is_ok(), "{result:?}");
    let printed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        printed["generated_at_ms"], NOW,
        "unknown fields are kept: {out}"
    );
    let printed: DeviceList = serde_json::from_str(&out).unwrap();
    assert_eq!(printed, canned_list());
    assert!(out.contains("\n  \"devices\""), "pretty-printed: {out}");
}

#[tokio::test]
async fn devices_show_renders_the_block_and_json() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["devices", "show", "T-1"]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(out.starts_with("!!! TAMPER DETECTED on T-1"), "{out}");
    assert!(
        out.contains("  memory       512 / 2048 MiB (25%)\n"),
        "{out}"
    );

    let (result, out) = fx.posctl(&["-o", "json", "devices", "show", "T-1"]).await;
    assert!(result.is_ok(), "{result:?}");
    let printed: DeviceDetail = serde_json::from_str(&out).unwrap();
    assert_eq!(printed, detail("T-1", true));
}

#[tokio::test]
async fn an_unknown_device_says_how_to_find_known_ones() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["devices", "show", "T-404"]).await;
    assert_eq!(
        error_text(result),
        "no device T-404; `posctl devices list` shows known devices"
    );
    assert_eq!(out, "");
}

#[tokio::test]
async fn a_server_error_shows_the_servers_message_and_hint() {
    let fx = Fixture::start().await;
    let (result, _) = fx.posctl(&["devices", "show", "T-500"]).await;
    let message = error_text(result);
    assert!(
        message.contains(
            "failed with 500 Internal Server Error: registry unavailable; retry in a minute"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn a_refused_token_names_the_token_file() {
    let fx = Fixture::start().await;
    let wrong = fx.data_dir.join("wrong.token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let wrong_arg = wrong.display().to_string();
    let (result, _) = fx
        .posctl(&["--token-file", &wrong_arg, "devices", "list"])
        .await;
    let message = error_text(result);
    assert!(
        message.contains(&format!(
            "refused the token in {wrong_arg} (401 Unauthorized)"
        )),
        "{message}"
    );
    assert!(
        message.contains("data dir of the running server"),
        "{message}"
    );
    assert!(
        !message.contains("not-the-token"),
        "never print a token: {message}"
    );
}

#[tokio::test]
async fn explicit_flags_work_without_a_data_dir() {
    let fx = Fixture::start().await;
    let pki = fx.pki();
    let (ca, token) = (
        pki.ca_cert().display().to_string(),
        fx.data_dir.join("admin.token").display().to_string(),
    );
    let missing = fx.data_dir.join("not-a-data-dir").display().to_string();
    let (result, out) = posctl(
        &[
            "--data-dir",
            &missing,
            "--server",
            &fx.url,
            "--ca",
            &ca,
            "--token-file",
            &token,
            "devices",
            "list",
        ],
        std::future::pending(),
    )
    .await;
    assert!(result.is_ok(), "{result:?}");
    assert!(out.contains("2 devices, 1 online"), "{out}");
}

#[tokio::test]
async fn connection_refused_names_the_url() {
    let fx = Fixture::start().await;
    // A port that was just free: nothing listens on it now.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let (result, _) = fx.posctl(&["--server", &url, "devices", "list"]).await;
    let message = error_text(result);
    assert!(
        message.starts_with(&format!("cannot connect to {url}/")),
        "{message}"
    );
    assert!(message.contains("is running"), "{message}");
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_a_clear_tls_error() {
    let fx = Fixture::start().await;
    let other = tempfile::tempdir().unwrap();
    let other_pki = PkiDir::at(other.path());
    other_pki.init(&[]).unwrap();
    let ca = other_pki.ca_cert().display().to_string();
    let (result, _) = fx.posctl(&["--ca", &ca, "devices", "list"]).await;
    let message = error_text(result);
    assert!(message.starts_with("TLS handshake with"), "{message}");
    assert!(
        message.contains(&format!("check that {ca} is the fleet CA")),
        "{message}"
    );
}

// ----- watch ------------------------------------------------------------------------------

#[tokio::test]
async fn watch_renders_one_line_per_event_and_stops_after_count() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["watch", "--count", "2"]).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        out,
        "13:05:09  T-1           presence   online\n\
         13:05:09  T-2           heartbeat  seq 9  uptime 42s  outbox 0\n"
    );
}

#[tokio::test]
async fn watch_json_prints_json_lines_for_one_device() {
    let fx = Fixture::start().await;
    let (result, out) = fx
        .posctl(&[
            "--output", "json", "watch", "--device", "T-1", "--count", "2",
        ])
        .await;
    assert!(result.is_ok(), "{result:?}");
    let events: Vec<FleetEvent> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let expected: Vec<FleetEvent> = canned_events()
        .into_iter()
        .filter(|e| e.device() == Some("T-1"))
        .collect();
    assert_eq!(events, expected);
}

#[tokio::test]
async fn watch_reports_a_closed_stream_as_an_error() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["watch"]).await;
    let message = error_text(result);
    assert!(
        message.contains("the server closed the stream") && message.contains("after 3 events"),
        "{message}"
    );
    assert_eq!(out.lines().count(), 3, "{out}");
}

#[tokio::test]
async fn watch_stops_cleanly_when_asked() {
    let fx = Fixture::start().await;
    let data_dir = fx.data_dir.display().to_string();
    let opened = fx.shared.stream_opened.clone();
    let (result, out) = posctl(
        &["--data-dir", &data_dir, "watch", "--device", "T-idle"],
        async move { opened.notified().await },
    )
    .await;
    assert!(
        matches!(result, Ok(code) if code == ExitCode::SUCCESS),
        "{result:?}"
    );
    assert_eq!(out, "");
}

#[tokio::test]
async fn watch_timeout_ends_quietly_or_fails_when_events_were_expected() {
    let fx = Fixture::start().await;
    let (result, _) = fx
        .posctl(&["watch", "--device", "T-idle", "--timeout", "200ms"])
        .await;
    assert!(result.is_ok(), "{result:?}");
    let (result, _) = fx
        .posctl(&[
            "watch",
            "--device",
            "T-idle",
            "--count",
            "1",
            "--timeout",
            "200ms",
        ])
        .await;
    let message = error_text(result);
    assert!(
        message.starts_with("only 0 of 1 events arrived within 0.2s"),
        "{message}"
    );
}

#[tokio::test]
async fn watch_without_a_token_is_refused_before_streaming() {
    let fx = Fixture::start().await;
    let wrong = fx.data_dir.join("wrong.token");
    std::fs::write(&wrong, "nope\n").unwrap();
    let wrong = wrong.display().to_string();
    let (result, _) = fx.posctl(&["--token-file", &wrong, "watch"]).await;
    assert!(error_text(result).contains("401 Unauthorized"));
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
