//! `fleet-bench rollout`: a signed artifact rolled out to a connected simulated fleet.
//!
//! 1. `pf-broker serve`; a release key is generated here, its public key installed as
//!    `DATA/pki/release.pub`, and the broker restarted so that it trusts it.
//! 2. An artifact of `--artifact-mib` MiB of random bytes is signed with that key and uploaded
//!    (`POST /api/v1/artifacts`).
//! 3. `pf-agent simulate --count N` with an install hook that exits 0 at once (the terminals
//!    trust the PKI dir's `release.pub`); wait until all N are online.
//! 4. `POST /api/v1/rollouts` for all N terminals (waves as given, no soak); the rollout view
//!    and `/metrics` are polled every 250 ms until the rollout is completed or aborted.
//!
//! Per wave: members, time from the wave's start to its end (as the controller recorded them),
//! succeeded and failed members, and members × artifact size / duration (the download rate the
//! wave achieved). Overall: the bytes the device endpoint served during the rollout
//! (`posfleet_artifact_bytes_served_total`; equal to N × size unless downloads were resumed or
//! repeated) over the time from the first wave's start to the last wave's end. Every
//! terminal downloads the whole artifact over its own mTLS connection, verifies its SHA-256
//! and release signature, writes it to disk and runs the hook, so the figures include all of
//! that on the terminal side too (the simulator shares the CPUs and the disk with the broker).

use std::fmt;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use posfleet_broker::views::{ArtifactView, RolloutState, RolloutView};
use posfleet_proto::signing::CommandKey;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::api::Api;
use crate::bench::{ConnectBench, start_fleet_broker, start_simulator, wait_for_fleet};
use crate::bins::Binaries;
use crate::host::{Machine, cpu_seconds};
use crate::process::TAIL_LINES;

/// How often the rollout and `/metrics` are polled.
const POLL: Duration = Duration::from_millis(250);
const BYTES_SERVED: &str = "posfleet_artifact_bytes_served_total";

/// Parameters of `fleet-bench rollout`.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutBench {
    /// Simulated terminals.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub terminals: u32,
    /// Artifact size in MiB.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub artifact_mib: u32,
    /// Cumulative wave percentages.
    #[arg(long, default_value = "1,10,50,100", value_delimiter = ',')]
    pub waves: Vec<u32>,
    /// Heartbeat interval of every terminal.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = posfleet_runtime::value::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Bound on each wait (all connected; the whole rollout).
    #[arg(long, value_name = "DURATION", default_value = "1800s", value_parser = posfleet_runtime::value::parse_duration)]
    pub timeout: Duration,
}

/// One wave as measured.
#[derive(Debug, Clone)]
pub struct WaveFigures {
    pub number: u32,
    pub members: u32,
    pub succeeded: u32,
    pub unsuccessful: u32,
    /// From the wave's start to its end, as the controller recorded them.
    pub duration: Option<Duration>,
}

impl WaveFigures {
    /// Members × `mib` over the wave's duration.
    fn mib_per_s(&self, mib: u32) -> Option<f64> {
        let secs = self.duration?.as_secs_f64();
        (secs > 0.0).then(|| f64::from(self.members) * f64::from(mib) / secs)
    }
}

/// Everything `fleet-bench rollout` measured.
#[derive(Debug, Clone)]
pub struct RolloutReport {
    pub params: RolloutBench,
    pub machine: Machine,
    pub connected_after: Duration,
    pub upload: Duration,
    pub state: String,
    pub total: Duration,
    pub waves: Vec<WaveFigures>,
    pub bytes_served: f64,
    /// From the first wave's start to the last wave's end (controller timestamps).
    pub waves_span: Option<Duration>,
    pub broker_cpu: f64,
    pub simulator_cpu: f64,
}

/// Runs the benchmark; `progress` receives one line per phase.
pub async fn run_rollout(
    bins: &Binaries,
    params: RolloutBench,
    progress: impl Fn(&str),
) -> anyhow::Result<RolloutReport> {
    let machine = Machine::describe();
    progress(&format!("machine: {machine}"));
    let n = params.terminals as usize;
    let mut broker = start_fleet_broker(bins, params.timeout).await?;

    let release = CommandKey::generate();
    posfleet_proto::pki::write_public_file(
        &broker.pki().release_public_key(),
        &release.public_key().to_pem(),
    )?;
    broker.terminate().await?;
    broker.restart().await?;
    progress("release key installed, broker restarted");

    let size = params.artifact_mib as usize * 1_048_576;
    let mut bytes = vec![0u8; size];
    rand::fill(&mut bytes[..]);
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    let signature = release.sign_release(&sha);
    let started = Instant::now();
    let artifact = upload(broker.api(), bytes, &sha, &signature, release.key_id()).await?;
    let upload = started.elapsed();
    progress(&format!(
        "artifact {} ({} MiB) uploaded in {upload:.2?}",
        artifact.id, params.artifact_mib
    ));

    let scratch = broker.scratch_dir("rollout-bench")?;
    let hook = scratch.join("install-ok");
    write_script(&hook, "#!/bin/sh\nexit 0\n")?;
    let connect = ConnectBench {
        terminals: n,
        heartbeat_interval: params.heartbeat_interval,
        telemetry_interval: Duration::from_secs(600),
        duration: Duration::ZERO,
        connect_rate: 1_000_000,
        tx_rate: 0.0,
        timeout: params.timeout,
    };
    let hook_arg = hook.display().to_string();
    let mut simulator = start_simulator(&broker, &connect, &["--hook-install", &hook_arg])?;
    let since = Instant::now();
    let timeline = wait_for_fleet(broker.api(), n, since, params.timeout, &mut simulator).await?;
    let Some(connected_after) = timeline.all_online else {
        bail!(
            "not all terminals came online within {:?}: {timeline}\n{}",
            params.timeout,
            simulator.stderr_tail(TAIL_LINES)
        );
    };
    progress(&format!("all {n} online after {connected_after:.1?}"));

    let api = broker.api().clone();
    let devices: Vec<String> = api
        .devices()
        .await?
        .devices
        .into_iter()
        .map(|d| d.id)
        .collect();
    let broker_pid = broker.process()?.pid();
    let cpu_before = (cpu_seconds(broker_pid)?, cpu_seconds(simulator.pid())?);
    let served_before = api.metrics().await?.value(BYTES_SERVED, &[]);
    let body = json!({
        "artifact_id": artifact.id,
        "target": { "devices": devices },
        "waves": params.waves,
        "soak_s": 0,
        "wave_timeout_s": params.timeout.as_secs(),
    });
    let started = Instant::now();
    let response = api
        .send(reqwest::Method::POST, "/api/v1/rollouts", Some(&body))
        .await?;
    let status = response.status();
    let text = response.text().await.context("reading the rollout")?;
    if !status.is_success() {
        bail!("POST /api/v1/rollouts: {status}: {text}");
    }
    let created: RolloutView = serde_json::from_str(&text).context("rollout view")?;
    progress(&format!(
        "rollout {} created: {} terminals in {} waves",
        created.id,
        created.members,
        created.waves.len()
    ));

    let mut seen_start = vec![false; created.waves.len()];
    let mut seen_end = vec![false; created.waves.len()];
    let deadline = started + params.timeout;
    let view = loop {
        let view = rollout(&api, &created.id).await?;
        for (i, wave) in view.waves.iter().enumerate() {
            if wave.started_at_ms.is_some() && !seen_start[i] {
                seen_start[i] = true;
                progress(&format!(
                    "wave {} started ({} terminals)",
                    wave.number, wave.members
                ));
            }
            if wave.finished_at_ms.is_some() && !seen_end[i] {
                seen_end[i] = true;
                progress(&format!(
                    "wave {} ended: {:?}, {} succeeded, {} unsuccessful",
                    wave.number,
                    wave.outcome,
                    wave.counts.succeeded,
                    wave.counts.unsuccessful()
                ));
            }
        }
        if matches!(
            view.state,
            RolloutState::Completed | RolloutState::Aborted { .. }
        ) {
            break view;
        }
        if let Some(status) = simulator.try_exited()? {
            bail!(
                "the simulator exited ({status})\n{}",
                simulator.stderr_tail(TAIL_LINES)
            );
        }
        if Instant::now() > deadline {
            bail!("the rollout did not end within {:?}", params.timeout);
        }
        tokio::time::sleep(POLL).await;
    };
    let total = started.elapsed();
    let served_after = api.metrics().await?.value(BYTES_SERVED, &[]);
    let cpu_after = (cpu_seconds(broker_pid)?, cpu_seconds(simulator.pid())?);
    let waves_span = view
        .waves
        .first()
        .and_then(|w| w.started_at_ms)
        .zip(view.waves.iter().filter_map(|w| w.finished_at_ms).max())
        .map(|(s, e)| Duration::from_millis(e.saturating_sub(s)));
    let waves = view
        .waves
        .iter()
        .map(|w| WaveFigures {
            number: w.number,
            members: w.members,
            succeeded: w.counts.succeeded,
            unsuccessful: w.counts.unsuccessful(),
            duration: w
                .started_at_ms
                .zip(w.finished_at_ms)
                .map(|(s, e)| Duration::from_millis(e.saturating_sub(s))),
        })
        .collect();
    progress("stopping");
    let _ = simulator.terminate(Duration::from_secs(30)).await;
    drop(broker);
    Ok(RolloutReport {
        params,
        machine,
        connected_after,
        upload,
        state: view.state.name().to_owned(),
        total,
        waves,
        bytes_served: served_after - served_before,
        waves_span,
        broker_cpu: cpu_after.0 - cpu_before.0,
        simulator_cpu: cpu_after.1 - cpu_before.1,
    })
}

async fn upload(
    api: &Api,
    bytes: Vec<u8>,
    sha: &[u8; 32],
    signature: &[u8],
    key_id: &str,
) -> anyhow::Result<ArtifactView> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(signature);
    let headers = [
        (posfleet_broker::api::SIGNATURE_HEADER, b64),
        (posfleet_broker::api::KEY_ID_HEADER, key_id.to_owned()),
        (posfleet_broker::api::SHA256_HEADER, hex::encode(sha)),
    ];
    let response = api
        .send_bytes(
            reqwest::Method::POST,
            "/api/v1/artifacts?version=2.0.0&component=payment_app",
            &headers,
            bytes,
        )
        .await?;
    let status = response.status();
    let text = response.text().await.context("reading the upload answer")?;
    if !status.is_success() {
        bail!("artifact upload: {status}: {text}");
    }
    serde_json::from_str(&text).context("artifact view")
}

async fn rollout(api: &Api, id: &str) -> anyhow::Result<RolloutView> {
    let response = api.get(&format!("/api/v1/rollouts/{id}")).await?;
    let status = response.status();
    let text = response.text().await.context("reading the rollout")?;
    if !status.is_success() {
        bail!("GET rollout {id}: {status}: {text}");
    }
    serde_json::from_str(&text).context("rollout view")
}

fn write_script(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

impl fmt::Display for RolloutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        let mib = |b: f64| b / 1_048_576.0;
        writeln!(f, "fleet-bench rollout")?;
        writeln!(f, "  machine:         {}", self.machine)?;
        writeln!(
            f,
            "  terminals:       {} (all online after {:.1?}); artifact {} MiB, uploaded in {:.2?}",
            p.terminals, self.connected_after, p.artifact_mib, self.upload
        )?;
        let expected = f64::from(p.terminals) * f64::from(p.artifact_mib);
        writeln!(
            f,
            "  rollout:         {} after {:.1?} (first wave start → last wave end {})",
            self.state,
            self.total,
            self.waves_span
                .map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
        )?;
        writeln!(
            f,
            "  device endpoint: served {:.0} MiB (N × size = {expected:.0} MiB), {} on average over the waves",
            mib(self.bytes_served),
            self.waves_span
                .filter(|d| !d.is_zero())
                .map_or("-".to_owned(), |d| format!(
                    "{:.1} MiB/s",
                    mib(self.bytes_served) / d.as_secs_f64()
                ))
        )?;
        for w in &self.waves {
            writeln!(
                f,
                "  wave {}:          {} terminals, {} succeeded, {} unsuccessful, {}, {}",
                w.number,
                w.members,
                w.succeeded,
                w.unsuccessful,
                w.duration.map_or("not run".to_owned(), |d| format!(
                    "{:.2} s",
                    d.as_secs_f64()
                )),
                w.mib_per_s(p.artifact_mib)
                    .map_or("-".to_owned(), |r| format!("{r:.1} MiB/s downloaded"))
            )?;
        }
        write!(
            f,
            "  CPU during the rollout: broker {:.1} s, simulator {:.1} s",
            self.broker_cpu, self.simulator_cpu
        )
    }
}
