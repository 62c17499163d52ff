//! The agent's automatic renewal (`posfleet_agent::renew`, run by `posfleet_agent::terminal`)
//! against the real controller: renew, restart with the new certificate, confirm, old serial
//! on the CRL; and a failed renewal that leaves the identity alone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use posfleet_agent::config::Config;
use posfleet_agent::renew::{self, RenewSettings};
use posfleet_proto::DeviceId;
use posfleet_proto::pki::CertFacts;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Fixture, WAIT, connected, eventually};
use crate::datadir::DataDir;

/// Enrols `id` with the agent's own `enroll` into `DIR/<id>`, with `extra` added to `[tls]`;
/// returns the config path.
async fn enrol_terminal(f: &Fixture, id: &str, extra: &str) -> PathBuf {
    let token = f.token(json!({"expires_in": "1h"})).await;
    let opts = posfleet_agent::enroll::EnrollOptions {
        server: f.api(""),
        token: token.token,
        device_id: DeviceId::new(id).unwrap(),
        serial: "SN-1".into(),
        ca_file: DataDir::at(f._tmp.path().join("data")).pki().ca_cert(),
        out_dir: f._tmp.path().join(id),
        config_out: None,
    };
    let enrolled = posfleet_agent::enroll::enroll(&opts).await.unwrap();
    let text = std::fs::read_to_string(&enrolled.config).unwrap();
    assert!(text.contains("device_url = \"https://"), "{text}");
    let text = text.replacen("[tls]\n", &format!("[tls]\n{extra}"), 1);
    std::fs::write(&enrolled.config, text).unwrap();
    enrolled.config
}

fn serial(cert: &Path) -> String {
    CertFacts::from_pem(&std::fs::read_to_string(cert).unwrap())
        .unwrap()
        .serial
}

fn crl_lists(f: &Fixture, serial: &str) -> bool {
    posfleet_proto::pki::crl_serials(&f.running.enrolment.crl(), &f.ca_pem)
        .unwrap()
        .iter()
        .any(|s| s == serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_reconnects_with_the_new_certificate_and_the_old_one_is_revoked() {
    let f = Fixture::start().await;
    // Device certificates last 365 days: 400 makes this one due at once.
    let path = enrol_terminal(
        &f,
        "T-77",
        "renew_before = \"400d\"\nrenew_check_interval = \"1h\"\n",
    )
    .await;
    let config = Config::load(&path).unwrap();
    let files = RenewSettings::from_config(&config).unwrap().files;
    let id = DeviceId::new("T-77").unwrap();
    let old_serial = serial(&config.tls.cert);
    let old_key = std::fs::read_to_string(&config.tls.key).unwrap();

    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    let agent = tokio::spawn(async move {
        posfleet_agent::terminal::run_terminal(&path, async move {
            shutdown.cancelled().await;
            Ok(())
        })
        .await
    });

    eventually("the old serial revoked", || {
        f.running
            .enrolment
            .revocations()
            .is_revoked_serial(&old_serial)
    })
    .await;
    assert!(crl_lists(&f, &old_serial));
    let new_serial = serial(&config.tls.cert);
    assert_ne!(new_serial, old_serial);
    assert!(!crl_lists(&f, &new_serial));
    let new_key = std::fs::read_to_string(&config.tls.key).unwrap();
    assert_ne!(new_key, old_key, "a new key was generated");
    assert_eq!(
        std::fs::metadata(&config.tls.key)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Confirmed: the backup and the marker go.
    eventually("the renewal finished", || {
        !files.marker.exists() && !files.old_key().exists() && !files.old_cert().exists()
    })
    .await;

    // The agent is online with the new certificate (it confirmed only after its session
    // connected), and it never presented the revoked one.
    eventually("the terminal online", || f.running.registry.is_online(&id)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(f.running.registry.is_online(&id));
    assert!(!f.refusals("revoked"));
    assert!(!agent.is_finished(), "the agent keeps running");
    // It did not renew a second time: one new serial only.
    assert_eq!(serial(&config.tls.cert), new_serial);

    stop.cancel();
    let code = tokio::time::timeout(WAIT, agent)
        .await
        .expect("the agent stops in time")
        .unwrap()
        .unwrap();
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_leaves_the_old_identity_in_use() {
    let f = Fixture::start().await;
    let path = enrol_terminal(&f, "T-78", "").await;
    let config = Config::load(&path).unwrap();
    let mut settings = RenewSettings::from_config(&config).unwrap();
    settings.attempts = 2;
    settings.retry.initial = Duration::from_millis(10);
    settings.retry.max = Duration::from_millis(20);
    let cert = std::fs::read_to_string(&config.tls.cert).unwrap();
    let key = std::fs::read_to_string(&config.tls.key).unwrap();
    let old_serial = serial(&config.tls.cert);

    // The admin API is not the device endpoint: the renew call fails there.
    let mut wrong = settings.clone();
    wrong.device_url = f.api("");
    let err = renew::renew_now(&wrong).await.unwrap_err();
    assert!(matches!(err, renew::RenewError::Refused { .. }), "{err}");
    // Nothing listens here: a transport error.
    wrong.device_url = "https://127.0.0.1:1".into();
    let err = renew::renew_now(&wrong).await.unwrap_err();
    assert!(matches!(err, renew::RenewError::Http(_)), "{err}");
    assert!(!err.to_string().contains("PRIVATE KEY"));

    assert_eq!(std::fs::read_to_string(&config.tls.cert).unwrap(), cert);
    assert_eq!(std::fs::read_to_string(&config.tls.key).unwrap(), key);
    let f_ = &settings.files;
    for leftover in [
        f_.staged_key(),
        f_.staged_cert(),
        f_.old_key(),
        f_.marker.clone(),
    ] {
        assert!(!leftover.exists(), "{}", leftover.display());
    }
    assert!(
        !f.running
            .enrolment
            .revocations()
            .is_revoked_serial(&old_serial)
    );
    // The old identity still connects.
    let mut events = f.session("T-78", &cert, &key);
    connected(&mut events).await;

    // The real endpoint renews; confirming with the old certificate still in the files is
    // refused locally (the marker names the new one) ... after installation the files hold
    // the new pair, so put the old certificate back to check that guard.
    let pending = renew::renew_now(&settings).await.unwrap();
    assert_eq!(pending.old_serial, old_serial);
    assert_eq!(serial(&config.tls.cert), pending.new_serial);
    std::fs::write(&config.tls.cert, &cert).unwrap();
    let err = renew::confirm(&settings, &pending).await.unwrap_err();
    assert!(matches!(err, renew::RenewError::Marker { .. }), "{err}");
    assert!(
        !f.running
            .enrolment
            .revocations()
            .is_revoked_serial(&old_serial),
        "no confirmation, no revocation"
    );
    f.stop().await;
}
