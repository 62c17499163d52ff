//! The config file as written: every field optional so that validation can report every
//! problem at once; unknown fields are refused while parsing.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) broker: Option<RawBroker>,
    pub(super) tls: Option<RawTls>,
    #[serde(default)]
    pub(super) agent: RawAgent,
    #[serde(default)]
    pub(super) device: RawDevice,
    #[serde(default)]
    pub(super) sensors: RawSensors,
    #[serde(default)]
    pub(super) local_api: RawLocalApi,
    #[serde(default)]
    pub(super) outbox: RawOutbox,
    #[serde(default)]
    pub(super) commands: RawCommands,
    #[serde(default)]
    pub(super) hooks: RawHooks,
    #[serde(default)]
    pub(super) updates: RawUpdates,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpdates {
    pub(super) trusted_release_keys: Option<Vec<PathBuf>>,
    pub(super) download_dir: Option<PathBuf>,
    pub(super) confirm_timeout: Option<String>,
    pub(super) retry_attempts: Option<u64>,
    pub(super) max_retry_delay: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCommands {
    pub(super) trusted_keys: Option<Vec<PathBuf>>,
    pub(super) max_offline: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHooks {
    pub(super) config_apply: Option<PathBuf>,
    pub(super) lock: Option<PathBuf>,
    pub(super) unlock: Option<PathBuf>,
    pub(super) wipe: Option<PathBuf>,
    pub(super) reboot: Option<PathBuf>,
    pub(super) collect_logs: Option<PathBuf>,
    pub(super) install: Option<PathBuf>,
    pub(super) rollback: Option<PathBuf>,
    pub(super) health: Option<PathBuf>,
    pub(super) timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    pub(super) url: Option<String>,
    pub(super) keep_alive: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) backoff_initial: Option<String>,
    pub(super) backoff_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca: Option<PathBuf>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    pub(super) device_url: Option<String>,
    pub(super) renew_before: Option<String>,
    pub(super) renew_check_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) data_dir: Option<PathBuf>,
    pub(super) heartbeat_interval: Option<String>,
    pub(super) telemetry_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevice {
    pub(super) model: Option<String>,
    pub(super) serial: Option<String>,
    pub(super) firmware_version: Option<String>,
    pub(super) payment_app_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSensors {
    pub(super) provider: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLocalApi {
    pub(super) socket: Option<PathBuf>,
    pub(super) tcp: Option<String>,
    pub(super) request_timeout: Option<String>,
    pub(super) max_connections: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbox {
    pub(super) batch_max_transactions: Option<u64>,
    pub(super) linger: Option<String>,
    pub(super) resend_timeout: Option<String>,
    pub(super) max_in_flight_batches: Option<u64>,
    pub(super) cache_capacity_bytes: Option<u64>,
    pub(super) max_pending: Option<u64>,
    pub(super) idempotency_window: Option<u64>,
}
