//! The simulator's machine-readable connection report (`simulate --report-every`): one line
//! on stdout per period, read by benchmarks (`fleet-bench versus` in the tests crate) to see
//! the fleet from the terminals' side, whatever broker they talk to.
//!
//! ```text
//! posfleet-sim-report at_ms=1718000000123 count=1000 started=1000 connected=998 connects=1003 attempts=1010 oldest_connack_ms=1718000000001 newest_connack_ms=1718000000120 heartbeats=4000
//! ```
//!
//! Times are wall-clock milliseconds since the Unix epoch, so a reader on the same host can
//! compare them with its own clock; the connect times come from each terminal's last accepted
//! CONNACK, so they are exact whatever the report period.

use std::collections::BTreeMap;

use super::SimulatorHandle;

/// First word of every report line.
pub const REPORT_PREFIX: &str = "posfleet-sim-report";

/// The simulated fleet's connections at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetConnections {
    /// When this was taken, ms since the Unix epoch.
    pub at_ms: u64,
    /// Terminals this simulator runs (started or not).
    pub count: u64,
    /// Terminals started so far.
    pub started: u64,
    /// Terminals connected right now (CONNACK accepted, connection not lost since).
    pub connected: u64,
    /// Accepted CONNACKs, all terminals, since start.
    pub connects: u64,
    /// Connection attempts (accepted or failed), all terminals, since start.
    pub attempts: u64,
    /// Earliest last CONNACK among the connected terminals (ms since the epoch; 0: none).
    pub oldest_connack_ms: u64,
    /// Latest last CONNACK among the connected terminals (ms since the epoch; 0: none).
    pub newest_connack_ms: u64,
    /// Heartbeats queued for sending, all terminals, since start.
    pub heartbeats: u64,
}

/// Why a report line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportLineError {
    #[error("not a simulator report line")]
    NotAReport,
    #[error("report field {field}: missing or not a number")]
    Field { field: &'static str },
}

impl FleetConnections {
    /// Every terminal is connected and connected last at or after `since_ms`: all of them
    /// have (re)connected since then.
    pub fn all_connected_since(&self, since_ms: u64) -> bool {
        self.count > 0
            && self.connected == self.count
            && self.oldest_connack_ms >= since_ms
            && self.oldest_connack_ms > 0
    }

    /// The report line (without a newline).
    pub fn to_line(&self) -> String {
        format!(
            "{REPORT_PREFIX} at_ms={} count={} started={} connected={} connects={} attempts={} \
             oldest_connack_ms={} newest_connack_ms={} heartbeats={}",
            self.at_ms,
            self.count,
            self.started,
            self.connected,
            self.connects,
            self.attempts,
            self.oldest_connack_ms,
            self.newest_connack_ms,
            self.heartbeats
        )
    }

    /// Reads a line written by [`FleetConnections::to_line`]; unknown fields are ignored (a
    /// newer simulator may add some).
    pub fn parse_line(line: &str) -> Result<Self, ReportLineError> {
        let mut words = line.split_whitespace();
        if words.next() != Some(REPORT_PREFIX) {
            return Err(ReportLineError::NotAReport);
        }
        let fields: BTreeMap<&str, &str> = words.filter_map(|w| w.split_once('=')).collect();
        let get = |field: &'static str| -> Result<u64, ReportLineError> {
            fields
                .get(field)
                .and_then(|v| v.parse().ok())
                .ok_or(ReportLineError::Field { field })
        };
        Ok(Self {
            at_ms: get("at_ms")?,
            count: get("count")?,
            started: get("started")?,
            connected: get("connected")?,
            connects: get("connects")?,
            attempts: get("attempts")?,
            oldest_connack_ms: get("oldest_connack_ms")?,
            newest_connack_ms: get("newest_connack_ms")?,
            heartbeats: get("heartbeats")?,
        })
    }
}

impl SimulatorHandle {
    /// The fleet's connections now (one pass over the started terminals).
    pub fn connections(&self) -> FleetConnections {
        let mut report = FleetConnections {
            at_ms: posfleet_proto::now_ms(),
            count: self.ids.len() as u64,
            ..FleetConnections::default()
        };
        let mut oldest = u64::MAX;
        let agents = self.lock();
        report.started = agents.len() as u64;
        for agent in agents.iter() {
            let session = agent.mqtt().stats();
            report.connects += session.connects;
            report.attempts += session.attempts();
            report.heartbeats += agent.stats().heartbeats;
            if agent.is_connected() {
                report.connected += 1;
                oldest = oldest.min(session.last_connack_ms);
                report.newest_connack_ms = report.newest_connack_ms.max(session.last_connack_ms);
            }
        }
        report.oldest_connack_ms = if report.connected == 0 { 0 } else { oldest };
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FleetConnections {
        FleetConnections {
            at_ms: 1_718_000_000_123,
            count: 1000,
            started: 1000,
            connected: 1000,
            connects: 1003,
            attempts: 1010,
            oldest_connack_ms: 1_718_000_000_001,
            newest_connack_ms: 1_718_000_000_120,
            heartbeats: 4000,
        }
    }

    #[test]
    fn report_lines_round_trip_and_refuse_other_lines() {
        let report = sample();
        let line = report.to_line();
        assert!(line.starts_with("posfleet-sim-report at_ms=1718000000123 count=1000 "));
        assert_eq!(FleetConnections::parse_line(&line), Ok(report));
        // A newer simulator's extra field is ignored.
        assert_eq!(
            FleetConnections::parse_line(&format!("{line} future=7")),
            Ok(report)
        );
        assert_eq!(
            FleetConnections::parse_line("2024-06-10T00:00:00Z INFO simulator status"),
            Err(ReportLineError::NotAReport)
        );
        assert_eq!(
            FleetConnections::parse_line(&line.replace("attempts=1010", "attempts=x")),
            Err(ReportLineError::Field { field: "attempts" })
        );
    }

    #[test]
    fn all_connected_since_needs_every_terminal_reconnected_after_the_mark() {
        let report = sample();
        assert!(report.all_connected_since(0));
        assert!(report.all_connected_since(1_718_000_000_001));
        // One terminal's connection is older than the mark: not all are back yet.
        assert!(!report.all_connected_since(1_718_000_000_002));
        let missing = FleetConnections {
            connected: 999,
            ..report
        };
        assert!(!missing.all_connected_since(0));
        assert!(!FleetConnections::default().all_connected_since(0));
    }
}
