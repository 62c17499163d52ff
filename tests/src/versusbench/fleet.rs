//! The simulated fleet of `fleet-bench versus`: P `pf-agent simulate` processes (the
//! open-files limit is per process), each with its own id prefix and share of the terminals,
//! each printing a `posfleet-sim-report` line every [`REPORT_EVERY`] on stdout, which this
//! module reads back from the stdout log.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use posfleet_agent::simulate::FleetConnections;

use crate::broker::Broker;
use crate::host::cpu_seconds;
use crate::process::{Process, TAIL_LINES};

/// How often each simulator reports.
pub(crate) const REPORT_EVERY: &str = "100ms";
/// How often the reports are read while waiting.
const POLL: Duration = Duration::from_millis(100);

/// How the fleet is run (common to every simulator process).
#[derive(Debug, Clone)]
pub(crate) struct FleetSpec {
    pub(crate) terminals: usize,
    pub(crate) processes: usize,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) telemetry_interval: Duration,
    /// Terminals started per second, over all processes.
    pub(crate) connect_rate: u32,
}

impl FleetSpec {
    /// Terminals of process `p`: an even split, the first ones take the remainder.
    pub(crate) fn share(&self, p: usize) -> usize {
        let base = self.terminals / self.processes;
        base + usize::from(p < self.terminals % self.processes)
    }
}

/// One simulator process and the reader of its report lines.
struct Simulator {
    process: Process,
    stdout: PathBuf,
    /// Bytes of the stdout log read so far.
    offset: u64,
    /// An incomplete last line, completed by the next read.
    partial: String,
    last: Option<FleetConnections>,
}

impl Simulator {
    /// Reads the lines written since the last call; keeps the newest report.
    fn read_reports(&mut self) -> anyhow::Result<()> {
        let mut file = std::fs::File::open(&self.stdout)
            .with_context(|| format!("cannot open {}", self.stdout.display()))?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut text = String::new();
        let read = file.read_to_string(&mut text)?;
        self.offset += read as u64;
        self.partial.push_str(&text);
        if let Some(end) = self.partial.rfind('\n') {
            let complete: String = self.partial.drain(..=end).collect();
            if let Some(report) = complete
                .lines()
                .rev()
                .find_map(|l| FleetConnections::parse_line(l).ok())
            {
                self.last = Some(report);
            }
        }
        Ok(())
    }
}

/// The running simulators (killed on drop).
pub(crate) struct Fleet {
    sims: Vec<Simulator>,
}

/// The whole fleet at one moment: the sum of the processes' latest reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FleetView {
    pub(crate) count: u64,
    pub(crate) connected: u64,
    pub(crate) connects: u64,
    pub(crate) attempts: u64,
    pub(crate) heartbeats: u64,
    /// Every process reported all of its terminals connected since the mark, and the latest
    /// of their last CONNACKs (ms since the epoch).
    pub(crate) all_connected_at_ms: Option<u64>,
}

/// Sums the latest reports; `all_connected_at_ms` only if every process has reported and all
/// of its terminals connected at or after `since_ms`.
pub(crate) fn combine(reports: &[Option<FleetConnections>], since_ms: u64) -> FleetView {
    let mut view = FleetView::default();
    let mut all = !reports.is_empty();
    let mut newest = 0;
    for report in reports {
        match report {
            Some(r) => {
                view.count += r.count;
                view.connected += r.connected;
                view.connects += r.connects;
                view.attempts += r.attempts;
                view.heartbeats += r.heartbeats;
                all &= r.all_connected_since(since_ms);
                newest = newest.max(r.newest_connack_ms);
            }
            None => all = false,
        }
    }
    view.all_connected_at_ms = all.then_some(newest);
    view
}

/// What one wait for the whole fleet saw.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wait {
    /// When the last terminal connected (ms since the epoch), if all did in time.
    pub(crate) all_connected_at_ms: Option<u64>,
    /// Most terminals connected at once during the wait.
    pub(crate) max_connected: u64,
    /// The fleet when the wait ended.
    pub(crate) view: FleetView,
}

impl Fleet {
    /// Starts `spec.processes` simulators against `broker_url`, with certificates issued and
    /// recorded by `issuer` (a posfleet broker's admin API).
    pub(crate) fn start(
        issuer: &Broker,
        broker_url: &str,
        spec: &FleetSpec,
    ) -> anyhow::Result<Self> {
        let pki = issuer.pki().dir().display().to_string();
        let hb = format!("{}ms", spec.heartbeat_interval.as_millis());
        let tm = format!("{}ms", spec.telemetry_interval.as_millis());
        let rate = (spec.connect_rate / spec.processes as u32)
            .max(1)
            .to_string();
        let mut sims = Vec::with_capacity(spec.processes);
        for p in 0..spec.processes {
            let count = spec.share(p).to_string();
            let prefix = format!("vs{p}-");
            let data_dir = issuer
                .scratch_dir(&format!("simulator-{p}"))?
                .display()
                .to_string();
            let args = [
                "simulate",
                "--count",
                &count,
                "--pki-dir",
                &pki,
                "--broker",
                broker_url,
                "--id-prefix",
                &prefix,
                "--heartbeat-interval",
                &hb,
                "--telemetry-interval",
                &tm,
                "--connect-rate",
                &rate,
                "--tx-rate",
                "0",
                "--data-dir",
                &data_dir,
                "--report-every",
                REPORT_EVERY,
            ];
            let process = Process::spawn_with_env(
                format!("pf-agent simulate #{p}"),
                &issuer.bins().agent,
                args,
                &issuer.log_dir(),
                &format!("simulate-{p}"),
                &[("RUST_LOG", "warn")],
            )?;
            let stdout = process.stdout_log().to_owned();
            sims.push(Simulator {
                process,
                stdout,
                offset: 0,
                partial: String::new(),
                last: None,
            });
        }
        Ok(Self { sims })
    }

    /// Reads every simulator's new report lines; fails if one has exited.
    pub(crate) fn view(&mut self, since_ms: u64) -> anyhow::Result<FleetView> {
        for sim in &mut self.sims {
            if let Some(status) = sim.process.try_exited()? {
                bail!(
                    "{} exited ({status})\n{}",
                    sim.process.name(),
                    sim.process.stderr_tail(TAIL_LINES)
                );
            }
            sim.read_reports()?;
        }
        let reports: Vec<_> = self.sims.iter().map(|s| s.last).collect();
        Ok(combine(&reports, since_ms))
    }

    /// Waits until every terminal has connected at or after `since_ms`, at most `timeout`.
    pub(crate) async fn wait_all_connected(
        &mut self,
        since_ms: u64,
        timeout: Duration,
    ) -> anyhow::Result<Wait> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut wait = Wait::default();
        loop {
            let view = self.view(since_ms)?;
            wait.max_connected = wait.max_connected.max(view.connected);
            wait.view = view;
            if view.all_connected_at_ms.is_some() {
                wait.all_connected_at_ms = view.all_connected_at_ms;
                return Ok(wait);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(wait);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// CPU seconds of all simulator processes so far.
    pub(crate) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        self.sims.iter().map(|s| cpu_seconds(s.process.pid())).sum()
    }

    /// SIGTERM to every simulator (each terminal says goodbye), then waits for all.
    pub(crate) async fn stop(&mut self, timeout: Duration) -> bool {
        for sim in &self.sims {
            let _ = sim.process.signal(rustix::process::Signal::TERM);
        }
        let mut clean = true;
        for sim in &mut self.sims {
            clean &= matches!(sim.process.terminate(timeout).await, Ok(s) if s.success());
        }
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(count: u64, connected: u64, oldest: u64, newest: u64) -> FleetConnections {
        FleetConnections {
            at_ms: 5_000,
            count,
            started: count,
            connected,
            connects: connected,
            attempts: connected + 1,
            oldest_connack_ms: oldest,
            newest_connack_ms: newest,
            heartbeats: 10,
        }
    }

    #[test]
    fn shares_split_the_fleet_evenly() {
        let spec = FleetSpec {
            terminals: 19_001,
            processes: 3,
            heartbeat_interval: Duration::from_secs(10),
            telemetry_interval: Duration::from_secs(60),
            connect_rate: 1000,
        };
        let shares: Vec<usize> = (0..3).map(|p| spec.share(p)).collect();
        assert_eq!(shares, [6334, 6334, 6333]);
        assert_eq!(shares.iter().sum::<usize>(), 19_001);
    }

    #[test]
    fn the_fleet_is_all_connected_only_when_every_process_is() {
        let a = report(100, 100, 1_000, 1_500);
        let b = report(50, 50, 1_200, 2_100);
        let view = combine(&[Some(a), Some(b)], 0);
        assert_eq!((view.count, view.connected, view.attempts), (150, 150, 152));
        assert_eq!(view.all_connected_at_ms, Some(2_100));
        // After a mark (a broker restart at 1_100), process a's oldest connection predates it.
        assert_eq!(
            combine(&[Some(a), Some(b)], 1_100).all_connected_at_ms,
            None
        );
        // One process short of a terminal, or one that has not reported yet.
        let short = report(50, 49, 1_200, 2_100);
        assert_eq!(
            combine(&[Some(a), Some(short)], 0).all_connected_at_ms,
            None
        );
        assert_eq!(combine(&[Some(a), None], 0).all_connected_at_ms, None);
        assert_eq!(combine(&[], 0).all_connected_at_ms, None);
    }
}
