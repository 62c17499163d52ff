//! The `posfleet-agent` command line: `run` (one terminal) and `simulate` (a fleet).
//!
//! One shutdown tree: a root [`CancellationToken`] and a [`TaskTracker`]; SIGTERM or SIGINT
//! cancels the token, then the tasks get [`GRACE`] to finish (each agent publishes its
//! OFFLINE presence and disconnects) before the process exits 0. Errors print as
//! `error: ` and the cause chain (see [`error_report`]) and exit 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use posfleet_runtime::report::error_report;
use posfleet_runtime::value::{BrokerUrl, parse_duration};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::command::HookSettings;
use crate::simulate::{self, SimulatorConfig};
use crate::terminal::stop;

pub use crate::terminal::{EXIT_WIPED, GRACE};
/// How often `simulate` logs how many terminals are connected.
const STATUS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "posfleet-agent",
    version,
    about = "posfleet terminal agent and fleet simulator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent of this terminal.
    Run {
        /// The agent's config file (see deploy/agent/agent.example.toml).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Enrol this terminal: generate its key here, send a CSR with a one-time enrolment
    /// token over HTTPS, write its certificate, the fleet CA, the command key and a config.
    Enroll {
        /// The controller's admin API, https://HOST:PORT.
        #[arg(long, value_name = "URL")]
        server: String,
        /// The one-time enrolment token (`posctl enroll token create`); also read from
        /// POSFLEET_ENROL_TOKEN so it stays out of the process list.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "POSFLEET_ENROL_TOKEN",
            hide_env_values = true
        )]
        token: String,
        #[arg(long, value_name = "ID")]
        device_id: String,
        /// This terminal's serial number (a token may be pinned to it).
        #[arg(long, value_name = "SERIAL")]
        serial: String,
        /// The CA certificate that signs the controller's server certificate; required
        /// (there is no trust-on-first-use).
        #[arg(long, value_name = "CA.pem")]
        ca_file: PathBuf,
        /// Where device.key (0600), device.crt, ca.crt, command.pub and agent.toml go.
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        /// Where to write the agent config (default DIR/agent.toml).
        #[arg(long, value_name = "FILE")]
        config_out: Option<PathBuf>,
    },
    /// Run N virtual terminals in this process, for demos and load tests. Each generates its
    /// key; the controller issues and records its certificate through its admin API.
    Simulate {
        /// Number of terminals.
        #[arg(long, value_name = "N")]
        count: usize,
        /// PKI directory with the fleet CA certificate and command key (ca.crt, command.pub),
        /// e.g. the controller's DATA/pki; its ca.key is not read.
        #[arg(long, value_name = "DIR")]
        pki_dir: PathBuf,
        /// The controller's client file (api_url, ca_file, token_file; an admin token),
        /// through which the certificates are issued and recorded.
        /// [default: posctl.json beside the PKI directory]
        #[arg(long, value_name = "FILE")]
        api_client: Option<PathBuf>,
        /// The broker, mqtts://host:port.
        #[arg(long, value_name = "URL", default_value = "mqtts://127.0.0.1:8883", value_parser = BrokerUrl::parse)]
        broker: BrokerUrl,
        /// Device ids are PREFIX followed by a five-digit index.
        #[arg(long, value_name = "PREFIX", default_value = simulate::DEFAULT_ID_PREFIX)]
        id_prefix: String,
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
        heartbeat_interval: Duration,
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        telemetry_interval: Duration,
        /// Terminals started per second.
        #[arg(long, value_name = "PER_SECOND", default_value_t = simulate::DEFAULT_CONNECT_RATE)]
        connect_rate: u32,
        /// Transactions per terminal per minute, on average (0: none).
        #[arg(long, value_name = "PER_MINUTE", default_value_t = simulate::DEFAULT_TX_RATE_PER_MINUTE)]
        tx_rate: f64,
        /// Where the terminals' shared outbox store lives (default: simulator-data beside
        /// the PKI directory).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Hooks every terminal runs for its commands (see deploy/hooks/).
        #[command(flatten)]
        hooks: Box<SimHooks>,
        /// Offline lease of every terminal ("0s" disables it).
        #[arg(long, value_name = "DURATION", default_value = "72h", value_parser = parse_duration)]
        max_offline: Duration,
        /// Print a machine-readable connection report line (`posfleet-sim-report ...`:
        /// connected terminals, connection attempts, CONNACK times) on stdout this often,
        /// and once more at the end ("0s": never).
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
        report_every: Duration,
    },
}

/// `simulate` hook flags.
#[derive(Debug, Default, clap::Args)]
struct SimHooks {
    /// Install hook of software updates (POSFLEET_ARTIFACT, POSFLEET_VERSION, ...).
    #[arg(long, value_name = "PATH")]
    hook_install: Option<PathBuf>,
    /// Health hook run after an update is installed.
    #[arg(long, value_name = "PATH")]
    hook_health: Option<PathBuf>,
    /// Rollback hook (failed update, RollbackUpdate).
    #[arg(long, value_name = "PATH")]
    hook_rollback: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    hook_config_apply: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    hook_lock: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    hook_unlock: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    hook_reboot: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    hook_collect_logs: Option<PathBuf>,
    /// How long a hook may run.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    hook_timeout: Duration,
}

impl SimHooks {
    fn settings(self) -> HookSettings {
        HookSettings {
            config_apply: self.hook_config_apply,
            lock: self.hook_lock,
            unlock: self.hook_unlock,
            wipe: None,
            reboot: self.hook_reboot,
            collect_logs: self.hook_collect_logs,
            install: self.hook_install,
            rollback: self.hook_rollback,
            health: self.hook_health,
            timeout: self.hook_timeout,
        }
    }
}

/// Entry point of the `posfleet-agent` binary (and of test binaries that wrap it).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", error_report(&error));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let default_filter = match cli.command {
        Command::Run { .. } | Command::Enroll { .. } => "info",
        // Thousands of terminals: per-terminal chatter only from warnings up.
        Command::Simulate { .. } => "info,posfleet_agent::agent=warn,posfleet_runtime::mqtt=warn",
    };
    init_tracing(default_filter);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if matches!(cli.command, Command::Run { .. }) {
        // One terminal: one MQTT session and a local API. The outbox committer and sled have
        // threads of their own; a second worker would only add a stack and a malloc arena.
        runtime.worker_threads(1);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => run_agent(config).await,
            Command::Enroll {
                server,
                token,
                device_id,
                serial,
                ca_file,
                out_dir,
                config_out,
            } => {
                let opts = crate::enroll::EnrollOptions {
                    server,
                    token,
                    device_id: posfleet_proto::DeviceId::new(device_id)
                        .context("--device-id")?,
                    serial,
                    ca_file,
                    out_dir,
                    config_out,
                };
                let enrolled = crate::enroll::enroll(&opts).await?;
                println!(
                    "enrolled {}: certificate {}, config {} (start it with `posfleet-agent run --config {}`)",
                    opts.device_id,
                    enrolled.cert.display(),
                    enrolled.config.display(),
                    enrolled.config.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Simulate {
                count,
                pki_dir,
                api_client,
                broker,
                id_prefix,
                heartbeat_interval,
                telemetry_interval,
                connect_rate,
                tx_rate,
                data_dir,
                hooks,
                max_offline,
                report_every,
            } => {
                let client = api_client.unwrap_or_else(|| pki_dir.with_file_name("posctl.json"));
                let issuer = simulate::ApiIssuer::from_client_file(&client).map_err(|e| {
                    anyhow::anyhow!(
                        "{e}; the simulator gets its certificates from the controller, which \
                         records them: pass --api-client DATA/posctl.json of a running \
                         controller"
                    )
                })?;
                let mut cfg = SimulatorConfig::new(count, pki_dir, broker, Arc::new(issuer));
                cfg.id_prefix = id_prefix;
                cfg.agent.heartbeat_interval = heartbeat_interval;
                cfg.agent.telemetry_interval = telemetry_interval;
                cfg.connect_rate = connect_rate;
                cfg.tx_rate_per_minute = tx_rate;
                if let Some(dir) = data_dir {
                    cfg.data_dir = dir;
                }
                cfg.hooks = hooks.settings();
                cfg.max_offline = (!max_offline.is_zero()).then_some(max_offline);
                let report_every = (!report_every.is_zero()).then_some(report_every);
                run_simulator(cfg, report_every)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
        }
    })
}

fn init_tracing(default_filter: &str) {
    // `RUST_LOG` as `level` and `target=level` directives. A `Targets` filter rather than an
    // `EnvFilter`: it needs no regular-expression engine, which would be a few hundred KiB of
    // resident code on every terminal (docs/benchmarks.md, "Agent memory").
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| default_filter.parse().unwrap_or_default());
    // Logs go to stderr (journald captures it under systemd).
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .try_init();
}

async fn run_agent(path: PathBuf) -> anyhow::Result<ExitCode> {
    crate::terminal::run_terminal(&path, shutdown_signal()).await
}

async fn run_simulator(cfg: SimulatorConfig, report_every: Option<Duration>) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let total = cfg.count;
    let sim = match simulate::run_simulator(cfg, &tracker, cancel.child_token()).await {
        Ok(sim) => sim,
        Err(error) => {
            stop(cancel, tracker).await;
            return Err(error.into());
        }
    };
    let status = async {
        let mut every = tokio::time::interval(STATUS_EVERY);
        every.tick().await;
        loop {
            every.tick().await;
            let pending: u64 = sim.agents().iter().map(|a| a.outbox().depth()).sum();
            info!(
                total,
                started = sim.started(),
                connected = sim.connected(),
                accepted = sim.accepted_total(),
                pending,
                "simulator status"
            );
        }
    };
    let report = async {
        let Some(period) = report_every else {
            return std::future::pending().await;
        };
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            print_report(&sim);
        }
    };
    let outcome = tokio::select! {
        signal = shutdown_signal() => signal,
        () = status => Ok(()),
        () = report => Ok(()),
    };
    if report_every.is_some() {
        print_report(&sim);
    }
    stop(cancel, tracker).await;
    sim.outbox().close().await;
    outcome
}

/// One `posfleet-sim-report` line on stdout, flushed at once (stdout may be a file).
fn print_report(sim: &simulate::SimulatorHandle) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop the fleet; the report is for an observer only.
    let _ = writeln!(out, "{}", sim.connections().to_line());
    let _ = out.flush();
}

/// Waits for SIGTERM or SIGINT.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = int.recv() => info!("SIGINT received, shutting down"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed_and_parses_the_documented_forms() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "posfleet-agent",
            "run",
            "--config",
            "/etc/posfleet/agent.toml",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Run { .. }));
        let cli = Cli::try_parse_from([
            "posfleet-agent",
            "simulate",
            "--count",
            "100",
            "--pki-dir",
            "/tmp/pki",
            "--broker",
            "mqtts://127.0.0.1:18883",
            "--heartbeat-interval",
            "5s",
            "--connect-rate",
            "50",
            "--tx-rate",
            "1200",
            "--hook-install",
            "/hooks/install",
            "--hook-health",
            "/hooks/health",
            "--max-offline",
            "0s",
            "--report-every",
            "250ms",
        ])
        .unwrap();
        let Command::Simulate {
            count,
            broker,
            heartbeat_interval,
            telemetry_interval,
            id_prefix,
            connect_rate,
            tx_rate,
            data_dir,
            hooks,
            max_offline,
            report_every,
            ..
        } = cli.command
        else {
            panic!("expected simulate");
        };
        assert_eq!((count, broker.port, connect_rate), (100, 18883, 50));
        assert_eq!((tx_rate, data_dir), (1200.0, None));
        assert_eq!(heartbeat_interval, Duration::from_secs(5));
        assert_eq!(telemetry_interval, Duration::from_secs(30));
        assert_eq!(id_prefix, "sim-");
        assert_eq!(max_offline, Duration::ZERO);
        assert_eq!(report_every, Duration::from_millis(250));
        let hooks = hooks.settings();
        assert_eq!(
            hooks.install.as_deref(),
            Some(std::path::Path::new("/hooks/install"))
        );
        assert_eq!(
            hooks.health.as_deref(),
            Some(std::path::Path::new("/hooks/health"))
        );
        assert_eq!(
            (hooks.rollback, hooks.timeout),
            (None, Duration::from_secs(60))
        );
        assert!(
            Cli::try_parse_from([
                "posfleet-agent",
                "simulate",
                "--count",
                "1",
                "--pki-dir",
                "d",
                "--broker",
                "mqtt://x"
            ])
            .is_err(),
            "plaintext brokers are refused"
        );
    }
}
