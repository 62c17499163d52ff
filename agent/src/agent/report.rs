//! The messages a terminal reports about itself: Presence, ReportedState, Heartbeat, Telemetry.

use posfleet_proto::pan::contains_pan;
use posfleet_proto::{now_ms, pb};
use tokio::time::Instant;

use super::DeviceInfo;
use crate::state::TerminalStatus;

/// The agent's own version, reported in every `SoftwareVersions`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `Presence.reason` of a graceful shutdown.
pub const REASON_SHUTDOWN: &str = "shutdown";
/// `Presence.reason` of the last will, published by the broker when the connection dies.
pub const REASON_CONNECTION_LOST: &str = "connection_lost";

/// The versions a terminal runs before any software update: the configured firmware and
/// payment application versions and this build's own version.
pub(crate) fn configured_versions(device: &DeviceInfo) -> pb::SoftwareVersions {
    pb::SoftwareVersions {
        agent: AGENT_VERSION.to_owned(),
        firmware: device.firmware_version.clone(),
        payment_app: device.payment_app_version.clone(),
    }
}

/// Builds the report messages of one agent process.
#[derive(Debug, Clone)]
pub(crate) struct Reporter {
    device: DeviceInfo,
    /// Random per agent process (per virtual terminal in the simulator), never 0.
    boot_id: u64,
    /// When this agent started; heartbeat uptime counts from here.
    started: Instant,
    heartbeat_interval_s: u32,
}

/// How a boot id is written in logs: 16 hex digits, as `posctl devices show` shows it.
pub(crate) fn boot_id_text(boot_id: u64) -> String {
    format!("{boot_id:016x}")
}

/// A random boot id (never 0) whose [`boot_id_text`] holds no run the PAN guard would take for
/// a card number. Written in decimal, 96% of random u64s hold a 13–19-digit Luhn-valid run and
/// in hex 0.1% do: a log scanner (ours, or a PCI DLP tool) would report the agent's start line
/// as card data.
fn new_boot_id() -> u64 {
    loop {
        let id = rand::random::<u64>().max(1);
        if !contains_pan(&boot_id_text(id)) {
            return id;
        }
    }
}

impl Reporter {
    pub(crate) fn new(device: DeviceInfo, heartbeat_interval_s: u32) -> Self {
        Self {
            device,
            boot_id: new_boot_id(),
            started: Instant::now(),
            heartbeat_interval_s,
        }
    }

    pub(crate) fn boot_id(&self) -> u64 {
        self.boot_id
    }

    pub(crate) fn online(&self, status: &TerminalStatus) -> pb::Presence {
        self.presence(pb::PresenceState::Online, "", now_ms(), status)
    }

    pub(crate) fn shutdown(&self, status: &TerminalStatus) -> pb::Presence {
        self.presence(
            pb::PresenceState::Offline,
            REASON_SHUTDOWN,
            now_ms(),
            status,
        )
    }

    /// The last will. It is registered at connect and published by the broker at some later
    /// moment, so it carries no time (`at_ms = 0`): the controller uses its receive time.
    pub(crate) fn last_will(&self, status: &TerminalStatus) -> pb::Presence {
        self.presence(
            pb::PresenceState::Offline,
            REASON_CONNECTION_LOST,
            0,
            status,
        )
    }

    fn presence(
        &self,
        state: pb::PresenceState,
        reason: &str,
        at_ms: u64,
        status: &TerminalStatus,
    ) -> pb::Presence {
        pb::Presence {
            state: state.into(),
            at_ms,
            versions: Some(status.versions.clone()),
            model: self.device.model.clone(),
            serial: self.device.serial.clone(),
            reason: reason.to_owned(),
        }
    }

    /// What the terminal is: its lock and applied configuration, versions, model.
    pub(crate) fn reported_state(&self, status: &TerminalStatus) -> pb::ReportedState {
        pb::ReportedState {
            at_ms: now_ms(),
            config_version: status.config_version,
            locked: status.locked,
            lock_reason: status.lock_reason.clone(),
            versions: Some(status.versions.clone()),
            model: self.device.model.clone(),
            serial: self.device.serial.clone(),
            lock_generation: status.lock_generation,
        }
    }

    /// `outbox`: transactions accepted and not yet acknowledged by the controller, and
    /// transactions the controller refused that the terminal keeps as dead letters.
    pub(crate) fn heartbeat(
        &self,
        seq: u64,
        outbox: OutboxCounts,
        status: &TerminalStatus,
    ) -> pb::Heartbeat {
        pb::Heartbeat {
            seq,
            sent_at_ms: now_ms(),
            interval_s: self.heartbeat_interval_s,
            uptime_s: self.started.elapsed().as_secs(),
            versions: Some(status.versions.clone()),
            outbox_depth: outbox.depth,
            boot_id: self.boot_id,
            config_version: status.config_version,
            locked: status.locked,
            lock_generation: status.lock_generation,
            dead_letters: outbox.dead_letters,
        }
    }
}

/// What a heartbeat says about the outbox (each saturates at `u32::MAX`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct OutboxCounts {
    pub depth: u32,
    pub dead_letters: u32,
}

impl OutboxCounts {
    pub(crate) fn new(depth: u64, dead_letters: u64) -> Self {
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            depth: clamp(depth),
            dead_letters: clamp(dead_letters),
        }
    }
}

pub(crate) fn telemetry(
    system: pb::SystemMetrics,
    sensors: pb::Sensors,
    dropped_samples: u32,
) -> pb::Telemetry {
    pb::Telemetry {
        sent_at_ms: now_ms(),
        system: Some(system),
        sensors: Some(sensors),
        dropped_samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_DEVICE_TEXT;
    use crate::telemetry::{SimulatedSensors, SimulatedSystem};
    use posfleet_proto::{decode, encode};

    fn longest_device() -> DeviceInfo {
        let long = "W".repeat(MAX_DEVICE_TEXT);
        DeviceInfo {
            model: long.clone(),
            serial: long.clone(),
            firmware_version: long.clone(),
            payment_app_version: long,
        }
    }

    #[test]
    fn every_report_fits_its_channel_with_the_longest_device_strings() {
        let r = Reporter::new(longest_device(), 3600);
        let long = "V".repeat(MAX_DEVICE_TEXT);
        let status = TerminalStatus {
            locked: true,
            lock_reason: "R".repeat(256),
            lock_generation: u64::MAX,
            config_version: u64::MAX,
            versions: pb::SoftwareVersions {
                agent: long.clone(),
                firmware: long.clone(),
                payment_app: long,
            },
            ..TerminalStatus::default()
        };
        encode(&r.online(&status)).unwrap();
        encode(&r.shutdown(&status)).unwrap();
        encode(&r.last_will(&status)).unwrap();
        encode(&r.reported_state(&status)).unwrap();
        let hb = r.heartbeat(u64::MAX, OutboxCounts::new(u64::MAX, u64::MAX), &status);
        assert_eq!(decode::<pb::Heartbeat>(&encode(&hb).unwrap()).unwrap(), hb);
        let mut sensors = SimulatedSensors::new(1).reading();
        sensors.tamper = true;
        let tm = telemetry(SimulatedSystem::new(1).reading(), sensors, u32::MAX);
        assert_eq!(decode::<pb::Telemetry>(&encode(&tm).unwrap()).unwrap(), tm);
    }

    #[test]
    fn presence_says_why() {
        let r = Reporter::new(DeviceInfo::default(), 10);
        let status = TerminalStatus {
            versions: configured_versions(&DeviceInfo::default()),
            ..TerminalStatus::default()
        };
        let online = r.online(&status);
        assert_eq!(online.state(), pb::PresenceState::Online);
        assert!(online.reason.is_empty() && online.at_ms > 0);
        let will = r.last_will(&status);
        assert_eq!(will.state(), pb::PresenceState::Offline);
        assert_eq!(will.reason, "connection_lost");
        assert_eq!(r.shutdown(&status).reason, "shutdown");
        assert_eq!(online.versions.unwrap().agent, AGENT_VERSION);
    }

    #[test]
    fn heartbeat_carries_sequence_interval_and_boot_id() {
        let r = Reporter::new(DeviceInfo::default(), 10);
        let status = TerminalStatus {
            locked: true,
            lock_generation: 4,
            config_version: 9,
            ..TerminalStatus::default()
        };
        let hb = r.heartbeat(1, OutboxCounts::new(3, 2), &status);
        assert_eq!(
            (hb.seq, hb.interval_s, hb.outbox_depth, hb.dead_letters),
            (1, 10, 3, 2)
        );
        assert_eq!(
            (hb.config_version, hb.locked, hb.lock_generation),
            (9, true, 4)
        );
        assert_eq!(hb.boot_id, r.boot_id());
        assert_ne!(hb.boot_id, 0);
        assert_ne!(
            Reporter::new(DeviceInfo::default(), 10).boot_id(),
            r.boot_id(),
            "each agent draws its own boot id"
        );
    }

    #[test]
    fn boot_ids_as_logged_never_look_like_card_numbers() {
        assert_eq!(boot_id_text(0xabc), "0000000000000abc");
        // One random id in a thousand would; twenty thousand draws see about twenty.
        for _ in 0..20_000 {
            let id = new_boot_id();
            assert!(id != 0 && !contains_pan(&boot_id_text(id)), "{id:016x}");
        }
    }
}
