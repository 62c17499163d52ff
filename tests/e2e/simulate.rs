//! `demo` mode and the `simulate` fleet: many virtual terminals running the real agent code.

use posfleet_broker::views::{DeviceCertificates, DeviceList, IssueKind};
use posfleet_tests::{BrokerOptions, Posctl, Process, eventually};

use crate::support::{WAIT, broker, broker_with};

/// Waits until exactly the devices whose id starts with `prefix` number `count` and are all
/// online (or all offline).
async fn fleet_is(api: &posfleet_tests::Api, prefix: &str, count: usize, online: bool) {
    eventually(WAIT, || async {
        let list = api.devices().await?;
        let matching: Vec<_> = list
            .devices
            .iter()
            .filter(|d| d.id.starts_with(prefix))
            .collect();
        let in_state = matching.iter().filter(|d| d.online == online).count();
        anyhow::ensure!(
            matching.len() == count && in_state == count,
            "{in_state} of {} {prefix}* devices online={online}, want {count}",
            matching.len()
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn demo_mode_brings_its_simulated_terminals_online() {
    let broker = broker_with(BrokerOptions {
        demo_terminals: Some(3),
        extra_args: ["--heartbeat-interval", "1s", "--telemetry-interval", "1s"]
            .map(String::from)
            .to_vec(),
        ..BrokerOptions::default()
    })
    .await;
    fleet_is(broker.api(), "sim-", 3, true).await;
    let out = Posctl::new(&broker)
        .ok(&["devices", "list", "-o", "json"])
        .await
        .expect("posctl");
    let list: DeviceList = out.json().expect("JSON");
    let mut ids: Vec<&str> = list.devices.iter().map(|d| d.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["sim-00000", "sim-00001", "sim-00002"], "{out}");
    assert!(list.devices.iter().all(|d| !d.model.is_empty()), "{out}");
    for id in ids {
        recorded_for_the_simulator(broker.api(), id).await;
    }
}

#[tokio::test]
async fn a_simulated_fleet_connects_and_leaves_with_a_goodbye() {
    let broker = broker().await;
    let api = broker.api();
    let pki = broker.pki().dir().display().to_string();
    let url = broker.mqtt_url();
    let state = broker.scratch_dir("simulator").expect("scratch dir");
    let state = state.display().to_string();
    let mut simulator = Process::spawn(
        "pf-agent simulate",
        &broker.bins().agent,
        [
            "simulate",
            "--count",
            "8",
            "--pki-dir",
            pki.as_str(),
            "--broker",
            url.as_str(),
            "--id-prefix",
            "fleet-",
            "--heartbeat-interval",
            "1s",
            "--telemetry-interval",
            "1s",
            "--connect-rate",
            "1000",
            "--data-dir",
            state.as_str(),
        ],
        &broker.log_dir(),
        "simulate",
    )
    .expect("start the simulator");
    fleet_is(api, "fleet-", 8, true).await;
    recorded_for_the_simulator(api, "fleet-00007").await;
    let scrape = api.metrics().await.expect("metrics");
    // The eight terminals only: the controller is attached through a local router link.
    assert_eq!(
        scrape.value("posfleet_edge_connections", &[]),
        8.0,
        "{scrape}"
    );

    let status = simulator
        .terminate(std::time::Duration::from_secs(15))
        .await
        .expect("SIGTERM simulator");
    assert!(status.success(), "{status}");
    fleet_is(api, "fleet-", 8, false).await;
    let list = api.devices().await.expect("devices");
    for device in &list.devices {
        assert_eq!(
            device.offline_reason.as_deref(),
            Some("shutdown"),
            "{device:?}"
        );
    }
}

/// The controller recorded `id`'s certificate as issued to the simulator (issue 10 item 8).
async fn recorded_for_the_simulator(api: &posfleet_tests::Api, id: &str) {
    let r = api
        .get(&format!("/api/v1/devices/{id}/certificates"))
        .await
        .expect("GET certificates");
    let records: DeviceCertificates = r.json().await.expect("records");
    assert!(
        !records.items.is_empty() && records.items.iter().all(|c| c.kind == IssueKind::Simulator),
        "{records:?}"
    );
}
