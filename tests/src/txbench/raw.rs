//! `fleet-bench ingest-raw`: the controller's durable ingest alone, driven by a light
//! generator (issue 12, item 2): N MQTT sessions with device certificates publishing
//! pre-encoded `TransactionBatch`es, without the terminals' local API and outbox.
//!
//! 1. `pf-broker serve` (log level `warn`; `--tx-queue-records` passed on if given).
//! 2. N device keys and certificates, issued and recorded through the admin API (as the
//!    simulator's are); every terminal's transactions are generated (the simulator's
//!    generator, validated as the agent validates them), numbered 1, 2, … and encoded into
//!    batches of `--batch` before anything is sent.
//! 3. N sessions (rumqttc over mTLS, as the agent's) each subscribe to their downlink topic and
//!    publish their batches at QoS 1 at `--tx-rate / N` transactions per second each, with at
//!    most `--in-flight` batches unacknowledged, as an agent does. An acknowledgement
//!    (`TransactionAck`) releases what it covers; one with `retry_after_ms` holds the session
//!    that long and one with `gap` makes it send again from the first unacknowledged batch,
//!    as the agent does (without its jitter).
//! 4. Over `--duration` after `--warmup`: transactions offered (first sends), stored by the
//!    controller (`posfleet_tx_stored_total`), acknowledged back; publish → acknowledgement
//!    latency of the batches acknowledged in the window; CPU of the broker and of this process (the
//!    generator).
//! 5. Generation stops; once every batch is acknowledged the controller must hold exactly
//!    what was sent.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use posfleet_agent::simulate::transactions::TxnGenerator;
use posfleet_agent::simulate::{ApiIssuer, CertIssuer, MAX_ISSUE_BATCH, key_requests};
use posfleet_proto::pb;
use posfleet_proto::{Channel, DeviceId, Filter, Topic, now_ms};
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bins::Binaries;
use crate::eventually::try_eventually;
use crate::host::{Machine, cpu_seconds};
use crate::txdriver::histogram::Histogram;

use super::start_broker;

/// Parameters of `fleet-bench ingest-raw`.
#[derive(Debug, Clone, clap::Args)]
pub struct RawIngestBench {
    /// MQTT sessions (terminals).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub terminals: u32,
    /// Transactions per second offered by all sessions together.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    pub tx_rate: u32,
    /// Transactions per published batch.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub batch: u32,
    /// Unacknowledged batches per session (the agent's `max_in_flight` is 4).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub in_flight: u32,
    /// Before the measurement window.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = posfleet_runtime::value::parse_duration)]
    pub warmup: Duration,
    /// The measurement window.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = posfleet_runtime::value::parse_duration)]
    pub duration: Duration,
    /// The controller's queue budget (`serve --tx-queue-records`; default: the shipped one).
    #[arg(long)]
    pub tx_queue_records: Option<u64>,
    /// Bound on each wait (issuing, connecting, draining).
    #[arg(long, value_name = "DURATION", default_value = "180s", value_parser = posfleet_runtime::value::parse_duration)]
    pub timeout: Duration,
}

/// Counters shared by the sessions.
#[derive(Debug, Default)]
struct Counters {
    /// Transactions published for the first time.
    offered: AtomicU64,
    /// Transactions acknowledged (covered by a `durable_through_seq` for the first time).
    acked: AtomicU64,
    /// Batches published again (after a gap, a retry-after or a reconnect).
    resent: AtomicU64,
    retry_after: AtomicU64,
    gaps: AtomicU64,
    /// Sessions connected at least once.
    connected: AtomicU64,
    /// Connections lost after the first.
    reconnects: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    offered: u64,
    acked: u64,
    resent: u64,
    retry_after: u64,
    gaps: u64,
    reconnects: u64,
}

impl Counters {
    fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        Snapshot {
            offered: get(&self.offered),
            acked: get(&self.acked),
            resent: get(&self.resent),
            retry_after: get(&self.retry_after),
            gaps: get(&self.gaps),
            reconnects: get(&self.reconnects),
        }
    }
}

/// Everything `fleet-bench ingest-raw` measured.
#[derive(Debug, Clone)]
pub struct RawIngestReport {
    pub params: RawIngestBench,
    pub machine: Machine,
    pub connect_time: Duration,
    pub window: Duration,
    pub offered_per_s: f64,
    pub stored_per_s: f64,
    pub acked_per_s: f64,
    pub resent_per_s: f64,
    pub retry_after_per_s: f64,
    pub gaps_per_s: f64,
    pub reconnects: u64,
    /// The controller's group commits in the window (its `/metrics`): per second, mean
    /// duration (ms) and mean transactions per commit.
    pub commits_per_s: f64,
    pub commit_mean_ms: f64,
    pub commit_mean_records: f64,
    /// Publish → acknowledgement of the batches acknowledged in the window.
    pub latency: Histogram,
    /// Share of one CPU over the window.
    pub broker_cpu: f64,
    pub generator_cpu: f64,
    pub drain: Duration,
    pub sent_total: u64,
    pub stored_total: u64,
    pub duplicates_total: u64,
}

/// One terminal's pre-encoded batches.
struct Script {
    id: DeviceId,
    tls: Arc<rustls::ClientConfig>,
    /// (payload, last seq, transactions in it).
    batches: Vec<(Bytes, u64, u64)>,
}

/// Runs the benchmark; `progress` receives one line per phase.
pub async fn run_raw_ingest(
    bins: &Binaries,
    params: RawIngestBench,
    progress: impl Fn(&str),
) -> anyhow::Result<RawIngestReport> {
    let machine = Machine::describe();
    progress(&format!("machine: {machine}"));
    let mut extra: Vec<String> = crate::bench::SINGLE_ADDRESS_FLEET
        .iter()
        .map(|a| a.to_string())
        .collect();
    if let Some(records) = params.tx_queue_records {
        extra.extend(["--tx-queue-records".to_owned(), records.to_string()]);
    }
    let broker = start_broker(bins, params.timeout, extra).await?;
    let n = params.terminals as usize;
    let per_terminal_rate = f64::from(params.tx_rate) / n as f64;
    // Sessions start publishing as they connect, before the warm-up is timed: half as much
    // again plus 2 s, so that no session runs out of transactions before the window ends.
    let span = (params.warmup + params.duration).mul_f64(1.5) + Duration::from_secs(2);
    let per_terminal = (per_terminal_rate * span.as_secs_f64()).ceil() as u64 + 1;

    let issued = tokio::time::timeout(params.timeout, issue(&broker, n))
        .await
        .context("issuing the certificates took too long")??;
    progress(&format!("{n} certificates issued"));
    let batch = u64::from(params.batch);
    let scripts = tokio::task::spawn_blocking(move || script_all(issued, per_terminal, batch))
        .await
        .context("encoding panicked")??;
    progress(&format!(
        "{} transactions encoded in batches of {batch}",
        per_terminal * n as u64
    ));

    let counters = Arc::new(Counters::default());
    let latency = Arc::new(Mutex::new(Histogram::default()));
    let cancel = CancellationToken::new();
    let addr = broker.mqtt_addr();
    let started = Instant::now();
    let interval = Duration::from_secs_f64(batch as f64 / per_terminal_rate);
    let plan = Plan {
        host: addr.ip().to_string(),
        port: addr.port(),
        interval,
        in_flight: params.in_flight as usize,
        counters: Arc::clone(&counters),
        latency: Arc::clone(&latency),
        generation: CancellationToken::new(),
        cancel: cancel.clone(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, script) in scripts.into_iter().enumerate() {
        // Phases spread over one interval so that the sessions do not publish in step.
        let phase = interval.mul_f64(i as f64 / n as f64);
        tasks.spawn(session(plan.clone(), script, phase));
    }
    let all_connected = try_eventually(params.timeout, || async {
        let connected = counters.connected.load(Ordering::Acquire);
        anyhow::ensure!(
            connected >= n as u64,
            "{connected} of {n} sessions connected"
        );
        Ok(())
    })
    .await;
    if let Err(error) = all_connected {
        cancel.cancel();
        return Err(error);
    }
    let connect_time = started.elapsed();
    progress(&format!("{n} sessions connected in {connect_time:.1?}"));
    // Every session starts publishing once connected; the warm-up counts from now.
    tokio::time::sleep(params.warmup).await;
    let broker_pid = broker.process()?.pid();
    let me = std::process::id();
    let scrape_before = broker.api().metrics().await?;
    let cpu_before = (cpu_seconds(broker_pid)?, cpu_seconds(me)?);
    let counts_before = counters.snapshot();
    let latency_before = lock(&latency).clone();
    let measured_from = Instant::now();
    tokio::time::sleep(params.duration).await;
    let window = measured_from.elapsed();
    let counts_after = counters.snapshot();
    let cpu_after = (cpu_seconds(broker_pid)?, cpu_seconds(me)?);
    let scrape_after = broker.api().metrics().await?;
    let latency_window = lock(&latency).since(&latency_before);
    progress("window over; stopping generation and draining");

    plan.generation.cancel();
    let drain_started = Instant::now();
    let sent_total = try_eventually(params.timeout, || async {
        let snap = counters.snapshot();
        anyhow::ensure!(
            snap.acked >= snap.offered,
            "offered {}, acknowledged {}",
            snap.offered,
            snap.acked
        );
        Ok(snap.offered)
    })
    .await
    .context("not every batch was acknowledged")?;
    let drain = drain_started.elapsed();
    cancel.cancel();
    while let Some(done) = tasks.join_next().await {
        done.context("a session panicked")??;
    }
    let final_scrape = broker.api().metrics().await?;
    let stored_total = final_scrape.value("posfleet_tx_stored_total", &[]) as u64;
    let duplicates_total = final_scrape.value("posfleet_tx_duplicates_total", &[]) as u64;
    drop(broker);

    let secs = window.as_secs_f64();
    let per_s = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / secs;
    let metric = |name: &str| scrape_after.value(name, &[]) - scrape_before.value(name, &[]);
    Ok(RawIngestReport {
        params,
        machine,
        connect_time,
        window,
        offered_per_s: per_s(counts_after.offered, counts_before.offered),
        stored_per_s: metric("posfleet_tx_stored_total") / secs,
        acked_per_s: per_s(counts_after.acked, counts_before.acked),
        resent_per_s: per_s(counts_after.resent, counts_before.resent),
        retry_after_per_s: per_s(counts_after.retry_after, counts_before.retry_after),
        gaps_per_s: per_s(counts_after.gaps, counts_before.gaps),
        reconnects: counts_after.reconnects,
        commits_per_s: metric("posfleet_tx_commit_seconds_count") / secs,
        commit_mean_ms: 1000.0 * metric("posfleet_tx_commit_seconds_sum")
            / metric("posfleet_tx_commit_seconds_count").max(1.0),
        commit_mean_records: metric("posfleet_tx_commit_batch_size_sum")
            / metric("posfleet_tx_commit_batch_size_count").max(1.0),
        latency: latency_window,
        broker_cpu: (cpu_after.0 - cpu_before.0) / secs,
        generator_cpu: (cpu_after.1 - cpu_before.1) / secs,
        drain,
        sent_total,
        stored_total,
        duplicates_total,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keys and certificates for `RAW-00000` … through the admin API.
async fn issue(
    broker: &crate::broker::Broker,
    n: usize,
) -> anyhow::Result<Vec<(DeviceId, Arc<rustls::ClientConfig>)>> {
    let client_file = broker.data_dir().join("posctl.json");
    let issuer = tokio::task::spawn_blocking(move || ApiIssuer::from_client_file(&client_file))
        .await
        .context("reading posctl.json panicked")??;
    let ca_pem = tokio::fs::read(broker.pki().ca_cert())
        .await
        .context("reading the fleet CA")?;
    let roots = posfleet_runtime::tls::root_store_from_pem(&ca_pem)?;
    let ids: Vec<DeviceId> = (0..n)
        .map(|i| DeviceId::new(format!("RAW-{i:05}")))
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(n);
    for chunk in ids.chunks(MAX_ISSUE_BATCH) {
        let owned = chunk.to_vec();
        let (keys, requests) = tokio::task::spawn_blocking(move || key_requests(&owned))
            .await
            .context("key generation panicked")??;
        let certs = issuer.issue(requests).await?;
        if certs.len() != chunk.len() {
            bail!(
                "the controller issued {} of {} certificates",
                certs.len(),
                chunk.len()
            );
        }
        for ((id, key), cert) in chunk.iter().zip(keys).zip(certs) {
            let tls = posfleet_runtime::tls::client_config_with_roots(
                Arc::clone(&roots),
                cert.as_bytes(),
                key.as_bytes(),
            )?;
            out.push((id.clone(), tls));
        }
    }
    Ok(out)
}

/// Every terminal's transactions, numbered from 1, in batches of `batch`.
fn script_all(
    issued: Vec<(DeviceId, Arc<rustls::ClientConfig>)>,
    per_terminal: u64,
    batch: u64,
) -> anyhow::Result<Vec<Script>> {
    let now = now_ms();
    issued
        .into_iter()
        .enumerate()
        .map(|(index, (id, tls))| {
            let mut generator = TxnGenerator::new(index, index as u64);
            let mut batches = Vec::new();
            let mut seq = 0u64;
            while seq < per_terminal {
                let count = batch.min(per_terminal - seq);
                let mut transactions = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    seq += 1;
                    let valid = generator.next_transaction(now).validate().map_err(|r| {
                        anyhow::anyhow!("a generated transaction is refused: {r:?}")
                    })?;
                    transactions.push(valid.sequenced(seq));
                }
                let payload = pb::TransactionBatch { transactions }.encode_to_vec();
                batches.push((Bytes::from(payload), seq, count));
            }
            Ok(Script { id, tls, batches })
        })
        .collect()
}

/// What every session shares.
#[derive(Clone)]
struct Plan {
    host: String,
    port: u16,
    /// Between two batches of one session.
    interval: Duration,
    in_flight: usize,
    counters: Arc<Counters>,
    latency: Arc<Mutex<Histogram>>,
    /// Cancelled when no more first sends may go out (resends still do).
    generation: CancellationToken,
    /// Cancelled when the sessions end.
    cancel: CancellationToken,
}

/// One session: connect, subscribe, publish the script paced and windowed, follow the acks;
/// reconnects (with everything unacknowledged sent again) if the connection drops.
async fn session(plan: Plan, script: Script, phase: Duration) -> anyhow::Result<()> {
    let Script { id, tls, batches } = script;
    let mut opts = MqttOptions::new(id.as_str(), plan.host.clone(), plan.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(u16::try_from(plan.in_flight.max(1) * 2).unwrap_or(u16::MAX));
    let (client, mut eventloop) = AsyncClient::new(opts, plan.in_flight * 4 + 8);
    let up = Topic::for_device(&id, Channel::Transactions).to_string();
    let filter = Filter::device_downlink(&id).to_string();
    let ack_topic = Topic::for_device(&id, Channel::TransactionAck).to_string();

    // Batches [first_unacked, next) are out; `sent_at[i]` is when batch i first went out.
    let mut first_unacked = 0usize;
    let mut next = 0usize;
    let mut sent_at: VecDeque<Instant> = VecDeque::new();
    let mut ever_sent = 0usize;
    let mut connected_once = false;
    let mut counted = false;
    let mut subscribed = false;
    let mut hold_until: Option<Instant> = None;
    let mut due = Instant::now() + phase;
    loop {
        let generating = !plan.generation.is_cancelled();
        let can_send = subscribed
            && (generating || next < ever_sent)
            && next < batches.len()
            && next - first_unacked < plan.in_flight
            && hold_until.is_none_or(|t| Instant::now() >= t);
        let wake = if can_send {
            // A first send waits for its time slot; a resend goes at once.
            if next < ever_sent {
                Instant::now()
            } else {
                due
            }
        } else {
            hold_until.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
        };
        tokio::select! {
            () = plan.cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep_until(wake), if can_send || hold_until.is_some() => {
                if let Some(t) = hold_until && Instant::now() >= t {
                    hold_until = None;
                }
                if !can_send {
                    continue;
                }
                let first_time = next >= ever_sent;
                if first_time && plan.generation.is_cancelled() {
                    continue;
                }
                let (payload, _, count) = &batches[next];
                if client
                    .try_publish(&up, QoS::AtLeastOnce, false, payload.clone())
                    .is_err()
                {
                    // The request channel is full: try again at the next wake.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                if first_time {
                    plan.counters.offered.fetch_add(*count, Ordering::AcqRel);
                    sent_at.push_back(Instant::now());
                    ever_sent += 1;
                    due += plan.interval;
                } else {
                    plan.counters.resent.fetch_add(1, Ordering::AcqRel);
                }
                next += 1;
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if connected_once {
                        plan.counters.reconnects.fetch_add(1, Ordering::AcqRel);
                    } else {
                        connected_once = true;
                    }
                    subscribed = false;
                    // Everything unacknowledged goes again on the new connection.
                    next = first_unacked;
                    let _ = client.try_subscribe(&filter, QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if !counted {
                        counted = true;
                        plan.counters.connected.fetch_add(1, Ordering::AcqRel);
                    }
                    subscribed = true;
                    if ever_sent == 0 {
                        due = Instant::now() + phase;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                    let ack = pb::TransactionAck::decode(p.payload.as_ref())
                        .context("a TransactionAck that does not decode")?;
                    if ack.retry_after_ms > 0 {
                        plan.counters.retry_after.fetch_add(1, Ordering::AcqRel);
                        hold_until = Some(Instant::now() + Duration::from_millis(u64::from(ack.retry_after_ms)));
                        next = first_unacked;
                        continue;
                    }
                    let now = Instant::now();
                    while first_unacked < ever_sent && batches[first_unacked].1 <= ack.durable_through_seq {
                        let count = batches[first_unacked].2;
                        plan.counters.acked.fetch_add(count, Ordering::AcqRel);
                        if let Some(at) = sent_at.pop_front() {
                            lock(&plan.latency).record(now - at);
                        }
                        first_unacked += 1;
                    }
                    next = next.max(first_unacked);
                    if ack.gap {
                        plan.counters.gaps.fetch_add(1, Ordering::AcqRel);
                        next = first_unacked;
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    subscribed = false;
                    // rumqttc reconnects on the next poll; do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

impl fmt::Display for RawIngestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_owned(), |d| {
                format!("{:.1} ms", d.as_secs_f64() * 1000.0)
            })
        };
        writeln!(f, "fleet-bench ingest-raw")?;
        writeln!(f, "  machine:          {}", self.machine)?;
        writeln!(
            f,
            "  load:             {} sessions, {} transactions/s asked, batches of {}, {} in flight; {:?} warm-up, {:.1?} window",
            p.terminals, p.tx_rate, p.batch, p.in_flight, p.warmup, self.window
        )?;
        writeln!(f, "  connected in:     {:.1?}", self.connect_time)?;
        writeln!(f, "  offered:          {:.0} /s", self.offered_per_s)?;
        writeln!(f, "  stored (fsynced): {:.0} /s", self.stored_per_s)?;
        writeln!(f, "  acknowledged:     {:.0} /s", self.acked_per_s)?;
        writeln!(
            f,
            "  publish → ack:    p50 {}, p99 {}, max {} ({} batches)",
            ms(self.latency.quantile(0.5)),
            ms(self.latency.quantile(0.99)),
            ms(self.latency.max()),
            self.latency.count()
        )?;
        writeln!(
            f,
            "  commits:          {:.1} /s, mean {:.1} ms, mean {:.0} transactions each",
            self.commits_per_s, self.commit_mean_ms, self.commit_mean_records
        )?;
        writeln!(
            f,
            "  back-pressure:    {:.1} retry-after acks/s, {:.1} gap acks/s, {:.1} batches resent/s, {} reconnects",
            self.retry_after_per_s, self.gaps_per_s, self.resent_per_s, self.reconnects
        )?;
        writeln!(
            f,
            "  CPU (of one):     broker {:.0}%, generator {:.0}%",
            self.broker_cpu * 100.0,
            self.generator_cpu * 100.0
        )?;
        write!(
            f,
            "  drain:            {:.1?}; sent {} / stored {} ({}), duplicates dropped {}",
            self.drain,
            self.sent_total,
            self.stored_total,
            if self.sent_total == self.stored_total {
                "exact"
            } else {
                "MISMATCH"
            },
            self.duplicates_total
        )
    }
}
