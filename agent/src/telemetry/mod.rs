//! Telemetry providers: where the numbers in a `pb::Telemetry` come from.
//!
//! - [`SystemProvider`]: CPU, memory, disk, uptime, load. [`OsSystem`] reads the host via
//!   sysinfo; [`SimulatedSystem`] makes plausible numbers for the simulator.
//! - [`SensorProvider`]: terminal sensors (battery, temperature, network, printer paper, card
//!   reader, tamper). [`SimulatedSensors`] is a seeded, slowly varying model of a terminal;
//!   [`NoSensors`] reports none. A hardware provider implements the same trait.

mod sensors;
mod system;

use posfleet_proto::pb;

pub use sensors::{NoSensors, SimulatedSensors};
pub use system::{OsSystem, SimulatedSystem};

/// System metrics of the terminal.
pub trait SystemProvider: Send + 'static {
    /// One sample. May be called at any interval; rates (CPU %) cover the time since the
    /// previous call.
    fn sample(&mut self) -> pb::SystemMetrics;

    /// True if [`SystemProvider::sample`] reads the operating system and may block for a
    /// moment; the agent then samples it on the blocking thread pool.
    fn blocking(&self) -> bool {
        false
    }
}

/// Terminal sensors. Fields the terminal has no sensor for stay `None` / unspecified.
pub trait SensorProvider: Send + 'static {
    fn sample(&mut self) -> pb::Sensors;
}

/// Probability that an event with mean time `mean_s` between occurrences happens within
/// `dt_s` seconds (Poisson process).
fn chance(dt_s: f64, mean_s: f64) -> f64 {
    if mean_s <= 0.0 {
        return 1.0;
    }
    1.0 - (-dt_s / mean_s).exp()
}

/// Seconds simulated per internal step: long gaps are replayed in steps of this size.
const STEP_S: f64 = 10.0;
/// Longest gap replayed (a day); anything longer is treated as a day.
const MAX_REPLAY_S: f64 = 86_400.0;

/// Splits `dt_s` into steps of at most [`STEP_S`] and calls `step` for each.
fn replay(dt_s: f64, mut step: impl FnMut(f64)) {
    let mut left = dt_s.clamp(0.0, MAX_REPLAY_S);
    while left > 0.0 {
        let dt = left.min(STEP_S);
        step(dt);
        left -= dt;
    }
}
