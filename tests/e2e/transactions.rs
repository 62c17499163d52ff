//! Transactions end to end (issue 3, ADR 0005/0006): what a terminal's local API accepted is
//! stored by the controller exactly once, whatever crashes and network cuts happen in between,
//! and no card number ends up in any data directory or log.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::now_ms;
use posfleet_tests::localapi::LocalApiClient;
use posfleet_tests::panscan::{ScanReport, luhn_number, scan_bytes, scan_paths};
use posfleet_tests::payapp::PaymentAppStats;
use posfleet_tests::txdriver::DriverStatus;
use posfleet_tests::{
    AcceptedLedger, Agent, AgentOptions, Api, Broker, PaymentApp, Proxy, StoredLedger, TxDriver,
    TxDriverOptions, eventually, reconcile,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::{WAIT, broker, online};

/// Bound on the final drain (every outbox empty) and on recovering from one fault.
const DRAIN: Duration = Duration::from_secs(60);
/// Transactions the store must gain after each fault before the next one: the pipeline
/// flows again end to end.
const PROGRESS: f64 = 150.0;

fn txdriver_bin() -> PathBuf {
    env!("CARGO_BIN_EXE_pf-txdriver").into()
}

fn start_agent(broker: &Broker, id: &str, url: &str) -> Agent {
    Agent::start_with(broker, id, &AgentOptions::default(), url, "")
        .unwrap_or_else(|e| panic!("agent {id} did not start: {e:#}"))
}

/// `posfleet_tx_stored_total` of the running broker process (0 right after a restart).
async fn stored_total(api: &Api) -> f64 {
    match api.metrics().await {
        Ok(scrape) => scrape.value("posfleet_tx_stored_total", &[]),
        Err(error) => panic!("metrics: {error:#}"),
    }
}

/// Waits until the running broker has stored `n` more transactions than `from`.
async fn progress(api: &Api, from: f64, n: f64, after: &str) {
    eventually(DRAIN, || async {
        let now = api.metrics().await?.value("posfleet_tx_stored_total", &[]);
        anyhow::ensure!(
            now >= from + n,
            "after {after}: {now} transactions stored by this broker process, waiting for {}",
            from + n
        );
        Ok(())
    })
    .await;
}

/// Waits until a real agent's outbox is empty and it is connected.
async fn drained(api: &LocalApiClient, id: &str) {
    eventually(DRAIN, || async {
        let status = api.status().await?;
        anyhow::ensure!(
            status.connected && status.outbox.depth == 0,
            "{id} not drained: {status:?}"
        );
        Ok(())
    })
    .await;
}

/// A valid transaction body (the payment application's JSON); the same arguments give the
/// same content (the time is fixed once per test binary).
fn sale(txn_id: &str, amount_minor: i64) -> Value {
    static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let at = *AT.get_or_init(now_ms);
    json!({
        "txn_id": txn_id, "timestamp_ms": at, "amount_minor": amount_minor,
        "currency": "EUR", "kind": "sale", "status": "approved",
        "masked_card": "411111******1111", "card_brand": "visa", "entry_mode": "chip",
        "auth_code": "A1B2C3", "response_code": "00", "merchant_id": "MER-001",
        "items": [ { "sku": "SKU-1", "quantity": 1, "unit_price_minor": amount_minor } ]
    })
}

/// Posts transactions holding full card numbers in every kind of place; each must be refused
/// with 400 `card_number_refused`. Returns the numbers (digits only) for the scan.
async fn post_pans(api: &LocalApiClient, seed: u64) -> Vec<String> {
    let visa = luhn_number("4", 16, seed);
    let master = luhn_number("5", 16, seed + 1);
    let amex = luhn_number("37", 15, seed + 2);
    let discover = luhn_number("6011", 16, seed + 3);
    let short = luhn_number("4", 13, seed + 4);
    let long = luhn_number("62", 19, seed + 5);
    let joined = |p: &str, sep: &str| {
        p.as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(sep)
    };
    let spaced = |p: &str| joined(p, " ");
    // Groups of four with a different letter between each (issue 10 item 7).
    let lettered = |p: &str| {
        p.as_bytes()
            .chunks(4)
            .zip(["", "a", "b", "c", "d"])
            .map(|(c, l)| format!("{l}{}", String::from_utf8_lossy(c)))
            .collect::<String>()
    };
    let wide: String = master
        .chars()
        .map(|c| char::from_u32(u32::from(c) - u32::from('0') + 0xFF10).unwrap_or('?'))
        .collect();
    let mut bodies = Vec::new();
    let mut with = |field: &str, value: Value| {
        let mut body = sale(&format!("pan-probe-{}", bodies.len()), 990);
        body[field] = value;
        bodies.push(body);
    };
    with("masked_card", json!(visa));
    with("card_token", json!(spaced(&master)));
    with("auth_code", json!(amex.replace("", "-").trim_matches('-')));
    with("merchant_id", json!(format!("MER {discover}")));
    with("txn_id", json!(format!("T{short}")));
    with("operator_id", json!(wide));
    with("store_id", json!(long));
    with("response_code", json!(format!("ref 42{visa}")));
    // The notations the security review got through with 201 (issue 10 item 7).
    with("txn_id", json!(joined(&visa, ".")));
    with("merchant_id", json!(joined(&master, ":")));
    with("store_id", json!(joined(&discover, "_")));
    with("card_token", json!(joined(&long, "+")));
    with("txn_id", json!(lettered(&visa)));
    let mut in_item = sale("pan-probe-item", 990);
    in_item["items"][0]["sku"] = json!(format!("SKU-{master}"));
    bodies.push(in_item);
    let mut in_item = sale("pan-probe-item-2", 990);
    in_item["items"][0]["sku"] = json!(joined(&amex, "/"));
    bodies.push(in_item);
    let mut unknown_value = sale("pan-probe-unknown-value", 990);
    unknown_value["card_number"] = json!(amex);
    bodies.push(unknown_value);
    let mut unknown_key = sale("pan-probe-unknown-key", 990);
    unknown_key[discover.as_str()] = json!("x");
    bodies.push(unknown_key);
    for body in &bodies {
        let answer = api
            .post_transaction(body)
            .await
            .unwrap_or_else(|e| panic!("POST with a PAN: {e:#}"));
        assert_eq!(
            (answer.status, answer.error()),
            (400, Some("card_number_refused")),
            "a transaction holding a PAN must be refused: {answer:?}"
        );
        let text = answer.body.to_string();
        for pan in [&visa, &master, &amex, &discover, &short, &long] {
            assert!(
                !text.contains(pan.as_str()),
                "the refusal echoes the number"
            );
        }
    }
    vec![visa, master, amex, discover, short, long]
}

/// Scans the controller's and the terminals' data directories and every log.
fn scan_for_pans(roots: &[PathBuf], planted: &[String]) -> ScanReport {
    scan_paths(roots, planted).unwrap_or_else(|e| panic!("scan: {e:#}"))
}

/// The scan would see a leak: a copy of a real sled file of the controller's transaction
/// store with one PAN written into it (between two bytes that are never text) is flagged, at
/// that offset, and a searched-for number is found; the same file without it is clean.
fn scan_self_check(broker: &Broker, started_ms: u64, planted: &[String]) {
    let sled_file = broker.data_dir().join("transactions").join("db");
    let bytes =
        std::fs::read(&sled_file).unwrap_or_else(|e| panic!("{}: {e}", sled_file.display()));
    assert!(bytes.len() > 4096, "the store is not empty");
    let mut clean = ScanReport::default();
    scan_bytes(&sled_file, &bytes, planted, &mut clean);
    assert!(clean.is_clean(), "{clean}");
    let leak = luhn_number("411111", 16, started_ms);
    // In the middle, between two 0xFF bytes (never part of UTF-8): the neighbouring bytes can
    // then never join the number into a longer run of digits, separators or letters, which
    // would be found at another offset or not at all.
    let middle = bytes.len() / 2;
    let at = middle + 1;
    let mut leaked = bytes[..middle].to_vec();
    leaked.push(0xFF);
    leaked.extend_from_slice(leak.as_bytes());
    leaked.push(0xFF);
    leaked.extend_from_slice(&bytes[middle..]);
    let mut report = ScanReport::default();
    scan_bytes(
        &sled_file,
        &leaked,
        &[leak.clone(), planted[0].clone()],
        &mut report,
    );
    assert!(
        report.findings.iter().any(|f| f.offset == at),
        "a PAN planted in a sled file is not found: {report}"
    );
    assert!(report.exact_hits.iter().any(|h| h.which == 0), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_transactions_are_stored_exactly_once_through_crashes_and_cuts() {
    let started_ms = now_ms();
    let mut broker = broker().await;
    let proxy = Proxy::start(broker.mqtt_addr()).await.expect("proxy");
    let url = proxy.mqtt_url();
    let mut agents = [
        start_agent(&broker, "pay-1", &url),
        start_agent(&broker, "pay-2", &url),
    ];
    let driver_opts = TxDriverOptions {
        count: 12,
        tx_rate: 300.0,
        repeat_probability: 0.05,
        ..TxDriverOptions::default()
    };
    let mut driver =
        TxDriver::start(&txdriver_bin(), &broker, &url, &driver_opts).expect("start the driver");
    for agent in &agents {
        online(broker.api(), agent.id()).await;
    }
    driver
        .wait_for(WAIT, "connected", |s| s.connected == s.terminals)
        .await
        .expect("the driver's terminals connect");

    // The payment applications of the two real terminals.
    let ledger = Arc::new(Mutex::new(AcceptedLedger::default()));
    let stop = CancellationToken::new();
    let apps: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, agent)| {
            let app = PaymentApp::new(agent.id(), agent.local_api(), i, ledger.clone());
            tokio::spawn(app.run(stop.clone()))
        })
        .collect();
    progress(broker.api(), 0.0, PROGRESS, "start").await;

    // Transactions with card numbers, refused while everything else flows.
    let planted = post_pans(&agents[0].local_api(), started_ms).await;

    // The faults, each followed by proof that transactions flow end to end again.
    broker.kill9().await.expect("kill -9 the broker");
    broker.restart().await.expect("restart the broker");
    progress(broker.api(), 0.0, PROGRESS, "broker kill -9").await;

    let from_cut = stored_total(broker.api()).await;
    proxy.sever();
    tokio::time::sleep(Duration::from_millis(800)).await; // the outage lasts a while
    proxy.restore();
    progress(broker.api(), from_cut, PROGRESS, "network cut").await;

    let from_agent = stored_total(broker.api()).await;
    agents[0].kill9().await.expect("kill -9 pay-1");
    agents[0].restart().expect("restart pay-1");
    progress(broker.api(), from_agent, PROGRESS, "agent kill -9").await;

    let from_driver = stored_total(broker.api()).await;
    driver.kill9().await.expect("kill -9 the driver");
    driver.restart().expect("restart the driver");
    progress(broker.api(), from_driver, PROGRESS, "driver kill -9").await;

    let from_stall = stored_total(broker.api()).await;
    proxy.stall();
    tokio::time::sleep(Duration::from_secs(2)).await; // packets vanish for two seconds
    proxy.restore();
    progress(broker.api(), from_stall, PROGRESS, "stalled link").await;

    broker.kill9().await.expect("kill -9 the broker");
    agents[1].kill9().await.expect("kill -9 pay-2");
    broker.restart().await.expect("restart the broker");
    agents[1].restart().expect("restart pay-2");
    progress(broker.api(), 0.0, PROGRESS, "broker and agent kill -9").await;

    proxy.sever();
    broker.kill9().await.expect("kill -9 the broker");
    broker.restart().await.expect("restart the broker");
    proxy.restore();
    progress(broker.api(), 0.0, PROGRESS, "cut and broker kill -9").await;

    let from_last = stored_total(broker.api()).await;
    driver.kill9().await.expect("kill -9 the driver");
    agents[0].kill9().await.expect("kill -9 pay-1");
    driver.restart().expect("restart the driver");
    agents[0].restart().expect("restart pay-1");
    progress(
        broker.api(),
        from_last,
        PROGRESS,
        "driver and agent kill -9",
    )
    .await;

    // Stop the load; every outbox drains.
    stop.cancel();
    let mut app_stats = Vec::new();
    for app in apps {
        let stats: PaymentAppStats = tokio::time::timeout(DRAIN, app)
            .await
            .expect("the payment applications finish their last transaction")
            .expect("payment application task");
        assert!(stats.unexpected.is_empty(), "{stats:?}");
        app_stats.push(stats);
    }
    driver.stop_generating().expect("SIGUSR1 the driver");
    for agent in &agents {
        drained(&agent.local_api(), agent.id()).await;
    }
    let status: DriverStatus = driver
        .wait_for(DRAIN, "drained", DriverStatus::drained)
        .await
        .expect("the driver's outboxes drain");
    assert_eq!(
        (
            status.refused,
            status.repeat_mismatches,
            status.journal_errors
        ),
        (0, 0, 0),
        "{status:?}"
    );

    // What the terminals accepted is exactly what the controller stored.
    let journal = driver.journal().expect("journal");
    assert_eq!(journal.unresolved_count(), 0, "nothing left in doubt");
    let mut accepted = ledger.lock().expect("ledger").clone();
    accepted.merge(&journal.accepted);
    let devices: Vec<String> = agents
        .iter()
        .map(|a| a.id().to_owned())
        .chain((0..driver_opts.count).map(|i| format!("drv-{i:05}")))
        .collect();
    let stored = StoredLedger::fetch(broker.api(), devices.iter().map(String::as_str))
        .await
        .expect("read the store back");
    let result = reconcile(&accepted, &stored);
    eprintln!(
        "transactions: {result}payment apps: {app_stats:?}\nlast driver process: accepted {} \
         repeats {}, in doubt after its predecessor's kill -9: {} stored before, {} not; \
         torn journal lines {}",
        status.accepted_new,
        status.repeats,
        status.resolved_stored,
        status.resolved_new,
        journal.torn
    );
    assert!(result.is_exact(), "{result}");
    assert!(
        accepted.devices().count() == devices.len(),
        "every terminal accepted transactions: {:?}",
        accepted.devices().collect::<Vec<_>>()
    );
    assert!(
        result.accepted > 500,
        "too little load to mean much: {result}"
    );

    // No card number anywhere the run left something: the controller's data directory
    // (transaction store, registry, PKI), the terminals' (outboxes, bundles, configs), the
    // simulated terminals' outbox, the driver's journal, every log.
    driver.terminate().await.expect("stop the driver");
    for agent in &mut agents {
        agent.terminate().await.expect("stop the agent");
    }
    broker.terminate().await.expect("stop the broker");
    let everything = broker
        .data_dir()
        .parent()
        .expect("the data dir is in the test's temp dir")
        .to_owned();
    let report = scan_for_pans(&[everything], &planted);
    eprintln!("PAN scan: {report}");
    assert!(report.is_clean(), "{report}");
    assert!(
        report.files >= 30 && report.bytes > 1 << 20,
        "the scan saw too little: {report}"
    );
    scan_self_check(&broker, started_ms, &planted);
}

#[tokio::test]
async fn a_transaction_accepted_while_offline_survives_a_kill_and_is_delivered() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.mqtt_addr()).await.expect("proxy");
    let mut agent = start_agent(&broker, "off-1", &proxy.mqtt_url());
    online(broker.api(), agent.id()).await;
    let local = agent.local_api();

    // The link is down: accepted transactions cannot be published.
    proxy.sever();
    eventually(WAIT, || async {
        let status = local.status().await?;
        anyhow::ensure!(!status.connected, "still connected: {status:?}");
        Ok(())
    })
    .await;
    let mut txn_ids = Vec::new();
    for i in 1..=5u64 {
        let txn = format!("OFF-{i}");
        let answer = local.post_transaction(&sale(&txn, 100 * i as i64)).await;
        let answer = answer.expect("the local API answers while offline");
        assert_eq!((answer.status, answer.seq()), (201, Some(i)), "{answer:?}");
        txn_ids.push(txn);
    }
    let status = local.status().await.expect("status");
    assert_eq!(
        (status.outbox.depth, status.outbox.last_seq),
        (5, 5),
        "{status:?}"
    );

    // Power loss before anything was published; the link comes back; the terminal reboots.
    agent.kill9().await.expect("kill -9");
    proxy.restore();
    agent.restart().expect("restart");
    drained(&local, agent.id()).await;

    let mut accepted = AcceptedLedger::default();
    for (i, txn) in txn_ids.iter().enumerate() {
        accepted.record(agent.id(), txn, i as u64 + 1);
    }
    let stored = StoredLedger::fetch(broker.api(), [agent.id()])
        .await
        .expect("store");
    let result = reconcile(&accepted, &stored);
    assert!(result.is_exact(), "{result}");
}

#[tokio::test]
async fn repeats_conflicts_and_the_status_endpoint() {
    let broker = broker().await;
    let mut agent = start_agent(&broker, "dup-1", &broker.mqtt_url());
    online(broker.api(), agent.id()).await;
    let local = agent.local_api();

    let status = local.status().await.expect("status");
    assert_eq!(status.device_id, "dup-1");
    assert!(status.connected && !status.locked, "{status:?}");
    assert_eq!((status.outbox.depth, status.outbox.last_seq), (0, 0));
    assert_eq!(status.outbox.last_ack_at_ms, None);

    let first = local
        .post_transaction(&sale("DUP-A", 1250))
        .await
        .expect("post");
    assert_eq!((first.status, first.seq()), (201, Some(1)), "{first:?}");
    assert_eq!(first.body["result"], "stored");
    let again = local
        .post_transaction(&sale("DUP-A", 1250))
        .await
        .expect("post");
    assert_eq!((again.status, again.seq()), (200, Some(1)), "{again:?}");
    assert_eq!(again.body["result"], "duplicate");
    let changed = local
        .post_transaction(&sale("DUP-A", 9999))
        .await
        .expect("post");
    assert_eq!(
        (changed.status, changed.error()),
        (409, Some("txn_id_conflict")),
        "{changed:?}"
    );
    let second = local
        .post_transaction(&sale("DUP-B", 500))
        .await
        .expect("post");
    assert_eq!((second.status, second.seq()), (201, Some(2)), "{second:?}");

    // Not JSON, not JSON's media type: refused, nothing stored.
    let garbage = local
        .request(
            http::Method::POST,
            "/v1/transactions",
            Some("application/json"),
            bytes::Bytes::from_static(b"{not json"),
        )
        .await
        .expect("post");
    assert_eq!(
        (garbage.status, garbage.error()),
        (400, Some("invalid_json"))
    );
    let text = local
        .request(
            http::Method::POST,
            "/v1/transactions",
            Some("text/plain"),
            bytes::Bytes::from(sale("DUP-C", 1).to_string()),
        )
        .await
        .expect("post");
    assert_eq!(text.status, 415, "{text:?}");

    // Acknowledged: the outbox empties and the status says when the last ack came.
    drained(&local, agent.id()).await;
    let status = local.status().await.expect("status");
    assert_eq!(status.outbox.last_seq, 2, "{status:?}");
    assert!(status.outbox.last_ack_at_ms.is_some(), "{status:?}");
    assert_eq!(
        (status.outbox.dead_letters, status.outbox.failed),
        (0, false)
    );

    // The idempotency index survives a restart of the agent.
    agent.terminate().await.expect("SIGTERM");
    agent.restart().expect("restart");
    let after_restart = eventually(WAIT, || async {
        local.post_transaction(&sale("DUP-A", 1250)).await
    })
    .await;
    assert_eq!(
        (after_restart.status, after_restart.seq()),
        (200, Some(1)),
        "{after_restart:?}"
    );

    // The store holds A (with its first content) and B, once each.
    let mut accepted = AcceptedLedger::default();
    accepted.record("dup-1", "DUP-A", 1);
    accepted.record("dup-1", "DUP-B", 2);
    let stored = StoredLedger::fetch(broker.api(), ["dup-1"])
        .await
        .expect("store");
    let result = reconcile(&accepted, &stored);
    assert!(result.is_exact(), "{result}");
    let page = broker
        .api()
        .get("/api/v1/transactions?device=dup-1&order=asc")
        .await
        .expect("list");
    let page: Value = page.json().await.expect("JSON");
    assert_eq!(page["transactions"][0]["amount_minor"], 1250, "{page}");
}
