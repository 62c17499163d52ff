//! Commands published straight onto a terminal's downlink by a second controller identity
//! (`controller:test`, certified by the fleet CA): TLS lets it publish, only the command key
//! makes a command valid. Forged, misaddressed, expired and bodiless commands are refused with
//! their reason and change nothing; a replay gets the stored result and does not act again.

use posfleet_proto::pb::{self, command::Body};
use posfleet_proto::signing::{CommandKey, new_command_id};
use posfleet_proto::{Channel, DeviceId, Topic, now_ms};
use posfleet_tests::mqtt::{MqttClient, tls_config};
use prost::Message;
use serde_json::{Value, json};

use super::{fast_broker, hooks_table, local_status, marker_lines, start_agent, write_hook};
use crate::support::{WAIT, online};

/// A controller session of the test and the device it talks to.
struct Downlink {
    client: MqttClient,
    device: DeviceId,
}

impl Downlink {
    async fn publish(&mut self, signed: &pb::SignedCommand) {
        let topic = Topic::for_device(&self.device, Channel::Command).to_string();
        self.client
            .publish(&topic, signed.encode_to_vec())
            .await
            .expect("publish on the downlink");
    }

    /// The next result for `command_id` (others are skipped).
    async fn result(&mut self, command_id: &str) -> pb::CommandResult {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let publish = match self.client.next_publish(left).await {
                Ok(p) => p,
                Err(error) => panic!("waiting for the result of {command_id}: {error:#}"),
            };
            let result = pb::CommandResult::decode(publish.payload.as_ref())
                .expect("a CommandResult on up/res");
            if result.command_id == command_id {
                return result;
            }
        }
    }

    /// The next final result for `command_id`.
    async fn final_result(&mut self, command_id: &str) -> pb::CommandResult {
        loop {
            let r = self.result(command_id).await;
            if !matches!(
                r.status(),
                pb::CommandStatus::Delivered | pb::CommandStatus::InProgress
            ) {
                return r;
            }
        }
    }
}

fn command(device: &str, body: Option<Body>) -> pb::Command {
    let now = now_ms();
    pb::Command {
        id: new_command_id(),
        target_device: device.to_owned(),
        issued_at_ms: now,
        not_after_ms: now + 600_000,
        body,
    }
}

fn lock_body(generation: u64) -> Option<Body> {
    Some(Body::Lock(pb::Lock {
        reason: "forged".into(),
        generation,
    }))
}

fn assert_rejected(r: &pb::CommandResult, reason: &str) {
    assert_eq!(r.status(), pb::CommandStatus::Rejected, "{r:?}");
    assert_eq!(
        r.details.get("reason").map(String::as_str),
        Some(reason),
        "{r:?}"
    );
}

#[tokio::test]
async fn commands_forged_misaddressed_expired_and_replayed_change_nothing() {
    let broker = fast_broker().await;
    let hooks = broker.scratch_dir("forged-hooks").expect("dir");
    let locks = hooks.join("locks");
    let hook = write_hook(
        &hooks,
        "lock",
        &format!(
            "echo \"$POSFLEET_LOCK_GENERATION\" >> '{}'",
            locks.display()
        ),
    );
    let agent = start_agent(
        &broker,
        "forge-1",
        &broker.mqtt_url(),
        &hooks_table(&[("lock", hook.as_path())]),
    );
    online(broker.api(), "forge-1").await;
    let local = agent.local_api();
    let before = local_status(&local).await.expect("status");

    let pki = broker.pki();
    let ca = pki.load_ca().expect("CA");
    let identity = ca
        .issue_controller("test")
        .expect("controller:test certificate");
    let ca_pem = std::fs::read(pki.ca_cert()).expect("ca.crt");
    let tls = tls_config(&ca_pem, Some(&identity)).expect("TLS config");
    let client = MqttClient::connect(broker.mqtt_addr(), "controller:test", tls)
        .await
        .expect("connect")
        .accepted()
        .expect("a controller certificate is accepted");
    let device = DeviceId::new("forge-1").expect("id");
    let mut down = Downlink { client, device };
    let results = Topic::for_device(&down.device, Channel::CommandResult).to_string();
    down.client
        .subscribe(&results)
        .await
        .expect("subscribe up/res");

    let real_pem = std::fs::read_to_string(pki.command_key()).expect("command.key");
    let real = CommandKey::from_pem(&real_pem).expect("the controller's command key");
    let rogue = CommandKey::generate();

    // A key the terminal does not trust.
    let cmd = command("forge-1", lock_body(100));
    down.publish(&rogue.sign(&cmd)).await;
    assert_rejected(&down.result(&cmd.id).await, "unknown_key");

    // The real key id, another key's signature.
    let cmd = command("forge-1", lock_body(101));
    let mut signed = rogue.sign(&cmd);
    signed.key_id = real.key_id().to_owned();
    down.publish(&signed).await;
    assert_rejected(&down.result(&cmd.id).await, "bad_signature");

    // Correctly signed bytes, tampered with after signing.
    let cmd = command("forge-1", lock_body(102));
    let mut signed = real.sign(&cmd);
    let mut tampered = cmd.clone();
    tampered.body = lock_body(103);
    signed.command = tampered.encode_to_vec();
    down.publish(&signed).await;
    assert_rejected(&down.result(&cmd.id).await, "bad_signature");

    // Validly signed, for another terminal.
    let cmd = command("forge-2", lock_body(104));
    down.publish(&real.sign(&cmd)).await;
    assert_rejected(&down.result(&cmd.id).await, "wrong_device");

    // Expired.
    let mut cmd = command("forge-1", lock_body(105));
    cmd.issued_at_ms -= 120_000;
    cmd.not_after_ms = now_ms() - 60_000;
    down.publish(&real.sign(&cmd)).await;
    assert_rejected(&down.result(&cmd.id).await, "expired");

    // No body.
    let cmd = command("forge-1", None);
    down.publish(&real.sign(&cmd)).await;
    assert_rejected(&down.result(&cmd.id).await, "unknown_kind");

    // Nothing changed on the terminal; no hook ran.
    let after = local_status(&local).await.expect("status");
    for key in ["locked", "lock_generation", "lock_reason", "config_version"] {
        assert_eq!(after[key], before[key], "{key}: {before} -> {after}");
    }
    assert_eq!(marker_lines(&locks), Vec::<String>::new());

    // A valid command runs once; its replay gets the stored result and does not act again.
    let cmd = command("forge-1", lock_body(7));
    let signed = real.sign(&cmd);
    down.publish(&signed).await;
    let first = down.final_result(&cmd.id).await;
    assert_eq!(first.status(), pb::CommandStatus::Succeeded, "{first:?}");
    let status = local_status(&local).await.expect("status");
    assert_eq!(
        (&status["locked"], &status["lock_generation"]),
        (&json!(true), &json!(7)),
        "{status}"
    );
    down.publish(&signed).await;
    let again = down.final_result(&cmd.id).await;
    assert_eq!(again, first, "the stored result, unchanged");
    assert_eq!(marker_lines(&locks), ["7"], "the lock hook ran once");
    // A re-signed copy with the same id (a re-send) is a replay too.
    let resent = real.sign(&cmd);
    down.publish(&resent).await;
    assert_eq!(down.final_result(&cmd.id).await, first);
    // An older generation with a new id is stale.
    let old = command(
        "forge-1",
        Some(Body::Unlock(pb::Unlock {
            reason: "older".into(),
            generation: 6,
        })),
    );
    down.publish(&real.sign(&old)).await;
    assert_rejected(&down.final_result(&old.id).await, "stale");
    let status: Value = local_status(&local).await.expect("status");
    assert_eq!(status["locked"], json!(true), "{status}");
    assert_eq!(marker_lines(&locks), ["7"]);
}
