//! Issue 10 items 8 and 9 with the real processes: a bundle from `posctl pki issue-device` is
//! recorded by the controller and revocable before the terminal ever connected (`pf-agent
//! run` with it is refused at CONNECT, its serial is on the CRL); the offline path records
//! into the data dir only while the controller is stopped; an enrolment token pinned to a
//! device id enrols only that id, and no other token takes it.

use std::time::Duration;

use posfleet_broker::views::{DeviceCertificates, IssueKind, RevocationView};
use posfleet_proto::pki::CertFacts;
use posfleet_tests::{Agent, AgentOptions, Broker, Posctl, eventually};

use crate::accounts::{ok, run};
use crate::support::{WAIT, bins, broker};

/// `posfleet_edge_refusals_total{reason="revoked"}`.
async fn revoked_refusals(broker: &Broker) -> f64 {
    let scrape = broker.api().metrics().await.expect("metrics");
    scrape.value("posfleet_edge_refusals_total", &[("reason", "revoked")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_a_bundle_revoked_before_first_contact_is_refused() {
    let broker = broker().await;
    let posctl = Posctl::new(&broker);
    let bundle = broker.scratch_dir("bundle-T-pre").expect("scratch dir");
    let out = bundle.to_str().expect("utf-8 path");
    let printed = ok(
        &posctl,
        &["pki", "issue-device", "--id", "T-pre", "--out", out],
    )
    .await;
    assert!(!printed.stdout.contains("PRIVATE KEY"), "{printed}");
    let cert = std::fs::read_to_string(bundle.join("device.crt")).expect("device.crt");
    let serial = CertFacts::from_pem(&cert).expect("certificate").serial;
    assert!(printed.stdout.contains(&serial), "{printed}");

    // The controller recorded it.
    let r = broker
        .api()
        .get("/api/v1/devices/T-pre/certificates")
        .await
        .expect("GET certificates");
    let records: DeviceCertificates = r.json().await.expect("records");
    assert_eq!(records.items.len(), 1, "{records:?}");
    assert_eq!(records.items[0].serial, serial);

    // The bundle is lost before deployment: revoke it. (Before issue 10: 404.)
    let out = ok(
        &posctl,
        &[
            "-o",
            "json",
            "devices",
            "revoke",
            "T-pre",
            "--reason",
            "lost in transit",
        ],
    )
    .await;
    let revoked: RevocationView = out.json().expect("a revocation");
    assert_eq!(revoked.serials, vec![serial.clone()], "{revoked:?}");
    assert!(!revoked.session_closed);

    // The CRL lists it.
    let crl = broker
        .api()
        .get("/api/v1/pki/crl")
        .await
        .expect("GET crl")
        .bytes()
        .await
        .expect("crl body");
    let ca = std::fs::read(broker.pki().ca_cert()).expect("ca.crt");
    let listed = posfleet_proto::pki::crl_serials(&crl, std::str::from_utf8(&ca).unwrap())
        .expect("a CRL signed by the fleet CA");
    assert!(listed.contains(&serial), "{listed:?}");

    // Whoever holds the bundle is refused at CONNECT, again and again, and never online.
    let before = revoked_refusals(&broker).await;
    let _thief = Agent::start_prepared(&broker, "T-pre", &AgentOptions::default(), &bundle)
        .expect("pf-agent run with the stolen bundle");
    eventually(WAIT, || async {
        let now = revoked_refusals(&broker).await;
        anyhow::ensure!(now >= before + 2.0, "revoked refusals {before} -> {now}");
        Ok(())
    })
    .await;
    let device = broker.api().device("T-pre").await.expect("device");
    assert!(
        device.as_ref().is_none_or(|d| !d.summary.online),
        "the revoked bundle got online: {device:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_offline_issue_only_while_the_controller_is_stopped() {
    let mut broker = broker().await;
    let posctl = Posctl::new(&broker);
    let pki = broker.pki().dir().display().to_string();
    let bundle = broker.scratch_dir("bundle-T-off").expect("scratch dir");
    let out = bundle.to_str().expect("utf-8 path");
    let args = [
        "pki",
        "issue-device",
        "--dir",
        &pki,
        "--id",
        "T-off",
        "--out",
        out,
    ];
    // While the controller runs, the offline path refuses and names the API path.
    let refused = run(&posctl, &args, None).await;
    assert!(!refused.status.success(), "{refused}");
    assert!(
        refused.stderr.contains("the controller is running")
            && refused.stderr.contains("without --dir"),
        "{refused}"
    );
    assert!(!bundle.join("device.key").exists());

    broker.terminate().await.expect("stop the broker");
    let printed = ok(&posctl, &args).await;
    assert!(printed.stdout.contains("recorded offline"), "{printed}");
    broker.restart().await.expect("restart the broker");

    // Recorded, audited at the restart, and revocable.
    let r = broker
        .api()
        .get("/api/v1/devices/T-off/certificates")
        .await
        .expect("GET certificates");
    let records: DeviceCertificates = r.json().await.expect("records");
    assert_eq!(records.items[0].kind, IssueKind::CliOffline, "{records:?}");
    let audit = ok(
        &posctl,
        &["-o", "json", "audit", "list", "--action", "pki.issue"],
    )
    .await;
    assert!(audit.stdout.contains("T-off"), "{audit}");
    ok(&posctl, &["devices", "revoke", "T-off", "--reason", "test"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_a_token_pinned_to_a_device_id_enrols_only_that_id() {
    let broker = broker().await;
    let posctl = Posctl::new(&broker);
    let created = ok(
        &posctl,
        &[
            "-o",
            "json",
            "enroll",
            "token",
            "create",
            "--device",
            "T-pin",
            "--expires",
            "1h",
        ],
    )
    .await;
    let value: serde_json::Value = created.json().expect("a token");
    assert_eq!(value["device_id"], "T-pin", "{created}");
    let token = value["token"].as_str().expect("token").to_owned();

    // No second token, and no CLI bundle, for the reserved id.
    let second = run(
        &posctl,
        &["enroll", "token", "create", "--device", "T-pin"],
        None,
    )
    .await;
    assert!(!second.status.success(), "{second}");
    assert!(second.stderr.contains("device_id"), "{second}");
    let bundle = broker.scratch_dir("bundle-T-pin").expect("scratch dir");
    let issue = run(
        &posctl,
        &[
            "pki",
            "issue-device",
            "--id",
            "T-pin",
            "--out",
            bundle.to_str().expect("utf-8"),
        ],
        None,
    )
    .await;
    assert!(!issue.status.success(), "{issue}");
    assert!(issue.stderr.contains("reserved"), "{issue}");

    // The token does not enrol another id; it does enrol its own.
    let enrol = |id: &'static str| {
        let client = broker.client_file().clone();
        let dir = broker.scratch_dir(&format!("enrolled-{id}")).expect("dir");
        let token = token.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(30),
                tokio::process::Command::new(&bins().agent)
                    .arg("enroll")
                    .args(["--server", client.api_url.as_str()])
                    .args(["--device-id", id, "--serial", "SN-1"])
                    .arg("--ca-file")
                    .arg(&client.ca_file)
                    .arg("--out-dir")
                    .arg(&dir)
                    .env("POSFLEET_ENROL_TOKEN", token)
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("pf-agent enroll finishes")
            .expect("pf-agent enroll runs")
        }
    };
    let other = enrol("T-other").await;
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("pinned to another device id"), "{stderr}");
    let own = enrol("T-pin").await;
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
}
