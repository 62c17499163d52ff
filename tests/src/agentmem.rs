//! `fleet-bench agent-memory`: resident memory of the real terminal agent (`pf-agent run`, the
//! same code as `posfleet-agent run`), idle and connected, then with transactions queued while
//! the controller is down, then after they drained; beside it, as a peer holding the same
//! kind of session, Mosquitto's `mosquitto_sub` connected to the same edge with a device
//! certificate of its own.
//!
//! 1. `pf-broker serve` (log level `warn`). Two device bundles are issued: the agent's and the
//!    peer's (a second device, so that neither takes the other's session over).
//! 2. The agent starts with the shipped defaults of every interval (heartbeat 10 s, telemetry
//!    30 s, keep-alive 30 s; simulated sensors) and the peer subscribes to its own downlink
//!    topic at QoS 1 with a 30 s keep-alive, over mTLS. Once the agent reports `connected` on
//!    its local API, both are left alone for `--settle` (by default longer than a telemetry
//!    interval, so every periodic task has run), then their RSS is sampled every 250 ms for
//!    `--window`.
//! 3. The broker is SIGKILLed; once the agent reports `connected: false`, a payment
//!    application submits `--queued` transactions through the local API (4 at a time), and
//!    the agent's RSS is sampled through the submission and for `--window` once the outbox
//!    holds them all.
//! 4. The broker is restarted; once the outbox is empty again, the agent is sampled for
//!    `--window` once more.
//!
//! At the end of each window the agent's mappings are read from `/proc/PID/smaps` and put in
//! classes (`crate::memmap`), with its threads by name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use posfleet_agent::simulate::transactions::TxnGenerator;
use posfleet_proto::{DeviceId, Filter, now_ms};
use tokio::time::Instant;

use crate::agent::{Agent, AgentOptions};
use crate::bench::start_fleet_broker;
use crate::bins::Binaries;
use crate::broker::Broker;
use crate::eventually::try_eventually;
use crate::host::{Machine, rss_bytes};
use crate::localapi::LocalApiClient;
use crate::memmap::MemoryMap;
use crate::process::Process;

/// Debian's `mosquitto-clients`.
pub const DEFAULT_PEER: &str = "/usr/bin/mosquitto_sub";
/// Between two RSS samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Transactions in flight from the payment application.
const SUBMITTERS: usize = 4;
const AGENT_ID: &str = "MEM-AGENT-1";
const PEER_ID: &str = "MEM-PEER-1";

/// Parameters of `fleet-bench agent-memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentMemoryBench {
    /// Transactions queued while the controller is down.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub queued: u32,
    /// Idle and connected for this long before the first window.
    #[arg(long, value_name = "DURATION", default_value = "40s", value_parser = posfleet_runtime::value::parse_duration)]
    pub settle: Duration,
    /// Length of each sampling window.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = posfleet_runtime::value::parse_duration)]
    pub window: Duration,
    /// The agent binary to measure (default: `pf-agent` beside this program, the release
    /// build); e.g. `target/terminal/posfleet-agent`, the agent as built for terminals.
    #[arg(long, value_name = "PATH")]
    pub agent_binary: Option<PathBuf>,
    /// `[outbox] cache_capacity_bytes` of the agent (default: the shipped default).
    #[arg(long, value_name = "BYTES")]
    pub outbox_cache_bytes: Option<u64>,
    /// The peer client (`mosquitto_sub`); "none" to run without it.
    #[arg(long, default_value = DEFAULT_PEER)]
    pub peer: String,
    /// Bound on each wait (connected, queued, drained).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = posfleet_runtime::value::parse_duration)]
    pub timeout: Duration,
}

/// RSS samples of one process over one window.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Bytes, in the order taken.
    pub rss: Vec<u64>,
}

impl Samples {
    pub fn max(&self) -> u64 {
        self.rss.iter().copied().max().unwrap_or(0)
    }

    pub fn median(&self) -> u64 {
        let mut sorted = self.rss.clone();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied().unwrap_or(0)
    }
}

impl fmt::Display for Samples {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / 1_048_576.0;
        write!(
            f,
            "median {:.2} MiB, max {:.2} MiB ({} samples)",
            mib(self.median()),
            mib(self.max()),
            self.rss.len()
        )
    }
}

/// One phase: the agent's (and maybe the peer's) samples, the agent's map at its end.
#[derive(Debug, Clone)]
pub struct Phase {
    pub agent: Samples,
    pub peer: Option<Samples>,
    pub map: MemoryMap,
}

/// Everything `fleet-bench agent-memory` measured.
#[derive(Debug, Clone)]
pub struct AgentMemoryReport {
    pub params: AgentMemoryBench,
    pub machine: Machine,
    pub agent_binary: PathBuf,
    pub binary_size: u64,
    pub idle: Phase,
    /// Through the submission of the queued transactions.
    pub submitting: Samples,
    pub submit_time: Duration,
    pub queued: Phase,
    pub drain_time: Duration,
    pub drained: Phase,
}

/// Runs the benchmark; `progress` receives one line per phase.
pub async fn run_agent_memory(
    bins: &Binaries,
    params: AgentMemoryBench,
    progress: impl Fn(&str),
) -> anyhow::Result<AgentMemoryReport> {
    let machine = Machine::describe();
    progress(&format!("machine: {machine}"));
    let peer_program = (params.peer != "none").then(|| PathBuf::from(&params.peer));
    if let Some(program) = &peer_program
        && !program.is_file()
    {
        bail!(
            "{} is missing: install Debian's mosquitto-clients, or pass --peer none",
            program.display()
        );
    }
    let mut bins = bins.clone();
    if let Some(agent) = &params.agent_binary {
        if !agent.is_file() {
            bail!("--agent-binary {}: no such file", agent.display());
        }
        bins.agent = agent.clone();
    }
    let mut broker = start_fleet_broker(&bins, params.timeout).await?;
    let opts = AgentOptions {
        heartbeat_interval: posfleet_agent::config::DEFAULT_HEARTBEAT_INTERVAL,
        telemetry_interval: posfleet_agent::config::DEFAULT_TELEMETRY_INTERVAL,
        keep_alive: posfleet_agent::config::DEFAULT_KEEP_ALIVE,
        backoff_initial: Duration::from_millis(500),
        backoff_max: Duration::from_secs(2),
        ..AgentOptions::default()
    };
    let extra = params
        .outbox_cache_bytes
        .map(|bytes| format!("\n[outbox]\ncache_capacity_bytes = {bytes}\n"))
        .unwrap_or_default();
    let mut agent = Agent::start_with(&broker, AGENT_ID, &opts, &broker.mqtt_url(), &extra)?;
    let api = agent.local_api();
    let mut peer = match &peer_program {
        Some(program) => Some(start_peer(&broker, program)?),
        None => None,
    };
    wait_status(&api, params.timeout, "the agent connected", |s| s.connected).await?;
    progress(&format!(
        "agent connected; idle for {:?} before sampling",
        params.settle
    ));
    tokio::time::sleep(params.settle).await;
    let agent_pid = agent.process()?.pid();
    let idle = phase(agent_pid, peer.as_ref().map(Process::pid), params.window).await?;
    progress(&format!("idle and connected: agent {}", idle.agent));

    broker.kill9().await?;
    wait_status(
        &api,
        params.timeout,
        "the agent noticed the broker is gone",
        |s| !s.connected,
    )
    .await?;
    progress(&format!(
        "broker killed; submitting {} transactions",
        params.queued
    ));
    let started = Instant::now();
    let submitting = {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = tokio::spawn(sample_until(agent_pid, Arc::clone(&stop)));
        let submitted = submit(&api, params.queued, params.timeout).await;
        stop.store(true, Ordering::Release);
        let samples = sampler.await.context("the sampler panicked")?;
        submitted?;
        samples
    };
    let submit_time = started.elapsed();
    let queued_count = u64::from(params.queued);
    wait_status(
        &api,
        params.timeout,
        "the outbox holds every transaction",
        |s| s.outbox.depth == queued_count,
    )
    .await?;
    let queued = phase(agent_pid, None, params.window).await?;
    progress(&format!(
        "{} queued (submitted in {submit_time:.1?}): agent {}",
        params.queued, queued.agent
    ));

    broker.restart().await?;
    let started = Instant::now();
    wait_status(&api, params.timeout, "the outbox drained", |s| {
        s.outbox.depth == 0
    })
    .await?;
    let drain_time = started.elapsed();
    let drained = phase(agent_pid, None, params.window).await?;
    progress(&format!(
        "drained in {drain_time:.1?}: agent {}",
        drained.agent
    ));

    let binary_size = std::fs::metadata(&bins.agent).map_or(0, |m| m.len());
    if let Some(mut peer) = peer.take() {
        let _ = peer.terminate(Duration::from_secs(5)).await;
    }
    agent.terminate().await?;
    drop(broker);
    Ok(AgentMemoryReport {
        params,
        machine,
        agent_binary: bins.agent.clone(),
        binary_size,
        idle,
        submitting,
        submit_time,
        queued,
        drain_time,
        drained,
    })
}

/// `mosquitto_sub` as device [`PEER_ID`], subscribed to its own downlink topic.
fn start_peer(broker: &Broker, program: &Path) -> anyhow::Result<Process> {
    let dir = broker.scratch_dir("peer")?;
    let bundle = broker.issue_bundle(PEER_ID, &dir)?;
    let addr = broker.mqtt_addr();
    let topic = Filter::device_downlink(&DeviceId::new(PEER_ID)?).to_string();
    let port = addr.port().to_string();
    let host = addr.ip().to_string();
    let args: Vec<std::ffi::OsString> = vec![
        "-h".into(),
        host.into(),
        "-p".into(),
        port.into(),
        "--cafile".into(),
        bundle.ca.into(),
        "--cert".into(),
        bundle.cert.into(),
        "--key".into(),
        bundle.key.into(),
        // The edge's certificate names the fleet, not the loopback address it listens on.
        "--insecure".into(),
        "-i".into(),
        PEER_ID.into(),
        "-q".into(),
        "1".into(),
        "-k".into(),
        "30".into(),
        "-t".into(),
        topic.into(),
    ];
    Process::spawn("mosquitto_sub", program, args, &broker.log_dir(), "peer")
}

/// Polls the agent's status until `cond` holds.
async fn wait_status(
    api: &LocalApiClient,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&crate::localapi::AgentStatus) -> bool,
) -> anyhow::Result<()> {
    try_eventually(timeout, || async {
        let status = api.status().await?;
        anyhow::ensure!(cond(&status), "not yet: {what} ({status:?})");
        Ok(())
    })
    .await
}

/// Samples the agent (and the peer) for `window`, then reads the agent's map.
async fn phase(agent: u32, peer: Option<u32>, window: Duration) -> anyhow::Result<Phase> {
    let mut agent_samples = Samples::default();
    let mut peer_samples = peer.map(|_| Samples::default());
    let end = Instant::now() + window;
    while Instant::now() < end {
        agent_samples.rss.push(rss_bytes(agent)?);
        if let (Some(pid), Some(samples)) = (peer, peer_samples.as_mut()) {
            samples.rss.push(rss_bytes(pid)?);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    Ok(Phase {
        agent: agent_samples,
        peer: peer_samples,
        map: MemoryMap::of(agent)?,
    })
}

async fn sample_until(pid: u32, stop: Arc<AtomicBool>) -> Samples {
    let mut samples = Samples::default();
    while !stop.load(Ordering::Acquire) {
        if let Ok(rss) = rss_bytes(pid) {
            samples.rss.push(rss);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    samples
}

/// Submits `count` generated transactions, [`SUBMITTERS`] at a time; each must be answered 201.
async fn submit(api: &LocalApiClient, count: u32, timeout: Duration) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + timeout;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..SUBMITTERS {
        let api = api.clone();
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut generator = TxnGenerator::new(index, rand::random());
            while next.fetch_add(1, Ordering::AcqRel) < u64::from(count) {
                let body = serde_json::to_value(generator.next_transaction(now_ms()))
                    .context("a generated transaction does not encode")?;
                let answer = api.post_transaction(&body).await?;
                if answer.status != 201 {
                    bail!("POST /v1/transactions: {answer:?}");
                }
                if Instant::now() > deadline {
                    bail!("the submission took longer than {timeout:?}");
                }
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a submitter panicked")??;
    }
    Ok(())
}

impl fmt::Display for AgentMemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        let mib = |b: u64| b as f64 / 1_048_576.0;
        writeln!(f, "fleet-bench agent-memory")?;
        writeln!(f, "  machine:         {}", self.machine)?;
        writeln!(
            f,
            "  agent:           {} run ({:.1} MiB file), shipped intervals; windows of {:?} after {:?} idle",
            self.agent_binary.display(),
            mib(self.binary_size),
            p.window,
            p.settle
        )?;
        writeln!(f, "  idle, connected: agent {}", self.idle.agent)?;
        if let Some(peer) = &self.idle.peer {
            writeln!(
                f,
                "                   peer  {peer} (mosquitto_sub, mTLS, QoS 1 subscription)"
            )?;
            if peer.median() > 0 {
                writeln!(
                    f,
                    "                   agent / peer (medians): {:.2}",
                    self.idle.agent.median() as f64 / peer.median() as f64
                )?;
            }
        }
        writeln!(f, "{}", self.idle.map)?;
        writeln!(
            f,
            "  submitting {}:  agent {} (submitted in {:.1?}, {} at a time)",
            p.queued, self.submitting, self.submit_time, SUBMITTERS
        )?;
        writeln!(f, "  {} queued:     agent {}", p.queued, self.queued.agent)?;
        writeln!(f, "{}", self.queued.map)?;
        writeln!(
            f,
            "  drained:         agent {} (outbox empty {:.1?} after the broker restarted)",
            self.drained.agent, self.drain_time
        )?;
        write!(f, "{}", self.drained.map)
    }
}
