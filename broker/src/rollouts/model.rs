//! What the rollout store holds, and the plan fixed at creation: the stable shuffle of the
//! target and the cumulative wave sizes.

use posfleet_proto::DeviceId;
use serde::{Deserialize, Serialize};

use crate::views::{
    GateFigures, HealthGateView, RolloutState, SkippedCounts, StatusCounts, TargetView, WaveOutcome,
};

/// Version of the stored record format; bump on an incompatible change.
pub(crate) const RECORD_VERSION: u32 = 1;

/// The artifact as the rollout's commands carry it (copied at creation: the digest and the
/// signature never change; the URL is asked from the catalog at each wave start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredArtifact {
    pub id: String,
    pub version: String,
    pub component: String,
    pub size_bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// Base64.
    pub release_signature: String,
    pub release_key_id: String,
    /// Members whose version of `component` is not at least this are skipped at wave start
    /// (records written before it existed get it from the catalog when loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
}

/// One wave: members `start..end` of the rollout's member list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredWave {
    pub percent: u32,
    pub start: u32,
    pub end: u32,
    pub started_at_ms: Option<u64>,
    /// True once the plane holds the wave's update commands.
    pub issued: bool,
    pub threshold_reached_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub outcome: Option<WaveOutcome>,
    pub reason: Option<String>,
    /// Counts as of the last write (the live ones come from the commands).
    pub counts: StatusCounts,
    /// Members skipped at wave start, by reason (their sum is `counts.skipped`).
    #[serde(default)]
    pub skipped: SkippedCounts,
    pub gate: Option<GateFigures>,
}

impl StoredWave {
    pub(crate) fn len(&self) -> u32 {
        self.end - self.start
    }

    /// Members that got an update (the thresholds' denominator).
    pub(crate) fn eligible(&self) -> u32 {
        self.len().saturating_sub(self.counts.skipped)
    }
}

/// The rollback of an aborted rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredRollback {
    pub at_ms: u64,
    /// True once the update commands still live are cancelled.
    pub cancelled: bool,
    /// True once the plane holds the RollbackUpdate commands.
    pub issued: bool,
    pub counts: StatusCounts,
}

/// A rollout (sled key `r/<id>`, JSON); its members are separate records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredRollout {
    pub v: u32,
    pub id: String,
    pub artifact: StoredArtifact,
    pub target: TargetView,
    pub state: RolloutState,
    pub members: u32,
    pub waves: Vec<StoredWave>,
    pub success_threshold: f64,
    pub failure_threshold: f64,
    pub soak_s: u64,
    pub wave_timeout_s: u64,
    pub confirm_timeout_s: u32,
    pub health_gate: HealthGateView,
    pub created_by: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub rollback: Option<StoredRollback>,
}

/// One terminal of a rollout (sled key `m/<rollout id>/<index>`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredMember {
    pub device: String,
    /// The component's version the terminal reported when its wave started.
    pub prev_version: Option<String>,
    /// Its SoftwareUpdate command (set when its wave starts, before the command exists).
    pub update_id: Option<String>,
    /// Why it got no update at its wave's start (`below_min_version`, `version_unknown`,
    /// `version_unparseable`); then `update_id` stays `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Its RollbackUpdate command (set at abort, before the command exists).
    pub rollback_id: Option<String>,
}

/// The target in a stable order: by SHA-256 of `rollout id || device id`, so the order is
/// random across devices (a canary is not always the lowest id) but fixed for the rollout.
pub(crate) fn shuffle(rollout_id: &str, mut devices: Vec<DeviceId>) -> Vec<DeviceId> {
    devices.sort();
    devices.dedup();
    let key = |d: &DeviceId| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(rollout_id.as_bytes());
        ctx.update(&[0]);
        ctx.update(d.as_str().as_bytes());
        ctx.finish().as_ref().to_vec()
    };
    devices.sort_by_cached_key(key);
    devices
}

/// Cumulative member counts of the waves for `n` terminals: `ceil(percent × n / 100)`, each
/// wave at least one terminal more than the one before, the last = `n`. Waves that cannot
/// get a terminal (fewer terminals than waves) are dropped. Returns (percent, end) pairs.
pub(crate) fn plan_waves(percents: &[u32], n: u32) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(percents.len());
    let mut prev = 0u32;
    for (i, &p) in percents.iter().enumerate() {
        if prev >= n {
            break;
        }
        let last = i + 1 == percents.len();
        let want = (u64::from(p) * u64::from(n)).div_ceil(100);
        let want = u32::try_from(want).unwrap_or(n);
        let end = if last { n } else { want.max(prev + 1).min(n) };
        out.push((p, end));
        prev = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(n: u32) -> Vec<u32> {
        let plan = plan_waves(&[1, 10, 50, 100], n);
        let mut prev = 0;
        plan.iter()
            .map(|(_, end)| {
                let size = end - prev;
                prev = *end;
                size
            })
            .collect()
    }

    #[test]
    fn waves_are_cumulative_never_empty_and_end_with_everyone() {
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(7), [1, 1, 2, 3]);
        assert_eq!(sizes(100), [1, 9, 40, 50]);
        assert_eq!(sizes(1000), [10, 90, 400, 500]);
        assert_eq!(sizes(2), [1, 1]);
        for n in 1..300 {
            let plan = plan_waves(&[1, 10, 50, 100], n);
            assert_eq!(plan.last().map(|p| p.1), Some(n), "n={n}");
            assert!(plan.windows(2).all(|w| w[0].1 < w[1].1), "n={n}");
            assert!(plan[0].1 >= 1);
        }
    }

    #[test]
    fn the_shuffle_is_stable_per_rollout_and_keeps_every_device_once() {
        let ids: Vec<DeviceId> = (0..50)
            .map(|i| DeviceId::new(format!("T-{i}")).unwrap())
            .collect();
        let mut twice = ids.clone();
        twice.extend(ids.iter().cloned());
        let a = shuffle("r1", twice);
        assert_eq!(a.len(), 50);
        let mut sorted = a.clone();
        sorted.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(sorted, expected, "every device exactly once");
        let mut reversed = ids.clone();
        reversed.reverse();
        assert_eq!(shuffle("r1", reversed), a, "input order does not matter");
        assert_ne!(shuffle("r2", ids), a, "another rollout, another order");
    }
}
