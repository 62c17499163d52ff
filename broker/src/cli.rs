//! The `posfleet-broker` command line: `serve`, `demo` and `admin create|unlock|reset-mfa`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use posfleet_agent::{SimulatorConfig, run_simulator};
use posfleet_runtime::value::{BrokerUrl, parse_duration};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::admission::AdmissionArgs;
use crate::app::{
    self, DEFAULT_API_LISTEN, DEFAULT_DEVICE_LISTEN, DEFAULT_MQTT_LISTEN, Running, SHUTDOWN_GRACE,
    ServeOptions,
};
use crate::approvals::{ApprovalPolicy, DEFAULT_LOCK_THRESHOLD};
use crate::artifacts::DEFAULT_MAX_UPLOAD_BYTES;
use crate::controller::DEFAULT_MAX_QUEUED_RECORDS;
#[cfg(test)]
use crate::controller::TxConfig;
use crate::datadir::DEFAULT_DATA_DIR;

/// posfleet controller: secure MQTT edge, embedded router, device registry and admin API.
#[derive(Debug, Parser)]
#[command(name = "posfleet-broker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller: MQTT edge for terminals, controller, admin API.
    Serve(ServeArgs),
    /// Run the controller plus simulated terminals, for a first look.
    Demo {
        #[command(flatten)]
        serve: ServeArgs,
        /// Number of simulated terminals.
        #[arg(long, default_value_t = 25)]
        terminals: usize,
        /// Heartbeat interval of the simulated terminals.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
        heartbeat_interval: Duration,
        /// Telemetry interval of the simulated terminals.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
        telemetry_interval: Duration,
    },
    /// Operator accounts on this controller's data directory (works while it is stopped).
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create an admin account and print its one-time password (to be changed at the first
    /// login, followed by MFA enrolment). Refuses a name that exists.
    Create {
        /// Data directory of the controller.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The account name: 1-64 of a-z, 0-9, '.', '_', '-' (a person's, not "admin").
        #[arg(long)]
        name: String,
    },
    /// Lift every lockout of an account (from all client addresses and the account-wide
    /// one), e.g. the last admin's once the bootstrap token is revoked. Audited at the next
    /// start.
    Unlock {
        /// Data directory of the controller.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The account name.
        #[arg(long)]
        name: String,
    },
    /// Remove an account's authenticator (a lost phone): its password still works, and its
    /// next login may only enrol MFA again. Audited at the next start.
    ResetMfa {
        /// Data directory of the controller.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The account name.
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Data directory (PKI, admin token, registry, posctl.json).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Address terminals connect to (MQTT over mutual TLS).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_MQTT_LISTEN)]
    mqtt_listen: SocketAddr,
    /// Address of the HTTPS admin API.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_API_LISTEN)]
    api_listen: SocketAddr,
    /// Extra host name or IP for the broker certificate when a new PKI is created
    /// (repeatable; localhost, 127.0.0.1 and ::1 are always included).
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
    /// Use an external MQTT broker (e.g. mqtts://mosquitto.example:8883) instead of the
    /// embedded edge; see deploy/external-brokers/ for its ACLs. --mqtt-listen is then unused.
    #[arg(long, value_name = "URL")]
    external_broker: Option<BrokerUrl>,
    /// How often a terminal that heartbeats gets a fresh signed lease (ADR 0007).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    lease_interval: Duration,
    /// How often a command not final yet is published again to its online terminal.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    command_resend_interval: Duration,
    /// Address of the HTTPS endpoint terminals download software artifacts from (client
    /// certificate from the fleet CA required).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_DEVICE_LISTEN)]
    device_listen: SocketAddr,
    /// Public base URL of that endpoint, as terminals reach it (e.g. behind NAT).
    /// [default: https://<first --host, else 127.0.0.1>:<port of --device-listen>]
    #[arg(long, value_name = "URL")]
    device_url: Option<String>,
    /// Largest artifact upload accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_UPLOAD_BYTES)]
    max_artifact_bytes: u64,
    /// How long audit entries are kept (PCI DSS 10.5.1 asks for at least 12 months).
    #[arg(long, value_name = "DURATION", default_value = "8760h", value_parser = parse_duration)]
    audit_retention: Duration,
    /// The audit key (Ed25519, 0600, created at the first start) that keys every audit entry
    /// and signs exported anchors; keep it off the data directory's disk where you can.
    /// [default: DATA_DIR/audit.key]
    #[arg(long, value_name = "FILE", env = "POSFLEET_AUDIT_KEY")]
    audit_key: Option<PathBuf>,
    /// Two-person approval of wipes and large locks: `on`, or `off` (single-admin test and
    /// lab setups only; every request is then issued at once).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    two_person_approval: String,
    /// Locking more than this many terminals (lost reports included) within
    /// --approval-lock-window needs a second admin's approval; counted per account (an API
    /// token counts for the account that made it; the bootstrap token and its tokens for
    /// "admin").
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LOCK_THRESHOLD)]
    approval_lock_threshold: usize,
    /// The rolling window in which one account's locks add up.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    approval_lock_window: Duration,
    /// How long a request waits for a second admin before it expires.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    approval_ttl: Duration,
    /// Transactions waiting for the controller's store at most; a batch beyond is refused and
    /// its terminal told to retry after --tx-retry-after
    /// (docs/decisions/0014-transaction-back-pressure.md).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_QUEUED_RECORDS,
          value_parser = clap::value_parser!(u32).range(1..))]
    tx_queue_records: u32,
    /// How long a terminal whose transaction batch was refused is asked to wait (it adds
    /// jitter; at most 30 s is honoured).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    tx_retry_after: Duration,
    /// Connection admission of every listener (docs/decisions/0012-connection-admission.md).
    #[command(flatten)]
    admission: AdmissionArgs,
}

impl ServeArgs {
    fn options(&self) -> ServeOptions {
        ServeOptions {
            data_dir: self.data_dir.clone(),
            mqtt_listen: self.mqtt_listen,
            api_listen: self.api_listen,
            hosts: self.hosts.clone(),
            external_broker: self.external_broker.clone(),
            lease_interval: self.lease_interval,
            command_resend_interval: self.command_resend_interval,
            tx_queue_records: self.tx_queue_records as usize,
            tx_retry_after: self.tx_retry_after,
            device_listen: self.device_listen,
            device_url: self.device_url.clone(),
            max_artifact_bytes: self.max_artifact_bytes,
            audit_retention: self.audit_retention,
            audit_key: self.audit_key.clone(),
            approvals: ApprovalPolicy {
                enabled: self.two_person_approval == "on",
                lock_threshold: self.approval_lock_threshold,
                lock_window: self.approval_lock_window,
                ttl: self.approval_ttl,
            },
            admission: self.admission.options(),
        }
    }
}

/// Entry point of the `posfleet-broker` binary (and of test binaries that wrap it).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", posfleet_runtime::report::error_report(&error));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,posfleet_agent::agent=warn,posfleet_runtime::mqtt=warn,rumqttd=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Admin(admin) = &cli.command {
        run_admin(admin)?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let outcome = match cli.command {
            Command::Serve(args) => serve(&args, &tracker, &cancel).await,
            Command::Admin(_) => Ok(ExitCode::SUCCESS),
            Command::Demo {
                serve,
                terminals,
                heartbeat_interval,
                telemetry_interval,
            } => {
                demo(
                    &serve,
                    terminals,
                    heartbeat_interval,
                    telemetry_interval,
                    &tracker,
                    &cancel,
                )
                .await
            }
        };
        stop(cancel, tracker).await;
        outcome
    })
}

async fn serve(
    args: &ServeArgs,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> anyhow::Result<ExitCode> {
    let running = app::start(&args.options(), tracker, cancel.child_token()).await?;
    print_summary(args, &running);
    wait_for_end(&running).await
}

async fn demo(
    args: &ServeArgs,
    terminals: usize,
    heartbeat_interval: Duration,
    telemetry_interval: Duration,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> anyhow::Result<ExitCode> {
    let running = app::start(&args.options(), tracker, cancel.child_token()).await?;
    // Every simulated terminal's certificate is issued and recorded by the enrolment service.
    let issuer = crate::enrolment::SimulatorIssuer::new(running.enrolment.clone(), "demo");
    let mut sim = SimulatorConfig::new(
        terminals,
        args.data_dir.join("pki"),
        running.broker.clone(),
        std::sync::Arc::new(issuer),
    );
    sim.agent.heartbeat_interval = heartbeat_interval;
    sim.agent.telemetry_interval = telemetry_interval;
    // The terminals get their own shutdown tree: they say goodbye (OFFLINE "shutdown") while
    // the edge and controller still run, and only then does the rest stop.
    let sim_tracker = TaskTracker::new();
    let sim_cancel = CancellationToken::new();
    let handle = run_simulator(sim, &sim_tracker, sim_cancel.clone())
        .await
        .context("cannot start the simulated terminals")?;
    print_summary(args, &running);
    let ids = handle.device_ids();
    if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
        println!("  terminals   {terminals} simulated ({first} .. {last})");
        println!();
        println!("Try, in another terminal:");
        let dd = shell_path(&args.data_dir);
        println!(
            "  cargo run --release -q -p posfleet-broker --bin posctl -- --data-dir {dd} devices list"
        );
        println!(
            "  cargo run --release -q -p posfleet-broker --bin posctl -- --data-dir {dd} devices show {first}"
        );
        println!(
            "  cargo run --release -q -p posfleet-broker --bin posctl -- --data-dir {dd} watch --device {first}"
        );
        println!();
        println!("Press Ctrl-C to stop.");
    }
    let outcome = wait_for_end(&running).await;
    stop(sim_cancel, sim_tracker).await;
    outcome
}

fn print_summary(args: &ServeArgs, running: &Running) {
    let dd = shell_path(&args.data_dir);
    println!();
    println!("posfleet broker is running");
    println!(
        "  MQTT        {} ({}; fleet CA {dd}/pki/ca.crt)",
        running.broker,
        if running.edge.is_some() {
            "embedded edge, mutual TLS"
        } else {
            "external broker"
        }
    );
    println!(
        "  admin API   {} (bearer token in {dd}/admin.token)",
        running.client.api_url
    );
    println!(
        "  downloads   {} (terminals, mutual TLS; release keys {dd}/pki/release.pub{})",
        running.artifacts.config().device_url,
        if running.artifacts.release_keys().is_empty() {
            ": none installed, uploads refused"
        } else {
            ""
        }
    );
    if running.pki_created {
        println!("  PKI         created a development PKI in {dd}/pki");
    }
    if running.token_created {
        println!("  token       generated {dd}/admin.token (mode 0600)");
    }
}

fn shell_path(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// `posfleet-broker admin ...` (offline, on the data dir).
fn run_admin(cmd: &AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Create { data_dir, name } => {
            let password = admin_create(data_dir, name)?;
            println!("created admin account {name}");
            println!("one-time password: {password}");
            println!(
                "log in with `posctl login --user {name}`: the first login changes this \
                 password, then enrol MFA with `posctl mfa enrol` (required for admins)"
            );
        }
        AdminCommand::Unlock { data_dir, name } => {
            admin_unlock(data_dir, name)?;
            println!("unlocked {name} (recorded in the audit log at the next start)");
        }
        AdminCommand::ResetMfa { data_dir, name } => {
            admin_reset_mfa(data_dir, name)?;
            println!(
                "removed the authenticator of {name}: the next login (password, no code) may \
                 only enrol MFA again with `posctl mfa enrol` (recorded in the audit log at the \
                 next start)"
            );
        }
    }
    Ok(())
}

/// The account store of a stopped controller's data dir. The store is locked by a running
/// server, so this fails (after a short wait) while it runs.
fn offline_accounts(data_dir: &std::path::Path) -> anyhow::Result<crate::accounts::Accounts> {
    let data = crate::datadir::DataDir::at(data_dir);
    data.create()?;
    crate::accounts::Accounts::open(
        &data.accounts_dir(),
        crate::accounts::DEFAULT_CACHE,
        String::new(),
        crate::controller::system_clock(),
    )
    .with_context(|| {
        format!(
            "cannot open the account store in {} (is posfleet-broker serve running on it? stop \
             it first)",
            data_dir.display()
        )
    })
}

/// Checks an account name from the command line before it is used, printed or queued for the
/// audit log: clean text (no card number, control or bidi character; the one text check).
/// The error names `--name` and never repeats the value.
fn check_name(name: &str) -> anyhow::Result<()> {
    posfleet_proto::text::check_operator_text(name)
        .map_err(|problem| anyhow::anyhow!("--name: {problem}"))
}

/// Creates admin account `name` in `data_dir`'s account store; returns its one-time password.
pub fn admin_create(data_dir: &std::path::Path, name: &str) -> anyhow::Result<String> {
    check_name(name)?;
    let accounts = offline_accounts(data_dir)?;
    let password = accounts
        .create_user(
            name,
            crate::accounts::Role::Admin,
            "posfleet-broker admin create",
        )
        .with_context(|| format!("cannot create admin account {name:?}"))?;
    accounts.record_offline("user.create", name, "admin account created offline".into())?;
    Ok(password)
}

/// Lifts every lockout of `name` in `data_dir`'s account store.
pub fn admin_unlock(data_dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    check_name(name)?;
    offline_accounts(data_dir)?
        .unlock_offline(name)
        .with_context(|| format!("cannot unlock {name:?}"))
}

/// Removes the authenticator of `name` in `data_dir`'s account store (MFA enrolment at the
/// next login).
pub fn admin_reset_mfa(data_dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    check_name(name)?;
    offline_accounts(data_dir)?
        .reset_mfa_offline(name)
        .with_context(|| format!("cannot reset the MFA of {name:?}"))
}

/// Waits for SIGTERM/SIGINT (exit 0) or a fatal edge error (exit 1, so a supervisor restarts).
async fn wait_for_end(running: &Running) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = int.recv() => info!("SIGINT received, shutting down"),
        reason = edge_fatal(running) => {
            anyhow::bail!("the MQTT edge failed ({reason}); exiting so the supervisor restarts it");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves when the embedded edge failed; never with an external broker.
async fn edge_fatal(running: &Running) -> String {
    match &running.edge {
        Some(edge) => edge.fatal().await,
        None => std::future::pending().await,
    }
}

/// Cancels everything and waits up to [`SHUTDOWN_GRACE`] for the tasks to finish.
async fn stop(cancel: CancellationToken, tracker: TaskTracker) {
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, remaining = tracker.len(), "tasks did not stop within the grace period");
    } else {
        info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_parses_the_documented_forms() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["posfleet-broker", "demo", "--terminals", "3"]).unwrap();
        assert!(matches!(cli.command, Command::Demo { terminals: 3, .. }));
        let cli = Cli::try_parse_from([
            "posfleet-broker",
            "serve",
            "--data-dir",
            "/tmp/x",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--host",
            "pos.example",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve expected");
        };
        assert_eq!(args.hosts, ["pos.example"]);
        assert_eq!(args.options().mqtt_listen.port(), 0);
        let cli = Cli::try_parse_from([
            "posfleet-broker",
            "admin",
            "create",
            "--data-dir",
            "/tmp/x",
            "--name",
            "ada",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Admin(AdminCommand::Create { .. })
        ));
    }

    #[test]
    fn the_transaction_budget_flags_default_to_the_controllers_and_refuse_zero() {
        let serve = |extra: &[&str]| {
            let mut argv = vec!["posfleet-broker", "serve"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        let Command::Serve(args) = serve(&[]).unwrap().command else {
            panic!("serve expected");
        };
        let defaults = TxConfig::default();
        let opts = args.options();
        assert_eq!(opts.tx_queue_records, defaults.max_queued_records);
        assert_eq!(opts.tx_retry_after, defaults.retry_after);
        let Command::Serve(args) =
            serve(&["--tx-queue-records", "64", "--tx-retry-after", "250ms"])
                .unwrap()
                .command
        else {
            panic!("serve expected");
        };
        let opts = args.options();
        assert_eq!(opts.tx_queue_records, 64);
        assert_eq!(opts.tx_retry_after, std::time::Duration::from_millis(250));
        let bad: [&[&str]; 4] = [
            &["--tx-queue-records", "0"],
            &["--tx-queue-records=-1"],
            &["--tx-queue-records", "5000000000"],
            &["--tx-retry-after", "soon"],
        ];
        for argv in bad {
            let error = serve(argv).unwrap_err().to_string();
            let flag = argv[0].split('=').next().unwrap();
            assert!(error.contains(flag), "{argv:?}: {error}");
        }
    }

    #[test]
    fn admin_unlock_and_reset_mfa_parse() {
        for verb in ["unlock", "reset-mfa"] {
            let parsed = Cli::try_parse_from([
                "posfleet-broker",
                "admin",
                verb,
                "--data-dir",
                "/tmp/x",
                "--name",
                "ada",
            ]);
            assert!(parsed.is_ok(), "admin {verb}: {:?}", parsed.err());
        }
    }

    #[test]
    fn admin_create_makes_an_admin_who_must_change_the_password_and_refuses_duplicates() {
        let tmp = tempfile::tempdir().unwrap();
        let password = admin_create(tmp.path(), "ada").unwrap();
        let err = admin_create(tmp.path(), "ada").unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
        assert!(admin_create(tmp.path(), "admin").is_err(), "reserved");
        let accounts = crate::accounts::Accounts::open(
            &crate::datadir::DataDir::at(tmp.path()).accounts_dir(),
            1 << 20,
            String::new(),
            crate::controller::system_clock(),
        )
        .unwrap();
        let login = accounts
            .login("ada", &password, None, [127, 0, 0, 1].into())
            .unwrap();
        assert!(login.must_change_password && login.mfa_enrolment_required);
        assert_eq!(login.role, crate::accounts::Role::Admin);
    }

    /// The names these commands write into the audit log (and print) are checked first: a
    /// card-like name is refused naming `--name`, without repeating it, and nothing is queued.
    #[test]
    fn admin_names_that_look_like_card_numbers_are_refused_without_echo() {
        let tmp = tempfile::tempdir().unwrap();
        admin_create(tmp.path(), "ada").unwrap();
        for name in [
            "4111-1111-1111-1111",
            "4111.1111.1111.1111",
            "4111111111111111",
        ] {
            for (verb, err) in [
                ("create", admin_create(tmp.path(), name).map(drop)),
                ("unlock", admin_unlock(tmp.path(), name)),
                ("reset-mfa", admin_reset_mfa(tmp.path(), name)),
            ] {
                let text = format!("{:#}", err.expect_err(verb));
                assert!(text.starts_with("--name:"), "admin {verb}: {text}");
                assert!(
                    !posfleet_proto::pan::contains_pan(&text),
                    "admin {verb} repeats the number: {text}"
                );
            }
        }
        let mut queued = Vec::new();
        offline_accounts(tmp.path())
            .unwrap()
            .drain_pending_audit(|r| {
                queued.push(r.target);
                Ok::<_, String>(())
            })
            .unwrap();
        assert_eq!(queued, ["ada"]);
    }

    #[test]
    fn admin_unlock_and_reset_mfa_work_offline_and_are_queued_for_the_audit_log() {
        let tmp = tempfile::tempdir().unwrap();
        admin_create(tmp.path(), "ada").unwrap();
        admin_unlock(tmp.path(), "ada").unwrap();
        admin_reset_mfa(tmp.path(), "ada").unwrap();
        assert!(admin_unlock(tmp.path(), "nobody").is_err());
        let accounts = offline_accounts(tmp.path()).unwrap();
        // Refused while the store is held (as by a running server).
        let busy = admin_unlock(tmp.path(), "ada").unwrap_err();
        assert!(format!("{busy:#}").contains("stop it first"), "{busy:#}");
        let mut actions = Vec::new();
        accounts
            .drain_pending_audit(|r| {
                actions.push((r.action, r.target, r.actor));
                Ok::<_, String>(())
            })
            .unwrap();
        let actor = crate::accounts::OFFLINE_ACTOR.to_owned();
        assert_eq!(
            actions,
            [
                ("user.create".into(), "ada".into(), actor.clone()),
                ("user.unlock".into(), "ada".into(), actor.clone()),
                ("user.reset_mfa".into(), "ada".into(), actor),
            ]
        );
    }
}
