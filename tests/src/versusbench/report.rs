//! What `fleet-bench versus` measured, and how it is printed: one Markdown table per run
//! (posfleet, Mosquitto, posfleet/Mosquitto), one `key=value` line, and with `--sizes` one
//! table over the fleet sizes.

use std::fmt;
use std::time::Duration;

use crate::host::{Machine, NofileLimit};

/// A broker under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Target {
    Posfleet,
    Mosquitto,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Posfleet => "posfleet",
            Target::Mosquitto => "mosquitto",
        }
    }
}

/// Heartbeat delays (arrival at the observer − `sent_at_ms`), nearest-rank quantiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delays {
    pub count: usize,
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub max_ms: Option<u64>,
}

impl Delays {
    pub fn from_unsorted(mut delays: Vec<u64>) -> Self {
        delays.sort_unstable();
        Self {
            count: delays.len(),
            p50_ms: quantile(&delays, 0.50),
            p99_ms: quantile(&delays, 0.99),
            max_ms: delays.last().copied(),
        }
    }
}

impl fmt::Display for Delays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        write!(
            f,
            "p50 {} / p99 {} / max {} ms ({} heartbeats)",
            ms(self.p50_ms),
            ms(self.p99_ms),
            ms(self.max_ms),
            self.count
        )
    }
}

/// Nearest-rank quantile of sorted values (`None` if empty).
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    Some(sorted[rank - 1])
}

/// `a / b`, if both are known and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// Waiting for the whole fleet to be connected.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phase {
    /// From the phase's start (simulator start; SIGKILL) to the last terminal's CONNACK.
    pub took: Option<Duration>,
    /// Most terminals connected at once.
    pub max_connected: u64,
    /// Connection attempts of all terminals in the phase (accepted and failed).
    pub attempts: u64,
}

/// The steady heartbeat window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub wall: Duration,
    /// Heartbeats the observer received in the window.
    pub observed: usize,
    /// Heartbeats the terminals queued for sending in the window (their own counters).
    pub sent: u64,
    pub delays: Delays,
    /// Broker CPU seconds in the window.
    pub broker_cpu: f64,
}

/// Broker SIGKILL, restart, everyone back.
#[derive(Debug, Clone, Copy, Default)]
pub struct Storm {
    /// SIGKILL → the new process accepts connections (posfleet: and its API answers).
    pub listening: Duration,
    /// From the SIGKILL.
    pub phase: Phase,
    /// Heartbeats sent from the SIGKILL until one heartbeat interval after all were back.
    pub delays: Delays,
}

/// One broker's run.
#[derive(Debug, Clone)]
pub struct TargetReport {
    pub target: Target,
    pub terminals: usize,
    pub processes: usize,
    pub heartbeat_interval: Duration,
    pub connect: Phase,
    pub rss_before: u64,
    pub rss_connected: u64,
    pub rss_steady: u64,
    /// Broker CPU seconds from the simulators' start until all were connected.
    pub connect_cpu: f64,
    /// Mosquitto runs: CPU seconds of the posfleet broker that issued the certificates
    /// meanwhile (in posfleet runs that work is inside `connect_cpu`).
    pub issuer_cpu: Option<f64>,
    /// All simulator processes, same span.
    pub simulator_cpu: f64,
    pub window: Window,
    pub storm: Storm,
    /// Simulators and brokers stopped gracefully.
    pub clean_stop: bool,
}

/// A figure of a [`TargetReport`]: key, label, unit, decimals, value.
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub decimals: usize,
    pub value: fn(&TargetReport) -> Option<f64>,
}

fn per_terminal_kib(r: &TargetReport, rss: u64) -> Option<f64> {
    let n = r.connect.max_connected.max(1) as f64;
    Some(rss.saturating_sub(r.rss_before) as f64 / n / 1024.0)
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

/// Every figure, in table order.
pub const FIGURES: &[Figure] = &[
    Figure {
        key: "connect_s",
        label: "all terminals connected, from simulator start",
        unit: "s",
        decimals: 2,
        value: |r| secs(r.connect.took),
    },
    Figure {
        key: "connected",
        label: "terminals connected (most at once)",
        unit: "",
        decimals: 0,
        value: |r| Some(r.connect.max_connected as f64),
    },
    Figure {
        key: "attempts_per_terminal",
        label: "connect attempts per terminal",
        unit: "",
        decimals: 3,
        value: |r| Some(r.connect.attempts as f64 / r.terminals.max(1) as f64),
    },
    Figure {
        key: "connect_cpu_ms_per_terminal",
        label: "broker CPU per terminal, connect phase",
        unit: "ms",
        decimals: 3,
        value: |r| Some(r.connect_cpu * 1e3 / r.terminals.max(1) as f64),
    },
    Figure {
        key: "issuer_cpu_ms_per_terminal",
        label: "certificate issuing CPU per terminal (separate posfleet process)",
        unit: "ms",
        decimals: 3,
        value: |r| r.issuer_cpu.map(|c| c * 1e3 / r.terminals.max(1) as f64),
    },
    Figure {
        key: "simulator_cpu_s",
        label: "simulator CPU, connect phase (all processes)",
        unit: "s",
        decimals: 1,
        value: |r| Some(r.simulator_cpu),
    },
    Figure {
        key: "rss_before_mib",
        label: "broker RSS before the terminals",
        unit: "MiB",
        decimals: 1,
        value: |r| Some(r.rss_before as f64 / f64::from(1u32 << 20)),
    },
    Figure {
        key: "rss_kib_per_terminal_connected",
        label: "broker RSS per terminal, all just connected",
        unit: "KiB",
        decimals: 1,
        value: |r| per_terminal_kib(r, r.rss_connected),
    },
    Figure {
        key: "rss_kib_per_terminal",
        label: "broker RSS per terminal, connected and idle (after the window)",
        unit: "KiB",
        decimals: 1,
        value: |r| per_terminal_kib(r, r.rss_steady),
    },
    Figure {
        key: "hb_per_s",
        label: "heartbeats received by the observer",
        unit: "/s",
        decimals: 1,
        value: |r| Some(r.window.observed as f64 / r.window.wall.as_secs_f64().max(1e-9)),
    },
    Figure {
        key: "hb_sent_per_s",
        label: "heartbeats sent by the terminals",
        unit: "/s",
        decimals: 1,
        value: |r| Some(r.window.sent as f64 / r.window.wall.as_secs_f64().max(1e-9)),
    },
    Figure {
        key: "hb_p50_ms",
        label: "heartbeat delay p50, steady",
        unit: "ms",
        decimals: 0,
        value: |r| r.window.delays.p50_ms.map(|v| v as f64),
    },
    Figure {
        key: "hb_p99_ms",
        label: "heartbeat delay p99, steady",
        unit: "ms",
        decimals: 0,
        value: |r| r.window.delays.p99_ms.map(|v| v as f64),
    },
    Figure {
        key: "window_cpu_pct",
        label: "broker CPU, steady (% of one CPU)",
        unit: "%",
        decimals: 1,
        value: |r| Some(r.window.broker_cpu * 100.0 / r.window.wall.as_secs_f64().max(1e-9)),
    },
    Figure {
        key: "window_cpu_us_per_hb",
        label: "broker CPU per heartbeat received, steady",
        unit: "µs",
        decimals: 1,
        value: |r| {
            (r.window.observed > 0).then(|| r.window.broker_cpu * 1e6 / r.window.observed as f64)
        },
    },
    Figure {
        key: "restart_listening_s",
        label: "SIGKILL → broker restarted and listening",
        unit: "s",
        decimals: 2,
        value: |r| Some(r.storm.listening.as_secs_f64()),
    },
    Figure {
        key: "reconnect_s",
        label: "SIGKILL → all terminals connected again",
        unit: "s",
        decimals: 2,
        value: |r| secs(r.storm.phase.took),
    },
    Figure {
        key: "reconnect_attempts_per_terminal",
        label: "reconnect attempts per terminal",
        unit: "",
        decimals: 3,
        value: |r| Some(r.storm.phase.attempts as f64 / r.terminals.max(1) as f64),
    },
    Figure {
        key: "storm_hb_p50_ms",
        label: "heartbeat delay p50, storm",
        unit: "ms",
        decimals: 0,
        value: |r| r.storm.delays.p50_ms.map(|v| v as f64),
    },
    Figure {
        key: "storm_hb_p99_ms",
        label: "heartbeat delay p99, storm",
        unit: "ms",
        decimals: 0,
        value: |r| r.storm.delays.p99_ms.map(|v| v as f64),
    },
    Figure {
        key: "storm_hb_count",
        label: "heartbeats observed, storm",
        unit: "",
        decimals: 0,
        value: |r| Some(r.storm.delays.count as f64),
    },
];

fn show(value: Option<f64>, figure: &Figure) -> String {
    value.map_or("-".to_owned(), |v| {
        let number = format!("{v:.*}", figure.decimals);
        if figure.unit.is_empty() {
            number
        } else {
            format!("{number} {}", figure.unit)
        }
    })
}

fn show_ratio(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |v| format!("{v:.2}"))
}

/// One fleet size: posfleet and/or Mosquitto (an error instead of figures if a run failed).
#[derive(Debug, Clone)]
pub struct VersusRun {
    pub terminals: usize,
    pub processes: usize,
    pub results: Vec<(Target, Result<TargetReport, String>)>,
}

impl VersusRun {
    fn get(&self, target: Target) -> Option<&TargetReport> {
        self.results
            .iter()
            .find(|(t, _)| *t == target)
            .and_then(|(_, r)| r.as_ref().ok())
    }

    fn value(&self, target: Target, figure: &Figure) -> Option<f64> {
        self.get(target).and_then(|r| (figure.value)(r))
    }

    /// `versus terminals=N processes=P posfleet_KEY=V ... mosquitto_KEY=V ... ratio_KEY=V`
    /// (figures that were not measured are left out).
    pub fn key_values(&self) -> String {
        let mut line = format!(
            "versus terminals={} processes={}",
            self.terminals, self.processes
        );
        for (target, result) in &self.results {
            if result.is_err() {
                line.push_str(&format!(" {}_failed=1", target.name()));
            }
        }
        let targets = [Target::Posfleet, Target::Mosquitto];
        for figure in FIGURES {
            for target in targets {
                if let Some(v) = self.value(target, figure) {
                    line.push_str(&format!(
                        " {}_{}={v:.*}",
                        target.name(),
                        figure.key,
                        figure.decimals.max(1)
                    ));
                }
            }
            let r = ratio(
                self.value(Target::Posfleet, figure),
                self.value(Target::Mosquitto, figure),
            );
            if let Some(r) = r {
                line.push_str(&format!(" ratio_{}={r:.3}", figure.key));
            }
        }
        line
    }
}

impl fmt::Display for VersusRun {
    /// The Markdown table (pasted into docs/benchmarks.md as printed).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| {} terminals, {} simulator process(es) | posfleet | Mosquitto | posfleet / Mosquitto |",
            self.terminals, self.processes
        )?;
        writeln!(f, "| --- | --- | --- | --- |")?;
        for figure in FIGURES {
            let p = self.value(Target::Posfleet, figure);
            let m = self.value(Target::Mosquitto, figure);
            writeln!(
                f,
                "| {} | {} | {} | {} |",
                figure.label,
                show(p, figure),
                show(m, figure),
                show_ratio(ratio(p, m))
            )?;
        }
        let stops: Vec<String> = self
            .results
            .iter()
            .filter_map(|(t, r)| r.as_ref().ok().map(|r| (t, r.clean_stop)))
            .map(|(t, clean)| format!("{} {}", t.name(), if clean { "yes" } else { "no" }))
            .collect();
        writeln!(f, "| graceful stop | {} | | |", stops.join(", "))?;
        for (target, result) in &self.results {
            if let Err(error) = result {
                writeln!(f, "\n{} run failed: {error}", target.name())?;
            }
        }
        Ok(())
    }
}

/// Everything one `fleet-bench versus` printed.
#[derive(Debug, Clone)]
pub struct VersusReport {
    pub machine: Machine,
    pub nofile: NofileLimit,
    /// Heartbeat interval, window length.
    pub heartbeat_interval: Duration,
    pub window: Duration,
    pub runs: Vec<VersusRun>,
}

/// The columns of the table over fleet sizes.
const SIZE_COLUMNS: &[&str] = &[
    "connect_s",
    "attempts_per_terminal",
    "connect_cpu_ms_per_terminal",
    "rss_kib_per_terminal",
    "hb_p99_ms",
    "reconnect_s",
    "reconnect_attempts_per_terminal",
    "storm_hb_p99_ms",
];

fn figure(key: &str) -> Option<&'static Figure> {
    FIGURES.iter().find(|f| f.key == key)
}

impl VersusReport {
    /// One row per fleet size and broker (`--sizes`).
    pub fn sizes_table(&self) -> String {
        let mut out = String::from("| terminals | broker |");
        let columns: Vec<&Figure> = SIZE_COLUMNS.iter().filter_map(|k| figure(k)).collect();
        for c in &columns {
            out.push_str(&format!(" {} |", c.label));
        }
        out.push_str("\n| --- | --- |");
        out.push_str(&" --- |".repeat(columns.len()));
        out.push('\n');
        for run in &self.runs {
            for (target, result) in &run.results {
                out.push_str(&format!("| {} | {} |", run.terminals, target.name()));
                for c in &columns {
                    let v = result.as_ref().ok().and_then(|r| (c.value)(r));
                    out.push_str(&format!(" {} |", show(v, c)));
                }
                out.push('\n');
            }
        }
        out
    }
}

impl fmt::Display for VersusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fleet-bench versus: posfleet and Mosquitto, same simulator"
        )?;
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "open files limit: soft {:?} -> {:?} (hard {:?}); heartbeat every {:?}, window {:?}",
            self.nofile.soft_before,
            self.nofile.soft,
            self.nofile.hard,
            self.heartbeat_interval,
            self.window
        )?;
        for run in &self.runs {
            writeln!(f)?;
            write!(f, "{run}")?;
        }
        if self.runs.len() > 1 {
            writeln!(f)?;
            write!(f, "{}", self.sizes_table())?;
        }
        writeln!(f)?;
        for run in &self.runs {
            writeln!(f, "{}", run.key_values())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
