//! `fleet-bench`: load benchmarks of a real posfleet broker on this machine.
//!
//! ```text
//! cargo run --release -p posfleet-tests --bin fleet-bench -- connect --terminals 1000
//! cargo run --release -p posfleet-tests --bin fleet-bench -- commands --terminals 10000
//! cargo run --release -p posfleet-tests --bin fleet-bench -- rollout --terminals 1000
//! cargo run --release -p posfleet-tests --bin fleet-bench -- flood --attackers 1000
//! cargo run --release -p posfleet-tests --bin fleet-bench -- uplink-flood --terminals 1000
//! cargo run --release -p posfleet-tests --bin fleet-bench -- logins --samples 20
//! cargo run --release -p posfleet-tests --bin fleet-bench -- versus --terminals 1000
//! cargo run --release -p posfleet-tests --bin fleet-bench -- versus --sizes 1000,5000,10000,19000
//! ```
//!
//! See `posfleet_tests::bench` for what is measured and `docs/benchmarks.md` for results.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use posfleet_runtime::value::parse_duration;
use posfleet_tests::Binaries;
use posfleet_tests::agentmem::{AgentMemoryBench, run_agent_memory};
use posfleet_tests::bench::{ConnectBench, run_connect};
use posfleet_tests::cmdbench::{CommandsBench, run_commands};
use posfleet_tests::floodbench::{FloodBench, run_flood};
use posfleet_tests::host::raise_nofile_limit;
use posfleet_tests::loginbench::{LoginBench, run_logins};
use posfleet_tests::rolloutbench::{RolloutBench, run_rollout};
use posfleet_tests::txbench::driver_beside_current_exe;
use posfleet_tests::txbench::faults::{FaultsBench, run_faults};
use posfleet_tests::txbench::ingest::{IngestBench, run_ingest};
use posfleet_tests::txbench::raw::{RawIngestBench, run_raw_ingest};
use posfleet_tests::uplinkflood::{UplinkFloodBench, run_uplink_flood};
use posfleet_tests::versusbench::{VersusBench, run_versus};

#[derive(Debug, Parser)]
#[command(
    name = "fleet-bench",
    about = "Load benchmarks of a real posfleet broker (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// N simulated mTLS terminals: time to connect, broker memory per terminal, ingest rate,
    /// reconnect after a broker crash.
    Connect {
        /// Number of simulated terminals (1..=100000).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        terminals: u32,
        /// Heartbeat interval of every terminal.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
        heartbeat_interval: Duration,
        /// Telemetry interval of every terminal.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        telemetry_interval: Duration,
        /// Length of the ingest-rate measurement window.
        #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
        duration: Duration,
        /// Terminals the simulator starts per second (default: effectively unthrottled).
        #[arg(long, value_name = "PER_SECOND", default_value_t = 1_000_000)]
        connect_rate: u32,
        /// Transactions per terminal per minute (0: idle terminals).
        #[arg(long, value_name = "PER_MINUTE", default_value_t = 0.0)]
        tx_rate: f64,
        /// Bound on each wait (all connected, all back after the restart).
        #[arg(long, value_name = "DURATION", default_value = "180s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// N simulated terminals submitting transactions while the broker and the terminals are
    /// SIGKILLed and the link is cut again and again; then accepted vs stored vs duplicates vs
    /// missing.
    Faults(FaultsBench),
    /// Sustained durable transaction ingest: accepted, stored and acknowledged per second,
    /// accept → ack latency.
    Ingest(IngestBench),
    /// N connected simulated terminals: latency from the lock API call to the terminal's
    /// confirmed lock, and the time until all N confirm a new configuration version.
    Commands(CommandsBench),
    /// A signed artifact rolled out in waves to N connected terminals: time per wave and the
    /// controller's download throughput.
    Rollout(RolloutBench),
    /// A thousand idle or slow clients (one address, or one each) against the admin API, the
    /// device endpoint and the MQTT edge: latency of a legitimate request meanwhile.
    Flood(FloodBench),
    /// One terminal publishing QoS 1 uplinks as fast as it can beside N heartbeating
    /// terminals: the others' heartbeat delay, the flooder's accepted rate, and the edge's
    /// throttle, refusal and controller-lag counters before and after.
    UplinkFlood(UplinkFloodBench),
    /// Login latency per refusal reason (all alike), and a login flood against a broker with
    /// simulated terminals: its memory and the API's latency meanwhile.
    Logins(LoginBench),
    /// The same simulated fleet against posfleet and against Mosquitto (configured from
    /// deploy/external-brokers/), one after the other: time to all connected, attempts, RSS
    /// and CPU per terminal, heartbeat ingest and delay, reconnect after a SIGKILL, ratios.
    Versus(VersusBench),
    /// The real agent (`pf-agent run`) idle and connected, with transactions queued while the
    /// controller is down, and after they drained: RSS, where it is, threads; beside
    /// `mosquitto_sub` holding the same kind of session.
    AgentMemory(AgentMemoryBench),
    /// The controller's durable ingest alone: N MQTT sessions with device certificates
    /// publishing pre-encoded transaction batches; stored and acknowledged per second,
    /// publish → ack latency, each side's CPU.
    IngestRaw(RawIngestBench),
}

fn progress(line: &str) {
    eprintln!("[fleet-bench] {line}");
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
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
    // Before any thread or child exists: children inherit the raised limit.
    let nofile = raise_nofile_limit()?;
    let bins = Binaries::beside_current_exe()?;
    // The light ingest generator runs its sessions in this process: give it both CPUs.
    let workers = if matches!(cli.command, Command::IngestRaw(_)) {
        2
    } else {
        1
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Connect {
            terminals,
            heartbeat_interval,
            telemetry_interval,
            duration,
            connect_rate,
            tx_rate,
            timeout,
        } => {
            let params = ConnectBench {
                terminals: terminals as usize,
                heartbeat_interval,
                telemetry_interval,
                duration,
                connect_rate,
                tx_rate,
                timeout,
            };
            let report = runtime.block_on(run_connect(&bins, params, nofile, |line| {
                eprintln!("[fleet-bench] {line}");
            }))?;
            println!("{report}");
        }
        Command::Faults(params) => {
            let driver = driver_beside_current_exe()?;
            let report = runtime.block_on(run_faults(&bins, &driver, params, progress))?;
            println!("{report}");
            if !report.result.is_exact() {
                anyhow::bail!("the store does not hold exactly what was accepted");
            }
        }
        Command::Rollout(params) => {
            let report = runtime.block_on(run_rollout(&bins, params, progress))?;
            println!("{report}");
        }
        Command::Commands(params) => {
            let report = runtime.block_on(run_commands(&bins, params, progress))?;
            println!("{report}");
        }
        Command::Flood(params) => {
            let report = runtime.block_on(run_flood(&bins, params, progress))?;
            println!("{report}");
        }
        Command::UplinkFlood(params) => {
            let report = runtime.block_on(run_uplink_flood(&bins, params, progress))?;
            println!("{report}");
        }
        Command::Logins(params) => {
            let report = runtime.block_on(run_logins(&bins, params, progress))?;
            println!("{report}");
        }
        Command::Versus(params) => {
            let report = runtime.block_on(run_versus(&bins, params, nofile, progress))?;
            println!("{report}");
        }
        Command::IngestRaw(params) => {
            let report = runtime.block_on(run_raw_ingest(&bins, params, progress))?;
            println!("{report}");
            if report.sent_total != report.stored_total {
                anyhow::bail!("the store does not hold exactly what was sent");
            }
        }
        Command::AgentMemory(params) => {
            let report = runtime.block_on(run_agent_memory(&bins, params, progress))?;
            println!("{report}");
        }
        Command::Ingest(params) => {
            let driver = driver_beside_current_exe()?;
            let report = runtime.block_on(run_ingest(&bins, &driver, params, progress))?;
            println!("{report}");
        }
    }
    Ok(())
}
