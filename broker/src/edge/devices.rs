//! Terminal sessions held by the edge itself (docs/decisions/0013-edge-delivers-to-terminals.md).
//!
//! A terminal gets no link, filter or subscription in rumqttd's router. Its downlinks reach
//! the edge through one router subscription (`downlinks.rs`) and are queued here, per
//! device; its uplinks go to the router over a few shared links (`uplinks.rs`), whose
//! acknowledgements come back here as the PUBACKs the terminal is owed. What the router did
//! per link before, the edge does per device:
//!
//! - subscriptions: the downlink channels a terminal subscribed to (QoS 0 or 1);
//! - QoS 1 in flight: at most [`MAX_INFLIGHT`] unacknowledged downlinks per terminal, PUBACKs
//!   accepted only in order, and redelivery (DUP set) of what was in flight when a persistent
//!   session reconnects;
//! - the answers a terminal is owed (PUBACK, SUBACK, UNSUBACK, PINGRESP), bounded: a client
//!   that sends requests and never reads is closed at [`MAX_OWED_ANSWERS`];
//! - persistent sessions (`clean_session = false`) keep their subscriptions and queued
//!   downlinks across reconnects; a clean session's state ends with its connection.
//!
//! Each answer and delivery carries the connection's generation (from `sessions.rs`): what a
//! replaced connection was owed never reaches its successor.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use posfleet_proto::{Channel, DeviceId};
use tokio::sync::Notify;

/// Downlinks a terminal may have written and not yet acknowledged.
pub(crate) const MAX_INFLIGHT: usize = 16;
pub(crate) use super::pump::MAX_OWED_ANSWERS;
/// Downlinks queued for one terminal (connected or not) beyond those in flight.
pub(crate) const MAX_QUEUED: usize = 1024;
/// Payload bytes queued for one terminal beyond those in flight (what the router's log of a
/// terminal's own downlink filter held before, ADR 0013).
pub(crate) const MAX_QUEUED_BYTES: usize = 1024 * 1024;

/// One downlink on its way to a terminal.
#[derive(Debug, Clone)]
pub(crate) struct Downlink {
    pub(crate) topic: Bytes,
    pub(crate) payload: Bytes,
    pub(crate) channel: Channel,
}

/// An answer the edge owes a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    PubAck(u16),
    /// Packet id and one return code per filter (0 or 1: granted QoS; 0x80: failure).
    SubAck(u16, Vec<u8>),
    UnsubAck(u16),
    PingResp,
}

/// What happened to a downlink handed to [`DeviceSessions::deliver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued for the terminal (or written at once if it is connected).
    Queued,
    /// Queued, and the oldest queued downlink was dropped to make room.
    QueuedDroppedOldest,
    /// No session of that terminal subscribes to the channel: nobody to deliver to (the
    /// router would have had no matching subscription either).
    NoSubscriber,
}

/// Why a PUBACK from a terminal was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PubAckError {
    /// Not the oldest downlink in flight (the router closed such clients too).
    Unexpected,
}

/// What a connection's writer takes in one go.
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    pub(crate) answers: Vec<Answer>,
    /// (packet id, QoS 1?, dup, downlink): packet id 0 for QoS 0.
    pub(crate) publishes: Vec<(u16, bool, bool, Downlink)>,
}

impl Outgoing {
    pub(crate) fn is_empty(&self) -> bool {
        self.answers.is_empty() && self.publishes.is_empty()
    }
}

/// A downlink written to the terminal and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    pkid: u16,
    downlink: Downlink,
}

#[derive(Debug, Default)]
struct State {
    /// Granted QoS per subscribed downlink channel (`Channel::ALL` index); `None`: not subscribed.
    subscriptions: [Option<u8>; Channel::ALL.len()],
    /// Keep this state when the connection ends (`clean_session = false`).
    persistent: bool,
    /// Generation of the attached connection; `None` while disconnected.
    attached: Option<u64>,
    queue: VecDeque<Downlink>,
    queued_bytes: usize,
    /// Written but not acknowledged (QoS 1), oldest first.
    inflight: VecDeque<InFlight>,
    /// Written again with DUP set after a reconnect: packet ids of `queue`'s first entries.
    redeliver: VecDeque<u16>,
    next_pkid: u16,
    answers: Vec<Answer>,
}

impl State {
    fn pkid(&mut self) -> u16 {
        // 1..=65535; with at most MAX_INFLIGHT in flight an id is never reused while live.
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1).max(1);
        self.next_pkid
    }

    fn subscribed(&self, channel: Channel) -> Option<u8> {
        channel_index(channel).and_then(|i| self.subscriptions[i])
    }

    fn push(&mut self, downlink: Downlink) -> Delivery {
        let mut outcome = Delivery::Queued;
        self.queued_bytes += downlink.payload.len();
        self.queue.push_back(downlink);
        while self.queue.len() > MAX_QUEUED || self.queued_bytes > MAX_QUEUED_BYTES {
            // Never one being redelivered: its packet id is promised.
            if self.queue.len() <= self.redeliver.len() {
                break;
            }
            let at = self.redeliver.len();
            if let Some(dropped) = self.queue.remove(at) {
                self.queued_bytes -= dropped.payload.len();
                outcome = Delivery::QueuedDroppedOldest;
            }
        }
        outcome
    }
}

fn channel_index(channel: Channel) -> Option<usize> {
    Channel::ALL.iter().position(|c| *c == channel)
}

/// One terminal's session.
#[derive(Debug)]
pub(crate) struct DeviceSession {
    state: Mutex<State>,
    /// Wakes the attached connection's writer.
    wake: Notify,
}

impl DeviceSession {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves when there may be something to write.
    pub(crate) async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Owes connection `generation` an answer. False when that connection owes more than
    /// [`MAX_OWED_ANSWERS`] (it does not read: close it); ignored for a connection that is no
    /// longer attached.
    pub(crate) fn answer(&self, generation: u64, answer: Answer) -> bool {
        let mut state = self.lock();
        if state.attached != Some(generation) {
            return true;
        }
        if state.answers.len() >= MAX_OWED_ANSWERS {
            return false;
        }
        state.answers.push(answer);
        drop(state);
        self.wake.notify_one();
        true
    }

    /// Answers owed right now (for the reader's backlog check).
    pub(crate) fn owed(&self) -> usize {
        self.lock().answers.len()
    }

    /// Applies a SUBSCRIBE of downlink channels (`None`: every downlink channel) at the
    /// requested QoS (capped at 1) and owes the SUBACK.
    pub(crate) fn subscribe(
        &self,
        generation: u64,
        pkid: u16,
        filters: &[(Option<Channel>, u8)],
    ) -> bool {
        {
            let mut state = self.lock();
            for (channel, qos) in filters {
                let qos = (*qos).min(1);
                for c in Channel::ALL {
                    if c.direction() == posfleet_proto::Direction::Down
                        && channel.is_none_or(|ch| ch == c)
                        && let Some(i) = channel_index(c)
                    {
                        state.subscriptions[i] = Some(qos);
                    }
                }
            }
        }
        let codes = filters.iter().map(|(_, qos)| (*qos).min(1)).collect();
        self.answer(generation, Answer::SubAck(pkid, codes))
    }

    /// Applies an UNSUBSCRIBE and owes the UNSUBACK.
    pub(crate) fn unsubscribe(
        &self,
        generation: u64,
        pkid: u16,
        channels: &[Option<Channel>],
    ) -> bool {
        {
            let mut state = self.lock();
            for channel in channels {
                for c in Channel::ALL {
                    if channel.is_none_or(|ch| ch == c)
                        && let Some(i) = channel_index(c)
                    {
                        state.subscriptions[i] = None;
                    }
                }
            }
        }
        self.answer(generation, Answer::UnsubAck(pkid))
    }

    /// A PUBACK from connection `generation`: settles the oldest downlink in flight.
    pub(crate) fn puback(&self, generation: u64, pkid: u16) -> Result<(), PubAckError> {
        let mut state = self.lock();
        if state.attached != Some(generation) {
            return Ok(());
        }
        match state.inflight.front() {
            Some(first) if first.pkid == pkid => {
                state.inflight.pop_front();
                if state.inflight.is_empty() {
                    // A settled session keeps no memory for its window.
                    state.inflight = VecDeque::new();
                }
                drop(state);
                // Room in the window: more may be written.
                self.wake.notify_one();
                Ok(())
            }
            _ => Err(PubAckError::Unexpected),
        }
    }

    /// Takes what connection `generation` should write now: owed answers, then downlinks up
    /// to the in-flight window.
    pub(crate) fn take(&self, generation: u64) -> Outgoing {
        let mut state = self.lock();
        let mut out = Outgoing::default();
        if state.attached != Some(generation) {
            return out;
        }
        out.answers = std::mem::take(&mut state.answers);
        while state.inflight.len() < MAX_INFLIGHT {
            let Some(downlink) = state.queue.pop_front() else {
                break;
            };
            state.queued_bytes -= downlink.payload.len();
            let redelivered = state.redeliver.pop_front();
            // The terminal unsubscribed since it was queued: drop it (the router would not
            // have kept it either), unless it is a promised redelivery.
            let qos = match (redelivered, state.subscribed(downlink.channel)) {
                (Some(_), _) => 1,
                (None, Some(qos)) => qos,
                (None, None) => continue,
            };
            if qos == 0 {
                out.publishes.push((0, false, false, downlink));
                continue;
            }
            let (pkid, dup) = match redelivered {
                Some(pkid) => (pkid, true),
                None => (state.pkid(), false),
            };
            state.inflight.push_back(InFlight {
                pkid,
                downlink: downlink.clone(),
            });
            out.publishes.push((pkid, true, dup, downlink));
        }
        if state.queue.is_empty() && state.queue.capacity() > 0 {
            // An idle session keeps no memory for its queue.
            state.queue = VecDeque::new();
            state.redeliver = VecDeque::new();
        }
        out
    }
}

/// Every terminal session of the edge, by device id.
#[derive(Debug, Default)]
pub(crate) struct DeviceSessions {
    map: Mutex<HashMap<DeviceId, Arc<DeviceSession>>>,
}

impl DeviceSessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, Arc<DeviceSession>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches connection `generation` (the only live one of this device, see
    /// `Sessions::claim`). A clean session starts empty; a persistent one keeps its
    /// subscriptions and downlinks, and what was in flight is written again with DUP set.
    /// Returns the session and whether state was present (CONNACK `session_present`).
    pub(crate) fn attach(
        &self,
        device: &DeviceId,
        generation: u64,
        clean_session: bool,
    ) -> (Arc<DeviceSession>, bool) {
        let mut map = self.lock();
        let existing = map.get(device).cloned();
        let present = existing.as_ref().is_some_and(|s| s.lock().persistent);
        let session = match existing {
            Some(session) if present && !clean_session => session,
            _ => {
                let session = Arc::new(DeviceSession {
                    state: Mutex::new(State::default()),
                    wake: Notify::new(),
                });
                map.insert(device.clone(), session.clone());
                session
            }
        };
        drop(map);
        {
            let mut state = session.lock();
            state.persistent = !clean_session;
            state.attached = Some(generation);
            state.answers.clear();
            // In flight on the previous connection: first again, with the same ids.
            while let Some(InFlight { pkid, downlink }) = state.inflight.pop_back() {
                state.queued_bytes += downlink.payload.len();
                state.queue.push_front(downlink);
                state.redeliver.push_front(pkid);
            }
        }
        session.wake.notify_one();
        (session, present && !clean_session)
    }

    /// Detaches connection `generation`; a clean session is forgotten.
    pub(crate) fn detach(&self, device: &DeviceId, generation: u64) {
        let mut map = self.lock();
        let Some(session) = map.get(device).cloned() else {
            return;
        };
        let mut state = session.lock();
        if state.attached != Some(generation) {
            return;
        }
        state.attached = None;
        state.answers.clear();
        if !state.persistent {
            drop(state);
            map.remove(device);
        }
    }

    /// Forgets a terminal's session and what was queued for it (revocation, retirement).
    pub(crate) fn forget(&self, device: &DeviceId) {
        self.lock().remove(device);
    }

    /// Queues a downlink for its terminal; wakes the terminal's connection.
    pub(crate) fn deliver(&self, device: &DeviceId, downlink: Downlink) -> Delivery {
        let Some(session) = self.lock().get(device).cloned() else {
            return Delivery::NoSubscriber;
        };
        let mut state = session.lock();
        if state.subscribed(downlink.channel).is_none() {
            return Delivery::NoSubscriber;
        }
        let outcome = state.push(downlink);
        let connected = state.attached.is_some();
        drop(state);
        if connected {
            session.wake.notify_one();
        }
        outcome
    }

    /// Sessions held (connected or persistent).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Encodes a PUBLISH for a terminal (rumqttd's own `Publish` keeps its packet id private).
pub(crate) fn encode_publish(
    out: &mut BytesMut,
    pkid: u16,
    qos1: bool,
    dup: bool,
    downlink: &Downlink,
) -> bool {
    let Ok(topic) = std::str::from_utf8(&downlink.topic) else {
        return false;
    };
    let publish = rumqttc::Publish {
        dup,
        qos: if qos1 {
            rumqttc::QoS::AtLeastOnce
        } else {
            rumqttc::QoS::AtMostOnce
        },
        retain: false,
        topic: topic.to_owned(),
        pkid,
        payload: downlink.payload.clone(),
    };
    publish.write(out).is_ok()
}

/// Encodes an answer.
pub(crate) fn encode_answer(out: &mut BytesMut, answer: &Answer) {
    use rumqttc::mqttbytes::v4::{PingResp, PubAck, SubAck, SubscribeReasonCode, UnsubAck};
    // Each write only fails for lengths no answer here can reach.
    let _ = match answer {
        Answer::PubAck(pkid) => PubAck::new(*pkid).write(out),
        Answer::SubAck(pkid, codes) => {
            let codes = codes
                .iter()
                .map(|code| match code {
                    0 => SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce),
                    1 => SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
                    _ => SubscribeReasonCode::Failure,
                })
                .collect();
            SubAck::new(*pkid, codes).write(out)
        }
        Answer::UnsubAck(pkid) => UnsubAck::new(*pkid).write(out),
        Answer::PingResp => PingResp.write(out),
    };
}

#[cfg(test)]
#[path = "devices_tests.rs"]
mod tests;
