//! `posctl devices list` and `posctl devices show`.

use std::fmt::Write as _;
use std::io::Write;

use anyhow::anyhow;
use posfleet_proto::{DeviceId, now_ms};
use reqwest::Url;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::OutputFormat;
use super::client::{ApiClient, ApiError};
use super::output::{
    Table, clock, datetime, gib, mib, or_dash, percent, printable, relative, span,
};
use crate::views::{DeviceDetail, DeviceList, DeviceSummary, HeartbeatView, TelemetryView};

/// A device clock further than this from the controller's is pointed out.
const CLOCK_SKEW_NOTE_MS: u64 = 30_000;

pub(crate) async fn list(
    api: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "devices"]);
    let value = api.get_json(url.clone()).await?;
    print_view(out, format, &url, value, |list: &DeviceList| {
        render_list(list, now_ms())
    })
}

/// GETs a resource of one device, turning the API's "no such device" into a hint.
pub(crate) async fn get_device_json(
    api: &ApiClient,
    url: Url,
    id: &DeviceId,
) -> anyhow::Result<Value> {
    match api.get_json(url).await {
        Ok(value) => Ok(value),
        // A 404 with an API error body is the API saying "no such device"; without one it is
        // more likely the wrong server, which the generic message covers.
        Err(ApiError::NotFound { body: Some(_), .. }) => Err(anyhow!(
            "no device {id}; `posctl devices list` shows known devices"
        )),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn show(
    api: &ApiClient,
    id: &DeviceId,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "devices", id.as_str()]);
    let value = get_device_json(api, url.clone(), id).await?;
    print_view(out, format, &url, value, |detail: &DeviceDetail| {
        render_detail(detail, now_ms())
    })
}

/// Checks that the API's JSON has the expected shape.
pub(crate) fn typed<T: DeserializeOwned>(url: &Url, value: Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| ApiError::Unexpected {
        url: url.to_string(),
        cause: format!("the JSON does not have the expected shape ({e})"),
    })
}

/// `value` as pretty JSON, or (tables) read as a `T` and drawn by `render`: what every
/// `show`-like subcommand prints.
pub(crate) fn print_view<T: DeserializeOwned>(
    out: &mut dyn Write,
    format: OutputFormat,
    url: &Url,
    value: Value,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => {
            let view: T = typed(url, value)?;
            Ok(out.write_all(render(&view).as_bytes())?)
        }
    }
}

/// Pretty JSON as the API sent it, not run through the typed views, so fields and values this
/// posctl does not know yet reach scripts unchanged.
pub(crate) fn print_json(out: &mut dyn Write, value: &Value) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn presence(summary: &DeviceSummary) -> String {
    match (summary.online, &summary.offline_reason) {
        (true, _) => "online".to_owned(),
        (false, Some(reason)) => format!("offline ({reason})"),
        (false, None) => "offline".to_owned(),
    }
}

fn lifecycle(summary: &DeviceSummary) -> String {
    // The serde name is the operator-facing name ("decommissioned").
    serde_json::to_value(summary.lifecycle)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{:?}", summary.lifecycle))
}

/// The `devices list` table, sorted by id, with a count line.
pub(crate) fn render_list(list: &DeviceList, now_ms: u64) -> String {
    if list.devices.is_empty() {
        return "no devices yet: a terminal appears here after it first connects\n".to_owned();
    }
    let mut devices: Vec<&DeviceSummary> = list.devices.iter().collect();
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    let mut table = Table::new(vec!["ID", "STATE", "ONLINE", "LAST SEEN", "AGENT", "MODEL"]);
    for d in &devices {
        table.row(vec![
            d.id.clone(),
            lifecycle(d),
            presence(d),
            relative(now_ms, d.last_seen_ms),
            or_dash(&d.versions.agent).to_owned(),
            or_dash(&d.model).to_owned(),
        ]);
    }
    let online = devices.iter().filter(|d| d.online).count();
    let noun = if devices.len() == 1 {
        "device"
    } else {
        "devices"
    };
    format!(
        "{}\n{} {noun}, {online} online\n",
        table.render(),
        devices.len()
    )
}

/// The `devices show` block.
pub(crate) fn render_detail(detail: &DeviceDetail, now_ms: u64) -> String {
    let d = &detail.summary;
    let mut out = String::new();
    let tampered = detail.latest_telemetry.as_ref().is_some_and(|t| t.tamper);
    if tampered {
        let _ = writeln!(
            out,
            "!!! TAMPER DETECTED on {}: take this terminal out of service and inspect it !!!\n",
            printable(&d.id)
        );
    }
    let _ = writeln!(out, "Device {}", printable(&d.id));
    let mut field = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<13}{}", printable(&value));
    };
    field("state", lifecycle(d));
    field(
        "presence",
        format!(
            "{} since {} ({})",
            presence(d),
            datetime(d.presence_changed_ms),
            relative(now_ms, d.presence_changed_ms)
        ),
    );
    field("last seen", at(now_ms, d.last_seen_ms));
    field("first seen", at(now_ms, d.first_seen_ms));
    field("model", or_dash(&d.model).to_owned());
    field("serial", or_dash(&d.serial).to_owned());
    field(
        "versions",
        format!(
            "agent {}, firmware {}, payment app {}",
            or_dash(&d.versions.agent),
            or_dash(&d.versions.firmware),
            or_dash(&d.versions.payment_app)
        ),
    );
    out.push('\n');
    render_state(&mut out, detail, now_ms);
    out.push('\n');
    match &detail.last_heartbeat {
        Some(hb) => render_heartbeat(&mut out, hb, now_ms),
        None => out.push_str("Last heartbeat: none received yet\n"),
    }
    out.push('\n');
    match &detail.latest_telemetry {
        Some(t) => render_telemetry(&mut out, t, detail.telemetry_history.len(), now_ms),
        None => out.push_str("Latest telemetry: none received yet\n"),
    }
    out
}

/// Desired and reported lock and configuration: what an operator checks after `posctl
/// lock` or `config set`.
fn render_state(out: &mut String, detail: &DeviceDetail, now_ms: u64) {
    out.push_str("Lock and configuration\n");
    let mut field = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<13}{}", printable(&value));
    };
    let lock_word = |locked: bool| if locked { "locked" } else { "unlocked" };
    let desired_lock = detail.desired.as_ref().and_then(|d| d.lock.as_ref());
    field(
        "desired",
        match desired_lock {
            Some(l) => format!(
                "{} (generation {}, by {} {}){}",
                lock_word(l.locked),
                l.generation,
                or_dash(&l.author),
                relative(now_ms, l.changed_at_ms),
                if l.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", l.reason)
                }
            ),
            None => "never set".to_owned(),
        },
    );
    let reported = detail.reported.as_ref();
    field(
        "reported",
        match reported {
            Some(r) => format!(
                "{} (generation {}){}",
                lock_word(r.locked),
                r.lock_generation,
                match r.lock_reason.as_deref() {
                    Some(reason) if r.locked && !reason.is_empty() => format!(": {reason}"),
                    _ => String::new(),
                }
            ),
            None => "nothing reported since the controller started".to_owned(),
        },
    );
    field(
        "config",
        format!(
            "version {} desired, {}",
            detail.desired.as_ref().map_or(0, |d| d.config_version),
            reported.map_or("none reported".to_owned(), |r| format!(
                "{} reported {}",
                r.config_version,
                relative(now_ms, r.at_ms)
            ))
        ),
    );
}

fn at(now_ms: u64, ms: u64) -> String {
    if ms == 0 {
        return "never".to_owned();
    }
    format!("{} ({})", datetime(ms), relative(now_ms, ms))
}

fn render_heartbeat(out: &mut String, hb: &HeartbeatView, now_ms: u64) {
    let _ = writeln!(
        out,
        "Last heartbeat (received {} at {} UTC)",
        relative(now_ms, hb.received_at_ms),
        clock(hb.received_at_ms)
    );
    let mut field = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<13}{value}");
    };
    field("seq", hb.seq.to_string());
    field("uptime", span(hb.uptime_s));
    field("interval", span(u64::from(hb.interval_s)));
    field("outbox", format!("{} pending", hb.outbox_depth));
    if hb.dead_letters > 0 {
        field(
            "dead letters",
            format!(
                "{} (refused as conflicts, kept on the terminal)",
                hb.dead_letters
            ),
        );
    }
    field("boot id", format!("{:016x}", hb.boot_id));
    let skew = hb.sent_at_ms.abs_diff(hb.received_at_ms);
    if skew > CLOCK_SKEW_NOTE_MS {
        field(
            "clock",
            format!(
                "the device clock is {} {} the controller's",
                span(skew / 1000),
                if hb.sent_at_ms > hb.received_at_ms {
                    "ahead of"
                } else {
                    "behind"
                }
            ),
        );
    }
}

fn render_telemetry(out: &mut String, t: &TelemetryView, history: usize, now_ms: u64) {
    let _ = writeln!(
        out,
        "Latest telemetry (received {} at {} UTC)",
        relative(now_ms, t.received_at_ms),
        clock(t.received_at_ms)
    );
    let mut field = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<13}{}", printable(&value));
    };
    field(
        "cpu",
        format!("{:.1}%  (load {:.2})", t.cpu_percent, t.load_average_1m),
    );
    field(
        "memory",
        format!(
            "{} / {} MiB ({}%)",
            mib(t.memory_used_bytes),
            mib(t.memory_total_bytes),
            percent(t.memory_used_bytes, t.memory_total_bytes)
        ),
    );
    field(
        "disk",
        format!(
            "{} / {} GiB ({}%)",
            gib(t.disk_used_bytes),
            gib(t.disk_total_bytes),
            percent(t.disk_used_bytes, t.disk_total_bytes)
        ),
    );
    field(
        "battery",
        match (t.battery_percent, t.charging) {
            (None, _) => "-".to_owned(),
            (Some(b), Some(true)) => format!("{b:.0}% (charging)"),
            (Some(b), Some(false)) => format!("{b:.0}% (on battery)"),
            (Some(b), None) => format!("{b:.0}%"),
        },
    );
    field(
        "temperature",
        t.temperature_c
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.1} °C")),
    );
    field(
        "network",
        match t.signal_dbm {
            Some(dbm) => format!("{}, {dbm} dBm", t.network),
            None => t.network.clone(),
        },
    );
    field(
        "paper",
        match t.paper.as_str() {
            "out" => "out — refill the printer".to_owned(),
            other => other.to_owned(),
        },
    );
    field(
        "card reader",
        match t.card_reader.as_str() {
            "fault" => "fault — the terminal cannot read cards".to_owned(),
            other => other.to_owned(),
        },
    );
    field(
        "tamper",
        if t.tamper {
            "YES — TAMPER DETECTED".to_owned()
        } else {
            "no".to_owned()
        },
    );
    field("uptime", span(t.uptime_s));
    if t.dropped_samples > 0 {
        field(
            "dropped",
            format!("{} samples (device under pressure)", t.dropped_samples),
        );
    }
    field(
        "history",
        format!("{history} recent samples (all of them with --output json)"),
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::views::{Lifecycle, VersionsView};

    pub(crate) const NOW: u64 = 1_709_211_909_000; // 2024-02-29 13:05:09 UTC

    pub(crate) fn summary(id: &str, online: bool) -> DeviceSummary {
        DeviceSummary {
            id: id.into(),
            lifecycle: Lifecycle::Active,
            online,
            offline_reason: (!online).then(|| "missed_heartbeats".to_owned()),
            first_seen_ms: NOW - 2 * 86_400_000,
            last_seen_ms: NOW - 4_000,
            presence_changed_ms: NOW - 180_000,
            last_heartbeat_ms: Some(NOW - 4_000),
            versions: VersionsView {
                agent: "0.1.0".into(),
                firmware: "fw-2.1".into(),
                payment_app: "pay-3.4".into(),
            },
            model: "PAX A920".into(),
            serial: "SN-42".into(),
            groups: Default::default(),
            labels: Default::default(),
        }
    }

    pub(crate) fn telemetry(tamper: bool) -> TelemetryView {
        TelemetryView {
            sent_at_ms: NOW - 6_000,
            received_at_ms: NOW - 6_000,
            cpu_percent: 12.34,
            memory_used_bytes: 512 * 1024 * 1024,
            memory_total_bytes: 2048 * 1024 * 1024,
            disk_used_bytes: 3 * 1024 * 1024 * 1024,
            disk_total_bytes: 8 * 1024 * 1024 * 1024,
            uptime_s: 3720,
            load_average_1m: 0.42,
            battery_percent: Some(87.0),
            charging: Some(true),
            temperature_c: Some(41.25),
            network: "wifi".into(),
            signal_dbm: Some(-67),
            paper: "low".into(),
            card_reader: "ok".into(),
            tamper,
            dropped_samples: 0,
        }
    }

    pub(crate) fn detail(id: &str, tamper: bool) -> DeviceDetail {
        DeviceDetail {
            summary: summary(id, true),
            last_heartbeat: Some(HeartbeatView {
                seq: 42,
                sent_at_ms: NOW - 4_000 + 300_000,
                received_at_ms: NOW - 4_000,
                interval_s: 10,
                uptime_s: 3720,
                outbox_depth: 0,
                boot_id: 0xabc,
                config_version: 0,
                locked: false,
                lock_generation: 0,
                dead_letters: 3,
            }),
            latest_telemetry: Some(telemetry(tamper)),
            telemetry_history: vec![telemetry(false), telemetry(tamper)],
            desired: None,
            reported: None,
        }
    }

    #[test]
    fn list_is_a_sorted_table_with_a_count() {
        let mut offline = summary("T-0001", false);
        offline.lifecycle = Lifecycle::Decommissioned;
        offline.model = String::new();
        let list = DeviceList {
            devices: vec![summary("T-0002", true), offline],
        };
        assert_eq!(
            render_list(&list, NOW),
            "ID      STATE           ONLINE                       LAST SEEN  AGENT  MODEL\n\
             T-0001  decommissioned  offline (missed_heartbeats)  4s ago     0.1.0  -\n\
             T-0002  active          online                       4s ago     0.1.0  PAX A920\n\
             \n\
             2 devices, 1 online\n"
        );
    }

    #[test]
    fn an_empty_fleet_says_so() {
        let rendered = render_list(&DeviceList { devices: vec![] }, NOW);
        assert!(rendered.starts_with("no devices yet"), "{rendered}");
    }

    #[test]
    fn show_renders_every_section() {
        let rendered = render_detail(&detail("T-1", false), NOW);
        for expected in [
            "Device T-1\n",
            "  state        active\n",
            "  presence     online since 2024-02-29 13:02:09 UTC (3m ago)\n",
            "  last seen    2024-02-29 13:05:05 UTC (4s ago)\n",
            "  versions     agent 0.1.0, firmware fw-2.1, payment app pay-3.4\n",
            "Last heartbeat (received 4s ago at 13:05:05 UTC)\n",
            "  seq          42\n",
            "  uptime       1h02m\n",
            "  dead letters 3 (refused as conflicts, kept on the terminal)\n",
            "  clock        the device clock is 5m00s ahead of the controller's\n",
            "Latest telemetry (received 6s ago at 13:05:03 UTC)\n",
            "  cpu          12.3%  (load 0.42)\n",
            "  memory       512 / 2048 MiB (25%)\n",
            "  disk         3.0 / 8.0 GiB (37%)\n",
            "  battery      87% (charging)\n",
            "  temperature  41.2 °C\n",
            "  network      wifi, -67 dBm\n",
            "  paper        low\n",
            "  card reader  ok\n",
            "  tamper       no\n",
            "  history      2 recent samples",
        ] {
            assert!(
                rendered.contains(expected),
                "missing {expected:?} in\n{rendered}"
            );
        }
        assert!(!rendered.contains("TAMPER"), "{rendered}");
    }

    #[test]
    fn show_shouts_about_tamper() {
        let rendered = render_detail(&detail("T-1", true), NOW);
        assert!(
            rendered.starts_with("!!! TAMPER DETECTED on T-1"),
            "{rendered}"
        );
        assert!(rendered.contains("  tamper       YES — TAMPER DETECTED\n"));
    }

    #[test]
    fn show_without_heartbeat_or_telemetry() {
        let mut d = detail("T-1", false);
        d.last_heartbeat = None;
        d.latest_telemetry = None;
        d.telemetry_history.clear();
        let rendered = render_detail(&d, NOW);
        assert!(rendered.contains("Last heartbeat: none received yet"));
        assert!(rendered.contains("Latest telemetry: none received yet"));
        assert!(
            rendered.contains("  desired      never set\n"),
            "{rendered}"
        );
    }

    #[test]
    fn show_renders_desired_and_reported_lock_and_config() {
        use crate::views::{DesiredLockView, DesiredView, ReportedView};
        let mut d = detail("T-1", false);
        d.desired = Some(DesiredView {
            device_id: "T-1".into(),
            lock: Some(DesiredLockView {
                locked: true,
                reason: "stolen".into(),
                generation: 3,
                author: "admin".into(),
                changed_at_ms: NOW - 60_000,
            }),
            config_version: 9,
        });
        d.reported = Some(ReportedView {
            at_ms: NOW - 2_000,
            source: "state".into(),
            config_version: 8,
            locked: false,
            lock_generation: 2,
            lock_reason: Some(String::new()),
        });
        let rendered = render_detail(&d, NOW);
        for expected in [
            "Lock and configuration\n",
            "  desired      locked (generation 3, by admin 1m ago): stolen\n",
            "  reported     unlocked (generation 2)\n",
            "  config       version 9 desired, 8 reported 2s ago\n",
        ] {
            assert!(
                rendered.contains(expected),
                "missing {expected:?} in\n{rendered}"
            );
        }
    }
}
