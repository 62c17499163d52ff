//! `fleet-bench versus`: the same simulated fleet against posfleet and against Mosquitto, one
//! after the other in one run, measured the same way (issue 11, item 7).
//!
//! Per broker and fleet size:
//!
//! 1. A posfleet broker (`pf-broker serve`, log level `warn`). For posfleet it is the broker
//!    under test; for Mosquitto it only issues and records the terminals' certificates (the
//!    simulator gets them from a controller's API) and Mosquitto is started beside it from
//!    `deploy/external-brokers/` with the same fleet PKI ([`crate::mosquitto`]).
//! 2. The heartbeat observer ([`observer`]): a controller-certificate MQTT client subscribed
//!    to `posfleet/v1/d/+/up/hb` on the broker under test.
//! 3. Broker RSS and CPU; then P `pf-agent simulate` processes ([`fleet`]) started at once.
//!    "All connected" is when every terminal holds a connection, from the simulators'
//!    reports: the last terminal's CONNACK time minus the simulators' start. Connect attempts
//!    are counted by the terminals (accepted and failed).
//! 4. Broker RSS and CPU again; a window of `--duration` (rounded up to whole heartbeat
//!    intervals): heartbeats received by the observer
//!    per second and their delay (arrival − `Heartbeat.sent_at_ms`), broker CPU; RSS after it
//!    (connected and idle) → bytes per terminal.
//! 5. SIGKILL of the broker, restart on the same port: time until every terminal connected
//!    again after the kill, their attempts, and the delay of the heartbeats sent from the kill
//!    until one heartbeat interval after all were back.
//! 6. SIGTERM to the simulators and the brokers.
//!
//! Everything is on 127.0.0.1; every wait is bounded by `--timeout`; a run that fails is
//! reported as failed and the other broker is still measured.

pub(crate) mod fleet;
pub(crate) mod observer;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use posfleet_proto::now_ms;
use posfleet_runtime::value::parse_duration;

use crate::bench::start_fleet_broker;
use crate::bins::Binaries;
use crate::broker::Broker;
use crate::host::{Machine, NofileLimit, cpu_seconds, rss_bytes};
use crate::mosquitto::{self, Mosquitto};
use crate::mqtt::tls_config;
use fleet::{Fleet, FleetSpec};
use observer::Observer;
pub use report::{
    Delays, FIGURES, Figure, Phase, Storm, Target, TargetReport, VersusReport, VersusRun, Window,
    quantile, ratio,
};

/// Most terminals one simulator process runs when `--processes` is not given (the open-files
/// limit is per process: 20,000 here, and every terminal holds a socket and a few files).
pub const TERMINALS_PER_PROCESS: usize = 8_000;
/// The observer's controller name (`controller:bench`).
const OBSERVER: &str = "bench";

/// Parameters of `fleet-bench versus`.
#[derive(Debug, Clone, clap::Args)]
pub struct VersusBench {
    /// Simulated terminals (1..=100000).
    #[arg(long, required_unless_present = "sizes", conflicts_with = "sizes",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub terminals: Option<u32>,
    /// Several fleet sizes, one after the other, then one table over them, e.g.
    /// `1000,5000,10000,19000`.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub sizes: Vec<u32>,
    /// Simulator processes (default: one per 8,000 terminals).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub processes: Option<u32>,
    /// The Mosquitto binary.
    #[arg(long, value_name = "PATH", default_value = mosquitto::DEFAULT_PROGRAM)]
    pub mosquitto: PathBuf,
    /// Measure only this broker.
    #[arg(long, value_enum)]
    pub only: Option<Target>,
    /// Length of the steady heartbeat window.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Heartbeat interval of every terminal.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Telemetry interval of every terminal.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub telemetry_interval: Duration,
    /// Terminals started per second over all simulator processes (default: unthrottled).
    #[arg(long, value_name = "PER_SECOND", default_value_t = 1_000_000)]
    pub connect_rate: u32,
    /// Bound on each wait (all connected, all back, a broker ready).
    #[arg(long, value_name = "DURATION", default_value = "180s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl VersusBench {
    fn sizes(&self) -> Vec<usize> {
        match self.terminals {
            Some(n) => vec![n as usize],
            None => self.sizes.iter().map(|&n| n as usize).collect(),
        }
    }

    fn processes(&self, terminals: usize) -> usize {
        match self.processes {
            Some(p) => (p as usize).min(terminals),
            None => terminals.div_ceil(TERMINALS_PER_PROCESS),
        }
    }

    /// `--duration` rounded up to a whole number of heartbeat intervals (at least one): the
    /// terminals' heartbeats are periodic, so such a window holds the same number of each
    /// terminal's heartbeats wherever it starts.
    fn window(&self) -> Duration {
        whole_intervals(self.duration, self.heartbeat_interval)
    }

    fn targets(&self) -> Vec<Target> {
        match self.only {
            Some(t) => vec![t],
            None => vec![Target::Posfleet, Target::Mosquitto],
        }
    }
}

/// `duration` rounded up to a multiple of `interval` (at least one interval).
fn whole_intervals(duration: Duration, interval: Duration) -> Duration {
    if interval.is_zero() {
        return duration;
    }
    let n = duration.as_nanos().div_ceil(interval.as_nanos()).max(1);
    interval * u32::try_from(n).unwrap_or(u32::MAX)
}

/// Runs every size and broker; `progress` receives a line per phase.
pub async fn run_versus(
    bins: &Binaries,
    params: VersusBench,
    nofile: NofileLimit,
    progress: impl Fn(&str),
) -> anyhow::Result<VersusReport> {
    let machine = Machine::describe();
    progress(&format!("machine: {machine}"));
    let mut runs = Vec::new();
    for terminals in params.sizes() {
        let processes = params.processes(terminals);
        let spec = FleetSpec {
            terminals,
            processes,
            heartbeat_interval: params.heartbeat_interval,
            telemetry_interval: params.telemetry_interval,
            connect_rate: params.connect_rate,
        };
        let mut results = Vec::new();
        for target in params.targets() {
            let say = |line: &str| progress(&format!("{} {terminals}: {line}", target.name()));
            let result = run_target(bins, &params, &spec, target, &say)
                .await
                .map_err(|e| format!("{e:#}"));
            if let Err(error) = &result {
                say(&format!("FAILED: {error}"));
            }
            results.push((target, result));
        }
        let run = VersusRun {
            terminals,
            processes,
            results,
        };
        progress(&format!("\n{run}"));
        runs.push(run);
    }
    Ok(VersusReport {
        machine,
        nofile,
        heartbeat_interval: params.heartbeat_interval,
        window: params.window(),
        runs,
    })
}

/// The pid of the broker under test: Mosquitto if there is one, else the posfleet broker.
fn under_test_pid(issuer: &Broker, mosquitto: Option<&Mosquitto>) -> anyhow::Result<u32> {
    match mosquitto {
        Some(m) => Ok(m.pid()),
        None => Ok(issuer.process()?.pid()),
    }
}

async fn run_target(
    bins: &Binaries,
    params: &VersusBench,
    spec: &FleetSpec,
    target: Target,
    say: &impl Fn(&str),
) -> anyhow::Result<TargetReport> {
    let timeout = params.timeout;
    let mut issuer = start_fleet_broker(bins, timeout).await?;
    // The broker under test: Mosquitto beside the posfleet broker, or the posfleet broker.
    let mut mosquitto = match target {
        Target::Posfleet => None,
        Target::Mosquitto => Some(
            Mosquitto::start(
                &params.mosquitto,
                &issuer.pki(),
                &issuer.scratch_dir("mosquitto")?,
                &issuer.log_dir(),
                Some(OBSERVER),
                timeout,
            )
            .await?,
        ),
    };
    let (addr, url) = match &mosquitto {
        None => (issuer.mqtt_addr(), issuer.mqtt_url()),
        Some(m) => (m.addr(), m.url()),
    };
    let ca_pem = std::fs::read(issuer.pki().ca_cert()).context("ca.crt")?;
    let ca = issuer.pki().load_ca().context("fleet CA")?;
    let observer_tls = tls_config(&ca_pem, Some(&ca.issue_controller(OBSERVER)?))?;
    let observer = Observer::start(addr, &format!("controller:{OBSERVER}"), observer_tls);
    observer.subscribed(timeout).await?;
    say(&format!(
        "broker ready (pid {}), observer subscribed",
        under_test_pid(&issuer, mosquitto.as_ref())?
    ));

    // Connect phase.
    let pid = under_test_pid(&issuer, mosquitto.as_ref())?;
    let rss_before = rss_bytes(pid)?;
    let cpu_before = cpu_seconds(pid)?;
    let issuer_before = cpu_seconds(issuer.process()?.pid())?;
    let started_ms = now_ms();
    let mut fleet = Fleet::start(&issuer, &url, spec)?;
    say(&format!(
        "{} simulator process(es) started, {} terminals",
        spec.processes, spec.terminals
    ));
    let wait = fleet.wait_all_connected(0, timeout).await?;
    let connect_cpu = cpu_seconds(pid)? - cpu_before;
    let issuer_cpu = match mosquitto {
        None => None,
        Some(_) => Some(cpu_seconds(issuer.process()?.pid())? - issuer_before),
    };
    let simulator_cpu = fleet.cpu_seconds()?;
    let rss_connected = rss_bytes(pid)?;
    let connect = Phase {
        took: wait
            .all_connected_at_ms
            .map(|at| Duration::from_millis(at.saturating_sub(started_ms))),
        max_connected: wait.max_connected,
        attempts: wait.view.attempts,
    };
    say(&format!(
        "connect phase: all connected {:?}, most at once {}, attempts {}",
        connect.took, connect.max_connected, connect.attempts
    ));

    // Steady window.
    let sent_before = fleet.view(0)?.heartbeats;
    let window_start_ms = now_ms();
    let cpu_start = cpu_seconds(pid)?;
    let t0 = tokio::time::Instant::now();
    tokio::time::sleep(params.window()).await;
    let broker_cpu = cpu_seconds(pid)? - cpu_start;
    let wall = t0.elapsed();
    let window_end_ms = now_ms();
    let sent = fleet.view(0)?.heartbeats.saturating_sub(sent_before);
    let seen = observer.received_between(window_start_ms, window_end_ms);
    let window = Window {
        wall,
        observed: seen.len(),
        sent,
        delays: Delays::from_unsorted(seen.iter().map(|s| s.delay_ms()).collect()),
        broker_cpu,
    };
    let rss_steady = rss_bytes(pid)?;
    say(&format!(
        "window: {} heartbeats received, {} sent, delay {}, broker CPU {:.2} s",
        window.observed, window.sent, window.delays, window.broker_cpu
    ));

    // Storm: SIGKILL, restart on the same port, everyone back.
    let attempts_before = fleet.view(0)?.attempts;
    let killed_ms = now_ms();
    let killed = tokio::time::Instant::now();
    match &mut mosquitto {
        None => {
            issuer.kill9().await?;
            issuer.restart().await?;
        }
        Some(m) => {
            m.kill9().await?;
            m.restart(timeout).await?;
        }
    }
    let listening = killed.elapsed();
    say(&format!(
        "SIGKILL → restarted and listening in {listening:?}"
    ));
    let back = fleet.wait_all_connected(killed_ms, timeout).await?;
    let took = back
        .all_connected_at_ms
        .map(|at| Duration::from_millis(at.saturating_sub(killed_ms)));
    // The heartbeats of the storm: sent from the kill until one interval after all were
    // back (each terminal's first after its reconnect); wait for that interval to end, and a
    // little for the last of them to arrive.
    let storm_end_ms = back.all_connected_at_ms.unwrap_or_else(now_ms)
        + spec.heartbeat_interval.as_millis() as u64;
    let linger =
        Duration::from_millis(storm_end_ms.saturating_sub(now_ms())) + Duration::from_secs(2);
    tokio::time::sleep(linger).await;
    let storm = Storm {
        listening,
        phase: Phase {
            took,
            max_connected: back.max_connected,
            attempts: back.view.attempts.saturating_sub(attempts_before),
        },
        delays: Delays::from_unsorted(
            observer
                .sent_between(killed_ms, storm_end_ms)
                .iter()
                .map(|s| s.delay_ms())
                .collect(),
        ),
    };
    say(&format!(
        "storm: all back {:?}, attempts {}, heartbeat delay {}",
        storm.phase.took, storm.phase.attempts, storm.delays
    ));

    // Stop.
    let mut clean_stop = fleet.stop(Duration::from_secs(60)).await;
    observer.stop().await;
    if let Some(m) = &mut mosquitto {
        clean_stop &= matches!(m.terminate(Duration::from_secs(30)).await, Ok(s) if s.success());
    }
    clean_stop &= matches!(issuer.terminate().await, Ok(s) if s.success());
    Ok(TargetReport {
        target,
        terminals: spec.terminals,
        processes: spec.processes,
        heartbeat_interval: spec.heartbeat_interval,
        connect,
        rss_before,
        rss_connected,
        rss_steady,
        connect_cpu,
        issuer_cpu,
        simulator_cpu,
        window,
        storm,
        clean_stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_whole_heartbeat_intervals() {
        let s = Duration::from_secs;
        assert_eq!(whole_intervals(s(20), s(10)), s(20));
        assert_eq!(whole_intervals(s(5), s(2)), s(6));
        assert_eq!(whole_intervals(s(1), s(10)), s(10));
        assert_eq!(whole_intervals(Duration::ZERO, s(10)), s(10));
        assert_eq!(whole_intervals(s(7), Duration::ZERO), s(7));
    }

    #[test]
    fn processes_default_to_one_per_8000_terminals() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: VersusBench,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("versus").chain(args.iter().copied()))
                .map(|c| c.bench)
        };
        let one = parse(&["--terminals", "19000"]).unwrap();
        assert_eq!(one.sizes(), [19_000]);
        assert_eq!(one.processes(19_000), 3);
        assert_eq!(one.processes(8_000), 1);
        assert_eq!(one.targets(), [Target::Posfleet, Target::Mosquitto]);
        assert_eq!(one.mosquitto, PathBuf::from("/usr/sbin/mosquitto"));
        let sizes = parse(&[
            "--sizes",
            "1000,5000",
            "--processes",
            "4",
            "--only",
            "posfleet",
        ])
        .unwrap();
        assert_eq!(sizes.sizes(), [1000, 5000]);
        assert_eq!(sizes.processes(1000), 4);
        assert_eq!(sizes.processes(2), 2, "never more processes than terminals");
        assert_eq!(sizes.targets(), [Target::Posfleet]);
        assert!(parse(&[]).is_err(), "a size is required");
        assert!(parse(&["--terminals", "10", "--sizes", "10"]).is_err());
        assert!(parse(&["--terminals", "0"]).is_err());
    }
}
