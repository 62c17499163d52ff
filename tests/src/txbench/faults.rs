//! `fleet-bench faults`: exactly-once delivery at fleet scale under repeated faults.
//!
//! 1. `pf-broker serve`, a [`Proxy`] in front of its MQTT port, `pf-txdriver` with N
//!    terminals connecting through the proxy, journaling every submission and answer.
//! 2. `--kills` faults in turn, cycling through: SIGKILL + restart of the broker; the link
//!    severed (every connection reset) for a moment; SIGKILL + restart of the driver (every
//!    terminal and payment application at once; in-doubt submissions are resubmitted); the link
//!    stalled (nothing relayed, nothing closed) for a few seconds; the link severed and the
//!    broker SIGKILLed meanwhile. After each, the benchmark waits until the controller has
//!    stored `--progress` more transactions: the pipeline flows again end to end (that time is
//!    reported as the recovery time).
//! 3. Stop generating, wait until every outbox is empty, read the whole store back through the
//!    admin API and compare it with the journal: accepted vs stored vs duplicates vs missing.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;

use super::start_broker;
use crate::bench::CpuSpan;
use crate::bins::Binaries;
use crate::broker::Broker;
use crate::eventually::try_eventually;
use crate::host::{Machine, cpu_seconds};
use crate::proxy::Proxy;
use crate::txdriver::{DriverStatus, TxDriver, TxDriverOptions};
use crate::txledger::{Reconciliation, StoredLedger, reconcile};

/// Parameters of `fleet-bench faults`.
#[derive(Debug, Clone, clap::Args)]
pub struct FaultsBench {
    /// Simulated terminals.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub terminals: u32,
    /// Faults to inject (SIGKILLs of broker or terminals, link cuts and stalls, in turn).
    #[arg(long, default_value_t = 20)]
    pub kills: u32,
    /// Transactions per terminal per minute.
    #[arg(long, value_name = "PER_MINUTE", default_value_t = 60.0)]
    pub tx_rate: f64,
    /// Transactions the controller must store after a fault before the next one.
    #[arg(long, default_value_t = 2000)]
    pub progress: u64,
    /// How long a severed link stays down, and a stalled one stalled.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = posfleet_runtime::value::parse_duration)]
    pub outage: Duration,
    /// Bound on each wait (connect, recovery after a fault, drain).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = posfleet_runtime::value::parse_duration)]
    pub timeout: Duration,
}

/// The faults, in the order they are injected (then again from the start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    BrokerKill,
    LinkSevered,
    TerminalsKill,
    LinkStalled,
    SeveredAndBrokerKill,
}

const CYCLE: [Fault; 5] = [
    Fault::BrokerKill,
    Fault::LinkSevered,
    Fault::TerminalsKill,
    Fault::LinkStalled,
    Fault::SeveredAndBrokerKill,
];

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::BrokerKill => "broker SIGKILL + restart",
            Fault::LinkSevered => "link severed (all connections reset)",
            Fault::TerminalsKill => "all terminals SIGKILL + restart",
            Fault::LinkStalled => "link stalled",
            Fault::SeveredAndBrokerKill => "link severed + broker SIGKILL + restart",
        })
    }
}

/// One injected fault.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub fault: Fault,
    /// Fault injected → the store gained `progress` transactions.
    pub recovery: Duration,
    /// Driver only: submissions in doubt at the SIGKILL (answer lost).
    pub in_doubt: usize,
}

/// What `fleet-bench faults` measured.
#[derive(Debug, Clone)]
pub struct FaultsReport {
    pub params: FaultsBench,
    pub machine: Machine,
    pub faults: Vec<FaultRecord>,
    pub duration: Duration,
    pub drain: Duration,
    pub answers: u64,
    pub torn_lines: u64,
    pub refused: usize,
    pub result: Reconciliation,
    pub cpu: CpuSpan,
}

/// Runs the benchmark.
pub async fn run_faults(
    bins: &Binaries,
    driver: &Path,
    params: FaultsBench,
    progress: impl Fn(&str),
) -> anyhow::Result<FaultsReport> {
    let machine = Machine::describe();
    progress(&format!("machine: {machine}"));
    let mut broker = start_broker(bins, params.timeout, Vec::new()).await?;
    let proxy = Proxy::start(broker.mqtt_addr()).await?;
    let opts = TxDriverOptions {
        count: params.terminals as usize,
        id_prefix: "flt-".to_owned(),
        tx_rate: params.tx_rate,
        repeat_probability: 0.01,
        connect_rate: 1_000_000,
        heartbeat_interval: Duration::from_secs(10),
        telemetry_interval: Duration::from_secs(60),
        keep_alive: Duration::from_secs(30),
        backoff_initial: Duration::from_millis(500),
        backoff_max: Duration::from_secs(5),
        journal: true,
        log_filter: "warn".to_owned(),
        ..TxDriverOptions::default()
    };
    let started = Instant::now();
    let mut tx = TxDriver::start(driver, &broker, &proxy.mqtt_url(), &opts)?;
    tx.wait_for(params.timeout, "connected", |s| s.connected == s.terminals)
        .await?;
    progress(&format!(
        "{} terminals connected after {:.1} s; {} transactions/min each",
        params.terminals,
        started.elapsed().as_secs_f64(),
        params.tx_rate
    ));
    // CPU over the whole run: what each killed process had used, plus the last ones'.
    let mut cpu_broker = 0.0;
    let mut cpu_driver = 0.0;
    wait_progress(&broker, 0.0, params.progress as f64, params.timeout).await?;

    let mut faults = Vec::new();
    for i in 0..params.kills {
        let fault = CYCLE[i as usize % CYCLE.len()];
        let injected = Instant::now();
        let mut in_doubt = 0;
        // CPU of processes about to be killed is read before they go.
        let before_kill = cpu_pair(&broker, &tx)?;
        let from = match fault {
            Fault::BrokerKill => {
                broker.kill9().await?;
                broker.restart().await?;
                0.0
            }
            Fault::LinkSevered => {
                let from = stored(&broker).await?;
                proxy.sever();
                tokio::time::sleep(params.outage).await;
                proxy.restore();
                from
            }
            Fault::TerminalsKill => {
                let from = stored(&broker).await?;
                tx.kill9().await?;
                in_doubt = tx.journal()?.unresolved_count();
                tx.restart()?;
                from
            }
            Fault::LinkStalled => {
                let from = stored(&broker).await?;
                proxy.stall();
                tokio::time::sleep(params.outage).await;
                proxy.restore();
                from
            }
            Fault::SeveredAndBrokerKill => {
                proxy.sever();
                broker.kill9().await?;
                broker.restart().await?;
                proxy.restore();
                0.0
            }
        };
        if matches!(fault, Fault::BrokerKill | Fault::SeveredAndBrokerKill) {
            cpu_broker += before_kill.0;
        }
        if fault == Fault::TerminalsKill {
            cpu_driver += before_kill.1;
        }
        wait_progress(&broker, from, params.progress as f64, params.timeout)
            .await
            .with_context(|| format!("no recovery after fault {} ({fault})", i + 1))?;
        let recovery = injected.elapsed();
        progress(&format!(
            "fault {}/{}: {fault}: recovered in {:.1} s{}",
            i + 1,
            params.kills,
            recovery.as_secs_f64(),
            if fault == Fault::TerminalsKill {
                format!(", {in_doubt} submissions in doubt")
            } else {
                String::new()
            }
        ));
        faults.push(FaultRecord {
            fault,
            recovery,
            in_doubt,
        });
    }

    progress("stop generating; waiting for every outbox to drain");
    tx.stop_generating()?;
    let drain_start = Instant::now();
    let status = tx
        .wait_for(params.timeout, "drained", DriverStatus::drained)
        .await?;
    let drain = drain_start.elapsed();
    let duration = started.elapsed();
    let cpu_end = cpu_pair(&broker, &tx)?;
    let cpu = CpuSpan {
        broker: cpu_broker + cpu_end.0,
        simulator: cpu_driver + cpu_end.1,
        wall: duration,
    };
    if status.refused > 0 || status.journal_errors > 0 || status.repeat_mismatches > 0 {
        progress(&format!("driver status: {status:?}"));
    }
    progress("reading the store back");
    let journal = tx.journal()?;
    let devices: Vec<String> = (0..params.terminals)
        .map(|i| format!("flt-{i:05}"))
        .collect();
    let stored = StoredLedger::fetch(broker.api(), devices.iter().map(String::as_str)).await?;
    let result = reconcile(&journal.accepted, &stored);
    if journal.unresolved_count() > 0 {
        bail!(
            "{} submissions still in doubt after the drain",
            journal.unresolved_count()
        );
    }
    let _ = tx.terminate().await;
    let _ = broker.terminate().await;
    Ok(FaultsReport {
        params,
        machine,
        faults,
        duration,
        drain,
        answers: journal.accepted.answers(),
        torn_lines: journal.torn,
        refused: journal.refused.len(),
        result,
        cpu,
    })
}

/// `posfleet_tx_stored_total` of the running broker process.
async fn stored(broker: &Broker) -> anyhow::Result<f64> {
    Ok(broker
        .api()
        .metrics()
        .await?
        .value("posfleet_tx_stored_total", &[]))
}

async fn wait_progress(
    broker: &Broker,
    from: f64,
    n: f64,
    timeout: Duration,
) -> anyhow::Result<()> {
    try_eventually(timeout, || async {
        let now = stored(broker).await?;
        anyhow::ensure!(now >= from + n, "{now} stored, waiting for {}", from + n);
        Ok(())
    })
    .await
}

/// CPU seconds of (broker, driver) so far.
fn cpu_pair(broker: &Broker, tx: &TxDriver) -> anyhow::Result<(f64, f64)> {
    Ok((
        cpu_seconds(broker.process()?.pid())?,
        cpu_seconds(tx.process()?.pid())?,
    ))
}

impl fmt::Display for FaultsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        let r = &self.result;
        writeln!(
            f,
            "fleet-bench faults: {} terminals, {} transactions/min each, {} faults, {:?} outages, {} transactions between faults",
            p.terminals, p.tx_rate, p.kills, p.outage, p.progress
        )?;
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "recovery: from the fault until the controller has stored {} more transactions",
            p.progress
        )?;
        writeln!(f)?;
        writeln!(f, "| measurement | value |")?;
        writeln!(f, "| --- | --- |")?;
        let count = |fault: Fault| self.faults.iter().filter(|r| r.fault == fault).count();
        let recovery = |fault: Fault| {
            let times: Vec<f64> = self
                .faults
                .iter()
                .filter(|r| r.fault == fault)
                .map(|r| r.recovery.as_secs_f64())
                .collect();
            if times.is_empty() {
                "-".to_owned()
            } else {
                let max = times.iter().copied().fold(0.0, f64::max);
                let mean = times.iter().sum::<f64>() / times.len() as f64;
                format!(
                    "{} ×, recovery mean {mean:.1} s, max {max:.1} s",
                    times.len()
                )
            }
        };
        let in_doubt: usize = self.faults.iter().map(|r| r.in_doubt).sum();
        let rows = [
            (
                "run time (connect to drained)".to_owned(),
                format!("{:.1} s", self.duration.as_secs_f64()),
            ),
            (
                format!("{}", Fault::BrokerKill),
                recovery(Fault::BrokerKill),
            ),
            (
                format!("{} for {:?}", Fault::LinkSevered, p.outage),
                recovery(Fault::LinkSevered),
            ),
            (
                format!("{}", Fault::TerminalsKill),
                recovery(Fault::TerminalsKill),
            ),
            (
                format!("{} for {:?}", Fault::LinkStalled, p.outage),
                recovery(Fault::LinkStalled),
            ),
            (
                format!("{}", Fault::SeveredAndBrokerKill),
                recovery(Fault::SeveredAndBrokerKill),
            ),
            (
                "submissions in doubt at a terminal SIGKILL (resubmitted, resolved)".to_owned(),
                format!("{in_doubt} over {} kills", count(Fault::TerminalsKill)),
            ),
            (
                "drain after the last fault".to_owned(),
                format!("{:.1} s", self.drain.as_secs_f64()),
            ),
            (
                "accepted (distinct transactions answered 201/200)".to_owned(),
                format!("{} ({} answers incl. repeats)", r.accepted, self.answers),
            ),
            (
                "stored (rows listed / summaries)".to_owned(),
                format!("{} / {}", r.stored_rows, r.summary_count),
            ),
            (
                "matched (same device, seq, txn id)".to_owned(),
                r.matched.to_string(),
            ),
            (
                "missing (accepted, not stored)".to_owned(),
                r.missing.len().to_string(),
            ),
            (
                "unexpected (stored, never accepted)".to_owned(),
                r.unexpected.len().to_string(),
            ),
            (
                "duplicates (rows twice, txn ids under two seqs)".to_owned(),
                r.duplicates().to_string(),
            ),
            (
                "mismatched (another txn id at an accepted seq)".to_owned(),
                r.mismatched.len().to_string(),
            ),
            (
                "devices with gaps or summary disagreements".to_owned(),
                r.sequence_problems.len().to_string(),
            ),
            (
                "contradictory answers / refusals".to_owned(),
                format!("{} / {}", r.contradictions.len(), self.refused),
            ),
            (
                "journal lines torn by SIGKILL".to_owned(),
                self.torn_lines.to_string(),
            ),
            ("CPU over the run".to_owned(), self.cpu.to_string()),
            (
                "verdict".to_owned(),
                if r.is_exact() {
                    "exactly once".to_owned()
                } else {
                    "NOT EXACT (details below)".to_owned()
                },
            ),
        ];
        for (name, value) in rows {
            writeln!(f, "| {name} | {value} |")?;
        }
        if !r.is_exact() {
            writeln!(f)?;
            write!(f, "{r}")?;
        }
        Ok(())
    }
}
