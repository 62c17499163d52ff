//! Signed software updates and staged rollouts (ADR 0008) end to end: `posctl pki
//! release-key`, `artifact sign|upload`, `rollout create|show|pause|resume|abort`, the real
//! controller (artifact store, device download endpoint, rollout engine) and real terminals
//! (`pf-agent run` and `pf-agent simulate`) with install, health and rollback hooks.
//!
//! - `happy`: one terminal updated by a one-wave rollout, seen through the API and posctl;
//!   a download cut in the middle resumes with `Range`.
//! - `refused`: artifacts the controller refuses at upload (bad signature, unknown key) and
//!   what a terminal refuses (corrupted blob, untrusted key, a server sending too much).
//! - `waves`: a failing canary aborts a simulated fleet's rollout; a missing health
//!   confirmation rolls back; an offline member fails its wave at the wave timeout.
//! - `restart`: the controller is killed during wave 2 and the rollout resumes.
//! - `control`: pause, resume, abort through posctl, and refused requests.
//! - `minimum`: an artifact's `min_version`: a terminal below it is skipped and counted, one
//!   at it is updated.
//!
//! Every hook appends a line to a marker file, so a test sees what ran on which terminal.

mod control;
mod happy;
mod minimum;
mod refused;
mod restart;
mod waves;

use std::path::{Path, PathBuf};
use std::time::Duration;

use posfleet_broker::views::{
    ArtifactView, CommandPage, CommandState, CommandView, RolloutState, RolloutView,
};
use posfleet_tests::{Agent, Api, Broker, Posctl, Process, eventually};

use crate::commands::{hooks_table, start_agent, write_hook};
use crate::support::WAIT;

/// Version every test terminal starts with (`payment_app_version` of the harness and the
/// simulator).
pub const OLD_VERSION: &str = "3.2.0";

/// Bound for a whole rollout (several waves of real terminals).
pub const ROLLOUT_WAIT: Duration = Duration::from_secs(45);

/// A release key pair written by `posctl pki release-key`.
pub struct ReleaseKey {
    pub key: PathBuf,
    pub public: PathBuf,
}

/// `posctl pki release-key --out DIR/NAME`.
pub async fn release_key(broker: &Broker, name: &str) -> ReleaseKey {
    let dir = broker.scratch_dir(name).expect("scratch dir");
    let out_dir = dir.join("keys");
    let out = Posctl::new(broker)
        .ok(&[
            "pki",
            "release-key",
            "--out",
            &out_dir.display().to_string(),
        ])
        .await
        .expect("posctl pki release-key");
    let key = ReleaseKey {
        key: out_dir.join("release.key"),
        public: out_dir.join("release.pub"),
    };
    assert!(key.key.exists() && key.public.exists(), "{out}");
    key
}

/// Writes a new release key, installs its public half as the broker's
/// `DATA/pki/release.pub` and stops the broker (it loads the key at its next start).
pub async fn install_release_key(broker: &mut Broker) -> ReleaseKey {
    let key = release_key(broker, "release").await;
    std::fs::copy(&key.public, broker.pki().release_public_key()).expect("install release.pub");
    broker.terminate().await.expect("stop the broker");
    key
}

/// A broker with 1 s leases and re-sends (and `extra` arguments) that trusts a new release
/// key.
pub async fn release_broker_with(extra: &[&str]) -> (Broker, ReleaseKey) {
    let mut broker = crate::commands::fast_broker_with(extra).await;
    let key = install_release_key(&mut broker).await;
    broker.restart().await.expect("restart the broker");
    (broker, key)
}

/// [`release_broker_with`] without more arguments.
pub async fn release_broker() -> (Broker, ReleaseKey) {
    release_broker_with(&[]).await
}

/// A file of `size` random bytes (so every test's artifact has its own id).
pub fn artifact_file(broker: &Broker, name: &str, size: usize) -> PathBuf {
    let dir = broker.scratch_dir("artifacts").expect("scratch dir");
    let path = dir.join(name);
    let mut bytes = vec![0u8; size];
    rand::Rng::fill(&mut rand::rng(), bytes.as_mut_slice());
    std::fs::write(&path, bytes).expect("write artifact");
    path
}

/// `posctl artifact sign --key KEY FILE`; the `.sig` path.
pub async fn sign(broker: &Broker, key: &Path, file: &Path) -> PathBuf {
    Posctl::new(broker)
        .ok(&[
            "artifact",
            "sign",
            "--key",
            &key.display().to_string(),
            &file.display().to_string(),
        ])
        .await
        .expect("posctl artifact sign");
    let mut sig = file.as_os_str().to_owned();
    sig.push(".sig");
    PathBuf::from(sig)
}

/// `posctl artifact upload FILE --version V --signature SIG -o json`, whatever the outcome.
pub async fn upload_raw(
    broker: &Broker,
    file: &Path,
    sig: &Path,
    version: &str,
) -> posfleet_tests::PosctlOutput {
    upload_with(broker, file, sig, version, &[]).await
}

/// [`upload_raw`] with more arguments (`--min-version M`, ...).
pub async fn upload_with(
    broker: &Broker,
    file: &Path,
    sig: &Path,
    version: &str,
    more: &[&str],
) -> posfleet_tests::PosctlOutput {
    let (file, sig) = (file.display().to_string(), sig.display().to_string());
    let mut args = vec![
        "-o",
        "json",
        "artifact",
        "upload",
        &file,
        "--version",
        version,
        "--signature",
        &sig,
    ];
    args.extend_from_slice(more);
    Posctl::new(broker)
        .run(&args)
        .await
        .expect("posctl artifact upload")
}

/// Signs `file` with `key` and uploads it as `version`; the stored artifact.
pub async fn sign_and_upload(
    broker: &Broker,
    key: &ReleaseKey,
    file: &Path,
    version: &str,
) -> ArtifactView {
    let sig = sign(broker, &key.key, file).await;
    let out = upload_raw(broker, file, &sig, version).await;
    out.success().expect("upload accepted");
    out.json().expect("ArtifactView JSON")
}

/// The hooks of one test terminal and the marker file they append to.
pub struct Hooks {
    pub marker: PathBuf,
    pub install: PathBuf,
    pub health: PathBuf,
    pub rollback: PathBuf,
}

/// How the install and health hooks behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Both succeed at once.
    Fine,
    /// The install hook exits 7.
    InstallFails,
    /// The health hook always exits 1.
    Unhealthy,
    /// The install hook takes this long.
    SlowInstall(Duration),
}

/// Writes install/health/rollback hooks into `dir`: each appends
/// `<hook> <device> <POSFLEET_VERSION> [<POSFLEET_FAILED_VERSION>]` to `dir/marker`. The
/// install hook also keeps a copy of what it installed (`dir/installed-<device>`).
pub fn hooks(dir: &Path, behaviour: Behaviour) -> Hooks {
    std::fs::create_dir_all(dir).expect("hook dir");
    let marker = dir.join("marker");
    let m = marker.display();
    let keep = dir.join("installed-").display().to_string();
    let (install_tail, health_exit) = match behaviour {
        Behaviour::Fine => (String::new(), 0),
        Behaviour::InstallFails => ("exit 7".to_owned(), 0),
        Behaviour::Unhealthy => (String::new(), 1),
        Behaviour::SlowInstall(d) => (format!("sleep {}", d.as_secs_f64()), 0),
    };
    let install = write_hook(
        dir,
        "install",
        &format!(
            "cp \"$POSFLEET_ARTIFACT\" \"{keep}$POSFLEET_DEVICE_ID\" || exit 3\n\
             echo \"install $POSFLEET_DEVICE_ID $POSFLEET_VERSION $POSFLEET_COMPONENT\" >> \"{m}\"\n\
             {install_tail}"
        ),
    );
    let health = write_hook(
        dir,
        "health",
        &format!(
            "echo \"health $POSFLEET_DEVICE_ID $POSFLEET_VERSION\" >> \"{m}\"\nexit {health_exit}"
        ),
    );
    let rollback = write_hook(
        dir,
        "rollback",
        &format!(
            "echo \"rollback $POSFLEET_DEVICE_ID $POSFLEET_VERSION $POSFLEET_FAILED_VERSION\" >> \"{m}\""
        ),
    );
    Hooks {
        marker,
        install,
        health,
        rollback,
    }
}

impl Hooks {
    /// Marker lines of `hook` (`install`, `health`, `rollback`) for `device`.
    pub fn lines(&self, hook: &str, device: &str) -> Vec<String> {
        let prefix = format!("{hook} {device} ");
        crate::commands::marker_lines(&self.marker)
            .into_iter()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    /// The copy the install hook made of what it got for `device` (None: never installed).
    pub fn installed(&self, device: &str) -> Option<Vec<u8>> {
        let dir = self.marker.parent().expect("marker dir");
        std::fs::read(dir.join(format!("installed-{device}"))).ok()
    }
}

/// A `pf-agent run` terminal trusting the release keys in `trusted` (default: the
/// `release.pub` its bundle got from the broker) with `hooks`; `extra_updates` continues
/// its `[updates]` table.
pub fn update_agent(
    broker: &Broker,
    id: &str,
    hooks: &Hooks,
    trusted: Option<&Path>,
    extra_updates: &str,
) -> Agent {
    let bundle_pub = broker
        .scratch_dir(&format!("agent-{id}"))
        .expect("agent dir")
        .join("bundle")
        .join("release.pub");
    let trusted = trusted.map_or(bundle_pub, Path::to_owned);
    let extra = format!(
        "\n[updates]\ntrusted_release_keys = [\"{}\"]\nmax_retry_delay = \"1s\"\n{extra_updates}{}",
        trusted.display(),
        hooks_table(&[
            ("install", &hooks.install),
            ("health", &hooks.health),
            ("rollback", &hooks.rollback),
        ]),
    );
    start_agent(broker, id, &broker.mqtt_url(), &extra)
}

/// `pf-agent simulate --count N` with `hooks`, ids `PREFIX00000...`, no transactions,
/// trusting the broker's `DATA/pki/release.pub`.
pub fn simulator(broker: &Broker, prefix: &str, count: usize, hooks: &Hooks) -> Process {
    let pki = broker.pki().dir().display().to_string();
    let url = broker.mqtt_url();
    let state = broker.scratch_dir("simulator").expect("scratch dir");
    let args: Vec<String> = [
        "simulate",
        "--count",
        &count.to_string(),
        "--pki-dir",
        &pki,
        "--broker",
        &url,
        "--id-prefix",
        prefix,
        "--heartbeat-interval",
        "1s",
        "--telemetry-interval",
        "1s",
        "--connect-rate",
        "1000",
        "--tx-rate",
        "0",
        "--data-dir",
        &state.display().to_string(),
        "--hook-install",
        &hooks.install.display().to_string(),
        "--hook-health",
        &hooks.health.display().to_string(),
        "--hook-rollback",
        &hooks.rollback.display().to_string(),
        "--hook-timeout",
        "20s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    Process::spawn(
        "pf-agent simulate",
        &broker.bins().agent,
        &args,
        &broker.log_dir(),
        "simulate",
    )
    .expect("start the simulator")
}

/// Waits until the `count` devices `PREFIX00000..` are online; their ids.
pub async fn fleet_online(api: &Api, prefix: &str, count: usize) -> Vec<String> {
    let ids: Vec<String> = (0..count).map(|i| format!("{prefix}{i:05}")).collect();
    for id in &ids {
        crate::support::online(api, id).await;
    }
    ids
}

/// `GET /api/v1/rollouts/{id}`.
pub async fn rollout(api: &Api, id: &str) -> anyhow::Result<RolloutView> {
    let response = api.get(&format!("/api/v1/rollouts/{id}")).await?;
    let status = response.status();
    let text = response.text().await?;
    anyhow::ensure!(status.is_success(), "GET rollout {id}: {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

/// Waits until rollout `id` satisfies `check`.
pub async fn rollout_until(
    api: &Api,
    id: &str,
    what: &str,
    wait: Duration,
    check: impl Fn(&RolloutView) -> bool,
) -> RolloutView {
    eventually(wait, || async {
        let view = rollout(api, id).await?;
        anyhow::ensure!(check(&view), "rollout not {what} yet: {view:#?}");
        Ok(view)
    })
    .await
}

/// Waits until rollout `id` is completed or aborted.
pub async fn rollout_final(api: &Api, id: &str) -> RolloutView {
    rollout_until(api, id, "final", ROLLOUT_WAIT, |v| v.state.is_final()).await
}

pub fn is_aborted(view: &RolloutView) -> bool {
    matches!(view.state, RolloutState::Aborted { .. })
}

/// Every command of `kind` (`software_update`, `rollback_update`) for `device`.
pub async fn commands_of(api: &Api, device: &str, kind: &str) -> Vec<CommandView> {
    let path = format!("/api/v1/commands?device={device}&kind={kind}&limit=1000");
    let response = api.get(&path).await.expect("GET commands");
    let status = response.status();
    let text = response.text().await.expect("commands body");
    assert!(status.is_success(), "GET {path}: {status}: {text}");
    let page: CommandPage = serde_json::from_str(&text).expect("CommandPage JSON");
    page.items
}

/// The one command of `kind` for `device`, once final.
pub async fn final_command_of(api: &Api, device: &str, kind: &str) -> CommandView {
    eventually(WAIT, || async {
        let path = format!("/api/v1/commands?device={device}&kind={kind}");
        let page: CommandPage = serde_json::from_str(&api.get(&path).await?.text().await?)?;
        anyhow::ensure!(page.items.len() == 1, "{device}: {kind} commands: {page:?}");
        let cmd = page.items.into_iter().next().expect("one");
        anyhow::ensure!(cmd.status.is_final(), "not final yet: {cmd:?}");
        Ok(cmd)
    })
    .await
}

/// Waits until `device` reports `version` as its payment application's.
pub async fn reports_version(api: &Api, device: &str, version: &str) {
    eventually(WAIT, || async {
        let d = api
            .device(device)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{device} unknown"))?;
        anyhow::ensure!(
            d.summary.versions.payment_app == version,
            "{device} reports {:?}, want {version}",
            d.summary.versions
        );
        Ok(())
    })
    .await;
}

/// A failed update command's `details.reason`.
pub fn reason(cmd: &CommandView) -> &str {
    assert_eq!(cmd.status, CommandState::Failed, "{cmd:#?}");
    cmd.details.get("reason").map_or("", String::as_str)
}

/// `POST /api/v1/rollouts` with `body`; the created view.
pub async fn create_rollout(api: &Api, body: serde_json::Value) -> RolloutView {
    let response = api
        .send(reqwest::Method::POST, "/api/v1/rollouts", Some(&body))
        .await
        .expect("POST rollouts");
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status.as_u16(), 201, "{text}");
    serde_json::from_str(&text).expect("RolloutView JSON")
}
