//! `posctl`, the admin CLI: fleet PKI on disk, and the admin API (devices, live stream).
//!
//! # Layout
//!
//! - this file: the command line (clap), [`main`] and `run`.
//! - `endpoint`: where the API is (the data dir's `posctl.json`, or explicit flags).
//! - `client`: the HTTPS client trusting the fleet CA, and HTTP failures turned into errors that
//!   say what to do next.
//! - `pki`: `pki init` and `pki release-key` (local files only, no server needed), `pki
//!   issue-device` (a local key, the certificate issued and recorded by the controller).
//! - `artifacts`: `artifact sign` (local) and `artifact upload|list|show|delete`.
//! - `devices`: `devices list` and `devices show`.
//! - `commands`: `lock`, `unlock`, `reboot`, `wipe`, `logs collect|get`,
//!   `commands list|show|cancel`, `devices set-groups|set-labels`.
//! - `transactions`: `tx list` and `tx summary`.
//! - `config`: `config set|get|history|diff|schema` (fleet configuration layers).
//! - `rollouts`: `rollout create|list|show [--follow]|pause|resume|abort`.
//! - `accounts`: `login`, `logout`, `password`, `whoami`, `mfa enrol|confirm`,
//!   `token create|list|revoke`, `user create|list|reset|disable|enable|delete` (ADR 0009);
//!   `session`: the stored login sessions.
//! - `watch`: `watch`, rendering the live stream, over the bounded parser in `sse`.
//! - `output`: tables, times and sizes, and neutralising control characters in strings that
//!   terminals reported.
//! - `tests`: the commands against a TLS axum server serving canned API views.

mod accounts;
mod artifacts;
mod audit;
mod client;
mod commands;
mod config;
mod devices;
mod endpoint;
mod enrol;
mod output;
pub(crate) mod pki;
mod rollouts;
mod session;
mod sse;
#[cfg(test)]
mod tests;
mod transactions;
mod watch;

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use posfleet_proto::DeviceId;

use crate::datadir::DEFAULT_DATA_DIR;

/// The `posctl` command line.
#[derive(Debug, Parser)]
#[command(
    name = "posctl",
    version,
    about = "Administer a posfleet controller: fleet PKI, devices, transactions, live events, \
        configuration",
    long_about = "Administer a posfleet controller: fleet PKI, devices, transactions, live \
        events, configuration.\n\n\
        posctl finds the admin API through DATA_DIR/posctl.json, which `posfleet-broker serve` \
        and `demo` write at start; --server, --ca and --token-file override it.",
    arg_required_else_help = true
)]
pub(crate) struct Cli {
    #[command(flatten)]
    conn: ConnectArgs,
    /// How to print results.
    #[arg(
        long,
        short = 'o',
        global = true,
        value_enum,
        default_value_t = OutputFormat::Table,
        env = "POSCTL_OUTPUT"
    )]
    output: OutputFormat,
    #[command(subcommand)]
    command: Command,
}

/// Where the admin API is and how to authenticate; see `endpoint::resolve`.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ConnectArgs {
    /// Data directory of the controller; posctl reads DIR/posctl.json from it.
    /// [default: ./posfleet-data]
    #[arg(long, global = true, value_name = "DIR", env = "POSCTL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Admin API URL, e.g. https://127.0.0.1:8443 (overrides posctl.json).
    #[arg(long, global = true, value_name = "URL", env = "POSCTL_SERVER")]
    server: Option<String>,
    /// PEM file with the CA certificate(s) the API's certificate is checked against
    /// (overrides posctl.json).
    #[arg(long, global = true, value_name = "FILE", env = "POSCTL_CA")]
    ca: Option<PathBuf>,
    /// File holding the API bearer token (overrides posctl.json).
    #[arg(long, global = true, value_name = "FILE", env = "POSCTL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where `posctl login` keeps sessions (session.json, 0600).
    /// [default: $XDG_CONFIG_HOME/posfleet or ~/.config/posfleet]
    #[arg(long, global = true, value_name = "DIR", env = "POSCTL_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
}

impl ConnectArgs {
    fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }
}

/// Output format of every command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    /// Human-readable tables and blocks.
    Table,
    /// The API's JSON (JSON lines for `watch`), for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the fleet PKI (local files) and issue device certificate bundles (recorded by
    /// the controller).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Signed software artifacts: sign (local, with the release key), upload, list, show,
    /// delete.
    #[command(subcommand)]
    Artifact(ArtifactCommand),
    #[command(flatten)]
    Api(ApiCommand),
}

#[derive(Debug, Subcommand)]
enum ArtifactCommand {
    /// Sign FILE with a release key: writes FILE.sig (local; no server involved).
    Sign {
        /// The release private key (`posctl pki release-key` wrote it).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The artifact to sign.
        file: PathBuf,
        /// Where to write the signature. [default: FILE.sig]
        #[arg(long, value_name = "SIG")]
        out: Option<PathBuf>,
    },
    /// Upload a signed artifact to the controller (streamed).
    Upload {
        file: PathBuf,
        /// The version this artifact installs: 1-64 of [0-9A-Za-z.+-].
        #[arg(long)]
        version: String,
        /// The signature file. [default: FILE.sig]
        #[arg(long, value_name = "SIG")]
        signature: Option<PathBuf>,
        /// What it updates. [default: payment_app]
        #[arg(long, value_parser = ["payment_app", "firmware", "agent"])]
        component: Option<String>,
        /// Terminals below this version of the component must not take it.
        #[arg(long, value_name = "VERSION")]
        min_version: Option<String>,
    },
    /// Every stored artifact, newest first.
    List,
    /// Everything about one artifact.
    Show {
        /// The artifact id (its SHA-256).
        id: String,
    },
    /// Delete an artifact (refused while an unfinished rollout uses it).
    Delete {
        /// The artifact id (its SHA-256).
        id: String,
    },
}

/// Commands that talk to the admin API.
#[derive(Debug, Subcommand)]
enum ApiCommand {
    /// List and inspect devices.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// List transactions and summarise a device's transactions.
    #[command(subcommand)]
    Tx(TxCommand),
    /// Follow the live event stream (presence, heartbeats, telemetry, transactions, alerts,
    /// command progress) until Ctrl-C.
    Watch(WatchArgs),
    /// Fleet configuration: layers (fleet, group, device), history, diff, schema.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Lock terminals (they refuse transactions) until unlocked; desired state, so a
    /// terminal that is offline now is locked when it returns.
    Lock {
        #[command(flatten)]
        target: TargetArgs,
        /// Why (shown to operators; at most 200 characters).
        #[arg(long)]
        reason: String,
    },
    /// Unlock terminals (raises the lock generation, like lock).
    Unlock {
        #[command(flatten)]
        target: TargetArgs,
        /// Why (at most 200 characters).
        #[arg(long)]
        reason: String,
    },
    /// Reboot terminals.
    Reboot {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Wipe a terminal (keys, configuration, local data) once its outbox is drained.
    Wipe {
        /// Device id.
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
        /// Wipe even with transactions not yet delivered (they are lost).
        #[arg(long)]
        force: bool,
    },
    /// Collect a terminal's logs and download them.
    #[command(subcommand)]
    Logs(LogsCommand),
    /// List, inspect and cancel commands.
    #[command(subcommand)]
    Commands(CommandsCommand),
    /// Staged software rollouts: waves, thresholds, payment health gate, rollback.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// The tamper-evident audit log: list, verify (exit 1 when broken), export.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Two-person approval of wipes and large locks: list, approve, reject.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// The custody ledger (device issue register): record a handover, show the history.
    #[command(subcommand)]
    Custody(CustodyCommand),
    /// Log in (password, then the TOTP code: left empty for an account without MFA) and keep
    /// the session for this server in CONFIG_DIR/session.json (0600); later commands use it.
    Login {
        /// The account. [default: $USER]
        #[arg(long, env = "USER")]
        user: String,
        /// Read the password and further answers (one line each: TOTP code or an empty line,
        /// then, if a change is due, the new password twice and, with MFA, the next code)
        /// from stdin instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// End the stored session on the server and forget it.
    Logout,
    /// Change the password of the logged-in account (every session of it ends).
    Password {
        #[arg(long)]
        password_stdin: bool,
    },
    /// Who the current credential is.
    Whoami,
    /// TOTP multi-factor authentication of the logged-in account.
    #[command(subcommand)]
    Mfa(MfaCommand),
    /// API tokens for automation (role at most yours, with an expiry).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Operator accounts (admin).
    #[command(subcommand)]
    User(UserCommand),
    /// Terminal enrolment: one-time tokens for `posfleet-agent enroll`.
    #[command(subcommand)]
    Enroll(EnrollCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Entries, newest first, filtered.
    List(audit::AuditListArgs),
    /// Walk the hash chain, check every keyed checkpoint and compare the end with the
    /// anchor; exit 1 when it is broken.
    Verify {
        /// Also check the chain against an anchor exported earlier (`audit anchor export`):
        /// finds a chain rebuilt since, even by someone holding the audit key.
        #[arg(long, value_name = "FILE")]
        anchor: Option<PathBuf>,
    },
    /// Every entry as JSON lines, oldest first.
    Export {
        /// Write to this file (0600) instead of stdout (`-o` is the global output format).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Signed anchors of the chain, to keep off the controller's host.
    #[command(subcommand)]
    Anchor(AnchorCommand),
}

#[derive(Debug, Subcommand)]
enum AnchorCommand {
    /// A signed anchor of the newest entry (JSON), for `audit verify --anchor`.
    Export {
        /// Write to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum MfaCommand {
    /// Start an enrolment: prints the secret and otpauth:// URL once.
    Enrol,
    /// Finish it with a code from the authenticator.
    Confirm {
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ApprovalsCommand {
    /// Every approval, newest first.
    List,
    /// Approve another admin's request: its commands are created now.
    Approve { id: String },
    /// Reject another admin's request.
    Reject { id: String },
}

#[derive(Debug, Subcommand)]
enum CustodyCommand {
    /// Record a handover of a terminal.
    Record {
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        location: String,
        #[arg(long)]
        note: Option<String>,
    },
    /// A terminal's handovers, lost and found reports; exit 1 when a signature does not
    /// verify.
    History {
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; it is printed once.
    Create {
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// Lifetime, e.g. 12h, 30d (at most 366d).
        #[arg(long, value_parser = output::parse_duration)]
        expires: Duration,
    },
    /// Tokens (yours; an admin sees all).
    List,
    /// Revoke a token; `bootstrap` revokes DATA/admin.token for good (admin).
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create an account; prints its one-time password.
    Create {
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
    /// Every account.
    List,
    /// New one-time password, lockout cleared; --mfa also removes the authenticator.
    Reset {
        name: String,
        #[arg(long)]
        mfa: bool,
    },
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum EnrollCommand {
    /// One-time enrolment tokens.
    #[command(subcommand)]
    Token(EnrolTokenCommand),
}

#[derive(Debug, Subcommand)]
enum EnrolTokenCommand {
    /// Create a one-time token (printed once).
    Create {
        /// Only this device id may enrol with it; no other token or certificate takes the id
        /// while the token is unused.
        #[arg(long, value_name = "ID", value_parser = parse_device_id)]
        device: Option<DeviceId>,
        /// Only a terminal with this serial number may use it.
        #[arg(long)]
        serial: Option<String>,
        /// The enrolled terminal joins this group.
        #[arg(long)]
        group: Option<String>,
        /// Lifetime, e.g. 24h (at most 7d).
        #[arg(long, default_value = "24h")]
        expires: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Delete a token so it cannot enrol anything.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Roll an uploaded artifact out to terminals in waves.
    Create(RolloutCreateArgs),
    /// Every rollout, newest first.
    List,
    /// One rollout: state, waves, gate figures.
    Show {
        id: String,
        /// Draw one progress bar per wave until the rollout is completed or aborted, then
        /// print the summary (with -o json: the final view).
        #[arg(long)]
        follow: bool,
        /// With --follow: how often to ask the controller.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = output::parse_duration)]
        interval: Duration,
        /// With --follow: give up after this long (the rollout goes on).
        #[arg(long, value_name = "DURATION", value_parser = output::parse_duration)]
        timeout: Option<Duration>,
    },
    /// No new wave starts; updates already sent continue.
    Pause { id: String },
    /// Continue a paused rollout.
    Resume { id: String },
    /// Stop the rollout and roll back every terminal it updated (or may be updating).
    Abort {
        id: String,
        /// Why (kept in the rollout's state).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Arguments of `posctl rollout create`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["device", "group", "label"])))]
pub(crate) struct RolloutCreateArgs {
    /// The artifact's id (its SHA-256, as `posctl artifact upload` printed).
    pub(crate) artifact_id: String,
    /// A target device; repeat for several.
    #[arg(long, value_parser = parse_device_id)]
    pub(crate) device: Vec<DeviceId>,
    /// Every member of this group.
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// key=value; repeat for several (all must match).
    #[arg(long, value_parser = parse_label)]
    pub(crate) label: Vec<(String, String)>,
    /// Cumulative percentages of the target, ending at 100. [default: 1,10,50,100]
    #[arg(long, value_delimiter = ',', value_name = "P,P,...")]
    pub(crate) waves: Option<Vec<u32>>,
    /// Share of a wave that must succeed (0-1). [default: 0.95]
    #[arg(long, value_name = "RATIO")]
    pub(crate) success_threshold: Option<f64>,
    /// Share of a wave whose failure aborts the rollout (0-1). [default: 0.05]
    #[arg(long, value_name = "RATIO")]
    pub(crate) failure_threshold: Option<f64>,
    /// Wait this long after a wave reaches its success threshold (e.g. 10m; 0: none).
    /// [default: 0]
    #[arg(long, value_name = "DURATION", value_parser = output::parse_duration_or_zero)]
    pub(crate) soak: Option<Duration>,
    /// Terminals that have not finished this long after their wave started count as failed.
    /// [default: 30m]
    #[arg(long, value_name = "DURATION", value_parser = output::parse_duration)]
    pub(crate) wave_timeout: Option<Duration>,
}

/// Which terminals a command targets: one device, a group, or labels (all must match;
/// `model` and `firmware` also match what terminals report).
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["id", "group", "label"])))]
pub(crate) struct TargetArgs {
    /// Device id.
    #[arg(value_parser = parse_device_id)]
    pub(crate) id: Option<DeviceId>,
    /// Every member of this group.
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// key=value; repeat for several (all must match).
    #[arg(long, value_parser = parse_label)]
    pub(crate) label: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
enum LogsCommand {
    /// Ask a terminal for its logs (a collect_logs command).
    Collect {
        /// Device id.
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
        /// Only log lines since this time (Unix ms or RFC 3339).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Upload at most this many bytes (default 1 MiB).
        #[arg(long, value_name = "BYTES")]
        max_bytes: Option<u32>,
    },
    /// Download what a collect_logs command uploaded.
    Get {
        /// The command id `logs collect` printed.
        command_id: String,
        /// Write to this file instead of stdout (`-o` is the global output format).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum CommandsCommand {
    /// One page of commands, newest first.
    List(CommandsListArgs),
    /// Everything about one command, with its status history.
    Show { id: String },
    /// Cancel a command that is not final yet (not lock/unlock: change the desired state).
    Cancel { id: String },
}

/// Arguments of `posctl commands list`.
#[derive(Debug, Clone, Args)]
pub(crate) struct CommandsListArgs {
    #[arg(long, value_parser = parse_device_id)]
    pub(crate) device: Option<DeviceId>,
    #[arg(long, value_parser = ["queued", "delivered", "in_progress", "succeeded", "failed", "rejected", "expired", "cancelled"])]
    pub(crate) status: Option<String>,
    #[arg(long, value_parser = ["lock", "unlock", "config_push", "reboot", "wipe", "collect_logs", "software_update", "rollback_update"])]
    pub(crate) kind: Option<String>,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(crate) limit: u16,
    #[arg(long)]
    pub(crate) cursor: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Set and/or remove keys of one layer (created if needed); prints the layer.
    Set(ConfigSetArgs),
    /// Show one layer, or with --effective a device's merged configuration.
    Get(ConfigGetArgs),
    /// Changes, newest first.
    History(ConfigHistoryArgs),
    /// Keys that differ between two versions.
    Diff(ConfigDiffArgs),
    /// The keys a layer may hold and their rules.
    Schema,
}

/// Which layer: exactly one of --fleet, --group, --device.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct ScopeArgs {
    /// The fleet-wide layer.
    #[arg(long)]
    pub(crate) fleet: bool,
    /// A group's layer.
    #[arg(long, value_name = "NAME", value_parser = parse_group)]
    pub(crate) group: Option<String>,
    /// A device's layer.
    #[arg(long, value_name = "ID", value_parser = parse_device_id)]
    pub(crate) device: Option<DeviceId>,
}

/// Arguments of `posctl config set`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConfigSetArgs {
    #[command(flatten)]
    pub(crate) scope: ScopeArgs,
    /// KEY=VALUE pairs: integers and true/false are sent as such, anything else as a string.
    #[arg(value_name = "KEY=VALUE", value_parser = config::parse_assignment)]
    pub(crate) assignments: Vec<(String, String)>,
    /// Remove this key from the layer; repeat for several.
    #[arg(long, value_name = "KEY")]
    pub(crate) unset: Vec<String>,
    /// Why (kept in the history).
    #[arg(long, value_name = "TEXT")]
    pub(crate) comment: Option<String>,
    /// Send every value as a string (e.g. a store name of "123").
    #[arg(long)]
    pub(crate) string: bool,
}

/// Arguments of `posctl config get`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConfigGetArgs {
    #[command(flatten)]
    pub(crate) scope: ScopeArgs,
    /// With --device: the merged configuration (fleet, groups, device) and where each key
    /// comes from.
    #[arg(long)]
    pub(crate) effective: bool,
}

/// Arguments of `posctl config history`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConfigHistoryArgs {
    /// Only this layer: fleet, group/NAME or device/ID.
    #[arg(long, value_parser = parse_scope)]
    pub(crate) scope: Option<crate::fleetconfig::Scope>,
    /// Changes per page (1-1000).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(crate) limit: u16,
    /// Only changes older than this version (the hint a previous page printed).
    #[arg(long, value_name = "VERSION")]
    pub(crate) before: Option<u64>,
}

/// Arguments of `posctl config diff`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConfigDiffArgs {
    /// From this version (0: the empty configuration).
    #[arg(long, value_name = "VERSION")]
    pub(crate) from: u64,
    /// To this version. [default: the latest]
    #[arg(long, value_name = "VERSION")]
    pub(crate) to: Option<u64>,
    /// Only this layer: fleet, group/NAME or device/ID. [default: every layer]
    #[arg(long, value_parser = parse_scope)]
    pub(crate) scope: Option<crate::fleetconfig::Scope>,
}

#[derive(Debug, Subcommand)]
enum TxCommand {
    /// One page of transactions, newest first (filters combine).
    List(TxListArgs),
    /// Count, approved amounts, sequence watermark, gaps and conflicts of one device.
    Summary {
        /// Device id.
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
    },
}

/// Arguments of `posctl tx list`.
#[derive(Debug, Clone, Args)]
pub(crate) struct TxListArgs {
    /// Only this device's transactions.
    #[arg(long, value_parser = parse_device_id)]
    pub(crate) device: Option<DeviceId>,
    /// Transactions at or after this time: Unix ms or RFC 3339 (2024-02-29T13:05:09Z).
    #[arg(long, value_name = "TIME")]
    pub(crate) from: Option<String>,
    /// Transactions before this time: Unix ms or RFC 3339.
    #[arg(long, value_name = "TIME")]
    pub(crate) to: Option<String>,
    /// Only this status.
    #[arg(long, value_parser = ["approved", "declined", "error"])]
    pub(crate) status: Option<String>,
    /// Rows per page (1-1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(crate) limit: u16,
    /// Oldest first.
    #[arg(long)]
    pub(crate) asc: bool,
    /// Continue after a previous page (the cursor it printed), with the same filters.
    #[arg(long)]
    pub(crate) cursor: Option<String>,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create the fleet CA, the broker server certificate and the controller certificate.
    Init {
        /// PKI directory to create. [default: DATA_DIR/pki, where `serve` looks]
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Extra host name or IP address for the broker's server certificate (besides
        /// localhost, 127.0.0.1 and ::1); repeat for several.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
    /// Issue a device certificate bundle (device.crt, device.key, ca.crt, command.pub) for a
    /// staging bench. The key is generated here; the controller issues and records the
    /// certificate through its API, so it can be revoked before the terminal first connects.
    IssueDevice {
        /// Offline: issue from the CA in DATA/pki and record the certificate in DATA's
        /// enrolment store, with the controller stopped (refused while it runs).
        #[arg(long, value_name = "DATA/pki")]
        dir: Option<PathBuf>,
        /// Device id: letters, digits, '.', '_' or '-', starting with a letter or digit; not
        /// a card number.
        #[arg(long, value_parser = parse_device_id)]
        id: DeviceId,
        /// Directory to write the bundle into (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace a bundle already in --out.
        #[arg(long)]
        force: bool,
    },
    /// Create a release key pair (release.key 0600, release.pub) for signing software
    /// artifacts. Keep release.key off the controller; install release.pub as
    /// DATA/pki/release.pub.
    ReleaseKey {
        /// Directory to write release.key and release.pub into (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// One line per device: state, presence, last contact, versions.
    List,
    /// Everything known about one device, with its latest heartbeat and telemetry.
    Show {
        /// Device id.
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
    },
    /// Replace a device's groups (none: leave every group).
    SetGroups {
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
        groups: Vec<String>,
    },
    /// Replace a device's labels (key=value ...; none: remove all).
    SetLabels {
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
        #[arg(value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Report a terminal lost or stolen: lifecycle `lost`, and it is locked.
    Lost {
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
        #[arg(long)]
        reason: String,
    },
    /// A lost terminal is back: lifecycle `active` (it stays locked until unlocked).
    Found {
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
        #[arg(long)]
        note: Option<String>,
    },
    /// Revoke a device's certificates: its live session closes at once, reconnects are
    /// refused, the certificates go on the CRL.
    Revoke {
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
        #[arg(long)]
        reason: String,
    },
    /// Every certificate issued for a device: serial, how (enrolment, renewal, cli,
    /// cli_offline, simulator), by whom, expiry, revoked or not.
    Certificates {
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
    },
    /// Revoke and retire a device: hidden from `devices list`, kept for history.
    Decommission {
        #[arg(value_parser = parse_device_id)]
        id: DeviceId,
        #[arg(long)]
        reason: String,
    },
}

fn reason_param(reason: String) -> serde_json::Map<String, serde_json::Value> {
    let mut params = serde_json::Map::new();
    params.insert("reason".into(), reason.into());
    params
}

/// Clap value parser: `key=value`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    crate::api::parse_label(s)
}

/// Arguments of `posctl watch`.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct WatchArgs {
    /// Only events of this device.
    #[arg(long, value_parser = parse_device_id)]
    pub(crate) device: Option<DeviceId>,
    /// Exit (successfully) after this many events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) count: Option<u64>,
    /// Stop after this long (e.g. 30s, 2m). With --count, reaching it first is an error.
    #[arg(long, value_name = "DURATION", value_parser = output::parse_duration)]
    pub(crate) timeout: Option<Duration>,
}

/// Clap value parser: a device id, with an error that names the allowed alphabet.
fn parse_device_id(s: &str) -> Result<DeviceId, String> {
    DeviceId::new(s).map_err(|e| {
        format!(
            "{e}; a device id is 1 to 64 characters: letters, digits, '.', '_' or '-', \
             starting with a letter or digit"
        )
    })
}

/// A device id that enters the fleet here (a certificate issued, a token pinned to it): refused
/// if it looks like a card number, before the controller is asked. Checked after parsing, so
/// the refusal names `flag` without repeating the value (clap's own errors repeat it).
pub(crate) fn check_new_device_id(flag: &str, id: &DeviceId) -> anyhow::Result<()> {
    DeviceId::new_for_issue(id.as_str())
        .map(drop)
        .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

/// Clap value parser: a group name.
fn parse_group(s: &str) -> Result<String, String> {
    crate::fleetconfig::validate_group_name(s)
        .map(|()| s.to_owned())
        .map_err(|e| format!("{e}; a group name is 1 to 64 letters, digits, '.', '_' or '-'"))
}

/// Clap value parser: `fleet`, `group/NAME` or `device/ID`.
fn parse_scope(s: &str) -> Result<crate::fleetconfig::Scope, String> {
    crate::fleetconfig::Scope::parse(s).map_err(|e| e.to_string())
}

/// Entry point of the `posctl` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS, // e.g. `posctl watch | head -3`
        Err(e) => {
            eprintln!("error: {}", posfleet_runtime::report::error_report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Diagnostics on stderr, off unless `POSCTL_LOG` asks (e.g. `POSCTL_LOG=debug`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_to(cli, &mut out)
}

/// Runs `cli`, printing to `out` (blocking: it starts its own runtime for API commands, so
/// in-process tests call it from a blocking thread).
pub(crate) fn run_to(cli: Cli, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cli.command {
        // Through the API: the controller issues and records the certificate.
        Command::Pki(PkiCommand::IssueDevice {
            dir: None,
            id,
            out: bundle_dir,
            force,
        }) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(async {
                let api = client::ApiClient::new(endpoint::resolve(&cli.conn)?)?;
                pki::issue_device(&api, &id, &bundle_dir, force, cli.output, out).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        // Local files only: no runtime, no server.
        Command::Pki(cmd) => {
            run_pki(&cmd, &cli.conn, cli.output, out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Artifact(cmd) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(run_artifact(&cli.conn, cli.output, cmd, out))
        }
        Command::Api(cmd) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let mut prompt = accounts::TerminalPrompt {
                stdin: cmd.password_stdin(),
            };
            runtime.block_on(run_api(
                &cli.conn,
                cli.output,
                cmd,
                out,
                &mut prompt,
                shutdown_signal(),
            ))
        }
    }
}

fn run_pki(
    cmd: &PkiCommand,
    conn: &ConnectArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let default_dir = || conn.data_dir().join("pki");
    match cmd {
        PkiCommand::Init { dir, hosts } => {
            pki::init(&dir.clone().unwrap_or_else(default_dir), hosts, format, out)
        }
        PkiCommand::IssueDevice {
            dir,
            id,
            out: bundle_dir,
            force,
        } => pki::issue_device_offline(
            &dir.clone().unwrap_or_else(default_dir),
            id,
            bundle_dir,
            *force,
            format,
            out,
        ),
        PkiCommand::ReleaseKey { out: dir } => pki::release_key(dir, format, out),
    }
}

/// Runs an `artifact` subcommand (`sign` is local and needs no server).
async fn run_artifact(
    conn: &ConnectArgs,
    format: OutputFormat,
    cmd: ArtifactCommand,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    if let ArtifactCommand::Sign {
        key,
        file,
        out: sig,
    } = &cmd
    {
        artifacts::sign(key, file, sig.as_deref(), format, out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let api = client::ApiClient::new(endpoint::resolve(conn)?)?;
    match cmd {
        ArtifactCommand::Sign { .. } => {}
        ArtifactCommand::Upload {
            file,
            version,
            signature,
            component,
            min_version,
        } => {
            let args = artifacts::UploadArgs {
                file,
                version,
                signature,
                component,
                min_version,
            };
            artifacts::upload(&api, &args, format, out).await?;
        }
        ArtifactCommand::List => artifacts::list(&api, format, out).await?,
        ArtifactCommand::Show { id } => artifacts::show(&api, &id, format, out).await?,
        ArtifactCommand::Delete { id } => artifacts::delete(&api, &id, format, out).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a command that talks to the API. `stop` ends `watch` cleanly (Ctrl-C in the binary).
async fn run_api(
    conn: &ConnectArgs,
    format: OutputFormat,
    cmd: ApiCommand,
    out: &mut dyn Write,
    prompt: &mut dyn accounts::Prompt,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    let endpoint = endpoint::resolve(conn)?;
    match &cmd {
        ApiCommand::Login { user, .. } => {
            accounts::login(endpoint, conn.config_dir.as_deref(), user, prompt, out).await?;
            return Ok(ExitCode::SUCCESS);
        }
        ApiCommand::Logout => {
            accounts::logout(endpoint, conn.config_dir.as_deref(), out).await?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let api = client::ApiClient::new(endpoint)?;
    match cmd {
        ApiCommand::Login { .. } | ApiCommand::Logout => {}
        ApiCommand::Password { .. } => accounts::password(&api, prompt, out).await?,
        ApiCommand::Whoami => accounts::whoami(&api, out).await?,
        ApiCommand::Mfa(MfaCommand::Enrol) => accounts::mfa_enrol(&api, format, out).await?,
        ApiCommand::Mfa(MfaCommand::Confirm { .. }) => {
            accounts::mfa_confirm(&api, prompt, out).await?;
        }
        ApiCommand::Token(TokenCommand::Create {
            name,
            role,
            expires,
        }) => accounts::token_create(&api, &name, &role, expires, format, out).await?,
        ApiCommand::Token(TokenCommand::List) => accounts::token_list(&api, format, out).await?,
        ApiCommand::Token(TokenCommand::Revoke { name }) => {
            accounts::token_revoke(&api, &name, out).await?;
        }
        ApiCommand::User(cmd) => run_user(&api, cmd, format, out).await?,
        ApiCommand::Devices(DevicesCommand::List) => devices::list(&api, format, out).await?,
        ApiCommand::Devices(DevicesCommand::Show { id }) => {
            devices::show(&api, &id, format, out).await?;
        }
        ApiCommand::Tx(TxCommand::List(args)) => {
            transactions::list(&api, &args, format, out).await?;
        }
        ApiCommand::Tx(TxCommand::Summary { id }) => {
            transactions::summary(&api, &id, format, out).await?;
        }
        ApiCommand::Watch(args) => watch::run(&api, &args, format, out, stop).await?,
        ApiCommand::Config(cmd) => match cmd {
            ConfigCommand::Set(args) => config::set(&api, &args, format, out).await?,
            ConfigCommand::Get(args) => config::get(&api, &args, format, out).await?,
            ConfigCommand::History(args) => config::history(&api, &args, format, out).await?,
            ConfigCommand::Diff(args) => config::diff(&api, &args, format, out).await?,
            ConfigCommand::Schema => config::schema(&api, format, out).await?,
        },
        ApiCommand::Devices(DevicesCommand::SetGroups { id, groups }) => {
            commands::set_groups(&api, &id, &groups, format, out).await?;
        }
        ApiCommand::Devices(DevicesCommand::SetLabels { id, labels }) => {
            commands::set_labels(&api, &id, &labels, format, out).await?;
        }
        ApiCommand::Lock { target, reason } => {
            commands::create(&api, "lock", &target, reason_param(reason), format, out).await?;
        }
        ApiCommand::Unlock { target, reason } => {
            commands::create(&api, "unlock", &target, reason_param(reason), format, out).await?;
        }
        ApiCommand::Reboot { target } => {
            commands::create(&api, "reboot", &target, serde_json::Map::new(), format, out).await?;
        }
        ApiCommand::Wipe { id, force } => {
            let mut params = serde_json::Map::new();
            params.insert("force".into(), force.into());
            let target = TargetArgs {
                id: Some(id),
                group: None,
                label: vec![],
            };
            commands::create(&api, "wipe", &target, params, format, out).await?;
        }
        ApiCommand::Logs(LogsCommand::Collect {
            id,
            since,
            max_bytes,
        }) => {
            let mut params = serde_json::Map::new();
            if let Some(since) = since {
                let ms = crate::api::parse_time("since", &since).map_err(anyhow::Error::msg)?;
                params.insert("since_ms".into(), ms.into());
            }
            if let Some(max) = max_bytes {
                params.insert("max_bytes".into(), max.into());
            }
            let target = TargetArgs {
                id: Some(id),
                group: None,
                label: vec![],
            };
            commands::create(&api, "collect_logs", &target, params, format, out).await?;
        }
        ApiCommand::Logs(LogsCommand::Get {
            command_id,
            out: file,
        }) => {
            commands::logs_get(&api, &command_id, file.as_deref(), out).await?;
        }
        ApiCommand::Commands(CommandsCommand::List(args)) => {
            commands::list(&api, &args, format, out).await?;
        }
        ApiCommand::Commands(CommandsCommand::Show { id }) => {
            commands::show(&api, &id, format, out).await?;
        }
        ApiCommand::Commands(CommandsCommand::Cancel { id }) => {
            commands::cancel(&api, &id, format, out).await?;
        }
        ApiCommand::Audit(AuditCommand::List(args)) => {
            audit::list(&api, &args, format, out).await?
        }
        ApiCommand::Audit(AuditCommand::Verify { anchor }) => {
            return audit::verify(&api, anchor.as_deref(), format, out).await;
        }
        ApiCommand::Audit(AuditCommand::Anchor(AnchorCommand::Export { out: file })) => {
            audit::anchor_export(&api, file.as_deref(), format, out).await?;
        }
        ApiCommand::Audit(AuditCommand::Export { out: file }) => {
            audit::export(&api, file.as_deref(), out).await?;
        }
        ApiCommand::Approvals(ApprovalsCommand::List) => {
            audit::approvals_list(&api, format, out).await?;
        }
        ApiCommand::Approvals(ApprovalsCommand::Approve { id }) => {
            audit::approvals_decide(&api, &id, "approve", format, out).await?;
        }
        ApiCommand::Approvals(ApprovalsCommand::Reject { id }) => {
            audit::approvals_decide(&api, &id, "reject", format, out).await?;
        }
        ApiCommand::Custody(CustodyCommand::Record {
            id,
            from,
            to,
            location,
            note,
        }) => {
            let h = audit::Handover {
                from: &from,
                to: &to,
                location: &location,
                note: note.as_deref(),
            };
            audit::custody_record(&api, &id, &h, format, out).await?;
        }
        ApiCommand::Custody(CustodyCommand::History { id }) => {
            return audit::custody_history(&api, &id, format, out).await;
        }
        ApiCommand::Devices(DevicesCommand::Lost { id, reason }) => {
            let body = serde_json::json!({ "reason": reason });
            audit::lost_found(&api, &id, "lost", body, format, out).await?;
        }
        ApiCommand::Devices(DevicesCommand::Found { id, note }) => {
            let body = match note {
                Some(n) => serde_json::json!({ "note": n }),
                None => serde_json::json!({}),
            };
            audit::lost_found(&api, &id, "found", body, format, out).await?;
        }
        ApiCommand::Enroll(EnrollCommand::Token(cmd)) => match cmd {
            EnrolTokenCommand::Create {
                device,
                serial,
                group,
                expires,
            } => {
                let pins = enrol::TokenPins {
                    device,
                    serial,
                    group,
                };
                enrol::create_token(&api, pins, expires, format, out).await?
            }
            EnrolTokenCommand::List => enrol::list_tokens(&api, format, out).await?,
            EnrolTokenCommand::Revoke { id } => enrol::revoke_token(&api, &id, format, out).await?,
        },
        ApiCommand::Devices(DevicesCommand::Revoke { id, reason }) => {
            enrol::revoke_device(&api, &id, reason, false, format, out).await?
        }
        ApiCommand::Devices(DevicesCommand::Certificates { id }) => {
            enrol::certificates(&api, &id, format, out).await?
        }
        ApiCommand::Devices(DevicesCommand::Decommission { id, reason }) => {
            enrol::revoke_device(&api, &id, reason, true, format, out).await?
        }
        ApiCommand::Rollout(cmd) => match cmd {
            RolloutCommand::Create(args) => rollouts::create(&api, &args, format, out).await?,
            RolloutCommand::List => rollouts::list(&api, format, out).await?,
            RolloutCommand::Show {
                id,
                follow,
                interval,
                timeout,
            } => {
                let follow = follow.then_some((interval, timeout));
                rollouts::show(&api, &id, follow, format, out, stop).await?;
            }
            RolloutCommand::Pause { id } => {
                rollouts::control(&api, &id, "pause", None, format, out).await?;
            }
            RolloutCommand::Resume { id } => {
                rollouts::control(&api, &id, "resume", None, format, out).await?;
            }
            RolloutCommand::Abort { id, reason } => {
                rollouts::control(&api, &id, "abort", reason.as_deref(), format, out).await?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_user(
    api: &client::ApiClient,
    cmd: UserCommand,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let users = |rest: &[&str]| {
        let mut segments = vec!["api", "v1", "users"];
        segments.extend_from_slice(rest);
        api.url(&segments)
    };
    match cmd {
        UserCommand::Create { name, role } => {
            let body = serde_json::json!({"name": name, "role": role});
            accounts::user_create_or_reset(api, users(&[]), body, format, out).await
        }
        UserCommand::List => accounts::user_list(api, format, out).await,
        UserCommand::Reset { name, mfa } => {
            let body = serde_json::json!({"reset_mfa": mfa});
            accounts::user_create_or_reset(api, users(&[&name, "reset"]), body, format, out).await
        }
        UserCommand::Disable { name } => {
            let url = users(&[&name, "disable"]);
            accounts::user_action(
                api,
                reqwest::Method::POST,
                url,
                &format!("disabled {name}"),
                out,
            )
            .await
        }
        UserCommand::Enable { name } => {
            let url = users(&[&name, "enable"]);
            accounts::user_action(
                api,
                reqwest::Method::POST,
                url,
                &format!("enabled {name}"),
                out,
            )
            .await
        }
        UserCommand::Delete { name } => {
            let url = users(&[&name]);
            accounts::user_action(
                api,
                reqwest::Method::DELETE,
                url,
                &format!("deleted {name}"),
                out,
            )
            .await
        }
    }
}

impl ApiCommand {
    /// True if secrets are to be read from stdin lines.
    fn password_stdin(&self) -> bool {
        matches!(
            self,
            ApiCommand::Login {
                password_stdin: true,
                ..
            } | ApiCommand::Password {
                password_stdin: true
            } | ApiCommand::Mfa(MfaCommand::Confirm {
                password_stdin: true
            })
        )
    }
}

/// Resolves on Ctrl-C or SIGTERM. If the handlers cannot be installed, never resolves (the
/// default signal disposition still ends the process).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        result = tokio::signal::ctrl_c() => {
            if result.is_err() {
                std::future::pending::<()>().await;
            }
        }
        _ = term.recv() => {}
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
