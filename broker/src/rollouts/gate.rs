//! The payment health gate (ADR 0008): a wave's updated terminals against the target's
//! not-yet-updated terminals over the same window, from the transaction store (approval
//! rate) and the registry (outbox depth of the last heartbeat). Blocking (store reads) and
//! bounded: at most [`MAX_DEVICES`] per side and [`MAX_SCAN_PER_DEVICE`] records each.

use posfleet_proto::DeviceId;
use tracing::warn;

use crate::registry::Registry;
use crate::txstore::{Outcomes, TxStore};
use crate::views::{GateFigures, HealthGateView};

/// Terminals per side read at most (the others are a sample: the rollout's order is a
/// random shuffle, so the next waves' first members are a fair one).
pub(crate) const MAX_DEVICES: usize = 500;
/// Records read per terminal at most (the most recent ones).
pub(crate) const MAX_SCAN_PER_DEVICE: usize = 500;

/// What to compare.
#[derive(Debug, Clone)]
pub(crate) struct GateInput {
    /// The wave's terminals whose update succeeded, each with the time it succeeded.
    pub updated: Vec<(DeviceId, u64)>,
    /// Terminals of the target that have not been updated.
    pub others: Vec<DeviceId>,
    pub limits: HealthGateView,
}

/// Evaluates the gate at `now_ms`.
pub(crate) fn evaluate(
    tx: &TxStore,
    registry: &Registry,
    input: &GateInput,
    now_ms: u64,
) -> GateFigures {
    let updated = &input.updated[..input.updated.len().min(MAX_DEVICES)];
    let others = &input.others[..input.others.len().min(MAX_DEVICES)];
    // The others are compared over the window since the first update of the wave.
    let window_from = updated.iter().map(|(_, t)| *t).min().unwrap_or(now_ms);
    let count = |device: &DeviceId, from: u64| {
        tx.outcomes_since(device, from, MAX_SCAN_PER_DEVICE)
            .unwrap_or_else(|e| {
                warn!(device_id = %device, error = %e, "health gate cannot read transactions");
                Outcomes::default()
            })
    };
    let (mut up_ok, mut up_all) = (0u64, 0u64);
    for (d, since) in updated {
        let o = count(d, *since);
        up_ok += o.approved;
        up_all += o.total();
    }
    let (mut other_ok, mut other_all) = (0u64, 0u64);
    for d in others {
        let o = count(d, window_from);
        other_ok += o.approved;
        other_all += o.total();
    }
    let rate = |ok: u64, all: u64| (all > 0).then(|| ok as f64 / all as f64);
    let updated_rate = rate(up_ok, up_all);
    let other_rate = rate(other_ok, other_all);
    let min = input.limits.min_transactions.max(1);
    let approval_checked = up_all >= min && other_all >= min;

    let mean = |ids: &mut dyn Iterator<Item = &DeviceId>| {
        let depths: Vec<f64> = ids
            .filter_map(|d| registry.outbox_depth(d))
            .map(f64::from)
            .collect();
        (!depths.is_empty()).then(|| depths.iter().sum::<f64>() / depths.len() as f64)
    };
    let updated_mean = mean(&mut updated.iter().map(|(d, _)| d));
    let other_mean = mean(&mut others.iter());

    let mut tripped = None;
    if let (true, Some(u), Some(o)) = (approval_checked, updated_rate, other_rate) {
        if o - u > input.limits.max_approval_drop {
            tripped = Some(format!(
                "approval rate {:.1}% on updated terminals vs {:.1}% on the others: a drop of \
                 {:.1} points, more than {:.1} allowed",
                u * 100.0,
                o * 100.0,
                (o - u) * 100.0,
                input.limits.max_approval_drop * 100.0
            ));
        }
    }
    if let (None, Some(u), Some(o)) = (&tripped, updated_mean, other_mean) {
        let limit = input.limits.max_unsent_ratio * o + 1.0;
        if u > limit {
            tripped = Some(format!(
                "updated terminals hold {u:.1} unsent transactions on average vs {o:.1} on \
                 the others (limit {limit:.1})"
            ));
        }
    }
    GateFigures {
        at_ms: now_ms,
        updated_devices: u32::try_from(updated.len()).unwrap_or(u32::MAX),
        updated_transactions: up_all,
        updated_approval_rate: updated_rate,
        other_devices: u32::try_from(others.len()).unwrap_or(u32::MAX),
        other_transactions: other_all,
        other_approval_rate: other_rate,
        approval_checked,
        updated_mean_outbox: updated_mean,
        other_mean_outbox: other_mean,
        tripped,
    }
}
