//! Shared set-up of the in-process end-to-end tests: a terminal's own MQTT session, with a
//! certificate issued (and recorded) by the running controller, subscribed to its downlink.

use posfleet_proto::{DeviceId, Filter};
use posfleet_runtime::mqtt::{MqttHandle, SessionConfig, SessionEvent, spawn_session};
use posfleet_runtime::tls::client_config_from_pem;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{Running, ServeOptions};

/// Connects terminal `device` to `running` (started with `opts`).
pub(super) fn terminal_session(
    opts: &ServeOptions,
    running: &Running,
    device: &DeviceId,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> (MqttHandle, mpsc::Receiver<SessionEvent>) {
    let pki = crate::datadir::DataDir::at(&opts.data_dir).pki();
    let key = posfleet_proto::pki::DeviceKeyRequest::generate(device).unwrap();
    let request = crate::views::CertificateIssue {
        purpose: None,
        requests: vec![crate::views::CertificateRequest {
            device_id: device.to_string(),
            csr_pem: key.csr_pem.clone(),
        }],
    };
    let issued = running
        .enrolment
        .issue(&request, "test", "local", posfleet_proto::now_ms())
        .unwrap();
    let cert_pem = &issued.items[0].certificate_pem;
    let ca = std::fs::read(pki.ca_cert()).unwrap();
    let tls = client_config_from_pem(&ca, cert_pem.as_bytes(), key.key_pem.as_bytes()).unwrap();
    let mut session = SessionConfig::new(
        running.broker.host.clone(),
        running.broker.port,
        device.as_str(),
        tls,
    );
    session.subscriptions = vec![Filter::device_downlink(device)];
    spawn_session(session, tracker, cancel.child_token()).unwrap()
}
