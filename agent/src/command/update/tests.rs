//! SoftwareUpdate and RollbackUpdate in a real agent (fake broker, real state store and
//! outbox) against a local mTLS artifact server, with hook scripts that leave marker files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use posfleet_proto::encode;
use posfleet_proto::pb::{self, command::Body};
use posfleet_proto::signing::{CommandKey, KeyRing};
use sha2::{Digest, Sha256};

use super::test_server::{ArtifactServer, Fault};
use crate::command::hooks::tests::script;
use crate::command::tests::{Term, reason, runs};
use crate::transaction::fixtures::sale;

const SIZE: usize = 200_000;

/// An artifact, the release key that signed it, and a server for it.
struct Release {
    data: Vec<u8>,
    sha: [u8; 32],
    key: CommandKey,
}

impl Release {
    fn new() -> Self {
        let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let sha: [u8; 32] = Sha256::digest(&data).into();
        Self {
            data,
            sha,
            key: CommandKey::generate(),
        }
    }

    fn hex(&self) -> String {
        hex_of(&self.sha)
    }

    fn update(&self, server: &ArtifactServer, version: &str) -> Body {
        Body::SoftwareUpdate(pb::SoftwareUpdate {
            artifact_id: self.hex(),
            version: version.into(),
            url: server.url(&self.hex()),
            size_bytes: self.data.len() as u64,
            sha256: self.sha.to_vec(),
            release_signature: self.key.sign_release(&self.sha),
            release_key_id: self.key.key_id().into(),
            component: "payment_app".into(),
            rollout_id: "ro-1".into(),
            confirm_timeout_s: 5,
            min_version: String::new(),
        })
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hooks: install copies the artifact to `installed` and logs its env; rollback and health
/// log their runs; health succeeds while `DIR/healthy` exists.
fn hooks(dir: &Path, s: &mut crate::command::CommandSettings, install_tail: &str) {
    s.hooks.install = Some(script(
        dir,
        "install",
        &format!(
            "echo \"$POSFLEET_VERSION $POSFLEET_COMPONENT $POSFLEET_ROLLOUT_ID\" >> {d}/install.log\ncp \"$POSFLEET_ARTIFACT\" {d}/installed\n{install_tail}",
            d = dir.display()
        ),
    ));
    s.hooks.rollback = Some(script(
        dir,
        "rollback",
        &format!(
            "echo \"$POSFLEET_COMPONENT $POSFLEET_VERSION\" >> {}/rollback.log",
            dir.display()
        ),
    ));
    s.hooks.health = Some(script(
        dir,
        "health",
        &format!("test -f {}/healthy", dir.display()),
    ));
    std::fs::write(dir.join("healthy"), "").unwrap();
    s.hooks.timeout = Duration::from_secs(10);
    let u = &mut s.updates;
    u.retry_backoff.initial = Duration::from_millis(10);
    u.retry_backoff.max = Duration::from_millis(50);
    u.idle_check_every = Duration::from_millis(50);
    u.health_check_every = Duration::from_millis(50);
    u.io_timeout = Duration::from_secs(5);
}

async fn start(release: &Release, install_tail: &str) -> Term {
    let public = release.key.public_key().clone();
    Term::start(|dir, s| {
        s.updates.release_keys = KeyRing::new(vec![public]);
        hooks(dir, s, install_tail);
    })
    .await
}

fn phase(r: &pb::CommandResult) -> &str {
    r.details.get("phase").map_or("", String::as_str)
}

/// Files left in the download directory.
fn leftovers(t: &Term) -> Vec<PathBuf> {
    std::fs::read_dir(t.tmp.path().join("updates"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn an_update_downloads_verifies_installs_confirms_and_reports_the_version() {
    let release = Release::new();
    let mut t = start(&release, "").await;
    let server = ArtifactServer::start(&t.pki, release.data.clone(), Fault::None).await;
    let cmd = t.command("up-1", release.update(&server, "4.0.0"));
    t.send(&cmd);
    let mut phases = Vec::new();
    let done = loop {
        let r = t.result().await;
        if r.status() != pb::CommandStatus::InProgress {
            break r;
        }
        if phases.last().map(String::as_str) != Some(phase(&r)) {
            phases.push(phase(&r).to_owned());
        }
    };
    assert_eq!(done.status(), pb::CommandStatus::Succeeded, "{done:?}");
    assert_eq!(done.details["version"], "4.0.0");
    assert_eq!(
        phases,
        [
            "downloading",
            "verifying",
            "waiting",
            "installing",
            "confirming"
        ]
    );
    let dir = t.tmp.path();
    assert_eq!(std::fs::read(dir.join("installed")).unwrap(), release.data);
    assert_eq!(
        std::fs::read_to_string(dir.join("install.log")).unwrap(),
        "4.0.0 payment_app ro-1\n"
    );
    assert_eq!(runs(&dir.join("rollback.log")), 0);
    // Reported: a ReportedState after the change, and the live status heartbeats use.
    loop {
        let st = t.state().await;
        if st.versions.as_ref().map(|v| v.payment_app.as_str()) == Some("4.0.0") {
            break;
        }
    }
    assert_eq!(t.h().live().get().versions.payment_app, "4.0.0");
    assert!(leftovers(&t).is_empty(), "{:?}", leftovers(&t));
    // Persisted: still reported after a restart.
    t.stop().await;
    let st = t.spawn().await;
    assert_eq!(st.versions.unwrap().payment_app, "4.0.0");
    assert_eq!(server.requests().len(), 1);
    t.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_cut_download_resumes_with_a_range_request() {
    let release = Release::new();
    let mut t = start(&release, "").await;
    let cut = (SIZE / 3) as u64;
    let server =
        ArtifactServer::start(&t.pki, release.data.clone(), Fault::CutOnceAfter(cut)).await;
    let r = t.run("up-cut", release.update(&server, "4.0.1")).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded, "{r:?}");
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].range_from, None);
    assert_eq!(
        requests[1].range_from,
        Some(cut),
        "resumed where it was cut"
    );
    let sent = server.body_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(sent, SIZE as u64, "every byte crossed the network once");
    assert!(sent < 2 * SIZE as u64);
    assert_eq!(
        std::fs::read(t.tmp.path().join("installed")).unwrap(),
        release.data
    );
    t.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn tampered_unknown_key_and_oversized_artifacts_fail_and_install_nothing() {
    let release = Release::new();
    let mut t = start(&release, "").await;
    let dir = t.tmp.path().to_owned();

    let tampered = ArtifactServer::start(&t.pki, release.data.clone(), Fault::Tamper).await;
    let r = t
        .run("up-tampered", release.update(&tampered, "5.0.0"))
        .await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Failed, "tampered")
    );
    assert_eq!(tampered.requests().len(), 1);
    assert!(
        leftovers(&t).is_empty(),
        "the file is deleted: {:?}",
        leftovers(&t)
    );

    // Signed by a key the terminal does not trust: nothing is even downloaded.
    let stranger = Release {
        key: CommandKey::generate(),
        ..Release::new()
    };
    let r = t
        .run("up-stranger", stranger.update(&tampered, "5.0.0"))
        .await;
    assert_eq!(reason(&r), "unknown_release_key");
    // A trusted key id with a signature over something else.
    let mut body = release.update(&tampered, "5.0.0");
    if let Body::SoftwareUpdate(u) = &mut body {
        u.release_signature = release.key.sign_release(&[0u8; 32]);
    }
    let r = t.run("up-badsig", body).await;
    assert_eq!(reason(&r), "bad_release_signature");
    assert_eq!(
        tampered.requests().len(),
        1,
        "no download for a bad signature"
    );

    let oversized =
        ArtifactServer::start(&t.pki, release.data.clone(), Fault::Oversize(4096)).await;
    let r = t.run("up-big", release.update(&oversized, "5.0.0")).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Failed, "too_large")
    );
    assert!(leftovers(&t).is_empty(), "{:?}", leftovers(&t));

    assert!(!dir.join("installed").exists(), "nothing was installed");
    assert_eq!(runs(&dir.join("install.log")), 0);
    assert_eq!(t.h().live().get().versions.payment_app, "");
    t.stop().await;
    tampered.stop().await;
    oversized.stop().await;
}

#[tokio::test]
async fn a_failing_install_hook_rolls_back() {
    let release = Release::new();
    let mut t = start(&release, "exit 3").await;
    let server = ArtifactServer::start(&t.pki, release.data.clone(), Fault::None).await;
    let r = t.run("up-fail", release.update(&server, "6.0.0")).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Failed, "install_failed")
    );
    assert_eq!(r.details["hook_exit"], "3");
    assert_eq!(r.details["rollback_exit"], "0");
    assert_eq!(runs(&t.tmp.path().join("rollback.log")), 1);
    assert_eq!(
        t.h().live().get().versions.payment_app,
        "",
        "version unchanged"
    );
    t.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn health_that_never_holds_rolls_back_at_the_deadline() {
    let release = Release::new();
    let mut t = start(&release, "").await;
    std::fs::remove_file(t.tmp.path().join("healthy")).unwrap();
    let server = ArtifactServer::start(&t.pki, release.data.clone(), Fault::None).await;
    let mut body = release.update(&server, "7.0.0");
    if let Body::SoftwareUpdate(u) = &mut body {
        u.confirm_timeout_s = 1;
    }
    let started = std::time::Instant::now();
    let r = t.run("up-sick", body).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Failed, "health_timeout")
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(runs(&t.tmp.path().join("install.log")), 1);
    assert_eq!(runs(&t.tmp.path().join("rollback.log")), 1);
    assert_eq!(t.h().live().get().versions.payment_app, "");
    t.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_restart_while_confirming_resumes_the_confirmation() {
    let release = Release::new();
    let mut t = start(&release, "").await;
    std::fs::remove_file(t.tmp.path().join("healthy")).unwrap();
    let server = ArtifactServer::start(&t.pki, release.data.clone(), Fault::None).await;
    let mut body = release.update(&server, "8.0.0");
    if let Body::SoftwareUpdate(u) = &mut body {
        u.confirm_timeout_s = 60;
    }
    let cmd = t.command("up-restart", body);
    t.send(&cmd);
    loop {
        let r = t.result().await;
        assert_eq!(r.status(), pb::CommandStatus::InProgress, "{r:?}");
        if phase(&r) == "confirming" {
            break;
        }
    }
    // The install hook "restarted the terminal": a new agent over the same stores.
    t.stop().await;
    std::fs::write(t.tmp.path().join("healthy"), "").unwrap();
    t.spawn().await;
    let r = t.final_result().await;
    assert_eq!(
        (r.command_id.as_str(), r.status()),
        ("up-restart", pb::CommandStatus::Succeeded)
    );
    assert_eq!(runs(&t.tmp.path().join("install.log")), 1, "installed once");
    assert_eq!(t.h().live().get().versions.payment_app, "8.0.0");
    t.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn an_update_waits_for_an_idle_terminal_while_other_commands_run() {
    let release = Release::new();
    let mut t = start(&release, "").await;
    let server = ArtifactServer::start(&t.pki, release.data.clone(), Fault::None).await;
    // A transaction the controller has not acknowledged yet.
    t.h().intake().accept(sale("tx-1", 100)).await.unwrap();
    assert!(!t.h().outbox().is_idle());
    let update = t.command("up-wait", release.update(&server, "9.0.0"));
    let signed = t.send(&update);
    loop {
        let r = t.result().await;
        assert_eq!(r.status(), pb::CommandStatus::InProgress, "{r:?}");
        if phase(&r) == "waiting" {
            break;
        }
    }
    // While it waits: a lock runs, a second update is refused, a re-delivery of the first
    // gets its stored progress.
    let r = t.run("lock-1", crate::command::tests::lock_body(1)).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded);
    assert!(t.h().live().is_locked());
    let r = t.run("up-other", release.update(&server, "9.1.0")).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "refused")
    );
    assert!(
        r.message.contains("another update is in progress"),
        "{}",
        r.message
    );
    t.send_signed(&signed);
    let again = t.result().await;
    assert_eq!(
        (again.command_id.as_str(), again.status()),
        ("up-wait", pb::CommandStatus::InProgress)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        runs(&t.tmp.path().join("install.log")),
        0,
        "not installed while busy"
    );

    // The controller acknowledges the transaction: the terminal is idle, the update goes on.
    t.broker.push(
        "posfleet/v1/d/T-1/down/txack",
        &encode(&pb::TransactionAck {
            durable_through_seq: 1,
            ..Default::default()
        })
        .unwrap(),
    );
    let r = t.final_result().await;
    assert_eq!(
        (r.command_id.as_str(), r.status()),
        ("up-wait", pb::CommandStatus::Succeeded)
    );
    assert_eq!(runs(&t.tmp.path().join("install.log")), 1);
    t.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn rollback_update_is_a_no_op_at_the_version_and_runs_the_hook_otherwise() {
    let release = Release::new();
    let mut t = start(&release, "").await;
    let server = ArtifactServer::start(&t.pki, release.data.clone(), Fault::None).await;
    let r = t.run("up-1", release.update(&server, "4.0.0")).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded);
    let rollback = |to: &str| {
        Body::RollbackUpdate(pb::RollbackUpdate {
            rollout_id: "ro-1".into(),
            component: "payment_app".into(),
            to_version: to.into(),
        })
    };
    let r = t.run("rb-noop", rollback("4.0.0")).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded);
    assert!(r.message.contains("nothing to do"), "{}", r.message);
    assert_eq!(runs(&t.tmp.path().join("rollback.log")), 0);

    let r = t.run("rb-real", rollback("3.9.0")).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(t.tmp.path().join("rollback.log")).unwrap(),
        "payment_app 3.9.0\n"
    );
    assert_eq!(t.h().live().get().versions.payment_app, "3.9.0");
    t.stop().await;
    let st = t.spawn().await;
    assert_eq!(st.versions.unwrap().payment_app, "3.9.0", "persisted");
    t.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn without_release_keys_or_install_hook_updates_are_refused() {
    let release = Release::new();
    let mut t = Term::start(|_, _| {}).await;
    let server = ArtifactServer::start(&t.pki, release.data.clone(), Fault::None).await;
    let r = t.run("up-nokey", release.update(&server, "1.0.0")).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "refused")
    );
    assert!(
        r.message.contains("no trusted release key"),
        "{}",
        r.message
    );
    t.stop().await;

    let public = release.key.public_key().clone();
    let mut t = Term::start(|_, s| s.updates.release_keys = KeyRing::new(vec![public])).await;
    let r = t.run("up-nohook", release.update(&server, "1.0.0")).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Failed, "no_install_hook")
    );
    assert!(server.requests().is_empty());
    t.stop().await;
    server.stop().await;
}

/// `body` (a SoftwareUpdate) with the artifact's `min_version`.
fn with_min_version(body: Body, min: &str) -> Body {
    let Body::SoftwareUpdate(mut u) = body else {
        panic!("not a SoftwareUpdate");
    };
    u.min_version = min.into();
    Body::SoftwareUpdate(u)
}

#[tokio::test]
async fn an_update_whose_min_version_the_terminal_does_not_meet_is_rejected_before_download() {
    let release = Release::new();
    let mut t = start(&release, "").await;
    let dir = t.tmp.path().to_owned();
    let server = ArtifactServer::start(&t.pki, release.data.clone(), Fault::None).await;
    let update = |min: &str| with_min_version(release.update(&server, "9.1.0"), min);

    // A terminal that reports no version of the component cannot show it meets it.
    let r = t.run("up-unknown", update("1.0.0")).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "version_unknown"),
        "{r:?}"
    );
    // It runs 3.3.0 (an update without a minimum).
    let r = t.run("up-330", release.update(&server, "3.3.0")).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded, "{r:?}");
    assert_eq!(server.requests().len(), 1);

    let r = t.run("up-9", update("9.0.0")).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "below_min_version"),
        "{r:?}"
    );
    assert_eq!(r.details["installed_version"], "3.3.0");
    assert_eq!(r.details["min_version"], "9.0.0");
    assert!(r.message.contains("below"), "{}", r.message);
    // A minimum nobody can compare is refused as invalid.
    let r = t.run("up-odd", update("nine")).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "refused"),
        "{r:?}"
    );
    assert!(r.message.contains("min_version"), "{}", r.message);

    assert_eq!(server.requests().len(), 1, "nothing more was downloaded");
    assert_eq!(
        runs(&dir.join("install.log")),
        1,
        "nothing more was installed"
    );
    assert_eq!(t.h().live().get().versions.payment_app, "3.3.0");
    assert!(leftovers(&t).is_empty(), "{:?}", leftovers(&t));
    // Refusals are final: the journal answers a re-delivery with the same result.
    let again = t.run("up-9", update("9.0.0")).await;
    assert_eq!(reason(&again), "below_min_version");
    assert_eq!(server.requests().len(), 1);

    // At the minimum (and above it): installed.
    let r = t.run("up-ok", update("3.3.0")).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded, "{r:?}");
    assert_eq!(t.h().live().get().versions.payment_app, "9.1.0");
    t.stop().await;
    server.stop().await;
}
