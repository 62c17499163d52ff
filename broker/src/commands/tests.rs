//! The command plane's worker driven through ingest (encoded uplinks) and its handle, with a
//! recording downlink, a fake configuration store and a controlled clock.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::signing::{CommandKey, KeyRing};
use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::controller::Ingest;
use crate::events::EventSubscription;
use crate::fleetconfig::{ConfigSourceError, EffectiveConfig};
use crate::metrics::ReasonLabel;
use crate::views::{CommandBody, CommandState, FleetEvent};

/// Layers by name (`fleet`, `group/G`, `device/ID`) → version; the document says which.
#[derive(Default)]
pub(crate) struct FakeConfig {
    layers: Mutex<BTreeMap<String, u64>>,
    changes: watch::Sender<u64>,
}

impl FakeConfig {
    pub(crate) fn set(&self, layer: &str, version: u64) {
        self.layers.lock().unwrap().insert(layer.into(), version);
        self.changes.send_modify(|n| *n += 1);
    }
}

impl ConfigSource for FakeConfig {
    fn effective(&self, device: &DeviceId, groups: &BTreeSet<String>) -> EffectiveConfig {
        let layers = self.layers.lock().unwrap();
        let mut names = vec!["fleet".to_owned(), format!("device/{device}")];
        names.extend(groups.iter().map(|g| format!("group/{g}")));
        let version = names.iter().filter_map(|n| layers.get(n)).max().copied();
        let mut document = serde_json::Map::new();
        document.insert("v".into(), version.unwrap_or(0).into());
        EffectiveConfig {
            version: version.unwrap_or(0),
            document,
        }
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
    fn touch_membership(&self, _: &DeviceId, _: &str) -> Result<u64, ConfigSourceError> {
        Ok(0)
    }
}

/// Records what would be published.
#[derive(Default)]
pub(crate) struct Recorder {
    sent: Mutex<Vec<(DeviceId, pb::SignedCommand)>>,
    busy: AtomicBool,
}

impl Downlink for Recorder {
    fn send(&self, device: &DeviceId, signed: &pb::SignedCommand) -> Result<(), DownlinkError> {
        if self.busy.load(Ordering::SeqCst) {
            return Err(DownlinkError::Busy);
        }
        self.sent
            .lock()
            .unwrap()
            .push((device.clone(), signed.clone()));
        Ok(())
    }
}

/// A plane over `dir` with no configuration (for tests of other modules).
pub(crate) fn plane(dir: &Path) -> CommandPlane {
    let store = Arc::new(CommandStore::open(&dir.join("commands"), 1 << 20).unwrap());
    CommandPlane::load(
        CommandsConfig::new(dir.join("logs")),
        store,
        Arc::new(CommandKey::generate()),
        Arc::new(FakeConfig::default()),
    )
    .unwrap()
}

const T0: u64 = 1_800_000_000_000;

struct Harness {
    dir: tempfile::TempDir,
    key: Arc<CommandKey>,
    config: Arc<FakeConfig>,
    recorder: Arc<Recorder>,
    now: Arc<AtomicU64>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    ingest: Ingest,
    handle: CommandsHandle,
    events: EventSubscription,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

fn cfg(dir: &Path) -> CommandsConfig {
    CommandsConfig {
        resend_interval: Duration::from_secs(30),
        lease_interval: Duration::from_secs(300),
        tick: Duration::from_millis(10),
        ..CommandsConfig::new(dir.join("logs"))
    }
}

impl Harness {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(crate::registry::RegistryConfig {
            cache_capacity: 1 << 20,
            ..crate::registry::RegistryConfig::new(dir.path().join("registry"))
        })
        .unwrap();
        Self::start_with(
            dir,
            registry,
            Arc::new(CommandKey::generate()),
            Arc::new(FakeConfig::default()),
        )
    }

    fn start_with(
        dir: tempfile::TempDir,
        registry: Arc<Registry>,
        key: Arc<CommandKey>,
        config: Arc<FakeConfig>,
    ) -> Self {
        let store = Arc::new(CommandStore::open(&dir.path().join("commands"), 1 << 20).unwrap());
        let plane =
            CommandPlane::load(cfg(dir.path()), store, Arc::clone(&key), config.clone()).unwrap();
        let now = Arc::new(AtomicU64::new(T0));
        let clock_now = Arc::clone(&now);
        let clock: Clock = Arc::new(move || clock_now.load(Ordering::SeqCst));
        let recorder = Arc::new(Recorder::default());
        let events = EventBus::new(1024);
        let sub = events.subscribe();
        let metrics = Arc::new(Metrics::new());
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let (handle, inbox) = plane.spawn(
            recorder.clone(),
            Arc::clone(&registry),
            events.clone(),
            Arc::clone(&metrics),
            clock,
            &tracker,
            cancel.clone(),
        );
        let ingest =
            Ingest::new(Arc::clone(&registry), events, Arc::clone(&metrics)).with_commands(inbox);
        Self {
            dir,
            key,
            config,
            recorder,
            now,
            registry,
            metrics,
            ingest,
            handle,
            events: sub,
            tracker,
            cancel,
        }
    }

    /// Stops the worker and starts a new one on the same store, registry and key.
    async fn restart(self) -> Self {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .expect("the plane stops");
        let Harness {
            dir,
            key,
            config,
            registry,
            handle,
            ingest,
            ..
        } = self;
        drop((handle, ingest));
        Self::start_with(dir, registry, key, config)
    }

    fn feed(&self, device: &str, channel: Channel, payload: &[u8]) {
        let topic = Topic::for_device(&DeviceId::new(device).unwrap(), channel);
        self.ingest
            .handle(&topic, payload, self.now.load(Ordering::SeqCst))
            .unwrap();
    }

    fn online(&self, device: &str) {
        let msg = pb::Presence {
            state: pb::PresenceState::Online as i32,
            at_ms: self.now.load(Ordering::SeqCst),
            model: "A920".into(),
            ..Default::default()
        };
        self.feed(device, Channel::Presence, &encode(&msg).unwrap());
    }

    fn offline(&self, device: &str) {
        let msg = pb::Presence {
            state: pb::PresenceState::Offline as i32,
            at_ms: self.now.load(Ordering::SeqCst) + 1,
            reason: "shutdown".into(),
            ..Default::default()
        };
        self.feed(device, Channel::Presence, &encode(&msg).unwrap());
    }

    fn heartbeat(&self, device: &str, config_version: u64, locked: bool, generation: u64) {
        let msg = pb::Heartbeat {
            seq: 1,
            interval_s: 10,
            config_version,
            locked,
            lock_generation: generation,
            ..Default::default()
        };
        self.feed(device, Channel::Heartbeat, &encode(&msg).unwrap());
    }

    fn result(&self, device: &str, id: &str, status: pb::CommandStatus) {
        let msg = pb::CommandResult {
            command_id: id.into(),
            status: status as i32,
            ..Default::default()
        };
        self.feed(device, Channel::CommandResult, &encode(&msg).unwrap());
    }

    fn advance(&self, by: Duration) {
        self.now
            .fetch_add(u64::try_from(by.as_millis()).unwrap(), Ordering::SeqCst);
    }

    /// Verified commands sent so far (leases included), in order.
    fn sent(&self) -> Vec<pb::Command> {
        let ring = KeyRing::new(vec![self.key.public_key().clone()]);
        self.recorder
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|(device, signed)| {
                // Checked at the time it was sent (issued).
                let issued = pb::Command::decode(signed.command.as_slice())
                    .unwrap()
                    .issued_at_ms;
                ring.verify(signed, device, issued)
                    .unwrap_or_else(|e| panic!("a badly signed command: {e:?}"))
            })
            .collect()
    }

    /// Sent commands that are not leases.
    fn sent_commands(&self) -> Vec<pb::Command> {
        self.sent()
            .into_iter()
            .filter(|c| !matches!(c.body, Some(pb::command::Body::Lease(_))))
            .collect()
    }

    fn leases(&self) -> usize {
        self.sent().len() - self.sent_commands().len()
    }

    async fn create(&self, action: Action, devices: &[&str]) -> Vec<crate::views::CommandView> {
        self.handle
            .create(CreateRequest {
                action,
                devices: devices.iter().map(|d| DeviceId::new(*d).unwrap()).collect(),
                author: AUTHOR_ADMIN.into(),
                ttl: Duration::from_secs(3600),
            })
            .await
            .unwrap()
    }

    fn stored(&self, id: &str) -> crate::views::CommandView {
        self.handle.store().get(id).unwrap().unwrap()
    }

    fn dropped(&self, reason: &'static str) -> u64 {
        self.metrics
            .command_results_dropped_total
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    fn refused_chunks(&self, reason: &'static str) -> u64 {
        self.metrics
            .command_log_chunks_refused_total
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    fn command_events(&mut self) -> Vec<(String, CommandState)> {
        std::iter::from_fn(|| self.events.try_recv())
            .filter_map(|e| match e {
                FleetEvent::Command { id, status, .. } => Some((id, status)),
                _ => None,
            })
            .collect()
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    // Only a hang reaches this bound (the machine may be loaded).
    tokio::time::timeout(Duration::from_secs(30), async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn commands_are_signed_sent_when_online_and_results_move_them_forward() {
    let mut h = Harness::start();
    h.online("T-1");
    h.heartbeat("T-2", 0, false, 0);
    h.offline("T-2");
    let created = h.create(Action::Reboot, &["T-1", "T-2"]).await;
    assert_eq!(created.len(), 2);
    // Durable before the answer.
    assert_eq!(h.stored(&created[0].id).status, CommandState::Queued);
    eventually("the online device's command", || {
        h.sent_commands().len() == 1
    })
    .await;
    let sent = h.sent_commands();
    assert_eq!(sent[0].id, created[0].id);
    assert_eq!(sent[0].target_device, "T-1");
    assert!(matches!(sent[0].body, Some(pb::command::Body::Reboot(_))));

    h.result("T-1", &created[0].id, pb::CommandStatus::InProgress);
    h.result("T-1", &created[0].id, pb::CommandStatus::Succeeded);
    eventually("succeeded", || {
        h.stored(&created[0].id).status == CommandState::Succeeded
    })
    .await;
    let c = h.stored(&created[0].id);
    let statuses: Vec<_> = c.history.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            CommandState::Queued,
            CommandState::Delivered,
            CommandState::InProgress,
            CommandState::Succeeded
        ]
    );
    assert_eq!(c.attempts, 1);
    // A result after the final one changes nothing.
    h.result("T-1", &created[0].id, pb::CommandStatus::Failed);
    // Forged: another device answering for T-2's command; and an unknown id.
    h.result("T-1", &created[1].id, pb::CommandStatus::Succeeded);
    h.result("T-1", "0123456789abcdef", pb::CommandStatus::Succeeded);
    eventually("dropped results counted", || {
        h.dropped("unknown_or_final") == 2 && h.dropped("wrong_device") == 1
    })
    .await;
    assert_eq!(h.stored(&created[0].id).status, CommandState::Succeeded);
    assert_eq!(h.stored(&created[1].id).status, CommandState::Queued);
    let events = h.command_events();
    assert!(events.contains(&(created[0].id.clone(), CommandState::Succeeded)));
    assert!(events.contains(&(created[1].id.clone(), CommandState::Queued)));

    // T-2 comes online: its pending command goes out (with a lease first).
    h.online("T-2");
    eventually("T-2's command", || h.sent_commands().len() == 2).await;
    assert_eq!(h.sent_commands()[1].id, created[1].id);
    assert!(h.leases() >= 2);
}

#[tokio::test]
async fn pending_commands_are_resent_then_expire() {
    let mut h = Harness::start();
    h.online("T-1");
    let c = h.create(Action::Wipe { force: true }, &["T-1"]).await;
    eventually("first send", || h.sent_commands().len() == 1).await;
    h.advance(Duration::from_secs(31));
    eventually("a re-send", || h.sent_commands().len() == 2).await;
    assert_eq!(h.sent_commands()[1].id, c[0].id);
    // Nothing more before the next interval.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.sent_commands().len(), 2);
    h.advance(Duration::from_secs(3600));
    eventually("expired", || {
        h.stored(&c[0].id).status == CommandState::Expired
    })
    .await;
    assert!(
        h.command_events()
            .contains(&(c[0].id.clone(), CommandState::Expired))
    );
    let sent = h.sent_commands().len();
    h.advance(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        h.sent_commands().len(),
        sent,
        "an expired command is not sent"
    );
}

#[tokio::test]
async fn pending_commands_survive_a_restart_and_go_out_when_the_device_returns() {
    let h = Harness::start();
    h.heartbeat("T-1", 0, false, 0);
    h.offline("T-1");
    let c = h
        .create(
            Action::CollectLogs {
                since_ms: 5,
                max_bytes: 100,
            },
            &["T-1"],
        )
        .await;
    assert!(h.sent_commands().is_empty());
    let h = h.restart().await;
    assert_eq!(h.stored(&c[0].id).status, CommandState::Queued);
    h.online("T-1");
    eventually("the command after the restart", || {
        h.sent_commands().len() == 1
    })
    .await;
    let sent = &h.sent_commands()[0];
    assert_eq!(sent.id, c[0].id);
    assert!(matches!(
        sent.body,
        Some(pb::command::Body::CollectLogs(pb::CollectLogs {
            since_ms: 5,
            max_bytes: 100
        }))
    ));
}

#[tokio::test]
async fn lock_sets_desired_state_and_reconciliation_reissues_without_duplicates() {
    let h = Harness::start();
    h.online("T-1");
    let lock = h
        .create(
            Action::Lock {
                reason: "stolen".into(),
            },
            &["T-1"],
        )
        .await;
    let CommandBody::Lock { generation, .. } = lock[0].body else {
        panic!("not a lock");
    };
    assert_eq!(generation, 1);
    let desired = h.handle.desired(&DeviceId::new("T-1").unwrap());
    assert_eq!(
        desired.lock.as_ref().map(|l| (l.locked, l.generation)),
        Some((true, 1))
    );
    eventually("lock sent", || h.sent_commands().len() == 1).await;
    // The terminal still reports generation 0: the live lock carries the change.
    h.heartbeat("T-1", 0, false, 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        h.handle
            .store()
            .list(
                &CommandQuery {
                    limit: 10,
                    ..Default::default()
                },
                None
            )
            .unwrap()
            .items
            .len(),
        1
    );
    // The lock expires unapplied (terminal offline for a day); it reports gen 0 again.
    h.advance(Duration::from_secs(2 * 3600));
    eventually("expired", || {
        h.stored(&lock[0].id).status == CommandState::Expired
    })
    .await;
    h.heartbeat("T-1", 0, false, 0);
    eventually("a new lock", || {
        h.sent_commands().iter().any(|c| {
            c.id != lock[0].id
                && matches!(
                    c.body,
                    Some(pb::command::Body::Lock(pb::Lock { generation: 1, .. }))
                )
        })
    })
    .await;
    let page = h
        .handle
        .store()
        .list(
            &CommandQuery {
                limit: 10,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(page.items.len(), 2);
    assert_eq!(page.items[0].author, AUTHOR_RECONCILER);
    // Applied: nothing more is issued.
    h.heartbeat("T-1", 0, true, 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        h.handle
            .store()
            .list(
                &CommandQuery {
                    limit: 10,
                    ..Default::default()
                },
                None
            )
            .unwrap()
            .items
            .len(),
        2
    );
    // Unlock raises the generation again.
    let unlock = h
        .create(
            Action::Unlock {
                reason: "found".into(),
            },
            &["T-1"],
        )
        .await;
    assert!(matches!(
        unlock[0].body,
        CommandBody::Unlock { generation: 2, .. }
    ));
}

#[tokio::test]
async fn a_configuration_change_pushes_only_to_affected_devices_and_supersedes() {
    let h = Harness::start();
    for d in ["T-a", "T-b"] {
        h.online(d);
        h.heartbeat(d, 0, false, 0);
    }
    assert!(
        h.registry
            .set_groups(&DeviceId::new("T-a").unwrap(), ["pilot".to_owned()].into())
    );
    h.config.set("group/pilot", 5);
    eventually("a push to T-a", || h.sent_commands().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sent = h.sent_commands();
    assert_eq!(sent.len(), 1, "T-b is not affected");
    assert_eq!(sent[0].target_device, "T-a");
    let Some(pb::command::Body::ConfigPush(push)) = &sent[0].body else {
        panic!("not a push");
    };
    assert_eq!(push.version, 5);
    assert_eq!(push.document_json, r#"{"v":5}"#);
    h.config.set("group/pilot", 6);
    eventually("the newer push", || h.sent_commands().len() == 2).await;
    eventually("the older push superseded", || {
        h.stored(&sent[0].id).status == CommandState::Cancelled
    })
    .await;
    // A heartbeat reporting the old version does not duplicate the live push.
    h.heartbeat("T-a", 5, false, 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.sent_commands().len(), 2);
}

#[tokio::test]
async fn a_push_the_terminal_fails_is_retried_with_backoff_not_at_every_heartbeat() {
    let h = Harness::start();
    h.online("T-1");
    h.heartbeat("T-1", 0, false, 0);
    h.config.set("fleet", 5);
    eventually("the push", || h.sent_commands().len() == 1).await;
    let first = h.sent_commands()[0].id.clone();
    h.result("T-1", &first, pb::CommandStatus::Failed);
    eventually("failed", || h.stored(&first).status == CommandState::Failed).await;
    // Heartbeats still report the old version: no new push before the backoff (30 s).
    for _ in 0..3 {
        h.advance(Duration::from_secs(9));
        h.heartbeat("T-1", 0, false, 0);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        h.sent_commands().len(),
        1,
        "pushed again within the backoff"
    );
    h.advance(Duration::from_secs(4));
    h.heartbeat("T-1", 0, false, 0);
    eventually("pushed again after 30 s", || h.sent_commands().len() == 2).await;
    let second = h.sent_commands()[1].id.clone();
    h.result("T-1", &second, pb::CommandStatus::Rejected);
    eventually("rejected", || {
        h.stored(&second).status == CommandState::Rejected
    })
    .await;
    // The second failure doubles the wait.
    h.advance(Duration::from_secs(45));
    h.heartbeat("T-1", 0, false, 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.sent_commands().len(), 2, "the backoff doubled");
    // A newer configuration goes out at once; its success ends the backoff.
    h.config.set("fleet", 6);
    eventually("the newer version", || h.sent_commands().len() == 3).await;
    let third = h.sent_commands()[2].id.clone();
    h.result("T-1", &third, pb::CommandStatus::Succeeded);
    eventually("succeeded", || {
        h.stored(&third).status == CommandState::Succeeded
    })
    .await;
    h.heartbeat("T-1", 6, false, 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.sent_commands().len(), 3);
}

#[test]
fn push_backoff_doubles_up_to_the_cap() {
    let base = Duration::from_secs(30);
    assert_eq!(super::plane::push_backoff(base, 1), base);
    assert_eq!(super::plane::push_backoff(base, 2), base * 2);
    assert_eq!(super::plane::push_backoff(base, 4), base * 8);
    assert_eq!(
        super::plane::push_backoff(base, 40),
        Duration::from_secs(3600)
    );
    assert_eq!(
        super::plane::push_backoff(Duration::from_secs(7200), 3),
        Duration::from_secs(7200),
        "never shorter than the base"
    );
}

#[tokio::test]
async fn leases_go_out_at_online_and_on_heartbeats_after_the_interval() {
    let h = Harness::start();
    h.online("T-1");
    eventually("a lease at online", || h.leases() == 1).await;
    h.heartbeat("T-1", 0, false, 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.leases(), 1);
    h.advance(Duration::from_secs(301));
    h.heartbeat("T-1", 0, false, 0);
    eventually("a lease after the interval", || h.leases() == 2).await;
    let lease = h.sent().into_iter().last().unwrap();
    assert!(lease.not_after_ms <= h.now.load(Ordering::SeqCst) + 600_000);
    assert_eq!(h.metrics.command_leases_sent_total.get(), 2);
}

#[tokio::test]
async fn log_chunks_are_stored_in_order_and_bad_ones_refused() {
    let h = Harness::start();
    h.online("T-1");
    h.online("T-2");
    let logs = h
        .create(
            Action::CollectLogs {
                since_ms: 0,
                max_bytes: 10,
            },
            &["T-1"],
        )
        .await;
    let reboot = h.create(Action::Reboot, &["T-1"]).await;
    let chunk = |id: &str, offset: u64, data: &[u8], last: bool| {
        pb::LogChunk {
            command_id: id.into(),
            offset,
            data: data.to_vec(),
            last,
            total_bytes: 0,
        }
        .encode_to_vec()
    };
    let id = &logs[0].id;
    h.feed("T-1", Channel::LogChunk, &chunk(id, 0, b"hello", false));
    h.feed("T-1", Channel::LogChunk, &chunk(id, 9, b"x", false));
    h.feed("T-1", Channel::LogChunk, &chunk(id, 5, b"toolong", false));
    h.feed("T-2", Channel::LogChunk, &chunk(id, 5, b"!", false));
    h.feed("T-1", Channel::LogChunk, &chunk("feedbeef", 0, b"x", false));
    h.feed(
        "T-1",
        Channel::LogChunk,
        &chunk(&reboot[0].id, 0, b"x", false),
    );
    h.feed("T-1", Channel::LogChunk, &chunk(id, 5, b" you", true));
    eventually("the upload complete", || h.stored(id).logs_complete).await;
    assert_eq!(h.refused_chunks("out_of_order"), 1);
    assert_eq!(h.refused_chunks("too_large"), 1);
    assert_eq!(h.refused_chunks("wrong_device"), 1);
    assert_eq!(h.refused_chunks("unknown_or_final"), 1);
    assert_eq!(h.refused_chunks("not_logs"), 1);
    let file = h.dir.path().join("logs").join(id);
    assert_eq!(std::fs::read(file).unwrap(), b"hello you");
    assert_eq!(h.stored(id).log_bytes, Some(9));
}

#[tokio::test]
async fn cancel_stops_a_pending_command_but_not_a_lock_or_a_final_one() {
    let h = Harness::start();
    h.heartbeat("T-1", 0, false, 0);
    let reboot = h.create(Action::Reboot, &["T-1"]).await;
    let lock = h
        .create(Action::Lock { reason: "x".into() }, &["T-1"])
        .await;
    let cancelled = h.handle.cancel(&reboot[0].id).await.unwrap();
    assert_eq!(cancelled.status, CommandState::Cancelled);
    assert_eq!(h.stored(&reboot[0].id).status, CommandState::Cancelled);
    assert_eq!(
        h.handle.cancel(&reboot[0].id).await,
        Err(CancelError::Final)
    );
    assert_eq!(
        h.handle.cancel(&lock[0].id).await,
        Err(CancelError::LockUnlock)
    );
}

#[tokio::test]
async fn a_busy_session_delays_sends_to_later_ticks() {
    let h = Harness::start();
    h.online("T-1");
    h.recorder.busy.store(true, Ordering::SeqCst);
    let c = h.create(Action::Reboot, &["T-1"]).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(h.sent_commands().is_empty());
    h.recorder.busy.store(false, Ordering::SeqCst);
    eventually("sent on a later tick", || h.sent_commands().len() == 1).await;
    assert_eq!(h.sent_commands()[0].id, c[0].id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_wide_change_reaches_ten_thousand_devices_once_each() {
    let h = Harness::start();
    for i in 0..10_000 {
        h.heartbeat(&format!("T-{i:05}"), 0, false, 0);
    }
    let queued = || {
        h.metrics
            .commands_status_total
            .get_or_create(&crate::metrics::StatusLabel { status: "queued" })
            .get()
    };
    h.config.set("fleet", 1);
    // Only a hang (or something quadratic) reaches this bound; how long it takes is a figure
    // for `fleet-bench commands` (config convergence, docs/benchmarks.md), not an assertion
    // on a shared machine.
    tokio::time::timeout(Duration::from_secs(120), async {
        while queued() < 10_000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("10,000 pushes created");
    assert_eq!(queued(), 10_000, "exactly one push per device");
    // Sends are spread over ticks, never more than the budget per tick.
    let sent = h.sent_commands().len();
    assert!(sent <= 10_000);
}
