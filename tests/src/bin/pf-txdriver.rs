//! `pf-txdriver`: payment applications for N simulated terminals (see
//! `posfleet_tests::txdriver`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use posfleet_runtime::backoff::Backoff;
use posfleet_runtime::value::{BrokerUrl, parse_duration};
use posfleet_tests::txdriver::{DriverConfig, run_driver};

#[derive(Debug, Parser)]
#[command(
    name = "pf-txdriver",
    about = "Payment applications for N simulated terminals, with a crash-proof journal"
)]
struct Cli {
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    count: u32,
    /// PKI directory with the fleet CA.
    #[arg(long, value_name = "DIR")]
    pki_dir: PathBuf,
    #[arg(long, value_name = "URL", value_parser = BrokerUrl::parse)]
    broker: BrokerUrl,
    #[arg(long, value_name = "PREFIX", default_value = "drv-")]
    id_prefix: String,
    /// The simulated terminals' outbox store goes in DIR/outbox.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Rewritten every 200 ms with counters and latencies (JSON).
    #[arg(long, value_name = "FILE")]
    status: PathBuf,
    /// Journal every submission and answer here; resubmit what it leaves in doubt.
    #[arg(long, value_name = "FILE")]
    journal: Option<PathBuf>,
    /// Transactions per terminal per minute (Poisson arrivals).
    #[arg(long, value_name = "PER_MINUTE", default_value_t = 60.0)]
    tx_rate: f64,
    /// Share of transactions submitted twice (the repeat must get the same seq).
    #[arg(long, value_name = "P", default_value_t = 0.01)]
    repeat_probability: f64,
    #[arg(long, value_name = "PER_SECOND", default_value_t = 1000)]
    connect_rate: u32,
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    telemetry_interval: Duration,
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    keep_alive: Duration,
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    backoff_initial: Duration,
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    backoff_max: Duration,
    /// The outbox's resend timeout (default: the agent's).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    resend_timeout: Option<Duration>,
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "info,posfleet_agent::agent=warn,posfleet_runtime::mqtt=warn",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=60_000.0).contains(&cli.tx_rate),
        "--tx-rate must be between 0 and 60000 per minute"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&cli.repeat_probability),
        "--repeat-probability must be between 0 and 1"
    );
    let cfg = DriverConfig {
        count: cli.count as usize,
        pki_dir: cli.pki_dir,
        broker: cli.broker,
        id_prefix: cli.id_prefix,
        data_dir: cli.data_dir,
        tx_rate_per_minute: cli.tx_rate,
        repeat_probability: cli.repeat_probability,
        connect_rate: cli.connect_rate.max(1),
        heartbeat_interval: cli.heartbeat_interval,
        telemetry_interval: cli.telemetry_interval,
        keep_alive: cli.keep_alive,
        backoff: Backoff {
            initial: cli.backoff_initial,
            max: cli.backoff_max,
        },
        resend_timeout: cli.resend_timeout,
        journal: cli.journal,
        status: cli.status,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_driver(cfg))
}
