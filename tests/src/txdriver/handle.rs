//! [`TxDriver`]: a `pf-txdriver` process as a test or the benchmark controls it.
//!
//! ```text
//! BROKER_TMP/scratch/txdriver/data/           the simulated terminals' outbox store
//! BROKER_TMP/scratch/txdriver/journal.jsonl   what the payment applications were told
//! BROKER_TMP/scratch/txdriver/status.json     counters and latencies, replaced every 200 ms
//! BROKER_TMP/logs/txdriver.stderr.log
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, anyhow};
use rustix::process::Signal;

use super::DriverStatus;
use super::journal::JournalReplay;
use crate::broker::Broker;
use crate::eventually::try_eventually;
use crate::process::Process;

/// How to run the driver.
#[derive(Debug, Clone)]
pub struct TxDriverOptions {
    pub count: usize,
    pub id_prefix: String,
    /// Transactions per terminal per minute.
    pub tx_rate: f64,
    pub repeat_probability: f64,
    pub connect_rate: u32,
    pub heartbeat_interval: Duration,
    pub telemetry_interval: Duration,
    pub keep_alive: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub resend_timeout: Option<Duration>,
    /// Keep the crash-proof journal (needed for exact reconciliation; costs two writes per
    /// transaction).
    pub journal: bool,
    /// `RUST_LOG` of the process.
    pub log_filter: String,
}

impl Default for TxDriverOptions {
    fn default() -> Self {
        Self {
            count: 10,
            id_prefix: "drv-".to_owned(),
            tx_rate: 60.0,
            repeat_probability: 0.01,
            connect_rate: 1000,
            heartbeat_interval: Duration::from_secs(1),
            telemetry_interval: Duration::from_secs(5),
            keep_alive: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            resend_timeout: None,
            journal: true,
            log_filter: "info,posfleet_agent::agent=warn,posfleet_runtime::mqtt=warn".to_owned(),
        }
    }
}

/// A running driver (killed on drop).
#[derive(Debug)]
pub struct TxDriver {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    log_dir: PathBuf,
    journal: Option<PathBuf>,
    /// `None` after a stop until a restart.
    process: Option<Process>,
}

impl TxDriver {
    /// Starts `program` (`pf-txdriver`) for `broker`'s fleet CA, its terminals connecting to
    /// `broker_url` (the broker's, or a proxy's).
    pub fn start(
        program: &Path,
        broker: &Broker,
        broker_url: &str,
        opts: &TxDriverOptions,
    ) -> anyhow::Result<Self> {
        let dir = broker.scratch_dir("txdriver")?;
        let journal = opts.journal.then(|| dir.join("journal.jsonl"));
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut args = vec![
            "--count".to_owned(),
            opts.count.to_string(),
            "--pki-dir".to_owned(),
            broker.pki().dir().display().to_string(),
            "--broker".to_owned(),
            broker_url.to_owned(),
            "--id-prefix".to_owned(),
            opts.id_prefix.clone(),
            "--data-dir".to_owned(),
            dir.join("data").display().to_string(),
            "--status".to_owned(),
            dir.join("status.json").display().to_string(),
            "--tx-rate".to_owned(),
            opts.tx_rate.to_string(),
            "--repeat-probability".to_owned(),
            opts.repeat_probability.to_string(),
            "--connect-rate".to_owned(),
            opts.connect_rate.to_string(),
            "--heartbeat-interval".to_owned(),
            ms(opts.heartbeat_interval),
            "--telemetry-interval".to_owned(),
            ms(opts.telemetry_interval),
            "--keep-alive".to_owned(),
            ms(opts.keep_alive),
            "--backoff-initial".to_owned(),
            ms(opts.backoff_initial),
            "--backoff-max".to_owned(),
            ms(opts.backoff_max),
        ];
        if let Some(resend) = opts.resend_timeout {
            args.extend(["--resend-timeout".to_owned(), ms(resend)]);
        }
        if let Some(path) = &journal {
            args.extend(["--journal".to_owned(), path.display().to_string()]);
        }
        let mut driver = Self {
            program: program.to_owned(),
            args,
            env: vec![("RUST_LOG".to_owned(), opts.log_filter.clone())],
            dir,
            log_dir: broker.log_dir(),
            journal,
            process: None,
        };
        driver.spawn()?;
        Ok(driver)
    }

    /// Starts it again on the same data dir and journal (after a stop or a SIGKILL): it
    /// first resubmits what the previous process left in doubt.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(process) = self.process.as_mut() {
            if process.try_exited()?.is_none() {
                anyhow::bail!(
                    "restart: the driver (pid {}) is still running",
                    process.pid()
                );
            }
        }
        self.spawn()
    }

    /// SIGKILL: every simulated terminal and payment application dies at once.
    pub async fn kill9(&mut self) -> anyhow::Result<ExitStatus> {
        self.process_mut()?.kill9().await
    }

    /// SIGTERM and wait for the graceful exit.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.process_mut()?.terminate(Duration::from_secs(30)).await
    }

    /// SIGUSR1: no new transactions (submissions in progress finish).
    pub fn stop_generating(&self) -> anyhow::Result<()> {
        self.process()?.signal(Signal::USR1)
    }

    /// The status the running process last wrote (`None` before its first write).
    pub fn status(&self) -> anyhow::Result<Option<DriverStatus>> {
        let pid = self.process()?.pid();
        let path = self.status_path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let status: DriverStatus = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a driver status", path.display()))?;
        Ok((status.pid == pid).then_some(status))
    }

    /// Waits until the running process reports a status satisfying `check`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&DriverStatus) -> bool,
    ) -> anyhow::Result<DriverStatus> {
        try_eventually(timeout, || async {
            let status = self
                .status()?
                .ok_or_else(|| anyhow!("the driver has not written its status yet"))?;
            anyhow::ensure!(check(&status), "driver not {what} yet: {status:?}");
            Ok(status)
        })
        .await
    }

    /// What the journal says (the ground truth once every driver has finished).
    pub fn journal(&self) -> anyhow::Result<JournalReplay> {
        let path = self
            .journal
            .as_ref()
            .ok_or_else(|| anyhow!("the driver runs without a journal"))?;
        JournalReplay::load(path)
    }

    /// The simulated terminals' outbox store.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn status_path(&self) -> PathBuf {
        self.dir.join("status.json")
    }

    pub fn process(&self) -> anyhow::Result<&Process> {
        self.process
            .as_ref()
            .ok_or_else(|| anyhow!("the driver is not running"))
    }

    fn process_mut(&mut self) -> anyhow::Result<&mut Process> {
        self.process
            .as_mut()
            .ok_or_else(|| anyhow!("the driver is not running"))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.process = Some(Process::spawn_with_env(
            "pf-txdriver",
            &self.program,
            &self.args,
            &self.log_dir,
            "txdriver",
            &env,
        )?);
        Ok(())
    }
}
