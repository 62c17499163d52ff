//! `fleet-bench ingest`: sustained durable transaction ingest.
//!
//! 1. `pf-broker serve` (log level `warn`), then `pf-txdriver` with N terminals connecting
//!    directly, each terminal's payment application submitting `--tx-rate` transactions per
//!    minute (Poisson arrivals) to the terminal's accept path (validation, durable outbox:
//!    what `POST /v1/transactions` does before answering 201). No journal.
//! 2. Wait until all N are connected, then a warm-up.
//! 3. Over the window: transactions offered, accepted (201), stored by the controller
//!    (`posfleet_tx_stored_total`), acknowledged back (the entry left the terminal's outbox),
//!    per second; accept latency (call → 201); **accept → ack latency** (201 → the entry left
//!    the outbox on the controller's ack, seen by a 5 ms poll of every terminal's outbox);
//!    the controller's own receive → ack-published latency, group commit sizes and times;
//!    outbox depth at the start and end of the window (growth: the rate is not sustained);
//!    CPU of both processes.
//! 4. Stop generating, wait until every outbox is empty, check that the controller stored
//!    exactly as many transactions as were accepted.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

use super::{PromQuantile, ms, prom_mean, prom_quantile, quantile_ms, start_broker};
use crate::bench::CpuSpan;
use crate::bins::Binaries;
use crate::host::{Machine, cpu_seconds};
use crate::process::TAIL_LINES;
use crate::scrape::Scrape;
use crate::txdriver::{DriverStatus, Histogram, TxDriver, TxDriverOptions};

/// Parameters of `fleet-bench ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestBench {
    /// Simulated terminals.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub terminals: u32,
    /// Transactions per terminal per minute (1000 terminals × 1200/min = 20,000/s offered).
    #[arg(long, value_name = "PER_MINUTE", default_value_t = 1200.0)]
    pub tx_rate: f64,
    /// Time after all terminals connected before the window opens.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = posfleet_runtime::value::parse_duration)]
    pub warmup: Duration,
    /// Length of the measurement window.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = posfleet_runtime::value::parse_duration)]
    pub duration: Duration,
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = posfleet_runtime::value::parse_duration)]
    pub heartbeat_interval: Duration,
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = posfleet_runtime::value::parse_duration)]
    pub telemetry_interval: Duration,
    /// Bound on each wait (connect, drain).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = posfleet_runtime::value::parse_duration)]
    pub timeout: Duration,
    /// The controller's transaction budget (`posfleet-broker serve --tx-queue-records`;
    /// default: the broker's own). A small one drives the controller past its budget with a
    /// generator that cannot offer enough to do it otherwise.
    #[arg(long, value_name = "N")]
    pub tx_queue_records: Option<u32>,
}

/// What `fleet-bench ingest` measured.
#[derive(Debug, Clone)]
pub struct IngestReport {
    pub params: IngestBench,
    pub machine: Machine,
    pub connect: Duration,
    pub window: Duration,
    pub offered: f64,
    pub accepted: f64,
    pub stored: f64,
    pub acked: f64,
    pub accept_latency: Histogram,
    pub ack_latency: Histogram,
    pub pending_start: u64,
    pub pending_end: u64,
    pub outbox_retries: u64,
    /// The terminals' shared outbox: commit rounds and writes per second.
    pub outbox_rounds: f64,
    pub outbox_writes: f64,
    pub controller_ack_p50: Option<PromQuantile>,
    pub controller_ack_p99: Option<PromQuantile>,
    pub commit_size_mean: Option<f64>,
    pub commit_seconds_mean: Option<f64>,
    pub commits: f64,
    pub overloaded: f64,
    pub retry_after: f64,
    pub duplicates: f64,
    pub cpu: CpuSpan,
    pub drain: Option<Duration>,
    pub accepted_total: u64,
    pub stored_total: u64,
}

/// Runs the benchmark.
pub async fn run_ingest(
    bins: &Binaries,
    driver: &Path,
    params: IngestBench,
    progress: impl Fn(&str),
) -> anyhow::Result<IngestReport> {
    let machine = Machine::describe();
    progress(&format!("machine: {machine}"));
    let extra_args = params
        .tx_queue_records
        .map(|n| vec!["--tx-queue-records".to_owned(), n.to_string()])
        .unwrap_or_default();
    let mut broker = start_broker(bins, params.timeout, extra_args).await?;
    let opts = TxDriverOptions {
        count: params.terminals as usize,
        id_prefix: "ing-".to_owned(),
        tx_rate: params.tx_rate,
        repeat_probability: 0.0,
        connect_rate: 1_000_000,
        heartbeat_interval: params.heartbeat_interval,
        telemetry_interval: params.telemetry_interval,
        keep_alive: Duration::from_secs(30),
        backoff_initial: Duration::from_millis(500),
        backoff_max: Duration::from_secs(5),
        journal: false,
        log_filter: "warn".to_owned(),
        ..TxDriverOptions::default()
    };
    let started = Instant::now();
    let mut tx = TxDriver::start(driver, &broker, &broker.mqtt_url(), &opts)?;
    progress(&format!(
        "driver started: {} terminals, {} transactions/min each ({:.0}/s offered)",
        params.terminals,
        params.tx_rate,
        f64::from(params.terminals) * params.tx_rate / 60.0
    ));
    let connected = tx
        .wait_for(params.timeout, "connected", |s| s.connected == s.terminals)
        .await;
    if let Err(error) = connected {
        bail!(
            "{error:#}\n{}\n{}",
            broker.log_tail(),
            tx.process()?.stderr_tail(TAIL_LINES)
        );
    }
    let connect = started.elapsed();
    progress(&format!(
        "all connected after {:.1} s; warming up {:?}",
        connect.as_secs_f64(),
        params.warmup
    ));
    tokio::time::sleep(params.warmup).await;

    let (s0, m0, cpu0) = snapshot(&broker, &tx).await?;
    let t0 = Instant::now();
    progress(&format!("measuring for {:?}", params.duration));
    tokio::time::sleep(params.duration).await;
    let (s1, m1, cpu1) = snapshot(&broker, &tx).await?;
    let window = t0.elapsed();
    let secs = window.as_secs_f64();
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let metric = |name: &str| m1.value(name, &[]) - m0.value(name, &[]);
    let report_window = IngestReport {
        params: params.clone(),
        machine,
        connect,
        window,
        offered: per_s(s0.offered, s1.offered),
        accepted: per_s(s0.accepted_new, s1.accepted_new),
        stored: metric("posfleet_tx_stored_total") / secs,
        acked: per_s(s0.acked, s1.acked),
        accept_latency: s1.accept_latency.since(&s0.accept_latency),
        ack_latency: s1.ack_latency.since(&s0.ack_latency),
        pending_start: s0.pending,
        pending_end: s1.pending,
        outbox_retries: s1.outbox_retries - s0.outbox_retries,
        outbox_rounds: per_s(s0.commit_rounds, s1.commit_rounds),
        outbox_writes: per_s(s0.commit_writes, s1.commit_writes),
        controller_ack_p50: prom_quantile(&m0, &m1, "posfleet_tx_ack_latency_seconds", 0.5),
        controller_ack_p99: prom_quantile(&m0, &m1, "posfleet_tx_ack_latency_seconds", 0.99),
        commit_size_mean: prom_mean(&m0, &m1, "posfleet_tx_commit_batch_size"),
        commit_seconds_mean: prom_mean(&m0, &m1, "posfleet_tx_commit_seconds"),
        commits: metric("posfleet_tx_commit_seconds_count") / secs,
        overloaded: (m1.value(
            "posfleet_ingest_rejected_total",
            &[("reason", "overloaded")],
        ) - m0.value(
            "posfleet_ingest_rejected_total",
            &[("reason", "overloaded")],
        )) / secs,
        retry_after: metric("posfleet_tx_retry_after_total") / secs,
        duplicates: metric("posfleet_tx_duplicates_total") / secs,
        cpu: CpuSpan {
            broker: cpu1.0 - cpu0.0,
            simulator: cpu1.1 - cpu0.1,
            wall: window,
        },
        drain: None,
        accepted_total: 0,
        stored_total: 0,
    };
    progress(&format!(
        "window: accepted {:.0}/s, stored {:.0}/s, acked {:.0}/s; accept→ack {}",
        report_window.accepted,
        report_window.stored,
        report_window.acked,
        report_window.ack_latency.summary()
    ));

    progress("stop generating; waiting for every outbox to drain");
    tx.stop_generating()?;
    let drain_start = Instant::now();
    let drained = tx
        .wait_for(params.timeout, "drained", DriverStatus::drained)
        .await;
    let mut report = report_window;
    if let Ok(status) = &drained {
        report.drain = Some(drain_start.elapsed());
        report.accepted_total = status.accepted_new;
        report.stored_total = broker
            .api()
            .metrics()
            .await?
            .value("posfleet_tx_stored_total", &[]) as u64;
    }
    let _ = tx.terminate().await;
    let _ = broker.terminate().await;
    if let Err(error) = drained {
        bail!("the outboxes did not drain: {error:#}");
    }
    Ok(report)
}

async fn snapshot(
    broker: &crate::broker::Broker,
    tx: &TxDriver,
) -> anyhow::Result<(DriverStatus, Scrape, (f64, f64))> {
    let status = tx
        .status()?
        .ok_or_else(|| anyhow::anyhow!("the driver wrote no status"))?;
    let scrape = broker.api().metrics().await?;
    let cpu = (
        cpu_seconds(broker.process()?.pid())?,
        cpu_seconds(tx.process()?.pid())?,
    );
    Ok((status, scrape, cpu))
}

impl fmt::Display for IngestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        writeln!(
            f,
            "fleet-bench ingest: {} terminals, {} transactions/min each ({:.0}/s offered), window {:.1} s after {:?} warm-up",
            p.terminals,
            p.tx_rate,
            f64::from(p.terminals) * p.tx_rate / 60.0,
            self.window.as_secs_f64(),
            p.warmup
        )?;
        if let Some(budget) = p.tx_queue_records {
            writeln!(
                f,
                "controller transaction budget: {budget} (--tx-queue-records)"
            )?;
        }
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(f)?;
        writeln!(f, "| measurement | value |")?;
        writeln!(f, "| --- | --- |")?;
        let rows = [
            (
                "all terminals connected after".to_owned(),
                format!("{:.1} s", self.connect.as_secs_f64()),
            ),
            (
                "offered by the payment applications".to_owned(),
                format!("{:.0} /s", self.offered),
            ),
            (
                "accepted (201: validated, durable in the outbox)".to_owned(),
                format!("{:.0} /s", self.accepted),
            ),
            (
                "stored by the controller (fsynced)".to_owned(),
                format!("{:.0} /s", self.stored),
            ),
            (
                "acknowledged back (left the terminal's outbox)".to_owned(),
                format!("{:.0} /s", self.acked),
            ),
            (
                "outbox depth at window start → end".to_owned(),
                format!("{} → {}", self.pending_start, self.pending_end),
            ),
            (
                "accept latency (call → 201)".to_owned(),
                self.accept_latency.summary(),
            ),
            (
                "accept → ack latency (201 → entry removed on the controller's ack)".to_owned(),
                self.ack_latency.summary(),
            ),
            (
                "controller: receive → ack published, p50 / p99".to_owned(),
                format!(
                    "{} / {}",
                    quantile_ms(self.controller_ack_p50),
                    quantile_ms(self.controller_ack_p99)
                ),
            ),
            (
                "controller: group commits".to_owned(),
                format!(
                    "{:.1} /s, mean {:.0} transactions, mean {}",
                    self.commits,
                    self.commit_size_mean.unwrap_or(0.0),
                    ms(self.commit_seconds_mean)
                ),
            ),
            (
                "controller: batches refused as overloaded / retry-after notices / duplicates received".to_owned(),
                format!(
                    "{:.1} /s / {:.1} /s / {:.1} /s",
                    self.overloaded, self.retry_after, self.duplicates
                ),
            ),
            (
                "terminals' shared outbox: commit rounds / writes".to_owned(),
                format!(
                    "{:.0} /s / {:.0} /s (accepts + ack removals)",
                    self.outbox_rounds, self.outbox_writes
                ),
            ),
            (
                "submissions retried (outbox full or failing)".to_owned(),
                self.outbox_retries.to_string(),
            ),
            ("CPU during the window".to_owned(), self.cpu.to_string()),
            (
                "drain after the window (every outbox empty)".to_owned(),
                self.drain.map_or_else(
                    || "not reached".to_owned(),
                    |d| format!("{:.1} s", d.as_secs_f64()),
                ),
            ),
            (
                "accepted in total / stored in total".to_owned(),
                format!(
                    "{} / {}{}",
                    self.accepted_total,
                    self.stored_total,
                    if self.accepted_total == self.stored_total {
                        " (equal)"
                    } else {
                        " (DIFFERENT)"
                    }
                ),
            ),
        ];
        for (name, value) in rows {
            writeln!(f, "| {name} | {value} |")?;
        }
        Ok(())
    }
}
