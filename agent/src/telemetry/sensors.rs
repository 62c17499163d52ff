//! Sensor providers: a simulated terminal and "no sensors".

use std::time::Duration;

use posfleet_proto::pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::{SensorProvider, chance, replay};

/// Reports no sensors at all.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSensors;

impl SensorProvider for NoSensors {
    fn sample(&mut self) -> pb::Sensors {
        pb::Sensors::default()
    }
}

const MINUTE: f64 = 60.0;
const HOUR: f64 = 3_600.0;
const DAY: f64 = 86_400.0;

/// A seeded model of one terminal's sensors, varying slowly with (real or replayed) time:
///
/// - battery drains in use (~0.25 %/min), goes on the charger when low (or now and then
///   anyway), charges (~1.2 %/min) and comes off when nearly full;
/// - temperature wanders between 25 and 45 °C, warmer while charging;
/// - network is Wi-Fi (about 60 % of terminals, -35..-85 dBm) or 4G (-65..-115 dBm);
/// - printer paper goes ok → low → out and is refilled (hours between changes);
/// - the card reader is occasionally degraded, rarely faulty, and recovers;
/// - tamper never triggers unless a rate is set ([`SimulatedSensors::with_tamper_rate`]); once
///   triggered it stays (tamper switches latch until serviced).
#[derive(Debug, Clone)]
pub struct SimulatedSensors {
    rng: StdRng,
    last: Instant,
    battery: f64,
    charging: bool,
    temperature: f64,
    network: pb::NetworkType,
    signal: f64,
    paper: pb::PaperState,
    card_reader: pb::CardReaderState,
    tamper: bool,
    tamper_per_day: f64,
}

impl SimulatedSensors {
    /// A terminal whose behaviour is determined by `seed` (use the device index or id hash).
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5e45_0125);
        let network = if rng.random_bool(0.6) {
            pb::NetworkType::Wifi
        } else {
            pb::NetworkType::Cellular4g
        };
        let (lo, hi) = signal_range(network);
        Self {
            battery: rng.random_range(40.0..100.0),
            charging: rng.random_bool(0.2),
            temperature: rng.random_range(28.0..36.0),
            signal: rng.random_range(lo + 10.0..hi - 10.0),
            paper: if rng.random_bool(0.85) {
                pb::PaperState::Ok
            } else {
                pb::PaperState::Low
            },
            card_reader: pb::CardReaderState::Ok,
            tamper: false,
            tamper_per_day: 0.0,
            network,
            rng,
            last: Instant::now(),
        }
    }

    /// Expected tamper events per day (default 0: never). For demos of the tamper alarm.
    pub fn with_tamper_rate(mut self, per_day: f64) -> Self {
        self.tamper_per_day = per_day.max(0.0);
        self
    }

    /// Moves the model forward by `dt` (long gaps are replayed in steps, capped at a day).
    pub fn advance(&mut self, dt: Duration) {
        replay(dt.as_secs_f64(), |dt| self.step(dt));
    }

    /// The current readings, without advancing.
    pub fn reading(&self) -> pb::Sensors {
        pb::Sensors {
            // One decimal is all a battery gauge or thermistor is worth.
            battery_percent: Some(round1(self.battery)),
            charging: Some(self.charging),
            temperature_c: Some(round1(self.temperature)),
            network: self.network.into(),
            signal_dbm: Some(self.signal.round() as i32),
            paper: self.paper.into(),
            card_reader: self.card_reader.into(),
            tamper: self.tamper,
        }
    }

    fn step(&mut self, dt: f64) {
        self.step_battery(dt);
        let target = if self.charging { 36.0 } else { 32.0 };
        self.temperature += (target - self.temperature) * (dt / (20.0 * MINUTE)).min(1.0)
            + self.noise(0.15 * (dt / MINUTE).sqrt());
        self.temperature = self.temperature.clamp(25.0, 45.0);

        let (lo, hi) = signal_range(self.network);
        let mid = (lo + hi) / 2.0;
        self.signal += (mid - self.signal) * (dt / (30.0 * MINUTE)).min(1.0)
            + self.noise(1.5 * (dt / MINUTE).sqrt());
        self.signal = self.signal.clamp(lo, hi);

        use pb::CardReaderState as Reader;
        use pb::PaperState as Paper;
        self.paper = match self.paper {
            Paper::Ok => self.maybe(dt, 8.0 * HOUR, Paper::Low, Paper::Ok),
            Paper::Low => {
                let refilled = self.maybe(dt, 2.0 * HOUR, Paper::Ok, Paper::Low);
                if refilled == Paper::Low {
                    self.maybe(dt, 1.5 * HOUR, Paper::Out, Paper::Low)
                } else {
                    refilled
                }
            }
            Paper::Out => self.maybe(dt, 20.0 * MINUTE, Paper::Ok, Paper::Out),
            other => other,
        };
        self.card_reader = match self.card_reader {
            Reader::Ok => self.maybe(dt, 3.0 * DAY, Reader::Degraded, Reader::Ok),
            Reader::Degraded => {
                let recovered = self.maybe(dt, 2.0 * HOUR, Reader::Ok, Reader::Degraded);
                if recovered == Reader::Degraded {
                    self.maybe(dt, 2.0 * DAY, Reader::Fault, Reader::Degraded)
                } else {
                    recovered
                }
            }
            Reader::Fault => self.maybe(dt, 4.0 * HOUR, Reader::Ok, Reader::Fault),
            other => other,
        };

        if !self.tamper && self.tamper_per_day > 0.0 {
            self.tamper = self.happens(dt, DAY / self.tamper_per_day);
        }
    }

    fn step_battery(&mut self, dt: f64) {
        let minutes = dt / MINUTE;
        if self.charging {
            self.battery += 1.2 * minutes * self.rng.random_range(0.8..1.2);
            if self.battery >= 100.0 {
                self.battery = 100.0;
            }
            if self.battery >= 95.0 && self.happens(dt, 20.0 * MINUTE) {
                self.charging = false;
            }
        } else {
            self.battery -= 0.25 * minutes * self.rng.random_range(0.5..1.5);
            let plug_in = if self.battery < 5.0 {
                true
            } else if self.battery < 20.0 {
                self.happens(dt, 15.0 * MINUTE)
            } else {
                self.happens(dt, 4.0 * HOUR)
            };
            if plug_in {
                self.charging = true;
            }
        }
        self.battery = self.battery.clamp(0.0, 100.0);
    }

    /// `then` if an event with mean interval `mean` happens within `dt`, else `otherwise`.
    fn maybe<T>(&mut self, dt: f64, mean: f64, then: T, otherwise: T) -> T {
        if self.happens(dt, mean) {
            then
        } else {
            otherwise
        }
    }

    fn happens(&mut self, dt: f64, mean: f64) -> bool {
        let p = chance(dt, mean);
        self.rng.random_bool(p.clamp(0.0, 1.0))
    }

    fn noise(&mut self, amplitude: f64) -> f64 {
        if amplitude <= 0.0 {
            return 0.0;
        }
        self.rng.random_range(-amplitude..=amplitude)
    }
}

impl SensorProvider for SimulatedSensors {
    fn sample(&mut self) -> pb::Sensors {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last);
        self.last = now;
        self.advance(dt);
        self.reading()
    }
}

fn signal_range(network: pb::NetworkType) -> (f64, f64) {
    match network {
        pb::NetworkType::Wifi => (-85.0, -35.0),
        _ => (-115.0, -65.0),
    }
}

fn round1(v: f64) -> f32 {
    ((v * 10.0).round() / 10.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use posfleet_proto::pb::{CardReaderState, NetworkType, PaperState};
    use std::collections::HashSet;

    /// A week of 30 s samples.
    fn week(seed: u64) -> Vec<pb::Sensors> {
        let mut s = SimulatedSensors::new(seed);
        (0..7 * 24 * 120)
            .map(|_| {
                s.advance(Duration::from_secs(30));
                s.reading()
            })
            .collect()
    }

    #[test]
    fn readings_stay_in_realistic_ranges() {
        for seed in 0..8 {
            for r in week(seed) {
                let battery = r.battery_percent.unwrap();
                assert!((0.0..=100.0).contains(&battery), "battery {battery}");
                let t = r.temperature_c.unwrap();
                assert!((25.0..=45.0).contains(&t), "temperature {t}");
                let dbm = r.signal_dbm.unwrap();
                match r.network() {
                    NetworkType::Wifi => assert!((-85..=-35).contains(&dbm), "wifi {dbm}"),
                    NetworkType::Cellular4g => assert!((-115..=-65).contains(&dbm), "4g {dbm}"),
                    other => panic!("unexpected network {other:?}"),
                }
                assert!(!r.tamper, "tamper must not trigger by default");
                assert_ne!(r.card_reader(), CardReaderState::Unspecified);
            }
        }
    }

    #[test]
    fn battery_drains_and_recharges_and_paper_runs_out_and_is_refilled() {
        let samples = week(3);
        let charging: HashSet<bool> = samples.iter().map(|r| r.charging.unwrap()).collect();
        assert_eq!(
            charging.len(),
            2,
            "battery both charges and drains in a week"
        );
        let lows = samples
            .iter()
            .filter(|r| r.battery_percent.unwrap() < 30.0)
            .count();
        let highs = samples
            .iter()
            .filter(|r| r.battery_percent.unwrap() > 90.0)
            .count();
        assert!(lows > 0 && highs > 0, "lows {lows}, highs {highs}");
        let paper: HashSet<PaperState> = samples.iter().map(|r| r.paper()).collect();
        assert!(paper.contains(&PaperState::Ok) && paper.contains(&PaperState::Low));
        assert!(
            paper.contains(&PaperState::Out),
            "paper runs out within a week"
        );
        // Mostly OK: an out-of-paper terminal is the exception.
        let out = samples
            .iter()
            .filter(|r| r.paper() == PaperState::Out)
            .count();
        assert!(out * 5 < samples.len(), "out {out} of {}", samples.len());
    }

    #[test]
    fn values_vary_slowly() {
        let samples = week(5);
        for pair in samples.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            assert!((a.battery_percent.unwrap() - b.battery_percent.unwrap()).abs() < 2.0);
            assert!((a.temperature_c.unwrap() - b.temperature_c.unwrap()).abs() < 2.0);
        }
    }

    #[test]
    fn seeded_and_deterministic() {
        assert_eq!(week(11), week(11));
        assert_ne!(week(11), week(12));
        let networks: HashSet<i32> = (0..50)
            .map(|seed| SimulatedSensors::new(seed).reading().network)
            .collect();
        assert_eq!(networks.len(), 2, "the fleet mixes Wi-Fi and 4G");
    }

    #[test]
    fn tamper_latches_when_enabled() {
        let mut s = SimulatedSensors::new(1).with_tamper_rate(24.0);
        s.advance(Duration::from_secs(6 * 3600));
        assert!(s.reading().tamper);
        s.advance(Duration::from_secs(6 * 3600));
        assert!(s.reading().tamper);
    }

    #[test]
    fn no_sensors_reports_nothing() {
        let r = NoSensors.sample();
        assert_eq!(r.battery_percent, None);
        assert_eq!(r.signal_dbm, None);
        assert_eq!(r.network(), NetworkType::Unspecified);
        assert!(!r.tamper);
    }
}
