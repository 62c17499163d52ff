//! Enrolment, revocation, CRL and renewal through the real process (`app::start`): the HTTPS
//! admin API, the mTLS device endpoint and the MQTT edge with a real terminal session.

mod agent_renewal;
mod audit_anchor;
mod card_ids;
mod issued;
mod pinned;
mod refusals;

use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::pki::{CertFacts, DeviceKeyRequest};
use posfleet_proto::{DeviceId, Filter};
use posfleet_runtime::mqtt::{SessionConfig, SessionEvent, spawn_session};
use posfleet_runtime::tls::client_config_from_pem;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{Running, SHUTDOWN_GRACE, ServeOptions, start};
use crate::datadir::DataDir;
use crate::views::{EnrollResponse, RenewResponse, TokenCreated};

const WAIT: Duration = Duration::from_secs(15);

struct Fixture {
    _tmp: tempfile::TempDir,
    running: Running,
    tracker: TaskTracker,
    cancel: CancellationToken,
    client: reqwest::Client,
    admin_token: String,
    ca_pem: String,
}

impl Fixture {
    async fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap()).await
    }

    /// The controller on `tmp/data` (which a test may have prepared).
    async fn start_in(tmp: tempfile::TempDir) -> Self {
        let opts = ServeOptions::loopback(tmp.path().join("data"));
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let running = start(&opts, &tracker, cancel.clone()).await.unwrap();
        let data = DataDir::at(&opts.data_dir);
        let ca_pem = std::fs::read_to_string(data.pki().ca_cert()).unwrap();
        Self {
            client: https_client(&ca_pem, None),
            admin_token: data.read_admin_token().unwrap(),
            ca_pem,
            running,
            tracker,
            cancel,
            _tmp: tmp,
        }
    }

    fn api(&self, path: &str) -> String {
        format!("https://{}{path}", self.running.api_addr)
    }

    async fn admin_post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.api(path))
            .bearer_auth(&self.admin_token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.api(path))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .unwrap()
    }

    async fn token(&self, body: Value) -> TokenCreated {
        let r = self.admin_post("/api/v1/enrolment-tokens", body).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json().await.unwrap()
    }

    /// POST /api/v1/enroll without any bearer token.
    async fn enroll(&self, token: &str, id: &str, serial: &str, csr: &str) -> reqwest::Response {
        self.client
            .post(self.api("/api/v1/enroll"))
            .json(&json!({"token": token, "device_id": id, "serial": serial, "csr_pem": csr}))
            .send()
            .await
            .unwrap()
    }

    /// Enrols `id` and returns the answer and the terminal's key.
    async fn enrolled(&self, id: &str) -> (EnrollResponse, String) {
        let token = self.token(json!({"expires_in": "1h"})).await;
        let request = DeviceKeyRequest::generate(&DeviceId::new(id).unwrap()).unwrap();
        let r = self
            .enroll(&token.token, id, "SN-1", &request.csr_pem)
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        (r.json().await.unwrap(), request.key_pem)
    }

    fn session(&self, id: &str, cert_pem: &str, key_pem: &str) -> mpsc::Receiver<SessionEvent> {
        let tls = client_config_from_pem(
            self.ca_pem.as_bytes(),
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
        )
        .unwrap();
        let device = DeviceId::new(id).unwrap();
        let mut session = SessionConfig::new(
            self.running.broker.host.clone(),
            self.running.broker.port,
            id,
            tls,
        );
        session.subscriptions = vec![Filter::device_downlink(&device)];
        spawn_session(session, &self.tracker, self.cancel.child_token())
            .unwrap()
            .1
    }

    fn device_client(&self, cert_pem: &str, key_pem: &str) -> reqwest::Client {
        https_client(&self.ca_pem, Some((cert_pem, key_pem)))
    }

    fn device_url(&self, path: &str) -> String {
        format!(
            "https://127.0.0.1:{}{path}",
            self.running.device_addr.port()
        )
    }

    /// Edge refusals counted with `reason`.
    fn refusal_count(&self, reason: &str) -> u64 {
        let text = self.running.metrics.render();
        let label = format!("reason=\"{reason}\"");
        text.lines()
            .filter(|l| l.contains("edge_refusals") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|n| n as u64)
            .sum()
    }

    fn refusals(&self, reason: &str) -> bool {
        self.refusal_count(reason) > 0
    }

    async fn stop(self) {
        drop(self.stop_keep().await);
    }

    /// Stops everything and hands back the temp dir (data dir kept for a restart).
    async fn stop_keep(self) -> tempfile::TempDir {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .expect("everything stops");
        drop(self.running);
        self._tmp
    }
}

fn https_client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let tls = match identity {
        Some((cert, key)) => {
            client_config_from_pem(ca_pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
        }
        None => {
            let roots = posfleet_runtime::tls::root_store_from_pem(ca_pem.as_bytes()).unwrap();
            Arc::new(
                rustls::ClientConfig::builder_with_provider(posfleet_runtime::tls::provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    };
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .timeout(WAIT)
        .build()
        .unwrap()
}

async fn next_event(events: &mut mpsc::Receiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("a session event in time")
        .expect("session alive")
}

async fn connected(events: &mut mpsc::Receiver<SessionEvent>) {
    loop {
        if let SessionEvent::Connected { .. } = next_event(events).await {
            return;
        }
    }
}

async fn disconnected(events: &mut mpsc::Receiver<SessionEvent>) {
    loop {
        if let SessionEvent::Disconnected { .. } = next_event(events).await {
            return;
        }
    }
}

/// What the controller does on the terminal's ONLINE presence (a bare session sends none).
fn announce(f: &Fixture, id: &DeviceId) {
    let now = posfleet_proto::now_ms();
    f.running
        .registry
        .presence_online(id, now, now, crate::registry::DeviceInfo::default());
}

/// Waits until `cond` holds (bounded).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_single_use_expiring_pinned_and_deletable() {
    let f = Fixture::start().await;
    let csr = |id: &str| {
        DeviceKeyRequest::generate(&DeviceId::new(id).unwrap())
            .unwrap()
            .csr_pem
    };

    // Longer than 7 days is refused.
    let r = f
        .admin_post("/api/v1/enrolment-tokens", json!({"expires_in": "8d"}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Pinned to a serial: another serial is refused, the right one enrols.
    let pinned = f
        .token(json!({"serial": "SN-7", "group": "north", "expires_in": "24h"}))
        .await;
    let r = f.enroll(&pinned.token, "T-1", "SN-8", &csr("T-1")).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = f.enroll(&pinned.token, "T-1", "SN-7", &csr("T-1")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let enrolled: EnrollResponse = r.json().await.unwrap();
    assert_eq!(enrolled.device_id, "T-1");
    assert!(enrolled.command_pub_pem.contains("PUBLIC KEY"));
    assert!(enrolled.mqtt_url.starts_with("mqtts://"));
    let detail = f
        .running
        .registry
        .detail(&DeviceId::new("T-1").unwrap())
        .expect("registered");
    assert_eq!(detail.summary.serial, "SN-7");
    assert!(detail.summary.groups.contains("north"));
    assert_eq!(detail.summary.lifecycle, crate::views::Lifecycle::Pending);

    // Reuse is refused, even for another device id.
    let r = f.enroll(&pinned.token, "T-2", "SN-7", &csr("T-2")).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // A deleted token is refused.
    let deleted = f.token(json!({"expires_in": "1h"})).await;
    let r = f
        .client
        .delete(f.api(&format!("/api/v1/enrolment-tokens/{}", deleted.id)))
        .bearer_auth(&f.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = f.enroll(&deleted.token, "T-3", "SN-3", &csr("T-3")).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // An expired token is refused (expiry checked against the service's clock).
    let short = f.token(json!({"expires_in": "1s"})).await;
    let request = crate::views::EnrollRequest {
        token: short.token.clone(),
        device_id: "T-4".into(),
        serial: "SN-4".into(),
        csr_pem: csr("T-4"),
    };
    let later = short.expires_at_ms + 1;
    let err = f
        .running
        .enrolment
        .enroll(&request, "10.9.9.9".parse().unwrap(), later)
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    // The list shows no secrets.
    let list = f
        .admin_get("/api/v1/enrolment-tokens")
        .await
        .text()
        .await
        .unwrap();
    assert!(list.contains(&pinned.id) && list.contains("\"used\""));
    assert!(!list.contains(&pinned.token) && !list.contains(&short.token));

    // Token routes need the admin token; enrolment does not.
    let r = f
        .client
        .get(f.api("/api/v1/enrolment-tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_csrs_and_existing_ids_are_refused() {
    let f = Fixture::start().await;
    let (_, _) = f.enrolled("T-1").await;
    let token = f.token(json!({"expires_in": "1h"})).await;

    // An existing device id: 409, and the token stays usable.
    let csr = DeviceKeyRequest::generate(&DeviceId::new("T-1").unwrap())
        .unwrap()
        .csr_pem;
    let r = f.enroll(&token.token, "T-1", "SN-2", &csr).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);

    // Garbage, a tampered signature, a P-384 key: 400.
    let r = f.enroll(&token.token, "T-2", "SN-2", "not a csr").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let key = rcgen_p384_csr();
    let r = f.enroll(&token.token, "T-2", "SN-2", &key).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body = r.text().await.unwrap();
    assert!(body.contains("key type"), "{body}");

    // An invalid device id: 400.
    let r = f.enroll(&token.token, "a/b", "SN-2", &csr).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // The token survived all of that.
    let csr2 = DeviceKeyRequest::generate(&DeviceId::new("T-2").unwrap())
        .unwrap()
        .csr_pem;
    let r = f.enroll(&token.token, "T-2", "SN-2", &csr2).await;
    assert_eq!(r.status(), StatusCode::OK);
    f.stop().await;
}

/// A CSR with a P-384 key (not a profile key type).
fn rcgen_p384_csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_identity_connects_revocation_closes_and_refuses_it() {
    let f = Fixture::start().await;
    let (enrolled, key) = f.enrolled("T-1").await;
    let mut events = f.session("T-1", &enrolled.certificate_pem, &key);
    connected(&mut events).await;
    let id = DeviceId::new("T-1").unwrap();
    // Before the revocation the device endpoint serves it (an unknown artifact: 404).
    let no_such_artifact = f.device_url(&format!("/device/v1/artifacts/{}", "0".repeat(64)));
    let r = f
        .device_client(&enrolled.certificate_pem, &key)
        .get(no_such_artifact.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    announce(&f, &id);
    assert_eq!(
        f.running.registry.detail(&id).unwrap().summary.lifecycle,
        crate::views::Lifecycle::Active
    );

    let r = f
        .admin_post("/api/v1/devices/T-1/revoke", json!({"reason": "stolen"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let view: crate::views::RevocationView = r.json().await.unwrap();
    assert!(view.session_closed);
    let serial = CertFacts::from_pem(&enrolled.certificate_pem)
        .unwrap()
        .serial;
    assert_eq!(view.serials, vec![serial.clone()]);

    // Closed at once, and refused when it comes back.
    disconnected(&mut events).await;
    eventually("a revoked refusal", || f.refusals("revoked")).await;
    assert_eq!(
        f.running.registry.detail(&id).unwrap().summary.lifecycle,
        crate::views::Lifecycle::Revoked
    );

    // The CRL lists the serial and is signed by the fleet CA.
    let crl = f.admin_get("/api/v1/pki/crl").await;
    assert_eq!(crl.status(), StatusCode::OK);
    let der = crl.bytes().await.unwrap();
    assert!(
        posfleet_proto::pki::crl_serials(&der, &f.ca_pem)
            .unwrap()
            .contains(&serial)
    );

    // A revoked certificate downloads nothing and cannot renew.
    let device = f.device_client(&enrolled.certificate_pem, &key);
    // (The TLS handshake does not know revocations; the endpoint answers.)
    let r = device.get(no_such_artifact).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let csr = DeviceKeyRequest::generate(&id).unwrap().csr_pem;
    let r = device
        .post(f.device_url("/device/v1/renew"))
        .json(&json!({"csr_pem": csr}))
        .send()
        .await;
    // The device endpoint may already refuse the handshake; either way no certificate.
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }

    // Re-enrolling the revoked id is refused.
    let token = f.token(json!({"expires_in": "1h"})).await;
    let r = f.enroll(&token.token, "T-1", "SN-1", &csr).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommissioned_devices_are_hidden_and_refused() {
    let f = Fixture::start().await;
    // A terminal with a pre-issued bundle (serial unknown to enrolment), offline when retired.
    let id = DeviceId::new("T-9").unwrap();
    let pki = DataDir::at(f._tmp.path().join("data")).pki();
    let issued = pki.load_ca().unwrap().issue_device(&id).unwrap();
    let mut events = f.session("T-9", &issued.cert_pem, &issued.key_pem);
    connected(&mut events).await;
    announce(&f, &id);

    let r = f
        .admin_post(
            "/api/v1/devices/T-9/decommission",
            json!({"reason": "retired"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    disconnected(&mut events).await;
    eventually("a decommissioned refusal", || f.refusals("decommissioned")).await;

    let list = |all: bool| {
        let url = f.api(if all {
            "/api/v1/devices?all=true"
        } else {
            "/api/v1/devices"
        });
        let req = f.client.get(url).bearer_auth(&f.admin_token);
        async move { req.send().await.unwrap().text().await.unwrap() }
    };
    assert!(!list(false).await.contains("T-9"));
    assert!(list(true).await.contains("decommissioned"));

    // Even a brand-new certificate for the id is refused.
    let fresh = pki.load_ca().unwrap().issue_device(&id).unwrap();
    let _events = f.session("T-9", &fresh.cert_pem, &fresh.key_pem);
    let before = f.refusal_count("decommissioned");
    eventually("another refusal", || {
        f.refusal_count("decommissioned") > before
    })
    .await;
    assert!(!f.running.registry.is_online(&id));
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_issues_a_new_certificate_and_revokes_the_old_one() {
    let f = Fixture::start().await;
    let (enrolled, old_key) = f.enrolled("T-5").await;
    let id = DeviceId::new("T-5").unwrap();
    let old_serial = CertFacts::from_pem(&enrolled.certificate_pem)
        .unwrap()
        .serial;
    let old = f.device_client(&enrolled.certificate_pem, &old_key);

    let request = DeviceKeyRequest::generate(&id).unwrap();
    let r = old
        .post(f.device_url("/device/v1/renew"))
        .json(&json!({"csr_pem": request.csr_pem}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let renewed: RenewResponse = r.json().await.unwrap();
    assert_ne!(renewed.serial, old_serial);
    assert!(
        !f.running
            .enrolment
            .revocations()
            .is_revoked_serial(&old_serial)
    );

    // Confirming with the old certificate does nothing.
    let r = old
        .post(f.device_url("/device/v1/renew/confirm"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);

    // The new certificate connects, then confirms: the old serial is revoked.
    let mut events = f.session("T-5", &renewed.certificate_pem, &request.key_pem);
    connected(&mut events).await;
    let new = f.device_client(&renewed.certificate_pem, &request.key_pem);
    let r = new
        .post(f.device_url("/device/v1/renew/confirm"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["revoked_serial"], json!(old_serial));
    assert!(
        f.running
            .enrolment
            .revocations()
            .is_revoked_serial(&old_serial)
    );
    let der = f.running.enrolment.crl();
    assert!(
        posfleet_proto::pki::crl_serials(&der, &f.ca_pem)
            .unwrap()
            .contains(&old_serial)
    );
    // Both certificates are on record: how each was issued, and which is revoked.
    let records = f
        .running
        .enrolment
        .certificates(&DeviceId::new("T-5").unwrap())
        .unwrap();
    let kinds: Vec<_> = records
        .items
        .iter()
        .map(|c| (c.kind, c.serial == old_serial, c.revoked))
        .collect();
    assert_eq!(
        kinds,
        [
            (crate::views::IssueKind::Enrolment, true, true),
            (crate::views::IssueKind::Renewal, false, false)
        ],
        "{records:?}"
    );

    // The old certificate is refused at the edge; the new one is not.
    let mut old_events = f.session("T-5", &enrolled.certificate_pem, &old_key);
    eventually("a revoked refusal", || f.refusals("revoked")).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), connected(&mut old_events))
            .await
            .is_err(),
        "the old certificate must not connect"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enroll_writes_an_identity_and_a_config_that_loads() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::start().await;
    let token = f
        .token(json!({"serial": "SN-42", "expires_in": "1h"}))
        .await;
    let out = f._tmp.path().join("terminal");
    let ca_file = DataDir::at(f._tmp.path().join("data")).pki().ca_cert();
    let mut opts = posfleet_agent::enroll::EnrollOptions {
        server: f.api(""),
        token: token.token.clone(),
        device_id: DeviceId::new("T-42").unwrap(),
        serial: "SN-42".into(),
        ca_file,
        out_dir: out.clone(),
        config_out: None,
    };
    assert!(!format!("{opts:?}").contains(&token.token));
    let enrolled = posfleet_agent::enroll::enroll(&opts).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out.join("device.key")), 0o600);
    for name in ["device.crt", "ca.crt", "command.pub", "agent.toml"] {
        assert!(out.join(name).exists(), "{name}");
    }
    let config = posfleet_agent::config::Config::load(&enrolled.config).unwrap();
    let tls = &config.tls;
    let cert = std::fs::read_to_string(&tls.cert).unwrap();
    let key = std::fs::read_to_string(&tls.key).unwrap();
    let mut events = f.session("T-42", &cert, &key);
    connected(&mut events).await;

    // The same token again: refused, with the controller's reason and without the token.
    opts.out_dir = f._tmp.path().join("again");
    let err = posfleet_agent::enroll::enroll(&opts).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("already used"), "{text}");
    assert!(!text.contains(&token.token));
    f.stop().await;
}
