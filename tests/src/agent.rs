//! A `pf-agent run` process: one terminal with its own device bundle (issued and recorded by
//! the broker, as `posctl pki issue-device` does), config file and state directory.
//!
//! ```text
//! BROKER_TMP/scratch/agent-ID/bundle/   device.crt, device.key, ca.crt
//! BROKER_TMP/scratch/agent-ID/state/    agent.data_dir (outbox, ...)
//! BROKER_TMP/scratch/agent-ID/api.sock  local API for the payment application
//! BROKER_TMP/scratch/agent-ID/agent.toml
//! BROKER_TMP/logs/agent-ID.stderr.log
//! ```

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, anyhow};
use posfleet_proto::DeviceId;

use crate::bins::Binaries;
use crate::broker::Broker;
use crate::localapi::LocalApiClient;
use crate::process::{Process, TAIL_LINES};

/// How the agent runs. The defaults are fast for tests: 1 s heartbeats and telemetry,
/// simulated sensors, quick reconnects.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub heartbeat_interval: Duration,
    pub telemetry_interval: Duration,
    /// MQTT keep-alive (the agent accepts 5 s at least).
    pub keep_alive: Duration,
    /// Reconnect backoff bounds.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// `sensors.provider`: "simulated" or "none".
    pub sensors: String,
    pub model: String,
    /// Bound on a graceful stop.
    pub stop_timeout: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            telemetry_interval: Duration::from_secs(1),
            keep_alive: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
            sensors: "simulated".to_owned(),
            model: "PX-500".to_owned(),
            stop_timeout: Duration::from_secs(15),
        }
    }
}

/// A running agent process (killed on drop).
#[derive(Debug)]
pub struct Agent {
    /// The device id its certificate proves.
    id: DeviceId,
    /// `BROKER_TMP/scratch/agent-ID`: bundle, state, socket, config.
    dir: PathBuf,
    bins: Binaries,
    /// `agent.toml`, reused by [`Agent::restart`].
    config: PathBuf,
    /// Where its logs go.
    log_dir: PathBuf,
    stop_timeout: Duration,
    /// `None` after a stop until a restart.
    process: Option<Process>,
}

impl Agent {
    /// Issues a bundle for `id` from the broker's CA, writes the config and starts
    /// `pf-agent run`. Returns at once; wait for the device through the API.
    pub fn start(broker: &Broker, id: &str, opts: &AgentOptions) -> anyhow::Result<Self> {
        Self::start_with(broker, id, opts, &broker.mqtt_url(), "")
    }

    /// [`Agent::start`], connecting to `url` instead of the broker's address (a proxy in
    /// front of it), with `extra_config` (more TOML, e.g. an `[outbox]` table) appended to
    /// the config file.
    pub fn start_with(
        broker: &Broker,
        id: &str,
        opts: &AgentOptions,
        url: &str,
        extra_config: &str,
    ) -> anyhow::Result<Self> {
        Self::start_inner(broker, id, opts, (url, extra_config), None)
    }

    /// [`Agent::start`] with a bundle issued beforehand (e.g. by `posctl pki issue-device`)
    /// in `bundle` (`device.crt`, `device.key`, `ca.crt`): nothing is issued here.
    pub fn start_prepared(
        broker: &Broker,
        id: &str,
        opts: &AgentOptions,
        bundle: &std::path::Path,
    ) -> anyhow::Result<Self> {
        Self::start_inner(broker, id, opts, (&broker.mqtt_url(), ""), Some(bundle))
    }

    fn start_inner(
        broker: &Broker,
        id: &str,
        opts: &AgentOptions,
        (url, extra_config): (&str, &str),
        prepared: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let id = DeviceId::new(id).with_context(|| format!("invalid device id {id:?}"))?;
        let dir = broker.scratch_dir(&format!("agent-{id}"))?;
        let pki = broker.pki();
        let bundle = match prepared {
            Some(dir) => posfleet_proto::pki::DeviceBundle {
                cert: dir.join("device.crt"),
                key: dir.join("device.key"),
                ca: dir.join("ca.crt"),
                command_pub: dir.join("command.pub"),
                release_pub: None,
            },
            None => broker.issue_bundle(id.as_str(), &dir.join("bundle"))?,
        };
        let config = dir.join("agent.toml");
        let text = format!(
            r#"[broker]
url = "{url}"
keep_alive = "{keep_alive}ms"
connect_timeout = "5s"
backoff_initial = "{backoff_initial}ms"
backoff_max = "{backoff_max}ms"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[agent]
data_dir = "{state}"
heartbeat_interval = "{hb}ms"
telemetry_interval = "{tm}ms"

[device]
model = "{model}"
serial = "SN-{id}"
firmware_version = "1.4.2"
payment_app_version = "3.2.0"

[sensors]
provider = "{sensors}"

[local_api]
socket = "{socket}"

[commands]
trusted_keys = ["{command_pub}"]
{extra_config}"#,
            keep_alive = opts.keep_alive.as_millis(),
            backoff_initial = opts.backoff_initial.as_millis(),
            backoff_max = opts.backoff_max.as_millis(),
            ca = bundle.ca.display(),
            cert = bundle.cert.display(),
            key = bundle.key.display(),
            state = dir.join("state").display(),
            hb = opts.heartbeat_interval.as_millis(),
            tm = opts.telemetry_interval.as_millis(),
            model = opts.model,
            sensors = opts.sensors,
            socket = dir.join("api.sock").display(),
            command_pub = pki.command_public_key().display(),
        );
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let mut agent = Self {
            id,
            dir,
            bins: broker.bins().clone(),
            config,
            log_dir: broker.log_dir(),
            stop_timeout: opts.stop_timeout,
            process: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The agent's state directory (`agent.data_dir`: outbox, ...).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Where its certificate bundle is (`device.crt`, `device.key`, `ca.crt`).
    pub fn bundle_dir(&self) -> PathBuf {
        self.dir.join("bundle")
    }

    /// A client of its local API (the payment application's view).
    pub fn local_api(&self) -> LocalApiClient {
        LocalApiClient::new(self.dir.join("api.sock"))
    }

    /// Starts the agent again with the same identity and config (after a stop).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(process) = self.process.as_mut() {
            if process.try_exited()?.is_none() {
                anyhow::bail!("restart: agent {} is still running", self.id);
            }
        }
        self.spawn()
    }

    /// SIGKILL: the terminal loses power; its connection drops without a goodbye.
    pub async fn kill9(&mut self) -> anyhow::Result<ExitStatus> {
        self.process_mut()?.kill9().await
    }

    /// SIGTERM and wait for the graceful exit (OFFLINE presence "shutdown", DISCONNECT).
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let timeout = self.stop_timeout;
        self.process_mut()?.terminate(timeout).await
    }

    /// Waits up to `timeout` for the agent to exit by itself (e.g. after a wipe).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.process_mut()?.wait(timeout).await
    }

    /// The running process.
    pub fn process(&self) -> anyhow::Result<&Process> {
        self.process
            .as_ref()
            .ok_or_else(|| anyhow!("agent {} is not running", self.id))
    }

    fn process_mut(&mut self) -> anyhow::Result<&mut Process> {
        let id = &self.id;
        self.process
            .as_mut()
            .ok_or_else(|| anyhow!("agent {id} is not running"))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let config = self.config.display().to_string();
        let process = Process::spawn(
            format!("pf-agent {}", self.id),
            &self.bins.agent,
            ["run", "--config", config.as_str()],
            &self.log_dir,
            &format!("agent-{}", self.id),
        )?;
        self.process = Some(process);
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(process) = &self.process {
                eprintln!("{}", process.stderr_tail(TAIL_LINES));
            }
        }
    }
}
