//! `posctl watch`: the live event stream, one line per event (or JSON lines).

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::anyhow;
use futures_util::StreamExt;
use posfleet_proto::now_ms;
use serde_json::Value;

use super::client::ApiClient;
use super::output::{clock, mib, money, printable, span};
use super::sse::{SseEvent, SseParser};
use super::{OutputFormat, WatchArgs};
use crate::views::{FleetEvent, Severity};

/// With nothing at all from the server for this long (the server sends keep-alive comments far
/// more often), the connection is taken for dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Follows the stream until `stop` resolves, `--count` events arrived, `--timeout` passed, or
/// the stream fails.
pub(crate) async fn run(
    api: &ApiClient,
    args: &WatchArgs,
    format: OutputFormat,
    out: &mut dyn Write,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // `--timeout` and Ctrl-C count from the start, including connecting.
    let deadline = async {
        match args.timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop, deadline);
    let (url, response) = tokio::select! {
        biased;
        () = &mut stop => return Ok(()),
        () = &mut deadline => return timed_out(args, 0),
        opened = api.open_stream(args.device.as_ref()) => opened?,
    };
    if format == OutputFormat::Table && std::io::stderr().is_terminal() {
        eprintln!("watching {url} (times in UTC) — Ctrl-C to stop");
    }
    let mut body = response.bytes_stream();
    let mut parser = SseParser::default();
    let mut seen: u64 = 0;
    loop {
        let chunk = tokio::select! {
            biased;
            () = &mut stop => return Ok(()),
            () = &mut deadline => return timed_out(args, seen),
            chunk = tokio::time::timeout(IDLE_TIMEOUT, body.next()) => chunk,
        };
        let chunk = match chunk {
            Err(_) => {
                return Err(anyhow!(
                    "no data from {url} for {}s, not even keep-alives; the connection is \
                     probably dead — check the server and run `posctl watch` again",
                    IDLE_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => {
                return Err(anyhow!(
                    "the server closed the stream at {url} after {seen} events; check that it is \
                     still running (a restart ends every stream) and run `posctl watch` again"
                ));
            }
            Ok(Some(Err(e))) => {
                return Err(anyhow!(
                    "lost the stream after {seen} events: {}",
                    api.transport_error(&url, e)
                ));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        let events = parser
            .feed(&chunk)
            .map_err(|e| anyhow!("{e} (from {url}); the stream cannot continue"))?;
        for event in events {
            if render(&event, format, out)? {
                seen += 1;
                if args.count == Some(seen) {
                    return Ok(());
                }
            }
        }
    }
}

fn timed_out(args: &WatchArgs, seen: u64) -> anyhow::Result<()> {
    match args.count {
        Some(count) if seen < count => Err(anyhow!(
            "only {seen} of {count} events arrived within {}s; is the fleet (or --device) \
             active? `posctl devices list` shows who is online",
            args.timeout.unwrap_or_default().as_secs_f64()
        )),
        _ => Ok(()),
    }
}

/// Prints one event; returns whether it was one (counted towards `--count`).
fn render(event: &SseEvent, format: OutputFormat, out: &mut dyn Write) -> anyhow::Result<bool> {
    let value: Value = match serde_json::from_str(&event.data) {
        Ok(value) => value,
        Err(e) => {
            eprintln!(
                "warning: skipped a {:?} event whose data is not JSON ({e})",
                printable(&event.event)
            );
            return Ok(false);
        }
    };
    match format {
        OutputFormat::Json => writeln!(out, "{value}")?,
        OutputFormat::Table => writeln!(out, "{}", line(&event.event, value, now_ms()))?,
    }
    out.flush()?;
    Ok(true)
}

/// One table line: `HH:MM:SS  DEVICE  KIND  figures`.
pub(crate) fn line(sse_kind: &str, value: Value, now_ms: u64) -> String {
    let event = match serde_json::from_value::<FleetEvent>(value) {
        Ok(event) => event,
        // A kind this posctl does not know yet (a newer server): say so, keep going.
        Err(_) => {
            return format!(
                "{}  {:<12}  {:<10} (not understood by this posctl; --output json shows it)",
                clock(now_ms),
                "-",
                printable(sse_kind)
            );
        }
    };
    let (at_ms, figures) = match &event {
        FleetEvent::Presence {
            online,
            reason,
            at_ms,
            ..
        } => (
            *at_ms,
            match (online, reason) {
                (true, _) => "online".to_owned(),
                (false, Some(reason)) => format!("offline ({})", printable(reason)),
                (false, None) => "offline".to_owned(),
            },
        ),
        FleetEvent::Heartbeat { heartbeat: hb, .. } => (
            hb.received_at_ms,
            format!(
                "seq {}  uptime {}  outbox {}",
                hb.seq,
                span(hb.uptime_s),
                hb.outbox_depth
            ),
        ),
        FleetEvent::Telemetry { telemetry: t, .. } => {
            let mut parts = vec![
                format!("cpu {:.0}%", t.cpu_percent),
                format!(
                    "mem {}/{} MiB",
                    mib(t.memory_used_bytes),
                    mib(t.memory_total_bytes)
                ),
            ];
            if let Some(b) = t.battery_percent {
                let charging = if t.charging == Some(true) { "+" } else { "" };
                parts.push(format!("bat {b:.0}%{charging}"));
            }
            if let Some(c) = t.temperature_c {
                parts.push(format!("temp {c:.1}°C"));
            }
            if let Some(dbm) = t.signal_dbm {
                parts.push(format!("{} {dbm} dBm", printable(&t.network)));
            }
            parts.push(format!("paper {}", printable(&t.paper)));
            if t.card_reader != "ok" {
                parts.push(format!("reader {}", printable(&t.card_reader)));
            }
            if t.tamper {
                parts.push("TAMPER!".to_owned());
            }
            (t.received_at_ms, parts.join("  "))
        }
        FleetEvent::Transaction { transaction: t, .. } => {
            let mut parts = vec![
                format!("seq {}", t.seq),
                format!("{} {}", printable(&t.kind), printable(&t.status)),
                money(t.amount_minor, &t.currency),
            ];
            if !t.masked_card.is_empty() {
                parts.push(printable(&t.masked_card).into_owned());
            }
            parts.push(format!("txn {}", printable(&t.txn_id)));
            (t.received_at_ms, parts.join("  "))
        }
        FleetEvent::Alert {
            alert,
            severity,
            seq,
            message,
            at_ms,
            ..
        } => {
            let name = serde_json::to_value(alert)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let level = match severity {
                Severity::Critical => "CRITICAL",
                Severity::Warning => "WARNING",
                Severity::Info | Severity::Other => "info",
            };
            let seq = seq.map(|s| format!(" (seq {s})")).unwrap_or_default();
            (
                *at_ms,
                format!("{level} {name}{seq}: {}", printable(message)),
            )
        }
        FleetEvent::Command {
            id,
            kind,
            status,
            progress_percent,
            message,
            ..
        } => {
            let mut text = format!("{} {} {}", printable(kind), status.name(), printable(id));
            if *status == crate::views::CommandState::InProgress {
                text.push_str(&format!(" {progress_percent}%"));
            }
            if !message.is_empty() {
                text.push_str(&format!(": {}", printable(message)));
            }
            (now_ms, text)
        }
        FleetEvent::Rollout {
            id, message, at_ms, ..
        } => (*at_ms, format!("{}: {}", printable(id), printable(message))),
        FleetEvent::Lagged { missed } => (
            now_ms,
            format!("{missed} events skipped: posctl fell behind the stream"),
        ),
    };
    format!(
        "{}  {:<12}  {:<10} {figures}",
        clock(at_ms),
        printable(event.device().unwrap_or("-")),
        event.kind()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::posctl::devices::tests::{NOW, telemetry};
    use crate::views::HeartbeatView;

    fn json(event: &FleetEvent) -> Value {
        serde_json::to_value(event).unwrap()
    }

    #[test]
    fn presence_lines() {
        let online = FleetEvent::Presence {
            device: "T-1".into(),
            online: true,
            reason: None,
            at_ms: NOW,
        };
        assert_eq!(
            line("presence", json(&online), NOW),
            "13:05:09  T-1           presence   online"
        );
        let offline = FleetEvent::Presence {
            device: "T-1".into(),
            online: false,
            reason: Some("connection_lost".into()),
            at_ms: NOW,
        };
        assert_eq!(
            line("presence", json(&offline), NOW),
            "13:05:09  T-1           presence   offline (connection_lost)"
        );
    }

    #[test]
    fn heartbeat_and_telemetry_lines() {
        let hb = FleetEvent::Heartbeat {
            device: "T-1".into(),
            heartbeat: HeartbeatView {
                seq: 7,
                sent_at_ms: NOW,
                received_at_ms: NOW,
                interval_s: 10,
                uptime_s: 303,
                outbox_depth: 2,
                boot_id: 1,
                config_version: 0,
                locked: false,
                lock_generation: 0,
                dead_letters: 0,
            },
        };
        assert_eq!(
            line("heartbeat", json(&hb), NOW),
            "13:05:09  T-1           heartbeat  seq 7  uptime 5m03s  outbox 2"
        );
        let tm = FleetEvent::Telemetry {
            device: "T-1".into(),
            telemetry: telemetry(true),
        };
        assert_eq!(
            line("telemetry", json(&tm), NOW),
            "13:05:03  T-1           telemetry  cpu 12%  mem 512/2048 MiB  bat 87%+  \
             temp 41.2°C  wifi -67 dBm  paper low  TAMPER!"
        );
    }

    #[test]
    fn transaction_and_alert_lines() {
        let tx = FleetEvent::Transaction {
            device: "T-1".into(),
            transaction: Box::new(crate::posctl::tests::transactions::canned_tx("T-1", 7)),
        };
        assert_eq!(
            line("transaction", json(&tx), NOW),
            "13:05:09  T-1           transaction seq 7  sale approved  12.50 EUR  \
             411111******1111  txn txn-7"
        );
        let alert = FleetEvent::Alert {
            device: "T-1".into(),
            alert: crate::views::AlertKind::SequenceGap,
            severity: Severity::Warning,
            seq: Some(4),
            message: "seq 4 missing".into(),
            at_ms: NOW,
        };
        assert_eq!(
            line("alert", json(&alert), NOW),
            "13:05:09  T-1           alert      WARNING sequence_gap (seq 4): seq 4 missing"
        );
    }

    #[test]
    fn lagged_and_unknown_events_still_render() {
        assert_eq!(
            line("lagged", json(&FleetEvent::Lagged { missed: 12 }), NOW),
            "13:05:09  -             lagged     12 events skipped: posctl fell behind the stream"
        );
        let unknown = serde_json::json!({"type": "command_progress", "device": "T-1"});
        assert!(
            line("command_progress", unknown, NOW).contains("command_progress (not understood")
        );
    }

    #[test]
    fn device_strings_cannot_inject_escape_sequences() {
        let ev = FleetEvent::Presence {
            device: "T-1".into(),
            online: false,
            reason: Some("\u{1b}]0;pwned\u{7}".into()),
            at_ms: NOW,
        };
        let rendered = line("presence", json(&ev), NOW);
        assert!(!rendered.contains('\u{1b}'), "{rendered}");
    }
}
