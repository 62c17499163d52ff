//! The gap watcher: every `gap_check_interval`, devices whose records have waited above a
//! missing seq for longer than `gap_grace` raise a `sequence_gap` alert (once per gap), and a
//! gap reported earlier that has been filled raises `sequence_gap_closed`. Acknowledgements
//! never pass a gap whatever happens here; this only tells people.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::DeviceId;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::sweeper::{Clock, spawn_every};
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::txstore::TxStore;
use crate::views::{AlertKind, FleetEvent, Severity};

/// The watcher's memory of the gaps it has reported.
#[derive(Debug)]
pub(crate) struct GapWatch {
    store: Arc<TxStore>,
    events: EventBus,
    metrics: Arc<Metrics>,
    grace_ms: u64,
    /// Devices alerted for, with the first missing seq reported.
    alerted: BTreeMap<DeviceId, u64>,
}

impl GapWatch {
    pub(crate) fn new(
        store: Arc<TxStore>,
        events: EventBus,
        metrics: Arc<Metrics>,
        grace: Duration,
    ) -> Self {
        Self {
            store,
            events,
            metrics,
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            alerted: BTreeMap::new(),
        }
    }

    /// One check at `now_ms`: alerts for gaps past the grace period and for reported gaps
    /// that closed. Returns the events published.
    pub(crate) fn check(&mut self, now_ms: u64) -> Vec<FleetEvent> {
        let gaps = self.store.gaps();
        let gapped: std::collections::BTreeSet<DeviceId> =
            gaps.iter().map(|g| g.device.clone()).collect();
        let mut events = Vec::new();
        let mut overdue = BTreeMap::new();
        for gap in gaps {
            if now_ms.saturating_sub(gap.since_ms) < self.grace_ms {
                continue;
            }
            overdue.insert(gap.device.clone(), gap.first_missing);
            if self.alerted.contains_key(&gap.device) {
                continue;
            }
            let waited_s = now_ms.saturating_sub(gap.since_ms) / 1000;
            warn!(
                device_id = %gap.device,
                first_missing = gap.first_missing,
                last_seq = gap.last_seq,
                waited_s,
                "transaction sequence gap"
            );
            events.push(FleetEvent::Alert {
                device: gap.device.to_string(),
                alert: AlertKind::SequenceGap,
                severity: Severity::Warning,
                seq: Some(gap.first_missing),
                message: format!(
                    "transaction seq {} has been missing for {waited_s}s while seqs up to {} \
                     are stored; acknowledgements stop below it until it arrives",
                    gap.first_missing, gap.last_seq
                ),
                at_ms: now_ms,
            });
        }
        // A device still gapped but not overdue has a newer gap within its grace period:
        // neither closed nor alerted again yet.
        let closed: Vec<DeviceId> = self
            .alerted
            .keys()
            .filter(|d| !gapped.contains(*d))
            .cloned()
            .collect();
        for device in closed {
            let durable = self.store.durable_through(&device);
            info!(device_id = %device, durable_through_seq = durable, "transaction sequence gap closed");
            self.alerted.remove(&device);
            events.push(FleetEvent::Alert {
                device: device.to_string(),
                alert: AlertKind::SequenceGapClosed,
                severity: Severity::Info,
                seq: None,
                message: format!("the sequence gap is filled; stored through seq {durable}"),
                at_ms: now_ms,
            });
        }
        self.alerted.extend(overdue);
        self.metrics
            .tx_devices_with_gaps
            .set(i64::try_from(self.alerted.len()).unwrap_or(i64::MAX));
        for event in &events {
            self.events.publish(event.clone());
        }
        events
    }

    /// Runs [`GapWatch::check`] every `every` until `cancel`.
    pub(crate) fn spawn(
        mut self,
        every: Duration,
        clock: Clock,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        spawn_every(every, tracker, cancel, move || {
            self.check(clock());
        })
    }
}
