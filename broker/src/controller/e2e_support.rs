//! Shared set-up of the in-process end-to-end tests: a terminal's own MQTT session, with a
//! certificate issued by the running controller's fleet CA, subscribed to its downlink.

use posfleet_agent::mqtt::{MqttHandle, SessionConfig, SessionEvent, spawn_session};
use posfleet_agent::tls::client_config_from_pem;
use posfleet_proto::{DeviceId, Filter};
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
    let issued = pki.load_ca().unwrap().issue_device(device).unwrap();
    let ca = std::fs::read(pki.ca_cert()).unwrap();
    let tls =
        client_config_from_pem(&ca, issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let mut session = SessionConfig::new(
        running.broker.host.clone(),
        running.broker.port,
        device.as_str(),
        tls,
    );
    session.subscriptions = vec![Filter::device_downlink(device)];
    spawn_session(session, tracker, cancel.child_token()).unwrap()
}
