//! Connection admission (issue 10, items 2 and 3): a thousand idle or slow clients, from one
//! address or from a thousand, do not keep a legitimate client out of the admin API, the
//! device download endpoint or the MQTT edge of a real broker process.
//!
//! Each flood keeps its pressure up (a socket the broker closes connects again), the test
//! waits until the flood is in place (every socket connected at least once, some holding),
//! then a legitimate client from 127.0.0.1 must be answered. Its bound only matters if it
//! hangs: how long it actually takes under attack is `fleet-bench flood`'s figure.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use posfleet_proto::DeviceId;
use posfleet_proto::pki::CertifiedKey;
use posfleet_tests::Broker;
use posfleet_tests::eventually::try_eventually;
use posfleet_tests::flood::{Attack, Flood, FloodOptions, Sources, https_client};
use posfleet_tests::host::raise_nofile_limit;
use posfleet_tests::mqtt::{MqttClient, tls_config};
use reqwest::StatusCode;

use crate::support::{WAIT, agent, broker, online};

/// Attacking sockets per flood.
const ATTACKERS: usize = 1000;
/// Where the single-address floods come from (the legitimate clients use 127.0.0.1).
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Bound on one legitimate request: only a hang reaches it.
const ANSWER: Duration = Duration::from_secs(30);
/// Sockets that must hold their attack before the legitimate client goes.
const HOLDING: usize = 8;
const ADMISSION_REFUSALS: &str = "posfleet_admission_refusals_total";

/// A broker (started after raising the open-files limit, which it inherits) and its CA.
struct Target {
    broker: Broker,
    ca_pem: Vec<u8>,
}

impl Target {
    async fn start() -> Self {
        let limit = raise_nofile_limit().expect("open-files limit");
        assert!(
            limit.soft.is_none_or(|soft| soft >= 4 * ATTACKERS as u64),
            "the open-files limit is too low for {ATTACKERS} attacking sockets: {limit:?}"
        );
        let broker = broker().await;
        let ca_pem = std::fs::read(broker.pki().ca_cert()).expect("ca.crt");
        Self { broker, ca_pem }
    }

    fn device_identity(&self, id: &str) -> CertifiedKey {
        let ca = self.broker.pki().load_ca().expect("fleet CA");
        ca.issue_device(&DeviceId::new(id).expect("device id"))
            .expect("device certificate")
    }

    fn tls(&self, identity: Option<&CertifiedKey>) -> Arc<rustls::ClientConfig> {
        let mut tls = (*tls_config(&self.ca_pem, identity).expect("client TLS")).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(tls)
    }

    /// Starts a flood and waits until it is in place (some sockets hold their attack; on a
    /// broker without admission control the others wait in its listen backlog).
    async fn flood(&self, opts: FloodOptions) -> Flood {
        let what = format!(
            "{} x {} from {} against {}",
            opts.sockets,
            opts.attack.name(),
            opts.sources.describe(),
            opts.target
        );
        let flood = Flood::start(opts).expect("flood");
        try_eventually(WAIT, || async { flood.in_place(HOLDING) })
            .await
            .unwrap_or_else(|e| panic!("the flood did not get in place: {what}: {e:#}"));
        flood
    }

    /// The admission refusals of `site` so far, whatever the reason (read through the admin
    /// API, so under an API flood this is one more legitimate request).
    async fn refusals(&self, site: &str) -> anyhow::Result<f64> {
        let scrape = self.broker.api().metrics().await?;
        Ok(scrape
            .samples()
            .iter()
            .filter(|s| {
                s.name == ADMISSION_REFUSALS
                    && s.labels.get("site").map(String::as_str) == Some(site)
            })
            .map(|s| s.value)
            .sum())
    }

    /// Records a failure unless the admission refusals of `site` grew past `before`.
    async fn refused_since(&self, site: &str, before: f64, what: &str, failures: &mut Vec<String>) {
        match self.refusals(site).await {
            Ok(now) if now > before => {}
            outcome => failures.push(format!(
                "no {site} admission refusal counted under {what}: {outcome:?}"
            )),
        }
    }
}

/// GET `url` as a legitimate client; the status, or why there was none.
async fn legit_get(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<StatusCode> {
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.with_context(|| format!("GET {url}"))?;
    Ok(response.status())
}

/// Fails with every failed case (each case is reported, not just the first).
fn report(failures: &[String]) {
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_under_a_thousand_slow_clients_from_one_address() {
    let target = Target::start().await;
    let api_url = target.broker.client_file().api_url.clone();
    let token =
        std::fs::read_to_string(target.broker.data_dir().join("admin.token")).expect("admin token");
    let client = https_client(&target.ca_pem, None, ANSWER).expect("client");
    let mut failures = Vec::new();
    for attack in Attack::ALL {
        let mut opts = FloodOptions::new(
            target.broker.api_addr(),
            ATTACKERS,
            Sources::One(ATTACKER),
            attack,
            target.tls(None),
        );
        opts.request = "POST /api/v1/auth/login".to_owned();
        let before = target.refusals("api").await.unwrap_or(0.0);
        let flood = target.flood(opts).await;
        for path in ["/healthz", "/api/v1/devices"] {
            match legit_get(&client, &format!("{api_url}{path}"), Some(token.trim())).await {
                Ok(StatusCode::OK) => {}
                outcome => failures.push(format!(
                    "the admin API did not answer GET {path} under {ATTACKERS} x {} from \
                     {ATTACKER}: {outcome:?}",
                    attack.name()
                )),
            }
        }
        // The broker refused the attacker's sockets beyond its per-address caps.
        target
            .refused_since("api", before, attack.name(), &mut failures)
            .await;
        flood.stop().await;
    }
    report(&failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_endpoint_answers_under_a_thousand_slow_clients_from_one_address() {
    let target = Target::start().await;
    let addr = target.broker.device_addr();
    let legit = target.device_identity("pos-legit");
    // The HTTP attacks need a handshake, so the attacker holds a (stolen) device certificate.
    let stolen = target.device_identity("pos-stolen");
    let client = https_client(&target.ca_pem, Some(&legit), ANSWER).expect("client");
    let url = format!("https://{addr}/device/v1/artifacts/{}", "0".repeat(64));
    let mut failures = Vec::new();
    for attack in Attack::ALL {
        let mut opts = FloodOptions::new(
            addr,
            ATTACKERS,
            Sources::One(ATTACKER),
            attack,
            target.tls(Some(&stolen)),
        );
        opts.request = "POST /device/v1/renew".to_owned();
        let before = target.refusals("device").await.unwrap_or(0.0);
        let flood = target.flood(opts).await;
        match legit_get(&client, &url, None).await {
            // An unknown artifact: answered.
            Ok(StatusCode::NOT_FOUND) => {}
            outcome => failures.push(format!(
                "the device endpoint did not answer under {ATTACKERS} x {} from {ATTACKER}: \
                 {outcome:?}",
                attack.name()
            )),
        }
        target
            .refused_since("device", before, attack.name(), &mut failures)
            .await;
        flood.stop().await;
    }
    report(&failures);
}

/// 1000 idle, trickled-ClientHello and stalled-after-ClientHello sockets at once.
async fn handshake_floods(target: &Target, sources: Sources) -> Vec<Flood> {
    let addr = target.broker.mqtt_addr();
    let mut floods = Vec::new();
    let attacks = [Attack::Idle, Attack::TrickleHello, Attack::StallAfterHello];
    for (i, attack) in attacks.into_iter().enumerate() {
        let share = ATTACKERS / attacks.len() + usize::from(i < ATTACKERS % attacks.len());
        let mut tls = (*tls_config(&target.ca_pem, None).expect("client TLS")).clone();
        tls.alpn_protocols = vec![b"mqtt".to_vec()];
        // Disjoint address ranges when each socket has its own.
        let sources = match sources {
            Sources::Many { .. } => Sources::Many { first: i * share },
            one => one,
        };
        let opts = FloodOptions::new(addr, share, sources, attack, Arc::new(tls));
        floods.push(target.flood(opts).await);
    }
    floods
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_its_connack_under_a_thousand_idle_or_slow_handshaking_sockets() {
    let target = Target::start().await;
    let identity = target.device_identity("pos-late");
    let tls = tls_config(&target.ca_pem, Some(&identity)).expect("client TLS");
    let mut failures = Vec::new();
    for sources in [Sources::One(ATTACKER), Sources::Many { first: 0 }] {
        let floods = handshake_floods(&target, sources).await;
        // One attempt, bounded by ANSWER as a whole (not by the MQTT client's shorter
        // default connection timeout, which once cut a slow but answered attempt short).
        let started = std::time::Instant::now();
        let outcome = MqttClient::connect_within(
            target.broker.mqtt_addr(),
            "pos-late",
            tls.clone(),
            None,
            ANSWER,
        )
        .await
        .and_then(|connect| connect.accepted())
        .with_context(|| format!("after {:?}", started.elapsed()));
        match outcome {
            Ok(client) => {
                client.disconnect().await.expect("disconnect");
                // A real agent process comes online too while the sockets are held.
                let id = match sources {
                    Sources::One(_) => "pos-agent-one",
                    Sources::Many { .. } => "pos-agent-many",
                };
                let _agent = agent(&target.broker, id);
                online(target.broker.api(), id).await;
            }
            Err(e) => failures.push(format!(
                "a terminal got no CONNACK under {ATTACKERS} idle or slow-handshaking sockets \
                 from {}: {e:#}",
                sources.describe()
            )),
        }
        for flood in floods {
            flood.stop().await;
        }
    }
    // The single-address flood went beyond the per-address cap of pending connections.
    target
        .refused_since("mqtt", 0.0, "the single-address flood", &mut failures)
        .await;
    report(&failures);
}
