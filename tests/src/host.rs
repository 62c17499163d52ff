//! Facts about the machine and processes the benchmark reports: file descriptor limit,
//! resident memory of a process, CPU and memory of the host (Linux `/proc`).

use std::fmt;

use anyhow::{Context, anyhow};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The open-files limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft_before: Option<u64>,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit. Child processes inherit it,
/// so do this before starting the broker and the simulator.
pub fn raise_nofile_limit() -> anyhow::Result<NofileLimit> {
    let before = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        },
    )
    .context("cannot raise the open-files limit (RLIMIT_NOFILE)")?;
    let after = getrlimit(Resource::Nofile);
    Ok(NofileLimit {
        soft_before: before.current,
        soft: after.current,
        hard: after.maximum,
    })
}

/// Resident set size of process `pid` (`VmRSS` of `/proc/PID/status`), in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    kib_field(&status, "VmRSS:")
        .map(|kib| kib * 1024)
        .ok_or_else(|| anyhow!("{path} has no VmRSS line"))
}

/// CPU time (user + system) process `pid` has used so far, in seconds (`/proc/PID/stat`).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("{path} is not in the expected format"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of stat(5); `after` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("{path}: field {i} missing"))
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(total as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// The host: CPU model and count, total memory, kernel.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    pub kernel: String,
}

impl Machine {
    /// What `/proc` says (fields it cannot read stay empty/zero).
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = kib_field(&meminfo, "MemTotal:").map_or(0, |kib| kib * 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        Self {
            cpu_model,
            cpus,
            memory_bytes,
            kernel,
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} CPUs ({}), {:.1} GiB RAM, Linux {}",
            self.cpus,
            if self.cpu_model.is_empty() {
                "unknown model"
            } else {
                &self.cpu_model
            },
            self.memory_bytes as f64 / f64::from(1u32 << 30),
            self.kernel
        )
    }
}

/// The number of a `Name:   1234 kB` line.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_rss_and_the_machine() {
        let rss = rss_bytes(std::process::id()).expect("own VmRSS");
        assert!(rss > 1024 * 1024, "{rss}");
        let cpu = cpu_seconds(std::process::id()).expect("own CPU time");
        assert!(cpu >= 0.0, "{cpu}");
        let machine = Machine::describe();
        assert!(machine.cpus >= 1 && machine.memory_bytes > 0, "{machine:?}");
    }

    #[test]
    fn kib_fields_parse() {
        let text = "Name:\tx\nVmRSS:\t  2048 kB\n";
        assert_eq!(kib_field(text, "VmRSS:"), Some(2048));
        assert_eq!(kib_field(text, "VmHWM:"), None);
    }
}
