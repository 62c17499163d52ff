//! Prometheus metrics of the whole broker process (edge, controller, admin API).
//!
//! One [`Metrics`] value is created at startup and shared (`Arc`) by every subsystem; each
//! field is a metric family registered once. `GET /metrics` renders [`Metrics::render`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set keyed by a reason string (refusal kind, handshake failure kind, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Label set keyed by a topic channel name (`hb`, `tm`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    pub channel: &'static str,
}

/// Label set of connection admission: the listener (`mqtt`, `api`, `device`) and a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteReasonLabel {
    pub site: &'static str,
    pub reason: &'static str,
}

/// Label set of open connections: the listener and `pending` or `established`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteStateLabel {
    pub site: &'static str,
    pub state: &'static str,
}

/// Label set keyed by a command status (`queued`, `succeeded`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

/// Every metric family of the broker process.
pub struct Metrics {
    registry: Registry,
    /// MQTT connections currently attached to the router through the edge (terminals, and
    /// controllers over mTLS; not the embedded controller's local link).
    pub edge_connections: Gauge,
    /// Sockets admitted and not yet through their TLS handshake (the wait for a silent
    /// socket's first byte included).
    pub edge_handshakes_in_progress: Gauge,
    /// Connections accepted and authenticated (CONNACK accepted).
    pub edge_connects_total: Counter,
    /// Connections refused before or at CONNECT, by reason (tls, no_cert, client_id, ...).
    pub edge_refusals_total: Family<ReasonLabel, Counter>,
    /// PUBLISH/SUBSCRIBE refused by the ACL or validation, by reason.
    pub edge_acl_refusals_total: Family<ReasonLabel, Counter>,
    /// PUBLISH packets accepted from clients, by channel.
    pub edge_publishes_total: Family<ChannelLabel, Counter>,
    /// Downlinks the edge queued for a terminal.
    pub edge_downlinks_total: Counter,
    /// Downlinks the edge did not queue (no subscriber, queue full, bad topic), by reason.
    pub edge_downlinks_dropped_total: Family<ReasonLabel, Counter>,
    /// Terminal uplinks refused (never acknowledged, connection closed), by reason.
    pub edge_uplinks_refused_total: Family<ReasonLabel, Counter>,
    /// Times a terminal's reads were paused by its uplink rate limit.
    pub edge_uplinks_throttled_total: Counter,
    /// How far the embedded controller is behind the uplink lanes, in bytes of the router's
    /// log (what the lanes took in minus what the controller took; 0 while no embedded
    /// controller is attached). Uplinks are refused as `controller_behind` near the log's size.
    pub edge_controller_lag_bytes: Gauge,
    /// 1 while the controller is attached to its bus (the embedded controller: subscribed
    /// through its local router link; with an external broker: MQTT connected), else 0.
    pub controller_connected: Gauge,
    /// Messages the controller ingested, by channel.
    pub ingest_messages_total: Family<ChannelLabel, Counter>,
    /// Messages the controller dropped as malformed or invalid, by reason.
    pub ingest_rejected_total: Family<ReasonLabel, Counter>,
    /// Time from receiving an uplink message to its effect being stored, in seconds.
    pub ingest_latency_seconds: Histogram,
    /// Devices the controller currently considers online.
    pub devices_online: Gauge,
    /// Devices in the registry.
    pub devices_registered: Gauge,
    /// Admin API requests refused for missing or bad credentials.
    pub api_auth_failures_total: Counter,
    /// Transactions stored (first time their (device, seq) was seen).
    pub tx_stored_total: Counter,
    /// Transactions received again with identical content (not stored twice).
    pub tx_duplicates_total: Counter,
    /// Transactions refused because another record holds their (device, seq).
    pub tx_conflicts_total: Counter,
    /// Transactions per group commit.
    pub tx_commit_batch_size: Histogram,
    /// Duration of a group commit (apply, flush, fsync), in seconds.
    pub tx_commit_seconds: Histogram,
    /// Group commits that failed (nothing in them was acknowledged).
    pub tx_commit_failures_total: Counter,
    /// Time from receiving a transaction batch to publishing its acknowledgement, seconds.
    pub tx_ack_latency_seconds: Histogram,
    /// TransactionAcks queued for publishing.
    pub tx_acks_total: Counter,
    /// TransactionAcks that could not be queued (session closed or slow); terminals resend.
    pub tx_ack_failures_total: Counter,
    /// Retry-after notices queued for terminals whose batch the full queue refused.
    pub tx_retry_after_total: Counter,
    /// Transaction batches waiting for the committer.
    pub tx_queue_depth: Gauge,
    /// Devices with a sequence gap older than the grace period.
    pub tx_devices_with_gaps: Gauge,
    /// Commands that entered each status (`queued` counts creations).
    pub commands_status_total: Family<StatusLabel, Counter>,
    /// Commands not final yet.
    pub commands_live: Gauge,
    /// Signed commands queued for publishing (first sends and re-sends).
    pub commands_sent_total: Counter,
    /// Command results dropped, by reason (unknown_or_final, wrong_device, backwards, ...).
    pub command_results_dropped_total: Family<ReasonLabel, Counter>,
    /// Log chunks refused, by reason.
    pub command_log_chunks_refused_total: Family<ReasonLabel, Counter>,
    /// Signed leases queued for publishing.
    pub command_leases_sent_total: Counter,
    /// Artifact bytes sent to terminals by the device endpoint.
    pub artifact_bytes_served_total: Counter,
    /// Rollouts by state (running, soaking, paused, completed, aborted).
    pub rollouts: Family<StatusLabel, Gauge>,
    /// Terminals of unfinished rollouts by the status of their update (`not_started`: their
    /// wave has not started): the rollout progress.
    pub rollout_members: Family<StatusLabel, Gauge>,
    /// Waves that ended, by outcome (passed, failed).
    pub rollout_waves_total: Family<StatusLabel, Counter>,
    /// Connections refused or closed by admission control (`admission/`), by listener and
    /// reason (per_address, pending_per_address, full, evicted, silent, handshake_timeout,
    /// slow_body, streams_per_principal).
    pub admission_refusals_total: Family<SiteReasonLabel, Counter>,
    /// Open connections by listener and state (pending, established).
    pub admission_connections: Family<SiteStateLabel, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("posfleet");
        let edge_connections = Gauge::default();
        let edge_handshakes_in_progress = Gauge::default();
        let edge_connects_total = Counter::default();
        let edge_refusals_total = Family::default();
        let edge_acl_refusals_total = Family::default();
        let edge_publishes_total = Family::default();
        let edge_downlinks_total = Counter::default();
        let edge_downlinks_dropped_total = Family::default();
        let edge_uplinks_refused_total = Family::default();
        let edge_uplinks_throttled_total = Counter::default();
        let edge_controller_lag_bytes = Gauge::default();
        let controller_connected = Gauge::default();
        let ingest_messages_total = Family::default();
        let ingest_rejected_total = Family::default();
        let ingest_latency_seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        let devices_online = Gauge::default();
        let devices_registered = Gauge::default();
        let api_auth_failures_total = Counter::default();
        let tx_stored_total = Counter::default();
        let tx_duplicates_total = Counter::default();
        let tx_conflicts_total = Counter::default();
        let tx_commit_batch_size = Histogram::new(exponential_buckets(1.0, 4.0, 8));
        let tx_commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let tx_commit_failures_total = Counter::default();
        let tx_ack_latency_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let tx_acks_total = Counter::default();
        let tx_ack_failures_total = Counter::default();
        let tx_retry_after_total = Counter::default();
        let tx_queue_depth = Gauge::default();
        let tx_devices_with_gaps = Gauge::default();
        let commands_status_total = Family::default();
        let commands_live = Gauge::default();
        let commands_sent_total = Counter::default();
        let command_results_dropped_total = Family::default();
        let command_log_chunks_refused_total = Family::default();
        let command_leases_sent_total = Counter::default();
        let artifact_bytes_served_total = Counter::default();
        let rollouts = Family::<StatusLabel, Gauge>::default();
        let rollout_members = Family::<StatusLabel, Gauge>::default();
        let rollout_waves_total = Family::<StatusLabel, Counter>::default();
        let admission_refusals_total = Family::<SiteReasonLabel, Counter>::default();
        let admission_connections = Family::<SiteStateLabel, Gauge>::default();
        registry.register(
            "admission_refusals",
            "Connections refused or closed by admission control, by listener and reason",
            admission_refusals_total.clone(),
        );
        registry.register(
            "admission_connections",
            "Open connections by listener and state (pending, established)",
            admission_connections.clone(),
        );
        registry.register("rollouts", "Rollouts by state", rollouts.clone());
        registry.register(
            "rollout_members",
            "Terminals of unfinished rollouts by the status of their update",
            rollout_members.clone(),
        );
        registry.register(
            "rollout_waves",
            "Rollout waves that ended, by outcome",
            rollout_waves_total.clone(),
        );

        registry.register(
            "edge_connections",
            "MQTT connections attached to the router",
            edge_connections.clone(),
        );
        registry.register(
            "edge_handshakes_in_progress",
            "Sockets admitted and not yet through their TLS handshake",
            edge_handshakes_in_progress.clone(),
        );
        registry.register(
            "edge_connects",
            "Authenticated MQTT connects",
            edge_connects_total.clone(),
        );
        registry.register(
            "edge_refusals",
            "Connections refused, by reason",
            edge_refusals_total.clone(),
        );
        registry.register(
            "edge_acl_refusals",
            "PUBLISH/SUBSCRIBE refused by ACL or validation, by reason",
            edge_acl_refusals_total.clone(),
        );
        registry.register(
            "edge_publishes",
            "PUBLISH packets accepted, by channel",
            edge_publishes_total.clone(),
        );
        registry.register(
            "edge_downlinks",
            "Downlinks queued for terminals by the edge",
            edge_downlinks_total.clone(),
        );
        registry.register(
            "edge_downlinks_dropped",
            "Downlinks the edge did not queue, by reason",
            edge_downlinks_dropped_total.clone(),
        );
        registry.register(
            "edge_uplinks_refused",
            "Terminal uplinks refused and not acknowledged, by reason",
            edge_uplinks_refused_total.clone(),
        );
        registry.register(
            "edge_uplinks_throttled",
            "Pauses of a terminal's reads by its uplink rate limit",
            edge_uplinks_throttled_total.clone(),
        );
        registry.register(
            "edge_controller_lag_bytes",
            "Bytes of uplinks in the router's log the embedded controller has not taken yet",
            edge_controller_lag_bytes.clone(),
        );
        registry.register(
            "controller_connected",
            "1 while the controller is attached to its bus (local router link or MQTT session)",
            controller_connected.clone(),
        );
        registry.register(
            "ingest_messages",
            "Uplink messages ingested by the controller, by channel",
            ingest_messages_total.clone(),
        );
        registry.register(
            "ingest_rejected",
            "Uplink messages the controller rejected, by reason",
            ingest_rejected_total.clone(),
        );
        registry.register(
            "ingest_latency_seconds",
            "Receive-to-stored latency of ingested messages",
            ingest_latency_seconds.clone(),
        );
        registry.register(
            "devices_online",
            "Devices currently online",
            devices_online.clone(),
        );
        registry.register(
            "devices_registered",
            "Devices in the registry",
            devices_registered.clone(),
        );
        registry.register(
            "api_auth_failures",
            "Admin API requests refused for missing or bad credentials",
            api_auth_failures_total.clone(),
        );
        registry.register("tx_stored", "Transactions stored", tx_stored_total.clone());
        registry.register(
            "tx_duplicates",
            "Transactions received again with identical content",
            tx_duplicates_total.clone(),
        );
        registry.register(
            "tx_conflicts",
            "Transactions refused: another record holds their (device, seq)",
            tx_conflicts_total.clone(),
        );
        registry.register(
            "tx_commit_batch_size",
            "Transactions per group commit",
            tx_commit_batch_size.clone(),
        );
        registry.register(
            "tx_commit_seconds",
            "Duration of a transaction group commit (apply, flush, fsync)",
            tx_commit_seconds.clone(),
        );
        registry.register(
            "tx_commit_failures",
            "Transaction group commits that failed",
            tx_commit_failures_total.clone(),
        );
        registry.register(
            "tx_ack_latency_seconds",
            "Receive-to-acknowledgement latency of transaction batches",
            tx_ack_latency_seconds.clone(),
        );
        registry.register(
            "tx_acks",
            "TransactionAcks queued for publishing",
            tx_acks_total.clone(),
        );
        registry.register(
            "tx_ack_failures",
            "TransactionAcks that could not be queued",
            tx_ack_failures_total.clone(),
        );
        registry.register(
            "tx_retry_after",
            "Retry-after notices queued for terminals whose batch the full queue refused",
            tx_retry_after_total.clone(),
        );
        registry.register(
            "tx_queue_depth",
            "Transaction batches waiting for the committer",
            tx_queue_depth.clone(),
        );
        registry.register(
            "tx_devices_with_gaps",
            "Devices with a sequence gap older than the grace period",
            tx_devices_with_gaps.clone(),
        );
        registry.register(
            "commands_status",
            "Commands that entered each status",
            commands_status_total.clone(),
        );
        registry.register(
            "commands_live",
            "Commands not final yet",
            commands_live.clone(),
        );
        registry.register(
            "commands_sent",
            "Signed commands queued for publishing",
            commands_sent_total.clone(),
        );
        registry.register(
            "command_results_dropped",
            "Command results dropped, by reason",
            command_results_dropped_total.clone(),
        );
        registry.register(
            "command_log_chunks_refused",
            "Log chunks refused, by reason",
            command_log_chunks_refused_total.clone(),
        );
        registry.register(
            "command_leases_sent",
            "Signed leases queued for publishing",
            command_leases_sent_total.clone(),
        );
        registry.register(
            "artifact_bytes_served",
            "Artifact bytes sent to terminals by the device endpoint",
            artifact_bytes_served_total.clone(),
        );
        Self {
            registry,
            edge_connections,
            edge_handshakes_in_progress,
            edge_connects_total,
            edge_refusals_total,
            edge_acl_refusals_total,
            edge_publishes_total,
            edge_downlinks_total,
            edge_downlinks_dropped_total,
            edge_uplinks_refused_total,
            edge_uplinks_throttled_total,
            edge_controller_lag_bytes,
            controller_connected,
            ingest_messages_total,
            ingest_rejected_total,
            ingest_latency_seconds,
            devices_online,
            devices_registered,
            api_auth_failures_total,
            tx_stored_total,
            tx_duplicates_total,
            tx_conflicts_total,
            tx_commit_batch_size,
            tx_commit_seconds,
            tx_commit_failures_total,
            tx_ack_latency_seconds,
            tx_acks_total,
            tx_ack_failures_total,
            tx_retry_after_total,
            tx_queue_depth,
            tx_devices_with_gaps,
            commands_status_total,
            commands_live,
            commands_sent_total,
            command_results_dropped_total,
            command_log_chunks_refused_total,
            command_leases_sent_total,
            artifact_bytes_served_total,
            rollouts,
            rollout_members,
            rollout_waves_total,
            admission_refusals_total,
            admission_connections,
        }
    }

    /// Counts a connection refused or closed by admission control.
    pub fn admission_refuse(&self, site: &'static str, reason: &'static str) {
        self.admission_refusals_total
            .get_or_create(&SiteReasonLabel { site, reason })
            .inc();
    }

    /// Current value of an admission refusal counter (tests).
    pub fn admission_refusals(&self, site: &'static str, reason: &'static str) -> u64 {
        self.admission_refusals_total
            .get_or_create(&SiteReasonLabel { site, reason })
            .get()
    }

    /// Sets the open-connection gauges of a listener.
    pub fn admission_connections(&self, site: &'static str, pending: usize, established: usize) {
        for (state, n) in [("pending", pending), ("established", established)] {
            self.admission_connections
                .get_or_create(&SiteStateLabel { site, state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts a refused connection.
    pub fn refuse(&self, reason: &'static str) {
        self.edge_refusals_total
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a refused PUBLISH or SUBSCRIBE.
    pub fn acl_refuse(&self, reason: &'static str) {
        self.edge_acl_refusals_total
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a downlink the edge did not queue.
    pub fn downlink_dropped(&self, reason: &'static str) {
        self.edge_downlinks_dropped_total
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a refused terminal uplink.
    pub fn uplink_refused(&self, reason: &'static str) {
        self.edge_uplinks_refused_total
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Current value of a refusal counter (tests and the demo read it).
    pub fn refusals(&self, reason: &'static str) -> u64 {
        self.edge_refusals_total
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// Current value of an uplink refusal counter.
    pub fn uplinks_refused(&self, reason: &'static str) -> u64 {
        self.edge_uplinks_refused_total
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// Current value of an ACL refusal counter.
    pub fn acl_refusals(&self, reason: &'static str) -> u64 {
        self.edge_acl_refusals_total
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
