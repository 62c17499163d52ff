//! A `pf-broker serve` (or `demo`) process on a temporary data directory.
//!
//! ```text
//! TMP/data/      --data-dir: pki/, admin.token, posctl.json, registry/, artifacts/, ...
//! TMP/logs/      broker.stdout.log, broker.stderr.log (appended across restarts)
//! ```
//!
//! Readiness is what `posctl` relies on: `DATA/posctl.json` appears once both listeners are
//! bound. [`Broker::start`] additionally waits until the controller is attached to its bus
//! (`posfleet_controller_connected == 1`: the embedded controller's local router link is
//! subscribed), so that a test's first uplink is never published before anyone listens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use posfleet_broker::datadir::{ClientFile, DataDir};
use posfleet_proto::pki::{DeviceBundle, PkiDir};
use tokio::time::Instant;

use crate::api::Api;
use crate::bins::Binaries;
use crate::eventually::try_eventually;
use crate::process::{Process, TAIL_LINES};

/// Set (to anything) to keep every temp dir of the suite for inspection.
pub const KEEP_DIRS_ENV: &str = "POSFLEET_TEST_KEEP_DIRS";

/// How to start the broker.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// `demo --terminals N` (N simulated terminals in-process) instead of `serve`.
    pub demo_terminals: Option<usize>,
    /// Appended to the command line (after the data dir and listen addresses).
    pub extra_args: Vec<String>,
    /// `RUST_LOG` of the process.
    pub log_filter: String,
    /// Bound on start-up (PKI generation, binding, controller attached).
    pub start_timeout: Duration,
    /// Bound on a graceful stop.
    pub stop_timeout: Duration,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            demo_terminals: None,
            extra_args: Vec::new(),
            log_filter: "info".to_owned(),
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(15),
        }
    }
}

/// A running broker process (killed on drop).
#[derive(Debug)]
pub struct Broker {
    /// The binaries, for agents and posctl started against this broker.
    bins: Binaries,
    /// How it was started (reused by [`Broker::restart`]).
    opts: BrokerOptions,
    /// Owns the data and log directories.
    tmp: tempfile::TempDir,
    /// `TMP/data`.
    data: DataDir,
    /// The process; `None` between a stop and a restart.
    process: Option<Process>,
    /// `posctl.json` as written by the current process.
    client: ClientFile,
    /// Where terminals connect (kept across restarts, so agents find it again).
    mqtt_addr: SocketAddr,
    /// Where the admin API listens (kept across restarts).
    api_addr: SocketAddr,
    /// Where the device download endpoint listens (kept across restarts: the URL in an
    /// issued SoftwareUpdate must stay valid).
    device_addr: SocketAddr,
    /// Admin API client.
    api: Api,
}

impl Broker {
    /// Starts `pf-broker serve` (or `demo`) on a new temporary data directory and free
    /// loopback ports below the kernel's ephemeral range, and waits until it is ready.
    ///
    /// [`Broker::restart`] must listen on the same ports again (agents reconnect to them). A
    /// port the kernel picked for a bind to port 0 lies in the ephemeral range, from which it
    /// also picks the source port of every outgoing connection, so while the broker was down
    /// another test's connection could hold it and the restart failed with "Address already
    /// in use" (seen once in four loaded full-suite runs). Ports below that range are never
    /// handed out implicitly; a port someone else binds in between is met by trying others.
    pub async fn start(bins: &Binaries, opts: BrokerOptions) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("posfleet-e2e-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let data = DataDir::at(tmp.path().join("data"));
        let mut attempt = 0;
        let (process, client) = loop {
            let ports = [stable_port()?, stable_port()?, stable_port()?];
            match launch(bins, &opts, &tmp, &data, ports).await {
                Ok(started) => break started,
                // Most likely a port taken between the check and the broker's bind.
                Err(_) if attempt < 10 => attempt += 1,
                Err(error) => return Err(error),
            }
        };
        let (mqtt_addr, api_addr) = addresses(&client)?;
        let device_addr = client
            .device_addr
            .ok_or_else(|| anyhow!("posctl.json has no device_addr: {client:?}"))?;
        let api = api_client(&data, &client)?;
        let mut broker = Self {
            bins: bins.clone(),
            opts,
            tmp,
            data,
            process: Some(process),
            client,
            mqtt_addr,
            api_addr,
            device_addr,
            api,
        };
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// Starts the broker again on the same data directory and the same ports (so that agents
    /// reconnect by themselves). The previous process must have been stopped.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(process) = self.process.as_mut() {
            if process.try_exited()?.is_none() {
                bail!(
                    "restart: the broker (pid {}) is still running",
                    process.pid()
                );
            }
        }
        self.process = None;
        // The port may be briefly held by a connection in the kernel; retry a few times.
        let mut last = None;
        for _ in 0..5 {
            match launch(
                &self.bins,
                &self.opts,
                &self.tmp,
                &self.data,
                [self.mqtt_addr, self.api_addr, self.device_addr],
            )
            .await
            {
                Ok((process, client)) => {
                    self.api = api_client(&self.data, &client)?;
                    self.client = client;
                    self.process = Some(process);
                    return self.wait_ready().await;
                }
                Err(error) => {
                    last = Some(error);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("restart failed")))
    }

    /// [`Broker::restart`] with `extra` appended to the command line from now on (e.g.
    /// `--device-url` of a proxy in front of the device endpoint).
    pub async fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.opts
            .extra_args
            .extend(extra.iter().map(|a| (*a).to_owned()));
        self.restart().await
    }

    /// SIGKILL (a crash, a power cut of the controller host).
    pub async fn kill9(&mut self) -> anyhow::Result<ExitStatus> {
        self.process_mut()?.kill9().await
    }

    /// SIGTERM and wait for the graceful exit.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let timeout = self.opts.stop_timeout;
        self.process_mut()?.terminate(timeout).await
    }

    /// The admin API client.
    pub fn api(&self) -> &Api {
        &self.api
    }

    pub fn bins(&self) -> &Binaries {
        &self.bins
    }

    /// `--data-dir` of the broker.
    pub fn data_dir(&self) -> &Path {
        self.data.root()
    }

    /// The fleet PKI the broker created (`DATA/pki`).
    pub fn pki(&self) -> PkiDir {
        self.data.pki()
    }

    /// Where log files of this broker and of anything started for it go.
    pub fn log_dir(&self) -> PathBuf {
        self.tmp.path().join("logs")
    }

    /// A fresh directory inside the broker's temp dir (for bundles, agent state, ...).
    pub fn scratch_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.tmp.path().join("scratch").join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// Issues a device bundle for `id` into `out` (replacing one there) the way an admin
    /// does: `pf-posctl pki issue-device` through the broker's API, so the controller records
    /// the certificate (and can revoke it before first contact); while the broker is stopped,
    /// offline into its data dir (`--dir DATA/pki`). Blocks for one short child process.
    pub fn issue_bundle(&self, id: &str, out: &Path) -> anyhow::Result<DeviceBundle> {
        match self.posctl_issue(id, out, None) {
            Ok(bundle) => Ok(bundle),
            Err(online) => self
                .posctl_issue(id, out, Some(&self.pki()))
                .map_err(|offline| anyhow!("{online:#}; offline: {offline:#}")),
        }
    }

    fn posctl_issue(
        &self,
        id: &str,
        out: &Path,
        offline: Option<&PkiDir>,
    ) -> anyhow::Result<DeviceBundle> {
        let mut command = std::process::Command::new(&self.bins.posctl);
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--config-dir")
            .arg(self.data_dir().with_file_name("posctl-config"))
            .args(["pki", "issue-device", "--force", "--id", id, "--out"])
            .arg(out);
        if let Some(pki) = offline {
            command.arg("--dir").arg(pki.dir());
        }
        let output = command
            .output()
            .with_context(|| format!("cannot run {}", self.bins.posctl.display()))?;
        if !output.status.success() {
            bail!(
                "pf-posctl pki issue-device --id {id} ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let release = out.join("release.pub");
        Ok(DeviceBundle {
            cert: out.join("device.crt"),
            key: out.join("device.key"),
            ca: out.join("ca.crt"),
            command_pub: out.join("command.pub"),
            release_pub: release.exists().then_some(release),
        })
    }

    /// `posctl.json` as written by the running broker.
    pub fn client_file(&self) -> &ClientFile {
        &self.client
    }

    /// Where terminals connect.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Where the admin API listens (`--api-listen`, bound address).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Where the device download endpoint listens (`--device-listen`, bound address).
    pub fn device_addr(&self) -> SocketAddr {
        self.device_addr
    }

    /// `mqtts://127.0.0.1:PORT`.
    pub fn mqtt_url(&self) -> String {
        format!("mqtts://{}", self.mqtt_addr)
    }

    /// The broker's process (for its pid, logs, signals).
    pub fn process(&self) -> anyhow::Result<&Process> {
        self.process
            .as_ref()
            .ok_or_else(|| anyhow!("the broker is not running"))
    }

    fn process_mut(&mut self) -> anyhow::Result<&mut Process> {
        self.process
            .as_mut()
            .ok_or_else(|| anyhow!("the broker is not running"))
    }

    /// The last lines of the broker's log (for failure messages).
    pub fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.stderr_tail(TAIL_LINES))
            .unwrap_or_default()
    }

    /// Waits until the API answers and the controller is attached to its bus.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let api = self.api.clone();
        let ready = try_eventually(self.opts.start_timeout, || async {
            let scrape = api.metrics().await?;
            let attached = scrape.value("posfleet_controller_connected", &[]);
            anyhow::ensure!(attached >= 1.0, "controller not attached to its bus yet");
            Ok(())
        })
        .await;
        ready.map_err(|error| {
            error.context(format!(
                "the broker never became ready\n{}",
                self.log_tail()
            ))
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os(KEEP_DIRS_ENV).is_some() {
            self.tmp.disable_cleanup(true);
            eprintln!(
                "broker temp dir kept: {}\n{}",
                self.tmp.path().display(),
                self.log_tail()
            );
        }
    }
}

/// Spawns the broker and waits for its `posctl.json`.
async fn launch(
    bins: &Binaries,
    opts: &BrokerOptions,
    tmp: &tempfile::TempDir,
    data: &DataDir,
    [mqtt, api, device]: [SocketAddr; 3],
) -> anyhow::Result<(Process, ClientFile)> {
    // Never read the previous run's file.
    match std::fs::remove_file(data.client_file()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("cannot remove the old posctl.json"),
    }
    let mut args: Vec<String> = match opts.demo_terminals {
        None => vec!["serve".into()],
        Some(n) => vec!["demo".into(), "--terminals".into(), n.to_string()],
    };
    args.extend([
        "--data-dir".into(),
        data.root().display().to_string(),
        "--mqtt-listen".into(),
        mqtt.to_string(),
        "--api-listen".into(),
        api.to_string(),
        // Loopback, port 0 (its default is a fixed port on every interface).
        "--device-listen".into(),
        device.to_string(),
    ]);
    // The harness has one principal (the bootstrap admin token), and a second admin is
    // what two-person approval asks for; the approval flow is tested in the broker's API
    // tests. A test that passes --two-person-approval in `extra_args` decides itself.
    if !opts.extra_args.iter().any(|a| a == "--two-person-approval") {
        args.extend(["--two-person-approval".into(), "off".into()]);
    }
    args.extend(opts.extra_args.iter().cloned());
    let log_dir = tmp.path().join("logs");
    let mut process = Process::spawn_with_env(
        "pf-broker",
        &bins.broker,
        &args,
        &log_dir,
        "broker",
        &[("RUST_LOG", opts.log_filter.as_str())],
    )?;
    let deadline = Instant::now() + opts.start_timeout;
    loop {
        if let Some(status) = process.try_exited()? {
            bail!(
                "pf-broker exited during start-up ({status})\n{}",
                process.stderr_tail(TAIL_LINES)
            );
        }
        if data.client_file().exists() {
            let client = data.read_client_file()?;
            return Ok((process, client));
        }
        if Instant::now() >= deadline {
            let _ = process.kill9().await;
            bail!(
                "pf-broker did not write {} within {:?}\n{}",
                data.client_file().display(),
                opts.start_timeout,
                process.stderr_tail(TAIL_LINES)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback address whose port is free now and below the ephemeral port range (see
/// [`Broker::start`]).
fn stable_port() -> anyhow::Result<SocketAddr> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = 10_000.min(ephemeral_low / 2);
    for _ in 0..200 {
        let port = rand::random_range(low..ephemeral_low);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    Err(anyhow!("no free loopback port below {ephemeral_low}"))
}

fn addresses(client: &ClientFile) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let mqtt = client
        .mqtt_url
        .as_deref()
        .and_then(|u| u.strip_prefix("mqtts://"))
        .ok_or_else(|| anyhow!("posctl.json has no mqtts:// URL: {client:?}"))?
        .parse()
        .with_context(|| format!("posctl.json: bad mqtt_url in {client:?}"))?;
    let api = client
        .api_url
        .strip_prefix("https://")
        .ok_or_else(|| anyhow!("posctl.json has no https:// API URL: {client:?}"))?
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("posctl.json: bad api_url in {client:?}"))?;
    Ok((mqtt, api))
}

fn api_client(data: &DataDir, client: &ClientFile) -> anyhow::Result<Api> {
    let token = data.read_admin_token()?;
    Api::new(&client.api_url, &client.ca_file, token)
}
