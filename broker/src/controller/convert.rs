//! Validating conversions from wire messages (`pb`) to the registry's domain values.
//!
//! Everything a terminal sends ends up in API responses and on admins' terminals, so text is
//! bounded and free of control characters (no escape-sequence injection into `posctl`), card
//! numbers in it are withheld, and numbers are finite and in range (JSON has no NaN).

use posfleet_proto::pb;

use crate::registry::{DeviceInfo, TelemetrySample};
use crate::views::{HeartbeatView, ReportedView, VersionsView};

/// Shortest heartbeat interval a device may promise, in seconds.
pub const MIN_HEARTBEAT_INTERVAL_S: u32 = 1;
/// Longest heartbeat interval a device may promise, in seconds.
pub const MAX_HEARTBEAT_INTERVAL_S: u32 = 3600;
/// Longest text field (model, serial, version strings), in bytes.
pub const MAX_TEXT_LEN: usize = 128;
/// Longest offline reason, in bytes.
pub const MAX_REASON_LEN: usize = 64;
/// Offline reason used when a device gives none.
pub const REASON_UNSPECIFIED: &str = "unspecified";

/// Why a message is invalid (becomes `IngestError::Invalid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid(pub String);

/// A Presence message, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PresenceUpdate {
    Online { device_at_ms: u64, info: DeviceInfo },
    Offline { device_at_ms: u64, reason: String },
}

pub(crate) fn presence(msg: pb::Presence) -> Result<PresenceUpdate, Invalid> {
    match pb::PresenceState::try_from(msg.state) {
        Ok(pb::PresenceState::Online) => Ok(PresenceUpdate::Online {
            device_at_ms: msg.at_ms,
            info: DeviceInfo {
                versions: msg.versions.map(versions).transpose()?,
                model: text("model", msg.model)?,
                serial: text("serial", msg.serial)?,
            },
        }),
        Ok(pb::PresenceState::Offline) => Ok(PresenceUpdate::Offline {
            device_at_ms: msg.at_ms,
            reason: reason(msg.reason)?,
        }),
        Ok(pb::PresenceState::Unspecified) | Err(_) => Err(Invalid(format!(
            "presence state {} is neither ONLINE nor OFFLINE",
            msg.state
        ))),
    }
}

/// A heartbeat as the API shows it, plus the versions it reports (if any).
pub(crate) fn heartbeat(
    msg: pb::Heartbeat,
    received_at_ms: u64,
) -> Result<(HeartbeatView, Option<VersionsView>), Invalid> {
    if !(MIN_HEARTBEAT_INTERVAL_S..=MAX_HEARTBEAT_INTERVAL_S).contains(&msg.interval_s) {
        return Err(Invalid(format!(
            "interval_s {} is outside {MIN_HEARTBEAT_INTERVAL_S}..={MAX_HEARTBEAT_INTERVAL_S}",
            msg.interval_s
        )));
    }
    let versions = msg.versions.map(versions).transpose()?;
    let view = HeartbeatView {
        seq: msg.seq,
        sent_at_ms: msg.sent_at_ms,
        received_at_ms,
        interval_s: msg.interval_s,
        uptime_s: msg.uptime_s,
        outbox_depth: msg.outbox_depth,
        boot_id: msg.boot_id,
        config_version: msg.config_version,
        locked: msg.locked,
        lock_generation: msg.lock_generation,
        dead_letters: msg.dead_letters,
    };
    Ok((view, versions))
}

/// A ReportedState as the API shows it.
pub(crate) fn reported_state(msg: pb::ReportedState, at_ms: u64) -> Result<ReportedView, Invalid> {
    let reason = text("lock_reason", msg.lock_reason)?;
    Ok(ReportedView {
        at_ms,
        source: "state".to_owned(),
        config_version: msg.config_version,
        locked: msg.locked,
        lock_generation: msg.lock_generation,
        lock_reason: (!reason.is_empty()).then_some(reason),
    })
}

pub(crate) fn telemetry(
    msg: pb::Telemetry,
    received_at_ms: u64,
) -> Result<TelemetrySample, Invalid> {
    let system = msg
        .system
        .ok_or_else(|| Invalid("system metrics are missing".into()))?;
    let sensors = msg.sensors.unwrap_or_default();
    Ok(TelemetrySample {
        sent_at_ms: msg.sent_at_ms,
        received_at_ms,
        cpu_percent: in_range("cpu_percent", system.cpu_percent, 0.0, 100.0)?,
        memory_used_bytes: system.memory_used_bytes,
        memory_total_bytes: system.memory_total_bytes,
        disk_used_bytes: system.disk_used_bytes,
        disk_total_bytes: system.disk_total_bytes,
        uptime_s: system.uptime_s,
        load_average_1m: in_range("load_average_1m", system.load_average_1m, 0.0, 1.0e6)?,
        battery_percent: sensors
            .battery_percent
            .map(|v| in_range("battery_percent", v, 0.0, 100.0))
            .transpose()?,
        charging: sensors.charging,
        temperature_c: sensors
            .temperature_c
            .map(|v| in_range("temperature_c", v, -100.0, 200.0))
            .transpose()?,
        network: network(sensors.network),
        signal_dbm: sensors.signal_dbm,
        paper: paper(sensors.paper),
        card_reader: card_reader(sensors.card_reader),
        tamper: sensors.tamper,
        dropped_samples: msg.dropped_samples,
    })
}

fn versions(v: pb::SoftwareVersions) -> Result<VersionsView, Invalid> {
    Ok(VersionsView {
        agent: text("versions.agent", v.agent)?,
        firmware: text("versions.firmware", v.firmware)?,
        payment_app: text("versions.payment_app", v.payment_app)?,
    })
}

/// Free text from a device: at most [`MAX_TEXT_LEN`] bytes, no control characters; a value
/// that holds a card number is kept as [`posfleet_proto::text::WITHHELD`] (the message is
/// still taken: the terminal is enrolled, and its presence must not be lost).
fn text(field: &str, value: String) -> Result<String, Invalid> {
    if value.len() > MAX_TEXT_LEN {
        return Err(Invalid(format!(
            "{field} is {} bytes long; the limit is {MAX_TEXT_LEN}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Invalid(format!("{field} contains control characters")));
    }
    Ok(posfleet_proto::text::shown(&value).into_owned())
}

/// An offline reason: a short token (`shutdown`, `connection_lost`, ...).
fn reason(value: String) -> Result<String, Invalid> {
    if value.is_empty() {
        return Ok(REASON_UNSPECIFIED.to_owned());
    }
    let token = value.len() <= MAX_REASON_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !token {
        return Err(Invalid(format!(
            "offline reason must be at most {MAX_REASON_LEN} letters, digits, '_', '-' or '.'"
        )));
    }
    Ok(value)
}

fn in_range(field: &str, value: f32, min: f32, max: f32) -> Result<f32, Invalid> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(Invalid(format!("{field} {value} is outside {min}..={max}")))
    }
}

fn network(value: i32) -> &'static str {
    match pb::NetworkType::try_from(value) {
        Ok(pb::NetworkType::Ethernet) => "ethernet",
        Ok(pb::NetworkType::Wifi) => "wifi",
        Ok(pb::NetworkType::Cellular3g) => "cellular_3g",
        Ok(pb::NetworkType::Cellular4g) => "cellular_4g",
        Ok(pb::NetworkType::Cellular5g) => "cellular_5g",
        Ok(pb::NetworkType::Unspecified) | Err(_) => "unknown",
    }
}

fn paper(value: i32) -> &'static str {
    match pb::PaperState::try_from(value) {
        Ok(pb::PaperState::Ok) => "ok",
        Ok(pb::PaperState::Low) => "low",
        Ok(pb::PaperState::Out) => "out",
        Ok(pb::PaperState::NoPrinter) => "no_printer",
        Ok(pb::PaperState::Unspecified) | Err(_) => "unknown",
    }
}

fn card_reader(value: i32) -> &'static str {
    match pb::CardReaderState::try_from(value) {
        Ok(pb::CardReaderState::Ok) => "ok",
        Ok(pb::CardReaderState::Degraded) => "degraded",
        Ok(pb::CardReaderState::Fault) => "fault",
        Ok(pb::CardReaderState::Unspecified) | Err(_) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fields_refuse_control_characters_and_excess_length() {
        assert!(text("model", "X9 Pro".into()).is_ok());
        assert!(text("model", "\u{1b}[2J".into()).is_err());
        assert!(text("model", "a\u{9b}b".into()).is_err());
        assert!(text("model", "x".repeat(MAX_TEXT_LEN + 1)).is_err());
    }

    /// A terminal reports its serial, model and versions in presence: a card number there is
    /// never stored or shown (the presence itself is kept: the terminal is already enrolled).
    #[test]
    fn card_numbers_in_device_text_are_withheld() {
        for &card in posfleet_proto::pan::REVIEW_EXAMPLES
            .iter()
            .chain(&["4111-1111-1111-1111"])
        {
            assert_eq!(
                text("serial", card.to_owned()).as_deref(),
                Ok(posfleet_proto::text::WITHHELD),
                "{card}"
            );
        }
        assert_eq!(text("serial", "SN-0042".into()).unwrap(), "SN-0042");
    }

    #[test]
    fn offline_reasons_are_tokens() {
        assert_eq!(reason(String::new()).unwrap(), REASON_UNSPECIFIED);
        assert_eq!(reason("connection_lost".into()).unwrap(), "connection_lost");
        assert!(reason("bye now".into()).is_err());
        assert!(reason("x".repeat(MAX_REASON_LEN + 1)).is_err());
    }

    #[test]
    fn numbers_must_be_finite_and_in_range() {
        assert!(in_range("cpu", f32::NAN, 0.0, 100.0).is_err());
        assert!(in_range("cpu", f32::INFINITY, 0.0, 100.0).is_err());
        assert!(in_range("cpu", -0.5, 0.0, 100.0).is_err());
        assert_eq!(in_range("cpu", 100.0, 0.0, 100.0), Ok(100.0));
    }

    #[test]
    fn unknown_enum_values_read_as_unknown() {
        assert_eq!(network(99), "unknown");
        assert_eq!(paper(-1), "unknown");
        assert_eq!(card_reader(2), "degraded");
    }
}
