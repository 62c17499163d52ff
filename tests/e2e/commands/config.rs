//! Configuration pushes: applied by the terminal, refused values, a failing apply hook, and
//! an agent killed while its apply hook runs.

use std::time::Duration;

use posfleet_broker::views::{CommandBody, CommandPage, CommandState, CommandView, ErrorBody};
use posfleet_tests::{Api, Posctl, eventually};
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    expect_final, fast_broker, fast_broker_with, holds_for, hooks_table, local_config,
    local_status, marker_lines, start_agent, status_until, write_hook,
};
use crate::support::{WAIT, online};

/// The newest config push to `device` carrying `version` (waits until it exists).
async fn push_for(api: &Api, device: &str, version: u64) -> CommandView {
    eventually(WAIT, || async {
        let page: CommandPage = api
            .get(&format!(
                "/api/v1/commands?device={device}&kind=config_push"
            ))
            .await?
            .json()
            .await?;
        page.items
            .into_iter()
            .find(|c| matches!(c.body, CommandBody::ConfigPush { version: v, .. } if v == version))
            .ok_or_else(|| anyhow::anyhow!("no config push of version {version} to {device} yet"))
    })
    .await
}

/// How many config pushes of `version` to `device` exist.
async fn pushes_of(api: &Api, device: &str, version: u64) -> anyhow::Result<usize> {
    let page: CommandPage = api
        .get(&format!(
            "/api/v1/commands?device={device}&kind=config_push"
        ))
        .await?
        .json()
        .await?;
    Ok(page
        .items
        .iter()
        .filter(|c| matches!(c.body, CommandBody::ConfigPush { version: v, .. } if v == version))
        .count())
}

/// The device's desired (effective) configuration version.
async fn desired_version(api: &Api, device: &str) -> u64 {
    let d = api
        .device(device)
        .await
        .expect("GET device")
        .expect("device");
    d.desired.expect("desired state").config_version
}

#[tokio::test]
async fn commands_push_configuration_and_refuse_bad_values_and_failing_hooks() {
    let broker = fast_broker_with(&["--command-resend-interval", "5s"]).await;
    let api = broker.api();
    let hooks = broker.scratch_dir("config-hooks").expect("dir");
    let fail = hooks.join("fail");
    let runs = hooks.join("runs");
    let hook = write_hook(
        &hooks,
        "config-apply",
        &format!(
            "echo \"$POSFLEET_CONFIG_VERSION\" >> '{runs}'\n\
             grep -q '\"version\": '\"$POSFLEET_CONFIG_VERSION\" \"$POSFLEET_CONFIG_FILE\" || exit 9\n\
             if [ -e '{fail}' ]; then echo 'screen refused the config' >&2; exit 7; fi",
            runs = runs.display(),
            fail = fail.display()
        ),
    );
    let extra = hooks_table(&[("config_apply", hook.as_path())]);
    let agent = start_agent(&broker, "cfg-1", &broker.mqtt_url(), &extra);
    online(api, "cfg-1").await;
    let local = agent.local_api();
    let posctl = Posctl::new(&broker);

    posctl
        .ok(&[
            "config",
            "set",
            "--fleet",
            "store.name=Corner Shop",
            "display.brightness=70",
        ])
        .await
        .expect("config set");
    let v1 = desired_version(api, "cfg-1").await;
    let push = push_for(api, "cfg-1", v1).await;
    let push = expect_final(api, &push.id, CommandState::Succeeded).await;
    assert_eq!(
        push.details.get("version"),
        Some(&v1.to_string()),
        "{push:?}"
    );
    let config = local_config(&local).await.expect("GET /v1/config");
    assert_eq!(
        config,
        json!({"version": v1, "document": {"store.name": "Corner Shop", "display.brightness": 70}})
    );
    assert_eq!(marker_lines(&runs), [v1.to_string()], "the hook ran once");

    // An invalid value: refused by the API with the key named; nothing changes.
    let out = posctl
        .run(&["config", "set", "--fleet", "display.brightness=150"])
        .await
        .expect("posctl runs");
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("display.brightness"), "{out}");
    let response = api
        .send(
            Method::PATCH,
            "/api/v1/config/fleet",
            Some(&json!({"set": {"display.brightness": "very bright", "store.name": "ok"}})),
        )
        .await
        .expect("PATCH");
    assert!(response.status().is_client_error(), "{response:?}");
    let body: ErrorBody = response.json().await.expect("ErrorBody");
    assert!(
        body.fields.iter().any(|f| f.key == "display.brightness"),
        "{body:?}"
    );
    let fleet: Value = api
        .get("/api/v1/config/fleet")
        .await
        .expect("GET layer")
        .json()
        .await
        .expect("layer JSON");
    assert_eq!(fleet["version"], json!(v1), "{fleet}");
    assert_eq!(desired_version(api, "cfg-1").await, v1);

    // A failing apply hook: the push fails, the terminal keeps what it had.
    std::fs::write(&fail, "").expect("fail marker");
    posctl
        .ok(&["config", "set", "--fleet", "store.name=Broken"])
        .await
        .expect("config set");
    let v2 = desired_version(api, "cfg-1").await;
    assert!(v2 > v1);
    let push = push_for(api, "cfg-1", v2).await;
    let failed = expect_final(api, &push.id, CommandState::Failed).await;
    assert_eq!(
        failed.details.get("hook_exit").map(String::as_str),
        Some("7"),
        "{failed:?}"
    );
    assert!(failed.message.contains("config_apply"), "{failed:?}");
    assert_eq!(local_config(&local).await.expect("config"), config);
    let status = local_status(&local).await.expect("status");
    assert_eq!(status["config_version"], json!(v1), "{status}");
    let state_file: Value = serde_json::from_slice(
        &std::fs::read(agent.state_dir().join("config.json")).expect("config.json"),
    )
    .expect("config.json is JSON");
    assert_eq!(state_file, config, "the previous file is restored");
    let d = api.device("cfg-1").await.expect("GET").expect("device");
    assert_eq!(d.reported.map(|r| r.config_version), Some(v1));
    // The reconciler pushes a failed version again only after a backoff (the re-send
    // interval, 5 s here, doubling), not at every heartbeat (every second).
    holds_for(Duration::from_secs(3), async || {
        let pushes = pushes_of(api, "cfg-1", v2).await?;
        anyhow::ensure!(pushes == 1, "{pushes} pushes of version {v2}");
        Ok(())
    })
    .await;
    let v2_runs = marker_lines(&runs)
        .iter()
        .filter(|l| **l == v2.to_string())
        .count();
    assert_eq!(v2_runs, 1, "the failing hook ran once");

    // Fixed: the next change applies.
    std::fs::remove_file(&fail).expect("remove fail marker");
    posctl
        .ok(&["config", "set", "--fleet", "store.name=Fixed"])
        .await
        .expect("config set");
    let v3 = desired_version(api, "cfg-1").await;
    let push = push_for(api, "cfg-1", v3).await;
    expect_final(api, &push.id, CommandState::Succeeded).await;
    let config = local_config(&local).await.expect("config");
    assert_eq!(config["document"]["store.name"], json!("Fixed"), "{config}");
}

#[tokio::test]
async fn commands_config_push_interrupted_by_a_kill_is_settled_after_restart() {
    let broker = fast_broker().await;
    let api = broker.api();
    let hooks = broker.scratch_dir("slow-hooks").expect("dir");
    let started = hooks.join("started");
    let runs = hooks.join("runs");
    // The first run hangs (the agent is killed meanwhile); the re-run after the restart
    // finishes at once.
    let hook = write_hook(
        &hooks,
        "config-apply",
        &format!(
            "echo run >> '{runs}'\n\
             if [ -e '{started}' ]; then exit 0; fi\n\
             touch '{started}'\n\
             exec sleep 15",
            runs = runs.display(),
            started = started.display()
        ),
    );
    let extra = hooks_table(&[("config_apply", hook.as_path())]);
    let mut agent = start_agent(&broker, "cfg-kill", &broker.mqtt_url(), &extra);
    online(api, "cfg-kill").await;

    let layer = api
        .config_set("devices/cfg-kill", json!({"store.name": "After the crash"}))
        .await
        .expect("config set");
    let push = push_for(api, "cfg-kill", layer.version).await;
    eventually(WAIT, || async {
        anyhow::ensure!(started.exists(), "the hook has not started yet");
        let cmd = api.command(&push.id).await?;
        anyhow::ensure!(cmd.status == CommandState::InProgress, "{cmd:?}");
        Ok(())
    })
    .await;
    agent.kill9().await.expect("kill -9 agent");
    agent.restart().expect("restart agent");

    let done = expect_final(api, &push.id, CommandState::Succeeded).await;
    assert_eq!(
        done.details.get("version"),
        Some(&layer.version.to_string())
    );
    let local = agent.local_api();
    let status = status_until(&local, "at the pushed version", |s| {
        s["config_version"] == json!(layer.version)
    })
    .await;
    assert_eq!(status["locked"], json!(false), "{status}");
    let config = local_config(&local).await.expect("config");
    assert_eq!(
        config,
        json!({"version": layer.version, "document": {"store.name": "After the crash"}})
    );
    let file: Value = serde_json::from_slice(
        &std::fs::read(agent.state_dir().join("config.json")).expect("config.json"),
    )
    .expect("JSON");
    assert_eq!(file, config);
    assert_eq!(
        marker_lines(&runs).len(),
        2,
        "the hook ran again after the restart"
    );
    let d = api.device("cfg-kill").await.expect("GET").expect("device");
    assert_eq!(d.reported.map(|r| r.config_version), Some(layer.version));
}
