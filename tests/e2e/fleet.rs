//! Terminals come online and report: what the admin API and posctl show.

use std::collections::BTreeMap;

use posfleet_broker::views::{DeviceDetail, DeviceList, FleetEvent};
use posfleet_tests::Posctl;
use reqwest::StatusCode;

use crate::support::{agent, broker, online};

#[tokio::test]
async fn terminals_come_online_with_heartbeats_and_telemetry() {
    let broker = broker().await;
    let api = broker.api();
    let _a = agent(&broker, "pos-a1");
    let _b = agent(&broker, "pos-b1");

    for id in ["pos-a1", "pos-b1"] {
        let device = online(api, id).await;
        let s = &device.summary;
        assert_eq!(s.id, id);
        assert_eq!(s.offline_reason, None);
        assert_eq!(s.model, "PX-500");
        assert_eq!(s.serial, format!("SN-{id}"));
        assert_eq!(s.versions.firmware, "1.4.2");
        assert_eq!(s.versions.payment_app, "3.2.0");
        assert!(
            !s.versions.agent.is_empty(),
            "agent version reported: {s:?}"
        );

        let hb = device.last_heartbeat.as_ref().expect("heartbeat");
        assert!(hb.seq >= 1);
        assert_eq!(hb.interval_s, 1, "the configured heartbeat interval");

        let tm = device.latest_telemetry.as_ref().expect("telemetry");
        assert!((0.0..=100.0).contains(&tm.cpu_percent), "{tm:?}");
        assert!(tm.memory_total_bytes > 0 && tm.memory_used_bytes <= tm.memory_total_bytes);
        assert!(tm.disk_total_bytes > 0, "{tm:?}");
        let battery = tm
            .battery_percent
            .expect("simulated sensors report a battery");
        assert!((0.0..=100.0).contains(&battery), "{tm:?}");
        assert!(tm.temperature_c.is_some(), "{tm:?}");
        assert_ne!(tm.network, "", "{tm:?}");
        assert_ne!(tm.paper, "", "{tm:?}");
        assert_ne!(tm.card_reader, "", "{tm:?}");
        assert!(!tm.tamper, "{tm:?}");
        assert!(!device.telemetry_history.is_empty());
    }

    let list = api.devices().await.expect("device list");
    let online_ids: Vec<&str> = list
        .devices
        .iter()
        .filter(|d| d.online)
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(online_ids.len(), 2, "{list:?}");
    assert!(online_ids.contains(&"pos-a1") && online_ids.contains(&"pos-b1"));

    let scrape = api.metrics().await.expect("metrics");
    assert_eq!(
        scrape.value("posfleet_devices_online", &[]),
        2.0,
        "{scrape}"
    );
    // Two terminals; the controller is attached through a local router link, not the edge.
    assert_eq!(
        scrape.value("posfleet_edge_connections", &[]),
        2.0,
        "{scrape}"
    );
    assert!(
        scrape.value("posfleet_ingest_messages_total", &[("channel", "hb")]) >= 2.0,
        "{scrape}"
    );
    assert!(
        scrape.value("posfleet_ingest_messages_total", &[("channel", "tm")]) >= 2.0,
        "{scrape}"
    );
}

#[tokio::test]
async fn posctl_lists_shows_and_watches_devices() {
    let broker = broker().await;
    let api = broker.api();
    let _a = agent(&broker, "pos-c1");
    let _b = agent(&broker, "pos-c2");
    online(api, "pos-c1").await;
    online(api, "pos-c2").await;
    let posctl = Posctl::new(&broker);

    let out = posctl
        .ok(&["devices", "list", "--output", "json"])
        .await
        .expect("posctl runs");
    let list: DeviceList = out.json().expect("devices list JSON");
    let presence: BTreeMap<&str, bool> = list
        .devices
        .iter()
        .map(|d| (d.id.as_str(), d.online))
        .collect();
    assert_eq!(
        presence,
        BTreeMap::from([("pos-c1", true), ("pos-c2", true)]),
        "{out}"
    );

    // The table an operator reads.
    let out = posctl.ok(&["devices", "list"]).await.expect("posctl runs");
    assert!(
        out.stdout.contains("pos-c1") && out.stdout.contains("pos-c2"),
        "{out}"
    );
    assert!(out.stdout.contains("2 devices, 2 online"), "{out}");

    let out = posctl
        .ok(&["devices", "show", "pos-c1", "-o", "json"])
        .await
        .expect("posctl runs");
    let detail: DeviceDetail = out.json().expect("devices show JSON");
    assert_eq!(detail.summary.id, "pos-c1");
    assert!(detail.summary.online, "{out}");
    let tm = detail.latest_telemetry.expect("telemetry in devices show");
    assert!(tm.battery_percent.is_some(), "{out}");
    assert!(detail.last_heartbeat.is_some(), "{out}");

    let out = posctl
        .run(&["devices", "show", "no-such-pos"])
        .await
        .expect("posctl runs");
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("no device no-such-pos"), "{out}");

    // Three live events of one device, as JSON lines.
    let out = posctl
        .ok(&[
            "watch",
            "--device",
            "pos-c2",
            "--count",
            "3",
            "--timeout",
            "20s",
            "-o",
            "json",
        ])
        .await
        .expect("posctl watch");
    let events: Vec<FleetEvent> = out.json_lines().expect("watch JSON lines");
    assert_eq!(events.len(), 3, "{out}");
    for event in &events {
        assert_eq!(event.device(), Some("pos-c2"), "{out}");
        assert!(
            matches!(
                event,
                FleetEvent::Heartbeat { .. } | FleetEvent::Telemetry { .. }
            ),
            "{out}"
        );
    }
}

#[tokio::test]
async fn the_admin_api_requires_the_token_but_health_does_not() {
    let broker = broker().await;
    let api = broker.api();
    assert_eq!(api.healthz().await.expect("healthz"), StatusCode::OK);
    for path in ["/api/v1/devices", "/metrics", "/api/v1/stream"] {
        let response = api.get_anonymous(path).await.expect("request");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "GET {path}");
    }
    let scrape = api.metrics().await.expect("metrics");
    assert!(
        scrape.value("posfleet_api_auth_failures_total", &[]) >= 3.0,
        "{scrape}"
    );
}
