//! The agent's config file, in two stages: `RawConfig` is the TOML as written (unknown fields
//! refused), [`Config`] is the validated result. Every invalid field is reported at once.
//!
//! The documented example is `deploy/agent/agent.example.toml`. The device id is not
//! configurable: it is read from the client certificate.

mod raw;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use posfleet_runtime::backoff::Backoff;
use posfleet_runtime::value::{BrokerUrl, parse_duration};

use crate::agent::DeviceInfo;
use crate::api::{DEFAULT_SOCKET_NAME, LocalApiSettings, MAX_SOCKET_PATH};
use crate::command::update::{
    DEFAULT_CONFIRM_TIMEOUT, DEFAULT_MAX_RETRY_DELAY, DEFAULT_RETRY_ATTEMPTS,
};
use crate::command::{DEFAULT_MAX_OFFLINE, HookSettings};
use crate::outbox::OutboxSettings;
use raw::{RawCommands, RawConfig, RawHooks, RawLocalApi, RawOutbox, RawUpdates};

/// Longest model, serial or version string accepted (they travel in every Presence).
pub const MAX_DEVICE_TEXT: usize = 64;
/// Where the agent keeps its state unless `agent.data_dir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/posfleet-agent";

/// Defaults of the optional settings.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A validated agent configuration. Relative paths in the file are resolved against the
/// directory of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The MQTT broker (the posfleet edge or an external broker).
    pub broker: BrokerUrl,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Time allowed for TCP connect + TLS handshake + CONNACK.
    pub connect_timeout: Duration,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Certificate material.
    pub tls: TlsFiles,
    /// The agent's state directory (its disk usage is what telemetry reports).
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub telemetry_interval: Duration,
    /// What the terminal reports about itself.
    pub device: DeviceInfo,
    /// Where terminal sensor readings come from.
    pub sensors: SensorSource,
    /// The payment application's API.
    pub local_api: LocalApiSettings,
    /// The transaction outbox (in `data_dir/outbox`).
    pub outbox: OutboxSettings,
    /// The signed command plane.
    pub commands: CommandsConfig,
    /// Terminal hooks run by commands.
    pub hooks: HookSettings,
    /// Software updates.
    pub updates: UpdatesConfig,
    /// Automatic certificate renewal (`[tls]` device_url, renew_before, renew_check_interval).
    pub renewal: RenewalConfig,
}

/// Certificate renewal settings of `[tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalConfig {
    /// The controller's device endpoint, `https://host:port` (written by `enroll`); `None`:
    /// automatic renewal is off.
    pub device_url: Option<String>,
    /// Renew when fewer than this remain before the certificate expires.
    pub renew_before: Duration,
    /// Time between validity checks (the first is at start).
    pub check_interval: Duration,
}

/// `[updates]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatesConfig {
    /// PEM files of the trusted release keys; none: every SoftwareUpdate is refused.
    pub trusted_release_keys: Vec<PathBuf>,
    /// Where artifacts are downloaded (default `DATA/updates`).
    pub download_dir: PathBuf,
    /// Confirmation time when the command says 0.
    pub confirm_timeout: Duration,
    /// Consecutive download attempts without progress before the update fails.
    pub retry_attempts: u32,
    /// Longest delay between download attempts.
    pub max_retry_delay: Duration,
}

/// `[commands]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandsConfig {
    /// PEM files of the controller's command keys (at least one file; each may hold several
    /// keys during a rotation).
    pub trusted_keys: Vec<PathBuf>,
    /// Offline lease (`None`: disabled, `"0s"` in the file).
    pub max_offline: Option<Duration>,
}

/// Paths of the CA bundle, the device certificate and its private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The terminal sensor provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorSource {
    /// Synthetic, slowly varying readings (demos, benches without hardware).
    Simulated,
    /// No sensors: telemetry carries system metrics only.
    None,
}

/// One invalid setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted TOML path, e.g. `broker.url`.
    pub field: &'static str,
    pub message: String,
}

/// Why the config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {} is not valid: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("config file {} has {} invalid setting(s):{}", path.display(), problems.len(), List(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

struct List<'a>(&'a [Problem]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0 {
            write!(f, "\n  {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            },
            other => other,
        })
    }

    /// Parses and validates config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        let mut v = Validator {
            problems: Vec::new(),
            base,
        };
        let config = v.config(raw);
        match config {
            Some(config) if v.problems.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                path: PathBuf::from("<text>"),
                problems: v.problems,
            }),
        }
    }
}

/// Collects problems while converting; each method returns a usable placeholder on error so
/// that validation goes on.
struct Validator<'a> {
    problems: Vec<Problem>,
    base: &'a Path,
}

impl Validator<'_> {
    fn problem(&mut self, field: &'static str, message: impl Into<String>) {
        self.problems.push(Problem {
            field,
            message: message.into(),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let broker_raw = raw.broker.unwrap_or_default();
        let broker = match broker_raw.url.as_deref() {
            None => {
                self.problem(
                    "broker.url",
                    "missing; e.g. url = \"mqtts://fleet.example:8883\"",
                );
                None
            }
            Some(url) => BrokerUrl::parse(url)
                .map_err(|e| self.problem("broker.url", e))
                .ok(),
        };
        let keep_alive = self.duration(
            "broker.keep_alive",
            broker_raw.keep_alive,
            DEFAULT_KEEP_ALIVE,
            (
                Duration::from_secs(5),
                Duration::from_secs(u64::from(u16::MAX)),
            ),
        );
        let connect_timeout = self.duration(
            "broker.connect_timeout",
            broker_raw.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
            (Duration::from_secs(1), Duration::from_secs(300)),
        );
        let defaults = Backoff::default();
        let initial = self.duration(
            "broker.backoff_initial",
            broker_raw.backoff_initial,
            defaults.initial,
            (Duration::from_millis(10), Duration::from_secs(600)),
        );
        let max = self.duration(
            "broker.backoff_max",
            broker_raw.backoff_max,
            defaults.max,
            (Duration::from_millis(10), Duration::from_secs(3600)),
        );
        if max < initial {
            self.problem(
                "broker.backoff_max",
                format!("{max:?} is smaller than broker.backoff_initial ({initial:?})"),
            );
        }

        let tls_raw = raw.tls.unwrap_or_default();
        let ca = self.path("tls.ca", tls_raw.ca);
        let cert = self.path("tls.cert", tls_raw.cert);
        let key = self.path("tls.key", tls_raw.key);
        let renewal = RenewalConfig {
            device_url: self.device_url(tls_raw.device_url),
            renew_before: self.duration(
                "tls.renew_before",
                tls_raw.renew_before,
                crate::renew::DEFAULT_RENEW_BEFORE,
                (
                    Duration::from_secs(3600),
                    Duration::from_secs(3650 * 24 * 3600),
                ),
            ),
            check_interval: self.duration(
                "tls.renew_check_interval",
                tls_raw.renew_check_interval,
                crate::renew::DEFAULT_CHECK_INTERVAL,
                (Duration::from_secs(60), Duration::from_secs(7 * 24 * 3600)),
            ),
        };

        let data_dir = self.resolve(
            raw.agent
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        );
        let heartbeat_interval = self.duration(
            "agent.heartbeat_interval",
            raw.agent.heartbeat_interval,
            DEFAULT_HEARTBEAT_INTERVAL,
            (Duration::from_secs(1), Duration::from_secs(3600)),
        );
        let telemetry_interval = self.duration(
            "agent.telemetry_interval",
            raw.agent.telemetry_interval,
            DEFAULT_TELEMETRY_INTERVAL,
            (Duration::from_secs(1), Duration::from_secs(24 * 3600)),
        );

        let device = DeviceInfo {
            model: self.text("device.model", raw.device.model),
            serial: self.text("device.serial", raw.device.serial),
            firmware_version: self.text("device.firmware_version", raw.device.firmware_version),
            payment_app_version: self
                .text("device.payment_app_version", raw.device.payment_app_version),
        };
        let sensors = match raw.sensors.provider.as_deref() {
            None | Some("none") => SensorSource::None,
            Some("simulated") => SensorSource::Simulated,
            Some(other) => {
                self.problem(
                    "sensors.provider",
                    format!("unknown provider {other:?}; use \"simulated\" or \"none\""),
                );
                SensorSource::None
            }
        };

        let local_api = self.local_api(raw.local_api, &data_dir);
        let outbox = self.outbox(raw.outbox);
        let commands = self.commands(raw.commands);
        let hooks = self.hooks(raw.hooks);
        let updates = self.updates(raw.updates, &data_dir);

        Some(Config {
            broker: broker?,
            keep_alive,
            connect_timeout,
            backoff: Backoff { initial, max },
            tls: TlsFiles {
                ca: ca?,
                cert: cert?,
                key: key?,
            },
            data_dir,
            heartbeat_interval,
            telemetry_interval,
            device,
            sensors,
            local_api,
            outbox,
            commands,
            hooks,
            updates,
            renewal,
        })
    }

    fn device_url(&mut self, raw: Option<String>) -> Option<String> {
        let url = raw?;
        let url = url.trim().trim_end_matches('/');
        match url.strip_prefix("https://") {
            Some(rest) if !rest.is_empty() && !rest.contains('/') => Some(url.to_owned()),
            _ => {
                self.problem(
                    "tls.device_url",
                    format!("{url:?}: use https://host:port (the device endpoint `enroll` wrote); leave it out to turn renewal off"),
                );
                None
            }
        }
    }

    fn updates(&mut self, raw: RawUpdates, data_dir: &Path) -> UpdatesConfig {
        let trusted_release_keys = raw
            .trusted_release_keys
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| self.resolve(p))
            .collect();
        let download_dir = match raw.download_dir {
            Some(p) if p.as_os_str().is_empty() => {
                self.problem(
                    "updates.download_dir",
                    "must not be empty; leave it out for DATA/updates",
                );
                data_dir.join("updates")
            }
            Some(p) => self.resolve(p),
            None => data_dir.join("updates"),
        };
        let confirm_timeout = self.duration(
            "updates.confirm_timeout",
            raw.confirm_timeout,
            DEFAULT_CONFIRM_TIMEOUT,
            (Duration::from_secs(5), Duration::from_secs(24 * 3600)),
        );
        let retry_attempts = self.count(
            "updates.retry_attempts",
            raw.retry_attempts,
            u64::from(DEFAULT_RETRY_ATTEMPTS),
            (1, 100),
        ) as u32;
        let max_retry_delay = self.duration(
            "updates.max_retry_delay",
            raw.max_retry_delay,
            DEFAULT_MAX_RETRY_DELAY,
            (Duration::from_secs(1), Duration::from_secs(3600)),
        );
        UpdatesConfig {
            trusted_release_keys,
            download_dir,
            confirm_timeout,
            retry_attempts,
            max_retry_delay,
        }
    }

    fn commands(&mut self, raw: RawCommands) -> CommandsConfig {
        let trusted_keys: Vec<PathBuf> = raw
            .trusted_keys
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| self.resolve(p))
            .collect();
        if trusted_keys.is_empty() {
            self.problem(
                "commands.trusted_keys",
                "missing; the controller's command key file(s), e.g. trusted_keys = [\"command.pub\"] (from the device bundle); the agent does not run without one",
            );
        }
        let max_offline = self.duration(
            "commands.max_offline",
            raw.max_offline,
            DEFAULT_MAX_OFFLINE,
            (Duration::ZERO, Duration::from_secs(10_000 * 3600)),
        );
        CommandsConfig {
            trusted_keys,
            max_offline: (!max_offline.is_zero()).then_some(max_offline),
        }
    }

    fn hooks(&mut self, raw: RawHooks) -> HookSettings {
        let timeout = self.duration(
            "hooks.timeout",
            raw.timeout,
            HookSettings::default().timeout,
            (Duration::from_secs(1), Duration::from_secs(3600)),
        );
        let mut hook = |field: &'static str, path: Option<PathBuf>| match path {
            Some(p) if p.as_os_str().is_empty() => {
                self.problem(field, "must not be empty; leave it out to run no hook");
                None
            }
            Some(p) => Some(self.resolve(p)),
            None => None,
        };
        HookSettings {
            config_apply: hook("hooks.config_apply", raw.config_apply),
            lock: hook("hooks.lock", raw.lock),
            unlock: hook("hooks.unlock", raw.unlock),
            wipe: hook("hooks.wipe", raw.wipe),
            reboot: hook("hooks.reboot", raw.reboot),
            collect_logs: hook("hooks.collect_logs", raw.collect_logs),
            install: hook("hooks.install", raw.install),
            rollback: hook("hooks.rollback", raw.rollback),
            health: hook("hooks.health", raw.health),
            timeout,
        }
    }

    /// `data_dir` is the resolved state directory: the default socket lives in it, so two
    /// agents on one machine (benches, tests) never share a socket by accident. Production
    /// installs set `/run/posfleet-agent/api.sock` (see the example config and systemd unit).
    fn local_api(&mut self, raw: RawLocalApi, data_dir: &Path) -> LocalApiSettings {
        let socket = match raw.socket {
            Some(path) => self.resolve(path),
            None => data_dir.join(DEFAULT_SOCKET_NAME),
        };
        let mut api = LocalApiSettings::new(socket);
        if api.socket.as_os_str().len() > MAX_SOCKET_PATH {
            self.problem(
                "local_api.socket",
                format!("longer than {MAX_SOCKET_PATH} bytes (a Unix socket path limit)"),
            );
        }
        if let Some(text) = raw.tcp {
            match text.parse::<std::net::SocketAddr>() {
                Ok(addr) if addr.ip().is_loopback() => api.tcp = Some(addr),
                Ok(_) => self.problem(
                    "local_api.tcp",
                    format!("{text:?} is not a loopback address; use 127.0.0.1:PORT or [::1]:PORT"),
                ),
                Err(_) => self.problem(
                    "local_api.tcp",
                    format!("{text:?} is not an address; e.g. \"127.0.0.1:8484\""),
                ),
            }
        }
        api.request_timeout = self.duration(
            "local_api.request_timeout",
            raw.request_timeout,
            api.request_timeout,
            (Duration::from_millis(100), Duration::from_secs(300)),
        );
        api.max_connections = self.count(
            "local_api.max_connections",
            raw.max_connections,
            32,
            (1, 1024),
        ) as usize;
        api
    }

    fn outbox(&mut self, raw: RawOutbox) -> OutboxSettings {
        let d = OutboxSettings::default();
        OutboxSettings {
            batch_max_transactions: self.count(
                "outbox.batch_max_transactions",
                raw.batch_max_transactions,
                d.batch_max_transactions as u64,
                (1, 2000),
            ) as usize,
            linger: self.duration(
                "outbox.linger",
                raw.linger,
                d.linger,
                (Duration::ZERO, Duration::from_secs(10)),
            ),
            resend_timeout: self.duration(
                "outbox.resend_timeout",
                raw.resend_timeout,
                d.resend_timeout,
                (Duration::from_secs(1), Duration::from_secs(3600)),
            ),
            max_in_flight: self.count(
                "outbox.max_in_flight_batches",
                raw.max_in_flight_batches,
                d.max_in_flight as u64,
                (1, 64),
            ) as usize,
            cache_capacity: self.count(
                "outbox.cache_capacity_bytes",
                raw.cache_capacity_bytes,
                d.cache_capacity,
                (64 * 1024, 4 << 30),
            ),
            max_pending: self.count(
                "outbox.max_pending",
                raw.max_pending,
                d.max_pending,
                (100, 10_000_000),
            ),
            idempotency_window: self.count(
                "outbox.idempotency_window",
                raw.idempotency_window,
                d.idempotency_window,
                (100, 10_000_000),
            ),
            queue_capacity: d.queue_capacity,
        }
    }

    fn count(
        &mut self,
        field: &'static str,
        value: Option<u64>,
        default: u64,
        (min, max): (u64, u64),
    ) -> u64 {
        match value {
            None => default,
            Some(n) if n < min || n > max => {
                self.problem(field, format!("{n} is outside {min}..={max}"));
                default
            }
            Some(n) => n,
        }
    }

    fn duration(
        &mut self,
        field: &'static str,
        value: Option<String>,
        default: Duration,
        (min, max): (Duration, Duration),
    ) -> Duration {
        let Some(text) = value else {
            return default;
        };
        match parse_duration(&text) {
            Ok(d) if d < min || d > max => {
                self.problem(field, format!("{text:?} is outside {min:?}..={max:?}"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(field, e);
                default
            }
        }
    }

    fn path(&mut self, field: &'static str, value: Option<PathBuf>) -> Option<PathBuf> {
        match value {
            None => {
                self.problem(field, "missing; the path of a PEM file");
                None
            }
            Some(p) if p.as_os_str().is_empty() => {
                self.problem(field, "must not be empty");
                None
            }
            Some(p) => Some(self.resolve(p)),
        }
    }

    fn resolve(&self, path: PathBuf) -> PathBuf {
        if path.is_absolute() {
            path
        } else {
            self.base.join(path)
        }
    }

    fn text(&mut self, field: &'static str, value: Option<String>) -> String {
        let text = value.unwrap_or_default();
        if text.chars().count() > MAX_DEVICE_TEXT {
            self.problem(field, format!("longer than {MAX_DEVICE_TEXT} characters"));
            return String::new();
        }
        if text.chars().any(char::is_control) {
            self.problem(field, "contains control characters");
            return String::new();
        }
        text
    }
}
