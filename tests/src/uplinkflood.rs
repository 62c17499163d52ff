//! `fleet-bench uplink-flood`: one terminal publishing QoS 1 telemetry as fast as it can
//! while a simulated fleet sends its heartbeats (issue 11, item 6).
//!
//! 1. `pf-broker serve` with the fleet's per-address caps (`crate::bench::start_fleet_broker`),
//!    the heartbeat observer of `fleet-bench versus` (a controller-certificate client
//!    subscribed to `posfleet/v1/d/+/up/hb`, which records each heartbeat's delay from the
//!    terminal's `sent_at_ms`), and `--terminals` simulated terminals (`pf-agent simulate`).
//! 2. A baseline window without the flood, then the flood window: one more terminal (a device
//!    certificate from the broker's PKI, rumqttc, in-flight window 100) publishing telemetry
//!    at QoS 1 without pause, reconnecting after 200 ms whenever the edge closes it.
//! 3. Printed: the other terminals' heartbeat delay (p50 / p99 / max) in both windows, the
//!    flooder's acknowledged uplinks per second and reconnects, and the broker's counters
//!    (`posfleet_edge_uplinks_throttled_total`, `posfleet_edge_uplinks_refused_total{reason}`,
//!    `posfleet_edge_controller_lag_bytes`) scraped before and after the flood. The target
//!    (issue 11): others' heartbeat p99 ≤ 1 s during the flood.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use posfleet_proto::{Channel, DeviceId, Topic, now_ms, pb};
use posfleet_runtime::value::parse_duration;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio_util::sync::CancellationToken;

use crate::bench::start_fleet_broker;
use crate::bins::Binaries;
use crate::mqtt::tls_config;
use crate::scrape::Scrape;
use crate::versusbench::Delays;
use crate::versusbench::fleet::{Fleet, FleetSpec};
use crate::versusbench::observer::Observer;

/// The flooding terminal's id.
const FLOODER: &str = "bench-flooder";
/// The observer's controller name.
const OBSERVER: &str = "bench";
/// Pause before the flooder reconnects after the edge closed it (a terminal's back-off).
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// Parameters of `fleet-bench uplink-flood`.
#[derive(Debug, Clone, clap::Args)]
pub struct UplinkFloodBench {
    /// Simulated terminals heartbeating beside the flooder.
    #[arg(long, default_value_t = 1_000)]
    pub terminals: usize,
    /// Heartbeat interval of the simulated terminals.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Length of the flood window (the baseline window is a third of it).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Bound on each wait (broker start, all terminals connected).
    #[arg(long, value_name = "DURATION", default_value = "180s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// The broker's uplink counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub throttled: f64,
    pub refused: BTreeMap<String, f64>,
    pub lag_bytes: f64,
}

impl Counters {
    fn from_scrape(scrape: &Scrape) -> Self {
        Self {
            throttled: scrape.sum("posfleet_edge_uplinks_throttled_total"),
            refused: scrape.by_label("posfleet_edge_uplinks_refused_total", "reason"),
            lag_bytes: scrape.sum("posfleet_edge_controller_lag_bytes"),
        }
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "throttled {}", self.throttled)?;
        if self.refused.is_empty() {
            write!(f, ", refused 0")?;
        }
        for (reason, n) in &self.refused {
            write!(f, ", refused{{{reason}}} {n}")?;
        }
        write!(f, ", controller lag {} bytes", self.lag_bytes)
    }
}

/// What `fleet-bench uplink-flood` measured.
#[derive(Debug, Clone)]
pub struct UplinkFloodReport {
    pub terminals: usize,
    pub baseline: Delays,
    pub flood: Delays,
    pub flood_wall: Duration,
    /// Uplinks of the flooder the edge acknowledged during the flood.
    pub accepted: u64,
    /// Times the edge closed the flooder's connection.
    pub reconnects: u64,
    pub before: Counters,
    pub after: Counters,
}

impl fmt::Display for UplinkFloodReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.flood_wall.as_secs_f64().max(f64::EPSILON);
        writeln!(
            f,
            "uplink flood: 1 terminal publishing QoS 1 as fast as it can, {} others heartbeating",
            self.terminals
        )?;
        writeln!(f, "  others' heartbeat delay, no flood: {}", self.baseline)?;
        writeln!(f, "  others' heartbeat delay, flood:    {}", self.flood)?;
        let p99 = self
            .flood
            .p99_ms
            .map_or("-".to_owned(), |p| format!("{p} ms"));
        writeln!(f, "  target p99 ≤ 1000 ms during the flood: {p99}")?;
        writeln!(
            f,
            "  flooder: {} uplinks acknowledged in {:.1} s ({:.1}/s), {} reconnects",
            self.accepted,
            secs,
            self.accepted as f64 / secs,
            self.reconnects
        )?;
        writeln!(f, "  broker before: {}", self.before)?;
        write!(f, "  broker after:  {}", self.after)
    }
}

/// Runs the benchmark.
pub async fn run_uplink_flood(
    bins: &Binaries,
    params: UplinkFloodBench,
    progress: impl Fn(&str),
) -> anyhow::Result<UplinkFloodReport> {
    let timeout = params.timeout;
    let broker = start_fleet_broker(bins, timeout).await?;
    let addr = broker.mqtt_addr();
    let ca_pem = std::fs::read(broker.pki().ca_cert()).context("ca.crt")?;
    let ca = broker.pki().load_ca().context("fleet CA")?;
    let observer_tls = tls_config(&ca_pem, Some(&ca.issue_controller(OBSERVER)?))?;
    let observer = Observer::start(addr, &format!("controller:{OBSERVER}"), observer_tls);
    observer.subscribed(timeout).await?;

    let spec = FleetSpec {
        terminals: params.terminals,
        processes: params
            .terminals
            .div_ceil(crate::versusbench::TERMINALS_PER_PROCESS)
            .max(1),
        heartbeat_interval: params.heartbeat_interval,
        telemetry_interval: Duration::from_secs(60),
        connect_rate: 1_000_000,
    };
    let mut fleet = Fleet::start(&broker, &broker.mqtt_url(), &spec)?;
    let wait = fleet.wait_all_connected(0, timeout).await?;
    if wait.all_connected_at_ms.is_none() {
        bail!(
            "only {} of {} terminals connected within {timeout:?}",
            wait.max_connected,
            params.terminals
        );
    }
    progress(&format!("{} terminals connected", params.terminals));

    // Baseline.
    let baseline_start = now_ms();
    tokio::time::sleep(params.duration / 3).await;
    let baseline = Delays::from_unsorted(
        observer
            .received_between(baseline_start, now_ms())
            .iter()
            .map(|s| s.delay_ms())
            .collect(),
    );
    progress(&format!("baseline: {baseline}"));

    // Flood.
    let before = Counters::from_scrape(&broker.api().metrics().await?);
    let flooder_tls = tls_config(&ca_pem, Some(&ca.issue_device(&DeviceId::new(FLOODER)?)?))?;
    let mut options = MqttOptions::new(FLOODER, addr.ip().to_string(), addr.port());
    options
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            flooder_tls,
        )))
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(
            posfleet_proto::MAX_PACKET_SIZE,
            posfleet_proto::MAX_PACKET_SIZE,
        );
    let accepted = Arc::new(AtomicU64::new(0));
    let reconnects = Arc::new(AtomicU64::new(0));
    let cancel = CancellationToken::new();
    let flood_start = now_ms();
    let t0 = tokio::time::Instant::now();
    let flooder = tokio::spawn(flood(
        options,
        Arc::clone(&accepted),
        Arc::clone(&reconnects),
        cancel.clone(),
    ));
    tokio::time::sleep(params.duration).await;
    cancel.cancel();
    let flood_wall = t0.elapsed();
    let flood_end = now_ms();
    let _ = flooder.await;
    let accepted = accepted.load(Ordering::Relaxed);
    let reconnects = reconnects.load(Ordering::Relaxed);
    let after = Counters::from_scrape(&broker.api().metrics().await?);
    // Heartbeats made during the flood (late ones still arriving are waited for briefly).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let flood_delays = Delays::from_unsorted(
        observer
            .sent_between(flood_start, flood_end)
            .iter()
            .map(|s| s.delay_ms())
            .collect(),
    );
    progress(&format!("flood: {flood_delays}, {accepted} acknowledged"));

    fleet.stop(Duration::from_secs(30)).await;
    observer.stop().await;
    drop(broker);
    Ok(UplinkFloodReport {
        terminals: params.terminals,
        baseline,
        flood: flood_delays,
        flood_wall,
        accepted,
        reconnects,
        before,
        after,
    })
}

/// The flooding terminal: telemetry at QoS 1 without pause until `cancel`.
async fn flood(
    options: MqttOptions,
    accepted: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let topic = Topic::for_device(
        &DeviceId::new(FLOODER).expect("a valid device id"),
        Channel::Telemetry,
    )
    .to_string();
    let payload = posfleet_proto::encode(&pb::Telemetry::default()).unwrap_or_default();
    let feeder = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    sent = client.publish(topic.as_str(), QoS::AtLeastOnce, false, payload.clone()) => {
                        if sent.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    loop {
        let polled = tokio::select! {
            () = cancel.cancelled() => break,
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(RECONNECT_PAUSE) => {}
                }
            }
        }
    }
    feeder.abort();
}
