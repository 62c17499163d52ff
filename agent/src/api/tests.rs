//! The local API over its real Unix socket and loopback TCP listener, with a raw HTTP/1.1
//! client, against an agent connected to the fake broker.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::agent::{Agent, AgentSettings};
use crate::outbox::Outbox;
use crate::telemetry::{SimulatedSensors, SimulatedSystem};
use crate::transaction::fixtures::sale;
use posfleet_runtime::backoff::Backoff;
use posfleet_runtime::testing::{FakeBroker, TestPki};
use posfleet_runtime::value::BrokerUrl;

const PAN_DIGITS: &str = "4111111111111111";

/// A running agent and its local API.
struct Harness {
    _tmp: tempfile::TempDir,
    _broker: FakeBroker,
    _outbox: Outbox,
    agent: AgentHandle,
    socket: std::path::PathBuf,
    tcp: SocketAddr,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Harness {
    async fn start() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut LocalApiSettings)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = TestPki::new();
        let broker = FakeBroker::start(&pki).await;
        let outbox = crate::outbox::tests::open(&tmp.path().join("outbox")).await;
        let id = posfleet_proto::DeviceId::new("T-api").unwrap();
        let mut settings = AgentSettings::new(BrokerUrl {
            host: "127.0.0.1".into(),
            port: broker.addr.port(),
        });
        settings.backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        };
        let agent = Agent::new(
            id.clone(),
            pki.device_tls(id.as_str()),
            settings,
            (
                Box::new(SimulatedSystem::new(1)),
                Box::new(SimulatedSensors::new(1)),
            ),
            outbox.device(&id).unwrap(),
            crate::testing::command_setup(tmp.path(), &id),
        );
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let agent = agent.spawn(&tracker, cancel.child_token()).unwrap();
        let mut api_settings = LocalApiSettings::new(tmp.path().join("run/api.sock"));
        api_settings.tcp = Some("127.0.0.1:0".parse().unwrap());
        adjust(&mut api_settings);
        let api = LocalApi::bind(&api_settings).unwrap();
        let socket = api.socket_path().to_owned();
        let tcp = api.tcp_addr().unwrap();
        api.serve(ApiState::new(agent.clone()), &tracker, cancel.child_token());
        Self {
            _tmp: tmp,
            _broker: broker,
            _outbox: outbox,
            agent,
            socket,
            tcp,
            tracker,
            cancel,
        }
    }

    async fn post(&self, body: &str) -> (u16, Value) {
        let head = format!(
            "POST /v1/transactions HTTP/1.1\r\nHost: terminal\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        self.raw(&(head + body)).await
    }

    async fn post_json(&self, body: &Value) -> (u16, Value) {
        self.post(&body.to_string()).await
    }

    async fn status(&self) -> Value {
        let (code, body) = self
            .raw("GET /v1/status HTTP/1.1\r\nHost: terminal\r\nConnection: close\r\n\r\n")
            .await;
        assert_eq!(code, 200);
        body
    }

    async fn raw(&self, request: &str) -> (u16, Value) {
        let stream = UnixStream::connect(&self.socket).await.unwrap();
        exchange(stream, request.as_bytes()).await
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .unwrap();
        assert!(
            !self.socket.exists(),
            "the socket file is removed at shutdown"
        );
    }
}

/// Sends `request`, reads the whole response, returns the status and the JSON body.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
) -> (u16, Value) {
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    parse_response(&response)
}

fn parse_response(response: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(response);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn sale_json(txn_id: &str, amount: i64) -> Value {
    serde_json::to_value(sale(txn_id, amount)).unwrap()
}

#[tokio::test]
async fn stores_repeats_and_conflicts_with_the_right_codes() {
    let h = Harness::start().await;
    let mode = std::fs::metadata(&h.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    let (code, body) = h.post_json(&sale_json("A-1", 1250)).await;
    assert_eq!(
        (code, &body["seq"], &body["result"]),
        (201, &json!(1), &json!("stored"))
    );
    let (code, body) = h.post_json(&sale_json("A-2", 990)).await;
    assert_eq!((code, &body["seq"]), (201, &json!(2)));
    let (code, body) = h.post_json(&sale_json("A-1", 1250)).await;
    assert_eq!(
        (code, &body["seq"], &body["result"]),
        (200, &json!(1), &json!("duplicate"))
    );
    let (code, body) = h.post_json(&sale_json("A-1", 1251)).await;
    assert_eq!((code, &body["error"]), (409, &json!("txn_id_conflict")));

    let status = h.status().await;
    assert_eq!(status["device_id"], "T-api");
    assert_eq!(status["locked"], false);
    assert_eq!(status["outbox"]["depth"], 2);
    assert_eq!(status["outbox"]["last_seq"], 2);
    assert_eq!(status["outbox"]["dead_letters"], 0);
    assert!(status["outbox"]["oldest_unsent_age_ms"].is_u64());
    assert!(status["outbox"]["last_ack_at_ms"].is_null());
    assert!(status["connected"].is_boolean());

    // The same over loopback TCP.
    let tcp = TcpStream::connect(h.tcp).await.unwrap();
    let body = sale_json("A-3", 5).to_string();
    let request = format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (code, body) = exchange(tcp, request.as_bytes()).await;
    assert_eq!((code, &body["seq"]), (201, &json!(3)));
    h.stop().await;
}

#[tokio::test]
async fn bad_input_gets_400_with_field_problems_and_stores_nothing() {
    let h = Harness::start().await;
    let (code, body) = h.post("{\"txn_id\": ").await;
    assert_eq!((code, &body["error"]), (400, &json!("invalid_json")));

    let mut v = sale_json("B-1", 100);
    v["amount_minor"] = json!(-100);
    v["currency"] = json!("euro");
    v["kind"] = json!("chargeback");
    v.as_object_mut().unwrap().remove("merchant_id");
    v["surprise"] = json!(true);
    let (code, body) = h.post_json(&v).await;
    assert_eq!((code, &body["error"]), (400, &json!("invalid_transaction")));
    let fields: Vec<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["surprise", "kind", "merchant_id"],
        "shape problems first"
    );
    let mut v = sale_json("B-1", 100);
    v["amount_minor"] = json!(-100);
    v["currency"] = json!("euro");
    let (code, body) = h.post_json(&v).await;
    assert_eq!(code, 400);
    assert_eq!(body["problems"][0]["field"], "amount_minor");
    assert_eq!(body["problems"][1]["field"], "currency");

    let mut items = sale_json("B-2", 100);
    items["items"] = Value::Array(vec![
        json!({"sku": "S", "quantity": 1, "unit_price_minor": 1});
        201
    ]);
    assert_eq!(h.post_json(&items).await.0, 400);

    assert_eq!(h.status().await["outbox"]["depth"], 0, "nothing was stored");
    h.stop().await;
}

#[tokio::test]
async fn a_pan_is_refused_never_echoed_and_never_logged() {
    use std::sync::{Arc, Mutex};
    /// Collects everything logged on this (current-thread) runtime.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Capture::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = Harness::start().await;
    let spaced = "4111 1111 1111 1111";
    let dashed = "4111-1111-1111-1111";
    let mut cases = Vec::new();
    for (field, value) in [
        ("merchant_id", json!(PAN_DIGITS)),
        ("auth_code", json!(spaced)),
        ("operator_id", json!(dashed)),
        ("masked_card", json!(PAN_DIGITS)),
    ] {
        let mut v = sale_json("P-1", 100);
        v[field] = value;
        cases.push((field.to_owned(), v));
    }
    let mut v = sale_json("P-1", 100);
    v["items"][0]["sku"] = json!(format!("sku {spaced}"));
    cases.push(("items[0].sku".into(), v));
    let mut v = sale_json("P-1", 100);
    v["comment"] = json!(PAN_DIGITS);
    cases.push(("(unknown field)".into(), v));

    for (field, body) in cases {
        let (code, answer) = h.post_json(&body).await;
        assert_eq!(
            (code, &answer["error"]),
            (400, &json!("card_number_refused")),
            "{field}"
        );
        assert_eq!(answer["problems"][0]["field"], json!(field));
        let text = answer.to_string();
        assert!(
            !text.contains("1111"),
            "the answer echoes card digits: {text}"
        );
    }
    assert_eq!(h.status().await["outbox"]["depth"], 0, "nothing was stored");
    h.stop().await;

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("PAN"), "the refusal is logged");
    // Not "1111" as a substring: random ids, ports and timestamps contain it by chance.
    assert!(
        !posfleet_proto::pan::contains_pan(&logged),
        "a card number in the log: {logged}"
    );
    for pan in [PAN_DIGITS, spaced, dashed] {
        assert!(!logged.contains(pan), "{pan} in the log: {logged}");
    }
}

/// Issue 10 item 7: the card numbers the security review got through with 201, in every field
/// it used, are refused with 400 `card_number_refused` naming the field; nothing is stored.
#[tokio::test]
async fn separated_and_letter_joined_pans_are_refused_in_every_field() {
    let h = Harness::start().await;
    for &value in posfleet_proto::pan::REVIEW_EXAMPLES {
        for field in [
            "txn_id",
            "merchant_id",
            "store_id",
            "card_token",
            "items[0].sku",
        ] {
            let mut body = sale_json("S-1", 100);
            if field == "items[0].sku" {
                body["items"][0]["sku"] = json!(value);
            } else {
                body[field] = json!(value);
            }
            let (code, answer) = h.post_json(&body).await;
            assert_eq!(
                (code, &answer["error"], &answer["problems"][0]["field"]),
                (400, &json!("card_number_refused"), &json!(field)),
                "{field} = {value}: {answer}"
            );
            assert!(!answer.to_string().contains("1111"), "echoed: {answer}");
        }
    }
    assert_eq!(h.status().await["outbox"]["depth"], 0, "nothing was stored");
    h.stop().await;
}

#[tokio::test]
async fn locked_terminal_oversized_body_and_wrong_media_type() {
    let h = Harness::start().await;
    h.agent.live().set_locked(true);
    let (code, body) = h.post_json(&sale_json("L-1", 100)).await;
    assert_eq!((code, &body["error"]), (423, &json!("terminal_locked")));
    assert_eq!(h.status().await["locked"], true);
    h.agent.live().set_locked(false);
    assert_eq!(h.post_json(&sale_json("L-1", 100)).await.0, 201);

    let big = "x".repeat(MAX_BODY_BYTES + 1);
    assert_eq!(h.post(&big).await.0, 413);

    let body = sale_json("M-1", 1).to_string();
    let request = format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(h.raw(&request).await.0, 415);
    h.stop().await;
}

#[tokio::test]
async fn a_request_that_never_finishes_gets_408() {
    let h = Harness::with(|s| s.request_timeout = Duration::from_millis(300)).await;
    // Headers promise a body that never comes.
    let mut stream = UnixStream::connect(&h.socket).await.unwrap();
    stream
        .write_all(b"POST /v1/transactions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let mut response = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parse_response(&response[..n]).0, 408);
    h.stop().await;
}

#[tokio::test]
async fn bind_replaces_stale_sockets_and_refuses_everything_else() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("api.sock");
    // A stale socket (bound, nobody listening any more) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let settings = LocalApiSettings::new(&path);
    let api = LocalApi::bind(&settings).unwrap();
    // A live one is not.
    assert!(matches!(
        LocalApi::bind(&settings),
        Err(ApiError::SocketInUse { .. })
    ));
    drop(api);
    // Nor is a regular file.
    let file = tmp.path().join("precious.txt");
    std::fs::write(&file, b"data").unwrap();
    assert!(matches!(
        LocalApi::bind(&LocalApiSettings::new(&file)),
        Err(ApiError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    // TCP only on loopback.
    let mut public = LocalApiSettings::new(tmp.path().join("b.sock"));
    public.tcp = Some("0.0.0.0:0".parse().unwrap());
    assert!(matches!(
        LocalApi::bind(&public),
        Err(ApiError::NotLoopback { .. })
    ));
    let long = LocalApiSettings::new(Path::new("/tmp").join("x".repeat(120)));
    assert!(matches!(
        LocalApi::bind(&long),
        Err(ApiError::SocketPathTooLong { .. })
    ));
}
