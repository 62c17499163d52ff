//! Terminal hooks: executables the agent runs to act on the device (apply a configuration,
//! show a lock screen, reboot, collect logs, wipe what the agent does not own).
//!
//! A hook runs without a shell, with stdin closed, a fixed `PATH` and only the `POSFLEET_*`
//! variables of its command (plus `POSFLEET_DEVICE_ID`). Its stdout is captured up to a limit
//! (more is read and discarded), its stderr up to [`STDERR_TAIL`] for the agent's log. It is
//! killed when [`HookSettings::timeout`] passes. Examples: `deploy/hooks/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::debug;

/// Default time a hook may run.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// Stderr bytes kept for the log.
const STDERR_TAIL: usize = 2048;
/// `PATH` of every hook.
const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Attempts when the executable is momentarily busy (ETXTBSY: it was just written).
const SPAWN_ATTEMPTS: u32 = 5;

/// The configured hooks (`[hooks]`); a missing one means "nothing to run".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSettings {
    pub config_apply: Option<PathBuf>,
    pub lock: Option<PathBuf>,
    pub unlock: Option<PathBuf>,
    pub wipe: Option<PathBuf>,
    pub reboot: Option<PathBuf>,
    pub collect_logs: Option<PathBuf>,
    /// Installs a verified update artifact (SoftwareUpdate).
    pub install: Option<PathBuf>,
    /// Undoes an update (failed install or confirmation, RollbackUpdate).
    pub rollback: Option<PathBuf>,
    /// Confirms health after an update (optional; exit 0 = healthy).
    pub health: Option<PathBuf>,
    /// How long any hook may run before it is killed.
    pub timeout: Duration,
}

impl Default for HookSettings {
    fn default() -> Self {
        Self {
            config_apply: None,
            lock: None,
            unlock: None,
            wipe: None,
            reboot: None,
            collect_logs: None,
            install: None,
            rollback: None,
            health: None,
            timeout: DEFAULT_HOOK_TIMEOUT,
        }
    }
}

/// How a hook run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookExit {
    /// Exited with this code.
    Code(i32),
    /// Killed by a signal (not by us).
    Signal,
    /// Still running at the timeout; killed.
    TimedOut,
    /// Could not be started.
    SpawnFailed(String),
}

/// What a hook run produced.
#[derive(Debug, Clone)]
pub struct HookRun {
    pub exit: HookExit,
    /// Stdout up to the requested limit.
    pub stdout: Vec<u8>,
}

impl HookRun {
    pub fn succeeded(&self) -> bool {
        self.exit == HookExit::Code(0)
    }

    /// For `CommandResult.details["hook_exit"]`: the exit code, `signal`, `timeout` or
    /// `spawn_failed`.
    pub fn exit_detail(&self) -> String {
        match &self.exit {
            HookExit::Code(code) => code.to_string(),
            HookExit::Signal => "signal".into(),
            HookExit::TimedOut => "timeout".into(),
            HookExit::SpawnFailed(_) => "spawn_failed".into(),
        }
    }

    /// For people: how the hook ended.
    pub fn describe(&self) -> String {
        match &self.exit {
            HookExit::Code(code) => format!("exited with status {code}"),
            HookExit::Signal => "was killed by a signal".into(),
            HookExit::TimedOut => "did not finish in time and was killed".into(),
            HookExit::SpawnFailed(why) => format!("could not be started ({why})"),
        }
    }
}

/// Runs `path` with `env`, capturing at most `stdout_limit` bytes of stdout.
pub async fn run(
    path: &Path,
    env: &[(&str, String)],
    timeout: Duration,
    stdout_limit: usize,
) -> HookRun {
    let mut child = match spawn(path, env).await {
        Ok(child) => child,
        Err(error) => {
            return HookRun {
                exit: HookExit::SpawnFailed(error.kind().to_string()),
                stdout: Vec::new(),
            };
        }
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let finished = tokio::time::timeout(timeout, async {
        let (_, _, status) = tokio::join!(
            read_capped(stdout, &mut out, stdout_limit),
            read_capped(stderr, &mut err, STDERR_TAIL),
            child.wait()
        );
        status
    })
    .await;
    let exit = match finished {
        Ok(Ok(status)) => status.code().map_or(HookExit::Signal, HookExit::Code),
        Ok(Err(error)) => HookExit::SpawnFailed(error.kind().to_string()),
        Err(_) => {
            // Kill and reap; a grandchild that keeps our pipes open no longer matters (we
            // stopped reading them).
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            HookExit::TimedOut
        }
    };
    if !err.is_empty() {
        debug!(hook = %path.display(), stderr = %String::from_utf8_lossy(&err), "hook stderr");
    }
    HookRun { exit, stdout: out }
}

async fn spawn(path: &Path, env: &[(&str, String)]) -> std::io::Result<tokio::process::Child> {
    let mut attempt = 1;
    loop {
        let mut command = tokio::process::Command::new(path);
        command
            .env_clear()
            .env("PATH", HOOK_PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        match command.spawn() {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && attempt < SPAWN_ATTEMPTS =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Reads `from` to its end, keeping the first `limit` bytes.
async fn read_capped(from: Option<impl AsyncRead + Unpin>, into: &mut Vec<u8>, limit: usize) {
    let Some(mut from) = from else {
        return;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = limit.saturating_sub(into.len());
                into.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn exit_codes_output_env_and_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let ok = script(
            tmp.path(),
            "ok",
            "printf '%s' \"$POSFLEET_X\"; echo oops >&2",
        );
        let run = run(
            &ok,
            &[("POSFLEET_X", "hello".into())],
            Duration::from_secs(10),
            3,
        )
        .await;
        assert!(run.succeeded());
        assert_eq!(run.stdout, b"hel", "stdout is capped");

        let fail = script(tmp.path(), "fail", "exit 7");
        let r = super::run(&fail, &[], Duration::from_secs(10), 10).await;
        assert_eq!(
            (r.exit.clone(), r.exit_detail()),
            (HookExit::Code(7), "7".into())
        );

        let missing = super::run(&tmp.path().join("nope"), &[], Duration::from_secs(1), 10).await;
        assert!(matches!(missing.exit, HookExit::SpawnFailed(_)));
        assert!(!missing.succeeded());
    }

    #[tokio::test]
    async fn a_hanging_hook_is_killed_at_the_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let hang = script(tmp.path(), "hang", "exec sleep 30");
        let started = std::time::Instant::now();
        let r = run(&hang, &[], Duration::from_millis(200), 10).await;
        assert_eq!(r.exit, HookExit::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
