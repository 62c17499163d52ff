//! A real `pf-agent` enrols with a one-time token, runs with the config it wrote, and is
//! revoked while online.

use std::path::PathBuf;
use std::time::Duration;

use posfleet_tests::{Broker, Posctl, Process, eventually};
use tokio::time::Instant;
use x509_parser::prelude::FromDer as _;

use super::ok;
use crate::support::{WAIT, bins, broker};

/// Bound on one `pf-agent enroll`.
const ENROL_TIMEOUT: Duration = Duration::from_secs(30);

/// What `pf-agent enroll` did.
struct Enrolment {
    ok: bool,
    output: String,
}

/// `posctl enroll token create --serial SERIAL --expires 1h`; returns the token.
async fn token(posctl: &Posctl, serial: &str) -> String {
    let out = ok(
        posctl,
        &[
            "-o",
            "json",
            "enroll",
            "token",
            "create",
            "--serial",
            serial,
            "--expires",
            "1h",
        ],
    )
    .await;
    let value: serde_json::Value = out.json().expect("a created token");
    match value["token"].as_str() {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => panic!("no token in:\n{out}"),
    }
}

/// Runs `pf-agent enroll` for `id`/`serial` with `token` into `out_dir`.
async fn enroll(
    broker: &Broker,
    token: &str,
    id: &str,
    serial: &str,
    out_dir: &PathBuf,
) -> Enrolment {
    let client = broker.client_file();
    let ca = if client.ca_file.is_absolute() {
        client.ca_file.clone()
    } else {
        broker.data_dir().join(&client.ca_file)
    };
    let output = tokio::time::timeout(
        ENROL_TIMEOUT,
        tokio::process::Command::new(&bins().agent)
            .arg("enroll")
            .args(["--server", client.api_url.as_str()])
            .args(["--device-id", id, "--serial", serial])
            .arg("--ca-file")
            .arg(&ca)
            .arg("--out-dir")
            .arg(out_dir)
            .arg("--config-out")
            .arg(out_dir.join("agent.toml"))
            // Out of the process list, as the agent's help recommends.
            .env("POSFLEET_ENROL_TOKEN", token)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pf-agent enroll finishes")
    .expect("pf-agent enroll runs");
    Enrolment {
        ok: output.status.success(),
        output: format!(
            "pf-agent enroll {id} ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Enrols `id` with a fresh token pinned to `serial` and starts `pf-agent run` with the
/// config enrolment wrote (reconnects made quick for the test). Returns the process, the
/// token (used) and the enrolment's directory.
async fn enrol_and_run(
    broker: &Broker,
    posctl: &Posctl,
    id: &str,
    serial: &str,
) -> (Process, String) {
    let token = token(posctl, serial).await;
    let dir = broker
        .scratch_dir(&format!("enrolled-{id}"))
        .expect("scratch dir");
    let enrolled = enroll(broker, &token, id, serial, &dir).await;
    assert!(enrolled.ok, "{}", enrolled.output);
    let config = dir.join("agent.toml");
    let text = std::fs::read_to_string(&config).expect("enrolment wrote agent.toml");
    assert_eq!(
        super::mode(&dir.join("device.key")),
        0o600,
        "the terminal's own key"
    );
    // Quicker heartbeats and reconnects than a real terminal's; everything else as written.
    let text = text
        .replacen(
            "[broker]\n",
            "[broker]\nbackoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\nkeep_alive = \"5s\"\n",
            1,
        )
        .replacen(
            "[agent]\n",
            "[agent]\nheartbeat_interval = \"1s\"\ntelemetry_interval = \"1s\"\n",
            1,
        );
    std::fs::write(&config, text).expect("config rewritten");
    let config = config.display().to_string();
    let process = Process::spawn(
        format!("pf-agent {id}"),
        &bins().agent,
        ["run", "--config", config.as_str()],
        &broker.log_dir(),
        &format!("agent-{id}"),
    )
    .expect("pf-agent run starts");
    (process, token)
}

/// Waits until `id` is registered and online.
async fn online(broker: &Broker, id: &str) {
    let api = broker.api();
    eventually(WAIT, || async {
        let device = api.device(id).await?;
        anyhow::ensure!(
            device.as_ref().is_some_and(|d| d.summary.online),
            "{id} not online yet: {device:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_enrolled_agent_comes_online_and_tokens_are_single_use_and_pinned() {
    let broker = broker().await;
    let posctl = Posctl::new(&broker);
    let (_agent, used) = enrol_and_run(&broker, &posctl, "T-enr-1", "SN-ENR-1").await;
    online(&broker, "T-enr-1").await;

    // The same token again (another terminal, same serial): refused, nothing written.
    let dir = broker.scratch_dir("enrolled-T-enr-2").expect("scratch dir");
    let reused = enroll(&broker, &used, "T-enr-2", "SN-ENR-1", &dir).await;
    assert!(
        !reused.ok,
        "a used token enrolled again:\n{}",
        reused.output
    );
    assert!(
        !dir.join("device.crt").exists(),
        "a certificate was written: {}",
        reused.output
    );
    // A token pinned to another serial.
    let other = token(&posctl, "SN-OTHER").await;
    let dir = broker.scratch_dir("enrolled-T-enr-3").expect("scratch dir");
    let wrong_serial = enroll(&broker, &other, "T-enr-3", "SN-ENR-3", &dir).await;
    assert!(
        !wrong_serial.ok,
        "a token pinned to SN-OTHER enrolled SN-ENR-3:\n{}",
        wrong_serial.output
    );
    for id in ["T-enr-2", "T-enr-3"] {
        let device = broker.api().device(id).await.expect("GET device");
        assert!(device.is_none(), "{id} was registered: {device:?}");
    }
    // The pinned token was not used up by the refusal: its own terminal still enrols.
    let right = enroll(&broker, &other, "T-enr-4", "SN-OTHER", &dir).await;
    assert!(right.ok, "{}", right.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_revoked_agent_is_cut_off_refused_and_on_the_crl() {
    let broker = broker().await;
    let posctl = Posctl::new(&broker);
    let (_agent, _) = enrol_and_run(&broker, &posctl, "T-enr-1", "SN-ENR-1").await;
    online(&broker, "T-enr-1").await;
    let api = broker.api();
    let refused_before = api
        .metrics()
        .await
        .expect("metrics")
        .value("posfleet_edge_refusals_total", &[("reason", "revoked")]);

    let out = ok(
        &posctl,
        &[
            "-o", "json", "devices", "revoke", "T-enr-1", "--reason", "stolen",
        ],
    )
    .await;
    let revoked: posfleet_broker::views::RevocationView = out.json().expect("a revocation");
    assert!(
        revoked.session_closed && !revoked.serials.is_empty(),
        "{revoked:?}"
    );
    // Closed at once: offline within a couple of seconds (not a keep-alive timeout later).
    let revoked_at = Instant::now();
    eventually(Duration::from_secs(3), || async {
        let device = api.device("T-enr-1").await?;
        anyhow::ensure!(
            device.as_ref().is_some_and(|d| !d.summary.online),
            "T-enr-1 still online after revoke: {device:?}"
        );
        Ok(())
    })
    .await;
    // The agent keeps trying (backoff ≤ 500 ms) and is refused at the edge every time.
    eventually(WAIT, || async {
        let now = api
            .metrics()
            .await?
            .value("posfleet_edge_refusals_total", &[("reason", "revoked")]);
        anyhow::ensure!(
            now >= refused_before + 2.0,
            "revoked refusals {refused_before} -> {now}"
        );
        Ok(())
    })
    .await;
    // And it stays offline for several seconds of those attempts.
    while revoked_at.elapsed() < Duration::from_secs(4) {
        let device = api.device("T-enr-1").await.expect("GET device");
        assert!(
            device.as_ref().is_some_and(|d| !d.summary.online),
            "the revoked terminal is online again: {device:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The CRL lists it.
    let pem = api
        .get("/api/v1/pki/crl?format=pem")
        .await
        .expect("GET crl")
        .text()
        .await
        .expect("CRL body");
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        pem.starts_with("-----BEGIN X509 CRL-----") && !body.is_empty(),
        "{pem}"
    );
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body)
        .expect("base64 CRL");
    let (_, crl) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&der).expect("a DER CRL");
    let listed: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    for serial in &revoked.serials {
        let serial = serial.trim_start_matches("0x").to_ascii_lowercase();
        assert!(
            listed
                .iter()
                .any(|l| l.trim_start_matches('0') == serial.trim_start_matches('0')),
            "serial {serial} not on the CRL {listed:?}"
        );
    }
}
