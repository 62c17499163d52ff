//! JSON shapes of `/api/v1/rollouts` (ADR 0008, "Rollouts").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which terminals a rollout targets: `{"devices": [...]}`, `{"group": "G"}` or
/// `{"labels": {"k": "v"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetView {
    Devices(Vec<String>),
    Group(String),
    Labels(BTreeMap<String, String>),
}

/// Limits of the payment health gate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HealthGateView {
    /// The updated terminals' approval rate may be at most this much (absolute, 0-1) below
    /// the not-yet-updated terminals' rate.
    pub max_approval_drop: f64,
    /// The updated terminals' mean outbox depth may be at most this times the others' mean
    /// (+1).
    pub max_unsent_ratio: f64,
    /// The approval rates are compared only with at least this many transactions on each
    /// side.
    pub min_transactions: u64,
}

impl Default for HealthGateView {
    fn default() -> Self {
        Self {
            max_approval_drop: 0.10,
            max_unsent_ratio: 3.0,
            min_transactions: 20,
        }
    }
}

/// Where a rollout is. JSON: `"state": "running", "wave": 2` (flattened into the view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    /// Wave `wave` (1-based) is installing.
    Running {
        wave: u32,
    },
    /// Wave `wave` reached its success threshold; it passes at `until_ms` if the gate holds.
    Soaking {
        wave: u32,
        until_ms: u64,
    },
    /// No new wave starts; wave `wave`'s commands continue.
    Paused {
        wave: u32,
    },
    Completed,
    Aborted {
        reason: String,
    },
}

impl RolloutState {
    /// The state's name.
    pub fn name(&self) -> &'static str {
        match self {
            RolloutState::Running { .. } => "running",
            RolloutState::Soaking { .. } => "soaking",
            RolloutState::Paused { .. } => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Aborted { .. } => "aborted",
        }
    }

    /// True once nothing changes any more (rollbacks of an aborted rollout may still run).
    pub fn is_final(&self) -> bool {
        matches!(self, RolloutState::Completed | RolloutState::Aborted { .. })
    }

    /// The current wave (1-based) of an unfinished rollout.
    pub fn wave(&self) -> Option<u32> {
        match self {
            RolloutState::Running { wave }
            | RolloutState::Soaking { wave, .. }
            | RolloutState::Paused { wave } => Some(*wave),
            _ => None,
        }
    }
}

/// Members of a wave by the status of their command (`not_started`: the wave has not
/// started; `skipped`: the wave started without an update for them, see [`SkippedCounts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    pub not_started: u32,
    /// Members left out at wave start because of the artifact's `min_version`.
    #[serde(default)]
    pub skipped: u32,
    pub queued: u32,
    pub delivered: u32,
    pub in_progress: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub rejected: u32,
    pub expired: u32,
    pub cancelled: u32,
}

impl StatusCounts {
    /// Members whose command ended without success.
    pub fn unsuccessful(&self) -> u32 {
        self.failed + self.rejected + self.expired + self.cancelled
    }

    /// Members whose command is final.
    pub fn finished(&self) -> u32 {
        self.succeeded + self.unsuccessful()
    }

    /// Every member counted.
    pub fn total(&self) -> u32 {
        self.not_started
            + self.skipped
            + self.queued
            + self.delivered
            + self.in_progress
            + self.finished()
    }
}

/// Members of a wave that got no update because of the artifact's `min_version`, by reason
/// (decided at wave start from the version of the component the terminal last reported;
/// ADR 0008 "Minimum version"). They count neither as succeeded nor as failed: the wave's
/// thresholds apply to the other members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedCounts {
    /// Reported a version below `min_version` (`below_min_version`).
    #[serde(default)]
    pub below_min_version: u32,
    /// Reported no version of the component (`version_unknown`).
    #[serde(default)]
    pub version_unknown: u32,
    /// Reported a version that cannot be compared with `min_version`
    /// (`version_unparseable`).
    #[serde(default)]
    pub version_unparseable: u32,
}

impl SkippedCounts {
    /// Every skipped member.
    pub fn total(&self) -> u32 {
        self.below_min_version + self.version_unknown + self.version_unparseable
    }

    /// Counts one member skipped for `reason` (one of the skip reasons of
    /// `posfleet_proto::version`); false for any other text.
    pub fn add(&mut self, reason: &str) -> bool {
        use posfleet_proto::version::{
            REASON_BELOW_MIN_VERSION, REASON_VERSION_UNKNOWN, REASON_VERSION_UNPARSEABLE,
        };
        let slot = match reason {
            REASON_BELOW_MIN_VERSION => &mut self.below_min_version,
            REASON_VERSION_UNKNOWN => &mut self.version_unknown,
            REASON_VERSION_UNPARSEABLE => &mut self.version_unparseable,
            _ => return false,
        };
        *slot += 1;
        true
    }
}

/// The payment health gate's last evaluation of a wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateFigures {
    /// Controller clock, Unix ms.
    pub at_ms: u64,
    /// Updated terminals of the wave (since their update) and their transactions.
    pub updated_devices: u32,
    pub updated_transactions: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_approval_rate: Option<f64>,
    /// Not-yet-updated terminals of the target (a bounded sample) over the same window.
    pub other_devices: u32,
    pub other_transactions: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_approval_rate: Option<f64>,
    /// True if both sides had `min_transactions` and the rates were compared.
    pub approval_checked: bool,
    /// Mean outbox depth from the last heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_mean_outbox: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_mean_outbox: Option<f64>,
    /// Why the gate tripped (absent: it holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tripped: Option<String>,
}

/// How a wave ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveOutcome {
    Passed,
    Failed,
}

/// One wave of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveView {
    /// 1-based.
    pub number: u32,
    /// Cumulative percentage of the target this wave reaches.
    pub percent: u32,
    /// Terminals in this wave (not cumulative).
    pub members: u32,
    pub counts: StatusCounts,
    /// Members left out at wave start because of the artifact's `min_version`, by reason
    /// (their sum is `counts.skipped`).
    #[serde(default)]
    pub skipped: SkippedCounts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// When `succeeded / (members - skipped)` first reached the success threshold (the
    /// soak starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_reached_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<WaveOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateFigures>,
}

/// The rollback of an aborted rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackView {
    pub at_ms: u64,
    /// Terminals that get a RollbackUpdate, by its status.
    pub counts: StatusCounts,
}

/// `GET /api/v1/rollouts/{id}`, rows of the list, and what create/pause/resume/abort return.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: String,
    pub artifact_id: String,
    pub version: String,
    pub component: String,
    /// The artifact's `min_version`: members whose version of `component` is not at least
    /// this are skipped at wave start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    pub target: TargetView,
    #[serde(flatten)]
    pub state: RolloutState,
    /// Terminals in the rollout (fixed at creation).
    pub members: u32,
    pub waves: Vec<WaveView>,
    pub success_threshold: f64,
    pub failure_threshold: f64,
    pub soak_s: u64,
    pub wave_timeout_s: u64,
    pub confirm_timeout_s: u32,
    pub health_gate: HealthGateView,
    pub created_by: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackView>,
}

/// `GET /api/v1/rollouts`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutList {
    pub rollouts: Vec<RolloutView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_flattened_and_round_trips() {
        let view = RolloutView {
            id: "r1".into(),
            artifact_id: "a".into(),
            version: "2.0".into(),
            component: "payment_app".into(),
            min_version: Some("1.0".into()),
            target: TargetView::Group("pilot".into()),
            state: RolloutState::Soaking {
                wave: 2,
                until_ms: 9,
            },
            members: 3,
            waves: vec![],
            success_threshold: 0.95,
            failure_threshold: 0.05,
            soak_s: 0,
            wave_timeout_s: 1800,
            confirm_timeout_s: 300,
            health_gate: HealthGateView::default(),
            created_by: "admin".into(),
            created_at_ms: 1,
            updated_at_ms: 2,
            rollback: None,
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["state"], "soaking");
        assert_eq!(json["wave"], 2);
        assert_eq!(json["target"]["group"], "pilot");
        assert_eq!(serde_json::from_value::<RolloutView>(json).unwrap(), view);
    }
}
