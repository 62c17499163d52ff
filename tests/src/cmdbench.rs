//! `fleet-bench commands`: how fast a connected fleet obeys the command plane.
//!
//! 1. `pf-broker serve` and `pf-agent simulate --count N` (separate processes, as in
//!    `fleet-bench connect`); wait until the edge holds N terminals and all are online.
//! 2. Open the live stream; every `command` event is timestamped on arrival.
//! 3. **Lock latency**: `locks` times, one after another, `POST /api/v1/commands` (a lock of
//!    one terminal not locked before) and wait for that command's `succeeded` event: the time
//!    from just before the API call to the event is one sample (API, durable write, signing,
//!    MQTT to the terminal, its verification, journal write and fsync, the result back, the
//!    controller's update, the event). Then the same for unlocking them.
//! 4. **Config convergence**: `config_rounds` times, `PATCH /api/v1/config/fleet` with a new
//!    value and wait until the controller has counted N more `succeeded` commands
//!    (`posfleet_commands_status_total{status="succeeded"}`); then check through
//!    `GET /api/v1/commands` that each of the N terminals confirmed a push of exactly the new
//!    version. The figure is the time from just before the PATCH to the N-th confirmation.
//!
//! Everything is on 127.0.0.1 and every wait is bounded by `timeout`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use posfleet_broker::views::{CommandBody, CommandPage, CommandState, FleetEvent};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::api::Api;
use crate::bench::{ConnectBench, start_fleet_broker, start_simulator, wait_for_fleet};
use crate::bins::Binaries;
use crate::broker::Broker;
use crate::host::{Machine, cpu_seconds, rss_bytes};
use crate::process::TAIL_LINES;

/// How often `/metrics` is polled during a config round.
const POLL: Duration = Duration::from_millis(20);

/// Parameters of `fleet-bench commands`.
#[derive(Debug, Clone, clap::Args)]
pub struct CommandsBench {
    /// Simulated terminals.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub terminals: u32,
    /// Lock samples (each on another terminal; at most the number of terminals).
    #[arg(long, default_value_t = 200)]
    pub locks: u32,
    /// Fleet-wide configuration changes to time.
    #[arg(long, default_value_t = 3)]
    pub config_rounds: u32,
    /// Heartbeat interval of every terminal.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = posfleet_runtime::value::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Terminals the simulator starts per second (default: effectively unthrottled).
    #[arg(long, value_name = "PER_SECOND", default_value_t = 1_000_000)]
    pub connect_rate: u32,
    /// Bound on each wait (all connected, one lock, one config round).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = posfleet_runtime::value::parse_duration)]
    pub timeout: Duration,
}

/// Latency samples, sorted.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self(samples)
    }

    /// The `q` quantile (nearest rank), `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.0.is_empty() {
            return None;
        }
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        Some(self.0[rank - 1])
    }
}

impl fmt::Display for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |q| {
            self.quantile(q).map_or("-".to_owned(), |d| {
                format!("{:.1} ms", d.as_secs_f64() * 1e3)
            })
        };
        write!(
            f,
            "n={} p50 {} p90 {} p99 {} max {}",
            self.0.len(),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(1.0)
        )
    }
}

/// One timed fleet-wide configuration change.
#[derive(Debug, Clone)]
pub struct ConfigRound {
    pub version: u64,
    /// From just before the PATCH to the N-th confirmation.
    pub all_confirmed: Duration,
    /// From just before the PATCH to the first confirmation.
    pub first_confirmed: Option<Duration>,
    /// Terminals whose push of exactly this version succeeded (checked in the command list).
    pub confirmed_terminals: usize,
    /// Broker CPU seconds spent during the round.
    pub broker_cpu: f64,
    /// Simulator CPU seconds spent during the round (all N terminals' agents).
    pub simulator_cpu: f64,
}

/// Everything `fleet-bench commands` measured.
#[derive(Debug, Clone)]
pub struct CommandsReport {
    pub params: CommandsBench,
    pub machine: Machine,
    pub connected_after: Duration,
    pub lock: Latencies,
    pub unlock: Latencies,
    /// Lock/unlock commands that ended other than `succeeded`.
    pub lock_failures: usize,
    pub config: Vec<ConfigRound>,
    /// `lagged` notices on the stream (events the benchmark may have missed).
    pub lagged: u64,
    pub broker_rss: u64,
    pub simulator_rss: u64,
}

/// Final command events seen on the stream: id → (status, arrival).
#[derive(Debug, Default)]
struct Finals {
    seen: Mutex<HashMap<String, (CommandState, Instant)>>,
    lagged: Mutex<u64>,
    notify: Notify,
}

impl Finals {
    fn record(&self, event: FleetEvent) {
        let at = Instant::now();
        match event {
            FleetEvent::Command { id, status, .. } if is_final(status) => {
                if let Ok(mut seen) = self.seen.lock() {
                    seen.entry(id).or_insert((status, at));
                }
                self.notify.notify_waiters();
            }
            FleetEvent::Lagged { missed } => {
                if let Ok(mut lagged) = self.lagged.lock() {
                    *lagged += missed;
                }
            }
            _ => {}
        }
    }

    fn get(&self, id: &str) -> Option<(CommandState, Instant)> {
        self.seen.lock().ok().and_then(|s| s.get(id).copied())
    }

    /// Waits for the final event of `id`.
    async fn wait(&self, id: &str, timeout: Duration) -> anyhow::Result<(CommandState, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if let Some(found) = self.get(id) {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("no final event for command {id} within {timeout:?}");
            }
        }
    }

    fn lagged(&self) -> u64 {
        self.lagged.lock().map(|l| *l).unwrap_or(0)
    }
}

fn is_final(status: CommandState) -> bool {
    !matches!(
        status,
        CommandState::Queued | CommandState::Delivered | CommandState::InProgress
    )
}

/// Runs the benchmark; `progress` receives one line per phase.
pub async fn run_commands(
    bins: &Binaries,
    params: CommandsBench,
    progress: impl Fn(&str),
) -> anyhow::Result<CommandsReport> {
    let machine = Machine::describe();
    progress(&format!("machine: {machine}"));
    let n = params.terminals as usize;
    let broker = start_fleet_broker(bins, params.timeout).await?;
    let connect = ConnectBench {
        terminals: n,
        heartbeat_interval: params.heartbeat_interval,
        telemetry_interval: Duration::from_secs(600),
        duration: Duration::ZERO,
        connect_rate: params.connect_rate,
        tx_rate: 0.0,
        timeout: params.timeout,
    };
    let mut simulator = start_simulator(&broker, &connect, &[])?;
    let started = Instant::now();
    progress(&format!("simulator started: {n} terminals"));
    let timeline = wait_for_fleet(broker.api(), n, started, params.timeout, &mut simulator).await?;
    let Some(connected_after) = timeline.all_online else {
        bail!(
            "not all terminals came online within {:?}: {timeline}\n{}\n{}",
            params.timeout,
            broker.log_tail(),
            simulator.stderr_tail(TAIL_LINES)
        );
    };
    progress(&format!("all {n} online after {connected_after:.1?}"));
    let api = broker.api().clone();

    let finals = Arc::new(Finals::default());
    let mut stream = api.stream(None).await?;
    let reader = {
        let finals = Arc::clone(&finals);
        tokio::spawn(async move {
            while let Ok(event) = stream.next(Duration::from_secs(3600)).await {
                finals.record(event);
            }
        })
    };
    // Let the connect-time leases and reconciliation settle before timing anything.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut devices: Vec<String> = api
        .devices()
        .await?
        .devices
        .into_iter()
        .map(|d| d.id)
        .collect();
    devices.sort();
    let samples = (params.locks as usize).min(devices.len());
    let targets = &devices[..samples];
    let mut lock_failures = 0;
    progress(&format!("timing {samples} locks, one after another"));
    let lock = time_commands(
        &api,
        &finals,
        targets,
        "lock",
        params.timeout,
        &mut lock_failures,
    )
    .await?;
    progress(&format!("lock: {lock}"));
    let unlock = time_commands(
        &api,
        &finals,
        targets,
        "unlock",
        params.timeout,
        &mut lock_failures,
    )
    .await?;
    progress(&format!("unlock: {unlock}"));

    let mut config = Vec::new();
    for round in 0..params.config_rounds {
        let value = 10 + i64::from(round) * 10;
        let result = config_round(&api, &broker, simulator.pid(), n, value, params.timeout).await?;
        progress(&format!(
            "config v{}: all {n} confirmed in {:.2?} ({} verified in the command list), CPU broker {:.1} s, simulator {:.1} s",
            result.version,
            result.all_confirmed,
            result.confirmed_terminals,
            result.broker_cpu,
            result.simulator_cpu
        ));
        config.push(result);
    }

    let broker_rss = rss_bytes(broker.process()?.pid())?;
    let simulator_rss = rss_bytes(simulator.pid())?;
    reader.abort();
    progress("stopping");
    let _ = simulator.terminate(Duration::from_secs(30)).await;
    drop(broker);
    Ok(CommandsReport {
        params,
        machine,
        connected_after,
        lock,
        unlock,
        lock_failures,
        config,
        lagged: finals.lagged(),
        broker_rss,
        simulator_rss,
    })
}

/// Sends `kind` to each target in turn and times each until its final event.
async fn time_commands(
    api: &Api,
    finals: &Finals,
    targets: &[String],
    kind: &str,
    timeout: Duration,
    failures: &mut usize,
) -> anyhow::Result<Latencies> {
    let mut samples = Vec::with_capacity(targets.len());
    for device in targets {
        let body = json!({
            "kind": kind,
            "target": { "devices": [device] },
            "reason": "fleet-bench",
        });
        let sent = Instant::now();
        let created = api.create_commands(&body).await?;
        let id = match created.as_slice() {
            [one] => one.id.clone(),
            other => bail!("{kind} of {device} created {} commands", other.len()),
        };
        let (status, at) = finals.wait(&id, timeout).await?;
        if status != CommandState::Succeeded {
            *failures += 1;
        }
        samples.push(at.duration_since(sent));
    }
    Ok(Latencies::new(samples))
}

/// One fleet-wide change and the wait for every terminal to confirm it.
async fn config_round(
    api: &Api,
    broker: &Broker,
    simulator: u32,
    n: usize,
    value: i64,
    timeout: Duration,
) -> anyhow::Result<ConfigRound> {
    let metric = "posfleet_commands_status_total";
    let succeeded = |s: &crate::scrape::Scrape| s.value(metric, &[("status", "succeeded")]);
    let before = succeeded(&api.metrics().await?);
    let pid = broker.process()?.pid();
    let cpu_before = cpu_seconds(pid)?;
    let sim_cpu_before = cpu_seconds(simulator)?;
    let sent = Instant::now();
    let layer = api
        .config_set("fleet", json!({ "display.brightness": value }))
        .await?;
    let deadline = sent + timeout;
    let mut first_confirmed = None;
    let all_confirmed = loop {
        let done = succeeded(&api.metrics().await?) - before;
        if done >= 1.0 && first_confirmed.is_none() {
            first_confirmed = Some(sent.elapsed());
        }
        if done >= n as f64 {
            break sent.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "config v{}: only {done} of {n} confirmed within {timeout:?}",
                layer.version
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let broker_cpu = cpu_seconds(pid)? - cpu_before;
    let simulator_cpu = cpu_seconds(simulator)? - sim_cpu_before;
    let confirmed_terminals = confirmed_pushes(api, layer.version).await?;
    if confirmed_terminals != n {
        bail!(
            "config v{}: the command list shows {confirmed_terminals} of {n} terminals confirmed",
            layer.version
        );
    }
    Ok(ConfigRound {
        version: layer.version,
        all_confirmed,
        first_confirmed,
        confirmed_terminals,
        broker_cpu,
        simulator_cpu,
    })
}

/// Distinct terminals with a succeeded push of exactly `version` (pages of the command list,
/// newest first, until pushes of older versions).
async fn confirmed_pushes(api: &Api, version: u64) -> anyhow::Result<usize> {
    let mut devices = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/api/v1/commands?kind=config_push&status=succeeded&limit=1000".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let response = api.get(&path).await?;
        let status = response.status();
        let text = response.text().await.context("reading the command list")?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {text}");
        }
        let page: CommandPage = serde_json::from_str(&text).context("command page")?;
        let mut older = false;
        for command in &page.items {
            match command.body {
                CommandBody::ConfigPush { version: v, .. } if v == version => {
                    devices.insert(command.device_id.clone());
                }
                CommandBody::ConfigPush { version: v, .. } if v < version => older = true,
                _ => {}
            }
        }
        match page.next_cursor {
            Some(next) if !older => cursor = Some(next),
            _ => break,
        }
    }
    Ok(devices.len())
}

impl fmt::Display for CommandsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        writeln!(f, "fleet-bench commands")?;
        writeln!(f, "  machine:            {}", self.machine)?;
        writeln!(
            f,
            "  terminals:          {} (heartbeat {:?}), all online after {:.1?}",
            p.terminals, p.heartbeat_interval, self.connected_after
        )?;
        writeln!(f, "  lock → confirmed:   {}", self.lock)?;
        writeln!(f, "  unlock → confirmed: {}", self.unlock)?;
        writeln!(f, "  lock/unlock not succeeded: {}", self.lock_failures)?;
        for round in &self.config {
            writeln!(
                f,
                "  config v{}: first confirmed {}, all {} confirmed {:.2?} (CPU broker {:.1} s = {:.3} ms per terminal, simulator {:.1} s)",
                round.version,
                round
                    .first_confirmed
                    .map_or("-".to_owned(), |d| format!("{d:.2?}")),
                round.confirmed_terminals,
                round.all_confirmed,
                round.broker_cpu,
                round.broker_cpu * 1e3 / p.terminals.max(1) as f64,
                round.simulator_cpu
            )?;
        }
        writeln!(f, "  stream lagged:      {} events", self.lagged)?;
        write!(
            f,
            "  RSS:                broker {:.0} MiB, simulator {:.0} MiB",
            self.broker_rss as f64 / 1048576.0,
            self.simulator_rss as f64 / 1048576.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let l = Latencies::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(l.quantile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(l.quantile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(l.quantile(1.0), Some(Duration::from_millis(100)));
        assert_eq!(l.quantile(0.0), Some(Duration::from_millis(1)));
        assert_eq!(Latencies::default().quantile(0.5), None);
    }
}
