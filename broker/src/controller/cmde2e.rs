//! End to end through the real process: `app::start` and a terminal's own MQTT session. A
//! command created through the command plane arrives on `down/cmd` signed with the key in
//! `DATA/pki/command.key` (verified against `command.pub`, as an agent would), after a
//! lease; the terminal's result moves it to `succeeded`.

use std::time::Duration;

use posfleet_proto::pki::read_public_keys;
use posfleet_proto::signing::KeyRing;
use posfleet_proto::{Channel, DeviceId, Topic, decode, encode, pb};
use posfleet_runtime::mqtt::{QoS, SessionEvent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::e2e_support::terminal_session;
use crate::app::{SHUTDOWN_GRACE, ServeOptions, start};
use crate::commands::{Action, CreateRequest};
use crate::views::CommandState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_receives_a_signed_command_and_its_result_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions::loopback(tmp.path().join("data"));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let running = start(&opts, &tracker, cancel.clone()).await.unwrap();

    let pki = crate::datadir::DataDir::at(&opts.data_dir).pki();
    let ring = KeyRing::new(read_public_keys(&pki.command_public_key()).unwrap());
    let device = DeviceId::new("T-cmd").unwrap();
    let (mqtt, mut inbox) = terminal_session(&opts, &running, &device, &tracker, &cancel);
    let presence = pb::Presence {
        state: pb::PresenceState::Online as i32,
        at_ms: posfleet_proto::now_ms(),
        ..Default::default()
    };
    let up = |channel| Topic::for_device(&device, channel);

    let mut created = None;
    let command = tokio::time::timeout(Duration::from_secs(20), async {
        let mut leases = 0;
        loop {
            match tokio::time::timeout(Duration::from_millis(500), inbox.recv()).await {
                Ok(Some(SessionEvent::Connected { .. })) => {
                    mqtt.publish(
                        &up(Channel::Presence),
                        encode(&presence).unwrap(),
                        QoS::AtLeastOnce,
                    )
                    .await
                    .unwrap();
                }
                Ok(Some(SessionEvent::Message { topic, payload }))
                    if topic.channel() == Channel::Command =>
                {
                    let signed = decode::<pb::SignedCommand>(&payload).unwrap();
                    let cmd = ring
                        .verify(&signed, &device, posfleet_proto::now_ms())
                        .unwrap();
                    match cmd.body {
                        Some(pb::command::Body::Lease(_)) => leases += 1,
                        _ => return (cmd, leases),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("the terminal's session ended"),
                Err(_) => {}
            }
            // Once the controller knows the terminal is online, ask for a reboot.
            if created.is_none() && running.registry.is_online(&device) {
                let req = CreateRequest {
                    action: Action::Reboot,
                    devices: vec![device.clone()],
                    author: "admin".into(),
                    ttl: Duration::from_secs(60),
                };
                created = Some(running.commands.create(req).await.unwrap().remove(0));
            }
        }
    })
    .await
    .expect("a signed command arrives");
    let (cmd, leases) = command;
    let created = created.unwrap();
    assert_eq!(cmd.id, created.id);
    assert!(matches!(cmd.body, Some(pb::command::Body::Reboot(_))));
    assert!(leases >= 1, "a lease comes at ONLINE");

    let result = pb::CommandResult {
        command_id: cmd.id.clone(),
        status: pb::CommandStatus::Succeeded as i32,
        at_ms: posfleet_proto::now_ms(),
        ..Default::default()
    };
    mqtt.publish(
        &up(Channel::CommandResult),
        encode(&result).unwrap(),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let stored = running.commands.store().get(&cmd.id).unwrap().unwrap();
            if stored.status == CommandState::Succeeded {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the result is recorded");

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .expect("everything stops");
}
