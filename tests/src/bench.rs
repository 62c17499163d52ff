//! `fleet-bench connect`: how many mTLS terminals one broker takes, how fast, at what memory
//! cost, at what ingest rate, and how fast they all come back after a broker crash.
//!
//! 1. `pf-broker serve` on a temp data dir (logs at `warn`, so logging does not dominate);
//!    its resident memory is read once the controller is attached.
//! 2. `pf-agent simulate --count N` as a separate process (so the broker's memory is measured
//!    alone) with a very high connect rate; `/metrics` is polled until the edge holds N
//!    terminal connections and the controller counts N devices online.
//! 3. Broker memory again → bytes per connected terminal.
//! 4. Ingest counters over a window → messages per second.
//! 5. SIGKILL the broker, restart it on the same data dir and ports, time until all N are
//!    connected and online again (the agents reconnect with their own jittered backoff).
//! 6. SIGTERM the simulator and the broker.
//!
//! Everything is on 127.0.0.1 and every wait is bounded by `timeout`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;

use crate::api::Api;
use crate::bins::Binaries;
use crate::broker::{Broker, BrokerOptions};
use crate::host::{Machine, NofileLimit, cpu_seconds, rss_bytes};
use crate::process::{Process, TAIL_LINES};
use crate::scrape::Scrape;

/// How often `/metrics` is polled while waiting.
const POLL: Duration = Duration::from_millis(100);

/// Messages per second by channel (`hb`, `tm`, `presence`, ...).
pub type IngestRates = BTreeMap<String, f64>;

/// Parameters of `fleet-bench connect`.
#[derive(Debug, Clone)]
pub struct ConnectBench {
    /// Simulated terminals.
    pub terminals: usize,
    pub heartbeat_interval: Duration,
    pub telemetry_interval: Duration,
    /// Length of the ingest-rate window.
    pub duration: Duration,
    /// Terminals the simulator starts per second.
    pub connect_rate: u32,
    /// Transactions per terminal per minute (0: idle terminals, heartbeats and telemetry only).
    pub tx_rate: f64,
    /// Bound on each wait (all connected, all back).
    pub timeout: Duration,
}

/// When the terminals were seen connected, relative to a start instant.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// First terminal connection seen at the edge.
    pub first_connected: Option<Duration>,
    /// Edge holds N terminal connections.
    pub all_connected: Option<Duration>,
    /// The controller counts N devices online.
    pub all_online: Option<Duration>,
    /// Most terminal connections seen (if not all arrived).
    pub max_connected: u64,
    /// Edge refusals by reason during the wait.
    pub refusals: BTreeMap<String, f64>,
}

/// Everything `fleet-bench connect` measured.
#[derive(Debug, Clone)]
pub struct ConnectReport {
    pub params: ConnectBench,
    pub machine: Machine,
    pub nofile: NofileLimit,
    pub broker_rss_idle: u64,
    pub connect: Timeline,
    pub broker_rss_connected: u64,
    pub broker_rss_steady: u64,
    pub simulator_rss: u64,
    /// Messages ingested per second over the window, by channel.
    pub ingest: IngestRates,
    /// Messages the edge accepted from terminals per second over the window, by channel.
    pub edge_publishes: IngestRates,
    /// Messages the controller rejected per second over the window, by reason.
    pub rejected: IngestRates,
    /// Heartbeat delay at the end of the window.
    pub delay: HeartbeatDelay,
    /// CPU used from the simulator's start until all terminals were online.
    pub connect_cpu: CpuSpan,
    /// CPU used during the ingest window.
    pub window_cpu: CpuSpan,
    /// Actual window length.
    pub window: Duration,
    /// SIGKILL → process restarted and ready.
    pub restart_ready: Duration,
    /// Relative to the restart of the broker process.
    pub reconnect: Timeline,
    /// Whether the simulator and the broker stopped gracefully at the end.
    pub clean_stop: bool,
}

/// Runs the benchmark; `progress` receives one line per phase.
pub async fn run_connect(
    bins: &Binaries,
    params: ConnectBench,
    nofile: NofileLimit,
    progress: impl Fn(&str),
) -> anyhow::Result<ConnectReport> {
    let machine = Machine::describe();
    progress(&format!("machine: {machine}"));
    let mut broker = start_fleet_broker(bins, params.timeout).await?;
    let broker_rss_idle = rss_bytes(broker.process()?.pid())?;
    progress(&format!(
        "broker ready (pid {}), RSS {}",
        broker.process()?.pid(),
        mib(broker_rss_idle)
    ));

    let broker_cpu_start = cpu_seconds(broker.process()?.pid())?;
    let mut simulator = start_simulator(&broker, &params, &[])?;
    let started = Instant::now();
    progress(&format!(
        "simulator started: {} terminals at up to {}/s",
        params.terminals, params.connect_rate
    ));
    let connect = wait_for_fleet(
        broker.api(),
        params.terminals,
        started,
        params.timeout,
        &mut simulator,
    )
    .await?;
    progress(&format!("connect phase: {connect}"));
    if connect.all_online.is_none() {
        bail!(
            "not all terminals came online within {:?}: {connect}\n{}\n{}",
            params.timeout,
            broker.log_tail(),
            simulator.stderr_tail(TAIL_LINES)
        );
    }
    let broker_rss_connected = rss_bytes(broker.process()?.pid())?;
    let (broker_cpu, simulator_cpu) = cpu_now(&broker, &simulator)?;
    let connect_cpu = CpuSpan {
        broker: broker_cpu - broker_cpu_start,
        simulator: simulator_cpu,
        wall: started.elapsed(),
    };

    progress(&format!("measuring ingest for {:?}", params.duration));
    let cpu_before = cpu_now(&broker, &simulator)?;
    let (ingest, edge_publishes, rejected, window) =
        window_rates(broker.api(), params.duration).await?;
    let cpu_after = cpu_now(&broker, &simulator)?;
    let delay = heartbeat_delay(broker.api(), params.terminals).await?;
    let window_cpu = CpuSpan {
        broker: cpu_after.0 - cpu_before.0,
        simulator: cpu_after.1 - cpu_before.1,
        wall: window,
    };
    let broker_rss_steady = rss_bytes(broker.process()?.pid())?;
    let simulator_rss = rss_bytes(simulator.pid())?;
    progress(&format!(
        "ingest: {ingest:.1?} messages/s (edge accepted {edge_publishes:.1?}, rejected {rejected:.1?}); heartbeat delay {delay}; broker RSS {}; CPU {window_cpu}",
        mib(broker_rss_steady)
    ));

    progress("SIGKILL broker, restart on the same data dir");
    let killed = Instant::now();
    broker.kill9().await?;
    broker.restart().await?;
    let restart_ready = killed.elapsed();
    let restarted = Instant::now();
    let reconnect = wait_for_fleet(
        broker.api(),
        params.terminals,
        restarted,
        params.timeout,
        &mut simulator,
    )
    .await?;
    progress(&format!("reconnect phase: {reconnect}"));

    progress("stopping");
    let sim_stop = simulator.terminate(Duration::from_secs(30)).await;
    let broker_stop = broker.terminate().await;
    let clean_stop =
        matches!(&sim_stop, Ok(s) if s.success()) && matches!(&broker_stop, Ok(s) if s.success());
    Ok(ConnectReport {
        params,
        machine,
        nofile,
        broker_rss_idle,
        connect,
        broker_rss_connected,
        broker_rss_steady,
        simulator_rss,
        ingest,
        edge_publishes,
        rejected,
        delay,
        connect_cpu,
        window_cpu,
        window,
        restart_ready,
        reconnect,
        clean_stop,
    })
}

/// A broker for benchmarks: logs at `warn` (logging must not dominate), `timeout` to start,
/// with the edge's default admission limits (`fleet-bench flood` measures them).
pub(crate) async fn start_quiet_broker(
    bins: &Binaries,
    timeout: Duration,
) -> anyhow::Result<Broker> {
    start_bench_broker(bins, timeout, Vec::new()).await
}

/// The edge's per-address admission caps for a fleet simulated from one address.
///
/// Every simulated terminal connects from 127.0.0.1, while a real fleet comes from many
/// addresses. The edge's defaults (`AdmissionLimits::mqtt()` in
/// broker/src/admission/mod.rs: 10,000 open and 256 pending connections per address) would
/// then refuse the 10,001st connection and admit a storm 256 handshakes at a time, which
/// measures the single address rather than the broker. Benchmarks of fleets therefore raise
/// both per-address caps to just below the total (20,000) that the default keeps; Mosquitto
/// has no such caps, so this also compares like with like.
pub(crate) const SINGLE_ADDRESS_FLEET: [&str; 4] = [
    "--mqtt-max-per-address",
    "19999",
    "--mqtt-max-pending-per-address",
    "19999",
];

/// [`start_quiet_broker`] with the per-address caps of [`SINGLE_ADDRESS_FLEET`]: for
/// benchmarks whose simulated fleet connects from one address.
pub(crate) async fn start_fleet_broker(
    bins: &Binaries,
    timeout: Duration,
) -> anyhow::Result<Broker> {
    let extra = SINGLE_ADDRESS_FLEET.iter().map(|a| a.to_string()).collect();
    start_bench_broker(bins, timeout, extra).await
}

async fn start_bench_broker(
    bins: &Binaries,
    timeout: Duration,
    extra_args: Vec<String>,
) -> anyhow::Result<Broker> {
    Broker::start(
        bins,
        BrokerOptions {
            extra_args,
            log_filter: "warn".to_owned(),
            start_timeout: timeout,
            stop_timeout: Duration::from_secs(30),
            ..BrokerOptions::default()
        },
    )
    .await
}

/// `pf-agent simulate` for `params`, with `extra` arguments appended.
pub(crate) fn start_simulator(
    broker: &Broker,
    params: &ConnectBench,
    extra: &[&str],
) -> anyhow::Result<Process> {
    let pki = broker.pki().dir().display().to_string();
    let count = params.terminals.to_string();
    let rate = params.connect_rate.to_string();
    let hb = format!("{}ms", params.heartbeat_interval.as_millis());
    let tm = format!("{}ms", params.telemetry_interval.as_millis());
    let url = broker.mqtt_url();
    let tx_rate = params.tx_rate.to_string();
    let data_dir = broker.scratch_dir("simulator")?.display().to_string();
    let mut args: Vec<&str> = vec![
        "simulate",
        "--count",
        &count,
        "--pki-dir",
        &pki,
        "--broker",
        &url,
        "--id-prefix",
        "bench-",
        "--heartbeat-interval",
        &hb,
        "--telemetry-interval",
        &tm,
        "--connect-rate",
        &rate,
        "--tx-rate",
        &tx_rate,
        "--data-dir",
        &data_dir,
    ];
    args.extend_from_slice(extra);
    Process::spawn_with_env(
        "pf-agent simulate",
        &broker.bins().agent,
        args,
        &broker.log_dir(),
        "simulate",
        &[("RUST_LOG", "warn")],
    )
}

/// Polls `/metrics` until the edge holds `n` terminal connections (the embedded controller
/// has none: it is attached through a local router link) and the controller counts `n`
/// devices online, or `timeout`.
pub(crate) async fn wait_for_fleet(
    api: &Api,
    n: usize,
    start: Instant,
    timeout: Duration,
    simulator: &mut Process,
) -> anyhow::Result<Timeline> {
    let target = n as f64;
    let mut timeline = Timeline::default();
    let before = api.metrics().await.ok();
    let deadline = start + timeout;
    let mut last: Option<Scrape> = None;
    while Instant::now() < deadline {
        if let Some(status) = simulator.try_exited()? {
            bail!(
                "the simulator exited ({status})\n{}",
                simulator.stderr_tail(TAIL_LINES)
            );
        }
        let scrape = match api.metrics().await {
            Ok(scrape) => scrape,
            Err(_) => {
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        let now = start.elapsed();
        let terminals = scrape.value("posfleet_edge_connections", &[]);
        let online = scrape.value("posfleet_devices_online", &[]);
        timeline.max_connected = timeline.max_connected.max(terminals as u64);
        if terminals >= 1.0 && timeline.first_connected.is_none() {
            timeline.first_connected = Some(now);
        }
        if terminals >= target && timeline.all_connected.is_none() {
            timeline.all_connected = Some(now);
        }
        if online >= target && timeline.all_online.is_none() {
            timeline.all_online = Some(now);
        }
        last = Some(scrape);
        if timeline.all_connected.is_some() && timeline.all_online.is_some() {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    if let Some(last) = &last {
        let name = "posfleet_edge_refusals_total";
        let earlier = before
            .as_ref()
            .map(|b| b.by_label(name, "reason"))
            .unwrap_or_default();
        timeline.refusals = last
            .by_label(name, "reason")
            .into_iter()
            .map(|(reason, value)| {
                let delta = value - earlier.get(&reason).copied().unwrap_or(0.0);
                (reason, delta)
            })
            .filter(|(_, delta)| *delta > 0.0)
            .collect();
    }
    Ok(timeline)
}

/// Messages per second over `window`, by channel: ingested by the controller, and accepted
/// from terminals by the edge.
async fn window_rates(
    api: &Api,
    window: Duration,
) -> anyhow::Result<(IngestRates, IngestRates, IngestRates, Duration)> {
    let first = api.metrics().await.context("metrics at window start")?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let second = api.metrics().await.context("metrics at window end")?;
    let elapsed = t0.elapsed();
    let secs = elapsed.as_secs_f64();
    let rates = |name: &str, label: &str| -> IngestRates {
        let before = first.by_label(name, label);
        second
            .by_label(name, label)
            .into_iter()
            .map(|(channel, value)| {
                let delta = value - before.get(&channel).copied().unwrap_or(0.0);
                (channel, delta / secs)
            })
            .filter(|(_, rate)| *rate > 0.0)
            .collect()
    };
    Ok((
        rates("posfleet_ingest_messages_total", "channel"),
        rates("posfleet_edge_publishes_total", "channel"),
        rates("posfleet_ingest_rejected_total", "reason"),
        elapsed,
    ))
}

/// How late heartbeats reach the controller: `received_at_ms - sent_at_ms` of the last
/// heartbeat of a sample of devices (same host, same clock).
#[derive(Debug, Clone, Default)]
pub struct HeartbeatDelay {
    /// Devices sampled that had a heartbeat.
    pub sampled: usize,
    pub median_ms: u64,
    pub max_ms: u64,
}

impl fmt::Display for HeartbeatDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "median {} ms, max {} ms ({} devices sampled)",
            self.median_ms, self.max_ms, self.sampled
        )
    }
}

/// Samples up to 50 devices `bench-NNNNN` evenly over the fleet.
async fn heartbeat_delay(api: &Api, n: usize) -> anyhow::Result<HeartbeatDelay> {
    let step = (n / 50).max(1);
    let mut delays = Vec::new();
    for index in (0..n).step_by(step) {
        let id = format!("bench-{index:05}");
        if let Some(hb) = api.device(&id).await?.and_then(|d| d.last_heartbeat) {
            delays.push(hb.received_at_ms.saturating_sub(hb.sent_at_ms));
        }
    }
    delays.sort_unstable();
    Ok(HeartbeatDelay {
        sampled: delays.len(),
        median_ms: delays.get(delays.len() / 2).copied().unwrap_or(0),
        max_ms: delays.last().copied().unwrap_or(0),
    })
}

/// CPU seconds used by the broker and the simulator over a wall-clock span.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSpan {
    pub broker: f64,
    pub simulator: f64,
    pub wall: Duration,
}

impl fmt::Display for CpuSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wall = self.wall.as_secs_f64().max(f64::EPSILON);
        write!(
            f,
            "broker {:.1} s ({:.0}% of a CPU), simulator {:.1} s ({:.0}%), over {:.1} s",
            self.broker,
            self.broker / wall * 100.0,
            self.simulator,
            self.simulator / wall * 100.0,
            wall
        )
    }
}

/// CPU seconds of (broker, simulator) right now.
fn cpu_now(broker: &Broker, simulator: &Process) -> anyhow::Result<(f64, f64)> {
    Ok((
        cpu_seconds(broker.process()?.pid())?,
        cpu_seconds(simulator.pid())?,
    ))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(
        || "not reached".to_owned(),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "first connected {}, all connected {}, all online {}, max connected {}",
            secs(self.first_connected),
            secs(self.all_connected),
            secs(self.all_online),
            self.max_connected
        )?;
        if !self.refusals.is_empty() {
            write!(f, ", refusals {:?}", self.refusals)?;
        }
        Ok(())
    }
}

impl fmt::Display for ConnectReport {
    /// A Markdown table (pasted into docs/benchmarks.md as printed).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        let n = p.terminals as f64;
        let per_terminal = |rss: u64| {
            let delta = rss.saturating_sub(self.broker_rss_idle) as f64;
            format!("{:.1} KiB", delta / n / 1024.0)
        };
        let refusals = |t: &Timeline| {
            if t.refusals.is_empty() {
                "none".to_owned()
            } else {
                t.refusals
                    .iter()
                    .map(|(r, v)| format!("{r}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let expected_hb = n / p.heartbeat_interval.as_secs_f64();
        let rate = |channel: &str| self.ingest.get(channel).copied().unwrap_or(0.0);
        writeln!(
            f,
            "fleet-bench connect: {} terminals, heartbeat {:?}, telemetry {:?}, {} transactions/min each, connect rate {}/s",
            p.terminals, p.heartbeat_interval, p.telemetry_interval, p.tx_rate, p.connect_rate
        )?;
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "open files limit: soft {:?} -> {:?} (hard {:?})",
            self.nofile.soft_before, self.nofile.soft, self.nofile.hard
        )?;
        writeln!(f)?;
        writeln!(f, "| measurement | value |")?;
        writeln!(f, "| --- | --- |")?;
        let rows = [
            (
                "terminals connected / online".to_owned(),
                format!(
                    "{} / {}",
                    self.connect.max_connected,
                    if self.connect.all_online.is_some() {
                        p.terminals.to_string()
                    } else {
                        "fewer".to_owned()
                    }
                ),
            ),
            (
                "first terminal connected (from simulator start)".to_owned(),
                secs(self.connect.first_connected),
            ),
            (
                "all terminals connected at the edge (from simulator start)".to_owned(),
                secs(self.connect.all_connected),
            ),
            (
                "all terminals online in the controller (from simulator start)".to_owned(),
                secs(self.connect.all_online),
            ),
            (
                "CPU used until all online".to_owned(),
                self.connect_cpu.to_string(),
            ),
            (
                "edge refusals while connecting".to_owned(),
                refusals(&self.connect),
            ),
            (
                "broker RSS before terminals".to_owned(),
                mib(self.broker_rss_idle),
            ),
            (
                "broker RSS, all connected".to_owned(),
                mib(self.broker_rss_connected),
            ),
            (
                format!(
                    "broker RSS after the {:.0} s ingest window",
                    self.window.as_secs_f64()
                ),
                mib(self.broker_rss_steady),
            ),
            (
                "broker memory per terminal (all connected)".to_owned(),
                per_terminal(self.broker_rss_connected),
            ),
            (
                "broker memory per terminal (after the window)".to_owned(),
                per_terminal(self.broker_rss_steady),
            ),
            (
                "simulator RSS (all terminals, separate process)".to_owned(),
                mib(self.simulator_rss),
            ),
            (
                "heartbeats ingested".to_owned(),
                format!("{:.1} /s (expected {expected_hb:.1} /s)", rate("hb")),
            ),
            (
                "all uplink messages ingested, by channel".to_owned(),
                format!(
                    "{:.1} /s ({})",
                    self.ingest.values().sum::<f64>(),
                    self.ingest
                        .iter()
                        .map(|(c, r)| format!("{c} {r:.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            (
                "PUBLISH accepted by the edge (from terminals), by channel".to_owned(),
                format!(
                    "{:.1} /s ({})",
                    self.edge_publishes.values().sum::<f64>(),
                    self.edge_publishes
                        .iter()
                        .map(|(c, r)| format!("{c} {r:.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            (
                "uplink messages rejected by the controller".to_owned(),
                if self.rejected.is_empty() {
                    "none".to_owned()
                } else {
                    format!("{:.1?} /s", self.rejected)
                },
            ),
            (
                "heartbeat delay (controller receipt − device send)".to_owned(),
                self.delay.to_string(),
            ),
            (
                "CPU used during the window".to_owned(),
                self.window_cpu.to_string(),
            ),
            (
                "broker SIGKILL → restarted and ready".to_owned(),
                format!("{:.2} s", self.restart_ready.as_secs_f64()),
            ),
            (
                "after restart: all connected again".to_owned(),
                secs(self.reconnect.all_connected),
            ),
            (
                "after restart: all online again".to_owned(),
                secs(self.reconnect.all_online),
            ),
            (
                "edge refusals while reconnecting".to_owned(),
                refusals(&self.reconnect),
            ),
            (
                "graceful stop of simulator and broker".to_owned(),
                if self.clean_stop { "yes" } else { "no" }.to_owned(),
            ),
        ];
        for (name, value) in rows {
            writeln!(f, "| {name} | {value} |")?;
        }
        Ok(())
    }
}
