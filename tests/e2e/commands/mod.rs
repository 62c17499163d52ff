//! The signed command plane (ADR 0007) end to end: real broker, real agents, real hooks,
//! `posctl`, mutual TLS on loopback.
//!
//! - `lock`: lock/unlock through posctl (local API 423, desired and reported state, command
//!   list/show), groups and labels as targets, command progress on the live stream.
//! - `offline`: a terminal that was offline converges by itself; the offline-lease self-lock
//!   and its end; commands pending across a controller crash.
//! - `config`: configuration pushes, refused values, a failing and an interrupted apply hook.
//! - `forged`: commands published straight onto a terminal's downlink by another controller
//!   identity: unknown key, bad signature, wrong device, expired, no body, replay.
//! - `oneshot`: wipe (refused with unsent transactions, forced), reboot and log collection.
//! - `bad_input`: refused create requests change nothing.
//!
//! The broker runs with 1 s leases and re-sends, agents with 1 s heartbeats, so that every
//! wait is a few seconds at most.

mod bad_input;
mod config;
mod forged;
mod lock;
mod offline;
mod oneshot;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use posfleet_broker::views::{CommandState, CommandView, CommandsCreated};
use posfleet_proto::now_ms;
use posfleet_tests::localapi::Answer;
use posfleet_tests::{Agent, AgentOptions, Api, Broker, BrokerOptions, LocalApiClient, eventually};
use serde_json::{Value, json};

use crate::support::{WAIT, broker_with};

/// A broker that leases and re-sends every second.
pub async fn fast_broker() -> Broker {
    fast_broker_with(&[]).await
}

/// [`fast_broker`] with more arguments (which may set the intervals differently).
pub async fn fast_broker_with(extra: &[&str]) -> Broker {
    let mut extra_args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
    for (flag, value) in [
        ("--lease-interval", "1s"),
        ("--command-resend-interval", "1s"),
    ] {
        if !extra.contains(&flag) {
            extra_args.extend([flag.to_owned(), value.to_owned()]);
        }
    }
    broker_with(BrokerOptions {
        extra_args,
        ..BrokerOptions::default()
    })
    .await
}

/// An agent connecting to `url` with `extra` appended to its config (the text continues the
/// `[commands]` table, so `max_offline = "3s"` works as is; later tables such as `[hooks]`
/// follow).
pub fn start_agent(broker: &Broker, id: &str, url: &str, extra: &str) -> Agent {
    match Agent::start_with(broker, id, &AgentOptions::default(), url, extra) {
        Ok(agent) => agent,
        Err(error) => panic!("agent {id} did not start: {error:#}"),
    }
}

/// A `[hooks]` table naming `hooks` (key, path).
pub fn hooks_table(hooks: &[(&str, &Path)]) -> String {
    let mut text = String::from("\n[hooks]\ntimeout = \"20s\"\n");
    for (key, path) in hooks {
        text.push_str(&format!("{key} = \"{}\"\n", path.display()));
    }
    text
}

/// Writes an executable `/bin/sh` hook `name` into `dir`.
pub fn write_hook(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!("#!/bin/sh\n{body}\n");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    path
}

/// The lines of a marker file a hook appends to (none if it does not exist).
pub fn marker_lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// `GET /v1/status` of a terminal as JSON (with `lock_reason` and `lock_generation`).
pub async fn local_status(local: &LocalApiClient) -> anyhow::Result<Value> {
    get_json(local, "/v1/status").await
}

/// `GET /v1/config` of a terminal: `{"version": N, "document": {...}}`.
pub async fn local_config(local: &LocalApiClient) -> anyhow::Result<Value> {
    get_json(local, "/v1/config").await
}

async fn get_json(local: &LocalApiClient, path: &str) -> anyhow::Result<Value> {
    let answer = local
        .request(http::Method::GET, path, None, bytes::Bytes::new())
        .await?;
    anyhow::ensure!(answer.status == 200, "GET {path}: {answer:?}");
    Ok(answer.body)
}

/// Waits until the terminal's local status satisfies `check` (given the status JSON).
pub async fn status_until(
    local: &LocalApiClient,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    eventually(WAIT, || async {
        let status = local_status(local).await?;
        anyhow::ensure!(check(&status), "terminal not {what} yet: {status}");
        Ok(status)
    })
    .await
}

/// Waits until command `id` is in a final state; returns it.
pub async fn final_command(api: &Api, id: &str) -> CommandView {
    eventually(WAIT, || async {
        let cmd = api.command(id).await?;
        anyhow::ensure!(cmd.status.is_final(), "command not final yet: {cmd:?}");
        Ok(cmd)
    })
    .await
}

/// Waits until command `id` is final and asserts it is `want`.
pub async fn expect_final(api: &Api, id: &str, want: CommandState) -> CommandView {
    let cmd = final_command(api, id).await;
    assert_eq!(cmd.status, want, "{cmd:#?}");
    cmd
}

/// The one command a posctl `-o json` create printed.
pub fn created_one(out: &posfleet_tests::PosctlOutput) -> CommandView {
    let created: CommandsCreated = out.json().expect("CommandsCreated JSON");
    assert_eq!(created.commands.len(), 1, "{out}");
    created.commands.into_iter().next().expect("one command")
}

/// A valid sale for the local API.
pub fn sale(txn_id: &str) -> Value {
    json!({
        "txn_id": txn_id, "timestamp_ms": now_ms(), "amount_minor": 1250,
        "currency": "EUR", "kind": "sale", "status": "approved",
        "masked_card": "411111******1111", "card_brand": "visa", "entry_mode": "chip",
        "auth_code": "A1B2C3", "response_code": "00", "merchant_id": "MER-001",
        "items": [ { "sku": "SKU-1", "quantity": 1, "unit_price_minor": 1250 } ]
    })
}

/// Posts a sale; the answer.
pub async fn post_sale(local: &LocalApiClient, txn_id: &str) -> Answer {
    match local.post_transaction(&sale(txn_id)).await {
        Ok(answer) => answer,
        Err(error) => panic!("POST /v1/transactions {txn_id}: {error:#}"),
    }
}

/// Checks `check` every 100 ms for `period`; fails at the first miss. For "this does not
/// happen" assertions, which have no event to wait for.
pub async fn holds_for(period: Duration, mut check: impl AsyncFnMut() -> anyhow::Result<()>) {
    let until = tokio::time::Instant::now() + period;
    while tokio::time::Instant::now() < until {
        if let Err(error) = check().await {
            panic!("the condition stopped holding: {error:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
