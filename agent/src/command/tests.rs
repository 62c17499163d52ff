//! The command executor inside a real agent against the fake broker (mTLS on loopback),
//! with a real state store and outbox in a temp dir and hook scripts that record their runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use posfleet_proto::pb::{self, command::Body};
use posfleet_proto::signing::{CommandKey, KeyRing, MAX_CLOCK_SKEW_MS};
use posfleet_proto::{DeviceId, LOG_CHUNK_MAX_DATA, decode, encode, now_ms};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::hooks::tests::script;
use super::*;
use crate::agent::{Agent, AgentHandle, AgentSettings};
use crate::api::{ApiState, LocalApi, LocalApiSettings};
use crate::outbox::Outbox;
use crate::state::{DEFAULT_STATE_CACHE_CAPACITY, JournalStatus, StateStore};
use crate::telemetry::{SimulatedSensors, SimulatedSystem};
use crate::transaction::AcceptError;
use crate::transaction::fixtures::sale;
use posfleet_runtime::backoff::Backoff;
use posfleet_runtime::testing::{FakeBroker, Seen, TestPki};
use posfleet_runtime::value::BrokerUrl;

pub(super) const ID: &str = "T-1";
pub(super) const WAIT: Duration = Duration::from_secs(10);

/// One terminal: a running agent, its stores, the key that signs its commands.
pub(super) struct Term {
    pub(super) tmp: tempfile::TempDir,
    pub(super) pki: TestPki,
    pub(super) broker: FakeBroker,
    pub(super) key: CommandKey,
    pub(super) settings: CommandSettings,
    pub(super) store: Option<StateStore>,
    pub(super) outbox: Option<Outbox>,
    /// Identity files a wipe must delete.
    pub(super) identity: Vec<PathBuf>,
    /// Publishes seen but not asked for yet.
    pub(super) pending: Vec<(String, bytes::Bytes)>,
    /// `None` between a stop and a spawn.
    pub(super) handle: Option<AgentHandle>,
    pub(super) tracker: TaskTracker,
    pub(super) cancel: CancellationToken,
}

pub(super) fn id() -> DeviceId {
    DeviceId::new(ID).unwrap()
}

impl Term {
    pub(super) async fn start(adjust: impl FnOnce(&Path, &mut CommandSettings)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key = CommandKey::generate();
        let mut settings = CommandSettings::new(KeyRing::new(vec![key.public_key().clone()]));
        settings.max_offline = None;
        adjust(tmp.path(), &mut settings);
        let pki = TestPki::new();
        let broker = FakeBroker::start(&pki).await;
        let identity = vec![tmp.path().join("device.key"), tmp.path().join("device.crt")];
        for f in &identity {
            std::fs::write(f, "x").unwrap();
        }
        let mut term = Self {
            handle: None,
            pending: Vec::new(),
            tmp,
            pki,
            broker,
            key,
            settings,
            store: None,
            outbox: None,
            identity,
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
        };
        term.spawn().await;
        term
    }

    /// Opens the stores (again) and starts the agent; waits for its first ReportedState.
    pub(super) async fn spawn(&mut self) -> pb::ReportedState {
        let dir = self.tmp.path().to_owned();
        let (store, outbox) = tokio::task::spawn_blocking(move || {
            let store = StateStore::open(&dir.join("state"), DEFAULT_STATE_CACHE_CAPACITY).unwrap();
            let outbox = Outbox::open(&dir.join("outbox"), Default::default()).unwrap();
            (store, outbox)
        })
        .await
        .unwrap();
        let files = TerminalFiles {
            config: self.config_file(),
            identity: self.identity.clone(),
            updates_dir: self.tmp.path().join("updates"),
            update_prefix: String::new(),
            api_socket: None,
        };
        let setup = CommandSetup::load(Arc::new(self.settings.clone()), store.device(&id()), files)
            .unwrap();
        let mut agent_settings = AgentSettings::new(BrokerUrl {
            host: "127.0.0.1".into(),
            port: self.broker.addr.port(),
        });
        agent_settings.heartbeat_interval = Duration::from_secs(3600);
        agent_settings.telemetry_interval = Duration::from_secs(3600);
        agent_settings.backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        };
        let agent = Agent::new(
            id(),
            self.pki.device_tls(ID),
            agent_settings,
            (
                Box::new(SimulatedSystem::new(1)),
                Box::new(SimulatedSensors::new(1)),
            ),
            outbox.device(&id()).unwrap(),
            setup,
        );
        self.tracker = TaskTracker::new();
        self.cancel = CancellationToken::new();
        self.handle = Some(agent.spawn(&self.tracker, self.cancel.clone()).unwrap());
        self.store = Some(store);
        self.outbox = Some(outbox);
        self.state().await
    }

    /// Stops the agent and closes the stores (a restart of the process).
    pub(super) async fn stop(&mut self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .unwrap();
        if let Some(outbox) = self.outbox.take() {
            outbox.close().await;
        }
        self.store = None;
        self.handle = None;
        // What the stopped agent published and nobody asked for.
        self.pending.clear();
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), async {
            Some(self.broker.next().await)
        })
        .await
        {}
    }

    pub(super) fn h(&self) -> &AgentHandle {
        self.handle.as_ref().expect("the agent is running")
    }

    pub(super) fn config_file(&self) -> PathBuf {
        self.tmp.path().join("config.json")
    }

    pub(super) fn store(&self) -> &StateStore {
        self.store.as_ref().unwrap()
    }

    pub(super) fn command(&self, id: &str, body: Body) -> pb::Command {
        let now = now_ms();
        pb::Command {
            id: id.into(),
            target_device: ID.into(),
            issued_at_ms: now,
            not_after_ms: now + 60_000,
            body: Some(body),
        }
    }

    pub(super) fn send_signed(&self, signed: &pb::SignedCommand) {
        self.broker
            .push("posfleet/v1/d/T-1/down/cmd", &encode(signed).unwrap());
    }

    pub(super) fn send(&self, cmd: &pb::Command) -> pb::SignedCommand {
        let signed = self.key.sign(cmd);
        self.send_signed(&signed);
        signed
    }

    /// The next publish on `up/{channel}` (publishes on other channels seen meanwhile are
    /// kept for later calls, so each channel is read in order independently).
    pub(super) async fn next_on(&mut self, channel: &str) -> bytes::Bytes {
        let suffix = format!("/up/{channel}");
        if let Some(i) = self.pending.iter().position(|(t, _)| t.ends_with(&suffix)) {
            return self.pending.remove(i).1;
        }
        loop {
            if let Seen::Publish { topic, payload, .. } = self.broker.next().await {
                if topic.ends_with(&suffix) {
                    return payload;
                }
                self.pending.push((topic, payload));
            }
        }
    }

    pub(super) async fn result(&mut self) -> pb::CommandResult {
        decode(&self.next_on("res").await).unwrap()
    }

    /// The next result that is not IN_PROGRESS.
    pub(super) async fn final_result(&mut self) -> pb::CommandResult {
        loop {
            let r = self.result().await;
            if r.status() != pb::CommandStatus::InProgress {
                return r;
            }
        }
    }

    pub(super) async fn state(&mut self) -> pb::ReportedState {
        decode(&self.next_on("st").await).unwrap()
    }

    pub(super) async fn run(&mut self, id: &str, body: Body) -> pb::CommandResult {
        let cmd = self.command(id, body);
        self.send(&cmd);
        let r = self.final_result().await;
        assert_eq!(r.command_id, id);
        r
    }

    /// GET `path` on the local API (a real Unix socket) of the running agent.
    pub(super) async fn api_get(&self, path: &str) -> serde_json::Value {
        self.api("GET", path, None).await.1
    }

    /// One request to the local API of the running agent: (status code, JSON body).
    pub(super) async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let name = format!("api-{}.sock", rand::random::<u32>());
        let settings = LocalApiSettings::new(self.tmp.path().join(name));
        let api = LocalApi::bind(&settings).unwrap();
        let socket = api.socket_path().to_owned();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        api.serve(ApiState::new(self.h().clone()), &tracker, cancel.clone());
        let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        cancel.cancel();
        tracker.close();
        tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
        let code = answer[9..12].parse().unwrap();
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        (code, serde_json::from_str(body).unwrap())
    }
}

pub(super) fn reason(r: &pb::CommandResult) -> &str {
    r.details.get("reason").map_or("", String::as_str)
}

pub(super) fn lock_body(generation: u64) -> Body {
    lock(generation)
}

fn lock(generation: u64) -> Body {
    Body::Lock(pb::Lock {
        reason: "stolen".into(),
        generation,
    })
}

fn unlock(generation: u64) -> Body {
    Body::Unlock(pb::Unlock {
        reason: "found".into(),
        generation,
    })
}

fn push(version: u64, json: &str) -> Body {
    Body::ConfigPush(pb::ConfigPush {
        version,
        document_json: json.into(),
    })
}

/// Lines in a hook's run log (each run appends one).
pub(super) fn runs(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |t| t.lines().count())
}

/// A hook that appends a line (with `$1`..: the named variables) to `log`, then runs `tail`.
fn recording_hook(dir: &Path, name: &str, log: &Path, tail: &str) -> PathBuf {
    script(
        dir,
        name,
        &format!(
            "echo \"run $POSFLEET_LOCK_REASON $POSFLEET_CONFIG_VERSION\" >> {}\n{tail}",
            log.display()
        ),
    )
}

#[tokio::test]
async fn verification_failures_are_rejected_with_their_reason_and_nothing_runs() {
    let mut t = Term::start(|dir, s| {
        s.hooks.reboot = Some(recording_hook(dir, "reboot", &dir.join("runs"), ""));
    })
    .await;
    let log = t.tmp.path().join("runs");

    // Forged signature.
    let mut signed = t
        .key
        .sign(&t.command("forged", Body::Reboot(pb::Reboot {})));
    signed.signature[5] ^= 0x40;
    t.send_signed(&signed);
    let r = t.result().await;
    assert_eq!(
        (r.command_id.as_str(), r.status()),
        ("forged", pb::CommandStatus::Rejected)
    );
    assert_eq!(reason(&r), "bad_signature");
    assert!(!r.message.is_empty());

    // A key the terminal does not trust.
    let stranger = CommandKey::generate();
    t.send_signed(&stranger.sign(&t.command("stranger", Body::Reboot(pb::Reboot {}))));
    let r = t.result().await;
    assert_eq!(
        (r.command_id.as_str(), reason(&r)),
        ("stranger", "unknown_key")
    );

    // Another device's command.
    let mut other = t.command("other", Body::Reboot(pb::Reboot {}));
    other.target_device = "T-2".into();
    t.send(&other);
    assert_eq!(reason(&t.result().await), "wrong_device");

    // Expired, and issued too far in the future.
    let mut expired = t.command("expired", Body::Reboot(pb::Reboot {}));
    expired.not_after_ms = now_ms() - 1000;
    t.send(&expired);
    assert_eq!(reason(&t.result().await), "expired");
    let mut future = t.command("future", Body::Reboot(pb::Reboot {}));
    future.issued_at_ms = now_ms() + MAX_CLOCK_SKEW_MS + 60_000;
    future.not_after_ms = future.issued_at_ms + 60_000;
    t.send(&future);
    assert_eq!(reason(&t.result().await), "not_yet_valid");

    // A body this agent does not know.
    let mut unknown = t.command("unknown", Body::Reboot(pb::Reboot {}));
    unknown.body = None;
    t.send(&unknown);
    let r = t.result().await;
    assert_eq!(
        (r.command_id.as_str(), reason(&r)),
        ("unknown", "unknown_kind")
    );

    // Not a SignedCommand at all: counted, no result (the next result is the next command's).
    t.broker
        .push("posfleet/v1/d/T-1/down/cmd", &[0x0a, 0xff, 0x01]);
    t.send(&t.command("sw", Body::SoftwareUpdate(pb::SoftwareUpdate::default())));
    let r = t.result().await;
    assert_eq!((r.command_id.as_str(), reason(&r)), ("sw", "refused"));
    assert!(
        r.message.contains("no trusted release key configured"),
        "{}",
        r.message
    );
    let stats = t.h().stats();
    assert_eq!((stats.commands_malformed, stats.commands_rejected), (1, 6));

    assert_eq!(runs(&log), 0, "no rejected command ran its hook");
    assert!(!t.h().live().is_locked());
    t.stop().await;
}

#[tokio::test]
async fn a_replayed_command_gets_its_stored_result_and_never_runs_twice() {
    let mut t = Term::start(|dir, s| {
        s.hooks.reboot = Some(recording_hook(dir, "reboot", &dir.join("runs"), ""));
    })
    .await;
    let log = t.tmp.path().join("runs");
    let signed = t.send(&t.command("rb-1", Body::Reboot(pb::Reboot {})));
    let progress = t.result().await;
    assert_eq!(progress.status(), pb::CommandStatus::InProgress);
    let first = t.final_result().await;
    assert_eq!(first.status(), pb::CommandStatus::Succeeded);
    assert_eq!(runs(&log), 1);

    t.send_signed(&signed);
    let again = t.result().await;
    assert_eq!(again, first, "the stored result, unchanged");
    // Also after a restart (the journal is durable).
    t.stop().await;
    t.spawn().await;
    t.send_signed(&signed);
    assert_eq!(t.result().await, first);
    assert_eq!(runs(&log), 1, "the hook ran once");
    assert_eq!(
        t.h().stats().commands,
        0,
        "nothing executed after the restart"
    );
    t.stop().await;
}

#[tokio::test]
async fn lock_generations_decide_and_locked_terminals_refuse_transactions() {
    let mut t = Term::start(|dir, s| {
        s.hooks.lock = Some(recording_hook(dir, "lock", &dir.join("locks"), ""));
        s.hooks.unlock = Some(recording_hook(
            dir,
            "unlock",
            &dir.join("unlocks"),
            "exit 4",
        ));
    })
    .await;
    let r = t.run("lock-5", lock(5)).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded);
    assert_eq!(r.details["generation"], "5");
    let state = t.state().await;
    assert_eq!(
        (
            state.locked,
            state.lock_reason.as_str(),
            state.lock_generation
        ),
        (true, "stolen", 5)
    );
    assert_eq!(
        std::fs::read_to_string(t.tmp.path().join("locks"))
            .unwrap()
            .trim(),
        "run stolen",
        "the lock hook got the reason"
    );
    assert!(matches!(
        t.h().intake().accept(sale("tx-1", 100)).await,
        Err(AcceptError::Locked)
    ));
    let sale_json = serde_json::to_value(sale("tx-1", 100)).unwrap();
    let (code, body) = t
        .api("POST", "/v1/transactions", Some(sale_json.clone()))
        .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (423, Some("terminal_locked"))
    );
    let status = t.api_get("/v1/status").await;
    assert_eq!(status["locked"], true);
    assert_eq!(status["lock_reason"], "stolen");
    assert_eq!(status["lock_generation"], 5);

    // An older generation is stale, whatever it asks.
    let r = t.run("unlock-3", unlock(3)).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "stale")
    );
    assert!(t.h().live().is_locked());

    // Reordered: unlock 7 arrives before lock 6; lock 6 must not undo it.
    let r = t.run("unlock-7", unlock(7)).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded);
    assert_eq!(
        r.details["hook_exit"], "4",
        "a failing unlock hook is reported"
    );
    assert!(!t.h().live().is_locked(), "the agent unlocks anyway");
    let r = t.run("lock-6", lock(6)).await;
    assert_eq!(reason(&r), "stale");
    assert!(!t.h().live().is_locked());
    let (code, _) = t.api("POST", "/v1/transactions", Some(sale_json)).await;
    assert_eq!(code, 201, "unlocked again: transactions are accepted");

    // Persisted across a restart.
    t.run("lock-8", lock(8)).await;
    t.stop().await;
    let state = t.spawn().await;
    assert_eq!((state.locked, state.lock_generation), (true, 8));
    assert!(t.h().live().is_locked());
    t.stop().await;
}

#[tokio::test]
async fn config_pushes_apply_atomically_and_roll_back_when_the_hook_fails() {
    let mut t = Term::start(|dir, s| {
        // Version 2 fails, version 3 hangs; everything else applies.
        let tail = "case \"$POSFLEET_CONFIG_VERSION\" in 2) exit 3;; 3) exec sleep 30;; esac\n\
                    test -f \"$POSFLEET_CONFIG_FILE\"";
        s.hooks.config_apply = Some(recording_hook(dir, "apply", &dir.join("applies"), tail));
        s.hooks.timeout = Duration::from_millis(500);
    })
    .await;
    assert_eq!(
        t.api_get("/v1/config").await,
        serde_json::json!({"version": 0, "document": {}})
    );

    let r = t.run("bad", push(1, r#"{"Not-Lower": 1}"#)).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "malformed")
    );
    assert!(!t.config_file().exists());

    let r = t
        .run("c1", push(1, r#"{"pos.tip": 10, "ui.lang": "de"}"#))
        .await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded, "{}", r.message);
    assert_eq!(r.details["version"], "1");
    assert_eq!(t.state().await.config_version, 1);
    let v1 = std::fs::read(t.config_file()).unwrap();
    let file: serde_json::Value = serde_json::from_slice(&v1).unwrap();
    assert_eq!(
        file,
        serde_json::json!({"version": 1, "document": {"pos.tip": 10, "ui.lang": "de"}})
    );

    // The hook fails: the file and the version stay those of version 1.
    let r = t.run("c2", push(2, r#"{"pos.tip": 99}"#)).await;
    assert_eq!(r.status(), pb::CommandStatus::Failed);
    assert_eq!(r.details["hook_exit"], "3");
    assert_eq!(std::fs::read(t.config_file()).unwrap(), v1);
    // The hook hangs: killed at the timeout, rolled back too.
    let r = t.run("c3", push(3, r#"{"pos.tip": 98}"#)).await;
    assert_eq!(
        (r.status(), r.details["hook_exit"].as_str()),
        (pb::CommandStatus::Failed, "timeout")
    );
    assert_eq!(std::fs::read(t.config_file()).unwrap(), v1);
    let config = t.api_get("/v1/config").await;
    assert_eq!(
        config,
        serde_json::json!({"version": 1, "document": {"pos.tip": 10, "ui.lang": "de"}})
    );
    assert_eq!(t.h().live().get().config_version, 1);

    // Equal: nothing to do (no hook run); lower: stale; higher: applied.
    let before = runs(&t.tmp.path().join("applies"));
    let r = t.run("c1-again", push(1, "{}")).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded);
    assert_eq!(runs(&t.tmp.path().join("applies")), before);
    let r = t.run("c4", push(4, r#"{"pos.tip": 12}"#)).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded);
    let r = t.run("c0", push(0, "{}")).await;
    assert_eq!(reason(&r), "stale");
    assert_eq!(t.api_get("/v1/status").await["config_version"], 4);
    t.stop().await;
    let state = t.spawn().await;
    assert_eq!(
        state.config_version, 4,
        "the applied version survives a restart"
    );
    t.stop().await;
}

#[tokio::test]
async fn wipe_is_refused_while_transactions_are_unsent_and_done_when_forced() {
    let mut t = Term::start(|dir, s| {
        s.hooks.wipe = Some(recording_hook(dir, "wipe", &dir.join("wipes"), ""));
    })
    .await;
    t.run("c1", push(1, r#"{"a": 1}"#)).await;
    assert!(t.config_file().exists());
    // The fake broker never acknowledges transactions: it stays in the outbox.
    t.h().intake().accept(sale("tx-1", 100)).await.unwrap();
    assert_eq!(t.h().outbox().depth(), 1);

    let r = t.run("w1", Body::Wipe(pb::Wipe { force: false })).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "refused")
    );
    assert!(r.message.contains("1 transaction"), "{}", r.message);
    assert!(!t.h().live().is_locked(), "a refused wipe changes nothing");
    assert_eq!(runs(&t.tmp.path().join("wipes")), 0);
    assert!(t.identity.iter().all(|f| f.exists()));

    let r = t.run("w2", Body::Wipe(pb::Wipe { force: true })).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded, "{}", r.message);
    tokio::time::timeout(WAIT, t.h().wiped()).await.unwrap();
    assert_eq!(runs(&t.tmp.path().join("wipes")), 1);
    assert!(
        t.identity.iter().all(|f| !f.exists()),
        "device key and certificate deleted"
    );
    assert!(!t.config_file().exists());
    assert_eq!(t.h().outbox().depth(), 0);
    assert!(t.h().outbox().entries().await.unwrap().is_empty());
    let live = t.h().live().get();
    assert_eq!(
        (live.locked, live.lock_reason.as_str(), live.config_version),
        (true, "wiped", 0)
    );
    // The agent stops by itself.
    tokio::time::timeout(WAIT, t.h().mqtt().closed())
        .await
        .unwrap();
    let device = t.store().device(&id());
    assert_eq!(
        device.journal_len().unwrap(),
        1,
        "only the wipe's entry is left"
    );
    assert!(device.journal_entry("w2").unwrap().is_some());
    t.stop().await;
}

#[tokio::test]
async fn commands_interrupted_by_a_restart_are_settled_and_reported() {
    let mut t = Term::start(|dir, s| {
        s.hooks.lock = Some(recording_hook(dir, "lock", &dir.join("locks"), ""));
    })
    .await;
    t.stop().await;
    // As if the process had been killed after journaling three commands (and, for the lock,
    // its new state, which is written with the journal entry).
    {
        let store =
            StateStore::open(&t.tmp.path().join("state"), DEFAULT_STATE_CACHE_CAPACITY).unwrap();
        let device = store.device(&id());
        let mut changes = crate::state::Changes::durable().lock(LockRecord {
            locked: true,
            reason: "stolen".into(),
            generation: 4,
            by_lease: false,
        });
        for (cmd_id, body) in [
            ("k-lock", lock(4)),
            ("k-reboot", Body::Reboot(pb::Reboot {})),
            ("k-logs", Body::CollectLogs(pb::CollectLogs::default())),
        ] {
            let cmd = t.command(cmd_id, body);
            changes = changes.journal(
                cmd_id,
                JournalEntry {
                    status: JournalStatus::InProgress,
                    not_after_ms: cmd.not_after_ms,
                    command: cmd.encode_to_vec(),
                    result: result::in_progress(cmd_id, "x").encode_to_vec(),
                },
            );
        }
        device.apply(changes).unwrap();
    }
    t.spawn().await;
    let mut finals = std::collections::BTreeMap::new();
    while finals.len() < 3 {
        let r = t.result().await;
        finals.insert(r.command_id.clone(), r);
    }
    assert_eq!(finals["k-lock"].status(), pb::CommandStatus::Succeeded);
    assert_eq!(finals["k-lock"].details["generation"], "4");
    assert_eq!(runs(&t.tmp.path().join("locks")), 1, "the lock was re-run");
    assert_eq!(finals["k-reboot"].status(), pb::CommandStatus::Succeeded);
    assert_eq!(finals["k-logs"].status(), pb::CommandStatus::Failed);
    assert_eq!(finals["k-logs"].message, "interrupted by restart");
    assert!(t.h().live().is_locked());
    let device = t.store().device(&id());
    for cmd_id in ["k-lock", "k-reboot", "k-logs"] {
        let entry = device.journal_entry(cmd_id).unwrap().unwrap();
        assert_eq!(entry.status, JournalStatus::Final, "{cmd_id}");
    }
    t.stop().await;
}

fn lease(locked: bool, generation: u64, reason: &str) -> Body {
    Body::Lease(pb::Lease {
        locked,
        lock_generation: generation,
        lock_reason: reason.into(),
        config_version: 0,
    })
}

#[tokio::test]
async fn the_offline_lease_locks_and_a_lease_unlocks() {
    let mut t = Term::start(|_, s| s.max_offline = Some(Duration::from_millis(1500))).await;
    assert!(!t.h().live().is_locked());
    // Nobody vouches for the terminal: it locks itself.
    let state = t.state().await;
    assert_eq!(
        (state.locked, state.lock_reason.as_str()),
        (true, REASON_OFFLINE_LEASE)
    );
    assert!(matches!(
        t.h().intake().accept(sale("tx-1", 100)).await,
        Err(AcceptError::Locked)
    ));
    // A lease (verified like any command, no result) saying unlocked ends the self-lock.
    let sent_ms = now_ms();
    t.send(&t.command("lease-1", lease(false, 0, "")));
    let state = t.state().await;
    assert!(!state.locked, "a lease saying unlocked ends the self-lock");
    // It renewed the contact (recorded before the lease is applied), so the lease clock
    // starts again from it rather than locking again at once.
    let contact = t.store().device(&id()).load().unwrap().last_contact_ms;
    assert!(
        contact.is_some_and(|c| c >= sent_ms),
        "contact {contact:?}, lease sent at {sent_ms}"
    );
    // Self-locked again, then a lease that says locked with a newer generation takes over:
    // a later "unlocked" lease does not end that lock (only an Unlock command does).
    let state = t.state().await;
    assert_eq!(state.lock_reason, REASON_OFFLINE_LEASE);
    t.send(&t.command("lease-2", lease(true, 3, "fraud")));
    let state = t.state().await;
    assert_eq!(
        (
            state.locked,
            state.lock_reason.as_str(),
            state.lock_generation
        ),
        (true, "fraud", 3)
    );
    t.send(&t.command("lease-3", lease(false, 2, "")));
    t.send(&t.command("ping", Body::SoftwareUpdate(pb::SoftwareUpdate::default())));
    t.final_result().await;
    assert_eq!(t.h().live().get().lock_reason, "fraud");
    t.stop().await;
}

#[tokio::test]
async fn a_lock_a_lease_already_carried_succeeds_without_acting_again() {
    let mut t = Term::start(|dir, s| {
        s.hooks.lock = Some(recording_hook(dir, "lock", &dir.join("locks"), ""));
    })
    .await;
    // A terminal that was offline when it was locked returns: the lease sent at its ONLINE
    // presence carries the desired lock before the Lock command of that generation.
    t.send(&t.command("lease-1", lease(true, 4, "stolen")));
    let state = t.state().await;
    assert_eq!((state.locked, state.lock_generation), (true, 4));
    let r = t.run("lock-4", lock(4)).await;
    assert_eq!(r.status(), pb::CommandStatus::Succeeded, "{r:?}");
    assert_eq!(r.details["generation"], "4");
    assert_eq!(
        runs(&t.tmp.path().join("locks")),
        1,
        "the hook ran for the lease only"
    );
    // The same generation in the other state is still stale, and so is an older one.
    let r = t.run("unlock-4", unlock(4)).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "stale")
    );
    let r = t.run("lock-3", lock(3)).await;
    assert_eq!(
        (r.status(), reason(&r)),
        (pb::CommandStatus::Rejected, "stale")
    );
    t.stop().await;
}

#[tokio::test]
async fn a_lease_lock_survives_a_restart_and_an_expired_lease_locks_at_start() {
    let mut t = Term::start(|_, s| s.max_offline = Some(Duration::from_millis(300))).await;
    let state = t.state().await;
    assert_eq!(state.lock_reason, REASON_OFFLINE_LEASE);
    t.stop().await;
    // A longer lease now: the persisted self-lock still holds.
    t.settings.max_offline = Some(Duration::from_secs(3600));
    let state = t.spawn().await;
    assert_eq!(
        (state.locked, state.lock_reason.as_str()),
        (true, REASON_OFFLINE_LEASE)
    );
    t.send(&t.command("lease-1", lease(false, 0, "")));
    assert!(!t.state().await.locked);
    t.stop().await;

    // Last contact two hours ago, lease one hour: locked before anything connects.
    {
        let store =
            StateStore::open(&t.tmp.path().join("state"), DEFAULT_STATE_CACHE_CAPACITY).unwrap();
        store
            .device(&id())
            .apply(crate::state::Changes::durable().contact(now_ms() - 2 * 3600 * 1000))
            .unwrap();
    }
    let dir = t.tmp.path().to_owned();
    let store = tokio::task::spawn_blocking(move || {
        StateStore::open(&dir.join("state"), DEFAULT_STATE_CACHE_CAPACITY).unwrap()
    })
    .await
    .unwrap();
    let setup = CommandSetup::load(
        Arc::new(t.settings.clone()),
        store.device(&id()),
        TerminalFiles {
            config: t.config_file(),
            identity: Vec::new(),
            updates_dir: t.tmp.path().join("updates"),
            update_prefix: String::new(),
            api_socket: None,
        },
    )
    .unwrap();
    let status = setup.initial_status(now_ms());
    assert_eq!(
        (status.locked, status.lock_reason.as_str()),
        (true, REASON_OFFLINE_LEASE)
    );
    drop(setup);
    drop(store);
    let state = t.spawn().await;
    assert_eq!(
        (state.locked, state.lock_reason.as_str()),
        (true, REASON_OFFLINE_LEASE)
    );
    t.stop().await;
}

#[tokio::test]
async fn logs_are_uploaded_in_chunks_and_reboot_needs_a_hook() {
    let mut t = Term::start(|dir, s| {
        let size = LOG_CHUNK_MAX_DATA + 100;
        s.hooks.collect_logs = Some(script(
            dir,
            "logs",
            &format!("echo \"$POSFLEET_LOGS_SINCE_MS $POSFLEET_LOGS_MAX_BYTES\" > {}\nhead -c {size} /dev/zero", dir.join("logs-env").display()),
        ));
    })
    .await;
    let r = t.run("rb", Body::Reboot(pb::Reboot {})).await;
    assert_eq!(
        (r.status(), r.message.as_str()),
        (pb::CommandStatus::Failed, "no reboot hook configured")
    );

    let cmd = t.command(
        "logs-1",
        Body::CollectLogs(pb::CollectLogs {
            since_ms: 5,
            max_bytes: 0,
        }),
    );
    t.send(&cmd);
    let mut chunks = Vec::new();
    loop {
        let chunk: pb::LogChunk = decode(&t.next_on("log").await).unwrap();
        let last = chunk.last;
        chunks.push(chunk);
        if last {
            break;
        }
    }
    let total = LOG_CHUNK_MAX_DATA + 100;
    assert_eq!(chunks.len(), 2);
    assert_eq!(
        (chunks[0].offset, chunks[1].offset),
        (0, LOG_CHUNK_MAX_DATA as u64)
    );
    assert!(
        chunks
            .iter()
            .all(|c| c.total_bytes == total as u64 && c.command_id == "logs-1")
    );
    assert_eq!(chunks.iter().map(|c| c.data.len()).sum::<usize>(), total);
    let r = t.final_result().await;
    assert_eq!(
        (r.status(), r.details["bytes"].as_str()),
        (pb::CommandStatus::Succeeded, total.to_string().as_str())
    );
    let env = std::fs::read_to_string(t.tmp.path().join("logs-env")).unwrap();
    assert_eq!(env.trim(), "5 1048576");
    t.stop().await;
}
