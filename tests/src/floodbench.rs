//! `fleet-bench flood`: how long a legitimate client waits while a thousand idle or slow
//! clients attack a listener (issue 10, items 2 and 3).
//!
//! 1. `pf-broker serve` (default admission limits).
//! 2. Per listener (admin API, device endpoint, MQTT edge): `--samples` legitimate requests
//!    without any attack (the baseline), then, per attack and per source (all attackers from
//!    127.0.0.2, or each from its own 127.100.x.y), a [`Flood`] of `--attackers` sockets that
//!    reconnect whenever the broker closes them; once it is in place, `--samples` legitimate
//!    requests from 127.0.0.1, one after the other, each on a new connection.
//! 3. Per scenario: the legitimate latency (p50, p90, max), failures, and what the flood
//!    achieved (sockets holding at the end, connections opened, closed by the broker).
//!
//! The legitimate request: `GET /healthz` (admin API), `GET /device/v1/artifacts/<unknown>`
//! with a device certificate (device endpoint, answered 404), TCP + mutual TLS + CONNECT
//! until CONNACK (MQTT edge; each sample with its own certificate, so that the per-identity
//! connect rate limit never applies). Everything runs on this machine: the attackers' TLS
//! handshakes share the CPUs with the broker.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use posfleet_proto::DeviceId;
use posfleet_proto::pki::CertifiedKey;
use tokio::time::Instant;

use crate::bench::start_quiet_broker;
use crate::bins::Binaries;
use crate::eventually::try_eventually;
use crate::flood::{Attack, Flood, FloodOptions, Sources, https_client};
use crate::host::Machine;
use crate::mosquitto::Mosquitto;
use crate::mqtt::{MqttClient, tls_config};

/// Where the single-address floods come from.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Sockets that must hold their attack before the measurement starts.
const HOLDING: usize = 8;

/// A listener of the broker (`Mosquitto`: the peer comparison, with `--mosquitto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Listener {
    Api,
    Device,
    Mqtt,
    #[value(skip)]
    Mosquitto,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Api => "api",
            Listener::Device => "device",
            Listener::Mqtt => "mqtt",
            Listener::Mosquitto => "mosquitto",
        }
    }

    fn is_mqtt(self) -> bool {
        matches!(self, Listener::Mqtt | Listener::Mosquitto)
    }
}

/// An attack, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttackArg {
    Idle,
    TrickleHello,
    StallHello,
    TrickleHeaders,
    TrickleBody,
}

impl From<AttackArg> for Attack {
    fn from(a: AttackArg) -> Self {
        match a {
            AttackArg::Idle => Attack::Idle,
            AttackArg::TrickleHello => Attack::TrickleHello,
            AttackArg::StallHello => Attack::StallAfterHello,
            AttackArg::TrickleHeaders => Attack::TrickleHeaders,
            AttackArg::TrickleBody => Attack::TrickleBody,
        }
    }
}

/// Parameters of `fleet-bench flood`.
#[derive(Debug, Clone, clap::Args)]
pub struct FloodBench {
    /// Attacking sockets per scenario.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub attackers: u32,
    /// Legitimate requests measured per scenario.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub samples: u32,
    /// Listeners to attack.
    #[arg(long, value_delimiter = ',', default_value = "api,device,mqtt")]
    pub listeners: Vec<Listener>,
    /// Attacks (the HTTP ones are skipped for the MQTT edge).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,stall-hello,trickle-headers"
    )]
    pub attacks: Vec<AttackArg>,
    /// Pause between two trickled bytes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = posfleet_runtime::value::parse_duration)]
    pub trickle: Duration,
    /// Pause before an attacking socket the broker closed connects again.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = posfleet_runtime::value::parse_duration)]
    pub reconnect_pause: Duration,
    /// Bound on each legitimate request, and on the wait for a flood to be in place.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = posfleet_runtime::value::parse_duration)]
    pub timeout: Duration,
    /// Also run the MQTT scenarios against this Mosquitto binary (peer comparison), set up
    /// from deploy/external-brokers/ with the fleet PKI (see `posfleet_tests::mosquitto`).
    #[arg(long, value_name = "PATH")]
    pub mosquitto: Option<PathBuf>,
}

/// One measured scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub listener: Listener,
    /// `None`: the baseline without attack.
    pub attack: Option<(Attack, Sources)>,
    /// Latencies of the answered requests, sorted.
    pub latencies: Vec<Duration>,
    /// Requests that were not answered within the timeout (or failed).
    pub failures: Vec<String>,
    /// Attacking sockets holding their attack when the measurement ended.
    pub holding: usize,
    /// Connections the attackers opened, and how many of them the broker closed.
    pub connected: u64,
    pub closed_by_server: u64,
}

impl Scenario {
    fn quantile(&self, q: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let n = self.latencies.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.latencies[rank - 1])
    }
}

/// What `fleet-bench flood` prints.
#[derive(Debug, Clone)]
pub struct FloodReport {
    pub machine: Machine,
    pub params: FloodBench,
    pub scenarios: Vec<Scenario>,
}

/// Runs the benchmark (see the module docs); `progress` gets a line per step.
pub async fn run_flood(
    bins: &Binaries,
    params: FloodBench,
    progress: impl Fn(&str),
) -> anyhow::Result<FloodReport> {
    let broker = start_quiet_broker(bins, Duration::from_secs(60)).await?;
    let ca_pem = std::fs::read(broker.pki().ca_cert()).context("ca.crt")?;
    let ca = broker.pki().load_ca().context("fleet CA")?;
    let issue =
        |id: String| -> anyhow::Result<CertifiedKey> { Ok(ca.issue_device(&DeviceId::new(id)?)?) };
    let mut legit = Legit {
        api_url: format!("{}/healthz", broker.client_file().api_url),
        device_url: format!(
            "https://{}/device/v1/artifacts/{}",
            broker.device_addr(),
            "0".repeat(64)
        ),
        mqtt: broker.mqtt_addr(),
        mosquitto: None,
        api: https_client(&ca_pem, None, params.timeout)?,
        device: https_client(&ca_pem, Some(&issue("bench-legit".into())?), params.timeout)?,
        terminals: (0..params.samples)
            .map(|i| {
                let id = format!("bench-legit-{i}");
                let identity = issue(id.clone())?;
                Ok((id, tls_config(&ca_pem, Some(&identity))?))
            })
            .collect::<anyhow::Result<_>>()?,
        timeout: params.timeout,
    };
    // The HTTP attacks need a handshake: on the device endpoint with a (stolen) certificate.
    let stolen = issue("bench-stolen".into())?;
    let mut listeners = params.listeners.clone();
    let _mosquitto = match &params.mosquitto {
        Some(program) => {
            let mosquitto = Mosquitto::start(
                program,
                &broker.pki(),
                &broker.scratch_dir("mosquitto")?,
                &broker.log_dir(),
                None,
                params.timeout,
            )
            .await?;
            legit.mosquitto = Some(mosquitto.addr());
            listeners.push(Listener::Mosquitto);
            Some(mosquitto)
        }
        None => None,
    };
    let mut scenarios = Vec::new();
    let mut many_first = 0;
    for listener in listeners {
        let target = match listener {
            Listener::Api => broker.api_addr(),
            Listener::Device => broker.device_addr(),
            Listener::Mqtt => broker.mqtt_addr(),
            Listener::Mosquitto => legit.mosquitto.unwrap_or(broker.mqtt_addr()),
        };
        let mut tls =
            (*tls_config(&ca_pem, (listener == Listener::Device).then_some(&stolen))?).clone();
        tls.alpn_protocols = vec![if listener.is_mqtt() {
            b"mqtt".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let tls = Arc::new(tls);
        progress(&format!("{}: baseline", listener.name()));
        scenarios.push(legit.measure(listener, None, None, params.samples).await);
        for &attack in &params.attacks {
            let attack = Attack::from(attack);
            if listener.is_mqtt() && attack.is_http() {
                continue;
            }
            for sources in [Sources::One(ATTACKER), Sources::Many { first: many_first }] {
                many_first += params.attackers as usize;
                progress(&format!(
                    "{}: {} x {} from {}",
                    listener.name(),
                    params.attackers,
                    attack.name(),
                    sources.describe()
                ));
                let mut opts = FloodOptions::new(
                    target,
                    params.attackers as usize,
                    sources,
                    attack,
                    Arc::clone(&tls),
                );
                opts.trickle = params.trickle;
                opts.reconnect_pause = params.reconnect_pause;
                if listener == Listener::Device {
                    opts.request = "POST /device/v1/renew".to_owned();
                }
                let flood = Flood::start(opts)?;
                let placed =
                    try_eventually(params.timeout, || async { flood.fully_in_place(HOLDING) })
                        .await;
                let mut scenario = legit
                    .measure(
                        listener,
                        Some((attack, sources)),
                        Some(&flood),
                        params.samples,
                    )
                    .await;
                if let Err(e) = placed {
                    // Measured anyway; the report says the flood was not complete.
                    scenario
                        .failures
                        .push(format!("the flood was not fully in place: {e:#}"));
                }
                flood.stop().await;
                scenarios.push(scenario);
            }
        }
    }
    Ok(FloodReport {
        machine: Machine::describe(),
        params,
        scenarios,
    })
}

/// The legitimate clients.
struct Legit {
    api_url: String,
    device_url: String,
    mqtt: SocketAddr,
    /// The Mosquitto of the peer comparison.
    mosquitto: Option<SocketAddr>,
    api: reqwest::Client,
    device: reqwest::Client,
    /// One MQTT identity per sample.
    terminals: Vec<(String, Arc<rustls::ClientConfig>)>,
    timeout: Duration,
}

impl Legit {
    async fn measure(
        &self,
        listener: Listener,
        attack: Option<(Attack, Sources)>,
        flood: Option<&Flood>,
        samples: u32,
    ) -> Scenario {
        let mut latencies = Vec::new();
        let mut failures = Vec::new();
        for i in 0..samples as usize {
            let started = Instant::now();
            let outcome = match listener {
                Listener::Api => get(&self.api, &self.api_url, 200).await,
                Listener::Device => get(&self.device, &self.device_url, 404).await,
                Listener::Mqtt => self.connack(self.mqtt, i).await,
                Listener::Mosquitto => match self.mosquitto {
                    Some(addr) => self.connack(addr, i).await,
                    None => Err(anyhow::anyhow!("no Mosquitto")),
                },
            };
            match outcome {
                Ok(()) => latencies.push(started.elapsed()),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        latencies.sort();
        Scenario {
            listener,
            attack,
            latencies,
            failures,
            holding: flood.map_or(0, Flood::holding),
            connected: flood.map_or(0, Flood::connected),
            closed_by_server: flood.map_or(0, Flood::closed_by_server),
        }
    }

    async fn connack(&self, addr: SocketAddr, i: usize) -> anyhow::Result<()> {
        let (id, tls) = &self.terminals[i % self.terminals.len()];
        let client =
            tokio::time::timeout(self.timeout, MqttClient::connect(addr, id, Arc::clone(tls)))
                .await
                .map_err(|_| anyhow::anyhow!("no CONNACK within {:?}", self.timeout))??
                .accepted()?;
        client.disconnect().await
    }
}

async fn get(client: &reqwest::Client, url: &str, status: u16) -> anyhow::Result<()> {
    let response = client.get(url).send().await?;
    anyhow::ensure!(
        response.status().as_u16() == status,
        "GET {url}: {} (expected {status})",
        response.status()
    );
    response.bytes().await?;
    Ok(())
}

impl fmt::Display for FloodReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        writeln!(f, "fleet-bench flood")?;
        writeln!(f, "  machine      {}", self.machine)?;
        writeln!(
            f,
            "  attackers    {} sockets per scenario, trickle {:?}, reconnect pause {:?}; {} legitimate requests per scenario from 127.0.0.1, each on a new connection",
            p.attackers, p.trickle, p.reconnect_pause, p.samples
        )?;
        writeln!(
            f,
            "  {:<7} {:<26} {:<32} {:>9} {:>9} {:>9} {:>6} {:>8} {:>9} {:>9}",
            "target",
            "attack",
            "attackers from",
            "p50 ms",
            "p90 ms",
            "max ms",
            "fail",
            "holding",
            "opened",
            "closed"
        )?;
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
        };
        for s in &self.scenarios {
            let (attack, sources) = match s.attack {
                Some((attack, sources)) => (attack.name().to_owned(), sources.describe()),
                None => ("(none: baseline)".to_owned(), "-".to_owned()),
            };
            let target = s.listener.name();
            writeln!(
                f,
                "  {:<7} {:<26} {:<32} {:>9} {:>9} {:>9} {:>6} {:>8} {:>9} {:>9}",
                target,
                attack,
                sources,
                ms(s.quantile(0.5)),
                ms(s.quantile(0.9)),
                ms(s.quantile(1.0)),
                s.failures.len(),
                s.holding,
                s.connected,
                s.closed_by_server
            )?;
        }
        for s in self.scenarios.iter().filter(|s| !s.failures.is_empty()) {
            writeln!(
                f,
                "  failures of {:?} {:?}:",
                s.listener,
                s.attack.map(|a| a.0)
            )?;
            for failure in s.failures.iter().take(3) {
                writeln!(f, "    {failure}")?;
            }
        }
        Ok(())
    }
}
