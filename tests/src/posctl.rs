//! Runs `pf-posctl --data-dir DIR ...` the way an admin would, and captures what it prints.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::de::DeserializeOwned;

use crate::broker::Broker;

/// Bound on one posctl run (watch commands should pass their own `--timeout`, shorter).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// posctl pointed at a broker's data directory.
#[derive(Debug, Clone)]
pub struct Posctl {
    bin: PathBuf,
    data_dir: PathBuf,
    /// `--config-dir` (where `posctl login` keeps its session), never the real user's.
    config_dir: PathBuf,
}

/// What one posctl run printed.
#[derive(Debug, Clone)]
pub struct PosctlOutput {
    /// The arguments (after `--data-dir DIR`), for messages.
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Posctl {
    /// posctl with no login session (it uses the bootstrap `DATA/admin.token`): its config
    /// dir is an empty `posctl-config` beside the data dir, never the real user's.
    pub fn new(broker: &Broker) -> Self {
        let data_dir = broker.data_dir().to_owned();
        let config_dir = data_dir.with_file_name("posctl-config");
        Self {
            bin: broker.bins().posctl.clone(),
            data_dir,
            config_dir,
        }
    }

    /// The same posctl with its own `--config-dir` (one per logged-in principal).
    pub fn with_config_dir(&self, dir: impl Into<PathBuf>) -> Self {
        Self {
            config_dir: dir.into(),
            ..self.clone()
        }
    }

    /// `--config-dir`: `session.json` of `posctl login` is kept there.
    pub fn config_dir(&self) -> &std::path::Path {
        &self.config_dir
    }

    /// Runs `pf-posctl --data-dir DIR --config-dir CFG args...` (no stdin), at most
    /// [`RUN_TIMEOUT`].
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<PosctlOutput> {
        self.run_stdin(args, None).await
    }

    /// [`Posctl::run`] with `stdin` written to its standard input (`--password-stdin`
    /// answers, one per line), then closed.
    pub async fn run_stdin(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<PosctlOutput> {
        use tokio::io::AsyncWriteExt as _;
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let mut child = tokio::process::Command::new(&self.bin)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--config-dir")
            .arg(&self.config_dir)
            .args(&args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            tokio::time::timeout(RUN_TIMEOUT, pipe.write_all(text.as_bytes()))
                .await
                .map_err(|_| anyhow!("posctl {args:?} did not read its stdin"))?
                .with_context(|| format!("posctl {args:?}: writing stdin"))?;
            // Dropped: posctl sees the end of its input.
        }
        let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| anyhow!("posctl {args:?} did not finish within {RUN_TIMEOUT:?}"))?
            .with_context(|| format!("posctl {args:?}"))?;
        Ok(PosctlOutput {
            args,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs and requires exit status 0.
    pub async fn ok(&self, args: &[&str]) -> anyhow::Result<PosctlOutput> {
        let output = self.run(args).await?;
        output.success()?;
        Ok(output)
    }
}

impl PosctlOutput {
    /// Fails with everything posctl printed unless it exited 0.
    pub fn success(&self) -> anyhow::Result<()> {
        if !self.status.success() {
            bail!("{self}");
        }
        Ok(())
    }

    /// stdout as one JSON document.
    pub fn json<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not the expected JSON\n{self}"))
    }

    /// stdout as JSON lines (one document per non-empty line).
    pub fn json_lines<T: DeserializeOwned>(&self) -> anyhow::Result<Vec<T>> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .with_context(|| format!("line is not the expected JSON: {l}\n{self}"))
            })
            .collect()
    }
}

impl std::fmt::Display for PosctlOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "posctl {:?}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }
}
