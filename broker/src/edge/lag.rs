//! The controller-lag gate: no uplink is acknowledged that the router's log may lose before
//! the embedded controller reads it (docs/decisions/0013-edge-delivers-to-terminals.md,
//! "Controller lag").
//!
//! The router acknowledges an uplink once it is in the controller filter's log, a ring
//! (`RouterSettings::controller_segment_*`) that drops its oldest segment, read or not, when
//! it wraps (docs/rumqtt.md, items 10 and 23). So the edge keeps the book itself, in the
//! ring's own unit ([`ring_size`]):
//!
//! - `lag` = bytes the lanes took in (`Uplinks::send`, wills, markers) − bytes the controller
//!   took from its local link (`ControllerIntake`, `crate::bus::local`). Everything queued in
//!   a lane, in the router's channel or in the controller link's buffers counts too, so `lag`
//!   is never below what is unread in the ring.
//! - While the embedded controller is attached, an uplink that would take `lag` above
//!   [`LagGate::limit`] is refused (`controller_behind`); the gate then stays shut until
//!   `lag` is back at half the limit, so it does not flap per message. One warning when an
//!   episode starts, one line with the count when it ends.
//!
//! # Resync: markers
//!
//! The two counters can drift apart: the ring may lose data anyway (another router client
//! flooding the same filter), uplinks forwarded before the controller subscribed are never
//! taken, a foreign publisher's messages are taken but were never counted. A drift upwards
//! would keep the gate shut for ever. So each lane sends, once a second when it forwarded
//! anything since its last marker or while `lag` ≠ 0, a *marker*: a publish on
//! `posfleet/v1/d/:lane<n>/up/sync` (no device id contains `:`, so no terminal can send one,
//! and the controller's filter matches it) carrying how many ring bytes the lane has
//! forwarded, marker included. The router keeps a link's publishes in order and the
//! controller reads the filter's log in order, so when the controller takes lane n's marker,
//! every earlier uplink of lane n has been taken or is gone: the lane's taken count is set
//! to the marker's figure and `lag` moves by the difference. Markers are counted like
//! uplinks but never refused. At most one marker per lane is outstanding; one not taken
//! within [`MARKER_REISSUE`] (lost with a wrapped ring) is sent again. Hence the rule: **the
//! gate stays shut only while the controller takes no marker**, i.e. only while it is really
//! not reading; once it reads, the next markers bring `lag` back to what is in flight.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use rumqttd::protocol::Publish;
use tokio::time::Instant;
use tracing::{info, warn};

use super::router::RouterSettings;
use crate::metrics::Metrics;

/// How often a lane considers sending a marker.
pub(crate) const MARKER_EVERY: Duration = Duration::from_secs(1);
/// A marker not taken for this long is sent again (the ring may have lost it).
pub(crate) const MARKER_REISSUE: Duration = Duration::from_secs(5);

const MARKER_PREFIX: &str = "posfleet/v1/d/:lane";
const MARKER_SUFFIX: &str = "/up/sync";

/// Bytes a publish occupies in rumqttd 0.20's log: `PublishData::size` counts 4 + topic +
/// payload (docs/rumqtt.md, item 23).
pub(crate) fn ring_size(publish: &Publish) -> u64 {
    (4 + publish.topic.len() + publish.payload.len()) as u64
}

/// The lane of a terminal: every uplink of a terminal takes the same lane, in order.
pub(crate) fn lane_of(device: &str, lanes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    device.hash(&mut hasher);
    (hasher.finish() % lanes.max(1) as u64) as usize
}

/// What the controller took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Took {
    /// An uplink: hand it to the consumer.
    Uplink,
    /// A lane's marker: consumed by the gate, not an uplink.
    Marker,
}

/// Per lane, what it took in and what the controller took from it.
#[derive(Debug, Default)]
struct LaneBook {
    /// Ring bytes of uplinks (and markers) handed to this lane.
    admitted: AtomicU64,
    /// Ring bytes of this lane's publishes taken, reset to the lane's figure at each marker.
    taken: AtomicU64,
    /// Sequence number of the last marker of this lane the controller took.
    marker_taken: AtomicU64,
}

/// The gate shared by the lanes, `Uplinks` and the controller's intake.
#[derive(Debug)]
pub(crate) struct LagGate {
    /// Refuse above this lag (ring bytes).
    limit: i64,
    /// Once refusing, admit again at or below this lag.
    reopen: i64,
    attached: AtomicBool,
    refusing: AtomicBool,
    refused_in_episode: AtomicU64,
    lanes: Box<[LaneBook]>,
    gauge: Gauge,
    /// No lane sends a marker while set (tests that need a drift to last).
    #[cfg(test)]
    markers_held: AtomicBool,
}

impl LagGate {
    pub(crate) fn new(settings: &RouterSettings, metrics: &Metrics) -> Self {
        let limit = Self::limit(settings);
        let lanes = (0..settings.uplink_lanes.max(1))
            .map(|_| LaneBook::default())
            .collect();
        Self {
            limit,
            reopen: limit / 2,
            attached: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            refused_in_episode: AtomicU64::new(0),
            lanes,
            gauge: metrics.edge_controller_lag_bytes.clone(),
            #[cfg(test)]
            markers_held: AtomicBool::new(false),
        }
    }

    /// The margin. rumqttd rolls to a new segment when the active one is full and drops the
    /// oldest when `count` segments exist, so the newest `(count − 1) × size` bytes are always
    /// held: an unread byte is lost only when more than that is unread. The gate closes at
    /// half of it: the book is exact for what the lanes send, and the other half covers what
    /// it does not see (another router client publishing on the controller's filter, a
    /// segment overshooting by its last message). With the defaults (4 × 4 MiB) it closes at
    /// 6 MiB of lag, about 40 s of a 10,000-terminal fleet's heartbeats and telemetry.
    /// A single segment guarantees nothing (it is dropped whole when it rolls); it is
    /// treated as two.
    fn limit(settings: &RouterSettings) -> i64 {
        let held = settings.controller_segment_count.saturating_sub(1).max(1)
            * settings.controller_segment_size;
        i64::try_from(held / 2).unwrap_or(i64::MAX)
    }

    /// Number of uplink lanes.
    pub(crate) fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Current lag in ring bytes: the sum over the lanes of admitted − taken (negative while
    /// the counters drifted the other way).
    pub(crate) fn lag(&self) -> i64 {
        self.lanes
            .iter()
            .map(|book| {
                let admitted = book.admitted.load(Ordering::Acquire);
                let taken = book.taken.load(Ordering::Acquire);
                admitted.wrapping_sub(taken) as i64
            })
            .sum()
    }

    fn publish_gauge(&self, lag: i64) {
        if self.attached.load(Ordering::Acquire) {
            self.gauge.set(lag.max(0));
        }
    }

    /// Counts an uplink of `bytes` for `lane` into the book, or refuses it (false) while the
    /// embedded controller is attached and behind. Never refuses into an empty book.
    pub(crate) fn admit(&self, lane: usize, bytes: u64) -> bool {
        let book = &self.lanes[lane];
        book.admitted.fetch_add(bytes, Ordering::AcqRel);
        let after = self.lag();
        let before = after.saturating_sub(i64::try_from(bytes).unwrap_or(i64::MAX));
        if !self.attached.load(Ordering::Acquire) || before <= 0 {
            self.reopened();
            self.publish_gauge(after);
            return true;
        }
        let refuse = if self.refusing.load(Ordering::Acquire) {
            before > self.reopen
        } else {
            after > self.limit
        };
        if !refuse {
            self.reopened();
            self.publish_gauge(after);
            return true;
        }
        book.admitted.fetch_sub(bytes, Ordering::AcqRel);
        self.refused_in_episode.fetch_add(1, Ordering::Relaxed);
        if !self.refusing.swap(true, Ordering::AcqRel) {
            warn!(
                lag_bytes = before,
                limit_bytes = self.limit,
                "the controller is behind: refusing terminal uplinks (not acknowledged) until it catches up"
            );
        }
        false
    }

    /// Ends a refusal episode, if one is going on.
    fn reopened(&self) {
        if self.refusing.load(Ordering::Acquire) && self.refusing.swap(false, Ordering::AcqRel) {
            let refused = self.refused_in_episode.swap(0, Ordering::Relaxed);
            info!(
                refused,
                lag_bytes = self.lag(),
                "the controller caught up: terminal uplinks are taken again"
            );
        }
    }

    /// Takes back an admitted uplink that never reached its lane.
    pub(crate) fn cancel(&self, lane: usize, bytes: u64) {
        self.lanes[lane].admitted.fetch_sub(bytes, Ordering::AcqRel);
        self.publish_gauge(self.lag());
    }

    /// The embedded controller's uplink subscription is in the router.
    pub(crate) fn attach(&self) {
        self.attached.store(true, Ordering::Release);
        self.publish_gauge(self.lag());
    }

    /// The embedded controller is gone: nothing is refused for its sake any more.
    pub(crate) fn detach(&self) {
        self.attached.store(false, Ordering::Release);
        self.gauge.set(0);
        self.reopened();
    }

    pub(crate) fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// The controller took a publish on `topic` carrying `payload`.
    pub(crate) fn took(&self, topic: &[u8], payload: &[u8]) -> Took {
        let size = (4 + topic.len() + payload.len()) as u64;
        let Ok(topic) = std::str::from_utf8(topic) else {
            return Took::Uplink;
        };
        if let Some(lane) = topic
            .strip_prefix(MARKER_PREFIX)
            .and_then(|rest| rest.strip_suffix(MARKER_SUFFIX))
        {
            if let (Ok(lane), Some((seq, forwarded))) = (lane.parse::<usize>(), decode(payload))
                && let Some(book) = self.lanes.get(lane)
            {
                book.taken.store(forwarded, Ordering::Release);
                book.marker_taken.store(seq, Ordering::Release);
                self.publish_gauge(self.lag());
            }
            return Took::Marker;
        }
        // posfleet/v1/d/<device>/up/<channel>
        let device = topic
            .strip_prefix("posfleet/v1/d/")
            .and_then(|rest| rest.split('/').next());
        if let Some(book) = device.map(|d| &self.lanes[lane_of(d, self.lanes.len())]) {
            book.taken.fetch_add(size, Ordering::AcqRel);
            self.publish_gauge(self.lag());
        }
        Took::Uplink
    }

    /// Counts a marker into the book (never refused).
    fn count_marker(&self, lane: usize, bytes: u64) {
        self.lanes[lane].admitted.fetch_add(bytes, Ordering::AcqRel);
        self.publish_gauge(self.lag());
    }

    #[cfg(test)]
    pub(crate) fn limit_bytes(&self) -> i64 {
        self.limit
    }

    /// Makes the book believe `bytes` more (or fewer) of `lane`'s uplinks are unread than
    /// really are, as when the router loses some: a drift, for tests.
    #[cfg(test)]
    pub(crate) fn drift(&self, lane: usize, bytes: i64) {
        self.lanes[lane]
            .taken
            .fetch_sub(bytes as u64, Ordering::AcqRel);
    }

    /// Stops (true) or resumes (false) every lane's markers, for tests: a drift lasts only
    /// until the next marker is taken.
    #[cfg(test)]
    pub(crate) fn hold_markers(&self, held: bool) {
        self.markers_held.store(held, Ordering::Release);
    }
}

fn decode(payload: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let forwarded = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((seq, forwarded))
}

/// One lane's side of the markers (owned by the lane task).
#[derive(Debug)]
pub(crate) struct LaneMarkers {
    lane: usize,
    topic: Bytes,
    /// Ring bytes this lane has pushed into the router (uplinks and markers).
    forwarded: u64,
    /// `forwarded` when the last marker went out.
    at_last: u64,
    /// Sequence number of the last marker sent (0: none yet).
    seq: u64,
    sent_at: Option<Instant>,
}

impl LaneMarkers {
    pub(crate) fn new(lane: usize) -> Self {
        Self {
            lane,
            topic: Bytes::from(format!("{MARKER_PREFIX}{lane}{MARKER_SUFFIX}")),
            forwarded: 0,
            at_last: 0,
            seq: 0,
            sent_at: None,
        }
    }

    /// An uplink of `bytes` went into the router.
    pub(crate) fn forwarded(&mut self, bytes: u64) {
        self.forwarded = self.forwarded.wrapping_add(bytes);
    }

    /// The marker to send now, if one is due (see the module docs).
    pub(crate) fn due(&mut self, gate: &LagGate) -> Option<Publish> {
        if !gate.is_attached() {
            return None;
        }
        #[cfg(test)]
        if gate.markers_held.load(Ordering::Acquire) {
            return None;
        }
        let taken = gate.lanes[self.lane].marker_taken.load(Ordering::Acquire);
        let outstanding = self.seq > taken;
        if outstanding {
            if self.sent_at.is_some_and(|at| at.elapsed() < MARKER_REISSUE) {
                return None;
            }
        } else if self.forwarded == self.at_last && gate.lag() == 0 {
            return None;
        }
        self.seq += 1;
        let mut payload = Vec::with_capacity(16);
        payload.extend_from_slice(&self.seq.to_be_bytes());
        let size = (4 + self.topic.len() + 16) as u64;
        self.forwarded = self.forwarded.wrapping_add(size);
        payload.extend_from_slice(&self.forwarded.to_be_bytes());
        self.at_last = self.forwarded;
        self.sent_at = Some(Instant::now());
        gate.count_marker(self.lane, size);
        Some(Publish::new(
            self.topic.clone(),
            Bytes::from(payload),
            false,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(segment_size: usize, segment_count: usize) -> LagGate {
        let settings = RouterSettings {
            controller_segment_size: segment_size,
            controller_segment_count: segment_count,
            uplink_lanes: 2,
            ..RouterSettings::default()
        };
        LagGate::new(&settings, &Metrics::new())
    }

    fn uplink(device: &str, payload: &[u8]) -> Publish {
        Publish::new(
            Bytes::from(format!("posfleet/v1/d/{device}/up/tm")),
            Bytes::copy_from_slice(payload),
            false,
        )
    }

    #[test]
    fn the_margin_is_half_of_what_the_ring_always_holds() {
        assert_eq!(gate(8 << 20, 4).limit_bytes(), 12 << 20);
        assert_eq!(gate(1024, 2).limit_bytes(), 512);
        // One segment holds nothing for sure: treated as two.
        assert_eq!(gate(1024, 1).limit_bytes(), 512);
    }

    #[test]
    fn the_size_is_rumqttds() {
        let p = uplink("T-1", b"abc");
        assert_eq!(
            ring_size(&p),
            4 + "posfleet/v1/d/T-1/up/tm".len() as u64 + 3
        );
    }

    #[test]
    fn refuses_only_while_attached_and_reopens_at_half_the_limit() {
        let g = gate(1024, 2); // limit 512, reopen 256
        let p = uplink("T-1", &[0; 96]); // 4 + 23 + 96 = 123 bytes
        let size = ring_size(&p);
        // Not attached: everything is counted, nothing refused.
        let lane = lane_of("T-1", 2);
        for _ in 0..10 {
            assert!(g.admit(lane, size));
        }
        g.drift(lane, -(10 * size as i64));
        g.attach();
        for _ in 0..4 {
            assert!(g.admit(lane, size)); // 492
        }
        assert!(!g.admit(lane, size), "a fifth would pass the limit");
        assert_eq!(g.lag(), 4 * size as i64);
        // The controller takes one: 369 left, still above the reopen mark (256).
        assert_eq!(g.took(&p.topic, &p.payload), Took::Uplink);
        assert!(!g.admit(lane, size), "369 > 256: still shut");
        // And another: 246.
        assert_eq!(g.took(&p.topic, &p.payload), Took::Uplink);
        assert!(g.admit(lane, size), "246 ≤ 256: open again");
        g.detach();
        for _ in 0..10 {
            assert!(g.admit(lane, size), "no controller attached, no refusal");
        }
    }

    #[test]
    fn an_empty_book_takes_even_an_uplink_larger_than_the_limit() {
        let g = gate(1024, 2);
        g.attach();
        assert!(g.admit(0, 4096));
        assert!(!g.admit(1, 1));
    }

    /// The resync rule: whatever the drift, the lane's next marker taken by the controller
    /// sets its count to what the lane really forwarded, so the gate cannot stay shut while
    /// the controller reads.
    #[test]
    fn a_marker_taken_brings_the_book_back_to_what_the_lane_forwarded() {
        let g = gate(1024, 2);
        g.attach();
        let device = (0..100)
            .map(|n| format!("T-{n}"))
            .find(|d| lane_of(d, 2) == 0)
            .unwrap();
        let p = uplink(&device, &[0; 96]);
        let size = ring_size(&p);
        let mut lane = LaneMarkers::new(0);
        let mut other = LaneMarkers::new(1);
        // Four forwarded, all lost in the router: 492 bytes nobody will take.
        for _ in 0..4 {
            assert!(g.admit(0, size));
            lane.forwarded(size);
        }
        // The gate is shut for good unless the book is corrected.
        assert!(!g.admit(0, size));
        assert!(!g.admit(1, size));
        let marker = lane
            .due(&g)
            .expect("lane 0 forwarded since its last marker");
        let idle = other.due(&g).expect("lag ≠ 0: even an idle lane sends one");
        assert!(lane.due(&g).is_none(), "one outstanding marker per lane");
        assert_eq!(g.took(&marker.topic, &marker.payload), Took::Marker);
        assert_eq!(g.took(&idle.topic, &idle.payload), Took::Marker);
        assert_eq!(g.lag(), 0, "what lane 0 forwarded is taken or gone");
        assert!(g.admit(0, size));
        lane.forwarded(size);
        g.took(&p.topic, &p.payload);
        // Drift the other way (taken, never counted) is undone the same way.
        g.took(&p.topic, &p.payload);
        assert_eq!(g.lag(), -(size as i64));
        let marker = lane.due(&g).unwrap();
        g.took(&marker.topic, &marker.payload);
        assert_eq!(g.lag(), 0);
        // Balanced and idle: no more markers.
        assert!(lane.due(&g).is_none());
        assert!(other.due(&g).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_marker_is_sent_again() {
        let g = gate(1024, 2);
        g.attach();
        let mut lane = LaneMarkers::new(0);
        lane.forwarded(100);
        assert!(g.admit(0, 100));
        assert!(lane.due(&g).is_some());
        assert!(lane.due(&g).is_none());
        tokio::time::advance(MARKER_REISSUE).await;
        let again = lane.due(&g).expect("reissued");
        g.took(&again.topic, &again.payload);
        assert_eq!(g.lag(), 0);
    }

    #[test]
    fn no_device_topic_is_a_marker() {
        let g = gate(1024, 2);
        assert!(posfleet_proto::DeviceId::new(":lane0").is_err());
        assert_eq!(g.took(b"posfleet/v1/d/T-1/up/sync", b""), Took::Uplink);
    }
}
