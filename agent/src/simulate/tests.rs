//! The simulator against the fake broker, with a PKI directory in a temp dir.

use std::collections::BTreeSet;
use std::time::Duration;

use posfleet_proto::pki::PkiDir;
use posfleet_proto::{decode, pb};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use posfleet_runtime::testing::{FakeBroker, Seen, TestPki};

const WAIT: Duration = Duration::from_secs(20);

/// The fake broker has no controller behind it: the terminals' certificates come straight
/// from the test CA in `dir` (or from a throwaway CA when there is none), recorded nowhere.
fn config(dir: &std::path::Path, port: u16, count: usize) -> SimulatorConfig {
    let ca = PkiDir::at(dir)
        .load_ca()
        .unwrap_or_else(|_| posfleet_proto::pki::Ca::generate("throwaway").unwrap());
    let mut cfg = SimulatorConfig::new(
        count,
        dir,
        BrokerUrl {
            host: "127.0.0.1".into(),
            port,
        },
        std::sync::Arc::new(issuer::UnrecordedCa(ca)),
    );
    cfg.connect_rate = 1000;
    cfg.agent.heartbeat_interval = Duration::from_millis(200);
    cfg
}

#[tokio::test]
async fn runs_every_terminal_with_its_own_identity_and_says_goodbye() {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let ca = PkiDir::at(&pki_dir).init(&[]).unwrap();
    let mut broker = FakeBroker::start(&TestPki::with_ca(ca)).await;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();

    let sim = run_simulator(
        config(&pki_dir, broker.addr.port(), 5),
        &tracker,
        cancel.clone(),
    )
    .await
    .unwrap();
    let ids: Vec<&str> = sim.device_ids().iter().map(DeviceId::as_str).collect();
    assert_eq!(
        ids,
        [
            "sim-00000",
            "sim-00001",
            "sim-00002",
            "sim-00003",
            "sim-00004"
        ]
    );

    let mut connected = BTreeSet::new();
    let mut heartbeats = BTreeSet::new();
    while connected.len() < 5 || heartbeats.len() < 5 {
        match broker.next().await {
            Seen::Connect { client_id, .. } => {
                connected.insert(client_id);
            }
            Seen::Publish { topic, payload, .. } if topic.ends_with("/up/hb") => {
                let hb = decode::<pb::Heartbeat>(&payload).unwrap();
                assert_eq!(hb.seq, 1, "each terminal counts its own heartbeats");
                heartbeats.insert(topic);
            }
            _ => {}
        }
    }
    assert_eq!(connected.iter().collect::<Vec<_>>(), ids);
    tokio::time::timeout(WAIT, sim.ramp_finished())
        .await
        .unwrap();
    assert_eq!(sim.started(), 5);

    cancel.cancel();
    let mut goodbyes = 0;
    while goodbyes < 5 {
        if broker.next().await == Seen::Disconnect {
            goodbyes += 1;
        }
    }
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
    assert_eq!(sim.connected(), 0);
}

#[tokio::test]
async fn refuses_bad_settings_before_starting_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let missing = tmp.path().join("no-pki");

    let err = run_simulator(config(&missing, 8883, 0), &tracker, cancel.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, SimError::Config { .. }), "{err}");

    let mut bad_prefix = config(&missing, 8883, 1);
    bad_prefix.id_prefix = "a/b".into();
    let err = run_simulator(bad_prefix, &tracker, cancel.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("prefix"), "{err}");

    let err = run_simulator(config(&missing, 8883, 1), &tracker, cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, SimError::Ca { .. }), "{err}");
    assert!(err.to_string().contains("no-pki"), "{err}");
    assert!(tracker.is_empty());
}

#[tokio::test]
async fn terminals_make_transactions_through_the_accept_path_into_one_shared_store() {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let ca = PkiDir::at(&pki_dir).init(&[]).unwrap();
    let mut broker = FakeBroker::start(&TestPki::with_ca(ca)).await;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut cfg = config(&pki_dir, broker.addr.port(), 3);
    cfg.agent.heartbeat_interval = Duration::from_secs(3600);
    cfg.tx_rate_per_minute = 1200.0;
    cfg.record_accepted = true;
    let data_dir = cfg.data_dir.clone();
    assert_eq!(data_dir, tmp.path().join("simulator-data"));
    let sim = run_simulator(cfg, &tracker, cancel.clone()).await.unwrap();

    // Every terminal publishes batches of its own transactions.
    let mut publishing = BTreeSet::new();
    while publishing.len() < 3 {
        if let Seen::Publish { topic, payload, .. } = broker.next().await {
            if topic.ends_with("/up/tx") {
                let batch = decode::<pb::TransactionBatch>(&payload).unwrap();
                assert!(!batch.transactions.is_empty());
                publishing.insert(topic);
            }
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while sim.transaction_stats().iter().any(|t| t.accepted < 10) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "too few transactions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();

    let stats = sim.transaction_stats();
    let records = sim.accepted_records();
    assert_eq!(records.len() as u64, sim.accepted_total());
    for t in &stats {
        // A fresh store: seqs 1..=accepted, nothing refused.
        assert_eq!(t.max_seq, t.accepted, "{t:?}");
        assert_eq!(t.refused, 0, "{t:?}");
        let mut seqs: Vec<u64> = records
            .iter()
            .filter(|r| r.device_id == t.device_id)
            .map(|r| r.seq)
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=t.accepted).collect::<Vec<_>>());
    }
    // Everything accepted is in the one store (nothing was acknowledged by the fake broker).
    let agents = sim.agents();
    sim.outbox().close().await;
    drop(agents);
    drop(sim);
    let outbox = crate::outbox::tests::open(&data_dir.join("outbox")).await;
    for t in &stats {
        let stored = outbox
            .device(&t.device_id)
            .unwrap()
            .entries()
            .await
            .unwrap();
        let ids: Vec<(u64, String)> = stored
            .iter()
            .map(|e| (e.seq, e.transaction().unwrap().txn_id))
            .collect();
        let mut expected: Vec<(u64, String)> = records
            .iter()
            .filter(|r| r.device_id == t.device_id)
            .map(|r| (r.seq, r.txn_id.clone()))
            .collect();
        expected.sort();
        assert_eq!(ids, expected);
    }
}

#[tokio::test]
async fn every_terminal_executes_commands_signed_with_the_pki_command_key() {
    use posfleet_proto::pb::command::Body;
    use posfleet_proto::{encode, now_ms};

    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let pki = PkiDir::at(&pki_dir);
    let ca = pki.init(&[]).unwrap();
    let key = pki.ensure_command_key().unwrap();
    let mut broker = FakeBroker::start(&TestPki::with_ca(ca)).await;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut cfg = config(&pki_dir, broker.addr.port(), 2);
    cfg.agent.heartbeat_interval = Duration::from_secs(3600);
    cfg.tx_rate_per_minute = 0.0;
    cfg.max_offline = None;
    let sim = run_simulator(cfg, &tracker, cancel.clone()).await.unwrap();
    let mut online = 0;
    while online < 2 {
        if let Seen::Publish { topic, .. } = broker.next().await {
            online += usize::from(topic.ends_with("/up/st"));
        }
    }
    let lock = |target: &str| pb::Command {
        id: format!("lock-{target}"),
        target_device: target.into(),
        issued_at_ms: now_ms(),
        not_after_ms: now_ms() + 60_000,
        body: Some(Body::Lock(pb::Lock {
            reason: "audit".into(),
            generation: 1,
        })),
    };
    // The fake broker sends every push to every terminal; each reads only its own topic.
    // The addressee acts; the same command on the other terminal's topic is refused.
    let signed = encode(&key.sign(&lock("sim-00001"))).unwrap();
    broker.push("posfleet/v1/d/sim-00001/down/cmd", &signed);
    broker.push("posfleet/v1/d/sim-00000/down/cmd", &signed);
    let mut results = BTreeSet::new();
    while results.len() < 2 {
        if let Seen::Publish { topic, payload, .. } = broker.next().await {
            if topic.ends_with("/up/res") {
                let r = decode::<pb::CommandResult>(&payload).unwrap();
                results.insert((topic, r.status()));
            }
        }
    }
    assert!(results.contains(&(
        "posfleet/v1/d/sim-00001/up/res".to_owned(),
        pb::CommandStatus::Succeeded
    )));
    assert!(results.contains(&(
        "posfleet/v1/d/sim-00000/up/res".to_owned(),
        pb::CommandStatus::Rejected
    )));
    let agents = sim.agents();
    assert!(agents[1].live().is_locked());
    assert!(!agents[0].live().is_locked());

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
}

#[tokio::test]
async fn simulated_terminals_run_software_updates_with_the_pki_release_key() {
    use posfleet_proto::pb::command::Body;
    use posfleet_proto::signing::CommandKey;
    use posfleet_proto::{encode, now_ms};
    use sha2::{Digest, Sha256};

    use crate::command::hooks::tests::script;
    use crate::command::update::test_server::{ArtifactServer, Fault};

    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let pki = PkiDir::at(&pki_dir);
    let ca = pki.init(&[]).unwrap();
    let key = pki.ensure_command_key().unwrap();
    let release = CommandKey::generate();
    std::fs::write(pki_dir.join(RELEASE_PUB), release.public_key().to_pem()).unwrap();
    let test_pki = TestPki::with_ca(ca);
    let mut broker = FakeBroker::start(&test_pki).await;
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let sha: [u8; 32] = Sha256::digest(&data).into();
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    let server = ArtifactServer::start(&test_pki, data.clone(), Fault::None).await;

    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut cfg = config(&pki_dir, broker.addr.port(), 2);
    cfg.agent.heartbeat_interval = Duration::from_secs(3600);
    cfg.tx_rate_per_minute = 0.0;
    cfg.max_offline = None;
    let marks = tmp.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    cfg.hooks.install = Some(script(
        tmp.path(),
        "install",
        &format!(
            "cp \"$POSFLEET_ARTIFACT\" {}/\"$POSFLEET_DEVICE_ID\"",
            marks.display()
        ),
    ));
    let sim = run_simulator(cfg, &tracker, cancel.clone()).await.unwrap();
    let mut online = 0;
    while online < 2 {
        if let Seen::Publish { topic, .. } = broker.next().await {
            online += usize::from(topic.ends_with("/up/st"));
        }
    }
    for target in ["sim-00000", "sim-00001"] {
        let cmd = pb::Command {
            id: format!("up-{target}"),
            target_device: target.into(),
            issued_at_ms: now_ms(),
            not_after_ms: now_ms() + 60_000,
            body: Some(Body::SoftwareUpdate(pb::SoftwareUpdate {
                artifact_id: hex.clone(),
                version: "3.3.0".into(),
                url: server.url(&hex),
                size_bytes: data.len() as u64,
                sha256: sha.to_vec(),
                release_signature: release.sign_release(&sha),
                release_key_id: release.key_id().into(),
                component: "payment_app".into(),
                rollout_id: "ro-sim".into(),
                confirm_timeout_s: 10,
                min_version: String::new(),
            })),
        };
        let topic = format!("posfleet/v1/d/{target}/down/cmd");
        broker.push(&topic, &encode(&key.sign(&cmd)).unwrap());
    }
    let mut succeeded = BTreeSet::new();
    while succeeded.len() < 2 {
        if let Seen::Publish { topic, payload, .. } = broker.next().await {
            if topic.ends_with("/up/res") {
                let r = decode::<pb::CommandResult>(&payload).unwrap();
                if r.command_id.starts_with("up-") && r.status() == pb::CommandStatus::Succeeded {
                    succeeded.insert(r.command_id);
                }
            }
        }
    }
    for agent in sim.agents() {
        assert_eq!(agent.live().get().versions.payment_app, "3.3.0");
        assert_eq!(
            std::fs::read(marks.join(agent.device_id().as_str())).unwrap(),
            data
        );
    }
    assert_eq!(server.requests().len(), 2, "one download per terminal");
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
    server.stop().await;
}

/// An issuer that refuses everything (a controller that is down or says no).
#[derive(Debug)]
struct Refusing;

impl CertIssuer for Refusing {
    fn issue(&self, _requests: Vec<CertRequest>) -> IssueFuture<'_> {
        Box::pin(async { Err(IssueError("403 Forbidden: admin role required".into())) })
    }
}

#[tokio::test]
async fn no_terminal_starts_without_a_certificate_from_the_issuer() {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    PkiDir::at(&pki_dir).init(&[]).unwrap();
    // No CA key is read: the issuer alone provides certificates.
    std::fs::remove_file(PkiDir::at(&pki_dir).ca_key()).unwrap();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut cfg = config(&pki_dir, 8883, 3);
    cfg.issuer = std::sync::Arc::new(Refusing);
    let err = run_simulator(cfg, &tracker, cancel).await.unwrap_err();
    assert!(matches!(err, SimError::Issuer(_)), "{err}");
    assert!(err.to_string().contains("403"), "{err}");
    assert!(tracker.is_empty());
}
