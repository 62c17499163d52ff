//! The command-line flags of connection admission (`posfleet-broker serve|demo`), flattened
//! into the serve arguments, and [`AdmissionOptions`], what they become.

use std::time::Duration;

use clap::Args;
use posfleet_runtime::value::parse_duration;

use super::AdmissionLimits;
use crate::api::ApiLimits;

/// Connection admission of every listener (docs/decisions/0012-connection-admission.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionOptions {
    /// The MQTT edge.
    pub mqtt: AdmissionLimits,
    /// The admin API.
    pub api: AdmissionLimits,
    /// The device download endpoint.
    pub device: AdmissionLimits,
    /// Both HTTPS listeners: a request's headers must be complete this long after the
    /// connection became ready or idle (so it is also the keep-alive idle timeout).
    pub http_header_timeout: Duration,
    /// Both HTTPS listeners: a request body must arrive at this many bytes per second at
    /// least (averaged from its start, after the grace period).
    pub http_body_min_rate: u64,
    /// Both HTTPS listeners: how long a request body may lag behind the minimum rate.
    pub http_body_grace: Duration,
    /// Live streams (`/api/v1/stream`) one principal may hold at once.
    pub max_streams_per_principal: usize,
}

impl Default for AdmissionOptions {
    fn default() -> Self {
        let api = ApiLimits::default();
        Self {
            mqtt: AdmissionLimits::mqtt(),
            api: AdmissionLimits::api(),
            device: AdmissionLimits::device(),
            http_header_timeout: api.header_read_timeout,
            http_body_min_rate: api.body_min_rate,
            http_body_grace: api.body_grace,
            max_streams_per_principal: api.max_streams_per_principal,
        }
    }
}

impl AdmissionOptions {
    /// Checks every listener's limits; the error names the listener and the field.
    pub fn check(&self) -> Result<(), String> {
        for (listener, limits) in [
            ("mqtt", &self.mqtt),
            ("api", &self.api),
            ("device", &self.device),
        ] {
            limits
                .check()
                .map_err(|e| format!("{listener} listener: {e} (see --{listener}-max-* flags)"))?;
        }
        if self.max_streams_per_principal == 0 {
            return Err("--max-streams-per-principal must be at least 1".to_owned());
        }
        if self.http_header_timeout.is_zero() {
            return Err("--http-header-timeout must be longer than 0".to_owned());
        }
        Ok(())
    }

    /// The limits of an HTTPS listener admitted under `admission`.
    pub fn http_limits(&self, admission: AdmissionLimits) -> ApiLimits {
        ApiLimits {
            admission,
            header_read_timeout: self.http_header_timeout,
            body_min_rate: self.http_body_min_rate,
            body_grace: self.http_body_grace,
            max_streams_per_principal: self.max_streams_per_principal,
            ..ApiLimits::default()
        }
    }
}

/// The flags (one group per listener, timeouts shared).
#[derive(Debug, Clone, Args)]
pub struct AdmissionArgs {
    /// MQTT edge: open connections at most (a new one beyond takes the slot of the oldest
    /// pending one).
    #[arg(long, value_name = "N", default_value_t = AdmissionLimits::mqtt().max_connections)]
    mqtt_max_connections: usize,
    /// MQTT edge: open connections of one client address (IPv6: one /64) at most.
    #[arg(long, value_name = "N", default_value_t = AdmissionLimits::mqtt().max_per_address)]
    mqtt_max_per_address: usize,
    /// MQTT edge: connections of one client address still before their mutual TLS at most.
    #[arg(long, value_name = "N", default_value_t = AdmissionLimits::mqtt().max_pending_per_address)]
    mqtt_max_pending_per_address: usize,
    /// Admin API: open connections at most.
    #[arg(long, value_name = "N", default_value_t = AdmissionLimits::api().max_connections)]
    api_max_connections: usize,
    /// Admin API: open connections of one client address at most.
    #[arg(long, value_name = "N", default_value_t = AdmissionLimits::api().max_per_address)]
    api_max_per_address: usize,
    /// Admin API: connections of one client address still before their first request at most.
    #[arg(long, value_name = "N", default_value_t = AdmissionLimits::api().max_pending_per_address)]
    api_max_pending_per_address: usize,
    /// Device endpoint: open connections at most.
    #[arg(long, value_name = "N", default_value_t = AdmissionLimits::device().max_connections)]
    device_max_connections: usize,
    /// Device endpoint: open connections of one client address at most.
    #[arg(long, value_name = "N", default_value_t = AdmissionLimits::device().max_per_address)]
    device_max_per_address: usize,
    /// Device endpoint: connections of one client address still before their first request
    /// at most.
    #[arg(long, value_name = "N", default_value_t = AdmissionLimits::device().max_pending_per_address)]
    device_max_pending_per_address: usize,
    /// Every listener: a socket that has sent nothing this long after accept is closed.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    silent_timeout: Duration,
    /// Every listener: the TLS handshake must be over this long after accept.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    tls_handshake_timeout: Duration,
    /// Every listener: TLS handshake steps doing CPU work at once (waiting for the network
    /// holds none). [default: the number of CPUs]
    #[arg(long, value_name = "N")]
    tls_handshake_cpu_slots: Option<usize>,
    /// HTTPS listeners: a request's headers must be complete this long after the connection
    /// became ready or idle (also the keep-alive idle timeout).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    http_header_timeout: Duration,
    /// HTTPS listeners: least request body rate in bytes per second (after the grace period).
    #[arg(long, value_name = "BYTES", default_value_t = ApiLimits::default().body_min_rate)]
    http_body_min_rate: u64,
    /// HTTPS listeners: how long a request body may lag behind the least rate.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    http_body_grace: Duration,
    /// Live streams (`/api/v1/stream`) one principal may hold at once (429 beyond).
    #[arg(long, value_name = "N", default_value_t = ApiLimits::default().max_streams_per_principal)]
    max_streams_per_principal: usize,
}

impl AdmissionArgs {
    pub fn options(&self) -> AdmissionOptions {
        let listener = |base: AdmissionLimits, max, per_address, pending| AdmissionLimits {
            max_connections: max,
            max_per_address: per_address,
            max_pending_per_address: pending,
            silent_timeout: self.silent_timeout,
            handshake_timeout: self.tls_handshake_timeout,
            handshake_cpu_slots: self
                .tls_handshake_cpu_slots
                .unwrap_or(base.handshake_cpu_slots),
        };
        AdmissionOptions {
            mqtt: listener(
                AdmissionLimits::mqtt(),
                self.mqtt_max_connections,
                self.mqtt_max_per_address,
                self.mqtt_max_pending_per_address,
            ),
            api: listener(
                AdmissionLimits::api(),
                self.api_max_connections,
                self.api_max_per_address,
                self.api_max_pending_per_address,
            ),
            device: listener(
                AdmissionLimits::device(),
                self.device_max_connections,
                self.device_max_per_address,
                self.device_max_pending_per_address,
            ),
            http_header_timeout: self.http_header_timeout,
            http_body_min_rate: self.http_body_min_rate,
            http_body_grace: self.http_body_grace,
            max_streams_per_principal: self.max_streams_per_principal,
        }
    }
}
