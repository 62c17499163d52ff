//! The driver program (see the module docs of [`super`]).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use posfleet_agent::simulate::transactions::TxnGenerator;
use posfleet_agent::simulate::{SimulatorConfig, SimulatorHandle, run_simulator};
use posfleet_agent::transaction::AcceptError;
use posfleet_agent::{AgentHandle, TransactionRequest};
use posfleet_proto::now_ms;
use posfleet_runtime::backoff::Backoff;
use posfleet_runtime::value::BrokerUrl;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::DriverStatus;
use super::histogram::Histogram;
use super::journal::{Entry, Journal, JournalReplay};

/// How often the status file is rewritten.
const STATUS_EVERY: Duration = Duration::from_millis(200);
/// How often the outboxes are looked at for acknowledgements (the ack latency's resolution).
const ACK_POLL: Duration = Duration::from_millis(5);
/// How often new terminals are looked for while the simulator ramps up.
const START_POLL: Duration = Duration::from_millis(20);
/// Pause before retrying a submission the outbox could not take.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Time the tasks get to finish at SIGTERM.
const GRACE: Duration = Duration::from_secs(10);

/// What the driver runs.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub count: usize,
    pub pki_dir: PathBuf,
    pub broker: BrokerUrl,
    pub id_prefix: String,
    /// The simulator's data dir (its shared outbox is `DIR/outbox`).
    pub data_dir: PathBuf,
    /// Transactions per terminal per minute (Poisson arrivals; 0: only in-doubt ones).
    pub tx_rate_per_minute: f64,
    /// Share of transactions submitted twice.
    pub repeat_probability: f64,
    pub connect_rate: u32,
    pub heartbeat_interval: Duration,
    pub telemetry_interval: Duration,
    pub keep_alive: Duration,
    pub backoff: Backoff,
    /// Outbox: resend unacknowledged entries after this long without progress.
    pub resend_timeout: Option<Duration>,
    /// The journal (ground truth across SIGKILLs), if any.
    pub journal: Option<PathBuf>,
    /// The status file.
    pub status: PathBuf,
}

/// Counters shared by the tasks.
#[derive(Debug, Default)]
struct Counters {
    offered: AtomicU64,
    accepted_new: AtomicU64,
    repeats: AtomicU64,
    repeat_mismatches: AtomicU64,
    resolved_stored: AtomicU64,
    resolved_new: AtomicU64,
    unresolved: AtomicU64,
    refused: AtomicU64,
    outbox_retries: AtomicU64,
    journal_errors: AtomicU64,
    acked: AtomicU64,
    tills_running: AtomicU64,
}

/// Everything the tasks share.
struct Shared {
    cfg: DriverConfig,
    sim: SimulatorHandle,
    journal: Option<Journal>,
    /// In-doubt requests from the journal, taken by each terminal's task at its start.
    unresolved: Mutex<HashMap<String, Vec<TransactionRequest>>>,
    /// Cancelled when generating stops (or from the start with no rate), so that a till
    /// waiting for its next (Poisson) arrival ends at once instead of after its wait (with
    /// 10,000 terminals at 6 a minute the longest wait is ~90 s, which a drain measurement
    /// would otherwise include).
    generation_stopped: CancellationToken,
    counters: Counters,
    /// Per terminal index: (seq, accepted at) not yet seen acknowledged.
    tracks: Vec<Mutex<VecDeque<(u64, Instant)>>>,
    accept_latency: Mutex<Histogram>,
    ack_latency: Mutex<Histogram>,
}

/// Runs until SIGTERM/SIGINT (see the module docs of [`super`]).
pub async fn run_driver(cfg: DriverConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;

    let replay = match &cfg.journal {
        Some(path) => JournalReplay::load(path)?,
        None => JournalReplay::default(),
    };
    let journal = cfg.journal.as_deref().map(Journal::open).transpose()?;
    if replay.unresolved_count() > 0 || replay.torn > 0 {
        info!(
            in_doubt = replay.unresolved_count(),
            torn = replay.torn,
            "resubmitting the requests a previous driver left in doubt"
        );
    }

    // Certificates are issued and recorded by the controller (its posctl.json beside DATA/pki).
    let client = cfg.pki_dir.with_file_name("posctl.json");
    let issuer =
        posfleet_agent::simulate::ApiIssuer::from_client_file(&client).with_context(|| {
            format!(
                "cannot use the controller's API through {}",
                client.display()
            )
        })?;
    let mut sim_cfg = SimulatorConfig::new(
        cfg.count,
        &cfg.pki_dir,
        cfg.broker.clone(),
        Arc::new(issuer),
    );
    sim_cfg.id_prefix = cfg.id_prefix.clone();
    sim_cfg.data_dir = cfg.data_dir.clone();
    sim_cfg.connect_rate = cfg.connect_rate;
    // The simulator's own tills stay off: the tasks below are the payment applications.
    sim_cfg.tx_rate_per_minute = 0.0;
    sim_cfg.agent.heartbeat_interval = cfg.heartbeat_interval;
    sim_cfg.agent.telemetry_interval = cfg.telemetry_interval;
    sim_cfg.agent.keep_alive = cfg.keep_alive;
    sim_cfg.agent.backoff = cfg.backoff;
    if let Some(resend) = cfg.resend_timeout {
        sim_cfg.outbox.resend_timeout = resend;
    }

    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let sim = run_simulator(sim_cfg, &tracker, cancel.child_token())
        .await
        .context("cannot start the simulated terminals")?;
    let in_doubt = replay.unresolved_count() as u64;
    let shared = Arc::new(Shared {
        tracks: (0..cfg.count).map(|_| Mutex::default()).collect(),
        unresolved: Mutex::new(replay.unresolved),
        generation_stopped: {
            let token = CancellationToken::new();
            if cfg.tx_rate_per_minute <= 0.0 {
                token.cancel();
            }
            token
        },
        counters: Counters {
            unresolved: AtomicU64::new(in_doubt),
            ..Counters::default()
        },
        cfg,
        sim,
        journal,
        accept_latency: Mutex::default(),
        ack_latency: Mutex::default(),
    });

    let tills = cancel.child_token();
    tracker.spawn(start_tills(shared.clone(), tracker.clone(), tills.clone()));
    tracker.spawn(poll_acks(shared.clone(), cancel.child_token()));
    tracker.spawn(write_status_every(shared.clone(), cancel.child_token()));

    loop {
        tokio::select! {
            _ = usr1.recv() => {
                info!("SIGUSR1: no more new transactions");
                shared.generation_stopped.cancel();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping");
    shared.generation_stopped.cancel();
    tills.cancel();
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(GRACE, tracker.wait()).await.is_err() {
        warn!(remaining = tracker.len(), "tasks did not stop in time");
    }
    shared.sim.outbox().close().await;
    write_status(&shared)
}

/// Starts each terminal's payment application as soon as the simulator has started the
/// terminal.
async fn start_tills(shared: Arc<Shared>, tracker: TaskTracker, cancel: CancellationToken) {
    let mut started = 0;
    while started < shared.cfg.count {
        let agents = shared.sim.agents();
        for (index, agent) in agents.into_iter().enumerate().skip(started) {
            shared.counters.tills_running.fetch_add(1, Ordering::AcqRel);
            tracker.spawn(till(shared.clone(), index, agent, cancel.clone()));
            started = index + 1;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(START_POLL) => {}
        }
    }
}

/// One terminal's payment application.
async fn till(shared: Arc<Shared>, index: usize, agent: AgentHandle, cancel: CancellationToken) {
    let device = agent.device_id().to_string();
    let in_doubt = shared
        .unresolved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&device)
        .unwrap_or_default();
    for request in in_doubt {
        let resolved = submit(
            &shared,
            index,
            &agent,
            &request,
            Submission::InDoubt,
            &cancel,
        )
        .await;
        // `None` is a definitive refusal unless the driver is stopping.
        if resolved.is_some() || !cancel.is_cancelled() {
            shared.counters.unresolved.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let rate = shared.cfg.tx_rate_per_minute;
    if rate > 0.0 {
        let mean = Duration::from_secs_f64(60.0 / rate);
        let mut generator = TxnGenerator::new(index, rand::random());
        let mut due = Instant::now() + gap(mean);
        while !shared.generation_stopped.is_cancelled() {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = shared.generation_stopped.cancelled() => break,
                () = tokio::time::sleep_until(due) => {}
            }
            if shared.generation_stopped.is_cancelled() {
                break;
            }
            let request = generator.next_transaction(now_ms());
            shared.counters.offered.fetch_add(1, Ordering::Relaxed);
            let seq = submit(&shared, index, &agent, &request, Submission::New, &cancel).await;
            if let Some(seq) = seq {
                if rand::random_bool(shared.cfg.repeat_probability) {
                    let again = submit(
                        &shared,
                        index,
                        &agent,
                        &request,
                        Submission::Repeat,
                        &cancel,
                    )
                    .await;
                    if again.is_some_and(|s| s != seq) {
                        shared
                            .counters
                            .repeat_mismatches
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            due += gap(mean);
            let now = Instant::now();
            if now > due + Duration::from_secs(1) {
                due = now;
            }
        }
    }
    shared.counters.tills_running.fetch_sub(1, Ordering::AcqRel);
}

/// An exponentially distributed gap with mean `mean` (at most 20 means).
fn gap(mean: Duration) -> Duration {
    let u: f64 = rand::random_range(f64::EPSILON..1.0);
    mean.mul_f64(-u.ln()).min(mean * 20)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Submission {
    /// A new transaction: its intent is journaled first.
    New,
    /// The same request again at once (must be answered 200 with the same seq).
    Repeat,
    /// A request an earlier driver left in doubt (its intent is already in the journal).
    InDoubt,
}

/// Submits `request` until the terminal gives a definitive answer; returns the seq, or `None`
/// if it was refused or the driver is stopping (the request then stays in doubt).
async fn submit(
    shared: &Shared,
    index: usize,
    agent: &AgentHandle,
    request: &TransactionRequest,
    kind: Submission,
    cancel: &CancellationToken,
) -> Option<u64> {
    let device = agent.device_id().to_string();
    let c = &shared.counters;
    if kind == Submission::New {
        journal(
            shared,
            &Entry::Intent {
                d: device.clone(),
                r: request.clone(),
            },
        );
    }
    loop {
        let called = Instant::now();
        match agent.intake().accept(request.clone()).await {
            Ok(accepted) => {
                let answered = Instant::now();
                lock(&shared.accept_latency).record(answered - called);
                journal(
                    shared,
                    &Entry::Accepted {
                        d: device,
                        t: accepted.txn_id,
                        s: accepted.seq,
                        new: accepted.new,
                    },
                );
                if accepted.new {
                    c.accepted_new.fetch_add(1, Ordering::Relaxed);
                    lock(&shared.tracks[index]).push_back((accepted.seq, answered));
                } else {
                    c.repeats.fetch_add(1, Ordering::Relaxed);
                }
                if kind == Submission::InDoubt {
                    let counter = if accepted.new {
                        &c.resolved_new
                    } else {
                        &c.resolved_stored
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                return Some(accepted.seq);
            }
            Err(AcceptError::Outbox(error)) => {
                // Full, failed or closed: nothing definitive; a payment application retries
                // the same request later.
                c.outbox_retries.fetch_add(1, Ordering::Relaxed);
                if cancel.is_cancelled() {
                    return None;
                }
                warn!(device_id = %device, %error, "transaction not accepted yet; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = tokio::time::sleep(RETRY_PAUSE) => {}
                }
            }
            Err(error) => {
                c.refused.fetch_add(1, Ordering::Relaxed);
                warn!(device_id = %device, %error, "transaction refused");
                journal(
                    shared,
                    &Entry::Refused {
                        d: device,
                        t: request.txn_id.clone(),
                        why: error.to_string(),
                    },
                );
                return None;
            }
        }
    }
}

fn journal(shared: &Shared, entry: &Entry) {
    if let Some(journal) = &shared.journal {
        if let Err(error) = journal.write(entry) {
            shared
                .counters
                .journal_errors
                .fetch_add(1, Ordering::Relaxed);
            warn!(error = format!("{error:#}"), "journal write failed");
        }
    }
}

/// Sees acknowledgements: a terminal's entries leave its outbox in seq order when acked, so
/// every seq up to `last_seq - depth` has been acknowledged.
async fn poll_acks(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(ACK_POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut agents = Vec::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        if agents.len() != shared.sim.started() {
            agents = shared.sim.agents();
        }
        let now = Instant::now();
        let mut latencies = Vec::new();
        for (index, agent) in agents.iter().enumerate() {
            let outbox = agent.outbox();
            let through = outbox.last_seq().saturating_sub(outbox.depth());
            let mut track = lock(&shared.tracks[index]);
            while track.front().is_some_and(|(seq, _)| *seq <= through) {
                if let Some((_, accepted)) = track.pop_front() {
                    latencies.push(now - accepted);
                }
            }
        }
        if !latencies.is_empty() {
            shared
                .counters
                .acked
                .fetch_add(latencies.len() as u64, Ordering::Relaxed);
            let mut histogram = lock(&shared.ack_latency);
            for latency in latencies {
                histogram.record(latency);
            }
        }
    }
}

async fn write_status_every(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(STATUS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Err(error) = write_status(&shared) {
            warn!(error = format!("{error:#}"), "cannot write the status file");
        }
    }
}

/// Writes the status file (a temp file renamed over it: readers never see half of it).
fn write_status(shared: &Shared) -> anyhow::Result<()> {
    let c = &shared.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Acquire);
    let agents = shared.sim.agents();
    let (mut valid, mut malformed, mut bogus) = (0, 0, 0);
    for agent in &agents {
        let acks = agent.ack_stats();
        valid += acks.accepted;
        malformed += acks.malformed;
        bogus += acks.bogus;
    }
    let (commit_rounds, commit_writes) = shared.sim.outbox().commit_stats();
    let status = DriverStatus {
        pid: std::process::id(),
        written_at_ms: now_ms(),
        terminals: shared.cfg.count as u64,
        started: agents.len() as u64,
        connected: agents.iter().filter(|a| a.is_connected()).count() as u64,
        generating: !shared.generation_stopped.is_cancelled(),
        tills_running: get(&c.tills_running)
            + (shared.cfg.count - agents.len().min(shared.cfg.count)) as u64,
        offered: get(&c.offered),
        accepted_new: get(&c.accepted_new),
        repeats: get(&c.repeats),
        repeat_mismatches: get(&c.repeat_mismatches),
        resolved_stored: get(&c.resolved_stored),
        resolved_new: get(&c.resolved_new),
        unresolved: get(&c.unresolved),
        refused: get(&c.refused),
        outbox_retries: get(&c.outbox_retries),
        journal_errors: get(&c.journal_errors),
        pending: agents.iter().map(|a| a.outbox().depth()).sum(),
        acked: get(&c.acked),
        accept_latency: lock(&shared.accept_latency).clone(),
        ack_latency: lock(&shared.ack_latency).clone(),
        commit_rounds,
        commit_writes,
        acks_valid: valid,
        acks_malformed: malformed,
        acks_bogus: bogus,
    };
    let path = &shared.cfg.status;
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec(&status).context("encoding the status")?;
    std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every value behind these locks stays consistent at each statement.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
