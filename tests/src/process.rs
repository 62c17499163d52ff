//! A child process under test: output captured to log files, killed when dropped, and every
//! wait on it bounded.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use rustix::process::{Pid, Signal, kill_process};

/// Longest a killed process may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of stderr shown when a process misbehaves.
pub const TAIL_LINES: usize = 40;

/// A running (or exited) child process.
#[derive(Debug)]
pub struct Process {
    /// Shown in errors, e.g. `pf-broker` or `pf-agent T-1`.
    name: String,
    /// `kill_on_drop`: a test that fails half-way never leaves a process behind.
    child: tokio::process::Child,
    /// Kept after exit, for signals and diagnostics.
    pid: u32,
    /// Where stdout goes (appended across restarts).
    stdout_log: PathBuf,
    /// Where stderr (the tracing logs) goes (appended across restarts).
    stderr_log: PathBuf,
}

impl Process {
    /// Spawns `program args...` with stdin closed and stdout/stderr appended to
    /// `log_dir/{log_name}.stdout.log` / `.stderr.log`.
    pub fn spawn<I, S>(
        name: impl Into<String>,
        program: &Path,
        args: I,
        log_dir: &Path,
        log_name: &str,
    ) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with_env(name, program, args, log_dir, log_name, &[])
    }

    /// [`Process::spawn`] with extra environment variables for the child.
    pub fn spawn_with_env<I, S>(
        name: impl Into<String>,
        program: &Path,
        args: I,
        log_dir: &Path,
        log_name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let name = name.into();
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        let stdout_log = log_dir.join(format!("{log_name}.stdout.log"));
        let stderr_log = log_dir.join(format!("{log_name}.stderr.log"));
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let banner = format!(
            "==== {} {}\n",
            program.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let stdout = open_log(&stdout_log, &banner)?;
        let stderr = open_log(&stderr_log, &banner)?;
        let child = tokio::process::Command::new(program)
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{name} exited before its pid could be read"))?;
        Ok(Self {
            name,
            child,
            pid,
            stdout_log,
            stderr_log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn stdout_log(&self) -> &Path {
        &self.stdout_log
    }

    pub fn stderr_log(&self) -> &Path {
        &self.stderr_log
    }

    /// The exit status if the process has exited (without waiting).
    pub fn try_exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("cannot check whether {} is running", self.name))
    }

    /// SIGKILL, then reaps the process.
    pub async fn kill9(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_exited()? {
            return Ok(status);
        }
        self.child
            .start_kill()
            .with_context(|| format!("cannot SIGKILL {}", self.name))?;
        self.wait(REAP_TIMEOUT).await
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit (graceful shutdown).
    /// On timeout the process is SIGKILLed and an error returned.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_exited()? {
            return Ok(status);
        }
        self.signal(Signal::TERM)?;
        match self.wait(timeout).await {
            Ok(status) => Ok(status),
            Err(error) => {
                let _ = self.kill9().await;
                Err(error.context(format!("{} ignored SIGTERM", self.name)))
            }
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = i32::try_from(self.pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| anyhow!("{} has an invalid pid {}", self.name, self.pid))?;
        kill_process(pid, signal)
            .with_context(|| format!("cannot signal {} (pid {})", self.name, self.pid))
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("cannot wait for {}", self.name)),
            Err(_) => bail!(
                "{} (pid {}) still running after {timeout:?}\n{}",
                self.name,
                self.pid,
                self.stderr_tail(TAIL_LINES)
            ),
        }
    }

    /// The last `lines` lines of the process's stderr log, labelled, for error messages.
    pub fn stderr_tail(&self, lines: usize) -> String {
        format!(
            "--- last {lines} lines of {} ---\n{}",
            self.stderr_log.display(),
            tail(&self.stderr_log, lines)
        )
    }
}

/// The last `lines` lines of a text file ("" if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn open_log(path: &Path, banner: &str) -> anyhow::Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open log file {}", path.display()))?;
    file.write_all(banner.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(file)
}
