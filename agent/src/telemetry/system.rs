//! System metric providers: the real host (sysinfo) and a simulated terminal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use posfleet_proto::pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sysinfo::{Disks, System};
use tokio::time::Instant;

use super::{SystemProvider, chance, replay};

/// The host's metrics via sysinfo. Disk figures are those of the file system holding
/// `data_dir` (the agent's state), falling back to `/`.
pub struct OsSystem {
    system: System,
    disks: Disks,
    data_dir: PathBuf,
}

impl std::fmt::Debug for OsSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OsSystem")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl OsSystem {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let mut system = System::new();
        // The first CPU reading is a baseline; the next sample reports usage since then.
        system.refresh_cpu_usage();
        Self {
            system,
            disks: Disks::new_with_refreshed_list(),
            data_dir: data_dir.into(),
        }
    }

    /// (used, total) bytes of the file system with the longest mount point that holds `path`.
    fn disk_usage(&self, path: &Path) -> (u64, u64) {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        self.disks
            .list()
            .iter()
            .filter(|d| path.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map_or((0, 0), |d| {
                let total = d.total_space();
                (total.saturating_sub(d.available_space()), total)
            })
    }
}

impl SystemProvider for OsSystem {
    fn sample(&mut self) -> pb::SystemMetrics {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        let (disk_used_bytes, disk_total_bytes) = self.disk_usage(&self.data_dir);
        pb::SystemMetrics {
            cpu_percent: self.system.global_cpu_usage(),
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            disk_used_bytes,
            disk_total_bytes,
            uptime_s: System::uptime(),
            load_average_1m: System::load_average().one as f32,
        }
    }

    fn blocking(&self) -> bool {
        true
    }
}

const GIB: u64 = 1 << 30;

/// A seeded, plausible payment terminal: 1–4 GiB RAM, 8–32 GiB flash, mostly idle CPU with
/// bursts (a sale), a disk that fills slowly with logs and is cleaned up by rotation.
#[derive(Debug, Clone)]
pub struct SimulatedSystem {
    rng: StdRng,
    last: Instant,
    cores: f64,
    cpu: f64,
    memory_total: u64,
    memory_used: f64,
    disk_total: u64,
    disk_used: f64,
    uptime_s: f64,
    load: f64,
}

impl SimulatedSystem {
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0051_57e3);
        let memory_total = GIB << rng.random_range(0..3u32);
        let disk_total = (8 * GIB) << rng.random_range(0..3u32);
        Self {
            cores: f64::from(rng.random_range(2..=4u32)),
            cpu: rng.random_range(3.0..12.0),
            memory_used: memory_total as f64 * rng.random_range(0.35..0.6),
            memory_total,
            disk_used: disk_total as f64 * rng.random_range(0.3..0.6),
            disk_total,
            uptime_s: rng.random_range(0.0..7.0 * 86_400.0),
            load: 0.3,
            rng,
            last: Instant::now(),
        }
    }

    /// Moves the model forward by `dt` (long gaps are replayed in steps, capped at a day).
    pub fn advance(&mut self, dt: Duration) {
        replay(dt.as_secs_f64(), |dt| self.step(dt));
    }

    pub fn reading(&self) -> pb::SystemMetrics {
        pb::SystemMetrics {
            cpu_percent: ((self.cpu * 10.0).round() / 10.0) as f32,
            memory_used_bytes: self.memory_used as u64,
            memory_total_bytes: self.memory_total,
            disk_used_bytes: self.disk_used as u64,
            disk_total_bytes: self.disk_total,
            uptime_s: self.uptime_s as u64,
            load_average_1m: ((self.load * 100.0).round() / 100.0) as f32,
        }
    }

    fn step(&mut self, dt: f64) {
        self.uptime_s += dt;
        // CPU: idles around 6 %, a sale now and then bursts it to 30–80 %.
        let burst = self.rng.random_bool(chance(dt, 120.0));
        self.cpu = if burst {
            self.rng.random_range(30.0..80.0)
        } else {
            let decay = (dt / 15.0).min(1.0);
            self.cpu + (6.0 - self.cpu) * decay + self.rng.random_range(-1.0..=1.0)
        }
        .clamp(0.5, 100.0);
        let decay = (dt / 60.0).min(1.0);
        self.load += (self.cpu / 100.0 * self.cores - self.load) * decay;
        self.load = self.load.max(0.0);

        let total = self.memory_total as f64;
        let target = total * 0.5;
        self.memory_used += (target - self.memory_used) * (dt / 1800.0).min(1.0)
            + total * self.rng.random_range(-0.004..=0.004) * (dt / 10.0).sqrt();
        self.memory_used = self.memory_used.clamp(total * 0.25, total * 0.9);

        // Disk: logs grow ~20 MiB a day; rotation occasionally frees a chunk.
        let disk = self.disk_total as f64;
        self.disk_used += 20.0 * (1 << 20) as f64 * dt / 86_400.0;
        if self.rng.random_bool(chance(dt, 86_400.0)) {
            self.disk_used -= disk * self.rng.random_range(0.01..0.05);
        }
        self.disk_used = self.disk_used.clamp(disk * 0.2, disk * 0.9);
    }
}

impl SystemProvider for SimulatedSystem {
    fn sample(&mut self) -> pb::SystemMetrics {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last);
        self.last = now;
        self.advance(dt);
        self.reading()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_metrics_stay_plausible() {
        for seed in 0..8 {
            let mut s = SimulatedSystem::new(seed);
            let first_uptime = s.reading().uptime_s;
            let mut bursts = 0;
            for _ in 0..(2 * 24 * 120) {
                s.advance(Duration::from_secs(30));
                let m = s.reading();
                assert!(
                    (0.5..=100.0).contains(&m.cpu_percent),
                    "cpu {}",
                    m.cpu_percent
                );
                assert!(m.memory_total_bytes >= GIB && m.memory_total_bytes <= 4 * GIB);
                assert!(m.memory_used_bytes > 0 && m.memory_used_bytes < m.memory_total_bytes);
                assert!(m.disk_total_bytes >= 8 * GIB && m.disk_total_bytes <= 32 * GIB);
                assert!(m.disk_used_bytes > 0 && m.disk_used_bytes < m.disk_total_bytes);
                assert!(m.load_average_1m >= 0.0 && m.load_average_1m <= 4.0);
                if m.cpu_percent > 30.0 {
                    bursts += 1;
                }
            }
            assert!(bursts > 0, "sales make CPU bursts");
            assert_eq!(s.reading().uptime_s, first_uptime + 2 * 86_400);
        }
    }

    #[test]
    fn os_metrics_are_read() {
        let mut os = OsSystem::new(std::env::temp_dir());
        let m = os.sample();
        assert!(m.memory_total_bytes > 0);
        assert!(m.memory_used_bytes <= m.memory_total_bytes);
        assert!(m.disk_used_bytes <= m.disk_total_bytes);
        assert!((0.0..=100.0).contains(&m.cpu_percent));
        assert!(os.blocking());
    }
}
