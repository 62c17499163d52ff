//! Terminals and the broker stopping, crashing and coming back.

use posfleet_broker::views::FleetEvent;
use posfleet_tests::api::EventStream;
use posfleet_tests::{Posctl, eventually};

use crate::support::{WAIT, agent, broker, heartbeat_seq, heartbeats_after, offline, online};

/// The next presence event on the stream: (online, reason). Other events are skipped.
async fn next_presence(stream: &mut EventStream) -> (bool, Option<String>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match stream.next(left).await {
            Ok(FleetEvent::Presence { online, reason, .. }) => return (online, reason),
            Ok(_) => {}
            Err(error) => panic!("waiting for a presence event: {error:#}"),
        }
    }
}

#[tokio::test]
async fn a_killed_terminal_goes_offline_at_once_and_comes_back_when_restarted() {
    let broker = broker().await;
    let api = broker.api();
    let mut terminal = agent(&broker, "pos-kill");
    let before = online(api, "pos-kill").await;
    let boot = before.last_heartbeat.as_ref().expect("heartbeat").boot_id;
    // What a dashboard following the live stream sees.
    let mut stream = api.stream(Some("pos-kill")).await.expect("live stream");

    terminal.kill9().await.expect("SIGKILL");
    // The edge publishes the terminal's last will as soon as the connection drops; the
    // controller would only notice missed heartbeats (reason "missed_heartbeats") later.
    let gone = offline(api, "pos-kill").await;
    assert_eq!(
        gone.summary.offline_reason.as_deref(),
        Some("connection_lost"),
        "{gone:?}"
    );

    assert_eq!(
        next_presence(&mut stream).await,
        (false, Some("connection_lost".to_owned()))
    );

    terminal.restart().expect("restart");
    assert_eq!(next_presence(&mut stream).await, (true, None));
    let back = online(api, "pos-kill").await;
    assert_eq!(back.summary.offline_reason, None);
    let hb = eventually(WAIT, || async {
        let device = api.device("pos-kill").await?;
        let hb = device.and_then(|d| d.last_heartbeat);
        match hb {
            Some(hb) if hb.boot_id != boot => Ok(hb),
            other => anyhow::bail!("no heartbeat from the new agent process yet: {other:?}"),
        }
    })
    .await;
    heartbeats_after(api, "pos-kill", hb.seq).await;
}

#[tokio::test]
async fn a_terminated_terminal_says_goodbye() {
    let broker = broker().await;
    let api = broker.api();
    let mut terminal = agent(&broker, "pos-term");
    let mut neighbour = agent(&broker, "pos-neighbour");
    online(api, "pos-term").await;
    online(api, "pos-neighbour").await;

    let status = terminal.terminate().await.expect("SIGTERM");
    assert!(status.success(), "pf-agent exits 0 on SIGTERM: {status}");
    let gone = offline(api, "pos-term").await;
    assert_eq!(
        gone.summary.offline_reason.as_deref(),
        Some("shutdown"),
        "{gone:?}"
    );

    // Its neighbour is unaffected.
    let seq = heartbeat_seq(api, "pos-neighbour").await;
    heartbeats_after(api, "pos-neighbour", seq).await;
    let status = neighbour.terminate().await.expect("SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn the_broker_keeps_its_registry_across_restarts_and_terminals_reconnect() {
    let mut broker = broker().await;
    let mut stays = agent(&broker, "pos-stays");
    let mut leaves = agent(&broker, "pos-leaves");
    online(broker.api(), "pos-stays").await;
    online(broker.api(), "pos-leaves").await;
    leaves.terminate().await.expect("SIGTERM agent");
    offline(broker.api(), "pos-leaves").await;

    // Graceful stop: exit 0, and everything it knew is on disk.
    let status = broker.terminate().await.expect("SIGTERM broker");
    assert!(status.success(), "pf-broker exits 0 on SIGTERM: {status}");
    broker.restart().await.expect("restart after SIGTERM");
    let api = broker.api().clone();
    let left = api
        .device("pos-leaves")
        .await
        .expect("GET device")
        .expect("pos-leaves is still registered after a restart");
    assert!(!left.summary.online);
    assert_eq!(left.summary.offline_reason.as_deref(), Some("shutdown"));
    // The other terminal reconnects by itself and reports again.
    let seq = heartbeat_seq(&api, "pos-stays").await;
    heartbeats_after(&api, "pos-stays", seq).await;

    // A crash: SIGKILL, then start again on the same data directory.
    broker.kill9().await.expect("SIGKILL broker");
    assert!(
        api.healthz().await.is_err(),
        "the API must be down while the broker is"
    );
    broker.restart().await.expect("restart after SIGKILL");
    let api = broker.api().clone();
    let seq = heartbeat_seq(&api, "pos-stays").await;
    heartbeats_after(&api, "pos-stays", seq).await;
    online(&api, "pos-stays").await;
    assert!(api.device("pos-leaves").await.expect("GET").is_some());

    // posctl finds the restarted broker through the rewritten posctl.json.
    let out = Posctl::new(&broker)
        .ok(&["devices", "list"])
        .await
        .expect("posctl after restart");
    assert!(out.stdout.contains("2 devices, 1 online"), "{out}");

    stays.terminate().await.expect("SIGTERM agent");
    let status = broker.terminate().await.expect("SIGTERM broker");
    assert!(status.success(), "{status}");
}
